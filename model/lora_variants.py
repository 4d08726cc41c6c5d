"""The LoRA family (Stage 5): ten ideas built on the Stage 1–2 LoRALayer, each fixing one weakness.

Every method keeps LoRA's picture — a frozen W0 (out, in) plus a low-rank update — and changes one
thing: the scale, the parametrisation, the initialisation, what trains, or how the rank is spent.

    plain LoRA      h = W0 x + s · B A x              s = lora_alpha / r, A (r, in) random, B (out, r) = 0

    5.1  rsLoRA     s = lora_alpha / √r                  the update's size no longer shrinks as r grows
    5.2  DoRA       W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row  a trainable length m (out,) per output row, the
                                                         direction from LoRA; the norm is a constant
    5.3  PiSSA      s·B A = top-r SVD part of W0,  W0 ← W0 − s·B A   train the principal part, freeze the rest
         OLoRA      B = Q[:, :r], A = R[:r] (W0 = Q R), W0 ← W0 − s·B A   orthonormal B from the start
    5.4  LoftQ      alternate Q = NF4(W − sBA) and sBA = rank-r SVD of W − Q̂: QLoRA starts nearer W
    5.5  LoRA-FA    A frozen after its random init, only B trains: no (…, in) activation kept for A
    5.6  VeRA       h = W0 x + Λ_b B_s Λ_d A_s x        ONE frozen random pair (A_s, B_s) for all layers,
                                                         trainable vectors λ_d (r,) and λ_b (out,) only
    5.7  AdaLoRA    ΔW = P Λ Q · s / r                   SVD form; an allocator zeroes the least important
                                                         singular values until a budget of ranks is left
    5.8  Delta-LoRA W0 += λ · (s B'A' − s B A) after each step: W0 moves too, with no gradient for it
    5.9  LoRA-drop  measure ‖s B A x‖² per layer; keep the layers holding most of it, the rest share one
    5.10 files      every adapter above in PEFT's format, both ways: rsLoRA, DoRA, PiSSA/OLoRA (converted to a
                    plain LoRA), LoftQ, VeRA, AdaLoRA; PEFT's own PiSSA/OLoRA/LoftQ files recompute W0 on load

              x (..., in)
              │
      ┌───────┴──────────────┐            One orientation throughout, as in Stages 1–2:
      │                      │ dropout    A is (r, in), B is (out, r), ΔW = s · B @ A is (out, in).
    W0 (out, in)          A (r, in)       5.1–5.5, 5.8–5.10 act on LoRALayer objects (DoRALayer is a
    frozen                   │ (..., r)   subclass); VeRA (5.6) puts λ_d here and λ_b below, with A, B
      │                   B (out, r)      frozen and shared; AdaLoRA (5.7) puts Λ (r, 1) between them.
      │                      │ × s
      └────────── + ─────────┘
              h (..., out)

Worked example, the bundled model (d_model 64, d_ff 176, 4 blocks, the 7 projections targeted;
203,584 base parameters): trainable parameters for LoRA r=8 39,424 (r=2: 9,856); DoRA r=8
42,112 (+ one magnitude per output row); LoRA-FA r=8 21,504 (B only); VeRA r=256 9,856 (r + out
per layer); AdaLoRA init_r=12 59,472 (P, Λ, Q), later masked down to the target rank.

PEFT 0.21.2 is the reference for the numerics: given the same weights, rsLoRA, DoRA, PiSSA, OLoRA,
VeRA and AdaLoRA compute the same function as PEFT's ``use_rslora``, ``use_dora``,
``init_lora_weights="pissa"`` / ``"olora"``, ``VeraConfig`` and ``AdaLoraConfig``
(``solutions/tools/check_peft_variants.py`` measures it: max |Δ logits| 0 in fp32). Where PEFT and a
paper differ, the code follows PEFT and the docstring says so (PiSSA's ÷ s, AdaLoRA's unsquared
regulariser, DoRA's dropout term). Where this code differs from PEFT, it says why: LoftQ divides
the residual by s (PEFT's is right only for s = 1); DoRA's norm is at least fp32; AdaLoRA keeps
exactly ``budget`` values on ties and adds its regulariser's gradient after the trainer's clipping.

Nothing here edits Stages 1–4: the classes wrap or subclass ``model.lora.LoRALayer``, NF4 comes from
``model.quant``, and per-step work (AdaLoRA, Delta-LoRA) attaches to any optimizer through its step
hooks, so the Stage 4 trainer runs every method unchanged.

Read in this order: the given helpers, then 5.1 … 5.10, then ``apply_variant`` (one entry point for
comparing the methods side by side).

Papers (arXiv ids):
  rsLoRA      Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2312.03732
  DoRA        Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", 2402.09353
  PiSSA       Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation", 2404.02948
  OLoRA       Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2406.01775
  LoftQ       Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for LLMs", 2310.08659
  LoRA-FA     Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation", 2308.03303
  VeRA        Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", 2310.11454
  AdaLoRA     Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", 2303.10512
  Delta-LoRA  Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
              Low-Rank Matrices", 2309.02411
  LoRA-drop   Zhou et al. 2024, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output
              Evaluation", 2402.07721
  LoRA+       Hayou et al. 2024, 2402.12354 — already in Stage 4 (TrainConfig.loraplus_lr_ratio)
"""

# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model.checks import check_int, check_number
from model.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_KEY_PREFIX,
    LoRALayer,
    adapter_placement,
    check_lora_args,
    get_lora_model,
    is_linear_like,
    load_lora,
    lora_layers,
    lora_state_dict,
    mergeable_weight,
)
from model.quant import NF4Linear, check_block_size, dequantize_nf4, quantize_nf4

# PEFT's name of DoRA's magnitude in adapter_model.safetensors: base_model.model.<path>.lora_magnitude_vector
MAGNITUDE_KEY = "lora_magnitude_vector"

# The methods ``apply_variant`` knows (LoRA+ is a learning-rate ratio: Stage 4's TrainConfig.loraplus_lr_ratio).
VARIANTS = ("lora", "rslora", "dora", "pissa", "olora", "loftq", "lora-fa", "vera", "adalora", "delta-lora")


# ---- Given: small helpers the exercises call (the argument checks are model/checks.py) ---------


def dropout_p(layer: nn.Module) -> float:
    """Given: the dropout probability of a LoRA-style layer (0.0 for ``nn.Identity``)."""
    dropout = getattr(layer, "lora_dropout", None)
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0


def dense_weight(base_layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Given: the base layer's weight W0 as a dense (out, in) tensor, without a graph.

    ``nn.Linear``: its weight (cast to ``dtype`` if given). A 4-bit ``NF4Linear``: its weight
    dequantized on the fly (``dequantize_weight``), as PEFT's ``dequantize_module_weight`` does for
    bitsandbytes layers. Anything else: a TypeError.
    """
    if isinstance(base_layer, nn.Linear):
        weight = base_layer.weight.detach()
        return weight if dtype is None else weight.to(dtype)
    if callable(getattr(base_layer, "dequantize_weight", None)):
        return base_layer.dequantize_weight(dtype or torch.float32).detach()
    raise TypeError(f"expected an nn.Linear or an NF4Linear base layer, got {type(base_layer).__name__}")


def preserve_rng(module: nn.Module) -> AbstractContextManager:
    """Given: a context in which random draws do not move torch's global generators (CPU and the module's GPUs).

    The variant builders create throw-away LoRA layers (to reuse ``get_lora_model``'s search and
    checks); their random A must not change what the next ``torch.rand`` returns.
    """
    tensors = [*module.parameters(), *module.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda)


def refuse_adapted(model: nn.Module) -> None:
    """Given: a ValueError if ``model`` already holds adapter layers (LoRA, DoRA, VeRA or AdaLoRA)."""
    adapted = [path for path, m in model.named_modules() if isinstance(m, (LoRALayer, VeRALayer, AdaLoRALayer))]
    if adapted:
        raise ValueError(
            f"the model already has adapter layers (e.g. {adapted[0]!r}); apply one method to a fresh base model"
        )


def target_paths(model: nn.Module, target_modules: Iterable[str] | str | None) -> dict[str, nn.Module]:
    """Given: {path: module} for the modules ``get_lora_model`` would wrap; the model is left as it was.

    It runs ``get_lora_model`` (your Exercise 2.1: its search, its checks, its error messages),
    notes what it wrapped, then puts the original modules and ``requires_grad`` flags back. The
    throw-away random A is drawn under ``preserve_rng``. Raises what ``get_lora_model`` raises.
    """
    refuse_adapted(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with preserve_rng(model):
        get_lora_model(model, r=1, lora_alpha=1, target_modules=target_modules)
    found = {path: layer.base_layer for path, layer in lora_layers(model)}
    for path, base in found.items():
        model.set_submodule(path, base)
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])
    return found


def mark_trainable(model: nn.Module, names: tuple[str, ...]) -> None:
    """Given: ``requires_grad`` True exactly for the parameters whose last name component is in ``names``."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] in names)


class OptimizerHooks:
    """Given: work that runs around every ``optimizer.step()``, attached without touching the trainer.

    ``attach(optimizer)`` registers a step pre-hook that calls ``before_step(step)`` and a step
    post-hook that calls ``after_step(step)``, with ``step`` the 0-based count of steps seen since
    attaching. The Stage 4 trainer's ``train_step`` runs backward → unscale → clip →
    ``scaler.step(optimizer)`` (which calls ``optimizer.step()``) → scheduler → ``zero_grad()``, so
    both hooks still see this step's gradients. A step the trainer skips (non-finite gradients)
    never calls ``optimizer.step()``: no hook runs and ``step`` does not advance.
    ``detach()`` removes both hooks. Subclasses override ``before_step`` / ``after_step``.
    """

    def __init__(self) -> None:
        self.step = 0  # optimizer steps seen since attach()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> OptimizerHooks:
        if self._handles:
            raise ValueError("these hooks are already attached to an optimizer; call detach() first")
        self._handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step(self.step)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after(self.step)),
        ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _after(self, step: int) -> None:
        self.after_step(step)
        self.step += 1

    def before_step(self, step: int) -> None:
        """Runs before the parameters change (gradients ready)."""

    def after_step(self, step: int) -> None:
        """Runs after the parameters changed (gradients still there)."""


# ---- Exercise 5.1: rsLoRA -----------------------------------------------------------------------


def rslora_scaling(lora_alpha: float, r: int) -> float:
    """rsLoRA's scale ``lora_alpha / √r`` (Kalajdzievski 2023) instead of LoRA's ``lora_alpha / r``.

    With B A of rank r learned from scratch, LoRA's 1/r makes the update (and its gradients)
    shrink as r grows, so large ranks learn no more than small ones; 1/√r keeps the update's size
    independent of r. Example: lora_alpha = 16, r = 64 → LoRA 0.25, rsLoRA 2.0.
    Raises ValueError for r not an int >= 1 or lora_alpha not a finite number > 0.
    """
    raise NotImplementedError(
        "Exercise 5.1: alpha over the square root of r (use check_int, check_number) — see tutorial/05-lora-variants.md"
    )


def use_rslora(model: nn.Module) -> nn.Module:
    """Switch every LoRALayer of ``model`` to rsLoRA: ``scaling = lora_alpha / √r``, ``use_rslora = True``.

    PEFT's ``LoraConfig(use_rslora=True)``. Returns the model. Safe to call twice.
    Raises ValueError, changing nothing, if the model has no LoRA layers, a layer is merged (its
    ΔW was added to W0 with the old scale), or a layer was initialised from W0 by PiSSA, OLoRA or
    LoftQ (the residual in the base used the old scale: switch to rsLoRA first, then initialise).
    """
    raise NotImplementedError(
        "Exercise 5.1: check every layer first, then set the scale (use lora_layers, rslora_scaling) — see tutorial/05-lora-variants.md"
    )


# ---- Exercise 5.2: DoRA -------------------------------------------------------------------------


class DoRALayer(LoRALayer):
    """DoRA: a LoRA layer whose output rows get a trainable length (Liu et al. 2024).

    Decompose the adapted weight into a magnitude per output row and a direction:

        W' = m ⊙ (W0 + s·B A) / n,     n = ‖W0 + s·B A‖ per row (out,)     (DoRA paper, eq. 5)

    m (``magnitude``, (out,), fp32) starts at n, i.e. at the row norms of W0 (B = 0), so a fresh
    layer reproduces its base. As the paper's §4.3 suggests, n is *detached*: a constant in
    backward, recomputed from the current B A in every forward. The forward never forms W':

        h = base(x) + (m/n − 1) ⊙ (W0 x) + (m/n) ⊙ s·B A dropout(x)

    with W0 x the base output without its bias. Same numbers as PEFT 0.21.2's ``use_dora=True``.
    Where they differ from the paper, this follows PEFT: with dropout active (training and
    lora_dropout > 0) the (m/n − 1) term uses W0 · dropout(x), as PEFT does; n is computed in fp32,
    or fp64 for an fp64 adapter (``norm_dtype``; PEFT: in the input's dtype).

    Bases: an ``nn.Linear`` or a 4-bit ``NF4Linear`` (QDoRA: W0 is dequantized for the norm in
    every forward). ``merge()`` needs an ``nn.Linear`` (a TypeError from ``mergeable_weight``
    otherwise): to deploy a 4-bit DoRA model, dequantize first —
    ``training.qlora_trainer.merge_and_export`` does, then calls this class's ``merge``.

    Arguments and attributes: those of ``LoRALayer``, plus ``magnitude`` (nn.Parameter, (out,)).
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
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights, base_layer)
        raise NotImplementedError(
            "Exercise 5.2: the magnitude vector, initialised to the row norms (use adapter_placement) — see tutorial/05-lora-variants.md"
        )

    @classmethod
    def from_lora_layer(cls, layer: LoRALayer) -> DoRALayer:
        """Given: a DoRA layer around ``layer``'s base that adopts its A and B (the same Parameters).

        It keeps the LoRA layer's scaling (rsLoRA too), dropout and mode, and sets m = ‖W0 + s·BA‖,
        so the function is unchanged (m/n = 1) even for a trained LoRA layer. Its own random A is
        drawn under ``preserve_rng`` and thrown away.
        """
        if layer.merged:
            raise ValueError("unmerge the LoRA layer before turning it into a DoRA layer")
        with preserve_rng(layer):
            dora = cls.from_linear(layer.base_layer, layer.r, layer.lora_alpha, dropout_p(layer))
        dora.lora_A, dora.lora_B = layer.lora_A, layer.lora_B
        dora.scaling = layer.scaling
        dora.use_rslora = getattr(layer, "use_rslora", False)
        dora.train(layer.training)
        dora.reset_magnitude()
        return dora

    def norm_dtype(self) -> torch.dtype:
        """Given: the dtype of n and of merging: fp32, or the adapter's dtype when wider (fp64)."""
        return torch.promote_types(self.lora_A.dtype, torch.float32)

    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·B A‖ over each row, in ``norm_dtype()`` (out,), detached (a constant for backward, DoRA §4.3)."""
        raise NotImplementedError(
            "Exercise 5.2: the row norms of the adapted weight, without a graph (use dense_weight, norm_dtype) — see tutorial/05-lora-variants.md"
        )

    def reset_magnitude(self) -> None:
        """m ← ‖W0 + s·B A‖ per row, so that m/n = 1 and the layer computes W0 + s·B A exactly."""
        raise NotImplementedError(
            "Exercise 5.2: copy the row norms into the magnitude (use weight_norm) — see tutorial/05-lora-variants.md"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``h = base(x) + (m/n − 1)·W0 x + (m/n)·s·B A dropout(x)``; x (..., in) → (..., out).

        n from ``weight_norm`` (detached). W0 x is the base output minus the base bias (one
        subtraction, no second matmul) — except with dropout active, where PEFT uses
        W0 · dropout(x) (a second matmul). Merged: the base layer alone. The output keeps the
        base output's dtype.
        """
        raise NotImplementedError(
            "Exercise 5.2: PEFT's DoRA forward (use weight_norm, dense_weight) — see tutorial/05-lora-variants.md"
        )

    def delta_weight(self) -> torch.Tensor:
        """The full change of the effective weight: ΔW = (m/n)[:, None] ⊙ (W0 + s·B A) − W0, (out, in) in ``norm_dtype()``.

        Not ``s·B A``: the magnitude rescales W0's rows as well. Raises ValueError when merged (the
        base then holds W0 + ΔW; unmerge first).
        """
        raise NotImplementedError(
            "Exercise 5.2: the adapted weight minus W0 (use dense_weight, weight_norm) — see tutorial/05-lora-variants.md"
        )

    def merge(self) -> None:
        """W0 ← (m/n)[:, None] ⊙ (W0 + s·B A), as PEFT's merge. Safe to call twice.

        n is kept (``merged_norm``) so that ``unmerge`` divides by the same factor. Exact up to
        rounding. Needs an ``nn.Linear`` base (``mergeable_weight``).
        """
        raise NotImplementedError(
            "Exercise 5.2: rescale the adapted weight's rows, remember n (use mergeable_weight, weight_norm) — see tutorial/05-lora-variants.md"
        )

    def unmerge(self) -> None:
        """Undo ``merge``: W0 ← W / (m/n)[:, None] − s·B A with the n kept at merge time. Safe to call twice."""
        raise NotImplementedError(
            "Exercise 5.2: divide by the same factor, subtract the update (use mergeable_weight) — see tutorial/05-lora-variants.md"
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def get_dora_model(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] | str | None = None,
    init_lora_weights: str = "kaiming",
) -> nn.Module:
    """``get_lora_model`` with DoRA layers: same arguments, same checks, same errors.

    Wraps the targets (``get_lora_model``), then turns each LoRA layer into a ``DoRALayer`` that
    keeps its A and B (``DoRALayer.from_lora_layer``). Trainable afterwards: ``lora_A``,
    ``lora_B`` and ``magnitude``, nothing else. Raises ValueError (model unchanged) for a bad
    argument, a target that matches nothing, or a model that already has adapters.
    """
    raise NotImplementedError(
        "Exercise 5.2: LoRA first, then convert every layer (use refuse_adapted, get_lora_model, mark_trainable) — see tutorial/05-lora-variants.md"
    )


# ---- Given: initialisation from W0 (PiSSA, OLoRA, LoftQ) ---------------------------------------


def full_precision_weight(layer: LoRALayer) -> torch.Tensor:
    """Given: W0 of ``layer`` as a new fp32 (out, in) tensor, after the checks every W0-based init needs.

    Raises ValueError (nothing changed) unless ``layer`` is an unmerged ``LoRALayer`` that no
    W0-based init has touched yet, its base is an ``nn.Linear`` in fp32/fp16/bf16 (PEFT's rule:
    initialise in full precision, quantize the residual afterwards), and r <= min(in, out).
    """
    if not isinstance(layer, LoRALayer):
        raise ValueError(f"expected a LoRALayer, got {type(layer).__name__}")
    if layer.merged:
        raise ValueError("the layer is merged; unmerge it before initialising its adapter from W0")
    if getattr(layer, "init_method", None) is not None:
        raise ValueError(f"the layer was already initialised by {layer.init_method}; W0 holds a residual now")
    check_initialisable(layer.base_layer, layer.r)
    return layer.base_layer.weight.detach().to(torch.float32, copy=True)  # (out, in)


def check_initialisable(base_layer: nn.Module, r: int, context: str = "") -> None:
    """Given: a ValueError (prefixed by ``context``) unless PiSSA, OLoRA and LoftQ can start from ``base_layer``.

    It must be an ``nn.Linear`` in float32, float16 or bfloat16 (PEFT's rule: initialise in full
    precision, quantize the residual afterwards), and r <= min(in_features, out_features).
    """
    prefix = f"{context}: " if context else ""
    weight = getattr(base_layer, "weight", None)
    if type(base_layer) is not nn.Linear or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        kind = type(base_layer).__name__ if type(base_layer) is not nn.Linear else f"nn.Linear in {weight.dtype}"
        raise ValueError(
            f"{prefix}initialising from W0 needs an nn.Linear base in float32, float16 or bfloat16, got {kind}; "
            "initialise before quantizing (LoftQ quantizes for you)"
        )
    smallest = min(base_layer.in_features, base_layer.out_features)
    if r > smallest:
        raise ValueError(
            f"{prefix}r must be <= min(in_features, out_features) = {smallest} "
            f"to take r singular/QR directions of W0, got r={r}"
        )


def install_initial_adapter(
    layer: LoRALayer, lora_A: torch.Tensor, lora_B: torch.Tensor, residual: torch.Tensor, method: str
) -> None:
    """Given: A ← lora_A, B ← lora_B, W0 ← residual (in W0's dtype), and remember how the layer began.

    The initial A0, B0 are kept as buffers ``lora_A_init`` / ``lora_B_init`` (not saved in the
    model's state_dict) and ``layer.init_method`` names the method: ``save_variant_adapter``
    needs both to convert the adapter to a plain LoRA relative to the original W0 (5.10).
    """
    with torch.no_grad():
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
        weight = mergeable_weight(layer.base_layer)
        weight.copy_(residual.to(weight.dtype))
    layer.register_buffer("lora_A_init", layer.lora_A.detach().clone(), persistent=False)  # (r, in)
    layer.register_buffer("lora_B_init", layer.lora_B.detach().clone(), persistent=False)  # (out, r)
    layer.init_method = method


def svd_split(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Given: the best rank-r factors of ``matrix`` (out, in), as PEFT's LoftQ ``_low_rank_decomposition``.

    U S Vᵀ = matrix, the reduced SVD: U (out, q), S (q,), Vᵀ (q, in) with q = min(out, in);
    B = U √S[:, :r] (out, r), A = √S[:r] Vᵀ (r, in): the singular values split evenly between the
    two factors, so B A is the truncated SVD (Eckart–Young: the closest rank-r matrix in Frobenius
    norm). fp32 in, fp32 out.
    """
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)  # (out, q), (q,), (q, in); q = min(out, in)
    B = U @ torch.sqrt(torch.diag(S)[:, :r])  # (out, q) @ (q, r) -> (out, r)
    A = torch.sqrt(torch.diag(S)[:r, :]) @ Vh  # (r, q) @ (q, in) -> (r, in)
    return B, A


def nf4_linear_from_codes(
    linear: nn.Linear, packed: torch.Tensor, absmax: torch.Tensor, block_size: int = 64
) -> NF4Linear:
    """Given: an ``NF4Linear`` (double quantization off) that holds exactly these codes and ``linear``'s bias.

    Used by LoftQ: the codes it measured are the ones the layer keeps, so its dequantized weight is
    bit for bit the Q̂ of the last iteration. compute_dtype = the linear's weight dtype.
    """
    weight = linear.weight
    layer = NF4Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        block_size=block_size,
        double_quant=False,
        compute_dtype=weight.dtype,
        device=weight.device,
    )
    layer.packed.copy_(packed)
    layer.absmax.copy_(absmax)
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach().float())
    return layer


# ---- Exercise 5.3: PiSSA and OLoRA ---------------------------------------------------------------


def pissa_init(layer: LoRALayer) -> LoRALayer:
    """PiSSA: A, B from W0's top-r singular triplets; W0 keeps the rest (Meng et al. 2024).

    With W0 = V diag(S) Uᵀ, the reduced SVD (``torch.linalg.svd(full_matrices=False)`` in fp32;
    PEFT's names: V (out, q), S (q,), Uᵀ (q, in) with q = min(out, in), S in decreasing order):

        S_r = S[:r] / s                      (PEFT divides by the scaling s = lora_alpha / r)
        A = diag(√S_r) Uᵀ[:r]   (r, in)       B = V[:, :r] diag(√S_r)   (out, r)
        W0 ← W0 − s·B A                      (the residual: W0 minus its top-r part)

    so s·B A is exactly the top-r part of W0 and the layer's function is unchanged at step 0
    (up to rounding). Training then moves the principal directions, which learn fastest. The paper
    assumes a scale of 1; PEFT divides S_r by s so that any lora_alpha works — this follows PEFT.
    Same A, B and residual as PEFT's ``init_lora_weights="pissa"`` (up to the SVD's sign freedom).
    Returns the layer. Raises ValueError as ``full_precision_weight`` says.
    """
    weight = full_precision_weight(layer)  # (out, in) fp32
    raise NotImplementedError(
        "Exercise 5.3: SVD, split √S between A and B, leave the residual in W0 (use install_initial_adapter) — see tutorial/05-lora-variants.md"
    )


def olora_init(layer: LoRALayer) -> LoRALayer:
    """OLoRA: B, A from the QR factorisation of W0; W0 keeps the rest (Büyükakyüz 2024).

    With W0 = Q R, the reduced QR (``torch.linalg.qr`` in fp32; Q (out, q) orthonormal columns,
    R (q, in) upper triangular, q = min(out, in)):

        B = Q[:, :r]   (out, r)        A = R[:r]   (r, in)        W0 ← W0 − s·B A

    No division by s (unlike PiSSA): s·B A is s times the first r QR terms, and the residual
    absorbs the difference, so the function is unchanged at step 0. B starts orthonormal, which
    the paper credits for faster convergence. Same as PEFT's ``init_lora_weights="olora"``.
    Returns the layer. Raises ValueError as ``full_precision_weight`` says.
    """
    weight = full_precision_weight(layer)  # (out, in) fp32
    raise NotImplementedError(
        "Exercise 5.3: QR, the first r columns of Q and rows of R, the residual in W0 (use install_initial_adapter) — see tutorial/05-lora-variants.md"
    )


# ---- Exercise 5.4: LoftQ ------------------------------------------------------------------------


def loftq_init(layer: LoRALayer, num_iters: int = 1, block_size: int = 64) -> list[float]:
    """LoftQ: quantize W0 so that Q̂ + s·B A, not Q̂ alone, is close to W (Li et al. 2023).

    QLoRA starts from Q̂(W) + 0 and carries the whole NF4 error ‖W − Q̂(W)‖. LoftQ alternates
    (B, A start at 0; W is the layer's full-precision W0, fp32):

        for t = 1 … num_iters:
            Q_t = NF4(W − s·B A)                 quantize_nf4 / dequantize_nf4 (Stage 3), no DQ
            B, A = rank-r SVD of (W − Q̂_t) / s    svd_split: √S to each side, as PEFT's loftq_utils

    Afterwards ``layer.base_layer`` is an ``NF4Linear`` holding Q_{num_iters} (double quantization
    off, so Q̂ is exactly what was measured; ``nf4_linear_from_codes``), A and B hold the last SVD,
    and ``layer.init_method == "loftq"``.

    Returns the Frobenius errors [‖W − Q̂_1‖, ‖W − (Q̂_1 + s·B_1A_1)‖, …, ‖W − (Q̂_T + s·B_TA_T)‖]:
    element 0 is plain QLoRA's error (B = 0), then one per iteration (num_iters + 1 floats).

    PEFT differs in one point: its ``loftq_init`` factorises W − Q̂ without dividing by s, which
    is right only when lora_alpha = r (s = 1); dividing by s makes s·B A fit for any lora_alpha.
    With s = 1 the two agree. (PEFT's LoftQ needs bitsandbytes and a GPU; this one runs anywhere.)
    Raises ValueError for num_iters < 1, a bad block_size, or as ``full_precision_weight`` says.
    """
    weight = full_precision_weight(layer)  # W, (out, in) fp32
    check_int("num_iters", num_iters, 1)
    check_block_size(block_size)
    raise NotImplementedError(
        "Exercise 5.4: alternate NF4 and SVD (use quantize_nf4, dequantize_nf4, svd_split, nf4_linear_from_codes) — see tutorial/05-lora-variants.md"
    )


# ---- Exercise 5.5: LoRA-FA ----------------------------------------------------------------------


def freeze_lora_A(model: nn.Module) -> nn.Module:
    """LoRA-FA: A stays at its random init (frozen), only B trains (Zhang et al. 2023).

    Sets ``requires_grad`` False on every ``lora_A`` and True on every ``lora_B``; nothing else
    changes. The point is activation memory: B's gradient needs z = A x (..., r), but A's gradient
    would need x itself (..., in) — with A frozen, backward keeps r numbers per token instead of
    in. A random A is a fine projection (a Johnson–Lindenstrauss map), so B alone still learns a
    rank-r update. Build the optimizer after this call (Stage 4's ``build_optimizer`` skips frozen
    tensors); ``mark_only_lora_as_trainable`` would unfreeze A again.
    Returns the model; ValueError if it has no LoRA layers.
    """
    raise NotImplementedError(
        "Exercise 5.5: A frozen, B trainable (use lora_layers) — see tutorial/05-lora-variants.md"
    )


# ---- Given: layers whose update is added to W0 (VeRA, AdaLoRA) -----------------------------------


class AddedDeltaLayer(nn.Module):
    """Given: the base of VeRA's and AdaLoRA's layers, whose update is added to W0 (no rescaling).

    A subclass sets ``base_layer`` and ``merged`` and defines ``delta_weight()`` (out, in); merging
    is then W0 ← W0 + ΔW and unmerging W0 ← W0 − ΔW, each safe to call twice (an nn.Linear base only).
    """

    def merge(self) -> None:
        if not self.merged:
            weight = mergeable_weight(self.base_layer)
            with torch.no_grad():
                weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight = mergeable_weight(self.base_layer)
            with torch.no_grad():
                weight -= self.delta_weight().to(weight.dtype)
            self.merged = False


def layers_of_type(model: nn.Module, kind: type) -> Iterator[tuple[str, nn.Module]]:
    """Given: (module path, layer) for every module of type ``kind`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


# ---- Given: the shared random matrices of VeRA --------------------------------------------------


class VeRAProjections(nn.Module):
    """Given: the ONE pair of frozen random matrices that all VeRA layers of a model share.

    Buffers ``vera_A`` (r, max_in) and ``vera_B`` (max_out, r), sized for the largest targeted
    layer; each layer slices ``vera_A[:, :in]`` and ``vera_B[:out]``. Every ``VeRALayer`` holds a
    reference to this one module (``named_buffers`` lists it once; ``.to()`` moves it once). The
    buffers are not in the state_dict: ``projection_prng_key`` regenerates them exactly (PEFT's
    ``save_projection=False``).
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, projection_prng_key: int) -> None:
        super().__init__()
        self.projection_prng_key = projection_prng_key
        self.register_buffer("vera_A", vera_A, persistent=False)  # (r, max_in)
        self.register_buffer("vera_B", vera_B, persistent=False)  # (max_out, r)

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}, key={self.projection_prng_key}"


# ---- Exercise 5.6: VeRA -------------------------------------------------------------------------


def vera_projections(
    r: int, in_features: int, out_features: int, projection_prng_key: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen pair, drawn exactly as PEFT's ``VeraModel`` draws it: (vera_A (r, in), vera_B (out, r)).

    One CPU ``torch.Generator`` seeded with ``projection_prng_key``; vera_A first, then vera_B,
    each Kaiming-uniform with gain √2 on its own fan-in (its second dimension): U(−b, b) with
    b = √3 · √2 / √fan_in, i.e. fan_in = in_features for vera_A and r for vera_B. fp32 on the CPU.
    """
    raise NotImplementedError(
        "Exercise 5.6: two Kaiming-uniform draws from one seeded generator — see tutorial/05-lora-variants.md"
    )


class VeRALayer(AddedDeltaLayer):
    """VeRA: a frozen layer plus scaled slices of ONE shared random pair (Kopiczko et al. 2024).

        h = W0 x + λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x))))      A_s = vera_A[:, :in], B_s = vera_B[:out]

    Trainable: ``lambda_d`` (r,) initialised to ``d_initial`` and ``lambda_b`` (out,) initialised to
    0 (so a fresh layer reproduces its base); A_s, B_s are frozen and shared by every layer
    (``projections``). Per layer that is r + out numbers instead of LoRA's r·(in + out). Same
    function as PEFT's VeRA given the same matrices and vectors, computed in PEFT's order.

    Cost: the thin products take r·(in + out) multiply-adds per token, more than one (out, in)
    matmul's in·out once r > in·out / (in + out) — r > 32 for a 64 × 64 projection, whereas a
    4096 × 4096 projection breaks even only at r = 2048. So the forward chooses between two orders
    that compute the same function by their cost PER TOKEN: PEFT's thin products when
    r·(in + out) <= in·out, otherwise ΔW formed once per call (``delta_weight``) and one (out, in)
    matmul. The rule leaves out what forming ΔW costs, r·in·out multiply-adds per call whatever
    the number of tokens N, so the dense order is cheaper only when N·(r·(in + out) − in·out) >
    r·in·out: above N ≈ 37 tokens per call for a 64 × 64 projection at r = 256, N ≈ 58 for 64 × 176
    and 176 × 64. A training batch of the course (64 × 19 = 1,216 tokens) is far above that, and
    there the dense order makes a step at PEFT's r = 256 on the bundled model about 1.15× LoRA's
    instead of 2.4×; generating one token at a time (N = 1) takes the costlier path.

    Args: base_layer (nn.Linear or NF4Linear, frozen), projections (the shared ``VeRAProjections``;
    it must be at least (r, in) and (out, r)), d_initial, vera_dropout (on the VeRA input only).
    """

    def __init__(
        self, base_layer: nn.Module, projections: VeRAProjections, d_initial: float = 0.1, vera_dropout: float = 0.0
    ) -> None:
        super().__init__()
        raise NotImplementedError(
            "Exercise 5.6: freeze the base, keep the shared pair, create λ_d and λ_b (use adapter_placement) — see tutorial/05-lora-variants.md"
        )

    @property
    def vera_A(self) -> torch.Tensor:
        """The shared (r, max_in) matrix (the same tensor in every layer)."""
        return self.projections.vera_A

    @property
    def vera_B(self) -> torch.Tensor:
        """The shared (max_out, r) matrix (the same tensor in every layer)."""
        return self.projections.vera_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out): base(x) + λ_b ⊙ B_s(λ_d ⊙ A_s(dropout(x))), in the base output's dtype.

        The order by the class docstring's per-token rule: the thin products when
        r·(in + out) <= in·out, else ``F.linear(dropout(x), delta_weight())``.
        """
        raise NotImplementedError(
            "Exercise 5.6: PEFT's VeRA forward on the slices, in the order the per-token rule picks — see tutorial/05-lora-variants.md"
        )

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (λ_b[:, None] ⊙ B_s) @ (λ_d[:, None] ⊙ A_s), (out, in)."""
        raise NotImplementedError(
            "Exercise 5.6: scale the rows of the slices, then multiply — see tutorial/05-lora-variants.md"
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, merged={self.merged}"


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeRALayer]]:
    """Given: (module path, layer) for every VeRALayer in ``model``."""
    return layers_of_type(model, VeRALayer)


def get_vera_model(
    model: nn.Module,
    r: int = 256,
    d_initial: float = 0.1,
    target_modules: Iterable[str] | str | None = None,
    projection_prng_key: int = 0,
    vera_dropout: float = 0.0,
) -> nn.Module:
    """Wrap every target in a ``VeRALayer``; all of them share ONE ``VeRAProjections``.

    The shared pair is sized for the largest target: vera_A (r, max in_features), vera_B
    (max out_features, r), drawn by ``vera_projections`` and placed on the targets' device.
    Targets as in ``get_lora_model`` (found by ``target_paths``, same errors). Trainable
    afterwards: ``lambda_d`` and ``lambda_b`` only. PEFT's default r is 256: VeRA needs a high
    rank because only the scaling vectors train, and a higher r costs only r more numbers per layer.
    Raises ValueError (model unchanged) for a bad argument or target.
    """
    raise NotImplementedError(
        "Exercise 5.6: draw the pair once, wrap the targets (use target_paths, vera_projections, mark_trainable) — see tutorial/05-lora-variants.md"
    )


# ---- Exercise 5.7: AdaLoRA ----------------------------------------------------------------------


class AdaLoRALayer(AddedDeltaLayer):
    """AdaLoRA's SVD-form adapter (Zhang et al. 2023): ΔW = P Λ Q · s / r, with a rank that can shrink.

        h = W0 x + ((dropout(x) Qᵀ_Λ) Pᵀ) · lora_alpha / (ranknum + 1e-5),    Q_Λ = Q ⊙ Λ (row-wise)

    PEFT's names and shapes: ``lora_A`` = Q (r, in) ~ N(0, 0.02²), ``lora_E`` = Λ (r, 1) = 0,
    ``lora_B`` = P (out, r) ~ N(0, 0.02²), ``ranknum`` = r (a buffer, (1,), never changed when
    singular values are masked), ``scaling`` = lora_alpha (AdaLoRA divides by ranknum in the
    forward instead). Λ = 0 at init, so a fresh layer reproduces its base; P and Q are kept near
    orthogonal by ``orthogonal_regularization``; ``RankAllocator`` zeroes entries of Λ.
    Same init and forward as PEFT's ``AdaLoraConfig`` (``SVDLinear``).
    """

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0) -> None:
        super().__init__()
        raise NotImplementedError(
            "Exercise 5.7: freeze the base, create Q, Λ, P and ranknum (use check_lora_args, adapter_placement) — see tutorial/05-lora-variants.md"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out): base(x) + (dropout(x) @ (Q ⊙ Λ)ᵀ @ Pᵀ) · scaling / (ranknum + 1e-5)."""
        raise NotImplementedError("Exercise 5.7: PEFT's SVDLinear forward — see tutorial/05-lora-variants.md")

    def delta_weight(self) -> torch.Tensor:
        """ΔW = P (Q ⊙ Λ) · scaling / (ranknum + 1e-5), (out, in)."""
        raise NotImplementedError("Exercise 5.7: the update as a full matrix — see tutorial/05-lora-variants.md")

    @property
    def rank(self) -> int:
        """Given: the current rank, the number of non-zero singular values in Λ."""
        return int(torch.count_nonzero(self.lora_E.detach()))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, rank={self.rank}"


def adalora_layers(model: nn.Module) -> Iterator[tuple[str, AdaLoRALayer]]:
    """Given: (module path, layer) for every AdaLoRALayer in ``model``."""
    return layers_of_type(model, AdaLoRALayer)


def get_adalora_model(
    model: nn.Module,
    init_r: int = 12,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] | str | None = None,
) -> nn.Module:
    """Wrap every target in an ``AdaLoRALayer`` of rank ``init_r`` (PEFT's defaults: init_r 12, lora_alpha 8).

    Targets as in ``get_lora_model`` (``target_paths``, same errors). Trainable afterwards:
    ``lora_A``, ``lora_E``, ``lora_B`` only. The rank budget comes later, from ``RankAllocator``.
    Raises ValueError (model unchanged) naming a bad argument (init_r an int >= 1, lora_alpha > 0,
    lora_dropout in [0, 1)) or a target that matches nothing.
    """
    raise NotImplementedError(
        "Exercise 5.7: check, find the targets, wrap (use check_int, check_lora_args, target_paths, mark_trainable) — see tutorial/05-lora-variants.md"
    )


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's regulariser, as PEFT computes it: the mean over all P and Q of ‖Gram − I‖_F.

        R = 1/(2L) · Σ_layers ( ‖Q Qᵀ − I_r‖_F + ‖Pᵀ P − I_r‖_F )

    (Q = lora_A (r, in), P = lora_B (out, r), L layers). The paper writes squared norms,
    ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F; PEFT uses the plain Frobenius norm averaged over matrices, and
    this follows PEFT. A scalar tensor with a graph to every P and Q; ValueError without AdaLoRA layers.
    """
    raise NotImplementedError(
        "Exercise 5.7: Gram matrices minus the identity (use adalora_layers) — see tutorial/05-lora-variants.md"
    )


class RankAllocator(OptimizerHooks):
    """AdaLoRA's budget: keep only the most important singular values, fewer and fewer (PEFT's RankAllocator).

    Importance of every entry w of P, Λ, Q after each step (sensitivity × uncertainty, paper §3.2):

        I = |w · ∂L/∂w|                    Ī ← β1·Ī + (1 − β1)·I          Ū ← β2·Ū + (1 − β2)·|I − Ī|
        score(w) = Ī · Ū
        score(triplet i) = score(Λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)

    Budget (total number of singular values left over all layers), PEFT's cubic schedule:

        step ≤ tinit                       b = b0 = Σ init ranks          (warm-up, no masking)
        tinit < step ≤ T − tfinal          b = int((b0 − bT)·(1 − (step − tinit)/(T − tfinal − tinit))³ + bT),
                                           masking every deltaT steps
        step > T − tfinal                  b = bT = target_r · number of layers, the pattern frozen

    Masking sets Λ_i = 0 for all but the ``budget`` highest-scoring triplets: exactly ``budget``
    entries of the rank pattern stay True (PEFT thresholds at the k-th smallest score and masks
    ties too; with distinct scores the two agree). ``update_and_allocate(step)`` is PEFT's
    ``AdaLoraModel.update_and_allocate``: importance until T − tfinal, a forced final mask at
    T − tfinal (then the EMAs reset), the frozen pattern re-applied after.

    ``attach(optimizer)`` (from ``OptimizerHooks``) wires it into any training loop:
    - before each step: backpropagates ``orth_reg_weight · orthogonal_regularization`` into the
      gradients (PEFT adds λ·R to the loss, so it is clipped with the rest; here it joins after the
      trainer's clipping);
    - after each step: ``update_and_allocate(step)`` with the step's gradients and new weights —
      where PEFT's docs put the call (after ``optimizer.step()``, before ``zero_grad()``).

    Args: model (with AdaLoRA layers), total_step T, target_r (average final rank), tinit,
    tfinal, deltaT, beta1, beta2, orth_reg_weight — PEFT's ``AdaLoraConfig`` fields and defaults.
    Raises ValueError naming the argument: no AdaLoRA layers; total_step < 1, target_r < 0 or above
    the layers' average initial rank, tinit < 0, tfinal < 0, deltaT < 1 (ints), tinit >= total_step −
    tfinal (no step left for budgeting); beta1 or beta2 outside the open interval (0, 1), as PEFT's
    RankAllocator asserts (β1 = 0 or β2 = 1 leaves every uncertainty Ū, so every score, at 0; β1 = 1
    never moves Ī from 0); orth_reg_weight < 0.
    Attributes: the arguments under their own names (``save_variant_adapter`` writes them into
    PEFT's config), ``layers`` ([(path, AdaLoRALayer)]), ``rank_pattern`` ({path: bool (r,)} of the
    last mask, or None), ``budget``.
    """

    def __init__(
        self,
        model: nn.Module,
        total_step: int,
        target_r: int = 8,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
    ) -> None:
        super().__init__()
        raise NotImplementedError(
            "Exercise 5.7: check the schedule, count the budgets (use adalora_layers, check_int, check_number) — see tutorial/05-lora-variants.md"
        )

    def reset_importance(self) -> None:
        """Given: forget the EMAs (PEFT does this after the final mask)."""
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget at ``step``, whether to mask at this step): PEFT's cubic schedule (see the class docstring)."""
        raise NotImplementedError(
            "Exercise 5.7: warm-up, cubic decrease, final phase — see tutorial/05-lora-variants.md"
        )

    def update_importance(self) -> None:
        """Update Ī and Ū of every entry of Q, Λ, P from ``p`` and ``p.grad`` (a missing gradient counts as 0)."""
        raise NotImplementedError(
            "Exercise 5.7: sensitivity, its EMA, the uncertainty EMA — see tutorial/05-lora-variants.md"
        )

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{path: (r,)} the score of each singular triplet: s(Λ_i) + mean over Q's row i + mean over P's column i."""
        raise NotImplementedError(
            "Exercise 5.7: element scores, averaged over each singular vector — see tutorial/05-lora-variants.md"
        )

    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero Λ_i for all but the ``budget`` highest-scoring triplets; returns the rank pattern {path: bool (r,)}."""
        raise NotImplementedError(
            "Exercise 5.7: top-budget over all layers, then mask Λ (use triplet_scores) — see tutorial/05-lora-variants.md"
        )

    def update_and_allocate(self, step: int) -> int:
        """One allocation at optimizer step ``step`` (0-based), as PEFT's ``AdaLoraModel.update_and_allocate``.

        step < T − tfinal: update the importance, mask to the budget when the schedule says so;
        step = T − tfinal: mask to the final budget, keep that pattern, reset the EMAs;
        step > T − tfinal: re-apply the kept pattern. Returns the budget.
        """
        raise NotImplementedError(
            "Exercise 5.7: the three phases (use update_importance, budget_schedule, mask_to_budget) — see tutorial/05-lora-variants.md"
        )

    def before_step(self, step: int) -> None:
        """Add the gradient of orth_reg_weight · R (``orthogonal_regularization``) to P's and Q's gradients."""
        raise NotImplementedError(
            "Exercise 5.7: backpropagate the regulariser (use orthogonal_regularization) — see tutorial/05-lora-variants.md"
        )

    def after_step(self, step: int) -> None:
        """Run ``update_and_allocate`` for the step just taken."""
        raise NotImplementedError("Exercise 5.7: allocate — see tutorial/05-lora-variants.md")

    def ranks(self) -> dict[str, int]:
        """Given: {path: number of non-zero singular values} now (for the notebook's heat map)."""
        return {path: layer.rank for path, layer in self.layers}


# ---- Exercise 5.8: Delta-LoRA -------------------------------------------------------------------


class DeltaLoRA(OptimizerHooks):
    """Delta-LoRA: W0 moves too, by λ times the change of s·B A in each step (Zi et al. 2023).

        after optimizer step t (t >= start_step):   W0 ← W0 + λ · (s·B_{t+1} A_{t+1} − s·B_t A_t)

    (the paper's Algorithm 1, ``W ← W + λ·(α/r)·(A'B' − AB)`` in its orientation, updating from
    step K on: ``start_step`` = K + 1 with our 0-based step). W0 gets a full-rank update with no
    gradient, no optimizer state and no extra memory beyond one copy of A and B per layer. With
    λ = 0 this is plain LoRA. The paper removes dropout from the LoRA path (its gradient argument
    needs it), so layers with lora_dropout > 0 are refused, as are DoRA layers.

    Usage with the Stage 4 trainer (no change to it): ``delta = DeltaLoRA(model).attach(trainer.optimizer)``;
    ``delta.detach()`` stops it. ``before_step`` saves A and B; ``after_step`` updates W0 under no_grad.

    Raises ValueError (nothing attached) if the model has no LoRA layers, a layer is merged, has
    dropout or is a DoRA layer, update_ratio is not a finite number >= 0, or start_step < 0;
    TypeError (from ``mergeable_weight``) for a base that is not an ``nn.Linear`` (NF4: W0 cannot move).
    """

    def __init__(self, model: nn.Module, update_ratio: float = 0.5, start_step: int = 0) -> None:
        super().__init__()
        raise NotImplementedError(
            "Exercise 5.8: check every layer (use lora_layers, dropout_p, mergeable_weight, check_number, check_int) — see tutorial/05-lora-variants.md"
        )

    def before_step(self, step: int) -> None:
        """From ``start_step`` on: remember A and B (copies) before the optimizer changes them."""
        raise NotImplementedError("Exercise 5.8: copy A and B — see tutorial/05-lora-variants.md")

    def after_step(self, step: int) -> None:
        """W0 += update_ratio · s · (B' A' − B A) for every layer whose A, B were saved; then forget them."""
        raise NotImplementedError(
            "Exercise 5.8: add λ times the change of the product (use mergeable_weight) — see tutorial/05-lora-variants.md"
        )


# ---- Exercise 5.9: LoRA-drop --------------------------------------------------------------------


def lora_output_importance(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """LoRA-drop's importance: the mean of ‖s·B A x‖² over the tokens that reach each LoRA layer.

    Runs ``model`` on ``batches`` (input_ids tensors (B, T), or (input_ids, labels) pairs, or
    dicts with "input_ids") in eval mode without gradients, with a forward hook on every LoRA
    layer that adds up ‖s·B(A x)‖² (fp32, no dropout) per token. Returns {path: mean over tokens};
    the model's mode is restored and the hooks removed. Train briefly first: with B = 0 every
    importance is 0. ValueError if the model has no LoRA layers or the batches are empty.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call get_lora_model first")
    raise NotImplementedError(
        "Exercise 5.9: forward hooks that add up the squared norms (use lora_layers) — see tutorial/05-lora-variants.md"
    )


def lora_drop(model: nn.Module, importance: dict[str, float], keep_share: float = 0.9) -> list[str]:
    """LoRA-drop (Zhou et al. 2024): keep the important adapters, let the others share one per shape.

    Normalise the importances to shares g_i / Σ g; take layers from the largest down until the
    kept shares add up to ``keep_share`` or more: those keep their own A and B. The remaining
    layers are grouped by (in_features, out_features, r); in each group every layer's ``lora_A`` /
    ``lora_B`` become the same Parameter objects — the group's most important layer's, so that one
    keeps its learned update. Shared parameters are counted (and trained) once. Call it before
    building the optimizer. Returns the kept paths, most important first.

    Raises ValueError (nothing changed) if keep_share is not in (0, 1], the importances do not
    name exactly the model's LoRA layers, or they are all zero (train briefly first).
    """
    raise NotImplementedError(
        "Exercise 5.9: sort, keep the top share, share one adapter per group (use lora_layers, check_number) — see tutorial/05-lora-variants.md"
    )


# ---- Given: PEFT's adapter configs and files -----------------------------------------------------

# PEFT's init_lora_weights values whose file holds the whole adapter: W0 stays as it was.
PLAIN_INITS = (True, False, "gaussian")
# ... and those that changed W0 too (PiSSA, OLoRA: the residual W0 − s·B0A0; LoftQ: W0's quantization Q̂):
# PEFT's from_pretrained runs the init again on the original base before it loads A and B.
RESIDUAL_INITS = ("pissa", "olora", "loftq")
# Where PEFT stores VeRA's shared pair when save_projection is true (model-level keys, not per layer).
VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"


def peft_config_fields(peft_type: str, target_modules: Iterable[str]) -> dict[str, object]:
    """Given: the fields every PEFT adapter_config.json has (the type, the targets, inference settings)."""
    return {
        "peft_type": peft_type,
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def variant_adapter_config(
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: Iterable[str],
    use_rslora: bool = False,
    use_dora: bool = False,
) -> dict[str, object]:
    """Given: the ``adapter_config.json`` fields ``peft.PeftModel.from_pretrained`` reads for a LoRA-type adapter."""
    return peft_config_fields("LORA", target_modules) | {
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "init_lora_weights": True,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
    }


def vera_adapter_config(
    r: int, target_modules: Iterable[str], projection_prng_key: int, save_projection: bool, vera_dropout: float
) -> dict[str, object]:
    """Given: PEFT's ``VeraConfig`` fields for a VeRA adapter file.

    d_initial is left out: it only sets λ_d before the file's values replace it (PEFT's default 0.1 applies).
    """
    return peft_config_fields("VERA", target_modules) | {
        "r": r,
        "projection_prng_key": projection_prng_key,
        "save_projection": save_projection,
        "vera_dropout": vera_dropout,
        "init_weights": True,
    }


def adalora_adapter_config(
    allocator: RankAllocator, lora_dropout: float, target_modules: Iterable[str], rank_pattern: dict | None
) -> dict[str, object]:
    """Given: PEFT's ``AdaLoraConfig`` fields: the layers' init_r and lora_alpha, the allocator's schedule, the pattern.

    ``rank_pattern``: PEFT's {"<path>.lora_E": [bool] * init_r} (None before the first mask). The
    schedule is read from the allocator's attributes (its arguments, kept under their own names).
    """
    layer = allocator.layers[0][1]
    return peft_config_fields("ADALORA", target_modules) | {
        "init_r": layer.r,
        "target_r": allocator.target_r,
        "lora_alpha": layer.lora_alpha,
        "lora_dropout": lora_dropout,
        "total_step": allocator.total_step,
        "tinit": allocator.tinit,
        "tfinal": allocator.tfinal,
        "deltaT": allocator.deltaT,
        "beta1": allocator.beta1,
        "beta2": allocator.beta2,
        "orth_reg_weight": allocator.orth_reg_weight,
        "rank_pattern": rank_pattern,
        "init_lora_weights": True,
    }


def adapter_init_method(config: dict) -> str | None:
    """Given: which W0-changing init a LoRA file's ``init_lora_weights`` names: "pissa", "olora", "loftq", or None.

    None for PLAIN_INITS (A and B are the whole adapter). PEFT's ``save_pretrained`` of a PiSSA,
    OLoRA or LoftQ model keeps ``init_lora_weights`` as it was ("pissa", "olora", "loftq" with a
    ``loftq_config``) and stores A and B relative to the changed W0; its ``from_pretrained`` runs the
    init again on the original base, which ``load_variant_adapter`` does too.
    Raises ValueError naming ``init_lora_weights`` for any other value: "pissa_niter_K" (a randomised
    SVD: the residual would depend on the draw), "corda", "lora_ga", "eva", … — convert such a file to a
    plain LoRA first (PEFT: ``save_pretrained(path_initial_model_for_weight_conversion=…)``, then
    ``init_lora_weights`` is true); and naming ``loftq_config`` unless it has loftq_bits 4 and an int loftq_iter ≥ 1.
    """
    init = config.get("init_lora_weights", True)
    if init in PLAIN_INITS and isinstance(init, (bool, str)):
        return None
    method = init.lower() if isinstance(init, str) else None
    if method not in RESIDUAL_INITS:
        raise ValueError(
            f"init_lora_weights={init!r}: this loader recomputes W0 only for {RESIDUAL_INITS} (and loads "
            f"{PLAIN_INITS} as they are); convert the adapter to a plain LoRA for the original base first "
            "(PEFT: save_pretrained(path_initial_model_for_weight_conversion=...), which writes init_lora_weights: true)"
        )
    if method == "loftq":
        loftq = config.get("loftq_config") or {}
        bits, iters = loftq.get("loftq_bits"), loftq.get("loftq_iter")
        if bits != 4 or isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(
                f"loftq_config must have loftq_bits 4 (NF4) and an int loftq_iter >= 1 to recompute LoftQ's base, got {loftq}"
            )
    return method


def read_adapter_files(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Given: (adapter_config.json as a dict, the tensors of adapter_model.safetensors) of an adapter folder."""
    directory = Path(directory)
    return json.loads((directory / ADAPTER_CONFIG_NAME).read_text()), load_file(directory / ADAPTER_WEIGHTS_NAME)


def write_adapter_files(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Given: write adapter_config.json and adapter_model.safetensors (contiguous CPU copies) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


def paths_in_file(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> list[str]:
    """Given: the module paths of the per-layer keys ``base_model.model.<path>.<name>`` (name in ``names``)."""
    found = {tuple(key[len(PEFT_KEY_PREFIX) :].rsplit(".", 1)) for key in tensors if key.startswith(PEFT_KEY_PREFIX)}
    return sorted({path for path, name in found if name in names})


def check_fresh_linears(model: nn.Module, paths: list[str]) -> dict[str, nn.Module]:
    """Given: {path: module} after checking that the model has no adapter yet and every path is a linear layer."""
    refuse_adapted(model)
    modules = dict(model.named_modules())
    for path in paths:
        if path not in modules or not is_linear_like(modules[path]):
            raise ValueError(f"the adapter has weights for {path!r}, which is not a linear layer of the model")
    return {path: modules[path] for path in paths}


def expect_shapes(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Given: a ValueError naming the first key of ``shapes`` that is missing or has another shape."""
    for key, shape in shapes.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape) if key in tensors else "nothing"
            raise ValueError(f"{key}: expected shape {shape}, found {found}")


def refuse_other_trainables(model: nn.Module, suffixes: tuple[str, ...]) -> None:
    """Given: a ValueError if a trainable parameter not named ``*<suffix>`` would be lost by the adapter files."""
    others = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(suffixes)]
    if others:
        raise ValueError(
            f"{len(others)} trainable parameters besides the adapter (e.g. {others[0]}) would be lost; "
            "freeze them or save them separately"
        )


# ---- Exercise 5.10: adapters in PEFT's format: the LoRA family, VeRA, AdaLoRA ------------------------


def lora_adapter_files(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the model's LoRA-type adapter, as ``PeftModel.from_pretrained`` reads them.

    - rsLoRA: ``"use_rslora": true`` (PEFT then scales by lora_alpha / √r).
    - DoRA: ``"use_dora": true`` and each layer's magnitude (out,) under
      ``base_model.model.<path>.lora_magnitude_vector`` (PEFT's key, no ``.weight``).
    - PiSSA / OLoRA: CONVERTED to a plain LoRA relative to the ORIGINAL W0, as PEFT's
      ``save_pretrained(path_initial_model_for_weight_conversion=…)`` does. Since
      W_res = W0 − s·B0A0, the trained layer computes W0 + s·(B A − B0 A0), and
      B A − B0 A0 = [B | −B0] @ [A ; A0]: rank 2r with A' = cat(A, A0) (2r, in),
      B' = cat(B, −B0) (out, 2r), r' = 2r and lora_alpha' = 2·lora_alpha (√2·lora_alpha with
      rsLoRA) so that the scale stays s. PEFT loads it onto the original model.
    - LoftQ: A and B as they are; they belong with the LoftQ-quantized base, not the original.
    Layers that LoRA-drop made share tensors are written as separate copies (safetensors refuses
    aliases). Keys and A/B layout as ``lora_state_dict`` (Stage 2.4); config from ``variant_adapter_config``.

    Raises ValueError: layers that differ in r, lora_alpha or rsLoRA; a mix of DoRA and LoRA layers,
    or of PiSSA/OLoRA and other inits; PiSSA/OLoRA with DoRA; another trainable parameter that the
    files would lose (``refuse_other_trainables``).
    """
    layers = list(lora_layers(model))
    raise NotImplementedError(
        "Exercise 5.10: check, collect, convert, add magnitudes (use lora_state_dict, variant_adapter_config) — see tutorial/05-lora-variants.md"
    )


def vera_adapter_files(model: nn.Module, save_projection: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the model's VeRA adapter in PEFT's format (``VeraConfig``, PEFT 0.21.2).

        base_model.model.<path>.vera_lambda_d   (r,)       base_model.model.<path>.vera_lambda_b   (out,)
        base_model.vera_A (r, max_in), base_model.vera_B (max_out, r)   the shared pair, once, only with
                                                                         save_projection (PEFT's default)

    config: ``vera_adapter_config`` with r, the target names, the pair's ``projection_prng_key``,
    ``save_projection`` and the layers' vera_dropout. Without the pair in the file, a loader
    regenerates it from the key (``vera_projections``): exact on the same torch, which PEFT warns
    may not hold on every platform — hence its default.

    Raises ValueError: layers that do not share one ``VeRAProjections``, or that differ in
    vera_dropout; another trainable parameter that the files would lose (``refuse_other_trainables``).
    """
    layers = list(vera_layers(model))
    raise NotImplementedError(
        "Exercise 5.10: per-layer λ vectors, the shared pair once (use vera_adapter_config, refuse_other_trainables) — see tutorial/05-lora-variants.md"
    )


def adalora_adapter_files(model: nn.Module, allocator: RankAllocator) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the model's AdaLoRA adapter in PEFT's format (``AdaLoraConfig``, PEFT 0.21.2).

        base_model.model.<path>.lora_A (k, in)   .lora_E (k, 1)   .lora_B (out, k)     (no ".weight"; ranknum
                                                                                      is not saved: it is init_r)

    Before the allocator's first mask (``allocator.rank_pattern`` None) k = init_r and the config's
    rank_pattern is null. After it, PEFT's ``resize_state_dict_by_rank_pattern``: each layer keeps
    only its k unmasked triplets (rows of A and E, columns of B, in order), and the config records
    ``rank_pattern`` {"<path>.lora_E": [bool] * init_r} (lists of Python bools), so PEFT rebuilds
    the layer with rank k and the same scale lora_alpha / init_r. config: ``adalora_adapter_config``.

    Raises ValueError: ``allocator`` not a RankAllocator over exactly these layers; layers that
    differ in r, lora_alpha or lora_dropout; another trainable parameter the files would lose.
    """
    layers = list(adalora_layers(model))
    raise NotImplementedError(
        "Exercise 5.10: cut each layer to its kept triplets, record the pattern (use adalora_adapter_config) — see tutorial/05-lora-variants.md"
    )


def save_variant_adapter(
    model: nn.Module, directory: str | Path, allocator: RankAllocator | None = None, save_projection: bool = True
) -> Path:
    """Given: write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` reads.

    One adapter kind per model: LoRA-type layers (plain, rsLoRA, DoRA, PiSSA/OLoRA converted, LoftQ;
    ``lora_adapter_files``), VeRA layers (``vera_adapter_files``; ``save_projection`` as PEFT's, default
    true) or AdaLoRA layers (``adalora_adapter_files``; ``allocator``, the model's ``RankAllocator``, is
    required: PEFT's config holds its schedule and rank pattern). Everything is checked before anything is
    written: a refusal leaves no folder behind. Returns the directory.

    Raises ValueError: no adapter layers, layers of more than one kind, AdaLoRA without ``allocator``, or what
    the kind's function raises.
    """
    kinds = {
        "LoRA": list(lora_layers(model)),
        "VeRA": list(vera_layers(model)),
        "AdaLoRA": list(adalora_layers(model)),
    }
    found = [kind for kind, layers in kinds.items() if layers]
    if len(found) != 1:
        raise ValueError(
            "the model must hold exactly one kind of adapter layers (LoRA, VeRA or AdaLoRA) to be saved, found "
            + (", ".join(found) if found else "none")
        )
    if found[0] == "VeRA":
        config, tensors = vera_adapter_files(model, save_projection)
    elif found[0] == "AdaLoRA":
        if allocator is None:
            raise ValueError(
                "an AdaLoRA adapter needs allocator=<its RankAllocator>: PEFT's AdaLoraConfig records the schedule "
                "(total_step, target_r, …) and the rank pattern"
            )
        config, tensors = adalora_adapter_files(model, allocator)
    else:
        config, tensors = lora_adapter_files(model)
    return write_adapter_files(directory, config, tensors)


def load_lora_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a LoRA-type adapter (``"peft_type": "LORA"``) written by ``save_variant_adapter`` or by PEFT.

    Plain and rsLoRA adapters go through ``load_lora`` (Stage 2.4: it adds LoRA layers to exactly
    the modules the file names when the model has none, and checks every shape); then
    ``use_rslora`` if the config says so. A DoRA adapter (``use_dora``) adds DoRA layers
    (``get_dora_model`` on the modules the file names) unless the model already has them, loads A
    and B through ``load_lora`` and copies the magnitudes. A converted PiSSA/OLoRA adapter is a
    plain LoRA for the original base.

    PiSSA, OLoRA and LoftQ as PEFT's ``save_pretrained`` writes them by default
    (``init_lora_weights`` "pissa", "olora" or "loftq": ``adapter_init_method``): A and B as trained,
    relative to a CHANGED W0. PEFT's ``from_pretrained`` runs the init again on the original base, then
    loads A and B; so does this: the layers are added (``load_lora``; ``use_rslora`` if set), each runs
    ``pissa_init`` / ``olora_init`` / ``loftq_init`` (num_iters = loftq_config["loftq_iter"], blocks of
    64) on its W0, then gets the file's A and B back. The result is W_res + s·B A (Q̂ + s·B A for
    LoftQ), as PEFT's: the model must be the ORIGINAL full-precision base without LoRA layers.

    Raises ValueError, leaving the model unchanged, when the adapter does not fit: magnitudes
    without ``use_dora``, DoRA weights for LoRA layers (or the reverse), a scale (rsLoRA or not)
    that differs from the existing layers', a module or shape that does not match (``load_lora``'s
    checks); for an ``init_lora_weights`` it cannot recompute (``adapter_init_method``); and for
    PiSSA/OLoRA/LoftQ files with ``use_dora``, into a model with LoRA layers, or onto a base the
    init cannot start from (``check_initialisable``: nn.Linear in float32/float16/bfloat16, r ≤ min(in, out)).
    """
    config, tensors = read_adapter_files(directory)
    raise NotImplementedError(
        "Exercise 5.10: check all, then layers, A and B, magnitudes, W0's new value (use load_lora, get_dora_model, use_rslora, adapter_init_method, check_initialisable) — see tutorial/05-lora-variants.md"
    )


def initialise_like_peft(model: nn.Module, init: str, config: dict) -> None:
    """Run ``init`` ("pissa", "olora", "loftq") on every LoRA layer, then give each its loaded A and B back.

    What PEFT's ``from_pretrained`` does for such a file: the init changes W0 (and sets A0, B0,
    kept as ``lora_A_init`` / ``lora_B_init`` for a later conversion), the file's A and B replace A0, B0.
    """
    raise NotImplementedError(
        "Exercise 5.10: keep A and B, run the init, put A and B back (use pissa_init, olora_init, loftq_init) — see tutorial/05-lora-variants.md"
    )


def load_vera_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Load a VeRA file (``"peft_type": "VERA"``, PEFT's or ours) into a model without adapter layers.

    The modules are those with ``vera_lambda_d`` / ``vera_lambda_b`` in the file (``paths_in_file``);
    ``get_vera_model`` wraps them with the config's r, projection_prng_key and vera_dropout, which draws
    the shared pair from the key; with ``save_projection`` the file's ``base_model.vera_A`` /
    ``base_model.vera_B`` (r, max_in) / (max_out, r) replace the drawn pair, as PEFT does. Then each
    layer's λ_d (r,) and λ_b (out,) are copied. Returns the model.

    Raises ValueError, leaving the model unchanged: the model already has adapter layers, a path is not
    a linear layer of the model, a tensor is missing or has another shape, the file holds other keys.
    """
    raise NotImplementedError(
        "Exercise 5.10: check everything, wrap, copy the pair (if saved) and the λ vectors (use get_vera_model) — see tutorial/05-lora-variants.md"
    )


def load_adalora_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Load an AdaLoRA file (``"peft_type": "ADALORA"``, PEFT's or ours) into a model without adapter layers.

    ``get_adalora_model`` wraps the modules the file names with the config's init_r, lora_alpha and
    lora_dropout (ranknum = init_r, the scale PEFT keeps). With a ``rank_pattern``, layer ``path``
    holds only its k kept triplets (``rank_pattern["<path>.lora_E"]``, init_r bools, k of them True):
    they go to the kept positions (rows of A and E, columns of B) and every masked position is 0, so
    Λ_i = 0 there, as PEFT's resized layer. The RankAllocator is not restored: build a new one to
    train on. Returns the model.

    Raises ValueError, leaving the model unchanged: the model already has adapter layers, a path is not
    a linear layer of the model, a rank_pattern entry is not init_r bools or names no layer of the
    file, a tensor is missing or has another shape, the file holds other keys.
    """
    raise NotImplementedError(
        "Exercise 5.10: check everything, wrap, scatter the kept triplets (use get_adalora_model) — see tutorial/05-lora-variants.md"
    )


def load_variant_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Given: load an adapter written by ``save_variant_adapter`` or by PEFT into ``model``; returns the model.

    By the config's ``peft_type``: "LORA" (plain, rsLoRA, DoRA, PiSSA, OLoRA, LoftQ) ``load_lora_adapter``,
    "VERA" ``load_vera_adapter``, "ADALORA" ``load_adalora_adapter``.

    Raises ValueError, the model unchanged, naming what does not fit: a peft_type other than those three;
    an init_lora_weights whose W0 cannot be recomputed here, or a loftq_config other than 4 bits
    (``adapter_init_method``); such a file with use_dora, into a model with LoRA layers, or onto a base its
    init cannot start from; a rank_pattern entry that is not init_r bools; a tensor missing or of another
    shape (named by its key, e.g. ``base_model.model.<path>.vera_lambda_b``); and what ``load_lora``
    refuses (modules, ranks, shapes).
    """
    config, tensors = read_adapter_files(directory)
    peft_type = config.get("peft_type", "LORA")
    if peft_type == "VERA":
        return load_vera_adapter(model, config, tensors)
    if peft_type == "ADALORA":
        return load_adalora_adapter(model, config, tensors)
    if peft_type != "LORA":
        raise ValueError(f"peft_type must be one of ('LORA', 'VERA', 'ADALORA'), got {peft_type!r}")
    return load_lora_adapter(model, directory)


# ---- Given: one entry point for comparing the methods -------------------------------------------


def apply_variant(
    model: nn.Module,
    method: str,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: Iterable[str] | str | None = None,
    total_step: int | None = None,
    **options,
) -> tuple[nn.Module, Callable[[torch.optim.Optimizer], OptimizerHooks | None]]:
    """Given: put one LoRA-family method on ``model`` (in place), for the side-by-side comparison.

    Returns ``(model, attach)``. ``attach(optimizer)`` hooks the method's per-step work into an
    optimizer — the Stage 4 trainer's ``trainer.optimizer`` — and returns an object whose
    ``detach()`` stops it (AdaLoRA's ``RankAllocator``, ``DeltaLoRA``); for the other methods it
    does nothing and returns None. Build the trainer (its optimizer) after this call.

        lora        get_lora_model(r, lora_alpha)
        rslora      + use_rslora
        dora        get_dora_model(r, lora_alpha)
        pissa/olora + pissa_init / olora_init on every layer (nn.Linear bases)
        loftq       + loftq_init on every layer (the targets become NF4); options: num_iters, block_size
        lora-fa     + freeze_lora_A
        vera        get_vera_model(r) (VeRA's own rank; PEFT's default is 256); options: d_initial,
                    projection_prng_key
        adalora     get_adalora_model(init_r, lora_alpha) and RankAllocator(target_r=r, total_step);
                    options: init_r (default r + r // 2, PEFT's 12 → 8), tinit, tfinal, deltaT,
                    beta1, beta2, orth_reg_weight
        delta-lora  get_lora_model + DeltaLoRA; options: update_ratio, start_step

    Raises ValueError for an unknown method or option, or AdaLoRA without ``total_step``.
    """
    allowed = {
        "loftq": {"num_iters", "block_size"},
        "vera": {"d_initial", "projection_prng_key"},
        "adalora": {"init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"},
        "delta-lora": {"update_ratio", "start_step"},
    }
    if method not in VARIANTS:
        raise ValueError(f"method must be one of {VARIANTS}, got {method!r}")
    if unknown := sorted(set(options) - allowed.get(method, set())):
        raise ValueError(f"options {unknown} do not apply to {method!r}; it takes {sorted(allowed.get(method, []))}")
    if method == "adalora" and total_step is None:
        raise ValueError("adalora needs total_step (the number of optimizer steps the budget schedule spans)")

    def no_hooks(optimizer: torch.optim.Optimizer) -> None:
        return None

    if method == "vera":
        return get_vera_model(model, r=r, target_modules=target_modules, **options), no_hooks
    if method == "adalora":
        init_r = options.pop("init_r", r + r // 2)
        get_adalora_model(model, init_r=init_r, lora_alpha=lora_alpha, target_modules=target_modules)
        allocator = RankAllocator(model, total_step=total_step, target_r=r, **options)
        return model, allocator.attach
    if method == "dora":
        return get_dora_model(model, r=r, lora_alpha=lora_alpha, target_modules=target_modules), no_hooks
    get_lora_model(model, r=r, lora_alpha=lora_alpha, target_modules=target_modules)
    if method == "rslora":
        use_rslora(model)
    elif method in ("pissa", "olora", "loftq"):
        init = {"pissa": pissa_init, "olora": olora_init, "loftq": loftq_init}[method]
        for _, layer in list(lora_layers(model)):
            init(layer, **options)
    elif method == "lora-fa":
        freeze_lora_A(model)
    elif method == "delta-lora":
        return model, DeltaLoRA(model, **options).attach
    return model, no_hooks
