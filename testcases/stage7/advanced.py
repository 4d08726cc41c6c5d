"""Stage 7 advanced tests: bad input, the LSTM encoder, folding, merging limits, training (model/peft_methods.py).

Bad input must raise a ValueError naming the argument (and its allowed values) and leave the model
exactly as it was (helpers.snapshot / assert_unchanged). Logits are compared in float64 within
``NETWORK_RTOL`` (tolerances.py), against independent evaluations (see stage7/basic.py). Folding an
LSTM encoder is compared in float32 within a bound derived from the rounding of the two runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testcases.helpers import assert_unchanged, call_text, copy_of, refuses, seed, snapshot, word
from testcases.stage7.basic import (
    N_VIRTUAL,
    context_tokens,
    plain_logits_after,
    randn,
    set_param,
    trainable_names,
)
from testcases.tolerances import UNIT_ROUNDOFF, assert_close, assert_network_close, expect_tensor

METHOD_OPTIONS = {
    "lora": {"r": 2, "lora_alpha": 4},
    "adapter": {"bottleneck": 2},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning_v2": {"num_virtual_tokens": 4},
    "ia3": {},
}


def refuses_unchanged(model: nn.Module, call, *args, name: str, **kwargs) -> None:
    """``call(model, *args, **kwargs)`` raises a ValueError naming ``name`` (helpers.refuses: a failure shows the
    call), and ``model`` is exactly as before, its config too."""
    __tracebackhide__ = True
    before, config = snapshot(model), model.config
    refuses(call, model, *args, match=word(name), **kwargs)
    what = call_text(call, (model, *args), kwargs)
    assert_unchanged(model, before, what)
    assert model.config == config, f"{what} changed the model's config although it raised an error"


# ---- Exercise 7.1 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.1")
@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"bottleneck": 0}, "bottleneck"),
        ({"bottleneck": 2.5}, "bottleneck"),
        ({"placement": "after_norm"}, "placement"),
        ({"activation": "softmax"}, "activation"),
    ],
)
def test_add_adapters_refuses_bad_arguments(peft_methods, tiny_model, options, name):
    """add_adapters: a bad bottleneck, placement or activation is a ValueError naming it; the model is untouched."""
    refuses_unchanged(tiny_model, peft_methods.add_adapters, **options, name=name)


@pytest.mark.exercise("7.1")
def test_add_adapters_refuses_an_adapted_model(peft_methods, lora, tiny_model):
    """Adapters on a model that already has LoRA (or adapters) are refused; the model is untouched."""
    lora.get_lora_model(tiny_model, r=2, lora_alpha=4)
    before = snapshot(tiny_model)
    refuses(peft_methods.add_adapters, tiny_model)
    assert_unchanged(tiny_model, before, "add_adapters on a LoRA model")


@pytest.mark.exercise("7.1")
def test_adapter_layer_on_a_4bit_base(peft_methods, quant, tiny_model, token_ids):
    """Adapters wrap an NF4Linear too (QLoRA-style): fp32 adapter on a frozen 4-bit projection, identity at init."""
    layer = tiny_model.layers[0].mlp.down_proj
    nf4 = quant.NF4Linear.from_linear(layer)
    tiny_model.layers[0].mlp.set_submodule("down_proj", nf4)
    with torch.no_grad():
        expected = tiny_model(token_ids)
    peft_methods.add_adapters(tiny_model, bottleneck=2, placement="pfeiffer")
    wrapped = tiny_model.layers[0].mlp.down_proj
    assert isinstance(wrapped, peft_methods.AdapterLayer) and wrapped.base_layer is nf4, (
        "the NF4Linear down_proj is wrapped in an AdapterLayer (base_layer = the 4-bit layer)"
    )
    assert wrapped.adapter.down.weight.dtype == torch.float32, "the adapter keeps fp32 weights on a 4-bit base"
    assert torch.equal(tiny_model(token_ids), expected), "a fresh adapter leaves the 4-bit model's logits unchanged"


# ---- Exercise 7.2 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.2")
@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 33}, "num_virtual_tokens"),
        ({"init": "text"}, "init"),
        ({"init": "tokens"}, "init_token_ids"),
        ({"init": "tokens", "init_token_ids": [3, 18]}, "init_token_ids"),
    ],
)
def test_prompt_tuning_refuses_bad_arguments(peft_methods, tiny_model, options, name):
    """get_prompt_tuning_model: bad n (0, > max_seq_len), init, or token ids → ValueError naming it; model untouched."""
    refuses_unchanged(tiny_model, peft_methods.get_prompt_tuning_model, **options, name=name)


@pytest.mark.exercise("7.2")
def test_prompt_is_shared_by_the_batch_and_rows_are_independent(peft_methods, tiny_model64, token_ids):
    """Every example gets the same prompt: each row's logits equal that row run alone."""
    model = peft_methods.get_prompt_tuning_model(tiny_model64, num_virtual_tokens=N_VIRTUAL).double()
    set_param(model.prompt_encoder.embedding.weight, randn(N_VIRTUAL, 16, seed_=50))
    together = model(token_ids)
    for row in range(token_ids.shape[0]):
        assert_network_close(together[row : row + 1], model(token_ids[row : row + 1]), f"row {row} of the batch",
                             hint="the check: each row's logits equal that row run alone (one prompt shared by the batch)")  # fmt: skip


@pytest.mark.exercise("7.2")
def test_prompt_tuning_on_device(peft_methods, tiny_model, token_ids, device):
    """The prompt lives on the model's device; the wrapped model runs there (the CUDA case skips without a GPU)."""
    tiny_model.to(device)
    model = peft_methods.get_prompt_tuning_model(tiny_model, num_virtual_tokens=2)
    assert model.prompt_encoder.embedding.weight.device.type == device.type, (
        "the prompt is created on the model's device"
    )
    assert model(token_ids.to(device)).device.type == device.type, "the logits come out on the model's device"


# ---- Exercise 7.3 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.3")
def test_p_tuning_lstm_encoder(peft_methods):
    """PromptEncoder("lstm"): a 2-layer bidirectional LSTM over the n embeddings, then Linear(2h, 2h) ReLU Linear(2h, dim)."""
    seed(11)
    encoder = peft_methods.PromptEncoder(4, 16, "lstm", hidden_size=6)
    seed(11)
    embedding = nn.Embedding(4, 16)
    lstm = nn.LSTM(16, 6, num_layers=2, dropout=0.0, bidirectional=True, batch_first=True)
    head = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 16))
    want = {"embedding.weight": embedding.weight}
    want |= {f"lstm_head.{n}": v for n, v in lstm.state_dict().items()}
    want |= {f"mlp_head.{n}": v for n, v in head.state_dict().items()}
    got = encoder.state_dict()
    assert sorted(got) == sorted(want), f"the encoder's parameters must be named {sorted(want)}, got {sorted(got)}"
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs from PEFT's draw (embedding, LSTM, then the MLP head)"
    encoder.double()
    lstm.double(), head.double()
    with torch.no_grad():
        expected = head(lstm(encoder.embedding.weight.unsqueeze(0))[0])[0]
    assert_network_close(encoder(), expected, "PromptEncoder('lstm')()",
                         hint="the check: the encoder's output equals an LSTM over ONE sequence of length n (batch_first), then the MLP head")  # fmt: skip


@pytest.mark.exercise("7.3")
def test_p_tuning_refuses_bad_arguments(peft_methods, tiny_model):
    """get_p_tuning_model: an unknown encoder_type or hidden_size 0 is a ValueError naming it; the model is untouched."""
    refuses_unchanged(tiny_model, peft_methods.get_p_tuning_model, encoder_type="gru", name="encoder_type")
    refuses_unchanged(tiny_model, peft_methods.get_p_tuning_model, hidden_size=0, name="hidden_size")


# ---- Exercise 7.4 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.4")
def test_prefix_with_projection_is_a_kv_cache_too(peft_methods, tiny_model64, token_ids):
    """With the MLP: an encoder that computes the KV cache of tokens t gives the plain model's logits on [t ; x]."""
    from testcases.stage7.basic import kv_cache_table

    base = copy_of(tiny_model64)
    n, hidden = N_VIRTUAL, 5
    model = peft_methods.get_prefix_tuning_model(tiny_model64, num_virtual_tokens=n, hidden_size=hidden).double()
    context = context_tokens(seed_=6)
    table = kv_cache_table(base, context)  # (n, 2·L·C)
    # embedding row i = e_i, first Linear picks e_i, Tanh gives tanh(1)·e_i, the last Linear maps it to table row i.
    encoder = model.prefix_encoder
    first, last = torch.zeros(hidden, 16, dtype=torch.float64), torch.zeros(table.shape[1], hidden, dtype=torch.float64)
    first[:n, :n] = torch.eye(n, dtype=torch.float64)
    last[:, :n] = table.T / torch.tanh(torch.tensor(1.0, dtype=torch.float64))
    set_param(encoder.embedding.weight, torch.eye(n, 16, dtype=torch.float64))
    set_param(encoder.transform[0].weight, first)
    set_param(encoder.transform[0].bias, torch.zeros(hidden, dtype=torch.float64))
    set_param(encoder.transform[2].weight, last)
    set_param(encoder.transform[2].bias, torch.zeros(table.shape[1], dtype=torch.float64))
    assert_network_close(model(token_ids), plain_logits_after(base, context, token_ids), "logits with a projected prefix",
                         hint="the check: an encoder whose transform(embedding) is a KV cache of t gives the plain model's logits on [t ; x]")  # fmt: skip


@pytest.mark.exercise("7.4")
@pytest.mark.parametrize("encoder_type", ["mlp", "lstm"])
def test_p_tuning_folds_to_a_prompt_table(peft_methods, tiny_model, token_ids, encoder_type):
    """fold_reparameterization on P-tuning: a PromptEmbedding holding encoder() (n, C); the logits stay."""
    model = peft_methods.get_p_tuning_model(tiny_model, num_virtual_tokens=3, encoder_type=encoder_type)
    with torch.no_grad():
        table = model.prompt_encoder()
        before = model(token_ids)
    peft_methods.fold_reparameterization(model)
    assert isinstance(model.prompt_encoder, peft_methods.PromptEmbedding), "the encoder becomes a PromptEmbedding"
    assert trainable_names(model) == ["prompt_encoder.embedding.weight"], "only the (n, C) table trains after folding"
    assert_close(model.prompt_encoder.embedding.weight, table, "the folded table", bound=0.0,
                 hint="the check: the folded table is the encoder's output")  # fmt: skip
    scale = before.abs().max().item()
    # The same network on the same table: only the LSTM kernel (with or without autograd) may round differently.
    bound = 64 * UNIT_ROUNDOFF[torch.float32] * scale
    assert_close(
        model(token_ids),
        before,
        "logits after folding",
        bound=bound,
        hint="the check: the logits after folding equal those before",
    )


@pytest.mark.exercise("7.4")
def test_fold_refuses_what_it_cannot_fold(peft_methods, lora, tiny_model):
    """fold_reparameterization refuses a prompt-tuning model (nothing to fold) and a LoRA model (ValueError)."""
    prompt = peft_methods.get_prompt_tuning_model(copy_of(tiny_model), num_virtual_tokens=2)
    refuses(peft_methods.fold_reparameterization, prompt)
    refuses(peft_methods.fold_reparameterization, lora.get_lora_model(tiny_model, r=2))


@pytest.mark.exercise("7.4")
def test_prefix_tuning_refuses_bad_arguments(peft_methods, tiny_model):
    """get_prefix_tuning_model: n of 0 or above max_seq_len, hidden_size 0 → ValueError naming it; model untouched."""
    for options, name in (({"num_virtual_tokens": 0}, "num_virtual_tokens"), ({"num_virtual_tokens": 40}, "num_virtual_tokens"),
                          ({"hidden_size": 0}, "hidden_size")):  # fmt: skip
        refuses_unchanged(tiny_model, peft_methods.get_prefix_tuning_model, **options, name=name)


# ---- Exercise 7.5 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.5")
def test_fold_refuses_p_tuning_v2(peft_methods, tiny_model):
    """fold_reparameterization refuses a P-tuning v2 model: its table has no reparameterisation to fold (ValueError)."""
    refuses(peft_methods.fold_reparameterization, peft_methods.get_p_tuning_v2_model(tiny_model, num_virtual_tokens=2))


@pytest.mark.exercise("7.5")
def test_p_tuning_v2_prefix_is_a_kv_cache(peft_methods, tiny_model64, token_ids):
    """P-tuning v2's table set to the keys and values of tokens t reproduces the plain model on [t ; x]."""
    from testcases.stage7.basic import kv_cache_table

    base = copy_of(tiny_model64)
    model = peft_methods.get_p_tuning_v2_model(tiny_model64, num_virtual_tokens=4).double()
    context = context_tokens(4, seed_=7)
    set_param(model.prefix_encoder.embedding.weight, kv_cache_table(base, context))
    assert_network_close(model(token_ids), plain_logits_after(base, context, token_ids), "P-tuning v2 logits",
                         hint="the check: a KV-cache table in PEFT's layout gives the plain model's logits on [t ; x]")  # fmt: skip


@pytest.mark.exercise("7.5")
def test_p_tuning_v2_on_grouped_query_attention(peft_methods, token_ids):
    """On 2 key/value heads for 4 query heads: an (n, 2·L·H_kv·hd) table, trained directly, a KV cache of t."""
    from testcases.stage7.basic import gqa_model, kv_cache_table

    base = gqa_model()
    model = peft_methods.get_p_tuning_v2_model(copy_of(base), num_virtual_tokens=4).double()
    expect_tensor(model.prefix_encoder.embedding.weight, (4, 2 * 2 * 8), "prefix_encoder.embedding.weight",
                  hint="the check: n rows of 2·L·D with D = n_kv_heads · head_dim = 8 (PEFT's token_dim), not d_model = 16")  # fmt: skip
    context = context_tokens(4, seed_=8)
    set_param(model.prefix_encoder.embedding.weight, kv_cache_table(base, context))
    assert_network_close(model(token_ids), plain_logits_after(base, context, token_ids),
                         "P-tuning v2 logits on a grouped-query model",
                         hint="the check: a KV-cache table of a grouped-query model gives the plain model's logits on [t ; x]")  # fmt: skip


# ---- Exercise 7.6 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.6")
def test_ia3_refuses_feedforward_outside_targets(peft_methods, tiny_model):
    """get_ia3_model: feedforward_modules must be among target_modules (PEFT's rule); else ValueError, model untouched."""
    refuses_unchanged(tiny_model, peft_methods.get_ia3_model, target_modules=["k_proj"],
                      feedforward_modules=["down_proj"], name="feedforward_modules")  # fmt: skip
    refuses_unchanged(tiny_model, peft_methods.get_ia3_model, target_modules=["attention"], feedforward_modules=[],
                      name="target_modules")  # fmt: skip


@pytest.mark.exercise("7.6")
def test_ia3_custom_targets(peft_methods, tiny_model64, token_ids):
    """get_ia3_model(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]): q on its output, up on its input."""
    from testcases.stage7.basic import scaled_weights

    base = copy_of(tiny_model64)
    model = peft_methods.get_ia3_model(
        tiny_model64, target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]
    )
    scales = {}
    for i, (path, layer) in enumerate(
        sorted((p, m) for p, m in model.named_modules() if isinstance(m, peft_methods.IA3Layer))
    ):
        expected_size = 16
        expect_tensor(
            layer.ia3_l,
            (expected_size,),
            f"{path}.ia3_l",
            hint="the check: q_proj's vector is out_features long, up_proj's in_features",
        )
        value = 1 + randn(expected_size, seed_=60 + i, std=0.3)
        set_param(layer.ia3_l, value)
        scales[path] = (value, path.endswith("up_proj"))
    assert len(scales) == 4, f"two layers × (q_proj, up_proj) = 4 IA³ layers, got {sorted(scales)}"
    assert_network_close(model(token_ids), scaled_weights(base, scales)(token_ids), "IA³ logits with custom targets",
                         hint="the check: a feed-forward target scales its INPUT, every other target its output")  # fmt: skip


@pytest.mark.exercise("7.6")
def test_ia3_merge_limits(peft_methods, quant, tiny_model, token_ids):
    """merge refuses an NF4 base (TypeError) and is safe twice; unmerge is safe unmerged and refuses a zero scale."""
    layer = peft_methods.IA3Layer(quant.NF4Linear.from_linear(nn.Linear(16, 8, bias=False)))
    x = torch.randn(3, 16)
    before = layer(x)
    refuses(layer.merge, error=TypeError)
    assert not layer.merged and torch.equal(layer(x), before), "a refused merge leaves the layer unmerged and working"
    linear = nn.Linear(16, 8, bias=False)
    weight = linear.weight.detach().clone()
    ia3 = peft_methods.IA3Layer(linear)
    ia3.unmerge()
    assert not ia3.merged and torch.equal(linear.weight, weight), "unmerge on an unmerged layer changes nothing"
    set_param(ia3.ia3_l, torch.cat([torch.zeros(1), 2 * torch.ones(7)]))
    ia3.merge()
    merged = linear.weight.detach().clone()
    ia3.merge()
    assert torch.equal(linear.weight, merged), "merging twice must change nothing (the second merge is a no-op)"
    refuses(ia3.unmerge, match=word("ia3_l"))
    assert ia3.merged and torch.equal(linear.weight, merged), (
        "a refused unmerge leaves the layer merged and W as it was"
    )


@pytest.mark.exercise("7.6")
def test_ia3_vectors_train_without_weight_decay(peft_methods, trainer, tiny_model, task_data, tmp_path):
    """The Stage 4 trainer puts the 1-D ia3_l in its no-decay group: with lr > 0 and a zero gradient, l stays 1."""
    model = peft_methods.get_ia3_model(tiny_model)
    config = trainer.TrainConfig(precision="fp32", max_steps=1, batch_size=16, progress=False, learning_rate=0.1,
                                 weight_decay=0.5, output_dir=str(tmp_path), seed=0)  # fmt: skip
    run = trainer.QLoRATrainer(model, config, task_data, task_data)
    decayed = [p for g in run.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    assert not [names[id(p)] for p in decayed], (
        f"no ia3_l may be in a weight-decay group (decay pulls it to 0, not to its init 1): {[names[id(p)] for p in decayed]}"
    )


# ---- Exercise 7.7 ---------------------------------------------------------------------------------------


@pytest.mark.exercise("7.7")
def test_get_peft_method_model_refuses_unknowns(peft_methods, tiny_model):
    """An unknown method or option is a ValueError naming it (and the allowed ones); the model is untouched."""
    refuses_unchanged(tiny_model, peft_methods.get_peft_method_model, "bitfit", name="method")
    info = refuses(peft_methods.get_peft_method_model, tiny_model, "loha", match="lora")
    assert "ia3" in str(info), f"the message lists the allowed methods, got: {info}"
    refuses_unchanged(tiny_model, peft_methods.get_peft_method_model, "ia3", r=4, name="r")
    refuses_unchanged(tiny_model, peft_methods.get_peft_method_model, "prompt_tuning", num_virtual_token=4,
                      name="num_virtual_token")  # fmt: skip


@pytest.mark.exercise("7.7")
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_method_trains_with_the_stage4_trainer(peft_methods, trainer, tiny_model, task_data, tmp_path, method):
    """Three steps of the Stage 4 trainer: the method's parameters move, the base model's do not, the loss is finite."""
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seed(12)
    model = peft_methods.get_peft_method_model(tiny_model, method, **METHOD_OPTIONS[method])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = trainer.TrainConfig(precision="fp32", max_steps=3, batch_size=16, progress=False, learning_rate=1e-2,
                                 output_dir=str(tmp_path), seed=0)  # fmt: skip
    run = trainer.QLoRATrainer(model, config, task_data, task_data)
    result = run.train()
    assert torch.isfinite(torch.tensor(result["loss"])), f"{method}: the training loss must be finite, got {result}"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert moved, f"{method}: no trainable parameter changed in three steps (is the optimizer seeing them?)"
    state = {k.replace(".base_layer.", "."): v for k, v in tiny_model.state_dict().items()}
    for key, value in base_state.items():
        assert torch.equal(state[key], value), f"{method}: training changed the frozen base weight {key}"


@pytest.mark.exercise("7.7")
def test_prompt_methods_logits_under_gradient_checkpointing(peft_methods, tiny_model, token_ids):
    """Prompt and prefix wrappers work with the base model's gradient checkpointing: same loss and gradients."""
    for method in ("prompt_tuning", "prefix_tuning"):
        base = copy_of(tiny_model)
        seed(13)
        model = peft_methods.get_peft_method_model(base, method, num_virtual_tokens=3).train()
        grads = []
        for checkpointing in (False, True):
            base.gradient_checkpointing = checkpointing
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(token_ids).flatten(0, 1), token_ids.flatten()).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        for a, b in zip(*grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), f"{method}: checkpointing changed a gradient"


@pytest.mark.exercise("7.7")
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_method_runs_on_the_models_device(peft_methods, tiny_model, token_ids, device, method):
    """Each method's new parameters are created on the model's device (the CUDA case skips without a GPU)."""
    tiny_model.to(device)
    model = peft_methods.get_peft_method_model(tiny_model, method, **METHOD_OPTIONS[method])
    wrong = [n for n, p in model.named_parameters() if p.device.type != device.type]
    assert not wrong, f"{method}: parameters left on another device than the model's ({device}): {wrong}"
    assert model(token_ids.to(device)).device.type == device.type, f"{method}: the logits come out on {device}"
