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
import functools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from solutions.tools.drift import english_pages, twin
from testcases.manifest import REPO, STAGES, exercises, stage_of, student_files, student_modules, total_points

PAGES = ("README.md", "tutorial/README.md", *(s.lesson for s in STAGES))
# The Chinese twins (tutorial/zh-CN/, README.zh-CN.md) get the same blocks in Chinese where they exist.
ZH_PAGES = tuple(twin(page) for page in PAGES)
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.DOTALL)


def test_lines() -> dict[str, list[tuple[str, str, str]]]:
    """exercise -> [(level, test name, first docstring line)] from the stage test modules (read, not imported)."""
    found: dict[str, list[tuple[str, str, str]]] = {ex: [] for ex in exercises()}
    for stage in STAGES:
        for path in stage.tests:
            for ex, name, doc in graded_functions((REPO / path).read_text()):
                found[ex].append((Path(path).stem, name, doc))
    return found


@functools.lru_cache(maxsize=64)
def graded_functions(source: str) -> tuple[tuple[str, str, str], ...]:
    """(exercise, test name, first docstring line) of a test module's source, parsed once per text (every test list
    of every page asks)."""
    found = []
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        for d in node.decorator_list:
            if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "exercise" and d.args:
                doc = (ast.get_docstring(node) or "").strip().splitlines()
                found.append((d.args[0].value, node.name, doc[0] if doc else ""))
    return tuple(found)


# The words around the manifest's facts in each language's generated blocks (the facts are the same).
WORDS = {
    "en": {
        "course-map": "| stage | lesson | you write in | exercises (points) |",
        "stage-table": "| Stage | Page | Student file | Exercises | Points |",
        "exercise-table": "| Exercise | What you implement | Builds on | Points |",
        "all": "{points} points in all.",
        "total": "**total**",
        "stage": "**Stage {number}**",
        "catalogues": "The catalogues hold {mutants} mutants, {equivalents} equivalents and {hostile} hostile submissions.",
        "tests": "The graded tests of {ex} check ({folder}/):",
    },
    "zh": {
        "course-map": "| 阶段 | 课程 | 你编写的文件 | 练习（分数） |",
        "stage-table": "| 阶段 | 课程页面 | 学生文件 | 练习 | 分数 |",
        "exercise-table": "| 练习 | 你要实现的内容 | 依赖 | 分数 |",
        "all": "共 {points} 分。",
        "total": "**合计**",
        "stage": "**第 {number} 阶段**",
        "catalogues": "目录中共有 {mutants} 个变异体（mutant）、{equivalents} 个等价实现和 {hostile} 个恶意提交。",
        "tests": "练习 {ex} 中参与评分的测试检查以下各项（{folder}/，测试说明保留英文原文）：",
    },
}


def header(columns: str) -> list[str]:
    """A Markdown table's first two rows."""
    return [columns, "|" + "---|" * columns.count(" | ") + "---|"]


def render(name: str, lang: str = "en") -> str:
    """The body of generated block ``name`` for a page in ``lang`` ("en", or "zh" for the Chinese twins)."""
    words = WORDS[lang]
    title = (lambda s: s.title) if lang == "en" else (lambda s: s.title_zh)
    if name == "course-map":
        rows = header(words["course-map"])
        for s in STAGES:
            ex = " · ".join(f"{e.id} {e.title} ({e.points})" for e in s.exercises)
            lesson = s.lesson if lang == "en" else twin(s.lesson)
            rows.append(f"| {s.number} | [{title(s)}]({lesson}) | `{s.student_file}` | {ex} |")
        return "\n".join(rows) + "\n\n" + words["all"].format(points=total_points()) + "\n"
    if name == "stage-table":
        rows = header(words["stage-table"])
        for s in STAGES:
            page = Path(s.lesson).name
            rows.append(f"| {s.number} · {title(s)} | [{page}]({page}) | `{s.student_file}` | "
                        f"{s.exercises[0].id}–{s.exercises[-1].id} | {s.points} |")  # fmt: skip
        rows.append(f"| | | | {words['total']} | **{total_points()}** |")
        return "\n".join(rows) + "\n"
    if name == "exercise-table":
        rows = header(words["exercise-table"])
        for s in STAGES:
            rows.append(f"| {words['stage'].format(number=s.number)} · `{s.student_file}` | | | |")
            for e in s.exercises:
                rows.append(f"| {e.id} | {e.title} | {', '.join(e.needs) or '—'} | {e.points} |")
        return "\n".join(rows) + "\n"
    if name == "layout" and lang == "en":
        return layout()
    if name == "which-code-runs":
        return which_code_runs() if lang == "en" else which_code_runs_zh()
    if name == "catalogue-counts":
        return words["catalogues"].format(**catalogue_counts()) + "\n"
    if name.startswith("tests-"):
        ex = name.removeprefix("tests-")
        folder = stage_of(ex).tests[0].rsplit("/", 1)[0]
        return words["tests"].format(ex=ex, folder=folder) + "\n\n" + test_list(ex)
    raise KeyError(f"{name}: no rendering in {lang!r} (solutions/tools/docs.py render)")


def test_list(ex: str) -> str:
    """One line per graded test of ``ex``: its docstring's first line (English in every language: it is code)."""
    return "\n".join(f"- {doc} *({level}: `{test}`)*" for level, test, doc in test_lines()[ex]) + "\n"


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
    for m in re.finditer(r"练习 (\d+)\.\d+[–-]\d+\.\d+[，,] ?(?:共 )?(\d+) 分", text):  # the Chinese pages
        stage = next((s for s in STAGES if str(s.number) == m.group(1)), None)
        if stage and int(m.group(2)) != stage.points:
            problems.append(
                f"{page}: stage {stage.number} quotes {m.group(2)} points, the manifest says {stage.points}"
            )
    for m in re.finditer(r"练习 (\d+\.\d+)[^\n]*?[（(](\d+) 分[）)]", text):
        if m.group(1) in table and int(m.group(2)) != table[m.group(1)].points:
            problems.append(
                f"{page}: 练习 {m.group(1)} quotes {m.group(2)} points, the manifest says {table[m.group(1)].points}"
            )
    for m in re.finditer(r"(\d+) points in all|(?<![，,])共 (\d+) 分", text):
        quoted = int(m.group(1) or m.group(2))
        if quoted != total_points():
            problems.append(f"{page}: quotes {quoted} points in all, the manifest says {total_points()}")
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
    rows = ["```", "README.md  Makefile  requirements.txt  requirements-lab.txt  pyproject.toml"]
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


def which_code_runs_zh() -> str:
    """The IMPL paragraph of the Chinese pages: the same facts as ``which_code_runs``."""
    modules = [f"`{m}`" for m in student_modules()]
    loose = "、".join(f"`{Path(f).name}`" for f in student_files())
    text = (
        f"**运行的是哪一份代码（`IMPL`）？** 测试、笔记本、演示和各项对比都导入学生模块 {'、'.join(modules[:-1])} 和 "
        f"{modules[-1]}（清单来自 `testcases/manifest.py`）；由一个设置决定这些名字加载哪些文件：`student`（你的文件）、"
        f"`solutions`（参考实现，仅当检出目录中有它时）或一个目录——一份克隆，或一个散放文件的文件夹（{loose}），其中缺少的"
        f"文件按未作答计。make 使用 `IMPL=`，pytest 和评分器使用 `--impl`，环境变量为 `LORA_IMPL`。未设置时，评分（`make grade`、"
        f"pytest）使用你的文件；展示类命令（`make demo`、`make variants`、`make peft-family`、`make notebooks`、`make bench`，"
        f"以及第 08 课的 `make finetune`、`make generate`、`make chat`、`make ddp`、`make fsdp`）在检出目录有参考实现时使用参考实现，"
        f"否则使用你的文件。切换逻辑在 `model/_impl.py`。"
    )
    return text + "\n"


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


def language_link(page: str, lang: str) -> str:
    """The passage under a lesson's title that links its twin in the other language (left out by the drift check)."""
    name = Path(page).name
    line = f"> 中文版 (Chinese): [zh-CN/{name}](zh-CN/{name})" if lang == "en" else f"> English: [../{name}](../{name})"
    return f"<!-- untranslated -->\n{line}\n<!-- /untranslated -->\n"


TITLE_AND_LINK = re.compile(r"\A(# [^\n]*\n\n)(<!-- untranslated -->\n.*?<!-- /untranslated -->\n\n)?", re.DOTALL)


def language_links(write: bool) -> list[str]:
    """Each lesson with a Chinese twin (08 included) links it under its title, and the twin links back."""
    problems = []
    for english in english_pages():
        if not english.startswith("tutorial/0") or not (REPO / twin(english)).is_file():
            continue
        for page, lang in ((english, "en"), (twin(english), "zh")):
            text = (REPO / page).read_text()
            link = language_link(english, lang)
            new = TITLE_AND_LINK.sub(lambda m, link=link: m.group(1) + link + "\n", text, count=1)
            if new != text:
                if write:
                    (REPO / page).write_text(new)
                else:
                    problems.append(
                        f"{page}: its link to the other language is out of date (run python -m solutions.tools.docs)"
                    )
    return problems


def sync(write: bool) -> list[str]:
    problems = []
    tested = {ex for ex, lines in test_lines().items() if lines}
    listed = set()
    pages = [(page, "en") for page in PAGES] + [(page, "zh") for page in ZH_PAGES if (REPO / page).is_file()]
    for page, lang in pages:
        path = REPO / page
        text = path.read_text()
        new = BLOCK.sub(lambda m, lang=lang: m.group(1) + render(m.group("name"), lang) + m.group(4), text)
        if lang == "en":
            listed |= {
                m.group("name").removeprefix("tests-")
                for m in BLOCK.finditer(text)
                if m.group("name").startswith("tests-")
            }
        if new != text:
            if write:
                path.write_text(new)
            else:
                problems.append(f"{page}: a generated block is out of date (run python -m solutions.tools.docs)")
        problems += quoted_points(page, new) + loose_file_lists(page, new)
    if missing := sorted(tested - listed, key=lambda e: tuple(map(int, e.split(".")))):
        problems.append(f"no lesson lists the tests of {', '.join(missing)}: add <!-- generated: tests-X.Y --> blocks")
    return problems + language_links(write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    problems = sync(write=not args.check)
    print("\n".join(problems) if problems else "pages in step with the manifest and the tests")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
