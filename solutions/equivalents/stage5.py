"""Equivalents of Stage 5: correct LoRA-family code written differently; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "rslora_as_negative_power",
        "5.1",
        "rsLoRA's scale as lora_alpha · r^(−1/2).",
        (("    return lora_alpha / math.sqrt(r)", "    return lora_alpha * r**-0.5"),),
    ),
    Variant(
        "dora_norm_as_root_of_sum_of_squares",
        "5.2",
        "DoRA's row norm as √(Σ_j w_ij²) instead of torch.linalg.norm.",
        (
            (
                "            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)  # (out,)",
                "            return (weight + self.scaling * lora_weight).pow(2).sum(dim=1).sqrt()  # (out,)",
            ),
        ),
    ),
    Variant(
        "dora_forward_with_a_second_matmul",
        "5.2",
        "The DoRA forward always computes W0·dropout(x) with a second matmul and adds the terms separately.",
        block="5.2: PEFT's DoRA forward",
        code="""
            result = self.base_layer(x)  # (..., out)
            if self.merged:
                return result
            x = self.lora_dropout(x).to(self.lora_A.dtype)
            ratio = self.magnitude / self.weight_norm()  # (out,)
            base = F.linear(x, dense_weight(self.base_layer, x.dtype))  # W0 x, (..., out)
            lora = self.scaling * (x @ self.lora_A.T @ self.lora_B.T)  # (..., out)
            return result + (ratio * base - base + ratio * lora).to(result.dtype)
            """,
    ),
    Variant(
        "pissa_by_broadcasting",
        "5.3",
        "PiSSA's √S applied by broadcasting over rows / columns instead of diag matrices.",
        (
            ("    lora_A = torch.diag(torch.sqrt(Sr)) @ Uh[:r]", "    lora_A = Sr.sqrt()[:, None] * Uh[:r]"),
            ("    lora_B = V[:, :r] @ torch.diag(torch.sqrt(Sr))", "    lora_B = V[:, :r] * Sr.sqrt()"),
        ),
    ),
    Variant(
        "olora_residual_from_the_trailing_terms",
        "5.3",
        "OLoRA's residual as Q[:, r:] R[r:] + (1 − s)·B A instead of W0 − s·B A.",
        (
            (
                '    residual = weight - s * lora_B @ lora_A  # (out, in)\n    install_initial_adapter(layer, lora_A, lora_B, residual, "olora")',
                "    residual = Q[:, r:] @ R[r:] + (1 - s) * lora_B @ lora_A  # (out, in)\n"
                '    install_initial_adapter(layer, lora_A, lora_B, residual, "olora")',
            ),
        ),
    ),
    Variant(
        "loftq_scale_folded_into_a",
        "5.4",
        "LoftQ factorises W − Q̂ and divides both factors by √s instead of dividing the residual by s.",
        (
            (
                "        lora_B, lora_A = svd_split((weight - q) / s, r)",
                "        lora_B, lora_A = svd_split(weight - q, r)\n        lora_B, lora_A = lora_B / math.sqrt(s), lora_A / math.sqrt(s)",
            ),
        ),
    ),
    Variant(
        "lora_fa_by_name",
        "5.5",
        "freeze_lora_A walks named_parameters and switches lora_A / lora_B by name.",
        block="5.5: A frozen, B trainable",
        code="""
            if not list(lora_layers(model)):
                raise ValueError("the model has no LoRA layers; call get_lora_model first")
            for name, param in model.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("lora_A", "lora_B"):
                    param.requires_grad_(leaf == "lora_B")
            return model
            """,
    ),
    Variant(
        "vera_always_thin_products",
        "5.6",
        "The VeRA forward always uses PEFT's thin products (never forms ΔW).",
        (
            (
                "        if self.r * (self.in_features + self.out_features) > self.in_features * self.out_features:",
                "        if False:",
            ),
        ),
    ),
    Variant(
        "vera_delta_weight_scales_columns",
        "5.6",
        "VeRA's ΔW as (λ_b ⊙ rows of (B_s scaled by λ_d on its columns)) @ A_s.",
        (
            (
                "        return (self.lambda_b.unsqueeze(-1) * sliced_B) @ (self.lambda_d.unsqueeze(-1) * sliced_A)",
                "        return self.lambda_b.unsqueeze(-1) * (sliced_B * self.lambda_d) @ sliced_A",
            ),
        ),
    ),
    Variant(
        "orth_reg_stacked",
        "5.7",
        "The orthogonal regulariser as torch.stack of matrix norms, then .mean().",
        block="5.7: Gram matrices minus the identity",
        code="""
            layers = [layer for _, layer in adalora_layers(model)]
            if not layers:
                raise ValueError("the model has no AdaLoRA layers; call get_adalora_model first")
            terms = []
            for layer in layers:
                eye = torch.eye(layer.r, device=layer.lora_A.device, dtype=layer.lora_A.dtype)
                terms.append(torch.linalg.matrix_norm(layer.lora_A @ layer.lora_A.T - eye))
                terms.append(torch.linalg.matrix_norm(layer.lora_B.T @ layer.lora_B - eye))
            return torch.stack(terms).mean()
            """,
    ),
    Variant(
        "adalora_mask_by_argsort",
        "5.7",
        "mask_to_budget keeps the first `budget` indices of a descending argsort instead of topk.",
        (
            (
                "        keep[torch.topk(flat, budget).indices] = True",
                "        keep[torch.argsort(flat, descending=True, stable=True)[:budget]] = True",
            ),
        ),
    ),
    Variant(
        "adalora_budget_with_cube_as_product",
        "5.7",
        "The cubic schedule with the cube written as a product p·p·p.",
        (
            (
                "        budget = int((self.init_budget - self.target_budget) * (progress**3) + self.target_budget)",
                "        budget = int((self.init_budget - self.target_budget) * (progress * progress * progress) + self.target_budget)",
            ),
        ),
    ),
    Variant(
        "delta_lora_saves_the_product",
        "5.8",
        "Delta-LoRA saves the product s·B A before the step instead of copies of A and B.",
        (
            (
                "            self._saved = {p: (lay.lora_A.detach().clone(), lay.lora_B.detach().clone()) for p, lay in self.layers}",
                "            self._saved = {p: lay.scaling * (lay.lora_B @ lay.lora_A).detach() for p, lay in self.layers}",
            ),
            (
                "                    old_A, old_B = self._saved[path]\n"
                "                    change = layer.lora_B @ layer.lora_A - old_B @ old_A  # (out, in)\n"
                "                    weight = mergeable_weight(layer.base_layer)\n"
                "                    weight += (self.update_ratio * layer.scaling * change).to(weight.dtype)",
                "                    change = layer.scaling * (layer.lora_B @ layer.lora_A) - self._saved[path]\n"
                "                    weight = mergeable_weight(layer.base_layer)\n"
                "                    weight.add_(change.to(weight.dtype), alpha=self.update_ratio)",
            ),
        ),
    ),
    Variant(
        "importance_via_vector_norm",
        "5.9",
        "lora_output_importance squares torch.linalg.vector_norm per token.",
        (
            (
                "            squared = update.float().pow(2).sum(dim=-1)  # (...,) one value per token",
                "            squared = torch.linalg.vector_norm(update.float(), dim=-1) ** 2  # (...,)",
            ),
        ),
    ),
    Variant(
        "lora_drop_kept_by_running_sums",
        "5.9",
        "lora_drop picks the kept layers from the running sums of the shares (itertools.accumulate).",
        (
            (
                "    kept, share = [], 0.0\n"
                "    for path in order:\n"
                "        if share >= keep_share:\n"
                "            break\n"
                "        kept.append(path)\n"
                "        share += importance[path] / total\n",
                "    import itertools\n\n"
                "    before = itertools.accumulate((importance[path] / total for path in order), initial=0.0)\n"
                "    kept = [path for path, share in zip(order, before) if share < keep_share]\n",
            ),
        ),
    ),
    Variant(
        "save_conversion_by_stacking",
        "5.10",
        "The PiSSA conversion builds [A; A0] and [B, −B0] with torch.vstack / torch.hstack.",
        (
            ("torch.cat([layer.lora_A, layer.lora_A_init], dim=0)", "torch.vstack([layer.lora_A, layer.lora_A_init])"),
            (
                "torch.cat([layer.lora_B, -layer.lora_B_init], dim=1)",
                "torch.hstack([layer.lora_B, -layer.lora_B_init])",
            ),
        ),
    ),
    Variant(
        "adalora_scatter_by_index_copy",
        "5.10",
        "The kept triplets scattered with index_copy_ on the kept indices (after zeroing), instead of boolean masks.",
        (
            (
                '            layer.lora_A[mask] = tensors[f"{key}.lora_A"].to(layer.lora_A)\n'
                '            layer.lora_E[mask] = tensors[f"{key}.lora_E"].to(layer.lora_E)\n'
                '            layer.lora_B[:, mask] = tensors[f"{key}.lora_B"].to(layer.lora_B)\n',
                "            index = mask.nonzero().flatten()\n"
                '            layer.lora_A.index_copy_(0, index, tensors[f"{key}.lora_A"].to(layer.lora_A))\n'
                '            layer.lora_E.index_copy_(0, index, tensors[f"{key}.lora_E"].to(layer.lora_E))\n'
                '            layer.lora_B.index_copy_(1, index, tensors[f"{key}.lora_B"].to(layer.lora_B))\n',
            ),
        ),
    ),
    Variant(
        "reinit_with_a_state_copy",
        "5.10",
        "The loaded A and B kept as a state_dict copy and put back with load_state_dict after the init.",
        block="5.10: keep A and B, run the init",
        code="""
            import functools

            run = {"pissa": pissa_init, "olora": olora_init}
            if init == "loftq":
                run["loftq"] = functools.partial(loftq_init, num_iters=config["loftq_config"]["loftq_iter"])
            for _, layer in lora_layers(model):
                saved = {name: layer.get_parameter(name).detach().clone() for name in ("lora_A", "lora_B")}
                run[init](layer)
                with torch.no_grad():
                    for name, value in saved.items():
                        layer.get_parameter(name).copy_(value)
            """,
    ),
]
