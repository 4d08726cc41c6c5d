"""Lesson 05's "Why a new task" table: plain LoRA at ranks 2 and 8 on Stage 1–4's task and on Stage 5's.

    .venv/bin/python -m solutions.tools.task_contrast              (seeds 0, 1, 2: 12 runs, 113 s of one core)
    .venv/bin/python -m solutions.tools.task_contrast --seeds 1    (seed 0 only)

The protocol (every setting not named is TrainConfig's default): plain LoRA (``quantize="none"``,
Stage 4's ``prepare_qlora_model``) on the seven projections of the bundled base model, rank r with
``lora_alpha = 2r`` (scale 2), no dropout, AdamW at a peak learning rate of 3e-3 with 5 % linear
warm-up and linear decay to 0 over 150 optimizer steps, batches of 64, gradient norm clipped at 1,
fp32, one torch thread. The trainer's seed (the adapters' init and the data order) is the run's seed.
Exact match on each task's 500 evaluation examples after step 100 (the schedule still runs to 150)
and after step 150. Prints the table in the lesson's layout: the mean over the seeds, then each seed.
Runs the reference (``LORA_IMPL=solutions``) unless ``LORA_IMPL`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("LORA_IMPL", "solutions")  # before any `import model.*`

import torch  # noqa: E402

from model.tiny_llama import load_base_model  # noqa: E402
from training.data import FINETUNE_TASK, HARD_TASK, finetune_data, hard_finetune_data  # noqa: E402
from training.qlora_trainer import QLoRATrainer, TrainConfig, prepare_qlora_model  # noqa: E402

RANKS = (2, 8)
STEPS, CHECKPOINT = 150, 100  # the run's length, and the step after which it is evaluated once before the end
TASKS = {FINETUNE_TASK: finetune_data, HARD_TASK: hard_finetune_data}


def run(task: str, r: int, seed: int, out: str) -> tuple[float, float]:
    """Exact match after step CHECKPOINT and after step STEPS: plain LoRA of rank r on ``task``."""
    config = TrainConfig(r=r, lora_alpha=2 * r, max_steps=STEPS, quantize="none", precision="fp32", device="cpu",
                         seed=seed, progress=False, output_dir=f"{out}/{task}-r{r}-seed{seed}")  # fmt: skip
    data = TASKS[task]
    model = prepare_qlora_model(load_base_model(), config)
    trainer = QLoRATrainer(model, config, data("train"), data("eval"))
    trainer.train(steps=CHECKPOINT)
    early = trainer.evaluate()["accuracy"]
    trainer.train()
    return early, trainer.evaluate()["accuracy"]


def percent(x: float) -> str:
    """0.927 -> "92.7 %", 1.0 -> "100 %": the lesson's way of writing an accuracy."""
    return f"{x:.0%}".replace("%", " %") if x in (0.0, 1.0) else f"{x:.1%}".replace("%", " %")


def measure(seeds: list[int]) -> dict[tuple[str, int, int], tuple[float, float]]:
    """{(task, r, seed): (accuracy after CHECKPOINT, after STEPS)}, printing each run as it ends."""
    found = {}
    with tempfile.TemporaryDirectory() as out:
        for task in TASKS:
            for r in RANKS:
                for seed in seeds:
                    found[task, r, seed] = run(task, r, seed, out)
                    print(f"{task} r={r} seed {seed}: {' / '.join(map(percent, found[task, r, seed]))}", flush=True)
    return found


def render(found: dict[tuple[str, int, int], tuple[float, float]], seeds: list[int]) -> str:
    """The lesson's table (the mean over ``seeds``), then every seed's pair of accuracies."""
    columns = " | ".join(f"rank {r}, after {CHECKPOINT} / {STEPS} steps" for r in RANKS)
    lines = [f"| exact match on the eval split, mean of seeds {', '.join(map(str, seeds))} | {columns} |",
             "|---|" + "---:|" * len(RANKS)]  # fmt: skip
    for task in TASKS:
        means = [[sum(found[task, r, s][i] for s in seeds) / len(seeds) for i in (0, 1)] for r in RANKS]
        lines.append(f"| {task} | " + " | ".join(" / ".join(map(percent, pair)) for pair in means) + " |")
    lines.append(f"\nper seed, after {CHECKPOINT} / {STEPS} steps:")
    for task in TASKS:
        for r in RANKS:
            pairs = ";  ".join(" / ".join(map(percent, found[task, r, s])) for s in seeds)
            lines.append(f"  {task:<18} r={r}: {pairs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 (default 3)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.set_num_threads(1)
    seeds, started = list(range(args.seeds)), time.monotonic()
    found = measure(seeds)
    print(f"\n{render(found, seeds)}\n\n{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
