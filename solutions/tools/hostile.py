"""Grade every hostile submission (solutions/hostile/cases.py) with the isolated grader and check the scores.

    python -m solutions.tools.hostile [NAME ...] [--jobs 2]

For each case: the reference (or a named mutant) with the hostile code added is written to a
temporary folder and graded by ``python -m testcases.grade`` on the exercises the case checks, with
short budgets (3 s per test, 2 s of grace); where a case expects "twin" scores, the same files
without the hostile part are graded too (once for all the cases that share those files). Checked:
the scorer survives and writes its own results.json (nothing the submission wrote survives, not
even later), the per-exercise points match, no process of the submission outlives
the grader, and each case finishes within its time. A case that tries a way out of the grading
sandbox is also graded with the sandbox off (``--no-sandbox``), where it must earn more than its
twin: the way out is real, and the sandbox is what shuts it. A case that only the kernel's Landlock
can stop is skipped, and the skip printed, on a kernel without it. Prints one line per case: name,
seconds, points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from solutions.hostile.cases import CASES, Hostile
from solutions.tools.variants import catalogue
from testcases.manifest import REPO, exercises, student_files
from testcases.sandbox import landlock_abi

FAST = ["--timeout", "3", "--grace", "2", "--budget", "150", "--jobs", "1", "--details", "0"]


def write_submission(folder: Path, case: Hostile, hostile: bool) -> None:
    mutants = {m.name: m for m in catalogue("mutants")}
    for relative in student_files():
        text = (REPO / "solutions" / relative).read_text()
        if case.base_mutant and mutants[case.base_mutant].file == relative:
            text = mutants[case.base_mutant].apply(text)
        if hostile and relative == case.file:
            text = case.variant().apply(text) + ("\n\n" + case.append if case.append else "")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def grade(folder: Path, ex: str, *extra: str) -> tuple[dict[str, float], dict, float, int]:
    """(points per exercise, results.json, seconds, exit status) of the isolated grader on ``folder``."""
    results = folder / "out" / "results.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "testcases.grade", "--impl", str(folder), "--ex", ex,
                           "--results", str(results), "--logs", str(results.parent / "logs"), *FAST, *extra],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    seconds = time.monotonic() - started
    data = json.loads(results.read_text()) if results.exists() else {}
    points: dict[str, float] = {}
    for test in data.get("tests", []):
        points[test.get("number", "?")] = round(points.get(test.get("number", "?"), 0.0) + test["score"], 2)
    return points, data, seconds, proc.returncode


_twins: dict[tuple[str | None, str], dict[str, float]] = {}
_twin_locks: dict[tuple[str | None, str], threading.Lock] = {}


def twin_points(case: Hostile) -> dict[str, float]:
    """Points per exercise of the case's files without the hostile part: the reference, or its base mutant.

    Those files are the same for every case with the same base and exercises, so each such twin is graded once.
    """
    key = (case.base_mutant, case.ex)
    with _twin_locks.setdefault(key, threading.Lock()):  # setdefault: one lock per key, whichever thread asks first
        if key not in _twins:
            with tempfile.TemporaryDirectory(prefix=f"hostile-twin-{case.name}-") as tmp:
                write_submission(Path(tmp) / "twin", case, hostile=False)
                _twins[key] = grade(Path(tmp) / "twin", case.ex)[0]
        return _twins[key]


def run_case(case: Hostile) -> tuple[bool | None, str]:
    """(True, details) if the case scores as expected, (False, problems), or (None, why) if it cannot run here."""
    if case.needs_landlock and not landlock_abi():
        return (
            None,
            "skipped: this kernel has no Landlock, so native code in a submission can read outside its sandbox here",
        )
    with tempfile.TemporaryDirectory(prefix=f"hostile-{case.name}-") as tmp:
        folder = Path(tmp) / "submission"
        write_submission(folder, case, hostile=True)
        points, data, seconds, code = grade(folder, case.ex)
        time.sleep(7 if case.name == "daemon_writes_later" else 0)  # let a forked daemon try its late write
        problems = []
        after = (
            json.loads((folder / "out" / "results.json").read_text())
            if (folder / "out" / "results.json").exists()
            else {}
        )
        if not data or "output" not in data or after != data:
            problems.append("results.json is missing, not the grader's, or changed after the grader finished")
        logs = "".join(log.read_text(errors="replace") for log in (folder / "out" / "logs").glob("*.log"))
        if case.log_says and case.log_says not in logs:
            problems.append(f"the hostile code never printed {case.log_says!r}: its attack did not run as designed")
        if data and abs(sum(t["score"] for t in data["tests"]) - data["score"]) > 1e-9:
            problems.append("results.json's score is not the sum of its tests")
        twin = twin_points(case) if "twin" in case.expect.values() or case.escapes else {}
        if case.escapes:  # the way out is real: with the sandbox off, the same files earn more than their twin
            free_folder = Path(tmp) / "unsandboxed"
            write_submission(free_folder, case, hostile=True)
            free, _, _, _ = grade(free_folder, case.ex, "--no-sandbox")
            gained, honest = (round(sum(points.get(ex, 0.0) for ex in case.expect), 2) for points in (free, twin))
            if gained <= honest:
                problems.append(
                    f"with the sandbox off it earns {gained}, no more than its twin's {honest}: no real escape"
                )
        for ex, want in case.expect.items():
            got = points.get(ex)
            full = float(exercises()[ex].points)
            if want == "twin":
                want = twin.get(ex)
            if want == "less":
                if got is None or got >= full:
                    problems.append(f"{ex}: {got} points, expected fewer than {full:g}")
            elif got is None or abs(got - float(want)) > 1e-9:
                problems.append(f"{ex}: {got} points, expected {want}")
        if code == 0 and any(v != exercises()[k].points for k, v in points.items()):
            problems.append("the grader exited 0 without full marks")
        if seconds > case.max_seconds:
            problems.append(f"took {seconds:.0f} s, more than {case.max_seconds:g} s")
        summary = ", ".join(f"{ex} {points.get(ex, '-')}" for ex in case.expect)
        detail = f"{seconds:5.1f} s  {summary}"
        return not problems, detail + ("" if not problems else "  PROBLEMS: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.names or c.name in args.names]
    started = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = list(pool.map(run_case, cases))
    for case, (ok, detail) in zip(cases, outcomes):
        print(f"{'skip  ' if ok is None else 'ok    ' if ok else 'WRONG '} {case.name:<30} {detail}")
    bad, skipped = sum(ok is False for ok, _ in outcomes), sum(ok is None for ok, _ in outcomes)
    print(f"{len(cases) - skipped} hostile submissions graded in {time.monotonic() - started:.0f} s"
          + (f" ({skipped} skipped)" if skipped else "") + "; "
          + ("every score right" if not bad else f"{bad} WRONG"))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
