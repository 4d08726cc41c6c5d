"""``make grade``: score the student files; the scoring process never runs student code.

    python -m testcases.grade [--impl student|solutions|DIR] [--ex 1.2] [--results PATH] [--logs DIR]
                              [--details all|N] [--seed N] [--timeout S] [--budget S] [--jobs N]
                              [--memory GiB] [--no-sandbox]

How a grade is made:
1. The plan. The exercises to grade (``--ex``, default all) are grouped by stage. Each stage gets a
   sandbox: a fresh copy of the given code and the tests (model/, training/, testcases/) and, in
   ``impl/``, copies of the student files only (from this checkout, the reference, or a submission:
   a full clone, whose own tests are ignored, or a folder of loose files), and its scratch folders
   (home, tmp, pytest-tmp). Everything is copied before any student code runs.
2. The runs. Each stage's tests run in a child pytest process (two at a time by default), started
   in its own session behind a small waiting process, with a memory limit, one torch thread, its
   sandbox as working directory, HOME and TMPDIR, and a pipe on which the grading plugin
   (testcases/plugin.py) reports events: the plan, each student file's import, each test's start
   and outcome (as data), and each refusal of the sandbox. Before the student files load, the
   child closes the sandbox (testcases/sandbox.py: an audit hook, and Landlock where the kernel has
   it): student code may read only the sandbox and Python's own folders, write only the scratch
   folders, and may not start programs or call C code; a refusal fails the test during which it
   happened (the scorer's own record, from the pipe, wins over what the child reports), or makes a
   file that was being imported not importable. The scorer keeps the clock: a test that runs past
   its time budget (60 s by default; a test may ask for more) plus a grace period, a student file
   whose import hangs, a child that exits, crashes or is killed — each costs the tests it touches,
   named in one line, and the stage goes on in a new child without them. After a test hangs, its
   exercise's remaining tests are not run, nor those of the exercises that run its code, in any
   stage (a stop file in each sandbox tells the children): a hang costs one budget in all.
   An overall budget bounds the whole run.
3. The score. Outcomes are accepted only for tests in the plan, once each; points come from
   testcases/manifest.py, never from the child. After every child and every process they left
   behind is gone, the scorer prints the table (every failing test: ``--details all``) and writes
   results.json (Gradescope's schema), so nothing a submission writes survives; the children's
   logs go to runs/grade/logs. The exit status is 0 only for full marks.

What this does not stop (see the instructor section of README.md): code that deliberately
reaches into the test process's memory to switch the sandbox off or forge its reports, native
code reading files where the kernel has no Landlock, or a submission that hunts down the scorer's
process to kill it. Run the grader as an unprivileged user in a throwaway container when grades
matter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from model._impl import find_student_file, implementation_root
from testcases.manifest import REPO, STAGES, Stage, exercises, files_needed, select, student_files
from testcases.sandbox import SCRATCH, landlock_abi, loading_refused, python_roots, refusal_message
from testcases.scoring import (
    BLOCKED,
    CRASHED,
    FAILED,
    NOT_ATTEMPTED,
    NOT_RUN,
    PASSED,
    SKIPPED,
    TIMED_OUT,
    Gradebook,
    Outcome,
    details_option,
    merge_stops,
    stops_after_a_hang,
)

GIVEN = ("model", "training", "testcases", "pyproject.toml")  # copied into every sandbox
STOP_FILE = "stopped.json"  # exercises stopped after a hang elsewhere, which each test process reads before a test
STARTUP = 60.0  # extra seconds a test process may take to import torch and collect (given code only) on a busy machine
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "runs")
# The waiting process: it sets the limits the test process inherits, then waits for it. Student code
# that kills its parent (os.getppid()) kills this one, not the scorer.
NANNY = """
import resource, subprocess, sys
for name, value in (("RLIMIT_AS", int(sys.argv[1])), ("RLIMIT_CORE", 0)):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (AttributeError, ValueError, OSError):
        pass  # macOS does not enforce RLIMIT_AS
sys.exit(subprocess.call(sys.argv[2:], close_fds=False))
"""


# ---- the submission ------------------------------------------------------------------------------


def make_sandbox(where: Path, root: Path) -> list[str]:
    """Copy the given code and the student files into ``where``; return the student files not found."""
    for name in GIVEN:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, where / name, ignore=IGNORE)
        else:
            shutil.copy2(source, where / name)
    missing = []
    for relative in student_files():
        found = find_student_file(root, relative)
        if found is None:
            missing.append(relative)
            continue
        target = where / "impl" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, target)
    (where / "impl").mkdir(exist_ok=True)
    for name in SCRATCH:  # HOME, TMPDIR and pytest's --basetemp: the only folders the tests may write
        (where / name).mkdir(exist_ok=True)
    (where / STOP_FILE).write_text("{}")  # there before the test process starts: read-only to it
    return missing


# ---- one child process ---------------------------------------------------------------------------


@dataclass
class Child:
    stage: Stage
    sandbox: Path
    run: list[str]  # node ids this child is asked to run
    broken: dict[str, str]  # module -> reason, refused without running the file again
    log: Path
    process: subprocess.Popen | None = None
    phase: tuple | None = None  # ("load", file, t0) | ("test", nodeid, t0)
    done: bool = False  # the child said it finished its run
    finished: bool = False  # its report pipe is closed
    last_event: float = 0.0
    restarts: int = 0
    reported: set[str] = field(default_factory=set)
    planned: bool = False  # it has reported its plan: before that it runs only given code (imports, collection)


class Scorer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self.root = implementation_root(args.impl)  # the switch's own rule (model/_impl.py); no student code runs
        except ValueError as error:
            raise SystemExit(str(error)) from None
        self.wanted = select(args.ex)
        self.plan: dict[str, dict] = {}  # nodeid -> planned test (function, exercise, weight, timeout)
        self.outcomes: dict[str, Outcome] = {}
        # exercise -> (why its remaining tests are not run, the exercise that hung or None)
        self.stopped: dict[str, tuple[str, str | None]] = {}
        self.refusals: dict[str, str] = {}  # nodeid -> what the sandbox refused during that test
        self.load_refusals: dict[str, str] = {}  # student file -> why it could not be imported
        self.notes: list[str] = []
        self.events: queue.Queue = queue.Queue()
        self.children: list[Child] = []
        self.waiting: list[Child] = []
        self.started = time.monotonic()
        self.budget_spent = False
        self.work = Path(tempfile.mkdtemp(prefix="grade-"))
        self.sandboxes: list[Path] = []
        self.logs = Path(args.logs).resolve()

    # -- setting up -------------------------------------------------------------------------------

    def prepare(self) -> None:
        shutil.rmtree(self.logs, ignore_errors=True)  # this run's logs only
        self.logs.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            mine = [e.id for e in stage.exercises if e.id in self.wanted]
            if not mine:
                continue
            sandbox = self.work / f"stage{stage.number}"
            sandbox.mkdir()
            self.sandboxes.append(sandbox)
            missing = make_sandbox(sandbox, self.root)
            for relative in missing:
                note = f"{relative} is not in {self.root}: its exercises count as not attempted"
                if note not in self.notes:
                    self.notes.append(note)
            self.waiting.append(Child(stage, sandbox, [], {}, self.logs / f"stage{stage.number}.log"))

    def command(self, child: Child, write_fd: int) -> list[str]:
        mine = [e.id for e in child.stage.exercises if e.id in self.wanted]
        cmd = [sys.executable, "-m", "pytest", "testcases/basic_test.py", "testcases/advanced_test.py",
               "--impl", str(child.sandbox / "impl"), "--ex", ",".join(mine), "--seed", str(self.args.seed),
               "--report-fd", str(write_fd), "--timeout", str(self.args.timeout),
               "--basetemp", str(child.sandbox / "pytest-tmp"), "--stop-file", str(child.sandbox / STOP_FILE),
               "--load-timeout", str(self.args.timeout), "-p", "no:cacheprovider", "-p", "no:nbmake",
               "-q", "--no-header", "-rN", "--tb=no", "-W", "ignore::DeprecationWarning"]  # fmt: skip
        if self.args.no_sandbox:
            cmd.append("--no-sandbox")
        if child.run:
            only = child.sandbox / f"run-only-{len(child.reported)}-{time.monotonic_ns()}.json"
            only.write_text(json.dumps(child.run))
            cmd += ["--run-only", str(only)]
        if child.broken:
            broken = child.sandbox / f"broken-{time.monotonic_ns()}.json"
            broken.write_text(json.dumps(child.broken))
            cmd += ["--broken", str(broken)]
        return cmd

    def spawn(self, child: Child) -> None:
        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_", "PYTEST_", "CALIBRATE_"))}
        env.update(PYTHONPATH=str(child.sandbox), HOME=str(child.sandbox / "home"), TMPDIR=str(child.sandbox / "tmp"),
                   MPLBACKEND="Agg", OMP_NUM_THREADS=str(self.args.threads), PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
        with open(child.log, "ab") as log:
            child.process = subprocess.Popen(
                [sys.executable, "-c", NANNY, str(int(self.args.memory * 2**30)), *self.command(child, write_fd)],
                cwd=child.sandbox, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), start_new_session=True,
            )  # fmt: skip
        os.close(write_fd)
        child.last_event = time.monotonic()
        threading.Thread(target=self.read, args=(child, read_fd), daemon=True).start()
        self.children.append(child)

    def read(self, child: Child, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for line in pipe:
                try:
                    self.events.put((child, json.loads(line)))
                except ValueError:
                    self.events.put((child, {"event": "garbage"}))
        self.events.put((child, {"event": "eof"}))

    # -- running ---------------------------------------------------------------------------------

    def run(self) -> Gradebook:
        self.prepare()
        while self.waiting or self.children:
            while self.waiting and len(self.children) < self.args.jobs:
                child = self.waiting.pop(0)
                print(f"  stage {child.stage.number} ({child.stage.title}): running", flush=True)
                self.spawn(child)
            try:
                child, event = self.events.get(timeout=0.2)
                self.handle(child, event)
            except queue.Empty:
                pass
            self.watch()
        return self.gradebook()

    def handle(self, child: Child, event: dict) -> None:
        kind, now = event.get("event"), time.monotonic()
        child.last_event = now
        if kind == "plan":
            child.planned = True
        if kind == "plan" and not child.run:
            for test in event.get("tests", []):
                known = isinstance(test, dict) and "nodeid" in test and test.get("exercise") in exercises()
                if known and exercises()[test["exercise"]] in child.stage.exercises:
                    self.plan.setdefault(test["nodeid"], test)
            child.run = [t for t, p in self.plan.items() if p["exercise"] in {e.id for e in child.stage.exercises}]
        elif kind == "load":
            child.phase = ("load", str(event.get("file")), now)
        elif kind == "loaded":
            child.phase = None
            if event.get("error"):
                self.note(f"stage {child.stage.number}: {event['error']}")
        elif kind == "start":
            child.phase = ("test", str(event.get("nodeid")), now)
        elif kind == "end":
            self.accept(child, event.get("outcome") or {})
            child.phase = None
        elif kind == "note":
            self.note(str(event.get("text"))[:500])
        elif kind == "refused":
            self.refused(child, str(event.get("what"))[:500])
        elif kind == "done":
            child.done = True
        elif kind == "eof":
            child.finished = True

    def refused(self, child: Child, what: str) -> None:
        """The sandbox refused something: it costs the test, or the file being imported, during which it happened.

        The child fails that test itself; the scorer keeps its own record from the pipe, written before
        the student code could catch the error, and applies it to what the child reports.
        """
        phase, stage = child.phase, child.stage.number
        if phase and phase[0] == "test":
            self.refusals.setdefault(phase[1], what)
        elif phase and phase[0] == "load":
            self.load_refusals.setdefault(phase[1], loading_refused(phase[1], what))
            self.note(f"stage {stage}: {self.load_refusals[phase[1]]}")
        else:
            self.note(f"stage {stage}: between tests, student code tried to {what}, which the grading sandbox refused")

    def accept(self, child: Child, data: dict) -> None:
        """Take a child's outcome only for a planned test of its stage, once; points come from the plan."""
        nodeid = data.get("nodeid")
        planned = self.plan.get(nodeid)
        if planned is None or nodeid not in child.run or nodeid in self.outcomes:
            return
        try:
            reported = Outcome.from_json(data)
        except (TypeError, ValueError):
            return
        outcome = Outcome(nodeid, planned["function"], planned["exercise"], float(planned["weight"]),
                          reported.status, reported.message[:4000], reported.blocked_by, reported.seconds)  # fmt: skip
        broken = [why for file, why in self.load_refusals.items() if file in files_needed([outcome.exercise])]
        if (
            nodeid in self.refusals
            and outcome.status not in (TIMED_OUT, CRASHED)
            and not outcome.message.startswith("integrity:")
        ):
            outcome.status, outcome.message = FAILED, refusal_message([self.refusals[nodeid]])
        elif broken and outcome.status == PASSED:
            outcome.status, outcome.message = FAILED, broken[0]
        if outcome.blocked_by is not None and outcome.blocked_by not in exercises():
            outcome.blocked_by = "?"
        self.outcomes[nodeid] = outcome
        child.reported.add(nodeid)
        if outcome.status == TIMED_OUT:
            self.stop(stops_after_a_hang(outcome.exercise))

    def stop(self, stops: dict[str, tuple[str, str | None]]) -> None:
        """Keep these exercises' remaining tests out, here and in every test process (their stop files)."""
        merge_stops(self.stopped, stops)
        text = json.dumps(self.stopped)
        for sandbox in self.sandboxes:
            tmp = self.work / f"stopped-{sandbox.name}.json"  # written beside the sandbox, then moved in whole
            tmp.write_text(text)
            os.replace(tmp, sandbox / STOP_FILE)

    def watch(self) -> None:
        now = time.monotonic()
        if now - self.started > self.args.budget:
            for child in list(self.children):
                self.kill(child)
                self.children.remove(child)
            self.waiting.clear()
            self.budget_spent = True
            return
        for child in list(self.children):
            phase = child.phase
            if phase and phase[0] == "test":
                budget = float(self.plan.get(phase[1], {}).get("timeout") or self.args.timeout) + self.args.grace
                if now - phase[2] > budget:
                    self.finish(child, f"killed after {now - phase[2]:.0f} s (its budget is {budget - self.args.grace:g} s): "
                                "an endless loop, or code that blocks the test's own timer?")  # fmt: skip
                    continue
            if phase and phase[0] == "load" and now - phase[2] > self.args.timeout + self.args.grace:
                self.finish(child, f"{phase[1]} could not be imported: it took more than {self.args.timeout:g} s")
                continue
            if child.finished:  # the report pipe is closed: the test process is done or dead
                self.finish(child, "")
            elif child.done and now - child.last_event > 5:
                self.finish(child, "")  # it finished but something it started still holds the pipe
            elif not phase and now - child.last_event > self.args.timeout + self.args.grace + (
                0 if child.planned else STARTUP
            ):
                self.finish(child, "")  # silent between tests for too long (or at start-up, on a very busy machine)

    def finish(self, child: Child, why: str) -> None:
        """The child is gone (or must go): account for what it was doing, then restart its stage if needed."""
        if child.finished and not why:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=3)  # its pipe closed: let the waiting process report the exit status
        code = child.process.poll()
        self.kill(child)
        if child in self.children:
            self.children.remove(child)
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        if child.done and code is not None and code < 0:
            self.note(f"stage {child.stage.number}: the grader's waiting process was killed ({how}); the tests ran on")
        phase, child.phase = child.phase, None
        if phase and phase[0] == "test" and phase[1] in self.plan and phase[1] not in self.outcomes:
            nodeid, planned = phase[1], self.plan[phase[1]]
            status = TIMED_OUT if why else CRASHED
            text = why or (
                f"the test process {how} during this test (sys.exit, os._exit, a kill, or memory beyond the "
                f"{self.args.memory:g} GiB limit?)"
            )
            self.outcomes[nodeid] = Outcome(
                nodeid, planned["function"], planned["exercise"], float(planned["weight"]), status, text
            )
            ex = planned["exercise"]
            self.stop(
                stops_after_a_hang(ex)
                if status == TIMED_OUT
                else {ex: (f"an earlier test of exercise {ex} ended the test process", None)}
            )
        elif phase and phase[0] == "load":
            module = phase[1].removesuffix(".py").replace("/", ".")
            child.broken[module] = why or f"{phase[1]} could not be imported: the test process {how} while importing it"
            self.note(f"stage {child.stage.number}: {child.broken[module]}")
        elif not child.done:
            self.note(f"stage {child.stage.number}: the test process {how} between tests; the rest ran in a new one")
        if not child.run:
            self.note(
                f"stage {child.stage.number}: the test process {how} before it reported its tests; see {child.log}"
            )
            return
        remaining = []
        for nodeid in (t for t in child.run if t not in self.outcomes):
            planned = self.plan[nodeid]
            if planned["exercise"] in self.stopped:
                why, by = self.stopped[planned["exercise"]]
                self.outcomes[nodeid] = Outcome(nodeid, planned["function"], planned["exercise"], float(planned["weight"]),
                                                NOT_RUN, f"not run: {why}", by)  # fmt: skip
            else:
                remaining.append(nodeid)
        if remaining and not child.done:
            if child.restarts >= 50:
                self.note(f"stage {child.stage.number}: gave up after 50 restarts")
                return
            again = Child(
                child.stage, child.sandbox, remaining, dict(child.broken), child.log, restarts=child.restarts + 1
            )
            self.waiting.insert(0, again)

    def kill(self, child: Child) -> None:
        if child.process and child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        elif child.process:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)  # the child may outlive its waiting process

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- the result ------------------------------------------------------------------------------

    def gradebook(self) -> Gradebook:
        book = Gradebook()
        spent = self.budget_spent
        for nodeid, planned in self.plan.items():
            outcome = self.outcomes.get(nodeid)
            if outcome is None:
                why = (
                    f"the overall time budget ({self.args.budget:g} s) ran out"
                    if spent
                    else "the test process never reported it"
                )
                outcome = Outcome(
                    nodeid,
                    planned["function"],
                    planned["exercise"],
                    float(planned["weight"]),
                    NOT_RUN,
                    f"not run: {why}",
                )
            book.add(outcome)
        for stage in STAGES:  # a stage whose child never reported a plan still shows, with no points
            if any(e.id in self.wanted for e in stage.exercises) and not any(
                p["exercise"].split(".")[0] == str(stage.number) for p in self.plan.values()
            ):
                for e in stage.exercises:
                    if e.id in self.wanted:
                        book.add(Outcome(f"stage{stage.number}::{e.id}", e.id, e.id, 1.0, CRASHED,
                                         "the test process ended before it reported its tests (see the log)"))  # fmt: skip
        book.notes = [f"note: {n}" for n in self.notes]
        return book

    def cleanup(self) -> None:
        for child in self.children:
            self.kill(child)
        reap_orphans()
        shutil.rmtree(self.work, ignore_errors=True)


# ---- processes left behind (Linux) -----------------------------------------------------------------


def become_subreaper() -> None:
    """Orphaned descendants (a daemon a submission forked off) are re-parented to the scorer, which kills them."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    me = str(os.getpid())
    for _ in range(5):
        found = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:  # ppid
                found = True
                try:
                    os.kill(int(stat.parent.name), signal.SIGKILL)
                    os.waitpid(int(stat.parent.name), 0)
                except (ProcessLookupError, ChildProcessError, PermissionError):
                    pass
        if not found:
            return


# ---- the command line -------------------------------------------------------------------------------


def sandbox_mode(args: argparse.Namespace) -> str:
    """How the test processes are confined (testcases/sandbox.py), for the first line of the output."""
    if args.no_sandbox:
        return "NOT sandboxed (--no-sandbox)"
    return (
        "sandboxed (audit hook + Landlock)" if landlock_abi() else "sandboxed (audit hook; this kernel has no Landlock)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testcases.grade", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--impl", default="student", help="student (default) | solutions | DIR (a clone or loose files)"
    )
    parser.add_argument("--ex", default="", help="an exercise (1.2), a stage (1) or a list (1,2.3); default: all")
    parser.add_argument("--results", default="runs/grade/results.json", help="where to write Gradescope's results.json")
    parser.add_argument("--seed", type=int, default=0, help="shift every seed the tests use (grading keeps 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per test (a test may ask for more)")
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds past a test's budget before its process is killed"
    )
    parser.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--jobs", type=int, default=2, help="stages graded at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per test process")
    parser.add_argument("--memory", type=float, default=6.0, help="GiB of address space per test process")
    parser.add_argument("--logs", default="runs/grade/logs", help="where the test processes' logs go (this run's only)")
    parser.add_argument(
        "--details",
        type=details_option,
        default="all",
        help="failures shown per exercise: all (default: the first with its message, every other one on a line) "
        "or a number of messages (0: none)",
    )
    parser.add_argument("--expect-not-attempted", action="store_true", help="self-test: every test must stop at a stub")
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run the tests without the audit-hook sandbox (testcases/sandbox.py), to measure its cost or to see "
        "a hostile case's escape succeed; never for grades",
    )
    args = parser.parse_args(argv)
    try:
        select(args.ex)
    except ValueError as error:
        parser.error(str(error))
    results = Path(args.results)
    become_subreaper()
    scorer = Scorer(args)
    print(f"Grading {scorer.root if args.impl not in ('student', 'solutions') else args.impl + ' files'}: "
          f"each stage in its own process, {sandbox_mode(args)}, {args.timeout:g} s per test, "
          f"{args.budget:g} s in all", flush=True)  # fmt: skip
    if exposed := [root for root in python_roots() if REPO.resolve().is_relative_to(root)]:
        scorer.note(f"the Python installation {exposed[0]} contains this checkout: submissions may read all of it")
    try:
        book = scorer.run()
    finally:
        scorer.cleanup()
    elapsed = time.monotonic() - scorer.started
    print(book.table(details=args.details))
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(results.name + ".tmp")
    tmp.write_text(json.dumps(book.results_json(elapsed), indent=2) + "\n")
    os.replace(tmp, results)
    print(f"results.json (Gradescope) written to {results}; test process logs in {scorer.logs}")
    if args.expect_not_attempted:
        wrong = [o for o in book.outcomes.values() if o.status not in (NOT_ATTEMPTED, BLOCKED, SKIPPED)]
        for o in wrong[:20]:
            print(f"did not stop at a stub: {o.nodeid}: {o.status}: {o.message[:200]}")
        return 1 if wrong or not book.outcomes else 0
    return 0 if book.full_marks() else 1


if __name__ == "__main__":
    sys.exit(main())
