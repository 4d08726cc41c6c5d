"""Stage 5 advanced tests: bad input, PEFT parity, edge cases of the LoRA family (model/lora_variants.py).

PEFT parity: the golden vectors of testcases/fixtures/peft_variants_golden.safetensors (made by
solutions/tools/make_variants_golden.py with PEFT 0.21.2) hold the same weights and inputs as
PEFT's layers; float64 outputs are compared within NETWORK_RTOL, PEFT's fp32 factorisations within
the bound stage5/basic.py derives for them. Bad input must raise a ValueError naming the argument
and leave the model exactly as it was (helpers.snapshot / assert_unchanged).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from testcases.helpers import assert_unchanged, copy_of, generator, randomize_lora, refuses, snapshot, word
from testcases.stage5.basic import (
    SPECTRUM,
    U32,
    OneProj,
    adalora_expected,
    adalora_pair,
    adalora_step_grads,
    base_weights,
    check_converted,
    check_delta,
    check_errors,
    check_fit,
    check_w0_init_function,
    cubic_budget,
    delta_model,
    dora_expected,
    expected_importance,
    f64,
    golden_linear,
    lm_step,
    loftq_layer,
    lora_paths,
    make_linear,
    matrix_with_spectrum,
    olora_product_bound,
    peft_golden,
    peft_lora_config,
    pissa_product_bound,
    pissa_trained,
    plain_nf4,
    products,
    randn,
    read_adapter,
    set_values,
    top_r_part,
    vera_draw_bound,
    vera_expected,
    write_adapter,
)
from testcases.tolerances import NETWORK_RTOL, UNIT_ROUNDOFF, assert_close, assert_network_close


def scalings(lora, model: nn.Module) -> dict[str, tuple[float, object]]:
    """Each LoRA layer's (scaling, use_rslora flag): what use_rslora changes, beyond the tensors snapshot() sees."""
    return {path: (layer.scaling, getattr(layer, "use_rslora", None)) for path, layer in lora.lora_layers(model)}


def identities(lora, model: nn.Module) -> dict[str, tuple[int, int]]:
    """Which Parameter objects each LoRA layer holds (LoRA-drop may change them)."""
    return {path: (id(layer.lora_A), id(layer.lora_B)) for path, layer in lora.lora_layers(model)}


# ---- Exercise 5.1: rsLoRA ------------------------------------------------------------------------


@pytest.mark.exercise("5.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"lora_alpha": 16, "r": 0}, "r"),
        ({"lora_alpha": 16, "r": 2.5}, "r"),
        ({"lora_alpha": 16, "r": True}, "r"),
        ({"lora_alpha": 0, "r": 4}, "lora_alpha"),
        ({"lora_alpha": -8, "r": 4}, "lora_alpha"),
        ({"lora_alpha": float("inf"), "r": 4}, "lora_alpha"),
        ({"lora_alpha": float("nan"), "r": 4}, "lora_alpha"),
    ],
)
def test_rslora_scaling_rejects_bad_arguments(lora_variants, kwargs, argument):
    """r not an int ≥ 1 (a bool is not an int here), lora_alpha not a finite number > 0: a ValueError naming it."""
    refuses(lora_variants.rslora_scaling, **kwargs, match=word(argument))


@pytest.mark.exercise("5.1")
@pytest.mark.parametrize("case", ["no LoRA layer", "a merged layer", "a PiSSA-initialised layer"])
def test_use_rslora_refuses_and_changes_nothing(lora, lora_variants, tiny_model, case):
    """No LoRA layer, a merged layer, or one initialised from W0: ValueError, and no layer's scale changed."""
    if case != "no LoRA layer":
        lora.get_lora_model(tiny_model, r=4, lora_alpha=8)
        randomize_lora(tiny_model, std=0.2)
        path, last = list(lora.lora_layers(tiny_model))[-1]  # the LAST layer: check every layer before changing any
        if case == "a merged layer":
            last.merge()
        else:  # what pissa_init leaves behind (install_initial_adapter is given code)
            weight = last.base_layer.weight.detach()
            lora_variants.install_initial_adapter(last, last.lora_A.detach(), last.lora_B.detach(), weight, "pissa")
    before, scales = snapshot(tiny_model), scalings(lora, tiny_model)
    refuses(lora_variants.use_rslora, tiny_model)
    assert_unchanged(tiny_model, before, f"use_rslora on a model with {case}")
    assert scalings(lora, tiny_model) == scales, (
        f"use_rslora raised for {case} but had already changed the scale of some layers: check EVERY layer first, "
        "then change them (a merged layer holds ΔW made with the old scale; a PiSSA residual was made with it too)"
    )


@pytest.mark.exercise("5.1")
def test_use_rslora_twice_and_peft_parity(lora, lora_variants):
    """use_rslora twice keeps lora_alpha / √r; the layer then computes PEFT's use_rslora output exactly."""
    golden = peft_golden()
    model = nn.Sequential(golden_linear(golden))
    lora.get_lora_model(model, r=4, lora_alpha=8, target_modules=["0"])
    lora_variants.use_rslora(model)
    lora_variants.use_rslora(model)
    layer = model[0]
    assert layer.scaling == pytest.approx(4.0, rel=1e-14), (
        f"use_rslora twice must leave scaling = lora_alpha / √r = 4 (compute it from lora_alpha and r, not from the "
        f"current scaling), got {layer.scaling!r}"
    )
    set_values(layer, lora_A=golden["rslora.A"], lora_B=golden["rslora.B"])
    assert_network_close(model(golden["x"]), golden["rslora.out"], "output vs PEFT 0.21.2 (use_rslora=True, r=4, alpha=8)",
                         "the check: h = W0 x + b + (lora_alpha / √r)·B A x")  # fmt: skip


# ---- Exercise 5.2: DoRA --------------------------------------------------------------------------


@pytest.mark.exercise("5.2")
def test_dora_matches_peft(lora_variants):
    """PEFT 0.21.2 (use_dora=True, r=4, alpha=8): the same initial magnitude, output and merged weight."""
    golden = peft_golden()
    linear = golden_linear(golden)
    layer = lora_variants.DoRALayer.from_linear(linear, r=4, lora_alpha=8)
    assert_network_close(layer.magnitude, golden["dora.magnitude_init"], "magnitude right after wrapping, vs PEFT",
                         "the check: the magnitude starts at the row norms of W0 (PEFT's lora_magnitude_vector)")  # fmt: skip
    set_values(layer, lora_A=golden["dora.A"], lora_B=golden["dora.B"], magnitude=golden["dora.magnitude"])
    assert_network_close(layer.eval()(golden["x"]), golden["dora.out"], "eval output vs PEFT",
                         "the check: h = base(x) + (m/n − 1) ⊙ W0 x + (m/n) ⊙ s·B A x, W0 x without the bias")  # fmt: skip
    layer.merge()
    assert_network_close(linear.weight, golden["dora.merged_weight"], "merged weight vs PEFT's merge_adapter()",
                         "the check: the merged weight is (m/n)[:, None] ⊙ (W0 + s·B A)")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_delta_weight_is_the_whole_change(lora_variants):
    """delta_weight() = (m/n) ⊙ (W0 + s·BA) − W0 (out, in): the magnitude rescales W0's rows too; refused when merged."""
    linear = make_linear(12, 10, seed=100)
    layer = lora_variants.DoRALayer.from_linear(linear, r=3, lora_alpha=5)
    set_values(layer, lora_A=randn(3, 12, seed=101, std=0.3), lora_B=randn(10, 3, seed=102, std=0.3),
               magnitude=linear.weight.detach().norm(dim=1) * 0.8)  # fmt: skip
    W, A, B, m = f64(linear.weight, layer.lora_A, layer.lora_B, layer.magnitude)
    adapted = W + (5 / 3) * B @ A
    expected = (m / adapted.norm(dim=1))[:, None] * adapted - W
    assert_network_close(layer.delta_weight(), expected, "DoRA delta_weight()",
                         "the check: delta_weight() = (m/n) ⊙ (W0 + s·B A) − W0, the change of the effective weight (not s·B A)")  # fmt: skip
    layer.merge()
    refuses(layer.delta_weight)  # merged: the base holds W0 + ΔW, and W0 is gone until unmerge()


@pytest.mark.exercise("5.2")
@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, "r"), ({"lora_dropout": 1.0}, "lora_dropout"), ({"target_modules": ["qproj"]}, "qproj"),
     ({"target_modules": []}, "target_modules")],
)  # fmt: skip
def test_get_dora_model_bad_input_changes_nothing(lora_variants, tiny_model, kwargs, match):
    """A bad argument or a target that matches nothing: ValueError naming it, the model untouched."""
    before = snapshot(tiny_model)
    refuses(lora_variants.get_dora_model, tiny_model, **kwargs, match=word(match))
    assert_unchanged(tiny_model, before, "get_dora_model")


@pytest.mark.exercise("5.2")
def test_get_dora_model_refuses_an_adapted_model(lora, lora_variants, tiny_model):
    """A model that already has LoRA layers: ValueError, nothing changed (no DoRA on top of LoRA)."""
    lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
    before = snapshot(tiny_model)
    refuses(lora_variants.get_dora_model, tiny_model, r=2, target_modules=["v_proj"])
    assert_unchanged(tiny_model, before, "get_dora_model on a model with LoRA layers")


@pytest.mark.exercise("5.2")
def test_dora_merge_needs_a_full_precision_base(lora_variants, quant):
    """merge() on an NF4 base raises a TypeError (W0 is not a float tensor) and leaves the layer unmerged and working."""
    base = quant.NF4Linear.from_linear(make_linear(64, 8, seed=103, dtype=torch.float32))
    layer = lora_variants.DoRALayer.from_linear(base, r=2, lora_alpha=4)
    set_values(layer, lora_B=randn(8, 2, seed=104, std=0.2))
    x = randn(3, 64, seed=105, dtype=torch.float32)
    before = layer(x).detach()
    refuses(layer.merge, error=TypeError)
    assert layer.merged is False, "a refused merge must leave merged = False"
    assert torch.equal(layer(x), before), "a refused merge must leave the layer computing what it computed"


@pytest.mark.exercise("5.2")
def test_dora_dtypes(lora_variants):
    """A bf16 base: fp32 magnitude and adapters, a bf16 output within bf16 rounding of the formula."""
    linear = make_linear(32, 8, seed=106, dtype=torch.bfloat16)
    layer = lora_variants.DoRALayer.from_linear(linear, r=2, lora_alpha=4)
    for name in ("lora_A", "lora_B", "magnitude"):
        assert getattr(layer, name).dtype == torch.float32, (
            f"{name} of a bf16 base must be fp32 (trainable tensors keep fp32 master weights), got "
            f"{getattr(layer, name).dtype}"
        )
    set_values(layer, lora_B=randn(8, 2, seed=107, std=0.2), magnitude=layer.magnitude.detach() * 1.3)
    x = randn(4, 32, seed=108, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16, f"the output keeps the base output's dtype (bf16), got {out.dtype}"
    W, b, A, B, m, x64 = f64(linear.weight, linear.bias, layer.lora_A, layer.lora_B, layer.magnitude, x)
    expected = dora_expected(x64, W, b, A, B, m, 2.0)
    factor = (m / (W + 2.0 * B @ A).norm(dim=1)).abs()
    # the base runs in bf16 (32-long dot products), the DoRA term in fp32, the sum is cast to bf16:
    # 32 + 8 roundings of bf16, each at most u·((1 + m/n)·(|W0||x| + s|B||A||x|) + |b|)
    magnitude = (1 + factor) * (x64.abs() @ (W.abs() + 2.0 * B.abs() @ A.abs()).T) + b.abs()
    assert_close(out, expected, "DoRA output on a bf16 base", bound=(32 + 8) * UNIT_ROUNDOFF[torch.bfloat16] * magnitude,
                 hint="the check: the norm and the DoRA term in fp32, the result in the base output's dtype")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_on_device(lora_variants, device):
    """On every device: the magnitude sits on the base's device and the forward follows the formula there."""
    linear = make_linear(12, 10, seed=109).to(device)
    layer = lora_variants.DoRALayer.from_linear(linear, r=4, lora_alpha=8)
    assert layer.magnitude.device.type == device.type, f"magnitude must live on the base's device ({device.type})"
    set_values(layer, lora_B=randn(10, 4, seed=110, std=0.3).to(device))
    x = randn(5, 12, seed=111).to(device)
    W, b, A, B, m = f64(linear.weight, linear.bias, layer.lora_A, layer.lora_B, layer.magnitude)
    assert_network_close(layer(x).cpu(), dora_expected(x.cpu(), W, b, A, B, m, 2.0), f"DoRA output on {device.type}")


@pytest.mark.exercise("5.2")
def test_dora_dropout_reaches_the_base_term(lora_variants):
    """With dropout active, PEFT's DoRA applies (m/n − 1) to W0·dropout(x) — the input the LoRA term sees — not to W0 x."""
    n_features, p = 16, 0.5
    w = 0.5 + torch.rand(n_features, generator=generator(140), dtype=torch.float64)
    linear = nn.Linear(n_features, n_features, dtype=torch.float64)
    with torch.no_grad():  # a diagonal W0: W0·x is w ⊙ x, so each output element shows whether its input was dropped
        linear.weight.copy_(torch.diag(w))
        linear.bias.copy_(randn(n_features, seed=141, std=0.1))
    layer = lora_variants.DoRALayer.from_linear(linear, r=2, lora_alpha=4, lora_dropout=p).train()
    set_values(layer, magnitude=1.5 * w)  # B = 0, so n = |w| and m/n − 1 = 0.5 on every row
    x = randn(40, n_features, seed=142)
    base = linear(x).detach()
    change = layer(x).detach() - base  # PEFT: (m/n − 1) ⊙ W0·dropout(x), each element 0 or 0.5·w·x / (1 − p)
    kept, clean = 0.5 * w * x / (1 - p), 0.5 * w * x
    # float64: two evaluations of a 16-term dot product and a few products, far below 1e-9 of the scale
    bound = NETWORK_RTOL * (base.abs().max().item() + kept.abs().max().item() + 1)
    dropped, as_kept = change.abs() <= bound, (change - kept).abs() <= bound
    if bool((change - clean).abs().le(bound).all()):
        cause = "the (m/n − 1) term used the clean base output W0 x although dropout is active"
    else:
        cause = (
            f"{int((~(dropped | as_kept)).sum())} of {change.numel()} elements are neither 0 nor (m/n − 1)·w·x/(1 − p)"
        )
    assert bool((dropped | as_kept).all()) and bool(dropped.any()) and bool(as_kept.any()), (
        f"DoRA in training mode with lora_dropout={p}, B = 0, m/n = 1.5: {cause}. PEFT (use_dora=True) computes the "
        "(m/n − 1) term from W0·dropout(x), the same dropped-out input as the LoRA term (a second matmul); only "
        "without active dropout may it reuse the base output minus the bias"
    )


# ---- Exercise 5.3: PiSSA and OLoRA ---------------------------------------------------------------


@pytest.mark.exercise("5.3")
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_w0_inits_match_peft(lora, lora_variants, method):
    """PEFT 0.21.2's init_lora_weights="pissa" / "olora" (r=4, alpha=8, fp32): the same s·B A and residual."""
    golden = peft_golden()
    linear = golden_linear(golden, torch.float32)
    weight = linear.weight.detach().clone()
    layer = lora.LoRALayer.from_linear(linear, r=4, lora_alpha=8)
    getattr(lora_variants, f"{method}_init")(layer)
    A, B, residual = f64(layer.lora_A, layer.lora_B, layer.base_layer.weight)
    product = layer.scaling * B @ A
    W = weight.double()
    # two fp32 factorisations (PEFT's and this one), each off by at most the derived bound
    pissa = method == "pissa"
    bound = 2 * pissa_product_bound(weight, 4, layer) if pissa else olora_product_bound(weight, 4, product)
    assert_close(product, golden[f"{method}.product"], f"s·B A after {method}_init vs PEFT", bound=bound,
                 hint="the check: the adapter's product is PEFT's (PiSSA: √(S_r / s) on each side; OLoRA: B = Q[:, :r], A = R[:r], no ÷ s)")  # fmt: skip
    assert_close(residual, golden[f"{method}.residual"], f"the residual in the base after {method}_init vs PEFT",
                 bound=bound + 8 * U32 * (W.abs() + product.abs()), hint="the check: the base holds W0 − s·B A")  # fmt: skip
    if pissa:  # PEFT splits √(S/s) evenly: compare each triplet's share (sign-free norms)
        _, S = top_r_part(weight, 4)
        for i in range(4):
            want = math.sqrt(S[i].item() / 2)
            for name, got in (("row of A", A[i].norm().item()), ("column of B", B[:, i].norm().item())):
                assert abs(got - want) <= 1e-4 * want, (
                    f"triplet {i}: PEFT's {name} has norm √(S_i / s) = {want:.5f}, got {got:.5f}"
                )


@pytest.mark.exercise("5.3")
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_w0_init_refusals_change_nothing(lora, lora_variants, quant, method):
    """Initialising twice, a merged layer, an NF4 or float64 base, r > min(in, out): ValueError, nothing changed."""
    init = getattr(lora_variants, f"{method}_init")
    layer = lora.LoRALayer.from_linear(make_linear(12, 10, seed=112, dtype=torch.float32), r=2)
    init(layer)
    cases = {"a second init": layer}
    merged = lora.LoRALayer.from_linear(make_linear(12, 10, seed=113, dtype=torch.float32), r=2)
    merged.merge()
    cases["a merged layer"] = merged
    base = quant.NF4Linear.from_linear(make_linear(64, 8, seed=114, dtype=torch.float32))
    cases["an NF4 base"] = lora.LoRALayer.from_linear(base, r=2)
    cases["a float64 base"] = lora.LoRALayer.from_linear(make_linear(12, 10, seed=115), r=2)
    cases["r = 11 > min(12, 10)"] = lora.LoRALayer.from_linear(make_linear(12, 10, seed=116, dtype=torch.float32), r=11)
    for case, target in cases.items():
        before = snapshot(target)
        refuses(init, target)
        assert_unchanged(target, before, f"{method}_init on {case}")


@pytest.mark.exercise("5.3")
def test_pissa_on_a_bf16_base(lora, lora_variants):
    """A bf16 base: the SVD runs in fp32, A and B stay fp32, the residual is stored in bf16 and the function is kept."""
    weight = matrix_with_spectrum(10, 12, SPECTRUM, seed=117)
    linear = nn.Linear(12, 10, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    weight = linear.weight.detach().float()  # W0 as the bf16 layer holds it
    bias = linear.bias.detach().float()
    layer = lora.LoRALayer.from_linear(linear, r=4, lora_alpha=8)
    lora_variants.pissa_init(layer)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32, "A and B of a bf16 base stay fp32"
    assert layer.base_layer.weight.dtype == torch.bfloat16, "the residual is stored in the base's own dtype (bf16)"
    top, _ = top_r_part(weight, 4)
    A, B, residual = f64(layer.lora_A, layer.lora_B, layer.base_layer.weight)
    # the residual W0 − s·B A is rounded once to bf16, on top of the fp32 SVD's error
    bound = pissa_product_bound(weight, 4, layer) + UNIT_ROUNDOFF[torch.bfloat16] * (weight.double() - top).abs()
    assert_close(residual, weight.double() - top, "the bf16 residual after pissa_init", bound=bound,
                 hint="the check: the base holds W0 − s·B A computed in fp32 and rounded once to the base's dtype")  # fmt: skip
    with torch.no_grad():
        x = randn(7, 12, seed=40, dtype=torch.bfloat16)
        got = layer.base_layer(x).float() + layer.scaling * (x.float() @ layer.lora_A.T) @ layer.lora_B.T
    mag = x.double().abs() @ (residual.abs() + 2.0 * B.abs() @ A.abs()).T + bias.double().abs()
    bound = (12 + 8) * UNIT_ROUNDOFF[torch.bfloat16] * mag + x.double().abs() @ bound.T
    assert_close(got, x.double() @ weight.double().T + bias.double(), "a bf16 PiSSA layer's function at step 0",
                 bound=bound, hint="the check: W_res + s·B A = W0 up to the rounding of W_res to bf16")  # fmt: skip


@pytest.mark.exercise("5.3")
def test_w0_init_with_scale_one(lora, lora_variants):
    """lora_alpha = r (s = 1): PiSSA's B A is the top-r part itself and the layer still computes W0 x + b."""
    weight = matrix_with_spectrum(10, 12, SPECTRUM, seed=118)
    linear = nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(weight)
    bias = linear.bias.detach().clone()
    layer = lora.LoRALayer.from_linear(linear, r=4, lora_alpha=4)
    lora_variants.pissa_init(layer)
    top, _ = top_r_part(weight, 4)
    A, B = f64(layer.lora_A, layer.lora_B)
    bound = pissa_product_bound(weight, 4, layer)
    assert_close(
        B @ A, top, "B A with s = 1", bound=bound, hint="the check: A = diag(√S_r) Uᵀ[:r], B = V[:, :r] diag(√S_r)"
    )
    check_w0_init_function(layer, weight, bias, bound + 8 * U32 * weight.double().abs(), "PiSSA output, s = 1")


# ---- Exercise 5.4: LoftQ -------------------------------------------------------------------------


@pytest.mark.exercise("5.4")
def test_loftq_honours_block_size(lora, lora_variants, quant):
    """block_size=128: plain QLoRA's error is that of 128-blocks, and the base quantizes in blocks of 128."""
    layer, weight = loftq_layer(lora, seed=120)
    errors = lora_variants.loftq_init(layer, num_iters=1, block_size=128)
    check_errors(errors, 1)
    expected = plain_nf4(quant, weight, 128)
    assert getattr(layer.base_layer, "block_size", None) == 128, "the NF4 base must use block_size 128"
    assert torch.equal(layer.base_layer.dequantize_weight(torch.float32), expected), (
        "the base must hold dequantize_nf4(quantize_nf4(W, 128), …, 128): pass block_size on to Stage 3's functions"
    )
    plain = torch.linalg.matrix_norm(weight.double() - expected.double()).item()
    assert abs(errors[0] - plain) <= (1536 + 2) * U32 * plain, (
        f"errors[0] with block_size 128 must be ‖W − NF4₁₂₈(W)‖ = {plain:.6g}, got {errors[0]:.6g}"
    )


@pytest.mark.exercise("5.4")
def test_loftq_requantizes_w_minus_the_adapter(lora, lora_variants, quant):
    """Iteration 2 quantizes W − s·B₁A₁, not W again: its codes follow NF4(W − best rank-r fit of W − Q̂₁)."""
    layer, weight = loftq_layer(lora, seed=121)
    errors = lora_variants.loftq_init(layer, num_iters=2)
    check_errors(errors, 2)
    W = weight.double()
    first = plain_nf4(quant, weight).double()
    U, S, Vh = torch.linalg.svd(W - first)
    fit = (U[:, :2] * S[:2]) @ Vh[:2]  # s·B₁A₁, exactly
    packed, _ = quant.quantize_nf4((W - fit).float())
    want = quant.unpack_nibbles(packed, 1536)
    got = quant.unpack_nibbles(layer.base_layer.packed, 1536)
    same_as_plain = quant.unpack_nibbles(quant.quantize_nf4(weight)[0], 1536)
    differ = int((got != want).sum())
    # the student's fit differs from ours by the fp32 SVD's error (~1e-6 of a block's scale): a code can flip only
    # for the few elements that close to an NF4 decision boundary (expected ≪ 1 of 1,536); 1 % is 100× that
    assert differ <= 15, (
        f"{differ} of 1,536 codes differ from NF4(W − s·B₁A₁) ({int((got != same_as_plain).sum())} differ from NF4(W)): "
        "each iteration quantizes W minus the CURRENT adapter, W − s·B A"
    )


@pytest.mark.exercise("5.4")
def test_loftq_keeps_the_bias_and_the_forward(lora, lora_variants):
    """The bias moves into the NF4 base unchanged; the layer computes (Q̂ + s·B A) x + b."""
    linear = make_linear(64, 24, seed=122, dtype=torch.float32)
    bias = linear.bias.detach().clone()
    layer = lora.LoRALayer.from_linear(linear, r=3, lora_alpha=6)
    lora_variants.loftq_init(layer, num_iters=2)
    assert torch.equal(layer.base_layer.bias.detach(), bias), "the base keeps the bias, unchanged"
    x = randn(5, 64, seed=123, dtype=torch.float32)
    Q, A, B, x64 = f64(layer.base_layer.dequantize_weight(torch.float32), layer.lora_A, layer.lora_B, x)
    expected = x64 @ (Q + 2.0 * B @ A).T + bias.double()
    # fp32 forward: 64 + 3 + 4 roundings of |Q̂||x| + s|B||A||x| + |b|
    bound = (64 + 3 + 4) * U32 * (x64.abs() @ (Q.abs() + 2.0 * B.abs() @ A.abs()).T + bias.double().abs())
    assert_close(layer(x), expected, "output after loftq_init", bound=bound, dtype=torch.float32,
                 hint="the check: the layer computes its NF4 base (Q̂ x + b) plus s·B A x")  # fmt: skip


@pytest.mark.exercise("5.4")
def test_loftq_refusals(lora, lora_variants, quant):
    """num_iters < 1, block_size < 1, an already-initialised or a 4-bit base: ValueError, the layer unchanged."""
    layer, weight = loftq_layer(lora, seed=124)
    lora_variants.loftq_init(layer, num_iters=1)
    fresh, _ = loftq_layer(lora, seed=125)
    nf4 = lora.LoRALayer.from_linear(quant.NF4Linear.from_linear(make_linear(64, 8, seed=126, dtype=torch.float32)))
    for target, kwargs, name in ((fresh, {"num_iters": 0}, "num_iters"), (fresh, {"block_size": 0}, "block_size"),
                                 (layer, {}, None), (nf4, {}, None)):  # fmt: skip
        before = snapshot(target)
        refuses(lora_variants.loftq_init, target, **kwargs, match=word(name) if name else None)
        assert_unchanged(target, before, f"loftq_init({kwargs or target.base_layer.__class__.__name__})")


@pytest.mark.exercise("5.4")
def test_loftq_many_iterations(lora, lora_variants):
    """num_iters=5 with s = 0.5: six errors, the last one the best rank-r fit of what the layer holds, below QLoRA's."""
    layer, weight = loftq_layer(lora, seed=127, r=4, lora_alpha=2)
    errors = lora_variants.loftq_init(layer, num_iters=5)
    check_errors(errors, 5)
    check_fit(layer, weight, layer.base_layer.dequantize_weight(torch.float32), "after loftq_init(num_iters=5)")
    assert errors[-1] < 0.99 * errors[0], f"LoftQ ends below plain QLoRA's error: {errors}"


# ---- Exercise 5.5: LoRA-FA -----------------------------------------------------------------------


@pytest.mark.exercise("5.5")
def test_freeze_lora_a_needs_lora_layers(lora_variants):
    """A model without LoRA layers: ValueError."""
    refuses(lora_variants.freeze_lora_A, nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.exercise("5.5")
def test_freeze_lora_a_sets_b_and_leaves_the_rest(lora, lora_variants, tiny_model):
    """B becomes trainable even if it was frozen; A frozen; every other flag (a DoRA magnitude, a bias) is left as it was."""
    lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
    tiny_model.requires_grad_(False)
    tiny_model.lm_head.weight.requires_grad_(True)  # something else the user chose to train
    lora_variants.freeze_lora_A(tiny_model)
    trainable = sorted(name for name, p in tiny_model.named_parameters() if p.requires_grad)
    expected = sorted(["lm_head.weight", *(f"layers.{i}.self_attn.q_proj.lora_B" for i in range(2))])
    assert trainable == expected, (
        f"freeze_lora_A sets lora_A False and lora_B True and changes nothing else; expected {expected}, got {trainable}"
    )


@pytest.mark.exercise("5.5")
def test_lora_fa_on_dora_keeps_the_magnitude_trainable(lora_variants, tiny_model):
    """LoRA-FA on a DoRA model: A frozen, B and the magnitude still trainable."""
    lora_variants.get_dora_model(tiny_model, r=2, target_modules=["v_proj"])
    lora_variants.freeze_lora_A(tiny_model)
    trainable = sorted({n.rsplit(".", 1)[-1] for n, p in tiny_model.named_parameters() if p.requires_grad})
    assert trainable == ["lora_B", "magnitude"], (
        f"freeze_lora_A freezes A only: B and DoRA's magnitude stay trainable, got {trainable}"
    )


# ---- Exercise 5.6: VeRA --------------------------------------------------------------------------


@pytest.mark.exercise("5.6")
def test_vera_matches_peft(lora_variants):
    """PEFT 0.21.2 VeraConfig(r=16, key 0): with the same λ_d, λ_b the same output (r·(in+out) > in·out here)."""
    golden = peft_golden()
    model = nn.Sequential(golden_linear(golden))
    lora_variants.get_vera_model(model, r=16, target_modules=["0"], projection_prng_key=0)
    layer = model[0]
    set_values(layer, lambda_d=golden["vera.lambda_d"], lambda_b=golden["vera.lambda_b"])
    out = golden["vera.out"]
    # float64 evaluations of one formula (NETWORK_RTOL), plus what the draws themselves may differ by on
    # another CPU (uniform_draws_close: 4 ulps of the bound), carried through λ_b ⊙ B(λ_d ⊙ A x)
    bound = NETWORK_RTOL * (out.abs().max().item() + 1) + vera_draw_bound(golden)
    assert_close(model(golden["x"]), out, "VeRA output vs PEFT", bound=bound,
                 hint="the check: h = W0 x + b + λ_b ⊙ B_s(λ_d ⊙ A_s x), with PEFT's draws for key 0")  # fmt: skip


@pytest.mark.exercise("5.6")
@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, "r"), ({"projection_prng_key": -1}, "projection_prng_key"), ({"vera_dropout": 1.0}, "vera_dropout"),
     ({"d_initial": float("nan")}, "d_initial"), ({"target_modules": ["nonexistent"]}, "nonexistent")],
)  # fmt: skip
def test_get_vera_model_bad_input_changes_nothing(lora_variants, tiny_model, kwargs, match):
    """A bad argument or target: ValueError naming it, the model untouched."""
    before = snapshot(tiny_model)
    refuses(
        lora_variants.get_vera_model, tiny_model, **{"r": 4, **kwargs}, match=word(match)
    )  # a copy: the parameters are reused
    assert_unchanged(tiny_model, before, "get_vera_model")


@pytest.mark.exercise("5.6")
def test_vera_delta_weight_merge_and_gradients(lora_variants, biased_model):
    """delta_weight = (λ_b ⊙ B_s)(λ_d ⊙ A_s); merging keeps the output; only λ_d and λ_b get gradients."""
    model = biased_model.double()
    lora_variants.get_vera_model(model, r=6, d_initial=0.5, target_modules=["up_proj", "down_proj"])
    layer = model.down_proj
    assert torch.all(layer.lambda_d == 0.5), "λ_d starts at d_initial (0.5 here)"
    set_values(layer, lambda_d=randn(6, seed=130), lambda_b=randn(24, seed=131))
    W, A, B, d, lb = f64(layer.base_layer.weight, layer.vera_A, layer.vera_B, layer.lambda_d, layer.lambda_b)
    expected = (lb[:, None] * B[:24]) @ (d[:, None] * A[:, :70])
    assert_network_close(layer.delta_weight(), expected, "VeRA delta_weight() of down_proj (70 → 24)",
                         "the check: ΔW = (λ_b[:, None] ⊙ B_s) @ (λ_d[:, None] ⊙ A_s), from the (out, in) slices")  # fmt: skip
    x = randn(5, 24, seed=132)
    out = model(x)
    out.square().sum().backward()
    with_grad = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None})
    assert with_grad == ["lambda_b", "lambda_d"], f"only λ_d and λ_b may get gradients, got {with_grad}"
    assert not layer.vera_A.requires_grad and not layer.vera_B.requires_grad, "the shared pair is frozen"
    layer.merge()
    assert_network_close(
        model(x),
        out.detach(),
        "output after merging down_proj",
        "the check: merged, the base weight is W0 + delta_weight()",
    )


@pytest.mark.exercise("5.6")
def test_vera_projections_follow_the_model(lora_variants, tiny_model64, device):
    """The shared pair is drawn on the CPU from the key, then placed on the targets' device and dtype."""
    model = tiny_model64.to(device)
    lora_variants.get_vera_model(model, r=4, projection_prng_key=7)
    layer = model.layers[0].mlp.down_proj
    assert layer.vera_A.device.type == device.type and layer.vera_A.dtype == torch.float64, (
        f"vera_A must be on the model's device ({device.type}) in its dtype (float64), got "
        f"{layer.vera_A.dtype} on {layer.vera_A.device.type}"
    )
    assert layer.lambda_d.dtype == torch.float64 and layer.lambda_d.device.type == device.type, (
        "λ_d and λ_b follow the base layer's device and dtype (adapter_placement)"
    )
    A, B = lora_variants.vera_projections(4, 32, 32, projection_prng_key=7)
    assert torch.equal(layer.vera_A.cpu(), A.double()) and torch.equal(layer.vera_B.cpu(), B.double()), (
        "the shared pair is vera_projections(r, max in, max out, projection_prng_key), moved to the targets' placement"
    )


@pytest.mark.exercise("5.6")
def test_vera_thin_order_on_a_wide_layer(lora_variants):
    """A layer where the thin products are cheaper (r·(in+out) ≤ in·out) still follows the formula, with dropout off in eval."""
    model = nn.Sequential(make_linear(40, 30, seed=133))
    lora_variants.get_vera_model(model, r=3, target_modules=["0"], vera_dropout=0.2)
    layer = model[0]
    set_values(layer, lambda_d=randn(3, seed=134), lambda_b=randn(30, seed=135))
    x = randn(4, 40, seed=136)
    W, b, A, B, d, lb = f64(layer.base_layer.weight, layer.base_layer.bias, layer.vera_A, layer.vera_B,
                            layer.lambda_d, layer.lambda_b)  # fmt: skip
    assert_network_close(model.eval()(x), vera_expected(x, W, b, A, B, d, lb), "VeRA output (40 → 30, r = 3) in eval",
                         "the check: in eval mode dropout changes nothing; in train mode it acts on the VeRA input only")  # fmt: skip


@pytest.mark.exercise("5.6")
@pytest.mark.parametrize("r", [3, 40])  # the thin products (3·70 ≤ 40·30) and ΔW formed once (40·70 > 40·30)
def test_vera_dropout_acts_on_the_vera_input(lora_variants, r):
    """In training mode vera_dropout drops VeRA's input x, never the base path nor the update's output elements."""
    model = nn.Sequential(make_linear(40, 30, seed=137))
    lora_variants.get_vera_model(model, r=r, target_modules=["0"], vera_dropout=0.5)
    layer = model[0].train()
    x = randn(50, 40, seed=138)
    base = layer.base_layer(x).detach()
    assert_network_close(layer(x), base, f"training-mode output with λ_b = 0 and vera_dropout = 0.5 (r = {r})",
                         "the check: the base path is the same in train and eval mode (dropout acts on the VeRA input only)")  # fmt: skip
    set_values(layer, lambda_d=randn(r, seed=139), lambda_b=randn(30, seed=140))
    update = layer(x).detach() - base
    zeros = (update == 0).double().mean().item()
    # Dropout on the VeRA input leaves every update element a sum over 40 inputs: it is exactly 0 only if all 40
    # inputs of its token were dropped (probability 2^-40). Dropout on the update's output zeroes half of them.
    assert zeros < 0.05, (
        f"{zeros:.0%} of the VeRA update's elements are exactly 0 (r = {r}): dropout seems applied to the update's "
        "output; it belongs on the VeRA input: λ_b ⊙ B_s(λ_d ⊙ A_s dropout(x)) — in both orders of the forward"
    )
    in_eval = layer.eval()(x).detach() - base
    assert not torch.allclose(update, in_eval), (
        f"with vera_dropout = 0.5 the training-mode update equals the eval-mode one (r = {r}): apply "
        "nn.Dropout(vera_dropout) to the VeRA input in training mode"
    )


# ---- Exercise 5.7: AdaLoRA -----------------------------------------------------------------------


@pytest.mark.exercise("5.7")
def test_adalora_matches_peft(lora_variants):
    """PEFT 0.21.2 AdaLoraConfig(init_r=6, lora_alpha=8): with the same Q, Λ, P the same output."""
    golden = peft_golden()
    model = nn.Sequential(golden_linear(golden))
    lora_variants.get_adalora_model(model, init_r=6, lora_alpha=8, target_modules=["0"])
    set_values(model[0], lora_A=golden["adalora.A"], lora_E=golden["adalora.E"], lora_B=golden["adalora.B"])
    assert_network_close(model(golden["x"]), golden["adalora.out"], "AdaLoRA output vs PEFT",
                         "the check: PEFT's SVDLinear, h = base(x) + x (Q ⊙ Λ)ᵀ Pᵀ · lora_alpha / (ranknum + 1e-5)")  # fmt: skip


@pytest.mark.exercise("5.7")
@pytest.mark.parametrize(
    "kwargs, match",
    [({"total_step": 0}, "total_step"), ({"deltaT": 0}, "deltaT"), ({"beta1": 1.0}, "beta1"),
     ({"beta2": 0.0}, "beta2"), ({"target_r": 7}, "target_r"), ({"tinit": 10, "tfinal": 10}, "tinit"),
     ({"orth_reg_weight": -0.1}, "orth_reg_weight")],
)  # fmt: skip
def test_rank_allocator_rejects_bad_settings(lora_variants, kwargs, match):
    """A bad schedule or EMA setting (target_r above the initial rank, no budgeting step left): ValueError naming it."""
    model = adalora_pair(lora_variants)
    settings = {"total_step": 20, "target_r": 2, **kwargs}
    refuses(lora_variants.RankAllocator, model, **settings, match=word(match))


@pytest.mark.exercise("5.7")
def test_adalora_needs_adalora_layers(lora_variants, tiny_model):
    """RankAllocator and orthogonal_regularization refuse a model without AdaLoRA layers; bad targets change nothing."""
    refuses(lora_variants.orthogonal_regularization, tiny_model)
    refuses(lora_variants.RankAllocator, tiny_model, total_step=10)
    before = snapshot(tiny_model)
    for kwargs, match in (({"init_r": 0}, "init_r"), ({"target_modules": ["qproj"]}, "qproj")):
        refuses(lora_variants.get_adalora_model, tiny_model, **kwargs, match=word(match))
        assert_unchanged(tiny_model, before, f"get_adalora_model({kwargs})")


@pytest.mark.exercise("5.7")
def test_allocator_keeps_the_budget_on_ties(lora_variants):
    """All-zero gradients make every score tie at 0: still exactly budget values are kept."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=20, target_r=2)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    allocator.update_importance()
    pattern = allocator.mask_to_budget(5)
    kept = sum(int(torch.as_tensor(v).sum()) for v in pattern.values())
    nonzero = sum(int(torch.count_nonzero(lay.lora_E)) for _, lay in lora_variants.adalora_layers(model))
    assert kept == 5 and nonzero == 5, (
        f"with all scores tied, mask_to_budget(5) must still keep exactly 5 values (a top-k keeps k), kept {kept}, "
        f"{nonzero} Λ_i non-zero; PEFT's threshold (mask every score ≤ the k-th smallest) masks all ties"
    )


@pytest.mark.exercise("5.7")
def test_masking_keeps_ranknum_and_the_final_pattern(lora_variants):
    """Masking never changes ranknum; at T − tfinal the pattern is frozen, re-applied after every later step; EMAs reset."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=8, target_r=2, tinit=1, tfinal=3, deltaT=1)
    x = randn(8, 12, seed=137)
    layers = dict(lora_variants.adalora_layers(model))
    for step in range(8):
        adalora_step_grads(model, x)
        with torch.no_grad():  # an optimizer would revive masked values: pretend it did
            for layer in layers.values():
                layer.lora_E.add_(0.01)
        budget = allocator.update_and_allocate(step)
        expected, _ = cubic_budget(step, 12, 4, 8, 1, 3, 1)
        assert budget == expected, f"update_and_allocate({step}) returns the budget {expected}, got {budget}"
        if step == 5:
            frozen = {p: torch.as_tensor(v).clone() for p, v in allocator.rank_pattern.items()}
            assert not allocator.exp_avg_ipt, "after the final mask (step T − tfinal) the importance EMAs are reset"
    for path, layer in layers.items():
        ranknum = torch.as_tensor(layer.ranknum).detach().double().flatten().tolist()
        assert ranknum == [6.0], (
            f"{path}: masking zeroes Λ_i but never changes ranknum (PEFT divides by init_r), got {ranknum}"
        )
        kept = torch.as_tensor(allocator.rank_pattern[path])
        assert torch.equal(kept, frozen[path]), f"{path}: after T − tfinal the rank pattern is frozen"
        alive = layer.lora_E.detach().flatten() != 0
        assert torch.equal(alive, kept.bool()), (
            f"{path}: after steps past T − tfinal the frozen pattern is re-applied: Λ non-zero exactly at "
            f"{kept.int().tolist()}, got {alive.int().tolist()}"
        )
    x2 = randn(3, 12, seed=138)
    layer = layers["0"]
    W, b, A, E, B = f64(layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_E, layer.lora_B)
    assert_network_close(layer(x2), adalora_expected(x2, W, b, A, E, B, 8, 6), "output of a masked layer",
                         "the check: after masking the forward still divides by ranknum = init_r (+ 1e-5)")  # fmt: skip


@pytest.mark.exercise("5.7")
def test_missing_gradients_count_as_zero(lora_variants):
    """A parameter without a gradient has sensitivity 0: its EMAs decay, no error."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=20, target_r=2, beta1=0.8, beta2=0.6)
    allocator.update_importance()  # no backward yet: every gradient is None
    scores = allocator.triplet_scores()
    for path, score in scores.items():
        assert torch.count_nonzero(torch.as_tensor(score)) == 0, f"{path}: no gradient means importance 0, got {score}"


@pytest.mark.exercise("5.7")
def test_budget_schedule_warm_up_includes_step_tinit(lora_variants):
    """Step tinit itself is still warm-up (step ≤ tinit: b0, no mask), even when deltaT divides it, as in PEFT."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=12, target_r=2, tinit=4, tfinal=2, deltaT=2)
    got = [(b, bool(m)) for b, m in (allocator.budget_schedule(step) for step in range(12))]
    expected = [cubic_budget(step, 12, 4, 12, 4, 2, 2) for step in range(12)]
    assert got == expected, (
        f"budget_schedule(step) for steps 0–11 (tinit 4, tfinal 2, deltaT 2, 12 → 4 values) must be {expected}, got "
        f"{got}: the warm-up is step <= tinit (budget b0, no masking), the cubic phase starts at tinit + 1"
    )


# ---- Exercise 5.8: Delta-LoRA --------------------------------------------------------------------


@pytest.mark.exercise("5.8")
def test_delta_lora_respects_start_step(lora, lora_variants, tiny_model64, token_ids):
    """start_step=2: steps 0 and 1 leave W0 alone; after 4 steps W0 moved by λ·s·(B₄A₄ − B₂A₂)."""
    model = delta_model(lora, tiny_model64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    lora_variants.DeltaLoRA(model, update_ratio=0.7, start_step=2).attach(optimizer)
    w0 = base_weights(lora, model)
    for _ in range(2):
        lm_step(model, token_ids, optimizer)
    for path, weight in base_weights(lora, model).items():
        assert torch.equal(weight, w0[path]), f"{path}: steps 0 and 1 come before start_step=2: W0 must not move"
    middle = products(lora, model)
    for _ in range(2):
        lm_step(model, token_ids, optimizer)
    check_delta(lora, model, w0, middle, products(lora, model), 0.7, 2.0, "after steps 2 and 3 (start_step=2)")


@pytest.mark.exercise("5.8")
def test_delta_lora_detach_stops_it(lora, lora_variants, tiny_model64, token_ids):
    """After detach() a step leaves W0 alone (the hooks are gone)."""
    model = delta_model(lora, tiny_model64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    delta = lora_variants.DeltaLoRA(model, update_ratio=0.5).attach(optimizer)
    lm_step(model, token_ids, optimizer)
    delta.detach()
    w0 = base_weights(lora, model)
    lm_step(model, token_ids, optimizer)
    for path, weight in base_weights(lora, model).items():
        assert torch.equal(weight, w0[path]), f"{path}: after detach() Delta-LoRA must not move W0"


@pytest.mark.exercise("5.8")
@pytest.mark.parametrize("case", ["dropout", "merged", "DoRA", "update_ratio", "start_step", "no LoRA"])
def test_delta_lora_refusals(lora, lora_variants, tiny_model, case):
    """Dropout on the LoRA path, a merged or DoRA layer, a bad ratio or start step, no LoRA: ValueError, nothing changed."""
    kwargs = {}
    if case == "dropout":
        lora.get_lora_model(tiny_model, r=2, lora_dropout=0.1, target_modules=["q_proj"])
    elif case == "merged":
        lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
        list(lora.lora_layers(tiny_model))[-1][1].merge()
    elif case == "DoRA":  # a DoRA layer built without Exercise 5.2's code: only its class and magnitude matter here
        lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
        dora = lora_variants.DoRALayer.__new__(lora_variants.DoRALayer)
        lora.LoRALayer.__init__(dora, 16, 16, r=2)
        dora.magnitude = nn.Parameter(torch.ones(16))
        tiny_model.layers[1].self_attn.set_submodule("v_proj", dora)
    elif case != "no LoRA":
        lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
        kwargs = {"update_ratio": float("nan")} if case == "update_ratio" else {"start_step": -1}
    before = snapshot(tiny_model)
    refuses(
        lora_variants.DeltaLoRA,
        tiny_model,
        **kwargs,
        match=word(case) if case in ("update_ratio", "start_step") else None,
    )
    assert_unchanged(tiny_model, before, f"DeltaLoRA with {case}")


@pytest.mark.exercise("5.8")
def test_delta_lora_refuses_a_4bit_base(lora, lora_variants, quant, tiny_model):
    """An NF4 base cannot move: a TypeError (W0 is not a float weight), not a silent no-op."""
    lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
    first = tiny_model.layers[0].self_attn.q_proj
    first.base_layer = quant.NF4Linear.from_linear(first.base_layer)
    refuses(lora_variants.DeltaLoRA, tiny_model, error=TypeError)


# ---- Exercise 5.9: LoRA-drop ---------------------------------------------------------------------


@pytest.mark.exercise("5.9")
def test_output_importance_reads_every_batch_format(lora, lora_variants, tiny_model64, token_ids):
    """Tensors, (input_ids, labels) pairs and {"input_ids": …} dicts give the same values; dropout is off; mode and hooks restored."""
    lora.get_lora_model(tiny_model64, r=2, lora_alpha=4, lora_dropout=0.5)
    randomize_lora(tiny_model64, std=0.2)
    tiny_model64.train()
    hooks = {
        path: len(layer._forward_hooks) + len(layer._forward_pre_hooks)
        for path, layer in lora.lora_layers(tiny_model64)
    }
    expected = expected_importance(lora, tiny_model64, [token_ids])
    tiny_model64.train()
    for batches in ([token_ids], [(token_ids, token_ids)], [{"input_ids": token_ids, "labels": token_ids}]):
        got = lora_variants.lora_output_importance(tiny_model64, batches)
        kind = type(batches[0]).__name__
        for path, (value, bound) in expected.items():
            assert abs(float(got[path]) - value) <= bound, (
                f"{path} with batches of {kind}: importance {float(got[path]):.6g}, expected {value:.6g}: measure in "
                "eval mode (no dropout) and accept tensors, (input_ids, labels) and dicts with 'input_ids'"
            )
        assert tiny_model64.training, "lora_output_importance must put the model back in training mode"
    left = {
        path: len(layer._forward_hooks) + len(layer._forward_pre_hooks)
        for path, layer in lora.lora_layers(tiny_model64)
    }
    assert left == hooks, "remove every hook afterwards (a hook left behind runs in every later forward)"


@pytest.mark.exercise("5.9")
def test_output_importance_refusals(lora, lora_variants, tiny_model, token_ids):
    """No LoRA layer, or no batch: ValueError."""
    refuses(lora_variants.lora_output_importance, tiny_model, [token_ids])
    lora.get_lora_model(tiny_model, r=2)
    refuses(lora_variants.lora_output_importance, tiny_model, [])


@pytest.mark.exercise("5.9")
@pytest.mark.parametrize(
    "case, match",
    [("keep_share 0", "keep_share"), ("keep_share 1.5", "keep_share"), ("keep_share nan", "keep_share"),
     ("a layer missing", "importance"), ("an unknown layer", "importance"), ("all zero", None)],
)  # fmt: skip
def test_lora_drop_bad_input_changes_nothing(lora, lora_variants, tiny_model, case, match):
    """A keep_share outside (0, 1], importances that do not name the LoRA layers, or all zero: ValueError, nothing changed."""
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model)
    paths = lora_paths(lora, tiny_model)
    importance = {path: float(i + 1) for i, path in enumerate(paths)}
    keep_share = 0.5
    if case.startswith("keep_share"):
        keep_share = {"keep_share 0": 0.0, "keep_share 1.5": 1.5, "keep_share nan": float("nan")}[case]
    elif case == "a layer missing":
        del importance[paths[-1]]
    elif case == "an unknown layer":
        importance["layers.7.mlp.up_proj"] = 1.0
    else:
        importance = dict.fromkeys(paths, 0.0)
    before, ids = snapshot(tiny_model), identities(lora, tiny_model)
    refuses(
        lora_variants.lora_drop, tiny_model, importance, keep_share=keep_share, match=word(match) if match else None
    )
    assert_unchanged(tiny_model, before, f"lora_drop with {case}")
    assert identities(lora, tiny_model) == ids, f"lora_drop with {case} raised but had already shared some adapters"


@pytest.mark.exercise("5.9")
def test_lora_drop_shared_adapter_trains_once(lora, lora_variants, tiny_model, token_ids):
    """After lora_drop the model runs, and one step moves each shared adapter once (it is one tensor)."""
    lora.get_lora_model(tiny_model, r=2, lora_alpha=4)
    randomize_lora(tiny_model, std=0.2)
    paths = lora_paths(lora, tiny_model)
    importance = {path: 2.0**-i for i, path in enumerate(paths)}  # shares 0.5, 0.25, …: keep_share 0.6 keeps 2
    kept = lora_variants.lora_drop(tiny_model, importance, keep_share=0.6)
    assert kept == paths[:2], f"keep_share 0.6 with shares 0.5, 0.25, …: keep {paths[:2]}, got {kept}"
    layers = dict(lora.lora_layers(tiny_model))
    shared = [p for p in paths[2:] if layers[p].in_features == layers[p].out_features == 16]
    before = layers[shared[0]].lora_B.detach().clone()
    optimizer = torch.optim.SGD([p for p in tiny_model.parameters() if p.requires_grad], lr=0.1)
    lm_step(tiny_model.train(), token_ids, optimizer)
    assert all(layers[p].lora_B is layers[shared[0]].lora_B for p in shared), (
        "the dropped 16 → 16 layers must still hold one shared lora_B after a training step"
    )
    assert not torch.equal(layers[shared[0]].lora_B.detach(), before), "the shared lora_B trains (it gets a gradient)"


@pytest.mark.exercise("5.9")
def test_lora_drop_stops_when_the_share_is_reached(lora, lora_variants, tiny_model):
    """Reaching keep_share exactly is enough: shares 0.5 + 0.25 = 0.75 keep 2 layers at keep_share 0.75, not 3."""
    lora.get_lora_model(tiny_model, r=2)
    paths = lora_paths(lora, tiny_model)
    values = [2.0 ** (4 - i) for i in range(13)] + [2.0**-8]  # 16, 8, …, 2^-8, 2^-8: total 32, every share exact
    order = torch.randperm(14, generator=generator(143)).tolist()
    importance = {paths[i]: v for i, v in zip(order, values)}
    kept = lora_variants.lora_drop(tiny_model, importance, keep_share=0.75)
    ranked = sorted(paths, key=lambda p: -importance[p])
    assert kept == ranked[:2], (
        f"keep_share 0.75 with shares 0.5, 0.25, 0.125, …: 0.5 + 0.25 reaches 0.75, so keep exactly the 2 most "
        f"important layers (stop once the kept share is >= keep_share): expected {ranked[:2]}, got {kept}"
    )


# ---- Exercise 5.10: adapters in PEFT's format ------------------------------------------------------


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("rslora", [False, True])
def test_olora_adapter_converted_for_the_original_base(lora, lora_variants, tiny_model, token_ids, tmp_path, rslora):
    """OLoRA (and rsLoRA + OLoRA): rank 2r, lora_alpha × 2 (× √2 with rsLoRA); on the ORIGINAL base, the trained logits."""
    original = copy_of(tiny_model)
    start = pissa_trained(lora, lora_variants, tiny_model, "olora", rslora=rslora)
    trained_logits = tiny_model(token_ids).detach()
    lora_variants.save_variant_adapter(tiny_model, tmp_path)
    config, _ = read_adapter(tmp_path)
    alpha = 4 * (math.sqrt(2) if rslora else 2)
    assert config.get("r") == 4 and config.get("lora_alpha") == pytest.approx(alpha, rel=1e-12), (
        f"converted: r' = 2r = 4 and lora_alpha' = {alpha:.4g} ({'√2' if rslora else '2'}·lora_alpha) so that the scale "
        f"stays {'4/√2' if rslora else '2'}; got r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}"
    )
    assert config.get("use_rslora") is rslora, f"use_rslora must be {rslora} in the converted adapter's config"
    loaded = lora_variants.load_variant_adapter(copy_of(original).double(), tmp_path)
    scaling = 4 / math.sqrt(2) if rslora else 2.0
    check_converted(lora, loaded, original, start, tiny_model, token_ids, trained_logits, scaling)


@pytest.mark.exercise("5.10")
def test_adapter_config_has_peft_s_fields(lora, lora_variants, tiny_model, tmp_path):
    """adapter_config.json of a DoRA + rsLoRA adapter: PEFT's LoRA fields, both flags true, the targets sorted."""
    lora_variants.get_dora_model(tiny_model, r=2, lora_alpha=4, target_modules=["v_proj", "q_proj"])
    lora_variants.use_rslora(tiny_model)
    lora_variants.save_variant_adapter(tiny_model, tmp_path)
    config, tensors = read_adapter(tmp_path)
    expected = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": True, "use_dora": True,
                "target_modules": ["q_proj", "v_proj"], "bias": "none", "init_lora_weights": True}  # fmt: skip
    for key, value in expected.items():
        assert config.get(key) == value, f"adapter_config.json: {key} should be {value!r}, got {config.get(key)!r}"
    a = tensors["base_model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert tuple(a.shape) == (2, 16), f"A stored as (r, in) under PEFT's key, got {tuple(a.shape)}"


@pytest.mark.exercise("5.10")
def test_dora_adapter_loads_into_an_existing_dora_model(lora, lora_variants, tiny_model64, token_ids, tmp_path):
    """Into DoRA layers of the same r and lora_alpha, load copies A, B and the magnitudes (rsLoRA too)."""
    target = copy_of(tiny_model64)
    lora_variants.get_dora_model(tiny_model64, r=2, lora_alpha=4, target_modules=["o_proj"])
    lora_variants.use_rslora(tiny_model64)
    randomize_lora(tiny_model64, std=0.2)
    for i, (_, layer) in enumerate(lora.lora_layers(tiny_model64)):
        set_values(layer, magnitude=layer.magnitude.detach() * (1 + 0.3 * randn(16, seed=140 + i)))
    lora_variants.save_variant_adapter(tiny_model64, tmp_path)
    lora_variants.get_dora_model(target, r=2, lora_alpha=4, target_modules=["o_proj"])
    lora_variants.use_rslora(target)
    lora_variants.load_variant_adapter(target, tmp_path)
    assert_network_close(target(token_ids), tiny_model64(token_ids), "logits after loading into existing DoRA layers",
                         "the check: loaded into existing DoRA layers, the logits equal the saved model's (A, B and every magnitude)")  # fmt: skip


def saved_dora(lora_variants, model, path, **kwargs):
    lora_variants.get_dora_model(model, **{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **kwargs})
    randomize_lora(model, std=0.2)
    return lora_variants.save_variant_adapter(model, path)


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize(
    "case", ["magnitudes without use_dora", "DoRA into LoRA layers", "rsLoRA into LoRA layers", "a magnitude missing",
             "a wider model's adapter", "LoRA into DoRA layers"],
)  # fmt: skip
def test_load_variant_adapter_refusals_change_nothing(lora, lora_variants, tiny_model, tmp_path, case):
    """An adapter that does not fit the model or contradicts its config: ValueError, the model unchanged."""
    from safetensors.torch import load_file, save_file

    from model.tiny_llama import TinyLlama
    from testcases.conftest import tiny_config

    source = TinyLlama(tiny_config(d_model=32)) if case == "a wider model's adapter" else copy_of(tiny_model)
    if case == "rsLoRA into LoRA layers":
        lora.get_lora_model(source, r=2, lora_alpha=4, target_modules=["q_proj"])
        lora_variants.use_rslora(source)
        lora_variants.save_variant_adapter(source, tmp_path)
    elif case == "LoRA into DoRA layers":
        lora.get_lora_model(source, r=2, lora_alpha=4, target_modules=["q_proj"])
        lora_variants.save_variant_adapter(source, tmp_path)
    else:
        saved_dora(lora_variants, source, tmp_path)
    config_path, weights_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    if case == "magnitudes without use_dora":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": False}))
    elif case == "a magnitude missing":
        tensors = load_file(weights_path)
        del tensors["base_model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"]
        save_file(tensors, weights_path, metadata={"format": "pt"})
    if case in ("DoRA into LoRA layers", "rsLoRA into LoRA layers"):
        lora.get_lora_model(tiny_model, r=2, lora_alpha=4, target_modules=["q_proj"])
    elif case == "LoRA into DoRA layers":
        lora_variants.get_dora_model(tiny_model, r=2, lora_alpha=4, target_modules=["q_proj"])
    before = snapshot(tiny_model)
    scales = {path: layer.scaling for path, layer in lora.lora_layers(tiny_model)}
    refuses(lora_variants.load_variant_adapter, tiny_model, tmp_path)
    assert_unchanged(tiny_model, before, f"load_variant_adapter with {case}")
    assert {path: layer.scaling for path, layer in lora.lora_layers(tiny_model)} == scales, (
        f"load_variant_adapter with {case} raised but changed a layer's scaling: check everything first"
    )


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("case", ["no LoRA layer", "two ranks", "DoRA and LoRA", "a trainable bias", "PiSSA with DoRA"])
def test_save_variant_adapter_refusals_write_nothing(lora, lora_variants, tiny_model, tmp_path, case):
    """What one PEFT config cannot describe (or would lose): ValueError, and no adapter folder is left behind."""
    saved_dora(lora_variants, copy_of(tiny_model), tmp_path / "fine")  # a valid adapter saves
    if case == "two ranks":
        lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
        lora.get_lora_model(tiny_model, r=4, target_modules=["v_proj"])
    elif case == "DoRA and LoRA":
        lora_variants.get_dora_model(tiny_model, r=2, target_modules=["q_proj"])
        lora.get_lora_model(tiny_model, r=2, target_modules=["v_proj"])
    elif case == "a trainable bias":
        lora.get_lora_model(tiny_model, r=2, target_modules=["q_proj"])
        tiny_model.norm.weight.requires_grad_(True)
    elif case == "PiSSA with DoRA":
        lora_variants.get_dora_model(tiny_model, r=2, target_modules=["q_proj"])
        for _, layer in list(lora.lora_layers(tiny_model)):
            lora_variants.pissa_init(layer)
    refuses(lora_variants.save_variant_adapter, tiny_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists(), "a refused save must not leave a (half-written) adapter folder"


@pytest.mark.exercise("5.10")
def test_peft_written_dora_adapter_loads(lora, lora_variants, tmp_path):
    """A DoRA adapter in PEFT's own layout (the golden layer's A, B, magnitude) loads and gives PEFT's output."""
    from safetensors.torch import save_file

    golden = peft_golden()
    config = lora_variants.variant_adapter_config(4, 8, 0.0, ["proj"], use_dora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.proj"
    save_file({f"{prefix}.lora_A.weight": golden["dora.A"], f"{prefix}.lora_B.weight": golden["dora.B"],
               f"{prefix}.lora_magnitude_vector": golden["dora.magnitude"]},
              tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})  # fmt: skip
    model = nn.Module()
    model.proj = golden_linear(golden)
    lora_variants.load_variant_adapter(model, tmp_path)
    assert_network_close(model.proj.eval()(golden["x"]), golden["dora.out"], "a PEFT DoRA adapter, loaded",
                         "the check: the loaded layer gives PEFT's output (lora_magnitude_vector, no .weight, is each layer's magnitude)")  # fmt: skip


@pytest.mark.exercise("5.10")
def test_rslora_dora_adapter_round_trip(lora, lora_variants, tiny_model64, token_ids, tmp_path):
    """A DoRA adapter with rsLoRA's scale: saved with use_dora and use_rslora true, loaded back with both."""
    fresh = copy_of(tiny_model64)
    lora_variants.get_dora_model(tiny_model64, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    lora_variants.use_rslora(tiny_model64)
    randomize_lora(tiny_model64, std=0.2)
    for i, (_, layer) in enumerate(lora.lora_layers(tiny_model64)):
        set_values(layer, magnitude=layer.magnitude.detach() * (1 + 0.3 * randn(layer.out_features, seed=144 + i)))
    expected = tiny_model64(token_ids).detach()
    lora_variants.save_variant_adapter(tiny_model64, tmp_path)
    config, _ = read_adapter(tmp_path)
    assert config.get("use_dora") is True and config.get("use_rslora") is True, (
        f'an rsLoRA DoRA adapter has "use_dora": true and "use_rslora": true, got use_dora={config.get("use_dora")!r}, '
        f"use_rslora={config.get('use_rslora')!r}"
    )
    loaded = lora_variants.load_variant_adapter(fresh, tmp_path)
    scales = {path: layer.scaling for path, layer in lora.lora_layers(loaded)}
    assert set(scales.values()) == {8 / math.sqrt(4)}, (
        f"the loaded DoRA layers must use rsLoRA's scale lora_alpha / √r = 4 (the config says use_rslora), got {scales}"
    )
    assert_network_close(loaded(token_ids), expected, "logits of the base + the loaded rsLoRA DoRA adapter",
                         "the check: the loaded rsLoRA DoRA model's logits equal the saved one's (DoRA layers, A, B, rsLoRA's scale, magnitudes)")  # fmt: skip


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("iters", [1, 2])
def test_peft_default_loftq_file_requantizes_w0(lora, lora_variants, quant, tmp_path, iters):
    """PEFT's default LoftQ file (init_lora_weights "loftq"): the base becomes LoftQ's Q̂ of W0 again, A and B the file's."""
    weight = make_linear(64, 24, seed=210, dtype=torch.float32).weight.detach().clone()
    A, B = randn(2, 64, seed=211, std=0.1, dtype=torch.float32), randn(24, 2, seed=212, std=0.1, dtype=torch.float32)
    config = peft_lora_config(
        2, 4, ["proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": iters}
    )
    folder = write_adapter(tmp_path, config, {"base_model.model.proj.lora_A.weight": A,
                                              "base_model.model.proj.lora_B.weight": B})  # fmt: skip
    loaded = lora_variants.load_variant_adapter(OneProj(weight), folder).proj
    assert isinstance(loaded.base_layer, quant.NF4Linear), (
        f"init_lora_weights='loftq': PEFT runs LoftQ on W0 again when it loads the file, so the base becomes Q̂ "
        f"(an NF4Linear here), got {type(loaded.base_layer).__name__}"
    )
    if iters == 1:  # Q̂_1 = NF4(W0): exact (Stage 3's codes are bit for bit bitsandbytes')
        expected = plain_nf4(quant, weight)
        what = "NF4(W0), LoftQ's first quantization"
    else:  # the same loftq_init on the same W0 in this process: the same bits
        twin = lora.LoRALayer.from_linear(OneProj(weight).proj, r=2, lora_alpha=4)
        lora_variants.loftq_init(twin, num_iters=2)
        expected = twin.base_layer.dequantize_weight(torch.float32)
        what = "loftq_init(num_iters=2) of W0"
    assert torch.equal(loaded.base_layer.dequantize_weight(torch.float32), expected), (
        f"the loaded base must be {what} (loftq_config's loftq_iter = {iters}, blocks of 64)"
    )
    assert torch.equal(loaded.lora_A, A) and torch.equal(loaded.lora_B, B), (
        "after LoftQ's init the file's A and B replace the ones it computed"
    )


@pytest.mark.exercise("5.10")
def test_peft_written_vera_file_loads(lora_variants, tmp_path):
    """A VeRA file in PEFT's layout whose saved pair is not the key's draw: the saved pair is used (PEFT's rule)."""
    W = randn(10, 12, seed=220, std=0.4)
    A_s, B_s = randn(4, 12, seed=221, std=0.5), randn(10, 4, seed=222, std=0.5)
    lambda_d, lambda_b = randn(4, seed=223), randn(10, seed=224)
    config = {"peft_type": "VERA", "r": 4, "target_modules": ["proj"], "projection_prng_key": 0,
              "save_projection": True, "vera_dropout": 0.0, "d_initial": 0.1, "bias": "none"}  # fmt: skip
    folder = write_adapter(tmp_path, config, {"base_model.vera_A": A_s, "base_model.vera_B": B_s,
                                              "base_model.model.proj.vera_lambda_d": lambda_d,
                                              "base_model.model.proj.vera_lambda_b": lambda_b})  # fmt: skip
    model = OneProj(W)
    b = model.proj.bias.detach().clone()
    lora_variants.load_variant_adapter(model, folder)
    x = randn(6, 12, seed=225)
    assert_network_close(model.eval()(x), vera_expected(x, W, b, A_s, B_s, lambda_d, lambda_b),
                         "a PEFT VeRA file with a saved pair, loaded",
                         "the check: with save_projection true, the layer computes with the file's pair (base_model.vera_A / vera_B), not the key's draw")  # fmt: skip


@pytest.mark.exercise("5.10")
def test_peft_written_adalora_file_loads(lora_variants, tmp_path):
    """An AdaLoRA file in PEFT's layout with a rank_pattern: the kept triplets at their positions, Λ_i = 0 elsewhere."""
    W, keep = randn(10, 12, seed=230, std=0.4), torch.tensor([True, False, True, True, False, True])
    A, E, B = randn(6, 12, seed=231, std=0.3), randn(6, 1, seed=232) * keep[:, None], randn(10, 6, seed=233, std=0.3)
    config = {"peft_type": "ADALORA", "init_r": 6, "target_r": 2, "lora_alpha": 8, "lora_dropout": 0.0,
              "total_step": 10, "target_modules": ["proj"], "rank_pattern": {"proj.lora_E": keep.tolist()}}  # fmt: skip
    folder = write_adapter(tmp_path, config, {"base_model.model.proj.lora_A": A[keep],
                                              "base_model.model.proj.lora_E": E[keep],
                                              "base_model.model.proj.lora_B": B[:, keep]})  # fmt: skip
    model = OneProj(W)
    b = model.proj.bias.detach().clone()
    lora_variants.load_variant_adapter(model, folder)
    layer = model.proj
    assert torch.equal(layer.lora_E.detach(), E) and torch.equal(layer.lora_A.detach()[keep], A[keep]), (
        "each kept triplet goes back to its own position (rows 0, 2, 3, 5 here), the masked Λ_i are 0"
    )
    x = randn(6, 12, seed=234)
    assert_network_close(layer.eval()(x), adalora_expected(x, W, b, A * keep[:, None], E, B * keep, 8, 6),
                         "a PEFT AdaLoRA file with a rank_pattern, loaded",
                         "the check: the layer keeps r = init_r = 6 (ranknum 6, PEFT's scale) with Λ = 0 where the pattern is false")  # fmt: skip


def refused_file(tmp_path: Path, case: str) -> Path:
    """An adapter folder that ``load_variant_adapter`` must refuse for ``case``."""
    pissa = {
        "base_model.model.proj.lora_A.weight": torch.zeros(4, 12),
        "base_model.model.proj.lora_B.weight": torch.zeros(10, 4),
    }
    files = {
        "init_lora_weights='pissa_niter_4'": (
            peft_lora_config(4, 8, ["proj"], init_lora_weights="pissa_niter_4"),
            pissa,
        ),
        "init_lora_weights='corda'": (peft_lora_config(4, 8, ["proj"], init_lora_weights="corda"), pissa),
        "8-bit LoftQ": (
            peft_lora_config(
                4, 8, ["proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 1}
            ),
            pissa,
        ),  # fmt: skip
        "a PiSSA file with r above min(in, out)": (
            peft_lora_config(11, 8, ["proj"], init_lora_weights="pissa"),
            {
                "base_model.model.proj.lora_A.weight": torch.zeros(11, 12),
                "base_model.model.proj.lora_B.weight": torch.zeros(10, 11),
            },
        ),  # fmt: skip
        "a PiSSA file with DoRA": (peft_lora_config(4, 8, ["proj"], init_lora_weights="pissa", use_dora=True), pissa),
        "a rank_pattern of 5 bools for init_r 6": (
            {
                "peft_type": "ADALORA",
                "init_r": 6,
                "lora_alpha": 8,
                "target_modules": ["q_proj"],
                "rank_pattern": {"layers.0.self_attn.q_proj.lora_E": [True] * 5},
            },
            {
                f"base_model.model.layers.0.self_attn.q_proj.{n}": t
                for n, t in (
                    ("lora_A", torch.zeros(5, 16)),
                    ("lora_E", torch.zeros(5, 1)),
                    ("lora_B", torch.zeros(16, 5)),
                )
            },
        ),  # fmt: skip
        "a VeRA λ_b of the wrong size": (
            {
                "peft_type": "VERA",
                "r": 4,
                "target_modules": ["q_proj"],
                "projection_prng_key": 0,
                "save_projection": False,
            },
            {
                "base_model.model.layers.0.self_attn.q_proj.vera_lambda_d": torch.zeros(4),
                "base_model.model.layers.0.self_attn.q_proj.vera_lambda_b": torch.zeros(15),
            },
        ),  # fmt: skip
    }
    return write_adapter(tmp_path, *files[case])


REFUSED_FILES = {  # case -> the name the error must state (the docstring of load_variant_adapter states each)
    "init_lora_weights='pissa_niter_4'": "init_lora_weights",
    "init_lora_weights='corda'": "init_lora_weights",
    "8-bit LoftQ": "loftq_config",
    "a PiSSA file with r above min(in, out)": "init_lora_weights",
    "a PiSSA file with DoRA": "use_dora",
    "a rank_pattern of 5 bools for init_r 6": "rank_pattern",
    "a VeRA λ_b of the wrong size": "vera_lambda_b",
}


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("case", list(REFUSED_FILES))
def test_load_refuses_peft_files_it_cannot_reproduce(lora_variants, tiny_model, tmp_path, case):
    """A PEFT file whose W0 cannot be recomputed here, or that does not fit: ValueError naming the field, model unchanged."""
    folder = refused_file(tmp_path, case)
    on_proj = json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["proj"]
    model = OneProj(randn(10, 12, seed=240, dtype=torch.float32)) if on_proj else tiny_model
    before = snapshot(model)
    refuses(lora_variants.load_variant_adapter, model, folder, match=word(REFUSED_FILES[case]))
    assert_unchanged(model, before, f"load_variant_adapter of {case}")


@pytest.mark.exercise("5.10")
def test_peft_default_pissa_file_needs_a_fresh_base(lora, lora_variants, tmp_path):
    """A PEFT default PiSSA file into a model that already has LoRA layers: ValueError naming init_lora_weights."""
    A, B = randn(4, 12, seed=241, dtype=torch.float32), randn(10, 4, seed=242, dtype=torch.float32)
    folder = write_adapter(tmp_path, peft_lora_config(4, 8, ["proj"], init_lora_weights="pissa"),
                           {"base_model.model.proj.lora_A.weight": A, "base_model.model.proj.lora_B.weight": B})  # fmt: skip
    model = OneProj(randn(10, 12, seed=243, dtype=torch.float32))
    lora.get_lora_model(model, r=4, lora_alpha=8, target_modules=["proj"])
    before = snapshot(model)
    refuses(lora_variants.load_variant_adapter, model, folder, match=word("init_lora_weights"))
    assert_unchanged(model, before, "load_variant_adapter of a PiSSA file into LoRA layers")


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("case", ["AdaLoRA without its allocator", "another model's allocator", "VeRA and LoRA layers"])
def test_save_refuses_what_peft_cannot_rebuild(lora, lora_variants, tiny_model, tmp_path, case):
    """AdaLoRA needs its RankAllocator (PEFT's config holds the schedule); one adapter kind per file; nothing written."""
    if case == "VeRA and LoRA layers":
        lora_variants.get_vera_model(tiny_model, r=4, target_modules=["q_proj"])
        lora.get_lora_model(tiny_model, r=2, target_modules=["v_proj"])
        refuses(lora_variants.save_variant_adapter, tiny_model, tmp_path / "adapter", match=word("LoRA"))
    else:
        other = lora_variants.get_adalora_model(copy_of(tiny_model), init_r=4, target_modules=["q_proj"])
        lora_variants.get_adalora_model(tiny_model, init_r=4, target_modules=["q_proj"])
        allocator = (
            None
            if case == "AdaLoRA without its allocator"
            else lora_variants.RankAllocator(other, total_step=5, target_r=2)
        )
        refuses(lora_variants.save_variant_adapter, tiny_model, tmp_path / "adapter", allocator=allocator,
                match=word("allocator"))  # fmt: skip
    assert not (tmp_path / "adapter").exists(), "a refused save must not leave a (half-written) adapter folder"
