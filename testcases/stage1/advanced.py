"""Stage 1 advanced tests: arguments, placement, dropout, dtypes, devices, cost and merge numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from testcases.helpers import LargestAllocation, expect_refusal, observe, randomize_lora
from testcases.properties import FLOATS, LAYOUTS, cases, describe_layout, for_all, in_layout, short
from testcases.stage1.basic import ALPHA, IN, OUT, R, check_factors, formula_reference, lora_formula
from testcases.tolerances import UNIT_ROUNDOFF, assert_close, expect_tensor, reference

# ---- Exercise 1.1: the LoRA layer -----------------------------------------------------------


@pytest.mark.exercise("1.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"r": -1}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": -4}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": -3}, "out_features"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights"),
    ],
)
def test_lora_layer_error_names_the_argument_and_range(lora, kwargs, argument):
    """Every bad argument raises a ValueError naming the argument and its allowed values."""
    args = {"in_features": 8, "out_features": 8, **kwargs}
    message = str(expect_refusal(lora.LoRALayer, **args, names=(argument,)))
    assert any(ch.isdigit() for ch in message) or "one of" in message or "kaiming" in message, (
        f"the message should also say the allowed values (e.g. 'r must be an int >= 1'), got: {message}"
    )


@pytest.mark.exercise("1.1")
def test_kaiming_init_has_the_right_spread(lora):
    """A ~ U(±1/√in_features): the standard deviation of 64 × 1024 draws is (1/√1024)/√3 within 5 %."""
    layer = lora.LoRALayer(1024, 16, r=64)
    expect_tensor(layer.lora_A, (64, 1024), "lora_A")
    bound = 1 / math.sqrt(1024)
    std = layer.lora_A.detach().std().item()
    observe("1.1 Kaiming std / expected", std / (bound / math.sqrt(3)))
    # 65,536 uniform draws: the sample std has a relative spread of about 0.3 % (55 seeds: 0.997 to 1.005 of
    # the expected value, make calibrate); 5 % is > 15 spreads.
    assert abs(std - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3), (
        f"Kaiming-uniform(a=√5) on (r, in) draws U(±1/√in): std should be {bound / math.sqrt(3):.5f}, got {std:.5f}. "
        "Did you initialise with the wrong fan (out or r) or a normal distribution?"
    )


@pytest.mark.exercise("1.1")
def test_gaussian_init_option(lora):
    """init_lora_weights='gaussian' draws A ~ N(0, (1/r)²); B is zero for every init."""
    layer = lora.LoRALayer(256, 256, r=4, init_lora_weights="gaussian")
    expect_tensor(layer.lora_A, (4, 256), "lora_A")
    std = layer.lora_A.detach().std().item()
    observe("1.1 gaussian std / expected", std * 4)
    # 1,024 normal draws: the sample std has a relative spread of about 2.2 % (55 seeds: 0.955 to 1.048 of
    # the expected value, make calibrate); 15 % is almost 7 spreads.
    assert abs(std - 1 / 4) < 0.15 / 4, (
        f"'gaussian' draws A ~ N(0, (1/r)^2) = N(0, 0.0625), as PEFT does; std {std:.4f}"
    )
    assert torch.count_nonzero(layer.lora_B) == 0, "B is zero for every init method"


@pytest.mark.exercise("1.1")
def test_layer_attributes_and_repr(lora):
    """The layer keeps in_features, out_features, r and lora_alpha; dropout 0 is nn.Identity; repr works."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    got = (layer.in_features, layer.out_features, layer.r, layer.lora_alpha)
    assert got == (IN, OUT, R, ALPHA), (
        f"(in_features, out_features, r, lora_alpha) must be {(IN, OUT, R, ALPHA)}, got {got}"
    )
    assert isinstance(layer.lora_dropout, nn.Identity), (
        f"lora_dropout=0 needs no dropout at all: use nn.Identity(), got {type(layer.lora_dropout).__name__}"
    )
    assert "r=3" in repr(layer), "the given extra_repr reads self.r, self.lora_alpha, self.scaling and self.merged"


@pytest.mark.exercise("1.1")
def test_reset_lora_parameters_resets_and_checks_its_argument(lora):
    """reset_lora_parameters zeroes B again and redraws A; an unknown init raises a ValueError naming init_lora_weights."""
    layer = lora.LoRALayer(64, 32, r=4)
    randomize_lora(layer)
    layer.reset_lora_parameters("gaussian")
    assert torch.count_nonzero(layer.lora_B) == 0, "reset_lora_parameters must set B back to zero"
    assert layer.lora_A.detach().abs().max() > 1 / 64**0.5, (
        "'gaussian' redraws A from N(0, 1/r²) (beyond Kaiming's bound)"
    )
    expect_refusal(layer.reset_lora_parameters, "xavier", names=("init_lora_weights",), model=layer)


@pytest.mark.exercise("1.1")
def test_adapters_follow_the_base_device_and_dtype(lora):
    """A and B sit on the base's device, in its dtype for fp32/fp64 bases, in fp32 for half-precision bases."""
    cases = [
        (nn.Linear(8, 4, dtype=torch.float64), torch.float64, "cpu"),
        (nn.Linear(8, 4, dtype=torch.bfloat16), torch.float32, "cpu"),
        (nn.Linear(8, 4, dtype=torch.float16), torch.float32, "cpu"),
        (nn.Linear(8, 4, device="meta"), torch.float32, "meta"),
    ]
    for base, dtype, device in cases:
        layer = lora.LoRALayer.from_linear(base, r=2)
        for name in ("lora_A", "lora_B"):
            p = getattr(layer, name)
            assert p.device.type == device and p.dtype == dtype, (
                f"a base with a {base.weight.dtype} weight on {base.weight.device.type}: {name} must be {dtype} on "
                f"{device}, got {p.dtype} on {p.device.type}. Create A and B on the base's device, in its dtype when "
                "that is float32/float64, else float32 (adapter_placement(base_layer) gives both)"
            )


@pytest.mark.exercise("1.1")
def test_from_linear_keeps_device_and_bias(lora, device):
    """On every device: A and B live on the base layer's device; its bias is kept and frozen."""
    linear = nn.Linear(8, 4).to(device)
    layer = lora.LoRALayer.from_linear(linear, r=2)
    assert layer.lora_A.device.type == device.type and layer.lora_B.device.type == device.type, (
        f"lora_A and lora_B must live on the base layer's device ({device.type})"
    )
    assert layer.base_layer.bias is linear.bias and not linear.bias.requires_grad, "the bias is kept and frozen"


# ---- Exercise 1.2: forward --------------------------------------------------------------------


@pytest.mark.exercise("1.2")
def test_dropout_only_on_the_lora_input(lora):
    """Dropout never touches the base path, acts on the LoRA input, and is off in eval mode."""
    layer = lora.LoRALayer(64, 32, r=8, lora_alpha=16, lora_dropout=0.5).train()
    x = torch.randn(20, 64)
    base = layer.base_layer(x).detach()
    ref = reference(lambda y: y, base, dtype=torch.float32, steps=64 + 2)
    assert_close(layer(x), ref.value, "training-mode output with B = 0", bound=ref.bound,
                 hint="dropout must never touch the base path")  # fmt: skip
    randomize_lora(layer)
    delta = layer(x).detach() - layer.base_layer(x).detach()
    zeros = (delta == 0).double().mean().item()
    observe("1.2 share of exact zeros in the update with input dropout 0.5", zeros)
    # Dropout on the LoRA input keeps every output element a sum over 8 random ranks: exact zeros are
    # (almost) impossible. Dropout on the LoRA output zeroes half of them.
    assert zeros < 0.05, (
        f"{zeros:.0%} of the LoRA update's elements are exactly 0: dropout seems applied to the LoRA *output*; "
        "it belongs on the LoRA input: B(A(dropout(x)))"
    )
    layer.eval()
    ref = formula_reference_for(layer, x, scaling=2.0)
    assert_close(layer(x), ref.value, "eval-mode output with dropout=0.5", bound=ref.bound,
                 hint="in eval mode dropout is the identity")  # fmt: skip


def formula_reference_for(layer, x, scaling):
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    k, r = W.shape[1], A.shape[0]
    return reference(lambda x, W, b, A, B: lora_formula(x, W, b, A, B, scaling), x, W, b, A, B,
                     dtype=torch.float32, steps=k + r + 4)  # fmt: skip


@pytest.mark.exercise("1.2")
def test_dropout_rate_and_rescaling(lora):
    """With A = B = I, the update is dropout(x): a share p of zeros, the rest scaled by 1/(1 − p)."""
    p, n = 0.3, 32
    layer = lora.LoRALayer(n, n, r=n, lora_alpha=n, lora_dropout=p).train()  # scaling 1
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(n))
        layer.lora_B.copy_(torch.eye(n))
    x = torch.ones(200, n)
    update = (layer(x) - layer.base_layer(x)).detach()
    kept = 1 / (1 - p)
    off = ~(((update - kept).abs() < 1e-4) | (update.abs() < 1e-4))
    assert not off.any(), (
        f"with A = B = I and x = 1 the update must be 0 (dropped) or 1/(1 - p) = {kept:.4f} (kept, rescaled); "
        f"found {update[off][:3].tolist()}: use nn.Dropout(lora_dropout) on the LoRA input"
    )
    share = (update.abs() < 1e-4).double().mean().item()
    observe("1.2 share dropped with lora_dropout 0.3", share)
    # 6,400 Bernoulli(0.3) draws: standard deviation 0.0057; ±0.035 is six of them (55 seeds: 0.280 to 0.313).
    assert abs(share - p) < 0.035, f"{share:.1%} of the inputs were dropped, expected about {p:.0%} (lora_dropout)"


@pytest.mark.exercise("1.2")
def test_gradient_of_A_is_zero_at_init(lora):
    """At init (B = 0) dL/dA is exactly 0 and dL/dx is W0's alone."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    x = torch.randn(5, IN, requires_grad=True)
    layer(x).sum().backward()
    expect_tensor(layer.lora_A.grad, (R, IN), "lora_A.grad")
    assert torch.count_nonzero(layer.lora_A.grad) == 0, "at init dL/dA must be 0 because B = 0"
    ref = reference(lambda W: W.sum(0).expand(5, IN), layer.base_layer.weight, dtype=torch.float32, steps=OUT + 1)
    assert_close(x.grad, ref.value, "dL/dx at init", bound=ref.bound, hint="the input gradient is W0's only")


@pytest.mark.exercise("1.2")
@pytest.mark.parametrize("route", ["bf16 base", "fp16 base", "bf16 autocast"])
def test_forward_in_half_precision(lora, device, route):
    """A bf16/fp16 base or bf16 autocast gives a half-precision output within its rounding; A and B stay fp32."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA).to(device)
    randomize_lora(layer)
    dtype = torch.float16 if route.startswith("fp16") else torch.bfloat16
    x = torch.randn(3, IN, device=device)
    if route.endswith("base"):
        layer.base_layer.to(dtype)  # a half-precision base; LoRA stays fp32
        x = x.to(dtype)
    try:
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=route.endswith("autocast")):
            out = layer(x)
    except RuntimeError as error:
        error.add_note(f"with a {route}, A and B stay fp32: cast the LoRA input to lora_A.dtype and the LoRA term to "
                       "the dtype base_layer(x) returned (lesson 01, §5, Dtypes)")  # fmt: skip
        raise
    expect_tensor(out, (3, OUT), f"forward with a {route}")
    assert out.dtype == dtype, f"{route}: the output must be {dtype}, got {out.dtype} (cast the LoRA term to it)"
    assert layer.lora_A.dtype == torch.float32, "the trainable LoRA weights stay fp32 (autocast casts copies)"
    ref = formula_reference(layer, x, dtype=dtype, steps=IN + R + 6)  # the inputs are rounded to `dtype` too
    assert_close(out, ref.value, f"forward with a {route}", bound=ref.bound,
                 hint="compute the LoRA term, then cast it to the base output's dtype: in-place ops are not "
                      "autocast-eligible, so a fused add needs explicit casts")  # fmt: skip


@pytest.mark.exercise("1.2")
def test_forward_on_device(lora, device):
    """The forward formula holds on every device."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA).to(device)
    randomize_lora(layer)
    x = torch.randn(4, IN, device=device)
    out = layer(x)
    assert out.device.type == device.type, f"the output must stay on {device.type}"
    ref = formula_reference(layer, x)
    assert_close(out, ref.value, f"forward on {device.type}", bound=ref.bound)


@pytest.mark.exercise("1.2")
def test_float64_layer_computes_in_float64(lora):
    """A float64 base gives float64 adapters and a float64 output accurate to float64 rounding."""
    layer = lora.LoRALayer.from_linear(nn.Linear(IN, OUT, dtype=torch.float64), r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    x = torch.randn(4, IN, dtype=torch.float64)
    out = layer(x)
    expect_tensor(out, (4, OUT), "float64 forward", dtype=torch.float64,
                  hint="keep the base's float64: create A and B in its dtype, do not cast x to float32")  # fmt: skip
    ref = formula_reference(layer, x, dtype=torch.float64)
    assert_close(out, ref.value, "float64 forward", bound=ref.bound,
                 hint="a float32 step somewhere (A or B created as float32?) loses float64 accuracy")  # fmt: skip


@pytest.mark.exercise("1.2")
def test_rank_one_update_is_exact_outer_product(lora):
    """A hand-computed rank-1 case: W0 = 0, A = [1 2 3], B = [1, −1]ᵀ, x = 1 gives h = [6, −6]."""
    layer = lora.LoRALayer(3, 2, r=1, lora_alpha=1)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0], [-1.0]]))
    out = layer(torch.tensor([[1.0, 1.0, 1.0]]))
    assert_close(out, torch.tensor([[6.0, -6.0]]), "a hand-computed rank-1 case", bound=0.0,
                 hint="h = B (A x) with A·x = 6; small integers are exact in floating point")  # fmt: skip


@pytest.mark.exercise("1.2")
def test_forward_never_forms_the_full_update(lora):
    """The forward computes B (A x) as two thin products and never creates an (out, in) matrix."""
    layer = lora.LoRALayer(24, 40, r=3, lora_alpha=6)
    randomize_lora(layer)
    x = torch.randn(5, 24)
    with LargestAllocation() as largest:
        layer(x)
    # Legitimate tensors here hold at most 5 × 40 = 200 values; ΔW = B @ A holds 40 × 24 = 960.
    assert largest.numel < 40 * 24, (
        f"the forward created a tensor of shape {largest.shape} ({largest.op}): that is ΔW = B @ A (or as large). "
        "Compute scaling · B (A x) instead: two thin products cost 2·r·(in + out) per token, while forming B @ A "
        "costs out·in·r per call and out·in memory"
    )


class PassThrough(nn.Module):
    """A linear-like base that returns its input (an identity layer with in = out = 8)."""

    in_features = out_features = 8

    def forward(self, x):
        return x


class ExpOfLinear(nn.Module):
    """A linear-like base whose backward needs its output: y = exp(W x)."""

    in_features, out_features = 8, 6

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        return torch.exp(self.linear(x))


@pytest.mark.exercise("1.2")
def test_a_base_returning_its_input_is_not_overwritten(lora):
    """With an identity-like base, the caller's x is left unchanged and h = x + scaling · B A x."""
    layer = lora.LoRALayer(8, 8, r=2, lora_alpha=4, base_layer=PassThrough())
    randomize_lora(layer)
    x = torch.randn(5, 8)
    kept = x.clone()
    out = layer(x)
    assert torch.equal(x, kept), (
        "forward changed the caller's input tensor: adding the LoRA term in place into base_layer(x) is only safe "
        "when the base returns a fresh tensor (nn.Linear does; an identity layer returns x itself)"
    )
    ref = reference(lambda x, A, B: x + 2.0 * ((x @ A.T) @ B.T), kept, layer.lora_A, layer.lora_B,
                    dtype=torch.float32, steps=8 + 2 + 4)  # fmt: skip
    assert_close(out, ref.value, "output over an identity base", bound=ref.bound)


@pytest.mark.exercise("1.2")
def test_a_base_whose_backward_needs_its_output(lora):
    """With a base y = exp(W x), backward works and gives the gradient of exp(W x) + scaling · B A x."""
    layer = lora.LoRALayer(8, 6, r=2, lora_alpha=4, base_layer=ExpOfLinear())
    randomize_lora(layer)
    x = torch.randn(5, 8, requires_grad=True)
    try:
        layer(x).sum().backward()  # an in-place add into exp's output breaks this backward
    except RuntimeError as error:
        error.add_note("the base y = exp(W x) saves y for its backward: adding the LoRA term into base_layer(x) in place "
                       "breaks it; add in place only where adds_in_place_safely(base_layer) allows (lesson 01, §5)")  # fmt: skip
        raise
    W, A, B = (t.detach().double() for t in (layer.base_layer.linear.weight, layer.lora_A, layer.lora_B))
    x64 = x.detach().double().requires_grad_()
    (torch.exp(x64 @ W.T) + 2.0 * (x64 @ A.T) @ B.T).sum().backward()
    # d/dx of Σ exp(Wx) + 2 Σ BAx: a reduction over 8 inputs, exp, then a sum over 6 outputs.
    magnitude = torch.exp(x64.detach().abs() @ W.abs().T) @ W.abs() + 2.0 * (B.abs() @ A.abs()).sum(0)
    bound = (8 + 6 + 10) * UNIT_ROUNDOFF[torch.float32] * magnitude
    assert_close(x.grad, x64.grad, "dL/dx through a base that saves its output", bound=bound)


# ---- Exercise 1.3: merge and unmerge ---------------------------------------------------------


@pytest.mark.exercise("1.3")
def test_merged_forward_runs_the_base_only(lora):
    """When merged, forward returns base_layer(x): the update is not added a second time."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    x = torch.randn(5, IN)
    ref = formula_reference(layer, x)
    layer.merge()
    merged = formula_reference_for_merged(layer, x)
    assert_close(layer(x), ref.value, "merged output", bound=ref.bound + merged,
                 hint="when merged, forward must not add B A x a second time")  # fmt: skip


def formula_reference_for_merged(layer, x):
    """Extra rounding of a merged weight: ΔW (R + 1) and W0 + ΔW (1), then the product over IN."""
    W0, B, A = layer.base_layer.weight, layer.lora_B, layer.lora_A
    magnitude = (
        x.detach().double().abs()
        @ (W0.detach().double().abs() + (ALPHA / R) * B.detach().double().abs() @ A.detach().double().abs()).T
    )
    return (IN + R + 4) * UNIT_ROUNDOFF[torch.float32] * magnitude


@pytest.mark.exercise("1.3")
def test_eval_never_merges_implicitly(lora):
    """model.eval() changes nothing but dropout: no implicit merge (loralib's habit), the weight stays bit-identical."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    weight = layer.base_layer.weight.detach().clone()
    layer.eval()
    layer(torch.randn(2, IN))
    layer.train()
    assert layer.merged is False and torch.equal(layer.base_layer.weight, weight), (
        "eval() / train() must not merge or unmerge: merging is always an explicit merge() call"
    )


@pytest.mark.exercise("1.3")
def test_merge_leaves_the_base_frozen_without_history(lora):
    """merge() and unmerge() change the weight under no_grad: still a frozen Parameter, no grad_fn."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    randomize_lora(layer)
    original = layer.base_layer.weight
    for action in ("merge", "unmerge"):
        getattr(layer, action)()
        weight = layer.base_layer.weight
        assert weight is original, (
            f"{action}() must change the weight in place: replacing the Parameter breaks tied weights and optimizers"
        )
        assert weight.grad_fn is None and not weight.requires_grad, (
            f"after {action}() the base weight has grad_fn={weight.grad_fn} and requires_grad={weight.requires_grad}: "
            "ΔW carries gradient history from A and B, so add it under torch.no_grad() (or to weight.data)"
        )
        assert isinstance(weight, nn.Parameter), f"after {action}() base_layer.weight must still be an nn.Parameter"


@pytest.mark.exercise("1.3")
def test_unmerge_twice_changes_nothing_and_bias_is_untouched(lora):
    """unmerge() without merge() is a no-op; merge never touches the bias; a second unmerge() does nothing."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    layer.unmerge()  # not merged: a no-op
    assert torch.equal(layer.base_layer.weight, weight), "unmerge() on an unmerged layer must change nothing"
    layer.merge()
    assert torch.equal(layer.base_layer.bias, bias), "ΔW changes the weight only, never the bias"
    layer.unmerge()
    assert torch.equal(layer.base_layer.bias, bias), "unmerge() must not touch the bias either"
    once = layer.base_layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, once), "a second unmerge() must change nothing (the merged flag)"


@pytest.mark.exercise("1.3")
def test_merge_round_trip_is_exact_up_to_rounding(lora):
    """Ten merge/unmerge round trips move W0 by no more than their rounding."""
    layer = lora.LoRALayer(256, 256, r=8, lora_alpha=16)
    randomize_lora(layer, std=0.1)
    W0 = layer.base_layer.weight.detach().clone()
    for _ in range(10):
        layer.merge()
        layer.unmerge()
    # Per round trip: W0 + ΔW and (W0 + ΔW) − ΔW round once each, and each ΔW rounds over r + 1 steps.
    B, A = layer.lora_B.detach().double().abs(), layer.lora_A.detach().double().abs()
    magnitude = W0.double().abs() + 2.0 * (B @ A)
    bound = 10 * (2 + 2 * (8 + 1)) * UNIT_ROUNDOFF[torch.float32] * magnitude
    assert_close(layer.base_layer.weight, W0, "W0 after 10 merge/unmerge round trips", bound=bound,
                 hint="merging must be exact up to rounding: add and subtract the same scaled ΔW")  # fmt: skip


@pytest.mark.exercise("1.3")
def test_delta_weight_has_rank_at_most_r(lora):
    """ΔW has the base weight's shape (out, in) and rank r."""
    layer = lora.LoRALayer(64, 48, r=3)
    randomize_lora(layer)
    delta = layer.delta_weight().detach()
    expect_tensor(delta, (48, 64), "delta_weight()", "ΔW has the shape of base_layer.weight (out, in)")
    # ΔW is rounded to float32: a perturbation of at most (r + 1)·u·s|B||A| per entry, whose spectral norm
    # is below its Frobenius norm. Singular values under twice that are rounding, not rank.
    B, A = layer.lora_B.detach().double().abs(), layer.lora_A.detach().double().abs()
    noise = 2 * (3 + 1) * UNIT_ROUNDOFF[torch.float32] * torch.linalg.matrix_norm(layer.scaling * B @ A).item()
    rank = torch.linalg.matrix_rank(delta.double(), atol=noise, rtol=0.0).item()
    assert rank == 3, f"ΔW = B A must have rank r = 3, got {rank}"


@pytest.mark.exercise("1.3")
def test_merge_into_a_bf16_base_keeps_its_dtype(lora):
    """Merging into a bf16 weight keeps it bf16 and adds ΔW up to bf16 rounding."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer, std=0.2)
    layer.base_layer.to(torch.bfloat16)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    weight = layer.base_layer.weight
    assert weight.dtype == torch.bfloat16, f"the merged weight must stay bf16, got {weight.dtype}"
    ref = reference(lambda W, B, A: W + (ALPHA / R) * (B @ A), W0, layer.lora_B, layer.lora_A,
                    dtype=torch.bfloat16, steps=R + 3)  # fmt: skip
    assert_close(weight, ref.value, "bf16 weight after merge()", bound=ref.bound)


@pytest.mark.exercise("1.3")
def test_merge_refuses_a_non_linear_base(lora):
    """merge() on a base that is not an nn.Linear raises a TypeError and leaves merged False."""

    class Scale(nn.Module):
        in_features = out_features = 4

        def forward(self, x):
            return 2 * x

    layer = lora.LoRALayer(4, 4, r=2, base_layer=Scale())
    randomize_lora(layer)
    expect_refusal(layer.merge, error=TypeError, names=("Linear",), model=layer, what="the base is a Scale module")


# ---- Properties (Hypothesis, testcases/properties.py) and refusals -------------------------------------------


class LinearLike(nn.Module):
    """A linear-like base that is not an nn.Linear (so LoRA adds its term out of place): y = x Wᵀ + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, gen: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=gen).to(dtype))
        self.bias = nn.Parameter(torch.randn(out_features, generator=gen).to(dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


# base kind, its dtype, autocast to bf16 or not
ROUTES = {
    "fp32 nn.Linear": ("linear", torch.float32, False),
    "fp64 nn.Linear": ("linear", torch.float64, False),
    "bf16 nn.Linear": ("linear", torch.bfloat16, False),
    "fp16 nn.Linear": ("linear", torch.float16, False),
    "fp32 nn.Linear under bf16 autocast": ("linear", torch.float32, True),
    "fp32 linear-like module": ("like", torch.float32, False),
    "bf16 linear-like module": ("like", torch.bfloat16, False),
    "fp32 linear-like module under bf16 autocast": ("like", torch.float32, True),
}
LEADING = st.sampled_from([(), (1,), (3,), (1, 1), (2, 1), (2, 3), (1, 3, 2)])  # no batch, one token, sides of 1


def expanded(x: torch.Tensor) -> torch.Tensor:
    """The same shape with every leading row equal, as a stride-0 (broadcast) view."""
    return x.reshape(-1, x.shape[-1])[:1].reshape(*(1,) * (x.dim() - 1), x.shape[-1]).expand(x.shape)


@pytest.mark.exercise("1.2")
@pytest.mark.parametrize("route", ROUTES)
def test_forward_for_every_shape_dtype_and_layout(lora, route):
    """Any sizes (1 included), a 1-D x, sides of 1, any layout, fp32/fp64/bf16/fp16 bases, autocast: the formula, the base's dtype."""
    kind, dtype, autocast = ROUTES[route]

    def check(case):
        gen = torch.Generator().manual_seed(case.seed)
        if kind == "linear":
            base = nn.Linear(case.in_features, case.out_features, bias=case.bias).to(dtype)
        else:
            base = LinearLike(case.in_features, case.out_features, case.bias, dtype, gen)
        layer = lora.LoRALayer.from_linear(base, r=case.r, lora_alpha=case.lora_alpha)
        check_factors(layer, case.in_features, case.out_features)
        adapters = layer.lora_A.dtype
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
        values = torch.randn(*case.leading, case.in_features, generator=gen).to(torch.float32 if autocast else dtype)
        want = torch.bfloat16 if autocast else dtype
        bias = base.bias if case.bias else torch.zeros(case.out_features)
        half = want in (torch.bfloat16, torch.float16)
        for layout in [*LAYOUTS, "expanded"]:  # every layout of the same values
            x = expanded(values) if layout == "expanded" else in_layout(values, layout)
            where = "a broadcast view (stride 0)" if layout == "expanded" else describe_layout(x, layout)
            what = f"LoRALayer(x) for x of shape {tuple(x.shape)}, {where}"
            kept = x.clone()
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = layer(x)
            except Exception as error:
                error.add_note(what)  # the layout the forward raised on (the drawn case does not name it)
                raise
            assert torch.equal(x, kept), f"{what}: forward changed its input x"
            expect_tensor(out, (*case.leading, case.out_features), what, dtype=want,
                          hint="(..., in) → (..., out) for any leading dimensions, none included; the output in the "
                               "base's dtype (under autocast, the autocast dtype)")  # fmt: skip
            assert layer.lora_A.dtype == layer.lora_B.dtype == adapters, (
                "the forward must not change the adapters' dtype"
            )
            ref = reference(lambda x, W, b, A, B: lora_formula(x, W, b, A, B, case.lora_alpha / case.r),
                            x, base.weight, bias, layer.lora_A, layer.lora_B, dtype=want,
                            steps=case.in_features + case.r + (6 if half else 4))  # fmt: skip
            assert_close(out, ref.value, what, bound=ref.bound,
                         hint="h = base_layer(x) + (lora_alpha / r) · B (A x), the LoRA term in A's dtype, cast to "
                              "the output's; x of any layout (reshape, never view)")  # fmt: skip

    for_all(cases(in_features=st.integers(1, 9), out_features=st.integers(1, 9), r=st.integers(1, 4),
                  lora_alpha=st.sampled_from([5, 1, 16]), bias=st.sampled_from([True, False]), leading=LEADING,
                  seed=st.integers(0, 2**16)), check, salt=route)  # fmt: skip


@pytest.mark.exercise("1.3")
@pytest.mark.parametrize("dtype", FLOATS, ids=short)
def test_merge_and_unmerge_for_every_size_and_dtype(lora, dtype):
    """Any sizes (1 included) and a fp32/fp64/bf16/fp16 weight: merge adds ΔW in the weight's dtype, unmerge takes it off."""

    def check(case):
        gen = torch.Generator().manual_seed(case.seed)
        base = nn.Linear(case.in_features, case.out_features).to(dtype)
        layer = lora.LoRALayer.from_linear(base, r=case.r, lora_alpha=case.lora_alpha)
        check_factors(layer, case.in_features, case.out_features)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        W0, s = base.weight.detach().clone(), case.lora_alpha / case.r
        delta = layer.delta_weight()
        expect_tensor(delta, (case.out_features, case.in_features), "delta_weight()", dtype=layer.lora_A.dtype,
                      hint="ΔW = scaling · B @ A in the adapters' dtype, the shape of the base weight")  # fmt: skip
        layer.merge()
        weight = base.weight
        assert weight.dtype == dtype and layer.merged, f"after merge() the weight stays {dtype} and merged is True"
        ref = reference(lambda W, B, A: W + s * (B @ A), W0, layer.lora_B, layer.lora_A, dtype=dtype, steps=case.r + 3)
        assert_close(weight, ref.value, "weight after merge()", bound=ref.bound,
                     hint="W0 + scaling · B @ A, rounded once to the weight's dtype")  # fmt: skip
        layer.unmerge()
        back = reference(lambda W, B, A: W + s * (B @ A) - s * (B @ A), W0, layer.lora_B, layer.lora_A, dtype=dtype,
                         steps=2 * case.r + 6, magnitude=lambda W, B, A: W + 2 * s * (B @ A))  # fmt: skip
        assert_close(base.weight, back.value, "weight after merge(); unmerge()", bound=back.bound,
                     hint="unmerge() subtracts the same ΔW, in the weight's dtype")  # fmt: skip
        assert base.weight.dtype == dtype and not layer.merged, (
            "after unmerge() the weight keeps its dtype, merged False"
        )

    for_all(cases(in_features=st.integers(1, 9), out_features=st.integers(1, 9), r=st.integers(1, 4),
                  lora_alpha=st.sampled_from([5, 1, 16]), seed=st.integers(0, 2**16)), check, salt=short(dtype))  # fmt: skip


@pytest.mark.exercise("1.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"lora_alpha": -1.0}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"),
     ({"init_lora_weights": "xavier"}, "init_lora_weights")],
)  # fmt: skip
def test_a_refused_layer_leaves_its_base_unchanged(lora, kwargs, argument):
    """A bad argument with a given base layer: ValueError naming it, and the base is NOT frozen (checks come first)."""
    linear = nn.Linear(8, 4)
    expect_refusal(lora.LoRALayer.from_linear, linear, **kwargs, names=(argument,), model=linear,
                   what="the base layer must stay trainable and unchanged: check the arguments before freezing it")  # fmt: skip


@pytest.mark.exercise("1.1")
def test_reset_with_an_unknown_init_changes_nothing(lora):
    """reset_lora_parameters('xavier') raises a ValueError naming init_lora_weights before touching A or B."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    randomize_lora(layer)
    expect_refusal(layer.reset_lora_parameters, "xavier", names=("init_lora_weights",), model=layer,
                   what="A and B must keep their values: check the name before zeroing B")  # fmt: skip
