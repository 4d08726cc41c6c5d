"""Mutants of model/lora.py (Stages 1 and 2)."""

from testcases.mutants import Mutant

F = "model/lora.py"

MUTANTS = [
    Mutant(
        "b_random_init",
        F,
        "B initialised randomly instead of zero, so a fresh adapter already changes the model.",
        (("nn.init.zeros_(self.lora_B)", "nn.init.normal_(self.lora_B, std=0.02)"),),
    ),
    Mutant(
        "scaling_alpha_not_alpha_over_r",
        F,
        "Scaling by lora_alpha instead of lora_alpha / r.",
        (("self.scaling = lora_alpha / r", "self.scaling = lora_alpha"),),
    ),
    Mutant(
        "dropout_on_output",
        F,
        "Dropout applied to the LoRA output instead of its input.",
        (
            ("x = self.lora_dropout(x).to(self.lora_A.dtype)", "x = x.to(self.lora_A.dtype)"),
            (
                "        result.view(-1, self.out_features).addmm_(\n"
                "            z.reshape(-1, self.r).to(result.dtype), self.lora_B.T.to(result.dtype), alpha=self.scaling\n"
                "        )\n",
                "        result.add_(self.lora_dropout(F.linear(z, self.lora_B)).to(result.dtype), alpha=self.scaling)\n",
            ),
        ),
    ),
    Mutant(
        "transposed_factors",
        F,
        "A stored as (in, r) and B as (r, out), as some notes write them (with x @ A @ B).",
        (
            ("torch.empty(r, in_features, device", "torch.empty(in_features, r, device"),
            ("torch.empty(out_features, r, device", "torch.empty(r, out_features, device"),
            ("z = F.linear(x, self.lora_A)", "z = x @ self.lora_A"),
            ("self.lora_B.T.to(result.dtype)", "self.lora_B.to(result.dtype)"),
            ("self.scaling * (self.lora_B @ self.lora_A)", "self.scaling * (self.lora_A @ self.lora_B).T"),
        ),
    ),
    Mutant(
        "base_not_frozen",
        F,
        "The wrapped base layer is left trainable.",
        (("param.requires_grad_(False)  # W0", "param.requires_grad_(True)  # W0"),),
    ),
    Mutant(
        "gaussian_std_one",
        F,
        "The Gaussian init draws A ~ N(0, 1) instead of N(0, 1/r^2).",
        (("nn.init.normal_(self.lora_A, std=1 / self.r)", "nn.init.normal_(self.lora_A, std=1.0)"),),
    ),
    Mutant(
        "merged_forward_adds_lora",
        F,
        "The forward adds B A x even when ΔW is already merged into W0 (counted twice).",
        (("        if self.merged:\n            return result\n", ""),),
    ),
    Mutant(
        "merge_without_scaling",
        F,
        "merge() adds B @ A without the lora_alpha / r scaling.",
        (
            (
                "            weight += self.delta_weight().to(weight.dtype)",
                "            weight += (self.lora_B @ self.lora_A).to(weight.dtype)",
            ),
        ),
    ),
    Mutant(
        "merge_twice_adds_twice",
        F,
        "merge() has no merged guard, so a second call adds ΔW again.",
        (("        if self.merged:\n            return\n        weight", "        weight"),),
    ),
    Mutant(
        "unmerge_adds",
        F,
        "unmerge() adds ΔW again instead of subtracting it.",
        (("weight -= self.delta_weight()", "weight += self.delta_weight()"),),
    ),
    Mutant(
        "rest_not_frozen",
        F,
        "get_lora_model wraps the targets but never freezes the rest of the model.",
        (("    mark_only_lora_as_trainable(model)\n    return model", "    return model"),),
    ),
    Mutant(
        "wrap_anything",
        F,
        "get_lora_model wraps whatever a name matches, without checking that it is a linear layer.",
        (("        if not is_linear_like(module):", "        if False:"),),
    ),
    Mutant(
        "half_applied_on_error",
        F,
        "get_lora_model replaces modules as it finds them, so an error half-way leaves a half-wrapped model.",
        (
            (
                "        found[path] = module\n",
                "        found[path] = module\n"
                "        model.set_submodule(path, LoRALayer.from_linear(module, r, lora_alpha, lora_dropout, init_lora_weights))\n",
            ),
        ),
    ),
    Mutant(
        "total_counts_frozen_only",
        F,
        "count_parameters reports the frozen parameters as the total.",
        (("total = sum(p.numel() for p in params)", "total = sum(p.numel() for p in params if not p.requires_grad)"),),
    ),
    Mutant(
        "tied_weights_counted_twice",
        F,
        "count_parameters counts a shared (tied) tensor once per module that holds it.",
        (
            (
                "params = list(model.parameters())",
                "params = [p for _, p in model.named_parameters(remove_duplicate=False)]",
            ),
        ),
    ),
    Mutant(
        "unload_without_merge",
        F,
        "merge_and_unload puts the base layers back without merging the update into them.",
        (
            (
                "        layer.merge()\n        model.set_submodule(path, layer.base_layer)",
                "        model.set_submodule(path, layer.base_layer)",
            ),
        ),
    ),
    Mutant(
        "save_swaps_a_and_b",
        F,
        "The adapter file stores A under B's key and B under A's.",
        (
            ('.lora_A.weight"] = layer.lora_A.detach()', '.lora_A.weight"] = layer.lora_B.detach()'),
            ('.lora_B.weight"] = layer.lora_B.detach()', '.lora_B.weight"] = layer.lora_A.detach()'),
        ),
    ),
    Mutant(
        "load_skips_rank_check",
        F,
        "load_lora does not compare the adapter's rank and alpha with the model's LoRA layers.",
        (("            if (layer.r, layer.lora_alpha) != (r, lora_alpha):", "            if False:"),),
    ),
]
