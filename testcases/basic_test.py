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

from testcases.helpers import copy_of, make_trainer, randomize_lora
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
    assert wrapped == expected, (
        f"by default the seven projections of every layer are wrapped;\nexpected {expected}\ngot {wrapped}"
    )
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
    fresh = copy_of(tiny_model)
    lora.get_lora_model(tiny_model, r=2)
    randomize_lora(tiny_model, std=0.2)
    expected = tiny_model(token_ids).detach()
    lora.save_lora(tiny_model, tmp_path)
    loaded = lora.load_lora(fresh, tmp_path)
    assert_close(loaded(token_ids), expected, "logits of base + loaded adapter", "load both A and B into every layer")
    assert F.mse_loss(loaded(token_ids), expected) < 1e-10


# ---- Exercise 3.1: uniform (affine) quantization ---------------------------------------------


@pytest.mark.exercise("3.1")
def test_uniform_quantization_hand_example(quant):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=2)
    assert q.dtype == torch.uint8 and q.shape == x.shape, (
        f"x_quant must be uint8 of x's shape, got {q.dtype} {tuple(q.shape)}"
    )
    assert scale.tolist() == [1.0], f"scale = (max - min) / (2^2 - 1) = 3 / 3 = 1, got {scale.tolist()}"
    assert zero_point.tolist() == [1], f"zero_point = round(-min / scale) = 1, got {zero_point.tolist()}"
    assert q.tolist() == [0, 1, 2, 3], f"q = round(x / scale) + zero_point = [0, 1, 2, 3], got {q.tolist()}"
    assert_close(quant.dequantize_tensor(q, scale, zero_point), x, "dequantize_tensor", "x̂ = (q - zero_point) · scale")


@pytest.mark.exercise("3.1")
@pytest.mark.parametrize("block_size", [None, 64])
def test_uniform_round_trip_within_half_a_step(quant, block_size):
    x = torch.randn(5, 50) * 3 + 1
    q, scale, zero_point = quant.quantize_tensor(x, num_bits=4, block_size=block_size)
    n_blocks = 1 if block_size is None else 4  # 250 elements -> 64, 64, 64, 58
    assert scale.shape == (n_blocks,) and zero_point.shape == (n_blocks,), (
        f"one scale and zero_point per block: expected ({n_blocks},), got {tuple(scale.shape)}, {tuple(zero_point.shape)}"
    )
    x_hat = quant.dequantize_tensor(q, scale, zero_point, block_size=block_size)
    step = scale.repeat_interleave(block_size or x.numel())[: x.numel()].view_as(x)
    worst = ((x_hat - x).abs() / step).max().item()
    assert worst <= 0.5 + 1e-4, f"round-trip error must be ≤ half a step (scale / 2); worst was {worst:.3f} steps"


# ---- Exercise 3.2: absmax quantization --------------------------------------------------------


@pytest.mark.exercise("3.2")
def test_absmax_int8_per_tensor(quant):
    x = torch.tensor([0.5, -1.27, 0.01, 1.0])
    q, scale = quant.absmax_quantize(x, num_bits=8)
    assert q.dtype == torch.int8, f"absmax codes are signed: int8, got {q.dtype}"
    assert_close(scale, torch.tensor([0.01]), "scale", "scale = absmax / 127 = 1.27 / 127")
    assert q.tolist() == [50, -127, 1, 100], f"q = round(x / scale) = [50, -127, 1, 100], got {q.tolist()}"
    assert_close(quant.absmax_dequantize(q, scale), torch.tensor([0.5, -1.27, 0.01, 1.0]), "absmax_dequantize")


@pytest.mark.exercise("3.2")
def test_absmax_blocks_contain_an_outlier(quant):
    x = torch.randn(1024)
    x[3] = 100.0  # one outlier
    others = torch.ones(1024, dtype=torch.bool)
    others[3] = False
    errors = {}
    for block_size in (None, 64):
        q, scale = quant.absmax_quantize(x, num_bits=8, block_size=block_size)
        errors[block_size] = (quant.absmax_dequantize(q, scale, block_size=block_size) - x)[others].abs().mean().item()
    assert errors[64] < errors[None] / 5, (
        f"with blocks of 64 the outlier only coarsens its own block: mean error per tensor {errors[None]:.4f}, "
        f"per block {errors[64]:.4f} (expected at least 5× smaller)"
    )


# ---- Exercise 3.3: code books -----------------------------------------------------------------


@pytest.mark.exercise("3.3")
def test_nf4_code_book_is_the_published_table(quant):
    book = quant.nf4_code_book()
    assert book.dtype == torch.float32 and book.shape == (16,), (
        f"16 float32 levels, got {book.dtype} {tuple(book.shape)}"
    )
    assert (book < 0).sum() == 7 and (book == 0).sum() == 1 and (book > 0).sum() == 8, (
        "NF4 has 7 negative levels, an exact 0 and 8 positive levels (asymmetric); "
        f"got {(book < 0).sum()} / {(book == 0).sum()} / {(book > 0).sum()}: the symmetric 15-value table in some notes is wrong"
    )
    assert_close(
        book, torch.tensor(quant.NF4_PUBLISHED), "nf4_code_book()", "quantiles Φ⁻¹ at linspace(0.9677083, 0.5)"
    )


@pytest.mark.exercise("3.3")
def test_fp4_code_book_is_e2m1(quant):
    expected = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    expected = torch.cat([-expected.flip(0)[:-1], expected])
    assert_close(
        quant.fp4_code_book(), expected, "fp4_code_book()", "E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 over 6"
    )


# ---- Exercise 3.4: NF4 blockwise quantization ------------------------------------------------


@pytest.mark.exercise("3.4")
def test_pack_nibbles_puts_the_even_index_high(quant):
    packed = quant.pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x12, 0x30], (
        f"[1, 2, 3] packs to [0x12, 0x30] (element 0 in the high nibble, odd count padded); got {[hex(b) for b in packed.tolist()]}"
    )


@pytest.mark.exercise("3.4")
def test_nearest_code_and_ties(quant):
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    values = torch.tensor([-0.9, -0.5, 0.25, 0.26, 0.75, 1.0, 0.0])
    assert quant.nearest_code(values, code).tolist() == [0, 0, 1, 2, 2, 3, 1], (
        "nearest level, and a value exactly between two levels (-0.5, 0.25, 0.75) takes the LOWER one"
    )


@pytest.mark.exercise("3.4")
def test_quantize_nf4_matches_bitsandbytes(quant, golden):
    x = golden["nf4_fp32_16x64.input"]
    packed, absmax = quant.quantize_nf4(x, block_size=64)
    assert packed.dtype == torch.uint8 and packed.shape == (512,), (
        f"1024 codes pack into 512 uint8, got {packed.dtype} {tuple(packed.shape)}"
    )
    assert torch.equal(absmax, golden["nf4_fp32_16x64.absmax"]), "absmax: the fp32 max |x| of each block of 64"
    differ = (packed != golden["nf4_fp32_16x64.packed"]).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{differ.numel()} of 512 bytes differ from bitsandbytes, first at byte {differ[:1].tolist()}"
    )


@pytest.mark.exercise("3.4")
def test_dequantize_nf4_matches_bitsandbytes(quant, golden):
    case = "nf4_fp32_7x13"  # 91 elements: a partial last block and an odd count
    out = quant.dequantize_nf4(golden[f"{case}.packed"], golden[f"{case}.absmax"], (7, 13), block_size=64)
    assert_close(out, golden[f"{case}.dequant"], "dequantize_nf4 on a (7, 13) weight", "code[q] · absmax of the block")


# ---- Exercise 3.5: double quantization -------------------------------------------------------


@pytest.mark.exercise("3.5")
def test_double_quantization_matches_bitsandbytes(quant, golden):
    absmax = golden["dq_fp32_64x512.absmax_fp32"]
    codes, scale, offset = quant.double_quantize(absmax, block_size=256)
    assert codes.dtype == torch.uint8 and codes.shape == (512,), (
        f"8-bit codes, one per absmax; got {codes.dtype} {tuple(codes.shape)}"
    )
    assert torch.equal(offset.reshape(1), golden["dq_fp32_64x512.offset"]), (
        f"offset = mean(absmax) = {golden['dq_fp32_64x512.offset'].item():.8f}, got {offset.item():.8f}"
    )
    assert torch.equal(scale, golden["dq_fp32_64x512.absmax2"]), "scale: absmax of (absmax - offset) per block of 256"
    restored = quant.double_dequantize(codes, scale, offset, block_size=256)
    assert (restored - absmax).abs().max() < 1e-3, "the recovered absmax values must be within 8-bit precision"


@pytest.mark.exercise("3.5")
def test_bits_per_parameter(quant):
    assert quant.bits_per_parameter(64) == 4.5, "4 bits of code + 32 bits of absmax per 64 weights = 4.5"
    assert quant.bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=5e-4), (
        "with DQ: 4 + 8/64 + 32/(64·256) ≈ 4.127 (QLoRA paper)"
    )


# ---- Exercise 3.6: NF4Linear -----------------------------------------------------------------


@pytest.mark.exercise("3.6")
def test_nf4_linear_forward(quant):
    linear = nn.Linear(128, 64)
    layer = quant.NF4Linear.from_linear(linear, double_quant=False)
    x = torch.randn(3, 128)
    expected = F.linear(x, layer.dequantize_weight(), linear.bias)
    assert_close(layer(x), expected, "NF4Linear(x)", "dequantize the weight, then an ordinary linear with the bias")
    error = (layer.dequantize_weight() - linear.weight).abs().max().item()
    assert error < 0.2 * linear.weight.abs().max().item(), f"dequantized weight too far from the original ({error:.4f})"


@pytest.mark.exercise("3.6")
def test_nf4_linear_is_frozen_and_passes_gradients_to_the_input(quant):
    layer = quant.NF4Linear.from_linear(nn.Linear(64, 32))
    assert not any(p.requires_grad for p in layer.parameters()), "nothing in an NF4Linear is trainable"
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, (
        "the gradient must reach the input (LoRA layers below need it)"
    )


@pytest.mark.exercise("3.6")
def test_nf4_linear_weight_nbytes(quant):
    plain = quant.NF4Linear.from_linear(nn.Linear(512, 256), double_quant=False)
    assert plain.weight_nbytes() == 256 * 512 // 2 + 2048 * 4, (
        f"65,536 bytes of codes + 2,048 fp32 absmax = 73,728 bytes (4.5 bits), got {plain.weight_nbytes():,}"
    )
    dq = quant.NF4Linear.from_linear(nn.Linear(512, 256), double_quant=True)
    assert dq.weight_nbytes() == 256 * 512 // 2 + 2048 + 8 * 4 + 4, (
        f"with DQ: 65,536 + 2,048 uint8 absmax + 8 fp32 scales + an fp32 offset = 67,620 bytes, got {dq.weight_nbytes():,}"
    )


# ---- Exercise 3.7: fake quantization ---------------------------------------------------------


@pytest.mark.exercise("3.7")
def test_fake_quantize_forward_and_straight_through_gradient(quant):
    x = torch.randn(200, requires_grad=True)
    y = quant.fake_quantize(x, num_bits=4)
    q, scale, zero_point = quant.quantize_tensor(x.detach(), num_bits=4)
    assert_close(
        y.detach(),
        quant.dequantize_tensor(q, scale, zero_point),
        "fake_quantize(x)",
        "forward = dequantize(quantize(x))",
    )
    (y * torch.arange(200.0)).sum().backward()
    assert_close(
        x.grad, torch.arange(200.0), "dL/dx through fake_quantize", "straight-through: the gradient passes unchanged"
    )


# ---- Exercise 4.1: TrainConfig -------------------------------------------------------------


@pytest.mark.exercise("4.1")
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"precision": "fp8"}, "precision"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_train_config_rejects_bad_values(trainer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        trainer.TrainConfig(**kwargs)


@pytest.mark.exercise("4.1")
def test_fp16_needs_cuda(trainer):
    with pytest.raises(ValueError, match="fp16"):
        trainer.resolve_device(
            trainer.TrainConfig(precision="fp16", device="auto")
        ) if not torch.cuda.is_available() else (trainer.TrainConfig(precision="fp16", device="cpu"))


# ---- Exercise 4.2: prepare_qlora_model ---------------------------------------------------------


@pytest.mark.exercise("4.2")
def test_prepare_qlora_model_quantizes_and_adds_adapters(trainer, tiny_model):
    from model.lora import LoRALayer
    from model.quant import NF4Linear

    model = trainer.prepare_qlora_model(tiny_model, trainer.TrainConfig(r=2, precision="fp32"))
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALayer) and isinstance(q_proj.base_layer, NF4Linear), (
        f"a target projection becomes LoRALayer(NF4Linear); got {type(q_proj).__name__}"
        f"({type(getattr(q_proj, 'base_layer', None)).__name__})"
    )
    assert isinstance(model.lm_head, nn.Linear), "the output head stays a full-precision nn.Linear (and gets no LoRA)"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable), (
        f"only lora_A / lora_B may be trainable, got e.g. {[n for n in trainable if 'lora' not in n][:3]}"
    )
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad), "adapters stay fp32"


@pytest.mark.exercise("4.2")
def test_prepare_without_quantization_is_plain_lora(trainer, tiny_model):
    model = trainer.prepare_qlora_model(tiny_model, trainer.TrainConfig(r=2, quantize="none", precision="fp32"))
    base = model.layers[1].mlp.down_proj.base_layer
    assert type(base) is nn.Linear, f"quantize='none' keeps nn.Linear bases, got {type(base).__name__}"


# ---- Exercise 4.3: the trainer -----------------------------------------------------------------


@pytest.mark.exercise("4.3")
def test_optimizer_holds_only_the_adapters(trainer, tiny_model, task_data, tmp_path):
    t = make_trainer(trainer, tiny_model, task_data, output_dir=str(tmp_path))
    in_optimizer = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    lora = {id(p) for name, p in t.model.named_parameters() if name.endswith(("lora_A", "lora_B"))}
    assert in_optimizer == lora, (
        f"the optimizer must hold exactly the {len(lora)} LoRA tensors, it holds {len(in_optimizer)}: "
        "a frozen weight in AdamW is one stray gradient away from being trained"
    )


@pytest.mark.exercise("4.3")
def test_training_lowers_the_loss_and_keeps_the_base_bit_identical(trainer, tiny_model, task_data, tmp_path):
    few = {key: value[:16] for key, value in task_data.items()}  # one batch, seen 30 times: the loss must fall
    t = make_trainer(
        trainer, tiny_model, few, r=4, max_steps=30, learning_rate=3e-2, warmup_ratio=0.0, output_dir=str(tmp_path)
    )
    frozen = {k: v.clone() for k, v in t.model.state_dict().items() if "lora_" not in k}
    before = t.evaluate()["eval_loss"]
    t.train()
    after = t.evaluate()["eval_loss"]
    assert after < before - 0.1, f"30 steps must lower the loss: {before:.3f} -> {after:.3f}"
    for key, value in frozen.items():
        assert torch.equal(t.model.state_dict()[key], value), f"frozen tensor {key} changed during training"


@pytest.mark.exercise("4.3")
@pytest.mark.parametrize(
    "scheduler, step, factor",
    [("linear", 0, 0.0), ("linear", 5, 0.5), ("linear", 10, 1.0), ("linear", 55, 0.5), ("linear", 100, 0.0),
     ("cosine", 10, 1.0), ("cosine", 55, 0.5), ("constant", 70, 1.0)],
)  # fmt: skip
def test_lr_schedule_values(trainer, scheduler, step, factor):
    config = trainer.TrainConfig(max_steps=100, warmup_ratio=0.1, lr_scheduler=scheduler)
    got = trainer.lr_factor(step, config)
    assert got == pytest.approx(factor, abs=1e-9), (
        f"{scheduler} schedule, 10 warmup steps of 100: factor at step {step} must be {factor}, got {got} "
        "(warmup: step / warmup_steps, starting at 0; then decay over the remaining steps)"
    )


@pytest.mark.exercise("4.3")
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_accumulation_matches_one_big_batch(trainer, tiny_model, task_data, tmp_path):
    from testcases.helpers import record_optimizer_steps

    ids, labels = task_data["input_ids"][:16], task_data["labels"][:16]
    grads = []
    for micro_batches in ([(ids[:8], labels[:8]), (ids[8:], labels[8:])], [(ids, labels)]):
        t = make_trainer(trainer, copy_of(tiny_model), task_data, max_grad_norm=None, output_dir=str(tmp_path))
        seen = record_optimizer_steps(t.optimizer)
        t.train_step(micro_batches)
        assert len(seen) == 1, f"one train_step must call optimizer.step once, it was called {len(seen)} times"
        grads.append(seen[0])
    for g_accumulated, g_big in zip(grads[0], grads[1]):
        assert_close(g_accumulated, g_big, "gradient of 2 micro-batches of 8 vs one batch of 16",
                     "divide each micro-batch loss by the number of micro-batches")  # fmt: skip


# ---- Exercise 4.4: merge_and_export ------------------------------------------------------------


@pytest.mark.exercise("4.4")
def test_merge_and_export_gives_plain_linear_layers_with_the_same_outputs(trainer, tiny_model, token_ids):
    from model.lora import LoRALayer
    from model.quant import NF4Linear

    model = trainer.prepare_qlora_model(tiny_model, trainer.TrainConfig(r=2, precision="fp32")).eval()
    randomize_lora(model, std=0.2)
    expected = model(token_ids).detach()
    plain = trainer.merge_and_export(model)
    leftovers = [n for n, m in plain.named_modules() if isinstance(m, (LoRALayer, NF4Linear))]
    assert not leftovers, f"export must leave plain nn.Linear layers only; still there: {leftovers[:3]}"
    assert_close(
        plain(token_ids), expected, "logits of the exported model", "dequantize W0, then add ΔW (never re-quantize)"
    )


# ---- Exercise 4.5: estimate_memory -------------------------------------------------------------


@pytest.mark.exercise("4.5")
def test_estimate_memory_full_and_qlora(trainer):
    full = trainer.estimate_memory(7e9, "full")
    assert full["total"] == pytest.approx(16 * 7e9), (
        f"full fine-tuning with fp32 AdamW: 4 (weight) + 4 (grad) + 8 (m, v) = 16 bytes per parameter, got {full}"
    )
    qlora = trainer.estimate_memory(65e9, "qlora", trainable_params=0)
    assert qlora["weights"] == pytest.approx(65e9 * 4.127 / 8, rel=1e-3), (
        f"65B in NF4 with double quantization: 65e9 · 4.127 / 8 ≈ 33.5 GB, got {qlora['weights'] / 1e9:.1f} GB"
    )
    assert qlora["weights"] < 48e9, "the QLoRA paper's headline: a 65B model's weights fit a 48 GB GPU"
