"""Stage 7 basic tests: LoRA's relatives, as lesson 07 describes them (model/peft_methods.py).

How close is close enough (testcases/tolerances.py): every comparison of logits runs the model in
float64 and compares with an independent float64 evaluation within ``NETWORK_RTOL`` of the
output's scale. The independent evaluations are built from the plain base model, never from the
code under test:

- prompt tuning: virtual tokens that equal the embeddings of real tokens t must give the logits of
  the plain model on [t ; x] (the last T positions);
- prefix tuning: prefixes that equal the keys (rotated at positions 0…n−1) and values the base model
  computes for real tokens t are a KV cache of t, so again the plain model on [t ; x];
- P-tuning and adapters: the encoder or bottleneck written out in the test, from the student's
  parameter values;
- IA³: the plain model with its weights' rows (output side) or columns (input side) scaled.

Initialisations are compared bit for bit with the draws PEFT makes (the same modules created in
the same order after the same seed).

Failure messages: a "Hint" says what the check tests ("the check: …"), never which part of the code is
wrong; a "Likely cause" appears only when ``helpers.diagnose`` found that the output IS what a named
mistake produces. A refusal is checked with ``helpers.refuses``, whose failure shows the call and the
arguments it was given.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testcases.helpers import copy_of, generator, seed
from testcases.tolerances import assert_network_close, expect_tensor

N_VIRTUAL = 3  # virtual tokens in the tests (tiny_model: max_seq_len 32, token_ids (2, 10))


# ---- helpers shared with advanced.py --------------------------------------------------------------


def randn(*shape: int, seed_: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed_), dtype=torch.float64) * std


def set_param(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


def context_tokens(n: int = N_VIRTUAL, seed_: int = 5) -> torch.Tensor:
    """n real token ids that play the virtual tokens in the independent checks, (n,)."""
    return torch.randint(0, 18, (n,), generator=generator(seed_))


def plain_logits_after(base: nn.Module, context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The plain model on [context ; ids] for every row, keeping the last T positions: (B, T, vocab)."""
    full = torch.cat([context.unsqueeze(0).expand(ids.shape[0], -1), ids], dim=1)  # (B, n + T)
    with torch.no_grad():
        return base(full)[:, context.shape[0] :]


def kv_cache_table(base: nn.Module, context: torch.Tensor) -> torch.Tensor:
    """The keys (rotated at positions 0…n−1) and values ``base`` computes for ``context``, as an (n, 2·L·D) table.

    Row i: for every layer l, token i's key (D = H_kv·hd numbers, key/value head by head) then its value:
    PEFT's layout (D = C without grouped-query attention).
    """
    from model.tiny_llama import apply_rope, rope_cos_sin

    config, n = base.config, context.shape[0]
    inputs: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in base.layers]
    try:
        with torch.no_grad():
            base(context.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    cos, sin = rope_cos_sin(n, config.head_dim, config.rope_theta, context.device, torch.float64)
    rows = []
    with torch.no_grad():
        for layer, x in zip(base.layers, inputs, strict=True):
            attn = layer.self_attn
            k = x[0] @ attn.k_proj.weight.T  # (n, D)
            v = x[0] @ attn.v_proj.weight.T  # (n, D)
            k = apply_rope(k.view(n, config.kv_heads, -1).transpose(0, 1), cos, sin)  # (H_kv, n, hd)
            rows += [k.transpose(0, 1).reshape(n, -1), v]  # (n, D) each
    return torch.cat(rows, dim=1)  # (n, 2·L·D)


def gqa_model() -> nn.Module:
    """A float64 TinyLlama with grouped-query attention: 4 query heads share 2 key/value heads of hd 4 (D = 8)."""
    from model.tiny_llama import TinyLlama
    from testcases.conftest import tiny_config

    seed(21)
    return TinyLlama(tiny_config(n_heads=4, n_kv_heads=2)).eval().double()


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable_names(model: nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def adapter_expected(adapter_params: dict[str, torch.Tensor], h: torch.Tensor, activation) -> torch.Tensor:
    """h + W_up f(W_down h + b_down) + b_up from the parameter values alone."""
    p = adapter_params
    return h + F.linear(activation(F.linear(h, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])


def with_output_hooks(base: nn.Module, functions: dict[str, object]) -> nn.Module:
    """A copy of ``base`` whose modules at these paths have their output replaced by function(output)."""
    twin = copy_of(base)
    for path, function in functions.items():
        twin.get_submodule(path).register_forward_hook(lambda m, args, out, f=function: f(out))
    return twin


def expected_prompt_logits(base: nn.Module, prompt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens when ``prompt`` (n, C) is put before their embeddings (the extension point)."""
    with torch.no_grad():
        tokens = base.embed_tokens(ids)
        x = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), tokens], dim=1)
        return base(inputs_embeds=x)[:, prompt.shape[0] :]


def scaled_weights(base: nn.Module, scales: dict[str, tuple[torch.Tensor, bool]]) -> nn.Module:
    """A copy of ``base`` with W ← diag(l) W (output side) or W diag(l) (input side) at these paths."""
    twin = copy_of(base)
    with torch.no_grad():
        for path, (scale, input_side) in scales.items():
            weight = twin.get_submodule(path).weight
            weight.mul_(scale if input_side else scale.unsqueeze(1))
    return twin


# ---- Exercise 7.1: bottleneck adapters --------------------------------------------------------------


@pytest.mark.exercise("7.1")
def test_bottleneck_adapter_is_the_identity_at_init(peft_methods):
    """BottleneckAdapter(dim, m): down (m, dim) with a bias, up (dim, m) zero with a zero bias, so a(h) = h."""
    seed(0)
    adapter = peft_methods.BottleneckAdapter(12, 4).double()
    expect_tensor(adapter.down.weight, (4, 12), "adapter.down.weight", hint="the check: down projects dim → bottleneck")
    expect_tensor(adapter.up.weight, (12, 4), "adapter.up.weight", hint="the check: up projects bottleneck → dim")
    assert adapter.down.bias is not None and adapter.up.bias is not None, "both projections have a bias"
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0, (
        "up starts at zero (weight and bias): the adapted model starts as the pretrained one"
    )
    assert torch.count_nonzero(adapter.down.weight) > 0, "down keeps nn.Linear's random init (else nothing trains)"
    h = randn(5, 12, seed_=1)
    assert torch.equal(adapter(h), h), "at init the adapter returns its input unchanged (h + 0)"


@pytest.mark.exercise("7.1")
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_bottleneck_adapter_forward(peft_methods, activation):
    """a(h) = h + W_up f(W_down h + b_down) + b_up, with f the named activation."""
    adapter = peft_methods.BottleneckAdapter(12, 4, activation=activation).double()
    params = {name: randn(*p.shape, seed_=10 + i, std=0.5) for i, (name, p) in enumerate(adapter.named_parameters())}
    for name, value in params.items():
        set_param(adapter.get_parameter(name), value)
    h = randn(2, 5, 12, seed_=2)
    functions = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}
    assert_network_close(adapter(h), adapter_expected(params, h, functions[activation]), f"adapter({activation}) output",
                         hint="the check: a(h) = h + up(f(down(h)))")  # fmt: skip


@pytest.mark.exercise("7.1")
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_add_adapters_places_and_freezes(peft_methods, tiny_model64, token_ids, placement):
    """Houlsby: adapters after o_proj and down_proj of every block; Pfeiffer: after down_proj only; only adapters train."""
    base = copy_of(tiny_model64)
    model = peft_methods.add_adapters(tiny_model64, bottleneck=3, placement=placement)
    assert model is tiny_model64, "add_adapters modifies the model in place and returns it"
    wrapped = sorted(p for p, m in model.named_modules() if isinstance(m, peft_methods.AdapterLayer))
    suffixes = ("self_attn.o_proj", "mlp.down_proj") if placement == "houlsby" else ("mlp.down_proj",)
    expected = sorted(f"layers.{i}.{s}" for i in range(2) for s in suffixes)
    assert wrapped == expected, f"placement={placement!r}: adapters belong at {expected}, found them at {wrapped}"
    per_adapter = 2 * 16 * 3 + 3 + 16
    names = trainable_names(model)
    assert all(".adapter." in n for n in names) and len(names) == 4 * len(expected), (
        f"only the adapters' down/up weights and biases train; trainable: {names}"
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == per_adapter * len(expected), (
        f"{len(expected)} adapters of 2·16·3 + 3 + 16 = {per_adapter} parameters each, got {trainable} trainable"
    )
    assert_network_close(model(token_ids), base(token_ids), "logits right after add_adapters",
                         hint="the check: a fresh adapter is the identity (up = 0): the model's logits are the base's")  # fmt: skip


@pytest.mark.exercise("7.1")
def test_adapted_model_computes_adapters_on_sublayer_outputs(peft_methods, tiny_model64, token_ids):
    """With trained adapters the model equals the plain model whose o_proj and down_proj outputs pass through h + up(f(down h))."""
    base = copy_of(tiny_model64)
    model = peft_methods.add_adapters(tiny_model64, bottleneck=3, placement="houlsby", activation="gelu")
    functions = {}
    for i, (path, layer) in enumerate(
        (p, m) for p, m in model.named_modules() if isinstance(m, peft_methods.AdapterLayer)
    ):
        params = {
            n: randn(*p.shape, seed_=20 + 4 * i + j, std=0.4)
            for j, (n, p) in enumerate(layer.adapter.named_parameters())
        }
        for name, value in params.items():
            set_param(layer.adapter.get_parameter(name), value)
        functions[path] = lambda h, p=params: adapter_expected(p, h, F.gelu)
    expected = with_output_hooks(base, functions)(token_ids)
    assert_network_close(model(token_ids), expected, "logits with trained Houlsby adapters",
                         hint="the check: the adapter acts on the projection's OUTPUT, before the block adds its residual")  # fmt: skip


# ---- Exercise 7.2: prompt tuning ---------------------------------------------------------------------


@pytest.mark.exercise("7.2")
def test_prompt_embedding_random_init_is_peft_draw(peft_methods):
    """init="random": the table is nn.Embedding(n, dim)'s own N(0, 1) draw, the one PEFT makes after the same seed."""
    seed(3)
    prompt = peft_methods.PromptEmbedding(5, 16)
    seed(3)
    expected = nn.Embedding(5, 16).weight
    expect_tensor(prompt.embedding.weight, (5, 16), "PromptEmbedding.embedding.weight", dtype=torch.float32)
    assert torch.equal(prompt.embedding.weight, expected), (
        "the random init must be nn.Embedding(n, dim)'s own init, created first (PEFT's RANDOM draw)"
    )
    assert prompt.embedding.weight.requires_grad, "the virtual tokens train"
    assert torch.equal(prompt(), prompt.embedding.weight), "forward() returns the (n, dim) table"


@pytest.mark.exercise("7.2")
@pytest.mark.parametrize(
    ("n", "ids", "expected"), [(5, [4, 7], [4, 7, 4, 7, 4]), (2, [1, 2, 3], [1, 2]), (3, [9, 8, 2], [9, 8, 2])]
)
def test_prompt_init_from_tokens_repeats_and_cuts(peft_methods, tiny_model64, n, ids, expected):
    """init="tokens": the embeddings of init_token_ids, repeated to fill n slots or cut to n; float32 copies, embeddings untouched."""
    before = tiny_model64.embed_tokens.weight.detach().clone()
    prompt = peft_methods.PromptEmbedding(n, 16, "tokens", tiny_model64.embed_tokens, ids)
    want = before[expected].float()
    expect_tensor(prompt.embedding.weight, (n, 16), "the prompt table", dtype=torch.float32,
                  hint="the check: the copies are float32, as PEFT's")  # fmt: skip
    assert torch.equal(prompt.embedding.weight, want), (
        f"n={n}, init_token_ids={ids}: the rows must be the embeddings of {expected} (repeat the ids, then cut to n)"
    )
    assert prompt.embedding.weight.requires_grad, "the copied table trains"
    prompt.embedding.weight.sum().backward()
    assert tiny_model64.embed_tokens.weight.grad is None, "the copy is detached: no gradient may reach embed_tokens"
    assert torch.equal(tiny_model64.embed_tokens.weight, before), "init must not change the model's embeddings"


@pytest.mark.exercise("7.2")
def test_prompt_init_sample_vocab_draws_after_the_table(peft_methods, tiny_model64):
    """init="sample_vocab": n ids from randint(0, vocab, (n,)) drawn AFTER nn.Embedding(n, dim), as PEFT draws them."""
    seed(4)
    prompt = peft_methods.PromptEmbedding(6, 16, "sample_vocab", tiny_model64.embed_tokens)
    seed(4)
    nn.Embedding(6, 16)
    ids = torch.randint(0, 18, (6,), dtype=torch.long)
    assert torch.equal(prompt.embedding.weight, tiny_model64.embed_tokens.weight[ids].float()), (
        f"the rows must be the embeddings of the ids {ids.tolist()} that randint draws after the table is created"
    )


@pytest.mark.exercise("7.2")
def test_prompt_tuning_is_a_prefix_of_real_tokens(peft_methods, tiny_model64, token_ids):
    """Virtual tokens equal to the embeddings of tokens t give the plain model's logits on [t ; x], last T positions."""
    base = copy_of(tiny_model64)
    model = peft_methods.get_prompt_tuning_model(tiny_model64, num_virtual_tokens=N_VIRTUAL).double()
    context = context_tokens()
    set_param(model.prompt_encoder.embedding.weight, base.embed_tokens.weight[context])
    logits = model(token_ids)
    expect_tensor(logits, (2, 10, 18), "the wrapped model's logits",
                  hint="the check: the logits of the T real tokens only, (B, T, vocab)")  # fmt: skip
    assert_network_close(logits, plain_logits_after(base, context, token_ids), "logits with the prompt",
                         hint="the check: the logits of [prompt ; embed(x)] at the T real positions equal the plain model's on [t ; x]")  # fmt: skip


@pytest.mark.exercise("7.2")
def test_prompt_tuning_trains_only_the_prompt(peft_methods, tiny_model, token_ids):
    """get_prompt_tuning_model freezes the model: only the (n, C) table trains and only it gets a gradient."""
    before = frozen_state(tiny_model)
    model = peft_methods.get_prompt_tuning_model(tiny_model, num_virtual_tokens=4)
    assert trainable_names(model) == ["prompt_encoder.embedding.weight"], (
        f"only the prompt table may train, got {trainable_names(model)}"
    )
    model(token_ids).logsumexp(-1).sum().backward()
    grad = model.prompt_encoder.embedding.weight.grad
    assert grad is not None and torch.count_nonzero(grad) > 0, "the loss must reach the prompt table"
    assert all(p.grad is None for p in tiny_model.parameters()), "no gradient may reach the frozen model"
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items()), "the model's weights stay"


# ---- Exercise 7.3: P-tuning ---------------------------------------------------------------------------


@pytest.mark.exercise("7.3")
def test_p_tuning_mlp_encoder_matches_peft_layout(peft_methods):
    """PromptEncoder("mlp"): embedding, then Linear(dim, h) ReLU Linear(h, h) ReLU Linear(h, dim), created in PEFT's order."""
    seed(6)
    encoder = peft_methods.PromptEncoder(4, 16, "mlp", hidden_size=10)
    seed(6)
    expected = {"embedding": nn.Embedding(4, 16)}
    expected["mlp_head"] = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 16))
    want = {f"{k}.{n}": v for k, module in expected.items() for n, v in module.state_dict().items()}
    got = encoder.state_dict()
    assert sorted(got) == sorted(want), f"the encoder's parameters must be named {sorted(want)}, got {sorted(got)}"
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs from PEFT's draw: create the modules in PEFT's order"
    x = encoder.embedding.weight.detach().double()
    h = F.relu(F.linear(x, got["mlp_head.0.weight"].double(), got["mlp_head.0.bias"].double()))
    h = F.relu(F.linear(h, got["mlp_head.2.weight"].double(), got["mlp_head.2.bias"].double()))
    h = F.linear(h, got["mlp_head.4.weight"].double(), got["mlp_head.4.bias"].double())
    assert_network_close(
        encoder.double()(),
        h,
        "PromptEncoder('mlp')()",
        hint="the check: forward() is the MLP of the (n, dim) embedding table",
    )


@pytest.mark.exercise("7.3")
def test_p_tuning_model_prepends_the_encoded_prompt(peft_methods, tiny_model64, token_ids):
    """get_p_tuning_model: the encoder's output (n, C) is the prompt; embedding and encoder train, the model does not."""
    base = copy_of(tiny_model64)
    model = peft_methods.get_p_tuning_model(tiny_model64, num_virtual_tokens=N_VIRTUAL, hidden_size=8).double()
    names = trainable_names(model)
    assert names and all(n.startswith("prompt_encoder.") for n in names), f"only the prompt encoder trains, got {names}"
    assert "prompt_encoder.embedding.weight" in names, "the encoder's input embedding trains too"
    with torch.no_grad():
        prompt = model.prompt_encoder()
    expect_tensor(prompt, (N_VIRTUAL, 16), "prompt_encoder()")
    assert_network_close(model(token_ids), expected_prompt_logits(base, prompt, token_ids), "P-tuning logits",
                         hint="the check: the encoded prompt goes before the token embeddings, as in prompt tuning")  # fmt: skip


# ---- Exercise 7.4: prefix tuning ---------------------------------------------------------------------


@pytest.mark.exercise("7.4")
def test_prefix_encoder_layout_and_draws(peft_methods):
    """PrefixEncoder(projection=True): embedding (n, C), transform Linear(C, h) Tanh Linear(h, 2·L·C), PEFT's order."""
    seed(7)
    encoder = peft_methods.PrefixEncoder(4, 2, 16, projection=True, hidden_size=10)
    seed(7)
    embedding = nn.Embedding(4, 16)
    transform = nn.Sequential(nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 64))
    want = {"embedding.weight": embedding.weight, **{f"transform.{n}": v for n, v in transform.state_dict().items()}}
    got = encoder.state_dict()
    assert sorted(got) == sorted(want), f"the encoder's parameters must be named {sorted(want)}, got {sorted(got)}"
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs from PEFT's draw (same modules, same order)"
    with torch.no_grad():
        expected = transform(embedding.weight)
    out = encoder()
    expect_tensor(out, (4, 64), "PrefixEncoder()", hint="the check: (n, 2·L·C), a key and a value of width C per layer")
    assert torch.allclose(out, expected, rtol=0, atol=1e-6), "forward() is transform(embedding table), Tanh inside"


@pytest.mark.exercise("7.4")
def test_prefix_key_values_layout(peft_methods):
    """prefix_key_values: row i, slice 2l is layer l's key and 2l+1 its value, H_kv heads of hd; (B, H_kv, n, hd) each."""
    n, L, H, hd, B = 3, 2, 2, 4, 5
    flat = torch.arange(n * 2 * L * H * hd, dtype=torch.float64).view(n, -1)
    pairs = peft_methods.prefix_key_values(flat, B, L, H)
    assert len(pairs) == L, f"one (key, value) pair per layer: {L}, got {len(pairs)}"
    for layer, (key, value) in enumerate(pairs):
        expect_tensor(key, (B, H, n, hd), f"layer {layer} key")
        expect_tensor(value, (B, H, n, hd), f"layer {layer} value")
        for i in range(n):
            for h in range(H):
                k_want = flat[i, (2 * layer) * H * hd + h * hd : (2 * layer) * H * hd + (h + 1) * hd]
                v_want = flat[i, (2 * layer + 1) * H * hd + h * hd : (2 * layer + 1) * H * hd + (h + 1) * hd]
                assert torch.equal(key[B - 1, h, i], k_want) and torch.equal(value[0, h, i], v_want), (
                    f"layer {layer}, head {h}, token {i}: expected key numbers {k_want[:2].tolist()}…, value "
                    f"{v_want[:2].tolist()}… (PEFT: view(n, 2L, H_kv, hd), slice 2l = key, 2l+1 = value)"
                )


@pytest.mark.exercise("7.4")
def test_prefix_is_a_kv_cache_of_virtual_tokens(peft_methods, tiny_model64, token_ids):
    """Prefixes equal to the base model's keys and values of tokens t give the plain model's logits on [t ; x]."""
    base = copy_of(tiny_model64)
    model = peft_methods.get_prefix_tuning_model(tiny_model64, num_virtual_tokens=N_VIRTUAL, projection=False).double()
    context = context_tokens()
    set_param(model.prefix_encoder.embedding.weight, kv_cache_table(base, context))
    assert_network_close(model(token_ids), plain_logits_after(base, context, token_ids), "logits with a KV-cache prefix",
                         hint="the check: a KV-cache prefix in PEFT's layout gives the plain model's logits on [t ; x]")  # fmt: skip


@pytest.mark.exercise("7.4")
def test_prefix_tuning_on_grouped_query_attention(peft_methods, token_ids):
    """With 2 key/value heads for 4 query heads, prefixes are H_kv·hd = 8 wide (PEFT's token_dim), a KV cache of t."""
    base = gqa_model()
    model = peft_methods.get_prefix_tuning_model(copy_of(base), num_virtual_tokens=N_VIRTUAL).double()
    D, L = 2 * 4, 2  # H_kv · hd, layers
    expect_tensor(model.prefix_encoder.embedding.weight, (N_VIRTUAL, D), "prefix_encoder.embedding.weight",
                  hint="the check: the prefix width is PEFT's token_dim, n_kv_heads · head_dim (prefix_shape), not d_model")  # fmt: skip
    expected_count = N_VIRTUAL * D + (D * D + D) + (D * 2 * L * D + 2 * L * D)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected_count, (
        f"embedding (n·D) + Linear(D, D) + Linear(D, 2·L·D) with D = H_kv·hd = 8 and the hidden size defaulting to D "
        f"(PEFT's encoder_hidden_size): {expected_count} trainable numbers, got {count}"
    )
    expect_tensor(
        model.prefix_encoder(), (N_VIRTUAL, 2 * L * D), "PrefixEncoder()", hint="the check: (n, 2·L·D), D = H_kv·hd"
    )
    table_model = peft_methods.get_prefix_tuning_model(copy_of(base), N_VIRTUAL, projection=False).double()
    context = context_tokens()
    set_param(table_model.prefix_encoder.embedding.weight, kv_cache_table(base, context))
    assert_network_close(table_model(token_ids), plain_logits_after(base, context, token_ids),
                         "logits with a KV-cache prefix on a grouped-query model",
                         hint="the check: a KV-cache prefix of a grouped-query model (each slice of D numbers = H_kv heads of hd) gives the plain model's logits on [t ; x]")  # fmt: skip


@pytest.mark.exercise("7.4")
def test_prefix_tuning_trains_the_encoder_and_folds(peft_methods, tiny_model, token_ids):
    """get_prefix_tuning_model trains embedding + MLP; fold_reparameterization leaves one (n, 2·L·C) table, same logits."""
    model = peft_methods.get_prefix_tuning_model(tiny_model, num_virtual_tokens=4, hidden_size=12)
    names = trainable_names(model)
    assert names and all(n.startswith("prefix_encoder.") for n in names), f"only the prefix encoder trains: {names}"
    expected_count = 4 * 16 + (16 * 12 + 12) + (12 * 64 + 64)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected_count, (
        f"embedding (4·16) + Linear(16, 12) + Linear(12, 64) = {expected_count}, got {count}"
    )
    with torch.no_grad():
        before = model(token_ids)
        table = model.prefix_encoder()
    assert peft_methods.fold_reparameterization(model) is model, "fold_reparameterization returns the model it folded"
    names = trainable_names(model)
    assert names == ["prefix_encoder.embedding.weight"], f"after folding only the (n, 2·L·C) table remains: {names}"
    assert torch.equal(model.prefix_encoder.embedding.weight, table), "the folded table is the encoder's output"
    assert torch.allclose(model(token_ids), before, rtol=0, atol=1e-5), "folding must not change the logits"


# ---- Exercise 7.5: P-tuning v2 -----------------------------------------------------------------------


@pytest.mark.exercise("7.5")
def test_p_tuning_v2_trains_deep_prompts_directly(peft_methods, tiny_model, token_ids):
    """get_p_tuning_v2_model: a PrefixTuningModel whose prefixes (n, 2·L·C) train directly (no MLP), N(0, 1) init."""
    seed(8)
    model = peft_methods.get_p_tuning_v2_model(tiny_model, num_virtual_tokens=5)
    seed(8)
    expected = nn.Embedding(5, 2 * 2 * 16).weight
    assert isinstance(model, peft_methods.PrefixTuningModel), "P-tuning v2 is prefix tuning (prompts in every layer)"
    assert trainable_names(model) == ["prefix_encoder.embedding.weight"], (
        f"no reparameterisation: only the (n, 2·L·C) table trains, got {trainable_names(model)}"
    )
    assert torch.equal(model.prefix_encoder.embedding.weight, expected), (
        "the table is nn.Embedding(n, 2·L·C)'s own N(0, 1) draw (PEFT's prefix_projection=False)"
    )
    assert model(token_ids).shape == (2, 10, 18), "the logits of the T real tokens"


# ---- Exercise 7.6: IA³ -----------------------------------------------------------------------------


@pytest.mark.exercise("7.6")
def test_ia3_layer_init_and_sides(peft_methods):
    """IA3Layer: ia3_l is ones, (out,) on the output side and (in,) on the input (feed-forward) side; h = W x at init."""
    linear = nn.Linear(6, 4, bias=False, dtype=torch.float64)
    out_side, in_side = (
        peft_methods.IA3Layer(linear),
        peft_methods.IA3Layer(nn.Linear(6, 4, bias=False), feedforward=True),
    )
    expect_tensor(
        out_side.ia3_l, (4,), "ia3_l (output side)", hint="the check: one scale per output feature, a 1-D vector"
    )
    expect_tensor(
        in_side.ia3_l, (6,), "ia3_l (feed-forward side)", hint="the check: one scale per input feature, a 1-D vector"
    )
    assert torch.equal(out_side.ia3_l, torch.ones(4, dtype=torch.float64)), "ia3_l starts at ones (PEFT's init)"
    assert out_side.ia3_l.requires_grad, "ia3_l trains"
    x = randn(3, 6, seed_=9)
    assert torch.equal(out_side(x), linear(x)), "at init the layer computes W x exactly"


@pytest.mark.exercise("7.6")
def test_ia3_model_scales_keys_values_and_mlp_input(peft_methods, tiny_model64, token_ids):
    """get_ia3_model: k, v scaled on the output (rows of W), down_proj on its input (columns); only ia3_l trains."""
    base = copy_of(tiny_model64)
    model = peft_methods.get_ia3_model(tiny_model64)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, peft_methods.IA3Layer)}
    expected_paths = sorted(
        f"layers.{i}.{s}" for i in range(2) for s in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert sorted(layers) == expected_paths, (
        f"IA³'s defaults wrap k_proj, v_proj, down_proj: {expected_paths}, got {sorted(layers)}"
    )
    assert trainable_names(model) == sorted(f"{p}.ia3_l" for p in expected_paths), "only the ia3_l vectors train"
    scales = {}
    for i, (path, layer) in enumerate(sorted(layers.items())):
        value = 1 + randn(*layer.ia3_l.shape, seed_=30 + i, std=0.3)
        set_param(layer.ia3_l, value)
        scales[path] = (value, path.endswith("down_proj"))
    assert_network_close(model(token_ids), scaled_weights(base, scales)(token_ids), "IA³ logits",
                         hint="the check: keys and values are l ⊙ (W x); down_proj computes W (l ⊙ x) (l scales the MLP's intermediate activation)")  # fmt: skip


@pytest.mark.exercise("7.6")
def test_ia3_merge_and_unmerge(peft_methods, tiny_model64, token_ids):
    """merge_ia3 folds every l into its W (same logits, forward no longer scales); unmerge restores W."""
    base = copy_of(tiny_model64)
    model = peft_methods.get_ia3_model(tiny_model64)
    layers = [m for m in model.modules() if isinstance(m, peft_methods.IA3Layer)]
    for i, layer in enumerate(layers):
        set_param(layer.ia3_l, 1 + randn(*layer.ia3_l.shape, seed_=40 + i, std=0.3))
    before = model(token_ids)
    peft_methods.merge_ia3(model)
    assert all(layer.merged for layer in layers), "merge() sets merged = True"
    assert_network_close(model(token_ids), before, "logits after merging",
                         hint="the check: merged, the logits are unchanged (W ← diag(l) W on the output side, W diag(l) on the input side)")  # fmt: skip
    for layer in layers:
        layer.unmerge()
    assert not any(layer.merged for layer in layers), "unmerge() sets merged = False"
    assert_network_close(model(token_ids), before, "logits after unmerging",
                         hint="the check: after unmerge the logits are the unmerged ones again (W0 restored, l applied in forward)")  # fmt: skip
    restored = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()}
    for name, value in base.state_dict().items():
        assert torch.allclose(restored[name], value, rtol=1e-12, atol=0), f"unmerge must restore {name} (divide by l)"


# ---- Exercise 7.7: one entry point --------------------------------------------------------------------


@pytest.mark.exercise("7.7")
@pytest.mark.parametrize(
    ("method", "options", "kind"),
    [
        ("lora", {"r": 2, "lora_alpha": 4}, "in place"),
        ("adapter", {"bottleneck": 2}, "in place"),
        ("prompt_tuning", {"num_virtual_tokens": 4}, "PromptLearningModel"),
        ("p_tuning", {"num_virtual_tokens": 4}, "PromptLearningModel"),
        ("prefix_tuning", {"num_virtual_tokens": 4}, "PrefixTuningModel"),
        ("p_tuning_v2", {"num_virtual_tokens": 4}, "PrefixTuningModel"),
        ("ia3", {}, "in place"),
    ],
)
def test_get_peft_method_model_dispatches(peft_methods, lora, tiny_model, token_ids, method, options, kind):
    """get_peft_method_model(model, method, **options) builds the method; count_parameters counts what trains."""
    model = peft_methods.get_peft_method_model(tiny_model, method, **options)
    if kind == "in place":
        assert model is tiny_model, f"{method!r} changes the model in place and returns it"
    else:
        assert type(model).__name__ == kind, f"{method!r} returns a {kind} around the model, got {type(model).__name__}"
    trainable, total = lora.count_parameters(model)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable == counted < total, (
        f"{method!r}: only the method's parameters train (count_parameters says {trainable} of {total})"
    )
    assert model(token_ids).shape == (2, 10, 18), f"{method!r}: logits (B, T, vocab) for the real tokens"


@pytest.mark.exercise("7.7")
def test_method_profile(peft_methods, tiny_model):
    """method_profile: extra positions (n for prompt methods), mergeable (LoRA, IA³), trainable count."""
    expected = {
        "lora": (0, True), "adapter": (0, False), "prompt_tuning": (4, False), "p_tuning": (4, False),
        "prefix_tuning": (4, False), "p_tuning_v2": (4, False), "ia3": (0, True),
    }  # fmt: skip
    options = {"lora": {"r": 2}, "adapter": {}, "ia3": {}}
    for method, (extra, mergeable) in expected.items():
        model = peft_methods.get_peft_method_model(
            copy_of(tiny_model), method, **options.get(method, {"num_virtual_tokens": 4})
        )
        profile = peft_methods.method_profile(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        got = (profile.get("extra_positions"), profile.get("mergeable"), profile.get("trainable"))
        assert got == (extra, mergeable, trainable), (
            f"{method}: expected extra_positions={extra}, mergeable={mergeable}, trainable={trainable}, got {got}"
        )
