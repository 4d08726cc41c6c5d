"""Mutants and equivalents: the grader tested in both directions.

A *mutant* is the reference with one mistake students make (solutions/mutants/stage<N>.py): the
graded tests must catch it. An *equivalent* is a correct implementation written differently
(solutions/equivalents/stage<N>.py): it must keep full marks. Both are ``Variant``s: the
reference with exact text replacements, or with one solution block's body replaced.

    python -m solutions.tools.variants                 everything (two at a time: --jobs 2)
    python -m solutions.tools.variants --mutants       only the mutants (or --equivalents)
    python -m solutions.tools.variants NAME [NAME]     only these
    python -m solutions.tools.variants --list          the catalogues

The reference runs on every graded test, first and alongside the variants; if it fails anything
the run stops and fails (a mutant can only be "caught" by a suite the reference passes).
``--reference-checked`` leaves that run out, for a caller that runs the reference on every graded
test itself and fails if it fails (``make test``: its step 3). A mutant meets the tests of its
exercise and of every exercise that runs its code (testcases/manifest.py ``dependents``; its own
exercise's and stage's first, in a session of their own, within each the tests that took longer
than a second on an earlier variant last), stopping at the first failure, which is printed so you
can see which test caught it. An equivalent must pass every test of its own
exercise alone; then all equivalents of a student file together must pass every test that runs
that file.

Each line (each variant) runs the suites in a child forked from one process that has already
imported torch, pytest and the tests, so a variant costs its tests, not a Python start-up; a child
also starts from a clean state, whatever the variant before it did. Each line ends with its seconds
(wall clock and CPU).
"""

from __future__ import annotations

import argparse
import ast
import functools
import gc
import importlib
import importlib.metadata
import json
import os
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from testcases.manifest import REPO, STAGES, dependents, module_name, stage_of, student_files, student_modules


@dataclass(frozen=True)
class Variant:
    name: str  # short id, e.g. "b_random_init"
    exercise: str  # the exercise whose code it changes, e.g. "1.1"
    description: str  # the mistake (a mutant) or what is written differently (an equivalent)
    replace: tuple[tuple[str, str], ...] = ()  # exact (old, new) replacements, each old found once
    block: str | None = None  # "1.2: the LoRA forward": the BEGIN SOLUTION marker whose body is replaced...
    code: str = ""  # ...by this code (dedented; indented like the block)

    @property
    def file(self) -> str:
        return stage_of(self.exercise).student_file

    def apply(self, source: str) -> str:
        for old, new in self.replace:
            count = source.count(old)
            if count != 1:
                raise ValueError(f"{self.name}: {old!r} occurs {count} times in {self.file}, expected once")
            source = source.replace(old, new)
        if self.block is not None:
            source = replace_block(source, self.block, self.code, self.name)
        return source


def replace_block(source: str, block: str, code: str, name: str) -> str:
    lines = source.splitlines(keepends=True)
    marker = f"# BEGIN SOLUTION {block}"  # the marker's text up to the end, or a prefix of it that is unique
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(marker)]
    if len(starts) != 1:
        raise ValueError(f"{name}: a marker starting {marker!r} occurs {len(starts)} times, expected once")
    start = starts[0]
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "# END SOLUTION")
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    body = textwrap.indent(textwrap.dedent(code).strip("\n") + "\n", indent)
    return "".join(lines[: start + 1]) + body + "".join(lines[end:])


def catalogue(kind: str) -> list[Variant]:
    """Every stage's mutants or equivalents (``solutions/<kind>/stage<N>.py``), in course order."""
    found: list[Variant] = []
    for stage in STAGES:
        path = stage.mutants if kind == "mutants" else stage.equivalents
        if not (REPO / path).is_file():
            raise FileNotFoundError(f"{path} is missing: stage {stage.number} needs its {kind} (testcases/manifest.py)")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        found.extend(getattr(module, kind.upper()))
    return found


def check(variant: Variant) -> str:
    """The variant's source, after checking it applies, compiles and changes the code (not just text)."""
    original = reference_text(variant.file)
    changed = variant.apply(original)
    if same_code(original, changed):
        raise ValueError(f"{variant.name}: changes nothing but comments or layout")
    return changed


def same_code(original: str, changed: str) -> bool:
    """Whether the two sources have the same syntax tree (they differ at most in comments and layout).

    Statement by statement at the top level: one whose text is unchanged is the same; only the others are
    compared as trees (dumping a whole module for each of hundreds of variants cost seconds)."""
    before, after = syntax_tree(original), ast.parse(changed).body
    if len(before) != len(after):
        return False
    lines = changed.splitlines()
    for (text, tree), node in zip(before, after, strict=True):
        if text != statement_text(lines, node) and tree != ast.dump(node):
            return False
    return True


def statement_text(lines: list[str], node: ast.stmt) -> str:
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return "\n".join(lines[first - 1 : node.end_lineno])


@functools.lru_cache(maxsize=16)
def reference_text(file: str) -> str:
    return (REPO / "solutions" / file).read_text()


@functools.lru_cache(maxsize=16)
def syntax_tree(source: str) -> list[tuple[str, str]]:
    """(text, ``ast.dump``) of each top-level statement of a reference file, for all of its variants (same_code)."""
    lines = source.splitlines()
    return [(statement_text(lines, node), ast.dump(node)) for node in ast.parse(source).body]


# ---- running the suites -------------------------------------------------------------------------

SLOW_SECONDS = 1.0
SLOW: set[str] = set()  # tests that took longer than SLOW_SECONDS in an earlier child (each child inherits it)
SECONDS: dict[str, float] = {}  # in a child: each test's seconds in its suite runs, sent back with the verdict


class _Recorder:
    """A pytest plugin that remembers the first failing test and whether everything passed.

    ``first``: the exercise whose tests run first, then the rest of its stage's, then the others' (each
    group in its collected order, except that the tests in ``SLOW`` go last within their group). A
    mutant meets the tests closest to its code first: they are the likeliest to catch it, and with
    ``-x`` the (slower) later stages' suites then run only for the mutants that the earlier tests let
    through; a 10-second training test waits until the quick ones have had their chance. The verdict
    does not depend on the order. ``durations`` records each test's seconds (its call).
    """

    def __init__(self, first: str | None = None) -> None:
        self.first = first
        self.failed: list[str] = []
        self.collection_error: list[str] = []
        self.durations: dict[str, float] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        def nearness(item) -> tuple[int, bool]:
            marker = item.get_closest_marker("exercise")
            exercise = str(marker.args[0]) if marker and marker.args else ""
            near = 0 if exercise == self.first else 1 if exercise.split(".")[0] == self.first.split(".")[0] else 2
            return near, item.nodeid in SLOW

        if self.first:
            items.sort(key=nearness)  # stable: the collected order within each group

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.collection_error = str(report.longrepr).strip().splitlines()[-1:]

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call":
            self.durations[report.nodeid] = report.duration
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)  # where it failed, and the error's first line
            if crash is not None:
                first_line = (crash.message.strip().splitlines() or [""])[0]
                message = f"{Path(crash.path).name}:{crash.lineno}: {first_line}"
            else:
                message = (str(report.longrepr).strip().splitlines() or [""])[-1]
            self.failed.append(f"{report.nodeid.split('::', 1)[-1]}: {message[:110]}")


def run_suite(
    files: dict[str, str], selection: list[str], stop_first: bool, first: str | None = None
) -> tuple[int, _Recorder]:
    """Run the graded tests of ``selection`` in this process on the given student files (path -> text);
    the tests of exercise ``first`` and its stage run first."""

    from model import _impl

    with tempfile.TemporaryDirectory(prefix="variant-") as tmp:
        for relative in student_files():
            target = Path(tmp) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files.get(relative) or (REPO / "solutions" / relative).read_text())
        for module in student_modules():
            sys.modules.pop(module, None)
        _impl._broken.clear()
        recorder = _Recorder(first)
        # --tb=native: a verdict prints where the test failed and the error's first line; pytest's own traceback
        # would parse the (long) test module again for every failure.
        args = ["-q", "--no-header", "-p", "no:nbmake", "-W", "ignore", "--tb=native", "--impl", tmp]
        args += ["--ex", ",".join(selection)]
        args += ["-x"] if stop_first else []
        args += stage_modules(selection)
        code = quiet_pytest(args, [recorder])
    SECONDS.update(recorder.durations)
    return code, recorder


def quiet_pytest(args: list[str], plugins: list) -> int:
    """``pytest.main`` with its report thrown away (the plugins collect what counts); its exit status."""
    import pytest

    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            return pytest.main(args, plugins=plugins)
        finally:
            sys.stdout = stdout


def stage_modules(selection: list[str]) -> list[str]:
    """The test modules of the stages in ``selection``, basic before advanced as in testcases/basic_test.py and
    advanced_test.py (which gather every stage's): collecting only these costs a fraction of collecting all."""
    stages = [s for s in STAGES if any(e.id in selection for e in s.exercises)]
    return [s.tests[0] for s in stages] + [s.tests[1] for s in stages]


def selection_for(exercise: str) -> list[str]:
    chosen = {exercise} | dependents(exercise)
    return [e.id for s in STAGES for e in s.exercises if e.id in chosen]


def run_mutant(mutant: Variant) -> tuple[bool, str]:
    """Caught if a test of ``selection_for(mutant.exercise)`` fails. Two sessions: the exercises of the mutant's
    own stage (collecting one stage's modules is quick, and nearly every mutant is caught there), then, if
    all of those passed, the rest of the selection; together they run every test of the selection."""
    import pytest

    source, selection = check(mutant), selection_for(mutant.exercise)
    own_stage = [e.id for e in stage_of(mutant.exercise).exercises if e.id in selection]
    rest = [e for e in selection if e not in own_stage]
    for chosen in (own_stage, rest) if rest else (own_stage,):
        code, recorder = run_suite({mutant.file: source}, chosen, stop_first=True, first=mutant.exercise)
        if code == pytest.ExitCode.TESTS_FAILED and recorder.failed:
            first = recorder.failed[0]
            if "NameError" in first or "SyntaxError" in first:
                return False, f"the mutant itself is broken, fix it: {first}"
            return True, first
        if code != pytest.ExitCode.OK:
            return False, f"pytest exited with {code!r} {recorder.collection_error}"
    return False, "every graded test passed"


def run_equivalent(equivalent: Variant) -> tuple[bool, str]:
    import pytest

    code, recorder = run_suite({equivalent.file: check(equivalent)}, [equivalent.exercise], stop_first=False)
    if code == pytest.ExitCode.OK:
        return True, f"full marks on {equivalent.exercise}"
    return False, "; ".join(recorder.failed[:3]) or f"pytest exited with {code!r} {recorder.collection_error}"


def run_combined(file: str, equivalents: list[Variant]) -> tuple[bool, str]:
    """All equivalents of one student file at once, on every test that runs the file."""
    import pytest

    text, used = (REPO / "solutions" / file).read_text(), []
    for variant in equivalents:
        try:
            text = variant.apply(text)
            used.append(variant)
        except (ValueError, StopIteration):
            continue  # it rewrites what another equivalent already rewrote; it was run on its own
    exercises = {v.exercise for v in used}
    chosen = sorted({d for ex in exercises for d in selection_for(ex)}, key=lambda e: tuple(map(int, e.split("."))))
    code, recorder = run_suite({file: text}, chosen, stop_first=False)
    if code == pytest.ExitCode.OK:
        return True, f"{len(used)} together: full marks on {','.join(chosen)}"
    return False, "; ".join(recorder.failed[:3]) or f"pytest exited with {code!r}"


def judge(name: str, mutants: dict[str, Variant], equivalents: dict[str, Variant]) -> tuple[bool, str]:
    """One line's verdict: the reference, ``combined:<file>`` (a file's equivalents together), a mutant or an equivalent."""
    if name == "reference":
        import pytest

        code, recorder = run_suite({}, [e.id for s in STAGES for e in s.exercises], stop_first=False)
        ok = code == pytest.ExitCode.OK
        detail = "passes every graded test" if ok else "; ".join(recorder.failed[:5])
        return ok, f"{'ok      ' if ok else 'FAILED  '} {'the reference':<38} {detail}"
    if name.startswith("combined:"):
        file = name.split(":", 1)[1]
        ok, detail = run_combined(file, [e for e in equivalents.values() if e.file == file])
        return ok, f"{'ok      ' if ok else 'LOST    '} {'all equivalents of ' + file:<38} {detail}"
    if name in mutants:
        ok, detail = run_mutant(mutants[name])
        return ok, f"{'caught  ' if ok else 'SURVIVED'} {name:<38} {detail}"
    ok, detail = run_equivalent(equivalents[name])
    return ok, f"{'ok      ' if ok else 'LOST    '} {name:<38} {detail}"


def warm_up() -> None:
    """Import once, here, what every suite run needs, so that each forked child starts ready.

    The student modules are not imported (each child loads its own variant's files). ``gc.freeze``
    keeps these objects out of every later collection: pytest collects garbage harder at the end of
    each session, and scanning torch's objects each time cost a third of a second per variant.
    """
    import hypothesis  # noqa: F401  (its pytest plugin imports it at the end of every session)
    import pytest  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (the plugin imports it before the first test)

    for entry in importlib.metadata.entry_points(group="pytest11"):  # the plugins pytest loads (nbmake: off)
        if entry.name != "nbmake":
            importlib.import_module(entry.module)

    import model.tiny_llama  # noqa: F401
    import testcases.advanced_test  # noqa: F401  (every stage's test modules)
    import testcases.basic_test  # noqa: F401
    import testcases.conftest  # noqa: F401
    import training.data  # noqa: F401

    for stage in STAGES:  # run_suite collects these modules directly, so a module-wide mark would apply there only
        for path in stage.tests:
            if hasattr(importlib.import_module(module_name(path)), "pytestmark"):
                raise RuntimeError(f"{path}: a module-level pytestmark is not applied through testcases/*_test.py")
    torch.set_num_threads(1)  # the children inherit it: two processes × two threads on two cores spin
    for file in student_files():  # each child compares its variant's syntax tree with these (check())
        syntax_tree(reference_text(file))
    gc.freeze()


def in_child(name: str, verdicts: Path, mutants: dict[str, Variant], equivalents: dict[str, Variant]) -> int:
    """Fork; the child judges ``name``, writes its verdict to ``verdicts/<pid>`` and exits without cleaning up."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        ok, line = judge(name, mutants, equivalents)
        (verdicts / str(os.getpid())).write_text(json.dumps([ok, line, SECONDS]))
        code = 0
    except BaseException as error:  # a broken catalogue entry: report it, never return into the parent's loop
        print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def run_all(names: list[str], jobs: int) -> tuple[bool, bool]:
    """Judge ``names`` in forked children of this process, ``jobs`` at a time, printing each line as it ends.

    Returns (every verdict as expected, the reference passed); the reference, if named, runs first and
    alongside the others; if it fails, the rest is stopped (a mutant's verdict means nothing then).
    """
    mutants = {m.name: m for m in catalogue("mutants")}
    equivalents = {e.name: e for e in catalogue("equivalents")}
    warm_up()
    todo, running, bad, reference_ok = list(names), {}, 0, True
    with tempfile.TemporaryDirectory(prefix="variants-") as tmp:
        verdicts = Path(tmp)
        while todo or running:
            while todo and len(running) < jobs:
                name = todo.pop(0)
                running[in_child(name, verdicts, mutants, equivalents)] = (name, time.monotonic())
            pid, status, usage = os.wait4(-1, 0)
            if pid not in running:
                continue  # not one of ours (a process a test started and left to this parent)
            name, started = running.pop(pid)
            result = verdicts / str(pid)
            if result.exists():
                ok, line, seconds = json.loads(result.read_text())
                SLOW.update(test for test, spent in seconds.items() if spent > SLOW_SECONDS)
            else:
                ok, line = False, f"{'FAILED  '} {name:<38} the test process died ({describe_status(status)})"
            cpu = usage.ru_utime + usage.ru_stime
            print(f"{line}  [{time.monotonic() - started:.1f} s, {cpu:.1f} s CPU]", flush=True)
            bad += not ok
            if name == "reference" and not ok:
                reference_ok = False
                for child in running:
                    os.kill(child, signal.SIGKILL)
                for child in running:
                    os.waitpid(child, 0)
                running, todo = {}, []
    return bad == 0, reference_ok


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mutants must be caught; equivalents must keep full marks.")
    parser.add_argument("names", nargs="*", help="run only these variants")
    parser.add_argument("--mutants", action="store_true", help="only the mutants")
    parser.add_argument("--equivalents", action="store_true", help="only the equivalents")
    parser.add_argument("--list", action="store_true", help="print the catalogues and exit")
    parser.add_argument("--jobs", type=int, default=2, help="variants judged at a time (one process each)")
    parser.add_argument("--reference-checked", action="store_true",
                        help="leave out the reference's run: the caller runs it on every graded test (make test)")  # fmt: skip
    args = parser.parse_args(argv)
    mutants, equivalents = catalogue("mutants"), catalogue("equivalents")
    if args.list:
        for kind, variants in (("mutant", mutants), ("equivalent", equivalents)):
            for v in variants:
                print(f"{kind:<11}{v.exercise:<5}{v.name:<38}{v.description}")
        return 0
    known = {v.name for v in mutants + equivalents}
    if unknown := set(args.names) - known:
        print(f"unknown variants: {sorted(unknown)}")
        return 2
    chosen_m = [] if args.equivalents else [m.name for m in mutants if not args.names or m.name in args.names]
    chosen_e = [] if args.mutants else [e.name for e in equivalents if not args.names or e.name in args.names]
    # A drifted anchor is a broken catalogue: say so up front (each child then checks that its variant changes the
    # code, not just comments or layout: check()).
    chosen = set(chosen_m + chosen_e)
    for variant in [*mutants, *equivalents]:
        if variant.name in chosen:
            variant.apply(reference_text(variant.file))
    combined = []
    if chosen_e and not args.names:
        combined = [f"combined:{f}" for f in student_files() if any(e.file == f for e in equivalents)]
    reference = [] if args.reference_checked else ["reference"]
    print(f"== {'the reference on every graded test; ' if reference else ''}{len(chosen_m)} mutants, "
          f"{len(chosen_e)} equivalents", flush=True)  # fmt: skip
    # The longest runs first (the reference, then whole suites), so that the last to finish are short ones;
    # the mutants last, when every test's seconds are known (the slow ones wait, _Recorder).
    ok, reference_ok = run_all([*reference, *combined, *chosen_e, *chosen_m], args.jobs)
    if not reference_ok:
        print("the reference fails a graded test: fix that first (mutants cannot be judged against a failing suite)")
        return 1
    count = len(combined) + len(chosen_e) + len(chosen_m)
    print(f"{count} variants run; " + ("all as expected" if ok else "SOME WENT WRONG (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
