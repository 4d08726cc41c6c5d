"""LoRA: low-rank adaptation of linear layers (Stages 1 and 2 of the course).

A frozen pretrained layer W0 gets a trainable low-rank update (LoRA paper, §4.1):

    h = W0 x + (lora_alpha / r) · B A x

            x  (..., in_features)
            │
      ┌─────┴───────────┐
      │                 │ dropout (on the LoRA input only)
   W0 (out, in)      A (r, in)       Kaiming-uniform, trainable
   frozen               │ (..., r)
      │              B (out, r)      zeros, trainable → the update starts at exactly 0
      │                 │ × lora_alpha / r
      └────── + ────────┘
            h  (..., out_features)

One orientation throughout, as in the L14 lesson, PEFT and loralib:
``lora_A`` is (r, in_features) and ``lora_B`` is (out_features, r), so ΔW = B @ A is
(out_features, in_features), the same shape as ``nn.Linear.weight``.

LoRA does not factorise W0 (no SVD): it *learns* an additive update ΔW whose rank is at
most r. Merging ΔW into W0 after training is exact up to floating-point rounding.

Read in this order:
  Stage 1  LoRALayer: construction (1.1), forward (1.2), merge / unmerge (1.3)
  Stage 2  get_lora_model (2.1), counting parameters (2.2), merging a model (2.3),
           saving and loading adapters in PEFT's format (2.4)

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
https://arxiv.org/abs/2106.09685
"""

# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# The seven projections of a Llama block (attention and SwiGLU MLP).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT's on-disk names (adapter_config.json + adapter_model.safetensors).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."

INIT_METHODS = ("kaiming", "gaussian")


# ---- Given: helpers the exercises call ------------------------------------------------------


def check_lora_args(
    in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float, init: str
) -> None:
    """Given: raise a ValueError that names the bad argument and the allowed values."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1 (the rank of the update), got {r!r}")
    if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if init not in INIT_METHODS:
        raise ValueError(f"init_lora_weights must be one of {INIT_METHODS}, got {init!r}")


def adapter_placement(base_layer: nn.Module) -> dict[str, object]:
    """Given: where A and B live: ``{"device": ..., "dtype": ...}`` for ``torch.empty``.

    The base layer's device (its first parameter or buffer). Its dtype if that is float32 or
    float64; otherwise (a half-precision or a 4-bit base) float32: trainable adapters keep fp32
    master weights, as PEFT's ``autocast_adapter_dtype`` does.
    """
    for tensor in [*base_layer.parameters(), *base_layer.buffers()]:
        dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
        return {"device": tensor.device, "dtype": dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}


def adds_in_place_safely(base_layer: nn.Module) -> bool:
    """Given: may the forward add LoRA's term into the base layer's output in place?

    Only for bases known to return a fresh tensor that their backward does not need: a plain
    ``nn.Linear``, or a layer that says so with ``output_is_fresh = True`` (``NF4Linear``). An
    identity-like base returns its input (adding in place would overwrite the caller's x); others
    may save their output for backward. Everything else takes the out-of-place sum.
    """
    return type(base_layer) is nn.Linear or getattr(base_layer, "output_is_fresh", False) is True


def mergeable_weight(base_layer: nn.Module) -> torch.Tensor:
    """Given: the base layer's weight, if it is a plain ``nn.Linear`` that ΔW can be added to (else a TypeError)."""
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(
            f"merge() adds ΔW to an nn.Linear weight, but the base layer is a {type(base_layer).__name__}. "
            "Merge into a full-precision copy instead (a 4-bit base: training.qlora_trainer.merge_and_export)."
        )
    return base_layer.weight


def is_linear_like(module: nn.Module) -> bool:
    """Given: an ``nn.Linear``, or a layer that acts like one (``NF4Linear``): LoRA can wrap it."""
    if isinstance(module, LoRALayer):
        return False
    return isinstance(module, nn.Linear) or all(
        isinstance(getattr(module, name, None), int) for name in ("in_features", "out_features")
    )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Given: (module path, layer) for every LoRALayer in ``model``, in ``named_modules`` order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def matches_target(module_path: str, target: str) -> bool:
    """Given: True if ``target`` names the module at ``module_path`` by its last component(s).

    "q_proj" matches "layers.0.self_attn.q_proj"; "self_attn.q_proj" matches it too;
    "proj" does not (whole components only, as in PEFT).
    """
    return module_path == target or module_path.endswith("." + target)


# ---- Exercise 1.1: the LoRA layer -----------------------------------------------------------


class LoRALayer(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    ``h = base_layer(x) + (lora_alpha / r) · B A dropout(x)``

    Args:
        in_features: size k of each input sample.
        out_features: size d of each output sample.
        r: rank of the update, an int ≥ 1 (LoRA paper: 1–8 is often enough).
        lora_alpha: scale numerator, > 0; the update is multiplied by ``lora_alpha / r``, so
            changing r does not change the size of the initial learning steps much.
        lora_dropout: dropout probability in [0, 1) applied to the LoRA input only; the base
            path never sees dropout.
        init_lora_weights: "kaiming" (PEFT's default: A ~ Kaiming-uniform with a = √5, the
            same as ``nn.Linear``'s weight init) or "gaussian" (A ~ N(0, 1/r²)). B is zero
            either way, so a fresh layer reproduces its base layer exactly.
        base_layer: the layer to wrap (used by ``from_linear``); by default a new
            ``nn.Linear(in_features, out_features)``. It is frozen, never copied.

    Attributes:
        base_layer: the frozen layer W0 (``nn.Linear`` or any layer with the same call, such as
            the 4-bit ``NF4Linear`` of Stage 3; this class never looks inside it).
        lora_A: ``nn.Parameter`` of shape (r, in_features).
        lora_B: ``nn.Parameter`` of shape (out_features, r).
        scaling: ``lora_alpha / r``, computed once.
        merged: True while ΔW is folded into ``base_layer.weight``.

    Example (the lesson's count, d = k = 4096, r = 8)::

        layer = LoRALayer(4096, 4096, r=8)
        layer.lora_A.numel() + layer.lora_B.numel()   # 8·(4096 + 4096) = 65,536 ≈ W0/256
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        init_lora_weights: str = "kaiming",
        base_layer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        raise NotImplementedError(
            "Exercise 1.1: check the arguments, freeze the base, create A and B (use check_lora_args, adapter_placement) — see tutorial/01-lora-layer.md"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        init_lora_weights: str = "kaiming",
    ) -> LoRALayer:
        """Wrap an existing layer (``nn.Linear`` or ``NF4Linear``) without copying its weight."""
        return cls(
            linear.in_features,
            linear.out_features,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            base_layer=linear,
        )

    def reset_lora_parameters(self, init_lora_weights: str = "kaiming") -> None:
        """A random, B zero: ΔW = B A = 0, so training starts from the pretrained function.

        "kaiming": ``kaiming_uniform_(A, a=√5)``, i.e. U(-1/√k, 1/√k) for k = in_features.
        "gaussian": A ~ N(0, (1/r)²).
        """
        raise NotImplementedError("Exercise 1.1: initialise A randomly and B to zero — see tutorial/01-lora-layer.md")

    # ---- Exercise 1.2: forward ----------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``h = base_layer(x) + scaling · B (A (dropout(x)))``, never forming B @ A.

        x: (..., in_features), any number of leading dimensions; returns (..., out_features)
        in the dtype the base layer returns (under autocast: the autocast dtype).

        Cost: the two thin products add 2·r·(k + d) FLOPs per token to the base's 2·k·d
        (r = 8, k = d = 512: +3 %). Forming B @ A first would cost d·k·r per *call*.
        When merged, ΔW is already inside W0 and only the base layer runs.
        """
        raise NotImplementedError("Exercise 1.2: the LoRA forward — see tutorial/01-lora-layer.md")

    # ---- Exercise 1.3: merge and unmerge ------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B @ A, shape (out_features, in_features), like ``base_layer.weight``."""
        raise NotImplementedError("Exercise 1.3: the update as a full matrix — see tutorial/01-lora-layer.md")

    def merge(self) -> None:
        """Fold ΔW into the base weight: W0 ← W0 + ΔW. Safe to call twice (the second is a no-op).

        After merging, ``forward`` runs the base layer only, so inference costs nothing extra.
        Exact up to rounding: unmerge() restores W0 to within one rounding step.
        """
        raise NotImplementedError(
            "Exercise 1.3: add the update to the base weight once (use mergeable_weight) — see tutorial/01-lora-layer.md"
        )

    def unmerge(self) -> None:
        """Undo ``merge``: W0 ← W0 − ΔW. Safe to call twice; a no-op when not merged."""
        raise NotImplementedError(
            "Exercise 1.3: subtract the update once (use mergeable_weight) — see tutorial/01-lora-layer.md"
        )

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ---- Exercise 2.1: LoRA in a model ------------------------------------------------------------


def get_lora_model(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] | str | None = None,
    init_lora_weights: str = "kaiming",
) -> nn.Module:
    """Wrap every targeted ``nn.Linear`` of ``model`` in a LoRALayer and freeze everything else.

    Args:
        model: the pretrained model; modified in place and returned.
        r, lora_alpha, lora_dropout, init_lora_weights: as in ``LoRALayer``.
        target_modules: module names matched by their last component(s) (see
            ``matches_target``); default ``DEFAULT_TARGET_MODULES``, the seven Llama projections. A target must be linear-like
            (``is_linear_like``): an ``nn.Linear`` or a 4-bit ``NF4Linear``.

    Returns the same model, in which only ``lora_A`` / ``lora_B`` require gradients.

    Raises (and leaves the model unchanged):
        ValueError: a bad LoRA argument; no module matches (or, for an explicit list, one of the
            names matches nothing: the message names it; with the default, it names the defaults,
            q_proj … down_proj, and lists the model's linear layers); a matched module is not an
            ``nn.Linear``; a matched module is already wrapped.
    """
    raise NotImplementedError(
        "Exercise 2.1: find the targets, check them all, then wrap them and freeze the rest (use matches_target, is_linear_like) — see tutorial/02-lora-in-a-model.md"
    )


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except ``lora_A`` / ``lora_B`` (loralib's contract).

    bias: "none" freezes all biases; "all" trains every bias in the model; "lora_only" trains
    the biases of the layers that LoRA wraps.
    """
    raise NotImplementedError(
        "Exercise 2.1: requires_grad only for LoRA (and the chosen biases) — see tutorial/02-lora-in-a-model.md"
    )


# ---- Exercise 2.2: counting parameters -----------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each shared tensor counted once.

    A 4-bit base layer keeps its packed weight in buffers, not parameters, so it is not
    counted here; bytes of weights are measured separately.
    """
    raise NotImplementedError("Exercise 2.2: count parameters — see tutorial/02-lora-in-a-model.md")


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) PEFT's line: ``trainable params: 2,048 || all params: 10,498 || trainable%: 19.5085``."""
    raise NotImplementedError("Exercise 2.2: PEFT's format — see tutorial/02-lora-in-a-model.md")


# ---- Exercise 2.3: merging a whole model ---------------------------------------------------


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRALayer (``merge`` on each; safe to call twice). Returns the model."""
    raise NotImplementedError("Exercise 2.3: merge each layer (use lora_layers) — see tutorial/02-lora-in-a-model.md")


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Unmerge every LoRALayer. Returns the model."""
    raise NotImplementedError("Exercise 2.3: unmerge each layer — see tutorial/02-lora-in-a-model.md")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each LoRALayer by its base ``nn.Linear``: a plain model again.

    Its outputs equal the LoRA model's up to rounding, and it has no LoRA parameters left.
    """
    raise NotImplementedError("Exercise 2.3: merge, then put the base layers back — see tutorial/02-lora-in-a-model.md")


# ---- Exercise 2.4: saving and loading adapters (PEFT's format) -----------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys.

    ``layers.0.self_attn.q_proj.lora_A`` is saved as
    ``base_model.model.layers.0.self_attn.q_proj.lora_A.weight`` (PEFT keeps A and B in
    ``nn.Linear`` modules, hence ``.weight``; the shapes are the same: A (r, in), B (out, r)).
    """
    raise NotImplementedError("Exercise 2.4: PEFT's keys — see tutorial/02-lora-in-a-model.md")


def save_lora(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``directory``.

    The config carries PEFT's fields (``peft_type``, ``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``bias``, ...), so ``peft.PeftModel.from_pretrained`` can read it.
    Every LoRA layer must share one r and one lora_alpha, and nothing but A and B may be
    trainable (a trained bias would silently be lost). Returns the directory.
    """
    raise NotImplementedError("Exercise 2.4: config + tensors — see tutorial/02-lora-in-a-model.md")


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an adapter written by ``save_lora`` (or by PEFT) into ``model`` and return it.

    If the model has no LoRA layers yet, they are added first, with the config's ``r``,
    ``lora_alpha`` and ``lora_dropout``, to exactly the modules the file holds weights for
    (so an adapter for ``layers.0.self_attn.q_proj`` alone wraps that one layer).

    Raises ValueError, leaving the model untouched, when the adapter does not fit: a module it
    names is missing, a LoRA layer has no weights in it, the rank or alpha differs, or a
    tensor's shape is wrong.
    """
    raise NotImplementedError(
        "Exercise 2.4: check everything, then inject (if needed) and copy — see tutorial/02-lora-in-a-model.md"
    )
