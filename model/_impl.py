"""The one switch between the student files and the reference.

Tests, notebooks and the demo import the student modules (``model.lora``, ``model.quant``,
``training.qlora_trainer``; the list is ``testcases/manifest.py``) and never ``solutions.*``.
One setting, ``impl``, decides which files those names load:

    student      model/lora.py, ...             (your files)
    solutions    solutions/model/lora.py, ...   (the reference; an error where solutions/ is absent)
    DIR          DIR/model/lora.py, ... or DIR/lora.py, ...   (a submission: a clone or just the files)

It is spelled ``make … IMPL=…`` for make, ``--impl …`` for pytest and the grader, and
``LORA_IMPL=…`` in the environment (what the other two set). When it is not given:

    grading (make grade, pytest)                       -> student
    showing (make demo, notebooks, bench)              -> solutions where this checkout has them, else student

Only the student modules are redirected; everything given (``model.tiny_llama``,
``training.data``, ...) always comes from this repository. The reference files import each
other through the same names, so a run is one implementation throughout.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from testcases.manifest import STAGES, stubbed_exercises, student_modules

REPO = Path(__file__).resolve().parents[1]
ENV = "LORA_IMPL"


class StudentFileMissing(ModuleNotFoundError):
    """A student file is absent from the submission: its exercises count as not attempted."""


class StudentFileBroken(ImportError):
    """A student file failed to import earlier in this process (the first error, repeated quickly)."""


def default_choice(purpose: str = "grade") -> str:
    """``student`` for grading; for showing results, the reference where this checkout has it."""
    if purpose == "show" and (REPO / "solutions").is_dir():
        return "solutions"
    return "student"


def use_default_for(purpose: str) -> str:
    """Set ``LORA_IMPL`` to the default for ``purpose`` unless it is set; return the choice."""
    return os.environ.setdefault(ENV, default_choice(purpose))


def implementation_root(choice: str | None = None) -> Path:
    """The directory that holds the student files for ``choice`` (default: $LORA_IMPL, else student)."""
    choice = choice or os.environ.get(ENV) or "student"
    if choice == "student":
        return REPO
    if choice == "solutions":
        if not (REPO / "solutions").is_dir():
            raise ValueError(
                "impl=solutions: this checkout has no solutions/ folder (a handout has no reference); "
                "use impl=student or a directory"
            )
        return REPO / "solutions"
    root = Path(choice).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"impl={choice!r}: expected 'student', 'solutions' or a directory holding the student files")
    return root


def find_student_file(root: Path, relative: str) -> Path | None:
    """``root/model/lora.py`` (a clone), or ``root/lora.py`` (a folder of loose files), or None."""
    for candidate in (root / relative, root / Path(relative).name):
        if candidate.is_file():
            return candidate
    return None


def implementation_file(module: str, choice: str | None = None) -> Path | None:
    """The file ``import <module>`` loads under the switch; None when the submission does not have it."""
    return find_student_file(implementation_root(choice), student_modules()[module])


def missing_exercises(stages: Iterable[int] | None = None) -> list[str]:
    """Exercises whose stub still stands in the files the switch loads now (a missing file: all of its).

    ``stages``: only the exercises of these stages (default: every stage).
    """
    wanted = None if stages is None else set(stages)
    missing = []
    for module, relative in student_modules().items():
        file = implementation_file(module)
        mine = [
            e.id
            for s in STAGES
            if s.student_file == relative and (wanted is None or s.number in wanted)
            for e in s.exercises
        ]
        if not mine:
            continue
        stubbed = set(stubbed_exercises(file.read_text())) if file else set(mine)
        missing += [ex for ex in mine if ex in stubbed]
    return missing


def refuse_stubs(command: str, stages: Iterable[int]) -> None:
    """Exit (status 2) naming the exercises of ``stages`` that are still stubs, instead of failing deep inside one.

    For the commands that run student code end to end (``make demo``, ``make variants``, …): a
    command uses some stages only, and stubs elsewhere do not stop it.
    """
    stages = sorted(stages)
    if missing := missing_exercises(stages):
        hint = f" or see the reference first: {command} IMPL=solutions" if (REPO / "solutions").is_dir() else ""
        needed = f"Stage {stages[0]}" if len(stages) == 1 else f"Stages {stages[0]}-{stages[-1]}"
        if stages != list(range(stages[0], stages[-1] + 1)):
            needed = "Stages " + ", ".join(map(str, stages))
        print(
            f"{command} runs the files in {implementation_root()}, where exercises {', '.join(missing)} are still "
            f"stubs.\nIt needs {needed}: finish them (make grade shows what each test expects){hint}."
        )
        sys.exit(2)


def refuse_exercise_stubs(command: str, runs: dict[str, Iterable[str]]) -> None:
    """Exit (status 2) naming the exercises still stubs that the chosen parts of ``command`` run; others do not matter.

    ``runs``: {part (a method's name): the exercises its code runs}. ``python -m training.variants lora
    dora`` then needs only what LoRA and DoRA run, not every exercise of Stage 5.
    """
    stubbed = set(missing_exercises())
    blocked = {part: [ex for ex in dict.fromkeys(exercises) if ex in stubbed] for part, exercises in runs.items()}
    blocked = {part: missing for part, missing in blocked.items() if missing}
    if blocked:
        hint = f" or see the reference first: {command} IMPL=solutions" if (REPO / "solutions").is_dir() else ""
        lines = "\n".join(f"  {part}: {', '.join(missing)}" for part, missing in blocked.items())
        print(
            f"{command} runs the files in {implementation_root()}, where these exercises are still stubs:\n{lines}\n"
            f"Finish them (make grade shows what each test expects), or choose other methods{hint}."
        )
        sys.exit(2)


_broken: dict[str, str] = {}  # module -> why it cannot be imported in this process


def mark_broken(module: str, reason: str) -> None:
    """Make every later ``import <module>`` fail at once with ``reason`` (no second run of its code)."""
    _broken[module] = reason
    sys.modules.pop(module, None)


class _Refuse(importlib.abc.Loader):
    def __init__(self, error: ImportError) -> None:
        self.error = error

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


class _StudentFileFinder(importlib.abc.MetaPathFinder):
    """Redirects exactly the student modules; every other import is left alone."""

    def find_spec(self, fullname, path=None, target=None):
        modules = student_modules()
        if fullname not in modules:
            return None
        if fullname in _broken:
            return importlib.machinery.ModuleSpec(fullname, _Refuse(StudentFileBroken(_broken[fullname])))
        file = implementation_file(fullname)
        if file is None:
            error = StudentFileMissing(f"{modules[fullname]} is not in {implementation_root()}")
            return importlib.machinery.ModuleSpec(fullname, _Refuse(error))
        return importlib.util.spec_from_file_location(fullname, file)


def install() -> None:
    """Put the finder in front of the normal import system (idempotent)."""
    if not any(isinstance(f, _StudentFileFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StudentFileFinder())
