"""Benchmarks (`make bench`): speed lives here, never in the graded tests.

1. LoRA layer forward vs its base nn.Linear (1024 tokens, 512 → 512, r = 8, fp32, 2 threads),
   unmerged and merged. The LoRA branch adds 2·r·(k + d) / (2·k·d) ≈ 3 % FLOPs, so the aim is
   ≤ 1.10× unmerged and ≤ 1.02× merged. (PEFT's LoRA layer, if installed, measured alongside.)
2. NF4 quantize / dequantize throughput on a 4096 × 4096 fp32 weight (and the ratio to
   bitsandbytes on the CPU when it is installed), NF4Linear forward vs nn.Linear, and bits per
   parameter measured from ``weight_nbytes()`` (4.127 with double quantization, 4.5 without).
3. One training step on the bundled model: LoRA vs QLoRA (the cost of dequantizing on the fly;
   aim ≤ 1.5×).

Every number is the median of repeated runs in one process (torch.utils.benchmark).
Run it on a quiet machine: other processes using the cores distort every timing.
"""

from __future__ import annotations

import copy
import statistics

import torch
from torch import nn
from torch.utils.benchmark import Timer

from model.lora import LoRALayer
from model.quant import NF4Linear, bits_per_parameter, dequantize_nf4, quantize_nf4
from model.tiny_llama import load_base_model
from training.data import finetune_data
from training.qlora_trainer import QLoRATrainer, TrainConfig, prepare_qlora_model

THREADS = 2


def median_seconds(fn, min_run_time: float = 1.0) -> float:
    """Median wall time of ``fn()`` over blocks of runs lasting at least ``min_run_time`` in all."""
    return (
        Timer(stmt="fn()", globals={"fn": fn}, num_threads=THREADS).blocked_autorange(min_run_time=min_run_time).median
    )


def interleaved(fns: dict[str, object], rounds: int = 5) -> dict[str, float]:
    """Median seconds of each callable, measured in alternating rounds (drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, 0.4))
    return {name: statistics.median(values) for name, values in times.items()}


def lora_layer_overhead() -> None:
    torch.manual_seed(0)
    base = nn.Linear(512, 512)
    layer = LoRALayer.from_linear(copy.deepcopy(base), r=8, lora_alpha=16)
    nn.init.normal_(layer.lora_B, std=0.02)
    merged = copy.deepcopy(layer)
    merged.merge()
    x = torch.randn(1024, 512)
    fns = {"nn.Linear": lambda: base(x), "LoRALayer unmerged": lambda: layer(x), "LoRALayer merged": lambda: merged(x)}
    try:  # dev-only comparison with PEFT's LoRA layer
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            nn.Sequential(copy.deepcopy(base)), LoraConfig(r=8, lora_alpha=16, target_modules=["0"])
        )
        fns["PEFT lora.Linear"] = lambda: peft_model(x)
    except ImportError:
        pass
    with torch.no_grad():
        times = interleaved(fns)
    aims = {"LoRALayer unmerged": "   (aim <= 1.10x)", "LoRALayer merged": "   (aim <= 1.02x)"}
    print("1. LoRA layer forward, 1024 tokens, 512 -> 512, r = 8, fp32, 2 threads (median of 5 rounds)")
    for name, seconds in times.items():
        ratio = seconds / times["nn.Linear"]
        print(f"   {name:<20} {seconds * 1e3:8.3f} ms   {ratio:5.2f}x{aims.get(name, '')}")
    if "PEFT lora.Linear" not in times:
        print("   (PEFT not installed: pip install peft to compare its LoRA layer)")


def nf4_throughput() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    n = weight.numel()
    packed, absmax = quantize_nf4(weight)
    t_q = median_seconds(lambda: quantize_nf4(weight), 2.0)
    t_dq = median_seconds(lambda: dequantize_nf4(packed, absmax, weight.shape), 2.0)
    print("\n2. NF4 on a 4096 x 4096 fp32 weight (median)")
    print(f"   quantize_nf4         {t_q * 1e3:8.1f} ms   {n / t_q / 1e6:8.1f} M weights/s")
    print(f"   dequantize_nf4       {t_dq * 1e3:8.1f} ms   {n / t_dq / 1e6:8.1f} M weights/s")
    try:
        import bitsandbytes.functional as bnbf  # dev-only comparison
    except ImportError:
        print("   (bitsandbytes not installed: pip install bitsandbytes to compare, aim >= 1x its CPU speed)")
    else:
        t_bq = median_seconds(lambda: bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4"), 2.0)
        q, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        t_bdq = median_seconds(lambda: bnbf.dequantize_4bit(q, state), 2.0)
        print(f"   bitsandbytes         quantize {t_bq * 1e3:.1f} ms, dequantize {t_bdq * 1e3:.1f} ms; "
              f"ours / theirs speed: {t_bq / t_q:.2f}x, {t_bdq / t_dq:.2f}x")  # fmt: skip
    linear = nn.Linear(4096, 4096, bias=False)
    x = torch.randn(256, 4096)
    with torch.no_grad():
        t_lin = median_seconds(lambda: linear(x))
        for dq in (False, True):
            layer = NF4Linear.from_linear(linear, double_quant=dq)
            t_nf4 = median_seconds(lambda layer=layer: layer(x))
            bits = layer.weight_nbytes() * 8 / linear.weight.numel()
            print(f"   NF4Linear dq={dq!s:<5}  forward {t_nf4 * 1e3:7.1f} ms = {t_nf4 / t_lin:4.2f}x nn.Linear "
                  f"({t_lin * 1e3:.1f} ms, 256 tokens); {bits:.4f} bits/param "
                  f"(analytic {bits_per_parameter(64, dq):.4f})")  # fmt: skip


def training_step() -> None:
    data = finetune_data("train")
    times = {}
    for quantize in ("none", "nf4"):
        config = TrainConfig(quantize=quantize, precision="fp32", max_steps=10_000, batch_size=64, progress=False,
                             device="cpu", output_dir="runs/bench")  # fmt: skip
        trainer = QLoRATrainer(prepare_qlora_model(load_base_model(), config), config, data)
        batch = [trainer.micro_batch(0)]
        trainer.train_step(batch)  # warm up
        times[quantize] = median_seconds(lambda trainer=trainer, batch=batch: trainer.train_step(batch), 3.0)
    print("\n3. One training step of the bundled model, batch 64, fp32, CPU (median)")
    print(f"   LoRA   {times['none'] * 1e3:7.1f} ms")
    print(f"   QLoRA  {times['nf4'] * 1e3:7.1f} ms   {times['nf4'] / times['none']:4.2f}x LoRA   (aim <= 1.5x)")


def main() -> None:
    torch.set_num_threads(THREADS)
    lora_layer_overhead()
    nf4_throughput()
    training_step()


if __name__ == "__main__":
    main()
