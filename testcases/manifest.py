"""The course in one table: stages, student files, exercises, points, dependencies, tests.

Every tool derives from this file: the import switch (``model/_impl.py``), the stub generator, the
grader and its points table, the mutant and equivalents runners, the Makefile's instructor
targets, the handout, and the points tables in README.md and tutorial/ (``make test`` checks them).
Adding a stage means adding its files (reference, stub, tests, mutants, equivalents, lesson,
notebook) and ONE entry in ``STAGES`` below; ``make test`` names any piece that is missing.

Paths follow from the stage number and the entry's fields:

    student file      <student_file>                e.g. model/lora.py (stages may share one)
    reference         solutions/<student_file>
    tests             testcases/stage<N>/basic.py, testcases/stage<N>/advanced.py
    mutants           solutions/mutants/stage<N>.py
    equivalents       solutions/equivalents/stage<N>.py
    lesson            tutorial/<NN>-<name>.md
    notebook          notebooks/<NN>_<name>.ipynb

This module imports nothing heavy (no torch): the grader's scoring process reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Exercise:
    id: str  # "1.2": stage number, dot, exercise number
    title: str  # what the student implements, one line
    points: int  # the exercise's points; its tests share them (testcases/scoring.py)
    needs: tuple[str, ...] = ()  # exercises whose code this one's tests run (direct dependencies)


def _path(template: str) -> property:
    """A path that follows from the stage's number and name (see the table in the module docstring)."""
    return property(lambda s: template.format(n=s.number, name=s.name, snake=s.name.replace("-", "_")))


@dataclass(frozen=True)
class Stage:
    number: int
    name: str  # the slug of its lesson and notebook: tutorial/01-<name>.md, notebooks/01_<name>.ipynb
    title: str
    student_file: str  # the file the student writes, relative to the repository root (stages may share one)
    exercises: tuple[Exercise, ...] = field(default_factory=tuple)
    title_zh: str = ""  # the title in the Chinese pages (tutorial/zh-CN/, README.zh-CN.md)

    lesson = _path("tutorial/{n:02d}-{name}.md")
    notebook = _path("notebooks/{n:02d}_{snake}.ipynb")
    mutants = _path("solutions/mutants/stage{n}.py")
    equivalents = _path("solutions/equivalents/stage{n}.py")

    @property
    def tests(self) -> tuple[str, str]:
        """The stage's basic and advanced test modules (collected by testcases/basic_test.py and advanced_test.py)."""
        return (f"testcases/stage{self.number}/basic.py", f"testcases/stage{self.number}/advanced.py")

    @property
    def points(self) -> int:
        return sum(e.points for e in self.exercises)


LORA_LAYER = (
    Exercise("1.1", "LoRALayer: arguments, frozen base, init of A and B", 8),
    Exercise("1.2", "LoRALayer.forward", 8, needs=("1.1",)),
    Exercise("1.3", "delta_weight, merge, unmerge", 8, needs=("1.1", "1.2")),
)
LORA_IN_A_MODEL = (
    Exercise("2.1", "get_lora_model, mark_only_lora_as_trainable", 10, needs=("1.1", "1.2")),
    Exercise("2.2", "count_parameters, print_trainable_parameters", 4, needs=("2.1",)),
    Exercise("2.3", "merge_lora, unmerge_lora, merge_and_unload", 6, needs=("1.3", "2.1")),
    Exercise("2.4", "save_lora, load_lora in PEFT's format", 8, needs=("2.1",)),
)
QUANTIZATION = (
    Exercise("3.1", "uniform (affine) quantization", 5),
    Exercise("3.2", "absmax quantization, per tensor and per block", 5),
    Exercise("3.3", "the NF4 and FP4 code books", 4, needs=("3.2",)),
    Exercise("3.4", "NF4 blockwise quantization", 10, needs=("3.3",)),
    Exercise("3.5", "double quantization", 6, needs=("3.4",)),
    Exercise("3.6", "NF4Linear and its 4-bit matmul", 12, needs=("3.4", "3.5")),
    Exercise("3.7", "fake quantization with a straight-through estimator", 4, needs=("3.1",)),
)
QLORA_TRAINING = (
    Exercise("4.1", "TrainConfig checks", 4),
    Exercise("4.2", "prepare_qlora_model", 8, needs=("4.1", "2.1", "1.3", "3.6")),
    Exercise("4.3", "the mixed-precision trainer", 14, needs=("4.2",)),
    Exercise("4.4", "merge_and_export", 4, needs=("4.2", "2.3")),
    Exercise("4.5", "estimate_memory", 4, needs=("3.5",)),
)

LORA_VARIANTS = (
    Exercise("5.1", "rsLoRA: rslora_scaling, use_rslora", 4, needs=("2.1", "1.3")),
    Exercise("5.2", "DoRALayer (magnitude, forward, merge), get_dora_model", 10, needs=("2.1", "3.6")),
    Exercise("5.3", "PiSSA and OLoRA initialisation", 8, needs=("2.1", "1.3", "3.6")),
    Exercise("5.4", "LoftQ initialisation", 8, needs=("1.2", "3.6")),
    Exercise("5.5", "LoRA-FA: freeze_lora_A", 3, needs=("2.1", "5.2")),
    Exercise("5.6", "VeRA: shared projections, VeRALayer, get_vera_model", 8, needs=("2.1",)),
    Exercise("5.7", "AdaLoRA: SVD-form layer, orthogonal regulariser, RankAllocator", 12, needs=("2.1",)),
    Exercise("5.8", "Delta-LoRA through optimizer hooks", 5, needs=("2.1", "4.3")),
    Exercise("5.9", "LoRA-drop: output importance, shared adapters", 5, needs=("2.1",)),
    Exercise(
        "5.10",
        "adapters in PEFT's format: the LoRA family, VeRA, AdaLoRA",
        10,
        needs=("2.4", "5.1", "5.2", "5.3", "5.4", "5.6", "5.7"),
    ),
)
MEMORY = (
    Exercise("6.1", "8-bit state codes: unsigned dynamic code, lookup table, blockwise", 8, needs=("3.4",)),
    Exercise("6.2", "AdamW8bit: bitsandbytes' step", 10, needs=("6.1",)),
    Exercise("6.3", "PagedOptimizer: states paged between a pool and the device", 8, needs=("6.2",)),
    Exercise("6.4", "make_optimizer, MemoryConfig, MemoryTrainer", 6, needs=("6.2", "6.3", "4.3")),
    Exercise("6.5", "memory accounting: state bytes, estimate and measurement", 10, needs=("6.4", "4.2")),
)
PEFT_FAMILY = (
    Exercise("7.1", "bottleneck adapters (Houlsby, Pfeiffer)", 8, needs=("2.1", "3.6")),
    Exercise("7.2", "prompt tuning: PromptEmbedding, PromptLearningModel", 8),
    Exercise("7.3", "P-tuning: PromptEncoder (MLP, LSTM)", 6, needs=("7.2",)),
    Exercise("7.4", "prefix tuning: PrefixEncoder, prefixes per layer, folding", 10, needs=("2.1", "7.2", "7.3")),
    Exercise("7.5", "P-tuning v2: deep prompts", 3, needs=("7.4",)),
    Exercise("7.6", "IA³: IA3Layer, merge, get_ia3_model", 9, needs=("2.1", "3.6", "4.3")),
    Exercise(
        "7.7",
        "get_peft_method_model, method_profile",
        6,
        needs=("2.2", "4.3", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6"),
    ),
)

STAGES: tuple[Stage, ...] = (
    Stage(1, "lora-layer", "The LoRA layer", "model/lora.py", LORA_LAYER, "LoRA 层"),
    Stage(2, "lora-in-a-model", "LoRA in a model", "model/lora.py", LORA_IN_A_MODEL, "在模型中应用 LoRA"),
    Stage(3, "quantization", "Quantization: from int8 to NF4", "model/quant.py", QUANTIZATION, "量化：从 int8 到 NF4"),
    Stage(4, "qlora-training", "QLoRA training", "training/qlora_trainer.py", QLORA_TRAINING, "QLoRA 训练"),
    Stage(5, "lora-variants", "The LoRA family", "model/lora_variants.py", LORA_VARIANTS, "LoRA 家族"),
    Stage(
        6,
        "memory",
        "QLoRA's memory: 8-bit and paged optimizers, checkpointing",
        "training/memory.py",
        MEMORY,
        "QLoRA 的显存：8 位优化器、分页优化器与梯度检查点",
    ),
    Stage(
        7,
        "peft-family",
        "LoRA among its relatives: adapters, prompts, prefixes, IA³",
        "model/peft_methods.py",
        PEFT_FAMILY,
        "LoRA 与它的近亲：适配器、提示、前缀、IA³",
    ),
)

# The stub the generator writes for a solution block: `raise NotImplementedError("Exercise 1.2: ...")`.
STUB_PATTERN = re.compile(r'NotImplementedError\(\s*"Exercise (\d+\.\d+):')


# ---- Derived views -------------------------------------------------------------------------------


def exercises() -> dict[str, Exercise]:
    """Every exercise by id, in course order."""
    return {e.id: e for stage in STAGES for e in stage.exercises}


def stage_of(exercise_id: str) -> Stage:
    return next(s for s in STAGES if any(e.id == exercise_id for e in s.exercises))


def student_files() -> tuple[str, ...]:
    """The files students write, each once, in course order."""
    return tuple(dict.fromkeys(s.student_file for s in STAGES))


def module_name(path: str) -> str:
    """``model/lora.py`` -> ``model.lora``: the name tests and notebooks import."""
    return path.removesuffix(".py").replace("/", ".")


def student_modules() -> dict[str, str]:
    """Import name -> student file, e.g. {"model.lora": "model/lora.py", ...}."""
    return {module_name(f): f for f in student_files()}


def total_points() -> int:
    return sum(e.points for e in exercises().values())


def dependencies(exercise_id: str) -> set[str]:
    """Every exercise whose code the tests of ``exercise_id`` run, transitively (itself excluded)."""
    table, seen, todo = exercises(), set(), list(exercises()[exercise_id].needs)
    while todo:
        ex = todo.pop()
        if ex not in seen:
            seen.add(ex)
            todo.extend(table[ex].needs)
    return seen


def dependents(exercise_id: str) -> set[str]:
    """Every exercise whose tests run the code of ``exercise_id`` (itself excluded)."""
    return {ex for ex in exercises() if exercise_id in dependencies(ex)}


def files_needed(exercise_ids: Iterable[str]) -> tuple[str, ...]:
    """The student files that the tests of these exercises load (their own and their dependencies')."""
    ids = set(exercise_ids)
    for ex in list(ids):
        ids |= dependencies(ex)
    return tuple(f for f in student_files() if any(stage_of(ex).student_file == f for ex in ids))


def select(spec: str | None) -> list[str]:
    """Exercise ids for ``--ex``: "1.2" (one), "1" (a stage), "1,2.3" (a list); None or "" = all.

    Raises ValueError naming what matched nothing and the allowed values.
    """
    table = exercises()
    if not spec or not spec.strip():
        return list(table)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    chosen, bad = [], []
    for w in wanted:
        hits = [ex for ex in table if ex == w or ex.startswith(w + ".")]
        (chosen.extend(hits) if hits else bad.append(w))
    if bad:
        stages = ", ".join(str(s.number) for s in STAGES)
        raise ValueError(
            f"EX={','.join(bad)}: no such exercise or stage; choose a stage ({stages}) or an exercise "
            f"({', '.join(table)}), or a comma-separated list"
        )
    return [ex for ex in table if ex in chosen]


def stubbed_exercises(text: str) -> list[str]:
    """Exercise ids whose generated stub still stands in a student file's text."""
    return sorted(set(STUB_PATTERN.findall(text)), key=lambda ex: tuple(int(p) for p in ex.split(".")))
