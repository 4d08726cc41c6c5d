"""Tests of the course machinery and the given code (not graded; `make test` runs them).

The switch, the stub generator, the grading plugin's bookkeeping, the mutant catalogue, the
bundled base model and the task data.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from model._impl import REPO, STUDENT_MODULES, implementation_file
from testcases.grading import NOT_ATTEMPTED, Gradebook, Result
from testcases.points import EXERCISES
from testcases.tools.stubgen import filled_in, make_stub

# ---- the switch ---------------------------------------------------------------------------------


def test_switch_picks_the_files(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_IMPL", "solutions")
    assert implementation_file("model.lora") == REPO / "solutions" / "model" / "lora.py"
    monkeypatch.setenv("LORA_IMPL", "student")
    assert implementation_file("training.qlora_trainer") == REPO / "training" / "qlora_trainer.py"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "quant.py").write_text("")
    monkeypatch.setenv("LORA_IMPL", str(tmp_path))
    assert implementation_file("model.quant") == tmp_path / "model" / "quant.py"
    assert implementation_file("model.lora") == REPO / "model" / "lora.py", "a missing file falls back to the stub"
    monkeypatch.setenv("LORA_IMPL", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="LORA_IMPL"):
        implementation_file("model.lora")


# ---- the stub generator ---------------------------------------------------------------------------

REFERENCE = '''def f(x):
    """Doc."""
    # BEGIN SOLUTION 1.2: double it
    y = 2 * x
    return y
    # END SOLUTION
'''


def test_make_stub_replaces_the_block():
    stub = make_stub(REFERENCE)
    assert stub == (
        'def f(x):\n    """Doc."""\n'
        '    raise NotImplementedError("Exercise 1.2: double it — see tutorial/01-lora-layer.md")\n'
    )
    assert filled_in(
        REFERENCE.replace("# BEGIN SOLUTION 1.2: double it\n", "").replace("# END SOLUTION\n", ""), stub
    ) == ["1.2"]
    assert filled_in(stub, stub) == []


def test_make_stub_rejects_unbalanced_markers():
    with pytest.raises(ValueError, match="without END"):
        make_stub(REFERENCE.replace("    # END SOLUTION\n", ""))


def test_committed_stubs_are_generated_from_the_reference():
    for relative in STUDENT_MODULES.values():
        stub = make_stub((REPO / "solutions" / relative).read_text())
        assert (REPO / relative).read_text() == stub, f"{relative} drifted from solutions/{relative}: run make stubs"
        assert "BEGIN SOLUTION" not in stub


# ---- the grading bookkeeping -----------------------------------------------------------------------


def test_gradebook_shares_points_among_tests_that_ran():
    book = Gradebook()
    book.results = {
        "a::t1": Result("1.1", "passed"),
        "a::t2": Result("1.1", "failed", "boom"),
        "a::t3": Result("1.1", "skipped", "no GPU"),
        "a::t4": Result("1.2", NOT_ATTEMPTED, "not attempted: Exercise 1.2: ...\nmore"),
    }
    results = book.gradescope()
    scores = {t["name"].split(" :: ")[-1]: (t["score"], t["max_score"], t["status"]) for t in results["tests"]}
    half = EXERCISES["1.1"][0] / 2
    assert scores == {"t1": (half, half, "passed"), "t2": (0, half, "failed"), "t4": (0, EXERCISES["1.2"][0], "failed")}
    assert results["score"] == half and json.dumps(results)
    assert "not attempted" in book.table() and "failed (1/2 tests pass)" in book.table()


# ---- the mutant catalogue ------------------------------------------------------------------------


def test_every_mutant_applies_and_changes_the_reference():
    from testcases.mutants.run import CATALOGUE

    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names)), "mutant names must be unique"
    for mutant in CATALOGUE:
        source = (REPO / "solutions" / mutant.file).read_text()
        assert mutant.apply(source) != source, f"{mutant.name} changes nothing"
        compile(mutant.apply(source), mutant.name, "exec")
    for file in STUDENT_MODULES.values():
        assert sum(m.file == file for m in CATALOGUE) >= 10, f"at least ten mutants for {file}"


# ---- the given model and data ----------------------------------------------------------------------


def test_bundled_base_model():
    from model.tiny_llama import BASE_MODEL_PATH, load_base_model

    assert BASE_MODEL_PATH.stat().st_size <= 5 * 2**20, "the committed checkpoint stays under 5 MB"
    model = load_base_model()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    logits = model(torch.zeros(2, 19, dtype=torch.long))
    assert logits.shape == (2, 19, model.config.vocab_size)
    with pytest.raises(ValueError):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_base_model_knows_the_pretraining_tasks_but_not_the_new_one():
    from model.tiny_llama import load_base_model
    from training.data import FINETUNE_TASK, PRETRAIN_TASKS, per_task_accuracy

    accuracy = per_task_accuracy(load_base_model(), n=300)
    assert all(accuracy[t] >= 0.95 for t in PRETRAIN_TASKS), accuracy
    assert accuracy[FINETUNE_TASK] <= 0.30, accuracy


def test_task_data_is_deterministic_and_the_splits_are_disjoint():
    from training.data import finetune_data

    a, b = finetune_data("train", n=300), finetune_data("train", n=300)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train = {tuple(r) for r in finetune_data("train", n=20_000)["input_ids"].tolist()}
    assert not any(tuple(r) in train for r in finetune_data("eval")["input_ids"].tolist())


def test_no_network_or_cuda_assumption_in_the_code():
    for path in [*REPO.glob("model/*.py"), *REPO.glob("training/*.py"), *REPO.glob("solutions/**/*.py")]:
        text = path.read_text()
        assert ".cuda()" not in text, f"{path.relative_to(REPO)}: use devices from tensors, not .cuda()"
        assert "from_pretrained(" not in text and "urlopen(" not in text, f"{path.relative_to(REPO)}: no downloads"


def test_cli_help_lists_the_config():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "training.qlora_trainer", "--help"],
        cwd=REPO,
        env={**os.environ, "LORA_IMPL": "solutions"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--gradient-accumulation-steps" in out and "--precision" in out
