"""The grading plugin (its hooks are imported by ``testcases/conftest.py``).

- ``--impl student|solutions|DIR`` sets ``LORA_IMPL`` (which three student files are loaded).
- ``--ex 1.2`` (one exercise) or ``--ex 1`` (a stage) selects graded tests by their marker.
- Every test in ``basic_test.py`` / ``advanced_test.py`` must carry ``@pytest.mark.exercise("X.Y")``
  with an id from ``testcases/points.py``; points are shared by the exercise's tests that ran.
- A test stopped by a stub's ``NotImplementedError`` is reported in one line as "not attempted".
- At the end: a table (exercise, title, points, status) and, with ``--results-json PATH``,
  Gradescope's results.json (``score``, ``execution_time``, ``tests[]`` with ``name``, ``score``,
  ``max_score``, ``status``, ``output``, ``visibility``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testcases.points import EXERCISES

__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_collection_modifyitems",
    "pytest_runtest_makereport",
    "pytest_terminal_summary",
    "pytest_sessionfinish",
]

GRADED_FILES = ("basic_test.py", "advanced_test.py")
NOT_ATTEMPTED = "not attempted"


@dataclass
class Result:
    exercise: str
    status: str = "passed"  # passed | failed | not attempted | skipped
    output: str = ""


@dataclass
class Gradebook:
    started: float = field(default_factory=time.time)
    results: dict[str, Result] = field(default_factory=dict)  # nodeid -> Result

    def record(self, nodeid: str, exercise: str, report: pytest.TestReport) -> None:
        result = self.results.setdefault(nodeid, Result(exercise))
        if report.skipped and result.status == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result.status, result.output = "skipped", reason
        elif report.failed and result.status in ("passed", "skipped"):
            text = str(report.longrepr)
            result.status = NOT_ATTEMPTED if text.startswith(NOT_ATTEMPTED) else "failed"
            result.output = text[-4000:]

    def scored(self) -> list[tuple[str, Result, float, float]]:
        """(nodeid, result, score, max_score) for every test that ran."""
        ran = [(nodeid, r) for nodeid, r in self.results.items() if r.status != "skipped"]
        per_exercise: dict[str, int] = {}
        for _, r in ran:
            per_exercise[r.exercise] = per_exercise.get(r.exercise, 0) + 1
        rows = []
        for nodeid, r in ran:
            max_score = EXERCISES[r.exercise][0] / per_exercise[r.exercise]
            rows.append((nodeid, r, max_score if r.status == "passed" else 0.0, max_score))
        return rows

    def table(self) -> str:
        rows = self.scored()
        lines = [f"{'exercise':<9}{'title':<52}{'points':>13}  status", "-" * 90]
        total = earned = 0.0
        for ex, (_, title) in EXERCISES.items():
            mine = [row for row in rows if row[1].exercise == ex]
            if not mine:
                continue
            got, top = sum(row[2] for row in mine), sum(row[3] for row in mine)
            statuses = [row[1].status for row in mine]
            passed = statuses.count("passed")
            if passed == len(mine):
                status = "passed"
            elif passed == 0 and all(s == NOT_ATTEMPTED for s in statuses):
                status = NOT_ATTEMPTED
            else:
                status = f"failed ({passed}/{len(mine)} tests pass)"
            lines.append(f"{ex:<9}{title:<52}{got:>6.2f} / {top:<4.0f}  {status}")
            total, earned = total + top, earned + got
        skipped = sum(r.status == "skipped" for r in self.results.values())
        lines.append("-" * 90)
        lines.append(f"{'total':<61}{earned:>6.2f} / {total:<4.0f}" + (f"  ({skipped} skipped)" if skipped else ""))
        return "\n".join(lines)

    def gradescope(self) -> dict:
        tests = [
            {
                "name": f"{r.exercise} {EXERCISES[r.exercise][1]} :: {nodeid.split('::', 1)[-1]}",
                "number": r.exercise,
                "score": round(score, 6),
                "max_score": round(max_score, 6),
                "status": "passed" if r.status == "passed" else "failed",
                "output": r.output if r.status != NOT_ATTEMPTED else r.output.splitlines()[0],
                "visibility": "visible",
            }
            for nodeid, r, score, max_score in self.scored()
        ]
        return {
            "score": round(sum(t["score"] for t in tests), 6),
            "execution_time": round(time.time() - self.started, 2),
            "output": self.table(),
            "visibility": "visible",
            "stdout_visibility": "visible",
            "tests": tests,
        }


def _is_graded(item: pytest.Item) -> bool:
    return item.path.name in GRADED_FILES


def _exercise_of(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("exercise")
    return marker.args[0] if marker and marker.args else None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("grading")
    group.addoption("--impl", help="which student files to load: student | solutions | DIR (sets LORA_IMPL)")
    group.addoption("--ex", help="run the graded tests of an exercise (1.2), a stage (1) or a list (1,2.3)")
    group.addoption("--results-json", help="write Gradescope's results.json here")
    group.addoption(
        "--expect-not-attempted",
        action="store_true",
        help="self-test of the stubs: succeed only if every graded test ran into a stub",
    )


def pytest_configure(config: pytest.Config) -> None:
    if impl := config.getoption("--impl"):
        os.environ["LORA_IMPL"] = impl
    config.stash[_GRADEBOOK] = Gradebook()


_GRADEBOOK = pytest.StashKey[Gradebook]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        if _is_graded(item):
            ex = _exercise_of(item)
            if ex not in EXERCISES:
                problems.append(f"{item.nodeid}: needs @pytest.mark.exercise(id) with an id from testcases/points.py")
    if problems:
        raise pytest.UsageError("\n".join(problems))
    if option := config.getoption("--ex"):
        wanted = [w.strip() for w in option.split(",") if w.strip()]

        def selected(ex: str | None) -> bool:
            return ex is not None and any(ex == w or ex.startswith(w + ".") for w in wanted)

        if bad := [w for w in wanted if not any(selected(ex) for ex in EXERCISES if ex == w or ex.startswith(w + "."))]:
            raise pytest.UsageError(
                f"--ex {','.join(bad)}: no such exercise or stage; choose from {', '.join(EXERCISES)}"
            )
        keep, drop = [], []
        for item in items:
            (keep if _is_graded(item) and selected(_exercise_of(item)) else drop).append(item)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    stub = call.excinfo is not None and call.excinfo.errisinstance(NotImplementedError)
    if _is_graded(item) and report.failed and stub:
        message = str(call.excinfo.value).strip().splitlines()
        report.longrepr = f"{NOT_ATTEMPTED}: {message[0] if message else 'NotImplementedError'}"
    if _is_graded(item):
        item.config.stash[_GRADEBOOK].record(item.nodeid, _exercise_of(item), report)
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    book = config.stash[_GRADEBOOK]
    if not book.results:
        return
    terminalreporter.section("points")
    terminalreporter.write_line(book.table())
    if path := config.getoption("--results-json"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(book.gradescope(), indent=2) + "\n")
        terminalreporter.write_line(f"Gradescope results written to {path}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With --expect-not-attempted, the run succeeds only if every graded test hit a stub."""
    if not session.config.getoption("--expect-not-attempted"):
        return
    results = session.config.stash[_GRADEBOOK].results
    wrong = [f"{nodeid}: {r.status}" for nodeid, r in results.items() if r.status not in (NOT_ATTEMPTED, "skipped")]
    if not results or wrong:
        print("\nThese graded tests did not stop at a stub (a test that can pass on a stub grades nothing):")
        print("\n".join(wrong) if wrong else "no graded test ran")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        session.exitstatus = pytest.ExitCode.OK
