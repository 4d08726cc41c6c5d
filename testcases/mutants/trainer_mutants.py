"""Mutants of training/qlora_trainer.py (Stage 4)."""

from testcases.mutants import Mutant

F = "training/qlora_trainer.py"

MUTANTS = [
    Mutant(
        "config_accepts_zero_accumulation",
        F,
        "TrainConfig does not check gradient_accumulation_steps (0 micro-batches per step).",
        (
            (
                '"r", "max_steps", "batch_size", "gradient_accumulation_steps", "block_size", "log_every"',
                '"r", "max_steps", "batch_size", "block_size", "log_every"',
            ),
        ),
    ),
    Mutant(
        "lora_on_the_head",
        F,
        "prepare_qlora_model also puts LoRA (and NF4) on the output head.",
        (
            (
                "    get_lora_model(model, config.r, config.lora_alpha, config.lora_dropout, config.target_modules)",
                '    get_lora_model(model, config.r, config.lora_alpha, config.lora_dropout, (*config.target_modules, "lm_head"))',
            ),
        ),
    ),
    Mutant(
        "adapters_in_bf16",
        F,
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
    Mutant(
        "quantize_nothing",
        F,
        "prepare_qlora_model adds LoRA but forgets to quantize the base layers.",
        (('    if config.quantize == "nf4":\n        compute_dtype', "    if False:\n        compute_dtype"),),
    ),
    Mutant(
        "frozen_weights_in_optimizer",
        F,
        "The optimizer is handed every parameter, frozen ones included.",
        (
            (
                "        if not param.requires_grad:\n            continue\n        if param.ndim < 2:",
                "        if param.ndim < 2:",
            ),
        ),
    ),
    Mutant(
        "weight_decay_on_biases",
        F,
        "Biases and norms get weight decay too.",
        (('{"params": vectors, "lr": lr, "weight_decay": 0.0}', '{"params": vectors, "lr": lr, "weight_decay": wd}'),),
    ),
    Mutant(
        "warmup_off_by_one",
        F,
        "Warmup starts at 1/warmup instead of 0 (step + 1).",
        (("        return step / warmup", "        return (step + 1) / warmup"),),
    ),
    Mutant(
        "cosine_without_half",
        F,
        "The cosine schedule forgets the factor 1/2.",
        (
            (
                "max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))",
                "max(0.0, math.cos(math.pi * min(progress, 1.0)))",
            ),
        ),
    ),
    Mutant(
        "loss_not_divided_by_accumulation",
        F,
        "Each micro-batch loss is not divided by the number of micro-batches.",
        (
            (
                "            loss = lm_loss(logits, labels) / k  # fp32",
                "            loss = lm_loss(logits, labels)  # fp32",
            ),
        ),
    ),
    Mutant(
        "step_every_micro_batch",
        F,
        "The optimizer steps after every micro-batch instead of once per accumulation.",
        (
            (
                "            self.scaler.scale(loss).backward()\n",
                "            self.scaler.scale(loss).backward()\n"
                "            self.scaler.step(self.optimizer)\n"
                "            self.scaler.update()\n",
            ),
        ),
    ),
    Mutant(
        "clip_before_unscale",
        F,
        "Gradients are clipped while still multiplied by the loss scale.",
        (
            (
                "        self.scaler.unscale_(self.optimizer)  # gradients now in true units (no-op unless fp16)\n",
                "        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm or 1e9)\n"
                "        self.scaler.unscale_(self.optimizer)\n",
            ),
        ),
    ),
    Mutant(
        "non_finite_not_skipped",
        F,
        "A non-finite loss is stepped on like any other (NaN spreads into the adapters).",
        (("        if not finite:\n", "        if False:\n"),),
    ),
    Mutant(
        "checkpoint_without_optimizer",
        F,
        "The checkpoint restores the adapter but not the optimizer state.",
        (('        self.optimizer.load_state_dict(state["optimizer"])\n', ""),),
    ),
    Mutant(
        "checkpoint_without_rng",
        F,
        "The checkpoint does not restore the RNG state (dropout masks differ after resuming).",
        (('        torch.set_rng_state(state["rng"]["cpu"])\n', ""),),
    ),
    Mutant(
        "merge_into_nf4",
        F,
        "merge_and_export merges without dequantizing the 4-bit bases first.",
        (("        if isinstance(module, NF4Linear):\n            weight", "        if False:\n            weight"),),
    ),
    Mutant(
        "full_finetune_12_bytes",
        F,
        "Full fine-tuning memory counts fp16 weights and gradients (12 bytes) instead of fp32 AdamW's 16.",
        (
            (
                "weights, gradients, optimizer = 4 * n_params, 4 * n_params, 8 * n_params",
                "weights, gradients, optimizer = 2 * n_params, 2 * n_params, 8 * n_params",
            ),
        ),
    ),
    Mutant(
        "qlora_memory_without_dq",
        F,
        "QLoRA memory ignores double quantization (always 4.5 bits).",
        (("bits_per_parameter(block_size, double_quant) / 8", "bits_per_parameter(block_size) / 8"),),
    ),
]
