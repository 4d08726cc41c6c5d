"""Advanced tests: edge cases, gradients, dtypes, devices, numerics against published references,
training outcomes. Same markers and points table as basic_test.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from testcases.helpers import assert_unchanged, copy_of, make_trainer, randomize_lora, snapshot
from testcases.tolerances import assert_close

# ---- Exercise 1.1: the LoRA layer -----------------------------------------------------------


@pytest.mark.exercise("1.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"r": -1}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_alpha": -4}, "lora_alpha"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": -3}, "out_features"),
    ],
)
def test_lora_layer_error_names_the_argument_and_range(lora, kwargs, argument):
    args = {"in_features": 8, "out_features": 8, **kwargs}
    with pytest.raises(ValueError, match=argument) as error:
        lora.LoRALayer(**args)
    assert any(ch.isdigit() for ch in str(error.value)), (
        f"the message should also say the allowed values (e.g. 'r must be an int >= 1'), got: {error.value}"
    )


@pytest.mark.exercise("1.1")
def test_kaiming_init_has_the_right_spread(lora):
    layer = lora.LoRALayer(1024, 16, r=64)
    bound = 1 / math.sqrt(1024)
    std = layer.lora_A.std().item()
    assert abs(std - bound / math.sqrt(3)) < 0.05 * bound, (
        f"Kaiming-uniform(a=√5) on (r, in) draws U(±1/√in): std should be {bound / math.sqrt(3):.5f}, got {std:.5f}. "
        "Did you initialise with the wrong fan (out or r) or a normal distribution?"
    )


@pytest.mark.exercise("1.1")
def test_gaussian_init_option(lora):
    layer = lora.LoRALayer(256, 256, r=4, init_lora_weights="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.02, "'gaussian' draws A ~ N(0, (1/r)^2), as PEFT does"
    assert torch.count_nonzero(layer.lora_B) == 0, "B is zero for every init method"


@pytest.mark.exercise("1.1")
def test_from_linear_keeps_device_and_bias(lora, device):
    linear = nn.Linear(8, 4).to(device)
    layer = lora.LoRALayer.from_linear(linear, r=2)
    assert layer.lora_A.device.type == device.type and layer.lora_B.device.type == device.type, (
        "lora_A and lora_B must live on the base layer's device"
    )
    assert layer.base_layer.bias is linear.bias and not linear.bias.requires_grad, "the bias is kept and frozen"


# ---- Exercise 1.2: forward --------------------------------------------------------------------


@pytest.mark.exercise("1.2")
def test_dropout_only_on_the_lora_input(lora):
    layer = lora.LoRALayer(64, 32, r=8, lora_dropout=0.5).train()
    x = torch.randn(20, 64)
    assert_close(
        layer(x), layer.base_layer(x), "training-mode output with B = 0", "dropout must never touch the base path"
    )
    randomize_lora(layer)
    delta = layer(x) - layer.base_layer(x)
    zeros = (delta == 0).float().mean().item()
    assert zeros < 0.05, (
        f"{zeros:.0%} of the LoRA update's elements are exactly 0: dropout seems applied to the LoRA *output*; "
        "it belongs on the LoRA input: B(A(dropout(x)))"
    )
    layer.eval()
    assert_close(layer(x) - layer.base_layer(x), 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T), "eval-mode update")


@pytest.mark.exercise("1.2")
def test_gradient_of_A_is_zero_at_init(lora):
    """With B = 0, dL/dA = B^T (...) = 0: only B moves on the first step (a known LoRA property)."""
    layer = lora.LoRALayer(16, 12, r=4)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0, "at init dL/dA must be 0 because B = 0"
    assert_close(
        x.grad, layer.base_layer.weight.sum(0).expand(5, 16), "dL/dx at init", "the input gradient is W0's only"
    )


@pytest.mark.exercise("1.2")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_keeps_a_low_precision_input_dtype(lora, dtype):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8)
    randomize_lora(layer)
    layer.base_layer.to(dtype)  # a half-precision base; LoRA stays fp32
    x = torch.randn(3, 16)
    out = layer(x.to(dtype))
    assert out.dtype == dtype, f"input {dtype} must give output {dtype}, got {out.dtype} (cast the LoRA result back)"
    expected = layer.base_layer(x.to(dtype)).float() + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert_close(out, expected.to(dtype), f"{dtype} forward", "compute the LoRA branch, then cast to the base dtype")


@pytest.mark.exercise("1.2")
def test_forward_under_bf16_autocast(lora, device):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8).to(device)
    randomize_lora(layer)
    x = torch.randn(3, 16, device=device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16, f"under bf16 autocast the output is bf16, got {out.dtype}"
    assert layer.lora_A.dtype == torch.float32, "the trainable LoRA weights stay fp32 (autocast casts copies)"
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert_close(out, expected.to(torch.bfloat16), "bf16 autocast forward", dtype=torch.bfloat16)


@pytest.mark.exercise("1.2")
def test_forward_on_device(lora, device):
    layer = lora.LoRALayer(16, 12, r=4, lora_alpha=8).to(device)
    randomize_lora(layer)
    x = torch.randn(4, 16, device=device)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    assert_close(layer(x), x @ W.T + b + 2.0 * (x @ A.T @ B.T), f"forward on {device.type}")


@pytest.mark.exercise("1.2")
def test_rank_one_update_is_exact_outer_product(lora):
    layer = lora.LoRALayer(3, 2, r=1, lora_alpha=1)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0], [-1.0]]))
    out = layer(torch.tensor([[1.0, 1.0, 1.0]]))
    assert_close(out, torch.tensor([[6.0, -6.0]]), "a hand-computed rank-1 case", "h = B (A x) with A·x = 6")


# ---- Exercise 1.3: merge and unmerge ---------------------------------------------------------


@pytest.mark.exercise("1.3")
def test_merged_forward_runs_the_base_only(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    randomize_lora(layer)
    x = torch.randn(5, 16)
    expected = layer(x).detach()
    layer.merge()
    assert_close(layer(x), expected, "merged output", "when merged, forward must not add B A x a second time")


@pytest.mark.exercise("1.3")
def test_unmerge_twice_changes_nothing_and_bias_is_untouched(lora):
    layer = lora.LoRALayer(16, 12, r=4)
    randomize_lora(layer)
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    layer.unmerge()  # not merged: a no-op
    assert torch.equal(layer.base_layer.weight, weight), "unmerge() on an unmerged layer must change nothing"
    layer.merge()
    assert torch.equal(layer.base_layer.bias, bias), "ΔW changes the weight only, never the bias"
    layer.unmerge()
    layer.unmerge()
    assert_close(layer.base_layer.weight.detach(), weight, "weight after merge, unmerge, unmerge")


@pytest.mark.exercise("1.3")
def test_merge_round_trip_is_exact_up_to_rounding(lora):
    torch.manual_seed(3)
    layer = lora.LoRALayer(256, 256, r=8, lora_alpha=16)
    randomize_lora(layer, std=0.1)
    weight = layer.base_layer.weight.detach().clone()
    for _ in range(10):
        layer.merge()
        layer.unmerge()
    drift = (layer.base_layer.weight - weight).abs().max().item()
    assert drift < 1e-5, f"10 merge/unmerge round trips drifted W0 by {drift:.2e}: merging must be exact up to rounding"


@pytest.mark.exercise("1.3")
def test_delta_weight_has_rank_at_most_r(lora):
    layer = lora.LoRALayer(64, 48, r=3)
    randomize_lora(layer)
    rank = torch.linalg.matrix_rank(layer.delta_weight().detach()).item()
    assert tuple(layer.delta_weight().shape) == (48, 64), "ΔW has the shape of base_layer.weight (out, in)"
    assert rank == 3, f"ΔW = B A must have rank r = 3, got {rank}"


@pytest.mark.exercise("1.3")
def test_merge_refuses_a_non_linear_base(lora):
    class Scale(nn.Module):
        in_features = out_features = 4

        def forward(self, x):
            return 2 * x

    layer = lora.LoRALayer(4, 4, r=2, base_layer=Scale())
    with pytest.raises(TypeError, match="nn.Linear|Linear"):
        layer.merge()
    assert layer.merged is False


# ---- Exercise 2.1: LoRA in a model -----------------------------------------------------------


@pytest.mark.exercise("2.1")
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_modules": ["qproj"]}, "qproj"),  # a typo matches nothing
        ({"target_modules": ["q_proj", "nonexistent"]}, "nonexistent"),
        ({"target_modules": ["mlp"]}, "mlp"),  # not a linear layer
        ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
        ({"r": 0}, "r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
    ],
)
def test_get_lora_model_bad_input_leaves_the_model_unchanged(lora, tiny_model, kwargs, match):
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=match):
        lora.get_lora_model(tiny_model, **kwargs)
    assert_unchanged(tiny_model, before, "get_lora_model")


@pytest.mark.exercise("2.1")
def test_get_lora_model_refuses_to_wrap_twice(lora, tiny_model):
    lora.get_lora_model(tiny_model, r=2)
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match="already"):
        lora.get_lora_model(tiny_model, r=2)
    assert_unchanged(tiny_model, before, "a second get_lora_model")


@pytest.mark.exercise("2.1")
def test_get_lora_model_passes_the_hyperparameters(lora, tiny_model):
    lora.get_lora_model(tiny_model, r=3, lora_alpha=12, lora_dropout=0.1, target_modules="o_proj")
    layers = dict(lora.lora_layers(tiny_model))
    assert sorted(layers) == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"], "a single string is one target"
    for layer in layers.values():
        assert layer.r == 3 and layer.scaling == pytest.approx(4.0), "pass r and lora_alpha to every LoRALayer"
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1, "pass lora_dropout too"


@pytest.mark.exercise("2.1")
@pytest.mark.parametrize(
    "bias, trainable_biases",
    [("none", []), ("all", ["0.base_layer.bias", "2.bias"]), ("lora_only", ["0.base_layer.bias"])],
)
def test_mark_only_lora_as_trainable_bias_modes(lora, bias, trainable_biases):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lora.get_lora_model(model, r=2, target_modules=["0"])
    lora.mark_only_lora_as_trainable(model, bias=bias)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    expected = sorted(["0.lora_A", "0.lora_B", *trainable_biases])
    assert trainable == expected, f"bias={bias!r}: expected trainable {expected}, got {trainable}"


@pytest.mark.exercise("2.1")
def test_mark_only_lora_as_trainable_rejects_unknown_bias_mode(lora):
    with pytest.raises(ValueError, match="bias"):
        lora.mark_only_lora_as_trainable(nn.Linear(2, 2), bias="some")


@pytest.mark.exercise("2.1")
def test_lora_model_trains_on_a_batch(lora, tiny_model, token_ids):
    """A few optimizer steps on the adapter alone lower the loss and leave the base bit-identical."""
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = lora.get_lora_model(tiny_model, r=4, lora_alpha=8).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    targets = torch.roll(token_ids, -1, dims=1)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(token_ids).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, (
        f"the loss should fall when only LoRA trains: {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    for key, value in base.items():
        wrapped = key.replace("_proj.weight", "_proj.base_layer.weight")
        now = model.state_dict().get(wrapped, model.state_dict().get(key))
        assert torch.equal(now, value), f"the frozen weight {key} changed during LoRA training"


# ---- Exercise 2.2: counting parameters -------------------------------------------------------


@pytest.mark.exercise("2.2")
def test_count_parameters_counts_shared_tensors_once(lora):
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, as in many language models
    model = nn.Sequential(embed, head)
    assert lora.count_parameters(model) == (40, 40), "a tied weight is one tensor: count it once"


@pytest.mark.exercise("2.2")
def test_count_parameters_on_the_tiny_llama(lora, tiny_model):
    total_before = sum(p.numel() for p in tiny_model.parameters())
    lora.get_lora_model(tiny_model, r=2)
    d, f = 16, 32  # width and MLP size of the test model
    per_layer = 4 * 2 * (d + d) + 2 * 2 * (d + f) + 2 * (f + d)
    assert lora.count_parameters(tiny_model) == (2 * per_layer, total_before + 2 * per_layer), (
        f"expected (trainable, total) = ({2 * per_layer}, {total_before + 2 * per_layer}): r·(in + out) per wrapped layer"
    )


@pytest.mark.exercise("2.2")
def test_print_trainable_parameters_returns_the_line(lora, capsys):
    model = nn.Sequential(nn.Linear(100, 100, bias=False))
    lora.get_lora_model(model, r=1, target_modules=["0"])
    line = lora.print_trainable_parameters(model)
    assert line == "trainable params: 200 || all params: 10,200 || trainable%: 1.9608", f"got {line!r}"
    assert capsys.readouterr().out.strip() == line


# ---- Exercise 2.3: merging a whole model -----------------------------------------------------


@pytest.mark.exercise("2.3")
def test_merge_lora_twice_is_safe(lora, tiny_model, token_ids):
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model, std=0.2)
    expected = tiny_model(token_ids).detach()
    lora.merge_lora(tiny_model)
    lora.merge_lora(tiny_model)
    assert_close(tiny_model(token_ids), expected, "logits after merge_lora twice", "merge must be idempotent")


@pytest.mark.exercise("2.3")
def test_merge_and_unload_leaves_only_plain_linear_layers(lora, tiny_model, token_ids):
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model, std=0.2)
    expected = tiny_model(token_ids).detach()
    plain = lora.merge_and_unload(tiny_model)
    names = [name for name, _ in plain.named_parameters()]
    assert not any("lora" in n or "base_layer" in n for n in names), (
        f"LoRA leftovers: {[n for n in names if 'lora' in n][:3]}"
    )
    assert plain.layers[0].self_attn.q_proj.weight.shape == (16, 16), "q_proj is an nn.Linear of the base shape again"
    assert_close(plain(token_ids), expected, "logits of the unloaded model")


# ---- Exercise 2.4: saving and loading adapters -----------------------------------------------


def _saved_adapter(lora, model, path, **kwargs):
    lora.get_lora_model(model, **kwargs)
    randomize_lora(model, std=0.2)
    lora.save_lora(model, path)
    return model


@pytest.mark.exercise("2.4")
def test_load_lora_into_a_model_that_already_has_lora(lora, tiny_model, token_ids, tmp_path):
    target = copy_of(tiny_model)
    _saved_adapter(lora, tiny_model, tmp_path, r=2, lora_alpha=4)
    lora.get_lora_model(target, r=2, lora_alpha=4)
    lora.load_lora(target, tmp_path)
    assert_close(target(token_ids), tiny_model(token_ids), "logits after loading into existing LoRA layers")


@pytest.mark.exercise("2.4")
def test_load_lora_rejects_a_wrong_rank(lora, tiny_model, tmp_path):
    target = copy_of(tiny_model)
    _saved_adapter(lora, tiny_model, tmp_path, r=2)
    lora.get_lora_model(target, r=4)
    before = snapshot(target)
    with pytest.raises(ValueError, match="r"):
        lora.load_lora(target, tmp_path)
    assert_unchanged(target, before, "load_lora with the wrong rank")


@pytest.mark.exercise("2.4")
def test_load_lora_rejects_a_different_alpha(lora, tiny_model, tmp_path):
    target = copy_of(tiny_model)
    _saved_adapter(lora, tiny_model, tmp_path, r=2, lora_alpha=4)
    lora.get_lora_model(target, r=2, lora_alpha=16)
    before = snapshot(target)
    with pytest.raises(ValueError, match="lora_alpha"):
        lora.load_lora(target, tmp_path)
    assert_unchanged(target, before, "load_lora with a different lora_alpha (a different scaling)")


@pytest.mark.exercise("2.4")
def test_load_lora_rejects_missing_modules(lora, tiny_model, tmp_path):
    """An adapter for q_proj only cannot fill a model whose v_proj also has LoRA."""
    target = copy_of(tiny_model)
    _saved_adapter(lora, tiny_model, tmp_path, r=2, target_modules=["q_proj"])
    lora.get_lora_model(target, r=2, target_modules=["q_proj", "v_proj"])
    before = snapshot(target)
    with pytest.raises(ValueError, match="v_proj"):
        lora.load_lora(target, tmp_path)
    assert_unchanged(target, before, "load_lora with missing modules")


@pytest.mark.exercise("2.4")
def test_load_lora_rejects_an_adapter_for_another_model(lora, tiny_model, tmp_path):
    from model.tiny_llama import LlamaConfig, TinyLlama

    bigger = TinyLlama(LlamaConfig(vocab_size=18, max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=32))
    _saved_adapter(lora, bigger, tmp_path, r=2)
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora(tiny_model, tmp_path)
    assert_unchanged(tiny_model, before, "load_lora of an adapter made for a wider model")


@pytest.mark.exercise("2.4")
def test_adapter_for_one_layer_loads_into_a_fresh_base(lora, tiny_model, token_ids, tmp_path):
    fresh = copy_of(tiny_model)
    _saved_adapter(lora, tiny_model, tmp_path, r=2, target_modules=["layers.0.self_attn.q_proj"])
    lora.load_lora(fresh, tmp_path)
    wrapped = [path for path, _ in lora.lora_layers(fresh)]
    assert wrapped == ["layers.0.self_attn.q_proj"], f"wrap exactly the modules the adapter file has, got {wrapped}"
    assert_close(fresh(token_ids), tiny_model(token_ids), "logits after loading a one-layer adapter")


@pytest.mark.exercise("2.4")
def test_save_lora_refuses_to_drop_trained_biases(lora, tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    lora.get_lora_model(model, r=2, target_modules=["0"])
    lora.mark_only_lora_as_trainable(model, bias="all")
    with pytest.raises(ValueError, match="bias"):
        lora.save_lora(model, tmp_path)


@pytest.mark.exercise("2.4")
def test_adapter_config_is_what_peft_reads(lora, tiny_model, tmp_path):
    _saved_adapter(lora, tiny_model, tmp_path, r=2, lora_alpha=8, lora_dropout=0.05)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none"}.items():
        assert config.get(key) == value, f"adapter_config.json: {key} should be {value!r}, got {config.get(key)!r}"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.layers.1.mlp.up_proj.lora_A.weight"]
    b = tensors["base_model.model.layers.1.mlp.up_proj.lora_B.weight"]
    assert tuple(a.shape) == (2, 16) and tuple(b.shape) == (32, 2), "PEFT stores A as (r, in) and B as (out, r)"
    assert torch.equal(b, tiny_model.layers[1].mlp.up_proj.lora_B.detach()), "save the trained values"


# ---- Exercise 3.1: uniform (affine) quantization ---------------------------------------------


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("num_bits", [2, 3, 4, 5, 6, 7, 8])
def test_uniform_error_bound_for_every_width(quant, num_bits):
    x = torch.randn(1000) * 2 - 0.7
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=num_bits, block_size=128)
    assert int(q.max()) <= 2**num_bits - 1, (
        f"{num_bits}-bit codes must stay in [0, {2**num_bits - 1}], got max {int(q.max())}"
    )
    x_hat = quant.dequantize_tensor(q, scale, zero_point, block_size=128)
    step = scale.repeat_interleave(128)[:1000]
    worst = ((x_hat - x).abs() / step).max().item()
    assert worst <= 0.5 + 1e-4, f"{num_bits} bits: error {worst:.3f} steps > 0.5 (clamping or zero-point rounding?)"


@pytest.mark.exercise("3.1")
def test_uniform_range_includes_zero(quant):
    q, scale, zero_point = quant.quantize_tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), num_bits=2)
    assert zero_point.tolist() == [0] and scale.tolist() == [pytest.approx(4 / 3)], (
        f"all-positive data: the range is widened to [0, 4], so scale = 4/3 and zero_point = 0; "
        f"got scale {scale.tolist()}, zero_point {zero_point.tolist()}"
    )
    assert q.tolist() == [1, 2, 2, 3], f"q = round(x / scale) + zero_point = [1, 2, 2, 3], got {q.tolist()}"


@pytest.mark.exercise("3.1")
def test_uniform_zero_is_exact_and_constant_blocks_work(quant):
    x = torch.tensor([0.0, 0.3, 0.9, 0.0, 5.0, 5.0, 5.0, 5.0])  # block 2 is constant and positive
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=4, block_size=4)
    x_hat = quant.dequantize_tensor(q, scale, zero_point, block_size=4)
    assert x_hat[0] == 0 and x_hat[3] == 0, "0 must be exactly representable: widen [min, max] to include 0"
    assert_close(x_hat[4:], x[4:], "a constant block", "with the range widened to include 0, max maps to qmax exactly")
    zeros = torch.zeros(10)
    q, scale, zero_point = quant.quantize_tensor(zeros, num_bits=8)
    assert torch.equal(quant.dequantize_tensor(q, scale, zero_point), zeros), (
        "an all-zero tensor must not divide by zero"
    )


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_bits": 1}, "num_bits"),
        ({"num_bits": 9}, "num_bits"),
        ({"num_bits": 4.0}, "num_bits"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_uniform_rejects_bad_arguments(quant, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        quant.quantize_tensor(torch.randn(8), **kwargs)


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_uniform_rejects_non_finite_input(quant, bad):
    x = torch.randn(8)
    x[2] = bad
    with pytest.raises(ValueError, match="x"):
        quant.quantize_tensor(x)


# ---- Exercise 3.2: absmax quantization --------------------------------------------------------


@pytest.mark.exercise("3.2")
def test_absmax_int4_range_and_error_bound(quant):
    x = torch.randn(4, 96)
    q, scale = quant.absmax_quantize(x, num_bits=4, block_size=64)
    assert scale.shape == (6,), f"384 elements in blocks of 64: 6 scales, got {tuple(scale.shape)}"
    assert int(q.abs().max()) == 7, f"int4 codes span -7…7 (qmax = 2^(4-1) - 1), got max |q| = {int(q.abs().max())}"
    x_hat = quant.absmax_dequantize(q, scale, block_size=64)
    step = scale.repeat_interleave(64).view_as(x)
    assert ((x_hat - x).abs() <= step / 2 + 1e-6).all(), "absmax round trip must stay within half a step"


@pytest.mark.exercise("3.2")
def test_absmax_zero_block_and_bad_input(quant):
    x = torch.cat([torch.zeros(64), torch.randn(64)])
    q, scale = quant.absmax_quantize(x, block_size=64)
    x_hat = quant.absmax_dequantize(q, scale, block_size=64)
    assert torch.isfinite(x_hat).all() and (x_hat[:64] == 0).all(), "an all-zero block must come back as zeros, no NaN"
    with pytest.raises(ValueError, match="num_bits"):
        quant.absmax_quantize(x, num_bits=16)
    with pytest.raises(ValueError, match="x"):
        quant.absmax_quantize(torch.tensor([1.0, float("nan")]))


# ---- Exercise 3.3: code books -----------------------------------------------------------------


@pytest.mark.exercise("3.3")
def test_nf4_code_book_bit_exact_with_bitsandbytes(quant, golden):
    book = quant.nf4_code_book()
    assert torch.equal(book, golden["codebook.nf4"]), (
        f"bit-exact with bitsandbytes' table; max difference {(book - golden['codebook.nf4']).abs().max():.3g}. "
        "Make the probabilities with a float32 linspace and normalise in float32."
    )
    assert torch.equal(book, book.sort().values), "levels must be ascending (nearest_code relies on it)"


@pytest.mark.exercise("3.3")
def test_nf4_beats_fp4_and_int4_on_gaussian_weights(quant):
    x = torch.randn(64 * 512)
    errors = {}
    for name, code in (("nf4", quant.nf4_code_book()), ("fp4", quant.fp4_code_book())):
        codes, absmax = quant.quantize_blockwise(x, code, 64)
        errors[name] = (quant.dequantize_blockwise(codes, absmax, code, 64) - x).abs().mean().item()
    q, scale = quant.absmax_quantize(x, num_bits=4, block_size=64)
    errors["int4"] = (quant.absmax_dequantize(q, scale, block_size=64) - x).abs().mean().item()
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"], (
        f"NF4 is information-theoretically optimal for normal weights (QLoRA §3): mean |error| {errors}"
    )


# ---- Exercise 3.4: NF4 blockwise quantization ------------------------------------------------

NF4_CASES = [
    ("nf4_fp32_16x64", 64),
    ("nf4_fp32_7x13", 64),
    ("nf4_fp32_3x70", 64),
    ("nf4_fp16_8x40", 64),
    ("nf4_bf16_8x40", 64),
    ("nf4_fp32_outlier", 64),
    ("nf4_fp32_8x256_bs128", 128),
    ("nf4_fp32_8x256_bs256", 256),
    ("nf4_fp32_16x64_bs128", 128),
]


@pytest.mark.exercise("3.4")
@pytest.mark.parametrize("case, block_size", NF4_CASES)
def test_nf4_byte_identical_to_bitsandbytes(quant, golden, case, block_size):
    x = golden[f"{case}.input"]
    packed, absmax = quant.quantize_nf4(x, block_size=block_size)
    assert torch.equal(absmax, golden[f"{case}.absmax"]), (
        f"{case}: absmax differs; blocks run over the FLATTENED tensor (not per row), a partial last block has its own"
    )
    expected = golden[f"{case}.packed"]
    assert packed.shape == expected.shape, f"{case}: expected {expected.numel()} bytes, got {tuple(packed.shape)}"
    differ = (packed != expected).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{case}: {differ.numel()} of {expected.numel()} bytes differ; first: byte {int(differ[0])} is "
        f"{int(packed[differ[0]]):#04x}, bitsandbytes wrote {int(expected[differ[0]]):#04x} "
        "(even element in the HIGH nibble; an odd count padded with the code of 0.0)"
    )
    out = quant.dequantize_nf4(packed, absmax, x.shape, block_size=block_size, dtype=x.dtype)
    assert out.dtype == x.dtype, f"dequantize_nf4(dtype={x.dtype}) must return {x.dtype}, got {out.dtype}"
    assert torch.equal(out, golden[f"{case}.dequant"]), f"{case}: dequantized values differ from bitsandbytes"


@pytest.mark.exercise("3.4")
def test_nf4_ties_and_reciprocal(quant, golden):
    """Block 0: the 15 midpoints (ties → lower code) and their fp32 neighbours; block 1: the same ×2;
    block 2: values whose code differs between x·(1/3) and x/3 (multiply by the reciprocal).

    Block 3, a partial last block, is left out: bitsandbytes' CPU fallback divides there (its CUDA
    kernel multiplies, as we do)."""
    x = golden["nf4_fp32_ties.input"]
    packed, _ = quant.quantize_nf4(x)
    codes = quant.unpack_nibbles(packed, x.numel())[:192]
    expected = golden["nf4_fp32_ties.codes"][:192]
    differ = (codes != expected).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{differ.numel()} codes differ, first at element {int(differ[0])} (block {int(differ[0]) // 64}): got "
        f"{int(codes[differ[0]])}, expected {int(expected[differ[0]])}. Block 0/1: a tie goes to the LOWER code; "
        "block 2: scale with x * (1 / absmax), not x / absmax"
    )


@pytest.mark.exercise("3.4")
def test_nf4_zero_blocks(quant, golden):
    x = golden["nf4_fp32_zero_blocks.input"]
    packed, absmax = quant.quantize_nf4(x)
    assert torch.isfinite(absmax).all() and absmax[1] == 0, "an all-zero block has absmax 0 (no division by zero)"
    assert torch.equal(packed, golden["nf4_fp32_zero_blocks.packed"]), "all-zero blocks take the code of 0.0 (7)"
    out = quant.dequantize_nf4(packed, absmax, x.shape)
    assert (out.flatten()[64:] == 0).all(), "all-zero blocks must come back as exact zeros"
    assert torch.equal(out, golden["nf4_fp32_zero_blocks.dequant"]), "the other blocks as bitsandbytes"


@pytest.mark.exercise("3.4")
def test_nf4_round_trip_bound(quant):
    book = quant.nf4_code_book()
    half_gap = ((book[1:] - book[:-1]) / 2).max().item()
    x = torch.randn(33, 77) * 0.05
    packed, absmax = quant.quantize_nf4(x)
    err = (quant.dequantize_nf4(packed, absmax, x.shape) - x).abs()
    bound = (absmax.repeat_interleave(64)[: x.numel()] * half_gap).view_as(x) + 1e-7
    assert (err <= bound).all(), (
        "each element must be within half the widest gap between NF4 levels × its block's absmax"
    )


@pytest.mark.exercise("3.4")
def test_nf4_bad_input(quant):
    with pytest.raises(ValueError, match="x"):
        quant.quantize_nf4(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_nf4(torch.randn(10), block_size=0)
    packed, absmax = quant.quantize_nf4(torch.randn(10))
    with pytest.raises(ValueError, match="packed"):
        quant.dequantize_nf4(packed, absmax, (4, 4))  # 16 elements need 8 bytes, not 5


@pytest.mark.exercise("3.4")
def test_nf4_on_device(quant, device):
    x = torch.randn(9, 31, device=device)
    packed, absmax = quant.quantize_nf4(x)
    assert packed.device.type == device.type and absmax.device.type == device.type, "keep the codes on x's device"
    cpu_packed, _ = quant.quantize_nf4(x.cpu())
    assert torch.equal(packed.cpu(), cpu_packed), f"NF4 codes on {device.type} must equal those on the CPU"


# ---- Exercise 3.5: double quantization -------------------------------------------------------


@pytest.mark.exercise("3.5")
@pytest.mark.parametrize("case", ["dq_fp32_64x512", "dq_fp32_40x500"])
def test_double_quantization_against_bitsandbytes(quant, golden, case):
    """Codes: the exact nearest 8-bit level. bitsandbytes' CPU kernel looks codes up in a 65,536-entry
    table that is not always the nearest, so a few codes may differ; ours must never be further away."""
    absmax = golden[f"{case}.absmax_fp32"]
    codes, scale, offset = quant.double_quantize(absmax)
    assert torch.equal(scale, golden[f"{case}.absmax2"]), "per-block scale of (absmax - mean) in blocks of 256"
    same = (codes == golden[f"{case}.qabsmax"]).float().mean().item()
    assert same > 0.99, f"only {same:.1%} of the 8-bit codes equal bitsandbytes' (dynamic code, blocks of 256)"
    ours = quant.double_dequantize(codes, scale, offset)
    theirs = golden[f"{case}.absmax_dequant"]
    assert ((ours - absmax).abs() <= (theirs - absmax).abs() + 1e-9).all(), "the nearest code is never worse than bnb's"
    replay = quant.double_dequantize(golden[f"{case}.qabsmax"], golden[f"{case}.absmax2"], golden[f"{case}.offset"][0])
    assert torch.equal(replay, theirs), "double_dequantize: code[q] · scale + offset, in float32"


@pytest.mark.exercise("3.5")
def test_double_quantization_needs_the_offset(quant):
    """absmax values are all positive: without subtracting the mean, half of the signed code is wasted."""
    absmax = torch.rand(1024) * 0.1 + 1.0  # all around 1.05
    codes, scale, offset = quant.double_quantize(absmax)
    assert abs(offset.item() - absmax.mean().item()) < 1e-6, "offset must be the mean of the absmax values"
    error = (quant.double_dequantize(codes, scale, offset) - absmax).abs().max().item()
    assert error < 2e-3, f"max error {error:.2e}: quantize absmax - mean, then add the mean back"


# ---- Exercise 3.6: NF4Linear -----------------------------------------------------------------


@pytest.mark.exercise("3.6")
def test_nf4_linear_weight_equals_nf4_round_trip(quant):
    linear = nn.Linear(96, 40, bias=False)
    layer = quant.NF4Linear.from_linear(linear, double_quant=False)
    packed, absmax = quant.quantize_nf4(linear.weight.detach())
    assert torch.equal(layer.dequantize_weight(), quant.dequantize_nf4(packed, absmax, (40, 96))), (
        "dequantize_weight must return exactly dequantize_nf4(quantize_nf4(W))"
    )
    assert layer.bias is None and layer(torch.randn(2, 96)).shape == (2, 40), "a layer without bias stays without"
    dq = quant.NF4Linear.from_linear(linear, double_quant=True)
    diff = (dq.dequantize_weight() - layer.dequantize_weight()).abs().max().item()
    assert diff < 1e-3, f"double quantization changes the weight by at most 8-bit absmax error, got {diff:.2e}"


@pytest.mark.exercise("3.6")
def test_nf4_linear_compute_dtype(quant):
    layer = quant.NF4Linear.from_linear(nn.Linear(64, 16), compute_dtype=torch.bfloat16)
    out = layer(torch.randn(3, 64))
    assert out.dtype == torch.bfloat16, f"compute_dtype=bfloat16: output must be bf16, got {out.dtype}"
    assert layer.dequantize_weight().dtype == torch.bfloat16
    assert layer.dequantize_weight(torch.float32).dtype == torch.float32


@pytest.mark.exercise("3.6")
def test_nf4_linear_bits_per_parameter_and_state_dict(quant):
    layer = quant.NF4Linear.from_linear(nn.Linear(4096, 64))
    bits = layer.weight_nbytes() * 8 / (4096 * 64)
    assert abs(bits - quant.bits_per_parameter(64, double_quant=True)) < 0.01, f"measured {bits:.4f} bits per parameter"
    fresh = quant.NF4Linear(4096, 64, double_quant=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4096)
    assert torch.equal(fresh(x), layer(x)), "codes and constants must be buffers, so state_dict round-trips"


@pytest.mark.exercise("3.6")
def test_nf4_linear_on_device(quant, device):
    linear = nn.Linear(64, 32).to(device)
    layer = quant.NF4Linear.from_linear(linear)
    x = torch.randn(5, 64, device=device)
    out = layer(x)
    assert out.device.type == device.type, f"output on {device.type}"
    assert (out - linear(x)).abs().max() < 0.2, "NF4Linear approximates the original layer"


# ---- Exercise 3.7: fake quantization ---------------------------------------------------------


@pytest.mark.exercise("3.7")
def test_fake_quantize_blocks_dtype_and_training(quant):
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    y = quant.fake_quantize(x, num_bits=8, block_size=32)
    assert y.dtype == torch.float64 and y.shape == x.shape, "same dtype and shape as the input"
    assert (y - x).abs().max() < 0.05, "8-bit fake quantization stays close to x"
    weight = torch.randn(16, requires_grad=True)
    target = torch.linspace(-1, 1, 16)
    opt = torch.optim.SGD([weight], lr=0.5)
    for _ in range(50):
        loss = (quant.fake_quantize(weight, num_bits=8) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"QAT with the straight-through estimator must still learn (loss {loss.item():.3f})"


# ---- Exercise 4.1: TrainConfig -------------------------------------------------------------


@pytest.mark.exercise("4.1")
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"quantize": "int8"}, "quantize"),
        ({"device": "tpu"}, "device"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"precision": "fp16", "device": "cpu"}, "fp16"),
    ],
)
def test_train_config_names_the_field(trainer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        trainer.TrainConfig(**kwargs)


@pytest.mark.exercise("4.1")
def test_resolve_device_auto(trainer):
    device = trainer.resolve_device(trainer.TrainConfig(device="auto", precision="bf16"))
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu"), "auto: cuda when present, else cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda|CUDA"):
            trainer.resolve_device(trainer.TrainConfig(device="cuda"))


@pytest.mark.exercise("4.1")
def test_command_line_exposes_train_config(trainer):
    parser = trainer.config_parser()
    args = parser.parse_args(["--r", "4", "--max-steps", "7", "--precision", "fp32"])
    config = trainer.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    assert (config.r, config.max_steps, config.precision) == (4, 7, "fp32")
    assert "LoRA rank" in parser.format_help(), "each option's help is the field's comment"


# ---- Exercise 4.2: prepare_qlora_model ---------------------------------------------------------


@pytest.mark.exercise("4.2")
def test_prepared_model_starts_as_the_quantized_base(trainer, tiny_model, token_ids):
    """B = 0, so the prepared model computes exactly what the NF4-quantized base computes."""
    from model.quant import dequantize_nf4, quantize_nf4

    reference = copy_of(tiny_model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                packed, absmax = quantize_nf4(module.weight)
                module.weight.copy_(dequantize_nf4(packed, absmax, module.weight.shape))
    model = trainer.prepare_qlora_model(
        tiny_model, trainer.TrainConfig(r=2, precision="fp32", double_quant=False)
    ).eval()
    assert_close(model(token_ids), reference(token_ids), "prepared model at init vs the NF4 round-tripped base")


@pytest.mark.exercise("4.2")
def test_prepare_respects_targets_precision_and_checkpointing(trainer, tiny_model):
    from model.lora import LoRALayer
    from model.quant import NF4Linear

    config = trainer.TrainConfig(
        r=2, target_modules=("q_proj", "v_proj"), precision="bf16", gradient_checkpointing=True
    )
    model = trainer.prepare_qlora_model(tiny_model, config)
    o_proj = model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, NF4Linear), (
        f"a non-target linear is still quantized (NF4Linear), got {type(o_proj).__name__}"
    )
    assert o_proj.compute_dtype == torch.bfloat16, "precision='bf16': the NF4 layers compute in bf16"
    assert isinstance(model.layers[0].self_attn.v_proj, LoRALayer), "targets get adapters"
    assert model.gradient_checkpointing is True, "config.gradient_checkpointing must switch it on in the model"
    norms = [p.dtype for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(d == torch.float32 for d in norms), "norms stay fp32"
    with pytest.raises(ValueError, match="LoRA"):
        trainer.prepare_qlora_model(model, config)


@pytest.mark.exercise("4.2")
def test_prepare_on_device(trainer, tiny_model, device):
    config = trainer.TrainConfig(r=2, precision="fp32")
    model = trainer.prepare_qlora_model(tiny_model.to(device), config)
    ids = torch.randint(0, 18, (2, 8), device=device)
    assert model(ids).device.type == device.type


# ---- Exercise 4.3: the trainer -----------------------------------------------------------------


@pytest.mark.exercise("4.3")
def test_clipping_acts_on_unscaled_gradients(trainer, tiny_model, task_data, tmp_path):
    import warnings

    from testcases.helpers import record_optimizer_steps

    t = make_trainer(trainer, tiny_model, task_data, max_grad_norm=1e-3, output_dir=str(tmp_path))
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # loss scaling as with fp16
    seen = record_optimizer_steps(t.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train_step([t.micro_batch(0)])
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0]])).item()
    assert norm == pytest.approx(1e-3, rel=1e-3), (
        f"the optimizer saw a gradient norm of {norm:.3g}, expected max_grad_norm = 1e-3: unscale the gradients "
        "(scaler.unscale_) BEFORE clipping, or the clip acts on gradients 1024× too large"
    )


@pytest.mark.exercise("4.3")
def test_non_finite_loss_skips_the_step(trainer, tiny_model, task_data, tmp_path):
    t = make_trainer(trainer, tiny_model, task_data, output_dir=str(tmp_path))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    handle = t.model.lm_head.register_forward_hook(lambda module, args, out: out * float("nan"))
    loss = t.train_step([t.micro_batch(0)])
    handle.remove()
    assert math.isnan(loss) and t.skipped_steps == 1, (
        f"a NaN loss skips the step and counts it (skipped_steps={t.skipped_steps})"
    )
    for name, param in t.model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), f"{name} changed although the step was skipped"
            assert param.grad is None or not param.grad.abs().sum() > 0, "gradients must be cleared after a skip"
    t.train_step([t.micro_batch(1)])
    assert all(torch.isfinite(p).all() for p in t.model.parameters()), "training goes on normally afterwards"


@pytest.mark.exercise("4.3")
def test_resume_equals_uninterrupted(trainer, tiny_model, task_data, tmp_path):
    def fresh():
        return make_trainer(trainer, copy_of(tiny_model), task_data, lora_dropout=0.1, gradient_accumulation_steps=2,
                        max_steps=6, output_dir=str(tmp_path))  # fmt: skip

    straight = fresh()
    straight.train()
    first = fresh()
    first.train(steps=3)
    path = first.save_checkpoint(tmp_path / "ckpt" / "state.pt")
    assert path.exists() and not list((tmp_path / "ckpt").glob("*.tmp")), "write atomically: no temp file left"
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = fresh()
    resumed.load_checkpoint(path)
    resumed.train()
    assert resumed.step == straight.step == 6
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), (
                f"{name} differs between the uninterrupted and the resumed run: save and restore the adapter, "
                "optimizer, scheduler, scaler, RNG states and step"
            )


@pytest.mark.exercise("4.3")
def test_bf16_autocast_trains_on_cpu_with_fp32_adapters(trainer, tiny_model, task_data, tmp_path):
    t = make_trainer(trainer, tiny_model, task_data, precision="bf16", device="cpu", output_dir=str(tmp_path))
    loss = t.train_step([t.micro_batch(0)])
    assert math.isfinite(loss), "a bf16 step on the CPU must give a finite loss"
    lora = [p for n, p in t.model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    assert all(p.dtype == torch.float32 for p in lora), "adapters keep fp32 master weights; autocast casts copies"


@pytest.mark.exercise("4.3")
def test_optimizer_groups_weight_decay_and_loraplus(trainer):
    from model.lora import get_lora_model, mark_only_lora_as_trainable

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    get_lora_model(model, r=2, target_modules=["0", "1"])
    mark_only_lora_as_trainable(model, bias="all")
    config = trainer.TrainConfig(learning_rate=1e-3, weight_decay=0.1, loraplus_lr_ratio=16)
    optimizer = trainer.build_optimizer(model, config)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in by_param, f"{name} is frozen and must not be in the optimizer"
            continue
        group = by_param[id(p)]
        if name.endswith("bias"):
            assert group["weight_decay"] == 0, f"{name}: no weight decay on biases and norms"
        elif name.endswith("lora_B"):
            assert group["lr"] == pytest.approx(16e-3) and group["weight_decay"] == 0.1, f"{name}: LoRA+ lr = 16 × lr"
        else:
            assert group["lr"] == pytest.approx(1e-3) and group["weight_decay"] == 0.1, f"{name}: lr, weight decay"


@pytest.mark.exercise("4.3")
def test_metrics_and_loss_curve_are_written(trainer, tiny_model, task_data, tmp_path):
    t = make_trainer(trainer, tiny_model, task_data, max_steps=4, log_every=2, output_dir=str(tmp_path))
    t.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and {"loss", "lr", "tokens_per_s"} <= set(lines[0])
    assert t.save_loss_curve().stat().st_size > 1000, "a PNG of the loss curve"


@pytest.mark.exercise("4.3")
def test_qlora_learns_the_task(trainer):
    """The headline: a short QLoRA run on the bundled base lifts exact-match accuracy on the new task."""
    from model.tiny_llama import load_base_model
    from training.data import exact_match_accuracy, finetune_data

    train_data, eval_data = finetune_data("train"), finetune_data("eval", n=200)
    model = load_base_model()
    before = exact_match_accuracy(model, eval_data)
    config = trainer.TrainConfig(r=8, precision="fp32", max_steps=120, batch_size=64, learning_rate=3e-3,
                                 warmup_ratio=0.05, progress=False, output_dir="runs/test-qlora")  # fmt: skip
    t = trainer.QLoRATrainer(trainer.prepare_qlora_model(model, config), config, train_data, eval_data)
    t.train()
    after = t.evaluate()["accuracy"]
    assert before <= 0.3 and after >= 0.8, (
        f"exact-match accuracy {before:.0%} -> {after:.0%} (expected ≤ 30 % -> ≥ 80 %)"
    )


# ---- Exercise 4.4: merge_and_export ------------------------------------------------------------


@pytest.mark.exercise("4.4")
def test_merge_and_export_weights_and_dtype(trainer, tiny_model):
    model = trainer.prepare_qlora_model(
        tiny_model, trainer.TrainConfig(r=2, precision="fp32", target_modules=("q_proj",))
    )
    randomize_lora(model, std=0.2)
    q = model.layers[0].self_attn.q_proj
    expected = q.base_layer.dequantize_weight(torch.float32) + q.delta_weight().detach()
    plain = trainer.merge_and_export(model, dtype=torch.float32)
    assert_close(
        plain.layers[0].self_attn.q_proj.weight.detach(), expected, "exported q_proj weight", "W = dequant(W0) + ΔW"
    )
    k_proj = plain.layers[0].self_attn.k_proj
    assert type(k_proj) is nn.Linear and not k_proj.weight.requires_grad, "non-target NF4 layers are dequantized too"


@pytest.mark.exercise("4.4")
def test_merge_and_export_to_bf16(trainer, tiny_model, token_ids):
    model = trainer.prepare_qlora_model(tiny_model, trainer.TrainConfig(r=2, precision="fp32"))
    plain = trainer.merge_and_export(model, dtype=torch.bfloat16)
    dtypes = {m.weight.dtype for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert dtypes == {torch.bfloat16}, f"dtype=bfloat16: every exported projection holds a bf16 weight, got {dtypes}"


# ---- Exercise 4.5: estimate_memory -------------------------------------------------------------


@pytest.mark.exercise("4.5")
def test_estimate_memory_breakdown(trainer):
    lora = trainer.estimate_memory(7e9, "lora", trainable_params=20e6)
    assert lora["weights"] == pytest.approx(2 * 7e9 + 4 * 20e6), "LoRA: bf16 base (2 B) + fp32 adapters (4 B)"
    assert lora["gradients"] == pytest.approx(4 * 20e6) and lora["optimizer"] == pytest.approx(8 * 20e6), (
        "gradients and Adam states exist for the trainable (adapter) parameters only"
    )
    no_dq = trainer.estimate_memory(65e9, "qlora", double_quant=False)
    assert no_dq["weights"] == pytest.approx(65e9 * 4.5 / 8), "without double quantization NF4 costs 4.5 bits"
    assert lora["total"] == pytest.approx(lora["weights"] + lora["gradients"] + lora["optimizer"])
    with pytest.raises(ValueError, match="method"):
        trainer.estimate_memory(1e9, "adapter")
