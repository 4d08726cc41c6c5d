"""The course's headline experiment (`make demo`): full fine-tuning vs LoRA vs QLoRA.

From the same bundled base model and seed, each method learns the fine-tuning task that the
base model never saw. Printed: a table of accuracy before/after, trainable parameters, bytes of
weights, bytes of optimizer state after training (AdamW's m, v and step; Stage 6), peak training
memory and seconds. Written to runs/demo/: metrics.json ({"full": {...}, "lora": {...},
"qlora": {...}}), loss_curves.png, and the LoRA and QLoRA adapters in PEFT's format. On CUDA (bf16) a fourth
row, lora16, trains LoRA on a base stored in bf16 (``TrainConfig.base_dtype``). The QLoRA
model is also merged (dequantize + merge) and checked.

Runs on the CPU by default (CUDA when present). On a CPU the demo computes in fp32: a bf16 autocast
step took 1.5-2× as long as an fp32 step on the 2-core CPU we measured (small matmuls plus the casts;
make bench PRECISION=bf16). On CUDA it uses bf16 autocast.

    make demo                          (the reference where this checkout has it, else your code)
    make demo IMPL=student             (your code; python -m training.demo follows the same rule)
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from model._impl import refuse_stubs, use_default_for

use_default_for("show")  # the reference where this checkout has it, unless IMPL / LORA_IMPL says otherwise

from model.lora import count_parameters  # noqa: E402  (after the switch is set)
from model.tiny_llama import load_base_model  # noqa: E402
from training.data import exact_match_accuracy, finetune_data, lm_loss  # noqa: E402
from training.qlora_trainer import (  # noqa: E402
    QLoRATrainer,
    TrainConfig,
    merge_and_export,
    plot_loss_curves,
    prepare_qlora_model,
)

OUT = Path(__file__).resolve().parents[1] / "runs" / "demo"
STEPS = 200  # optimizer steps per method (all three reach 100 % by step ~100 on a quiet 2-core CPU)
COMMON = {"max_steps": STEPS, "batch_size": 64, "warmup_ratio": 0.05, "seed": 0, "log_every": 50}
METHODS = {
    # method: (TrainConfig overrides, whether it trains the whole model)
    "full": ({"learning_rate": 1e-3}, True),
    "lora": ({"quantize": "none", "r": 4, "lora_alpha": 8, "learning_rate": 3e-3}, False),
    "qlora": ({"quantize": "nf4", "r": 4, "lora_alpha": 8, "learning_rate": 3e-3}, False),
    # LoRA with its frozen base stored in bf16 (TrainConfig.base_dtype): no autocast cast copy per step. It needs
    # bf16 autocast, so it runs where the demo computes in bf16 (CUDA); on a CPU the demo's fp32 has nothing to cast.
    "lora16": ({"quantize": "none", "base_dtype": "bf16", "r": 4, "lora_alpha": 8, "learning_rate": 3e-3}, False),
}


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: parameters (frozen and trainable) and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: m, v and a 0-d ``step`` per tensor), each storage once.

    Computed here rather than with ``training.memory`` (Stage 6) so that the demo needs Stages 1-4 only.
    """
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


def training_memory(trainer: QLoRATrainer) -> int:
    """Peak bytes of one training step.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (no allocator statistics): measured tensors —
    weights and buffers, gradients, optimizer states, plus every activation autograd saves for
    the backward pass of one micro-batch (counted once per storage).
    """
    if trainer.device.type == "cuda":
        return torch.cuda.max_memory_allocated(trainer.device)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    input_ids, labels = trainer.micro_batch(0)
    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.autocast():
        loss = lm_loss(trainer.model(input_ids), labels)
    loss.backward()
    params = trainer.trainable_parameters()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    trainer.optimizer.zero_grad(set_to_none=True)
    return model_bytes(trainer.model) + grads + optimizer_bytes(trainer.optimizer) + sum(saved.values())


def run(method: str, base: nn.Module, device: torch.device, precision: str, data: dict) -> tuple[dict, QLoRATrainer]:
    overrides, full = METHODS[method]
    config = TrainConfig(
        **COMMON, **overrides, precision=precision, device=device.type, output_dir=str(OUT / method), progress=True
    )
    model = copy.deepcopy(base)
    if full:
        model.requires_grad_(True)
    else:
        model = prepare_qlora_model(model, config)
    trainer = QLoRATrainer(model, config, data["train"], data["eval"])
    print(f"\n[{method}] training {STEPS} steps ({config.precision}, {device.type})")
    # The share of the base's parameters that train (a 4-bit base keeps its weights in buffers,
    # so the model's own parameter count would understate the whole).
    trainable = count_parameters(model)[0]
    n_base = sum(p.numel() for p in base.parameters())
    print(f"trainable params: {trainable:,} of {n_base:,} base parameters ({100 * trainable / n_base:.2f} %)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    metrics = {
        "accuracy_before": data["accuracy_before"],
        "accuracy_after": exact_match_accuracy(trainer.model, data["eval"]),
        "trainable_params": trainable,
        "weight_bytes": model_bytes(trainer.model),
        "optimizer_bytes": optimizer_bytes(trainer.optimizer),
        "peak_memory_bytes": training_memory(trainer),
        "seconds": round(seconds, 2),
        "skipped_steps": trainer.skipped_steps,
        "final_loss": trainer.history[-1]["loss"],
    }
    if not full:
        trainer.save_adapter()
    print(f"[{method}] accuracy {metrics['accuracy_before']:.1%} -> {metrics['accuracy_after']:.1%} in {seconds:.1f} s")
    return metrics, trainer


def check_merge(trainer: QLoRATrainer, eval_data: dict, accuracy: float) -> str:
    """Dequantize and merge the QLoRA model; its outputs must match the adapter model's."""
    model = trainer.model.eval()
    ids = eval_data["input_ids"][:64].to(trainer.device)
    with torch.no_grad():
        expected = model(ids).float()
        merged = merge_and_export(model, dtype=torch.float32)
        diff = (merged(ids).float() - expected).abs().max().item()
    merged_accuracy = exact_match_accuracy(merged, eval_data)
    return (
        f"merged QLoRA model (NF4 dequantized, LoRA folded in): max |Δlogit| = {diff:.2e}, "
        f"accuracy {merged_accuracy:.1%} (adapter model: {accuracy:.1%})"
    )


def table(results: dict[str, dict]) -> str:
    head = (
        f"{'method':<7}{'acc before':>11}{'acc after':>11}{'trainable':>12}{'weight bytes':>14}"
        f"{'optimizer bytes':>17}{'peak memory':>13}{'seconds':>9}"
    )
    rows = [head, "-" * len(head)]
    for method, m in results.items():
        rows.append(
            f"{method:<7}{m['accuracy_before']:>11.1%}{m['accuracy_after']:>11.1%}{m['trainable_params']:>12,}"
            f"{m['weight_bytes']:>14,}{m['optimizer_bytes']:>17,}{m['peak_memory_bytes']:>13,}{m['seconds']:>9.1f}"
        )
    return "\n".join(rows)


def main() -> dict[str, dict]:
    refuse_stubs("make demo", range(1, 5))  # the stages it runs; stubs elsewhere do not stop it
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    base = load_base_model(device)
    data = {"train": finetune_data("train"), "eval": finetune_data("eval")}
    data["accuracy_before"] = exact_match_accuracy(base, data["eval"])
    print(f"base model: {sum(p.numel() for p in base.parameters()):,} parameters; "
          f"exact-match accuracy on the new task: {data['accuracy_before']:.1%}")  # fmt: skip
    results, trainers = {}, {}
    for method in METHODS:
        if method == "lora16" and precision != "bf16":
            print("\n[lora16] skipped: a bf16 base needs bf16 autocast (CUDA here; on a CPU: python -m "
                  "training.qlora_trainer --quantize none --precision bf16 --base-dtype bf16)")  # fmt: skip
            continue
        results[method], trainers[method] = run(method, base, device, precision, data)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_loss_curves({m: t.history for m, t in trainers.items()}, OUT / "loss_curves.png")
    print()
    print(table(results))
    print(check_merge(trainers["qlora"], data["eval"], results["qlora"]["accuracy_after"]))
    ratio = results["qlora"]["weight_bytes"] / results["full"]["weight_bytes"]
    print(f"QLoRA stores {ratio:.2f}× the bytes of the full model's weights")
    adapters = ", ".join(f"{m}/adapter" for m in results if not METHODS[m][1])
    print(f"wrote {OUT.relative_to(OUT.parents[1])}/metrics.json, loss_curves.png, {adapters}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
