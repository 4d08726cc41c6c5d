"""Basic tests: the behaviour each lesson asks for.

Run one exercise with ``make grade EX=1.2`` (or ``pytest testcases/basic_test.py --ex 1.2``).
Each test names its exercise; the points table is in testcases/points.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testcases.helpers import randomize_lora
from testcases.tolerances import assert_close

# ---- Exercise 1.1: the LoRA layer -----------------------------------------------------------


@pytest.mark.exercise("1.1")
def test_lora_layer_shapes_and_scaling(lora):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8)
    assert tuple(layer.lora_A.shape) == (4, 16), (
        f"lora_A must be (r, in_features) = (4, 16), got {tuple(layer.lora_A.shape)}: "
        "A maps the input down to r dimensions (the lesson's orientation, as in PEFT)"
    )
    assert tuple(layer.lora_B.shape) == (12, 4), (
        f"lora_B must be (out_features, r) = (12, 4), got {tuple(layer.lora_B.shape)}"
    )
    assert isinstance(layer.base_layer, nn.Linear) and tuple(layer.base_layer.weight.shape) == (12, 16), (
        "base_layer must be an nn.Linear(in_features, out_features) with weight (12, 16)"
    )
    assert layer.scaling == pytest.approx(2.0), f"scaling must be lora_alpha / r = 8 / 4 = 2.0, got {layer.scaling}"
    assert layer.merged is False, "a new layer is not merged"


@pytest.mark.exercise("1.1")
def test_lora_layer_freezes_base_and_trains_lora(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    frozen = [name for name, p in layer.named_parameters() if name.startswith("base_layer") and p.requires_grad]
    assert not frozen, f"the pretrained weights must be frozen (requires_grad=False), but {frozen} are trainable"
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad, "lora_A and lora_B must be trainable"
    assert isinstance(layer.lora_A, nn.Parameter) and isinstance(layer.lora_B, nn.Parameter), (
        "lora_A and lora_B must be nn.Parameter, or the optimizer never sees them"
    )


@pytest.mark.exercise("1.1")
def test_lora_init_B_zero_A_random(lora):
    layer = lora.LoRALayer(64, 32, r=8)
    assert torch.count_nonzero(layer.lora_B) == 0, (
        "B must start at zero so that B·A = 0 and the wrapped layer reproduces the base layer exactly"
    )
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel() and layer.lora_A.std() > 0, (
        "A must start random (Kaiming-uniform): with A = 0 as well, no gradient ever reaches B or A"
    )
    bound = 1 / 64**0.5  # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound + 1e-7, (
        f"A must be Kaiming-uniform with a=sqrt(5), i.e. within ±1/sqrt(in_features) = ±{bound:.4f}; "
        f"got max |A| = {layer.lora_A.abs().max():.4f}"
    )


@pytest.mark.exercise("1.1")
def test_from_linear_wraps_without_copying(lora):
    linear = nn.Linear(10, 6)
    layer = lora.LoRALayer.from_linear(linear, r=2, lora_alpha=4)
    assert layer.base_layer is linear, "from_linear must wrap the given layer itself, not a copy of it"
    assert not linear.weight.requires_grad, "from_linear must freeze the wrapped layer's weight"
    assert tuple(layer.lora_A.shape) == (2, 10) and tuple(layer.lora_B.shape) == (6, 2)


@pytest.mark.exercise("1.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [({"r": 0}, "r"), ({"lora_alpha": 0}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout")],
)
def test_lora_layer_rejects_bad_arguments(lora, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        lora.LoRALayer(8, 8, **kwargs)


# ---- Exercise 1.2: forward --------------------------------------------------------------------


@pytest.mark.exercise("1.2")
def test_fresh_layer_equals_base_layer(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    x = torch.randn(5, 16)
    assert_close(
        layer(x), layer.base_layer(x), "output of a fresh LoRALayer", "with B = 0 the layer must return base_layer(x)"
    )


@pytest.mark.exercise("1.2")
def test_forward_matches_the_formula(lora):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8)
    randomize_lora(layer)
    x = torch.randn(5, 16)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (8 / 4) * (x @ A.T @ B.T)
    assert_close(
        layer(x),
        expected,
        "LoRALayer(x)",
        "h = W0 x + b + (lora_alpha / r) · B A x; check the scaling (alpha / r, not alpha) and A/B orientation",
    )


@pytest.mark.exercise("1.2")
def test_forward_keeps_leading_dimensions(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    randomize_lora(layer)
    x = torch.randn(2, 3, 7, 16)
    out = layer(x)
    assert tuple(out.shape) == (2, 3, 7, 12), f"(2, 3, 7, 16) must map to (2, 3, 7, 12), got {tuple(out.shape)}"
    assert_close(out[1, 2], layer(x[1, 2]), "a slice of a batched call", "treat every leading dimension as batch")


@pytest.mark.exercise("1.2")
def test_gradients_reach_only_lora(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    layer(torch.randn(5, 16)).square().sum().backward()
    assert layer.base_layer.weight.grad is None, "the frozen base weight must get no gradient"
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0, "B must get a gradient"
    assert layer.lora_A.grad is not None, "A must be part of the graph"


# ---- Exercise 1.3: merge and unmerge ---------------------------------------------------------


@pytest.mark.exercise("1.3")
def test_delta_weight_is_scaled_B_times_A(lora):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8)
    randomize_lora(layer)
    assert_close(
        layer.delta_weight(),
        2.0 * layer.lora_B.detach() @ layer.lora_A.detach(),
        "delta_weight()",
        "ΔW = (lora_alpha / r) · B @ A, shape (out_features, in_features)",
        check_dtype=False,
    )


@pytest.mark.exercise("1.3")
def test_merge_keeps_outputs_and_updates_weight(lora):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8)
    randomize_lora(layer)
    x = torch.randn(5, 16)
    before, weight = layer(x).detach(), layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged is True, "merge() must set merged = True"
    assert_close(layer(x), before, "output after merge()", "a merged layer must compute the same function")
    assert_close(
        layer.base_layer.weight.detach(),
        weight + layer.delta_weight().detach(),
        "weight after merge()",
        "merge() adds ΔW = scaling · B @ A to base_layer.weight",
    )


@pytest.mark.exercise("1.3")
def test_unmerge_restores_the_base_weight(lora):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8)
    randomize_lora(layer)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert layer.merged is False, "unmerge() must set merged = False"
    assert_close(layer.base_layer.weight.detach(), weight, "weight after merge(); unmerge()", "unmerge subtracts ΔW")


@pytest.mark.exercise("1.3")
def test_merge_twice_changes_nothing(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    randomize_lora(layer)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once), (
        "a second merge() must be a no-op (check the merged flag): ΔW was added twice"
    )


# ---- Exercise 2.1: LoRA in a model -----------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.exercise("2.1")
def test_get_lora_model_wraps_the_seven_projections(lora, tiny_model):
    model = lora.get_lora_model(tiny_model, r=2, lora_alpha=4)
    assert model is tiny_model, "get_lora_model modifies the model in place and returns it"
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, lora.LoRALayer))
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    expected = sorted(
        f"layers.{i}.{'self_attn' if p in attention else 'mlp'}.{p}" for i in range(2) for p in PROJECTIONS
    )
    assert wrapped == expected, f"by default the seven projections of every layer are wrapped;\nexpected {expected}\ngot {wrapped}"
    assert isinstance(model.lm_head, nn.Linear), "lm_head is not a default target and must stay a plain nn.Linear"


@pytest.mark.exercise("2.1")
def test_get_lora_model_trains_only_lora(lora, tiny_model):
    model = lora.get_lora_model(tiny_model, r=2)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    wrong = [name for name in trainable if not name.endswith(("lora_A", "lora_B"))]
    assert trainable and not wrong, f"only lora_A / lora_B may be trainable; also trainable: {wrong[:5]}"


@pytest.mark.exercise("2.1")
def test_get_lora_model_keeps_the_output(lora, tiny_model, token_ids):
    before = tiny_model(token_ids).detach()
    model = lora.get_lora_model(tiny_model, r=2)
    assert_close(model(token_ids), before, "logits right after get_lora_model", "fresh adapters (B = 0) change nothing")


@pytest.mark.exercise("2.1")
def test_target_modules_match_by_last_components(lora, tiny_model):
    lora.get_lora_model(tiny_model, r=2, target_modules=["self_attn.v_proj", "down_proj"])
    wrapped = sorted(name for name, m in tiny_model.named_modules() if isinstance(m, lora.LoRALayer))
    assert wrapped == [
        "layers.0.mlp.down_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.mlp.down_proj",
        "layers.1.self_attn.v_proj",
    ], f"a target names modules by their last path component(s); got {wrapped}"


# ---- Exercise 2.2: counting parameters -------------------------------------------------------


@pytest.mark.exercise("2.2")
def test_count_parameters(lora):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    lora.get_lora_model(model, r=8, target_modules=["0"])
    trainable, total = lora.count_parameters(model)
    assert trainable == 8 * (64 + 64), f"trainable must be r·(in + out) = 1,024, got {trainable:,}"
    assert total == 64 * 64 + 64 + 64 * 10 + 10 + 1024, f"total must count every parameter once (5,834), got {total:,}"


@pytest.mark.exercise("2.2")
def test_print_trainable_parameters_uses_peft_format(lora, capsys):
    layer = lora.LoRALayer(64, 64, r=8)  # 4,160 base + 1,024 LoRA
    lora.print_trainable_parameters(layer)
    assert capsys.readouterr().out.strip() == "trainable params: 1,024 || all params: 5,184 || trainable%: 19.7531", (
        "use PEFT's format: 'trainable params: {:,} || all params: {:,} || trainable%: {:.4f}'"
    )


# ---- Exercise 2.3: merging a whole model -----------------------------------------------------


@pytest.mark.exercise("2.3")
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(lora, tiny_model, token_ids):
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model, std=0.2)
    expected = tiny_model(token_ids).detach()
    plain = lora.merge_and_unload(tiny_model)
    left = [name for name, m in plain.named_modules() if isinstance(m, lora.LoRALayer)]
    assert not left, f"merge_and_unload must replace every LoRALayer by its base layer; still there: {left[:3]}"
    assert_close(plain(token_ids), expected, "logits after merge_and_unload", "merging is exact up to rounding")


@pytest.mark.exercise("2.3")
def test_merge_lora_and_unmerge_lora(lora, tiny_model, token_ids):
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model, std=0.2)
    expected = tiny_model(token_ids).detach()
    lora.merge_lora(tiny_model)
    assert all(layer.merged for _, layer in lora.lora_layers(tiny_model)), "merge_lora must merge every LoRA layer"
    assert_close(tiny_model(token_ids), expected, "logits after merge_lora", "merge each LoRALayer once")
    lora.unmerge_lora(tiny_model)
    assert not any(layer.merged for _, layer in lora.lora_layers(tiny_model)), "unmerge_lora must unmerge them all"
    assert_close(tiny_model(token_ids), expected, "logits after merge_lora; unmerge_lora")


# ---- Exercise 2.4: saving and loading adapters -----------------------------------------------


@pytest.mark.exercise("2.4")
def test_save_lora_writes_peft_files(lora, tiny_model, tmp_path):
    lora.get_lora_model(tiny_model, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lora.save_lora(tiny_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config.get("peft_type") == "LORA" and config.get("r") == 2 and config.get("lora_alpha") == 4, (
        f"adapter_config.json needs PEFT's fields peft_type='LORA', r, lora_alpha; got {config}"
    )
    assert sorted(config.get("target_modules", [])) == ["q_proj", "v_proj"], "target_modules: the wrapped names"
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys, (
        f"PEFT's keys are base_model.model.<module path>.lora_A.weight; got e.g. {keys[:2]}"
    )
    assert len(keys) == 2 * 2 * 2, f"2 layers × 2 targets × (A, B) = 8 tensors, got {len(keys)}"


@pytest.mark.exercise("2.4")
def test_load_lora_restores_the_outputs(lora, tiny_model, token_ids, tmp_path):
    fresh = type(tiny_model)(tiny_model.config).eval()
    fresh.load_state_dict(tiny_model.state_dict())
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model, std=0.2)
    expected = tiny_model(token_ids).detach()
    lora.save_lora(tiny_model, tmp_path)
    loaded = lora.load_lora(fresh, tmp_path)
    assert_close(loaded(token_ids), expected, "logits of base + loaded adapter", "load both A and B into every layer")
    assert F.mse_loss(loaded(token_ids), expected) < 1e-10
