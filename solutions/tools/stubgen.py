"""Generate the student files from the reference (the nbgrader / otter convention).

In ``solutions/<path>`` each block

    # BEGIN SOLUTION 1.2: the LoRA forward
    ...reference code...
    # END SOLUTION

becomes, in ``<path>``, one line at the same indentation:

    raise NotImplementedError("Exercise 1.2: the LoRA forward — see tutorial/01-lora-layer.md")

Everything outside the blocks (imports, signatures, docstrings, worked neighbours) is copied
unchanged, so docstrings are written once, in the reference.

    python -m solutions.tools.stubgen            write the student files (refuses to overwrite
                                                 an exercise a student has filled in)
    python -m solutions.tools.stubgen --force    overwrite anyway
    python -m solutions.tools.stubgen --check    exit 1 if a student file differs from its stub

The student files, their lesson pages and the exercises come from testcases/manifest.py.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections import Counter

from testcases.manifest import REPO, STAGES, STUB_PATTERN, exercises, student_files

LINE_LENGTH = 120  # ruff's line-length in pyproject.toml
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION (?P<ex>\d+\.\d+): (?P<what>.+)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")


def stub_line(indent: str, exercise: str, what: str) -> str:
    """The ``raise`` that replaces one solution block, wrapped as ruff would wrap it."""
    if exercise not in exercises():
        raise ValueError(f"BEGIN SOLUTION {exercise}: no such exercise in testcases/manifest.py")
    page = next(s.lesson for s in STAGES if any(e.id == exercise for e in s.exercises))
    message = f'"Exercise {exercise}: {what} — see {page}"'
    line = f"{indent}raise NotImplementedError({message})\n"
    if len(line) - 1 <= LINE_LENGTH:
        return line
    return f"{indent}raise NotImplementedError(\n{indent}    {message}\n{indent})\n"


def make_stub(reference: str, source: str = "reference") -> str:
    """The student file for a reference file's text."""
    out, block = [], None
    for number, line in enumerate(reference.splitlines(keepends=True), start=1):
        begin = BEGIN.match(line.rstrip("\n"))
        if block is None and begin:
            block = number
            out.append(stub_line(begin["indent"], begin["ex"], begin["what"]))
        elif block is not None and END.match(line):
            block = None
        elif block is None:
            out.append(line)
        elif BEGIN.match(line.rstrip("\n")):
            raise ValueError(f"{source}:{number}: BEGIN SOLUTION inside the block opened at line {block}")
    if block is not None:
        raise ValueError(f"{source}:{block}: BEGIN SOLUTION without END SOLUTION")
    return with_lint_waiver("".join(out))


LINT_WAIVER = "# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)\n"


def with_lint_waiver(stub: str) -> str:
    """The stub with a file-level ruff waiver after its module docstring (no per-file list to keep in step)."""
    if not stub.startswith('"""') or stub.count('"""') < 2:
        return LINT_WAIVER + stub
    end = stub.index('"""', 3) + 3
    return stub[:end] + "\n\n" + LINT_WAIVER.rstrip("\n") + stub[end:]


def filled_in(current: str, stub: str) -> list[str]:
    """Exercises whose stubs have been replaced in ``current`` (a student's work)."""
    have, want = Counter(STUB_PATTERN.findall(current)), Counter(STUB_PATTERN.findall(stub))
    return sorted(ex for ex, n in want.items() if have[ex] < n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    parser.add_argument("--force", action="store_true", help="overwrite student work")
    args = parser.parse_args(argv)
    status = 0
    for relative in student_files():
        reference_path, student_path = REPO / "solutions" / relative, REPO / relative
        if not reference_path.is_file():
            print(f"solutions/{relative} is missing: the reference of {relative} (testcases/manifest.py names it)")
            status = 1
            continue
        stub = make_stub(reference_path.read_text(), source=str(reference_path.relative_to(REPO)))
        current = student_path.read_text() if student_path.exists() else ""
        if current == stub:
            print(f"{relative}: in sync with solutions/{relative}")
            continue
        if args.check:
            diff = difflib.unified_diff(
                stub.splitlines(), current.splitlines(), f"generated from solutions/{relative}", relative, lineterm=""
            )
            print(f"{relative}: differs from the stub generated from solutions/{relative} (run `make stubs`):")
            print("\n".join(list(diff)[:40]))
            status = 1
            continue
        if student_path.exists() and (done := filled_in(current, stub)) and not args.force:
            print(f"{relative}: NOT overwritten: exercises {', '.join(done)} are filled in (use `make stubs FORCE=1`)")
            status = 1
            continue
        student_path.write_text(stub)
        print(f"{relative}: written from solutions/{relative}")
    return status


if __name__ == "__main__":
    sys.exit(main())
