"""How close is close enough: tolerances derived from the computation, and a comparison that teaches.

The rule. A correct implementation may add, multiply and reduce in any order, on any CPU, with
any number of threads; only rounding may differ. Each check therefore compares the student's
result with the EXACT value of the formula (evaluated in float64, whose rounding, 2^-53, is
negligible here) and allows, per element, the classic worst-case rounding bound

    |computed - exact| <= steps · u(dtype) · magnitude

where u(dtype) is the unit roundoff of the dtype the computation runs in (half its machine
epsilon: fp32 2^-24, bf16 2^-8, fp16 2^-11, fp64 2^-53), ``magnitude`` is the same formula
evaluated on the absolute values of its inputs (Σ|terms|: what can cancel, can carry rounding),
and ``steps`` is the length of the longest chain of roundings in the formula: a dot product of
length k contributes k (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1: the
error of any summation order is at most γ_k = k·u / (1 − k·u) times Σ|terms|), each elementwise
operation or cast 1, and rounding the inputs to a lower precision 1 per factor. Every test that
uses ``reference`` states its steps in a comment.

This bound is a worst case, so it never fails a correct implementation, yet it is tiny next to
the mistakes the tests exist to catch: a wrong scaling or orientation changes results by tens of
percent, a forgotten term by the term's whole size.

Whole networks (merged vs unmerged models, saved vs loaded adapters) are compared in float64:
both evaluations round at 2^-53 ≈ 1.1e-16 per operation, a logit of the tiny test model is the
end of fewer than 10^4 roundings, and ``NETWORK_RTOL`` = 1e-9 of the logits' scale sits five
orders of magnitude above that and six below the smallest planted mistake (≥ 1e-3).

Where a network must run in float32 (a 4-bit base computes in float32), the test measures, on the
same input, how far a float32 evaluation of the reference network lies from its float64
evaluation, and allows ``FP32_NETWORK_FACTOR`` = 64 times that, plus 64 units of roundoff of the
logits' scale (``fp32_network_bound``): two evaluations of one network in different operation
orders differ by a small multiple of either one's own rounding error.

Bit-exact checks (``torch.equal``) are kept where the contract is exact: integer codes, the
published NF4 table, a frozen weight that must not change, values copied unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
NETWORK_RTOL = 1e-9  # float64 network-level comparisons, relative to max |logit| (see above)


@dataclass
class Reference:
    value: torch.Tensor  # the exact result, float64
    bound: torch.Tensor  # allowed |computed - exact| per element, float64


def reference(
    formula: Callable[..., torch.Tensor],
    *tensors: torch.Tensor,
    dtype: torch.dtype,
    steps: int,
    magnitude: Callable[..., torch.Tensor] | None = None,
) -> Reference:
    """The exact value of ``formula(*tensors)`` and its rounding bound for a computation in ``dtype``.

    ``formula`` must be built from sums, products and matrix products, so that evaluating it on
    |inputs| gives Σ|terms|; a formula with a subtraction passes ``magnitude``, the same formula
    with every − written as + (what cancels still carried rounding). A small floor (``steps``
    smallest normal numbers) keeps an exact zero comparable.
    """
    __tracebackhide__ = True
    exact = [t.detach().double().cpu() for t in tensors]
    try:
        value = formula(*exact)
        magnitude = (magnitude or formula)(*(t.abs() for t in exact))
    except RuntimeError as error:  # a wrong shape gets a sentence, not an error from the test's own line
        shapes = ", ".join(str(tuple(t.shape)) for t in exact)
        raise AssertionError(
            f"the expected value cannot even be computed: the tensors this check reads have shapes {shapes}, which "
            f"do not fit its formula ({str(error).splitlines()[0]}). Check the shapes and orientation (A is "
            "(r, in_features), B is (out_features, r), weights are (out_features, in_features))"
        ) from None
    bound = steps * UNIT_ROUNDOFF[dtype] * magnitude + steps * torch.finfo(dtype).tiny
    return Reference(value, bound)


def shape_of(tensor: object) -> str:
    return tuple(tensor.shape).__repr__() if isinstance(tensor, torch.Tensor) else type(tensor).__name__


def expect_tensor(
    actual: object, shape: tuple[int, ...], what: str, hint: str = "", dtype: torch.dtype | None = None
) -> None:
    """Type, shape, then dtype: checked before any value is computed from ``actual``."""
    __tracebackhide__ = True
    hint = f"\nHint: {hint}" if hint else ""
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor of shape {shape}, got {type(actual).__name__}{hint}")
    if tuple(actual.shape) != tuple(shape):
        raise AssertionError(f"{what}: expected shape {tuple(shape)}, got {tuple(actual.shape)}{hint}")
    if dtype is not None and actual.dtype != dtype:
        raise AssertionError(f"{what}: expected dtype {dtype}, got {actual.dtype}{hint}")


def assert_close(
    actual: object,
    expected: torch.Tensor,
    what: str,
    *,
    bound: torch.Tensor | float,
    hint: str = "",
    cause: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """Shape (and ``dtype`` if given), then every |actual − expected| ≤ bound.

    On a mismatch the message names ``what``, how many elements differ, the worst one (index,
    expected, got, allowed), then ``cause`` ("Likely cause": only what the output itself shows,
    see helpers.diagnose) or else ``hint`` (the rule the check holds the code to), and nothing else.
    """
    __tracebackhide__ = True
    expect_tensor(actual, tuple(expected.shape), what, hint, dtype)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    allowed = torch.as_tensor(bound, dtype=torch.float64).expand_as(e)
    error = (a - e).abs()
    bad = ~(error <= allowed)  # NaN counts as bad
    if bad.any():
        excess = torch.where(
            bad, torch.nan_to_num(error - allowed, nan=float("inf")), torch.tensor(-1.0, dtype=torch.float64)
        )
        worst = int(excess.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        hint = f"\nLikely cause: {cause}" if cause else f"\nHint: {hint}" if hint else ""
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} values are wrong; worst at index {index}: "
            f"expected {e.flatten()[worst].item():.6g}, got {a.flatten()[worst].item():.6g} "
            f"(allowed difference {allowed.flatten()[worst].item():.2g}){hint}"
        )


def assert_network_close(actual: object, expected: torch.Tensor, what: str, hint: str = "") -> None:
    """Two float64 evaluations of the same network agree within NETWORK_RTOL of the output's scale."""
    __tracebackhide__ = True
    scale = expected.detach().abs().max().item() + 1.0
    assert_close(actual, expected, what, bound=NETWORK_RTOL * scale, hint=hint)


FP32_NETWORK_FACTOR = 64


def fp32_network_bound(reference32: torch.Tensor, reference64: torch.Tensor) -> float:
    """Allowed |student − exact| for a float32 network: 64 × the reference's own float32 error here."""
    noise = (reference32.detach().double().cpu() - reference64.detach().double().cpu()).abs().max().item()
    scale = reference64.detach().abs().max().item()
    return FP32_NETWORK_FACTOR * (noise + UNIT_ROUNDOFF[torch.float32] * scale)
