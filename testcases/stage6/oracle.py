"""One step of bitsandbytes' 8-bit AdamW, exactly: the value every conforming float32 evaluation lies
near, how near (a proven bound), and which codes it may store.

Why not bitsandbytes' own bits. bitsandbytes' step is not the same on every CPU: from the same inputs,
an Intel Sapphire Rapids and an AMD EPYC (both torch's AVX512 path) disagree in the last bit of 225 of
the 4,097 parameters of one golden case after ONE step, and in about 1,000 after 100 steps
(``testcases/fixtures/cpu-records/``). Torch's DEFAULT (scalar) path rounds differently again. What is
the same everywhere is the computation. Given what the optimizer held before a step (the codes and
absmax, or the fp32 moments), the parameter, the gradient, the step number t and the
hyper-parameters, ``expected_step`` evaluates it in float64:

    m0 = code1[state1] · absmax1        v0 = code2[state2] · absmax2      (fp32 states: m0, v0 themselves)
    m1 = β1·m0 + (1 − β1)·g             v1 = β2·v0 + (1 − β2)·g²
    c1 = 1 − β1^t                       c2 = √(1 − β2^t)                   (Python floats)
    8-bit:  q = (lr / c1) · m1 / (√v1 / c2 + ε)
    fp32:   q = (lr·c2 / c1) · m1 / (√v1 + ε·c2)                          (bitsandbytes' 32-bit path)
    p1 = P − q,  P = p·(1 − lr·λ)                                         (P = p when λ = 0)

Each input is a float32 number, so the float64 value is the exact one up to 2^-53 per operation, which
is 2^29 times smaller than what the bound allows. The bound is the worst case of ANY float32 evaluation
of these formulas: any order of the two terms of a moment, ``lerp_``, ``addcmul_`` or ``g * g``, a fused
multiply-add or two roundings, ``x · (1/a)`` or ``x / a``, the decay as ``p·(1 − lrλ)`` or ``p − lrλ·p``.
Only the formula is the answer, not the order of its operations.

Derivation (u = 2^-24, the unit roundoff of float32). Every float32 operation, and the rounding of a
Python float to float32 where it meets a tensor, has a relative error of at most u (IEEE 754); a fused
multiply-add rounds once instead of twice. A chain of k roundings multiplies by at most
γ_k = k·u / (1 − k·u) < (k + 1)·u, so each count below is rounded up by one.

    dequantize  m0^ = m0·(1 + δ)                                       |Δm0| ≤ u·|m0|
    m1^         β1'·m0^: coefficient, dequantization, product (3); (1 − β1)'·g: coefficient, product (2);
                the sum (1): a chain of at most 4                      |Δm1| ≤ 5u·M1,  M1 = β1|m0| + (1 − β1)|g|
                (M1 is m1 with every term made positive: what cancels in m1 still carried rounding)
    v1^         the same with one more product (g·g), all terms ≥ 0   |Δv1| ≤ 6u·v1
    D^          √ halves v1^'s relative error (3u), ÷ c2 and c2's own rounding (2u), ε's rounding and the
                sum (2u); every term is positive                       |ΔD| ≤ 8u·D
    q^          the coefficient, the product and the quotient (3u), D^ (8u) on |m1| ≤ M1, plus Δm1
                                                                       |Δq| ≤ 17u·coef·M1 / D
    p1^         P: the factor's rounding and the product (2u); the last sum (u)
                                                                       |Δp1| ≤ 4u·|P| + 2u·|q| + 17u·coef·M1/D

A few smallest normal numbers are added to every bound, so that an exact zero stays comparable.

Codes. The 8-bit state stores m1^ and v1^ through bitsandbytes' quantizer (Stage 6.1): a = max |x| per
block of 256, s = x · (1/a), bin k = ⌊(s + 1)·0.5·65535 + 0.5⌋, code = lut[k]. The test reads the
student's absmax (itself checked against max |m1| within the largest Δm1 of the block), so for every
element s lies in [(m1 − Δm1)/a, (m1 + Δm1)/a] widened by the reciprocal's and the product's rounding
(3u·|s|); the bin's own arithmetic moves (s + 1)·32767.5 + 0.5 by at most 3·65536·u < 0.02 of a bin. The
table is monotone (a sorted code), so the allowed codes of an element are lut[k_lo] … lut[k_hi]. Almost
always that is ONE code: Δm1 is a few units of roundoff, a bin is 2/65535 wide. Where the exact moment
lies within the bound of a bin boundary, either neighbour is right. A block whose absmax is 0 stores code
0 everywhere (bitsandbytes' convention, not the code of 0.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from testcases.tolerances import UNIT_ROUNDOFF, Reference, assert_close, expect_tensor

U = UNIT_ROUNDOFF[torch.float32]
TINY = 4 * torch.finfo(torch.float32).tiny  # keeps an exact zero comparable
LUT_SIZE = 65536
BIN_SLACK = 0.02  # ≥ 3·65536·u: the bin arithmetic's own rounding, in bins
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round a float64 tensor to float32 and back: one float32 operation's rounding."""
    return t.to(torch.float32).to(torch.float64)


def lut_reference(code: torch.Tensor) -> torch.Tensor:
    """The lookup table, independently: bin k's centre k·2/65535 − 1 (float32), then the nearest level, ties low.

    Distances are exact in float64 (a float32 level and a float32 centre differ by a float64-exact amount).
    """
    k = torch.arange(LUT_SIZE, dtype=torch.float64)
    centres = f32(f32(k * 2 / (LUT_SIZE - 1)) - 1)
    levels = code.double().cpu()
    hi = torch.searchsorted(levels, centres).clamp(max=levels.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    take_hi = (levels[hi] - centres).abs() < (centres - levels[lo]).abs()
    return torch.where(take_hi, hi, lo).to(torch.uint8)


@dataclass
class Moment:
    """A moment after the step: its exact value, the bound of any conforming evaluation, its code table."""

    exact: torch.Tensor  # float64, flattened
    error: torch.Tensor  # float64, flattened: the largest |computed − exact|
    lut: torch.Tensor  # uint8 (65536,): the table of the code it is stored with (8-bit)


@dataclass
class ExpectedStep:
    """What a conforming step must store: the parameter, and either fp32 moments or codes and absmax."""

    eight_bit: bool
    shape: tuple[int, ...]
    param: Reference
    moments: dict[str, Moment]  # "state1" (m), "state2" (v)
    block_size: int
    causes: dict[str, torch.Tensor] = field(default_factory=dict)  # wrong parameters that name a mistake


def dequantized(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, block_size: int) -> torch.Tensor:
    """code[q] · absmax of the element's block, exactly (float64; flattened)."""
    n = codes.numel()
    scale = absmax.detach().double().cpu().repeat_interleave(block_size)[:n]
    return levels[codes.detach().cpu().reshape(-1).long()] * scale


def expected_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    *,
    eight_bit: bool,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    books: dict[str, torch.Tensor],
    block_size: int = 256,
) -> ExpectedStep:
    """The exact step from ``state`` (what the optimizer held BEFORE step ``step``; {} = fresh, all zeros).

    ``eight_bit``: the parameter has codes (numel ≥ min_8bit_size) or fp32 moments. ``books``: the float32
    codes {"signed": (256,), "unsigned": (256,)} m and v are stored with (8-bit only).
    """
    shape = tuple(p.shape)
    x = p.detach().double().cpu().reshape(-1)
    grad = g.detach().double().cpu().reshape(-1)
    signed, unsigned = books["signed"].double().cpu(), books["unsigned"].double().cpu()
    if not state:
        m0 = v0 = torch.zeros_like(x)
    elif eight_bit:
        m0 = dequantized(state["state1"], state["absmax1"], signed, block_size)
        v0 = dequantized(state["state2"], state["absmax2"], unsigned, block_size)
    else:
        m0 = state["state1"].detach().double().cpu().reshape(-1)
        v0 = state["state2"].detach().double().cpu().reshape(-1)
    beta1, beta2 = betas
    m1 = beta1 * m0 + (1 - beta1) * grad  # (n,)
    big_m1 = beta1 * m0.abs() + (1 - beta1) * grad.abs()  # what can cancel in m1
    v1 = beta2 * v0 + (1 - beta2) * grad * grad  # (n,), ≥ 0
    c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
    if eight_bit:
        coef, denom = lr / c1, v1.sqrt() / c2 + eps
    else:
        coef, denom = lr * c2 / c1, v1.sqrt() + eps * c2
    q = coef * m1 / denom
    big_p = x * (1 - lr * weight_decay) if weight_decay > 0 else x
    value = big_p - q
    bound = 4 * U * big_p.abs() + 2 * U * q.abs() + 17 * U * coef * big_m1 / denom + TINY
    moments = {
        "state1": Moment(m1, 5 * U * big_m1 + TINY, lut_reference(books["signed"])),
        "state2": Moment(v1, 6 * U * v1 + TINY, lut_reference(books["unsigned"])),
    }
    causes = {
        "the bias corrections are missing (c1 = c2 = 1): divide the step by c1 = 1 − β1^t and √v by "
        "c2 = √(1 − β2^t)": big_p - lr * m1 / (v1.sqrt() + eps),
        "the weight decay comes after the Adam step; decay p first (p ← p·(1 − lr·λ)), then add the step": (x - q)
        * (1 - lr * weight_decay),
        "ε is added before the bias correction, (√v + ε)/c2; bitsandbytes' 8-bit step adds it after, √v/c2 + ε": big_p
        - (lr / c1) * m1 / ((v1.sqrt() + eps) / c2),
    }
    if eight_bit:  # the other path's formula
        causes["the 32-bit formula (ε·c2 beside √v) is used for a tensor of at least min_8bit_size elements"] = (
            big_p - (lr * c2 / c1) * m1 / (v1.sqrt() + eps * c2)
        )
    else:
        causes["the 8-bit formula (√v/c2 + ε) is used for a tensor under min_8bit_size; bitsandbytes' 32-bit step "
               "puts ε·c2 beside √v"] = big_p - (lr / c1) * m1 / (v1.sqrt() / c2 + eps)  # fmt: skip
    causes = {k: v.view(shape) for k, v in causes.items()}
    return ExpectedStep(eight_bit, shape, Reference(value.view(shape), bound.view(shape)), moments, block_size, causes)


def code_range(moment: Moment, absmax: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) code index a conforming quantizer may store for each element, given the block absmax."""
    n = moment.exact.numel()
    a = absmax.detach().double().cpu().repeat_interleave(block_size)[:n]
    safe = torch.where(a > 0, a, torch.ones_like(a))
    s_lo, s_hi = (moment.exact - moment.error) / safe, (moment.exact + moment.error) / safe
    s_lo = (s_lo - 3 * U * s_lo.abs()).clamp(-1, 1)
    s_hi = (s_hi + 3 * U * s_hi.abs()).clamp(-1, 1)
    half = (LUT_SIZE - 1) / 2
    k_lo = ((s_lo + 1) * half + 0.5 - BIN_SLACK).floor().long().clamp(0, LUT_SIZE - 1)
    k_hi = ((s_hi + 1) * half + 0.5 + BIN_SLACK).floor().long().clamp(0, LUT_SIZE - 1)
    lo, hi = moment.lut[k_lo].long(), moment.lut[k_hi].long()
    zero = a == 0  # an all-zero block: every code is 0
    return torch.where(zero, 0, torch.minimum(lo, hi)), torch.where(zero, 0, torch.maximum(lo, hi))


def check_step(what: str, p: torch.Tensor, state: dict, expected: ExpectedStep, hint: str) -> None:
    """The parameter and the state after a step: shapes and dtypes, then values within the bound, then codes."""
    __tracebackhide__ = True
    expect_tensor(p.detach(), expected.shape, f"{what}: the parameter", dtype=torch.float32)
    n, bs = math.prod(expected.shape), expected.block_size
    keys = STATE_KEYS if expected.eight_bit else STATE_KEYS[:2]
    for key in keys:
        assert key in state, f"{what}: the state must hold {key!r} (bitsandbytes' names), it has {sorted(state)}"
        if key.startswith("absmax"):
            expect_tensor(state[key], (-(-n // bs),), f"{what}: state[{key!r}], one per block of {bs}", hint,
                          dtype=torch.float32)  # fmt: skip
        else:
            dtype = torch.uint8 if expected.eight_bit else torch.float32
            expect_tensor(state[key], expected.shape, f"{what}: state[{key!r}]", hint, dtype=dtype)
    from testcases.helpers import diagnose

    cause = diagnose(p.detach(), expected.causes, expected.param.bound)
    assert_close(p.detach(), expected.param.value, f"{what}: the parameter after the step",
                 bound=expected.param.bound, hint=hint, cause=cause)  # fmt: skip
    for key, moment in expected.moments.items():
        if not expected.eight_bit:
            assert_close(state[key].detach().reshape(-1), moment.exact, f"{what}: state[{key!r}] (fp32 moment)",
                         bound=moment.error, hint=hint)  # fmt: skip
            continue
        absmax_key = "absmax" + key[-1]
        blocks = torch.nn.functional.pad(moment.exact.abs(), (0, -n % bs)).view(-1, bs)
        slack = torch.nn.functional.pad(moment.error, (0, -n % bs)).view(-1, bs).amax(dim=1)
        assert_close(state[absmax_key], blocks.amax(dim=1), f"{what}: state[{absmax_key!r}], max |moment| per block",
                     bound=slack, hint=hint)  # fmt: skip
        lo, hi = code_range(moment, state[absmax_key], bs)
        codes = state[key].detach().cpu().reshape(-1).long()
        bad = ((codes < lo) | (codes > hi)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            want = f"{int(lo[i])}" if lo[i] == hi[i] else f"{int(lo[i])} or {int(hi[i])}"
            raise AssertionError(
                f"{what}: {bad.numel()} of {n} codes in state[{key!r}] are not what the moment after the step "
                f"quantizes to; first at flat index {i}: the moment is {moment.exact[i].item():.6g}, its code "
                f"{want}, got {int(codes[i])}\nHint: {hint}"
            )
