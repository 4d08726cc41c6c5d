"""Tests of the course machinery a student's copy also has (not graded; `make test` runs them).

The manifest against the files, the graded test modules' conventions, the switch, the scoring,
the given model and data. Checks that need solutions/ live in solutions/tools/tools_test.py.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import _impl
from testcases.manifest import REPO, STAGES, dependencies, exercises, module_name, select, student_files
from testcases.scoring import BLOCKED, FAILED, NOT_ATTEMPTED, PASSED, SKIPPED, Gradebook, Outcome, split_cents

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
