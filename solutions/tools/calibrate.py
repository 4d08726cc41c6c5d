"""Measure the quantities behind the suites' statistical thresholds over many seeds.

    python -m solutions.tools.calibrate [--seeds 60] [--jobs 2] [--only NAME_SUBSTRING]

The graded tests call ``testcases.helpers.observe(name, value)`` just before asserting on a value
that depends on random draws or on training (a loss drop, an accuracy, a sample standard
deviation). This script runs those tests on the reference with ``--seed 0 … N−1`` (each seed
shifts every seed the tests use), collects the observed values and prints, per quantity, the
minimum, median and maximum. Each threshold in the tests is set well inside that range, and the
comment next to it quotes these numbers; rerun this after changing a test or the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from testcases.manifest import REPO

TESTS = [
    "test_kaiming_init_has_the_right_spread",
    "test_gaussian_init_option",
    "test_dropout_only_on_the_lora_input",
    "test_dropout_rate_and_rescaling",
    "test_get_lora_model_passes_the_init",
    "test_lora_model_trains_on_a_batch",
    "test_absmax_blocks_contain_an_outlier",
    "test_nf4_beats_fp4_and_int4_on_gaussian_weights",
    "test_fake_quantize_blocks_dtype_and_training",
    "test_training_lowers_the_loss_and_keeps_the_base_bit_identical",
    "test_qlora_learns_the_task",
]


def run_seeds(seeds: list[int], tests: list[str], out: Path) -> None:
    env = {**os.environ, "CALIBRATE_OUT": str(out), "OMP_NUM_THREADS": "1"}
    for seed in seeds:
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:nbmake", "--no-header", "-W", "ignore",
             "testcases/basic_test.py", "testcases/advanced_test.py", "--impl", "solutions",
             "--seed", str(seed), "-k", " or ".join(tests)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=False,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="only tests whose name contains this")
    parser.add_argument("--worker", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tests = [t for t in TESTS if args.only in t]
    if args.worker:
        run_seeds(args.worker, tests, Path(args.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"worker{i}.jsonl" for i in range(args.jobs)]
        procs = [
            subprocess.Popen([sys.executable, "-m", "solutions.tools.calibrate", "--only", args.only,
                              "--out", str(out), "--worker", *map(str, range(i, args.seeds, args.jobs))], cwd=REPO)
            for i, out in enumerate(outs)
        ]  # fmt: skip
        for proc in procs:
            proc.wait()
        values: dict[str, list[float]] = {}
        for out in outs:
            if out.exists():
                for line in out.read_text().splitlines():
                    record = json.loads(line)
                    values.setdefault(record["name"], []).append(record["value"])
    print(f"{'quantity':<62}{'n':>4}{'min':>11}{'median':>11}{'max':>11}")
    for name, vals in sorted(values.items()):
        print(f"{name:<62}{len(vals):>4}{min(vals):>11.4g}{statistics.median(vals):>11.4g}{max(vals):>11.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
