"""Tests of the instructors' side: stubs, catalogues, pages, and the commands an instructor runs.

`make test` runs them (step 7). The slow ones grade real folders with the isolated grader: a full
clone whose own tests are rigged, a folder of loose files, the Gradescope package against a local
/autograder stand-in, and the handout with every command its README documents.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from solutions.tools import docs, handout
from solutions.tools.gradescope import build_zip
from solutions.tools.stubgen import filled_in, make_stub
from solutions.tools.variants import catalogue, check, same_code
from testcases.manifest import REPO, STAGES, STUB_PATTERN, exercises, student_files, total_points

PYTHON = sys.executable

# ---- stubs ----------------------------------------------------------------------------------------

REFERENCE = '''def f(x):
    """Doc."""
    # BEGIN SOLUTION 1.2: double it
    y = 2 * x
    return y
    # END SOLUTION
'''


def test_make_stub_replaces_the_block():
    stub = make_stub(REFERENCE)
    assert stub.endswith(
        'def f(x):\n    """Doc."""\n'
        '    raise NotImplementedError("Exercise 1.2: double it — see tutorial/01-lora-layer.md")\n'
    ) and stub.startswith("# ruff: noqa")
    solved = REFERENCE.replace("# BEGIN SOLUTION 1.2: double it\n", "").replace("# END SOLUTION\n", "")
    assert filled_in(solved, stub) == ["1.2"] and filled_in(stub, stub) == []


def test_make_stub_rejects_unbalanced_markers_and_unknown_exercises():
    with pytest.raises(ValueError, match="without END"):
        make_stub(REFERENCE.replace("    # END SOLUTION\n", ""))
    with pytest.raises(ValueError, match="9.9"):
        make_stub(REFERENCE.replace("1.2", "9.9"))


def test_every_exercise_has_a_stub_in_its_own_file():
    """Each manifest exercise has at least one stub in its stage's student file, and no stub names an unknown one."""
    for relative in student_files():
        stubbed = set(STUB_PATTERN.findall((REPO / relative).read_text()))
        mine = {e.id for s in STAGES if s.student_file == relative for e in s.exercises}
        assert stubbed == mine, f"{relative}: stubs for {sorted(stubbed)}, the manifest has {sorted(mine)}"


# ---- catalogues -------------------------------------------------------------------------------------


def test_catalogues_apply_and_change_the_code():
    """Every mutant and equivalent applies to the reference, compiles and changes more than comments; names are unique."""
    variants = catalogue("mutants") + catalogue("equivalents")
    names = [v.name for v in variants]
    assert len(names) == len(set(names)), "variant names must be unique"
    source = "@dec\ndef f(x):\n    # why\n    return x + 1\n\n\ny = f(2)\n"
    assert same_code(source, source.replace("# why", "# because").replace("\n\n\n", "\n\n\n\n"))
    for edit in (("x + 1", "x - 1"), ("@dec\n", "@other\n"), ("f(2)", "f(3)"), ("y = f(2)\n", "")):
        assert not same_code(source, source.replace(*edit)), edit
    for variant in variants:
        compile(check(variant), variant.name, "exec")
        assert variant.exercise in exercises(), f"{variant.name}: unknown exercise {variant.exercise}"
    for stage in STAGES:
        mutants = [m for m in catalogue("mutants") if m.exercise.startswith(f"{stage.number}.")]
        assert len(mutants) >= 2 * len(stage.exercises), f"stage {stage.number}: at least two mutants per exercise"
        assert {m.exercise for m in mutants} == {e.id for e in stage.exercises}, (
            f"stage {stage.number}: an exercise has no mutant"
        )
        assert any(e.exercise.startswith(f"{stage.number}.") for e in catalogue("equivalents")), (
            f"stage {stage.number}: no equivalent"
        )


# ---- pages ------------------------------------------------------------------------------------------


def test_pages_agree_with_the_manifest_and_the_tests():
    """Generated tables and test lists are current; every points figure quoted in prose matches the manifest."""
    problems = docs.sync(write=False)
    assert not problems, "\n".join(problems)


def test_the_chinese_pages_are_in_step_with_the_english_ones():
    """Every Chinese page shares its English page's headings, code, formulas, numbers and links (drift.py)."""
    from solutions.tools import drift

    problems = drift.check()
    assert not problems, "\n".join(problems[:20])
    assert len(drift.untranslated()) < len(drift.english_pages()), "no Chinese page found: the check checked nothing"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda zh: zh.replace("24", "42", 1), "24"),  # a number changed in one block
        (lambda zh: zh.replace("```python", "```python\n# a comment only the Chinese page has", 1), "code"),
        (lambda zh: zh.replace("\n## ", "\n### ", 1), "heading"),
        (
            lambda zh: zh.replace("](https://arxiv.org/abs/2106.09685)", "](https://arxiv.org/abs/2106.09686)", 1),
            "link",
        ),
    ],
    ids=["number", "code block", "heading level", "link target"],
)
def test_the_drift_check_finds_a_drifted_chinese_page(change, expected):
    """A Chinese page that changed a number, a code block, a heading or a link is reported, naming the page."""
    from solutions.tools import drift

    english, chinese = "tutorial/01-lora-layer.md", "tutorial/zh-CN/01-lora-layer.md"
    zh = (REPO / chinese).read_text()
    drifted = change(zh)
    assert drifted != zh, "the drifted copy must differ (the page lacks what this case changes)"
    problems = drift.compare((REPO / english).read_text(), drifted, english, chinese)
    assert problems and any(expected in p for p in problems), problems


def test_lesson_figures_are_produced_by_the_code():
    """Every figure a lesson quotes from a run is recomputed (solutions/tools/figures.py)."""
    proc = subprocess.run([PYTHON, "-m", "solutions.tools.figures"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


# ---- instructor commands, for real ---------------------------------------------------------------------


def grade(impl: Path, results: Path, *extra: str, cwd: Path = REPO) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([PYTHON, "-m", "testcases.grade", "--impl", str(impl), "--results", str(results),
                           "--logs", str(results.parent / "logs"), *extra],
                          cwd=cwd, capture_output=True, text=True)  # fmt: skip
    return (json.loads(results.read_text()) if results.exists() else {}), proc


def per_exercise(results: dict) -> dict[str, float]:
    points: dict[str, float] = {}
    for t in results.get("tests", []):
        points[t["number"]] = round(points.get(t["number"], 0) + t["score"], 2)
    return points


@pytest.mark.timeout(600)  # an isolated grade: seconds on free cores, minutes on loaded ones
def test_grade_a_full_clone_ignores_its_own_tests(tmp_path):
    """make grade IMPL=<a clone>: only its student files count; its rigged testcases/ are never run.

    Stage 1 is graded: its rigged tests would change its score, the rigged conftest any score (the
    Gradescope test below grades every stage of the reference through the same grader).
    """
    clone = tmp_path / "clone"
    for relative in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split():
        if not relative.startswith("solutions/") and (REPO / relative).is_file():
            (clone / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / relative, clone / relative)
    for relative in student_files():
        shutil.copyfile(REPO / "solutions" / relative, clone / relative)
    (clone / "testcases" / "stage1" / "basic.py").write_text(
        "def test_everything():\n    pass\n"
    )  # would pass anything
    (clone / "testcases" / "conftest.py").write_text(
        'raise SystemExit("the clone\'s conftest must never be imported")\n'
    )
    results, proc = grade(clone, tmp_path / "out" / "results.json", "--ex", "1")
    stage1 = sum(e.points for e in STAGES[0].exercises)
    assert proc.returncode == 0 and results["score"] == stage1, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_grade_a_folder_of_loose_files(tmp_path):
    """A folder holding only lora.py: stages 1–2 graded from it; quant.py and the trainer count as not attempted."""
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copyfile(REPO / "solutions" / "model" / "lora.py", loose / "lora.py")
    results, proc = grade(loose, tmp_path / "out" / "results.json", "--ex", "1,2,3.1")
    points = per_exercise(results)
    assert all(points[e.id] == e.points for s in STAGES[:2] for e in s.exercises), points
    assert points["3.1"] == 0 and proc.returncode == 1, points
    assert "not in" in results["output"], "the table notes the missing files"


@pytest.fixture(scope="module")
def built_handout(tmp_path_factory):
    """The handout of HEAD with this checkout's environment linked in (make handout)."""
    dest = handout.build(tmp_path_factory.mktemp("handout") / "course")
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


@pytest.mark.timeout(600)  # full isolated grades: ~25 s on free cores, minutes on loaded ones
def test_gradescope_package_runs_on_a_local_autograder_tree(tmp_path, built_handout):
    """make gradescope: setup.sh and run_autograder at the zip's root; run_autograder grades /autograder/submission."""
    archive = build_zip(tmp_path / "build")
    root = tmp_path / "autograder"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert "setup.sh" in names and "run_autograder" in names and not any(n.startswith("solutions/") for n in names)
        zf.extractall(root / "source")
    assert subprocess.run(["bash", "-n", str(root / "source" / "setup.sh")]).returncode == 0, "setup.sh is valid bash"
    (root / "source" / ".venv").symlink_to(REPO / ".venv")  # what setup.sh would install
    (root / "submission").mkdir()
    for relative in student_files():  # Gradescope uploads are often loose files
        shutil.copyfile(REPO / "solutions" / relative, root / "submission" / Path(relative).name)
    proc = subprocess.run(["bash", str(root / "source" / "run_autograder")], env={**os.environ, "AUTOGRADER_ROOT": str(root)},
                          capture_output=True, text=True)  # fmt: skip
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == total_points(), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {"score", "execution_time", "tests", "output"} <= set(results)
    assert all({"name", "score", "max_score", "status", "output", "visibility"} <= set(t) for t in results["tests"])


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})


def test_handout_has_no_answers_and_only_working_targets(built_handout):
    """The handout drops solutions/; its README and Makefile offer only what works without it."""
    assert not (built_handout / "solutions").exists() and not (built_handout / ".ci").exists()
    readme = (built_handout / "README.md").read_text()
    assert "solutions/" not in readme and "make test" not in readme and "<!-- instructor" not in readme
    targets = run(["make", "help"], built_handout).stdout
    for target in ("grade", "demo", "notebooks", "bench", "lint"):
        assert f"make {target} " in targets, f"make {target} is missing from the handout's make help"
    for target in ("test", "stubs", "mutants", "handout", "gradescope", "stress"):
        assert f"make {target} " not in targets, (
            f"make {target} needs solutions/ and must not be offered in the handout"
        )
    for command in [line.split("`")[1] for line in readme.splitlines() if line.startswith("| `make ")]:
        name = command.split()[1]
        assert f"make {name} " in targets, f"the handout README documents {command!r}, which its Makefile lacks"


@pytest.mark.timeout(600)  # an isolated grade and make demo: seconds on free cores, minutes on loaded ones
def test_handout_grade_demo_and_pytest_commands(built_handout):
    """In the handout: make grade scores the stubs 0 (exit 1), make demo names the missing exercises, pytest runs.

    The grade is the quick start's first command, ``make grade EX=1.1``; that every test of every exercise
    stops at its stub is make test's step 4 (the same student files, in this checkout).
    """
    graded = run(["make", "grade", "EX=1.1"], built_handout)
    results = json.loads((built_handout / "runs" / "grade" / "results.json").read_text())
    assert graded.returncode != 0 and results["score"] == 0 and results["tests"], graded.stdout[-2000:]
    demo = run(["make", "demo"], built_handout)
    assert demo.returncode != 0 and "still stubs" in demo.stdout + demo.stderr, (
        demo.stdout[-2000:] + demo.stderr[-2000:]
    )
    assert "Traceback" not in demo.stdout + demo.stderr, "make demo on stubs must explain, not crash"
    basic = run([PYTHON, "-m", "pytest", "-q", "testcases/basic_test.py", "--ex", "1.1"], built_handout)
    assert basic.returncode != 0 and "not attempted" in basic.stdout, basic.stdout[-2000:]
    reference = run([PYTHON, "-m", "pytest", "-q", "testcases/basic_test.py", "--impl", "solutions"], built_handout)
    assert reference.returncode != 0 and "no solutions/" in reference.stdout + reference.stderr, reference.stdout[
        -1500:
    ]


# ---- make test's scheduler and make stress's code paths -------------------------------------------------


def test_selftest_runs_every_job_within_the_cores(tmp_path, capsys):
    """Every job runs; never more cores' worth at once; a failing job's log is printed and fails the run."""
    from solutions.tools import selftest

    trace = tmp_path / "trace"
    body = (
        "import sys, time; open(sys.argv[1], 'a').write(f'{time.monotonic()} +{sys.argv[2]}\\n'); time.sleep(0.3);"
        "open(sys.argv[1], 'a').write(f'{time.monotonic()} -{sys.argv[2]}\\n'); print('log of', sys.argv[3]);"
        "sys.exit(sys.argv[3] == 'bad')"
    )
    jobs = [selftest.Job(1, name, [PYTHON, "-c", body, str(trace), str(cores), name], cores=cores, cost=cost)
            for name, cores, cost in [("a", 1, 1), ("b", 2, 5), ("c", 1, 3), ("bad", 1, 2), ("d", 1, 1)]]  # fmt: skip
    done = selftest.schedule(jobs, 2, tmp_path, 0.0, {})
    assert sorted(r.job.name for r in done) == ["a", "b", "bad", "c", "d"]
    busy, most = 0, 0
    for _, change in sorted((line.split() for line in trace.read_text().splitlines()), key=lambda e: float(e[0])):
        busy += int(change)
        most = max(most, busy)
    assert most == 2, f"at most 2 cores' worth at once, saw {most}"
    assert [r.status != 0 for r in done if r.job.name == "bad"] == [True] and not selftest.report(done, 0.0)
    assert "log of bad" in capsys.readouterr().out, "a failing job's log is printed"


def test_stress_skips_a_capability_this_cpu_lacks(monkeypatch, capsys):
    """make stress CAPS=…: a capability torch cannot run here is skipped, and so is the native one named twice."""
    from solutions.tools import stress

    seen = {"native": "AVX2", "default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX2"}  # a CPU without AVX512
    monkeypatch.setattr(stress, "capability_seen", seen.get)
    assert stress.usable(["native", "default", "avx2", "avx512"]) == ["native", "default"]
    out = capsys.readouterr().out
    assert "capability avx512: not available on this CPU (torch runs AVX2): skipped" in out
    assert "capability avx2: this CPU's own (AVX2)" in out
    assert stress.usable(["avx2"]) == ["avx2"], "named alone, the native capability runs"


@pytest.mark.timeout(300)  # Stage 1's graded tests, traced
def test_the_needs_check_traces_and_finds_an_undeclared_exercise():
    """solutions/tools/needs.py: on Stage 1 of the reference it passes; given tests that run code their exercise
    does not declare, it fails and names them (make test's step 3 runs the check on every graded test)."""
    from solutions.tools import needs

    proc = subprocess.run([PYTHON, "-m", "solutions.tools.needs", "--ex", "1"], cwd=REPO, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "LORA_IMPL"})  # fmt: skip
    assert proc.returncode == 0 and "graded tests traced (stages 1)" in proc.stdout, proc.stdout[-4000:] + proc.stderr
    lines, failed = needs.report({"t::a": ("1.2", {"1.2", "1.1"}), "t::b": ("1.1", {"1.1", "3.1"})}, verbose=False)
    assert failed and any("1.1: 1 of its tests run 3.1's code, a LATER exercise: b" in line for line in lines), lines
    lines, failed = needs.report({"t::a": ("1.2", {"1.2", "1.1"})}, verbose=False)
    assert not failed, lines
    check, session = needs.Check(), types.SimpleNamespace(exitstatus=0)  # as a plugin (step 3): the session fails
    check.ran = {"t::b": ("1.1", {"1.1", "3.1"})}
    if sys.version_info >= (3, 12):
        check.pytest_sessionstart(session)
    check.pytest_sessionfinish(session)
    assert session.exitstatus == 1, "an undeclared exercise fails the pytest session it was traced in"


def test_syntax_of_every_tool_is_python():
    """Every file under solutions/ parses (a catalogue with a typo would only fail later)."""
    for path in (REPO / "solutions").rglob("*.py"):
        ast.parse(path.read_text(), str(path))


def test_handout_cuts_instructor_passages_without_stray_line_breaks(built_handout):
    """A passage inside a line goes alone, one filling whole lines goes with them; the quick start opens with 1.1."""
    cases = {
        "format. <!-- instructor -->In this; <!-- /instructor -->`make demo`\nruns.\n": "format. `make demo`\nruns.\n",
        "a\n\n<!-- instructor -->\n### Instructor\n<!-- /instructor -->\n\n## B\n": "a\n\n## B\n",
        "| `X=1`<!-- instructor -->, `IMPL=dir`<!-- /instructor --> |\n| next |\n": "| `X=1` |\n| next |\n",
        "(…).\n<!-- instructor -->A whole line.<!-- /instructor -->\nmore\n": "(…).\nmore\n",
    }
    for page, expected in cases.items():
        assert handout.student_text(page) == expected, (page, handout.student_text(page))
    readme = (built_handout / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1]
    first = next(line for line in quick.splitlines() if line.startswith("make "))
    assert first.startswith("make grade EX=1.1"), f"the handout's first command is {first!r}"
    assert "\n\n\n" not in readme and "IMPL=student" not in quick.split("## Course map")[0]


def test_comparisons_refuse_only_the_stubs_their_methods_run(tmp_path):
    """make variants / make peft-family with chosen methods: only the exercises those methods run may stop them."""
    from solutions.tools.variants import replace_block

    for relative in ("model/lora.py", "model/quant.py", "model/lora_variants.py", "model/peft_methods.py",
                     "training/qlora_trainer.py", "training/memory.py"):  # fmt: skip
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text((REPO / "solutions" / relative).read_text())
    variants_file = tmp_path / "model" / "lora_variants.py"
    text = variants_file.read_text()
    for block in ("5.3: SVD", "5.3: QR"):
        text = replace_block(text, block, 'raise NotImplementedError("Exercise 5.3: stub")', "test")
    variants_file.write_text(text)
    env = {**os.environ, "LORA_IMPL": str(tmp_path)}
    refused = subprocess.run([PYTHON, "-m", "training.variants", "pissa", "lora"], cwd=REPO, env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "pissa: 5.3" in refused.stdout and "lora:" not in refused.stdout, (
        refused.stdout + refused.stderr[-2000:]
    )
    check = (
        "from model._impl import refuse_exercise_stubs\n"
        "from training.variants import METHODS, TRAINING\n"
        "refuse_exercise_stubs('make variants', {n: TRAINING + METHODS[n].exercises for n in ('lora', 'dora', 'vera', 'adalora')})\n"
        "print('runs')"
    )
    allowed = subprocess.run([PYTHON, "-c", check], cwd=REPO, env=env, capture_output=True, text=True)
    assert allowed.returncode == 0 and allowed.stdout.strip() == "runs", allowed.stdout + allowed.stderr[-2000:]
