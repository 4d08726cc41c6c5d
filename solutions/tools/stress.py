"""``make stress``: the reference must pass every graded test under other seeds, thread counts and CPU code paths.

    python -m solutions.tools.stress [--seeds 10] [--threads 1 2] [--caps native default avx2 avx512]

For each CPU capability, each seed offset k = 1 … N (``--seed k`` shifts every seed the tests use:
the global seed of each test, the tests' own generators and the trainer's seed) and each torch
thread count, the graded suites run on the reference in one pytest process. One line per
combination; exit 1 if any fails. ``make test`` runs one offset.

A capability is torch's ``ATEN_CPU_CAPABILITY``: which of its CPU kernels run (``default`` is the
scalar code, what torch runs on CPUs without AVX2, and on many ARM CPUs; ``avx2``; ``avx512``).
``native`` leaves the variable unset (torch picks the best this CPU has). A capability this CPU
lacks is skipped, and said so; so is a named one that is the native choice (the same code path).
Passing here is necessary, not sufficient: another CPU model can round differently at the same
capability, so no test may compare floats with another machine's results except within a derived
bound (testcases/tolerances.py). ../shared/tools/seed-shift is an independent check of the same kind.

The combinations run one after another: two torch processes with two threads each on two cores spin
against each other and run many times slower. A two-thread run sets ``OMP_WAIT_POLICY=PASSIVE``
(unless set): OpenMP's threads then sleep while they wait instead of spinning, which changes no
result (the work is split the same way) but keeps one other busy process on the machine from
slowing the run tenfold (measured: 195 s and a timeout instead of 26 s for the QLoRA headline test, then 120 steps). Numerics are the point here, not speed, so each test
may take up to 900 s (grading keeps its 60 s budget).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

from testcases.manifest import REPO

CAPABILITIES = ("native", "default", "avx2", "avx512")


def capability_seen(cap: str) -> str:
    """The capability torch reports when started with ``ATEN_CPU_CAPABILITY=cap`` (unset for native)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if cap != "native":
        env["ATEN_CPU_CAPABILITY"] = cap
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def usable(caps: list[str]) -> list[str]:
    """The capabilities of ``caps`` that run a code path of their own here; prints why any other is skipped."""
    native, chosen = capability_seen("native"), []
    for cap in dict.fromkeys(caps):
        seen = native if cap == "native" else capability_seen(cap)
        if cap != "native" and seen != cap.upper():
            print(f"capability {cap}: not available on this CPU (torch runs {seen}): skipped", flush=True)
        elif cap != "native" and "native" in caps and seen == native:
            print(f"capability {cap}: this CPU's own ({native}), the same code path as native: run once", flush=True)
        else:
            chosen.append(cap)
    return chosen


def run(cap: str, seed: int, threads: int) -> tuple[bool, list[str]]:
    """The graded suites on the reference under one combination: (passed, the FAILED lines)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if threads > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # waiting threads sleep, not spin (see above)
    if cap != "native":
        env["ATEN_CPU_CAPABILITY"] = cap
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:nbmake", "--no-header", "-rf", "--tb=line",
         "testcases/basic_test.py", "testcases/advanced_test.py", "--impl", "solutions", "--seed", str(seed),
         "--details", "0", "--timeout", "900"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    return proc.returncode == 0, [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seed offsets 1 … N")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument(
        "--caps", nargs="+", default=list(CAPABILITIES), choices=CAPABILITIES, metavar="CAP",
        help=f"torch CPU capabilities (ATEN_CPU_CAPABILITY): {', '.join(CAPABILITIES)} (native: unset)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started, failed, total = time.monotonic(), 0, 0
    for cap in usable(args.caps):
        label = "" if cap == "native" else f", capability {cap}"
        for seed in range(1, args.seeds + 1):
            for threads in args.threads:
                t0, cpu0 = time.monotonic(), children_cpu()
                ok, failures = run(cap, seed, threads)
                failed, total = failed + (not ok), total + 1
                seconds, cpu = time.monotonic() - t0, children_cpu() - cpu0
                verdict = "ok" if ok else "FAILED"
                print(
                    f"seed +{seed:<3} {threads} thread(s){label}: {verdict} ({seconds:.0f} s, {cpu:.0f} s CPU)",
                    flush=True,
                )
                if not ok:
                    print("    " + "\n    ".join(failures[:10]))
    print(f"{total - failed} of {total} combinations pass ({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
