"""Keep student code from bending the checks: detect and undo rebinding of what the tests rely on.

A snapshot, taken before any student file is imported, holds the objects bound to every name in
the namespaces the tests trust: the test modules and their helpers (``testcases.*``), the given
course code, ``builtins``, ``math``, and torch's core namespaces and classes (``torch.isclose``,
``torch.Tensor.__eq__``, ``nn.Module.__call__``, ...). After the student files load, and after
every test, ``check()`` compares each name with the snapshot, puts the original back, and says
what had changed. The plugin fails the test during which it happened ("this test does not count")
and reports a change made at import time as a note; the rest of the run uses the originals. The
modules whose bindings the grading sandbox replaces (``_posixsubprocess``, ``subprocess``,
``_imp``: testcases/sandbox.py) are protected the same way, so its stand-ins stay in place.

This is a tripwire for patching: code that deliberately digs into the interpreter's objects can
still find ways around it. What student code may read, write and start is the sandbox's business
(testcases/sandbox.py); the instructor section of README.md states the threat model.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import itertools
import math
import operator
import sys
from collections.abc import Mapping
from types import ModuleType

from testcases.sandbox import DISARMED_MODULES

# Module name prefixes whose every binding is protected, additions included.
GIVEN_PREFIXES = ("testcases", "model", "training")
# Torch namespaces whose existing bindings are protected (torch adds attributes lazily, so
# additions there are not flagged).
TORCH_MODULES = (
    "torch",
    "torch.nn",
    "torch.nn.functional",
    "torch.nn.init",
    "torch.testing",
    "torch.linalg",
    "torch.autograd",
)


IGNORED = {"__warningregistry__", "__loader__", "__spec__", "__cached__"}
_MISSING = object()  # what a removed name reads as


def _torch_classes() -> list[type]:
    import torch
    from torch import nn

    return [torch.Tensor, torch._C.TensorBase, nn.Module, nn.Linear, nn.Parameter, nn.Embedding, nn.Dropout]


class Guard:
    def __init__(self, student_modules: set[str]) -> None:
        self.student_modules = set(student_modules)
        self.saved: dict[str, tuple[object, dict[str, object], bool]] = self._take()
        # Per namespace, what check() compares after every test, as flat tuples (the quick pass runs in C):
        # (label, object, its live namespace, the watched names, their values, strict, every name it had).
        self._watched = []
        for label, (obj, before, strict) in self.saved.items():
            names = tuple(n for n, v in before.items() if n not in IGNORED and not isinstance(v, ModuleType))
            self._watched.append(
                (label, obj, vars(obj), names, tuple(before[n] for n in names), strict, frozenset(before))
            )

    def _namespaces(self) -> dict[str, tuple[object, bool]]:
        """label -> (module or class, whether added names count as tampering)."""
        spaces: dict[str, tuple[object, bool]] = {"builtins": (builtins, True), "math": (math, True)}
        for name, module in list(sys.modules.items()):
            if not isinstance(module, ModuleType) or name in self.student_modules:
                continue
            given = name.split(".")[0] in GIVEN_PREFIXES and name not in self.student_modules
            trusted = name in TORCH_MODULES or name in DISARMED_MODULES
            if given or trusted or name in ("pytest", "_pytest.python_api", "_pytest.outcomes"):
                spaces[name] = (module, given)
                if given:
                    for attr, value in list(vars(module).items()):
                        if inspect.isclass(value) and value.__module__ == name:
                            spaces[f"{name}.{attr}"] = (value, True)
        for cls in _torch_classes():
            spaces[f"{cls.__module__}.{cls.__qualname__}"] = (cls, False)
        return spaces

    def _take(self) -> dict[str, tuple[object, dict[str, object], bool]]:
        return {label: (obj, dict(vars(obj)), strict) for label, (obj, strict) in self._namespaces().items()}

    def unchanged(self) -> bool:
        """No name rebound, removed or (where strict) added, and no saved module replaced in sys.modules."""
        for _, _, now, names, values, strict, known in self._watched:
            if any(map(operator.is_not, map(now.get, names, itertools.repeat(_MISSING)), values)):
                return False
            if strict and not known.issuperset(now) and _added(now, known):
                return False
        return all(sys.modules.get(n, obj) is obj for n, (obj, _, _) in self.saved.items())

    def check(self) -> list[str]:
        """Names rebound, removed or (where strict) added since the snapshot; each is put back."""
        if self.unchanged():
            return []
        changed = []
        for label, obj, now, names, values, strict, known in self._watched:
            for name, value in zip(names, values, strict=True):  # submodules (not watched) come and go on packages
                if now.get(name, _MISSING) is not value:
                    changed.append(f"{label}.{name}")
                    _restore(obj, name, value)
            for name in _added(now, known) if strict else []:
                changed.append(f"{label}.{name} (added)")
                _delete(obj, name)
        for name in [n for n in self.saved if n in sys.modules and sys.modules[n] is not self.saved[n][0]]:
            changed.append(f"sys.modules[{name!r}]")
            sys.modules[name] = self.saved[name][0]  # type: ignore[assignment]
        return changed


def _added(now: Mapping[str, object], known: frozenset[str]) -> list[str]:
    """The names bound since the snapshot that count as additions (not dunders, not submodules)."""
    return [
        n for n, v in list(now.items()) if n not in known and not n.startswith("__") and not isinstance(v, ModuleType)
    ]


def _restore(obj: object, name: str, value: object) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        setattr(obj, name, value)


def _delete(obj: object, name: str) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        delattr(obj, name)


def describe(changed: list[str], limit: int = 4) -> str:
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more
