"""Tests of the course machinery a student's copy also has (not graded; `make test` runs them).

The manifest against the files, the graded test modules' conventions, the switch, the scoring,
the given model and data. Checks that need solutions/ live in solutions/tools/tools_test.py.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import _impl
from testcases.manifest import REPO, STAGES, dependencies, dependents, exercises, module_name, select, student_files
from testcases.scoring import (
    BLOCKED,
    FAILED,
    NOT_ATTEMPTED,
    NOT_RUN,
    PASSED,
    SKIPPED,
    Gradebook,
    Outcome,
    details_option,
    split_cents,
    stops_after_a_hang,
)
from testcases.tolerances import (
    DERIVED,
    EXACT,
    FIXTURE_RULES,
    FIXTURES,
    INPUT,
    NETWORK,
    ORACLE,
    START,
    UNUSED,
    Fixture,
    assert_network_close,
    fixture,
    rule_for,
)
from testcases.tolerances import _read as read_fixture

# ---- the manifest against the files ---------------------------------------------------------------


def test_every_stage_has_its_files():
    """Each stage's student file, lesson, notebook and test modules exist; exercise ids follow the stage."""
    for stage in STAGES:
        for path in (stage.student_file, stage.lesson, stage.notebook, *stage.tests):
            assert (REPO / path).is_file(), f"stage {stage.number}: {path} is missing (testcases/manifest.py names it)"
        for number, exercise in enumerate(stage.exercises, start=1):
            assert exercise.id == f"{stage.number}.{number}", (
                f"stage {stage.number}: exercise {exercise.id} out of order"
            )
            assert exercise.points > 0, f"{exercise.id}: points must be positive"
    assert len(exercises()) == sum(len(s.exercises) for s in STAGES), "exercise ids must be unique"


def test_dependencies_point_backwards():
    """An exercise depends only on exercises that come before it (so the course has an order)."""
    order = list(exercises())
    for ex, exercise in exercises().items():
        for need in exercise.needs:
            assert need in order and order.index(need) < order.index(ex), (
                f"{ex} needs {need}, which does not come first"
            )
        assert ex not in dependencies(ex), f"{ex} depends on itself"


def test_only_the_known_test_modules_exist():
    """A new test file cannot go ungraded: the *_test.py files are the two L14 entry points, this one, and lesson 08's.

    ``real_models_test.py`` tests given code (real checkpoints, fine-tuning, torchrun), which no exercise owns.
    """
    found = sorted(p.name for p in (REPO / "testcases").rglob("*_test.py"))
    assert found == ["advanced_test.py", "basic_test.py", "real_models_test.py", "support_test.py"], (
        f"unexpected test modules {found}: a stage's tests go in testcases/stage<N>/basic.py or advanced.py"
    )
    stage_dirs = sorted(p.name for p in (REPO / "testcases").glob("stage*") if p.is_dir())
    assert stage_dirs == [f"stage{s.number}" for s in STAGES], (
        f"stage test folders {stage_dirs} do not match the manifest"
    )


def graded_functions():
    for stage in STAGES:
        for path in stage.tests:
            tree = ast.parse((REPO / path).read_text())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    yield stage, path, node


def test_graded_tests_follow_the_conventions():
    """Every graded test: an exercise marker of its own stage, a one-line docstring, a message on every assert."""
    problems = []
    for stage, path, node in graded_functions():
        where = f"{path}::{node.name}"
        markers = [
            d for d in node.decorator_list
            if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "exercise"
        ]  # fmt: skip
        ids = [m.args[0].value for m in markers if m.args and isinstance(m.args[0], ast.Constant)]
        if len(ids) != 1 or ids[0] not in exercises() or not ids[0].startswith(f"{stage.number}."):
            problems.append(f"{where}: needs exactly one @pytest.mark.exercise('{stage.number}.x')")
        doc = ast.get_docstring(node)
        if not doc or not doc.strip():
            problems.append(f"{where}: needs a docstring (its first line is what lessons list under 'The tests check')")
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assert) and sub.msg is None:
                problems.append(f"{where}:{sub.lineno}: an assert without a message teaches nothing")
    assert not problems, "\n".join(problems)


def test_every_exercise_has_tests_at_both_levels():
    """Each exercise has at least one basic and one advanced test."""
    seen: dict[str, set[str]] = {ex: set() for ex in exercises()}
    for _, path, node in graded_functions():
        for d in node.decorator_list:
            if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "exercise":
                seen[d.args[0].value].add(Path(path).stem)
    missing = [
        f"{ex}: {sorted({'basic', 'advanced'} - levels)}"
        for ex, levels in seen.items()
        if levels != {"basic", "advanced"}
    ]
    assert not missing, f"exercises without tests at a level: {missing}"


def test_select_reads_exercises_and_stages():
    """--ex / EX= accepts an exercise, a stage or a list, and names what matched nothing."""
    assert select("1.2") == ["1.2"]
    assert select("3") == [e.id for e in STAGES[2].exercises]
    assert select("1.1, 4") == ["1.1", *[e.id for e in STAGES[3].exercises]]
    with pytest.raises(ValueError, match="EX=9"):
        select("9")


# ---- the switch ---------------------------------------------------------------------------------------


def test_switch_picks_the_files(tmp_path, monkeypatch):
    """student, solutions and a directory (a clone or loose files) resolve to the right files; a missing one is None."""
    name = module_name(student_files()[0])
    assert _impl.implementation_file(name, "student") == REPO / student_files()[0]
    (tmp_path / "clone" / "model").mkdir(parents=True)
    (tmp_path / "clone" / "model" / "quant.py").write_text("")
    assert (
        _impl.implementation_file("model.quant", str(tmp_path / "clone")) == tmp_path / "clone" / "model" / "quant.py"
    )
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "lora.py").write_text("")
    assert _impl.implementation_file("model.lora", str(tmp_path / "loose")) == tmp_path / "loose" / "lora.py"
    assert _impl.implementation_file("model.lora", str(tmp_path / "clone")) is None, (
        "a missing file is missing, not the stub"
    )
    with pytest.raises(ValueError, match="impl"):
        _impl.implementation_root(str(tmp_path / "nowhere"))
    monkeypatch.setattr(_impl, "REPO", tmp_path)  # a checkout without solutions/, like a handout
    with pytest.raises(ValueError, match="no solutions/"):
        _impl.implementation_root("solutions")
    assert _impl.default_choice("show") == "student", "without the reference, demos show the student's files"


# ---- scoring --------------------------------------------------------------------------------------------


def test_split_cents_adds_up():
    """Points are split in hundredths by largest remainder: the parts always add up to the whole."""
    for total in (800, 400, 1400, 100):
        for n in range(1, 23):
            parts = split_cents(total, [1.0] * n)
            assert sum(parts) == total and max(parts) - min(parts) <= 1, (total, n, parts)
    assert split_cents(1000, [2.0, 1.0, 1.0]) == [500, 250, 250]


def test_gradebook_statuses_weights_and_json():
    """Points by function (cases share), skipped cases excluded; statuses; table and results.json agree."""
    book = Gradebook()
    book.add(Outcome("a::t1[x]", "t1", "1.1", 1.0, PASSED))
    book.add(Outcome("a::t1[y]", "t1", "1.1", 1.0, FAILED, "boom"))
    book.add(Outcome("a::t1[cuda]", "t1", "1.1", 1.0, SKIPPED, "no GPU"))
    book.add(Outcome("a::t2", "t2", "1.1", 2.0, PASSED))
    book.add(Outcome("a::t3", "t3", "1.2", 1.0, BLOCKED, "stub", blocked_by="1.1"))
    book.add(Outcome("a::t4", "t4", "1.3", 1.0, NOT_ATTEMPTED, "Exercise 1.3: ..."))
    book.add(Outcome("a::t5", "t5", "1.3", 1.0, BLOCKED, "stub", blocked_by="1.2"))
    cents = book.cents()
    t1_share, t2_share = split_cents(exercises()["1.1"].points * 100, [1.0, 2.0])  # t1 weight 1, t2 weight 2
    assert cents["a::t2"] == (t2_share, t2_share)
    assert cents["a::t1[x]"][1] + cents["a::t1[y]"][1] == t1_share and "a::t1[cuda]" not in cents
    rows = {row.exercise: row.status for row in book.rows()}
    assert rows["1.1"].startswith("failed (2/3")
    assert rows["1.2"] == "blocked by 1.1 (still a stub)"
    assert rows["1.3"] == NOT_ATTEMPTED
    results = book.results_json(1.0)
    assert round(sum(t["score"] for t in results["tests"]), 2) == results["score"] == book.earned() / 100
    assert sum(t["max_score"] for t in results["tests"]) == pytest.approx(book.possible() / 100)
    assert json.dumps(results) and "blocked by 1.1" in json.dumps(results)


def test_table_lists_every_failure_and_says_why_cases_were_skipped():
    """--details all: the first failure with its message, every other one on a line; skips say why ("CUDA case, no GPU")."""
    book = Gradebook()
    for i in range(5):
        book.add(Outcome(f"a::t{i}", f"t{i}", "1.2", 1.0, FAILED, f"wrong value {i}\n  Likely cause: {i}"))
    book.add(Outcome("a::t5[cuda]", "t5", "1.2", 1.0, SKIPPED, "CUDA is not available on this machine: ..."))
    book.add(Outcome("a::t6", "t6", "1.2", 1.0, SKIPPED, "needs two processes"))
    table = book.table(details="all")
    assert all(f"t{i} — failed" in table for i in range(5)) and "more failing tests" not in table, table
    assert "Likely cause: 0" in table and "Likely cause: 1" not in table, "only the first failure in full"
    assert "(2 skipped: 1 CUDA case, no GPU; 1 needs two processes)" in table, table
    assert "(+3 more failing tests in results.json)" in book.table(details=2)
    with pytest.raises(ValueError, match="all"):
        details_option("some")


def test_a_hang_blocks_the_exercises_that_run_its_code():
    """After a test of 1.2 times out, 1.2's other tests and every exercise whose tests run 1.2's code are not run."""
    stops = stops_after_a_hang("1.2")
    assert set(stops) == {"1.2"} | dependents("1.2") and stops["1.2"][1] is None
    assert all(
        by == "1.2" and why.startswith("blocked by a hang in 1.2") for ex, (why, by) in stops.items() if ex != "1.2"
    )
    book = Gradebook()
    book.add(Outcome("a::t1", "t1", "1.3", 1.0, NOT_RUN, f"not run: {stops['1.3'][0]}", "1.2"))
    assert book.rows()[0].status == "blocked by a hang in 1.2"


def test_the_guard_reports_and_undoes_every_kind_of_change():
    """testcases/integrity.py after a test: a rebound, removed (even one bound to None) or added name, or a module
    replaced in sys.modules, is named and put back; with nothing changed (its quick path) it reports nothing."""
    import types

    from testcases import helpers
    from testcases.integrity import Guard

    helpers._bound_to_none = None  # given code's binding, in the snapshot
    try:
        guard = Guard(set())
        assert guard.check() == [], "nothing changed yet"
        del helpers._bound_to_none  # alone: the quick path must see it too
        assert guard.check() == ["testcases.helpers._bound_to_none"] and helpers._bound_to_none is None
        for change in ("rebind", "add", "module"):
            isclose, linalg = torch.isclose, sys.modules["torch.linalg"]
            if change == "rebind":
                torch.isclose = lambda *args, **kwargs: True
            elif change == "add":
                helpers._planted = 1
            else:
                sys.modules["torch.linalg"] = types.ModuleType("torch.linalg")
            expected = {"rebind": "torch.isclose", "add": "testcases.helpers._planted (added)",
                        "module": "sys.modules['torch.linalg']"}[change]  # fmt: skip
            assert guard.check() == [expected], change
            assert torch.isclose is isclose and sys.modules["torch.linalg"] is linalg
        assert not hasattr(helpers, "_planted") and guard.check() == [], "everything put back"
    finally:
        vars(helpers).pop("_bound_to_none", None)


def test_direct_route_writes_results_json(tmp_path):
    """The route README gives for a debugger, pytest ... --ex 1.1 --results-json OUT, ends with Gradescope's file."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:nbmake", "testcases/basic_test.py", "--ex", "1.1",
         "--results-json", str(out)],
        cwd=REPO, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LORA_IMPL"},
    )  # fmt: skip
    assert "INTERNALERROR" not in proc.stdout + proc.stderr and out.exists(), (proc.stdout + proc.stderr)[-3000:]
    results = json.loads(out.read_text())
    assert results["tests"] and all(t["number"] == "1.1" for t in results["tests"]), results
    assert round(sum(t["score"] for t in results["tests"]), 2) == results["score"] and results["execution_time"] > 0


# ---- the given model and data ------------------------------------------------------------------------------


def test_bundled_base_model():
    """The committed checkpoint is small, loads, and refuses sequences longer than it was built for."""
    from model.tiny_llama import BASE_MODEL_PATH, load_base_model

    assert BASE_MODEL_PATH.stat().st_size <= 5 * 2**20, "the committed checkpoint stays under 5 MB"
    model = load_base_model()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    logits = model(torch.zeros(2, 19, dtype=torch.long))
    assert logits.shape == (2, 19, model.config.vocab_size)
    with pytest.raises(ValueError):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_base_model_knows_the_pretraining_tasks_but_not_the_new_one():
    """The base solves copy/reverse/sort and fails the fine-tuning task."""
    from model.tiny_llama import load_base_model
    from training.data import FINETUNE_TASK, PRETRAIN_TASKS, per_task_accuracy

    accuracy = per_task_accuracy(load_base_model(), n=300)
    assert all(accuracy[t] >= 0.95 for t in PRETRAIN_TASKS), accuracy
    assert accuracy[FINETUNE_TASK] <= 0.30, accuracy


def test_float64_model_keeps_float64():
    """The given model runs in float64 end to end (norms and loss too), so tests can compare networks exactly."""
    from model.tiny_llama import load_base_model
    from training.data import finetune_data, lm_loss

    model = load_base_model().double()
    data = finetune_data("eval", n=4)
    logits = model(data["input_ids"])
    assert logits.dtype == torch.float64 and lm_loss(logits, data["labels"]).dtype == torch.float64


def test_task_data_is_deterministic_and_the_splits_are_disjoint():
    """The task data is the same on every call, and no eval problem appears in training."""
    from training.data import finetune_data

    a, b = finetune_data("train", n=300), finetune_data("train", n=300)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train = {tuple(r) for r in finetune_data("train", n=20_000)["input_ids"].tolist()}
    assert not any(tuple(r) in train for r in finetune_data("eval")["input_ids"].tolist())


def test_hard_task_is_the_reversed_increment_and_new_to_the_base():
    """Stage 5's harder task: answer = (digits + 1) mod 10 reversed, splits disjoint, the base model fails it."""
    from model.tiny_llama import load_base_model
    from training.data import N_DIGITS, Vocab, exact_match_accuracy, hard_finetune_data

    data = hard_finetune_data("train", n=200)
    assert all(torch.equal(data[k], hard_finetune_data("train", n=200)[k]) for k in data), "not deterministic"
    digits = data["input_ids"][:, 2 : 2 + N_DIGITS]
    answers = data["labels"][:, 2 + N_DIGITS : 2 + 2 * N_DIGITS]
    assert torch.equal(answers, ((digits + 1) % 10).flip(dims=[1])), "the answer is the reversed increment"
    assert (data["input_ids"][:, 1] == Vocab.PAD).all(), "the task token is PAD (no new vocabulary)"
    train = {tuple(r) for r in hard_finetune_data("train", n=20_000)["input_ids"].tolist()}
    held_out = hard_finetune_data("eval")
    assert len(held_out["input_ids"]) == 500 and not any(tuple(r) in train for r in held_out["input_ids"].tolist())
    accuracy = exact_match_accuracy(load_base_model(), held_out)
    assert accuracy <= 0.05, f"the base model already solves {accuracy:.1%} of the harder task"


# sha256 of the Stage 1–4 examples below, before Stage 5 added its task (first 16 hex digits)
DATA_DIGEST = "ce9f7a7e26097276"


def test_stage_1_to_4_data_unchanged():
    """Adding Stage 5's task left the Stage 1–4 data bit for bit as it was (a digest of the tensors)."""
    import hashlib

    from training.data import finetune_data, make_examples

    digest = hashlib.sha256()
    for data in (finetune_data("train", n=300), finetune_data("eval", n=100), make_examples("sort", 50, 3)):
        for key in sorted(data):
            digest.update(data[key].numpy().tobytes())
    assert digest.hexdigest()[:16] == DATA_DIGEST, "training/data.py changed the Stage 1–4 examples"


def test_no_network_or_cuda_assumption_in_the_code():
    """No .cuda() and no download anywhere in the course code."""
    # dev-only scripts that load a local folder with from_pretrained (a PEFT adapter, a tokenizer); never run by tests
    dev_only = {
        "check_peft_compat.py",
        "check_peft_variants.py",
        "check_peft_methods.py",
        "check_hf_checkpoint.py",
        "check_chat_template.py",
        "bench_peft_qlora.py",
    }
    for path in [*REPO.glob("model/*.py"), *REPO.glob("training/*.py"), *REPO.glob("solutions/**/*.py")]:
        text = path.read_text()
        assert ".cuda()" not in text, f"{path.relative_to(REPO)}: use devices from tensors, not .cuda()"
        if path.name not in dev_only:
            assert "from_pretrained(" not in text and "urlopen(" not in text, f"{path.relative_to(REPO)}: no downloads"


def test_tests_and_notebooks_never_import_solutions():
    """Only the switch reaches the reference: tests, notebooks and given code never import solutions.*."""
    for path in [
        *REPO.glob("testcases/**/*.py"),
        *REPO.glob("model/*.py"),
        *REPO.glob("training/*.py"),
        *REPO.glob("notebooks/*.ipynb"),
    ]:
        if path.name == "support_test.py":
            continue
        text = path.read_text()
        assert "import solutions" not in text and "from solutions" not in text, (
            f"{path.relative_to(REPO)} imports solutions"
        )


def test_cli_help_lists_the_config():
    """python -m training.qlora_trainer --help lists every TrainConfig field with its help."""
    out = subprocess.run(
        [sys.executable, "-m", "training.qlora_trainer", "--help"],
        cwd=REPO, env={k: v for k, v in os.environ.items() if k != "LORA_IMPL"}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--gradient-accumulation-steps" in out and "--precision" in out and "LoRA rank" in out


# ---- stored values: every fixture comparison follows a rule that holds on every CPU -----------------

FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.safetensors"))
RECORDS = sorted((FIXTURES / "cpu-records").glob("*.safetensors"))


def test_every_fixture_key_names_its_rule():
    """Each key of each fixture matches a rule in testcases/tolerances.py; no rule is stale; checkers exist."""
    assert sorted(FIXTURE_RULES) == FIXTURE_FILES, (
        f"FIXTURE_RULES covers {sorted(FIXTURE_RULES)}, the fixtures are {FIXTURE_FILES}"
    )
    for file in FIXTURE_FILES:
        used = {rule_for(file, key).pattern for key in fixture(file)}
        stale = [r.pattern for r in FIXTURE_RULES[file] if r.pattern not in used]
        assert not stale, f"{file}: rules that match no key (the first matching rule wins): {stale}"
        for entry in FIXTURE_RULES[file]:
            assert entry.rule in (INPUT, START, EXACT, NETWORK, DERIVED, ORACLE, UNUSED), f"{file}: {entry}"
            assert bool(entry.checker) == (entry.rule in (DERIVED, ORACLE)), (
                f"{file} {entry.pattern}: derived and oracle rules name a checker, the others none"
            )
            if entry.checker:
                checker_of(entry)


def test_a_key_without_a_rule_is_refused():
    """Reading a stored value that names no rule fails, before anything can compare with it."""
    unruled = Fixture("nf4_golden.safetensors", {"new_case.dequant_avx9": torch.zeros(2)}, {})
    with pytest.raises(KeyError, match="names no rule"):
        unruled["new_case.dequant_avx9"]


def test_fixtures_are_read_only_through_their_rules():
    """No test module opens testcases/fixtures/ itself: every read goes through tolerances.fixture (and its rules)."""
    for path in sorted((REPO / "testcases").rglob("*.py")):
        if path.name in ("tolerances.py", "support_test.py"):  # the loader, and this check
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert "fixtures" not in node.value, (
                    f"{path.relative_to(REPO)}:{node.lineno}: reads testcases/fixtures/ directly; use "
                    "testcases.tolerances.fixture(name), which holds each key to its rule"
                )


def checker_of(entry):
    module, _, name = entry.checker.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", [FIXTURES / f for f in FIXTURE_FILES] + RECORDS, ids=lambda p: p.name)
def test_the_rules_accept_every_recorded_computation(path):
    """The committed fixture, and the same computation recorded on other CPUs, pass each key's own rule.

    The rules are the graded tests' own: a record from another CPU that a rule refused would mean a correct
    student on that CPU loses points. Derived and oracle rules run their checker once for all their keys.
    """
    file = path.name.split(".")[0] + ".safetensors"
    golden = fixture(file)
    tensors, metadata = read_fixture(path)
    other = Fixture(file, tensors, metadata)
    assert set(other) <= set(golden), f"{path.name}: keys the fixture lacks {sorted(set(other) - set(golden))}"
    by_checker: dict[str, list[str]] = {}
    for key in sorted(other):
        entry = rule_for(file, key)
        if entry.rule in (INPUT, EXACT):
            assert torch.equal(other[key], golden[key]), f"{path.name}: {key} ({entry.rule}) differs: " + (
                "the record has other inputs, so it is not the same computation" if entry.rule == INPUT else entry.why
            )
        elif entry.rule == NETWORK:
            assert_network_close(other[key], golden[key], f"{path.name}: {key}")
        elif entry.rule in (DERIVED, ORACLE):
            by_checker.setdefault(entry.checker, []).append(key)
    for keys in by_checker.values():
        checker_of(rule_for(file, keys[0]))(golden, other, keys)


def test_nf4_table_is_robust():
    """bitsandbytes' NF4 table is what EVERY conforming evaluation of Exercise 3.3's recipe rounds to.

    The recipe: probabilities from a float32 linspace, quantiles Φ⁻¹ in float64, cast to float32, divided by
    the largest in float32. Enumerated here: the step rounded from the exact or the float32 ends, each point
    start + i·step (first half) or end − j·step (second half, as torch.linspace does) with one rounding (a
    fused multiply-add) or two, torch's own linspace, and Φ⁻¹ off by ±2 float64 ulps. All give the table bit
    for bit, so comparing with it exactly (rule "exact") holds on every CPU.
    """
    published = fixture("nf4_golden.safetensors")["codebook.nf4"]
    offset = 0.9677083

    def f32(x: float) -> float:
        return torch.tensor(x, dtype=torch.float64).float().item()

    def probabilities(n: int) -> list[list[float]]:
        start, end, found = f32(offset), 0.5, []
        for step in {f32((end - offset) / (n - 1)), f32((end - start) / (n - 1))}:
            for fused in (True, False):
                points = []
                for i in range(n):
                    j = n - 1 - i
                    if i < n / 2:
                        points.append(f32(start + i * step if fused else start + f32(i * step)))
                    else:
                        points.append(f32(end - j * step if fused else end - f32(j * step)))
                found.append(points)
        return [*found, torch.linspace(offset, 0.5, n).double().tolist()]

    for pos in probabilities(9):
        for neg in probabilities(8):
            for nudge in (-2, 0, 2):
                up = torch.special.ndtri(torch.tensor(pos[:-1], dtype=torch.float64)) * (1 + nudge * 2.0**-52)
                down = -torch.special.ndtri(torch.tensor(neg[:-1], dtype=torch.float64)) * (1 + nudge * 2.0**-52)
                levels = torch.cat([up, torch.zeros(1, dtype=torch.float64), down]).float().sort().values
                assert torch.equal(levels / levels.max(), published), (pos, neg, nudge)


# ---- lessons: every exercise's hints in layers ----------------------------------------------------

HINT_LAYERS = ("Hint 1 — the idea", "Hint 2 — the equations, with shapes", "Hint 3 — a code sketch")


def hint_layers(lesson: str, exercise_id: str) -> list[tuple[str, str]]:
    """(summary, body) of every Hint block in the ``### Exercise X.Y`` section of ``lesson``; [] without one."""
    import re

    text = (REPO / lesson).read_text()
    head = re.search(rf"^### Exercise {re.escape(exercise_id)} ", text, re.MULTILINE)
    if head is None:
        return []
    end = re.compile(r"^(#{2,3} |---$)", re.MULTILINE).search(text, head.end())  # a "# comment" in code is no heading
    section = text[head.end() : end.start() if end else len(text)]
    blocks = re.findall(r"<details><summary>(.*?)</summary>\n(.*?)</details>", section, re.DOTALL)
    return [(summary, body) for summary, body in blocks if summary.startswith("Hint")]


def test_every_exercise_has_its_hints_in_layers():
    """Each exercise's section has three hints, in order: the idea, the equations with shapes, a code sketch.

    A student opens them one at a time and stops at the layer they need, so the code comes last:
    Hints 1 and 2 hold no code block, Hint 3 holds one. No single-layer "Hint" is left in a lesson.
    """
    problems = []
    for stage in STAGES:
        if "<summary>Hint</summary>" in (REPO / stage.lesson).read_text():
            problems.append(f"{stage.lesson}: a single-layer <summary>Hint</summary> is left")
        for exercise in stage.exercises:
            layers = hint_layers(stage.lesson, exercise.id)
            titles = tuple(summary for summary, _ in layers)
            if titles != HINT_LAYERS:
                problems.append(f"{exercise.id} ({stage.lesson}): hints {titles}, expected {HINT_LAYERS} in this order")
                continue
            bodies = [body for _, body in layers]
            if not all(body.strip() for body in bodies):
                problems.append(f"{exercise.id}: an empty hint")
            if any("```" in body for body in bodies[:2]):
                problems.append(f"{exercise.id}: a code block in Hint 1 or 2 (the code sketch belongs in Hint 3)")
            if "```" not in bodies[2]:
                problems.append(f"{exercise.id}: Hint 3 has no code block")
    assert not problems, "\n".join(problems)


# ---- every refusal a test demands is stated where the student reads -----------------------------------
#
# A test that demands ``pytest.raises(..., match=M)`` or ``refuses(f, ..., match=M)`` holds the student to a
# rule: the error must contain M (usually ``word(name)``, an argument's name). That rule is fair only if the
# docstring of the function or class under test (stubs copy them from the reference) says so. The check below
# reads each stage test module (AST), resolves M to its literal patterns (string constants, ``word(...)``,
# names bound by ``parametrize`` or a ``for`` over literals, module-level dict constants) and the targets (every
# ``<student module>.<attr>`` used in the raising code; a method called on an object stands for every student
# class that defines it), and requires each pattern to match the docstring text of at least one target.

STUDENT_FIXTURES = {"lora": "model.lora", "quant": "model.quant", "trainer": "training.qlora_trainer",
                    "qlora_trainer": "training.qlora_trainer", "lora_variants": "model.lora_variants",
                    "memory": "training.memory", "peft_methods": "model.peft_methods"}  # fmt: skip


def signature_names(node: ast.FunctionDef | ast.ClassDef) -> list[str]:
    """The parameter names a stub shows: a function's arguments; a class's __init__ arguments and dataclass fields."""
    if isinstance(node, ast.FunctionDef):
        return [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
    names = [i.target.id for i in node.body if isinstance(i, ast.AnnAssign) and isinstance(i.target, ast.Name)]
    init = next((i for i in node.body if isinstance(i, ast.FunctionDef) and i.name == "__init__"), None)
    return names + (signature_names(init) if init else [])


RAISES = ("ValueError", "TypeError", "Raises", "raises", "refuse")  # a docstring that says the code refuses input


def student_docstrings() -> dict[str, dict[str, str]]:
    """{module: {"name" or "Class.method": text}}: the docstring, and when it says the code raises, the parameter
    names the stub's signature shows (an error "naming the argument" may name any of them). A class's entry holds
    its own and its __init__'s."""
    from testcases.manifest import student_modules

    found: dict[str, dict[str, str]] = {}
    for module, relative in {m: student_modules()[m] for m in set(STUDENT_FIXTURES.values())}.items():
        docs = found.setdefault(module, {})
        for node in ast.parse((REPO / relative).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                docs[node.name] = ast.get_docstring(node) or ""
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        docs[f"{node.name}.{item.name}"] = with_signature(ast.get_docstring(item) or "", item)
                        if item.name in ("__init__", "__post_init__"):
                            docs[node.name] += "\n" + (ast.get_docstring(item) or "")
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                docs[node.name] = with_signature(docs[node.name], node)
    return found


def with_signature(doc: str, node: ast.FunctionDef | ast.ClassDef) -> str:
    """``doc``, plus the signature's parameter names when the docstring says the code raises."""
    return doc + ("\nsignature: " + " ".join(signature_names(node)) if any(w in doc for w in RAISES) else "")


def literal_strings(node: ast.AST) -> list[str] | None:
    """The strings a literal holds (a str, or the strs in a list/tuple/set/dict values); None if not a literal."""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) else [value]
    return [v for v in values if isinstance(v, str)]


class RaiseChecks(ast.NodeVisitor):
    """Collects (test name, line, patterns or None, targets) for every raise check of one test module."""

    def __init__(self, tree: ast.Module, helpers: dict[str, ast.FunctionDef]) -> None:
        self.constants = {
            t.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        self.helpers = helpers | {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.found: list[tuple[str, int, list[str] | None, set[str]]] = []
        self.test: ast.FunctionDef | None = None

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name.startswith("test_"):
            self.test = node
            self.generic_visit(node)
            self.test = None

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            call = item.context_expr
            if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "raises":
                match = next((k.value for k in call.keywords if k.arg == "match"), None)
                if match is not None and not (isinstance(match, ast.Constant) and match.value is None):
                    self.record(node.lineno, match, node.body)
        self.generic_visit(node)

    # refusal helpers: name -> (index of the refused callable, keyword of the pattern, whether it is a bare name)
    HELPERS = {"refuses": (0, "match", False), "refuses_unchanged": (1, "name", True)}

    def visit_Call(self, node: ast.Call) -> None:
        if self.test is not None and isinstance(node.func, ast.Name) and node.func.id == "expect_refusal" and node.args:
            self.expect_refusal(node)
        helper = self.HELPERS.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if self.test is not None and helper is not None and len(node.args) > helper[0]:
            index, keyword, bare = helper
            match = next((k.value for k in node.keywords if k.arg == keyword), None)
            if match is not None:
                match = ast.Call(func=ast.Name(id="word"), args=[match], keywords=[]) if bare else match
                self.record(node.lineno, match, [node.args[index]])
        self.generic_visit(node)

    def expect_refusal(self, node: ast.Call) -> None:
        """``expect_refusal(call, …, names=(…), allowed=(…))``: each name as a whole word, each allowed text as is."""
        for keyword in node.keywords:
            if keyword.arg in ("names", "allowed"):
                value = keyword.value
                items = value.elts if isinstance(value, (ast.Tuple, ast.List)) else [value]
                for item in items:
                    if isinstance(item, ast.Attribute):  # path.name: a value the test passed in, echoed
                        continue
                    if keyword.arg == "names":
                        match = ast.Call(func=ast.Name(id="word"), args=[item], keywords=[])
                    elif isinstance(item, ast.Constant) and isinstance(item.value, str):
                        match = ast.Constant(re.escape(item.value))
                    else:
                        match = item
                    self.record(node.lineno, match, [node.args[0]])

    def record(self, line: int, match: ast.AST, code: list[ast.AST]) -> None:
        """One raise check: its patterns, minus those that only echo a string the test passed in (the error names
        the offending value: "qproj"), and its targets."""
        patterns = self.patterns(match)
        if patterns is not None:
            nodes = list(ast.walk(self.test))
            keys = {id(k) for n in nodes if isinstance(n, ast.Dict) for k in n.keys}  # {"beta2": 0.0}: an argument
            constants = [
                n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in keys
            ]
            constants += [n.arg for n in nodes if isinstance(n, ast.keyword) and n.arg]  # options passed by name
            patterns = [p for p in patterns if not self.echoes(p, constants)]
        self.found.append((self.test.name, line, patterns, self.targets(code)))

    @staticmethod
    def echoes(pattern: str, constants: list[str]) -> bool:
        """Whether ``pattern`` (a literal or word(literal)) is a string the test passes as input somewhere."""
        import re

        from testcases.helpers import word

        text = re.sub(r"\(\?<?[!=][^)]*\)", "", pattern).replace("\\", "")
        inside = [c for c in constants if c not in (text, pattern) and re.search(word(text), c)]
        return constants.count(text) >= 2 or bool(inside)

    def patterns(self, node: ast.AST) -> list[str] | None:
        """The regexes ``node`` evaluates to, over every parametrized case; None if it cannot be read statically."""
        from testcases.helpers import word

        if isinstance(node, ast.Constant):
            return [] if node.value is None else [node.value] if isinstance(node.value, str) else None
        if isinstance(node, ast.IfExp):
            body, orelse = self.patterns(node.body), self.patterns(node.orelse)
            return None if body is None or orelse is None else body + orelse
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "word" and node.args:
            names = self.patterns(node.args[0])
            return None if names is None else [word(name) for name in names]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in self.constants:
            return literal_strings(self.constants[node.value.id])
        if isinstance(node, ast.Name):
            return self.bound_values(node.id)
        if isinstance(node, (ast.Tuple, ast.List)):  # names=("r", "lora_alpha"): each of them
            parts = [self.patterns(item) for item in node.elts]
            return None if any(part is None for part in parts) else [p for part in parts for p in part]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):  # {case: names, …}[case]: every value
            return self.patterns(ast.List(elts=node.value.values))
        return None

    def bound_values(self, name: str) -> list[str] | None:
        """The string values ``name`` takes in the test: a parametrize argument, a for-loop target, an assignment."""
        for decorator in self.test.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize":
                names, cases = ast.literal_eval(decorator.args[0]), decorator.args[1]
                names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
                if name in names:
                    return self.column(cases, names.index(name), len(names))
        for node in ast.walk(self.test):
            if isinstance(node, ast.For):
                targets = [node.target] if isinstance(node.target, ast.Name) else list(getattr(node.target, "elts", []))
                for i, target in enumerate(targets):
                    if isinstance(target, ast.Name) and target.id == name:
                        return self.column(node.iter, i, len(targets))
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return self.patterns(node.value)
        return None

    def column(self, cases: ast.AST, index: int, width: int) -> list[str] | None:
        """Element ``index`` of every case of a literal list of cases (tuples of ``width``, or pytest.param)."""
        if isinstance(cases, ast.Name) and cases.id in self.constants:
            cases = self.constants[cases.id]
        if isinstance(cases, ast.Call) and getattr(cases.func, "id", "") == "list" and cases.args:
            cases = cases.args[0]
            if isinstance(cases, ast.Name) and cases.id in self.constants:
                cases = self.constants[cases.id]
        if isinstance(cases, ast.Dict):
            elements = cases.keys if index == 0 else cases.values
            return [s for e in elements for s in (literal_strings(e) or [])]
        if not isinstance(cases, (ast.List, ast.Tuple)):
            return None
        values = []
        for case in cases.elts:
            if isinstance(case, ast.Call):  # pytest.param(...)
                case = ast.Tuple(elts=case.args)
            element = case if width == 1 else case.elts[index] if isinstance(case, ast.Tuple) else None
            if element is None:
                return None
            values += literal_strings(element) or []
        return values

    def targets(self, nodes: list[ast.AST], depth: int = 0) -> set[str]:
        """ "module:attr" for every student-module attribute the nodes use; ".method" for a method call on an object."""
        found = set()
        for node in (n for top in nodes for n in ast.walk(top)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in STUDENT_FIXTURES:
                    found.add(f"{STUDENT_FIXTURES[node.value.id]}:{node.attr}")
                elif node.value.id not in ("pytest", "torch", "nn", "F", "math", "json"):
                    found.add(f".{node.attr}")
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and len(node.args) == 2
                  and isinstance(node.args[0], ast.Name) and node.args[0].id in STUDENT_FIXTURES):  # fmt: skip
                names = self.patterns(node.args[1]) or []  # getattr(lora, function), function parametrized
                found |= {f"{STUDENT_FIXTURES[node.args[0].id]}:{name}" for name in names}
            elif isinstance(node, ast.Name) and node.id in self.helpers and depth < 1:  # a test helper: what it calls
                found |= self.targets(self.helpers[node.id].body, depth + 1)
        return found


def refusal_problems(sources: dict[str, str], docs: dict[str, dict[str, str]], helpers: dict) -> list[str]:
    """For test modules {path: source}: every raise check whose pattern no docstring of its targets states."""
    import re

    problems = []
    for path, source in sources.items():
        checks = RaiseChecks(ast.parse(source), helpers)
        checks.visit(ast.parse(source))
        for test, line, patterns, targets in checks.found:
            where = f"{path}:{line} ({test})"
            texts = []
            for target in targets:
                if target.startswith("."):  # .method on some object: any student class that defines it
                    texts += [t for m in docs.values() for k, t in m.items() if k.endswith(target)]
                else:  # module:attr — a function or a class
                    module, _, attr = target.partition(":")
                    texts += [docs[module].get(attr, "")]
            texts = [t for t in texts if t]
            if patterns is None:
                problems.append(f"{where}: its match= pattern cannot be read statically")
            elif not texts:
                problems.append(f"{where}: no student function or class with a docstring is called in it")
            else:
                for pattern in patterns:
                    if not any(re.search(pattern, text) for text in texts):
                        names = sorted(t.split(":")[-1] for t in targets)
                        shown = re.sub(r"\(\?<?[!=][^)]*\)", "", pattern).replace("\\", "")
                        problems.append(f"{where}: {shown!r} is in no docstring of {names}")
    return sorted(set(problems))


def test_every_refusal_a_test_demands_is_stated_in_a_docstring():
    """Each ``match=`` of a raise check (pytest.raises or helpers.refuses) is in the docstring of what it tests.

    Stages 1–7: a student who reads the stub's docstring (or the lesson) knows which name an error must
    contain. Stated means: in the docstring, or — when the docstring says the code raises — a parameter
    name of the stub's signature; a pattern that only echoes what the test passed in (a target "qproj", an
    option misspelt on purpose) needs no statement. A pattern that cannot be read statically, or a check
    whose function under test cannot be found, is a problem too: write
    ``refuses(module.function, args…, match=word("name"))``.
    """
    helpers = {
        node.name: node
        for path in [*(p for s in STAGES for p in s.tests), "testcases/helpers.py"]
        for node in ast.parse((REPO / path).read_text()).body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("test_")
    }
    sources = {path: (REPO / path).read_text() for stage in STAGES for path in stage.tests}
    problems = refusal_problems(sources, student_docstrings(), helpers)
    assert not problems, "a test demands what no docstring states:\n" + "\n".join(problems)


def test_the_refusal_check_reads_parametrized_names_and_catches_an_unstated_one():
    """The checker resolves parametrize, for-loops, word() and expect_refusal's names/allowed; an unstated one is reported."""
    source = """
@pytest.mark.parametrize("kwargs, name", [({"beta2": 0.0}, "beta2"), ({"gamma": 1}, "gamma")])
def test_a(lora_variants, kwargs, name):
    refuses(lora_variants.RankAllocator, None, **kwargs, match=word(name))

def test_b(lora_variants):
    for kwargs, name in (({"target_modules": ["qproj"]}, "qproj"),):
        with pytest.raises(ValueError, match=word(name)):
            lora_variants.get_vera_model(None, **kwargs)

@pytest.mark.parametrize("case", ["one", "two"])
def test_c(lora_variants, tmp_path, case):
    names = {"one": ("beta1",), "two": ("delta",)}[case]
    expect_refusal(lora_variants.RankAllocator, tmp_path, names=names, allowed=("(0, 1)", "[0, 1)"))
"""
    docs = {"model.lora_variants": {"RankAllocator": "Raises ValueError naming beta1 or beta2, in (0, 1).",
                                    "get_vera_model": "Raises ValueError for a target that matches nothing."}}  # fmt: skip
    problems = refusal_problems({"synthetic.py": source}, docs, {})
    assert sorted(problems) == ["synthetic.py:14 (test_c): '[0, 1)' is in no docstring of ['RankAllocator']",
                                "synthetic.py:14 (test_c): 'delta' is in no docstring of ['RankAllocator']",
                                "synthetic.py:4 (test_a): 'gamma' is in no docstring of ['RankAllocator']"], problems  # fmt: skip


# ---- the grading sandbox (testcases/sandbox.py) -------------------------------------------------------


@pytest.fixture
def checker(tmp_path):
    """A sandbox with a given file, a scratch folder and a 'venv' beside it; a secret outside all three."""
    from testcases.sandbox import make_checker

    box, venv = tmp_path / "box", tmp_path / "venv"
    for folder in (box / "testcases", box / "tmp", venv / "lib"):
        folder.mkdir(parents=True)
    (box / "testcases" / "basic.py").write_text("given")
    (venv / "lib" / "ext.so").write_text("")
    (tmp_path / "secret.py").write_text("the reference")
    (box / "tmp" / "out").symlink_to(tmp_path)  # made before the sandbox closes: judged by its target
    check = make_checker(box, [venv], [venv], [box / "testcases"], [box / "tmp"])
    return check, box, venv, tmp_path / "secret.py"


def test_sandbox_reads_writes_and_links(checker):
    """Reads: the sandbox and Python's folders only, wherever a path leads; writes: scratch and new files only."""
    check, box, venv, secret = checker
    assert check("open", (str(box / "testcases" / "basic.py"), "r", os.O_RDONLY)) is None
    assert check("open", (str(venv / "lib" / "ext.so"), "rb", os.O_RDONLY)) is None
    assert check("open", (str(box / "tmp" / "x"), "w", os.O_WRONLY | os.O_CREAT)) is None
    assert check("open", (str(box / "new.json"), "w", os.O_WRONLY | os.O_CREAT)) is None
    assert check("builtins.id", (1,)) is None and check("os.listdir", (str(venv),)) is None
    refused = {
        "a file outside": ("open", (str(secret), "r", os.O_RDONLY)),
        "through a link": ("open", (str(box / "tmp" / "out" / "secret.py"), "r", os.O_RDONLY)),
        "a parent": ("open", (str(box / "tmp" / ".." / ".." / "secret.py"), "r", os.O_RDONLY)),
        "as bytes": ("open", (os.fsencode(secret), None, os.O_RDONLY)),
        "a given file, written": ("open", (str(box / "testcases" / "basic.py"), "r+", os.O_RDWR)),
        "listing outside": ("os.listdir", (str(secret.parent),)),
        "/proc/<pid>/cwd": ("open", (f"/proc/{os.getpid()}/cwd/secret.py", "r", os.O_RDONLY)),
        "a folder fd outside": ("open", (str(venv), None, os.O_RDONLY)),
        "a link out": ("os.symlink", (str(secret), str(box / "tmp" / "l"), -1)),
        "removing a given file": ("os.remove", (str(box / "testcases" / "basic.py"), -1)),
        "renaming to outside": ("os.rename", (str(box / "tmp" / "x"), str(secret), -1, -1)),
    }
    for name, (event, args) in refused.items():
        assert check(event, args) is not None, f"{name}: {event}{args} was allowed"
    what = check("open", (str(box / "tmp" / "out" / "secret.py"), "r", os.O_RDONLY))
    assert str(secret) in what and "outside the sandbox" in what, what
    assert check("os.symlink", (str(box / "tmp" / "x"), str(box / "tmp" / "l"), -1)) is None, "links inside scratch"


def test_sandbox_refuses_programs_c_code_and_escape_hatches(checker):
    """No program, no ctypes, no heap walk, no subinterpreter, no tracer, no fresh copy of a disarmed module."""
    check, box, venv, _ = checker
    for event, args in [
        ("subprocess.Popen", ("cat", ["cat"], None, None)),
        ("os.system", (b"cat x",)),
        ("os.exec", ("/bin/sh", ["sh"], None)),
        ("os.posix_spawn", ("/bin/sh", ["sh"], None)),
        ("os.fork", ()),
        ("_posixsubprocess.fork_exec", ()),
        ("ctypes.dlopen", ("libc.so.6",)),
        ("ctypes.call_function", (0, ())),
        ("gc.get_referrers", ((),)),
        ("cpython.PyInterpreterState_New", ()),
        ("sys.settrace", (None,)),
        ("sys.addaudithook", ()),
        ("socket.connect", (None, ("example.com", 80))),
        ("import", ("_posixsubprocess", None, None, None, None)),
        ("import", ("evil", str(box / "tmp" / "evil.so"), None, None, None)),
        ("import", ("evil", str(box / "tmp" / "evil.dat"), None, None, None)),  # dlopen takes any name
    ]:
        assert check(event, args) is not None, f"{event} was allowed"
    assert check("import", ("ext", str(venv / "lib" / "ext.so"), None, None, None)) is None, "Python's own C code"


def test_sandbox_reads_only_exact_types(checker):
    """A path object of the student's own class is refused: its __fspath__ could name one file to the check, another to the call."""
    check, box, _, secret = checker

    class Shifty:
        def __init__(self):
            self.calls = 0

        def __fspath__(self):
            self.calls += 1
            return str(secret) if self.calls % 2 else str(box / "tmp" / "x")

    class Str(str):
        def split(self, *args):
            raise AssertionError("the checker must not call a method of a student's object")

    shifty = Shifty()
    assert check("os.listdir", (shifty,)) is not None and shifty.calls == 0, "refused without calling __fspath__"
    assert check("open", (Str(str(box / "tmp" / "x")), "r", 0)) is not None
    path = box / "tmp"
    os.listdir(path)  # the os function calls its __fspath__, which caches the text the checker reads
    assert check("os.listdir", (path,)) is None, "a pathlib.Path is read through its own cached text"


def test_sandbox_checker_looks_up_no_global_name():
    """The checker and the hook bind every name when the sandbox closes: rebinding a builtin or os.lstat later changes nothing."""
    import dis
    import types

    from testcases import sandbox

    def code_objects(code):
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield const
                yield from code_objects(const)

    at_run_time = [c for f in (sandbox.make_checker, sandbox.install) for c in code_objects(f.__code__)]
    at_run_time = [c for c in at_run_time if c.co_name not in ("<listcomp>", "<dictcomp>", "<genexpr>")]
    found = {
        c.co_name: sorted({i.argval for i in dis.get_instructions(c) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")})
        for c in at_run_time
    }
    assert len(found) > 10 and not any(found.values()), {k: v for k, v in found.items() if v}


FAILING_PROPERTY = """
import os, sys
import hypothesis
from hypothesis import given, strategies as st
from testcases import sandbox

sandbox.calm_hypothesis()
refusals, _ = sandbox.install(os.getcwd(), [os.path.join(os.getcwd(), "tmp")], [sys.argv[1]])


@given(st.integers())
def test_small(x):
    assert x < 50, "too big"


try:
    test_small()
except AssertionError as error:
    print("failed as it should:", error)
print("refused:", refusals())
os._exit(0)
"""


@pytest.mark.parametrize("ci", ["", "true"], ids=["CI unset", "CI=true"])
def test_a_failing_property_test_fails_for_its_own_reason_under_the_sandbox(tmp_path, ci):
    """Hypothesis under the sandbox: a failing property shows its failure, not a refusal (no tracer, no database).

    ``CI=true`` matters: Hypothesis then loads its derandomized "ci" profile, whose first run registers
    a random generator by walking the interpreter's objects (``gc.get_referrers``).
    """
    (tmp_path / "failing_property.py").write_text(FAILING_PROPERTY)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env.update({"PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp")}, **({"CI": ci} if ci else {}))
    proc = subprocess.run([sys.executable, "failing_property.py", str(REPO)], cwd=tmp_path, capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert "failed as it should: too big" in proc.stdout and "refused: ()" in proc.stdout, proc.stdout + proc.stderr


HOSTILE_IMPORT = """
try:
    open({secret!r}).read()
except PermissionError as error:
    print("refused, and caught:", error)
"""


def test_sandbox_in_a_direct_run(tmp_path):
    """pytest --sandbox closes the sandbox as make grade does: a file that reads outside it cannot be imported."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for students")
    submission = tmp_path / "submission"
    submission.mkdir()
    for relative in ("model/lora.py", "model/quant.py"):
        text = (REPO / relative).read_text()
        extra = HOSTILE_IMPORT.format(secret=str(secret)) if relative == "model/lora.py" else ""
        (submission / Path(relative).name).write_text(text + extra)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:nbmake", "testcases/basic_test.py", "--ex", "1.1",
         "--impl", str(submission), "--sandbox", "--basetemp", str(tmp_path / "basetemp")],
        cwd=REPO, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LORA_IMPL"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "refused, and caught" in out, out[-3000:]
    assert f"model/lora.py could not be imported: it tried to open {secret} (outside the sandbox)" in out, out[-3000:]


def test_half_precision_works_under_the_sandbox(tmp_path):
    """torch initialises cpuinfo (reading /proc and /sys) on its first float16 conversion: the plugin does it before closing.

    Without that warm-up, under Landlock every float16 test of the reference failed with "Failed to initialize
    cpuinfo!" (1.2, 3.4, 3.6, 3.7, 4.3, 4.4: 122.47 of Stages 1-4's 128 points on an AVX-512 machine).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:nbmake", "testcases/advanced_test.py", "--ex", "1.2",
         "-k", "half_precision", "--impl", "solutions", "--sandbox", "--basetemp", str(tmp_path / "basetemp")],
        cwd=REPO, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LORA_IMPL"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "cpuinfo" not in out.replace("Error in cpuinfo", ""), out[-3000:]
