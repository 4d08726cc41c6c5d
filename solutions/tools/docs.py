"""Keep the pages in step with the manifest and the tests: generated blocks and checked points.

    python -m solutions.tools.docs            rewrite every generated block (after changing the manifest or a test)
    python -m solutions.tools.docs --check    exit 1 if a block or a quoted number is out of date (make test)

Generated blocks sit between ``<!-- generated: NAME -->`` and ``<!-- /generated -->`` in README.md and
tutorial/*.md:
    course-map        README.md: stage, lesson, student file, exercises and their points
    stage-table       tutorial/README.md: one row per stage
    exercise-table    tutorial/README.md: one row per exercise
    catalogue-counts  README.md: how many mutants, equivalents and hostile submissions there are
    layout            README.md: the folders and files a student receives, student files (from the
                      manifest) and given files (what git tracks) apart
    which-code-runs   README.md and tutorial/README.md: the student modules IMPL switches, and the rule
    tests-X.Y         a lesson page: what the graded tests of exercise X.Y check, one line per test,
                      the first line of each test's docstring (so a graded behaviour cannot go
                      unmentioned, and a mentioned one cannot go ungraded)
Checked in prose: "Exercise X.Y … (N points)", "exercises X.Y–X.Z, N points", "N points in all", and
every "folder of loose files (…)" names exactly the student files.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from testcases.manifest import REPO, STAGES, exercises, stage_of, student_files, student_modules, total_points

PAGES = ("README.md", "tutorial/README.md", *(s.lesson for s in STAGES))
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.DOTALL)


def test_lines() -> dict[str, list[tuple[str, str, str]]]:
    """exercise -> [(level, test name, first docstring line)] from the stage test modules (read, not imported)."""
    found: dict[str, list[tuple[str, str, str]]] = {ex: [] for ex in exercises()}
    for stage in STAGES:
        for path in stage.tests:
            for node in ast.parse((REPO / path).read_text()).body:
                if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                    continue
                for d in node.decorator_list:
                    if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "exercise" and d.args:
                        doc = (ast.get_docstring(node) or "").strip().splitlines()
                        found[d.args[0].value].append((Path(path).stem, node.name, doc[0] if doc else ""))
    return found


def render(name: str) -> str:
    if name == "course-map":
        rows = ["| stage | lesson | you write in | exercises (points) |", "|---|---|---|---|"]
        for s in STAGES:
            ex = " · ".join(f"{e.id} {e.title} ({e.points})" for e in s.exercises)
            rows.append(f"| {s.number} | [{s.title}]({s.lesson}) | `{s.student_file}` | {ex} |")
        return "\n".join(rows) + f"\n\n{total_points()} points in all.\n"
    if name == "stage-table":
        rows = ["| Stage | Page | Student file | Exercises | Points |", "|---|---|---|---|---|"]
        for s in STAGES:
            page = Path(s.lesson).name
            rows.append(f"| {s.number} · {s.title} | [{page}]({page}) | `{s.student_file}` | "
                        f"{s.exercises[0].id}–{s.exercises[-1].id} | {s.points} |")  # fmt: skip
        rows.append(f"| | | | **total** | **{total_points()}** |")
        return "\n".join(rows) + "\n"
    if name == "exercise-table":
        rows = ["| Exercise | What you implement | Builds on | Points |", "|---|---|---|---|"]
        for s in STAGES:
            rows.append(f"| **Stage {s.number}** · `{s.student_file}` | | | |")
            for e in s.exercises:
                rows.append(f"| {e.id} | {e.title} | {', '.join(e.needs) or '—'} | {e.points} |")
        return "\n".join(rows) + "\n"
    if name == "layout":
        return layout()
    if name == "which-code-runs":
        return which_code_runs()
    if name == "catalogue-counts":
        counts = catalogue_counts()
        return (f"The catalogues hold {counts['mutants']} mutants, {counts['equivalents']} equivalents and "
                f"{counts['hostile']} hostile submissions.\n")  # fmt: skip
    if name.startswith("tests-"):
        ex = name.removeprefix("tests-")
        lines = [f"- {doc} *({level}: `{test}`)*" for level, test, doc in test_lines()[ex]]
        return (
            f"The graded tests of {ex} check ({stage_of(ex).tests[0].rsplit('/', 1)[0]}/):\n\n"
            + "\n".join(lines)
            + "\n"
        )
    raise KeyError(name)


def quoted_points(page: str, text: str) -> list[str]:
    """Points quoted in prose that disagree with the manifest."""
    problems, table = [], exercises()
    for m in re.finditer(r"Exercise (\d+\.\d+)\b[^\n]*?\((\d+) points?\)", text):
        if m.group(1) in table and int(m.group(2)) != table[m.group(1)].points:
            problems.append(
                f"{page}: Exercise {m.group(1)} quotes {m.group(2)} points, the manifest says {table[m.group(1)].points}"
            )
    for m in re.finditer(r"exercises (\d+)\.\d+[–-]\d+\.\d+, (\d+) points", text):
        stage = next((s for s in STAGES if str(s.number) == m.group(1)), None)
        if stage and int(m.group(2)) != stage.points:
            problems.append(
                f"{page}: stage {stage.number} quotes {m.group(2)} points, the manifest says {stage.points}"
            )
    for m in re.finditer(r"(\d+) points in all", text):
        if int(m.group(1)) != total_points():
            problems.append(f"{page}: quotes {m.group(1)} points in all, the manifest says {total_points()}")
    return problems


ROLES = {"_impl.py": "the switch", "tiny_llama.py": "the base model", "data.py": "the tasks",
         "manifest.py": "the course in one table"}  # fmt: skip
INDENT = 14  # where the layout's descriptions start
NBSP = "\u00a0"  # a space textwrap does not break at


def tracked(folder: str) -> list[str]:
    """The files git tracks directly in ``folder`` (not in its subfolders), sorted."""
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted(Path(f).name for f in out.split() if Path(f).parent.as_posix() == folder)


def wrap(text: str, width: int) -> list[str]:
    """``textwrap.wrap`` that never breaks inside `code` nor before a " · " separator."""
    keep = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", NBSP), text).replace(" · ", f"{NBSP}· ")
    return [line.replace(NBSP, " ") for line in textwrap.wrap(keep, width, break_on_hyphens=False)]


def layout_row(folder: str, items: list[str]) -> str:
    """One folder of the layout, its items joined by " · " and wrapped under the description column."""
    return f"{folder + '/':<{INDENT}}" + ("\n" + " " * INDENT).join(wrap(" · ".join(items), 100 - INDENT))


def layout() -> str:
    """README's Layout: student files from the manifest, given files from git, stages and notebooks counted."""
    first, last = STAGES[0].number, STAGES[-1].number
    rows = ["```", "README.md  Makefile  requirements.txt  pyproject.toml"]
    lessons = [f for f in tracked("tutorial") if f != "README.md"]
    capstone = [f[:2] for f in lessons if not any(f == Path(s.lesson).name for s in STAGES)]
    rows.append(layout_row("tutorial", [f"{first:02d}–{last:02d} one page per stage"]
                           + [f"{n} the capstone" for n in capstone] + ["README.md (the map)"]))  # fmt: skip
    for folder in ("model", "training"):
        mine = [s for s in student_files() if s.startswith(folder + "/")]
        stages = {f: [st.number for st in STAGES if st.student_file == f] for f in mine}
        students = [f"{Path(f).name} (Stage{'s' if len(v) > 1 else ''} {'–'.join(str(n) for n in sorted({min(v), max(v)}))})"
                    for f, v in stages.items()]  # fmt: skip
        given = [f"{name} ({ROLES[name]})" if name in ROLES else name
                 for name in tracked(folder) if f"{folder}/{name}" not in mine and name != "__init__.py"]  # fmt: skip
        extra = ["checkpoints/"] if folder == "model" else []
        rows.append(layout_row(folder, [f"student files: {', '.join(students)}", f"given: {', '.join(given)}", *extra]))
    entry = ("basic_test.py", "advanced_test.py")
    support = [f for f in tracked("testcases") if f not in (*entry, "manifest.py", "__init__.py")]
    rows.append(layout_row("testcases", [f"manifest.py ({ROLES['manifest.py']})", f"{', '.join(entry)} (entry points)",
                                         f"stage{first}/ … stage{last}/ (the tests)", ", ".join(support), "fixtures/"]))  # fmt: skip
    rows.append(layout_row("notebooks", [f"{first:02d}–{last:02d}, one per stage"]))
    return "\n".join([*rows, "```"]) + "\n"


def which_code_runs() -> str:
    """The IMPL paragraph: the student modules come from the manifest."""
    modules = [f"`{m}`" for m in student_modules()]
    loose = ", ".join(f"`{Path(f).name}`" for f in student_files())
    text = (
        f"**Which code runs (`IMPL`)?** Tests, notebooks, the demo and the comparisons import the student "
        f"modules {', '.join(modules[:-1])} and {modules[-1]} (the list is `testcases/manifest.py`'s); one "
        f"setting decides which files those names load: `student` (your files), `solutions` (the reference, "
        f"where the checkout has it) or a directory — a clone, or a folder of loose files ({loose}), where a "
        f"missing file counts as not attempted. It is `IMPL=` for make, `--impl` for pytest and the grader, "
        f"`LORA_IMPL` in the environment. Unset, grading (`make grade`, pytest) uses your files, and showing "
        f"(`make demo`, `make variants`, `make peft-family`, `make notebooks`, `make bench`, and lesson 08's "
        f"`make finetune`, `make generate`, `make chat`, `make ddp`, `make fsdp`) uses the reference where the "
        f"checkout has one, else your files. `model/_impl.py` is the switch."
    )
    return "\n".join(wrap(text, 100)) + "\n"


def loose_file_lists(page: str, text: str) -> list[str]:
    """Every "folder of loose files (…)" in prose must name exactly the student files."""
    problems, expected = [], {Path(f).name for f in student_files()}
    for m in re.finditer(r"folder of loose files\s*\(([^)]*)\)", text):
        named = set(re.findall(r"`([\w.]+\.py)`", m.group(1)))
        if named != expected:
            problems.append(f"{page}: a folder of loose files lists {sorted(named)}, the manifest's student files "
                            f"are {sorted(expected)}")  # fmt: skip
    return problems


def catalogue_counts() -> dict[str, int]:
    from solutions.hostile.cases import CASES
    from solutions.tools.variants import catalogue

    return {"mutants": len(catalogue("mutants")), "equivalents": len(catalogue("equivalents")), "hostile": len(CASES)}


def sync(write: bool) -> list[str]:
    problems = []
    tested = {ex for ex, lines in test_lines().items() if lines}
    listed = set()
    for page in PAGES:
        path = REPO / page
        text = path.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)
        listed |= {
            m.group("name").removeprefix("tests-") for m in BLOCK.finditer(text) if m.group("name").startswith("tests-")
        }
        if new != text:
            if write:
                path.write_text(new)
            else:
                problems.append(f"{page}: a generated block is out of date (run python -m solutions.tools.docs)")
        problems += quoted_points(page, new) + loose_file_lists(page, new)
    if missing := sorted(tested - listed, key=lambda e: tuple(map(int, e.split(".")))):
        problems.append(f"no lesson lists the tests of {', '.join(missing)}: add <!-- generated: tests-X.Y --> blocks")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    problems = sync(write=not args.check)
    print("\n".join(problems) if problems else "pages in step with the manifest and the tests")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
