"""Scores, statuses, the points table and Gradescope's results.json (pure Python, no torch).

The grader's scoring process uses this module and never runs student code; the in-process
pytest plugin uses it too, so both print the same table.

Points. An exercise's points (testcases/manifest.py) are split among its test *functions*, in
proportion to their weights (``@pytest.mark.exercise("1.2", weight=2)``; default 1), and a
function's share is split equally among its parametrized cases. Everything is counted in
hundredths of a point and split by the largest-remainder rule, so every score shows with two
decimals and the rows add up exactly to the total. A case skipped for a reason outside the
student's control (no GPU) neither earns nor costs points: the shares are computed over the cases
that ran.

Statuses of one test case:
    passed          the test passed
    failed          an assertion or an error (the message says which)
    not attempted   the test ran into the stub of its own exercise
    blocked         it ran into the stub of another exercise (``blocked_by`` names it)
    timed out       it ran longer than its time budget
    crashed         the test process died during it (exit, kill, out of memory)
    not run         the grader did not run it (an earlier test of the exercise hung or crashed, a test
                    of an exercise whose code it runs hung: "blocked by a hang in 1.2", or the overall
                    time budget ran out); the message says which
    skipped         not applicable on this machine (no points either way): the table says why
                    ("CUDA case, no GPU")
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from testcases.manifest import dependencies, dependents, exercises

PASSED, FAILED, NOT_ATTEMPTED, BLOCKED = "passed", "failed", "not attempted", "blocked"
TIMED_OUT, CRASHED, NOT_RUN, SKIPPED = "timed out", "crashed", "not run", "skipped"
STATUSES = (PASSED, FAILED, NOT_ATTEMPTED, BLOCKED, TIMED_OUT, CRASHED, NOT_RUN, SKIPPED)
# How bad a status is, for a test reported in several phases (setup, call, teardown): the worst wins.
SEVERITY = {SKIPPED: 0, PASSED: 1, NOT_ATTEMPTED: 2, BLOCKED: 3, NOT_RUN: 4, FAILED: 5, TIMED_OUT: 6, CRASHED: 7}


@dataclass
class Outcome:
    nodeid: str  # testcases/basic_test.py::test_forward_matches_the_formula[cpu]
    function: str  # the test function's name (its parametrized cases share one weight)
    exercise: str  # "1.2"
    weight: float = 1.0  # the function's weight within its exercise
    status: str = NOT_RUN
    message: str = ""  # what the student reads: one paragraph, no traceback wall
    blocked_by: str | None = None  # BLOCKED: the exercise whose stub stopped the test; NOT_RUN: the one that hung
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Outcome:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        outcome = cls(**known)
        if outcome.status not in STATUSES or outcome.exercise not in exercises():
            raise ValueError(f"not an outcome: {data!r}")
        return outcome


def split_cents(total: int, weights: list[float]) -> list[int]:
    """``total`` hundredths split in proportion to ``weights`` (largest remainder; ties to the first)."""
    if not weights:
        return []
    exact = [total * w / sum(weights) for w in weights]
    cents = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - cents[i]), i))
    for i in order[: total - sum(cents)]:
        cents[i] += 1
    return cents


@dataclass
class ExerciseRow:
    exercise: str
    title: str
    earned: int  # hundredths of a point
    possible: int
    status: str  # passed | failed (k/n tests pass) | not attempted | blocked by 1.1 | no tests ran
    outcomes: list[Outcome]


class Gradebook:
    """Outcomes of the graded tests; the scores, the table and results.json follow from them."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.notes: list[str] = []  # run-level lines the table prints (tampering, crashes of a load, ...)

    def add(self, outcome: Outcome) -> None:
        """Record a phase of a test; a later phase can only make the status worse."""
        old = self.outcomes.get(outcome.nodeid)
        if old is None or SEVERITY[outcome.status] > SEVERITY[old.status]:
            if old is not None:
                outcome.seconds += old.seconds
            self.outcomes[outcome.nodeid] = outcome
        else:
            old.seconds += outcome.seconds

    def cents(self) -> dict[str, tuple[int, int]]:
        """nodeid -> (earned, possible) hundredths, for every test case that counts."""
        table, result = exercises(), {}
        for ex in table:
            counted = [o for o in self.outcomes.values() if o.exercise == ex and o.status != SKIPPED]
            functions: dict[str, list[Outcome]] = {}
            for o in counted:
                functions.setdefault(o.function, []).append(o)
            shares = split_cents(table[ex].points * 100, [cases[0].weight for cases in functions.values()])
            for share, cases in zip(shares, functions.values()):
                for case, possible in zip(cases, split_cents(share, [1.0] * len(cases))):
                    result[case.nodeid] = (possible if case.status == PASSED else 0, possible)
        return result

    def rows(self) -> list[ExerciseRow]:
        cents, rows = self.cents(), []
        for ex, exercise in exercises().items():
            mine = [o for o in self.outcomes.values() if o.exercise == ex]
            if not mine:
                continue
            counted = [o for o in mine if o.status != SKIPPED]
            earned = sum(cents[o.nodeid][0] for o in counted)
            possible = sum(cents[o.nodeid][1] for o in counted)
            rows.append(ExerciseRow(ex, exercise.title, earned, possible, exercise_status(counted), mine))
        return rows

    def earned(self) -> int:
        return sum(earned for earned, _ in self.cents().values())

    def possible(self) -> int:
        return sum(possible for _, possible in self.cents().values())

    def full_marks(self) -> bool:
        return self.possible() > 0 and self.earned() == self.possible()

    def table(self, details: int | str = 0) -> str:
        """The points table. ``details``: "all" (what make grade shows) = the first failing test of each
        exercise with its message, then every other failing test on one line; a number N = the first N
        failing tests with their messages (the rest are in results.json); 0 = none."""
        width = max([len(r.title) for r in self.rows()] + [20])
        lines = [f"{'exercise':<9}{'title':<{width + 2}}{'points':>13}  status", "-" * (width + 40)]
        for row in self.rows():
            points = f"{row.earned / 100:>6.2f} / {row.possible / 100:<5.2f}"
            lines.append(f"{row.exercise:<9}{row.title:<{width + 2}}{points}  {row.status}")
            if details and row.status not in (PASSED, NOT_ATTEMPTED) and not row.status.startswith(BLOCKED):
                lines.extend(_failures([o for o in row.outcomes if o.status not in (PASSED, SKIPPED)], details))
        lines.append("-" * (width + 40))
        total = f"{self.earned() / 100:>6.2f} / {self.possible() / 100:<5.2f}"
        lines.append(f"{'total':<{width + 11}}{total}" + self.skips())
        lines.extend(self.notes)
        return "\n".join(lines)

    def skips(self) -> str:
        """How many test cases did not apply here, and why, for the total's line: (21 skipped: CUDA case, no GPU)."""
        reasons: dict[str, int] = {}
        for o in self.outcomes.values():
            if o.status == SKIPPED:
                reasons[skip_reason(o.message)] = reasons.get(skip_reason(o.message), 0) + 1
        if not reasons:
            return ""
        if len(reasons) == 1:
            return f"  ({sum(reasons.values())} skipped: {next(iter(reasons))})"
        return f"  ({sum(reasons.values())} skipped: " + "; ".join(f"{n} {why}" for why, n in reasons.items()) + ")"

    def results_json(self, execution_time: float) -> dict:
        """Gradescope's results.json: one entry per test case, scores in points with two decimals."""
        cents, table = self.cents(), exercises()
        tests = []
        for o in self.outcomes.values():
            if o.status == SKIPPED:
                continue
            earned, possible = cents[o.nodeid]
            status = o.status if o.status != BLOCKED else f"{BLOCKED} by {o.blocked_by}"
            tests.append(
                {
                    "name": f"{o.exercise} {table[o.exercise].title} :: {o.nodeid.split('::', 1)[-1]}",
                    "number": o.exercise,
                    "score": earned / 100,
                    "max_score": possible / 100,
                    "status": "passed" if o.status == PASSED else "failed",
                    "output": "passed" if o.status == PASSED else _output(status, o.message),
                    "visibility": "visible",
                }
            )
        return {
            "score": self.earned() / 100,
            "execution_time": round(execution_time, 2),
            "output": self.table(),
            "visibility": "visible",
            "stdout_visibility": "visible",
            "tests": tests,
        }


def exercise_status(counted: list[Outcome]) -> str:
    """One word (or a short phrase) for an exercise from the statuses of its counted test cases."""
    if not counted:
        return "skipped here (no test applies on this machine)"
    statuses = [o.status for o in counted]
    passed = statuses.count(PASSED)
    if passed == len(counted):
        return PASSED
    if passed == 0 and NOT_ATTEMPTED in statuses and all(s in (NOT_ATTEMPTED, BLOCKED) for s in statuses):
        return NOT_ATTEMPTED
    if passed == 0 and all(s == BLOCKED for s in statuses):
        by = sorted({o.blocked_by for o in counted if o.blocked_by}, key=_order)
        return f"{BLOCKED} by {', '.join(by)} (still a stub)"
    if passed == 0 and all(o.status == NOT_RUN and o.blocked_by for o in counted):
        return f"{BLOCKED} by a hang in {', '.join(sorted({o.blocked_by for o in counted}, key=_order))}"
    counts = {s: statuses.count(s) for s in (FAILED, TIMED_OUT, CRASHED, NOT_RUN, BLOCKED, NOT_ATTEMPTED)}
    other = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"failed ({passed}/{len(counted)} tests pass; {other})"


def stops_after_a_hang(exercise: str) -> dict[str, tuple[str, str | None]]:
    """After a test of ``exercise`` hangs: every exercise whose remaining tests are not run -> (why, the hung one).

    Its own remaining tests, and those of every exercise whose tests run its code (manifest
    ``dependents``): they would run into the same wall, each burning its own time budget.
    """
    stops: dict[str, tuple[str, str | None]] = {exercise: (f"an earlier test of exercise {exercise} timed out", None)}
    for other in sorted(dependents(exercise), key=_order):
        stops[other] = (
            f"blocked by a hang in {exercise}: this test runs its code, and a test of it timed out",
            exercise,
        )
    return stops


def merge_stops(stopped: dict[str, tuple[str, str | None]], new: dict[str, tuple[str, str | None]]) -> None:
    """Add ``new`` stops to ``stopped``: a stop stays, unless a new one names a hang further upstream."""
    for ex, (why, by) in new.items():
        old = stopped.get(ex)
        if old is None or (old[1] is not None and by is not None and by in dependencies(old[1])):
            stopped[ex] = (why, by)


# The conftest's ``device`` fixture skips the CUDA case of a test where torch sees no GPU with this reason.
CUDA_SKIP = "CUDA is not available"


def skip_reason(message: str) -> str:
    """A skipped test case's reason, short: "CUDA case, no GPU" for the device fixture's skip, else its own first line."""
    if message.startswith(CUDA_SKIP):
        return "CUDA case, no GPU"
    first = message.strip().splitlines()[0] if message.strip() else "no reason given"
    return first if len(first) <= 100 else first[:97] + "..."


def _output(status: str, message: str) -> str:
    """results.json's output of a test that did not pass: its status, then its message (once)."""
    return message if message.startswith(status) else f"{status}: {message}".strip()


def _failures(failing: list[Outcome], details: int | str) -> list[str]:
    """The lines under an exercise's row: failing tests with their messages (see ``Gradebook.table``)."""
    full = 1 if details == "all" else int(details)
    lines = []
    for o in failing[:full]:
        lines.append(_indent(f"✗ {o.nodeid.split('::', 1)[-1]} — {o.status}", 9))
        lines.extend(_indent(line, 11) for line in o.message.strip().splitlines()[:12])
    rest = failing[full:]
    if details == "all":
        for o in rest:
            first = o.message.strip().splitlines()[0] if o.message.strip() else ""
            first = first if len(first) <= 160 else first[:157] + "..."
            lines.append(_indent(f"✗ {o.nodeid.split('::', 1)[-1]} — {o.status}: {first}", 9))
    elif rest:
        lines.append(_indent(f"(+{len(rest)} more failing tests in results.json)", 9))
    return lines


def details_option(value: str) -> int | str:
    """``--details``: "all" or a number of failure messages per exercise (argparse and pytest option type)."""
    if value == "all":
        return value
    if value.isdigit():
        return int(value)
    raise ValueError(f"--details {value!r}: give 'all' or a number (0 = no messages)")


def _order(ex: str) -> tuple[int, ...]:
    return tuple(int(p) for p in ex.split("."))


def _indent(text: str, n: int) -> str:
    return " " * n + text
