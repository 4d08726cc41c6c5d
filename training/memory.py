"""QLoRA's memory (Stage 6): 8-bit optimizer states, paged optimizers, checkpointing, measured.

Where the bytes of a fine-tuning step go, and which trick removes which part:

    part          full fine-tuning     LoRA / QLoRA               cut by
    weights       4 B / parameter      base 4 B (fp32) or 0.516 B (NF4 + DQ)      Stage 3 (NF4)
    gradients     4 B / parameter      4 B / adapter parameter                     Stage 1–2 (LoRA)
    optimizer     8 B / parameter      8 B / adapter parameter → 2.03 B (8-bit)    6.1–6.2 (8-bit AdamW)
                                       … kept on the host between steps           6.3 (paged optimizer)
    activations   grows with batch × sequence × layers                             gradient checkpointing

8-bit AdamW (Dettmers et al. 2022) stores Adam's two moments m and v as uint8 codes in blocks of 256
elements with one fp32 absmax per block; every step dequantizes them, updates in fp32 and re-quantizes:

    m (any shape) ──flatten──► blocks of 256 ──► state1 uint8 (p.shape) + absmax1 fp32 (n_blocks,)   signed code
    v                                         ──► state2 uint8 (p.shape) + absmax2 fp32 (n_blocks,)   unsigned code
    bytes per parameter: 2 · (1 + 4/256) = 2.03 instead of 8

A paged optimizer (QLoRA §3) keeps every state tensor in a host pool and brings one parameter group's
states to the device just for its update:

    pool (host, pinned) ──page_in(group)──► device ──update──► device ──page_out(group)──► pool

bitsandbytes does this with CUDA unified memory: the states live in managed memory, the driver pages
them to the GPU on a page fault and evicts them when the GPU runs short (only tensors of 100 k elements
and more are paged, the rest stays on the GPU). A long sequence that spikes the activations then pushes
states out instead of failing with "CUDA out of memory". Here the paging is explicit (one group at a
time, counted in bytes) so that a CPU run exercises every line.

Numerics follow bitsandbytes 0.50.2's CPU AdamW8bit: the signed code is Stage 3's ``dynamic_code_book``,
the quantizer is bitsandbytes' 65,536-entry lookup table (two roundings, not the exact nearest level), and
the op order of every update line is bitsandbytes' own, so on the machine that recorded the golden vectors
the reference reproduces them bit for bit (``solutions/tools/make_adamw8bit_golden.py`` checks it). The
tests ask for the formula, not those bits: another CPU rounds bitsandbytes itself differently.

Read in this order: the given checks, 6.1 state quantization, 6.2 ``AdamW8bit``, 6.3 ``PagedOptimizer``,
6.4 ``make_optimizer`` and ``MemoryTrainer`` (the Stage 4 trainer with a choice of optimizer), 6.5 the
memory accounting: estimate (``estimate_memory_parts``) and measurement (``measure_memory``) side by side.

Papers: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022 (arXiv 2110.02861);
Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023 (arXiv 2305.14314), §3 paged optimizers;
Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016 (arXiv 1604.06174), checkpointing.
"""

# ruff: noqa: F401, F841  (a generated stub: imports and names the solution uses look unused here)

from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from model.checks import check_int, check_number
from model.quant import check_block_size, dequantize_blockwise, dynamic_code_book, nearest_code, to_blocks
from model.tiny_llama import LlamaConfig
from training.data import lm_loss
from training.qlora_trainer import PRECISIONS, QLoRATrainer, TrainConfig, lr_factor, option, resolve_device

STATE_BLOCK_SIZE = 256  # bitsandbytes' block for 8-bit optimizer states (hard-coded there)
MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep fp32 states (bitsandbytes' default)
BNB_MIN_PAGED_SIZE = 100_000  # bitsandbytes pages the states of parameters with at least this many elements only
LUT_SIZE = 65536  # bins of bitsandbytes' CPU quantizer over [-1, 1]
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
METHODS = ("full", "lora", "qlora")
NF4_BLOCK_SIZE = 64  # TrainConfig.block_size's default, for the weight estimate


# ---- Given: small helpers (the argument checks are model/checks.py) ---------------------------


def nbytes(t: torch.Tensor) -> int:
    """Given: the bytes of a tensor's elements (not of the storage it may be a view of)."""
    return t.numel() * t.element_size()


# ---- Exercise 6.1: state quantization ---------------------------------------------------------


def unsigned_dynamic_code_book() -> torch.Tensor:
    """bitsandbytes' UNSIGNED dynamic 8-bit code (``create_dynamic_map(signed=False)``), 256 sorted fp32 levels.

    Read ``dynamic_code_book`` (Stage 3, the signed code) first: for each exponent e = 0…6 it takes the
    2^e midpoints of ``torch.linspace(0.1, 1, 2^e + 1)`` (float32), scales them by 10^(e − 6) and adds
    them with both signs; then 0 and 1: 2·(1 + 2 + … + 64) + 2 = 256 levels.

    v = E[g²] is never negative, so the unsigned code spends the sign bit on the fraction instead:
    2^(e+1) midpoints of ``linspace(0.1, 1, 2^(e+1) + 1)`` per exponent, positive only; then 0 and 1:
    (2 + 4 + … + 128) + 2 = 256 levels, from 0, 3.25e-7, … up to 0.99648, 1. The scale is the Python
    number ``10 ** (e - 6)`` times the float32 midpoints (float32 arithmetic), as bitsandbytes computes it.
    """
    raise NotImplementedError(
        "Exercise 6.1: twice the fractions per exponent, no negatives, then 0 and 1 — see tutorial/06-memory.md"
    )


def quantization_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table for a sorted code: uint8 (65536,), bin k → index of a level.

    The quantizer does not search the code for each value: it rounds the scaled value s ∈ [−1, 1] to
    one of 65,536 bins, then reads the level of that bin from this table. Bin k has the centre
    c_k = k · 2 / 65535 − 1 (float32: ``arange * 2 / 65535 - 1``), and its entry is the level nearest
    to c_k, a tie going to the lower one: Stage 3's ``nearest_code`` applied to the centres.
    The bins are 3.05e-5 wide, so a level closer to its neighbours than that (the signed code's
    levels near 0 are 1e-7 apart) is never chosen: 249 of the signed and 246 of the unsigned levels
    are reachable.
    """
    raise NotImplementedError(
        "Exercise 6.1: the bin centres, then the nearest level of each (use nearest_code) — see tutorial/06-memory.md"
    )


@functools.cache
def state_code_books(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Given: the two codes and their lookup tables on ``device``, built once per process.

    {"signed": (256,) fp32, "unsigned": (256,) fp32, "signed_lut": (65536,) uint8, "unsigned_lut": ...}.
    m (first moment) uses the signed code, v (second moment, ≥ 0) the unsigned one. Do not modify them.
    """
    signed, unsigned = dynamic_code_book().to(device), unsigned_dynamic_code_book().to(device)
    return {
        "signed": signed,
        "unsigned": unsigned,
        "signed_lut": quantization_lut(signed),
        "unsigned_lut": quantization_lut(unsigned),
    }


def quantize_blockwise_lut(
    x: torch.Tensor, lut: torch.Tensor, block_size: int = STATE_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, fp32) → codes uint8 (numel,), absmax fp32 (n_blocks,), as bitsandbytes' CPU kernel.

    Per block of the flattened x (the last may be partial; ``to_blocks`` pads it with zeros):

        a = max |x|                              absmax, fp32
        s = clamp(x · (1 / a), −1, 1)            the fp32 reciprocal first, then a multiply (not x / a)
        k = ⌊(s + 1) · 0.5 · 65535 + 0.5⌋        the bin, in float32, truncated to an integer
        code = lut[k]

    A block whose absmax is 0 (an all-zero moment, e.g. a parameter that never had a gradient there)
    skips the table: every code is 0 (index 0, which decodes to level · 0 = 0 for either code book).
    Round trip: ``dequantize_blockwise(codes, absmax, code, block_size)`` (Stage 3) gives x̂.
    """
    raise NotImplementedError(
        "Exercise 6.1: absmax, reciprocal, clamp, bin, look up; all-zero blocks get code 0 (use to_blocks) — see tutorial/06-memory.md"
    )


# ---- Exercise 6.2: 8-bit AdamW ------------------------------------------------------------------


def adamw_update_8bit_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on fp32 p, m, v, as bitsandbytes' 8-bit kernel computes it (after dequantizing).

        m ← β1·m + (1 − β1)·g                   ``m.mul_(β1).add_(g, alpha=1 − β1)``
        v ← β2·v + (1 − β2)·g²                  ``v.mul_(β2).addcmul_(g, g, value=1 − β2)``
        c1 = 1 − β1^t;   c2 = √(1 − β2^t)       Python floats (float64)
        p ← p · (1 − lr·λ)                      decoupled weight decay, only if λ > 0
        p ← p + (−lr / c1) · m / (√v / c2 + ε)  ``p.addcdiv_(m, √v / c2 + ε, value=−lr / c1)``

    Any order of these operations is right (the tests allow the rounding of any float32 evaluation, and
    ``(1 − β1)·g + β1·m`` or ``lerp_`` keep full marks); this one is bitsandbytes' own. Keep every
    coefficient a Python float: ``1 − β2`` computed in float32 from a float32 β2 loses four digits.
    """
    raise NotImplementedError(
        "Exercise 6.2: the two moments, the bias corrections, decay, the step — in this order — see tutorial/06-memory.md"
    )


def adamw_update_32bit_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Given: bitsandbytes' 32-bit CPU AdamW step (tensors under ``min_8bit_size``), in place on fp32 p, m, v.

    The same mathematics as ``adamw_update_8bit_`` with ε in another place (ε·c2 instead of √v / c2):

        p ← p + (−lr·c2 / c1) · m / (√v + ε·c2)

    (``torch.optim.AdamW`` places ε as the 8-bit path does, but updates m with ``lerp_``: its results
    differ from both in the last bit).
    """
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    step_size = -lr * correction2 / correction1
    if weight_decay > 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(m / (v.sqrt() + eps * correction2), alpha=step_size)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit moments, step for step equal to ``bitsandbytes.optim.AdamW8bit`` 0.50.2 (CPU).

    Per-parameter state, under bitsandbytes' names:

        numel >= min_8bit_size:  step int, state1 uint8 (p.shape) = m codes (signed code),
                                 state2 uint8 (p.shape) = v codes (unsigned code),
                                 absmax1, absmax2 fp32 (ceil(numel / block_size),)
        numel <  min_8bit_size:  step int, state1 fp32 (p.shape) = m, state2 fp32 (p.shape) = v

    Code books and lookup tables are shared (``state_code_books``), not stored per parameter
    (bitsandbytes keeps a copy of each code book, qmap1/qmap2, in every parameter's state).
    Parameter groups may have their own lr, betas, eps and weight_decay. ``state_dict()`` /
    ``load_state_dict()`` round-trip the uint8 codes unchanged.

    Example: a LoRA B of (4096, 16) = 65,536 elements has 256 blocks: state1 + state2 = 131,072 bytes,
    absmax1 + absmax2 = 2,048 bytes, instead of 524,288 bytes of fp32 m and v.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        block_size: int = STATE_BLOCK_SIZE,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ) -> None:
        """Check every argument first, then build the groups.

        A bad argument raises ValueError naming it, as the signature spells it, and its allowed range:
        lr, eps and weight_decay finite numbers >= 0; betas a pair, each in [0, 1) (torch's AdamW
        allows β = 0; the message may name the element, betas[0] or betas[1]); block_size an int >= 1;
        min_8bit_size an int >= 0.
        """
        raise NotImplementedError(
            "Exercise 6.2: check lr, betas, eps, weight_decay, block_size, min_8bit_size (use check_number, check_int) — see tutorial/06-memory.md"
        )

    def init_state(self, p: torch.Tensor) -> dict:
        """The zero state of ``p``: fp32 m and v under min_8bit_size, else zero codes with zero absmax."""
        raise NotImplementedError(
            "Exercise 6.2: fp32 or uint8 states, as the class docstring lists them — see tutorial/06-memory.md"
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient, group by group (with the group's hyper-parameters)."""
        raise NotImplementedError(
            "Exercise 6.2: closure, then per parameter: init the state if empty, count the step, update — see tutorial/06-memory.md"
        )

    def update_32bit(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Given: fp32 states, updated in place (p itself when p is fp32)."""
        beta1, beta2 = group["betas"]
        p32 = p.detach().float()
        adamw_update_32bit_(
            p32, p.grad.float(), state["state1"], state["state2"], step=state["step"], lr=group["lr"],
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        )  # fmt: skip
        p.detach().copy_(p32)

    def update_8bit(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Dequantize m and v, update p, m, v in fp32, re-quantize m and v into the state.

        m with the signed code, v with the unsigned one (``state_code_books(p.device)``); Stage 3's
        ``dequantize_blockwise`` decodes, ``quantize_blockwise_lut`` encodes. The state tensors keep their
        identity (write the codes into state1 / state2 in place); absmax1 / absmax2 are replaced.
        """
        raise NotImplementedError(
            "Exercise 6.2: dequantize, update (use adamw_update_8bit_), re-quantize both moments — see tutorial/06-memory.md"
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a float parameter to the
        parameter's dtype — the uint8 codes would come back as float32 (the values survive, the
        8-bit test ``state1.dtype == torch.uint8`` does not). Load, then turn the codes back to uint8.
        """
        raise NotImplementedError(
            "Exercise 6.2: load, then restore the dtype of the codes of every 8-bit state — see tutorial/06-memory.md"
        )


# ---- Given: where the pager copies, and how it waits ---------------------------------------------


def paged_tensors(state: dict) -> list[str]:
    """Given: the keys of the state tensors a pager moves: every tensor but the step counter.

    ``torch.optim.AdamW`` keeps ``step`` as a 0-d CPU tensor on purpose (reading it costs no device
    sync); AdamW8bit keeps it as an int. Either way it stays where it is.
    """
    return [key for key, value in state.items() if torch.is_tensor(value) and key != "step"]


class CopyStreams:
    """Given: the CUDA side of paging; on the CPU every method is a no-op (``copying`` is a null context).

    On CUDA, copies run on a side stream so that they overlap the compute stream's work:

        compute:  update(g0) ─────────► update(g1) ─────────► ...
        side:     page_in(g1) ─ page_out(g0) ─ page_in(g2) ─ ...

    ``copying(device)``: run the enclosed copies on the side stream, after the compute stream's work
    queued so far (a state must not be copied out before its update has written it).
    ``ready(device, tensors)``: make the compute stream wait for the side stream's copies, and tell
    the allocator that ``tensors`` are now used by both streams (``record_stream``), so that memory is
    not reused while a copy of it is still in flight. ``finish()``: wait for every copy (the host reads
    the pool after ``step()``: ``state_dict()``, the next page_in).
    """

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def copying(self, device: torch.device) -> contextlib.AbstractContextManager:
        if device.type != "cuda":
            return contextlib.nullcontext()
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        side = self.streams[device]
        side.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(side)

    def ready(self, device: torch.device, tensors: Iterable[torch.Tensor]) -> None:
        if device.type != "cuda" or device not in self.streams:
            return
        compute, side = torch.cuda.current_stream(device), self.streams[device]
        compute.wait_stream(side)
        for t in tensors:
            if t.is_cuda:
                t.record_stream(compute)
                t.record_stream(side)

    def finish(self) -> None:
        for side in self.streams.values():
            side.synchronize()


# ---- Exercise 6.3: a paged optimizer ------------------------------------------------------------


class PagedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer (``torch.optim.AdamW``, ``AdamW8bit``, …) so that its states live in a host pool.

    Between steps every state tensor (``paged_tensors``) sits on ``pool_device`` (the CPU; pinned
    memory when the parameter is on a GPU, so the copies can be asynchronous). ``step()`` updates the
    parameter groups one at a time:

        page_in(group 0)
        for each group i:   wait for its copies · page_in(group i+1) (prefetch) · update group i · page_out(group i)
        finish the copies

    so at most two groups' states are on the device at once. ``min_paged_size`` (default 0: every state is
    paged) leaves the states of a parameter with fewer elements on its device, never paged, as bitsandbytes
    does with ``BNB_MIN_PAGED_SIZE`` = 100,000 (``get_state_buffer`` in ``bitsandbytes/optim/optimizer.py``:
    ``p.numel() < 1e5`` gets an ordinary device tensor). ``bytes_paged_in`` / ``bytes_paged_out``
    count the bytes moved each way (on a CPU-only run the "copies" are the same tensors, but they are
    counted all the same: the bookkeeping is what the tests check). After the first step (which
    creates the states) each step moves every state byte once in and once out.

    The wrapper shares ``param_groups`` and ``state`` with the wrapped optimizer, so a learning-rate
    scheduler, a GradScaler, ``zero_grad`` and checkpoints see one optimizer; the wrapped one does the
    arithmetic, so paged and unpaged runs give bit-identical parameters. The wrapped optimizer's
    ``step()`` runs once per group (its own step hooks, if any, run per group; the wrapper's run once).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, pool_device: torch.device | str = "cpu", min_paged_size: int = 0
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, PagedOptimizer):
            raise ValueError(f"optimizer must be an unpaged torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_int("min_paged_size", min_paged_size, 0)
        self.optimizer = optimizer
        self.pool_device = torch.device(pool_device)
        self.min_paged_size = min_paged_size  # parameters with fewer elements keep their states on the device
        self.bytes_paged_in = 0  # pool → device, over all steps
        self.bytes_paged_out = 0  # device → pool, over all steps
        self.streams = CopyStreams()
        self.homes: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # param → its pool tensors while paged in
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups, self.state = optimizer.param_groups, optimizer.state  # one set, shared

    def pool_tensor(self, like: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """Given: a new pool tensor shaped like ``like`` (pinned host memory when ``param`` is on a GPU)."""
        pin = self.pool_device.type == "cpu" and param.is_cuda
        return torch.empty_like(like, device=self.pool_device, pin_memory=pin)

    def page_in(self, group: dict) -> int:
        """Move the states of ``group``'s parameters from the pool to each parameter's device.

        Inside ``self.streams.copying(device)`` (the group's device: its first parameter's). Replace each
        paged state tensor by its copy on ``p.device`` (``non_blocking=True``), keep the pool tensor in
        ``self.homes[p][key]`` (page_out writes back into it), and add the bytes to ``bytes_paged_in``.
        Parameters without a state yet (before their first step) are skipped, and so are parameters of fewer
        than ``self.min_paged_size`` elements (their states never leave the device). Returns the bytes moved.
        """
        raise NotImplementedError(
            "Exercise 6.3: pool → device per state tensor, remember the pool tensor, count the bytes — see tutorial/06-memory.md"
        )

    def page_out(self, group: dict) -> int:
        """Move the states of ``group``'s parameters back to the pool; add the bytes to ``bytes_paged_out``.

        Inside ``self.streams.copying(device)``: copy each paged state tensor into its pool tensor from
        ``self.homes`` (``copy_(…, non_blocking=True)``; nothing to copy when it *is* that tensor, as on
        the CPU after an in-place update), or into a new ``pool_tensor`` when there is none or its shape
        or dtype changed (states created by this step). The state then points at the pool tensor.
        Parameters of fewer than ``self.min_paged_size`` elements are skipped. Returns the bytes moved.
        """
        raise NotImplementedError(
            "Exercise 6.3: device → pool per state tensor (a new pool tensor if needed), count the bytes — see tutorial/06-memory.md"
        )

    def group_tensors(self, group: dict) -> list[torch.Tensor]:
        """Given: the state tensors of ``group``'s parameters (for ``CopyStreams.ready``)."""
        return [self.state[p][k] for p in group["params"] if p in self.state for k in paged_tensors(self.state[p])]

    @torch.no_grad()
    def step(self, closure=None):
        """Update the groups one by one between page_in and page_out (see the class docstring).

        The wrapped optimizer updates one group when its ``param_groups`` holds only that group: set it,
        call its ``step()``, and put the full list back even if the step raises.
        """
        raise NotImplementedError(
            "Exercise 6.3: closure; page in the first group; then wait, prefetch, update, page out; finish — see tutorial/06-memory.md"
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load through the wrapped optimizer (AdamW8bit keeps its uint8 codes), share its new
        ``state`` and ``param_groups`` again, and page every group out (loading puts states on the
        parameters' devices).
        """
        raise NotImplementedError("Exercise 6.3: delegate, share again, page out — see tutorial/06-memory.md")


# ---- Exercise 6.4: choosing the optimizer in the trainer -------------------------------------------


def make_optimizer(
    name: str,
    param_groups: Iterable,
    *,
    min_8bit_size: int = MIN_8BIT_SIZE,
    pool_device: torch.device | str = "cpu",
    **hyper,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``param_groups`` (tensors or dicts), with ``hyper`` = lr, betas, eps, weight_decay.

        adamw             torch.optim.AdamW(param_groups, **hyper)             (Stage 4's optimizer)
        adamw8bit         AdamW8bit(param_groups, min_8bit_size=…, **hyper)
        paged_adamw       PagedOptimizer(the adamw above, pool_device)
        paged_adamw8bit   PagedOptimizer(the adamw8bit above, pool_device)

    An unknown name raises a ValueError that lists the four.
    """
    raise NotImplementedError(
        "Exercise 6.4: check the name, build the base optimizer, wrap it if paged — see tutorial/06-memory.md"
    )


@dataclass
class MemoryConfig(TrainConfig):
    """TrainConfig plus the optimizer choice (every Stage 4 field keeps its meaning and default)."""

    optimizer: str = option("adamw", "adamw | adamw8bit | paged_adamw | paged_adamw8bit")
    min_8bit_size: int = option(
        MIN_8BIT_SIZE, "8-bit states only for tensors of at least this many elements (the bundled model's "
        "LoRA matrices have 512–1408: all stay fp32 unless you lower it)",
    )  # fmt: skip
    output_dir: str = option("runs/memory", "metrics.jsonl, loss_curve.png, adapter/, checkpoints")

    def __post_init__(self) -> None:
        """Stage 4's checks (a bad TrainConfig field, e.g. r or learning_rate, named as TrainConfig names it), then
        ``optimizer`` (one of OPTIMIZERS) and ``min_8bit_size`` (an int >= 0): a ValueError naming the field."""
        raise NotImplementedError(
            "Exercise 6.4: the parent's checks first, then the two new fields (use check_int) — see tutorial/06-memory.md"
        )


class MemoryTrainer(QLoRATrainer):
    """The Stage 4 trainer with ``config.optimizer`` in place of its AdamW; everything else is inherited.

    After ``QLoRATrainer.__init__`` (which builds the AdamW of ``build_optimizer`` and its LambdaLR),
    the optimizer is rebuilt by ``make_optimizer`` over the same parameter groups (same parameters, each
    group's base lr and weight_decay), and the scheduler over the new optimizer with the same
    ``lr_factor``. ``optimizer="adamw"`` therefore trains bit-identically to ``QLoRATrainer``.
    Checkpoints are Stage 4's: ``optimizer.state_dict()`` carries the uint8 codes and absmax of the
    8-bit states, and a resumed run continues bit-identically.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MemoryConfig,
        train_data: dict[str, torch.Tensor],
        eval_data: dict[str, torch.Tensor] | None = None,
    ) -> None:
        raise NotImplementedError(
            "Exercise 6.4: the parent first; then the same groups at their base lr, a new optimizer, a new LambdaLR — see tutorial/06-memory.md"
        )


# ---- Given: shapes of the bundled architecture -----------------------------------------------------


def wide_config() -> LlamaConfig:
    """Given: a wider config of the bundled architecture for the memory lesson: 25.3 M parameters.

    d_model 512, 8 blocks, 8 heads, d_ff 1376 (≈ 8/3 · 512): large enough that weights and optimizer
    states dominate a QLoRA step, small enough to build (random weights, no training) in seconds.
    """
    return LlamaConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1376)


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Given: (out_features, in_features) of the seven projections of one block.

    k_proj and v_proj make ``config.kv_heads`` heads: d_kv = kv_heads · head_dim, which is d unless
    the config uses grouped-query attention (Llama 3, Llama-2-70B; lesson 08).
    """
    d, f, d_kv = config.d_model, config.d_ff, config.kv_heads * config.head_dim
    return {
        "q_proj": (d, d), "k_proj": (d_kv, d), "v_proj": (d_kv, d), "o_proj": (d, d),
        "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }  # fmt: skip


def trainable_numels(config: LlamaConfig, method: str, r: int = 8) -> list[int]:
    """Given: the element count of every trainable tensor (the optimizer keeps a state per tensor).

    full: every parameter (embedding, norms, projections, head; a head tied to the embedding is the
    embedding, counted once). lora / qlora: A (r, in) and B (out, r) for each of the 7 projections in
    every block (the default ``target_modules``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    shapes = projection_shapes(config)
    if method == "full":
        d, v = config.d_model, config.vocab_size
        per_block = [d, d] + [out * inp for out, inp in shapes.values()]
        head = [] if config.tie_word_embeddings else [v * d]
        return [v * d] + per_block * config.n_layers + [d] + head
    return [n for out, inp in shapes.values() for n in (r * inp, out * r)] * config.n_layers


# ---- Exercise 6.5: memory accounting ---------------------------------------------------------------


def optimizer_state_bytes(
    tensors: nn.Module | Iterable[int], optimizer: str, min_8bit_size: int = MIN_8BIT_SIZE
) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes (or a model's trainable parameters).

    Per tensor of n elements:

        adamw, paged_adamw            m and v fp32: 8n, plus torch's 4-byte ``step`` tensor
        adamw8bit, paged_adamw8bit    n < min_8bit_size: 8n (fp32 m and v)
                                      else 2n (uint8 codes) + 2 · 4 · ⌈n / 256⌉ (fp32 absmax per block)

    (the step of AdamW8bit is an int, not a tensor). Paging moves these bytes, it does not shrink them:
    a paged optimizer needs the same pool on the host and one group's worth on the device.
    Example: the bundled model with LoRA r = 8 has 56 adapter tensors, 39,424 elements:
    adamw 315,616 bytes; adamw8bit with min_8bit_size 0: 80,128 bytes (measured alike).
    """
    raise NotImplementedError(
        "Exercise 6.5: per tensor, by option (a model: its trainable parameters' numel) — see tutorial/06-memory.md"
    )


def activation_bytes(
    config: LlamaConfig,
    batch_size: int,
    seq_len: int,
    method: str = "qlora",
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    r: int = 8,
    base_dtype: str = "fp32",
) -> int:
    """Given: bytes autograd keeps for backward: the tensors the bundled model's forward saves (its activations).

    Read it as the lesson's per-block formula in code, then hold it to your ``measure_memory``: the
    two agree to the byte on the bundled model and on ``wide_config()``.

    N = batch_size · seq_len tokens; d = d_model, f = d_ff, H = heads, h = d / H, L = layers, V = vocab;
    c = 4 bytes (fp32) or 2 (bf16 autocast); the residual stream and the RMSNorms stay fp32.
    What each op of one block saves (``model/tiny_llama.py``), for a block whose input needs a gradient:

        RMSNorm × 2        x and rsqrt: 2 · (4Nd + 4N)      full: + x̂ = x·rsqrt for the weight's grad: + 2 · 4Nd
        attention          q, k, v (after RoPE), out: 4cNd;  logsumexp: 4NH      (o_proj's input is ``out``)
        SwiGLU             gate(x), silu(gate(x)), up(x): 3cNf
        linear inputs      fp32: norm outputs shared by q/k/v and by gate/up, and down's input: 4·(2Nd + Nf)
                           bf16 (each autocast cast is its own copy): full 2·(5Nd + Nf); LoRA 2·(6Nd + Nf)
        LoRA               A x for each of the 7 adapters: 7cNr;  bf16 also the casts of A and B:
                           2r · Σ (in + out) over the 7 projections = 2r(11d + 3f)
        weight casts       bf16 only, for fp32 weights (full fine-tuning; LoRA with base_dtype "fp32"):
                           autocast's bf16 copy of each W, kept for ∂L/∂x: 2 · Σ out·in = 2 · (4d² + 3df)

    No other weight is kept: an fp32 (or, with base_dtype "bf16", a bf16) base gives autograd the parameter
    itself, and QLoRA's NF4Linear runs ``matmul_4bit`` (Stage 3), which keeps a reference to the layer's
    codes and dequantizes again in the backward pass (``F.linear`` on the dequantized W would keep it).

    The first block of LoRA / QLoRA gets a frozen embedding (no gradient): its input norm saves nothing,
    and q, k, v keep no weight cast (nor, in bf16, the cast of A). Once per model: the final norm (x, rsqrt; full: + x̂ and the head's input),
    the RoPE tables (fp32: 2Th · 4; bf16: a cast per block: 4LTh · 2), the head's bf16 weight (bf16: dVc),
    the logits in fp32 (4NV), the labels (8N), one fp32 scalar (4), and for full fine-tuning the token
    ids (8N).

    The sums over the projections use ``projection_shapes``, so grouped-query attention shrinks the k and
    v terms (d_kv in place of d). Nothing else changes with it: k and v are repeated to every head before
    the attention, which saves the repeated copies (the 4cNd above). A tied head changes no activation.

    With gradient checkpointing only each block's input (4Nd, fp32) is kept through the forward, and
    backward recomputes one block at a time: activations = L · 4Nd + the once-per-model tensors + the
    fp32 RoPE tables (2Th · 4, an input of every checkpointed block) + one (non-first) block's tensors
    without its input.

    Measured by ``measure_memory`` (CPU, torch 2.13), equal to this estimate to the byte in every cell:

        batch 64 × 19 tokens, r 8              fp32          fp32 + ckpt   bf16          bf16 + ckpt
        bundled (0.2 M)       full             27,313,796    8,548,484     18,852,868    6,318,852
                              lora             24,964,484    7,565,956     16,788,228    5,531,140
                              lora, bf16 base  —             —             16,411,396    5,430,788
                              qlora            24,964,484    7,565,956     16,411,396    5,430,788
        wide_config (25.3 M)  full            421,382,916   76,749,060    333,847,812   64,734,980
                              lora            376,230,404   67,050,244    298,464,260   57,546,500
                              lora, bf16 base  —             —            249,443,332   51,222,276
                              qlora           376,230,404   67,050,244    249,443,332   51,222,276

    QLoRA saves what LoRA saves in fp32, and what LoRA on a bf16 base saves in bf16: its 4-bit layers add
    nothing. ``base_dtype`` is TrainConfig's: "fp32" (the default), or for lora the precision's ("bf16").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' for this estimate, got {precision!r}")
    check_base_dtype(method, precision, base_dtype)
    N, T = batch_size * seq_len, seq_len
    d, f, H, L, V = config.d_model, config.d_ff, config.n_heads, config.n_layers, config.vocab_size
    h, c = config.head_dim, (4 if precision == "fp32" else 2)
    full, bf16 = method == "full", precision == "bf16"
    norms = 2 * (4 * N * d + 4 * N) + (2 * 4 * N * d if full else 0)
    attention = 4 * c * N * d + 4 * N * H + (4 * T * h * c if bf16 else 0)  # bf16: RoPE tables cast per block
    mlp = 3 * c * N * f
    inputs = 4 * (2 * N * d + N * f) if not bf16 else 2 * ((5 if full else 6) * N * d + N * f)
    shapes = projection_shapes(config)
    lora = 0 if full else 7 * c * N * r + (2 * r * sum(out + inp for out, inp in shapes.values()) if bf16 else 0)
    copies = bf16 and method != "qlora" and base_dtype == "fp32"  # fp32 weights autocast casts (4-bit: none kept)
    frozen = c * sum(out * inp for out, inp in shapes.values()) if copies else 0
    qkv = sum(out * inp for name, (out, inp) in shapes.items() if name in ("q_proj", "k_proj", "v_proj"))
    block = norms + attention + mlp + inputs + lora + frozen  # (bytes) a block whose input needs a gradient
    # the first block of LoRA / QLoRA: its input has no gradient: no input norm, no W and (bf16) no A cast for q/k/v
    first = block if full else block - (4 * N * d + 4 * N) - (c * qkv if frozen else 0) - (3 * c * r * d if bf16 else 0)
    once = 4 * N * d + 4 * N + 4 * N * V + 8 * N + 4  # final norm's x and rsqrt; fp32 logits; labels; a scalar
    if full:
        once += 4 * N * d + c * N * d + 8 * N  # final norm's x̂, the head's input, the token ids
    if bf16:
        once += c * d * V  # the head's weight, cast
    if not gradient_checkpointing:
        rope = 0 if bf16 else 4 * 2 * T * h  # fp32: the two tables, shared by all blocks
        return first + (L - 1) * block + once + rope
    # the block inputs and the fp32 RoPE tables (checkpoint's inputs), then one block recomputed minus its input
    return L * 4 * N * d + once + 4 * 2 * T * h + block - 4 * N * d


def check_base_dtype(method: str, precision: str, base_dtype: str) -> None:
    """Given: ``base_dtype`` (TrainConfig's) is "fp32", or the precision's name for plain LoRA; else a ValueError."""
    allowed = ("fp32", precision) if method == "lora" and precision != "fp32" else ("fp32",)
    if base_dtype not in allowed:
        raise ValueError(
            f"base_dtype must be one of {allowed} for method={method!r}, precision={precision!r}, got {base_dtype!r}"
        )


def weight_bytes(
    config: LlamaConfig, method: str, r: int = 8, double_quant: bool = True, base_dtype: str = "fp32"
) -> int:
    """Given: the bytes of the model's parameters and buffers as this course's code stores them.

    full and lora: every base weight fp32 (Stage 4 keeps the loaded base), or for lora with
    ``base_dtype="bf16"`` the projections in bf16 (2 B; embedding, norms and head stay fp32); lora / qlora add the
    fp32 adapters. qlora: each projection as ``NF4Linear`` buffers (codes ⌈n/2⌉, double-quantized
    absmax: ⌈n/64⌉ codes + 4 · ⌈⌈n/64⌉/256⌉ scale + 4 offset), the embedding, norms and head fp32
    (a head tied to the embedding is the same storage, counted once).
    """
    d, v, L = config.d_model, config.vocab_size, config.n_layers
    projections = [out * inp for out, inp in projection_shapes(config).values()]
    matrices = 1 if config.tie_word_embeddings else 2  # the embedding, and the head unless tied
    rest = 4 * (matrices * v * d + d + 2 * d * L)  # embedding (and head), final norm, two norms per block
    adapters = 0 if method == "full" else 4 * sum(trainable_numels(config, method, r))
    if method != "qlora":
        per_weight = 4 if method == "full" or base_dtype == "fp32" else 2  # lora: a bf16 / fp16 base
        return rest + per_weight * sum(projections) * L + adapters
    per_block = 0
    for n in projections:
        blocks = -(-n // NF4_BLOCK_SIZE)
        absmax = blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
        per_block += (n + 1) // 2 + absmax
    return rest + per_block * L + adapters


def estimate_memory_parts(
    config: LlamaConfig,
    method: str,
    optimizer: str = "adamw",
    batch_size: int = 64,
    seq_len: int = 19,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    r: int = 8,
    min_8bit_size: int = MIN_8BIT_SIZE,
    base_dtype: str = "fp32",
) -> dict[str, int]:
    """Stage 4's ``estimate_memory`` with every part: {"weights", "gradients", "optimizer", "activations", "total"}.

    ``base_dtype`` is TrainConfig's (lora only: "bf16" stores the frozen projections in bf16).
    weights ``weight_bytes``; gradients 4 B per trainable element (fp32); optimizer
    ``optimizer_state_bytes`` of ``trainable_numels``; activations ``activation_bytes``. Bytes, ints.
    ``measure_memory`` agrees to the byte on every part, e.g. ``wide_config()``, batch 64 × 19, bf16:

        qlora + adamw       weights 15,657,216   gradients 2,498,560   optimizer 4,997,568   activations 249,443,332
        lora, base_dtype "bf16"   weights 53,200,896   activations 249,443,332 (fp32 base: 103,794,688 and 298,464,260)
        qlora + adamw8bit   optimizer 1,268,800 (every adapter tensor has >= 4096 elements: all 8-bit)
        full + adamw        weights 101,296,128  gradients 101,296,128  optimizer 202,592,556
    """
    raise NotImplementedError(
        "Exercise 6.5: one line per part (use weight_bytes, trainable_numels, optimizer_state_bytes, activation_bytes) — see tutorial/06-memory.md"
    )


def unique_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> int:
    """Given: the bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def live_bytes(refs: Iterable[weakref.ref], exclude: set[int] | None = None) -> int:
    """Given: ``unique_bytes`` of the tensors behind ``refs`` that are still alive.

    A pack hook sees every tensor autograd saves, also for graphs that are thrown away during the
    forward (a layer that calls its base twice and keeps one result); their storages are freed, and
    the allocator may hand the same address to a new tensor. Keep a weak reference in the hook and
    count afterwards, while the loss (and with it the graph) is alive: only what backward will need.
    """
    return unique_bytes([t for ref in refs if (t := ref()) is not None], exclude)


def measure_memory(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], config: MemoryConfig) -> dict[str, int]:
    """Measure the parts ``estimate_memory_parts`` predicts, on one training step of a copy of ``model``.

    ``model`` is prepared (``prepare_qlora_model`` or a plain model for full fine-tuning), ``batch`` is
    (input_ids, labels) (B, T). The model is deep-copied first (the caller's model and its gradients are
    left as they were); ``config`` gives the device, precision, gradient checkpointing and optimizer.

        weights       the storages of every parameter and buffer
        activations   CPU: the storages autograd saves during the forward pass, seen by a
                      ``torch.autograd.graph.saved_tensors_hooks`` pack hook and counted after the
                      loss while still alive (``live_bytes``), each once, the model's own parameters
                      and buffers excluded; with gradient checkpointing, plus the
                      largest one block saves when recomputed (measured by running each block's forward
                      with checkpointing off, its inputs — x, cos, sin — excluded).
                      CUDA: ``torch.cuda.max_memory_allocated`` during forward and backward, minus what was
                      allocated before the forward, minus the gradients.
        gradients     the storages of the trainable parameters' ``.grad`` after backward
        optimizer     every state tensor after one ``make_optimizer(config.optimizer)`` step
        total         the sum

    The batch is copied first so that a slice of a bigger dataset does not count its whole storage.
    """
    raise NotImplementedError(
        "Exercise 6.5: copy; weights; forward under the pack hook; backward; one optimizer step; the sum — see tutorial/06-memory.md"
    )


def largest_block_recompute(
    model: nn.Module, input_ids: torch.Tensor, autocast: contextlib.AbstractContextManager, own: set[int]
) -> int:
    """Given: the most bytes one decoder block saves, its inputs excluded (what checkpointing recomputes).

    Runs the forward once more with checkpointing off, attributing each saved storage to the first
    block that saved it (forward pre/post hooks on ``model.layers``), counted alive (``live_bytes``).
    The blocks' inputs are held until the count: the first block's input (the embedding's output) is
    freed during the forward when nothing saves it, and a tensor a later block saves may get its
    address, which would then be excluded as an input (a 2-layer LoRA model in bf16 lost 2·N·d bytes).
    """
    per_block: dict[int, list[weakref.ref]] = {}
    current: list[int] = []
    inputs: list[torch.Tensor] = []  # held until the count: a freed input's address could go to a saved tensor

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current:
            per_block.setdefault(current[-1], []).append(weakref.ref(t))
        return t

    def enter(i: int):
        def hook(module, args):
            current.append(i)
            inputs.extend(a for a in args if torch.is_tensor(a))

        return hook

    def leave(module, args, output) -> None:
        current.pop()

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave))
    flag, model.gradient_checkpointing = model.gradient_checkpointing, False
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            logits = model(input_ids)  # kept: the graph, and what it saved, stays alive while counting
        seen = own | {t.untyped_storage().data_ptr() for t in inputs}
        largest = 0
        for i in sorted(per_block):  # a storage counts for the first block that saved it
            largest = max(largest, live_bytes(per_block[i], seen))
            seen |= {t.untyped_storage().data_ptr() for ref in per_block[i] if (t := ref()) is not None}
        del logits
    finally:
        model.gradient_checkpointing = flag
        for handle in handles:
            handle.remove()
    return largest
