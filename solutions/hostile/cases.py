"""The hostile catalogue. Each case is the reference (or a mutant of it) with something hostile added to
one student file, and what the isolated grader must make of it.

expect: per exercise, the points it must get: a number, "twin" (exactly what the same files
without the hostile part get: tampering must neither earn nor cost points), or "less" (fewer than
full marks). Exercises not named are not checked. Every case must finish within max_seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from solutions.tools.variants import Variant


@dataclass(frozen=True)
class Hostile:
    name: str
    description: str
    file: str  # the student file made hostile
    append: str = ""  # code run at import (appended to the module)
    replace: tuple[tuple[str, str], ...] = ()  # code placed inside functions
    base_mutant: str | None = None  # start from this mutant instead of the reference (a wrong answer to defend)
    ex: str = "1,3"  # what is graded: stage 1 uses model/lora.py, stage 3 does not
    expect: dict[str, object] = field(default_factory=dict)
    max_seconds: float = 90.0

    def variant(self) -> Variant:
        return Variant(self.name, "1.1" if self.file == "model/lora.py" else "3.1", self.description, self.replace)


LORA = "model/lora.py"
# Stage 3 must keep full marks whatever model/lora.py does; a file that cannot run costs Stage 1 everything.
STAGE3_FULL = {"3.1": 5, "3.2": 5, "3.3": 4, "3.4": 10, "3.5": 6, "3.6": 8, "3.7": 4}
LORA_LOST = {"1.1": 0, "1.2": 0, "1.3": 0, **STAGE3_FULL}
# Tampering must neither earn nor cost points: Stage 1 scores what the same files score without it.
AS_TWIN = {"1.1": "twin", "1.2": "twin", "1.3": "twin"}
WRONG = "scaling_alpha_not_alpha_over_r"  # a wrong answer to defend: its honest score is below full marks

FIND_RESULTS = """
def _scorer_results_path():
    import os

    pid = os.getppid()
    for _ in range(5):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\\0")
        if b"--results" in args:
            return os.path.join(os.readlink(f"/proc/{pid}/cwd"), args[args.index(b"--results") + 1].decode())
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return None


def _forge():
    import json

    path = _scorer_results_path()
    if path:
        with open(path, "w") as f:
            json.dump({"score": 128.0, "tests": [{"name": "forged", "score": 128.0, "max_score": 128.0}]}, f)
"""

CASES = [
    Hostile(
        "endless_loop_in_forward",
        "LoRALayer.forward never returns.",
        LORA,
        replace=(
            (
                "        result = self.base_layer(x)  # (..., out)\n",
                "        while True:\n            pass\n        result = self.base_layer(x)  # (..., out)\n",
            ),
        ),
        expect={"1.1": 8, "1.2": 0, "1.3": "less", **STAGE3_FULL},
    ),
    Hostile(
        "hang_at_import",
        "Importing model/lora.py sleeps for an hour.",
        LORA,
        append="import time\n\ntime.sleep(3600)\n",
        expect=LORA_LOST,
    ),
    Hostile(
        "sys_exit_at_import",
        "Importing model/lora.py calls sys.exit(0).",
        LORA,
        append="import sys\n\nsys.exit(0)\n",
        expect=LORA_LOST,
    ),
    Hostile(
        "os_exit_at_import",
        "Importing model/lora.py calls os._exit(0): the process vanishes.",
        LORA,
        append="import os\n\nos._exit(0)\n",
        expect=LORA_LOST,
    ),
    Hostile(
        "kill_the_parent",
        "Importing model/lora.py kills its parent process.",
        LORA,
        append="import os\nimport signal\n\nos.kill(os.getppid(), signal.SIGKILL)\n",
        expect={**AS_TWIN, **STAGE3_FULL},
    ),
    Hostile(
        "patch_torch_checks",
        "A wrong forward, and torch.isclose/allclose/equal patched at import to always agree.",
        LORA,
        base_mutant=WRONG,
        append=(
            "import torch as _torch\n\n_torch.isclose = lambda a, b, *args, **kw: _torch.ones_like(a, dtype=_torch.bool)\n"
            "_torch.allclose = lambda *args, **kw: True\n_torch.equal = lambda *args, **kw: True\n"
        ),
        expect=AS_TWIN,
    ),
    Hostile(
        "patch_test_helpers",
        "A wrong forward, and the tests' comparison helpers replaced through sys.modules.",
        LORA,
        base_mutant=WRONG,
        append=(
            "import sys as _sys\n\nfor _name, _module in list(_sys.modules.items()):\n"
            "    if _name.startswith('testcases') and hasattr(_module, 'assert_close'):\n"
            "        _module.assert_close = lambda *args, **kw: None\n"
            "    if _name.startswith('testcases') and hasattr(_module, 'expect_tensor'):\n"
            "        _module.expect_tensor = lambda *args, **kw: None\n"
        ),
        expect=AS_TWIN,
    ),
    Hostile(
        "patch_during_a_test",
        "A wrong forward that replaces torch.isclose whenever it runs.",
        LORA,
        base_mutant=WRONG,
        replace=(
            (
                "        result = self.base_layer(x)  # (..., out)\n",
                "        torch.isclose = lambda a, b, *args, **kw: torch.ones_like(a, dtype=torch.bool)\n"
                "        result = self.base_layer(x)  # (..., out)\n",
            ),
        ),
        expect={"1.1": "twin", "1.2": 0},
    ),
    Hostile(
        "write_results_json",
        "A wrong forward that overwrites the grader's results.json with full marks at import.",
        LORA,
        base_mutant=WRONG,
        append=FIND_RESULTS + "\n_forge()\n",
        expect=AS_TWIN,
    ),
    Hostile(
        "write_results_json_at_exit",
        "The same forgery from an atexit handler, as the test process ends.",
        LORA,
        base_mutant=WRONG,
        append=FIND_RESULTS + "\nimport atexit\n\natexit.register(_forge)\n",
        expect=AS_TWIN,
    ),
    Hostile(
        "daemon_writes_later",
        "A forked daemon that forges results.json after the grader has finished.",
        LORA,
        base_mutant=WRONG,
        append=FIND_RESULTS
        + (
            "\nimport os as _os\nimport time as _time\n\n"
            "if _os.fork() == 0:\n    _os.setsid()\n    if _os.fork() == 0:\n        _path = _scorer_results_path()\n"
            "        _time.sleep(6)\n        if _path:\n            open(_path, 'w').write('{\"score\": 128.0, \"tests\": []}')\n"
            "        _os._exit(0)\n    _os._exit(0)\n"
        ),
        expect=AS_TWIN,
    ),
    Hostile(
        "torch_global_state",
        "Importing model/lora.py changes torch's defaults: float64, no grad, one thread, a seed.",
        LORA,
        append=(
            "import torch as _torch\n\n_torch.set_default_dtype(_torch.float64)\n_torch.set_grad_enabled(False)\n"
            "_torch.set_num_threads(1)\n_torch.manual_seed(7)\n"
        ),
        expect=AS_TWIN,
    ),
    Hostile(
        "allocate_20_gb",
        "The forward allocates 20 GiB on every call.",
        LORA,
        replace=(
            (
                "        result = self.base_layer(x)  # (..., out)\n",
                "        _waste = torch.ones(5 * 2**30)\n        result = self.base_layer(x)  # (..., out)\n",
            ),
        ),
        expect={"1.1": 8, "1.2": 0, **STAGE3_FULL},
    ),
]
