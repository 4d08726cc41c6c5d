"""``make stress``: the reference must pass every graded test under other seeds and thread counts.

    python -m solutions.tools.stress [--seeds 10] [--threads 1 2]

For each seed offset k = 1 … N (``--seed k`` shifts every seed the tests use: the global seed of each
test, the tests' own generators and the trainer's seed) and each torch thread count, the graded
suites run on the reference in one pytest process. One line per combination; exit 1 if any fails.
``make test`` runs one offset; ../shared/tools/seed-shift is an independent check of the same kind.
The combinations run one after another: two torch processes with two threads each on two cores spin
against each other and run many times slower. Numerics are the point here, not speed, so each test
may take up to 900 s (grading keeps its 60 s budget).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from testcases.manifest import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seed offsets 1 … N")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    args = parser.parse_args(argv)
    started, failed = time.monotonic(), 0
    for seed in range(1, args.seeds + 1):
        for threads in args.threads:
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:nbmake", "--no-header", "-rf", "--tb=line",
                 "testcases/basic_test.py", "testcases/advanced_test.py", "--impl", "solutions", "--seed", str(seed),
                 "--details", "0", "--timeout", "900"],
                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True,
            )  # fmt: skip
            ok = proc.returncode == 0
            failed += not ok
            print(
                f"seed +{seed:<3} {threads} thread(s): {'ok' if ok else 'FAILED'} ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            if not ok:
                lines = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
                print("    " + "\n    ".join(lines[:10]))
    total = args.seeds * len(args.threads)
    print(f"{total - failed} of {total} combinations pass ({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
