"""Stage 3 advanced tests: every bit width, signs, zero blocks, bad input, bitsandbytes' golden vectors,
double quantization at other block sizes, NF4Linear with biases and several DQ blocks, devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from testcases.helpers import generator, observe, word
from testcases.stage3.basic import U32, check_double_quantization, half_step_bound, nf4_bound, per_element
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
    with pytest.raises(ValueError, match=word(argument)):
        quant.quantize_tensor(torch.randn(8), **{argument: value})


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_uniform_rejects_non_finite_input(quant, bad):
    """A NaN or inf in x raises a ValueError naming x (it would poison its block's scale)."""
    x = torch.randn(8)
    x[2] = bad
    with pytest.raises(ValueError, match=word("x")):
        quant.quantize_tensor(x)


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
    with pytest.raises(ValueError, match=word("scale")):
        quant.dequantize_tensor(q, scale, zero_point, block_size=25)  # 4 blocks, 2 scales


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
    with pytest.raises(ValueError, match=word("num_bits")):
        quant.absmax_quantize(x, num_bits=16)
    with pytest.raises(ValueError, match=word("x")):
        quant.absmax_quantize(torch.tensor([1.0, float("nan")]))


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


@pytest.mark.exercise("3.3")
def test_nf4_beats_fp4_and_int4_on_gaussian_weights(quant):
    """On Gaussian weights NF4 has a lower mean error than FP4 and int4 at the same block size."""
    x = torch.randn(64 * 512)
    errors = {}
    for name, code in (("nf4", quant.nf4_code_book()), ("fp4", quant.fp4_code_book())):
        codes, absmax = quant.quantize_blockwise(x, code, 64)
        errors[name] = (quant.dequantize_blockwise(codes, absmax, code, 64) - x).abs().mean().item()
    q, scale = quant.absmax_quantize(x, num_bits=4, block_size=64)
    errors["int4"] = (quant.absmax_dequantize(q, scale, block_size=64) - x).abs().mean().item()
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
    with pytest.raises(ValueError, match=word("x")):
        quant.quantize_nf4(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=word("block_size")):
        quant.quantize_nf4(torch.randn(10), block_size=0)
    packed, absmax = quant.quantize_nf4(torch.randn(10))
    with pytest.raises(ValueError, match=word("packed")):
        quant.dequantize_nf4(packed, absmax, (4, 4))  # 16 elements need 8 bytes, not 5


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
