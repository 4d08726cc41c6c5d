"""Mutants of model/quant.py (Stage 3)."""

from testcases.mutants import Mutant

F = "model/quant.py"

MUTANTS = [
    Mutant(
        "uniform_range_without_zero",
        F,
        "Uniform quantization uses [min, max] without widening it to include 0 (0 is not exact).",
        (
            ("lo = blocks.min(dim=1).values.clamp(max=0)", "lo = blocks.min(dim=1).values"),
            ("hi = blocks.max(dim=1).values.clamp(min=0)", "hi = blocks.max(dim=1).values"),
        ),
    ),
    Mutant(
        "uniform_zero_point_not_rounded",
        F,
        "The zero point is kept as a float instead of an integer code.",
        (("zero_point = torch.round(-lo / scale).clamp(0, qmax)", "zero_point = (-lo / scale).clamp(0, qmax)"),),
    ),
    Mutant(
        "absmax_unsigned_qmax",
        F,
        "Symmetric quantization uses qmax = 2^b - 1 (the unsigned range) instead of 2^(b-1) - 1.",
        (("qmax = 2 ** (num_bits - 1) - 1", "qmax = 2**num_bits - 1"),),
    ),
    Mutant(
        "symmetric_nf4_table",
        F,
        "The symmetric 15-value 'NF4' table from widely shared notes (7 positive levels instead of 8).",
        (
            (
                "positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())",
                "positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())",
            ),
        ),
    ),
    Mutant(
        "nf4_float64_levels",
        F,
        "The NF4 probabilities are made in float64, so levels differ from the published table by an ulp.",
        (
            (
                "positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())",
                "positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])",
            ),
            (
                "negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())",
                "negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])",
            ),
        ),
    ),
    Mutant(
        "blocks_per_row",
        F,
        "Blocks are cut per row of the weight instead of over the flattened tensor.",
        (
            (
                "    return to_blocks(x.float(), block_size).abs().amax(dim=1)",
                "    rows = x.float().reshape(x.shape[0] if x.dim() > 1 else 1, -1)\n"
                "    return torch.cat([to_blocks(row, block_size).abs().max(dim=1).values for row in rows])",
            ),
        ),
    ),
    Mutant(
        "one_absmax_for_the_tensor",
        F,
        "One absmax for the whole tensor instead of one per block.",
        (
            (
                "    return to_blocks(x.float(), block_size).abs().amax(dim=1)",
                "    blocks = to_blocks(x.float(), block_size)\n"
                "    return blocks.abs().max().expand(blocks.shape[0]).clone()",
            ),
        ),
    ),
    Mutant(
        "low_nibble_first",
        F,
        "The even-indexed code goes into the LOW nibble (bitsandbytes puts it in the high one).",
        (("return (pairs[:, 0] << 4) | pairs[:, 1]", "return (pairs[:, 1] << 4) | pairs[:, 0]"),),
    ),
    Mutant(
        "divide_instead_of_reciprocal",
        F,
        "Scaling by x / absmax instead of x * (1 / absmax): codes flip on midpoints.",
        (
            (
                "scaled = (to_blocks(x.float(), block_size) * inverse[:, None]).clamp_(-1, 1)",
                "scaled = (to_blocks(x.float(), block_size) / torch.where(absmax > 0, absmax, 1.0)[:, None]).clamp_(-1, 1)",
            ),
        ),
    ),
    Mutant(
        "ties_round_up",
        F,
        "A value exactly between two levels takes the upper one (round half up).",
        (
            (
                "torch.searchsorted(midpoints, values.contiguous(), right=False, out_int32=True)",
                "torch.searchsorted(midpoints, values.contiguous(), right=True, out_int32=True)",
            ),
        ),
    ),
    Mutant(
        "pad_with_code_zero",
        F,
        "An odd count is padded with code 0 (-1.0) instead of the code of 0.0.",
        (("pack_nibbles(codes, pad=int(nearest_code(torch.zeros(1, device=x.device), code)))", "pack_nibbles(codes)"),),
    ),
    Mutant(
        "dequantize_drops_partial_block",
        F,
        "Dequantization forgets the last partial block (only full blocks are scaled).",
        (
            (
                "    blocks = to_blocks(values, block_size) * absmax.reshape(-1, 1).float()  # (n_blocks, block_size)",
                "    full = numel // block_size\n"
                "    blocks = torch.cat([to_blocks(values, block_size)[:full] * absmax[:full].reshape(-1, 1).float(),"
                " torch.zeros(1, block_size, device=values.device)])",
            ),
        ),
    ),
    Mutant(
        "double_quant_without_offset",
        F,
        "Double quantization without subtracting the mean of the absmax values.",
        (("    offset = absmax.float().mean()\n", "    offset = torch.zeros(())\n"),),
    ),
    Mutant(
        "double_quant_no_offset_back",
        F,
        "Double dequantization forgets to add the offset back.",
        (
            (
                'cached_code_book("dynamic", codes.device), block_size) + offset',
                'cached_code_book("dynamic", codes.device), block_size)',
            ),
        ),
    ),
    Mutant(
        "bits_without_dq_scales",
        F,
        "Bits per parameter with double quantization forget the second-level fp32 scales.",
        (("return 4 + 8 / block_size + 32 / (block_size * dq_block_size)", "return 4 + 8 / block_size"),),
    ),
    Mutant(
        "nf4_linear_drops_bias",
        F,
        "NF4Linear.forward ignores the bias.",
        (
            (
                "return F.linear(x.to(self.compute_dtype), weight, bias)",
                "return F.linear(x.to(self.compute_dtype), weight)",
            ),
        ),
    ),
    Mutant(
        "nf4_linear_nbytes_codes_only",
        F,
        "weight_nbytes counts the packed codes but not the quantization constants.",
        (
            (
                "return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())",
                "return self.packed.numel() * self.packed.element_size()",
            ),
        ),
    ),
    Mutant(
        "fake_quantize_no_ste",
        F,
        "fake_quantize returns the quantized value directly: rounding kills the gradient.",
        (("return x + (x_hat - x).detach()", "return x_hat"),),
    ),
]
