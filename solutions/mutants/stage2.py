"""Mutants of Stage 2 (model/lora.py: LoRA in a model): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    Variant(
        "rest_not_frozen",
        "2.1",
        "get_lora_model wraps the targets but never freezes the rest of the model.",
        (("    mark_only_lora_as_trainable(model)\n    return model", "    return model"),),
    ),
    Variant(
        "wrap_anything",
        "2.1",
        "get_lora_model wraps whatever a name matches, without checking that it is a linear layer.",
        (("        if not is_linear_like(module):", "        if False:"),),
    ),
    Variant(
        "half_applied_on_error",
        "2.1",
        "get_lora_model replaces modules as it finds them, so an error half-way leaves a half-wrapped model.",
        (
            (
                "        found[path] = module\n",
                "        found[path] = module\n"
                "        model.set_submodule(path, LoRALayer.from_linear(module, r, lora_alpha, lora_dropout, init_lora_weights))\n",
            ),
        ),
    ),
    Variant(
        "string_target_split_into_letters",
        "2.1",
        "A single string target_modules is iterated letter by letter.",
        (
            (
                "targets = [names] if isinstance(names, str) else list(names)",
                "targets = list(names)",
            ),
        ),
    ),
    Variant(
        "unmatched_name_ignored",
        "2.1",
        "An explicit target that matches nothing is silently ignored when others match.",
        (("    if not found or (explicit and unmatched):", "    if not found:"),),
    ),
    Variant(
        "init_not_passed",
        "2.1",
        "get_lora_model does not pass init_lora_weights on to the layers.",
        (
            (
                "LoRALayer.from_linear(module, r, lora_alpha, lora_dropout, init_lora_weights)\n        for path",
                "LoRALayer.from_linear(module, r, lora_alpha, lora_dropout)\n        for path",
            ),
        ),
    ),
    Variant(
        "dropout_not_passed",
        "2.1",
        "get_lora_model does not pass lora_dropout on to the layers.",
        (
            (
                "LoRALayer.from_linear(module, r, lora_alpha, lora_dropout, init_lora_weights)\n        for path",
                "LoRALayer.from_linear(module, r, lora_alpha, init_lora_weights=init_lora_weights)\n        for path",
            ),
        ),
    ),
    Variant(
        "lora_only_trains_every_bias",
        "2.1",
        "bias='lora_only' trains every bias of the model, not only those of wrapped layers.",
        (
            (
                '    elif bias == "lora_only":\n        for _, layer in lora_layers(model):\n'
                '            if getattr(layer.base_layer, "bias", None) is not None:\n'
                "                layer.base_layer.bias.requires_grad_(True)\n",
                '    elif bias == "lora_only":\n        for name, param in model.named_parameters():\n'
                '            if name.endswith("bias"):\n                param.requires_grad_(True)\n',
            ),
        ),
    ),
    Variant(
        "total_counts_frozen_only",
        "2.2",
        "count_parameters reports the frozen parameters as the total.",
        (("total = sum(p.numel() for p in params)", "total = sum(p.numel() for p in params if not p.requires_grad)"),),
    ),
    Variant(
        "tied_weights_counted_twice",
        "2.2",
        "count_parameters counts a shared (tied) tensor once per module that holds it.",
        (
            (
                "params = list(model.parameters())",
                "params = [p for _, p in model.named_parameters(remove_duplicate=False)]",
            ),
        ),
    ),
    Variant(
        "trainable_counts_matrices_only",
        "2.2",
        "count_parameters counts trainable matrices only, missing trainable biases.",
        (
            (
                "trainable = sum(p.numel() for p in params if p.requires_grad)",
                "trainable = sum(p.numel() for p in params if p.requires_grad and p.ndim == 2)",
            ),
        ),
    ),
    Variant(
        "percentage_two_decimals",
        "2.2",
        "print_trainable_parameters prints the percentage with two decimals, not PEFT's four.",
        (("{100 * trainable / total:.4f}", "{100 * trainable / total:.2f}"),),
    ),
    Variant(
        "unload_without_merge",
        "2.3",
        "merge_and_unload puts the base layers back without merging the update into them.",
        (
            (
                "        layer.merge()\n        model.set_submodule(path, layer.base_layer)",
                "        model.set_submodule(path, layer.base_layer)",
            ),
        ),
    ),
    Variant(
        "unload_loses_the_bias",
        "2.3",
        "merge_and_unload rebuilds each layer as a new nn.Linear without its bias.",
        (
            (
                "        layer.merge()\n        model.set_submodule(path, layer.base_layer)",
                "        layer.merge()\n"
                "        plain = nn.Linear(layer.in_features, layer.out_features, bias=False).to(layer.base_layer.weight)\n"
                "        plain.weight.data.copy_(layer.base_layer.weight)\n"
                "        model.set_submodule(path, plain)",
            ),
        ),
    ),
    Variant(
        "merge_lora_first_layer_only",
        "2.3",
        "merge_lora returns after merging the first LoRA layer.",
        (
            (
                "    for layer in layers:\n        layer.merge()\n    return model",
                "    for layer in layers:\n        layer.merge()\n        return model\n    return model",
            ),
        ),
    ),
    Variant(
        "save_swaps_a_and_b",
        "2.4",
        "The adapter file stores A under B's key and B under A's.",
        (
            ('.lora_A.weight"] = layer.lora_A.detach()', '.lora_A.weight"] = layer.lora_B.detach()'),
            ('.lora_B.weight"] = layer.lora_B.detach()', '.lora_B.weight"] = layer.lora_A.detach()'),
        ),
    ),
    Variant(
        "load_skips_rank_check",
        "2.4",
        "load_lora does not compare the adapter's rank and alpha with the model's LoRA layers.",
        (("            if (layer.r, layer.lora_alpha) != (r, lora_alpha):", "            if False:"),),
    ),
    Variant(
        "load_ignores_alpha",
        "2.4",
        "load_lora creates the layers with the default lora_alpha instead of the file's.",
        (
            (
                "get_lora_model(model, r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=sorted(planned))",
                "get_lora_model(model, r=r, lora_dropout=dropout, target_modules=sorted(planned))",
            ),
        ),
    ),
    Variant(
        "load_ignores_dropout",
        "2.4",
        "load_lora creates the layers without the file's lora_dropout.",
        (
            (
                "get_lora_model(model, r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=sorted(planned))",
                "get_lora_model(model, r=r, lora_alpha=lora_alpha, target_modules=sorted(planned))",
            ),
        ),
    ),
    Variant(
        "load_wraps_every_target",
        "2.4",
        "load_lora into a fresh model wraps every config target, not only the modules in the file.",
        (("path in in_file and is_linear_like(m)", "is_linear_like(m)"),),
    ),
    Variant(
        "save_keeps_trained_biases_silently",
        "2.4",
        "save_lora writes A and B although other parameters train (they are lost).",
        (("    if others:\n        raise ValueError(", "    if False:\n        raise ValueError("),),
    ),
    # Promises of lesson 02 that the suites grade.
    Variant(
        "targets_by_substring",
        "2.1",
        "A target matches any module path that contains it ('proj' matches every projection).",
        (
            (
                "        if path.startswith(inside_lora) or not any(matches_target(path, t) for t in targets):",
                "        if path.startswith(inside_lora) or not any(t in path for t in targets):",
            ),
        ),
    ),
    Variant(
        "wraps_inside_lora_layers",
        "2.1",
        "Modules inside an existing LoRA layer (its base_layer) are candidates too.",
        (
            (
                "        if path.startswith(inside_lora) or not any(matches_target(path, t) for t in targets):",
                "        if not any(matches_target(path, t) for t in targets):",
            ),
        ),
    ),
    Variant(
        "empty_target_list_means_defaults",
        "2.1",
        "target_modules=[] silently wraps the default projections.",
        (
            (
                "    names = DEFAULT_TARGET_MODULES if target_modules is None else target_modules",
                "    names = target_modules or DEFAULT_TARGET_MODULES",
            ),
        ),
    ),
    Variant(
        "mark_only_freezes",
        "2.1",
        "mark_only_lora_as_trainable only freezes, never sets requires_grad back to True (loralib).",
        (
            (
                '        param.requires_grad_(name.endswith(("lora_A", "lora_B")))',
                '        if not name.endswith(("lora_A", "lora_B")):\n            param.requires_grad_(False)',
            ),
        ),
    ),
    Variant(
        "count_includes_buffers",
        "2.2",
        "count_parameters counts the state dict, buffers included.",
        (
            (
                "    params = list(model.parameters())  # .parameters() already yields a shared tensor once",
                "    params = list(model.parameters()) + list(model.buffers())",
            ),
        ),
    ),
    Variant(
        "merge_lora_returns_nothing",
        "2.3",
        "merge_lora merges but returns None instead of the model.",
        (
            (
                "    for layer in layers:\n        layer.merge()\n    return model",
                "    for layer in layers:\n        layer.merge()",
            ),
        ),
    ),
    Variant(
        "config_init_as_kaiming",
        "2.4",
        "adapter_config.json writes init_lora_weights='kaiming', which PEFT rejects.",
        (('        "init_lora_weights": True,', '        "init_lora_weights": "kaiming",'),),
    ),
    Variant(
        "save_ignores_mixed_ranks",
        "2.4",
        "save_lora writes the first layer's r for every layer, even when they differ.",
        (("    if len(settings) > 1:", "    if False:"),),
    ),
    Variant(
        "save_without_metadata",
        "2.4",
        "The safetensors file is written without PEFT's metadata {'format': 'pt'}.",
        ((', metadata={"format": "pt"})', ")"),),
    ),
    Variant(
        "load_ignores_extra_tensors",
        "2.4",
        "load_lora ignores tensors for modules that have no LoRA layer in the model.",
        (("    if missing := sorted(in_file - planned.keys()):", "    if missing := []:"),),
    ),
    # ---- issue 19 item 7: refusals that change things first (the earlier suites checked the model only) ----
    Variant(
        "load_lora_copies_while_checking",
        "2.4",
        "Into existing LoRA layers, load_lora copies each layer as soon as its shapes pass: a misfit later leaves a half-loaded model.",
        (
            (
                '                raise ValueError(f"{key}: expected shape {shape} (r={r}), found {got}")\n    if not existing:',
                '                raise ValueError(f"{key}: expected shape {shape} (r={r}), found {got}")\n'
                "        if existing:  # this layer fits: copy its weights now\n"
                "            with torch.no_grad():\n"
                '                existing[path].lora_A.copy_(tensors[f"{PEFT_KEY_PREFIX}{path}.lora_A.weight"])\n'
                '                existing[path].lora_B.copy_(tensors[f"{PEFT_KEY_PREFIX}{path}.lora_B.weight"])\n'
                "    if not existing:",
            ),
        ),
    ),
    Variant(
        "save_lora_writes_before_checking",
        "2.4",
        "save_lora writes adapter_config.json first and checks for other trainable parameters after: a refused save overwrites it.",
        (
            (
                '    others = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("lora_A", "lora_B"))]\n    if others:\n        raise ValueError(\n            f"save_lora writes lora_A and lora_B only, but {len(others)} other parameters are trainable "\n            f"(e.g. {others[0]}); freeze them (bias=\'none\') or save them separately, or they would be lost"\n        )\n',
                "",
            ),
            (
                '    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\\n")\n',
                '    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\\n")\n    others = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("lora_A", "lora_B"))]\n    if others:\n        raise ValueError(\n            f"save_lora writes lora_A and lora_B only, but {len(others)} other parameters are trainable "\n            f"(e.g. {others[0]}); freeze them (bias=\'none\') or save them separately, or they would be lost"\n        )\n',
            ),
        ),
    ),
    Variant(
        "mark_only_sets_before_checking_bias",
        "2.1",
        "mark_only_lora_as_trainable sets requires_grad first and checks bias after: a refused call has already frozen the model.",
        (
            (
                '    if bias not in ("none", "all", "lora_only"):\n'
                "        raise ValueError(f\"bias must be 'none', 'all' or 'lora_only', got {bias!r}\")\n"
                "    for name, param in model.named_parameters():\n"
                '        param.requires_grad_(name.endswith(("lora_A", "lora_B")))\n',
                "    for name, param in model.named_parameters():\n"
                '        param.requires_grad_(name.endswith(("lora_A", "lora_B")))\n'
                '    if bias not in ("none", "all", "lora_only"):\n'
                "        raise ValueError(f\"bias must be 'none', 'all' or 'lora_only', got {bias!r}\")\n",
            ),
        ),
    ),
    Variant(
        "merge_lora_layer_by_layer",
        "2.3",
        "merge_lora merges layer after layer: a layer that cannot be merged raises after the earlier ones were merged.",
        (
            (
                "    for layer in layers:\n"
                "        if not layer.merged:\n"
                "            mergeable_weight(layer.base_layer)  # a TypeError here leaves every layer as it was\n",
                "",
            ),
        ),
    ),
    Variant(
        "merge_and_unload_layer_by_layer",
        "2.3",
        "merge_and_unload merges and unwraps layer after layer: a layer that cannot be merged leaves a half-unloaded model.",
        (
            (
                "    for _, layer in layers:\n"
                "        if not layer.merged:\n"
                "            mergeable_weight(layer.base_layer)  # refuse before anything changes\n",
                "",
            ),
        ),
    ),
]
