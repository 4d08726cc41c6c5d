"""QLoRA training (Stage 4): prepare a 4-bit model with adapters, train it in mixed precision.

The QLoRA flow (Dettmers et al. 2023, §3):

    load the fp32 base ─► quantize every linear layer but the head to NF4 (frozen, Stage 3)
        ─► wrap the target projections in LoRALayer (trainable, fp32, Stage 1–2)
        ─► forward under bf16 autocast (NF4 → bf16 on the fly), loss in fp32
        ─► backward: gradients reach the adapters only ─► AdamW on the adapters only
        ─► save the adapter (PEFT format); to deploy, dequantize and merge (merge_and_export)

One optimizer step of the trainer (``QLoRATrainer.train_step``):

    for each of k micro-batches:   loss_j = L(micro-batch j) / k ;  (scaled) backward
    unscale the gradients (fp16 only) ─► skip the step if anything is non-finite
    clip the global gradient norm ─► optimizer step ─► scheduler step ─► zero the gradients

Read in this order: TrainConfig (4.1), prepare_qlora_model (4.2), the optimizer, schedule and
trainer (4.3), merge_and_export (4.4), estimate_memory (4.5); the command line at the end.
"""

# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from model.lora import (
    DEFAULT_TARGET_MODULES,
    get_lora_model,
    lora_layers,
    matches_target,
    merge_and_unload,
    mergeable_weight,
    save_lora,
)
from model.quant import NF4Linear, bits_per_parameter
from training.data import exact_match_accuracy, lm_loss

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = ("linear", "cosine", "constant")
QUANTIZE = ("nf4", "none")
DEVICES = ("auto", "cpu", "cuda")


# ---- Exercise 4.1: the configuration ----------------------------------------------------------


def option(default, help: str):
    """A TrainConfig field with its help text (shown by ``--help``; written once, here)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs; ``python -m training.qlora_trainer --help`` lists these fields."""

    r: int = option(8, "LoRA rank")
    lora_alpha: float = option(16, "LoRA scale numerator: the update is multiplied by lora_alpha / r")
    lora_dropout: float = option(0.0, "dropout on the LoRA input, in [0, 1)")
    target_modules: tuple[str, ...] = option(DEFAULT_TARGET_MODULES, "module names that get adapters")
    learning_rate: float = option(3e-3, "peak learning rate (after warmup)")
    max_steps: int = option(300, "optimizer steps (each one sees gradient_accumulation_steps micro-batches)")
    batch_size: int = option(64, "examples per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    weight_decay: float = option(0.0, "AdamW decay on the LoRA matrices (never on biases and norms)")
    warmup_ratio: float = option(0.05, "fraction of max_steps with a linear warmup from 0")
    lr_scheduler: str = option("linear", "after warmup: linear | cosine decay to 0, or constant")
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this; None = no clipping")
    loraplus_lr_ratio: float | None = option(None, "LoRA+: B's learning rate = ratio × learning_rate")
    precision: str = option("bf16", "fp32 | bf16 (autocast) | fp16 (autocast + GradScaler loss scaling)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, more time")
    quantize: str = option("nf4", "nf4: QLoRA (4-bit frozen base) | none: plain LoRA")
    base_dtype: str = option(
        "fp32", "quantize=none: the frozen linear weights' dtype, fp32 or the precision's (bf16: no cast copy per step)"
    )
    double_quant: bool = option(True, "quantize the NF4 absmax constants too (4.127 instead of 4.5 bits)")
    block_size: int = option(64, "NF4 block size")
    device: str = option("auto", "auto (cuda if present, else cpu) | cpu | cuda")
    seed: int = option(0, "seeds the adapters' init, dropout and the data order")
    log_every: int = option(10, "optimizer steps between log lines in metrics.jsonl")
    output_dir: str = option("runs/qlora", "metrics.jsonl, loss_curve.png, adapter/, checkpoints")
    progress: bool = option(True, "show a tqdm progress bar (on a terminal; never in a log file)")

    def __post_init__(self) -> None:
        """Check every field; raise a ValueError naming the field and its allowed values.

        ``base_dtype`` is 'fp32', or with quantize='none' the precision's own name ('bf16' with precision='bf16',
        'fp16' with 'fp16'); quantize='nf4' allows 'fp32' only (the message lists what this combination allows).
        """
        raise NotImplementedError("Exercise 4.1: validate the fields — see tutorial/04-qlora-training.md")


def resolve_device(config: TrainConfig) -> torch.device:
    """The device to train on: "auto" is CUDA when present, else the CPU; "cuda" without a GPU is refused."""
    raise NotImplementedError(
        "Exercise 4.1: auto → cuda if available; refuse what cannot run — see tutorial/04-qlora-training.md"
    )


# ---- Exercise 4.2: preparing the model --------------------------------------------------------


def prepare_qlora_model(
    model: nn.Module, config: TrainConfig, skip_modules: tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """Quantize, add adapters, freeze: the model QLoRA trains (in place; returned).

    1. With ``config.quantize == "nf4"``, every ``nn.Linear`` whose name is not in
       ``skip_modules`` (the output head by default: it is small and sensitive) becomes a frozen
       ``NF4Linear`` computing in the precision's dtype (bf16 for "bf16", fp32 for "fp32").
       With ``quantize == "none"`` and ``config.base_dtype`` "bf16" (or "fp16"), each of those layers is
       replaced by a copy stored in that dtype, so autocast casts no weight (and autograd keeps no
       cast copy for the backward pass); with "fp32" they stay as they are.
    2. ``get_lora_model`` wraps ``config.target_modules`` (NF4 or not) in fp32 LoRA layers,
       seeded by ``config.seed``, and freezes everything else.
    3. Norms, embeddings and the head stay in fp32; ``model.gradient_checkpointing`` is set.

    Only ``lora_A`` / ``lora_B`` require gradients afterwards.

    Raises ValueError and leaves the model exactly as it was (no layer quantized or cast, none wrapped) when
    the model already has LoRA layers, when a weight holds a non-finite value (NaN or inf: NF4 cannot
    quantize it), or when ``get_lora_model`` refuses ``config.target_modules`` or a LoRA setting: quantize
    every layer before swapping any in, and a refusal after swapping puts the original layers back.
    """
    raise NotImplementedError(
        "Exercise 4.2: quantize the linear layers, then add LoRA (all or nothing) — see tutorial/04-qlora-training.md"
    )


# ---- Exercise 4.3: the optimizer, the schedule and the trainer ---------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, in three groups:

    - ``lora_A`` (and any other trainable matrix): lr, weight_decay
    - ``lora_B``: lr × loraplus_lr_ratio if set (LoRA+, Hayou et al. 2024), weight_decay
    - trainable vectors (biases, norms: every trainable parameter with ndim < 2, a norm's weight
      as much as a bias): lr, no weight decay

    Frozen parameters (and the NF4 buffers) are never handed to the optimizer: they must not
    train, and the moment anything gave them a gradient, AdamW would update the "frozen" weights
    and keep two fp32 states for each. Empty groups are left out.
    """
    raise NotImplementedError(
        "Exercise 4.3: three parameter groups of trainable parameters — see tutorial/04-qlora-training.md"
    )


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based), as in HF transformers.

    warmup = ceil(warmup_ratio · max_steps) steps rising linearly from 0: factor = step / warmup
    (so the first step of a warm-up trains at factor 0, as in HF: with max_steps = 1 and any
    warm-up, the one step does not move the weights); then, with progress
    p = (step − warmup) / (max_steps − warmup): linear 1 − p; cosine ½(1 + cos πp); constant 1.
    From step max_steps on, the decay is complete: p = 1 (linear and cosine give 0), also when the
    warm-up covers every step (warmup = max_steps, where the formula would divide by 0). Never below 0.
    """
    raise NotImplementedError("Exercise 4.3: warmup, then decay — see tutorial/04-qlora-training.md")


class QLoRATrainer:
    """Trains the adapters of a prepared model on ``train_data`` ({"input_ids", "labels"}, (N, T)).

    ``train()`` runs up to ``config.max_steps`` optimizer steps and returns the final metrics;
    ``evaluate()`` gives eval loss and exact-match accuracy; ``save_checkpoint`` /
    ``load_checkpoint`` make a run resumable with the same result as an uninterrupted one.

    Attributes: model, config, device, optimizer, scheduler (LambdaLR over ``lr_factor``),
    scaler (a GradScaler, enabled for fp16 only, on any device), step, skipped_steps (non-finite steps), history.

    Construction raises ValueError before changing the model or writing a file when batch_size is larger
    than the training set, or when the model has nothing trainable (``build_optimizer``).
    """

    # ---- Given: construction, data, precision, the training loop, evaluation, outputs ----------

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: dict[str, torch.Tensor],
        eval_data: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.config, self.train_data, self.eval_data = config, train_data, eval_data
        if train_data["input_ids"].shape[0] < config.batch_size:
            raise ValueError(
                f"batch_size={config.batch_size} is larger than the training set "
                f"({train_data['input_ids'].shape[0]} examples)"
            )
        self.device = resolve_device(config)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")  # any device
        self.step = 0  # optimizer steps taken (including skipped ones)
        self.skipped_steps = 0
        self.history: list[dict[str, float]] = []
        self.output_dir = Path(config.output_dir)

    # -- data: batch i is a pure function of (seed, i), so a resumed run sees the same batches --

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch number ``index`` of the run: a fresh permutation of the data every epoch."""
        n = self.train_data["input_ids"].shape[0]
        per_epoch = n // self.config.batch_size
        epoch, position = divmod(index, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        rows = order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        return self.train_data["input_ids"][rows].to(self.device), self.train_data["labels"][rows].to(self.device)

    def autocast(self) -> torch.autocast:
        """bf16 / fp16 autocast on the training device; disabled for fp32."""
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def train(self, steps: int | None = None) -> dict[str, float]:
        """Run ``steps`` more optimizer steps (default: until ``config.max_steps``).

        Each step appends {"step", "loss", "lr", "tokens_per_s"} to ``history``; "lr" is the rate
        after the step's scheduler update, i.e. the one the next step uses (as HF's Trainer logs it).
        """
        config = self.config
        stop = config.max_steps if steps is None else min(config.max_steps, self.step + steps)
        tokens_per_step = config.batch_size * config.gradient_accumulation_steps * self.train_data["input_ids"].shape[1]
        bar = tqdm(total=stop - self.step, desc="train", disable=None if config.progress else True, leave=False)
        started, first_step = time.perf_counter(), self.step
        while self.step < stop:
            k = config.gradient_accumulation_steps
            loss = self.train_step([self.micro_batch(self.step * k + j) for j in range(k)])
            elapsed = time.perf_counter() - started
            record = {
                "step": self.step,
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "tokens_per_s": tokens_per_step * (self.step - first_step) / max(elapsed, 1e-9),
            }
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.step % config.log_every == 0 or self.step == stop:
                self._log(record)
        bar.close()
        last = self.history[-1]["loss"] if self.history else float("nan")
        return {"step": self.step, "loss": last, "skipped_steps": self.skipped_steps}

    def _log(self, record: dict[str, float]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self, data: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Eval loss and exact-match accuracy on ``data`` (default: the eval data)."""
        data = self.eval_data if data is None else data
        self.model.eval()
        with self.autocast():
            logits = self.model(data["input_ids"].to(self.device))
        loss = lm_loss(logits, data["labels"].to(self.device)).item()
        with self.autocast():
            accuracy = exact_match_accuracy(self.model, data)
        return {"eval_loss": loss, "accuracy": accuracy}

    def save_adapter(self) -> Path:
        """The adapter alone, in PEFT's format, under output_dir/adapter."""
        return save_lora(self.model, self.output_dir / "adapter")

    def save_loss_curve(self, path: str | Path | None = None) -> Path:
        """A PNG of the training loss per optimizer step."""
        return plot_loss_curves({"loss": self.history}, path or self.output_dir / "loss_curve.png")

    # ---- Exercise 4.3 (continued): one optimizer step, and checkpoints that resume exactly --------

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One optimizer step over ``micro_batches``; returns the mean loss (NaN if skipped).

        Each micro-batch's loss is divided by their number before backward, so the summed
        gradient is the gradient of the mean loss (k micro-batches of b = one batch of k·b).
        Order: backward (scaled) → unscale → finite check (skip and count) → clip → step →
        scheduler → zero_grad. Afterwards, skipped or not, every trainable parameter's ``.grad`` is
        None (``zero_grad(set_to_none=True)``): no gradient memory is held between steps. An empty
        ``micro_batches`` list is refused (ValueError) before anything changes.
        """
        raise NotImplementedError(
            "Exercise 4.3: accumulate, unscale, check, clip, step — see tutorial/04-qlora-training.md"
        )

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write everything a resumed run needs to ``path``, atomically (temp file, then rename).

        The adapter (trainable tensors), optimizer, scheduler, scaler, RNG states, step and
        skipped-step count, and the loss history.
        """
        raise NotImplementedError("Exercise 4.3: one file, written atomically — see tutorial/04-qlora-training.md")

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a state written by ``save_checkpoint`` into this trainer (same model layout).

        All or nothing: a checkpoint that does not fit this trainer raises a ValueError naming the
        ``path`` and what differs, before anything is restored: a trainable parameter the model lacks
        (or one of the model's that the checkpoint lacks), a parameter of another shape, optimizer
        groups of other sizes, or another precision (fp16's GradScaler state on one side only).
        """
        raise NotImplementedError(
            "Exercise 4.3: check that everything fits, then restore every piece — see tutorial/04-qlora-training.md"
        )


def plot_loss_curves(histories: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """One PNG with a loss curve per run (label → history of {"step", "loss"} records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, history in histories.items():
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=label)
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="Fine-tuning loss")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- Exercise 4.4: merging for deployment ------------------------------------------------------


def merge_and_export(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain model of ``nn.Linear`` layers: dequantize every NF4 base, then merge LoRA into it.

    Never merge into 4-bit weights: re-quantizing W0 + ΔW adds NF4 rounding error that is as
    large as a small ΔW (and erases updates below half a quantization step). Each ``NF4Linear``
    becomes an ``nn.Linear`` holding its dequantized weight in ``dtype`` (layers that were never
    quantized keep their dtype; the bias is cast to ``dtype`` too), then ``merge_and_unload`` folds the
    adapters in (ΔW rounded once to the weight's dtype). ``dtype``: float32, float64, bfloat16 or
    float16. Outputs match
    the QLoRA model's up to rounding. Any number of NF4 blocks per layer, any number of
    double-quantization blocks (more than 256 blocks: more than one second-level scale).

    All or nothing: if a LoRA layer's base is neither an ``NF4Linear`` nor an ``nn.Linear``, the
    TypeError (``mergeable_weight``) comes before any layer is dequantized or merged.
    """
    raise NotImplementedError(
        "Exercise 4.4: check every LoRA base, dequantize the bases, then merge and unload (use mergeable_weight) — see tutorial/04-qlora-training.md"
    )


# ---- Exercise 4.5: memory arithmetic -----------------------------------------------------------


def estimate_memory(
    n_params: float,
    method: str,
    trainable_params: float = 0,
    block_size: int = 64,
    double_quant: bool = True,
) -> dict[str, float]:
    """Bytes for weights, gradients and AdamW states (activations not included).

    full:  weights fp32 (4 B) + gradients fp32 (4 B) + Adam m and v fp32 (8 B) = 16 B per parameter
    lora:  frozen base in bf16 (2 B per parameter) + for each trainable (adapter) parameter
           fp32 weight, gradient, m and v (16 B)
    qlora: frozen base in NF4 (bits_per_parameter / 8 B per parameter: 0.516 B with double
           quantization, 0.5625 B without) + the same 16 B per trainable parameter

    Returns {"weights", "gradients", "optimizer", "total"} in bytes. QLoRA paper: a 65B model's
    weights take 65e9 · 4.127 / 8 ≈ 33.5 GB, which fits one 48 GB GPU with room for adapters.

    Its scope: a rate per parameter, no architecture and no activations. Measured on this course's models
    (Stage 6's ``measure_memory``; testcases/real_models_test.py holds it), with n_params the parameters
    stored at the method's rate:

        full   n_params = every parameter: weights and gradients exact; the optimizer adds torch's 4-byte
               ``step`` tensor per trainable tensor to the 8 B per parameter
        lora   TrainConfig(base_dtype="bf16"), n_params = the projections: weights exact once the fp32
               embedding, norms and head (4 B each, not counted here) are added; gradients exact
        qlora  n_params = the projections: each NF4 layer adds 4 to 9.5 bytes (its double-quantization
               offset, and rounding up to whole bytes, blocks and scales); the fp32 rest 4 B each

    Stage 6's ``estimate_memory_parts`` prices every tensor of a ``LlamaConfig`` to the byte, activations included.
    """
    raise NotImplementedError("Exercise 4.5: bytes per parameter for each method — see tutorial/04-qlora-training.md")


# ---- The command line (given) ----------------------------------------------------------------


def config_parser() -> argparse.ArgumentParser:
    """An argparse parser with one option per TrainConfig field (``--max-steps 200``, ...)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.qlora_trainer",
        description="QLoRA fine-tuning of the bundled base model on the bundled task.",
    )
    for f in dataclasses.fields(TrainConfig):
        option, default, help_text = "--" + f.name.replace("_", "-"), f.default, f.metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(option, type=_parse_bool, default=default, help=f"{help_text} (default: {default})")
        elif isinstance(default, tuple):
            parser.add_argument(option, nargs="+", default=default, help=f"{help_text} (default: {' '.join(default)})")
        elif f.name in ("max_grad_norm", "loraplus_lr_ratio"):  # the optional ones: "none" means None
            parser.add_argument(
                option, type=_optional(float), default=default, help=f"{help_text} (default: {default})"
            )
        else:  # "none" is a value here (--quantize none)
            parser.add_argument(option, type=type(default), default=default, help=f"{help_text} (default: {default})")
    return parser


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train on the bundled task from the bundled base; print accuracy before and after."""
    from model.tiny_llama import load_base_model
    from training.data import finetune_data

    args = config_parser().parse_args(argv)
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    model = load_base_model()
    train_data, eval_data = finetune_data("train"), finetune_data("eval")
    before = exact_match_accuracy(model, eval_data)
    model = prepare_qlora_model(model, config)
    trainer = QLoRATrainer(model, config, train_data, eval_data)
    trainer.train()
    after = trainer.evaluate()
    trainer.save_adapter()
    trainer.save_loss_curve()
    print(f"accuracy before {before:.1%} → after {after['accuracy']:.1%}; skipped steps: {trainer.skipped_steps}")
    print(f"adapter, metrics.jsonl and loss_curve.png in {config.output_dir}")
    return {"accuracy_before": before, **after}


if __name__ == "__main__":
    main()
