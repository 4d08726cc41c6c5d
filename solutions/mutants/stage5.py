"""Mutants of Stage 5 (model/lora_variants.py): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    # ---- 5.1 rsLoRA ----------------------------------------------------------------------------
    Variant(
        "rslora_alpha_over_r",
        "5.1",
        "rslora_scaling keeps LoRA's lora_alpha / r instead of lora_alpha / √r.",
        (("    return lora_alpha / math.sqrt(r)", "    return lora_alpha / r"),),
    ),
    Variant(
        "rslora_alpha_over_r_squared",
        "5.1",
        "rslora_scaling divides by r² (squares where it should take the root).",
        (("    return lora_alpha / math.sqrt(r)", "    return lora_alpha / r**2"),),
    ),
    Variant(
        "rslora_sqrt_of_whole_ratio",
        "5.1",
        "rslora_scaling takes √(lora_alpha / r): the root of the whole LoRA scale.",
        (("    return lora_alpha / math.sqrt(r)", "    return math.sqrt(lora_alpha / r)"),),
    ),
    Variant(
        "use_rslora_without_flag",
        "5.1",
        "use_rslora changes the scale but does not set layer.use_rslora (the saved config loses it).",
        (("        layer.use_rslora = True\n", ""),),
    ),
    Variant(
        "use_rslora_after_pissa",
        "5.1",
        "use_rslora accepts a PiSSA/OLoRA/LoftQ layer whose residual used the old scale.",
        (('        if getattr(layer, "init_method", None) is not None:', "        if False:"),),
    ),
    Variant(
        "use_rslora_on_merged",
        "5.1",
        "use_rslora rescales a merged layer (W0 already holds ΔW at the old scale).",
        (
            (
                '        if layer.merged:\n            raise ValueError(f"LoRA layer {path!r} is merged; unmerge before changing its scaling")',
                "        pass",
            ),
        ),
    ),
    # ---- 5.2 DoRA ------------------------------------------------------------------------------
    Variant(
        "dora_norm_not_detached",
        "5.2",
        "DoRA's norm n keeps its graph: gradients flow through ‖W0 + s·BA‖ (DoRA §4.3 detaches it).",
        block="5.2: the row norms of the adapted weight",
        code="""
            dtype = self.norm_dtype()
            weight = dense_weight(self.base_layer, dtype)  # (out, in)
            lora_weight = (self.lora_B @ self.lora_A).to(dtype)  # (out, r) @ (r, in) -> (out, in)
            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)  # (out,)
            """,
    ),
    Variant(
        "dora_norm_over_columns",
        "5.2",
        "DoRA's norm is taken over each column (dim=0, the paper's W ∈ R^{d×k} orientation) instead of each output row.",
        (
            (
                "            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)  # (out,)",
                "            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=0)  # (out,)",
            ),
        ),
    ),
    Variant(
        "dora_norm_without_lora",
        "5.2",
        "DoRA's norm is the row norm of W0 alone, not of W0 + s·BA.",
        (
            (
                "            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)  # (out,)",
                "            return torch.linalg.norm(weight, dim=1)  # (out,)",
            ),
        ),
    ),
    Variant(
        "dora_norm_without_scaling",
        "5.2",
        "DoRA's norm forgets the scale: ‖W0 + B A‖ instead of ‖W0 + s·B A‖.",
        (
            (
                "            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)  # (out,)",
                "            return torch.linalg.norm(weight + lora_weight, dim=1)  # (out,)",
            ),
        ),
    ),
    Variant(
        "dora_magnitude_ones",
        "5.2",
        "DoRA's magnitude starts at 1 instead of the row norms (the fresh layer no longer reproduces its base).",
        (("            self.magnitude.copy_(self.weight_norm())", "            self.magnitude.fill_(1.0)"),),
    ),
    Variant(
        "dora_magnitude_from_w0",
        "5.2",
        "reset_magnitude uses ‖W0‖ instead of ‖W0 + s·BA‖ (wrong when a trained LoRA layer becomes DoRA).",
        (
            (
                "            self.magnitude.copy_(self.weight_norm())",
                "            self.magnitude.copy_(dense_weight(self.base_layer, self.norm_dtype()).norm(dim=1))",
            ),
        ),
    ),
    Variant(
        "dora_bias_rescaled",
        "5.2",
        "DoRA rescales the whole base output, bias included (W0 x must be the output without its bias).",
        (("            base = result if bias is None else result - bias", "            base = result"),),
    ),
    Variant(
        "dora_lora_term_not_rescaled",
        "5.2",
        "DoRA multiplies only the W0 x term by m/n; the LoRA term keeps scale 1.",
        (
            (
                "        dora = (scale - 1) * base + scale * lora * self.scaling  # (..., out)",
                "        dora = (scale - 1) * base + lora * self.scaling  # (..., out)",
            ),
        ),
    ),
    Variant(
        "dora_only_lora_rescaled",
        "5.2",
        "DoRA multiplies only the LoRA term by m/n and forgets the (m/n − 1)·W0 x term.",
        (
            (
                "        dora = (scale - 1) * base + scale * lora * self.scaling  # (..., out)",
                "        dora = scale * lora * self.scaling  # (..., out)",
            ),
        ),
    ),
    Variant(
        "dora_base_term_without_dropout",
        "5.2",
        "With dropout active the (m/n − 1) term still uses the clean base output (PEFT uses W0·dropout(x)).",
        (("        if dropout_active:  # PEFT: the base term sees the dropped-out input too", "        if False:"),),
    ),
    Variant(
        "dora_delta_weight_is_lora",
        "5.2",
        "DoRA's delta_weight returns s·B A, ignoring that m/n rescales W0's rows too.",
        (
            (
                "        return (self.magnitude / self.weight_norm()).view(-1, 1) * adapted - weight",
                "        return adapted - weight",
            ),
        ),
    ),
    Variant(
        "dora_merge_without_magnitude",
        "5.2",
        "DoRA's merge adds s·B A like LoRA and forgets the magnitude ratio m/n.",
        (
            (
                "            weight.copy_((factor * (weight.to(norm.dtype) + lora_weight)).to(weight.dtype))",
                "            weight.copy_((weight.to(norm.dtype) + lora_weight).to(weight.dtype))",
            ),
        ),
    ),
    Variant(
        "dora_unmerge_recomputes_norm",
        "5.2",
        "DoRA's unmerge recomputes n from the merged weight instead of dividing by the n used at merge time.",
        (
            (
                "            factor = (self.magnitude / self.merged_norm).view(-1, 1)  # (out, 1)",
                "            factor = (self.magnitude / self.weight_norm()).view(-1, 1)  # (out, 1)",
            ),
        ),
    ),
    Variant(
        "dora_unmerge_order",
        "5.2",
        "DoRA's unmerge subtracts s·B A before dividing by m/n (the inverse taken in the wrong order).",
        (
            (
                "            weight.copy_((weight.to(factor.dtype) / factor - lora_weight).to(weight.dtype))",
                "            weight.copy_(((weight.to(factor.dtype) - lora_weight) / factor).to(weight.dtype))",
            ),
        ),
    ),
    Variant(
        "dora_magnitude_frozen",
        "5.2",
        "get_dora_model leaves the magnitude frozen (only A and B train).",
        (
            (
                '    mark_trainable(model, ("lora_A", "lora_B", "magnitude"))',
                '    mark_trainable(model, ("lora_A", "lora_B"))',
            ),
        ),
    ),
    # ---- 5.3 PiSSA and OLoRA -------------------------------------------------------------------
    Variant(
        "pissa_no_residual",
        "5.3",
        "PiSSA leaves W0 whole: the top-r part is counted twice (W0 + s·BA ≠ W0).",
        (
            (
                '    residual = weight - s * lora_B @ lora_A  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "pissa")',
                '    residual = weight  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "pissa")',
            ),
        ),
    ),
    Variant(
        "pissa_bottom_singular_vectors",
        "5.3",
        "PiSSA takes the r smallest singular triplets (MiLoRA's choice) instead of the top r.",
        (
            ("    Sr = S[:r] / s", "    Sr = S[-r:] / s"),
            ("    lora_A = torch.diag(torch.sqrt(Sr)) @ Uh[:r]", "    lora_A = torch.diag(torch.sqrt(Sr)) @ Uh[-r:]"),
            (
                "    lora_B = V[:, :r] @ torch.diag(torch.sqrt(Sr))",
                "    lora_B = V[:, -r:] @ torch.diag(torch.sqrt(Sr))",
            ),
        ),
    ),
    Variant(
        "pissa_without_sqrt",
        "5.3",
        "PiSSA puts S (not √S) on both A and B: s·BA holds S² instead of S.",
        (
            ("    lora_A = torch.diag(torch.sqrt(Sr)) @ Uh[:r]", "    lora_A = torch.diag(Sr) @ Uh[:r]"),
            ("    lora_B = V[:, :r] @ torch.diag(torch.sqrt(Sr))", "    lora_B = V[:, :r] @ torch.diag(Sr)"),
        ),
    ),
    Variant(
        "pissa_all_of_s_on_a",
        "5.3",
        "PiSSA puts all of S on A and leaves B = V (the product is right, A and B are not PEFT's).",
        (
            ("    lora_A = torch.diag(torch.sqrt(Sr)) @ Uh[:r]", "    lora_A = torch.diag(Sr) @ Uh[:r]"),
            ("    lora_B = V[:, :r] @ torch.diag(torch.sqrt(Sr))", "    lora_B = V[:, :r].clone()"),
        ),
    ),
    Variant(
        "pissa_scale_not_divided",
        "5.3",
        "PiSSA does not divide S by s (the paper's s = 1): A and B are √s too large unless lora_alpha = r.",
        (("    Sr = S[:r] / s", "    Sr = S[:r]"),),
    ),
    Variant(
        "pissa_residual_without_scale",
        "5.3",
        "PiSSA subtracts B A instead of s·B A from W0 (the function moves unless s = 1).",
        (
            (
                '    residual = weight - s * lora_B @ lora_A  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "pissa")',
                '    residual = weight - lora_B @ lora_A  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "pissa")',
            ),
        ),
    ),
    Variant(
        "olora_q_r_swapped_roles",
        "5.3",
        "OLoRA takes B from R's transpose and A from Q's transpose (Q and R swapped).",
        (
            (
                "    lora_B = Q[:, :r].contiguous()  # (out, r)",
                "    lora_B = R[:r, : layer.out_features].T.contiguous()  # (out, r)",
            ),
            (
                "    lora_A = R[:r].contiguous()  # (r, in)",
                "    lora_A = Q[: layer.in_features, :r].T.contiguous()  # (r, in)",
            ),
        ),
    ),
    Variant(
        "olora_last_columns",
        "5.3",
        "OLoRA takes the last r columns of Q and rows of R instead of the first r.",
        (
            ("    lora_B = Q[:, :r].contiguous()  # (out, r)", "    lora_B = Q[:, -r:].contiguous()  # (out, r)"),
            ("    lora_A = R[:r].contiguous()  # (r, in)", "    lora_A = R[-r:].contiguous()  # (r, in)"),
        ),
    ),
    Variant(
        "olora_divides_by_scale",
        "5.3",
        "OLoRA divides A by s as PiSSA does (PEFT's OLoRA does not).",
        (("    lora_A = R[:r].contiguous()  # (r, in)", "    lora_A = (R[:r] / s).contiguous()  # (r, in)"),),
    ),
    Variant(
        "olora_no_residual",
        "5.3",
        "OLoRA leaves W0 whole: W0 + s·BA is not the original weight.",
        (
            (
                '    residual = weight - s * lora_B @ lora_A  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "olora")',
                '    residual = weight  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "olora")',
            ),
        ),
    ),
    # ---- 5.4 LoftQ -----------------------------------------------------------------------------
    Variant(
        "loftq_quantizes_w",
        "5.4",
        "LoftQ quantizes W in every iteration instead of W − s·BA (the iterations change nothing).",
        (
            (
                "        packed, absmax = quantize_nf4(weight - s * lora_B @ lora_A, block_size)",
                "        packed, absmax = quantize_nf4(weight, block_size)",
            ),
        ),
    ),
    Variant(
        "loftq_residual_not_divided",
        "5.4",
        "LoftQ factorises W − Q̂ without dividing by s (PEFT's version, right only for s = 1).",
        (
            (
                "        lora_B, lora_A = svd_split((weight - q) / s, r)",
                "        lora_B, lora_A = svd_split(weight - q, r)",
            ),
        ),
    ),
    Variant(
        "loftq_svd_of_w",
        "5.4",
        "LoftQ takes the SVD of W itself instead of the quantization residual W − Q̂.",
        (
            (
                "        lora_B, lora_A = svd_split((weight - q) / s, r)",
                "        lora_B, lora_A = svd_split(weight / s, r)",
            ),
        ),
    ),
    Variant(
        "loftq_svd_of_q_residual_sign",
        "5.4",
        "LoftQ factorises Q̂ − W (the residual's sign flipped).",
        (
            (
                "        lora_B, lora_A = svd_split((weight - q) / s, r)",
                "        lora_B, lora_A = svd_split((q - weight) / s, r)",
            ),
        ),
    ),
    Variant(
        "loftq_single_iteration",
        "5.4",
        "LoftQ runs one iteration whatever num_iters says.",
        (("    for _ in range(num_iters):", "    for _ in range(1):"),),
    ),
    Variant(
        "loftq_base_requantized_from_w",
        "5.4",
        "LoftQ's base holds NF4(W) (plain QLoRA) instead of the codes of the last iteration.",
        (
            (
                "    layer.base_layer = nf4_linear_from_codes(layer.base_layer, packed, absmax, block_size)",
                "    layer.base_layer = nf4_linear_from_codes(layer.base_layer, *quantize_nf4(weight, block_size), block_size)",
            ),
        ),
    ),
    Variant(
        "loftq_errors_skip_plain_qlora",
        "5.4",
        "LoftQ's error list leaves out plain QLoRA's ‖W − Q̂‖ (num_iters values instead of num_iters + 1).",
        (
            (
                "            errors.append(torch.linalg.norm(weight - q).item())  # plain QLoRA: B = 0",
                "            pass",
            ),
        ),
    ),
    # ---- 5.5 LoRA-FA ---------------------------------------------------------------------------
    Variant(
        "lora_fa_freezes_b",
        "5.5",
        "freeze_lora_A freezes B and trains A (the roles swapped).",
        (
            ("        layer.lora_A.requires_grad_(False)", "        layer.lora_A.requires_grad_(True)"),
            ("        layer.lora_B.requires_grad_(True)", "        layer.lora_B.requires_grad_(False)"),
        ),
    ),
    Variant(
        "lora_fa_leaves_b_as_is",
        "5.5",
        "freeze_lora_A only freezes A; a frozen B stays frozen (nothing trains).",
        (("        layer.lora_B.requires_grad_(True)\n", ""),),
    ),
    Variant(
        "lora_fa_marks_only_b",
        "5.5",
        "freeze_lora_A makes lora_B the only trainable tensor (DoRA's magnitude is frozen too).",
        (
            (
                "    for _, layer in layers:\n        layer.lora_A.requires_grad_(False)\n        layer.lora_B.requires_grad_(True)\n",
                '    mark_trainable(model, ("lora_B",))\n',
            ),
        ),
    ),
    Variant(
        "lora_fa_accepts_no_layers",
        "5.5",
        "freeze_lora_A silently does nothing on a model without LoRA layers.",
        (
            (
                '        raise ValueError("the model has no LoRA layers; call get_lora_model first")\n    for _, layer in layers:\n        layer.lora_A',
                "        return model\n    for _, layer in layers:\n        layer.lora_A",
            ),
        ),
    ),
    # ---- 5.6 VeRA ------------------------------------------------------------------------------
    Variant(
        "vera_pair_per_layer",
        "5.6",
        "get_vera_model draws a new random pair for every layer (sized to it) instead of one shared pair.",
        (
            (
                "        model.set_submodule(path, VeRALayer(module, projections, d_initial, vera_dropout))",
                "        own = vera_projections(r, module.in_features, module.out_features, projection_prng_key)\n"
                "        own = VeRAProjections(own[0].to(**placement), own[1].to(**placement), projection_prng_key)\n"
                "        model.set_submodule(path, VeRALayer(module, own, d_initial, vera_dropout))",
            ),
        ),
    ),
    Variant(
        "vera_bound_without_gain",
        "5.6",
        "vera_projections draws U(−√3/√fan_in, √3/√fan_in): Kaiming without the gain √2.",
        (
            (
                "        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))",
                "        bound = math.sqrt(3.0) / math.sqrt(shape[1])",
            ),
        ),
    ),
    Variant(
        "vera_fan_in_is_rows",
        "5.6",
        "vera_projections uses the first dimension as fan-in (fan_out).",
        (
            (
                "        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))",
                "        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[0]))",
            ),
        ),
    ),
    Variant(
        "vera_generator_reseeded",
        "5.6",
        "vera_projections reseeds the generator before vera_B: both draws start from the same state.",
        (
            (
                "        matrices.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))",
                "        generator.manual_seed(projection_prng_key)\n"
                "        matrices.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))",
            ),
        ),
    ),
    Variant(
        "vera_b_drawn_first",
        "5.6",
        "vera_projections draws vera_B before vera_A (PEFT draws A first).",
        (
            (
                "    for shape in ((r, in_features), (out_features, r)):",
                "    for shape in ((out_features, r), (r, in_features)):",
            ),
            ("    return matrices[0], matrices[1]", "    return matrices[1], matrices[0]"),
        ),
    ),
    Variant(
        "vera_d_and_b_init_swapped",
        "5.6",
        "λ_d starts at 0 and λ_b at d_initial (the two inits swapped).",
        (
            (
                "        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **placement))  # (r,)",
                "        self.lambda_d = nn.Parameter(torch.zeros(r, **placement))  # (r,)",
            ),
            (
                "        self.lambda_b = nn.Parameter(torch.zeros(out_features, **placement))  # (out,)",
                "        self.lambda_b = nn.Parameter(torch.full((out_features,), float(d_initial), **placement))  # (out,)",
            ),
        ),
    ),
    Variant(
        "vera_b_init_nonzero",
        "5.6",
        "λ_b starts at 1 (like a scale) instead of 0: a fresh VeRA layer changes its base's output.",
        (
            (
                "        self.lambda_b = nn.Parameter(torch.zeros(out_features, **placement))  # (out,)",
                "        self.lambda_b = nn.Parameter(torch.ones(out_features, **placement))  # (out,)",
            ),
        ),
    ),
    Variant(
        "vera_d_init_ignored",
        "5.6",
        "λ_d starts at 1 whatever d_initial says.",
        (
            (
                "        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **placement))  # (r,)",
                "        self.lambda_d = nn.Parameter(torch.ones(r, **placement))  # (r,)",
            ),
        ),
    ),
    Variant(
        "vera_forward_slices_last_columns",
        "5.6",
        "The thin VeRA forward slices the last in_features columns of vera_A instead of the first.",
        (
            (
                "        sliced_A = self.vera_A[:, : self.in_features]  # (r, in)\n        sliced_B = self.vera_B[: self.out_features, :]  # (out, r)\n        update",
                "        sliced_A = self.vera_A[:, -self.in_features :]  # (r, in)\n        sliced_B = self.vera_B[: self.out_features, :]  # (out, r)\n        update",
            ),
        ),
    ),
    Variant(
        "vera_delta_weight_slices_last_rows",
        "5.6",
        "VeRA's delta_weight slices the last out_features rows of vera_B instead of the first.",
        (
            (
                "        sliced_B = self.vera_B[: self.out_features, :]  # (out, r)\n        return",
                "        sliced_B = self.vera_B[-self.out_features :, :]  # (out, r)\n        return",
            ),
        ),
    ),
    Variant(
        "vera_dropout_on_output",
        "5.6",
        "VeRA's dropout is applied to the update instead of the VeRA input.",
        (
            ("        x = self.vera_dropout(x.to(self.lambda_d.dtype))", "        x = x.to(self.lambda_d.dtype)"),
            (
                "        update = self.lambda_b * F.linear(self.lambda_d * F.linear(x, sliced_A), sliced_B)  # (..., out)",
                "        update = self.vera_dropout(self.lambda_b * F.linear(self.lambda_d * F.linear(x, sliced_A), sliced_B))",
            ),
            (
                "            return result + F.linear(x, self.delta_weight()).to(result.dtype)  # (..., out)",
                "            return result + self.vera_dropout(F.linear(x, self.delta_weight())).to(result.dtype)",
            ),
        ),
    ),
    Variant(
        "vera_pair_sized_for_the_first_target",
        "5.6",
        "get_vera_model sizes the shared pair for the first target instead of the largest in and out.",
        (
            (
                "    max_in = max(m.in_features for m in targets.values())\n    max_out = max(m.out_features for m in targets.values())",
                "    first = next(iter(targets.values()))\n    max_in, max_out = first.in_features, first.out_features",
            ),
        ),
    ),
    Variant(
        "vera_trains_the_shared_pair",
        "5.6",
        "get_vera_model also marks the shared pair trainable (a frozen random pair is VeRA's point).",
        (
            (
                '    mark_trainable(model, ("lambda_d", "lambda_b"))',
                '    mark_trainable(model, ("lambda_d", "lambda_b"))\n'
                "    projections.vera_A.requires_grad_(True)\n    projections.vera_B.requires_grad_(True)",
            ),
        ),
    ),
    # ---- 5.7 AdaLoRA ---------------------------------------------------------------------------
    Variant(
        "adalora_orth_p_gram_wrong_side",
        "5.7",
        "The regulariser uses P Pᵀ (out, out) instead of Pᵀ P (r, r) for P = lora_B (out, r).",
        (
            (
                "        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r) each",
                "        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B @ layer.lora_B.T):  # (r, r) each",
            ),
        ),
    ),
    Variant(
        "adalora_orth_q_gram_wrong_side",
        "5.7",
        "The regulariser uses Qᵀ Q (in, in) instead of Q Qᵀ (r, r) for Q = lora_A (r, in).",
        (
            (
                "        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r) each",
                "        for gram in (layer.lora_A.T @ layer.lora_A, layer.lora_B.T @ layer.lora_B):  # (r, r) each",
            ),
        ),
    ),
    Variant(
        "adalora_orth_squared",
        "5.7",
        "The regulariser squares the Frobenius norms (the paper's formula; PEFT's is unsquared).",
        (
            (
                '            total = total + torch.norm(gram - eye, p="fro")',
                '            total = total + torch.norm(gram - eye, p="fro") ** 2',
            ),
        ),
    ),
    Variant(
        "adalora_orth_per_layer_mean",
        "5.7",
        "The regulariser divides by the number of layers instead of the number of matrices (2L).",
        (("    return total / count", "    return total / len(layers)"),),
    ),
    Variant(
        "adalora_scaling_over_r",
        "5.7",
        "AdaLoRALayer sets scaling = lora_alpha / r and then still divides by ranknum (÷ r twice).",
        (
            (
                "        self.scaling = lora_alpha  # PEFT: lora_alpha (AdaLoRA divides by ranknum in the forward)",
                "        self.scaling = lora_alpha / r",
            ),
        ),
    ),
    Variant(
        "adalora_lambda_random_init",
        "5.7",
        "Λ (lora_E) starts random like P and Q instead of 0: a fresh layer changes its base.",
        (
            (
                "            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)",
                "            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)\n            nn.init.normal_(self.lora_E, mean=0.0, std=0.02)",
            ),
        ),
    ),
    Variant(
        "adalora_forward_without_lambda",
        "5.7",
        "The AdaLoRA forward uses Q instead of Q ⊙ Λ (the singular values are ignored).",
        (
            (
                "        update = (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling",
                "        update = (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling",
            ),
        ),
    ),
    Variant(
        "adalora_topk_budget_minus_one",
        "5.7",
        "mask_to_budget keeps budget − 1 singular values (off by one).",
        (
            (
                "        keep[torch.topk(flat, budget).indices] = True",
                "        keep[torch.topk(flat, max(budget - 1, 0)).indices] = True",
            ),
        ),
    ),
    Variant(
        "adalora_topk_smallest",
        "5.7",
        "mask_to_budget keeps the budget LOWEST-scoring triplets.",
        (
            (
                "        keep[torch.topk(flat, budget).indices] = True",
                "        keep[torch.topk(flat, budget, largest=False).indices] = True",
            ),
        ),
    ),
    Variant(
        "adalora_threshold_keeps_ties",
        "5.7",
        "mask_to_budget thresholds at the k-th score and keeps every tie (more than budget values).",
        (
            (
                "        keep[torch.topk(flat, budget).indices] = True",
                "        keep = flat >= torch.topk(flat, budget).values.min() if budget > 0 else keep",
            ),
        ),
    ),
    Variant(
        "adalora_ema_beta_swapped",
        "5.7",
        "The importance EMA weights the new value by β1 and the old by 1 − β1.",
        (
            (
                "            self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt",
                "            self.exp_avg_ipt[key] = (1 - self.beta1) * self.exp_avg_ipt[key] + self.beta1 * ipt",
            ),
        ),
    ),
    Variant(
        "adalora_uncertainty_with_beta1",
        "5.7",
        "The uncertainty EMA uses β1 instead of β2.",
        (
            (
                "                        self.beta2 * self.exp_avg_unc[key] + (1 - self.beta2) * (ipt - self.exp_avg_ipt[key]).abs()",
                "                        self.beta1 * self.exp_avg_unc[key] + (1 - self.beta1) * (ipt - self.exp_avg_ipt[key]).abs()",
            ),
        ),
    ),
    Variant(
        "adalora_sensitivity_without_abs",
        "5.7",
        "The sensitivity is w·∂L/∂w without the absolute value.",
        (("                    ipt = (param * grad).abs()", "                    ipt = param * grad"),),
    ),
    Variant(
        "adalora_sensitivity_gradient_only",
        "5.7",
        "The sensitivity is |∂L/∂w| alone, without the weight.",
        (("                    ipt = (param * grad).abs()", "                    ipt = grad.abs()"),),
    ),
    Variant(
        "adalora_uncertainty_before_update",
        "5.7",
        "The uncertainty |I − Ī| uses Ī from before this step's update (PEFT updates Ī first).",
        (
            (
                "                    self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt\n",
                "                    old_ipt = self.exp_avg_ipt[key]\n"
                "                    self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt\n",
            ),
            ("(1 - self.beta2) * (ipt - self.exp_avg_ipt[key]).abs()", "(1 - self.beta2) * (ipt - old_ipt).abs()"),
        ),
    ),
    Variant(
        "adalora_triplet_sums",
        "5.7",
        "A triplet's score sums its singular vectors' element scores instead of averaging them.",
        (
            (
                '            vectors = score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)  # Q\'s rows + P\'s columns, (r,)',
                '            vectors = score["lora_A"].sum(dim=1) + score["lora_B"].sum(dim=0)  # Q\'s rows + P\'s columns, (r,)',
            ),
        ),
    ),
    Variant(
        "adalora_triplet_ignores_lambda",
        "5.7",
        "A triplet's score leaves out the score of its singular value Λ_i.",
        (
            (
                '            scores[path] = score["lora_E"].view(-1) + vectors  # (r,)',
                "            scores[path] = vectors  # (r,)",
            ),
        ),
    ),
    Variant(
        "adalora_cubic_as_square",
        "5.7",
        "The budget schedule decreases with the square of the remaining progress instead of its cube.",
        (
            (
                "        budget = int((self.init_budget - self.target_budget) * (progress**3) + self.target_budget)",
                "        budget = int((self.init_budget - self.target_budget) * (progress**2) + self.target_budget)",
            ),
        ),
    ),
    Variant(
        "adalora_schedule_rounds",
        "5.7",
        "The budget schedule rounds instead of truncating with int() as PEFT does.",
        (
            (
                "        budget = int((self.init_budget - self.target_budget) * (progress**3) + self.target_budget)",
                "        budget = round((self.init_budget - self.target_budget) * (progress**3) + self.target_budget)",
            ),
        ),
    ),
    Variant(
        "adalora_warmup_off_by_one",
        "5.7",
        "The warm-up ends one step early (step < tinit instead of step <= tinit).",
        (
            (
                "        if step <= self.tinit:\n            return self.init_budget, False",
                "        if step < self.tinit:\n            return self.init_budget, False",
            ),
        ),
    ),
    Variant(
        "adalora_masks_every_step",
        "5.7",
        "The schedule masks at every step, ignoring deltaT.",
        (("        return budget, step % self.deltaT == 0", "        return budget, True"),),
    ),
    Variant(
        "adalora_ranknum_follows_the_mask",
        "5.7",
        "Masking also sets ranknum to the kept rank (PEFT keeps ranknum = r; the update's scale jumps).",
        (
            (
                "                layer.lora_E.masked_fill_(~pattern[path].view(-1, 1), 0.0)\n                start += layer.r",
                "                layer.lora_E.masked_fill_(~pattern[path].view(-1, 1), 0.0)\n"
                "                layer.ranknum.fill_(max(int(pattern[path].sum()), 1))\n"
                "                start += layer.r",
            ),
        ),
    ),
    Variant(
        "adalora_final_pattern_not_reapplied",
        "5.7",
        "After T − tfinal the kept pattern is not re-applied: masked singular values grow back.",
        (
            (
                "                    layer.lora_E.masked_fill_(~self.rank_pattern[path].view(-1, 1), 0.0)\n        return self.budget",
                "                    pass\n        return self.budget",
            ),
        ),
    ),
    Variant(
        "adalora_no_reset_after_final_mask",
        "5.7",
        "The EMAs are not reset after the final mask.",
        (
            (
                "            self.rank_pattern = self.mask_to_budget(self.budget)\n            self.reset_importance()",
                "            self.rank_pattern = self.mask_to_budget(self.budget)",
            ),
        ),
    ),
    Variant(
        "adalora_regulariser_ascends",
        "5.7",
        "before_step backpropagates −λ·R: the regulariser pushes P and Q away from orthogonality.",
        (("                penalty.backward()", "                (-penalty).backward()"),),
    ),
    Variant(
        "adalora_regulariser_unweighted",
        "5.7",
        "before_step backpropagates R without orth_reg_weight.",
        (
            (
                "            penalty = self.orth_reg_weight * orthogonal_regularization(self.model)",
                "            penalty = orthogonal_regularization(self.model)",
            ),
        ),
    ),
    # ---- 5.8 Delta-LoRA ------------------------------------------------------------------------
    Variant(
        "delta_lora_wrong_sign",
        "5.8",
        "Delta-LoRA subtracts λ·(s·B'A' − s·BA) from W0.",
        (
            (
                "                    weight += (self.update_ratio * layer.scaling * change).to(weight.dtype)",
                "                    weight -= (self.update_ratio * layer.scaling * change).to(weight.dtype)",
            ),
        ),
    ),
    Variant(
        "delta_lora_without_scaling",
        "5.8",
        "Delta-LoRA adds λ·(B'A' − BA), forgetting the scale s.",
        (
            (
                "                    weight += (self.update_ratio * layer.scaling * change).to(weight.dtype)",
                "                    weight += (self.update_ratio * change).to(weight.dtype)",
            ),
        ),
    ),
    Variant(
        "delta_lora_adds_the_product",
        "5.8",
        "Delta-LoRA adds λ·s·B'A' (the product) instead of its change in the step.",
        (
            (
                "                    change = layer.lora_B @ layer.lora_A - old_B @ old_A  # (out, in)",
                "                    change = layer.lora_B @ layer.lora_A  # (out, in)",
            ),
        ),
    ),
    Variant(
        "delta_lora_product_of_changes",
        "5.8",
        "Delta-LoRA uses (B' − B)(A' − A), the product of the changes, not the change of the product.",
        (
            (
                "                    change = layer.lora_B @ layer.lora_A - old_B @ old_A  # (out, in)",
                "                    change = (layer.lora_B - old_B) @ (layer.lora_A - old_A)  # (out, in)",
            ),
        ),
    ),
    Variant(
        "delta_lora_starts_late",
        "5.8",
        "Delta-LoRA starts one step after start_step.",
        (("        if step >= self.start_step:", "        if step > self.start_step:"),),
    ),
    Variant(
        "delta_lora_ignores_start_step",
        "5.8",
        "Delta-LoRA updates W0 from the first step whatever start_step says.",
        (("        if step >= self.start_step:", "        if True:"),),
    ),
    Variant(
        "delta_lora_accepts_dropout",
        "5.8",
        "DeltaLoRA accepts layers with lora_dropout > 0.",
        (("            if dropout_p(layer) > 0:", "            if False:"),),
    ),
    Variant(
        "lora_drop_sorted_ascending",
        "5.9",
        "lora_drop sorts the layers from the least important up.",
        (
            (
                "    order = sorted(layers, key=lambda path: importance[path], reverse=True)",
                "    order = sorted(layers, key=lambda path: importance[path])",
            ),
        ),
    ),
    Variant(
        "lora_drop_share_strictly_above",
        "5.9",
        "lora_drop keeps adding layers until the share is strictly above keep_share (one too many on equality).",
        (("        if share >= keep_share:", "        if share > keep_share:"),),
    ),
    Variant(
        "lora_drop_stops_below_share",
        "5.9",
        "lora_drop stops before a layer that would take the share past keep_share (kept share < keep_share).",
        (("        if share >= keep_share:", "        if share + importance[path] / total > keep_share:"),),
    ),
    Variant(
        "lora_drop_shares_least_important",
        "5.9",
        "Each group shares its LEAST important layer's adapter instead of its most important one's.",
        (("        shared = members[0]  # the most important of the group", "        shared = members[-1]"),),
    ),
    Variant(
        "lora_drop_groups_all_kept_too",
        "5.9",
        "lora_drop shares adapters among all layers of a shape, kept layers included.",
        (("    for path in order[len(kept) :]:", "    for path in order:"),),
    ),
    Variant(
        "importance_of_the_input",
        "5.9",
        "lora_output_importance measures ‖x‖² of the layer input instead of ‖s·BA x‖².",
        (
            (
                "            update = layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)  # (..., out)",
                "            update = x  # (..., in)",
            ),
        ),
    ),
    Variant(
        "importance_of_the_output",
        "5.9",
        "lora_output_importance measures ‖h‖² of the whole layer output (W0 x included).",
        (
            (
                "            update = layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)  # (..., out)",
                "            update = output  # (..., out)",
            ),
        ),
    ),
    Variant(
        "importance_not_squared",
        "5.9",
        "lora_output_importance averages ‖s·BA x‖ instead of ‖s·BA x‖².",
        (
            (
                "            squared = update.float().pow(2).sum(dim=-1)  # (...,) one value per token",
                "            squared = update.float().pow(2).sum(dim=-1).sqrt()  # (...,)",
            ),
        ),
    ),
    Variant(
        "importance_without_scaling",
        "5.9",
        "lora_output_importance measures ‖B A x‖² without the scale s.",
        (
            (
                "            update = layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)  # (..., out)",
                "            update = F.linear(F.linear(x, layer.lora_A), layer.lora_B)  # (..., out)",
            ),
        ),
    ),
    Variant(
        "importance_summed",
        "5.9",
        "lora_output_importance returns the sum over tokens instead of the mean.",
        (("    return {path: sums[path] / max(counts[path], 1) for path in sums}", "    return dict(sums)"),),
    ),
    Variant(
        "importance_mean_per_batch",
        "5.9",
        "lora_output_importance averages over batches (one count per call) instead of over tokens.",
        (("            counts[path] += squared.numel()", "            counts[path] += 1"),),
    ),
    Variant(
        "importance_leaves_eval_mode",
        "5.9",
        "lora_output_importance leaves the model in eval mode.",
        (("        model.train(was_training)\n", ""),),
    ),
    # ---- 5.10 PEFT-format adapter files --------------------------------------------------------
    Variant(
        "save_magnitude_key_with_weight",
        "5.10",
        "save_variant_adapter writes the magnitude as '<path>.lora_magnitude_vector.weight' (PEFT's key has no .weight).",
        (
            (
                '            tensors[f"{key}.{MAGNITUDE_KEY}"] = layer.magnitude.detach().cpu().clone()',
                '            tensors[f"{key}.{MAGNITUDE_KEY}.weight"] = layer.magnitude.detach().cpu().clone()',
            ),
        ),
    ),
    Variant(
        "save_without_magnitude",
        "5.10",
        "save_variant_adapter forgets DoRA's magnitudes (the files hold A and B only).",
        (
            (
                '            tensors[f"{key}.{MAGNITUDE_KEY}"] = layer.magnitude.detach().cpu().clone()',
                "            pass",
            ),
        ),
    ),
    Variant(
        "save_without_use_dora",
        "5.10",
        "save_variant_adapter writes use_dora: false for a DoRA adapter.",
        (
            (
                "    config = variant_adapter_config(r, lora_alpha, dropout_p(layers[0][1]), targets, rslora, use_dora)",
                "    config = variant_adapter_config(r, lora_alpha, dropout_p(layers[0][1]), targets, rslora)",
            ),
        ),
    ),
    Variant(
        "save_without_use_rslora",
        "5.10",
        "save_variant_adapter writes use_rslora: false for an rsLoRA adapter.",
        (
            (
                "    config = variant_adapter_config(r, lora_alpha, dropout_p(layers[0][1]), targets, rslora, use_dora)",
                "    config = variant_adapter_config(r, lora_alpha, dropout_p(layers[0][1]), targets, False, use_dora)",
            ),
        ),
    ),
    Variant(
        "save_pissa_not_converted",
        "5.10",
        "save_variant_adapter writes PiSSA's A and B as they are (they only fit the residual base).",
        (
            (
                '        if convert:\n            tensors[f"{key}.lora_A.weight"]',
                '        if False:\n            tensors[f"{key}.lora_A.weight"]',
            ),
            ("    if convert:\n        r, lora_alpha", "    if False:\n        r, lora_alpha"),
        ),
    ),
    Variant(
        "save_pissa_b0_sign",
        "5.10",
        "The PiSSA conversion appends +B0 instead of −B0 (B A + B0 A0 instead of B A − B0 A0).",
        (
            (
                "torch.cat([layer.lora_B, -layer.lora_B_init], dim=1)",
                "torch.cat([layer.lora_B, layer.lora_B_init], dim=1)",
            ),
        ),
    ),
    Variant(
        "save_pissa_alpha_kept",
        "5.10",
        "The PiSSA conversion doubles r but keeps lora_alpha (the scale halves).",
        (("        r, lora_alpha = 2 * r, lora_alpha * (math.sqrt(2) if rslora else 2)", "        r = 2 * r"),),
    ),
    Variant(
        "save_pissa_alpha_doubled_with_rslora",
        "5.10",
        "The PiSSA conversion doubles lora_alpha with rsLoRA too (rsLoRA's scale needs √2·lora_alpha).",
        (
            (
                "        r, lora_alpha = 2 * r, lora_alpha * (math.sqrt(2) if rslora else 2)",
                "        r, lora_alpha = 2 * r, lora_alpha * 2",
            ),
        ),
    ),
    Variant(
        "save_accepts_mixed_settings",
        "5.10",
        "save_variant_adapter writes one r/lora_alpha for layers that differ.",
        (
            (
                '    if len(settings) > 1:\n        raise ValueError(\n            f"every layer must share one (r, lora_alpha, use_rslora)',
                '    if False:\n        raise ValueError(\n            f"every layer must share one (r, lora_alpha, use_rslora)',
            ),
            ("    r, lora_alpha, rslora = settings.pop()", "    r, lora_alpha, rslora = sorted(settings)[0]"),
        ),
    ),
    Variant(
        "load_ignores_use_rslora",
        "5.10",
        "load_variant_adapter loads an rsLoRA adapter with LoRA's scale (use_rslora ignored).",
        (
            (
                "        if rslora:\n            use_rslora(model)\n        if init is not None:",
                "        if init is not None:",
            ),
        ),
    ),
    Variant(
        "load_dora_without_rslora",
        "5.10",
        "load_variant_adapter ignores use_rslora for a DoRA adapter.",
        (("    if rslora:\n        use_rslora(model)\n    with torch.no_grad():", "    with torch.no_grad():"),),
    ),
    Variant(
        "load_dora_magnitude_not_copied",
        "5.10",
        "load_variant_adapter loads A and B of a DoRA adapter but keeps the fresh magnitudes.",
        (("            layer.magnitude.copy_(magnitudes[path])", "            pass"),),
    ),
    Variant(
        "load_ignores_the_scale_of_existing_layers",
        "5.10",
        "load_variant_adapter loads an rsLoRA adapter into existing LoRA layers without checking their scale.",
        (
            (
                '        if any(bool(getattr(layer, "use_rslora", False)) != rslora for layer in existing.values()):',
                "        if False:",
            ),
        ),
    ),
    Variant(
        "load_builds_layers_before_checking",
        "5.10",
        "load_variant_adapter adds the DoRA layers before checking the shapes (a refused file leaves the model changed).",
        (
            (
                "    modules = dict(model.named_modules())\n    for path in paths:\n        module = modules.get(path)",
                "    if not existing:\n"
                '        get_dora_model(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), paths)\n'
                "    modules = dict(model.named_modules())\n    for path in paths:\n        module = modules.get(path)",
            ),
            (
                '    if not existing:\n        get_dora_model(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), paths)\n    with tempfile',
                "    with tempfile",
            ),
        ),
    ),
    Variant(
        "load_ignores_init_lora_weights",
        "5.10",
        "load_variant_adapter reads PEFT's default PiSSA/OLoRA/LoftQ file as a plain LoRA: the file's A and B land on the "
        "ORIGINAL W0 although they were trained against W0's residual (or Q̂).",
        (("        if init is not None:\n            initialise_like_peft(model, init, config)\n", ""),),
    ),
    Variant(
        "load_keeps_the_init_factors",
        "5.10",
        "After recomputing the residual, the layer keeps the init's A0, B0 instead of the file's trained A, B.",
        (
            (
                "        with torch.no_grad():\n            layer.lora_A.copy_(loaded_A)\n            layer.lora_B.copy_(loaded_B)\n",
                "",
            ),
        ),
    ),
    Variant(
        "load_loftq_one_iteration",
        "5.10",
        "A LoftQ file is re-quantized with one LoftQ iteration whatever its loftq_config's loftq_iter says.",
        (
            (
                '            loftq_init(layer, num_iters=config["loftq_config"]["loftq_iter"])',
                "            loftq_init(layer, num_iters=1)",
            ),
        ),
    ),
    Variant(
        "vera_save_projection_ignored",
        "5.10",
        "The shared pair is written even with save_projection=False (the config then contradicts the file).",
        (("    if save_projection:\n        tensors[VERA_A_KEY]", "    if True:\n        tensors[VERA_A_KEY]"),),
    ),
    Variant(
        "vera_lambda_keys_with_weight",
        "5.10",
        "VeRA's vectors saved as '<path>.vera_lambda_d.weight' (PEFT's keys have no .weight).",
        (
            (
                '        tensors[f"{PEFT_KEY_PREFIX}{path}.vera_lambda_d"] = layer.lambda_d',
                '        tensors[f"{PEFT_KEY_PREFIX}{path}.vera_lambda_d.weight"] = layer.lambda_d',
            ),
        ),
    ),
    Variant(
        "vera_load_ignores_the_saved_pair",
        "5.10",
        "load_variant_adapter always draws the pair from projection_prng_key, even when the file holds it "
        "(PEFT uses the saved pair).",
        (
            (
                "            shared.vera_A.copy_(tensors[VERA_A_KEY])\n            shared.vera_B.copy_(tensors[VERA_B_KEY])\n",
                "            pass\n",
            ),
        ),
    ),
    Variant(
        "adalora_save_ignores_the_pattern",
        "5.10",
        "The AdaLoRA file records rank_pattern but keeps every layer at init_r (PEFT cuts each to its kept triplets).",
        (
            (
                "        keep = pattern[path] if pattern is not None else torch.ones(layer.r, dtype=torch.bool)",
                "        keep = torch.ones(layer.r, dtype=torch.bool)",
            ),
        ),
    ),
    Variant(
        "adalora_keys_with_weight",
        "5.10",
        "AdaLoRA's tensors saved as '<path>.lora_A.weight' (PEFT's AdaLoRA keys have no .weight).",
        (
            (
                '        tensors[f"{key}.lora_A"] = layer.lora_A[keep]  # (k, in)',
                '        tensors[f"{key}.lora_A.weight"] = layer.lora_A[keep]  # (k, in)',
            ),
        ),
    ),
    Variant(
        "adalora_load_packs_the_kept_triplets_first",
        "5.10",
        "The kept triplets are loaded into the first k positions instead of their own (the masked ones then hold "
        "trained values, the pattern no longer matches the allocator's).",
        (
            (
                '            layer.lora_A[mask] = tensors[f"{key}.lora_A"].to(layer.lora_A)\n'
                '            layer.lora_E[mask] = tensors[f"{key}.lora_E"].to(layer.lora_E)\n'
                '            layer.lora_B[:, mask] = tensors[f"{key}.lora_B"].to(layer.lora_B)\n',
                "            k = int(mask.sum())\n"
                '            layer.lora_A[:k] = tensors[f"{key}.lora_A"].to(layer.lora_A)\n'
                '            layer.lora_E[:k] = tensors[f"{key}.lora_E"].to(layer.lora_E)\n'
                '            layer.lora_B[:, :k] = tensors[f"{key}.lora_B"].to(layer.lora_B)\n',
            ),
        ),
    ),
    Variant(
        "adalora_load_ranknum_k",
        "5.10",
        "The loaded layer gets rank k (the kept triplets), so ranknum = k and the scale lora_alpha / k changes "
        "(PEFT keeps ranknum = init_r).",
        (
            (
                '    get_adalora_model(model, init_r, config["lora_alpha"], config.get("lora_dropout", 0.0), paths)',
                '    get_adalora_model(model, init_r, config["lora_alpha"], config.get("lora_dropout", 0.0), paths)\n'
                "    for path, layer in adalora_layers(model):\n"
                "        layer.ranknum.fill_(float(keep[path].sum()))",
            ),
        ),
    ),
]
