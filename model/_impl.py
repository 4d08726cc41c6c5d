"""The one switch between the student files and the reference.

Tests, notebooks and the demo import ``model.lora``, ``model.quant`` and
``training.qlora_trainer`` and never ``solutions.*``. The environment variable
``LORA_IMPL`` decides which file those three names load:

    LORA_IMPL=student     (default)  model/lora.py, model/quant.py, training/qlora_trainer.py
    LORA_IMPL=solutions              solutions/model/lora.py, ... (the reference)
    LORA_IMPL=/some/dir              /some/dir/model/lora.py, ... (a submission, a mutant);
                                     a file missing there falls back to the student stub

Only these three modules are redirected; everything given (``model.tiny_llama``,
``training.data``, ...) always comes from this repository. The reference files import
each other through the same names, so a whole run is one implementation.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module name -> path relative to an implementation root
STUDENT_MODULES = {
    "model.lora": "model/lora.py",
    "model.quant": "model/quant.py",
    "training.qlora_trainer": "training/qlora_trainer.py",
}


def implementation_root(choice: str | None = None) -> Path:
    """The directory that holds the three student files for ``choice`` (default: $LORA_IMPL)."""
    choice = choice or os.environ.get("LORA_IMPL", "student")
    if choice == "student":
        return REPO
    if choice in ("solutions", "solution", "reference"):
        return REPO / "solutions"
    root = Path(choice).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(
            f"LORA_IMPL={choice!r}: expected 'student', 'solutions' or a directory that holds "
            f"{', '.join(STUDENT_MODULES.values())}"
        )
    return root


def implementation_file(module: str) -> Path:
    """The file that ``import <module>`` loads under the current switch."""
    path = implementation_root() / STUDENT_MODULES[module]
    return path if path.is_file() else REPO / STUDENT_MODULES[module]


class _StudentFileFinder(importlib.abc.MetaPathFinder):
    """Redirects exactly the three student modules; every other import is left alone."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in STUDENT_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, implementation_file(fullname))


def install() -> None:
    """Put the finder in front of the normal import system (idempotent)."""
    if not any(isinstance(f, _StudentFileFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StudentFileFinder())
