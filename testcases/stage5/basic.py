"""Stage 5 basic tests: the LoRA family, as lesson 05 describes it (model/lora_variants.py).

How close is close enough (testcases/tolerances.py). Formulas that run in float64 (a float64 layer
or model) are compared with an independent float64 evaluation within ``NETWORK_RTOL`` of the output's
scale. Where the code must run in float32 — a 4-bit base, and the fp32 SVD / QR that PiSSA, OLoRA
and LoftQ run by design — the bound is derived from the computation: rounding steps as in
tolerances.py, plus the backward error of the factorisation (``factorisation_error``) times the
conditioning of what is compared (a gap between singular values, a smallest singular value).

PEFT 0.21.2's numbers come from testcases/fixtures/peft_variants_golden.safetensors, written by
solutions/tools/make_variants_golden.py (one nn.Linear(12 → 10) with a bias, float64, x (6, 12));
the tests never import peft. ``peft_golden()`` loads the file once per session and hands out copies
(a test fixture cannot be used here: the stage modules' fixtures are not collected with their tests).
Each key is read under the rule testcases/tolerances.py names for it (FIXTURE_RULES), and the
``check_*_record`` functions below apply the same bounds to PEFT's results recorded on other CPUs.

Failure messages: a "Hint" says what the check tests ("the check: …"), never which part of the code is
wrong; a "Likely cause" appears only when ``helpers.diagnose`` found that the output IS what a named
mistake produces. A refusal is checked with ``helpers.refuses``, whose failure shows the call and the
arguments it was given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from testcases.helpers import copy_of, diagnose, generator, make_trainer, randomize_lora
from testcases.tolerances import (
    NETWORK_RTOL,
    UNIT_ROUNDOFF,
    assert_close,
    assert_network_close,
    expect_tensor,
    fixture,
    fp32_network_bound,
)

U32 = UNIT_ROUNDOFF[torch.float32]
GOLDEN_FILE = "peft_variants_golden.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- helpers shared with advanced.py --------------------------------------------------------------


def peft_golden() -> Mapping[str, torch.Tensor]:
    """PEFT 0.21.2's golden vectors (keys: solutions/tools/make_variants_golden.py), each under its rule
    (testcases/tolerances.py FIXTURE_RULES), a fresh copy per read."""
    return fixture(GOLDEN_FILE)


# ---- the fixture's rules, applied to the same computation recorded on another CPU -----------------
# (testcases/support_test.py calls these with the committed fixture and each cpu-record; the graded
# tests compare a student's result with the fixture under the same bounds)


def check_draw_record(fixture: Mapping, other: Mapping, keys: list[str]) -> None:
    for key in keys:
        uniform_draws_close(other[key], fixture[key], f"{key} recorded elsewhere")


def check_vera_out_record(fixture: Mapping, other: Mapping, keys: list[str]) -> None:
    out = fixture["vera.out"]
    bound = NETWORK_RTOL * (out.abs().max().item() + 1) + vera_draw_bound(fixture)
    assert_close(other["vera.out"], out, "vera.out recorded elsewhere", bound=bound)


def check_pissa_record(fixture: Mapping, other: Mapping, keys: list[str]) -> None:
    weight = fixture["weight"].float()
    bound = sum(
        pissa_product_bound(weight, 4, SimpleNamespace(lora_A=f["pissa.A"], lora_B=f["pissa.B"], scaling=2.0))
        for f in (fixture, other)
    )
    W, product = weight.double(), fixture["pissa.product"].double()
    assert_close(other["pissa.product"], product, "pissa.product recorded elsewhere", bound=bound)
    assert_close(other["pissa.residual"], fixture["pissa.residual"], "pissa.residual recorded elsewhere",
                 bound=bound + 8 * U32 * (W.abs() + product.abs()))  # fmt: skip


def check_olora_record(fixture: Mapping, other: Mapping, keys: list[str]) -> None:
    weight = fixture["weight"].float()
    W, product = weight.double(), fixture["olora.product"].double()
    bound = olora_product_bound(weight, 4, product)
    assert_close(other["olora.product"], product, "olora.product recorded elsewhere", bound=bound)
    assert_close(other["olora.residual"], fixture["olora.residual"], "olora.residual recorded elsewhere",
                 bound=bound + 8 * U32 * (W.abs() + product.abs()))  # fmt: skip


def make_linear(in_features: int, out_features: int, seed: int, dtype=torch.float64, bias: bool = True) -> nn.Linear:
    """An nn.Linear with N(0, 0.4²) weights and N(0, 0.1²) biases drawn from a seeded generator."""
    gen = generator(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) * 0.4)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen, dtype=torch.float64) * 0.1)
    return layer


def golden_linear(golden: dict[str, torch.Tensor], dtype=torch.float64) -> nn.Linear:
    """The golden file's nn.Linear(12 → 10) (weight and bias), in ``dtype``."""
    layer = nn.Linear(12, 10, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(golden["weight"])
        layer.bias.copy_(golden["bias"])
    return layer


def set_values(module: nn.Module, **values: torch.Tensor) -> None:
    """Copy ``values`` into the module's tensors of those names (as if they had been trained)."""
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(value)


def randn(*shape: int, seed: int, std: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator(seed), dtype=torch.float64) * std).to(dtype)


def f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().cpu() for t in tensors]


def network_with_weights(base: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A float64 copy of the plain model ``base`` whose layers at these paths have these weights."""
    twin = copy_of(base).double()
    with torch.no_grad():
        for path, weight in weights.items():
            twin.get_submodule(path).weight.copy_(weight)
    return twin


def factorisation_error(matrix: torch.Tensor) -> float:
    """A bound on the backward error ‖E‖₂ of an fp32 SVD or Householder QR of ``matrix`` (m, n).

    Both are backward stable: the computed factors are the exact factors of matrix + E with
    ‖E‖₂ ≤ γ_{mn}·‖matrix‖₂ (Higham, "Accuracy and Stability", Thm 19.4 for QR; LAPACK Users'
    Guide §4.9 for the SVD), γ_{mn} = m·n·u: the pessimistic constant, which is still 10⁴ times
    smaller than the mistakes these tests exist to catch.
    """
    m, n = matrix.shape
    return m * n * U32 * torch.linalg.matrix_norm(matrix.double(), ord=2).item()


def matrix_with_spectrum(out_features: int, in_features: int, singular_values: list[float], seed: int) -> torch.Tensor:
    """U diag(S) Vᵀ in fp32 with random orthonormal U, V and the given singular values (a known SVD)."""
    gen = generator(seed)
    U, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=torch.float64))
    k = len(singular_values)
    S = torch.tensor(singular_values, dtype=torch.float64)
    return ((U[:, :k] * S) @ V[:, :k].T).float()


def top_r_part(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the top-r SVD part of ``weight``, its singular values), exactly (float64 SVD of the fp32 matrix)."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], S


def pissa_product_bound(weight: torch.Tensor, r: int, layer) -> torch.Tensor:
    """Allowed |s·B A − (top-r part of W0)|: the SVD's backward error, amplified by the spectral gap, plus rounding.

    The computed SVD is exact for W0 + E (‖E‖₂ ≤ ``factorisation_error``); the top-r part moves by at
    most ‖E‖·(1 + 2σ₁/(σ_r − σ_{r+1})) (Wedin's sin θ theorem). Forming A, B (√, ÷ s, ×) and the
    product: 8 roundings of s·|B||A|.
    """
    _, S = top_r_part(weight, r)
    gap = (S[r - 1] - S[r]).item() if r < len(S) else S[r - 1].item()
    E = factorisation_error(weight)
    A, B = f64(layer.lora_A, layer.lora_B)
    return E * (1 + 2 * S[0].item() / gap) + 8 * U32 * layer.scaling * (B.abs() @ A.abs())


def olora_product_bound(weight: torch.Tensor, r: int, product: torch.Tensor) -> torch.Tensor:
    """Allowed |Δ(s·B A)| between two fp32 QR-based OLoRA inits of ``weight`` (r = 4, s = 2).

    Each computed QR is exact for W0 + E (‖E‖₂ ≤ ``factorisation_error``): the first r QR terms move by
    ≤ 2‖E‖·(1 + 2‖W‖/σ_min(W[:, :r])) for each of the two QRs, × s = 2; forming the product: 8 roundings
    of |s·B A|.
    """
    W = weight.double()
    sigma_min = torch.linalg.svdvals(W[:, :r])[-1].item()
    E = factorisation_error(weight)
    return 4 * E * (1 + 2 * torch.linalg.matrix_norm(W, ord=2).item() / sigma_min) + 8 * U32 * product.abs()


def check_w0_init_function(layer, weight: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor, what: str) -> None:
    """The initialised layer computes W0 x + b: forward rounding, plus ``extra`` (allowed |W_res + s·BA − W0|) · |x|."""
    x = randn(7, layer.in_features, seed=40, dtype=torch.float32)
    W, b, x64 = weight.double(), bias.double(), x.double()
    A, B, residual = f64(layer.lora_A, layer.lora_B, layer.base_layer.weight)
    s = layer.scaling
    # forward: W_res x + b + s·B(A x): IN + R + 4 roundings of (|W_res||x| + s|B||A||x| + |b|)
    magnitude = x64.abs() @ (residual.abs() + s * B.abs() @ A.abs()).T + b.abs()
    bound = (layer.in_features + layer.r + 4) * U32 * magnitude + x64.abs() @ extra.T
    assert_close(layer(x), x64 @ W.T + b, what, bound=bound,
                 hint="the check: at step 0, W_res x + s·B A x + b = W0 x + b (the base holds the residual W0 − s·B A)")  # fmt: skip


def dora_expected(x, W, b, A, B, m, s):
    """h = (m/n) ⊙ ((W0 + s·B A) x) + b, n = ‖W0 + s·B A‖ per row (the DoRA paper's W' x, plus the bias)."""
    adapted = W + s * (B @ A)  # (out, in)
    n = adapted.norm(dim=1)  # (out,)
    out = x @ ((m / n)[:, None] * adapted).T
    return out if b is None else out + b


def dora_causes(x, W, b, A, B, m, s) -> dict[str, torch.Tensor]:
    """Wrong DoRA outputs that name their cause (helpers.diagnose)."""
    factor = m / (W + s * B @ A).norm(dim=1)  # m/n, (out,)
    base, lora_term = x @ W.T, s * (x @ A.T) @ B.T
    return {
        "m/n rescales only the LoRA term; it must rescale W0 x too (W' = m/n ⊙ (W0 + s·BA))": base
        + b
        + factor * lora_term,
        "n is the row norm of W0 alone; it must be the norm of W0 + s·B A": (m / W.norm(dim=1)) * (base + lora_term)
        + b,
        "the bias is rescaled by m/n too; W0 x is the base output WITHOUT its bias": factor * (base + b + lora_term),
        "the magnitude is ignored (this is plain LoRA)": base + b + lora_term,
    }


def vera_expected(x, W, b, A_s, B_s, lambda_d, lambda_b):
    """h = W0 x + b + λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))."""
    return x @ W.T + b + lambda_b * ((lambda_d * (x @ A_s.T)) @ B_s.T)


def adalora_expected(x, W, b, A, E, B, lora_alpha, r):
    """h = W0 x + b + (x (Q ⊙ Λ)ᵀ Pᵀ) · lora_alpha / (ranknum + 1e-5), PEFT's SVDLinear."""
    return x @ W.T + b + (x @ (A * E).T @ B.T) * lora_alpha / (r + 1e-5)


def orth_reg_expected(layers) -> torch.Tensor:
    """PEFT's regulariser: the mean over every Q and P of ‖Gram − I‖_F (QQᵀ for Q (r, in), PᵀP for P (out, r))."""
    terms = []
    for A, B in layers:
        eye = torch.eye(A.shape[0], dtype=A.dtype)
        terms += [torch.linalg.matrix_norm(A @ A.T - eye), torch.linalg.matrix_norm(B.T @ B - eye)]
    return torch.stack(terms).mean()


def cubic_budget(step: int, b0: int, bT: int, total: int, tinit: int, tfinal: int, deltaT: int) -> tuple[int, bool]:
    """PEFT's RankAllocator.budget_schedule, written out (the class docstring's table)."""
    if step <= tinit:
        return b0, False
    if step > total - tfinal:
        return bT, True
    progress = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((b0 - bT) * progress**3 + bT), step % deltaT == 0


def adalora_pair(lora_variants, init_r: int = 6, seed: int = 60) -> nn.Module:
    """Two float64 AdaLoRA layers (12 → 10 → 8) with random non-zero Λ, as if trained a little."""
    model = nn.Sequential(make_linear(12, 10, seed), nn.Tanh(), make_linear(10, 8, seed + 1))
    lora_variants.get_adalora_model(model, init_r=init_r, lora_alpha=8, target_modules=["0", "2"])
    for i, (_, layer) in enumerate(lora_variants.adalora_layers(model)):
        set_values(layer, lora_E=randn(init_r, 1, seed=seed + 10 + i))
    return model


def adalora_step_grads(model: nn.Module, x: torch.Tensor) -> None:
    """One backward of a fixed loss: every Q, Λ, P gets a gradient."""
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def lora_paths(lora, model) -> list[str]:
    return sorted(path for path, _ in lora.lora_layers(model))


# ---- Exercise 5.1: rsLoRA ------------------------------------------------------------------------


@pytest.mark.exercise("5.1")
def test_rslora_scaling_is_alpha_over_sqrt_r(lora_variants):
    """rslora_scaling(lora_alpha, r) = lora_alpha / √r: (16, 64) → 2.0 where LoRA's lora_alpha / r gives 0.25."""
    for lora_alpha, r in ((16, 64), (8, 4), (5, 3), (1, 1), (2.5, 7)):
        got = lora_variants.rslora_scaling(lora_alpha, r)
        expected = lora_alpha / math.sqrt(r)
        assert isinstance(got, float), f"rslora_scaling returns a Python float, got {type(got).__name__}"
        assert got == pytest.approx(expected, rel=1e-14), (
            f"rslora_scaling({lora_alpha}, {r}) must be lora_alpha / √r = {expected:.6g}, got {got!r}"
            + (" (that is lora_alpha / r: LoRA's scale, not rsLoRA's)" if got == pytest.approx(lora_alpha / r) else "")
        )


@pytest.mark.exercise("5.1")
def test_use_rslora_rescales_every_layer(lora, lora_variants, tiny_model64, token_ids):
    """use_rslora sets scaling = lora_alpha / √r and use_rslora = True on every LoRA layer; the logits follow."""
    base = copy_of(tiny_model64)
    lora.get_lora_model(tiny_model64, r=4, lora_alpha=8)
    randomize_lora(tiny_model64, std=0.2)
    assert lora_variants.use_rslora(tiny_model64) is tiny_model64, (
        "use_rslora modifies the model in place and returns it"
    )
    weights = {}
    for path, layer in lora.lora_layers(tiny_model64):
        assert layer.scaling == pytest.approx(4.0, rel=1e-14), (
            f"{path}: r=4, lora_alpha=8: rsLoRA's scaling is 8 / √4 = 4, got {layer.scaling!r}"
        )
        assert getattr(layer, "use_rslora", None) is True, f"{path}: set layer.use_rslora = True (the files need it)"
        W, A, B = f64(layer.base_layer.weight, layer.lora_A, layer.lora_B)
        weights[path] = W + 4.0 * B @ A
    expected = network_with_weights(base, weights)(token_ids)
    assert_network_close(tiny_model64(token_ids), expected, "logits after use_rslora",
                         "the check: every layer computes h = W0 x + (lora_alpha / √r)·B A x after use_rslora")  # fmt: skip


# ---- Exercise 5.2: DoRA --------------------------------------------------------------------------


@pytest.mark.exercise("5.2")
def test_dora_magnitude_starts_at_the_row_norms(lora_variants):
    """magnitude is a trainable (out,) fp32 vector, one per output feature, equal to ‖W0‖ of each row."""
    linear = make_linear(24, 10, seed=1, dtype=torch.float32)
    layer = lora_variants.DoRALayer.from_linear(linear, r=4, lora_alpha=8)
    m = layer.magnitude
    assert isinstance(m, nn.Parameter) and m.requires_grad, "magnitude must be a trainable nn.Parameter"
    expect_tensor(m, (10,), "magnitude of a 24 → 10 layer", dtype=torch.float32,
                  hint="the check: one length per OUTPUT feature, the norm of each row of W0 (out, in)")  # fmt: skip
    W = linear.weight.detach().double()
    norms = W.norm(dim=1)
    # a sum of 24 squares and a square root: 24 + 2 roundings of the (positive) row norm
    assert_close(m, norms, "magnitude at init", bound=(24 + 2) * U32 * norms,
                 cause=diagnose(m, {"m holds the SQUARED row norms": norms**2}, 1e-4),
                 hint="the check: m = ‖W0 + s·B A‖ per row with B = 0, i.e. the row norms of W0")  # fmt: skip
    x = randn(5, 24, seed=2, dtype=torch.float32)
    magnitude = x.double().abs() @ W.abs().T + linear.bias.double().abs()
    assert_close(layer(x), linear(x), "output of a fresh DoRA layer", bound=(2 * 24 + 16) * U32 * magnitude,
                 hint="the check: a fresh layer (m/n = 1, B = 0) computes its base layer's output")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_forward_matches_the_formula(lora_variants):
    """h = (m/n) ⊙ ((W0 + s·B A) x) + bias with n = ‖W0 + s·B A‖ per row (float64, trained A, B, m)."""
    linear = make_linear(12, 10, seed=3)
    layer = lora_variants.DoRALayer.from_linear(linear, r=4, lora_alpha=8)
    norms = linear.weight.detach().norm(dim=1)
    set_values(layer, lora_A=randn(4, 12, seed=4, std=0.3), lora_B=randn(10, 4, seed=5, std=0.3),
               magnitude=norms * (1 + 0.5 * torch.rand(10, generator=generator(6), dtype=torch.float64)))  # fmt: skip
    x = randn(6, 12, seed=7)
    out = layer(x)
    W, b, A, B, m = f64(linear.weight, linear.bias, layer.lora_A, layer.lora_B, layer.magnitude)
    expected = dora_expected(x, W, b, A, B, m, 2.0)
    bound = NETWORK_RTOL * (expected.abs().max().item() + 1)
    assert_close(out, expected, "DoRA layer output", bound=bound, cause=diagnose(out, dora_causes(x, W, b, A, B, m, 2.0), bound),
                 hint="the check: h = base(x) + (m/n − 1) ⊙ W0 x + (m/n) ⊙ s·B A x, n = ‖W0 + s·B A‖ per row")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_gradients_treat_the_norm_as_a_constant(lora_variants):
    """Backward treats n = ‖W0 + s·BA‖ as a constant (DoRA §4.3): the gradients of m, A, B are those of that formula."""
    linear = make_linear(12, 10, seed=8)
    layer = lora_variants.DoRALayer.from_linear(linear, r=4, lora_alpha=8)
    values = {"lora_A": randn(4, 12, seed=9, std=0.3), "lora_B": randn(10, 4, seed=10, std=0.3),
              "magnitude": linear.weight.detach().norm(dim=1) * 1.2}  # fmt: skip
    set_values(layer, **values)
    x, g = randn(6, 12, seed=11), randn(6, 10, seed=12)
    (layer(x) * g).sum().backward()
    W, b = f64(linear.weight, linear.bias)
    expected = {}
    for detached in (True, False):
        leaves = {k: v.clone().requires_grad_(True) for k, v in values.items()}
        adapted = W + 2.0 * leaves["lora_B"] @ leaves["lora_A"]
        n = adapted.norm(dim=1)
        n = n.detach() if detached else n
        out = x @ ((leaves["magnitude"] / n)[:, None] * adapted).T + b
        grads = torch.autograd.grad((out * g).sum(), list(leaves.values()))
        expected[detached] = dict(zip(leaves, grads))
    for name in ("magnitude", "lora_A", "lora_B"):
        grad = getattr(layer, name).grad
        assert grad is not None, f"{name} must get a gradient (it is trainable and part of the forward)"
        want, other = expected[True][name], expected[False][name]
        bound = NETWORK_RTOL * (want.abs().max().item() + 1)
        if name != "magnitude":  # m's gradient is the same either way; A's and B's are what the detach changes
            assert (want - other).abs().max() > 1e3 * bound, (
                "test set-up: detaching n must change A's and B's gradients"
            )
        assert_close(grad, want, f"gradient of {name}", bound=bound,
                     cause=diagnose(grad, {"n is not detached: backward differentiates through ‖W0 + s·BA‖ (compute "
                                           "the norm under torch.no_grad() or .detach() it)": other}, bound),
                     hint="the check: the gradients of m, A and B are those of (m/n)·(W0 + s·B A)x with n = ‖W0 + s·B A‖ held constant")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_merge_and_unmerge_are_exact(lora_variants):
    """merge() puts (m/n) ⊙ (W0 + s·BA) into the weight (same outputs); unmerge() restores W0; both safe twice."""
    linear = make_linear(12, 10, seed=13)
    W0 = linear.weight.detach().clone()
    layer = lora_variants.DoRALayer.from_linear(linear, r=4, lora_alpha=8)
    set_values(layer, lora_A=randn(4, 12, seed=14, std=0.3), lora_B=randn(10, 4, seed=15, std=0.3),
               magnitude=W0.norm(dim=1) * (1 + 0.5 * torch.rand(10, generator=generator(16), dtype=torch.float64)))  # fmt: skip
    x = randn(6, 12, seed=17)
    before = layer(x).detach()
    A, B, m = f64(layer.lora_A, layer.lora_B, layer.magnitude)
    adapted = W0 + 2.0 * B @ A
    merged_weight = (m / adapted.norm(dim=1))[:, None] * adapted
    layer.merge()
    layer.merge()
    assert layer.merged is True, "merge() must set merged = True"
    assert_network_close(linear.weight, merged_weight, "the base weight after merge() (called twice)",
                         "the check: after merge() twice, the logits equal the unmerged ones (the weight holds (m/n)[:, None] ⊙ (W0 + s·B A) once; the bias is not scaled)")  # fmt: skip
    assert_network_close(
        layer(x),
        before,
        "output after merge()",
        "the check: merged, the layer's output (its base layer's, with the merged weight and the unscaled bias) equals the unmerged output",
    )
    layer.unmerge()
    layer.unmerge()
    assert layer.merged is False, "unmerge() must set merged = False"
    assert_network_close(linear.weight, W0, "the base weight after unmerge() (called twice)",
                         "the check: after unmerge() the logits are the original ones again (W0 = merged weight ÷ the m/n of merge time − s·B A)")  # fmt: skip
    assert_network_close(layer(x), before, "output after unmerge()")


@pytest.mark.exercise("5.2")
def test_get_dora_model_trains_a_b_and_magnitude(lora, lora_variants, tiny_model64, token_ids):
    """get_dora_model wraps the seven projections in DoRALayers; only lora_A, lora_B, magnitude train; logits unchanged."""
    before = tiny_model64(token_ids).detach()
    assert lora_variants.get_dora_model(tiny_model64, r=2, lora_alpha=4) is tiny_model64, (
        "get_dora_model modifies the model in place and returns it"
    )
    wrapped = {path: type(layer).__name__ for path, layer in lora.lora_layers(tiny_model64)}
    assert len(wrapped) == 14 and set(wrapped.values()) == {"DoRALayer"}, (
        f"every default target (7 projections × 2 layers) must become a DoRALayer, got {wrapped}"
    )
    trainable = sorted({name.rsplit(".", 1)[-1] for name, p in tiny_model64.named_parameters() if p.requires_grad})
    assert trainable == ["lora_A", "lora_B", "magnitude"], (
        f"exactly lora_A, lora_B and magnitude train in a DoRA model, got {trainable}"
    )
    n_trainable = sum(p.numel() for p in tiny_model64.parameters() if p.requires_grad)
    expected = 2 * (4 * (2 * 32 + 16) + 2 * (2 * 48 + 32) + (2 * 48 + 16))
    assert n_trainable == expected, (
        f"r·(in + out) + out per layer = {expected:,} trainable numbers, got {n_trainable:,} (one magnitude per output row)"
    )
    assert_network_close(tiny_model64(token_ids), before, "logits right after get_dora_model",
                         "the check: a fresh DoRA model (m = ‖W0‖ per row, B = 0) computes what its base computes")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_from_a_trained_lora_layer_keeps_its_function(lora, lora_variants):
    """A trained LoRA layer turned into DoRA (from_lora_layer → reset_magnitude) gets m = ‖W0 + s·B A‖ and keeps its output."""
    linear = make_linear(12, 10, seed=23)
    trained = lora.LoRALayer.from_linear(linear, r=4, lora_alpha=8)
    set_values(trained, lora_A=randn(4, 12, seed=24, std=0.3), lora_B=randn(10, 4, seed=25, std=0.3))
    x = randn(6, 12, seed=26)
    before = trained(x).detach()
    layer = lora_variants.DoRALayer.from_lora_layer(trained)
    W, A, B = f64(linear.weight, trained.lora_A, trained.lora_B)
    norms = (W + 2.0 * B @ A).norm(dim=1)
    assert_close(layer.magnitude, norms, "magnitude of a DoRA layer made from a trained LoRA layer",
                 bound=NETWORK_RTOL * (norms.max().item() + 1),
                 cause=diagnose(layer.magnitude, {"m is the row norm of W0 alone; with B ≠ 0 it must be ‖W0 + s·B A‖":
                                                  W.norm(dim=1)}, NETWORK_RTOL * (norms.max().item() + 1)),
                 hint="the check: after reset_magnitude, m = ‖W0 + s·B A‖ per row (weight_norm), so m/n = 1")  # fmt: skip
    assert_network_close(layer(x), before, "output of the DoRA layer made from a trained LoRA layer",
                         "the check: the DoRA layer made from a trained LoRA layer (m = n = ‖W0 + s·B A‖) computes what the LoRA layer computed")  # fmt: skip


@pytest.mark.exercise("5.2")
def test_dora_on_a_4bit_base(lora_variants, quant):
    """QDoRA: on an NF4Linear base, m starts at the row norms of the dequantized W0 and the forward follows the formula."""
    linear = make_linear(64, 24, seed=18, dtype=torch.float32)  # 1,536 weights: 24 NF4 blocks
    base = quant.NF4Linear.from_linear(linear)
    layer = lora_variants.DoRALayer.from_linear(base, r=4, lora_alpha=8)
    W = base.dequantize_weight(torch.float32).double()
    norms = W.norm(dim=1)
    assert_close(layer.magnitude, norms, "magnitude on an NF4 base", bound=(64 + 2) * U32 * norms,
                 hint="the check: the magnitudes are the row norms of the DEQUANTIZED weight (dense_weight dequantizes an NF4Linear)")  # fmt: skip
    set_values(layer, lora_A=randn(4, 64, seed=19, std=0.2), lora_B=randn(24, 4, seed=20, std=0.2),
               magnitude=norms * (1 + 0.5 * torch.rand(24, generator=generator(21), dtype=torch.float64)))  # fmt: skip
    x = randn(5, 64, seed=22, dtype=torch.float32)
    out = layer(x)
    b, A, B, m = f64(base.bias, layer.lora_A, layer.lora_B, layer.magnitude)
    x64 = x.double()
    expected = dora_expected(x64, W, b, A, B, m, 2.0)
    factor = (m / (W + 2.0 * B @ A).norm(dim=1)).abs()
    # fp32 throughout: n (64 squares, √), m/n, W0 x (64), B A x (64 + 4), the products and sums: 2·64 + 4 + 12
    # roundings, each at most u·((1 + m/n)·(|W0||x| + s|B||A||x|) + |b|)
    magnitude = (1 + factor) * (x64.abs() @ (W.abs() + 2.0 * B.abs() @ A.abs()).T) + b.abs()
    bound = (2 * 64 + 4 + 12) * U32 * magnitude
    assert_close(out, expected, "DoRA output on an NF4 base", bound=bound, dtype=torch.float32,
                 cause=diagnose(out, dora_causes(x64, W, b, A, B, m, 2.0), bound),
                 hint="the check: h = base(x) + (m/n − 1) ⊙ W0 x + (m/n) ⊙ s·B A x with W0 the dequantized weight")  # fmt: skip


# ---- Exercise 5.3: PiSSA and OLoRA ---------------------------------------------------------------

# A spectrum with a wide gap after the 4th value: the top-4 subspace of W0 is then well conditioned
# (it moves by at most ‖E‖/gap under a perturbation E, Wedin), so the fp32 SVD pins it down to ~1e-6
# and "s·B A = top-r part" is a sharp check, not a hope.
SPECTRUM = [4.0, 3.5, 3.0, 2.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]


@pytest.mark.exercise("5.3")
def test_pissa_adapter_is_the_top_r_svd_part(lora, lora_variants):
    """PiSSA: s·B A equals W0's top-r SVD part (any lora_alpha), the base keeps W0 − s·B A, the function is kept."""
    weight = matrix_with_spectrum(10, 12, SPECTRUM, seed=23)
    linear = nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(weight)
    bias = linear.bias.detach().clone()
    layer = lora.LoRALayer.from_linear(linear, r=4, lora_alpha=8)  # s = 2
    assert lora_variants.pissa_init(layer) is layer, "pissa_init initialises the layer in place and returns it"
    top, S = top_r_part(weight, 4)
    A, B, residual = f64(layer.lora_A, layer.lora_B, layer.base_layer.weight)
    product = layer.scaling * B @ A
    bound = pissa_product_bound(weight, 4, layer)
    assert_close(product, top, "s·B A after pissa_init", bound=bound,
                 cause=diagnose(product, {"S_r is not divided by s = lora_alpha / r (PEFT divides, so s·BA is the "
                                          "top-r part for any lora_alpha)": 2.0 * top,
                                          "s·B A holds the SMALLEST r singular triplets": top_r_part(weight, 10)[0]
                                          - top_r_part(weight, 6)[0]}, bound),
                 hint="the check: s·B A is the top-r SVD part of W0 (A = diag(√(S_r/s)) Uᵀ[:r], B = V[:, :r] diag(√(S_r/s)))")  # fmt: skip
    for i in range(4):
        for name, norm in (("row of A", A[i].norm()), ("column of B", B[:, i].norm())):
            want = math.sqrt(S[i].item() / 2.0)
            assert abs(norm.item() - want) <= 1e-4 * want, (
                f"singular triplet {i}: the {name} must have norm √(S_i / s) = {want:.5f} (√S split evenly between A "
                f"and B, as PEFT does), got {norm.item():.5f}"
            )
    residual_bound = bound + (4 + 3) * U32 * (weight.double().abs() + product.abs())
    assert_close(residual, weight.double() - top, "the base weight after pissa_init", bound=residual_bound,
                 hint="the check: the base holds W0 − s·B A, everything but the top-r part")  # fmt: skip
    check_w0_init_function(layer, weight, bias, residual_bound, "PiSSA layer output at step 0")


@pytest.mark.exercise("5.3")
def test_olora_adapter_is_the_first_r_qr_terms(lora, lora_variants):
    """OLoRA: B = Q[:, :r] is orthonormal, s·B A = s·Q_r R_r (no ÷ s), the base keeps W0 − s·B A, the function is kept."""
    gen = generator(24)
    Q0, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    R0 = torch.triu(torch.randn(10, 12, generator=gen, dtype=torch.float64) * 0.3)
    R0[range(10), range(10)] = 2 + torch.rand(10, generator=gen, dtype=torch.float64)  # W0[:, :r] well conditioned
    weight = (Q0 @ R0).float()
    linear = nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(weight)
    bias = linear.bias.detach().clone()
    layer = lora.LoRALayer.from_linear(linear, r=4, lora_alpha=8)  # s = 2
    assert lora_variants.olora_init(layer) is layer, "olora_init initialises the layer in place and returns it"
    A, B, residual = f64(layer.lora_A, layer.lora_B, layer.base_layer.weight)
    expect_tensor(B, (10, 4), "lora_B after olora_init", "the check: B = Q[:, :r] is (out, r)")
    E = factorisation_error(weight)
    # Householder QR: the computed Q is orthonormal to within √n·γ_mn (Higham Thm 19.4)
    orthonormality = math.sqrt(10) * 10 * 12 * U32
    assert_close(B.T @ B, torch.eye(4, dtype=torch.float64), "Bᵀ B after olora_init", bound=orthonormality,
                 hint="the check: B = Q[:, :r] of torch.linalg.qr(W0) has orthonormal columns (OLoRA's point)")  # fmt: skip
    W = weight.double()
    Q, R = torch.linalg.qr(W)
    first = Q[:, :4] @ R[:4]  # the first r terms Σ q_i r_iᵀ: the same for every sign choice of the QR
    sigma_min = torch.linalg.svdvals(W[:, :4])[-1].item()
    # the first r terms are P W, P the projector on span(W0[:, :r]); it moves by ≤ 2‖E‖/σ_min(W0[:, :r])
    product = layer.scaling * B @ A
    s_bound = 2.0 * E * (1 + 2 * torch.linalg.matrix_norm(W, ord=2).item() / sigma_min) + 8 * U32 * product.abs()
    assert_close(product, 2.0 * first, "s·B A after olora_init", bound=s_bound,
                 cause=diagnose(product, {"A and B were divided by s (that is PiSSA's rule, not OLoRA's)": first}, s_bound),
                 hint="the check: s·B A is s times the first r QR terms (B = Q[:, :r], A = R[:r], no division by s)")  # fmt: skip
    residual_bound = s_bound + (4 + 3) * U32 * (W.abs() + product.abs())
    assert_close(residual, W - product, "the base weight after olora_init", bound=residual_bound,
                 hint="the check: the base holds W0 − s·B A (s = lora_alpha / r = 2 here)")  # fmt: skip
    check_w0_init_function(layer, weight, bias, residual_bound, "OLoRA layer output at step 0")


@pytest.mark.exercise("5.3")
def test_pissa_model_keeps_its_logits(lora, lora_variants, tiny_model, token_ids):
    """PiSSA on every projection of the tiny model: the logits at step 0 are those of the base model."""
    exact = copy_of(tiny_model).double()
    reference64 = exact(token_ids).detach()
    lora.get_lora_model(tiny_model, r=2, lora_alpha=4)
    for _, layer in list(lora.lora_layers(tiny_model)):
        lora_variants.pissa_init(layer)
    # the init runs in fp32 by design: allow 64× the float32 evaluation noise of the base network (tolerances.py)
    bound = fp32_network_bound(copy_of(exact).float()(token_ids), reference64)
    assert_close(tiny_model(token_ids), reference64, "logits right after pissa_init on every layer", bound=bound,
                 hint="the check: right after the init the logits are the base model's (each base holds W0 − s·B A, each adapter s·B A)")  # fmt: skip


# ---- Exercise 5.4: LoftQ -------------------------------------------------------------------------


def loftq_layer(lora, seed: int, r: int = 2, lora_alpha: float = 8):
    """A LoRA layer on an fp32 nn.Linear(64 → 24): 1,536 weights, 24 NF4 blocks; s = lora_alpha / r = 4."""
    linear = make_linear(64, 24, seed, dtype=torch.float32)
    return lora.LoRALayer.from_linear(linear, r=r, lora_alpha=lora_alpha), linear.weight.detach().clone()


def best_rank_r_error(matrix: torch.Tensor, r: int) -> float:
    """min over rank-r X of ‖matrix − X‖_F = √(Σ_{i>r} σ_i²) (Eckart–Young), in float64."""
    S = torch.linalg.svdvals(matrix.double())
    return S[r:].square().sum().sqrt().item()


def plain_nf4(quant, weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    packed, absmax = quant.quantize_nf4(weight, block_size)
    return quant.dequantize_nf4(packed, absmax, weight.shape, block_size)


def check_errors(errors: object, num_iters: int) -> None:
    assert isinstance(errors, list) and len(errors) == num_iters + 1, (
        f"loftq_init(num_iters={num_iters}) returns a list of num_iters + 1 = {num_iters + 1} errors (plain QLoRA's "
        f"first, then one per iteration), got {errors!r}"
    )
    assert all(isinstance(e, float) for e in errors), f"the errors are Python floats (.item()), got {errors!r}"


def check_fit(layer, weight: torch.Tensor, quantized: torch.Tensor, what: str) -> float:
    """‖W − (Q̂ + s·B A)‖ lies between the best rank-r fit of W − Q̂ and that plus the fp32 SVD's error; returns it."""
    W, Q = weight.double(), quantized.double()
    A, B = f64(layer.lora_A, layer.lora_B)
    s = layer.scaling
    error = torch.linalg.matrix_norm(W - Q - s * B @ A).item()
    best = best_rank_r_error(W - Q, layer.r)
    # B A is the exact rank-r SVD of (W − Q̂)/s + E' (‖E'‖ ≤ factorisation_error, plus 2 roundings of forming
    # (W − Q̂)/s): the fit is within 2‖E'‖_F of the best one (the best error is 1-Lipschitz), plus the
    # rounding of the stored factors (r + 2 per element of s|B||A|).
    E = math.sqrt(min(weight.shape)) * (factorisation_error(W - Q) + 2 * U32 * torch.linalg.matrix_norm(W - Q).item())
    slack = 2 * E + torch.linalg.matrix_norm((layer.r + 2) * U32 * s * B.abs() @ A.abs()).item()
    assert best * (1 - 1e-9) <= error <= best + slack, (
        f"{what}: ‖W − (Q̂ + s·B A)‖ = {error:.6g}, but the best rank-{layer.r} fit of W − Q̂ gives {best:.6g} "
        f"(allowed up to {best + slack:.6g}). B A must be the rank-r SVD of (W − Q̂) / s so that s·B A fits W − Q̂ "
        "for any lora_alpha (PEFT forgets the ÷ s, which is right only for s = 1)"
    )
    return error


@pytest.mark.exercise("5.4")
def test_loftq_errors_start_at_plain_nf4_and_end_below_it(lora, lora_variants, quant):
    """loftq_init returns num_iters + 1 errors: ‖W − Q̂(W)‖ of plain QLoRA first, then ones below it."""
    layer, weight = loftq_layer(lora, seed=30)
    errors = lora_variants.loftq_init(layer, num_iters=3)
    check_errors(errors, 3)
    W, Q = weight.double(), plain_nf4(quant, weight).double()
    plain = torch.linalg.matrix_norm(W - Q).item()
    # a float32 norm of 1,536 differences: 1,536 + 2 roundings of it, relative
    assert abs(errors[0] - plain) <= (1536 + 2) * U32 * plain, (
        f"errors[0] is plain QLoRA's error ‖W − dequant(quant(W))‖ = {plain:.6g} (B = 0, Stage 3's quantize_nf4 / "
        f"dequantize_nf4), got {errors[0]:.6g}"
    )
    first = best_rank_r_error(W - Q, 2)
    slack = 4 * math.sqrt(24) * factorisation_error(W - Q) + (1536 + 8) * U32 * plain
    assert abs(errors[1] - first) <= slack, (
        f"errors[1] is the error after the first iteration: Q̂₁ = NF4(W), then s·B A = the rank-2 SVD of W − Q̂₁, "
        f"so ‖W − (Q̂₁ + s·B A)‖ = {first:.6g}; got {errors[1]:.6g}"
    )
    assert errors[-1] < 0.99 * errors[0], (
        f"LoftQ must start closer to W than plain QLoRA: ‖W − (Q̂ + s·B A)‖ = {errors[-1]:.6g} vs ‖W − Q̂(W)‖ = "
        f"{errors[0]:.6g}"
    )


@pytest.mark.exercise("5.4")
def test_loftq_base_is_nf4_and_reproduces_the_last_error(lora, lora_variants, quant):
    """Afterwards the base is an NF4Linear: its dequantized weight + s·B A is the best fit and gives the last error."""
    layer, weight = loftq_layer(lora, seed=31)
    errors = lora_variants.loftq_init(layer, num_iters=2)
    check_errors(errors, 2)
    base = layer.base_layer
    assert isinstance(base, quant.NF4Linear), f"the base must become an NF4Linear, got {type(base).__name__}"
    assert getattr(base, "double_quant", None) is False, (
        "the NF4 base keeps the absmax it measured (double_quant=False), so its weight is exactly the last Q̂"
    )
    quantized = base.dequantize_weight(torch.float32)
    error = check_fit(layer, weight, quantized, "after loftq_init(num_iters=2)")
    W, Q = weight.double(), quantized.double()
    A, B = f64(layer.lora_A, layer.lora_B)
    # their fp32 ‖W − (Q̂ + s·B A)‖: r + 4 roundings per element of |W| + |Q̂| + s|B||A|, then 1,536 in the norm
    slack = (2 + 4) * U32 * torch.linalg.matrix_norm(W.abs() + Q.abs() + 4 * B.abs() @ A.abs()).item()
    slack += (1536 + 2) * U32 * error
    assert abs(errors[-1] - error) <= slack, (
        f"errors[-1] = {errors[-1]:.6g} must be the error of what the layer now holds, ‖W − (Q̂ + s·B A)‖ = {error:.6g}: "
        "keep the codes of the last quantization in the base (nf4_linear_from_codes) and the last SVD in A and B"
    )
    assert layer.init_method == "loftq", "set layer.init_method = 'loftq' (use_rslora and the files check it)"


@pytest.mark.exercise("5.4")
def test_loftq_one_iteration_is_nf4_of_w_plus_an_svd(lora, lora_variants, quant):
    """num_iters=1: the base holds exactly NF4(W) and s·B A is the best rank-r fit of W − Q̂ (here s = 4)."""
    layer, weight = loftq_layer(lora, seed=32)
    errors = lora_variants.loftq_init(layer, num_iters=1)
    check_errors(errors, 1)
    expected = plain_nf4(quant, weight)
    got = layer.base_layer.dequantize_weight(torch.float32)
    assert torch.equal(got, expected), (
        "with B = A = 0 the first quantization is NF4(W) itself: the base's dequantized weight must equal "
        "dequantize_nf4(quantize_nf4(W)) bit for bit (block_size 64, no double quantization)"
    )
    check_fit(layer, weight, got, "after loftq_init(num_iters=1)")


# ---- Exercise 5.5: LoRA-FA -----------------------------------------------------------------------


@pytest.mark.exercise("5.5")
def test_freeze_lora_a_trains_only_b(lora, lora_variants, tiny_model):
    """freeze_lora_A: every lora_A frozen, every lora_B trainable, nothing else trainable."""
    lora.get_lora_model(tiny_model, r=2)
    assert lora_variants.freeze_lora_A(tiny_model) is tiny_model, "freeze_lora_A returns the model"
    trainable = sorted(name for name, p in tiny_model.named_parameters() if p.requires_grad)
    expected = sorted(f"{path}.lora_B" for path in lora_paths(lora, tiny_model))
    assert trainable == expected, (
        f"LoRA-FA trains B only: expected the 14 lora_B tensors, got {len(trainable)} trainable, e.g. "
        f"{[n for n in trainable if not n.endswith('lora_B')][:3] or trainable[:3]}"
    )


@pytest.mark.exercise("5.5")
def test_lora_fa_step_changes_only_b(lora, lora_variants, tiny_model, token_ids):
    """A training step after freeze_lora_A changes every B and nothing else: A and the base stay bit-identical."""
    lora.get_lora_model(tiny_model, r=2, lora_alpha=4)
    randomize_lora(tiny_model, std=0.2)
    lora_variants.freeze_lora_A(tiny_model)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    logits = tiny_model.train()(token_ids)
    nn.functional.cross_entropy(logits.flatten(0, 1), token_ids.roll(-1, 1).flatten()).backward()
    optimizer.step()
    for name, p in tiny_model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == name.endswith("lora_B"), (
            f"{name} {'changed' if changed else 'did not change'} in a LoRA-FA step: only every lora_B may (and "
            "must) change; lora_A stays at its random init (requires_grad False)"
        )
        if name.endswith("lora_A"):
            assert p.grad is None, f"{name} is frozen: no gradient may be computed for it (that is the memory saved)"


# ---- Exercise 5.6: VeRA --------------------------------------------------------------------------


def uniform_draws_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same generator, same order: equal up to how the bound √3·√2/√fan_in was rounded (4 ulps of it)."""
    bound = 4 * U32 * expected.abs().max().item()
    assert_close(actual, expected, what, bound=bound,
                 hint="the check: one CPU torch.Generator seeded with projection_prng_key; vera_A (r, in) first, then "
                      "vera_B (out, r); each U(−b, b) with b = √3·√2/√fan_in, fan_in = its second dimension")  # fmt: skip


def vera_draw_bound(golden: dict[str, torch.Tensor]) -> torch.Tensor:
    """|Δh| when vera_A and vera_B each differ by ``uniform_draws_close``'s bound: h = λ_b ⊙ B(λ_d ⊙ A x).

    δA, δB per element; Δh = λ_b ⊙ (ΔB (λ_d ⊙ A x) + B (λ_d ⊙ ΔA x) + ΔB (λ_d ⊙ ΔA x)), each term bounded with
    absolute values (float64; (6, 10) like the golden output).
    """
    A, B, x = golden["vera.A"].double(), golden["vera.B"].double(), golden["x"].double()
    lam_d, lam_b = golden["vera.lambda_d"].double().abs(), golden["vera.lambda_b"].double().abs()
    dA, dB = 4 * U32 * A.abs().max().item(), 4 * U32 * B.abs().max().item()
    inner = lam_d * (x @ A.T).abs()  # (6, r): |λ_d ⊙ A x|
    moved = lam_d * dA * x.abs().sum(dim=1, keepdim=True)  # (6, r): |λ_d ⊙ ΔA x| at most
    return lam_b * (dB * (inner + moved).sum(dim=1, keepdim=True) + moved @ B.abs().T)


@pytest.mark.exercise("5.6")
def test_vera_projections_are_peft_draws(lora_variants):
    """vera_projections(r, in, out, key) draws PEFT's pair: deterministic in projection_prng_key, key 0 and 3 as PEFT."""
    golden = peft_golden()
    A, B = lora_variants.vera_projections(16, 12, 10, projection_prng_key=0)
    expect_tensor(A, (16, 12), "vera_A of vera_projections(16, 12, 10)", "the check: vera_A is (r, in_features)")
    expect_tensor(B, (10, 16), "vera_B of vera_projections(16, 12, 10)", "the check: vera_B is (out_features, r)")
    uniform_draws_close(A, golden["vera.A"], "vera_A for key 0 (PEFT's draw)")
    uniform_draws_close(B, golden["vera.B"], "vera_B for key 0 (PEFT's draw)")
    A3, B3 = lora_variants.vera_projections(5, 12, 10, projection_prng_key=3)
    uniform_draws_close(A3, golden["vera.key3.A"], "vera_A for key 3, r = 5 (PEFT's draw)")
    uniform_draws_close(B3, golden["vera.key3.B"], "vera_B for key 3, r = 5 (PEFT's draw)")
    torch.manual_seed(12345)  # the global generator must not matter
    again = lora_variants.vera_projections(16, 12, 10, projection_prng_key=0)
    assert torch.equal(again[0], A) and torch.equal(again[1], B), (
        "the same projection_prng_key must give the same matrices (seed a private torch.Generator with it)"
    )


@pytest.mark.exercise("5.6")
def test_get_vera_model_shares_one_pair(lora_variants, tiny_model):
    """All VeRA layers hold the SAME two tensors (sized for the largest layer); r + out trainable numbers each."""
    assert lora_variants.get_vera_model(tiny_model, r=8) is tiny_model, "get_vera_model returns the model it changed"
    layers = dict(lora_variants.vera_layers(tiny_model))
    assert len(layers) == 14, f"the 7 default projections × 2 layers become VeRALayers, got {sorted(layers)}"
    first = next(iter(layers.values()))
    expect_tensor(
        first.vera_A, (8, 32), "the shared vera_A", "the check: (r, largest in_features); d_ff = 32 feeds down_proj"
    )
    expect_tensor(
        first.vera_B, (32, 8), "the shared vera_B", "the check: (largest out_features, r); gate/up_proj give 32"
    )
    for path, layer in layers.items():
        assert layer.vera_A is first.vera_A and layer.vera_B is first.vera_B, (
            f"{path} holds its own copy of the projections: VeRA shares ONE frozen pair among all layers (one "
            "VeRAProjections module, passed to every VeRALayer)"
        )
        expect_tensor(layer.lambda_d, (8,), f"{path}.lambda_d", "the check: λ_d is (r,)")
        expect_tensor(layer.lambda_b, (layer.out_features,), f"{path}.lambda_b", "the check: λ_b is (out_features,)")
        assert torch.all(layer.lambda_d == 0.1) and torch.all(layer.lambda_b == 0), (
            f"{path}: λ_d starts at d_initial (0.1) and λ_b at 0, so a fresh layer reproduces its base"
        )
    trainable = {name.rsplit(".", 1)[-1] for name, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"lambda_d", "lambda_b"}, f"only lambda_d and lambda_b train in VeRA, got {sorted(trainable)}"
    count = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    expected = sum(8 + layer.out_features for layer in layers.values())
    assert count == expected, f"VeRA trains r + out numbers per layer: {expected} in all, got {count}"


@pytest.mark.exercise("5.6")
def test_fresh_vera_model_keeps_the_output(lora_variants, tiny_model64, token_ids):
    """Right after get_vera_model (λ_b = 0) the logits are the base model's."""
    before = tiny_model64(token_ids).detach()
    lora_variants.get_vera_model(tiny_model64, r=4, d_initial=0.5)
    assert_network_close(tiny_model64(token_ids), before, "logits right after get_vera_model",
                         "the check: a fresh VeRA model computes its base's logits (λ_b = 0, so λ_b ⊙ B(λ_d ⊙ A x) = 0)")  # fmt: skip


@pytest.mark.exercise("5.6")
def test_vera_forward_matches_the_formula(lora_variants, biased_model):
    """h = W0 x + b + λ_b ⊙ (B_s (λ_d ⊙ (A_s x))) with A_s = vera_A[:, :in], B_s = vera_B[:out], per layer."""
    model = biased_model.double()
    targets = ["gate_proj", "up_proj", "down_proj"]  # 24 → 70, 24 → 70, 70 → 24: the slices differ
    lora_variants.get_vera_model(model, r=4, target_modules=targets)
    for i, (path, layer) in enumerate(lora_variants.vera_layers(model)):
        set_values(layer, lambda_d=randn(4, seed=50 + i), lambda_b=randn(layer.out_features, seed=60 + i))
        x = randn(5, layer.in_features, seed=70 + i)
        W, b, A, B, d, lb = f64(layer.base_layer.weight, layer.base_layer.bias, layer.vera_A, layer.vera_B,
                                layer.lambda_d, layer.lambda_b)  # fmt: skip
        expected = vera_expected(x, W, b, A[:, : layer.in_features], B[: layer.out_features], d, lb)
        assert_network_close(layer(x), expected, f"output of the VeRA layer {path}",
                             "the check: h = base(x) + λ_b ⊙ B_s(λ_d ⊙ A_s x) with the slices A_s = vera_A[:, :in], B_s = vera_B[:out]")  # fmt: skip


# ---- Exercise 5.7: AdaLoRA -----------------------------------------------------------------------


@pytest.mark.exercise("5.7")
def test_adalora_layer_init(lora_variants, tiny_model64, token_ids):
    """Q (r, in) and P (out, r) ~ N(0, 0.02²), Λ (r, 1) = 0, ranknum = r, scaling = lora_alpha; the output is unchanged."""
    before = tiny_model64(token_ids).detach()
    lora_variants.get_adalora_model(tiny_model64, init_r=6, lora_alpha=8)
    layers = dict(lora_variants.adalora_layers(tiny_model64))
    assert len(layers) == 14, f"the 7 default projections × 2 layers become AdaLoRALayers, got {sorted(layers)}"
    layer = layers["layers.0.mlp.up_proj"]
    expect_tensor(layer.lora_A, (6, 16), "lora_A (Q)", "the check: Q is (r, in_features)")
    expect_tensor(layer.lora_E, (6, 1), "lora_E (Λ)", "the check: Λ is (r, 1), PEFT's shape")
    expect_tensor(layer.lora_B, (32, 6), "lora_B (P)", "the check: P is (out_features, r)")
    assert torch.count_nonzero(layer.lora_E) == 0, "Λ starts at 0, so a fresh layer reproduces its base"
    ranknum = torch.as_tensor(layer.ranknum).detach().double().flatten()
    assert ranknum.tolist() == [6.0], f"ranknum is a (1,) buffer holding init_r = 6, got {ranknum.tolist()}"
    assert layer.scaling == 8, f"scaling = lora_alpha (AdaLoRA divides by ranknum in the forward), got {layer.scaling}"
    values = torch.cat(
        [lay.lora_A.detach().flatten() for lay in layers.values()]
        + [lay.lora_B.detach().flatten() for lay in layers.values()]
    )
    std = values.std().item()
    # 10,000+ draws of N(0, 0.02²): their sample std is 0.02 within 1 %; 15 % leaves no room for another scale
    assert 0.017 < std < 0.023 and abs(values.mean().item()) < 0.002, (
        f"Q and P start as N(0, 0.02²) (PEFT's init), got mean {values.mean().item():.4f}, std {std:.4f}"
    )
    trainable = {name.rsplit(".", 1)[-1] for name, p in tiny_model64.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_E", "lora_B"}, f"only Q, Λ and P train in AdaLoRA, got {sorted(trainable)}"
    assert_network_close(
        tiny_model64(token_ids),
        before,
        "logits right after get_adalora_model",
        "the check: a fresh AdaLoRA model computes its base's logits (Λ = 0)",
    )


@pytest.mark.exercise("5.7")
def test_adalora_forward_matches_the_formula(lora_variants):
    """h = W0 x + b + (x (Q ⊙ Λ)ᵀ Pᵀ) · lora_alpha / (ranknum + 1e-5), float64."""
    model = adalora_pair(lora_variants)
    layer = dict(lora_variants.adalora_layers(model))["0"]
    set_values(layer, lora_A=randn(6, 12, seed=61, std=0.3), lora_B=randn(10, 6, seed=62, std=0.3))
    x = randn(5, 12, seed=63)
    out = layer(x)
    W, b, A, E, B = f64(layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_E, layer.lora_B)
    expected = adalora_expected(x, W, b, A, E, B, 8, 6)
    bound = NETWORK_RTOL * (expected.abs().max().item() + 1)
    cause = diagnose(out, {
        "scaled by lora_alpha / r without PEFT's + 1e-5 in the denominator": x @ W.T + b + (x @ (A * E).T @ B.T) * 8 / 6,
        "Λ is not applied (Q ⊙ Λ)": x @ W.T + b + (x @ A.T @ B.T) * 8 / (6 + 1e-5),
        "the update is not divided by ranknum": x @ W.T + b + (x @ (A * E).T @ B.T) * 8,
    }, bound)  # fmt: skip
    assert_close(out, expected, "AdaLoRA layer output", bound=bound, cause=cause,
                 hint="the check: h = base(x) + x (Q ⊙ Λ)ᵀ Pᵀ · lora_alpha / (ranknum + 1e-5)")  # fmt: skip


@pytest.mark.exercise("5.7")
def test_orthogonal_regularization_is_peft_s(lora_variants):
    """R = mean over every Q and P of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (PEFT's unsquared form), a scalar with a graph."""
    model = adalora_pair(lora_variants)
    layers = [lay for _, lay in lora_variants.adalora_layers(model)]
    for i, layer in enumerate(layers):
        set_values(layer, lora_A=randn(6, layer.in_features, seed=64 + i, std=0.4),
                   lora_B=randn(layer.out_features, 6, seed=66 + i, std=0.4))  # fmt: skip
    got = lora_variants.orthogonal_regularization(model)
    assert isinstance(got, torch.Tensor) and got.dim() == 0, f"a scalar tensor, got {got!r}"
    assert got.requires_grad, "the regulariser must keep its graph to every P and Q (it is added to the gradients)"
    expected = orth_reg_expected([f64(lay.lora_A, lay.lora_B) for lay in layers])
    grams = [
        M
        for lay in layers
        for M in (lay.lora_A.detach() @ lay.lora_A.detach().T, lay.lora_B.detach().T @ lay.lora_B.detach())
    ]
    squared = torch.stack([torch.linalg.matrix_norm(G - torch.eye(6, dtype=torch.float64)) ** 2 for G in grams])
    causes = {
        "squared norms (the paper's form); PEFT uses the plain Frobenius norm": squared.mean(),
        "a sum over the matrices instead of their mean": expected * 4,
    }
    bound = NETWORK_RTOL * (expected.abs().item() + 1)
    assert_close(got.reshape(()), expected, "orthogonal_regularization", bound=bound, cause=diagnose(got, causes, bound),
                 hint="the check: R = 1/(2L)·Σ (‖Q Qᵀ − I_r‖_F + ‖Pᵀ P − I_r‖_F), the r × r Gram matrices")  # fmt: skip


@pytest.mark.exercise("5.7")
def test_budget_schedule_is_peft_s_cubic(lora_variants):
    """The budget over 20 steps (tinit 3, tfinal 4, deltaT 2, 12 → 4 values): PEFT's values and masking steps."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=20, target_r=2, tinit=3, tfinal=4, deltaT=2)
    golden = peft_golden()
    got = [allocator.budget_schedule(step) for step in range(20)]
    budgets, masks = [b for b, _ in got], [bool(m) for _, m in got]
    expected = [cubic_budget(step, 12, 4, 20, 3, 4, 2) for step in range(20)]
    assert budgets == golden["adalora.budget"].tolist() == [b for b, _ in expected], (
        f"budget_schedule(step) for steps 0–19 must be PEFT's {golden['adalora.budget'].tolist()}, got {budgets}: b0 "
        "until tinit, then int((b0 − bT)·(1 − (step − tinit)/(T − tfinal − tinit))³ + bT), then bT after T − tfinal"
    )
    assert masks == golden["adalora.mask_ind"].tolist(), (
        f"whether to mask at each step must be PEFT's {golden['adalora.mask_ind'].tolist()}, got {masks}: never in "
        "the warm-up, every deltaT steps (step % deltaT == 0) in the cubic phase, always in the final phase"
    )
    assert all(isinstance(b, int) and not isinstance(b, bool) for b in budgets), "budgets are ints (a count of values)"


@pytest.mark.exercise("5.7")
def test_allocator_keeps_exactly_the_budget(lora_variants):
    """mask_to_budget keeps EXACTLY budget singular values over all layers: the highest-scoring triplets."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=20, target_r=2, tinit=3, tfinal=4, deltaT=2)
    adalora_step_grads(model, randn(8, 12, seed=67))
    allocator.update_importance()
    scores = allocator.triplet_scores()
    flat = torch.cat([scores[path].detach().double().flatten() for path in ("0", "2")])
    for budget in (9, 5):
        pattern = allocator.mask_to_budget(budget)
        kept = sum(int(torch.as_tensor(pattern[path]).sum()) for path in ("0", "2"))
        assert kept == budget, (
            f"mask_to_budget({budget}) must keep exactly {budget} entries (rank pattern True), kept {kept}"
        )
        nonzero = sum(int(torch.count_nonzero(lay.lora_E)) for _, lay in lora_variants.adalora_layers(model))
        assert nonzero == budget, (
            f"after mask_to_budget({budget}) exactly {budget} singular values Λ_i may stay non-zero over both layers, "
            f"found {nonzero}: zero Λ_i for all but the budget highest-scoring triplets (one ranking over all layers)"
        )
        got = torch.cat([torch.as_tensor(pattern[path]).flatten() for path in ("0", "2")])
        expected = torch.zeros(12, dtype=torch.bool)
        expected[flat.topk(budget).indices] = True
        assert torch.equal(got.bool(), expected), (
            f"budget {budget}: keep the triplets with the HIGHEST scores {flat.tolist()}; kept {got.int().tolist()}, "
            f"expected {expected.int().tolist()}"
        )


@pytest.mark.exercise("5.7")
def test_importance_is_the_product_of_two_emas(lora_variants):
    """Ī ← β1·Ī + (1 − β1)|w·g|, Ū ← β2·Ū + (1 − β2)|I − Ī|; triplet score = s(Λ_i) + mean s(Q_i·) + mean s(P_·i)."""
    model = adalora_pair(lora_variants)
    allocator = lora_variants.RankAllocator(model, total_step=20, target_r=2, beta1=0.8, beta2=0.6)
    layers = dict(lora_variants.adalora_layers(model))
    ipt = {
        (p, n): torch.zeros_like(getattr(lay, n), dtype=torch.float64)
        for p, lay in layers.items()
        for n in ("lora_A", "lora_E", "lora_B")
    }
    unc = {key: value.clone() for key, value in ipt.items()}
    for update in range(2):
        for i, ((path, name), avg) in enumerate(ipt.items()):
            param = getattr(layers[path], name)
            param.grad = randn(*param.shape, seed=80 + 10 * update + i)
            importance = (param.detach().double() * param.grad).abs()
            ipt[(path, name)] = 0.8 * avg + 0.2 * importance
            unc[(path, name)] = 0.6 * unc[(path, name)] + 0.4 * (importance - ipt[(path, name)]).abs()
        allocator.update_importance()
    scores = allocator.triplet_scores()
    for path in layers:
        score = {name: ipt[(path, name)] * unc[(path, name)] for name in ("lora_A", "lora_E", "lora_B")}
        expected = score["lora_E"].flatten() + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
        got = scores.get(path)
        bound = NETWORK_RTOL * expected.abs().max().item()
        assert_close(got, expected, f"triplet scores of layer {path!r} after two updates", bound=bound,
                     hint="the check: Ī (β1), Ū (β2, from the UPDATED Ī), score = Ī·Ū per entry; a triplet's score "
                          "is Λ_i's plus the MEANS over Q's row i and P's column i")  # fmt: skip


@pytest.mark.exercise("5.7")
def test_rank_allocator_works_through_an_optimizer(lora_variants):
    """attach(optimizer): the regulariser's gradient joins each step; after each step the budget is applied."""
    model = adalora_pair(lora_variants, init_r=4)
    allocator = lora_variants.RankAllocator(model, total_step=6, target_r=2, tinit=1, tfinal=2, deltaT=1,
                                            orth_reg_weight=0.3)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    assert allocator.attach(optimizer) is allocator, "attach returns the allocator (so that detach() can be called)"
    x = randn(8, 12, seed=68)
    layers = dict(lora_variants.adalora_layers(model))
    for step in range(6):
        before = {(p, n): getattr(lay, n).detach().clone() for p, lay in layers.items() for n in ("lora_A", "lora_B")}
        adalora_step_grads(model, x)
        grads = {key: getattr(layers[key[0]], key[1]).grad.clone() for key in before}
        leaves = {key: value.clone().requires_grad_(True) for key, value in before.items()}
        penalty = 0.3 * orth_reg_expected([(leaves[(p, "lora_A")], leaves[(p, "lora_B")]) for p in layers])
        extra = dict(zip(leaves, torch.autograd.grad(penalty, list(leaves.values()))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            for key, value in before.items():
                expected = value - 0.1 * (grads[key] + extra[key])
                assert_network_close(getattr(layers[key[0]], key[1]), expected, f"{key[0]}.{key[1]} after one SGD step",
                                     "the check: one SGD step on the loss's gradient plus orth_reg_weight × the "
                                     "regulariser's (added to P's and Q's gradients before the step)")  # fmt: skip
        budget, masked = cubic_budget(step, 8, 4, 6, 1, 2, 1)
        assert allocator.budget == budget, (
            f"after optimizer step {step} the allocator's budget must be {budget} (update_and_allocate(step) after each "
            f"step, steps counted from 0), got {allocator.budget}"
        )
        if masked:
            pattern = allocator.rank_pattern
            kept = sum(int(torch.as_tensor(v).sum()) for v in pattern.values()) if pattern else None
            assert kept == budget, f"after step {step} the rank pattern must keep {budget} values, it keeps {kept}"
            nonzero = sum(int(torch.count_nonzero(lay.lora_E)) for lay in layers.values())
            assert nonzero <= budget, f"after step {step} at most {budget} Λ_i may be non-zero, found {nonzero}"


# ---- Exercise 5.8: Delta-LoRA --------------------------------------------------------------------


def delta_model(lora, model: nn.Module) -> nn.Module:
    lora.get_lora_model(model, r=2, lora_alpha=4)  # s = 2
    randomize_lora(model, std=0.2)
    return model


def lm_step(model: nn.Module, token_ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    logits = model(token_ids)
    nn.functional.cross_entropy(logits.flatten(0, 1), token_ids.roll(-1, 1).flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def products(lora, model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        path: layer.lora_B.detach().double() @ layer.lora_A.detach().double() for path, layer in lora.lora_layers(model)
    }


def base_weights(lora, model: nn.Module) -> dict[str, torch.Tensor]:
    return {path: layer.base_layer.weight.detach().clone() for path, layer in lora.lora_layers(model)}


def check_delta(lora, model, w0, first, last, ratio, scaling, what) -> None:
    for path, layer in lora.lora_layers(model):
        expected = w0[path].double() + ratio * scaling * (last[path] - first[path])
        assert_network_close(layer.base_layer.weight, expected, f"{path}: W0 {what}",
                             "the check: after each optimizer step W0 grew by update_ratio · s · (B'A' − B A) "
                             "(s = lora_alpha / r; B A from BEFORE the step)")  # fmt: skip


@pytest.mark.exercise("5.8")
def test_delta_lora_moves_w0_by_the_change_of_the_product(lora, lora_variants, tiny_model64, token_ids):
    """After a step W0 changed by exactly λ·s·(B'A' − BA) (float64), and A, B trained as in plain LoRA."""
    model = delta_model(lora, tiny_model64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    delta = lora_variants.DeltaLoRA(model, update_ratio=0.5)
    assert delta.attach(optimizer) is delta, "attach returns the DeltaLoRA object (so that detach() can be called)"
    w0, first = base_weights(lora, model), products(lora, model)
    lm_step(model, token_ids, optimizer)
    check_delta(lora, model, w0, first, products(lora, model), 0.5, 2.0, "after one step")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n), (
        "W0 stays frozen (requires_grad False): it moves by the rule, never by a gradient"
    )


@pytest.mark.exercise("5.8")
def test_delta_lora_with_zero_ratio_is_plain_lora(lora, lora_variants, tiny_model64, token_ids):
    """update_ratio = 0: W0 stays bit-identical over two steps."""
    model = delta_model(lora, tiny_model64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    lora_variants.DeltaLoRA(model, update_ratio=0.0).attach(optimizer)
    w0 = base_weights(lora, model)
    for _ in range(2):
        lm_step(model, token_ids, optimizer)
    for path, weight in base_weights(lora, model).items():
        assert torch.equal(weight, w0[path]), (
            f"{path}: with update_ratio = 0 Delta-LoRA is plain LoRA: W0 must not change"
        )


@pytest.mark.exercise("5.8")
def test_delta_lora_in_the_stage4_trainer(lora, lora_variants, trainer, tiny_model, task_data, tmp_path):
    """attach(trainer.optimizer) runs inside the unchanged Stage 4 trainer: after 3 steps W0 = W0 + λ·s·(B₃A₃ − 0)."""
    t = make_trainer(trainer, tiny_model.double(), task_data, quantize="none", lora_alpha=4, max_steps=3,
                     learning_rate=1e-2, warmup_ratio=0.0, output_dir=str(tmp_path))  # fmt: skip
    w0, first = base_weights(lora, t.model), products(lora, t.model)
    lora_variants.DeltaLoRA(t.model, update_ratio=0.5).attach(t.optimizer)
    t.train()
    assert t.step == 3, f"the trainer must run its 3 steps, ran {t.step}"
    check_delta(
        lora, t.model, w0, first, products(lora, t.model), 0.5, 2.0, "after 3 trainer steps (the changes add up)"
    )
    frozen = {id(p) for path, layer in lora.lora_layers(t.model) for p in layer.base_layer.parameters()}
    in_optimizer = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert not frozen & in_optimizer, "W0 must not be in the optimizer: Delta-LoRA moves it without a gradient"


# ---- Exercise 5.9: LoRA-drop ---------------------------------------------------------------------


def expected_importance(lora, model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{path: (mean over tokens of ‖s·B A x‖², its float32 rounding bound)}, from inputs caught by our own hooks."""
    inputs: dict[str, list[torch.Tensor]] = {path: [] for path, _ in lora.lora_layers(model)}
    handles = [
        layer.register_forward_pre_hook(lambda module, args, path=path: inputs[path].append(args[0].detach().clone()))
        for path, layer in lora.lora_layers(model)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model.eval()(batch)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for path, layer in lora.lora_layers(model):
        x = torch.cat([t.reshape(-1, layer.in_features) for t in inputs[path]]).double()  # (tokens, in)
        A, B = f64(layer.lora_A, layer.lora_B)
        s = layer.scaling
        value = (s * (x @ A.T) @ B.T).square().sum(dim=1).mean().item()
        top = (s * (x.abs() @ A.abs().T) @ B.abs().T).square().sum(dim=1).mean().item()
        # y = s·B A x in fp32: in + r + 2 roundings of s|B||A||x|, doubled by the square; then out + tokens more
        bound = U32 * (2 * (layer.in_features + layer.r + 2) * top + (layer.out_features + x.shape[0] + 2) * value)
        result[path] = (value, bound)
    return result


@pytest.mark.exercise("5.9")
def test_output_importance_is_the_mean_squared_update(lora, lora_variants, tiny_model64, token_ids):
    """lora_output_importance = mean over all tokens of ‖s·B A x‖² per layer, measured on the batches given."""
    lora.get_lora_model(tiny_model64, r=2, lora_alpha=4)
    randomize_lora(tiny_model64, std=0.2)
    batches = [token_ids[:1], token_ids[1:, :7]]  # 10 + 7 tokens: a mean over tokens, not over batches
    expected = expected_importance(lora, tiny_model64, batches)
    got = lora_variants.lora_output_importance(tiny_model64, batches)
    assert isinstance(got, dict) and sorted(got) == sorted(expected), (
        f"one importance per LoRA layer, keyed by module path: expected {sorted(expected)[:3]}…, got "
        f"{sorted(got)[:3] if isinstance(got, dict) else got!r}"
    )
    for path, (value, bound) in expected.items():
        assert abs(float(got[path]) - value) <= bound, (
            f"{path}: importance {float(got[path]):.6g}, expected mean over the 17 tokens of ‖s·B A x‖² = {value:.6g} "
            "(the squared norm of the LoRA output alone, with s = lora_alpha / r, averaged over tokens)"
        )


@pytest.mark.exercise("5.9")
def test_lora_drop_keeps_the_top_share_and_shares_the_rest(lora, lora_variants, tiny_model):
    """Layers kept from the most important down until keep_share is reached; the rest share one adapter per shape."""
    lora.get_lora_model(tiny_model, r=2)
    paths = lora_paths(lora, tiny_model)
    values = [30, 20, 12, 9, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.3, 0.2]  # shares 0.30, 0.20, 0.12, … of 100
    order = torch.randperm(14, generator=generator(90)).tolist()
    importance = {paths[i]: float(v) for i, v in zip(order, values)}
    layers = dict(lora.lora_layers(tiny_model))
    originals = {path: (layer.lora_A, layer.lora_B) for path, layer in layers.items()}
    kept = lora_variants.lora_drop(tiny_model, importance, keep_share=0.55)
    ranked = sorted(paths, key=lambda p: -importance[p])
    assert kept == ranked[:3], (
        f"keep_share 0.55 with shares 0.30, 0.20, 0.12, …: keep the 3 most important (0.30 + 0.20 < 0.55 ≤ 0.62), "
        f"most important first: expected {ranked[:3]}, got {kept}"
    )
    for path in ranked[:3]:
        assert (layers[path].lora_A, layers[path].lora_B) == originals[path], f"kept layer {path} keeps its own A and B"
    groups: dict[tuple[int, int], list[str]] = {}
    for path in ranked[3:]:
        groups.setdefault((layers[path].in_features, layers[path].out_features), []).append(path)
    for shape, members in groups.items():
        leader = members[0]  # the group's most important layer
        for path in members:
            assert layers[path].lora_A is originals[leader][0] and layers[path].lora_B is originals[leader][1], (
                f"{path} ({shape[0]} → {shape[1]}) must use the same lora_A / lora_B Parameter objects as {leader}, "
                "the most important dropped layer of that shape (it keeps its learned update)"
            )
    trainable = sum(
        p.numel() for p in tiny_model.parameters() if p.requires_grad
    )  # parameters() lists shared ones once
    expected = sum(2 * (layers[p].in_features + layers[p].out_features) for p in ranked[:3])
    expected += sum(2 * (shape[0] + shape[1]) for shape in groups)
    assert trainable == expected, f"trainable numbers after lora_drop: {expected} (shared ones once), got {trainable}"


# ---- Exercise 5.10: adapters in PEFT's format ------------------------------------------------------


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    import json

    from safetensors.torch import load_file

    return json.loads((path / "adapter_config.json").read_text()), load_file(path / "adapter_model.safetensors")


@pytest.mark.exercise("5.10")
def test_rslora_adapter_round_trip(lora, lora_variants, tiny_model64, token_ids, tmp_path):
    """An rsLoRA adapter is saved with use_rslora: true and loads into a fresh base with the same logits."""
    fresh = copy_of(tiny_model64)
    lora.get_lora_model(tiny_model64, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    lora_variants.use_rslora(tiny_model64)
    randomize_lora(tiny_model64, std=0.2)
    expected = tiny_model64(token_ids).detach()
    assert lora_variants.save_variant_adapter(tiny_model64, tmp_path) == tmp_path, (
        "save_variant_adapter returns the folder"
    )
    config, tensors = read_adapter(tmp_path)
    assert config.get("use_rslora") is True and config.get("use_dora") is False, (
        f'an rsLoRA adapter has "use_rslora": true, "use_dora": false in adapter_config.json, got '
        f"use_rslora={config.get('use_rslora')!r}, use_dora={config.get('use_dora')!r}"
    )
    assert config.get("r") == 4 and config.get("lora_alpha") == 8, "r and lora_alpha stay as they are (PEFT rescales)"
    loaded = lora_variants.load_variant_adapter(fresh, tmp_path)
    assert_network_close(loaded(token_ids), expected, "logits of the base + the loaded rsLoRA adapter",
                         "the check: the loaded model's logits equal the saved one's (use_rslora in the config: the scale is lora_alpha / √r)")  # fmt: skip


@pytest.mark.exercise("5.10")
def test_dora_adapter_round_trip(lora, lora_variants, tiny_model64, token_ids, tmp_path):
    """A DoRA adapter: use_dora true, each magnitude under PEFT's lora_magnitude_vector key; it loads back exactly."""
    fresh = copy_of(tiny_model64)
    lora_variants.get_dora_model(tiny_model64, r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"])
    randomize_lora(tiny_model64, std=0.2)
    for i, (_, layer) in enumerate(lora.lora_layers(tiny_model64)):
        set_values(layer, magnitude=layer.magnitude.detach() * (1 + 0.3 * randn(layer.out_features, seed=91 + i)))
    expected = tiny_model64(token_ids).detach()
    lora_variants.save_variant_adapter(tiny_model64, tmp_path)
    config, tensors = read_adapter(tmp_path)
    assert config.get("use_dora") is True and config.get("use_rslora") is False, (
        f'a DoRA adapter has "use_dora": true in adapter_config.json, got {config.get("use_dora")!r}'
    )
    key = "base_model.model.layers.1.mlp.up_proj.lora_magnitude_vector"
    assert key in tensors, (
        f"PEFT stores DoRA's magnitude as base_model.model.<path>.lora_magnitude_vector (no .weight); missing {key}, "
        f"found e.g. {[k for k in tensors if 'magnitude' in k][:2]}"
    )
    expect_tensor(tensors[key], (32,), key, "the check: one magnitude per output feature of up_proj")
    assert len(tensors) == 2 * 2 * 3, f"2 layers × 2 targets × (A, B, magnitude) = 12 tensors, got {len(tensors)}"
    loaded = lora_variants.load_variant_adapter(fresh, tmp_path)
    kinds = {type(layer).__name__ for _, layer in lora.lora_layers(loaded)}
    assert kinds == {"DoRALayer"}, f"loading a DoRA adapter into a plain base adds DoRA layers, got {kinds}"
    assert_network_close(loaded(token_ids), expected, "logits of the base + the loaded DoRA adapter",
                         "the check: the loaded DoRA model's logits equal the saved one's (A, B and every magnitude from the file)")  # fmt: skip


def pissa_trained(lora, lora_variants, model, method: str, rslora: bool = False):
    """PiSSA/OLoRA on three targets (r=2, lora_alpha=4), then "trained" A, B in float64; returns (A0, B0) per layer."""
    lora.get_lora_model(model, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    if rslora:
        lora_variants.use_rslora(model)
    init = {"pissa": lora_variants.pissa_init, "olora": lora_variants.olora_init}[method]
    start = {}
    for path, layer in list(lora.lora_layers(model)):
        init(layer)
        start[path] = f64(layer.lora_A, layer.lora_B)
    model.double()
    gen = generator(92)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 * p.abs().mean())
    return start


def check_converted(lora, loaded, original, start, model, token_ids, trained_logits, scaling):
    """The loaded adapter is W0 + s·(B A − B0 A0) on the ORIGINAL W0; the trained model is that too, up to its fp32 residual."""
    weights = {}
    for path, layer in lora.lora_layers(model):
        A, B = f64(layer.lora_A, layer.lora_B)
        A0, B0 = start[path]
        weights[path] = original.get_submodule(path).weight.detach().double() + scaling * (B @ A - B0 @ A0)
    exact = network_with_weights(original, weights)
    reference64 = exact(token_ids).detach()
    assert_network_close(loaded(token_ids), reference64, "logits of the ORIGINAL base + the converted adapter",
                         "the check: on the ORIGINAL base the file computes W0 + s·(B A − B0 A0) (A' = [A ; A0], "
                         "B' = [B | −B0], r' = 2r, lora_alpha' = 2·lora_alpha, √2·lora_alpha with rsLoRA)")  # fmt: skip
    # the trained model holds W0 − s·B0A0 rounded once to fp32 (the init runs in fp32): allow what fp32 weights
    # and arithmetic cost this network (tolerances.fp32_network_bound)
    bound = fp32_network_bound(copy_of(exact).float()(token_ids), reference64)
    assert_close(trained_logits, reference64, "logits of the trained PiSSA/OLoRA model", bound=bound,
                 hint="the check: the trained model computes W0 + s·(B A − B0 A0) (its base holds W0 − s·B0 A0)")  # fmt: skip


@pytest.mark.exercise("5.10")
def test_pissa_adapter_converted_for_the_original_base(lora, lora_variants, tiny_model, token_ids, tmp_path):
    """A trained PiSSA adapter is saved as rank 2r, lora_alpha doubled; on the ORIGINAL base it gives the trained logits."""
    original = copy_of(tiny_model)
    start = pissa_trained(lora, lora_variants, tiny_model, "pissa")
    trained_logits = tiny_model(token_ids).detach()
    lora_variants.save_variant_adapter(tiny_model, tmp_path)
    config, tensors = read_adapter(tmp_path)
    assert (config.get("r"), config.get("lora_alpha")) == (4, 8), (
        f"a converted PiSSA adapter has r' = 2r = 4 and lora_alpha' = 2·lora_alpha = 8 (so the scale stays 2), got "
        f"r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}"
    )
    expect_tensor(tensors.get("base_model.model.layers.0.self_attn.q_proj.lora_A.weight"), (4, 16),
                  "the converted lora_A of q_proj", "the check: A' = cat(A, A0) along the rank is (2r, in)")  # fmt: skip
    loaded = lora_variants.load_variant_adapter(copy_of(original).double(), tmp_path)
    check_converted(lora, loaded, original, start, tiny_model, token_ids, trained_logits, 2.0)


# ---- PEFT's own files: PiSSA, OLoRA, LoftQ saved by default (W0 recomputed on load); VeRA; AdaLoRA -----


def write_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter folder in PEFT's layout (adapter_config.json + adapter_model.safetensors), as PEFT would."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return path


def peft_lora_config(r: int, lora_alpha: float, targets: list[str], **fields) -> dict:
    """The adapter_config.json fields PEFT 0.21.2's save_pretrained writes for LoRA and that a loader reads."""
    return {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, **fields}  # fmt: skip


class OneProj(nn.Module):
    """A model with one linear layer ``proj`` (in → out, with a bias): the files then name base_model.model.proj."""

    def __init__(self, weight: torch.Tensor, seed: int = 7) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.proj = nn.Linear(in_features, out_features, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(randn(out_features, seed=seed, std=0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def olora_matrix(seed: int = 24) -> torch.Tensor:
    """A (10, 12) fp32 matrix Q0 R0 whose first 4 columns are well conditioned (OLoRA's first r QR terms are stable)."""
    gen = generator(seed)
    Q0, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    R0 = torch.triu(torch.randn(10, 12, generator=gen, dtype=torch.float64) * 0.3)
    R0[range(10), range(10)] = 2 + torch.rand(10, generator=gen, dtype=torch.float64)
    return (Q0 @ R0).float()


def exact_w0_part(weight: torch.Tensor, method: str, s: float = 2.0, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B0 A0, its allowed fp32 deviation) of PiSSA (the top-r SVD part) or OLoRA (s × the first r QR terms).

    The bounds are the 5.3 tests': the factorisation's backward error through the conditioning of the
    part (pissa_product_bound, olora_product_bound), plus the roundings of forming it.
    """
    W = weight.double()
    if method == "pissa":
        top, S = top_r_part(weight, r)
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        root = (S[:r] / s).sqrt()
        factors = SimpleNamespace(lora_A=root[:, None] * Vh[:r], lora_B=U[:, :r] * root, scaling=s)
        return top, pissa_product_bound(weight, r, factors)
    Q, R = torch.linalg.qr(W)
    product = s * Q[:, :r] @ R[:r]
    return product, olora_product_bound(weight, r, product)


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_peft_default_pissa_olora_file_recomputes_the_residual(lora, lora_variants, tmp_path, method):
    """PEFT's default PiSSA/OLoRA file (init_lora_weights kept, A and B trained against W0 − s·B0A0): the residual is recomputed on load."""
    weight = matrix_with_spectrum(10, 12, SPECTRUM, seed=23) if method == "pissa" else olora_matrix()
    A, B = randn(4, 12, seed=150, std=0.3, dtype=torch.float32), randn(10, 4, seed=151, std=0.3, dtype=torch.float32)
    config = peft_lora_config(4, 8, ["proj"], init_lora_weights=method)  # s = 2
    folder = write_adapter(tmp_path, config, {"base_model.model.proj.lora_A.weight": A,
                                              "base_model.model.proj.lora_B.weight": B})  # fmt: skip
    model = OneProj(weight)
    bias = model.proj.bias.detach().double()
    loaded = lora_variants.load_variant_adapter(model, folder)
    layer = loaded.proj
    assert isinstance(layer, lora.LoRALayer), f"the file adds a LoRA layer at proj, got {type(layer).__name__}"
    assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B), (
        f"after the {method} init (which sets A0, B0) the file's A and B replace them, as PEFT loads the state dict "
        "after running the init"
    )
    part, bound = exact_w0_part(weight, method)
    W = weight.double()
    expected = W - part
    bound = bound + 7 * U32 * (W.abs() + part.abs())
    residual = layer.base_layer.weight.detach().double()
    assert_close(residual, expected, f"the base weight after loading a {method} file", bound=bound,
                 cause=diagnose(residual, {f"init_lora_weights={method!r} was ignored: the base kept the ORIGINAL W0, "
                                           "but the file's A and B were trained against W0 − s·B0A0 (PEFT recomputes "
                                           "that residual on load)": W}, bound),
                 hint=f"the check: the base holds W0 − s·B0A0 of a {method}_init of W0, as PEFT recomputes on load")  # fmt: skip
    x = randn(7, 12, seed=152, dtype=torch.float32)
    x64, s = x.double(), 2.0
    magnitude = x64.abs() @ (expected.abs() + s * B.double().abs() @ A.double().abs()).T + bias.abs()
    out_bound = (12 + 4 + 4) * U32 * magnitude + x64.abs() @ bound.T
    assert_close(layer(x), x64 @ (expected + s * B.double() @ A.double()).T + bias, f"{method} layer output after loading",
                 bound=out_bound, hint="the check: the loaded layer computes (W0 − s·B0A0) x + s·B A x + b, as PEFT's loaded model")  # fmt: skip


@pytest.mark.exercise("5.10")
@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_adapter_round_trip_in_peft_format(lora_variants, tiny_model64, token_ids, tmp_path, save_projection):
    """VeRA in PEFT's format: peft_type VERA, λ_d and λ_b per layer, the shared pair once if save_projection; it loads back."""
    fresh = copy_of(tiny_model64)
    lora_variants.get_vera_model(tiny_model64, r=8, target_modules=["q_proj", "up_proj"], projection_prng_key=3)
    for i, (_, layer) in enumerate(lora_variants.vera_layers(tiny_model64)):
        set_values(layer, lambda_d=randn(8, seed=160 + i), lambda_b=randn(layer.out_features, seed=170 + i, std=0.5))
    expected = tiny_model64(token_ids).detach()
    lora_variants.save_variant_adapter(tiny_model64, tmp_path, save_projection=save_projection)
    config, tensors = read_adapter(tmp_path)
    want = {"peft_type": "VERA", "r": 8, "projection_prng_key": 3, "save_projection": save_projection,
            "target_modules": ["q_proj", "up_proj"]}  # fmt: skip
    for key, value in want.items():
        assert config.get(key) == value, (
            f"adapter_config.json: {key} should be {value!r} (PEFT's VeraConfig), got {config.get(key)!r}"
        )
    prefix = "base_model.model.layers.1.mlp.up_proj"
    expect_tensor(
        tensors.get(f"{prefix}.vera_lambda_d"),
        (8,),
        f"{prefix}.vera_lambda_d",
        "the check: PEFT's key (no .weight) holds λ_d, (r,)",
    )
    expect_tensor(
        tensors.get(f"{prefix}.vera_lambda_b"), (32,), f"{prefix}.vera_lambda_b", "the check: λ_b is (out_features,)"
    )
    if save_projection:
        expect_tensor(tensors.get("base_model.vera_A"), (8, 16), "base_model.vera_A",
                      "the check: the shared pair once, at the model level: vera_A (r, max in_features)")  # fmt: skip
        expect_tensor(
            tensors.get("base_model.vera_B"), (32, 8), "base_model.vera_B", "the check: vera_B is (max out_features, r)"
        )
    count = 2 * 2 * 2 + (2 if save_projection else 0)
    assert len(tensors) == count, (
        f"2 layers × 2 targets × (λ_d, λ_b){' + the shared pair' if save_projection else ''} = {count} tensors, got "
        f"{len(tensors)}: {sorted(tensors)[:4]}…"
    )
    loaded = lora_variants.load_variant_adapter(fresh, tmp_path)
    assert_network_close(loaded(token_ids), expected, "logits of the base + the loaded VeRA adapter",
                         "the check: the loaded VeRA model's logits equal the saved one's (r, projection_prng_key, "
                         "λ_d, λ_b and, if saved, the pair)")  # fmt: skip


def masked_adalora_model(lora_variants, model: nn.Module) -> tuple[nn.Module, object, dict[str, torch.Tensor]]:
    """AdaLoRA (init_r 4, lora_alpha 8) on q_proj and down_proj, random P, Λ, Q, and a rank pattern applied as the
    allocator would: (model, allocator, pattern)."""
    lora_variants.get_adalora_model(model, init_r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    allocator = lora_variants.RankAllocator(model, total_step=10, target_r=2)
    pattern = {}
    for i, (path, layer) in enumerate(lora_variants.adalora_layers(model)):
        keep = torch.tensor([[True, False, True, True], [False, True, False, True]][i % 2])
        set_values(layer, lora_A=randn(4, layer.in_features, seed=180 + i, std=0.3),
                   lora_B=randn(layer.out_features, 4, seed=190 + i, std=0.3),
                   lora_E=randn(4, 1, seed=200 + i) * keep[:, None])  # fmt: skip
        pattern[path] = keep
    allocator.rank_pattern = pattern
    return model, allocator, pattern


@pytest.mark.exercise("5.10")
def test_adalora_adapter_round_trip_with_rank_pattern(lora_variants, tiny_model64, token_ids, tmp_path):
    """AdaLoRA in PEFT's format: rank_pattern in the config, each layer cut to its kept triplets; it loads back."""
    fresh = copy_of(tiny_model64)
    model, allocator, pattern = masked_adalora_model(lora_variants, tiny_model64)
    expected = model(token_ids).detach()
    lora_variants.save_variant_adapter(model, tmp_path, allocator=allocator)
    config, tensors = read_adapter(tmp_path)
    want = {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10}
    for key, value in want.items():
        assert config.get(key) == value, (
            f"adapter_config.json: {key} should be {value!r} (PEFT's AdaLoraConfig), got {config.get(key)!r}"
        )
    path = "layers.0.self_attn.q_proj"
    assert (config.get("rank_pattern") or {}).get(f"{path}.lora_E") == pattern[path].tolist(), (
        f"rank_pattern records the allocator's mask per layer under '<path>.lora_E' as init_r bools: "
        f"{pattern[path].tolist()}, got {(config.get('rank_pattern') or {}).get(f'{path}.lora_E')!r}"
    )
    prefix = f"base_model.model.{path}"
    for name, shape in (("lora_A", (3, 16)), ("lora_E", (3, 1)), ("lora_B", (16, 3))):
        expect_tensor(tensors.get(f"{prefix}.{name}"), shape, f"{prefix}.{name}",
                      "the check: PEFT's keys (no .weight), each layer cut to its k = 3 unmasked triplets")  # fmt: skip
    assert not any("ranknum" in key for key in tensors), "ranknum is not saved (PEFT rebuilds it as init_r)"
    loaded = lora_variants.load_variant_adapter(fresh, tmp_path)
    for path, layer in lora_variants.adalora_layers(loaded):
        assert bool((layer.lora_E[~pattern[path]] == 0).all()), (
            f"{path}: the masked triplets {(~pattern[path]).nonzero().flatten().tolist()} must load as Λ_i = 0, the "
            "kept ones at their own positions"
        )
    assert_network_close(loaded(token_ids), expected, "logits of the base + the loaded AdaLoRA adapter",
                         "the check: the loaded AdaLoRA model's logits equal the saved one's (each kept triplet at its own position, ranknum = init_r)")  # fmt: skip
