"""Which exercises' code each graded test really runs, traced on the reference, against the manifest's ``needs``.

    python -m solutions.tools.needs [--ex 7] [--verbose]

Runs the graded tests (basic and advanced) on the reference, in this process, with a line tracer
(``sys.monitoring`` on Python 3.12 and later, ``sys.settrace`` before): an executed line of
``solutions/<student file>`` between ``# BEGIN SOLUTION X.Y`` and ``# END SOLUTION`` means the test
ran exercise X.Y's code. testcases/manifest.py promises that the tests of exercise E run only E's
code and that of ``dependencies(E)`` (its ``needs``, transitively): the grader loads the student
files those name, the mutant runner meets each mutant with the tests of its ``dependents``, and a
hang in X blocks the exercises that depend on X. This tool checks the promise and prints, per
exercise, every exercise its tests run that the manifest does not list (with a test that does),
split into what ``needs`` can say (an earlier exercise) and what it cannot (a later one: the test
reaches ahead of its exercise; ``REACHES_AHEAD`` lists the known ones, reported to the lead). With
``--verbose`` it also lists, per exercise, what its tests run and the declared needs none of them
runs (harmless: they only widen what the tools assume). Exit status 1 on anything not listed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from testcases.manifest import REPO, dependencies, exercises, select, stage_of, student_files

# Tests that run a LATER exercise's code (needs cannot say it: they reach ahead of their exercise), known
# and reported to the lead, who decides whether the test changes (issue 21); a new one fails the check.
REACHES_AHEAD: dict[tuple[str, str], str] = {}


def solution_lines() -> dict[str, dict[int, str]]:
    """Real path of each reference file -> {line number: exercise} for the lines inside its solution blocks."""
    found: dict[str, dict[int, str]] = {}
    for relative in student_files():
        path = REPO / "solutions" / relative
        lines, current = {}, None
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.strip()
            if text.startswith("# BEGIN SOLUTION "):
                current = text.removeprefix("# BEGIN SOLUTION ").split(":")[0].strip()
            elif text == "# END SOLUTION":
                current = None
            elif current is not None:
                lines[number] = current
        found[os.path.realpath(path)] = lines
    return found


class Tracer:
    """A pytest plugin that records, per graded test, the exercises whose solution lines ran."""

    def __init__(self) -> None:
        self.lines = solution_lines()
        self.ran: dict[str, tuple[str, set[str]]] = {}  # nodeid -> (its exercise, exercises whose code ran)
        self.current: set[str] = set()

    def pytest_sessionstart(self, session) -> None:
        if sys.version_info >= (3, 12):
            self._start_monitoring()

    def pytest_sessionfinish(self, session) -> None:
        if sys.version_info >= (3, 12):
            sys.monitoring.set_events(sys.monitoring.COVERAGE_ID, 0)
            sys.monitoring.free_tool_id(sys.monitoring.COVERAGE_ID)

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = set()
        if sys.version_info < (3, 12) and item.nodeid in self._exercise:
            sys.settrace(self._call)  # graded tests only: the others run at full speed

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        if sys.version_info < (3, 12):
            sys.settrace(None)
        marker = self._exercise.get(nodeid)
        if marker:
            self.ran[nodeid] = (marker, self.current)

    def pytest_collection_modifyitems(self, items) -> None:
        self._exercise = {}
        for item in items:
            marker = item.get_closest_marker("exercise")
            if marker and marker.args:
                self._exercise[item.nodeid] = marker.args[0]

    # -- Python 3.11: sys.settrace; line events only in the reference files --------------------------

    def _call(self, frame, event, arg):
        lines = self.lines.get(frame.f_code.co_filename)
        if lines is None:
            return None
        current = self.current

        def line(frame, event, arg):
            if event == "line" and (ex := lines.get(frame.f_lineno)):
                current.add(ex)
            return line

        return line

    # -- Python 3.12+: sys.monitoring; a line event disabled wherever it is not in a solution block ----

    def _start_monitoring(self) -> None:
        monitoring = sys.monitoring
        monitoring.use_tool_id(monitoring.COVERAGE_ID, "solutions.tools.needs")

        def on_line(code, number):
            ex = self.lines.get(code.co_filename, {}).get(number)
            if ex is None:
                return monitoring.DISABLE
            self.current.add(ex)
            return None  # keep this line on: another test may run it

        monitoring.register_callback(monitoring.COVERAGE_ID, monitoring.events.LINE, on_line)
        monitoring.set_events(monitoring.COVERAGE_ID, monitoring.events.LINE)


class Check(Tracer):
    """The same check as a pytest plugin: ``pytest testcases --impl solutions -p solutions.tools.needs``
    (make test's step 3, which runs every graded test anyway) traces the graded tests of that session and
    fails it if they run an exercise the manifest does not list (printed at the end)."""

    def pytest_sessionfinish(self, session) -> None:
        super().pytest_sessionfinish(session)
        self.report = report(self.ran, verbose=False)
        if self.report[1] and session.exitstatus == 0:
            session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        lines, _ = self.report
        terminalreporter.section("which exercises the graded tests run (solutions/tools/needs.py)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_configure(config) -> None:
    """Loaded with ``-p solutions.tools.needs``: register the check on the reference's graded tests."""
    if config.pluginmanager.get_plugin("needs-check") is None:
        config.pluginmanager.register(Check(), "needs-check")


def trace(selection: list[str]) -> dict[str, tuple[str, set[str]]]:
    """Run the graded tests of ``selection`` on the reference under the tracer: nodeid -> (exercise, exercises run)."""
    from solutions.tools.variants import quiet_pytest

    tracer = Tracer()
    with tempfile.TemporaryDirectory(prefix="needs-") as tmp:
        args = ["-q", "--no-header", "-p", "no:nbmake", "-p", "no:cacheprovider", "-W", "ignore", "--impl", "solutions",
                "--ex", ",".join(selection), "--details", "0", "--basetemp", str(Path(tmp) / "pytest"),
                "testcases/basic_test.py", "testcases/advanced_test.py"]  # fmt: skip
        code = quiet_pytest(args, [tracer])
    if code != 0:
        raise RuntimeError(f"the reference does not pass every graded test (pytest exit status {code})")
    return tracer.ran


def undeclared(ran: dict[str, tuple[str, set[str]]]) -> dict[str, dict[str, list[str]]]:
    """exercise -> {exercise its tests run that the manifest does not list: the tests that run it}."""
    found: dict[str, dict[str, list[str]]] = {}
    for nodeid, (ex, run) in ran.items():
        for other in sorted(run - {ex} - dependencies(ex)):
            found.setdefault(ex, {}).setdefault(other, []).append(nodeid.split("::", 1)[-1])
    return found


def unused(ran: dict[str, tuple[str, set[str]]]) -> dict[str, list[str]]:
    """exercise -> its declared direct needs that none of its tests runs."""
    run_by: dict[str, set[str]] = {}
    for ex, run in ran.values():
        run_by.setdefault(ex, set()).update(run)
    return {ex: [n for n in exercises()[ex].needs if n not in seen] for ex, seen in run_by.items()}


def later(ex: str, other: str) -> bool:
    """Whether ``other`` comes after ``ex`` in the course (``needs`` may only point backwards)."""
    order = list(exercises())
    return order.index(other) > order.index(ex)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ex", default="", help="the exercises whose tests to trace (default: all)")
    parser.add_argument("--verbose", action="store_true", help="also list declared needs that no test runs")
    args = parser.parse_args(argv)
    lines, failed = report(trace(select(args.ex)), args.verbose)
    print("\n".join(lines))
    return 1 if failed else 0


def report(ran: dict[str, tuple[str, set[str]]], verbose: bool) -> tuple[list[str], bool]:
    """(the lines to print, whether an exercise's tests run code the manifest does not list for it)."""
    out: list[str] = []
    missing, known = undeclared(ran), 0
    for ex, others in list(missing.items()):
        for other, tests in list(others.items()):
            if (ex, other) in REACHES_AHEAD:
                out.append(f"{ex}: known, reported: {len(tests)} of its tests run {other}'s code ({', '.join(tests)})")
                del others[other]
                known += 1
            elif later(ex, other):  # needs cannot say it: the test itself reaches ahead of its exercise
                out.append(f"{ex}: {len(tests)} of its tests run {other}'s code, a LATER exercise: {', '.join(tests)}")
            else:
                out.append(f"{ex}: its tests run {other}'s code, which its needs do not cover (e.g. {tests[0]})")
        if not others:
            del missing[ex]
    if verbose:
        run_by: dict[str, set[str]] = {}
        for ex, run in ran.values():
            run_by.setdefault(ex, set()).update(run - {ex})
        for ex, names in unused(ran).items():
            out.append(
                f"{ex}: its tests run {', '.join(sorted(run_by[ex], key=list(exercises()).index)) or 'nothing else'}"
            )
            if names:
                out.append(f"{ex}: declares {', '.join(names)}, which none of its tests runs directly")
    stages = sorted({stage_of(ex).number for ex, _ in ran.values()})
    out.append(f"{len(ran)} graded tests traced (stages {', '.join(map(str, stages))}); "
          + ("every exercise they run is in the manifest" if not missing else f"{len(missing)} exercises under-declared")
          + (f" ({known} known reach(es) ahead, listed above)" if known else ""))  # fmt: skip
    return out, bool(missing)


if __name__ == "__main__":
    sys.exit(main())
