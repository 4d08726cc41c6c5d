"""Equivalents of Stage 4: correct trainer code written differently; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "cosine_as_squared_cosine",
        "4.3",
        "The cosine decay as cos²(πp/2), the same curve as ½(1 + cos πp).",
        (
            (
                "max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))",
                "math.cos(math.pi * min(progress, 1.0) / 2) ** 2",
            ),
        ),
    ),
    Variant(
        "divide_gradients_after_accumulating",
        "4.3",
        "Micro-batch losses summed as they are, the gradients divided by k before unscaling.",
        (
            (
                "            loss = lm_loss(logits, labels) / k  # fp32\n            self.scaler.scale(loss).backward()\n            total += loss.item()\n",
                "            loss = lm_loss(logits, labels)  # fp32\n            self.scaler.scale(loss).backward()\n            total += loss.item() / k\n",
            ),
            (
                "        self.scaler.unscale_(self.optimizer)  # gradients now in true units (no-op unless fp16)\n",
                "        for p in self.trainable_parameters():\n            if p.grad is not None:\n                p.grad.div_(k)\n"
                "        self.scaler.unscale_(self.optimizer)\n",
            ),
        ),
    ),
    Variant(
        "memory_from_a_table",
        "4.5",
        "estimate_memory from a table of bytes per parameter.",
        block="4.5: bytes per parameter for each method",
        code="""
            base_bytes = {"full": 4.0, "lora": 2.0, "qlora": bits_per_parameter(block_size, double_quant) / 8}
            if method not in base_bytes:
                raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
            trained = n_params if method == "full" else trainable_params
            parts = {
                "weights": base_bytes[method] * n_params + (0 if method == "full" else 4 * trainable_params),
                "gradients": 4 * trained,
                "optimizer": 2 * 4 * trained,
            }
            parts["total"] = sum(parts.values())
            return parts
            """,
    ),
    Variant(
        "export_by_building_merged_linears",
        "4.4",
        "merge_and_export computes dequant(W0) + ΔW itself and builds each nn.Linear once.",
        block="4.4: check every LoRA base",
        code="""
            for _, layer in lora_layers(model):
                if not isinstance(layer.base_layer, (NF4Linear, nn.Linear)):
                    raise TypeError(f"cannot merge into a {type(layer.base_layer).__name__} base (not an nn.Linear)")

            def plain(weight, bias):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                linear = linear.to(device=weight.device, dtype=dtype)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if bias is not None:
                        linear.bias.copy_(bias)
                return linear.requires_grad_(False)

            for name, layer in list(lora_layers(model)):
                base = layer.base_layer
                weight = base.dequantize_weight(torch.float32) if isinstance(base, NF4Linear) else base.weight.float()
                merged = (weight + layer.delta_weight().detach().float()).to(dtype if isinstance(base, NF4Linear) else base.weight.dtype)
                model.set_submodule(name, plain(merged, base.bias).to(merged.dtype))
            for name, module in list(model.named_modules()):
                if isinstance(module, NF4Linear):
                    model.set_submodule(name, plain(module.dequantize_weight(dtype), module.bias))
            return model
            """,
    ),
    Variant(
        "prepare_wraps_then_quantizes",
        "4.2",
        "Every NF4 (or bf16) base built first, then get_lora_model on the full-precision model, then the bases put in place.",
        block="4.2: quantize the linear layers, then add LoRA",
        code="""
            if any(True for _ in lora_layers(model)):
                raise ValueError("the model already has LoRA layers; prepare a fresh base model")
            layers = {
                name: module
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and not any(matches_target(name, skip) for skip in skip_modules)
            }
            quantized = {}
            if config.quantize == "nf4":
                dtype = PRECISIONS[config.precision]
                quantized = {
                    name: NF4Linear.from_linear(module, config.block_size, config.double_quant, dtype)
                    for name, module in layers.items()
                }
            elif config.base_dtype != "fp32":  # the bases stored in bf16: copies, swapped in after the wrapping too
                quantized = {
                    name: copy.deepcopy(module).to(PRECISIONS[config.base_dtype]).requires_grad_(False)
                    for name, module in layers.items()
                }
            torch.manual_seed(config.seed)
            get_lora_model(model, config.r, config.lora_alpha, config.lora_dropout, config.target_modules)
            for name, layer in quantized.items():
                wrapped = not isinstance(model.get_submodule(name), nn.Linear)
                model.set_submodule(f"{name}.base_layer" if wrapped else name, layer)
            if hasattr(model, "gradient_checkpointing"):
                model.gradient_checkpointing = config.gradient_checkpointing
            return model
            """,
    ),
    Variant(
        "load_checkpoint_compares_everything_at_once",
        "4.3",
        "load_checkpoint lists every misfit (names, shapes, groups, precision) in one refusal, then restores.",
        (
            (
                '        if extra := sorted(set(state["trainable"]) - set(params)):',
                "        mine = {name: tuple(p.shape) for name, p in params.items()}\n"
                '        theirs = {name: tuple(t.shape) for name, t in state["trainable"].items()}\n'
                "        problems = []\n"
                "        if set(theirs) - set(mine):\n"
                '            problems.append(f"the model lacks {sorted(set(theirs) - set(mine))[:5]}")\n'
                "        if set(mine) - set(theirs):\n"
                '            problems.append(f"the checkpoint lacks {sorted(set(mine) - set(theirs))[:5]}")\n'
                '        problems += [f"{n} has shape {theirs[n]}, the model\'s {mine[n]}" for n in sorted(set(mine) & set(theirs)) if theirs[n] != mine[n]][:3]\n'
                '        if [len(g["params"]) for g in state["optimizer"]["param_groups"]] != [len(g["params"]) for g in self.optimizer.param_groups]:\n'
                '            problems.append("its optimizer groups differ")\n'
                '        if bool(state["scaler"]) != self.scaler.is_enabled():\n'
                '            problems.append(f"its fp16 loss scaling does not match this trainer\'s precision {self.config.precision!r}")\n'
                "        if problems:\n"
                '            raise ValueError(f"checkpoint {path} does not fit this trainer: " + "; ".join(problems))\n'
                '        if extra := sorted(set(state["trainable"]) - set(params)):',
            ),
        ),
    ),
    Variant(
        "lr_linear_as_hf_writes_it",
        "4.3",
        "The linear decay as HF writes it, (max_steps − step) / (max_steps − warmup), clamped at 0.",
        (
            (
                "        return max(0.0, 1.0 - progress)",
                "        return max(0.0, (config.max_steps - step) / max(1, config.max_steps - warmup))",
            ),
        ),
    ),
    Variant(
        "gradients_cleared_by_hand",
        "4.3",
        "After the step every gradient is set to None by hand instead of optimizer.zero_grad(set_to_none=True).",
        (
            (
                "        self.scheduler.step()\n        self.optimizer.zero_grad(set_to_none=True)\n        self.step += 1",
                "        self.scheduler.step()\n        for p in params:\n            p.grad = None\n        self.step += 1",
            ),
        ),
    ),
    Variant(
        "bf16_base_as_new_linear",
        "4.2",
        "The bf16 base built as a new nn.Linear in that dtype with the weights copied in, instead of a deep copy cast.",
        (
            (
                "        replaced = {name: copy.deepcopy(linear).to(PRECISIONS[config.base_dtype]) for name, linear in originals.items()}\n",
                "        replaced = {}\n"
                "        for name, linear in originals.items():\n"
                "            new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,\n"
                "                            device=linear.weight.device, dtype=PRECISIONS[config.base_dtype])\n"
                "            with torch.no_grad():\n"
                "                new.weight.copy_(linear.weight)\n"
                "                if linear.bias is not None:\n"
                "                    new.bias.copy_(linear.bias)\n"
                "            replaced[name] = new.requires_grad_(False)\n",
            ),
        ),
    ),
]
