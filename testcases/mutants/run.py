"""Run the graded suites against every mutant; exit 1 if any mutant survives.

    python -m testcases.mutants.run               all mutants (two worker processes)
    python -m testcases.mutants.run NAME [NAME]   only these
    python -m testcases.mutants.run --list        the catalogue

Each mutant is the reference with its replacements applied, written to a temporary directory
that holds all three student files (LORA_IMPL points there). A mutant is caught when at least
one graded test fails; the first failing test is printed, so you can see *which* test caught
it. Workers run pytest in-process, one mutant after another, so torch is imported once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from model._impl import REPO, STUDENT_MODULES
from testcases.mutants import Mutant
from testcases.mutants.lora_mutants import MUTANTS as LORA_MUTANTS
from testcases.mutants.quant_mutants import MUTANTS as QUANT_MUTANTS
from testcases.mutants.trainer_mutants import MUTANTS as TRAINER_MUTANTS

CATALOGUE: list[Mutant] = [*LORA_MUTANTS, *QUANT_MUTANTS, *TRAINER_MUTANTS]
# Which stages' tests exercise each student file (the trainer's tests use all three files).
STAGES = {"model/lora.py": "1,2,4", "model/quant.py": "3,4", "training/qlora_trainer.py": "4"}


class _FirstFailure:
    """A pytest plugin that remembers the first failing test."""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.collection_error: list[str] = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_error = str(report.longrepr).strip().splitlines()[-1:]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and self.failed is None:
            message = str(report.longrepr).strip().splitlines()
            self.failed = f"{report.nodeid.split('::', 1)[-1]}: {message[-1][:90] if message else ''}"


def run_mutant(mutant: Mutant) -> tuple[bool, str]:
    """(caught, first failing test or why it survived), running pytest in this process."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        for relative in STUDENT_MODULES.values():
            source = (REPO / "solutions" / relative).read_text()
            target = Path(tmp) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(mutant.apply(source) if relative == mutant.file else source)
        for module in STUDENT_MODULES:  # forget the previous mutant's modules
            sys.modules.pop(module, None)
        os.environ["LORA_IMPL"] = tmp
        recorder = _FirstFailure()
        args = ["-x", "-q", "--no-header", "-p", "no:nbmake", "-W", "ignore", "--impl", tmp]
        args += ["--ex", STAGES[mutant.file], "testcases/basic_test.py", "testcases/advanced_test.py"]
        with open(os.devnull, "w") as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                code = pytest.main(args, plugins=[recorder])
            finally:
                sys.stdout = stdout
    if code == pytest.ExitCode.TESTS_FAILED and recorder.failed:
        if "NameError" in recorder.failed:  # the mutant itself is broken, not caught by a test
            return False, f"the mutant's code raises NameError, fix the mutant: {recorder.failed}"
        return True, recorder.failed
    if code == pytest.ExitCode.OK:
        return False, "every graded test passed"
    return False, f"pytest exited with {code!r} {recorder.collection_error}"


def worker(names: list[str]) -> int:
    survivors = 0
    for mutant in [m for m in CATALOGUE if m.name in names]:
        caught, detail = run_mutant(mutant)
        survivors += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {mutant.name:<34} {detail}", flush=True)
    return survivors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the graded suites against every mutant.")
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for m in CATALOGUE:
            print(f"{m.file:<28}{m.name:<34}{m.mistake}")
        return 0
    if unknown := set(args.names) - {m.name for m in CATALOGUE}:
        print(f"unknown mutants: {sorted(unknown)}")
        return 2
    names = args.names or [m.name for m in CATALOGUE]
    if args.worker:
        return 1 if worker(names) else 0
    for m in CATALOGUE:  # a drifted anchor is a broken catalogue, not a survivor: say so up front
        if m.name in names:
            m.apply((REPO / "solutions" / m.file).read_text())
    shards = [names[i :: args.jobs] for i in range(args.jobs)]
    # One thread per worker: two workers with two OpenMP threads each on two cores spin-wait
    # against each other and run many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "testcases.mutants.run", "--worker", *shard], cwd=REPO, env=env)
        for shard in shards
        if shard
    ]
    failed = sum(proc.wait() != 0 for proc in procs)
    print(f"{len(names)} mutants run; " + ("every one caught" if not failed else "SOME SURVIVED (see above)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
