"""Stage 2 basic tests: LoRA in a whole model, as lesson 02 describes it (model/lora.py).

Whole-network comparisons run the tiny model in float64 (testcases/tolerances.py explains why).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from testcases.helpers import copy_of, randomize_lora
from testcases.tolerances import assert_network_close

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def wrapped_paths(lora, model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, lora.LoRALayer))


def with_trained_adapters(lora, model, token_ids, **kwargs) -> torch.Tensor:
    """get_lora_model(model, r=2, **kwargs) with random adapters (as if trained); returns the logits to keep."""
    lora.get_lora_model(model, **{"r": 2, **kwargs})
    randomize_lora(model, std=0.2)
    return model(token_ids).detach()


# ---- Exercise 2.1: LoRA in a model -----------------------------------------------------------


@pytest.mark.exercise("2.1")
def test_get_lora_model_wraps_the_seven_projections(lora, tiny_model):
    """By default every q/k/v/o/gate/up/down projection of every layer is wrapped, lm_head is not."""
    model = lora.get_lora_model(tiny_model, r=2, lora_alpha=4)
    assert model is tiny_model, "get_lora_model modifies the model in place and returns it"
    expected = sorted(
        f"layers.{i}.{'self_attn' if p in ATTENTION else 'mlp'}.{p}" for i in range(2) for p in PROJECTIONS
    )
    wrapped = wrapped_paths(lora, model)
    assert wrapped == expected, (
        f"by default the seven projections of every layer are wrapped;\nexpected {expected}\ngot {wrapped}"
    )
    assert type(model.lm_head) is nn.Linear, "lm_head is not a default target and must stay a plain nn.Linear"


@pytest.mark.exercise("2.1")
def test_get_lora_model_trains_only_lora(lora, tiny_model):
    """Afterwards only lora_A and lora_B require gradients: embeddings, norms and the head are frozen."""
    model = lora.get_lora_model(tiny_model, r=2)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    wrong = [name for name in trainable if not name.endswith(("lora_A", "lora_B"))]
    assert trainable and not wrong, f"only lora_A / lora_B may be trainable; also trainable: {wrong[:5]}"


@pytest.mark.exercise("2.1")
def test_get_lora_model_keeps_the_output(lora, tiny_model64, token_ids):
    """Fresh adapters (B = 0) leave the model's logits unchanged."""
    before = tiny_model64(token_ids).detach()
    model = lora.get_lora_model(tiny_model64, r=2)
    assert_network_close(
        model(token_ids), before, "logits right after get_lora_model", "fresh adapters (B = 0) change nothing"
    )


@pytest.mark.exercise("2.1")
def test_target_modules_match_by_last_components(lora, tiny_model):
    """A target names modules by whole last path components: "self_attn.v_proj" and "down_proj"."""
    lora.get_lora_model(tiny_model, r=2, target_modules=["self_attn.v_proj", "down_proj"])
    wrapped = wrapped_paths(lora, tiny_model)
    expected = [
        "layers.0.mlp.down_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.mlp.down_proj",
        "layers.1.self_attn.v_proj",
    ]
    assert wrapped == expected, (
        f"a target names modules by their last path component(s); expected {expected}, got {wrapped}"
    )


# ---- Exercise 2.2: counting parameters -------------------------------------------------------


@pytest.mark.exercise("2.2")
def test_count_parameters(lora):
    """count_parameters returns (trainable, total): r·(in + out) trainable, every parameter in the total."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    lora.get_lora_model(model, r=8, target_modules=["0"])
    counts = lora.count_parameters(model)
    assert isinstance(counts, tuple) and len(counts) == 2, (
        f"count_parameters returns (trainable, total), got {counts!r}"
    )
    trainable, total = counts
    assert trainable == 8 * (64 + 64), f"trainable must be r·(in + out) = 1,024, got {trainable:,}"
    assert total == 64 * 64 + 64 + 64 * 10 + 10 + 1024, f"total must count every parameter once (5,834), got {total:,}"


@pytest.mark.exercise("2.2")
def test_print_trainable_parameters_uses_peft_format(lora, capsys):
    """The printed line is PEFT's: 'trainable params: 1,024 || all params: 5,184 || trainable%: 19.7531'."""
    layer = lora.LoRALayer(64, 64, r=8)  # 4,160 base + 1,024 LoRA
    lora.print_trainable_parameters(layer)
    printed = capsys.readouterr().out.strip()
    assert printed == "trainable params: 1,024 || all params: 5,184 || trainable%: 19.7531", (
        f"use PEFT's format: 'trainable params: {{:,}} || all params: {{:,}} || trainable%: {{:.4f}}', got {printed!r}"
    )


# ---- Exercise 2.3: merging a whole model -----------------------------------------------------


@pytest.mark.exercise("2.3")
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(lora, tiny_model64, token_ids):
    """merge_and_unload returns a model without LoRALayers that computes the same logits."""
    expected = with_trained_adapters(lora, tiny_model64, token_ids)
    plain = lora.merge_and_unload(tiny_model64)
    left = wrapped_paths(lora, plain)
    assert not left, f"merge_and_unload must replace every LoRALayer by its base layer; still there: {left[:3]}"
    assert_network_close(
        plain(token_ids), expected, "logits after merge_and_unload", "merge ΔW into each base layer, then unwrap it"
    )


@pytest.mark.exercise("2.3")
def test_merge_lora_and_unmerge_lora(lora, tiny_model64, token_ids):
    """merge_lora merges every layer and keeps the logits; unmerge_lora undoes it."""
    expected = with_trained_adapters(lora, tiny_model64, token_ids)
    assert lora.merge_lora(tiny_model64) is tiny_model64, "merge_lora returns the model it merged"
    assert all(layer.merged for _, layer in lora.lora_layers(tiny_model64)), "merge_lora must merge every LoRA layer"
    assert_network_close(tiny_model64(token_ids), expected, "logits after merge_lora", "merge each LoRALayer once")
    assert lora.unmerge_lora(tiny_model64) is tiny_model64, "unmerge_lora returns the model"
    assert not any(layer.merged for _, layer in lora.lora_layers(tiny_model64)), "unmerge_lora must unmerge them all"
    assert_network_close(tiny_model64(token_ids), expected, "logits after merge_lora; unmerge_lora")


# ---- Exercise 2.4: saving and loading adapters -----------------------------------------------


@pytest.mark.exercise("2.4")
def test_save_lora_writes_peft_files(lora, tiny_model, tmp_path):
    """save_lora writes adapter_config.json (peft_type, r, lora_alpha, target_modules) and PEFT's tensor keys."""
    lora.get_lora_model(tiny_model, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lora.save_lora(tiny_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config.get("peft_type") == "LORA" and config.get("r") == 2 and config.get("lora_alpha") == 4, (
        f"adapter_config.json needs PEFT's fields peft_type='LORA', r, lora_alpha; got {config}"
    )
    assert sorted(config.get("target_modules", [])) == ["q_proj", "v_proj"], (
        f"target_modules: the names of the wrapped modules, got {config.get('target_modules')}"
    )
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys, (
        f"PEFT's keys are base_model.model.<module path>.lora_A.weight; got e.g. {keys[:2]}"
    )
    assert len(keys) == 2 * 2 * 2, f"2 layers × 2 targets × (A, B) = 8 tensors, got {len(keys)}"


@pytest.mark.exercise("2.4")
def test_load_lora_restores_the_outputs(lora, tiny_model64, token_ids, tmp_path):
    """A saved adapter loaded into a fresh copy of the base gives the same logits."""
    fresh = copy_of(tiny_model64)
    expected = with_trained_adapters(lora, tiny_model64, token_ids, r=3, lora_alpha=5)
    lora.save_lora(tiny_model64, tmp_path)
    loaded = lora.load_lora(fresh, tmp_path)
    assert_network_close(loaded(token_ids), expected, "logits of base + loaded adapter",
                         "load A and B into every layer, with the file's r and lora_alpha (scaling 5/3 here)")  # fmt: skip
