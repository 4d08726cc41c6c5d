"""``make gradescope``: the autograder zip in Gradescope's layout.

    python -m solutions.tools.gradescope DEST      writes DEST/autograder.zip

Gradescope unzips the archive into /autograder/source, runs ``setup.sh`` once when it builds the
image, and for every submission runs ``run_autograder``, which must write
/autograder/results/results.json; the student's files are in /autograder/submission (loose, or in
a copy of the repository: the grader finds model/lora.py or lora.py either way). Pick a base image
with Python 3.11 or newer (Ubuntu 24.04). The archive holds
the handout (no solutions/), so a student who downloads the autograder learns nothing new.
``AUTOGRADER_ROOT`` (default /autograder) lets a test run ``run_autograder`` against a local
stand-in of that tree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

from solutions.tools.handout import build

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, while it builds the autograder image; the course is in /autograder/source.
# Choose a base image with Python >= 3.11 (Ubuntu 24.04 ships 3.12): the pinned numpy has no 3.10 wheels.
set -euo pipefail
apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip
cd /autograder/source
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -r requirements.txt
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission; it writes $ROOT/results/results.json (Gradescope's schema).
# The grader never runs student code in its own process: see testcases/grade.py.
set -uo pipefail
ROOT=${AUTOGRADER_ROOT:-/autograder}
cd "$ROOT/source"
mkdir -p "$ROOT/results"
.venv/bin/python -m testcases.grade --impl "$ROOT/submission" --results "$ROOT/results/results.json"
exit 0  # the score is in results.json; a non-zero exit would only mark the run as errored
"""


def build_zip(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "autograder.zip"
    with tempfile.TemporaryDirectory() as tmp:
        tree = build(Path(tmp) / "course")
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER)):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o755 << 16
                zf.writestr(info, text)
            for path in sorted(tree.rglob("*")):
                if path.is_file():
                    info = zipfile.ZipInfo(str(path.relative_to(tree)))
                    info.external_attr = (path.stat().st_mode & 0o777) << 16
                    zf.writestr(info, path.read_bytes())
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", default="build/gradescope")
    args = parser.parse_args(argv)
    archive = build_zip(Path(args.dest).resolve())
    print(f"{archive}: upload it as the assignment's autograder (setup.sh and run_autograder at its root)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
