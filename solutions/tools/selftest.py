"""``make test``: every check of the course, run side by side on the cores, with each step's seconds.

    python -m solutions.tools.selftest [--cores 2] [--logs runs/selftest] [STEP ...]

The nine steps (``make help`` and README.md name them) are split into jobs, one process each:
the notebooks one job per notebook, the stress runs one job per combination, ... A small scheduler
keeps the cores busy: a job that is one single-threaded process takes one core; the mutants runner
and the hostile runner judge two things at a time, so they take both cores (the hostile runner's
short time budgets must not compete with another job). The quick checks start first, then the
two-core jobs, then the others, longest first; no job overtakes one that waits for both cores.
Every process runs torch on one thread (``OMP_NUM_THREADS=1``) except the stress run that tests two
threads on purpose. That one counts as one core: the bundled model's operations are too small to
split (measured: 49 s of CPU in 48 s), and its threads wait asleep (stress.py), so the job beside it
does not make it spin.

Each job's output goes to ``runs/selftest/<job>.log``; a failing job's log is printed (its end)
when it fails. At the end a table gives each step's seconds (from its first job's start to its last
job's end, so steps overlap) and CPU seconds; the exit status is 1 if any job failed. Nothing is
skipped when one step fails: the table shows every failure at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from testcases.manifest import REPO

PY = sys.executable
RUFF = str(Path(sys.executable).with_name("ruff"))
PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

STEPS = {
    1: "student files in sync with the reference",
    2: "lint",
    3: "course consistent; reference passes every test (seed +1, traced)",
    4: "the untouched stubs score zero (isolated grader)",
    5: "every mutant is caught, every equivalent keeps full marks",
    6: "hostile submissions get the right score",
    7: "instructor commands: a clone, Gradescope, the handout",
    8: "two threads on the scalar CPU code path (make stress runs more)",
    9: "the notebooks run on the reference (training runs at smoke size)",
}
# Step 3: every test on the reference at seed offset 1, on one thread, torch's native code path (what a one-thread
# stress run would check; the seed the grader uses, 0, meets every graded test in step 7, where the Gradescope
# package grades the reference). The graded tests run traced (solutions/tools/needs.py): each exercise's tests run
# only the code its manifest entry names.
REFERENCE = ["-p", "no:nbmake", "-p", "solutions.tools.needs", "testcases", "--impl", "solutions", "--seed", "1"]
# Every cell of every notebook runs, every plot is drawn; these shorten the runs no lesson figure is asserted on
# (notebooks 04, 05, 06 and 07 assert their training outcomes at the full size only; 05 and 07 then score 100 of the
# evaluation examples) and notebook 07's latency timing.
SMOKE = {
    "COMPARE_STEPS": "20",
    "OPTIMIZER_STEPS": "20",
    "RANK_SWEEP_STEPS": "20",
    "VARIANTS_STEPS": "8",
    "PEFT_FAMILY_STEPS": "8",
    "PEFT_FAMILY_LATENCY_REPEATS": "3",
}


@dataclass
class Job:
    step: int
    name: str  # the log's name, unique
    argv: list[str]
    cores: int = 1  # cores it keeps busy: 2 for a runner that judges two things at a time, or two threads
    cost: float = 10.0  # rough seconds on a quiet 2-core machine: the longest start first
    env: dict[str, str] = field(default_factory=dict)


def module(name: str, *args: str) -> list[str]:
    return [PY, "-m", name, *args]


def stress(threads: int, cap: str) -> list[str]:
    return module("solutions.tools.stress", "--seeds", "1", "--threads", str(threads), "--caps", cap)


def notebook_jobs() -> list[Job]:
    costs = {"01": 6, "02": 15, "03": 8, "04": 20, "05": 30, "06": 30, "07": 10}  # smoke sizes, measured
    run = [*PYTEST, "--nbmake", "--nbmake-timeout=600", "--timeout", "900"]
    env = {"LORA_IMPL": "solutions", **SMOKE}
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    return [
        Job(9, f"notebook-{nb.stem}", [*run, str(nb)], cost=costs.get(nb.stem[:2], 30), env=env) for nb in notebooks
    ]


def jobs() -> list[Job]:
    stubs = ["--impl", "student", "--expect-not-attempted", "--details", "0", "--results", "runs/selftest/stubs.json"]
    return [
        Job(1, "stubs", module("solutions.tools.stubgen", "--check"), cost=1),
        Job(2, "ruff-check", [RUFF, "check", "."], cost=1),
        Job(2, "ruff-format", [RUFF, "format", "--check", "."], cost=1),
        Job(3, "reference", [*PYTEST, *REFERENCE], cost=170),
        Job(4, "stubs-score-zero", module("testcases.grade", *stubs), cost=25),
        # Step 3 runs the reference on every graded test (and fails if it fails): the variants need not again.
        Job(5, "variants", module("solutions.tools.variants", "--jobs", "2", "--reference-checked"), cores=2, cost=210),
        Job(6, "hostile", module("solutions.tools.hostile"), cores=2, cost=100),
        # Not graded, so no grading budget: 600 s per test (a clone graded beside other jobs takes longer than 60 s).
        Job(7, "instructor", [*PYTEST, "-p", "no:nbmake", "solutions/tools", "--timeout", "600"], cost=120),
        # One run varies both: threads and code path (one thread and the native path: steps 3 and 7).
        Job(8, "stress-2-threads-default", stress(2, "default"), cost=50),
        *notebook_jobs(),
    ]


@dataclass
class Run:
    job: Job
    proc: subprocess.Popen
    log: Path
    started: float
    ended: float = 0.0
    cpu: float = 0.0
    status: int | None = None


def start(job: Job, logs: Path) -> Run:
    log = logs / f"{job.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **job.env}
    with open(log, "w") as out:
        proc = subprocess.Popen(job.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return Run(job, proc, log, time.monotonic())


VERDICTS = ("FAILED", "SURVIVED", "LOST", "WRONG", "Error", "error:")  # the lines a runner prints for what went wrong


def tail(path: Path, lines: int = 60) -> str:
    """The end of a log; before it, from a longer log, every line that names something that went wrong."""
    text = path.read_text(errors="replace").splitlines()
    flagged = [line for line in text[:-lines] if any(word in line for word in VERDICTS)][:100]
    return "\n".join("    " + line for line in [*flagged, *(["..."] if flagged else []), *text[-lines:]])


def schedule(todo: list[Job], cores: int, logs: Path, t0: float, running: dict[int, Run]) -> list[Run]:
    """Run every job, never more cores' worth at once than ``cores``; print one line as each ends."""
    # The quick checks first (a lint error shows at once), then the two-core jobs, then the rest, longest first.
    queue = sorted(todo, key=lambda j: (j.cost > 2, -j.cores, -j.cost))
    done: list[Run] = []
    while queue or running:
        free = cores - sum(r.job.cores for r in running.values())
        while queue and (queue[0].cores <= free or not running):  # in order: a two-core job is not overtaken
            job = queue.pop(0)
            run = start(job, logs)
            running[run.proc.pid] = run
            free -= job.cores
        pid, status, usage = os.wait4(-1, 0)
        run = running.pop(pid, None)
        if run is None:
            continue
        run.proc.returncode = os.waitstatus_to_exitcode(status)
        run.ended, run.cpu, run.status = time.monotonic(), usage.ru_utime + usage.ru_stime, run.proc.returncode
        done.append(run)
        word = "ok    " if run.status == 0 else "FAILED"
        print(f"[{run.ended - t0:4.0f} s] {word} {run.job.step}/9 {run.job.name:<28} "
              f"{run.ended - run.started:5.0f} s, {run.cpu:5.0f} s CPU", flush=True)  # fmt: skip
        if run.status != 0:
            print(f"  {run.log.relative_to(REPO) if run.log.is_relative_to(REPO) else run.log}:\n{tail(run.log)}")
    return done


def stop(running: dict[int, Run]) -> None:
    """SIGTERM to each running job's process group (each job leads one)."""
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)


def report(done: list[Run], t0: float) -> bool:
    print(f"\n{'step':<6}{'':<73}{'seconds':>8}{'CPU s':>8}")
    ok = True
    for step, title in STEPS.items():
        mine = [r for r in done if r.job.step == step]
        if not mine:
            continue
        passed = all(r.status == 0 for r in mine)
        ok &= passed
        span = max(r.ended for r in mine) - min(r.started for r in mine)
        cpu = sum(r.cpu for r in mine)
        print(f"{step}/9   {title:<66}{'ok' if passed else 'FAILED':>7}{span:8.0f}{cpu:8.0f}")
    wall, cpu = time.monotonic() - t0, sum(r.cpu for r in done)
    print(f"{'all':<6}{'':<66}{'ok' if ok else 'FAILED':>7}{wall:8.0f}{cpu:8.0f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", type=int, metavar="STEP", help="only these steps (1-9)")
    parser.add_argument("--cores", type=int, default=2, help="cores to keep busy (default 2)")
    parser.add_argument("--logs", type=Path, default=REPO / "runs" / "selftest", help="one log per job")
    args = parser.parse_args(argv)
    if unknown := set(args.steps) - set(STEPS):
        parser.error(f"no step {sorted(unknown)}: the steps are 1-9")
    args.logs.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs() if not args.steps or job.step in args.steps]
    logs = args.logs.relative_to(REPO) if args.logs.is_relative_to(REPO) else args.logs
    print(f"make test: {len(todo)} jobs on {args.cores} cores; each job's output in {logs}/<job>.log", flush=True)
    t0, running = time.monotonic(), {}
    try:
        done = schedule(todo, args.cores, args.logs, t0, running)
    except KeyboardInterrupt:  # the jobs run in sessions of their own: Ctrl-C does not reach them
        stop(running)
        print("interrupted; the running jobs were stopped")
        return 130
    ok = report(done, t0)
    print("make test: " + ("all checks passed" if ok else "SOME CHECKS FAILED (logs above and in runs/selftest/)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
