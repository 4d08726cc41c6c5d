"""The grading plugin for pytest (registered by ``testcases/conftest.py`` through ``pytest_plugins``).

Options (``pytest testcases/basic_test.py --ex 1.2 --impl solutions``):
    --impl student|solutions|DIR   which student files to load (sets LORA_IMPL; see model/_impl.py)
    --ex 1.2 | 1 | 1,2.3           only the graded tests of these exercises or stages
    --seed N                       shift every seed the tests use by N (grading keeps 0)
    --results-json PATH            write Gradescope's results.json
    --details all | N              failures under each exercise's row (all: the first with its message,
                                   every other one on a line; N: the first N with their messages)
    --sandbox                      close the grading sandbox before the student files load, as
                                   ``make grade`` does (testcases/sandbox.py; the process cannot open it again)
    --expect-not-attempted         self-test of the stubs: succeed only if every graded test stops at a stub

What it does:
- Checks that every graded test carries ``@pytest.mark.exercise("X.Y")`` (optionally ``weight=``)
  with an id from testcases/manifest.py.
- Imports the student files once, before the first test, each within a time limit; a file that
  does not import costs the tests that need it, with one line naming the file and the error.
- In the grader's children (or with ``--sandbox``), closes the sandbox first: a refusal during a
  test fails that test ("this test does not count"), one during an import makes the file not
  importable; the process then ends with ``os._exit``, so nothing runs after the audit hooks go.
- Seeds every test and puts torch's global state back after it; undoes and reports any rebinding of
  what the checks rely on (testcases/integrity.py).
- Classifies each test as data (testcases/scoring.py): passed, failed, not attempted (its own
  exercise's stub), blocked by X.Y (another exercise's stub), timed out, not run (after a hang in
  its exercise or one whose code it runs), ... and prints the points table. ``make grade`` runs the
  same tests in child processes (testcases/grade.py); in that mode (``--report-fd``) this plugin
  only streams events to the grader and prints nothing of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import linecache
import os
import re
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from model import _impl
from testcases import helpers
from testcases.manifest import exercises, files_needed, module_name, select, stage_of
from testcases.scoring import (
    BLOCKED,
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

TESTCASES = Path(__file__).resolve().parent
STUB_MESSAGE = re.compile(r"^Exercise (\d+\.\d+):")
GRADED_MODULES = re.compile(r"^testcases\.stage\d+\.(basic|advanced)$")
BOOK = pytest.StashKey[Gradebook]()
OUTCOME = pytest.StashKey[Outcome]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("grading")
    group.addoption("--impl", help="which student files to load: student | solutions | DIR (sets LORA_IMPL)")
    group.addoption("--ex", help="run the graded tests of an exercise (1.2), a stage (1) or a list (1,2.3)")
    group.addoption("--seed", type=int, default=0, help="shift every seed the tests use by this much (default 0)")
    group.addoption("--results-json", help="write Gradescope's results.json here")
    group.addoption(
        "--details",
        type=details_option,
        default="all",
        help="failures shown per exercise in the table: all (default: the first with its message, the rest one line "
        "each) or a number of messages",
    )
    group.addoption(
        "--expect-not-attempted",
        action="store_true",
        help="self-test of the stubs: succeed only if every graded test ran into a stub",
    )
    group.addoption("--load-timeout", type=float, default=60.0, help="seconds allowed to import each student file")
    group.addoption(
        "--sandbox",
        action="store_true",
        help="close the grading sandbox before the student files load, as make grade does (testcases/sandbox.py): "
        "reads only in this folder and Python's, writes only new files and runs/sandbox/, no programs, no ctypes",
    )
    # For testcases/grade.py's child processes only: the report pipe, the tests to run, files known broken.
    group.addoption("--report-fd", type=int, help=argparse.SUPPRESS)
    group.addoption("--no-sandbox", action="store_true", help=argparse.SUPPRESS)  # grade.py --no-sandbox
    group.addoption("--run-only", help=argparse.SUPPRESS)
    group.addoption("--broken", help=argparse.SUPPRESS)
    group.addoption("--stop-file", help=argparse.SUPPRESS)  # exercises the grader stopped after a hang elsewhere


# ---- configuration and selection -----------------------------------------------------------------


class Events:
    """JSON lines to the grader (child mode), or nothing (in-process)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def emit(self, event: str, **data) -> None:
        if self.fd is not None:
            os.write(self.fd, (json.dumps({"event": event, **data}) + "\n").encode())


EVENTS = pytest.StashKey[Events]()


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    if sandboxed(config) and not config.option.basetemp:
        config.option.basetemp = str(Path.cwd() / DIRECT_SCRATCH / "pytest-tmp")
    if impl := config.getoption("--impl"):
        try:
            _impl.implementation_root(impl)
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None
        os.environ[_impl.ENV] = impl
    helpers.SEED_OFFSET = config.getoption("--seed")
    if "OMP_NUM_THREADS" not in os.environ:
        # The tests' tensors are tiny: more threads only add synchronisation (on 2-core machines we measured
        # the suites 4× slower with 2 threads). Grades never depend on it; OMP_NUM_THREADS=2 tests that.
        import torch

        torch.set_num_threads(1)
    config.stash[BOOK] = Gradebook()
    config.stash[EVENTS] = Events(config.getoption("--report-fd"))
    if config.getoption("--report-fd") is not None:  # the grader prints; keep the child quiet
        config.option.verbose = -1


def sandboxed(config: pytest.Config) -> bool:
    """The grader's children close the sandbox (unless the instructor says --no-sandbox); a direct run does with --sandbox."""
    child = config.getoption("--report-fd") is not None and not config.getoption("--no-sandbox")
    return child or config.getoption("--sandbox")


def is_graded(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    return bool(function and GRADED_MODULES.match(function.__module__))


def exercise_of(item: pytest.Item) -> tuple[str | None, float]:
    marker = item.get_closest_marker("exercise")
    if not marker or len(marker.args) != 1:
        return None, 1.0
    return marker.args[0], float(marker.kwargs.get("weight", 1.0))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    table = exercises()
    problems = []
    for item in items:
        if is_graded(item):
            ex, weight = exercise_of(item)
            if ex not in table or not weight > 0:
                problems.append(f"{item.nodeid}: needs @pytest.mark.exercise(id) with an id from testcases/manifest.py")
            elif stage_of(ex).tests[0].split("/")[1] != item.function.__module__.split(".")[1]:
                problems.append(f"{item.nodeid}: exercise {ex} belongs to another stage's test module")
    if problems:
        raise pytest.UsageError("\n".join(problems))
    keep = items
    if option := config.getoption("--ex"):
        try:
            wanted = set(select(option))
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None
        keep = [item for item in keep if is_graded(item) and exercise_of(item)[0] in wanted]
    if path := config.getoption("--run-only"):
        only = set(json.loads(Path(path).read_text()))
        keep = [item for item in keep if item.nodeid in only]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        return float(marker.args[0])
    value = getattr(item.config.option, "timeout", None) or item.config.getini("timeout")
    return float(value or 0)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Announce the plan (child mode), then import the student files the selected tests need."""
    config, graded = session.config, [item for item in session.items if is_graded(item)]
    plan = []
    for item in graded:
        ex, weight = exercise_of(item)
        plan.append({"nodeid": item.nodeid, "function": item.originalname, "exercise": ex, "weight": weight,
                     "timeout": _timeout_of(item)})  # fmt: skip
    config.stash[EVENTS].emit("plan", tests=plan)
    if path := config.getoption("--broken"):
        for module, reason in json.loads(Path(path).read_text()).items():
            _impl.mark_broken(module, reason)
    import torch._dynamo  # noqa: F401  (imported lazily by the first optimizer; it rebinds torch.manual_seed)

    import model.tiny_llama  # noqa: F401  (given code: loaded before the snapshot, so it is protected)
    import training.data  # noqa: F401
    from testcases.integrity import Guard

    planned = {p["exercise"] for p in plan}
    files = files_needed(planned)
    if sandboxed(config):
        close_sandbox(config, planned)
    guard = Guard(set(_impl.student_modules()))
    session.config.stash[GUARD] = guard
    for file in files:
        load_student_file(config, module_name(file))
    if changed := guard.check():
        from testcases.integrity import describe

        note = f"WARNING: importing the student files rebound {describe(changed)}; undone before the tests ran."
        config.stash[BOOK].notes.append(note)
        config.stash[EVENTS].emit("note", text=note)


GUARD = pytest.StashKey[object]()
REFUSALS = pytest.StashKey[object]()  # the sandbox's list of refusals (testcases/sandbox.py install())
DIRECT_SCRATCH = Path("runs") / "sandbox"  # a direct run's scratch folders under --sandbox
# The tests of these exercises run given code that imports these modules lazily, and their first import
# does what the sandbox refuses (matplotlib runs fc-list to build its font cache for the loss curve, 4.3):
# they are imported before it closes, in the test processes that run those tests.
WARM_UP = {"4.3": ("matplotlib.font_manager",)}


def close_sandbox(config: pytest.Config, planned: set[str]) -> None:
    """Install the grading sandbox (testcases/sandbox.py) with this folder as the sandbox, before any student file loads."""
    from testcases import sandbox

    for ex in sorted(planned):
        for module in WARM_UP.get(ex, ()):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
    import torch  # its first float16 conversion initialises cpuinfo, which reads /proc and /sys: refused once closed

    torch.zeros(1, dtype=torch.float16).float()  # (then every float16 test failed with "Failed to initialize cpuinfo!")
    sandbox.calm_hypothesis()
    here = Path.cwd().resolve()
    tmp = Path(tempfile.gettempdir()).resolve()
    if not tmp.is_relative_to(here):  # a direct run: tempfile's files go to the scratch folder too
        tmp = here / DIRECT_SCRATCH / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = os.environ["TMPDIR"] = str(tmp)
    scratch = [tmp, Path(config.option.basetemp).resolve()]
    home = Path(os.environ.get("HOME", "/")).resolve()
    if home.is_relative_to(here) and home != here:
        scratch.append(home)
    student_files = _impl.implementation_root()  # in the sandbox (the grader's children), or --impl DIR elsewhere
    config.stash[REFUSALS], landlock = sandbox.install(here, scratch, [student_files], config.getoption("--report-fd"))
    if isinstance(landlock, str):  # the kernel offers Landlock but would not restrict this process
        config.stash[EVENTS].emit("note", text=f"the sandbox is the audit hook alone here ({landlock})")


def refusals(config: pytest.Config) -> tuple[str, ...]:
    """What the sandbox refused so far in this process (nothing without the sandbox)."""
    reader = config.stash.get(REFUSALS, None)
    return reader() if reader is not None else ()


class LoadTimeout(BaseException):
    """Raised by the alarm when a student file takes too long to import."""


@contextmanager
def alarm(seconds: float):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def ring(signum, frame):
        raise LoadTimeout()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_student_file(config: pytest.Config, module: str) -> None:
    """Import one student module; on any failure remember why, so tests that need it fail at once."""
    events, relative = config.stash[EVENTS], _impl.student_modules()[module]
    if module in _impl._broken:
        return
    events.emit("load", file=relative)
    state = helpers.torch_global_state()
    error, before = None, len(refusals(config))
    try:
        with alarm(config.getoption("--load-timeout")):
            importlib.import_module(module)
    except _impl.StudentFileMissing:
        error = None  # the finder keeps refusing it; tests report "not attempted"
    except KeyboardInterrupt:
        raise
    except LoadTimeout:
        error = f"{relative} could not be imported: it took more than {config.getoption('--load-timeout'):g} s"
    except BaseException as exc:  # SystemExit too: a student file must not end the run
        error = f"{relative} could not be imported: {describe_exception(exc)}"
    finally:
        helpers.restore_torch_global_state(state)
    if refused := refusals(config)[before:]:  # even if the file caught the PermissionError
        from testcases.sandbox import loading_refused

        error = loading_refused(relative, refused[0])
    if error:
        _impl.mark_broken(module, error)
    events.emit("loaded", file=relative, error=error)


# ---- per test ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _torch_state():
    """Seed every test (0 + --seed) and put torch's global state back afterwards."""
    state = helpers.torch_global_state()
    helpers.seed(0)
    yield
    helpers.restore_torch_global_state(state)


STOPPED = pytest.StashKey[dict]()  # exercise -> (why its remaining tests are not run, the exercise that hung)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """After a test of an exercise times out, its remaining tests and its dependents' are not run (one budget in all).

    In the grader's children the scorer adds what other test processes ran into (``--stop-file``).
    """
    stopped = item.config.stash.setdefault(STOPPED, {})
    if (path := item.config.getoption("--stop-file")) and is_graded(item):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            found = json.loads(Path(path).read_text())
            merge_stops(stopped, {ex: (str(why), by if by in exercises() else None) for ex, (why, by) in found.items()})
    if is_graded(item) and (ex := exercise_of(item)[0]) in stopped:
        pytest.skip(f"{NOT_RUN_PREFIX}{stopped[ex][0]}")


NOT_RUN_PREFIX = "not run: "
REFUSED_BEFORE = pytest.StashKey[int]()  # how many refusals the sandbox had recorded when the test started


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    events = item.config.stash[EVENTS]
    item.stash[REFUSED_BEFORE] = len(refusals(item.config))
    if is_graded(item):
        events.emit("start", nodeid=item.nodeid)
    result = yield
    if is_graded(item) and OUTCOME in item.stash:
        events.emit("end", outcome=item.stash[OUTCOME].to_json())
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    guard = item.config.stash.get(GUARD, None)
    changed = guard.check() if guard is not None else []
    refused = refusals(item.config)[item.stash.get(REFUSED_BEFORE, 0) :]
    if not is_graded(item) or (report.when != "call" and report.passed and not changed and not refused):
        return report  # a passing setup or teardown says nothing about the test
    ex, weight = exercise_of(item)
    outcome = classify(item, call, report, ex)
    if changed or refused:
        outcome.status, outcome.message = FAILED, integrity_message(changed, refused)
        report.outcome, report.longrepr = "failed", outcome.message
    outcome.function, outcome.weight, outcome.seconds = item.originalname, weight, call.duration
    if outcome.status in (NOT_ATTEMPTED, BLOCKED):
        report.longrepr = (
            f"{outcome.status}{' by ' + outcome.blocked_by if outcome.blocked_by else ''}: {outcome.message}"
        )
    stopped = item.config.stash.setdefault(STOPPED, {})
    if outcome.status == NOT_RUN and ex in stopped:
        outcome.blocked_by = stopped[ex][1]
    if outcome.status == TIMED_OUT:
        merge_stops(stopped, stops_after_a_hang(ex))
    book = item.config.stash[BOOK]
    book.add(outcome)
    item.stash[OUTCOME] = book.outcomes[item.nodeid]
    return report


def integrity_message(changed: list[str], refused: tuple[str, ...]) -> str:
    """Why a test does not count: what its code rebound (testcases/integrity.py) or tried past the sandbox."""
    from testcases.integrity import describe

    if refused:
        from testcases.sandbox import refusal_message

        return refusal_message(refused)
    return (
        f"integrity: code run by this test rebound {describe(changed)} (undone); this test does not count. "
        "Student code must not replace functions of torch or of the tests."
    )


def classify(item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport, ex: str) -> Outcome:
    """The status and the student-facing message of one phase of a test, as data."""
    outcome = Outcome(item.nodeid, item.originalname, ex, status=PASSED)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        outcome.status, outcome.message = (NOT_RUN if reason.startswith(NOT_RUN_PREFIX) else SKIPPED), reason
        return outcome
    if not report.failed or call.excinfo is None:
        if report.failed:
            outcome.status, outcome.message = FAILED, str(report.longrepr)[-2000:]
        return outcome
    error = call.excinfo.value
    if isinstance(error, _impl.StudentFileMissing):
        outcome.status, outcome.message = NOT_ATTEMPTED, str(error)
        return outcome
    if isinstance(error, NotImplementedError) and (stub := STUB_MESSAGE.match(str(error))):
        first_line = str(error).strip().splitlines()[0]
        if stub.group(1) == ex:
            outcome.status, outcome.message = NOT_ATTEMPTED, first_line
        else:
            outcome.status, outcome.blocked_by = BLOCKED, stub.group(1)
            outcome.message = f"this test runs Exercise {stub.group(1)}, which is still a stub ({first_line})"
        return outcome
    if type(error).__name__ == "Failed" and str(error).startswith("Timeout"):
        where = student_frame(call.excinfo)
        outcome.status = TIMED_OUT
        outcome.message = f"the test ran longer than {_timeout_of(item):g} s (an endless loop?){where}"
        return outcome
    outcome.status, outcome.message = FAILED, failure_message(call.excinfo)
    return outcome


def student_paths() -> dict[Path, str]:
    """Resolved path of each student file under the current switch -> its name in the course."""
    paths = {}
    for module, relative in _impl.student_modules().items():
        try:
            file = _impl.implementation_file(module)
        except ValueError:
            continue
        if file is not None:
            paths[file.resolve()] = relative
    return paths


def student_frame(excinfo: pytest.ExceptionInfo) -> str:
    """' — in your model/lora.py, line 12, in forward: `code`' for the innermost student frame, or ''."""
    mine = student_paths()
    for entry in reversed(excinfo.traceback):
        path = Path(str(entry.path)).resolve()
        if path in mine:
            code = linecache.getline(str(path), entry.lineno + 1).strip()
            return f"\n  in your {mine[path]}, line {entry.lineno + 1}, in {entry.name}: {code}"
    return ""


def test_frame(excinfo: pytest.ExceptionInfo) -> str:
    for entry in reversed(excinfo.traceback):
        path = Path(str(entry.path))
        if "testcases" in path.parts and path.name not in ("tolerances.py", "helpers.py", "plugin.py"):
            return f"\n  (the check is at testcases/{path.relative_to(TESTCASES).as_posix()}:{entry.lineno + 1})"
    return ""


def failure_message(excinfo: pytest.ExceptionInfo) -> str:
    """What the student reads: the assertion's sentence, or the error and where in their code it arose."""
    error = excinfo.value
    in_student = student_frame(excinfo)
    if isinstance(error, AssertionError) and not in_student:
        return f"{str(error).strip() or 'assertion failed'}{test_frame(excinfo)}"
    if type(error).__name__ == "Failed":
        return str(error).strip()
    notes = "".join(f"\n  {note}" for note in getattr(error, "__notes__", ()))  # a test's hint (add_note)
    return f"{describe_exception(error)}{in_student or test_frame(excinfo)}{notes}"


def describe_exception(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    if isinstance(error, SystemExit):
        return f"the code called sys.exit({error.code!r})"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# ---- the end of the run --------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    book = config.stash[BOOK]
    if not book.outcomes or config.getoption("--report-fd") is not None:
        return
    terminalreporter.section("points")
    terminalreporter.write_line(book.table(details=config.getoption("--details")))
    if path := config.getoption("--results-json"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        elapsed = time.time() - config.stash[STARTED]
        path.write_text(json.dumps(book.results_json(elapsed), indent=2) + "\n")
        terminalreporter.write_line(f"Gradescope results written to {path}")


STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[STARTED] = time.time()  # for results.json's execution_time


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    config.stash[EVENTS].emit("done")
    config.stash[SESSION] = session
    if not config.getoption("--expect-not-attempted"):
        return
    outcomes = config.stash[BOOK].outcomes
    wrong = [f"{o.nodeid}: {o.status}" for o in outcomes.values() if o.status not in (NOT_ATTEMPTED, BLOCKED, SKIPPED)]
    if not outcomes or wrong:
        print("\nThese graded tests did not stop at a stub (a test that can pass on a stub grades nothing):")
        print("\n".join(wrong) if wrong else "no graded test ran")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        session.exitstatus = pytest.ExitCode.OK


SESSION = pytest.StashKey[pytest.Session]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Under the sandbox the process ends here: finalizers that ran later would run after the audit hooks are cleared."""
    if REFUSALS not in config.stash:
        return
    session = config.stash.get(SESSION, None)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(session.exitstatus) if session is not None else 1)
