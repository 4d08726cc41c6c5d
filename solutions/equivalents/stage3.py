"""Equivalents of Stage 3: correct quantization code written differently; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "uniform_scale_by_reciprocal",
        "3.1",
        "q = round(x · (1/scale)) instead of round(x / scale), dividing only where 1/scale overflows (a subnormal scale).",
        (
            (
                "q = torch.round(blocks / scale[:, None]) + zero_point[:, None]",
                "inverse = (1.0 / scale)[:, None]\n"
                "    scaled = torch.where(torch.isinf(inverse), blocks / scale[:, None], blocks * inverse)\n"
                "    q = torch.round(scaled) + zero_point[:, None]",
            ),
        ),
    ),
    Variant(
        "absmax_with_amax_and_div",
        "3.2",
        "The block absmax with amax(|x|), the codes with torch.div then round.",
        (("scale = blocks.abs().max(dim=1).values / qmax", "scale = torch.amax(blocks.abs(), dim=1) / qmax"),),
    ),
    Variant(
        "nearest_by_counting_midpoints",
        "3.4",
        "The code index as a count of midpoints strictly below each value (a comparison, not searchsorted).",
        block="3.4: midpoints, then count those below",
        code="""
            midpoints = (code[1:] + code[:-1]) / 2
            return (values.unsqueeze(-1) > midpoints).sum(dim=-1).to(torch.uint8)
            """,
    ),
    Variant(
        "nearest_by_bucketize",
        "3.4",
        "torch.bucketize on the midpoints (right=False keeps ties on the lower code).",
        (
            (
                "torch.searchsorted(midpoints, values.contiguous(), right=False, out_int32=True)",
                "torch.bucketize(values, midpoints, right=False, out_int32=True)",
            ),
        ),
    ),
    Variant(
        "pack_with_arithmetic",
        "3.4",
        "Two codes per byte with arithmetic (16 · high + low) instead of shifts.",
        (
            (
                "return (pairs[:, 0] << 4) | pairs[:, 1]",
                "return (pairs[:, 0].int() * 16 + pairs[:, 1].int()).to(torch.uint8)",
            ),
        ),
    ),
    Variant(
        "dequantize_with_repeat_interleave",
        "3.4",
        "Each element's absmax gathered with repeat_interleave instead of reshaping into blocks.",
        (
            (
                "    blocks.view(-1)[codes.numel() :] = 0  # the padding of a partial last block\n"
                "    blocks *= absmax.reshape(-1, 1).float()  # scale in place: (n_blocks, block_size)\n"
                "    return values",
                "    return values * absmax.float().repeat_interleave(block_size)[: codes.numel()]",
            ),
        ),
    ),
    Variant(
        "dequantize_nf4_by_unpacking",
        "3.4",
        "dequantize_nf4 by the plain route the stub names: unpack_nibbles, then dequantize_blockwise (no word table).",
        block="3.4: unpack, look up, scale, reshape",
        code="""
            numel = math.prod(shape)
            if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
                raise ValueError(f"packed must be uint8 with ceil({numel} / 2) bytes, got {packed.numel()}")
            codes = unpack_nibbles(packed, numel)  # (numel,) uint8 in 0..15
            values = dequantize_blockwise(codes, absmax, cached_code_book("nf4", packed.device), block_size)
            return values.view(shape).to(dtype)
        """,
    ),
    Variant(
        "mean_accumulated_in_order",
        "3.5",
        "The offset accumulated one value after another in float32 (cumsum), a different order than torch.mean.",
        (
            (
                "    offset = absmax.float().mean()\n",
                "    offset = torch.cumsum(absmax.float(), dim=0)[-1] / absmax.numel()\n",
            ),
        ),
    ),
    Variant(
        "mean_as_sum_over_count",
        "3.5",
        "The offset as sum / count in float64, rounded to float32 (another order than torch.mean).",
        (("    offset = absmax.float().mean()\n", "    offset = (absmax.double().sum() / absmax.numel()).float()\n"),),
    ),
    Variant(
        "nf4_linear_forward_with_matmul",
        "3.6",
        "The 4-bit matmul's forward as x @ Wᵀ + b with matmul instead of F.linear.",
        block="3.6: dequantize in x's dtype",
        code="""
            ctx.layer, ctx.dtype = layer, x.dtype
            out = x @ layer.dequantize_weight(x.dtype).T
            return out if bias is None else out + bias
            """,
    ),
    Variant(
        "straight_through_autograd_function",
        "3.7",
        "The straight-through estimator as a torch.autograd.Function.",
        block="3.7: quantize-dequantize, straight-through gradient",
        code="""
            class _RoundTrip(torch.autograd.Function):
                @staticmethod
                def forward(ctx, t):
                    q, scale, zero_point = quantize_tensor(t, num_bits, block_size)
                    return dequantize_tensor(q, scale, zero_point, block_size).to(t.dtype)

                @staticmethod
                def backward(ctx, grad):
                    return grad

            return _RoundTrip.apply(x)
            """,
    ),
    Variant(
        "uniform_range_in_float64",
        "3.1",
        "The scale computed from the range in float64, then rounded to float32 (no overflow near 2^127 either).",
        (
            (
                "    scale = (hi - lo) / qmax\n"
                "    scale = torch.where(torch.isinf(scale), hi / qmax - lo / qmax, scale)  # hi − lo overflowed: |x| near 2^127\n",
                "    scale = ((hi.double() - lo.double()) / qmax).float()\n",
            ),
        ),
    ),
    Variant(
        "nf4_tiny_blocks_fixed_afterwards",
        "3.4",
        "Every block scaled by the reciprocal, then the blocks whose reciprocal overflowed recomputed by division.",
        (
            (
                "    scaled = torch.where(tiny, blocks / absmax[:, None], blocks * inverse[:, None]).clamp_(-1, 1)",
                "    scaled = blocks * inverse[:, None]\n"
                "    rows = tiny.squeeze(1).nonzero().squeeze(1)\n"
                "    scaled[rows] = blocks[rows] / absmax[rows, None]\n"
                "    scaled = scaled.clamp(-1, 1)",
            ),
        ),
    ),
    Variant(
        "pack_nibbles_contiguous_copy",
        "3.4",
        "pack_nibbles makes the codes contiguous first, then flattens with view.",
        (("    flat = codes.reshape(-1).to(torch.uint8)", "    flat = codes.contiguous().view(-1).to(torch.uint8)"),),
    ),
    Variant(
        "straight_through_added_to_x_hat",
        "3.7",
        "The straight-through estimator written x̂ + (x − x.detach()): the value is x̂ cast once, the gradient the identity.",
        (
            (
                "    return x + (x_hat - x).detach()",
                "    return x_hat + (x - x.detach())",
            ),
        ),
    ),
    # ---- issue 20 item 1: the 4-bit matmul, written other ways ----
    Variant(
        "nf4_linear_f_linear_under_checkpoint",
        "3.6",
        "NF4Linear.forward as the F.linear route recomputed under torch.utils.checkpoint: nothing of Ŵ is kept.",
        block="3.6: the 4-bit matmul",
        code="""
            from torch.utils.checkpoint import checkpoint

            def linear(x: torch.Tensor) -> torch.Tensor:
                bias = None if self.bias is None else self.bias.to(self.compute_dtype)
                return F.linear(x.to(self.compute_dtype), self.dequantize_weight(), bias)

            return checkpoint(linear, x, use_reentrant=False)
            """,
    ),
    Variant(
        "nf4_matmul_backward_as_batched_matvec",
        "3.6",
        "∂L/∂x as Ŵᵀ (∂L/∂y)ᵀ, one matrix-vector product per row: torch.matmul in another order.",
        (
            (
                "            grad_x = grad_y @ weight  # (..., out) @ (out, in) -> (..., in)\n",
                "            grad_x = torch.matmul(weight.t(), grad_y.unsqueeze(-1)).squeeze(-1)  # (..., in)\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_saves_the_codes",
        "3.6",
        "MatMul4Bit saves the packed codes and the absmax with save_for_backward and calls dequantize_nf4 itself.",
        (
            (
                "        ctx.layer, ctx.dtype = layer, x.dtype\n",
                "        ctx.save_for_backward(layer.packed, layer.dequantized_absmax())\n"
                "        ctx.shape, ctx.block_size, ctx.dtype = (layer.out_features, layer.in_features), layer.block_size, x.dtype\n",
            ),
            (
                "            weight = ctx.layer.dequantize_weight(ctx.dtype)  # (out, in), dequantized a second time\n",
                "            packed, absmax = ctx.saved_tensors\n"
                "            weight = dequantize_nf4(packed, absmax, ctx.shape, ctx.block_size, ctx.dtype)\n",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_bias_added_outside",
        "3.6",
        "The Function computes x Ŵᵀ only; matmul_4bit adds the bias (cast to the product's dtype) afterwards.",
        (
            (
                "    return MatMul4Bit.apply(x.to(dtype), layer, bias)",
                "    y = MatMul4Bit.apply(x.to(dtype), layer, None)\n    return y if bias is None else y + bias",
            ),
        ),
    ),
    Variant(
        "nf4_matmul_gradient_in_compute_dtype",
        "3.6",
        "The backward returns ∂L/∂x in the layer's compute_dtype: autograd casts every gradient to its input's dtype.",
        (
            (
                "        return grad_x, None, grad_bias\n",
                "        return grad_x.to(ctx.layer.compute_dtype) if grad_x is not None else None, None, grad_bias\n",
            ),
        ),
    ),
]
