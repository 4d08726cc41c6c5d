"""Tolerances keyed by dtype, and a comparison that teaches when it fails.

fp32: rounding of a few dozen fp32 operations (a matmul over k ≤ 512 accumulates ~k·eps).
bf16: 8 bits of mantissa, eps = 2^-8 ≈ 0.0039; a product over small k stays within a few eps.
fp16: 11 bits, eps = 2^-11 ≈ 0.00049.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}"


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    what: str,
    hint: str = "",
    dtype: torch.dtype | None = None,
    check_dtype: bool = True,
) -> None:
    """Shapes, then dtypes, then values (within the tolerance of ``dtype``, default actual's).

    On a mismatch the message names ``what``, the worst element, both values and ``hint``.
    """
    __tracebackhide__ = True  # pytest shows the test's line, not this helper's
    hint = f"\nLikely cause: {hint}" if hint else ""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}{hint}"
    assert actual.shape == expected.shape, (
        f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}{hint}"
    )
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{what}: expected dtype {expected.dtype}, got {actual.dtype}{hint}"
    tol = TOLERANCES[dtype or actual.dtype] if (dtype or actual.dtype).is_floating_point else {"rtol": 0, "atol": 0}
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, **tol, equal_nan=False)
    if bad.any():
        err = (a - e).abs().masked_fill(~bad, -1)
        worst = int(err.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ beyond rtol={tol['rtol']}, atol={tol['atol']}; "
            f"worst at index {index}: expected {e.flatten()[worst].item():.6g}, got {a.flatten()[worst].item():.6g}{hint}"
        )
