"""Gather every stage's tests into the two L14 entry points, basic_test.py and advanced_test.py.

Each stage keeps its tests in its own modules (testcases/stage<N>/basic.py and advanced.py, listed
by testcases/manifest.py); ``stage_tests("basic")`` imports them and returns their test functions,
which basic_test.py puts in its namespace so pytest collects them there.
"""

from __future__ import annotations

import importlib

from testcases.manifest import STAGES, module_name


def stage_tests(level: str) -> dict[str, object]:
    """Every ``test_*`` function of every stage's ``level`` module ("basic" or "advanced"), by name."""
    found: dict[str, object] = {}
    for stage in STAGES:
        path = stage.tests[0 if level == "basic" else 1]
        module = importlib.import_module(module_name(path))
        for name, value in vars(module).items():
            if name.startswith("test_") and callable(value) and getattr(value, "__module__", None) == module.__name__:
                if name in found:
                    raise RuntimeError(f"two stages define {name}: rename one ({path} and {found[name].__module__})")
                found[name] = value
    return found
