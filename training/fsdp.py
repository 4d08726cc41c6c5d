"""Fully sharded data parallelism: the Stage 4 trainer under torchrun with FSDP2's ``fully_shard`` (`make fsdp`).

    torchrun --nproc_per_node=2 -m training.fsdp --max-steps 100        (gloo on CPUs, nccl on GPUs)
    make fsdp NPROC=2 ARGS="--max-steps 100 --save-every 25"            (the same)
    make fsdp NPROC=2 ARGS="--max-steps 100 --resume"                   (on from the newest checkpoint-N/)

DDP (``training/distributed.py``) keeps the whole model on every process. FSDP keeps 1/N of every
parameter on each: ``fully_shard`` turns each parameter into a DTensor sharded along its first
dimension, one unit per decoder layer plus the root (embedding, final norm, head). Before a unit
runs, its shards are all-gathered into whole tensors, and freed after; the gradients of its
trainable parameters are reduce-scattered (summed and split, then divided by N), so each rank holds
and updates 1/N of the adapters and of their AdamW states. The same five rules as DDP's trainer
hold (each rank takes rows rank, rank+N, … of the one-process micro-batch; the logged loss is the
mean over ranks; rank 0 writes), so N processes train as one (lesson 08 §4).

The 4-bit base. Stage 3's ``NF4Linear`` keeps its codes in *buffers*, and FSDP shards parameters
only: wrapped as it is, every rank would hold the whole 4-bit base. So before sharding, each
``NF4Linear`` becomes a ``QuantStorageNF4Linear``: the packed codes become a frozen ``nn.Parameter``
whose bytes are viewed as the model's float dtype (bitsandbytes' ``quant_storage``, as in
Answer.AI's FSDP-QLoRA: four codes per bf16 element, eight per fp32 one), so they shard like any
weight of that dtype, and a mixed-precision cast to that same dtype leaves the bytes alone. The
quantization constants (absmax codes, scales, offset) stay buffers, whole on every rank, as
bitsandbytes' quant_state does. The forward views the gathered storage as bytes again and calls
your 4-bit matmul (``matmul_4bit``, Stage 3), which dequantizes with your ``dequantize_nf4`` in the
forward and again in the backward, so it computes exactly what the NF4Linear computed and keeps no
copy of Ŵ either.

Checkpoints are sharded (``torch.distributed.checkpoint``): ``--save-every N`` writes
``output_dir/checkpoint-<step>/``, where every rank writes its own shards of the adapters and of
their AdamW states, and rank 0 adds ``trainer.pt`` (schedule, scaler, random state, step, history).
``--resume`` continues from the newest one with the same result as an uninterrupted run (same N).
At the end the adapter is gathered whole and rank 0 writes it in PEFT's format.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from model._impl import use_default_for

use_default_for("show")

from model.quant import NF4Linear, dequantize_nf4, double_dequantize, matmul_4bit  # noqa: E402
from training.distributed import DistributedTrainer, build, make_parser, run  # noqa: E402
from training.qlora_trainer import TrainConfig, resolve_device  # noqa: E402

STORAGE_DTYPES = {
    "auto": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
    "uint8": torch.uint8,
}
TRAINER_STATE = "trainer.pt"

# ---- the 4-bit base as a parameter FSDP can shard --------------------------------------------------


class QuantStorageNF4Linear(nn.Module):
    """An NF4Linear whose packed codes are a frozen parameter of ``storage_dtype`` (bitsandbytes' quant_storage).

    ``packed_storage``: the ceil(out·in / 2) code bytes, padded with zero bytes to a whole number of
    elements, viewed as ``storage_dtype`` (1-D). The constants stay buffers. ``codes()`` views the
    storage as uint8 again; the forward is NF4Linear's: dequantize_nf4, then a linear in compute_dtype.
    """

    output_is_fresh = True  # as NF4Linear: LoRA may add into the output in place

    def __init__(self, layer: NF4Linear, storage_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.block_size, self.double_quant, self.compute_dtype = (
            layer.block_size,
            layer.double_quant,
            layer.compute_dtype,
        )
        self.n_bytes = layer.packed.numel()
        width = torch.empty((), dtype=storage_dtype).element_size()
        padded = torch.cat([layer.packed, layer.packed.new_zeros(-self.n_bytes % width)])  # whole elements
        self.packed_storage = nn.Parameter(padded.view(storage_dtype), requires_grad=False)  # (ceil(n_bytes / w),)
        names = ("absmax_codes", "absmax_scale", "absmax_offset") if layer.double_quant else ("absmax",)
        for name in names:
            self.register_buffer(name, getattr(layer, name))
        self.bias = layer.bias

    def codes(self) -> torch.Tensor:
        """The packed codes, uint8 (n_bytes,): the storage's bytes, without the padding."""
        return self.packed_storage.view(torch.uint8)[: self.n_bytes]

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (out, in) in ``dtype`` (default compute_dtype), as NF4Linear.dequantize_weight, from the storage's bytes."""
        absmax = (
            double_dequantize(self.absmax_codes, self.absmax_scale, self.absmax_offset)
            if self.double_quant
            else self.absmax
        )
        shape = (self.out_features, self.in_features)
        return dequantize_nf4(self.codes(), absmax, shape, self.block_size, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out), as NF4Linear.forward: your 4-bit matmul, which keeps no copy of Ŵ.

        Its backward dequantizes again from ``packed_storage``: FSDP gathers a decoder layer's parameters
        again before that layer's backward (reshard after forward), so the codes are whole when it runs."""
        return matmul_4bit(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"storage={self.packed_storage.dtype} ({self.packed_storage.numel()},), compute_dtype={self.compute_dtype}"
        )


def use_quant_storage(model: nn.Module, storage_dtype: torch.dtype | None = None) -> nn.Module:
    """Every NF4Linear (a LoRA layer's base, or bare) becomes a QuantStorageNF4Linear, in place; returns the model.

    ``storage_dtype``: default the dtype of the model's other floating parameters (the embedding's),
    the rule of FSDP-QLoRA: ``bnb_4bit_quant_storage`` = the dtype the rest of the model is sharded in.
    """
    if storage_dtype is None:
        storage_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            model.set_submodule(name, QuantStorageNF4Linear(module, storage_dtype))
    return model


# ---- sharding ---------------------------------------------------------------------------------------------


def shard(model: nn.Module, mp_policy=None) -> nn.Module:
    """FSDP2 units: each decoder layer, then the root (the embedding, final norm and head), in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()  # the default: compute in the parameters' own dtype
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    return model


class FSDPTrainer(DistributedTrainer):
    """DistributedTrainer with the model sharded by FSDP2 instead of replicated by DDP (module docstring)."""

    every_rank_evaluates = True  # a forward pass all-gathers every unit: all ranks run it together

    def distribute(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        if any(isinstance(m, NF4Linear) for m in model.modules()):
            use_quant_storage(model)
        return shard(model.to(resolve_device(config)))  # before the optimizer: it must hold the sharded parameters

    def wrap(self, module: nn.Module) -> nn.Module:
        return module  # fully_shard changed the module in place: its hooks gather, free and reduce-scatter

    def fsdp_units(self) -> list[nn.Module]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.module.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def full_parameters(self):
        """Every unit all-gathered: ``self.module``'s parameters are whole tensors inside (a collective)."""
        units = self.fsdp_units()
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()

    # -- sharded checkpoints -----------------------------------------------------------------------------

    def checkpoint_path(self) -> Path:
        return self.output_dir / f"checkpoint-{self.step}"

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint-<step> directory with the highest step (and its trainer.pt), or None."""
        found = [p for p in self.output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        found = [p for p in found if (p / TRAINER_STATE).is_file()]
        return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)

    def _sharded_state(self) -> dict:
        """{"model": the trainable parameters, "optimizer": their AdamW states}, each rank's shards (DTensors)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(
            self.module, self.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Each rank writes its shards (torch.distributed.checkpoint), rank 0 the rest; then renamed into place."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        dcp.save(self._sharded_state(), checkpoint_id=str(partial))
        if self.rank == 0:
            state = {
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": {"cpu": torch.get_rng_state()},
                "step": self.step,
                "skipped_steps": self.skipped_steps,
                "history": self.history,
            }
            torch.save(state, partial / TRAINER_STATE)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(partial, path)  # a crash mid-write never leaves a half checkpoint under the final name
        dist.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Every rank reads its shards back into the model and optimizer, and the rest from trainer.pt."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(path)
        state = self._sharded_state()  # the layout to fill (the optimizer's states are created if still empty)
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),  # the frozen base is rebuilt from the base checkpoint
        )
        rest = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(rest["scheduler"])
        self.scaler.load_state_dict(rest["scaler"])
        torch.set_rng_state(rest["rng"]["cpu"])
        self.step, self.skipped_steps, self.history = rest["step"], rest["skipped_steps"], list(rest["history"])


# ---- the command ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("torchrun --nproc_per_node=N -m training.fsdp", "FSDP2 (fully_shard)", "runs/fsdp",
                         "output-dir/checkpoint-<step>/")  # fmt: skip
    parser.add_argument(
        "--quant-storage",
        choices=tuple(STORAGE_DTYPES),
        default="auto",
        help="dtype the packed NF4 codes are stored and sharded as (auto: the model's; default: auto)",
    )
    return parser.parse_args(argv)


def build_fsdp(args, trainer_class=FSDPTrainer):
    """The bundled model prepared as Stage 4 prepares it, its NF4 codes in float storage, in ``trainer_class``.

    ``--float64`` makes every product float64 (the tests compare 2 processes with 1 at float64's
    precision): the NF4 layers compute in it, and the adapters, which Stage 1 keeps in fp32 beside a
    4-bit base, are cast to it. ``trainer_class=QLoRATrainer`` gives the one-process run of the same model.
    """

    def float_storage(model: nn.Module) -> nn.Module:
        if args.float64:
            for module in model.modules():
                if isinstance(module, NF4Linear):
                    module.compute_dtype = torch.float64
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.double()
        return use_quant_storage(model, STORAGE_DTYPES[args.quant_storage])

    return build(args, trainer_class, float_storage)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv), FSDPTrainer, "torchrun -m training.fsdp", build_fsdp)


if __name__ == "__main__":
    main()
