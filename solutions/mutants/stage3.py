"""Mutants of Stage 3 (model/quant.py): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    Variant(
        "uniform_range_without_zero",
        "3.1",
        "Uniform quantization uses [min, max] without widening it to include 0 (0 is not exact).",
        (
            ("lo = blocks.min(dim=1).values.clamp(max=0)", "lo = blocks.min(dim=1).values"),
            ("hi = blocks.max(dim=1).values.clamp(min=0)", "hi = blocks.max(dim=1).values"),
        ),
    ),
    Variant(
        "uniform_max_not_widened",
        "3.1",
        "The range is widened below (min ≤ 0) but not above: all-negative data breaks.",
        (("hi = blocks.max(dim=1).values.clamp(min=0)", "hi = blocks.max(dim=1).values"),),
    ),
    Variant(
        "uniform_zero_point_not_rounded",
        "3.1",
        "The zero point is kept as a float instead of an integer code.",
        (("zero_point = torch.round(-lo / scale).clamp(0, qmax)", "zero_point = (-lo / scale).clamp(0, qmax)"),),
    ),
    Variant(
        "uniform_truncates",
        "3.1",
        "x / scale is truncated toward zero instead of rounded (error up to a whole step).",
        (
            (
                "q = torch.round(blocks / scale[:, None]) + zero_point[:, None]",
                "q = torch.trunc(blocks / scale[:, None]) + zero_point[:, None]",
            ),
        ),
    ),
    Variant(
        "uniform_dequantize_skips_the_check",
        "3.1",
        "dequantize_tensor accepts constants that do not fit the codes (broadcasts or crashes).",
        (("    if scale.numel() != blocks.shape[0] or zero_point.numel() != blocks.shape[0]:", "    if False:"),),
    ),
    Variant(
        "absmax_unsigned_qmax",
        "3.2",
        "Symmetric quantization uses qmax = 2^b - 1 (the unsigned range) instead of 2^(b-1) - 1.",
        (("qmax = 2 ** (num_bits - 1) - 1", "qmax = 2**num_bits - 1"),),
    ),
    Variant(
        "absmax_of_signed_values",
        "3.2",
        "The scale uses max(x) instead of max |x|: negative blocks break.",
        (("scale = blocks.abs().max(dim=1).values / qmax", "scale = blocks.max(dim=1).values / qmax"),),
    ),
    Variant(
        "symmetric_nf4_table",
        "3.3",
        "The symmetric 15-value 'NF4' table from widely shared notes (7 positive levels instead of 8).",
        (
            (
                "positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())",
                "positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())",
            ),
        ),
    ),
    Variant(
        "nf4_float64_levels",
        "3.3",
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
    Variant(
        "fp4_without_subnormal",
        "3.3",
        "FP4 without its subnormal 0.5 (only 0, 1, 1.5, ...).",
        (("                magnitudes.append(mantissa * 0.5)", "                magnitudes.append(0.0)"),),
    ),
    Variant(
        "blocks_per_row",
        "3.4",
        "Blocks are cut per row of the weight instead of over the flattened tensor.",
        (
            (
                "    blocks = to_blocks(x.float(), block_size)  # (n_blocks, block_size)\n"
                "    return torch.maximum(blocks.amax(dim=1).abs(), blocks.amin(dim=1).abs())  # max |x| without an |x| copy",
                "    rows = x.float().reshape(x.shape[0] if x.dim() > 1 else 1, -1)\n"
                "    return torch.cat([to_blocks(row, block_size).abs().max(dim=1).values for row in rows])",
            ),
        ),
    ),
    Variant(
        "one_absmax_for_the_tensor",
        "3.4",
        "One absmax for the whole tensor instead of one per block.",
        (
            (
                "    blocks = to_blocks(x.float(), block_size)  # (n_blocks, block_size)\n"
                "    return torch.maximum(blocks.amax(dim=1).abs(), blocks.amin(dim=1).abs())  # max |x| without an |x| copy",
                "    blocks = to_blocks(x.float(), block_size)\n    return blocks.abs().max().expand(blocks.shape[0]).clone()",
            ),
        ),
    ),
    Variant(
        "nf4_absmax_without_abs",
        "3.4",
        "The NF4 block constant is max(x), not max |x|: negative blocks break.",
        (
            (
                "    blocks = to_blocks(x.float(), block_size)  # (n_blocks, block_size)\n"
                "    return torch.maximum(blocks.amax(dim=1).abs(), blocks.amin(dim=1).abs())  # max |x| without an |x| copy",
                "    blocks = to_blocks(x.float(), block_size)  # (n_blocks, block_size)\n"
                "    return blocks.amax(dim=1)",
            ),
        ),
    ),
    Variant(
        "low_nibble_first",
        "3.4",
        "The even-indexed code goes into the LOW nibble (bitsandbytes puts it in the high one).",
        (("return (pairs[:, 0] << 4) | pairs[:, 1]", "return (pairs[:, 1] << 4) | pairs[:, 0]"),),
    ),
    Variant(
        "divide_instead_of_reciprocal",
        "3.4",
        "Scaling by x / absmax instead of x * (1 / absmax): codes flip on midpoints.",
        (
            (
                "scaled = torch.where(tiny, blocks / absmax[:, None], blocks * inverse[:, None]).clamp_(-1, 1)",
                "scaled = (blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]).clamp_(-1, 1)",
            ),
        ),
    ),
    Variant(
        "ties_round_up",
        "3.4",
        "A value exactly between two levels takes the upper one (round half up).",
        (
            (
                "torch.searchsorted(midpoints, values.contiguous(), right=False, out_int32=True)",
                "torch.searchsorted(midpoints, values.contiguous(), right=True, out_int32=True)",
            ),
        ),
    ),
    Variant(
        "pad_with_code_zero",
        "3.4",
        "An odd count is padded with code 0 (-1.0) instead of the code of 0.0.",
        (("pack_nibbles(codes, pad=int(nearest_code(torch.zeros(1, device=x.device), code)))", "pack_nibbles(codes)"),),
    ),
    Variant(
        "dequantize_drops_partial_block",
        "3.4",
        "Dequantization forgets the last partial block (its values come back as 0).",
        (
            (
                "    blocks *= absmax.reshape(-1, 1).float()  # each block times its absmax, in place\n",
                "    blocks *= absmax.reshape(-1, 1).float()  # each block times its absmax, in place\n"
                "    if numel % block_size:\n        blocks[-1] = 0\n",
            ),
        ),
    ),
    Variant(
        "dequantize_ignores_dtype",
        "3.4",
        "dequantize_nf4 always returns float32, whatever dtype is asked for.",
        (("    return out[:numel].view(shape).to(dtype)", "    return out[:numel].view(shape)"),),
    ),
    Variant(
        "double_quant_without_offset",
        "3.5",
        "Double quantization without subtracting the mean of the absmax values.",
        (("    offset = absmax.float().mean()\n", "    offset = torch.zeros((), device=absmax.device)\n"),),
    ),
    Variant(
        "double_quant_no_offset_back",
        "3.5",
        "Double dequantization forgets to add the offset back.",
        (
            (
                'cached_code_book("dynamic", codes.device), block_size) + offset',
                'cached_code_book("dynamic", codes.device), block_size)',
            ),
        ),
    ),
    Variant(
        "double_quant_fixed_block",
        "3.5",
        "double_quantize ignores its block_size and always uses 256.",
        (
            (
                'cached_code_book("dynamic", absmax.device), block_size)',
                'cached_code_book("dynamic", absmax.device), 256)',
            ),
        ),
    ),
    Variant(
        "bits_without_dq_scales",
        "3.5",
        "Bits per parameter with double quantization forget the second-level fp32 scales.",
        (("return 4 + 8 / block_size + 32 / (block_size * dq_block_size)", "return 4 + 8 / block_size"),),
    ),
    Variant(
        "bits_fixed_dq_block",
        "3.5",
        "Bits per parameter with double quantization ignore dq_block_size (always 256).",
        (
            (
                "return 4 + 8 / block_size + 32 / (block_size * dq_block_size)",
                "return 4 + 8 / block_size + 32 / (block_size * 256)",
            ),
        ),
    ),
    Variant(
        "nf4_linear_drops_bias",
        "3.6",
        "NF4Linear ignores the bias: the 4-bit matmul's Function gets none.",
        (
            (
                "return MatMul4Bit.apply(x.to(dtype), layer, bias)",
                "return MatMul4Bit.apply(x.to(dtype), layer, None)",
            ),
        ),
    ),
    Variant(
        "nf4_linear_bias_not_copied",
        "3.6",
        "from_linear keeps a zero bias instead of copying the layer's.",
        (("            layer.bias.data.copy_(linear.bias.detach().float())", "            pass"),),
    ),
    Variant(
        "nf4_linear_first_dq_scale_only",
        "3.6",
        "The double-dequantized absmax uses the first DQ block's scale for every block.",
        (
            (
                "return double_dequantize(self.absmax_codes, self.absmax_scale, self.absmax_offset)",
                "return double_dequantize(self.absmax_codes, self.absmax_scale[:1].expand_as(self.absmax_scale), self.absmax_offset)",
            ),
        ),
    ),
    Variant(
        "nf4_linear_ignores_block_size",
        "3.6",
        "from_linear quantizes in blocks of 64 whatever block_size says.",
        (
            (
                "        packed, absmax = quantize_nf4(weight, block_size)",
                "        packed, absmax = quantize_nf4(weight)",
            ),
        ),
    ),
    Variant(
        "nf4_linear_nbytes_codes_only",
        "3.6",
        "weight_nbytes counts the packed codes but not the quantization constants.",
        (
            (
                "return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())",
                "return self.packed.numel() * self.packed.element_size()",
            ),
        ),
    ),
    Variant(
        "fake_quantize_no_ste",
        "3.7",
        "fake_quantize returns the quantized value directly: rounding kills the gradient.",
        (("return x + (x_hat - x).detach()", "return x_hat"),),
    ),
    Variant(
        "fake_quantize_per_tensor",
        "3.7",
        "fake_quantize ignores block_size and quantizes the whole tensor with one scale.",
        (
            (
                "    q, scale, zero_point = quantize_tensor(x.detach(), num_bits, block_size)\n"
                "    x_hat = dequantize_tensor(q, scale, zero_point, block_size).to(x.dtype)",
                "    q, scale, zero_point = quantize_tensor(x.detach(), num_bits)\n"
                "    x_hat = dequantize_tensor(q, scale, zero_point).to(x.dtype)",
            ),
        ),
    ),
    # Promises of lesson 03 that the suites grade.
    Variant(
        "zero_point_as_float",
        "3.1",
        "The zero point is returned as float32 instead of int32.",
        (
            (
                "    return from_blocks(q, x.shape), scale, zero_point.to(torch.int32)",
                "    return from_blocks(q, x.shape), scale, zero_point",
            ),
        ),
    ),
    Variant(
        "absmax_scale_in_input_dtype",
        "3.2",
        "absmax quantization computes (and returns) the scale in the input's dtype.",
        (
            (
                "    qmax = 2 ** (num_bits - 1) - 1\n    blocks = to_blocks(x.float(), block_size)",
                "    qmax = 2 ** (num_bits - 1) - 1\n    blocks = to_blocks(x, block_size)",
            ),
        ),
    ),
    Variant(
        "pack_ignores_pad",
        "3.4",
        "pack_nibbles always pads with 7, whatever pad says.",
        (("        flat = F.pad(flat, (0, 1), value=pad)", "        flat = F.pad(flat, (0, 1), value=7)"),),
    ),
    Variant(
        "nf4_linear_caches_weight",
        "3.6",
        "NF4Linear keeps its first dequantized weight and reuses it (stale after load_state_dict).",
        (
            (
                "        weight = layer.dequantize_weight(x.dtype)  # (out, in): a local, gone when forward returns",
                "        if not hasattr(layer, '_cached'):\n            layer._cached = layer.dequantize_weight(x.dtype)\n        weight = layer._cached",
            ),
        ),
    ),
    Variant(
        "compute_dtype_defaults_to_fp32",
        "3.6",
        "from_linear computes in float32 by default instead of in the weight's dtype.",
        (
            (
                "            compute_dtype=compute_dtype or weight.dtype,",
                "            compute_dtype=compute_dtype or torch.float32,",
            ),
        ),
    ),
    # ---- issue 20 item 1: the 4-bit matmul (MatMul4Bit, matmul_4bit) ----
    Variant(
        "nf4_matmul_plain_f_linear",
        "3.6",
        "matmul_4bit returns F.linear(x, Ŵ, b) directly: autograd saves Ŵ (out, in) until the backward.",
        (
            (
                "    return MatMul4Bit.apply(x.to(dtype), layer, bias)",
                "    return F.linear(x.to(dtype), layer.dequantize_weight(dtype), bias)",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_saves_weight",
        "3.6",
        "MatMul4Bit saves the dequantized weight with ctx.save_for_backward and reuses it in backward.",
        (
            (
                "        weight = layer.dequantize_weight(x.dtype)  # (out, in): a local, gone when forward returns\n",
                "        weight = layer.dequantize_weight(x.dtype)  # (out, in): a local, gone when forward returns\n"
                + "        ctx.save_for_backward(weight)\n",
            ),
            (
                "            weight = ctx.layer.dequantize_weight(ctx.dtype)  # (out, in), dequantized a second time\n",
                "            (weight,) = ctx.saved_tensors\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_weight_as_ctx_attribute",
        "3.6",
        "MatMul4Bit keeps the dequantized weight as a ctx attribute (no pack hook sees it; it lives as long).",
        (
            (
                "        weight = layer.dequantize_weight(x.dtype)  # (out, in): a local, gone when forward returns\n",
                "        weight = layer.dequantize_weight(x.dtype)  # (out, in): a local, gone when forward returns\n"
                + "        ctx.weight = weight\n",
            ),
            (
                "            weight = ctx.layer.dequantize_weight(ctx.dtype)  # (out, in), dequantized a second time\n",
                "            weight = ctx.weight\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_transposed_gradient",
        "3.6",
        "The backward forms ∂L/∂x with the transposed weight, ∂L/∂y · Ŵᵀ (runs on square layers only).",
        (
            (
                "            grad_x = grad_y @ weight  # (..., out) @ (out, in) -> (..., in)\n",
                "            grad_x = grad_y @ weight.T\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_backward_in_compute_dtype",
        "3.6",
        "The backward dequantizes in the layer's compute_dtype, not the dtype the forward computed in (autocast's).",
        (
            (
                "            weight = ctx.layer.dequantize_weight(ctx.dtype)  # (out, in), dequantized a second time\n",
                "            weight = ctx.layer.dequantize_weight()\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_ignores_autocast",
        "3.6",
        "matmul_4bit computes in compute_dtype with autocast turned off: under autocast y comes out float32.",
        (
            (
                "    return MatMul4Bit.apply(x.to(dtype), layer, bias)",
                "    with torch.autocast(x.device.type, enabled=False):\n"
                "        return MatMul4Bit.apply(x.to(layer.compute_dtype), layer, "
                "None if layer.bias is None else layer.bias.to(layer.compute_dtype))",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_autocast_checked_for_cuda",
        "3.6",
        "matmul_4bit asks torch.is_autocast_enabled() without a device (CUDA's state): CPU autocast is missed.",
        (
            (
                "    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)",
                "    autocast = torch.is_autocast_enabled()",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_no_bias_gradient",
        "3.6",
        "The backward never returns ∂L/∂b: a bias set to train (bias='lora_only') silently stops learning.",
        (("            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)\n", "            pass\n"),),
    ),
    Variant(
        "nf4_matmul_bias_gradient_first_dim",
        "3.6",
        "∂L/∂b summed over the first dimension only (bitsandbytes' grad_output.sum(0)): a 1-D x breaks.",
        (
            (
                "            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)\n",
                "            grad_bias = grad_y.sum(0)\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_gradient_flattened",
        "3.6",
        "The backward flattens ∂L/∂y to 2-D and returns ∂L/∂x 2-D: a 3-D x gets a gradient of the wrong shape.",
        (
            (
                "            grad_x = grad_y @ weight  # (..., out) @ (out, in) -> (..., in)\n",
                "            grad_x = grad_y.reshape(-1, grad_y.shape[-1]) @ weight\n",
            ),
        ),
    ),
    # ---- issue 19 item 7: bugs of the classes the earlier suites missed (shapes, dtypes, magnitudes, layouts) ----
    Variant(
        "uniform_range_overflows",
        "3.1",
        "The scale is (hi − lo) / qmax in float32 only: for values near ±2^127 the range overflows to inf (NaN out).",
        (
            (
                "    scale = torch.where(torch.isinf(scale), hi / qmax - lo / qmax, scale)  # hi − lo overflowed: |x| near 2^127\n",
                "",
            ),
        ),
    ),
    Variant(
        "uniform_reciprocal_overflows",
        "3.1",
        "q = round(x · (1/scale)) with a float32 reciprocal: a subnormal scale's reciprocal is inf (0 · inf = NaN).",
        (
            (
                "q = torch.round(blocks / scale[:, None]) + zero_point[:, None]",
                "q = torch.round(blocks * (1.0 / scale)[:, None]) + zero_point[:, None]",
            ),
        ),
    ),
    Variant(
        "uniform_scale_floor",
        "3.1",
        "A 'safe' scale: ranges below 1e-8 are treated as all-zero blocks (scale 1), so tiny blocks all quantize to 0.",
        (
            (
                "    scale = torch.where(scale > 0, scale, torch.ones_like(scale))\n    zero_point",
                "    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))\n    zero_point",
            ),
        ),
    ),
    Variant(
        "absmax_scale_with_epsilon",
        "3.2",
        "The absmax is clamped to at least 1e-8 'to avoid dividing by zero': blocks near 1e-9 get a far too coarse scale.",
        (
            (
                "scale = blocks.abs().max(dim=1).values / qmax",
                "scale = blocks.abs().max(dim=1).values.clamp(min=1e-8) / qmax",
            ),
        ),
    ),
    Variant(
        "nf4_reciprocal_overflow_unhandled",
        "3.4",
        "x · (1/absmax) everywhere: a block with a subnormal absmax gets inf, so its zeros become NaN → code 15.",
        (
            (
                "scaled = torch.where(tiny, blocks / absmax[:, None], blocks * inverse[:, None]).clamp_(-1, 1)",
                "scaled = (blocks * inverse[:, None]).clamp_(-1, 1)",
            ),
        ),
    ),
    Variant(
        "nf4_epsilon_in_reciprocal",
        "3.4",
        "The reciprocal is 1 / (absmax + 1e-12) 'to avoid dividing by zero': tiny blocks all collapse to the code of 0.",
        (
            (
                "inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))",
                "inverse = 1.0 / (absmax + 1e-12)",
            ),
        ),
    ),
    Variant(
        "pack_nibbles_views_codes",
        "3.4",
        "pack_nibbles flattens with view(-1): non-contiguous codes (a transposed or strided view) raise.",
        (("    flat = codes.reshape(-1).to(torch.uint8)", "    flat = codes.view(-1).to(torch.uint8)"),),
    ),
    Variant(
        "dequantize_nf4_misaligned_view",
        "3.4",
        "dequantize_nf4 reads the bytes as 16-bit words without copying a misaligned view (storage offset 1) first.",
        (
            (
                "if data.numel() % 2 or data.storage_offset() % 2 or not data.is_contiguous():",
                "if data.numel() % 2 or not data.is_contiguous():",
            ),
        ),
    ),
    Variant(
        "dequantize_nf4_strided_view",
        "3.4",
        "dequantize_nf4 reads the bytes as 16-bit words without copying a non-contiguous view first.",
        (
            (
                "if data.numel() % 2 or data.storage_offset() % 2 or not data.is_contiguous():",
                "if data.numel() % 2 or data.storage_offset() % 2:",
            ),
        ),
    ),
    Variant(
        "nf4_linear_bias_as_row",
        "3.6",
        "NF4Linear adds the bias as a row, bias[None, :]: a 1-D input (one token, no batch) comes out (1, out).",
        (
            (
                "        return F.linear(x, weight, bias)  # (..., out)",
                "        out = F.linear(x, weight)\n        return out if bias is None else out + bias[None, :]",
            ),
        ),
    ),
    Variant(
        "nf4_linear_computes_in_input_dtype",
        "3.6",
        "NF4Linear casts the weight to x's dtype and the result to compute_dtype: a bf16 input computes in bf16.",
        (
            (
                "    bias = None if layer.bias is None else layer.bias.to(dtype)\n"
                "    return MatMul4Bit.apply(x.to(dtype), layer, bias)",
                "    bias = None if layer.bias is None else layer.bias.to(x.dtype)\n"
                "    return MatMul4Bit.apply(x, layer, bias).to(dtype)",
            ),
        ),
    ),
    Variant(
        "nf4_linear_views_input",
        "3.6",
        "NF4Linear flattens x with view(-1, in_features): a transposed or strided input raises.",
        (
            (
                "        return F.linear(x, weight, bias)  # (..., out)",
                "        flat = x.view(-1, layer.in_features)\n"
                "        return F.linear(flat, weight, bias).view(*x.shape[:-1], layer.out_features)",
            ),
        ),
    ),
    Variant(
        "fake_quantize_returns_float32",
        "3.7",
        "fake_quantize does not cast x̂ back to x's dtype: a bf16 or fp16 input comes out float32.",
        (
            (
                "    x_hat = dequantize_tensor(q, scale, zero_point, block_size).to(x.dtype)",
                "    x_hat = dequantize_tensor(q, scale, zero_point, block_size)",
            ),
        ),
    ),
]
