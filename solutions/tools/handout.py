"""The students' copy of the course, and the instructors' answer-key branch.

    python -m solutions.tools.handout DEST             DEST = HEAD without solutions/ and .ci/ (make handout)
    python -m solutions.tools.handout --solution-branch   a local branch `solution` whose student files
                                                          hold the reference (make solution-branch)

Everything an instructor has and a student must not lives in solutions/ (the reference, the
mutants, equivalents and hostile catalogues, this tooling), so the handout drops that one folder.
README.md and tutorial/README.md mark instructor-only passages with ``<!-- instructor -->`` …
``<!-- /instructor -->``; the handout leaves them out, so its README documents only what works
there. Its Makefile offers only the students' targets (the instructors' need solutions/).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from testcases.manifest import REPO, student_files

DROPPED = ("solutions", ".ci")
STRIPPED = (
    "README.md",
    "README.zh-CN.md",
    "tutorial/*.md",
    "tutorial/zh-CN/*.md",
)  # pages (globs) whose <!-- instructor --> passages a handout drops
# An instructor passage, and whether it starts a line and ends one: then its lines go entirely.
INSTRUCTOR_ONLY = re.compile(r"(^)?<!-- instructor -->.*?<!-- /instructor -->(\n)?", re.DOTALL | re.MULTILINE)


def student_text(text: str) -> str:
    """A page without its instructor-only passages (and without the markers), leaving no stray line break.

    A passage that fills whole lines goes with its last line break; one inside a line goes alone, so
    the text around it joins as written ("format. <!-- instructor -->…<!-- /instructor -->`make demo`"
    becomes "format. `make demo`"). A removed block between two blank lines leaves one blank line.
    """
    cut = INSTRUCTOR_ONLY.sub(lambda m: "" if m.group(1) is not None else (m.group(2) or ""), text)
    return re.sub(r"\n{3,}", "\n\n", cut) if "\n\n\n" not in text else cut


def build(dest: Path, ref: str = "HEAD") -> Path:
    """Write the handout of ``ref`` to ``dest`` (replacing it)."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    for name in DROPPED:
        shutil.rmtree(dest / name, ignore_errors=True)
    for page in (page for pattern in STRIPPED for page in sorted(dest.glob(pattern))):
        page.write_text(student_text(page.read_text()))
    return dest


def solution_branch() -> int:
    """A local branch `solution` whose student files hold the reference."""
    if (
        subprocess.run(["git", "rev-parse", "--verify", "-q", "solution"], cwd=REPO, capture_output=True).returncode
        == 0
    ):
        print("branch 'solution' exists; delete it first: git branch -D solution")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "worktree", "add", "-q", "-b", "solution", tmp, "HEAD"], cwd=REPO, check=True)
        for relative in student_files():
            shutil.copyfile(REPO / "solutions" / relative, Path(tmp) / relative)
        subprocess.run(["git", "commit", "-q", "-am", "Reference solutions in the student files"], cwd=tmp, check=True)
        subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=REPO, check=True)
    print("created branch 'solution' (git switch solution)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", default="build/handout")
    parser.add_argument("--solution-branch", action="store_true")
    args = parser.parse_args(argv)
    if args.solution_branch:
        return solution_branch()
    dest = build(Path(args.dest).resolve())
    print(f"{dest}: the handout (students run make grade, make demo, make notebooks; make help lists them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
