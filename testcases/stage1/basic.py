"""Stage 1 basic tests: the LoRA layer as lesson 01 describes it (model/lora.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from testcases.helpers import diagnose, expect_refusal, randomize_lora
from testcases.tolerances import assert_close, expect_tensor, reference

# Sizes used throughout: r = 3 does not divide lora_alpha = 5, so scaling = 5/3 (not 1, not 5).
IN, OUT, R, ALPHA = 16, 12, 3, 5


def lora_formula(x, W, b, A, B, scaling=ALPHA / R):
    """h = x W0ᵀ + b + scaling · (x Aᵀ) Bᵀ, for any leading dimensions."""
    return x @ W.T + b + scaling * ((x @ A.T) @ B.T)


def formula_reference(layer, x, dtype=torch.float32, steps=IN + R + 4):
    """The exact LoRA output and its rounding bound (steps: a reduction over IN, then over R, then 4 more).

    In half precision (a half-precision base, or autocast) the inputs are rounded too and the LoRA term
    is cast before the add: IN + R + 6 roundings of that dtype's unit at most."""
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    check_factors(layer, W.shape[1], W.shape[0])
    return reference(lora_formula, x, W, b, A, B, dtype=dtype, steps=steps)


def check_factors(layer, in_features: int, out_features: int) -> None:
    """A is (r, in) and B is (out, r): checked before any expected value is computed from them."""
    r = layer.lora_A.shape[0] if layer.lora_A.dim() == 2 else -1
    expect_tensor(layer.lora_A, (r, in_features), "lora_A", "A is (r, in_features), as in the lesson and PEFT")
    expect_tensor(layer.lora_B, (out_features, r), "lora_B", "B is (out_features, r), as in the lesson and PEFT")


# ---- Exercise 1.1: the LoRA layer -----------------------------------------------------------


@pytest.mark.exercise("1.1")
def test_lora_layer_shapes_and_scaling(lora):
    """A is (r, in_features), B is (out_features, r), the base is nn.Linear(in, out), scaling = lora_alpha / r."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    expect_tensor(
        layer.lora_A, (R, IN), "lora_A", "A maps the input down to r dimensions: (r, in_features), as in PEFT"
    )
    expect_tensor(layer.lora_B, (OUT, R), "lora_B", "B maps r dimensions up to the output: (out_features, r)")
    assert isinstance(layer.base_layer, nn.Linear) and tuple(layer.base_layer.weight.shape) == (OUT, IN), (
        f"base_layer must be an nn.Linear({IN}, {OUT}) (weight of shape ({OUT}, {IN}))"
    )
    assert layer.scaling == pytest.approx(ALPHA / R, rel=1e-12), (
        f"scaling must be lora_alpha / r = {ALPHA} / {R} = {ALPHA / R:.4f}, got {layer.scaling!r}"
        + (" (integer division?)" if layer.scaling == ALPHA // R else "")
    )
    assert layer.merged is False, "a new layer is not merged (merged = False)"


@pytest.mark.exercise("1.1")
def test_lora_layer_freezes_base_and_trains_lora(lora):
    """The base layer's weight and bias are frozen; lora_A and lora_B are trainable nn.Parameters."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    assert isinstance(layer.lora_A, nn.Parameter) and isinstance(layer.lora_B, nn.Parameter), (
        "lora_A and lora_B must be nn.Parameter, or the optimizer never sees them"
    )
    frozen = [name for name, p in layer.named_parameters() if name.startswith("base_layer") and p.requires_grad]
    assert not frozen, f"the pretrained weights must be frozen (requires_grad=False), but {frozen} are trainable"
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad, "lora_A and lora_B must be trainable"


@pytest.mark.exercise("1.1")
def test_lora_init_B_zero_A_random(lora):
    """B starts at exactly zero; A starts Kaiming-uniform, within ±1/√in_features and not zero."""
    layer = lora.LoRALayer(64, 32, r=8)
    expect_tensor(layer.lora_B, (32, 8), "lora_B")
    expect_tensor(layer.lora_A, (8, 64), "lora_A")
    assert torch.count_nonzero(layer.lora_B) == 0, (
        "B must start at zero so that B·A = 0 and the wrapped layer reproduces the base layer exactly"
    )
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel(), (
        "A must start random (Kaiming-uniform): with A = 0 as well, no gradient ever reaches B or A"
    )
    bound = 1 / 64**0.5  # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
    largest = layer.lora_A.detach().abs().max().item()
    assert largest <= bound, (
        f"A must be Kaiming-uniform with a=√5, i.e. within ±1/√in_features = ±{bound:.4f}; got max |A| = {largest:.4f}"
    )


@pytest.mark.exercise("1.1")
def test_from_linear_wraps_without_copying(lora):
    """from_linear wraps the given nn.Linear itself (no copy) and freezes it."""
    linear = nn.Linear(10, 6)
    layer = lora.LoRALayer.from_linear(linear, r=2, lora_alpha=4)
    assert layer.base_layer is linear, "from_linear must wrap the given layer itself, not a copy of it"
    assert not linear.weight.requires_grad, "from_linear must freeze the wrapped layer's weight"
    expect_tensor(layer.lora_A, (2, 10), "lora_A of from_linear(Linear(10, 6), r=2)")
    expect_tensor(layer.lora_B, (6, 2), "lora_B of from_linear(Linear(10, 6), r=2)")


@pytest.mark.exercise("1.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [({"r": 0}, "r"), ({"lora_alpha": 0}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout")],
)
def test_lora_layer_rejects_bad_arguments(lora, kwargs, argument):
    """r ≤ 0, lora_alpha ≤ 0 and dropout outside [0, 1) raise a ValueError that names the argument."""
    expect_refusal(lora.LoRALayer, 8, 8, **kwargs, names=(argument,))


# ---- Exercise 1.2: forward --------------------------------------------------------------------


@pytest.mark.exercise("1.2")
def test_fresh_layer_equals_base_layer(lora):
    """With B = 0 the layer returns exactly what its base layer returns."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    x = torch.randn(5, IN)
    expected = reference(lambda x, W, b: x @ W.T + b, x, layer.base_layer.weight, layer.base_layer.bias,
                         dtype=torch.float32, steps=IN + 2)  # fmt: skip
    assert_close(layer(x), expected.value, "output of a fresh LoRALayer", bound=expected.bound,
                 hint="with B = 0 the layer must return base_layer(x)", dtype=torch.float32)  # fmt: skip


@pytest.mark.exercise("1.2")
def test_forward_matches_the_formula(lora):
    """h = W0 x + b + (lora_alpha / r) · B A x, with r = 3 and lora_alpha = 5."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    expect_tensor(layer.lora_A, (R, IN), "lora_A (checked before the formula is evaluated)")
    expect_tensor(layer.lora_B, (OUT, R), "lora_B (checked before the formula is evaluated)")
    randomize_lora(layer)
    x = torch.randn(5, IN)
    out = layer(x)
    ref = formula_reference(layer, x)
    expect_tensor(out, (5, OUT), "LoRALayer(x) for x of shape (5, 16)")
    W, b, A, B = (
        t.detach().double() for t in (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B)
    )
    x64 = x.double()
    cause = diagnose(out, {
        "the update is scaled by lora_alpha instead of lora_alpha / r": lora_formula(x64, W, b, A, B, ALPHA),
        "the update is not scaled at all (scaling = lora_alpha / r is missing)": lora_formula(x64, W, b, A, B, 1.0),
        "scaling uses integer division lora_alpha // r": lora_formula(x64, W, b, A, B, ALPHA // R),
        "the base layer's output is missing (only the LoRA branch is returned)": lora_formula(x64, 0 * W, 0 * b, A, B),
        "the LoRA branch is missing (only the base layer runs)": lora_formula(x64, W, b, A, 0 * B),
    }, bound=ref.bound)  # fmt: skip
    assert_close(out, ref.value, "LoRALayer(x)", bound=ref.bound, cause=cause, dtype=torch.float32,
                 hint="h = W0 x + b + (lora_alpha / r) · B (A x), with A (r, in) and B (out, r)")  # fmt: skip


@pytest.mark.exercise("1.2")
def test_forward_keeps_leading_dimensions(lora):
    """(2, 3, 7, in) maps to (2, 3, 7, out); every leading dimension is a batch dimension."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    x = torch.randn(2, 3, 7, IN)
    out = layer(x)
    expect_tensor(
        out, (2, 3, 7, OUT), "LoRALayer(x) for x of shape (2, 3, 7, 16)", "treat every leading dimension as batch"
    )
    ref = formula_reference(layer, x)
    assert_close(out, ref.value, "LoRALayer(x) on a 4-d input", bound=ref.bound)


@pytest.mark.exercise("1.2")
def test_gradients_reach_only_lora(lora):
    """Backward gives B a gradient, makes A part of the graph and leaves W0 without a gradient."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    layer(torch.randn(5, IN)).square().sum().backward()
    assert layer.base_layer.weight.grad is None, "the frozen base weight must get no gradient"
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0, "B must get a non-zero gradient"
    assert layer.lora_A.grad is not None, "A must be part of the graph (it gets a gradient, zero at init)"


# ---- Exercise 1.3: merge and unmerge ---------------------------------------------------------


@pytest.mark.exercise("1.3")
def test_delta_weight_is_scaled_B_times_A(lora):
    """delta_weight() = (lora_alpha / r) · B @ A, of shape (out_features, in_features)."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    check_factors(layer, IN, OUT)
    delta = layer.delta_weight()
    ref = reference(lambda B, A: (ALPHA / R) * (B @ A), layer.lora_B, layer.lora_A, dtype=torch.float32, steps=R + 1)
    assert_close(delta, ref.value, "delta_weight()", bound=ref.bound,
                 hint="ΔW = (lora_alpha / r) · B @ A, the shape of base_layer.weight (out, in)")  # fmt: skip


@pytest.mark.exercise("1.3")
def test_merge_keeps_outputs_and_updates_weight(lora):
    """After merge() the weight is W0 + ΔW, merged is True and the outputs are unchanged."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    x = torch.randn(5, IN)
    check_factors(layer, IN, OUT)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged is True, "merge() must set merged = True"
    B, A = layer.lora_B.detach(), layer.lora_A.detach()
    weight = reference(lambda W, B, A: W + (ALPHA / R) * (B @ A), W0, B, A, dtype=torch.float32, steps=R + 2)
    assert_close(layer.base_layer.weight, weight.value, "weight after merge()", bound=weight.bound,
                 hint="merge() adds ΔW = scaling · B @ A to base_layer.weight once")  # fmt: skip
    ref = reference(lambda x, W, b, B, A: x @ (W + (ALPHA / R) * (B @ A)).T + b,
                    x, W0, layer.base_layer.bias, B, A, dtype=torch.float32, steps=IN + R + 4)  # fmt: skip
    assert_close(layer(x), ref.value, "output after merge()", bound=ref.bound,
                 hint="a merged layer computes the same function with the base layer only")  # fmt: skip


@pytest.mark.exercise("1.3")
def test_unmerge_restores_the_base_weight(lora):
    """merge() then unmerge() gives W0 back (up to rounding) and sets merged = False."""
    layer = lora.LoRALayer(IN, OUT, r=R, lora_alpha=ALPHA)
    randomize_lora(layer)
    check_factors(layer, IN, OUT)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert layer.merged is False, "unmerge() must set merged = False"
    # W0 + ΔW − ΔW: two roundings of the sum and two of ΔW (which may be computed differently each time).
    ref = reference(lambda W, B, A: W + (ALPHA / R) * (B @ A) - (ALPHA / R) * (B @ A),
                    W0, layer.lora_B, layer.lora_A, dtype=torch.float32, steps=2 * R + 4,
                    magnitude=lambda W, B, A: W + 2 * (ALPHA / R) * (B @ A))  # fmt: skip
    assert_close(layer.base_layer.weight, ref.value, "weight after merge(); unmerge()", bound=ref.bound,
                 hint="unmerge() subtracts the same ΔW that merge() added")  # fmt: skip


@pytest.mark.exercise("1.3")
def test_merge_twice_changes_nothing(lora):
    """A second merge() is a no-op: the weight stays bit-identical."""
    layer = lora.LoRALayer(IN, OUT, r=R)
    randomize_lora(layer)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once), (
        "a second merge() must change nothing (check the merged flag): ΔW was added twice"
    )
