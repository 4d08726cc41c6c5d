"""The LoRA family side by side (`make variants`): every Stage 5 method on the harder task.

From the same bundled base model, seed, micro-batches and schedule, each method learns the harder
task of Stage 5 (``training.data.HARD_TASK``: add 1 to every digit, then reverse the answer) for the
same number of optimizer steps, through the Stage 4 trainer (``QLoRATrainer``; methods with per-step
work attach it to ``trainer.optimizer``). Printed: a table of exact-match accuracy before/after,
final training loss, trainable parameters, training memory relative to LoRA, whether the trained
adapter merges into the base (checked: max |Δ logit| after merging), and seconds per step. Written to
runs/variants/: metrics.json ({"settings": {...}, "methods": {"lora": {...}, ...}}; per method the
accuracies, the loss curve, trainable parameters, memory, seconds per step, plus AdaLoRA's final
rank per layer, LoftQ's error per iteration and LoRA-drop's importances) and comparison.png (loss
curves and accuracy bars).

The setting, and why:

- Rank r = 2, lora_alpha = 4 (the demo's scale alpha / r = 2), all seven projections, 200 steps of
  64 examples, peak lr 3e-3 with 5 % warmup and linear decay, seed 0. Plain LoRA learns this task
  in a sudden drop of the loss: at r = 2 the drop comes after about 200 steps of a 400-step run, at
  r = 4 within 200 steps (99.7 %), at r = 1 not at all. With 200 steps at r = 2 plain LoRA stops
  just before its drop, so whatever a method changes (the scale, the initialisation, what trains)
  shows as earlier or later learning. Accuracy at a fixed budget is therefore all-or-nothing-ish
  and depends on the seed; read the loss curves too, and see the notebook for more.
- Learning rates: 3e-3 for every method whose adapter starts like LoRA's, except two. VeRA trains
  only two scaling vectors per layer (λ_b starts at 0) and AdaLoRA starts from Λ = 0 with P, Q ~
  N(0, 0.02²) (PEFT's init), so their updates start orders of magnitude smaller; both papers train
  at higher learning rates than LoRA (VeRA about 10×), and at 3e-3 neither moves in 200 steps
  (accuracy 0 %, loss above 2). Both run at 2e-2, and so does a second plain LoRA row
  ("lora-lr2e-2"): the control that tells what the method adds from what the learning rate adds.
- VeRA uses PEFT's default r = 256 (larger than d_model = 64: the shared random pair is
  (256, 176) and (176, 256)); its trainable count, Σ (r + out) = 9,856, equals LoRA's at r = 2.
- AdaLoRA starts at rank 3 per layer and ends with a budget of 2 per layer on average (PEFT's
  ratio, init_r 12 → target_r 8), PEFT's schedule defaults otherwise (tinit = tfinal = 0, deltaT = 1).
- LoRA+ is plain LoRA with B's learning rate 4 × A's (TrainConfig.loraplus_lr_ratio). The paper's
  λ = 16 makes B's rate 4.8e-2 here, and the run falls back to a loss of 1.6.
- LoftQ: 5 alternating steps (PEFT's default is 1); QLoRA is the Stage 4 recipe (NF4 with
  double quantization, every linear layer but the head) at the same rank.
- LoRA-drop: 50 steps of LoRA, then the importance ‖s·B A x‖² of each layer on 256 training
  examples; the layers holding 90 % of it keep their adapters, the others share one per shape,
  and a new trainer (new AdamW over the shared parameters) continues the same schedule for the
  remaining 150 steps.
- Memory: one training step's bytes as ``training.demo.training_memory`` measures them (weights,
  buffers, gradients, AdamW states, activations saved for backward) plus the state a method's
  hooks keep (AdaLoRA's two importance averages per entry, Delta-LoRA's copy of A and B), minus
  LoRA's. Negative for the 4-bit bases.

It takes about two and a half minutes on a quiet 2-core CPU (one torch thread: the model is tiny).

    make variants                          (the reference where this checkout has it, else your code)
    make variants IMPL=student             (your code; python -m training.variants follows the same rule)
    make variants SEEDS=3                  (also seeds 1 and 2: the accuracy's spread; three times as long)
    python -m training.variants lora pissa (only these methods)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model._impl import refuse_exercise_stubs, use_default_for

use_default_for("show")  # the reference where this checkout has it, unless IMPL / LORA_IMPL says otherwise

from model.lora import count_parameters, get_lora_model, lora_layers  # noqa: E402  (after the switch is set)
from model.lora_variants import (  # noqa: E402
    DeltaLoRA,
    RankAllocator,
    adalora_layers,
    apply_variant,
    loftq_init,
    lora_drop,
    lora_output_importance,
)
from model.quant import NF4Linear  # noqa: E402
from model.tiny_llama import load_base_model  # noqa: E402
from training.data import HARD_TASK, exact_match_accuracy, hard_finetune_data  # noqa: E402
from training.demo import training_memory  # noqa: E402
from training.qlora_trainer import (  # noqa: E402
    QLoRATrainer,
    TrainConfig,
    lr_factor,
    merge_and_export,
    prepare_qlora_model,
)

OUT = Path(__file__).resolve().parents[1] / "runs" / "variants"
STEPS = 200  # optimizer steps per method (plain LoRA at r = 2 learns the task at about step 200 of 400)
R, LORA_ALPHA = 2, 4  # rank and scale numerator of every LoRA-type adapter (alpha / r = 2, as in the demo)
LR = 3e-3  # peak learning rate of the LoRA-type methods (the Stage 4 default)
SEED = 0  # adapters' init and the data order
COMMON = {"batch_size": 64, "warmup_ratio": 0.05, "log_every": 50}


@dataclass(frozen=True)
class Run:
    """How every row of a comparison trains: steps, where its output goes, the progress bar, the seed."""

    steps: int = STEPS  # optimizer steps per method
    out: Path = OUT  # each method writes to out / <name>
    progress: bool = True  # the trainer's progress bar
    seed: int = SEED  # adapters' init and the data order


RUN = Run()  # every row's steps and output folder (train_method's and compare's default)


# The exercises every row runs: LoRA layers and their merge (Stage 1), get_lora_model and
# count_parameters (Stage 2), TrainConfig and the trainer (Stage 4). A method adds its own (Method.exercises).
TRAINING = ("1.1", "1.2", "1.3", "2.1", "2.2", "4.1", "4.3")
NF4 = ("3.3", "3.4", "3.5", "3.6", "2.3", "4.4")  # a 4-bit base: NF4Linear, and merge_and_export for the merge check


@dataclass(frozen=True)
class Method:
    """One row of the comparison: how to build the adapted model and how to train it."""

    variant: str  # apply_variant's method; "qlora" = Stage 4's prepare_qlora_model
    exercises: tuple[str, ...] = ()  # the exercises its code runs besides TRAINING's (make variants checks them)
    learning_rate: float = LR  # peak learning rate
    r: int = R  # the adapter's rank (VeRA: its own r; AdaLoRA: the target rank)
    options: dict = field(default_factory=dict)  # apply_variant's options for this method
    loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate = ratio × learning_rate
    drop_after: float | None = None  # LoRA-drop: share of the steps before measuring and dropping
    keep_share: float = 0.9  # LoRA-drop: the layers holding this share of the importance keep their adapters


METHODS = {
    "lora": Method("lora"),
    "rslora": Method("rslora", ("5.1",)),
    "dora": Method("dora", ("5.2",)),
    "pissa": Method("pissa", ("5.3",)),
    "olora": Method("olora", ("5.3",)),
    "lora-fa": Method("lora-fa", ("5.5",)),
    "lora+": Method("lora", loraplus_lr_ratio=4.0),
    "vera": Method("vera", ("5.6",), learning_rate=2e-2, r=256),
    "adalora": Method("adalora", ("5.7",), learning_rate=2e-2),
    "lora-lr2e-2": Method("lora", learning_rate=2e-2),  # the control for VeRA's and AdaLoRA's learning rate
    "delta-lora": Method("delta-lora", ("5.8",)),
    "lora-drop": Method("lora", ("5.9",), drop_after=0.25),
    "qlora": Method("qlora", ("4.2", *NF4)),
    "loftq": Method("loftq", ("5.4", *NF4), options={"num_iters": 5}),
}
MERGE_CHECK_EXAMPLES = 64  # eval examples on which merged and unmerged logits are compared
# A merge is exact up to rounding: compared in float64 (4-bit bases: fp32, where merged and unmerged
# logits differ by some 1e-6 of their size), 1e-4 of max |logit| is far above rounding and far below
# any real change of function (a dropped magnitude, a missing scale).
MERGE_RTOL = 1e-4


def build(method: Method, base: nn.Module, config: TrainConfig, steps: int) -> tuple[nn.Module, object, dict]:
    """A copy of ``base`` with ``method``'s adapters: (model, attach, extras).

    ``attach(optimizer)`` is ``apply_variant``'s hook installer; ``extras`` holds LoftQ's errors.
    The global seed is set first, so every method that draws a random A draws the same one.
    """
    model = copy.deepcopy(base)
    torch.manual_seed(config.seed)
    if method.variant == "qlora":
        return prepare_qlora_model(model, config), lambda optimizer: None, {}
    if method.variant == "loftq":  # apply_variant does the same, but keeps loftq_init's errors to itself
        get_lora_model(model, r=method.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules)
        errors = {path: loftq_init(layer, **method.options) for path, layer in list(lora_layers(model))}
        return model, lambda optimizer: None, {"loftq_errors": errors}
    alpha = config.lora_alpha
    model, attach = apply_variant(
        model, method.variant, r=method.r, lora_alpha=alpha, target_modules=config.target_modules,
        total_step=steps, **method.options,
    )  # fmt: skip
    return model, attach, {}


def hook_state_bytes(model: nn.Module, hooks: object) -> int:
    """Bytes a method's optimizer hooks keep between or during steps (not in the model or the optimizer).

    AdaLoRA's RankAllocator: Ī and Ū for every entry of P, Λ, Q. Delta-LoRA: a copy of every A
    and B, taken before each step. Others: 0.
    """
    if isinstance(hooks, RankAllocator):
        tensors = [t for _, layer in adalora_layers(model) for t in (layer.lora_A, layer.lora_E, layer.lora_B)]
        return 2 * sum(t.numel() * t.element_size() for t in tensors)
    if isinstance(hooks, DeltaLoRA):
        return sum(
            t.numel() * t.element_size() for _, layer in lora_layers(model) for t in (layer.lora_A, layer.lora_B)
        )
    return 0


def merge_gap(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Merge every adapter into its base (in place); (max |Δ logit| against the unmerged model, max |logit|).

    Full-precision bases are compared in float64, so what remains is the merge's own error, not the
    fp32 rounding of large adapters (a run that diverged can have |sBA| far above |W0|). 4-bit bases
    are dequantized first (``merge_and_export``) and compared in fp32; every other adapter layer has
    its own ``merge()`` (LoRA, DoRA, VeRA, AdaLoRA). The model is not usable for training afterwards.
    """
    model.eval()
    quantized = any(isinstance(m, NF4Linear) for m in model.modules())
    if not quantized:
        model.double()
    with torch.no_grad():
        expected = model(ids).float() if quantized else model(ids)
        if quantized:
            model = merge_and_export(model, dtype=torch.float32)
        else:
            for module in model.modules():
                if callable(getattr(module, "merge", None)) and hasattr(module, "merged"):
                    module.merge()
        return (model(ids).to(expected.dtype) - expected).abs().max().item(), expected.abs().max().item()


def run_config(name: str, run: Run, device: torch.device, **fields) -> TrainConfig:
    """The Stage 4 TrainConfig of one row of a comparison: the shared schedule (COMMON), ``run``'s steps, seed and
    progress bar, the device's precision, output under ``run.out / name``; ``fields``: the method's own (its
    learning rate, rank, …)."""
    return TrainConfig(
        **COMMON, max_steps=run.steps, seed=run.seed, precision="bf16" if device.type == "cuda" else "fp32",
        device=device.type, output_dir=str(run.out / name), progress=run.progress, **fields,
    )  # fmt: skip


def run_method(
    config: TrainConfig,
    data: dict,
    model: nn.Module,
    attach: Callable[[torch.optim.Optimizer], object] | None = None,
    train: Callable[[QLoRATrainer], tuple[QLoRATrainer, dict]] | None = None,
) -> tuple[dict, QLoRATrainer, object]:
    """The loop every comparison shares (``make variants``, ``make peft-family``): train one built model, measure it.

    Exact-match accuracy before; a Stage 4 ``QLoRATrainer``; ``attach(trainer.optimizer)`` (a method's
    per-step hooks, returned as the third element); ``train(trainer)`` (default: ``trainer.train()``;
    it may hand back another trainer and extra metrics) timed; then the metrics every row has:
    learning_rate, accuracy_before/after, final_loss (mean of the last 10 steps), loss_curve,
    trainable_params, seconds_per_step, and the extras. Returns (metrics, the trainer that finished, hooks).
    """
    (Path(config.output_dir) / "metrics.jsonl").unlink(missing_ok=True)  # the trainer appends to it
    accuracy_before = exact_match_accuracy(model, data["eval"])
    trainer = QLoRATrainer(model, config, data["train"], data["eval"])
    hooks = attach(trainer.optimizer) if attach is not None else None
    started = time.perf_counter()
    if train is None:
        trainer.train()
        extras = {}
    else:
        trainer, extras = train(trainer)
    seconds = time.perf_counter() - started
    history = trainer.history
    metrics = {
        "learning_rate": config.learning_rate,
        "accuracy_before": accuracy_before,
        "accuracy_after": trainer.evaluate()["accuracy"],
        "final_loss": sum(h["loss"] for h in history[-10:]) / len(history[-10:]),
        "loss_curve": [h["loss"] for h in history],
        "trainable_params": count_parameters(trainer.model)[0],
        "seconds_per_step": seconds / config.max_steps,
        **extras,
    }
    return metrics, trainer, hooks


def train_method(
    name: str, base: nn.Module, data: dict, run: Run = RUN, method: Method | None = None
) -> tuple[dict, QLoRATrainer]:
    """Build, train (``run_method``) and measure one method; returns (metrics, the trainer that finished the run).

    ``method`` overrides ``METHODS[name]`` (e.g. the same method at another rank; ``name`` then only
    names the run's output directory). Besides ``run_method``'s metrics: r, the training memory
    (with the hooks' state), AdaLoRA's ranks, LoftQ's errors, LoRA-drop's importances, the merge check.

    The trainer's model has been merged by the merge check (``merge_gap``): evaluate it, do not train it on.
    """
    method = method or METHODS[name]
    config = run_config(
        name, run, next(base.parameters()).device, r=method.r, lora_alpha=LORA_ALPHA,
        learning_rate=method.learning_rate, loraplus_lr_ratio=method.loraplus_lr_ratio,
        quantize="nf4" if method.variant == "qlora" else "none",
    )  # fmt: skip
    model, attach, extras = build(method, base, config, run.steps)
    train = None if method.drop_after is None else (lambda trainer: lora_drop_run(trainer, method, data))
    metrics, trainer, hooks = run_method(config, data, model, attach, train)
    if isinstance(hooks, RankAllocator):
        extras["adalora_ranks"] = hooks.ranks()
    metrics.update(
        r=method.r, training_memory_bytes=training_memory(trainer) + hook_state_bytes(trainer.model, hooks), **extras
    )
    if hooks is not None:
        hooks.detach()
    ids = data["eval"]["input_ids"][:MERGE_CHECK_EXAMPLES].to(config.device)
    metrics["merge_max_abs_logit_diff"], metrics["max_abs_logit"] = merge_gap(trainer.model, ids)
    return metrics, trainer


def lora_drop_run(trainer: QLoRATrainer, method: Method, data: dict) -> tuple[QLoRATrainer, dict]:
    """LoRA-drop in two phases on one schedule: train, measure, share the unimportant adapters, continue.

    Phase 1 trains ``drop_after`` of the steps; the importance is measured on four training
    micro-batches; after ``lora_drop`` a new trainer (a new AdamW: the shared adapters are new
    parameters for it) continues from the same step, batch and learning rate to ``max_steps``.
    """
    config = trainer.config
    first = round(method.drop_after * config.max_steps)
    trainer.train(steps=first)
    batches = [trainer.micro_batch(i)[0] for i in range(4)]
    importance = lora_output_importance(trainer.model, batches)
    kept = lora_drop(trainer.model, importance, keep_share=method.keep_share)
    second = QLoRATrainer(trainer.model, config, data["train"], data["eval"])
    second.step, second.history = trainer.step, list(trainer.history)
    second.scheduler = torch.optim.lr_scheduler.LambdaLR(second.optimizer, lambda step: lr_factor(step + first, config))
    second.train()
    return second, {"lora_drop_importance": importance, "lora_drop_kept": kept, "lora_drop_after_steps": first}


def compare(names: tuple[str, ...] | list[str] = tuple(METHODS), run: Run = RUN, data: dict | None = None) -> dict:
    """Train every method in ``names`` from the bundled base model; {name: metrics}. Prints one line per method."""
    return compare_methods(train_method, names, run, data)


def compare_methods(
    train: Callable[..., tuple[dict, QLoRATrainer]], names: tuple[str, ...] | list[str], run: Run, data: dict | None
) -> dict[str, dict]:
    """``train(name, base, data, run)`` for each of ``names`` from the bundled base model.

    One base model on the fastest device, the harder task unless ``data`` is given, one printed line
    per method; {name: metrics}. ``make variants`` and ``make peft-family`` both run their methods so.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(device)
    data = data or {"train": hard_finetune_data("train"), "eval": hard_finetune_data("eval")}
    results = {}
    for name in names:
        results[name], _ = train(name, base, data, run)
        m = results[name]
        print(f"[{name}] accuracy {m['accuracy_before']:.1%} -> {m['accuracy_after']:.1%}, "
              f"loss {m['final_loss']:.3f}, {m['seconds_per_step'] * 1e3:.0f} ms/step", flush=True)  # fmt: skip
    return results


def rank_sweep(
    ranks: tuple[int, ...] = (2, 8, 32, 128),
    names: tuple[str, ...] = ("lora", "rslora"),
    steps: int = STEPS,
    out: Path = OUT / "rank_sweep",
    data: dict | None = None,
) -> dict[str, dict[int, dict]]:
    """LoRA against rsLoRA (or any ``names``) at each rank, ``lora_alpha`` fixed; {name: {r: metrics}}.

    With α fixed, LoRA's scale α/r falls 64-fold from r = 2 to r = 128 and rsLoRA's α/√r only
    8-fold: lesson §1 predicts that LoRA's larger ranks learn slower and rsLoRA's do not.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(device)
    data = data or {"train": hard_finetune_data("train"), "eval": hard_finetune_data("eval")}
    sweep: dict[str, dict[int, dict]] = {name: {} for name in names}
    for name in names:
        for r in ranks:
            method = dataclasses.replace(METHODS[name], r=r)
            run = Run(steps, out, progress=False)
            sweep[name][r], _ = train_method(f"{name}-r{r}", base, data, run, method=method)
            m = sweep[name][r]
            print(f"[{name} r={r}] accuracy {m['accuracy_after']:.1%}, loss {m['final_loss']:.3f}", flush=True)
    return sweep


def table(results: dict[str, dict]) -> str:
    """The comparison as text: one row per method; memory relative to LoRA's when LoRA ran."""
    reference = results.get("lora", {}).get("training_memory_bytes")
    head = (
        f"{'method':<11}{'lr':>7}{'acc before':>11}{'acc after':>10}{'final loss':>11}{'trainable':>10}"
        f"{'memory vs LoRA':>16}{'merges? max|Δlogit|':>21}{'s/step':>8}"
    )
    rows = [head, "-" * len(head)]
    for name, m in results.items():
        memory = m["training_memory_bytes"] - reference if reference is not None else m["training_memory_bytes"]
        exact = m["merge_max_abs_logit_diff"] <= MERGE_RTOL * m["max_abs_logit"]
        merge = f"{'yes' if exact else 'NO'} {m['merge_max_abs_logit_diff']:.0e}"
        rows.append(
            f"{name:<11}{m['learning_rate']:>7.0e}{m['accuracy_before']:>11.1%}{m['accuracy_after']:>10.1%}"
            f"{m['final_loss']:>11.4f}{m['trainable_params']:>10,}{memory:>+16,}{merge:>21}{m['seconds_per_step']:>8.3f}"
        )
    return "\n".join(rows)


def comparison_figure(results: dict[str, dict]):
    """Loss curves (10-step moving average, log scale) and final accuracy bars; a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab20").colors
    for i, (name, m) in enumerate(results.items()):
        losses = torch.tensor(m["loss_curve"])
        window = min(10, len(losses))
        smooth = losses.unfold(0, window, 1).mean(dim=1)  # (steps - window + 1,)
        curves.plot(range(window, len(losses) + 1), smooth.tolist(), label=name, color=colors[i % 20])
    curves.set(xlabel="optimizer step", ylabel="training loss (10-step mean)", yscale="log",
               title=f"{HARD_TASK}: same base, seed and batches")  # fmt: skip
    curves.legend(ncol=2, fontsize=8)
    names = list(results)
    accuracy = [results[n]["accuracy_after"] for n in names]
    bars.barh(names, accuracy, color=[colors[i % 20] for i in range(len(names))])
    for i, a in enumerate(accuracy):
        bars.text(a + 0.01, i, f"{a:.0%}", va="center", fontsize=8)
    bars.set(xlim=(0, 1.12), xlabel="exact-match accuracy after training", title="Exact match on the eval split")
    bars.invert_yaxis()
    fig.tight_layout()
    return fig


def save_comparison_plot(results: dict[str, dict], path: str | Path) -> Path:
    """``comparison_figure`` written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = comparison_figure(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seed_spread(names: list[str], seeds: list[int]) -> dict[str, dict]:
    """Every method again under other seeds (other random A, dropout and data order); {name: spread}.

    One seed decides a lot on this task: plain LoRA at r = 2 stops just before its sudden drop of
    the loss, and another initialisation moves the drop by tens of steps. Per method: the accuracy
    and final loss of each seed, and the mean and range of the accuracy.
    """
    runs = {seed: compare(names, Run(out=OUT / f"seed{seed}", progress=False, seed=seed)) for seed in seeds}
    spread = {}
    for name in names:
        accuracy = [runs[seed][name]["accuracy_after"] for seed in seeds]
        spread[name] = {
            "seeds": seeds,
            "accuracy_after": accuracy,
            "final_loss": [runs[seed][name]["final_loss"] for seed in seeds],
            "accuracy_mean": sum(accuracy) / len(accuracy),
            "accuracy_min": min(accuracy),
            "accuracy_max": max(accuracy),
        }
    return spread


def spread_table(spread: dict[str, dict]) -> str:
    """The seed spread as text: accuracy per seed, mean, range."""
    seeds = next(iter(spread.values()))["seeds"]
    head = f"{'method':<12}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>8}{'min-max':>14}"
    rows = [head, "-" * len(head)]
    for name, m in spread.items():
        per_seed = "".join(f"{a:>9.1%}" for a in m["accuracy_after"])
        rows.append(f"{name:<12}{per_seed}{m['accuracy_mean']:>8.1%}"
                    f"{m['accuracy_min']:>7.0%}-{m['accuracy_max']:.0%}")  # fmt: skip
    return "\n".join(rows)


def methods_parser(doc: str, methods: dict) -> argparse.ArgumentParser:
    """A parser whose positional arguments name some of ``methods`` (none: all), described by ``doc``'s first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "methods", nargs="*", metavar="METHOD", help=f"methods to run (default: all): {', '.join(methods)}"
    )
    return parser


def parse_methods(
    parser: argparse.ArgumentParser, argv: list[str] | None, methods: dict, positive: tuple[str, ...] = ()
) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing a method name that is not in ``methods`` and an option of ``positive``
    (int options, e.g. "steps") below 1."""
    args = parser.parse_args(argv)
    if unknown := [name for name in args.methods if name not in methods]:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(methods)}")
    for option in positive:
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    return args


def begin(command: str, runs: dict[str, tuple[str, ...]]) -> float:
    """Before a comparison: refuse the stubs the chosen methods run (``runs``: {name: exercises}), use one torch
    thread (the model is tiny: nearly as fast, and it never fights for the cores); returns the start time."""
    refuse_exercise_stubs(command, runs)
    torch.set_num_threads(1)
    return time.perf_counter()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = methods_parser(__doc__, METHODS)
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="also run seeds 1..N-1 and print the accuracy's spread (default 1: seed 0 only)")  # fmt: skip
    return parse_methods(parser, argv, METHODS, positive=("seeds",))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    names = args.methods or list(METHODS)
    started = begin("make variants", {name: TRAINING + METHODS[name].exercises for name in names})
    print(f"{len(names)} methods on {HARD_TASK!r}: r = {R} (VeRA r = 256), {STEPS} steps of {COMMON['batch_size']}, "
          f"seed {SEED}")  # fmt: skip
    results = compare(names)
    OUT.mkdir(parents=True, exist_ok=True)
    settings = {"task": HARD_TASK, "steps": STEPS, "r": R, "lora_alpha": LORA_ALPHA, "seed": SEED, **COMMON}
    spread = seed_spread(names, list(range(1, args.seeds))) if args.seeds > 1 else {}
    if spread:
        for name in names:  # seed 0 first, then the others
            for key in ("accuracy_after", "final_loss"):
                spread[name][key].insert(0, results[name][key])
            accuracy = spread[name]["accuracy_after"]
            spread[name].update(seeds=list(range(args.seeds)), accuracy_mean=sum(accuracy) / len(accuracy),
                                accuracy_min=min(accuracy), accuracy_max=max(accuracy))  # fmt: skip
    document = {"settings": settings, "methods": results, **({"seed_spread": spread} if spread else {})}
    (OUT / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    save_comparison_plot(results, OUT / "comparison.png")
    print()
    print(table(results))
    if "adalora" in results:
        ranks = results["adalora"]["adalora_ranks"]
        print(f"AdaLoRA's final rank per layer (each started at {R + R // 2}; budget {R} per layer on average): "
              f"{list(ranks.values())}, total {sum(ranks.values())}")  # fmt: skip
    if "loftq" in results:
        first = next(iter(results["loftq"]["loftq_errors"].items()))
        print(f"LoftQ {first[0]}: ‖W − (Q̂ + sBA)‖ per iteration {[round(e, 4) for e in first[1]]} "
              "(element 0: plain QLoRA's ‖W − Q̂‖)")  # fmt: skip
    if spread:
        print(f"\nExact-match accuracy under {args.seeds} seeds (the seed sets A's init, dropout and the data order):")
        print(spread_table(spread))
    print(f"wrote {OUT.relative_to(OUT.parents[1])}/metrics.json and comparison.png")
    print(f"variants finished in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
