"""The inputs of Stage 6's golden AdamW8bit runs, rebuilt from seeds (the golden file does not store them).

Used by the tests (testcases/stage6/) and by solutions/tools/make_adamw8bit_golden.py, which wrote
testcases/fixtures/adamw8bit_golden.safetensors with bitsandbytes: one definition, so the two can
never drift apart (the file's metadata holds the SHA-256 of what these functions return). Only
``torch.rand`` / ``torch.randint`` and exact float32 arithmetic in a fixed order: the same bits on
every CPU. No pytest and no bitsandbytes here: the golden script runs in an environment without
pytest, the tests in one without bitsandbytes.
"""

from __future__ import annotations

import hashlib
import math

import torch


def irwin_hall(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """≈ N(0, 1/3): the sum of four U(0, 1) minus 2, in a fixed order (capability-independent bits)."""
    u = torch.rand((4, *shape), generator=g)
    return ((u[0] + u[1]) + (u[2] + u[3])) - 2.0


def initial_param(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A golden case's parameter before step 1 (the file's fixed seed: not shifted by --seed)."""
    return irwin_hall(shape, torch.Generator().manual_seed(seed)) * 0.1


def gradient(shape: tuple[int, ...], seed: int, step: int, zero_prefix: int = 0) -> torch.Tensor:
    """Step ``step``'s gradient (1-based): noise × a per-row scale 2^k (k ∈ [-4, 3]) × 1e-2 + 1e-3·sin(step/7)."""
    g = torch.Generator().manual_seed(10_000 * seed + step)
    x = irwin_hall(shape, g)
    rows = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1)
    scale = torch.pow(2.0, torch.randint(-4, 4, (rows.shape[0], 1), generator=g).float())
    out = (rows * scale).reshape(shape) * 1e-2 + 1e-3 * math.sin(step / 7)
    out.view(-1)[:zero_prefix] = 0.0
    return out


def sha256(tensors: list[torch.Tensor]) -> str:
    """The SHA-256 of the tensors' bytes, in order (how the golden file records its inputs)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
