"""Mutants of Stage 4 (training/qlora_trainer.py): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    Variant(
        "config_accepts_zero_accumulation",
        "4.1",
        "TrainConfig does not check gradient_accumulation_steps (0 micro-batches per step).",
        (
            (
                '"r", "max_steps", "batch_size", "gradient_accumulation_steps", "block_size", "log_every"',
                '"r", "max_steps", "batch_size", "block_size", "log_every"',
            ),
        ),
    ),
    Variant(
        "config_string_target_split",
        "4.1",
        "TrainConfig turns target_modules='q_proj' into its letters.",
        (
            (
                "[self.target_modules] if isinstance(self.target_modules, str) else self.target_modules",
                "self.target_modules",
            ),
        ),
    ),
    Variant(
        "config_refuses_fp16_on_cpu",
        "4.1",
        "fp16 is refused on the CPU although a CPU GradScaler works (torch 2.13).",
        (
            (
                '        if not self.target_modules:\n            raise ValueError("target_modules must name at least one module")\n',
                '        if not self.target_modules:\n            raise ValueError("target_modules must name at least one module")\n'
                '        if self.precision == "fp16" and self.device != "cuda":\n'
                "            raise ValueError(\"precision='fp16' needs CUDA\")\n",
            ),
        ),
    ),
    Variant(
        "config_accepts_zero_alpha",
        "4.1",
        "lora_alpha is checked with >= 0 (0 passes).",
        (
            (
                '        for name in ("lora_alpha", "learning_rate"):\n            if not getattr(self, name) > 0:',
                '        for name in ("lora_alpha", "learning_rate"):\n            if not getattr(self, name) >= 0:',
            ),
        ),
    ),
    Variant(
        "lora_on_the_head",
        "4.2",
        "prepare_qlora_model also puts LoRA (and NF4) on the output head.",
        (
            (
                "    get_lora_model(model, config.r, config.lora_alpha, config.lora_dropout, config.target_modules)",
                '    get_lora_model(model, config.r, config.lora_alpha, config.lora_dropout, (*config.target_modules, "lm_head"))',
            ),
        ),
    ),
    Variant(
        "adapters_in_bf16",
        "4.2",
        "The adapters are cast to the compute dtype: no fp32 master weights.",
        (
            (
                '    if hasattr(model, "gradient_checkpointing"):',
                "    for name, param in model.named_parameters():\n"
                "        if param.requires_grad:\n"
                "            param.data = param.data.to(PRECISIONS[config.precision])\n"
                '    if hasattr(model, "gradient_checkpointing"):',
            ),
        ),
    ),
    Variant(
        "quantize_nothing",
        "4.2",
        "prepare_qlora_model adds LoRA but forgets to quantize the base layers.",
        (('    if config.quantize == "nf4":\n        compute_dtype', "    if False:\n        compute_dtype"),),
    ),
    Variant(
        "prepare_ignores_lora_settings",
        "4.2",
        "prepare_qlora_model passes only r on (alpha and dropout keep their defaults).",
        (
            (
                "    get_lora_model(model, config.r, config.lora_alpha, config.lora_dropout, config.target_modules)",
                "    get_lora_model(model, config.r, target_modules=config.target_modules)",
            ),
        ),
    ),
    Variant(
        "prepare_ignores_block_size",
        "4.2",
        "prepare_qlora_model quantizes in blocks of 64 whatever config.block_size says.",
        (
            (
                "NF4Linear.from_linear(linear, config.block_size, config.double_quant, compute_dtype)",
                "NF4Linear.from_linear(linear, 64, config.double_quant, compute_dtype)",
            ),
        ),
    ),
    Variant(
        "prepare_computes_in_fp32",
        "4.2",
        "The NF4 layers compute in fp32 whatever the precision.",
        (
            (
                "NF4Linear.from_linear(linear, config.block_size, config.double_quant, compute_dtype)",
                "NF4Linear.from_linear(linear, config.block_size, config.double_quant, torch.float32)",
            ),
        ),
    ),
    Variant(
        "frozen_weights_in_optimizer",
        "4.3",
        "The optimizer is handed every parameter, frozen ones included.",
        (
            (
                "        if not param.requires_grad:\n            continue\n        if param.ndim < 2:",
                "        if param.ndim < 2:",
            ),
        ),
    ),
    Variant(
        "weight_decay_on_biases",
        "4.3",
        "Biases and norms get weight decay too.",
        (('{"params": vectors, "lr": lr, "weight_decay": 0.0}', '{"params": vectors, "lr": lr, "weight_decay": wd}'),),
    ),
    Variant(
        "learning_rate_not_passed",
        "4.3",
        "The optimizer groups carry no learning rate: AdamW's default 1e-3 is used.",
        (
            (
                '        {"params": matrices, "lr": lr, "weight_decay": wd},',
                '        {"params": matrices, "weight_decay": wd},',
            ),
            (
                "    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)",
                "    return torch.optim.AdamW(groups, weight_decay=wd)",
            ),
        ),
    ),
    Variant(
        "loraplus_on_a",
        "4.3",
        "LoRA+ raises the learning rate of A instead of B.",
        (
            (
                'elif name.endswith("lora_B") and config.loraplus_lr_ratio is not None:',
                'elif name.endswith("lora_A") and config.loraplus_lr_ratio is not None:',
            ),
        ),
    ),
    Variant(
        "warmup_off_by_one",
        "4.3",
        "Warmup starts at 1/warmup instead of 0 (step + 1).",
        (("        return step / warmup", "        return (step + 1) / warmup"),),
    ),
    Variant(
        "cosine_without_half",
        "4.3",
        "The cosine schedule forgets the factor 1/2.",
        (
            (
                "max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))",
                "max(0.0, math.cos(math.pi * min(progress, 1.0)))",
            ),
        ),
    ),
    Variant(
        "decay_over_all_steps",
        "4.3",
        "The decay runs over max_steps instead of the steps after warmup.",
        (
            (
                "    progress = (step - warmup) / (config.max_steps - warmup) if config.max_steps > warmup else 1.0",
                "    progress = step / config.max_steps",
            ),
        ),
    ),
    Variant(
        "loss_not_divided_by_accumulation",
        "4.3",
        "Each micro-batch loss is not divided by the number of micro-batches.",
        (
            (
                "            loss = lm_loss(logits, labels) / k  # fp32",
                "            loss = lm_loss(logits, labels)  # fp32",
            ),
        ),
    ),
    Variant(
        "step_every_micro_batch",
        "4.3",
        "The optimizer steps after every micro-batch instead of once per accumulation.",
        (
            (
                "            self.scaler.scale(loss).backward()\n",
                "            self.scaler.scale(loss).backward()\n            self.scaler.step(self.optimizer)\n            self.scaler.update()\n",
            ),
        ),
    ),
    Variant(
        "clip_before_unscale",
        "4.3",
        "Gradients are clipped while still multiplied by the loss scale.",
        (
            (
                "        self.scaler.unscale_(self.optimizer)  # gradients now in true units (no-op unless fp16)\n",
                "        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm or 1e9)\n"
                "        self.scaler.unscale_(self.optimizer)\n",
            ),
        ),
    ),
    Variant(
        "non_finite_not_skipped",
        "4.3",
        "A non-finite loss is stepped on like any other (NaN spreads into the adapters).",
        (("        if not finite:\n", "        if False:\n"),),
    ),
    Variant(
        "non_finite_checks_the_loss_only",
        "4.3",
        "Only the loss is checked for NaN/inf, not the gradients.",
        (
            (
                "        finite = math.isfinite(total) and all(p.grad is None or torch.isfinite(p.grad).all() for p in params)",
                "        finite = math.isfinite(total)",
            ),
        ),
    ),
    Variant(
        "no_train_mode",
        "4.3",
        "train_step never calls model.train(): dropout stays off after an evaluation.",
        (("        self.model.train()\n        k, total", "        k, total"),),
    ),
    Variant(
        "checkpoint_without_optimizer",
        "4.3",
        "The checkpoint restores the adapter but not the optimizer state.",
        (('        self.optimizer.load_state_dict(state["optimizer"])\n', ""),),
    ),
    Variant(
        "checkpoint_without_rng",
        "4.3",
        "The checkpoint does not restore the RNG state (dropout masks differ after resuming).",
        (('        torch.set_rng_state(state["rng"]["cpu"])\n', ""),),
    ),
    Variant(
        "checkpoint_without_scheduler",
        "4.3",
        "The checkpoint does not restore the schedule (the learning rate restarts its warmup).",
        (('        self.scheduler.load_state_dict(state["scheduler"])\n', ""),),
    ),
    Variant(
        "checkpoint_without_history",
        "4.3",
        "The checkpoint does not restore the loss history.",
        (('        self.history = list(state["history"])\n', ""),),
    ),
    Variant(
        "merge_into_nf4",
        "4.4",
        "merge_and_export merges without dequantizing the 4-bit bases first.",
        (("        if isinstance(module, NF4Linear):\n            weight", "        if False:\n            weight"),),
    ),
    Variant(
        "export_drops_the_bias",
        "4.4",
        "merge_and_export rebuilds each dequantized layer without its bias.",
        (
            (
                "            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)",
                "            linear = nn.Linear(module.in_features, module.out_features, bias=False)",
            ),
        ),
    ),
    Variant(
        "export_ignores_dtype",
        "4.4",
        "merge_and_export always exports float32.",
        (
            (
                "            weight = module.dequantize_weight(dtype)",
                "            weight = module.dequantize_weight(torch.float32)",
            ),
            (
                "            linear = linear.to(device=weight.device, dtype=dtype)",
                "            linear = linear.to(device=weight.device)",
            ),
        ),
    ),
    Variant(
        "full_finetune_12_bytes",
        "4.5",
        "Full fine-tuning memory counts fp16 weights and gradients (12 bytes) instead of fp32 AdamW's 16.",
        (
            (
                "weights, gradients, optimizer = 4 * n_params, 4 * n_params, 8 * n_params",
                "weights, gradients, optimizer = 2 * n_params, 2 * n_params, 8 * n_params",
            ),
        ),
    ),
    Variant(
        "qlora_memory_without_dq",
        "4.5",
        "QLoRA memory ignores double quantization (always 4.5 bits).",
        (("bits_per_parameter(block_size, double_quant) / 8", "bits_per_parameter(64) / 8"),),
    ),
    Variant(
        "adapter_weights_not_counted",
        "4.5",
        "The adapters' own fp32 weights are left out of the weight bytes.",
        (("        weights = per_base * n_params + 4 * trainable_params", "        weights = per_base * n_params"),),
    ),
    # Promises of lesson 04 that the suites grade.
    Variant(
        "skip_modules_ignored",
        "4.2",
        "Only lm_head is kept full precision, whatever skip_modules says.",
        (("not any(matches_target(name, skip) for skip in skip_modules)", 'not matches_target(name, "lm_head")'),),
    ),
    Variant(
        "fp16_computes_in_bf16",
        "4.2",
        "Every half precision becomes bf16: precision='fp16' computes in bf16.",
        (
            (
                "        compute_dtype = PRECISIONS[config.precision]",
                "        compute_dtype = torch.float32 if config.precision == 'fp32' else torch.bfloat16",
            ),
        ),
    ),
    Variant(
        "prepare_checks_lora_too_late",
        "4.2",
        "A model with LoRA is quantized first and only then refused (it is left changed).",
        (
            (
                '    if any(True for _ in lora_layers(model)):\n        raise ValueError("the model already has LoRA layers; prepare a fresh base model")\n',
                "",
            ),
            (
                "        for name, linear in originals.items():  # refused: the full-precision layers go back\n"
                "            model.set_submodule(name, linear)\n",
                "        pass\n",
            ),
        ),
    ),
    Variant(
        "no_autocast_in_train_step",
        "4.3",
        "train_step runs the forward without autocast (bf16 and fp16 do nothing).",
        (
            (
                "            with self.autocast():\n                logits = self.model(input_ids)  # (B, T, V)",
                "            logits = self.model(input_ids)  # (B, T, V)",
            ),
        ),
    ),
    Variant(
        "skip_without_scaler_update",
        "4.3",
        "A skipped step does not update the GradScaler: fp16 keeps overflowing.",
        (("            self.scaler.update()  # fp16: lowers the scale; otherwise a no-op\n", ""),),
    ),
    Variant(
        "skip_does_not_count_the_step",
        "4.3",
        "A skipped step does not advance step or the schedule.",
        (
            (
                "            with warnings.catch_warnings():  # the schedule counts attempted steps, skipped ones too\n"
                '                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")\n'
                "                self.scheduler.step()\n            self.step += 1\n",
                "",
            ),
        ),
    ),
    Variant(
        "returns_sum_of_losses",
        "4.3",
        "train_step returns the sum of the micro-batch losses, not their mean.",
        (("        self.step += 1\n        return total\n", "        self.step += 1\n        return total * k\n"),),
    ),
    Variant(
        "schedule_goes_negative",
        "4.3",
        "The linear decay goes below zero after max_steps.",
        (("        return max(0.0, 1.0 - progress)", "        return 1.0 - progress"),),
    ),
    Variant(
        "empty_groups_kept",
        "4.3",
        "build_optimizer keeps empty parameter groups.",
        (('    groups = [g for g in groups if g["params"]]\n', ""),),
    ),
    Variant(
        "checkpoint_written_in_place",
        "4.3",
        "The checkpoint is written straight to its final path.",
        (('        tmp = path.with_name(path.name + ".tmp")', "        tmp = path"),),
    ),
    Variant(
        "checkpoint_without_scaler",
        "4.3",
        "The checkpoint does not restore the GradScaler (fp16's scale restarts).",
        (('        self.scaler.load_state_dict(state["scaler"])\n', ""),),
    ),
    Variant(
        "checkpoint_skips_unknown_parameters",
        "4.3",
        "load_checkpoint skips parameters the model lacks instead of refusing the file.",
        (
            ('        if extra := sorted(set(state["trainable"]) - set(params)):', "        if extra := []:"),
            (
                "                params[name].copy_(tensor)",
                "                if name in params:\n                    params[name].copy_(tensor)",
            ),
        ),
    ),
    Variant(
        "export_casts_the_whole_model",
        "4.4",
        "merge_and_export casts the whole model to dtype, norms and head included.",
        (("    return merge_and_unload(model)", "    return merge_and_unload(model).to(dtype)"),),
    ),
    # ---- issue 19 item 7: the bugs the earlier suites missed (refusals, trainer corner cases, several DQ blocks) ----
    Variant(
        "export_first_dq_block_only",
        "4.4",
        "merge_and_export double-dequantizes the absmax itself with the first DQ scale only (fine up to 256 NF4 blocks).",
        (
            (
                "            weight = module.dequantize_weight(dtype)\n",
                '            if module.double_quant:  # the absmax values, double-dequantized by hand\n                code = cached_code_book("dynamic", module.packed.device)\n                absmax = code[module.absmax_codes.long()] * module.absmax_scale[0] + module.absmax_offset\n            else:\n                absmax = module.absmax\n            shape = (module.out_features, module.in_features)\n            weight = dequantize_nf4(module.packed, absmax, shape, module.block_size, dtype)\n',
            ),
            (
                "from model.quant import NF4Linear, bits_per_parameter",
                "from model.quant import NF4Linear, bits_per_parameter, cached_code_book, dequantize_nf4",
            ),
        ),
    ),
    Variant(
        "merge_and_export_dequantizes_before_checking",
        "4.4",
        "merge_and_export dequantizes every NF4 base first: a LoRA base it cannot merge into raises with the model half-exported.",
        (
            (
                "    for _, layer in lora_layers(model):\n"
                "        if not isinstance(layer.base_layer, NF4Linear):\n"
                "            mergeable_weight(layer.base_layer)  # refuse before anything changes\n",
                "",
            ),
        ),
    ),
    Variant(
        "prepare_no_rollback",
        "4.2",
        "prepare_qlora_model quantizes first; when get_lora_model then refuses a target, the model is left quantized.",
        (
            (
                "    except Exception:\n"
                "        for name, linear in originals.items():  # refused: the full-precision layers go back\n"
                "            model.set_submodule(name, linear)\n"
                "        raise\n",
                "    except Exception:\n        raise\n",
            ),
        ),
    ),
    Variant(
        "prepare_quantizes_layer_by_layer",
        "4.2",
        "prepare_qlora_model swaps each layer as soon as it is quantized: a NaN weight in a later layer leaves earlier ones NF4.",
        (
            (
                "        replaced = {  # every layer first: a refusal here (a non-finite weight) changes nothing\n            name: NF4Linear.from_linear(linear, config.block_size, config.double_quant, compute_dtype)\n            for name, linear in originals.items()\n        }\n",
                "        replaced = {}\n        for name, linear in originals.items():\n            layer = NF4Linear.from_linear(linear, config.block_size, config.double_quant, compute_dtype)\n            model.set_submodule(name, layer)\n",
            ),
        ),
    ),
    Variant(
        "load_checkpoint_copies_before_checking",
        "4.3",
        "load_checkpoint restores as it goes (only unknown names are refused first): another rank or precision fails half-way.",
        (
            (
                '        if missing := sorted(set(params) - set(state["trainable"])):\n            raise ValueError(f"checkpoint {path} lacks trainable parameters of the model: {missing[:5]}")\n        for name, param in params.items():\n            if state["trainable"][name].shape != param.shape:\n                shape = tuple(state["trainable"][name].shape)\n                raise ValueError(f"checkpoint {path}: {name} has shape {shape}, the model\'s {tuple(param.shape)}")\n        sizes = [len(group["params"]) for group in state["optimizer"]["param_groups"]]\n        if sizes != [len(group["params"]) for group in self.optimizer.param_groups]:\n            raise ValueError(f"checkpoint {path}: optimizer groups of sizes {sizes} do not fit this trainer\'s")\n        if bool(state["scaler"]) != self.scaler.is_enabled():\n            raise ValueError(\n                f"checkpoint {path} was written {\'with\' if state[\'scaler\'] else \'without\'} fp16 loss scaling, "\n                f"but this trainer\'s precision is {self.config.precision!r}"\n            )\n',
                "",
            ),
        ),
    ),
    Variant(
        "train_step_accepts_no_micro_batches",
        "4.3",
        "train_step([]) is not refused: it takes an empty optimizer step and advances the schedule.",
        (
            (
                "        if not micro_batches:\n"
                '            raise ValueError("micro_batches must hold at least one (input_ids, labels) pair, got an empty list")\n',
                "",
            ),
        ),
    ),
    Variant(
        "lr_decay_restarts_when_warmup_covers_all",
        "4.3",
        "progress = (step − warmup) / max(1, max_steps − warmup): when warm-up covers every step, the factor jumps to 1 at the end.",
        (
            (
                "    progress = (step - warmup) / (config.max_steps - warmup) if config.max_steps > warmup else 1.0",
                "    progress = (step - warmup) / max(1, config.max_steps - warmup)",
            ),
        ),
    ),
    Variant(
        "lr_divides_by_zero_when_warmup_covers_all",
        "4.3",
        "progress = (step − warmup) / (max_steps − warmup): max_steps=1 (or warm-up over every step) divides by zero.",
        (
            (
                "    progress = (step - warmup) / (config.max_steps - warmup) if config.max_steps > warmup else 1.0",
                "    progress = (step - warmup) / (config.max_steps - warmup)",
            ),
        ),
    ),
    Variant(
        "weight_decay_on_norm_weights",
        "4.3",
        "Only parameters named '...bias' skip weight decay: a trainable norm weight (a vector) is decayed.",
        (
            (
                "        if param.ndim < 2:\n            vectors.append(param)",
                '        if name.endswith("bias"):\n            vectors.append(param)',
            ),
        ),
    ),
    Variant(
        "gradients_kept_after_step",
        "4.3",
        "train_step clears the gradients at its start instead of its end: they stay allocated between steps.",
        (
            (
                "        self.model.train()\n        k, total",
                "        self.model.train()\n        self.optimizer.zero_grad(set_to_none=True)\n        k, total",
            ),
            (
                "        self.scheduler.step()\n        self.optimizer.zero_grad(set_to_none=True)\n        self.step += 1\n        return total",
                "        self.scheduler.step()\n        self.step += 1\n        return total",
            ),
        ),
    ),
    Variant(
        "gradients_zeroed_not_freed",
        "4.3",
        "After a step the gradients are zero tensors (set_to_none=False), not None: their memory stays held.",
        (
            (
                "        self.scheduler.step()\n        self.optimizer.zero_grad(set_to_none=True)\n        self.step += 1",
                "        self.scheduler.step()\n        self.optimizer.zero_grad(set_to_none=False)\n        self.step += 1",
            ),
        ),
    ),
    # base_dtype (issue 20): the frozen base in the compute dtype, for plain LoRA
    Variant(
        "base_dtype_ignored",
        "4.2",
        "base_dtype='bf16' is accepted but prepare_qlora_model leaves the fp32 base (autocast still casts a copy).",
        (('    if config.quantize == "nf4" or config.base_dtype != "fp32":', '    if config.quantize == "nf4":'),),
    ),
    Variant(
        "base_cast_in_place",
        "4.2",
        "The base layers are cast in place (linear.to(dtype)): a refusal afterwards leaves them rounded to bf16.",
        (("copy.deepcopy(linear).to(PRECISIONS[config.base_dtype])", "linear.to(PRECISIONS[config.base_dtype])"),),
    ),
    Variant(
        "base_dtype_casts_the_whole_model",
        "4.2",
        "model.to(bf16) for base_dtype='bf16': norms, embedding and head are cast too.",
        (
            (
                "    torch.manual_seed(config.seed)\n    try:",
                '    if config.base_dtype != "fp32":\n'
                "        model.to(PRECISIONS[config.base_dtype])\n"
                "    torch.manual_seed(config.seed)\n    try:",
            ),
        ),
    ),
    Variant(
        "base_dtype_with_nf4_accepted",
        "4.1",
        "TrainConfig accepts base_dtype='bf16' with quantize='nf4' (which stores its own base and ignores it).",
        (
            (
                'allowed = ("fp32",) if self.quantize == "nf4" else tuple(dict.fromkeys(("fp32", self.precision)))',
                'allowed = tuple(dict.fromkeys(("fp32", self.precision)))',
            ),
        ),
    ),
    Variant(
        "base_dtype_any_half",
        "4.1",
        "TrainConfig accepts any half-precision base_dtype, also one that differs from the precision (bf16 under fp32).",
        (
            (
                'allowed = ("fp32",) if self.quantize == "nf4" else tuple(dict.fromkeys(("fp32", self.precision)))',
                'allowed = ("fp32",) if self.quantize == "nf4" else tuple(PRECISIONS)',
            ),
        ),
    ),
]
