"""Mutants of Stage 6 (training/memory.py): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    # ---- 6.1 state quantization ---------------------------------------------------------------------
    Variant(
        "unsigned_code_is_the_signed_one",
        "6.1",
        "unsigned_dynamic_code_book returns Stage 3's signed code (v gets half its levels on negatives it never has).",
        block="6.1: twice the fractions per exponent",
        code="""
            return dynamic_code_book()
            """,
    ),
    Variant(
        "unsigned_code_with_the_signed_fraction_count",
        "6.1",
        "The unsigned code keeps the signed code's 2^e fractions per exponent (129 levels instead of 256).",
        (
            (
                "        boundaries = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float32)",
                "        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)",
            ),
        ),
    ),
    Variant(
        "lut_centres_over_65536",
        "6.1",
        "The bin centres are k·2/65536 − 1 (an off-by-one in the bin width) instead of k·2/65535 − 1.",
        (
            (
                "    centres = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device) * 2 / (LUT_SIZE - 1) - 1.0",
                "    centres = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device) * 2 / LUT_SIZE - 1.0",
            ),
        ),
    ),
    Variant(
        "quantize_divides_by_absmax",
        "6.1",
        "The quantizer computes x / absmax instead of x · (1 / absmax): a different rounding at bin boundaries.",
        (
            (
                "    scaled = (blocks * inverse[:, None]).clamp_(-1.0, 1.0)  # (n_blocks, block_size)",
                "    scaled = (blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]).clamp_(-1.0, 1.0)",
            ),
        ),
    ),
    Variant(
        "quantize_rounds_the_bin",
        "6.1",
        "The bin index is rounded instead of truncated after adding 0.5.",
        (
            (
                "    bins = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()  # in 0 … 65535",
                "    bins = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).round().long().clamp(max=LUT_SIZE - 1)",
            ),
        ),
    ),
    Variant(
        "quantize_bin_without_half",
        "6.1",
        "The bin forgets the + 0.5: (s + 1)·0.5·65535 truncated, always the lower bin.",
        (
            (
                "    bins = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()  # in 0 … 65535",
                "    bins = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1)).long()  # in 0 … 65535",
            ),
        ),
    ),
    Variant(
        "all_zero_block_gets_the_code_of_zero",
        "6.1",
        "An all-zero block is quantized like any other (the code of 0.0) instead of code 0.",
        (("    codes[absmax == 0] = 0\n", ""),),
    ),
    Variant(
        "state_block_size_64",
        "6.1",
        "quantize_blockwise_lut defaults to NF4's block of 64 instead of bitsandbytes' 256 for optimizer states.",
        (
            (
                "    x: torch.Tensor, lut: torch.Tensor, block_size: int = STATE_BLOCK_SIZE",
                "    x: torch.Tensor, lut: torch.Tensor, block_size: int = 64",
            ),
        ),
    ),
    Variant(
        "absmax_per_tensor",
        "6.1",
        "One absmax for the whole tensor (repeated per block) instead of one per block of 256.",
        (
            (
                "    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)",
                "    absmax = blocks.abs().amax().expand(blocks.shape[0]).clone()  # (n_blocks,)",
            ),
        ),
    ),
    # ---- 6.2 AdamW8bit -----------------------------------------------------------------------------------
    Variant(
        "moments_never_requantized",
        "6.2",
        "update_8bit computes new m and v but never writes their codes back (state1 / state2 stay as they were).",
        (
            (
                '        state["state1"].copy_(codes1.view(p.shape))\n        state["state2"].copy_(codes2.view(p.shape))\n',
                "",
            ),
        ),
    ),
    Variant(
        "moments_kept_in_float32",
        "6.2",
        "update_8bit keeps float32 copies of m and v in the state and steps from them; the codes are written but "
        "never read back (no quantization error, and 8 bytes per parameter again).",
        block="6.2: dequantize, update",
        code="""
            books, bs = state_code_books(p.device), self.block_size
            if "m32" not in state:
                state["m32"] = torch.zeros_like(p, dtype=torch.float32)
                state["v32"] = torch.zeros_like(p, dtype=torch.float32)
            m, v = state["m32"], state["v32"]
            beta1, beta2 = group["betas"]
            p32 = p.detach().float()
            adamw_update_8bit_(
                p32, p.grad.float(), m, v, step=state["step"], lr=group["lr"],
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            )  # fmt: skip
            p.detach().copy_(p32)
            codes1, state["absmax1"] = quantize_blockwise_lut(m, books["signed_lut"], bs)
            codes2, state["absmax2"] = quantize_blockwise_lut(v, books["unsigned_lut"], bs)
            state["state1"].copy_(codes1.view(p.shape))
            state["state2"].copy_(codes2.view(p.shape))
            """,
    ),
    Variant(
        "weight_decay_after_the_step",
        "6.2",
        "Decoupled weight decay is applied after the Adam step instead of before it.",
        block="6.2: the two moments",
        code="""
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            correction1 = 1.0 - beta1**step
            correction2 = math.sqrt(1.0 - beta2**step)
            denom = (v.sqrt() / correction2).add_(eps)
            p.addcdiv_(m, denom, value=-lr / correction1)
            if weight_decay > 0.0:
                p.mul_(1.0 - lr * weight_decay)
            """,
    ),
    Variant(
        "no_bias_correction",
        "6.2",
        "The 8-bit step forgets Adam's bias corrections (c1 = c2 = 1).",
        (
            (
                "    correction1 = 1.0 - beta1**step\n    correction2 = math.sqrt(1.0 - beta2**step)\n    denom = (v.sqrt() / correction2).add_(eps)",
                "    correction1 = 1.0\n    correction2 = 1.0\n    denom = (v.sqrt() / correction2).add_(eps)",
            ),
        ),
    ),
    Variant(
        "eps_inside_the_bias_correction",
        "6.2",
        "ε is added before dividing by √(1 − β2^t): (√v + ε) / c2 instead of √v / c2 + ε.",
        (("    denom = (v.sqrt() / correction2).add_(eps)", "    denom = (v.sqrt() + eps) / correction2"),),
    ),
    Variant(
        "v_with_the_signed_code",
        "6.2",
        "v is decoded and re-quantized with the signed code (half the levels wasted on negatives).",
        (
            (
                '        v = dequantize_blockwise(state["state2"], state["absmax2"], books["unsigned"], bs).view(p.shape)',
                '        v = dequantize_blockwise(state["state2"], state["absmax2"], books["signed"], bs).view(p.shape)',
            ),
            (
                '        codes2, state["absmax2"] = quantize_blockwise_lut(v, books["unsigned_lut"], bs)',
                '        codes2, state["absmax2"] = quantize_blockwise_lut(v, books["signed_lut"], bs)',
            ),
        ),
    ),
    Variant(
        "stage3_exact_quantizer_for_the_moments",
        "6.2",
        "update_8bit re-quantizes m and v with Stage 3's exact-nearest quantize_blockwise instead of the lookup table.",
        (
            (
                '        codes1, state["absmax1"] = quantize_blockwise_lut(m, books["signed_lut"], bs)\n'
                '        codes2, state["absmax2"] = quantize_blockwise_lut(v, books["unsigned_lut"], bs)',
                "        from model.quant import quantize_blockwise\n\n"
                '        codes1, state["absmax1"] = quantize_blockwise(m, books["signed"], bs)\n'
                '        codes2, state["absmax2"] = quantize_blockwise(v, books["unsigned"], bs)',
            ),
        ),
    ),
    Variant(
        "min_8bit_size_inclusive",
        "6.2",
        "init_state keeps fp32 states for numel <= min_8bit_size (a tensor of exactly 4096 elements should be 8-bit).",
        (("        if p.numel() < self.min_8bit_size:", "        if p.numel() <= self.min_8bit_size:"),),
    ),
    Variant(
        "first_group_hyper_parameters_for_all",
        "6.2",
        "Every 8-bit tensor is updated with the first group's lr / betas / eps / weight_decay.",
        (
            (
                "                    self.update_8bit(p, state, group)",
                "                    self.update_8bit(p, state, self.param_groups[0])",
            ),
        ),
    ),
    Variant(
        "load_state_dict_keeps_float_codes",
        "6.2",
        "AdamW8bit does not fix load_state_dict: torch casts the uint8 codes to float32 and they stay so.",
        block="6.2: load, then restore",
        code="""
            super().load_state_dict(state_dict)
            """,
    ),
    # ---- 6.3 PagedOptimizer --------------------------------------------------------------------------
    Variant(
        "last_group_never_paged_in",
        "6.3",
        "The prefetch loop stops one group early: the last group is updated without being paged in.",
        (("            if i + 1 < len(groups):", "            if i + 2 < len(groups):"),),
    ),
    Variant(
        "bytes_paged_in_not_counted",
        "6.3",
        "page_in moves the states but forgets to add their bytes to bytes_paged_in (bytes counted one way only).",
        (("        self.bytes_paged_in += moved\n", ""),),
    ),
    Variant(
        "new_states_counted_as_paged_in",
        "6.3",
        "The states a first step creates are counted as paged in too (step 1 pages in nothing).",
        (
            (
                "                        slot = self.pool_tensor(tensor, p)\n",
                "                        slot = self.pool_tensor(tensor, p)\n"
                "                        self.bytes_paged_in += nbytes(tensor)\n",
            ),
        ),
    ),
    Variant(
        "groups_not_restored_on_error",
        "6.3",
        "step() sets the wrapped optimizer's param_groups to one group and restores the list only if the update succeeds.",
        (
            (
                "            try:\n                self.optimizer.step()\n            finally:\n                self.optimizer.param_groups = groups",
                "            self.optimizer.step()\n            self.optimizer.param_groups = groups",
            ),
        ),
    ),
    Variant(
        "load_state_dict_not_shared_again",
        "6.3",
        "PagedOptimizer.load_state_dict delegates but keeps the old state / param_groups objects (the pager drifts apart).",
        (
            (
                "        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state\n        for group",
                "        for group",
            ),
        ),
    ),
    # ---- 6.4 make_optimizer, MemoryConfig, MemoryTrainer ---------------------------------------------
    Variant(
        "scheduler_not_rebuilt",
        "6.4",
        "MemoryTrainer swaps the optimizer but keeps Stage 4's scheduler, which drives the old AdamW.",
        (
            (
                "        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))\n",
                "",
            ),
        ),
    ),
    Variant(
        "groups_rebuilt_at_the_scheduled_lr",
        "6.4",
        "The groups are rebuilt with their current lr (already scaled by warmup to 0) instead of initial_lr.",
        (
            (
                '            {"params": g["params"], "lr": g["initial_lr"], "weight_decay": g["weight_decay"]}',
                '            {"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}',
            ),
        ),
    ),
    Variant(
        "min_8bit_size_not_passed",
        "6.4",
        "make_optimizer builds AdamW8bit without min_8bit_size (always the default 4096).",
        (
            (
                "        base = AdamW8bit(param_groups, min_8bit_size=min_8bit_size, **hyper)",
                "        base = AdamW8bit(param_groups, **hyper)",
            ),
        ),
    ),
    Variant(
        "paged_8bit_is_fp32",
        "6.4",
        "Only the name 'adamw8bit' builds AdamW8bit: 'paged_adamw8bit' wraps a plain AdamW.",
        (('    if name.endswith("adamw8bit"):', '    if name == "adamw8bit":'),),
    ),
    Variant(
        "config_skips_stage4_checks",
        "6.4",
        "MemoryConfig.__post_init__ forgets to call the parent's checks (r = 0 is accepted).",
        (("        super().__post_init__()\n        if self.optimizer", "        if self.optimizer"),),
    ),
    Variant(
        "min_8bit_size_unchecked",
        "6.4",
        "MemoryConfig does not check min_8bit_size.",
        (
            (
                '        check_int("min_8bit_size", self.min_8bit_size, 0)\n        # END SOLUTION',
                "        # END SOLUTION",
            ),
        ),
    ),
    # ---- 6.5 memory accounting ---------------------------------------------------------------------------
    Variant(
        "state_bytes_without_absmax",
        "6.5",
        "8-bit state bytes count the uint8 codes but not the fp32 absmax per block.",
        (("            total += 2 * n + 8 * -(-n // STATE_BLOCK_SIZE)", "            total += 2 * n"),),
    ),
    Variant(
        "state_bytes_min_8bit_inclusive",
        "6.5",
        "optimizer_state_bytes keeps fp32 states for n <= min_8bit_size.",
        (("        elif n < min_8bit_size:", "        elif n <= min_8bit_size:"),),
    ),
    Variant(
        "state_bytes_without_the_step_tensor",
        "6.5",
        "AdamW's state bytes omit torch's 4-byte step counter per tensor.",
        (("            total += 8 * n + 4", "            total += 8 * n"),),
    ),
    Variant(
        "estimate_ignores_min_8bit_size",
        "6.5",
        "estimate_memory_parts calls optimizer_state_bytes without min_8bit_size (the default 4096 always).",
        (
            (
                '        "optimizer": optimizer_state_bytes(numels, optimizer, min_8bit_size),',
                '        "optimizer": optimizer_state_bytes(numels, optimizer),',
            ),
        ),
    ),
    Variant(
        "checkpointing_without_the_recompute",
        "6.5",
        "With gradient checkpointing the measurement forgets the one block that backward recomputes.",
        (
            (
                '    if config.gradient_checkpointing and device.type == "cpu":\n'
                "        activations += largest_block_recompute(model, input_ids, autocast, own)\n",
                "",
            ),
        ),
    ),
    Variant(
        "parameters_counted_as_activations",
        "6.5",
        "The pack hook counts every saved tensor, the model's own parameters and buffers too.",
        (
            (
                "    activations = live_bytes(saved, own)  # the graph",
                "    activations = live_bytes(saved)  # the graph",
            ),
        ),
    ),
    Variant(
        "activations_counted_at_save_time",
        "6.5",
        "The pack hook adds each new storage's bytes as it is saved, also those of graphs the forward throws away.",
        (
            (
                "        saved.append(weakref.ref(t))  # counted once the forward is done: only what is still alive\n",
                "        nonlocal activations\n"
                "        if t.untyped_storage().data_ptr() not in own | counted:\n"
                "            counted.add(t.untyped_storage().data_ptr())\n"
                "            activations += t.untyped_storage().nbytes()\n",
            ),
            (
                "    saved: list[weakref.ref] = []\n",
                "    saved: list[weakref.ref] = []\n    counted: set[int] = set()\n    activations = 0\n",
            ),
            ("    activations = live_bytes(saved, own)  # the graph", "    activations += 0  # the graph"),
        ),
    ),
    Variant(
        "batch_not_copied",
        "6.5",
        "measure_memory uses the batch as given: a slice counts the storage of the whole dataset.",
        (
            (
                "    input_ids, labels = (t.clone().to(device) for t in batch)",
                "    input_ids, labels = (t.to(device) for t in batch)",
            ),
        ),
    ),
    Variant(
        "measure_on_the_callers_model",
        "6.5",
        "measure_memory runs the step on the caller's model (no deep copy): its gradients are left behind.",
        (("    model = copy.deepcopy(model).to(device)", "    model = model.to(device)"),),
    ),
    # PagedOptimizer's size threshold (issue 20: bitsandbytes pages tensors of >= 100,000 elements only)
    Variant(
        "paged_threshold_ignored",
        "6.3",
        "min_paged_size is stored but page_in and page_out move every state tensor, small ones too.",
        (
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # a small tensor's states stay on the device\n",
                "",
            ),
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # its states stay where the update left them: on the device\n",
                "",
            ),
        ),
    ),
    Variant(
        "paged_threshold_inclusive",
        "6.3",
        "A tensor of exactly min_paged_size elements is not paged (<= where bitsandbytes' rule is numel < threshold).",
        (
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # a small",
                "                if p.numel() <= self.min_paged_size:\n                    continue  # a small",
            ),
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # its states",
                "                if p.numel() <= self.min_paged_size:\n                    continue  # its states",
            ),
        ),
    ),
    Variant(
        "paged_threshold_page_in_only",
        "6.3",
        "page_in skips the small tensors, page_out still moves their states to the pool (they end up off the device).",
        (
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # its states stay where the update left them: on the device\n",
                "",
            ),
        ),
    ),
    Variant(
        "paged_threshold_on_the_state",
        "6.3",
        "The threshold is applied to each state tensor's size in bytes instead of the parameter's element count.",
        (
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # a small",
                "                if nbytes(p) < self.min_paged_size:\n                    continue  # a small",
            ),
            (
                "                if p.numel() < self.min_paged_size:\n                    continue  # its states",
                "                if nbytes(p) < self.min_paged_size:\n                    continue  # its states",
            ),
        ),
    ),
    Variant(
        "estimate_ignores_base_dtype",
        "6.5",
        "estimate_memory_parts accepts base_dtype but prices LoRA's base in fp32 (weight_bytes without it).",
        (
            (
                '        "weights": weight_bytes(config, method, r, base_dtype=base_dtype),',
                '        "weights": weight_bytes(config, method, r),',
            ),
        ),
    ),
    Variant(
        "activations_ignore_base_dtype",
        "6.5",
        "estimate_memory_parts passes base_dtype to weight_bytes only: a bf16 base's activations still count the casts.",
        (
            (
                "            config, batch_size, seq_len, method, precision, gradient_checkpointing, r, base_dtype\n",
                "            config, batch_size, seq_len, method, precision, gradient_checkpointing, r\n",
            ),
        ),
    ),
]
