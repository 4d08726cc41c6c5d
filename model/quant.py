"""Quantization from scratch (Stage 3): uniform, absmax, NF4, double quantization, NF4Linear.

Every scheme here works on *blocks* of the flattened tensor:

    x (any shape) ──flatten──► [ b0 | b1 | ... | b_last (may be partial) ]
                               each block gets its own constant(s)

    uniform (3.1)   q = round(x / scale) + zero_point          x̂ = (q − zero_point) · scale
    absmax  (3.2)   q = round(x / scale), scale = absmax / qmax  x̂ = q · scale
    NF4     (3.4)   q = nearest(x · (1 / absmax), NF4 code)   x̂ = code[q] · absmax
    DQ      (3.5)   the fp32 absmax values are themselves quantized to 8 bits (blocks of 256)

NF4 (QLoRA paper, §3) puts its 16 levels at quantiles of N(0, 1), so each level is used
about equally often by normally distributed weights: 7 negative levels, an exact zero and 8
positive levels (asymmetric: 16 values cannot be symmetric around an exact zero).

Storage per parameter: 4 bits of code + 32 bits of absmax per 64 weights = 4.5 bits; with
double quantization 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.

Numerics follow bitsandbytes exactly (the tests hold the code to golden vectors it produced):
fp32 absmax per block, scale by multiplying with the fp32 reciprocal ``1 / absmax``, nearest
code with a tie going to the lower code, the even element in the high nibble of each byte.

Read in this order: blocks (given), 3.1 uniform, 3.2 absmax, 3.3 code books, 3.4 NF4,
3.5 double quantization, 3.6 NF4Linear and its 4-bit matmul, 3.7 fake quantization.

Papers: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023
(https://arxiv.org/abs/2305.14314); Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", 2022 (https://arxiv.org/abs/2110.02861), for the dynamic 8-bit code.
"""

# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

# bitsandbytes' NF4 table (functional.py), the published values the code book must reproduce.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_OFFSET = 0.9677083  # the outermost quantile: (1 - 1/(2·15) + 1 - 1/(2·16)) / 2, QLoRA appendix


# ---- Given: blocks over the flattened tensor --------------------------------------------------


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError if ``x`` holds NaN or ±inf (they would poison a whole block's scale)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf); quantize finite tensors only")


def check_block_size(block_size: int, name: str = "block_size") -> None:
    """Raise a ValueError unless ``block_size`` is an int >= 1."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {block_size!r}")


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten ``x`` and cut it into rows of ``block_size``, zero-padding the last partial block.

    (n,) -> (ceil(n / block_size), block_size). The padding zeros change no block's absmax, min
    or max statistics that matter (zero is always inside the range we quantize).
    """
    flat = x.reshape(-1)
    pad = -flat.numel() % block_size
    if pad == 0:
        return flat.view(-1, block_size)  # (n_blocks, block_size), no copy
    return F.pad(flat, (0, pad)).view(-1, block_size)  # (n_blocks, block_size)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``to_blocks``: drop the padding and restore ``shape``."""
    numel = math.prod(shape)
    return blocks.reshape(-1)[:numel].view(shape)


# ---- Exercise 3.1: uniform (affine) quantization ---------------------------------------------


def quantize_tensor(
    x: torch.Tensor, num_bits: int = 4, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform (asymmetric, affine) quantization with min/max per block.

    Per block, with qmax = 2^num_bits − 1 and the range widened to include 0
    (so that 0 is exactly representable, as PyTorch's observers do):

        lo = min(min(x), 0),  hi = max(max(x), 0)
        scale = (hi − lo) / qmax            (1 for an all-zero block: nothing to divide)
        zero_point = round(−lo / scale)     an integer in [0, qmax]
        q = clamp(round(x / scale) + zero_point, 0, qmax)

    Round-trip error |dequantize(q) − x| ≤ scale / 2 for every element (plus float32 rounding, which
    in a block of subnormal values is absolute: a few 2^-149).

    Args:
        x: a finite float tensor (float32, float64, bfloat16 or float16, read as float32) of any shape
            and memory layout, with values of any magnitude up to ±2^127 (half of float32's largest
            value): there hi − lo can overflow float32, so compute the scale as hi/qmax − lo/qmax
            where (hi − lo)/qmax is infinite. x itself is never modified.
        num_bits: 2 … 8.
        block_size: elements per block of the flattened tensor; None = one block (per tensor).

    Returns:
        x_quant: uint8, same shape as x; scale: float32 (n_blocks,); zero_point: int32 (n_blocks,).
    """
    raise NotImplementedError(
        "Exercise 3.1: min/max per block, scale, zero point, rounding (use check_finite, to_blocks, from_blocks) — see tutorial/03-quantization.md"
    )


def dequantize_tensor(
    x_quant: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, block_size: int | None = None
) -> torch.Tensor:
    """x̂ = (q − zero_point) · scale, block by block; float32 of x_quant's shape (x_quant of any memory layout)."""
    raise NotImplementedError(
        "Exercise 3.1: undo the affine map (use to_blocks, from_blocks) — see tutorial/03-quantization.md"
    )


# ---- Exercise 3.2: absmax (symmetric) quantization -------------------------------------------


def absmax_quantize(
    x: torch.Tensor, num_bits: int = 8, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization to signed integers, one scale per block.

    qmax = 2^(num_bits−1) − 1 (127 for int8, 7 for int4); per block
    scale = absmax / qmax (1 for an all-zero block, and only then: no epsilon, no floor, or a block
    of values near 1e-9 gets a far too coarse step); q = clamp(round(x / scale), −qmax, qmax), so
    each code has its value's sign (or is 0). Round-trip error ≤ scale / 2 (plus float32 rounding,
    absolute near 0). One outlier sets the scale of its whole block, which is why small blocks keep
    the other weights precise.

    x: any float dtype (read as float32), shape and memory layout, never modified; finite values up
    to ±2^127, subnormals included.

    Returns: q int8 of x's shape; scale float32 (n_blocks,).
    """
    raise NotImplementedError(
        "Exercise 3.2: absmax per block, symmetric rounding (use check_finite, to_blocks, from_blocks) — see tutorial/03-quantization.md"
    )


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """x̂ = q · scale, block by block; float32 of q's shape (q of any memory layout)."""
    raise NotImplementedError("Exercise 3.2: multiply back — see tutorial/03-quantization.md")


# ---- Exercise 3.3: the NF4 and FP4 code books ------------------------------------------------


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 levels, float32, ascending, in [−1, 1] (bitsandbytes' ``create_normal_map``).

    8 positive levels are the N(0, 1) quantiles Φ⁻¹(p) at 8 evenly spaced p from
    ``NF4_OFFSET`` down to 0.5 (excluded); 7 negative levels are −Φ⁻¹(p) at 7 evenly spaced p
    from ``NF4_OFFSET`` down to 0.5 (excluded); plus an exact 0. Divide by the largest value so
    the outermost levels are ±1. Φ⁻¹ is ``torch.special.ndtri``. Bit-exact with the published
    table only if the probabilities come from a float32 ``linspace`` and the division by the
    largest level happens in float32, as in bitsandbytes.
    """
    raise NotImplementedError(
        "Exercise 3.3: quantiles of N(0, 1), an exact zero, normalised to [-1, 1] — see tutorial/03-quantization.md"
    )


def fp4_code_book() -> torch.Tensor:
    """The 15 distinct FP4 (E2M1) values, float32, ascending, normalised to [−1, 1].

    E2M1: a sign bit, 2 exponent bits (bias 1), 1 mantissa bit; magnitudes
    0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6 (OCP Microscaling spec), divided by 6.
    Its steps are 1/12 near 0 but 1/3 near ±1, and it spends a code on −0; NF4 uses all 16
    codes and places them at Gaussian quantiles, which is why it wins on normal weights.
    """
    raise NotImplementedError("Exercise 3.3: the E2M1 magnitudes with both signs — see tutorial/03-quantization.md")


# ---- Exercise 3.4: NF4 blockwise quantization ------------------------------------------------


def block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The float32 absolute maximum of each block of the flattened x: (n_blocks,)."""
    raise NotImplementedError(
        "Exercise 3.4: absmax per block (a partial last block has its own) — see tutorial/03-quantization.md"
    )


def nearest_code(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of the ascending ``code`` for each value; a tie goes to the lower.

    Compare with the midpoints between neighbouring levels: the index is the number of
    midpoints strictly below the value (``torch.searchsorted`` on the midpoints, left side).
    values: float32 of any shape (0-d too) and memory layout; code: float32, ascending.
    Returns uint8 of values' shape.
    """
    raise NotImplementedError("Exercise 3.4: midpoints, then count those below — see tutorial/03-quantization.md")


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Given (the worked neighbour of pack_nibbles): two 4-bit codes per byte, even index in the HIGH nibble.

    packed: uint8 (ceil(numel / 2),) -> codes: uint8 (numel,). This is the inverse of
    ``pack_nibbles``: read it to see the layout you must write.
    """
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with ceil({numel} / 2) = {(numel + 1) // 2} bytes, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    codes = torch.empty(packed.numel(), 2, dtype=torch.uint8, device=packed.device)  # (bytes, 2)
    torch.bitwise_right_shift(packed.reshape(-1), 4, out=codes[:, 0])  # even index: the high nibble
    torch.bitwise_and(packed.reshape(-1), 0x0F, out=codes[:, 1])  # odd index: the low nibble
    return codes.view(-1)[:numel]  # (numel,)


def pack_nibbles(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Pack 4-bit codes (values 0…15 in uint8 or any integer dtype; any shape and memory layout,
    a transposed or strided view included) two per byte, in the order of the flattened codes: even
    index in the high nibble.

    An odd count is padded with one ``pad`` code (``quantize_nf4`` pads with 7, the NF4 code of
    0.0, as bitsandbytes does). Returns uint8 (ceil(numel / 2),).
    """
    raise NotImplementedError("Exercise 3.4: high nibble first — see tutorial/03-quantization.md")


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization with a code book: (codes uint8 (numel,), absmax float32 (n_blocks,)).

    Per block: scaled = x · (1 / absmax) in float32 (the reciprocal first, as bitsandbytes does:
    ``x / absmax`` rounds differently and flips codes that sit on a midpoint), clamped to
    [−1, 1]; code index = nearest level, ties to the lower. An all-zero block has absmax 0:
    its reciprocal is taken as 0, so every element maps to the level nearest 0. A block of
    subnormal values whose absmax is below about 2.9e-39 (2^-128) has a reciprocal that overflows
    float32 to inf (0 · inf is NaN): that block alone is scaled by dividing, x / absmax.

    x: any float dtype (read as float32), any shape and memory layout, never modified; values of
    any finite magnitude.
    """
    raise NotImplementedError(
        "Exercise 3.4: absmax, multiply by the reciprocal, nearest code (use block_absmax, nearest_code) — see tutorial/03-quantization.md"
    )


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int
) -> torch.Tensor:
    """x̂ = code[codes] · absmax of each element's block; float32 (numel,)."""
    raise NotImplementedError("Exercise 3.4: look up, then scale — see tutorial/03-quantization.md")


def quantize_nf4(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: (packed uint8 (ceil(numel / 2),), absmax float32 (ceil(numel / block_size),)).

    Byte-identical to ``bitsandbytes.functional.quantize_4bit(x, blocksize=block_size,
    quant_type="nf4")`` for float32, float16 and bfloat16 x, with the semantics of its CUDA
    kernel. Its CPU fallback differs in two corners: it divides (x / absmax) in a partial last
    block, and stores 1e-38 as the absmax of an all-zero partial block (we store 0).
    Example: a (7, 13) weight has 91 elements → 2 blocks of 64 (the second holds 27) → 46 bytes
    and 2 absmax values.

    x: float32, float64, bfloat16 or float16 (read as float32), any shape (0-d and 1-D too) and memory
    layout, never modified; finite values of any magnitude (a block of subnormals: see
    ``quantize_blockwise``). block_size: any int ≥ 1.
    """
    raise NotImplementedError(
        "Exercise 3.4: quantize with the NF4 code book, then pack (use cached_code_book, quantize_blockwise, pack_nibbles) — see tutorial/03-quantization.md"
    )


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: unpack, look up the NF4 level, scale by the block's absmax.

    Returns a tensor of ``shape`` and ``dtype`` (float32, float64, bfloat16 or float16: computed in
    float32, then cast once). ``packed`` may be any view of bytes: non-contiguous (strided), or
    starting at an odd storage offset (misaligned for a 16-bit read). The plain route
    is ``dequantize_blockwise(unpack_nibbles(packed, numel), absmax, code, block_size)``. The
    reference takes a faster one to the same values, bit for bit: it reads the packed bytes two
    at a time as 16-bit words and copies each word's four levels from ``nf4_word_table`` straight
    into the output, so there is no unpacked copy of the codes (lesson 06, section 7).
    """
    raise NotImplementedError(
        "Exercise 3.4: unpack, look up, scale, reshape (use unpack_nibbles, dequantize_blockwise) — see tutorial/03-quantization.md"
    )


# ---- Exercise 3.5: double quantization -------------------------------------------------------


def dynamic_code_book() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (``create_dynamic_map(signed=True)``), 256 levels.

    A tiny float format: for each exponent e = 0…6, 2^e evenly spaced fractions scaled by
    10^(e − 6), both signs; plus 0 and 1. Dense near 0, sparse near ±1 (Dettmers et al., 2022).
    Given: double quantization (3.5) uses it as its code book.
    """
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(data, dtype=torch.float32).sort().values


@functools.cache
def cached_code_book(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Given: ``nf4_code_book()`` or ``dynamic_code_book()`` on ``device``, built once per process.

    Dequantization runs in every forward pass of every NF4 layer; rebuilding a code book each
    time would cost more than the dequantization itself. Do not modify the returned tensor.
    """
    build = {"nf4": nf4_code_book, "dynamic": dynamic_code_book}[name]
    return build().to(device)


@functools.cache
def nf4_word_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """Given: the four NF4 levels of every 16-bit word of packed bytes, float32 (65536, 4), once per device.

    Two packed bytes hold four codes. Row ``int16_word & 0xFFFF`` of the table holds their levels
    in memory order (high nibble of the first byte, low nibble, then the second byte), so one
    ``index_select`` of 16-byte rows decodes four weights. The rows are filled through the same
    ``view(torch.int16)`` that reads the packed data, which makes the table right on either byte
    order. 1 MiB; do not modify it.
    """
    value = torch.arange(65536, device=device)
    byte_pairs = torch.stack([value >> 8, value & 0xFF], dim=1).to(torch.uint8)  # (65536, 2): every two bytes
    nibbles = torch.stack([byte_pairs >> 4, byte_pairs & 0x0F], dim=2).reshape(65536, 4)  # memory order
    rows = byte_pairs.view(torch.int16).reshape(-1).long() & 0xFFFF  # the word each pair reads as
    table = torch.empty(65536, 4, dtype=torch.float32, device=device)
    table[rows] = cached_code_book("nf4", device)[nibbles.long()]
    return table


def double_quantize(absmax: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the fp32 absmax constants themselves (QLoRA §3, "Double Quantization").

    offset = mean(absmax) (the absmax values are all positive: centring them lets the signed
    8-bit code use both halves); then blockwise 8-bit quantization of ``absmax − offset`` with
    the dynamic code, ``block_size`` 256. The codes are the exact nearest levels; bitsandbytes'
    CPU kernel looks them up in a 65,536-entry table, which picks a neighbouring level for about
    one absmax in 300-500 (never a closer one).

    Any number n ≥ 1 of absmax values: several blocks of ``block_size`` (more than 256 NF4 blocks
    means more than one second-level scale), a partial last one, each block with its own scale. absmax:
    float32 of any memory layout, never modified; positive values from subnormals up to any whose
    float32 sum is finite (a block whose scale is subnormal is scaled by division, as in
    ``quantize_blockwise``).

    Returns: codes uint8 (n,), scale float32 (ceil(n / block_size),), offset float32 ().
    """
    raise NotImplementedError(
        "Exercise 3.5: subtract the mean, quantize to 8 bits in blocks (use quantize_blockwise, cached_code_book) — see tutorial/03-quantization.md"
    )


def double_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block_size: int = 256
) -> torch.Tensor:
    """Recover the absmax values: code[codes] · scale + offset; float32 (n,) (codes of any memory layout)."""
    raise NotImplementedError("Exercise 3.5: dequantize, then add the offset back — see tutorial/03-quantization.md")


def bits_per_parameter(block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256) -> float:
    """Analytic storage cost of NF4: 4 + 32 / block_size, or with DQ 4 + 8 / block_size + 32 / (block_size · dq_block_size)."""
    raise NotImplementedError("Exercise 3.5: the paper's arithmetic — see tutorial/03-quantization.md")


# ---- Exercise 3.6: NF4Linear and its 4-bit matmul --------------------------------------------


class MatMul4Bit(torch.autograd.Function):
    """y = x Ŵᵀ + b for a frozen NF4 layer, keeping its 4-bit codes, not Ŵ, for the backward pass.

    Through ``F.linear(x, Ŵ, b)`` autograd would keep Ŵ: it saves what a backward needs, and
    ∂L/∂x = ∂L/∂y · Ŵ needs Ŵ, so every 4-bit layer would hold a full (out, in) copy of its weight
    from the forward pass to the backward pass (c · out · in bytes in a c-byte dtype). This Function
    dequantizes twice instead, as bitsandbytes' ``MatMul4Bit`` does:

        forward:   Ŵ = layer.dequantize_weight(dtype)       (out, in), freed when forward returns
                   y = x Ŵᵀ + b                               (..., in) -> (..., out)
        backward:  Ŵ = layer.dequantize_weight(dtype)       again, from the codes
                   ∂L/∂x = ∂L/∂y · Ŵ                          (..., out) · (out, in) -> (..., in)
                   ∂L/∂b = Σ over the leading dims of ∂L/∂y  (out,), only if the bias trains

    The weight is frozen: no gradient for it, so nothing of x is needed either. What the graph
    keeps is a reference to ``layer`` (its codes and constants, which it holds anyway) and
    ``dtype``. x and bias arrive already in the product's dtype (``matmul_4bit`` casts them), and
    the gradients leave in it; autograd hands each input's gradient back in that input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(
            "Exercise 3.6: dequantize in x's dtype, an ordinary linear; keep the layer and the dtype, never Ŵ — see tutorial/03-quantization.md"
        )

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        raise NotImplementedError(
            "Exercise 3.6: dequantize again; ∂L/∂x = ∂L/∂y · Ŵ, ∂L/∂b if the bias trains, nothing for the layer — see tutorial/03-quantization.md"
        )


def matmul_4bit(x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
    """y = x Ŵᵀ + b through ``MatMul4Bit``, in the dtype ``F.linear`` would compute in.

    That dtype is the layer's ``compute_dtype``, except under autocast on x's device
    (``torch.is_autocast_enabled(x.device.type)``, asked only where ``torch.amp.is_autocast_available``:
    a "meta" tensor has no autocast), which casts every floating-point input of ``F.linear`` but a
    float64 one to its own dtype (``torch.get_autocast_dtype(x.device.type)``).
    x (..., in) of any float dtype and layout -> (..., out) in that dtype; x is never modified.
    """
    raise NotImplementedError(
        "Exercise 3.6: the product's dtype (autocast's or compute_dtype), x and bias cast to it, then MatMul4Bit.apply — see tutorial/03-quantization.md"
    )


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized on the fly.

    ``y = x Ŵᵀ + b`` with Ŵ = dequantize_nf4(...) in ``compute_dtype``, through ``matmul_4bit``
    (Ŵ dequantized in the forward and again in the backward, never kept). Nothing in it is
    trainable: the codes and constants are buffers, the bias is a frozen parameter; gradients
    flow to the input only. This is the base layer that ``LoRALayer`` wraps for QLoRA.

    Buffers: ``packed`` uint8 (ceil(out·in / 2),); without DQ ``absmax`` float32 (n_blocks,);
    with DQ ``absmax_codes`` uint8 (n_blocks,), ``absmax_scale`` float32 (ceil(n_blocks / 256),),
    ``absmax_offset`` float32 ().
    """

    output_is_fresh = True  # forward returns a new tensor its backward does not need (LoRA may add in place)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_block_size(block_size)
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant, self.compute_dtype = block_size, double_quant, compute_dtype
        n_blocks = -(-in_features * out_features // block_size)
        self.register_buffer(
            "packed", torch.zeros((in_features * out_features + 1) // 2, dtype=torch.uint8, device=device)
        )
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // 256), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize an ``nn.Linear`` (its weight in fp32/fp16/bf16); compute_dtype defaults to the weight's dtype."""
        raise NotImplementedError(
            "Exercise 3.6: quantize the weight, (double-)quantize absmax, keep the bias (use quantize_nf4, double_quantize) — see tutorial/03-quantization.md"
        )

    def dequantized_absmax(self) -> torch.Tensor:
        """The per-block absmax, float32 (n_blocks,): double-dequantized first when DQ is on."""
        raise NotImplementedError("Exercise 3.6: absmax, possibly double-dequantized — see tutorial/03-quantization.md")

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight Ŵ, (out_features, in_features), in ``dtype`` (default: compute_dtype).

        Exactly ``dequantize_nf4(packed, absmax, shape, block_size, dtype)`` with this layer's absmax
        (double-dequantized when DQ is on: each of the ceil(n_blocks / 256) scales for its own block).
        """
        raise NotImplementedError(
            "Exercise 3.6: dequantize_nf4 with this layer's constants — see tutorial/03-quantization.md"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): y = x Ŵᵀ + b through the 4-bit matmul (``matmul_4bit``).

        x: any number of leading dimensions (none: a 1-D x of shape (in,) gives (out,)), any float
        dtype (cast to compute_dtype), any memory layout; never modified. Outside autocast the output
        is in compute_dtype, whatever x's dtype; under autocast, in the dtype autocast's rules give
        (the autocast dtype for ``F.linear``). The same values as ``F.linear(x, Ŵ, b)`` in that dtype,
        but autograd keeps no (out, in) copy of Ŵ for the backward pass; ∂L/∂x comes back in x's dtype.
        """
        raise NotImplementedError("Exercise 3.6: the 4-bit matmul (use matmul_4bit) — see tutorial/03-quantization.md")

    def weight_nbytes(self) -> int:
        """Bytes the weight occupies: codes plus quantization constants (not the bias)."""
        raise NotImplementedError("Exercise 3.6: count the buffers' bytes — see tutorial/03-quantization.md")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


# ---- Exercise 3.7: fake quantization for quantization-aware training ------------------------


def fake_quantize(x: torch.Tensor, num_bits: int = 8, block_size: int | None = None) -> torch.Tensor:
    """Quantize and dequantize in the forward pass; pass the gradient straight through.

    forward:  x̂ = dequantize_tensor(quantize_tensor(x, num_bits, block_size))
    backward: ∂x̂/∂x := 1 (the straight-through estimator, Bengio et al. 2013), because
              rounding has zero gradient almost everywhere.
    Written as ``x + (x̂ − x).detach()``: the value is x̂, the graph is the identity.
    Same dtype and shape as x, for x of any float dtype (float32, float64, bfloat16, float16),
    shape and memory layout and any magnitude ``quantize_tensor`` takes: x̂ is cast back to x's
    dtype, and dL/dx equals dL/dy exactly.
    """
    raise NotImplementedError(
        "Exercise 3.7: quantize-dequantize, straight-through gradient (use quantize_tensor, dequantize_tensor) — see tutorial/03-quantization.md"
    )
