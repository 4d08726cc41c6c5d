"""A tiny Llama-style causal language model, written from scratch.

The architecture follows Llama (RMSNorm, rotary position embeddings, SwiGLU
MLP, no biases, untied LM head) and uses the same module names as the
Hugging Face implementation, so parameter paths look like

    layers.0.self_attn.q_proj      layers.1.mlp.down_proj      lm_head

which is exactly what LoRA/QLoRA code targets in real models.

One design rule matters for this course: the forward pass only ever *calls*
the projection layers (``self.q_proj(x)``), it never reads their ``.weight``.
That way any ``nn.Linear`` can later be swapped for a LoRA wrapper or a 4-bit
quantized linear with the same call signature and everything keeps working.

Two extension points serve the prompt-based methods of Stage 7 (``model/peft_methods.py``);
without them the forward pass is exactly the plain one:

    model(inputs_embeds=x)      x (B, T, C) replaces the embedding lookup: prompt tuning and
                                P-tuning prepend their virtual tokens' embeddings this way.
    model(ids, prefix=kv)       kv holds one (key, value) pair per layer, each (B, H_kv, P, hd): P
                                extra positions every token attends to, as if a KV cache of P
                                earlier tokens were there (prefix tuning, P-tuning v2). The keys
                                are used as given (not rotated), and the tokens take positions
                                P … P+T−1, exactly as transformers' Llama treats a filled cache
                                (which is how PEFT passes its prefixes).

A third serves generation (``training/generate.py``, lesson 08 §1.6); again the forward pass
without it is exactly the plain one:

    model(ids, cache=c)         a ``KVCache``: each layer appends the new tokens' keys (after
                                RoPE) and values to it and attends over everything cached, so a
                                prompt runs once and every later call feeds one new token.
    model(ids, attention_mask=m)  m (B, P+T), 1 for a real token and 0 for padding (with or without a
                                cache): a row padded on the LEFT gets its positions counted over its
                                real tokens only, and no query ever sees a pad key (transformers'
                                convention for batched generation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
BASE_MODEL_PATH = CHECKPOINT_DIR / "base_model.safetensors"
KeyValue = tuple[torch.Tensor, torch.Tensor]  # one layer's (key, value) prefix, each (B, H_kv, P, hd)
LayerCache = Callable[[torch.Tensor, torch.Tensor], KeyValue]  # stores one layer's new (k, v), returns all cached


@dataclass
class LlamaConfig:
    vocab_size: int = 18  # number of token ids (must match training/data.py VOCAB_SIZE)
    max_seq_len: int = 32  # longest sequence the model is meant to see
    d_model: int = 64  # width of the residual stream (hidden size)
    n_layers: int = 4  # number of decoder layers
    n_heads: int = 4  # attention heads; head_dim = d_model // n_heads
    d_ff: int = 176  # hidden size of the SwiGLU MLP (~8/3 * d_model, as in Llama)
    norm_eps: float = 1e-5  # epsilon inside RMSNorm, avoids division by zero
    rope_theta: float = 10000.0  # base of the rotary position embedding frequencies
    # Real checkpoints (model/hf_checkpoint.py) need three more; the defaults are the bundled model's.
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens' weight (SmolLM2, Llama-3.2-1B)
    rope_scaling: dict | None = None  # None, or Llama 3.1's {"rope_type": "llama3", "factor": …, …}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Heads of keys and values: n_heads, or fewer with grouped-query attention (each shared by n_heads / kv_heads)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: x / rms(x) * weight (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in (at least) fp32 for stability, then return to the input dtype.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight.to(x.dtype)


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    dtype: torch.dtype,
    scaling: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding tables, each of shape (T, head_dim).

    Computed in fp32 (positions * frequencies loses precision in bf16) and
    only then cast to the dtype of the activations they will multiply.
    ``scaling``: None, or Llama 3.1's frequency rescaling (``llama3_frequencies``).
    """
    inv_freq = rope_frequencies(head_dim, theta, device, scaling)  # (head_dim/2,)
    pos = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_frequencies(head_dim: int, theta: float, device: torch.device, scaling: dict | None = None) -> torch.Tensor:
    """The rotation frequencies f_i = theta^(-2i / head_dim), i < head_dim / 2, fp32 (Llama 3.1-rescaled if asked)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    return inv_freq


def rope_cos_sin_at(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables at given positions (B, T) (each row its own, as in a left-padded batch): (B, T, head_dim) each.

    The same products as ``rope_cos_sin`` (position × frequency in fp32), so position p gets the same table row.
    """
    inv_freq = rope_frequencies(head_dim, theta, positions.device, scaling)  # (head_dim/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's RoPE rescaling (transformers' ``rope_type="llama3"``), for long contexts.

    Frequencies whose wavelength 2π/f is longer than original_max_position_embeddings /
    low_freq_factor are divided by ``factor``; those shorter than … / high_freq_factor are kept;
    in between, a linear blend in (original_max_position_embeddings / wavelength).
    """
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope_scaling: only rope_type 'llama3' is supported, got {kind!r}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their position. x: (B, H, T, hd), cos/sin: (T, hd), or (B, 1, T, hd) per row."""
    return x * cos + rotate_half(x) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings.

    With grouped-query attention (config.kv_heads < n_heads) k_proj and v_proj make kv_heads heads,
    each shared by n_heads / kv_heads query heads (repeated before the attention, as transformers does).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        assert config.d_model % config.n_heads == 0, "d_model must be divisible by n_heads"
        assert config.n_heads % config.kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        self.n_heads, self.kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.head_dim
        d, d_kv = config.d_model, config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d_kv, bias=False)
        self.v_proj = nn.Linear(d, d_kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: KeyValue | None = None,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). ``prefix``: (key, value), each (B, H_kv, P, hd), put before the keys and values.

        ``cache``: stores this layer's new keys and values after the P cached ones and returns all P+T of them;
        ``mask``: (B or 1, 1, T, P+T) bool, which keys each query sees (given together with ``cache``).
        """
        B, T, C = x.shape  # (B, T, C)
        q = self._split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, hd)
        k = self._split_heads(self.k_proj(x), self.kv_heads)  # (B, H_kv, T, hd)
        v = self._split_heads(self.v_proj(x), self.kv_heads)  # (B, H_kv, T, hd)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        P = 0 if prefix is None else prefix[0].shape[2]
        if prefix is not None:
            k = torch.cat([prefix[0].to(k.dtype), k], dim=2)  # (B, H_kv, P+T, hd)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=2)  # (B, H_kv, P+T, hd)
        if cache is not None:
            k, v = cache(k, v)  # (B, H_kv, P+T, hd): the cached positions, then these T
        if self.kv_heads != self.n_heads:  # grouped-query attention: each key/value head serves a group
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # (B, H, P+T, hd)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # (B, H, P+T, hd)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        elif prefix is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        else:
            visible = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)  # every prefix slot
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C) re-assemble the heads
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, d_ff)
        return self.down_proj(h)  # (B, T, C)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = CausalSelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: KeyValue | None = None,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, prefix, cache, mask)  # (B, T, C)
        x = x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)
        return x


# ---------------------------------------------------------------------------
# The KV cache (generation)
# ---------------------------------------------------------------------------


class KVCache:
    """The keys (after RoPE) and values of every token seen so far, per layer: what generation reuses.

    A causal model's key and value at position t never depend on later tokens, so they are computed
    once: the prompt fills the cache in one forward pass (prefill), then each call appends one token's.
    Storage is allocated once, at the first append, in the activations' dtype and device:

        keys, values   (L, B, H_kv, max_len, hd) each; positions [0, length) are filled

    2 · L · H_kv · hd numbers per token and row (``bytes_per_token``): keys and values, every layer,
    the H_kv key/value heads before the grouped-query repeat.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int) -> None:
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={config.max_seq_len}], got {max_len}")
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.keys: torch.Tensor | None = None  # (L, B, H_kv, max_len, hd), allocated by the first append
        self.values: torch.Tensor | None = None
        self.length = 0  # cached positions, the same for every layer between forward calls

    @staticmethod
    def bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
        """2 · L · H_kv · hd · bytes: one token's keys and values in every layer (one row of a batch)."""
        return 2 * config.n_layers * config.kv_heads * config.head_dim * torch.finfo(dtype).bits // 8

    def layer(self, index: int) -> LayerCache:
        """The ``cache`` argument of layer ``index``: stores its new (k, v), returns all of its keys and values."""
        return lambda k, v: self._append(index, k, v)

    def _append(self, index: int, k: torch.Tensor, v: torch.Tensor) -> KeyValue:
        B, H_kv, T, hd = k.shape  # (B, H_kv, T, hd)
        if self.keys is None:
            shape = (self.config.n_layers, self.batch_size, H_kv, self.max_len, hd)
            self.keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + T
        self.keys[index, :, :, self.length : end] = k
        self.values[index, :, :, self.length : end] = v
        return self.keys[index, :, :, :end], self.values[index, :, :, :end]  # (B, H_kv, P+T, hd) views

    def check(self, batch_size: int, new_tokens: int) -> None:
        """Refuse a call whose batch does not match or whose tokens do not fit (before anything is written)."""
        if batch_size != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows, the input has {batch_size}")
        if self.length + new_tokens > self.max_len:
            raise ValueError(
                f"the cache holds {self.length} of max_len={self.max_len} positions; {new_tokens} more do not fit"
            )


def visible_keys(T: int, past: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Which keys each of T new queries sees, (B or 1, 1, T, P+T) bool.

    Query i sits at cache position P+i and sees key j when j <= P+i (causal) and key j is a real
    token (``attention_mask[b, j] == 1``). It always sees itself, so a pad query attends to one key,
    not to none: torch's CPU kernel returns zeros for an empty row, but other kernels return NaN, and
    a NaN would leak into every later position through a zero attention weight.
    """
    causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, P+T)
    if attention_mask is None:
        return causal[None, None]  # (1, 1, T, P+T)
    itself = F.pad(torch.eye(T, dtype=torch.bool, device=device), (past, 0))  # (T, P+T): key P+i for query i
    real = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, P+T)
    return causal & (real | itself)  # (B, 1, T, P+T)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class TinyLlama(nn.Module):
    """Decoder-only causal LM: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, two uses
        # Set to True to recompute each layer's activations in the backward pass
        # (trades compute for memory; only active in training mode).
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 style: shrink the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        prefix: list[KeyValue] | tuple[KeyValue, ...] | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Token ids (B, T), or ``inputs_embeds`` (B, T, C), -> logits (B, T, vocab).

        ``prefix``: one (key, value) pair per layer, each (B, H_kv, P, hd); the tokens then sit at
        positions P … P+T−1 (see the module docstring). P + T must not exceed max_seq_len.
        ``cache`` (a KVCache holding P positions), ``attention_mask`` (B, P+T) and ``logits_to_keep``
        (the last k positions' logits only, (B, k, vocab); 0: all): see ``forward_cached``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, C)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if cache is not None or attention_mask is not None or logits_to_keep:
            if prefix is not None:
                raise ValueError("prefix= cannot be combined with cache=, attention_mask= or logits_to_keep=")
            return self.forward_cached(x, cache, attention_mask, logits_to_keep)
        seq_len, past = x.shape[1], 0 if prefix is None else self._check_prefix(prefix, x)
        if past + seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len}"
                + (f" + prefix length {past}" if past else "")
                + f" > max_seq_len={self.config.max_seq_len}"
            )
        cos, sin = rope_cos_sin(
            past + seq_len, self.config.head_dim, self.config.rope_theta, x.device, x.dtype, self.config.rope_scaling
        )  # (P+T, hd) each
        cos, sin = cos[past:], sin[past:]  # (T, hd): the tokens' own positions
        for i, layer in enumerate(self.layers):
            layer_prefix = None if prefix is None else prefix[i]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, layer_prefix, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_prefix)
        x = self.norm(x)  # (B, T, C)
        return self.lm_head(x)  # (B, T, vocab)

    def forward_cached(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Embeddings x (B, T, C) after the P positions in ``cache`` (P = 0 without one) -> logits (B, T, vocab).

        Each layer appends its new keys and values to the cache and attends over all P+T (``visible_keys``).
        Positions: P … P+T−1; with ``attention_mask`` (B, P+T), each row counts only its real tokens
        (position = number of real tokens before it), so a left-padded prompt gets the positions it would
        have alone. ``logits_to_keep`` = k > 0: the head runs on the last k positions only, (B, k, vocab)
        (a prefill needs one: 1,000 prompt tokens × a 128,256-token vocabulary would be 0.5 GB of fp32 logits).
        """
        B, T, _ = x.shape  # (B, T, C)
        past = 0 if cache is None else cache.length
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} + cached length {past} > max_seq_len={self.config.max_seq_len}")
        if cache is not None:
            cache.check(B, T)
        config = self.config
        if attention_mask is None:
            cos, sin = rope_cos_sin(
                past + T, config.head_dim, config.rope_theta, x.device, x.dtype, config.rope_scaling
            )
            cos, sin = cos[past:], sin[past:]  # (T, hd) each
        else:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"attention_mask must be (B, P+T) = {(B, past + T)}: one entry per cached and new position, "
                    f"got {tuple(attention_mask.shape)}"
                )
            positions = (attention_mask.long().cumsum(-1)[:, past:] - 1).clamp(min=0)  # (B, T) real tokens before
            cos, sin = rope_cos_sin_at(positions, config.head_dim, config.rope_theta, x.dtype, config.rope_scaling)
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over the heads
        mask = visible_keys(T, past, attention_mask, x.device)  # (B or 1, 1, T, P+T)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(i)
            x = layer(x, cos, sin, None, layer_cache, mask)
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, C)
        x = self.norm(x)  # (B, T or k, C)
        return self.lm_head(x)  # (B, T or k, vocab)

    def _check_prefix(self, prefix: list[KeyValue] | tuple[KeyValue, ...], x: torch.Tensor) -> int:
        """The prefix length P, after checking one (key, value) pair of shape (B, H_kv, P, hd) per layer."""
        config = self.config
        if len(prefix) != config.n_layers:
            raise ValueError(f"prefix needs one (key, value) pair per layer ({config.n_layers}), got {len(prefix)}")
        expected = (x.shape[0], config.kv_heads, prefix[0][0].shape[2], config.head_dim)
        for i, pair in enumerate(prefix):
            if len(pair) != 2 or any(tuple(t.shape) != expected for t in pair):
                shapes = [tuple(t.shape) for t in pair]
                raise ValueError(
                    f"prefix[{i}] must be (key, value), each of shape (B, H_kv, P, hd) = {expected}, got {shapes}"
                )
        return expected[2]


# ---------------------------------------------------------------------------
# Saving and loading (safetensors weights + a JSON config beside them)
# ---------------------------------------------------------------------------


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(model: TinyLlama, path: str | Path, metrics: dict | None = None) -> None:
    """Write ``path`` (.safetensors weights) and ``path.with_suffix('.json')``.

    The JSON holds ``{"config": {...}, "metrics": {...}}``; ``metrics`` is
    optional free-form information (e.g. accuracies) kept for reference.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]  # the same tensor as embed_tokens.weight (safetensors stores it once)
    save_file(tensors, str(path))
    meta = {"config": asdict(model.config), "metrics": metrics or {}}
    _json_path(path).write_text(json.dumps(meta, indent=2) + "\n")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TinyLlama:
    """Rebuild a ``TinyLlama`` from files written by :func:`save_model`."""
    path = Path(path)
    meta = json.loads(_json_path(path).read_text())
    model = TinyLlama(LlamaConfig(**meta["config"]))
    tensors = load_file(str(path))
    if model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors)
    return model.to(device)


def load_base_model(device: str | torch.device = "cpu") -> TinyLlama:
    """Load the pretrained base model bundled in ``model/checkpoints/``."""
    if not BASE_MODEL_PATH.exists() or not _json_path(BASE_MODEL_PATH).exists():
        raise FileNotFoundError(
            f"Base checkpoint not found at {BASE_MODEL_PATH}. "
            "Create it with `make pretrain` (or `python -m training.pretrain`)."
        )
    return load_model(BASE_MODEL_PATH, device)
