"""Stage 3 advanced tests: every bit width, signs, zero blocks, bad input, bitsandbytes' golden vectors,
double quantization at other block sizes, NF4Linear with biases and several DQ blocks, devices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from testcases.helpers import expect_refusal, generator, observe
from testcases.properties import (
    FLOATS,
    LAYOUTS,
    MAGNITUDES,
    blocks_of,
    cases,
    describe_layout,
    first_bad,
    for_all,
    in_layout,
    shapes,
    short,
    smallest_subnormal,
    tensor_cases,
    unit_roundoff,
)
from testcases.stage3.basic import (
    GRADIENT_HINT,
    U32,
    check_double_quantization,
    half_step_bound,
    nf4_bound,
    per_element,
    run_backward,
    weight_kept,
)
from testcases.tolerances import UNIT_ROUNDOFF, assert_close, expect_tensor, reference

# ---- Exercise 3.1: uniform (affine) quantization ---------------------------------------------


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("num_bits", [2, 3, 4, 5, 6, 7, 8])
def test_uniform_error_bound_for_every_width(quant, num_bits):
    """For 2 to 8 bits: codes in [0, 2^b − 1] and every element within half a step."""
    x = torch.randn(1000) * 2 - 0.7
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=num_bits, block_size=128)
    expect_tensor(scale, (8,), "scale (1000 elements in blocks of 128)")
    assert int(q.max()) <= 2**num_bits - 1, (
        f"{num_bits}-bit codes must stay in [0, {2**num_bits - 1}], got max {int(q.max())}"
    )
    x_hat = quant.dequantize_tensor(q, scale, zero_point, block_size=128)
    assert_close(x_hat, x, f"{num_bits}-bit round trip", bound=half_step_bound(scale, 128, 1000, 2**num_bits - 1),
                 hint="clamp to [0, 2^b − 1] after adding the zero point, and round the zero point itself")  # fmt: skip


@pytest.mark.exercise("3.1")
def test_uniform_range_includes_zero(quant):
    """All-positive data: the range is widened to [0, max], so zero_point = 0 and scale = max / qmax."""
    q, scale, zero_point = quant.quantize_tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), num_bits=2)
    assert zero_point.tolist() == [0] and scale.tolist() == [pytest.approx(4 / 3, rel=1e-6)], (
        f"all-positive data: the range is widened to [0, 4], so scale = 4/3 and zero_point = 0; "
        f"got scale {scale.tolist()}, zero_point {zero_point.tolist()}"
    )
    assert q.tolist() == [1, 2, 2, 3], f"q = round(x / scale) + zero_point = [1, 2, 2, 3], got {q.tolist()}"


@pytest.mark.exercise("3.1")
def test_uniform_all_negative_data(quant):
    """All-negative data: the range is widened to [min, 0], so zero_point = qmax and every value comes back within half a step."""
    x = -(torch.rand(64, generator=generator(4)) + 0.1)  # every value in [-1.1, -0.1]
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=4)
    assert zero_point.tolist() == [15], (
        f"the range widened to [min, 0] gives zero_point = round(-min / scale) = 15; got {zero_point.tolist()}"
    )
    x_hat = quant.dequantize_tensor(q, scale, zero_point)
    assert_close(x_hat, x, "round trip of all-negative data", bound=half_step_bound(scale, 64, 64, 15))


@pytest.mark.exercise("3.1")
def test_uniform_zero_is_exact_and_constant_blocks_work(quant):
    """0 is exactly representable; a constant positive block comes back exactly; all zeros do not divide by zero."""
    x = torch.tensor([0.0, 0.3, 0.9, 0.0, 5.0, 5.0, 5.0, 5.0])  # block 2 is constant and positive
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=4, block_size=4)
    x_hat = quant.dequantize_tensor(q, scale, zero_point, block_size=4)
    assert x_hat[0] == 0 and x_hat[3] == 0, "0 must be exactly representable: widen [min, max] to include 0"
    # max maps to qmax exactly: 15 · (5 / 15) rounds at most twice.
    assert_close(x_hat[4:], x[4:], "a constant block", bound=4 * U32 * 5.0,
                 hint="with the range widened to include 0, max maps to qmax exactly")  # fmt: skip
    zeros = torch.zeros(10)
    q, scale, zero_point = quant.quantize_tensor(zeros, num_bits=8)
    assert torch.equal(quant.dequantize_tensor(q, scale, zero_point), zeros), (
        "an all-zero tensor must not divide by zero"
    )


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("argument, value", [("num_bits", 1), ("num_bits", 9), ("num_bits", 4.0), ("block_size", 0)])
def test_uniform_rejects_bad_arguments(quant, argument, value):
    """num_bits outside 2…8 or not an int, block_size < 1: a ValueError naming the argument."""
    x = torch.randn(8)
    expect_refusal(quant.quantize_tensor, x, **{argument: value}, names=(argument,), tensors={"x": x})


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_uniform_rejects_non_finite_input(quant, bad):
    """A NaN or inf in x raises a ValueError naming x (it would poison its block's scale)."""
    x = torch.randn(8)
    x[2] = bad
    expect_refusal(quant.quantize_tensor, x, names=("x",), tensors={"x": x}, what=f"x[2] is {bad}")


@pytest.mark.exercise("3.1")
def test_uniform_dtypes_of_everything(quant):
    """Whatever x's dtype: codes uint8, scale float32, zero_point int32, dequantized values float32."""
    q, scale, zero_point = quant.quantize_tensor(torch.randn(100, dtype=torch.float64), num_bits=4, block_size=50)
    got = (q.dtype, scale.dtype, zero_point.dtype, quant.dequantize_tensor(q, scale, zero_point, block_size=50).dtype)
    assert got == (torch.uint8, torch.float32, torch.int32, torch.float32), (
        f"expected (uint8, float32, int32, float32) for codes, scale, zero_point, dequantized; got {got}"
    )


@pytest.mark.exercise("3.1")
def test_uniform_dequantize_rejects_wrong_constants(quant):
    """dequantize_tensor with a scale per block that does not fit the codes raises a ValueError."""
    q, scale, zero_point = quant.quantize_tensor(torch.randn(100), num_bits=4, block_size=50)
    expect_refusal(quant.dequantize_tensor, q, scale, zero_point, block_size=25, names=("scale",),
                   tensors={"x_quant": q, "scale": scale, "zero_point": zero_point}, what="4 blocks, 2 scales")  # fmt: skip


# ---- Exercise 3.2: absmax quantization --------------------------------------------------------


@pytest.mark.exercise("3.2")
def test_absmax_int4_range_and_error_bound(quant):
    """int4 codes span −7…7; 6 scales for 384 elements in blocks of 64; within half a step."""
    x = torch.randn(4, 96)
    q, scale = quant.absmax_quantize(x, num_bits=4, block_size=64)
    expect_tensor(scale, (6,), "scale", hint="384 elements in blocks of 64 over the flattened tensor: 6 scales")
    assert int(q.abs().max()) == 7, f"int4 codes span -7…7 (qmax = 2^(4-1) - 1), got max |q| = {int(q.abs().max())}"
    x_hat = quant.absmax_dequantize(q, scale, block_size=64)
    assert_close(x_hat, x, "int4 absmax round trip", bound=half_step_bound(scale, 64, 384, 7).view(4, 96))


@pytest.mark.exercise("3.2")
def test_absmax_all_negative_block(quant):
    """A block of negative values: scale = max |x| / qmax > 0 and the most negative value maps to −qmax."""
    x = -(torch.rand(64, generator=generator(5)) + 0.5)
    q, scale = quant.absmax_quantize(x, num_bits=8)
    expect_tensor(scale, (1,), "scale of one block")
    assert scale.item() > 0, (
        f"scale = max |x| / 127 must be positive, got {scale.item():.4g} (max(x) instead of max |x|?)"
    )
    assert int(q.min()) == -127, f"the most negative value maps to -127, got {int(q.min())}"
    assert_close(
        quant.absmax_dequantize(q, scale), x, "all-negative round trip", bound=half_step_bound(scale, 64, 64, 127)
    )


@pytest.mark.exercise("3.2")
def test_absmax_dtypes(quant):
    """Codes int8 and scale float32 for any input dtype; dequantized values float32."""
    q, scale = quant.absmax_quantize(torch.randn(64, dtype=torch.float64), num_bits=8)
    got = (q.dtype, scale.dtype, quant.absmax_dequantize(q, scale).dtype)
    assert got == (torch.int8, torch.float32, torch.float32), f"expected (int8, float32, float32), got {got}"


@pytest.mark.exercise("3.2")
def test_absmax_zero_block_and_bad_input(quant):
    """An all-zero block comes back as zeros without NaN; num_bits=16 and NaN input are refused."""
    x = torch.cat([torch.zeros(64), torch.randn(64)])
    q, scale = quant.absmax_quantize(x, block_size=64)
    x_hat = quant.absmax_dequantize(q, scale, block_size=64)
    assert torch.isfinite(x_hat).all() and (x_hat[:64] == 0).all(), "an all-zero block must come back as zeros, no NaN"
    expect_refusal(quant.absmax_quantize, x, num_bits=16, names=("num_bits",), tensors={"x": x})
    bad = torch.tensor([1.0, float("nan")])
    expect_refusal(quant.absmax_quantize, bad, names=("x",), tensors={"x": bad}, what="x holds a NaN")


# ---- Exercise 3.3: code books -----------------------------------------------------------------


@pytest.mark.exercise("3.3")
def test_nf4_code_book_bit_exact_with_bitsandbytes(quant, golden):
    """The NF4 table equals bitsandbytes' bit for bit (float32 linspace, float32 normalisation)."""
    book = quant.nf4_code_book()
    expect_tensor(book, (16,), "nf4_code_book()", dtype=torch.float32)
    assert torch.equal(book, golden["codebook.nf4"]), (
        f"bit-exact with bitsandbytes' table; max difference {(book - golden['codebook.nf4']).abs().max():.3g}. "
        "Make the probabilities with a float32 linspace and normalise in float32."
    )
    assert torch.equal(book, book.sort().values), "levels must be ascending (nearest_code relies on it)"


def code_book_error(code: torch.Tensor, x: torch.Tensor, block_size: int) -> float:
    """Mean |x̂ − x| of blockwise absmax quantization to the nearest level of ``code``, the test's own (float64).

    Built on the code book alone (no Exercise 3.4 code), so that 3.3's points do not depend on 3.4's.
    """
    blocks = x.double().reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    levels = code.double()  # (n_levels,)
    nearest = levels[(blocks.div(absmax).unsqueeze(-1) - levels).abs().argmin(dim=-1)]  # (n_blocks, block_size)
    return (nearest * absmax - blocks).abs().mean().item()


@pytest.mark.exercise("3.3")
def test_nf4_beats_fp4_and_int4_on_gaussian_weights(quant):
    """On Gaussian weights NF4's code book gives a lower mean error than FP4's and int4's at the same block size."""
    x = torch.randn(64 * 512)
    int4 = torch.arange(-7, 8, dtype=torch.float64) / 7  # symmetric int4: round(x / scale), scale = absmax / 7
    errors = {"nf4": code_book_error(quant.nf4_code_book(), x, 64), "fp4": code_book_error(quant.fp4_code_book(), x, 64),
              "int4": code_book_error(int4, x, 64)}  # fmt: skip
    observe("3.3 FP4 error / NF4 error", errors["fp4"] / errors["nf4"])
    observe("3.3 int4 error / NF4 error", errors["int4"] / errors["nf4"])
    # Over 55 seeds (32,768 normal draws each) FP4's mean error was 1.09–1.12× NF4's and int4's 1.24–1.27×
    # (make calibrate): the order never changed.
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"], (
        f"NF4 is information-theoretically optimal for normal weights (QLoRA §3): mean |error| {errors}"
    )


# ---- Exercise 3.4: NF4 blockwise quantization ------------------------------------------------

NF4_CASES = [
    ("nf4_fp32_16x64", 64),
    ("nf4_fp32_7x13", 64),
    ("nf4_fp32_3x70", 64),
    ("nf4_fp16_8x40", 64),
    ("nf4_bf16_8x40", 64),
    ("nf4_fp32_outlier", 64),
    ("nf4_fp32_8x256_bs128", 128),
    ("nf4_fp32_8x256_bs256", 256),
    ("nf4_fp32_16x64_bs128", 128),
]


@pytest.mark.exercise("3.4")
@pytest.mark.parametrize("case, block_size", NF4_CASES)
def test_nf4_byte_identical_to_bitsandbytes(quant, golden, case, block_size):
    """Nine cases (fp32/fp16/bf16, odd sizes, partial blocks, outliers, block sizes 64–256): bitsandbytes' bytes."""
    x = golden[f"{case}.input"]
    packed, absmax = quant.quantize_nf4(x, block_size=block_size)
    expected = golden[f"{case}.packed"]
    expect_tensor(absmax, tuple(golden[f"{case}.absmax"].shape), f"{case}: absmax",
                  hint="one per block of the FLATTENED tensor (not per row); a partial last block has its own")  # fmt: skip
    assert torch.equal(absmax, golden[f"{case}.absmax"]), (
        f"{case}: absmax differs; blocks run over the FLATTENED tensor (not per row), a partial last block has its own"
    )
    expect_tensor(packed, tuple(expected.shape), f"{case}: packed codes", dtype=torch.uint8)
    differ = (packed != expected).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{case}: {differ.numel()} of {expected.numel()} bytes differ; first: byte {int(differ[0])} is "
        f"{int(packed[differ[0]]):#04x}, bitsandbytes wrote {int(expected[differ[0]]):#04x} "
        "(even element in the HIGH nibble; an odd count padded with the code of 0.0)"
    )
    out = quant.dequantize_nf4(packed, absmax, x.shape, block_size=block_size, dtype=x.dtype)
    assert out.dtype == x.dtype, f"dequantize_nf4(dtype={x.dtype}) must return {x.dtype}, got {out.dtype}"
    assert torch.equal(out, golden[f"{case}.dequant"]), (
        f"{case}: dequantized values differ from bitsandbytes: compute code[q] · absmax in float32, then cast once"
    )


@pytest.mark.exercise("3.4")
def test_nf4_ties_and_reciprocal(quant, golden):
    """Midpoints take the lower code, and scaling multiplies by the fp32 reciprocal (x · (1/absmax)).

    Block 0: the 15 midpoints and their fp32 neighbours; block 1: the same ×2; block 2: values whose
    code differs between x·(1/3) and x/3. Block 3, a partial block, is left out: bitsandbytes' CPU
    fallback divides there (its CUDA kernel multiplies, as we do)."""
    x = golden["nf4_fp32_ties.input"]
    packed, _ = quant.quantize_nf4(x)
    codes = quant.unpack_nibbles(packed, x.numel())[:192]
    expected = golden["nf4_fp32_ties.codes"][:192]
    differ = (codes != expected).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{differ.numel()} codes differ, first at element {int(differ[0])} (block {int(differ[0]) // 64}): got "
        f"{int(codes[differ[0]])}, expected {int(expected[differ[0]])}. Block 0/1: a tie goes to the LOWER code; "
        "block 2: scale with x * (1 / absmax), not x / absmax"
    )


@pytest.mark.exercise("3.4")
def test_nf4_zero_blocks(quant, golden):
    """An all-zero block has absmax 0, takes the code of 0.0 and comes back as exact zeros."""
    x = golden["nf4_fp32_zero_blocks.input"]
    packed, absmax = quant.quantize_nf4(x)
    assert torch.isfinite(absmax).all() and absmax[1] == 0, "an all-zero block has absmax 0 (no division by zero)"
    assert torch.equal(packed, golden["nf4_fp32_zero_blocks.packed"]), "all-zero blocks take the code of 0.0 (7)"
    out = quant.dequantize_nf4(packed, absmax, x.shape)
    assert (out.flatten()[64:] == 0).all(), "all-zero blocks must come back as exact zeros"
    assert torch.equal(out, golden["nf4_fp32_zero_blocks.dequant"]), "the other blocks as bitsandbytes"


@pytest.mark.exercise("3.4")
def test_nf4_all_negative_blocks(quant):
    """Blocks of negative values: absmax = max |x| (positive), codes only 0…7, the most negative maps to −1."""
    x = -(torch.rand(3, 64, generator=generator(6)) + 0.01)
    packed, absmax = quant.quantize_nf4(x)
    expect_tensor(absmax, (3,), "absmax of 3 blocks")
    assert (absmax > 0).all(), f"absmax = max |x| must be positive for negative blocks, got {absmax.tolist()}"
    codes = quant.unpack_nibbles(packed, x.numel())
    assert int(codes.max()) <= 7, f"negative values take the levels ≤ 0 (codes 0…7), got a code {int(codes.max())}"
    assert (codes.view(3, 64)[torch.arange(3), x.argmin(dim=1)] == 0).all(), (
        "each block's most negative value is −1 · absmax (code 0)"
    )
    out = quant.dequantize_nf4(packed, absmax, x.shape)
    assert_close(out, x, "NF4 round trip of negative blocks", bound=nf4_bound(quant, absmax, 64, x.numel()).view(3, 64))


@pytest.mark.exercise("3.4")
def test_pack_nibbles_pad_any_shape_and_code_dtypes(quant):
    """pack_nibbles honours pad and any input shape; nearest_code gives uint8; dequantize_blockwise float32."""
    assert quant.pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8), pad=7).tolist() == [0x12, 0x37], (
        "an odd count is padded with the pad code given (7 here) in the last low nibble"
    )
    square = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    assert quant.pack_nibbles(square).tolist() == [0x12, 0x34], "codes of any shape are packed in flattened order"
    codes = quant.nearest_code(torch.tensor([0.1, -0.7]), quant.nf4_code_book())
    assert codes.dtype == torch.uint8, f"nearest_code returns uint8 codes, got {codes.dtype}"
    values = quant.dequantize_blockwise(codes, torch.tensor([2.0]), quant.nf4_code_book(), 64)
    assert values.dtype == torch.float32, f"dequantize_blockwise returns float32, got {values.dtype}"


@pytest.mark.exercise("3.4")
def test_nf4_bad_input(quant):
    """inf input, block_size 0 and a packed tensor of the wrong size raise ValueErrors naming x, block_size, packed."""
    bad = torch.tensor([1.0, float("inf")])
    expect_refusal(quant.quantize_nf4, bad, names=("x",), tensors={"x": bad}, what="x holds an inf")
    x = torch.randn(10)
    expect_refusal(quant.quantize_nf4, x, block_size=0, names=("block_size",), tensors={"x": x})
    packed, absmax = quant.quantize_nf4(x)
    expect_refusal(quant.dequantize_nf4, packed, absmax, (4, 4), names=("packed",),
                   tensors={"packed": packed, "absmax": absmax}, what="16 elements need 8 bytes, not 5")  # fmt: skip


@pytest.mark.exercise("3.4")
def test_nf4_on_device(quant, device):
    """Codes and absmax stay on x's device and equal the CPU result."""
    x = torch.randn(9, 31, device=device)
    packed, absmax = quant.quantize_nf4(x)
    assert packed.device.type == device.type and absmax.device.type == device.type, "keep the codes on x's device"
    cpu_packed, _ = quant.quantize_nf4(x.cpu())
    assert torch.equal(packed.cpu(), cpu_packed), f"NF4 codes on {device.type} must equal those on the CPU"


# ---- Exercise 3.5: double quantization -------------------------------------------------------


def dq_bound(quant, scale: torch.Tensor, block_size: int, n: int, absmax: torch.Tensor) -> torch.Tensor:
    """Half the widest gap of the dynamic code × the block's scale, plus fp32 rounding of the result."""
    book = quant.dynamic_code_book().double()
    half_gap = ((book[1:] - book[:-1]) / 2).max().item()
    return per_element(scale, block_size, n) * (half_gap + 4 * U32) + 4 * U32 * absmax.double().abs()


@pytest.mark.exercise("3.5")
def test_double_quantization_against_bitsandbytes(quant, golden):
    """313 absmax values (a partial DQ block): as close as bitsandbytes; double_dequantize replays its codes."""
    check_double_quantization(quant, golden, "dq_fp32_40x500")
    case = "dq_fp32_40x500"
    replay = quant.double_dequantize(golden[f"{case}.qabsmax"], golden[f"{case}.absmax2"], golden[f"{case}.offset"][0])
    theirs = golden[f"{case}.absmax_dequant"]
    # code[q] · scale + offset: two roundings of terms no larger than |theirs| + 2 · offset.
    bound = 2 * U32 * (theirs.double().abs() + 2 * golden[f"{case}.offset"].double().abs())
    assert_close(replay, theirs, "double_dequantize of bitsandbytes' codes", bound=bound,
                 hint="code[q] · scale (of the element's block of 256) + offset, in float32")  # fmt: skip


@pytest.mark.exercise("3.5")
def test_double_quantization_needs_the_offset(quant):
    """absmax values are all positive: quantize absmax − mean and add the mean back (within 8-bit precision)."""
    absmax = torch.rand(1024, generator=generator(7)) * 0.1 + 1.0  # all around 1.05
    codes, scale, offset = quant.double_quantize(absmax)
    expect_tensor(scale, (4,), "scales of 1,024 values in blocks of 256")
    mean = reference(lambda a: a.mean(), absmax, dtype=torch.float32, steps=1024 + 1)
    assert_close(offset, mean.value, "offset", bound=mean.bound, hint="offset must be the mean of the absmax values")
    restored = quant.double_dequantize(codes, scale, offset)
    assert_close(restored, absmax, "restored absmax", bound=dq_bound(quant, scale, 256, 1024, absmax),
                 hint="quantize absmax − mean (not absmax itself), then add the mean back")  # fmt: skip


@pytest.mark.exercise("3.5")
def test_double_quantization_at_another_block_size(quant):
    """block_size=64 over 300 values: 5 scales (the last block partial) and every value within 8-bit precision."""
    absmax = torch.rand(300, generator=generator(8)) * 0.05 + 0.01
    codes, scale, offset = quant.double_quantize(absmax, block_size=64)
    expect_tensor(codes, (300,), "codes", dtype=torch.uint8)
    expect_tensor(scale, (5,), "scales", hint="300 values in blocks of 64: 64, 64, 64, 64, 44: pass block_size on")
    restored = quant.double_dequantize(codes, scale, offset, block_size=64)
    assert_close(restored, absmax, "restored absmax (block_size 64)", bound=dq_bound(quant, scale, 64, 300, absmax))
    assert quant.bits_per_parameter(64, double_quant=True, dq_block_size=128) == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 128), abs=1e-12
    ), "bits_per_parameter(dq_block_size=128): 4 + 8/64 + 32/(64·128)"


# ---- Exercise 3.6: NF4Linear -----------------------------------------------------------------


@pytest.mark.exercise("3.6")
def test_nf4_linear_weight_equals_nf4_round_trip(quant):
    """dequantize_weight() is exactly dequantize_nf4(quantize_nf4(W)); no bias stays no bias; DQ changes little."""
    linear = nn.Linear(96, 40, bias=False)
    layer = quant.NF4Linear.from_linear(linear, double_quant=False)
    packed, absmax = quant.quantize_nf4(linear.weight.detach())
    assert torch.equal(layer.dequantize_weight(), quant.dequantize_nf4(packed, absmax, (40, 96))), (
        "dequantize_weight must return exactly dequantize_nf4(quantize_nf4(W))"
    )
    assert layer.bias is None and layer(torch.randn(2, 96)).shape == (2, 40), "a layer without bias stays without"
    dq = quant.NF4Linear.from_linear(linear, double_quant=True)
    restored = quant.double_dequantize(*quant.double_quantize(absmax))
    assert torch.equal(dq.dequantized_absmax(), restored), "with DQ the layer uses the double-dequantized absmax"


@pytest.mark.exercise("3.6")
def test_nf4_linear_with_several_dq_blocks_and_a_bias(quant):
    """A 144 → 120 layer (270 NF4 blocks, 2 DQ blocks) keeps its bias, frozen, and stays within NF4 + DQ error."""
    linear = nn.Linear(144, 120)
    layer = quant.NF4Linear.from_linear(linear)
    absmax = linear.weight.detach().reshape(-1, 64).abs().amax(1)  # 17,280 weights = 270 blocks
    dq_absmax = layer.dequantized_absmax()
    expect_tensor(dq_absmax, (270,), "dequantized_absmax()", dtype=torch.float32)
    assert torch.equal(dq_absmax, quant.double_dequantize(*quant.double_quantize(absmax))), (
        "the stored constants must double-dequantize to double_dequantize(double_quantize(absmax)) (2 blocks of 256)"
    )
    weight = layer.dequantize_weight()
    expect_tensor(weight, (120, 144), "dequantize_weight()", dtype=torch.float32)
    bound = nf4_bound(quant, absmax, 64, weight.numel()) + per_element((dq_absmax - absmax).abs(), 64, weight.numel())
    assert_close(weight, linear.weight, "weight after NF4 + double quantization", bound=bound.view(120, 144))
    assert layer.bias is not None and not layer.bias.requires_grad, "the bias is kept, frozen"
    assert torch.equal(layer.bias, linear.bias.detach()), "the bias is copied unchanged"
    x = torch.randn(3, 144)
    ref = reference(lambda x, W, b: x @ W.T + b, x, weight, linear.bias, dtype=torch.float32, steps=144 + 2)
    assert_close(layer(x), ref.value, "NF4Linear(x) with a bias", bound=ref.bound)


@pytest.mark.exercise("3.6")
def test_nf4_linear_keeps_only_codes_constants_and_bias(quant):
    """The parameters are the bias alone and the buffers the codes and constants; nothing else (no cached Ŵ)."""
    for double_quant, buffers in (
        (False, ["absmax", "packed"]),
        (True, ["absmax_codes", "absmax_offset", "absmax_scale", "packed"]),
    ):
        a = quant.NF4Linear.from_linear(nn.Linear(64, 32), double_quant=double_quant)
        b = quant.NF4Linear.from_linear(nn.Linear(64, 32), double_quant=double_quant)
        assert [n for n, _ in a.named_parameters()] == ["bias"], "the bias is the only (frozen) parameter"
        assert sorted(n for n, _ in a.named_buffers()) == buffers, f"buffers must be exactly {buffers}"
        x = torch.randn(2, 64)
        a(x)  # a layer that caches its dequantized weight would keep using it after the load below
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x)), "after load_state_dict the layer must compute with the new codes: never cache Ŵ"


@pytest.mark.exercise("3.6")
def test_nf4_linear_compute_dtype(quant):
    """compute_dtype=bf16: the output and the dequantized weight are bf16 (fp32 on request)."""
    layer = quant.NF4Linear.from_linear(nn.Linear(64, 16), compute_dtype=torch.bfloat16)
    out = layer(torch.randn(3, 64))
    assert out.dtype == torch.bfloat16, f"compute_dtype=bfloat16: output must be bf16, got {out.dtype}"
    assert layer.dequantize_weight().dtype == torch.bfloat16, "dequantize_weight() defaults to compute_dtype"
    assert layer.dequantize_weight(torch.float32).dtype == torch.float32, "dequantize_weight(torch.float32) is fp32"
    default = quant.NF4Linear.from_linear(nn.Linear(64, 16).to(torch.bfloat16))
    assert default.compute_dtype == torch.bfloat16, "compute_dtype defaults to the weight's dtype (bf16 here)"


@pytest.mark.exercise("3.6")
def test_nf4_linear_bits_per_parameter_and_state_dict(quant):
    """Measured bits per parameter ≈ 4.127 with DQ; codes and constants are buffers, so state_dict round-trips."""
    layer = quant.NF4Linear.from_linear(nn.Linear(4096, 64))
    bits = layer.weight_nbytes() * 8 / (4096 * 64)
    assert abs(bits - quant.bits_per_parameter(64, double_quant=True)) < 0.01, f"measured {bits:.4f} bits per parameter"
    fresh = quant.NF4Linear(4096, 64, double_quant=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4096)
    assert torch.equal(fresh(x), layer(x)), "codes and constants must be buffers, so state_dict round-trips"


@pytest.mark.exercise("3.6")
def test_nf4_linear_on_device(quant, device):
    """On every device the output stays there and approximates the original layer."""
    linear = nn.Linear(64, 32).to(device)
    layer = quant.NF4Linear.from_linear(linear)
    x = torch.randn(5, 64, device=device)
    out = layer(x)
    assert out.device.type == device.type, f"output on {device.type}"
    weight = layer.dequantize_weight()
    ref = reference(lambda x, W, b: x @ W.T + b, x, weight, linear.bias, dtype=torch.float32, steps=64 + 2)
    assert_close(out, ref.value, f"NF4Linear on {device.type}", bound=ref.bound)


def linear_references(layer, x, grad_y, dtype: torch.dtype):
    """The exact y = x Ŵᵀ + b and ∂L/∂x = ∂L/∂y · Ŵ, with their rounding bounds for a product computed in ``dtype``.

    y: x, Ŵ and b rounded to dtype (3), a dot product of length in, the bias added (1), a cast (1).
    ∂L/∂x: Ŵ rounded to dtype (1), a dot product of length out, and one rounding to x's dtype (its unit
    roundoff, which may be coarser than dtype's: a bf16 x of an fp32 layer).
    """
    weight = layer.dequantize_weight(torch.float32)  # (out, in), the exact Ŵ
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    y = reference(lambda x, W, b: x @ W.T + b, x, weight, bias, dtype=dtype, steps=layer.in_features + 5)
    grad = reference(lambda g, W: g @ W, grad_y, weight, dtype=dtype, steps=layer.out_features + 1)
    grad.bound = grad.bound + UNIT_ROUNDOFF[x.dtype] * (grad.value.abs() + grad.bound)
    return y, grad


@pytest.mark.exercise("3.6")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["no-autocast", "bf16", "fp16"])
def test_nf4_linear_keeps_no_weight_in_any_setting(quant, autocast):
    """No weight-sized float tensor kept, under autocast too, for any compute dtype, bias, DQ and 1-D to 3-D x."""
    for compute_dtype in (torch.float32, torch.bfloat16):
        for bias, double_quant, leading in ((True, True, ()), (False, False, (3,)), (True, False, (2, 3))):
            layer = quant.NF4Linear.from_linear(nn.Linear(72, 40, bias=bias), double_quant=double_quant,
                                                compute_dtype=compute_dtype)  # fmt: skip
            x = torch.randn(*leading, 72, requires_grad=True)
            y = weight_kept(quant, layer, x, autocast)
            run_backward(y, torch.ones_like(y), f"a {tuple(x.shape)} x, compute_dtype {compute_dtype}")


@pytest.mark.exercise("3.6")
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nf4_linear_gradients_under_autocast(quant, device, autocast):
    """Under bf16 and fp16 autocast: y in the autocast dtype, ∂L/∂x in x's dtype, both within that dtype's rounding."""
    for compute_dtype in (torch.float32, torch.bfloat16):
        layer = quant.NF4Linear.from_linear(nn.Linear(56, 40).to(device), compute_dtype=compute_dtype)
        for x_dtype, leading in ((torch.float32, (2, 3)), (torch.bfloat16, (3,)), (torch.float64, ())):
            x = torch.randn(*leading, 56, device=device).to(x_dtype).requires_grad_()
            what = f"under {short(autocast)} autocast on {device.type}, a {short(x_dtype)} x {tuple(x.shape)}"
            with torch.autocast(device.type, dtype=autocast):
                y = layer(x)
            expect_tensor(y, (*leading, 40), f"NF4Linear(x) {what}", dtype=autocast,
                          hint="autocast computes F.linear in its own dtype: the 4-bit matmul must too (compute "
                               "in torch.get_autocast_dtype(x.device.type) when torch.is_autocast_enabled(x.device.type))")  # fmt: skip
            grad_y = torch.randn(*leading, 40, device=device).to(autocast)
            run_backward(y, grad_y, f"∂L/∂x {what}")
            ref_y, ref_grad = linear_references(layer, x, grad_y, autocast)
            assert_close(y, ref_y.value, f"NF4Linear(x) {what}", bound=ref_y.bound,
                         hint="x, Ŵ and b in the autocast dtype, then x Ŵᵀ + b")  # fmt: skip
            assert_close(x.grad, ref_grad.value, f"∂L/∂x {what}", bound=ref_grad.bound, dtype=x_dtype,
                         hint=GRADIENT_HINT + ", Ŵ dequantized in the dtype of the forward's product (autocast's)")  # fmt: skip


@pytest.mark.exercise("3.6")
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_nf4_linear_under_gradient_checkpointing(quant, use_reentrant):
    """Under torch.utils.checkpoint (non-reentrant and reentrant), with and without bf16 autocast: y and ∂L/∂x hold."""
    from torch.utils.checkpoint import checkpoint

    first = quant.NF4Linear.from_linear(nn.Linear(64, 48))
    second = quant.NF4Linear.from_linear(nn.Linear(48, 40, bias=False))
    block = nn.Sequential(first, second)
    w1, w2 = first.dequantize_weight(torch.float32), second.dequantize_weight(torch.float32)  # (48, 64), (40, 48)
    for autocast in (None, torch.bfloat16):
        dtype = autocast or torch.float32
        x = torch.randn(2, 3, 64, requires_grad=True)
        what = f"two NF4Linear layers under checkpoint(use_reentrant={use_reentrant}), " + (
            f"{short(autocast)} autocast" if autocast else "no autocast"
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            y = checkpoint(block, x, use_reentrant=use_reentrant)
        expect_tensor(y, (2, 3, 40), what, dtype=dtype)
        grad_y = torch.randn(2, 3, 40).to(dtype)
        run_backward(y, grad_y, what)
        # y: x, Ŵ1, b1 rounded, a dot product of 64, h rounded, Ŵ2 rounded, a dot product of 48; ∂L/∂x: Ŵ2, Ŵ1
        # rounded, dot products of 40 and 48, ∂L/∂h rounded, the cast to x's dtype.
        ref_y = reference(lambda x, a, b, c: (x @ a.T + b) @ c.T, x, w1, first.bias, w2, dtype=dtype, steps=64 + 48 + 6)
        ref_grad = reference(lambda g, c, a: g @ c @ a, grad_y, w2, w1, dtype=dtype, steps=40 + 48 + 4)
        assert_close(y, ref_y.value, what, bound=ref_y.bound)
        assert_close(x.grad, ref_grad.value, f"∂L/∂x, {what}", bound=ref_grad.bound, dtype=torch.float32,
                     hint=GRADIENT_HINT + "; checkpointing reruns the forward inside the backward, so the Function "
                          "may keep nothing that the rerun would not rebuild")  # fmt: skip


@pytest.mark.exercise("3.6")
def test_nf4_linear_bias_gradient_when_the_bias_trains(quant):
    """A bias set to train (LoRA's bias="lora_only") gets ∂L/∂b = Σ ∂L/∂y over every leading dim, 1-D x too."""
    layer = quant.NF4Linear.from_linear(nn.Linear(32, 24))
    layer.bias.requires_grad_(True)
    for leading in ((), (5,), (2, 3)):
        layer.bias.grad = None
        x = torch.randn(*leading, 32, requires_grad=True)
        grad_y = torch.randn(*leading, 24)
        what = f"∂L/∂b for a {tuple(x.shape)} x"
        run_backward(layer(x), grad_y, what)
        assert layer.bias.grad is not None, (
            f"{what}: the bias was set to train (requires_grad) but got no gradient; the Function's backward "
            "returns ∂L/∂b = Σ ∂L/∂y over the leading dims when ctx.needs_input_grad says the bias needs one"
        )
        ref = reference(lambda g: g.reshape(-1, 24).sum(0), grad_y, dtype=torch.float32, steps=grad_y[..., 0].numel())
        assert_close(layer.bias.grad, ref.value, what, bound=ref.bound, dtype=torch.float32,
                     hint="sum ∂L/∂y over every leading dimension (none for a 1-D x), not over the first only")  # fmt: skip


# ---- Exercise 3.7: fake quantization ---------------------------------------------------------


@pytest.mark.exercise("3.7")
def test_fake_quantize_blocks_dtype_and_training(quant):
    """float64 in, float64 out, 8-bit close to x; quantization-aware training with it still learns."""
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    y = quant.fake_quantize(x, num_bits=8, block_size=32)
    expect_tensor(y, (4, 32), "fake_quantize of a float64 tensor", dtype=torch.float64)
    q, scale, _ = quant.quantize_tensor(x.detach(), num_bits=8, block_size=32)
    bound = (per_element(scale, 32, 128) * (0.5 + 4 * UNIT_ROUNDOFF[torch.float32] * 256)).view(4, 32)
    assert_close(y, x, "8-bit fake quantization", bound=bound, hint="quantize in blocks of block_size, then dequantize")
    weight = torch.randn(16, requires_grad=True)
    target = torch.linspace(-1, 1, 16)
    opt = torch.optim.SGD([weight], lr=0.5)
    for _ in range(50):
        loss = (quant.fake_quantize(weight, num_bits=8) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    observe("3.7 QAT loss after 50 SGD steps", loss.item())
    # Over 55 seeds the reference ended at 2.5e-4 every time (the quantization error of the fixed target;
    # make calibrate); 0.01 is 40 times that.
    assert loss.item() < 0.01, f"QAT with the straight-through estimator must still learn (loss {loss.item():.3g})"


# ---- Properties (Hypothesis, testcases/properties.py): every shape, dtype, magnitude and memory layout ------
#
# Each property draws its inputs (1-D and 0-d tensors, sides of 1, sizes that do not divide the block, float32,
# float64, bfloat16 and float16, values of order 1 down to float32 subnormals and up to 2^127, transposed,
# strided and misaligned views) and checks them against an oracle computed here. Rounding of subnormal values
# is absolute (2^-149 in float32), so the bounds carry a few of those besides their relative part.

SUB = 2.0**-149  # float32's smallest subnormal: the rounding step of results near 0


def round_trip_bound(step: torch.Tensor, qmax: int) -> torch.Tensor:
    """|x̂ − x| allowed per element for codes of ``step`` (float64): half a step, plus the float32 rounding of
    x / step and of q · step (a few units in the last place of values up to (qmax + 1) steps, absolute near 0)."""
    return step * (0.5 + 4 * U32 * (qmax + 1)) + 4 * (qmax + 1) * SUB


def check_input_kept(x: torch.Tensor, kept: torch.Tensor, what: str) -> None:
    assert x.dtype == kept.dtype and torch.equal(x, kept), (
        f"{what} changed its input x: never modify the caller's tensor (an in-place op on x.float() or on a "
        "reshape of x writes into x itself when no copy was needed)"
    )


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_uniform_quantization_for_every_shape_dtype_magnitude_and_layout(quant, magnitude):
    """Any x (dtype, shape, magnitude up to 2^127, subnormals, layout): scale (hi − lo)/qmax, zeros exact, error ≤ scale/2."""

    def check(case):
        x, qmax = case.x.make(), 2**case.num_bits - 1
        kept = x.clone()
        q, scale, zero_point = quant.quantize_tensor(x, num_bits=case.num_bits, block_size=case.block_size)
        check_input_kept(x, kept, "quantize_tensor")
        numel, block = x.numel(), case.block_size or x.numel()
        n_blocks = -(-numel // block)
        expect_tensor(q, tuple(x.shape), "x_quant (the codes)", dtype=torch.uint8)
        expect_tensor(scale, (n_blocks,), "scale (one per block)", dtype=torch.float32)
        expect_tensor(zero_point, (n_blocks,), "zero_point (one per block)", dtype=torch.int32)
        x32 = x.float().double().reshape(-1)
        blocks = blocks_of(x32, block)
        lo, hi = blocks.min(dim=1).values.clamp(max=0), blocks.max(dim=1).values.clamp(min=0)
        exact = (hi - lo) / qmax  # float64: no overflow, no underflow
        vanishes = exact <= 4 * SUB  # a range so small that a float32 scale may round to 0 (then 1 is used)
        ok = torch.where(vanishes, (scale.double() == 1) | ((scale.double() - exact).abs() <= 4 * SUB),
                         (scale.double() - exact).abs() <= 4 * U32 * exact + 4 * SUB)  # fmt: skip
        assert ok.all(), (
            f"scale of block {first_bad(~ok)}: expected (hi − lo) / qmax = {exact[first_bad(~ok)].item():.6g}, got "
            f"{scale[first_bad(~ok)].item():.6g}. Widen [min, max] to include 0; compute without overflow (hi − lo "
            "overflows float32 near 2^127: use hi/qmax − lo/qmax there) and without a floor (1 only for a range of 0)"
        )
        assert int(zero_point.min()) >= 0 and int(zero_point.max()) <= qmax and int(q.max()) <= qmax, (
            f"codes and zero points must lie in [0, {qmax}]: got codes up to {int(q.max())}, zero points "
            f"{int(zero_point.min())} … {int(zero_point.max())}"
        )
        x_hat = quant.dequantize_tensor(in_layout(q, case.x.layout), scale, zero_point, block_size=case.block_size)
        expect_tensor(x_hat, tuple(x.shape), "dequantize_tensor(...)", dtype=torch.float32)
        step = per_element(scale, block, numel)
        level = q.reshape(-1).double() - per_element(zero_point, block, numel)
        assert_close(x_hat.reshape(-1), level * step, "dequantize_tensor: (q − zero_point) · scale",
                     bound=2 * U32 * (level.abs() + per_element(zero_point, block, numel)) * step + 2 * SUB)  # fmt: skip
        bound = round_trip_bound(step, qmax)
        assert_close(x_hat.reshape(-1), x32, "round trip of uniform quantization (flattened)", bound=bound,
                     hint="every element within half a step: round x / scale, add the zero point, clamp to [0, qmax]")  # fmt: skip
        assert (x_hat.reshape(-1)[x32 == 0] == 0).all(), "0 must come back as exactly 0 (q = zero_point)"

    for_all(cases(x=tensor_cases(shapes(allow_scalar=True), magnitudes=(magnitude,)), num_bits=st.integers(2, 8),
                  block_size=st.sampled_from([None, 64, 1, 3, 7])), check, salt=magnitude)  # fmt: skip


@pytest.mark.exercise("3.2")
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_absmax_quantization_for_every_shape_dtype_magnitude_and_layout(quant, magnitude):
    """Any x (dtype, shape, magnitude up to 2^127, subnormals, layout): scale absmax/qmax, signs kept, error ≤ scale/2."""

    def check(case):
        x, qmax = case.x.make(), 2 ** (case.num_bits - 1) - 1
        kept = x.clone()
        q, scale = quant.absmax_quantize(x, num_bits=case.num_bits, block_size=case.block_size)
        check_input_kept(x, kept, "absmax_quantize")
        numel, block = x.numel(), case.block_size or x.numel()
        expect_tensor(q, tuple(x.shape), "absmax codes", dtype=torch.int8)
        expect_tensor(scale, (-(-numel // block),), "scale (one per block)", dtype=torch.float32)
        x32 = x.float().double().reshape(-1)
        exact = blocks_of(x32, block).abs().max(dim=1).values / qmax
        vanishes = exact <= 4 * SUB
        ok = torch.where(vanishes, (scale.double() == 1) | ((scale.double() - exact).abs() <= 4 * SUB),
                         (scale.double() - exact).abs() <= 2 * U32 * exact + 2 * SUB)  # fmt: skip
        assert ok.all(), (
            f"scale of block {first_bad(~ok)}: expected absmax / qmax = {exact[first_bad(~ok)].item():.6g}, got "
            f"{scale[first_bad(~ok)].item():.6g} (no epsilon, no floor: 1 only for an all-zero block)"
        )
        assert int(q.abs().max()) <= qmax, (
            f"{case.num_bits}-bit codes lie in [−{qmax}, {qmax}], got {int(q.abs().max())}"
        )
        assert (q.reshape(-1).double() * x32 >= 0).all(), "each code keeps its value's sign (or is 0)"
        x_hat = quant.absmax_dequantize(in_layout(q, case.x.layout), scale, block_size=case.block_size)
        expect_tensor(x_hat, tuple(x.shape), "absmax_dequantize(...)", dtype=torch.float32)
        step = per_element(scale, block, numel)
        bound = round_trip_bound(step, qmax)
        assert_close(x_hat.reshape(-1), x32, "round trip of absmax quantization (flattened)", bound=bound,
                     hint="q = clamp(round(x / scale), −qmax, qmax) and x̂ = q · scale, scale = absmax / qmax per block")  # fmt: skip
        assert (x_hat.reshape(-1)[x32 == 0] == 0).all(), "0 must come back as exactly 0"

    for_all(cases(x=tensor_cases(shapes(allow_scalar=True), magnitudes=(magnitude,)), num_bits=st.integers(2, 8),
                  block_size=st.sampled_from([None, 64, 1, 3, 7])), check, salt=magnitude)  # fmt: skip


def nf4_oracle_codes(quant, x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(absmax, codes, scaled) as the contract computes them, in float32: x · fl(1/absmax) (x / absmax where the
    reciprocal overflows), clamped, then the number of float32 midpoints strictly below (ties to the lower)."""
    blocks = blocks_of(x.float().reshape(-1), block_size)  # float32
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    tiny = torch.isinf(inverse)[:, None]
    scaled = torch.where(tiny, blocks / absmax[:, None], blocks * inverse[:, None]).clamp(-1, 1)
    book = torch.tensor(quant.NF4_PUBLISHED, dtype=torch.float32)
    midpoints = (book[1:] + book[:-1]) / 2
    codes = (scaled.reshape(-1, 1) > midpoints).sum(dim=1).to(torch.uint8)
    return absmax, codes[: x.numel()], scaled.reshape(-1)[: x.numel()]


@pytest.mark.exercise("3.4")
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_nf4_for_every_shape_dtype_magnitude_and_layout(quant, magnitude):
    """Any x and block size: absmax exact, every code the contract's nearest level (subnormal blocks too), x untouched."""

    def check(case):
        x, block = case.x.make(), case.block_size
        kept = x.clone()
        packed, absmax = quant.quantize_nf4(x, block_size=block)
        check_input_kept(x, kept, "quantize_nf4")
        numel = x.numel()
        expect_tensor(packed, ((numel + 1) // 2,), "packed codes", dtype=torch.uint8)
        expect_tensor(absmax, (-(-numel // block),), "absmax (one per block of the flattened x)", dtype=torch.float32)
        want_absmax, want, scaled = nf4_oracle_codes(quant, x, block)
        assert torch.equal(absmax, want_absmax), (
            f"absmax of block {first_bad(absmax != want_absmax)}: expected max |x| = "
            f"{want_absmax[first_bad(absmax != want_absmax)].item():.6g}, got {absmax[first_bad(absmax != want_absmax)].item():.6g}"
        )
        codes = quant.unpack_nibbles(packed, numel)
        if (codes != want).any():
            i = first_bad(codes != want)
            raise AssertionError(
                f"{int((codes != want).sum())} of {numel} codes differ from the nearest NF4 level; first at element "
                f"{i} (block {i // block}): x = {x.reshape(-1)[i].item():.6g}, absmax = {absmax[i // block].item():.6g}, "
                f"scaled = {scaled[i].item():.6g}: expected code {int(want[i])}, got {int(codes[i])}. Scale by "
                "x · (1 / absmax) in float32, except where 1 / absmax overflows (a subnormal absmax: divide); "
                "a tie goes to the lower code"
            )
        if numel % 2:
            assert int(packed[-1]) & 0x0F == 7, "an odd count is padded with the code of 0.0 (7) in the last low nibble"
        out = quant.dequantize_nf4(in_layout(packed, case.packed_layout), absmax, tuple(x.shape), block_size=block,
                                   dtype=case.out_dtype)  # fmt: skip
        book = torch.tensor(quant.NF4_PUBLISHED, dtype=torch.float32)
        expected = (book[want.long()] * absmax.repeat_interleave(block)[:numel]).to(case.out_dtype).view(x.shape)
        expect_tensor(out, tuple(x.shape), "dequantize_nf4(...)", dtype=case.out_dtype)
        # code[q] · absmax is one correctly rounded float32 product, then one cast: every correct code gives these bits.
        assert torch.equal(out, expected), (
            f"dequantize_nf4 differs at element {first_bad(out != expected)}: expected "
            f"{expected.reshape(-1)[first_bad(out != expected)].item():.6g}, got {out.reshape(-1)[first_bad(out != expected)].item():.6g}. "
            "Compute code[q] · absmax of the element's block in float32, then cast to dtype once; read packed bytes "
            "of any layout (a strided or misaligned view)"
        )

    x = tensor_cases(shapes(allow_scalar=True), magnitudes=(magnitude,))
    for_all(cases(x=x, block_size=st.sampled_from([64, 1, 2, 7, 63, 128]), packed_layout=st.sampled_from(LAYOUTS),
                  out_dtype=st.sampled_from(FLOATS)), check, salt=magnitude)  # fmt: skip


@pytest.mark.exercise("3.4")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_nibbles_for_every_shape_dtype_and_layout(quant, layout):
    """Codes 0…15 of any integer dtype, shape and layout pack high nibble first, an odd count padded with pad."""

    def check(case):
        gen = torch.Generator().manual_seed(case.seed)
        values = torch.randint(0, 16, case.shape, generator=gen)
        codes = in_layout(values.to(case.dtype), case.layout)
        packed = quant.pack_nibbles(codes, pad=case.pad)
        flat = values.reshape(-1).tolist() + ([case.pad] if values.numel() % 2 else [])
        expected = torch.tensor([16 * a + b for a, b in zip(flat[::2], flat[1::2])], dtype=torch.uint8)
        expect_tensor(packed, tuple(expected.shape), "pack_nibbles(codes)", dtype=torch.uint8)
        assert torch.equal(packed, expected), (
            f"byte {first_bad(packed != expected)} is {int(packed[first_bad(packed != expected)]):#04x}, expected "
            f"{int(expected[first_bad(packed != expected)]):#04x}: element 2i in the high nibble, 2i + 1 in the low "
            "one, in the order of the flattened codes (reshape, not view: codes may be non-contiguous)"
        )

    for_all(cases(shape=shapes(allow_scalar=True), dtype=st.sampled_from([torch.uint8, torch.int64, torch.int32]),
                  layout=st.just(layout), pad=st.integers(0, 15), seed=st.integers(0, 2**16)), check, salt=layout)  # fmt: skip


@pytest.mark.exercise("3.4")
def test_nearest_code_on_levels_midpoints_and_neighbours(quant):
    """For any ascending code book and values (levels, midpoints, their float32 neighbours, any layout): the nearest, ties low."""

    def check(case):
        gen = torch.Generator().manual_seed(case.seed)
        book = torch.randn(case.levels, generator=gen).sort().values
        midpoints = (book[1:] + book[:-1]) / 2
        pool = torch.cat([book, midpoints, torch.nextafter(midpoints, book[1:]), torch.nextafter(midpoints, book[:-1]),
                          torch.randn(8, generator=gen) * 2])  # fmt: skip
        values = pool[torch.randint(0, pool.numel(), case.shape, generator=gen)]
        got = quant.nearest_code(in_layout(values, case.layout), book)
        expected = (values.reshape(-1, 1) > midpoints).sum(dim=1).to(torch.uint8).view(case.shape)
        expect_tensor(got, tuple(case.shape), "nearest_code(values, code)", dtype=torch.uint8)
        assert torch.equal(got, expected), (
            f"value {values.reshape(-1)[first_bad(got != expected)].item():.9g} got level "
            f"{int(got.reshape(-1)[first_bad(got != expected)])}, expected {int(expected.reshape(-1)[first_bad(got != expected)])}: "
            "the index is the number of midpoints strictly below the value (a tie goes to the lower level)"
        )

    for_all(cases(levels=st.integers(2, 20), shape=shapes(allow_scalar=True), layout=st.sampled_from(LAYOUTS),
                  seed=st.integers(0, 2**16)), check)  # fmt: skip


@pytest.mark.exercise("3.5")
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_double_quantization_for_every_size_magnitude_and_layout(quant, magnitude):
    """Any number of absmax values (several DQ blocks, partial ones), tiny to huge: the mean, per-block scales, nearest codes."""

    def check(case):
        absmax = case.absmax.make()
        kept = absmax.clone()
        n, block = absmax.numel(), case.block_size
        codes, scale, offset = quant.double_quantize(absmax, block_size=block)
        check_input_kept(absmax, kept, "double_quantize")
        expect_tensor(codes, (n,), "8-bit codes, one per absmax", dtype=torch.uint8)
        expect_tensor(scale, (-(-n // block),), f"scales, one per block of {block}", dtype=torch.float32)
        assert isinstance(offset, torch.Tensor) and offset.numel() == 1 and offset.dtype == torch.float32, (
            f"offset: a float32 tensor holding one value, got {offset!r}"
        )
        a = absmax.double()
        mean = a.mean()
        assert abs(offset.item() - mean.item()) <= (n + 1) * U32 * mean.item() + 2 * SUB, (
            f"offset = mean(absmax) = {mean.item():.6g}, got {offset.item():.6g}"
        )
        d = a - offset.double()  # the values double quantization encodes, with this offset
        want = blocks_of(d, block).abs().max(dim=1).values
        assert ((scale.double() - want).abs() <= 2 * U32 * want + 2 * SUB).all(), (
            f"scale of block {first_bad((scale.double() - want).abs() > 2 * U32 * want + 2 * SUB)}: the absmax of "
            "absmax − offset in each block of block_size (several blocks: each its own scale)"
        )
        book = quant.dynamic_code_book().double()
        step = per_element(scale, block, n)
        target = torch.where(step > 0, d / torch.where(step > 0, step, 1.0), torch.zeros_like(d))
        nearest = (book[None, :] - target[:, None]).abs().min(dim=1).values
        chosen = (book[codes.long()] - target).abs()
        far = chosen > nearest + 4 * U32 * (1 + target.abs()) + 4 * SUB / torch.where(step > 0, step, 1.0)
        assert not far.any(), (
            f"absmax {first_bad(far)} (block {first_bad(far) // block}): (absmax − offset) / scale = "
            f"{target[first_bad(far)].item():.6g} took level {book[codes.long()][first_bad(far)].item():.6g}, but "
            f"the nearest level is {nearest[first_bad(far)].item():.3g} away: the nearest 8-bit level of each "
            "value scaled by its own block's scale (a subnormal scale: divide)"
        )
        restored = quant.double_dequantize(in_layout(codes, case.layout), scale, offset, block_size=block)
        expect_tensor(restored, (n,), "double_dequantize(...)", dtype=torch.float32)
        value = book[codes.long()] * step
        assert_close(restored, value + offset.double(), "double_dequantize: code[q] · scale + offset",
                     bound=2 * U32 * (value.abs() + offset.double().abs()) + 2 * SUB)  # fmt: skip

    # absmax values are positive; "huge" here is 2^110: the float32 sum of 700 of them (the mean) stays finite.
    absmax = tensor_cases(shapes(max_dims=1, max_side=700), dtypes=(torch.float32,), magnitudes=(magnitude,),
                          positive=True, top=110)  # fmt: skip
    for_all(cases(absmax=absmax, block_size=st.sampled_from([256, 1, 3, 64, 100]), layout=st.sampled_from(LAYOUTS)),
            check, salt=magnitude)  # fmt: skip


LEADING = [(), (1,), (3,), (1, 1), (2, 1), (2, 3), (1, 2, 3)]  # no batch, one token, sides of 1


@pytest.mark.exercise("3.6")
def test_nf4_linear_for_every_shape_dtype_and_layout(quant):
    """Any sizes, block size, weight and compute dtype, input shape, dtype and layout, with autocast: y and ∂L/∂x."""

    def check(case):
        gen = torch.Generator().manual_seed(case.seed)
        linear = nn.Linear(case.in_features, case.out_features, bias=case.bias).to(case.weight_dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
        layer = quant.NF4Linear.from_linear(linear, block_size=case.block_size, double_quant=case.double_quant,
                                            compute_dtype=case.compute_dtype)  # fmt: skip
        compute = case.compute_dtype or case.weight_dtype
        shape = (case.out_features, case.in_features)
        packed, absmax = quant.quantize_nf4(linear.weight.detach(), case.block_size)
        if case.double_quant:
            absmax = quant.double_dequantize(*quant.double_quantize(absmax))
        expected_weight = quant.dequantize_nf4(packed, absmax, shape, case.block_size)
        weight = layer.dequantize_weight(torch.float32)
        expect_tensor(weight, shape, "dequantize_weight(torch.float32)", dtype=torch.float32)
        assert torch.equal(weight, expected_weight), (
            f"dequantize_weight() must equal dequantize_nf4 of quantize_nf4(W) (block_size {case.block_size}, "
            f"{'double-dequantized absmax: each of the ' + str(-(-absmax.numel() // 256)) + ' DQ blocks its own scale' if case.double_quant else 'plain absmax'})"
        )
        bias = linear.bias.detach().float() if case.bias else torch.zeros(case.out_features)
        # Outside autocast: compute_dtype. Under bf16 autocast: what autocast's rules give (bf16 for F.linear; a bias
        # added after an autocast matmul promotes), checked to bf16's rounding.
        dtype = torch.bfloat16 if case.autocast else compute
        inputs = [(leading, layout, compute) for leading in LEADING for layout in LAYOUTS]  # x needing no cast
        inputs += [((2, 3), "transposed", x_dtype) for x_dtype in FLOATS if x_dtype != compute]
        for leading, layout, x_dtype in inputs:  # every input for the same layer
            x = in_layout(torch.randn(*leading, case.in_features, generator=gen).to(x_dtype), layout).requires_grad_()
            what = f"NF4Linear(x) for a {short(x_dtype)} x of shape {tuple(x.shape)}, {describe_layout(x, layout)}"
            kept = x.detach().clone()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.autocast):
                out = layer(x)
            assert torch.equal(x, kept), f"{what}: forward changed its input x"
            expect_tensor(out, (*leading, case.out_features), what,
                          hint="a 1-D x (one token, no batch) gives a 1-D output")  # fmt: skip
            assert case.autocast or out.dtype == compute, (
                f"{what}: the output must be {short(compute)} (compute_dtype), got {out.dtype}: cast x to "
                "compute_dtype and compute there, whatever x's dtype"
            )
            ref = reference(lambda x, W, b: x @ W.T + b, x, weight, bias, dtype=dtype, steps=case.in_features + 6)
            assert_close(out, ref.value, what, bound=ref.bound,
                         hint="cast x to compute_dtype, then an ordinary linear with the dequantized weight (in "
                              "compute_dtype) and the bias; flatten x with reshape, never view")  # fmt: skip
            # ∂L/∂x = ∂L/∂y · Ŵ: Ŵ rounded to the product's dtype, a dot product of length out, a cast to x's dtype.
            grad_y = torch.randn(out.shape, generator=gen).to(out.dtype)
            run_backward(out, grad_y, f"∂L/∂x of {what}")
            grad_x = x.grad
            grad = reference(lambda g, W: g @ W, grad_y, weight, dtype=dtype, steps=case.out_features + 1)
            assert_close(grad_x, grad.value, f"∂L/∂x of {what}", dtype=x_dtype,
                         bound=grad.bound + UNIT_ROUNDOFF[x_dtype] * (grad.value.abs() + grad.bound),
                         hint=GRADIENT_HINT + ", returned in x's shape and dtype")  # fmt: skip

    for_all(cases(in_features=st.integers(1, 40), out_features=st.integers(1, 40), bias=st.sampled_from([True, False]),
                  block_size=st.sampled_from([64, 1, 4, 7]), double_quant=st.booleans(),
                  weight_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
                  compute_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]),
                  autocast=st.booleans(), seed=st.integers(0, 2**16)), check)  # fmt: skip


@pytest.mark.exercise("3.7")
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_fake_quantize_for_every_shape_dtype_magnitude_and_layout(quant, magnitude):
    """Any x: same dtype and shape out, the value dequantize(quantize(x)) within x's dtype's rounding, gradient passed as is."""

    def check(case):
        x = case.x.make().requires_grad_()
        y = quant.fake_quantize(x, num_bits=case.num_bits, block_size=case.block_size)
        expect_tensor(y, tuple(x.shape), "fake_quantize(x)", dtype=x.dtype,
                      hint="the straight-through estimator returns x's dtype and shape: cast x̂ to x.dtype")  # fmt: skip
        q, scale, zero_point = quant.quantize_tensor(x.detach(), case.num_bits, case.block_size)
        x_hat = quant.dequantize_tensor(q, scale, zero_point, case.block_size).double()
        u, sub = max(unit_roundoff(x.dtype), U32), smallest_subnormal(x.dtype)
        # x̂ cast to x's dtype, then x + (x̂ − x): three roundings in x's dtype (float32's at least: x̂ is float32) at most.
        assert_close(y, x_hat, "fake_quantize(x) vs dequantize(quantize(x))",
                     bound=3 * u * (x_hat.abs() + 2 * x.detach().double().abs()) + 3 * sub)  # fmt: skip
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.x.seed)).to(x.dtype)
        (y * weight).sum().backward()
        expect_tensor(x.grad, tuple(x.shape), "dL/dx", dtype=x.dtype)
        assert torch.equal(x.grad, weight), "straight-through: dL/dx must equal dL/dy exactly (the rounding is skipped)"

    for_all(cases(x=tensor_cases(shapes(allow_scalar=True), magnitudes=(magnitude,)), num_bits=st.integers(2, 8),
                  block_size=st.sampled_from([None, 64, 1, 5])), check, salt=magnitude)  # fmt: skip
