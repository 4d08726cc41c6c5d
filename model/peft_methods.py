"""LoRA among its relatives (Stage 7): adapters, prompt tuning, P-tuning, prefix tuning, P-tuning v2, IA³.

Every method freezes the pretrained model and trains a few new numbers; they differ in WHERE those
numbers enter the computation. Three families (Lialin et al. 2023, "Scaling Down to Scale Up"):

    additive        new modules or new inputs:  bottleneck adapters (7.1), prompt tuning (7.2),
                    P-tuning (7.3), prefix tuning (7.4), P-tuning v2 (7.5)
    selective       a chosen subset of the existing weights trains (BitFit, the last layers; not built here)
    reparameterised the update of existing weights in a cheaper form: LoRA (Stages 1–2)

IA³ (7.6) adds scaling vectors, so Lialin et al. file it as additive; the course puts it beside LoRA
because, like LoRA, it merges into W and costs nothing at inference.

Where each one sits in a Llama block (x: the residual stream, (B, T, C)):

    tokens ─► embed_tokens ─► [P virtual tokens | T token embeddings]    7.2 prompt tuning, 7.3 P-tuning
                                     │
      ┌──────────────────────────────┤ one block of n_layers
      │  RMSNorm                     │
      │  q = W_q x   k = l_k ⊙ W_k x   v = l_v ⊙ W_v x                   7.6 IA³ (l_k, l_v)
      │  K = [K_prefix ; k]  V = [V_prefix ; v]                          7.4 prefix tuning, 7.5 P-tuning v2
      │  attention ─► o_proj ─► + adapter(·)                              7.1 adapter (Houlsby)
      x + ◄──────────────────────────┘
      │  RMSNorm ─► silu(W_gate x) ⊙ (W_up x) ⊙ l_ff ─► down_proj          7.6 IA³ (l_ff)
      │                                        ─► + adapter(·)            7.1 adapter (Houlsby, Pfeiffer)
      x + ◄──────────────────────────┘
    LoRA (Stage 2): W x + s·B A x inside any of the seven projections.

The methods in equations (n virtual tokens, C = d_model, L layers, H heads, hd = C / H, H_kv key/value heads):

    7.1 adapter         h ← h + W_up f(W_down h + b_down) + b_up       W_down (m, C), W_up (C, m) = 0 at init
    7.2 prompt tuning   X = [E_virtual ; E(tokens)]                      E_virtual (n, C) trains
    7.3 P-tuning        E_virtual = MLP(E') or MLP(BiLSTM(E'))           E' (n, C) and the encoder train
    7.4 prefix tuning   K_l = [P^K_l ; R(W_k x)], V_l = [P^V_l ; W_v x]   [P^K ; P^V] = MLP(E'), E' (n, D);
                                                                      R: RoPE at positions n…n+T−1, P^K not rotated;
                                                                      D = H_kv·hd, the width of one layer's keys
    7.5 P-tuning v2     the same, with the (n, 2·L·D) prefixes trained directly (no MLP)
    7.6 IA³             k = l_k ⊙ W_k x,  v = l_v ⊙ W_v x,  down_proj(l_ff ⊙ a)   vectors, init 1

PEFT 0.21.2 is the reference for the four methods it has: given the same parameters, prompt tuning,
P-tuning (MLP and LSTM encoders), prefix tuning (with and without its projection) and IA³ compute
the same logits as PEFT on a transformers ``LlamaForCausalLM`` holding the same weights
(``solutions/tools/check_peft_methods.py`` measures it). Bottleneck adapters are not in PEFT; they
follow Houlsby et al. (two per block) and Pfeiffer et al. (one, after the MLP).

Nothing here edits Stages 1–6: the prompt-based methods wrap the model and reach its attention
through the two documented extension points of ``model/tiny_llama.py`` (``inputs_embeds=``,
``prefix=``); adapters and IA³ wrap projections, found with Stage 2's ``get_lora_model`` search
(``target_paths``). Every wrapper's forward takes token ids (B, T) and returns logits (B, T, vocab)
for those tokens only, so the Stage 4 trainer, ``exact_match_accuracy`` and the Stage 2
``count_parameters`` work unchanged for every method.

Papers (arXiv ids):
  Adapters     Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", 1902.00751
               Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", 2005.00247
  Prompt       Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", 2104.08691
  P-tuning     Liu et al. 2021, "GPT Understands, Too", 2103.10385
  Prefix       Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2101.00190
  P-tuning v2  Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally
               Across Scales and Tasks", 2110.07602
  IA³          Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
               In-Context Learning", 2205.05638
"""

# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from model.checks import check_int
from model.lora import adapter_placement, count_parameters, get_lora_model, lora_layers, mergeable_weight
from model.lora_variants import mark_trainable, target_paths

# The methods ``get_peft_method_model`` knows, in the lesson's order.
METHODS = ("lora", "adapter", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "ia3")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# Which sublayer outputs get an adapter: Houlsby et al. put one after attention and one after the
# MLP of every block; Pfeiffer et al. keep only the one after the MLP (half the parameters).
ADAPTER_PLACEMENTS = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
PROMPT_INITS = ("random", "tokens", "sample_vocab")
ENCODER_TYPES = ("mlp", "lstm")
# IA³'s defaults for Llama, as PEFT's: rescale keys, values and the MLP's intermediate activation
# (the input of down_proj: a "feed-forward" target is scaled on its input side, the others on their output).
IA3_TARGET_MODULES = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD_MODULES = ("down_proj",)


# ---- Given: small helpers the exercises call -------------------------------------------------------


def freeze(model: nn.Module) -> None:
    """Given: ``requires_grad`` False for every parameter of ``model``."""
    for param in model.parameters():
        param.requires_grad_(False)


def model_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """Given: (n_layers, n_heads, d_model, max_seq_len) of the bundled architecture (``model.config``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "embed_tokens") or not hasattr(model, "layers"):
        raise TypeError(
            f"expected the course's TinyLlama (with .config, .embed_tokens, .layers), got {type(model).__name__}"
        )
    return config.n_layers, config.n_heads, config.d_model, config.max_seq_len


def prefix_shape(model: nn.Module) -> tuple[int, int, int]:
    """Given: (n_layers, n_kv_heads, token_dim) of the prefixes of ``model``; token_dim = H_kv · hd.

    A prefix is one layer's keys (or values) for a virtual token: H_kv heads of hd numbers. With
    grouped-query attention (``config.n_kv_heads`` < n_heads, as in SmolLM2, TinyLlama and Llama 3.2)
    that is narrower than d_model: 6 query heads sharing 2 key/value heads of hd 8 give 16, not 48.
    PEFT sizes its prefixes the same way (``peft/utils/other.py``: token_dim = head_dim ·
    num_key_value_heads, PEFT issue 1901). Without grouped-query attention H_kv = H and token_dim = d_model.
    """
    n_layers, _, _, _ = model_shape(model)
    kv_heads = model.config.kv_heads
    return n_layers, kv_heads, kv_heads * model.config.head_dim


def refuse_peft_method(model: nn.Module) -> None:
    """Given: a ValueError if ``model`` already carries a Stage 7 method or LoRA (one method per base model)."""
    adapted = [path or "(the model)" for path, m in model.named_modules() if isinstance(m, STAGE7_MODULES)]
    adapted += [path for path, _ in lora_layers(model)]
    if adapted:
        raise ValueError(
            f"the model already has a parameter-efficient method (e.g. at {adapted[0]!r}); "
            "apply one method to a fresh base model"
        )


def check_virtual_tokens(num_virtual_tokens: object, model: nn.Module) -> None:
    """Given: 1 ≤ num_virtual_tokens ≤ max_seq_len (more virtual positions than text ones is no longer a prompt)."""
    check_int("num_virtual_tokens", num_virtual_tokens, 1)
    max_seq_len = model_shape(model)[3]
    if num_virtual_tokens > max_seq_len:
        raise ValueError(f"num_virtual_tokens must be <= max_seq_len={max_seq_len}, got {num_virtual_tokens}")


def new_table_module(build: Callable[[], nn.Module], table: torch.Tensor) -> nn.Module:
    """Given: ``build()`` (a module whose ``embedding`` is the table), holding a trainable copy of ``table``.

    The module is built without moving torch's global random generator (its random init is
    thrown away), then placed on the table's device and dtype.
    """
    with torch.random.fork_rng(devices=[]):
        module = build()
    module.embedding.weight = nn.Parameter(table.detach().clone())
    return module


def make_room(model: nn.Module, num_virtual_tokens: int) -> None:
    """Given: let ``model`` accept ``num_virtual_tokens`` more positions (``config.max_seq_len`` += n).

    The bundled model's max_seq_len is its training length (20), a guard against positions it never
    saw. Virtual tokens take n positions before the text, so a prompt-based wrapper raises the
    guard of the model it wraps by n (RoPE itself has no limit; the text keeps the same relative
    distances it had in pretraining).
    """
    model.config = dataclasses.replace(model.config, max_seq_len=model.config.max_seq_len + num_virtual_tokens)


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    """Given: a ValueError unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# ---- Exercise 7.1: bottleneck adapters ---------------------------------------------------------------


class BottleneckAdapter(nn.Module):
    """A residual bottleneck (Houlsby et al. 2019): a(h) = h + W_up f(W_down h + b_down) + b_up.

    h (..., dim) -> (..., dim). ``down``: nn.Linear(dim, bottleneck) with PyTorch's default init;
    ``up``: nn.Linear(bottleneck, dim) with weight and bias zero, so a(h) = h exactly at init (the
    paper draws near-zero weights for the same reason: training starts from the pretrained
    function). Parameters: 2·dim·bottleneck + bottleneck + dim. ``activation``: a key of ACTIVATIONS.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu") -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("bottleneck", bottleneck, 1)
        check_choice("activation", activation, ACTIVATIONS)
        raise NotImplementedError(
            "Exercise 7.1: down, activation, up (zero-initialised) — see tutorial/07-peft-family.md"
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Exercise 7.1: the residual bottleneck — see tutorial/07-peft-family.md")


class AdapterLayer(nn.Module):
    """Given: a sublayer's output projection followed by a BottleneckAdapter: x -> adapter(base_layer(x)).

    Wrapping ``o_proj`` (or ``down_proj``) puts the adapter on the attention (or MLP) output before
    the block's residual addition, which is exactly where Houlsby et al. insert it.
    """

    def __init__(self, base_layer: nn.Module, bottleneck: int, activation: str = "relu") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = BottleneckAdapter(base_layer.out_features, bottleneck, activation)
        self.adapter.to(**adapter_placement(base_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))  # (..., out_features)


def add_adapters(
    model: nn.Module, bottleneck: int = 8, placement: str = "houlsby", activation: str = "relu"
) -> nn.Module:
    """Put an ``AdapterLayer`` on every projection ADAPTER_PLACEMENTS[placement] names; only adapters train.

    In place; returns ``model``. "houlsby": after attention (o_proj) and after the MLP (down_proj)
    of every block; "pfeiffer": after the MLP only. Raises ValueError (model unchanged) for a bad
    argument, a model that already has a method, or a placement that matches nothing.
    """
    raise NotImplementedError(
        "Exercise 7.1: check, find the projections, wrap them, train only the adapters (use target_paths, freeze) — see tutorial/07-peft-family.md"
    )


# ---- Exercise 7.2: prompt tuning ----------------------------------------------------------------------


class PromptEmbedding(nn.Module):
    """Prompt tuning's trainable virtual tokens (Lester et al. 2021): ``embedding.weight`` (n, dim).

    init (as PEFT's ``PromptTuningInit``), the table created first as ``nn.Embedding(n, dim)``:
      "random"        keep nn.Embedding's own init, N(0, 1)
      "tokens"        copy the embeddings of ``init_token_ids`` (PEFT's TEXT, with the ids given
                      instead of a text): repeated to fill n slots, or cut to the first n
      "sample_vocab"  copy the embeddings of n ids drawn uniformly from the vocabulary (after the table)
    Copies are float32 and detached from ``word_embeddings`` (which stays frozen). forward() -> (n, dim).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        dim: int,
        init: str = "random",
        word_embeddings: nn.Embedding | None = None,
        init_token_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_int("num_virtual_tokens", num_virtual_tokens, 1)
        check_choice("init", init, PROMPT_INITS)
        if init != "random" and word_embeddings is None:
            raise ValueError(f"init={init!r} copies token embeddings: pass word_embeddings (the model's embed_tokens)")
        if init == "tokens" and not init_token_ids:
            raise ValueError("init='tokens' needs init_token_ids, a non-empty list of token ids")
        if init == "tokens" and not all(0 <= int(i) < word_embeddings.num_embeddings for i in init_token_ids):
            raise ValueError(
                f"init_token_ids must be ids in [0, {word_embeddings.num_embeddings}), got {list(init_token_ids)}"
            )
        raise NotImplementedError(
            "Exercise 7.2: the table, then its init (use prompt_init_ids) — see tutorial/07-peft-family.md"
        )

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, dim)


def prompt_init_ids(
    num_virtual_tokens: int, init: str, vocab_size: int, init_token_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """The token ids whose embeddings initialise the prompt: (n,) long.

    "tokens": ``init_token_ids`` repeated until n are there, then cut to n (PEFT: ⌈n / len⌉ copies);
    "sample_vocab": ``torch.randint(0, vocab_size, (n,))``.
    """
    raise NotImplementedError("Exercise 7.2: repeat and cut, or sample — see tutorial/07-peft-family.md")


class PromptLearningModel(nn.Module):
    """The base model with n virtual tokens before the text: prompt tuning (7.2) and P-tuning (7.3).

    forward(input_ids (B, T)) -> logits (B, T, vocab) of the T real tokens:

        X = [prompt_encoder() ; embed_tokens(input_ids)]      (B, n + T, C), the prompt shared by the batch
        logits = base_model(inputs_embeds=X)[:, n:]

    The virtual tokens take positions 0 … n−1 and the text n … n+T−1, as in PEFT. Their n output
    rows predict nothing: PEFT labels them −100, we drop them, which is the same loss (our labels
    are already aligned with the positions, and the first real token is never a target). The
    prompt is cast to the text's dtype before the concatenation.
    """

    def __init__(self, base_model: nn.Module, prompt_encoder: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.prompt_encoder = prompt_encoder
        make_room(base_model, self.num_virtual_tokens)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_encoder.embedding.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "Exercise 7.2: prepend the prompt, run the model, keep the real tokens' logits — see tutorial/07-peft-family.md"
        )


def get_prompt_tuning_model(
    model: nn.Module,
    num_virtual_tokens: int = 8,
    init: str = "random",
    init_token_ids: Sequence[int] | None = None,
) -> PromptLearningModel:
    """Freeze ``model`` and wrap it in a PromptLearningModel with a PromptEmbedding; only the prompt trains.

    The prompt is placed on the model's device. Raises ValueError (model unchanged) for a bad argument.
    """
    raise NotImplementedError("Exercise 7.2: check, build the prompt, freeze, wrap — see tutorial/07-peft-family.md")


# ---- Exercise 7.3: P-tuning ---------------------------------------------------------------------------


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder (Liu et al. 2021), layer for layer PEFT's: forward() -> (n, dim).

    ``embedding``: nn.Embedding(n, dim), then
      "mlp":  mlp_head = Linear(dim, hidden) ReLU Linear(hidden, hidden) ReLU Linear(hidden, dim)
      "lstm": lstm_head = nn.LSTM(dim, hidden, num_layers, dropout, bidirectional, batch_first), then
              mlp_head = Linear(2·hidden, 2·hidden) ReLU Linear(2·hidden, dim)
    built in that order (the same seed then draws PEFT's weights). The LSTM reads the n embeddings
    as one sequence of length n. PEFT runs the encoder once per example of the batch; every row is
    the same, so we run it once and share it. hidden defaults to dim (PEFT's default).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        dim: int,
        encoder_type: str = "mlp",
        hidden_size: int | None = None,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("num_virtual_tokens", num_virtual_tokens, 1)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        hidden = dim if hidden_size is None else hidden_size
        check_int("hidden_size", hidden, 1)
        check_int("num_layers", num_layers, 1)
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.encoder_type = encoder_type
        raise NotImplementedError(
            "Exercise 7.3: the embedding, then the LSTM (if any) and the MLP head, in PEFT's order — see tutorial/07-peft-family.md"
        )

    def forward(self) -> torch.Tensor:
        raise NotImplementedError("Exercise 7.3: embeddings through the encoder — see tutorial/07-peft-family.md")


def get_p_tuning_model(
    model: nn.Module,
    num_virtual_tokens: int = 8,
    encoder_type: str = "mlp",
    hidden_size: int | None = None,
    num_layers: int = 2,
    dropout: float = 0.0,
) -> PromptLearningModel:
    """Freeze ``model`` and wrap it with a PromptEncoder; the embedding and the encoder train.

    Raises ValueError (model unchanged) for a bad argument.
    """
    raise NotImplementedError("Exercise 7.3: check, build the encoder, freeze, wrap — see tutorial/07-peft-family.md")


# ---- Exercise 7.4: prefix tuning --------------------------------------------------------------------


class PrefixEncoder(nn.Module):
    """Prefix tuning's parameters (Li & Liang 2021), as PEFT's: forward() -> (n, 2·L·dim).

    ``dim`` is PEFT's token_dim, the width of one layer's keys: H_kv · hd (``prefix_shape``), which is
    d_model only without grouped-query attention.
    projection=True (training with the reparameterisation):
        embedding nn.Embedding(n, dim), transform = Linear(dim, hidden) Tanh Linear(hidden, 2·L·dim)
    projection=False (P-tuning v2, or prefix tuning after ``fold_reparameterization``):
        embedding nn.Embedding(n, 2·L·dim), the prefixes themselves
    Row i holds token i's key and value for every layer (the layout ``prefix_key_values`` reads).
    hidden defaults to dim (PEFT's default: encoder_hidden_size = token_dim).
    Raises ValueError naming num_virtual_tokens or hidden_size for a count below 1.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        dim: int,
        projection: bool = True,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        check_int("num_virtual_tokens", num_virtual_tokens, 1)
        hidden = dim if hidden_size is None else hidden_size
        check_int("hidden_size", hidden, 1)
        self.projection = projection
        raise NotImplementedError(
            "Exercise 7.4: the embedding, and the MLP if projecting — see tutorial/07-peft-family.md"
        )

    def forward(self) -> torch.Tensor:
        raise NotImplementedError(
            "Exercise 7.4: the table, through the MLP if projecting — see tutorial/07-peft-family.md"
        )


def prefix_key_values(
    flat: torch.Tensor, batch_size: int, n_layers: int, n_kv_heads: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split (n, 2·L·D) prefixes into L (key, value) pairs, each (batch_size, H_kv, n, hd), PEFT's layout.

    Row i = token i; its 2·L·D numbers are 2·L slices of D = H_kv·hd (slice 2l: layer l's key,
    2l+1: its value), each slice H_kv heads of hd: the key/value heads, fewer than the query heads
    with grouped-query attention. PEFT: ``view(B, n, 2L, H_kv, hd).permute(2, 0, 3, 1, 4).split(2)``.
    The batch dimension is an expand (no copy): every example sees the same prefix.
    """
    raise NotImplementedError(
        "Exercise 7.4: view, permute, pair up, expand over the batch — see tutorial/07-peft-family.md"
    )


class PrefixTuningModel(nn.Module):
    """The base model with trainable key/value prefixes in every attention layer (7.4, 7.5).

    forward(input_ids (B, T)) -> logits (B, T, vocab):

        [K_l ; V_l] = prefix_key_values(prefix_encoder())[l]        (B, H_kv, n, hd) each, for every layer l
        logits = base_model(input_ids, prefix=[(K_0, V_0), …])

    Every token attends to the n prefix positions and then causally to the text; the text takes
    positions n … n+T−1 (``model/tiny_llama.py``; PEFT through transformers' KV cache does the same).
    """

    def __init__(self, base_model: nn.Module, prefix_encoder: PrefixEncoder) -> None:
        super().__init__()
        self.base_model = base_model
        self.prefix_encoder = prefix_encoder
        make_room(base_model, self.num_virtual_tokens)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix_encoder.embedding.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "Exercise 7.4: build the prefixes, pass them to the model (use prefix_key_values) — see tutorial/07-peft-family.md"
        )


def get_prefix_tuning_model(
    model: nn.Module, num_virtual_tokens: int = 8, projection: bool = True, hidden_size: int | None = None
) -> PrefixTuningModel:
    """Freeze ``model`` and wrap it in a PrefixTuningModel; only the PrefixEncoder trains.

    The encoder's width is the key/value width D = H_kv · hd (``prefix_shape``), as PEFT's.
    Raises ValueError (model unchanged) for a bad num_virtual_tokens (1 to max_seq_len) or
    hidden_size (at least 1), or a model that already has a method.
    """
    raise NotImplementedError(
        "Exercise 7.4: check, build the encoder, freeze, wrap (use prefix_shape) — see tutorial/07-peft-family.md"
    )


def fold_reparameterization(model: nn.Module) -> nn.Module:
    """Replace a trained encoder by the table it computes; the function is unchanged (up to rounding).

    Prefix tuning: PrefixEncoder(projection=True) -> PrefixEncoder(projection=False) holding
    ``encoder()`` as its (n, 2·L·D) table. P-tuning: PromptEncoder -> PromptEmbedding holding
    ``encoder()`` (n, C). The MLP (and LSTM) exist only to make training better conditioned (Li &
    Liang §4.3; Liu et al.); afterwards only the table is needed. The new table trains
    (requires_grad True), on the old one's device and dtype. In place; returns ``model``. Anything
    else (already folded, or another method): a ValueError.
    """
    raise NotImplementedError(
        "Exercise 7.4: compute the table once, swap the encoder for it (use new_table_module) — see tutorial/07-peft-family.md"
    )


# ---- Exercise 7.5: P-tuning v2 ---------------------------------------------------------------------


def get_p_tuning_v2_model(model: nn.Module, num_virtual_tokens: int = 8) -> PrefixTuningModel:
    """Deep prompt tuning (Liu et al. 2022): trainable prefixes in every layer, trained directly.

    The paper's method is prefix tuning without the reparameterisation MLP (it found the MLP's
    benefit task-dependent) and with prompts in every layer instead of the input only: here a
    PrefixTuningModel whose PrefixEncoder has projection=False. PEFT spells it
    ``PrefixTuningConfig(prefix_projection=False)``. Trainable: n · 2 · L · D (D = H_kv · hd). Its init is
    nn.Embedding's N(0, 1), as PEFT's.
    """
    raise NotImplementedError("Exercise 7.5: prefix tuning without the projection — see tutorial/07-peft-family.md")


# ---- Exercise 7.6: IA³ -------------------------------------------------------------------------------


class IA3Layer(nn.Module):
    """IA³ (Liu et al. 2022): a learned vector rescales a frozen projection's output or input.

        output side (keys, values):        h = l ⊙ (W x)        l (out_features,)
        input side ("feed-forward" target): h = W (l ⊙ x)        l (in_features,), scales the MLP's
                                                                 intermediate activation before down_proj
    ``ia3_l`` starts at ones (h = W x at init, PEFT's init_ia3_weights=True) and is 1-D, so the Stage 4
    trainer puts it in its no-weight-decay group (decay would pull it towards 0, not towards 1).
    PEFT stores it as (out, 1) or (1, in): the same numbers. Mergeable: l ⊙ (W x) = (diag(l) W) x
    and W (l ⊙ x) = (W diag(l)) x, so ``merge`` scales W's rows (output side) or columns (input side).
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.merged = False
        raise NotImplementedError(
            "Exercise 7.6: one scale per input (feed-forward) or output feature, all ones — see tutorial/07-peft-family.md"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Exercise 7.6: scale the input or the output — see tutorial/07-peft-family.md")

    def merge(self) -> None:
        """W ← diag(l) W (output side) or W diag(l) (input side); forward then skips the scaling.

        Safe to call twice (the second is a no-op), as LoRALayer.merge. A 4-bit base cannot absorb
        l: a TypeError (``mergeable_weight``), and the layer stays unmerged.
        """
        raise NotImplementedError(
            "Exercise 7.6: scale W's rows or columns once (use mergeable_weight) — see tutorial/07-peft-family.md"
        )

    def unmerge(self) -> None:
        """Undo ``merge`` by dividing (a no-op if not merged).

        A zero in ``ia3_l`` erased its row or column of W, which no division restores: a ValueError
        naming ia3_l, the layer left merged.
        """
        raise NotImplementedError("Exercise 7.6: divide W's rows or columns by l — see tutorial/07-peft-family.md")


def get_ia3_model(
    model: nn.Module,
    target_modules: Iterable[str] | str = IA3_TARGET_MODULES,
    feedforward_modules: Iterable[str] | str = IA3_FEEDFORWARD_MODULES,
) -> nn.Module:
    """Wrap every target in an IA3Layer (input side for ``feedforward_modules``); only ``ia3_l`` trains.

    In place; returns ``model``. Targets are found as ``get_lora_model`` finds them (``target_paths``:
    same errors). Every feed-forward module must also be a target (PEFT's rule). Raises ValueError
    (model unchanged) otherwise.
    """
    raise NotImplementedError(
        "Exercise 7.6: check, find the targets, wrap them (use target_paths, mark_trainable) — see tutorial/07-peft-family.md"
    )


def merge_ia3(model: nn.Module) -> nn.Module:
    """Given: merge every IA3Layer of ``model`` into its weight (in place); returns ``model``."""
    for module in model.modules():
        if isinstance(module, IA3Layer):
            module.merge()
    return model


# ---- Exercise 7.7: one entry point --------------------------------------------------------------------


def get_peft_method_model(model: nn.Module, method: str, **options: object) -> nn.Module:
    """Apply ``method`` (one of METHODS) to ``model`` with its builder's ``options``; returns the model to train.

        "lora"           model.lora.get_lora_model          (r, lora_alpha, target_modules, …)
        "adapter"        add_adapters                        (bottleneck, placement, activation)
        "prompt_tuning"  get_prompt_tuning_model             (num_virtual_tokens, init, init_token_ids)
        "p_tuning"       get_p_tuning_model                  (num_virtual_tokens, encoder_type, hidden_size, …)
        "prefix_tuning"  get_prefix_tuning_model             (num_virtual_tokens, projection, hidden_size)
        "p_tuning_v2"    get_p_tuning_v2_model               (num_virtual_tokens)
        "ia3"            get_ia3_model                       (target_modules, feedforward_modules)

    Layer methods (lora, adapter, ia3) change ``model`` in place and return it; prompt methods return
    a wrapper around it. Either way only the method's parameters train and the Stage 2
    ``count_parameters`` counts them. An unknown method or an option its builder does not take is a
    ValueError naming the allowed ones, raised before anything changes.
    """
    raise NotImplementedError(
        "Exercise 7.7: look the builder up, check the options against its signature, call it — see tutorial/07-peft-family.md"
    )


def method_profile(model: nn.Module) -> dict[str, object]:
    """What a trained model costs at inference: {"extra_positions", "mergeable", "trainable"}.

    extra_positions: positions every forward adds: n for prompt tuning and P-tuning (n more
    tokens through every layer), n for prefix tuning and P-tuning v2 (n more keys and values per
    attention, no more queries), 0 for layer methods. mergeable: True if the method can be folded
    into the base weights so inference costs nothing extra (LoRA, IA³); adapters add a nonlinear
    module, prompts add positions. trainable: the Stage 2 ``count_parameters`` count.
    """
    raise NotImplementedError("Exercise 7.7: read the method off the model — see tutorial/07-peft-family.md")


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lora": get_lora_model,
    "adapter": add_adapters,
    "prompt_tuning": get_prompt_tuning_model,
    "p_tuning": get_p_tuning_model,
    "prefix_tuning": get_prefix_tuning_model,
    "p_tuning_v2": get_p_tuning_v2_model,
    "ia3": get_ia3_model,
}
STAGE7_MODULES = (AdapterLayer, IA3Layer, PromptLearningModel, PrefixTuningModel)
