"""More than one process: the Stage 4 trainer under torchrun, with PyTorch's DistributedDataParallel.

    torchrun --nproc_per_node=2 -m training.distributed --max-steps 100     (gloo on CPUs, nccl on GPUs)
    make ddp NPROC=2 ARGS="--max-steps 100"                                 (the same)

Data parallelism: every process holds the whole (frozen, 4-bit) model and its own copy of the
adapters; each step, each of the N processes runs 1/N of the global micro-batch, and DDP averages
the adapters' gradients across processes during backward (an all-reduce per bucket of gradients),
so every process applies the same update and the copies stay identical. ``DistributedTrainer`` is
the Stage 4 ``QLoRATrainer`` (your ``train_step`` under IMPL=student) with five changes:

- the model is wrapped in ``DistributedDataParallel(forward_sync_buffers=False)``. DDP synchronises
  only parameters that require a gradient, so only the adapters' gradients are all-reduced; the
  4-bit base lives in buffers (``NF4Linear``), identical on every process by construction: DDP
  copies rank 0's once, when it wraps the model, and never again (``forward_sync_buffers=False``;
  the default would broadcast every buffer before every forward);
- ``micro_batch(i)``: process r takes rows r, r+N, r+2N, … of the single-process micro-batch i,
  so N processes see exactly the examples one process would (the "distributed sampler" of a run
  whose batches are a pure function of (seed, i), as Stage 4's are);
- the logged loss is the mean over processes (an all-reduce of one number);
- only rank 0 writes metrics.jsonl, checkpoints and the adapter; the others wait at a barrier, so
  a checkpoint is complete before anyone goes on. Resume with the same number of processes for a
  bit-identical continuation (the all-reduce's order of summation depends on it); the checkpoint
  holds the DDP wrapper's parameter names and rank 0's random state (every rank's is the same);
- batch_size must be divisible by the number of processes.

Equal to one process: DDP averages the per-process mean losses' gradients, which is the gradient of
the global mean when every process's share has as many labelled tokens (true for the course's
tasks, where every answer has the same length; with ragged data DDP weights processes equally) and
nothing random differs between them (lora_dropout = 0: with dropout each process draws the masks
of its own rows, another sample of the same distribution).
``testcases/real_models_test.py`` runs 2 processes and 1 process in float64 and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model._impl import refuse_stubs, use_default_for

use_default_for("show")

from model.lora import save_lora  # noqa: E402
from training.cli import override_defaults, train_config  # noqa: E402
from training.qlora_trainer import QLoRATrainer, TrainConfig, config_parser, prepare_qlora_model  # noqa: E402


def init_distributed() -> tuple[int, int, torch.device | None]:
    """Join the torchrun group (gloo on CPU, nccl on CUDA); (rank, world size, this process's GPU or None)."""
    if "RANK" not in os.environ:
        raise RuntimeError("run under torchrun, e.g. torchrun --nproc_per_node=2 -m training.distributed")
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(gpu)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu is not None else "gloo")
    return dist.get_rank(), dist.get_world_size(), gpu


class DistributedTrainer(QLoRATrainer):
    """QLoRATrainer for one process of a torchrun group (see the module docstring).

    ``training/fsdp.py``'s FSDPTrainer changes what ``distribute``, ``wrap``, the checkpoints and
    ``full_parameters`` do; the data split, the logged loss and rank-0 I/O are the same.
    """

    every_rank_evaluates = False  # a DDP replica can evaluate alone; a sharded model needs every rank

    def __init__(self, model, config: TrainConfig, train_data, eval_data=None) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the {self.world} processes")
        super().__init__(self.distribute(model, config), config, train_data, eval_data)
        self.module = self.model  # the model itself; self.model is what train_step calls
        self.model = self.wrap(self.module)

    def distribute(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """The model as the optimizer should see it (DDP: unchanged; FSDP: sharded)."""
        return model

    def wrap(self, module: nn.Module) -> nn.Module:
        """What train_step calls: DDP's wrapper, which all-reduces the adapters' gradients during backward."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)

    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint.pt"

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoint_path() if self.checkpoint_path().is_file() else None

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """A context in which ``self.module``'s parameters are whole tensors (a replica's always are)."""
        return contextlib.nullcontext()

    def held_bytes(self) -> tuple[int, int]:
        """(bytes of parameters and buffers this rank holds, bytes of one whole copy of them)."""
        from torch.distributed.tensor import DTensor

        held = whole = 0
        for tensor in [*self.module.parameters(), *self.module.buffers()]:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # a shard, or the whole tensor
            held += local.numel() * local.element_size()
            whole += tensor.numel() * tensor.element_size()
        return held, whole

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, whole, under the model's own names (every rank must call it)."""
        with self.full_parameters():
            return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the single-process micro-batch ``index``: rows rank, rank + N, …"""
        input_ids, labels = super().micro_batch(index)
        return input_ids[self.rank :: self.world], labels[self.rank :: self.world]

    def train_step(self, micro_batches) -> float:
        loss = torch.tensor(super().train_step(micro_batches), dtype=torch.float64, device=self.device)
        dist.all_reduce(loss)  # the logged loss: the mean over processes
        return loss.item() / self.world

    def _log(self, record: dict[str, float]) -> None:
        if self.rank == 0:
            super()._log(record)

    def save_checkpoint(self, path: str | Path) -> Path:
        if self.rank == 0:
            super().save_checkpoint(path)
        dist.barrier()
        return Path(path)

    def save_adapter(self) -> Path:
        path = self.output_dir / "adapter"
        with self.full_parameters():
            if self.rank == 0:
                save_lora(self.module, path)
        dist.barrier()
        return path


def make_parser(
    prog: str = "torchrun --nproc_per_node=N -m training.distributed",
    what: str = "DistributedDataParallel",
    output_dir: str = "runs/ddp",
    checkpoint: str = "output-dir/checkpoint.pt",
) -> argparse.ArgumentParser:
    """Stage 4's options (TrainConfig) and the run's own: checkpoints, resuming, the tests' switches."""
    parser = config_parser()
    parser.prog = prog
    parser.description = f"QLoRA on the bundled task with {what} (see the module docstring)."
    parser.add_argument("--save-every", type=int, default=0, help=f"write {checkpoint} every N steps (0: at the end)")
    parser.add_argument("--resume", action="store_true", help=f"continue from {checkpoint} if present")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many steps of this launch (tests)")
    parser.add_argument("--float64", action="store_true", help="train in float64 (the tests' exact comparison)")
    parser.add_argument("--result", help="rank 0 writes {trainable parameters, losses} here (safetensors + .json)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation (tests)")
    override_defaults(parser, output_dir=output_dir, precision="fp32")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def build(args, trainer_class=DistributedTrainer, adapt=None):
    """The bundled base model, prepared as Stage 4 prepares it (then ``adapt(model)``), in a ``trainer_class``."""
    from model.tiny_llama import load_base_model
    from training.data import finetune_data

    config = train_config(args)
    model = load_base_model()
    if args.float64:
        model = model.double()
    model = prepare_qlora_model(model, config)
    if adapt is not None:
        model = adapt(model)
    return trainer_class(model, config, finetune_data("train"), finetune_data("eval"))


def write_result(trainer: QLoRATrainer, path: str | Path) -> None:
    """The trainable parameters (safetensors, whole, under the model's own names) and the loss history (JSON).

    Under torchrun every rank calls it (gathering sharded parameters is collective) and rank 0 writes.
    """
    from safetensors.torch import save_file

    info = {"losses": [h["loss"] for h in trainer.history], "step": trainer.step}
    if isinstance(trainer, DistributedTrainer):
        tensors = trainer.trainable_state()
        if trainer.rank != 0:
            return
        info["held_bytes"], info["whole_bytes"] = trainer.held_bytes()  # rank 0's
    else:
        tensors = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
    Path(str(path) + ".json").write_text(json.dumps(info))


def run(args, trainer_class: type[DistributedTrainer], command: str, build=build) -> None:
    """One process of ``command``: train (resuming, checkpointing, stopping as asked), then report and save."""
    refuse_stubs(command, range(1, 5))  # the stages it runs
    rank, world, _ = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the cores
    trainer = build(args, trainer_class)
    checkpoint = trainer.latest_checkpoint() if args.resume else None
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    stop = (
        trainer.config.max_steps
        if not args.stop_after
        else min(trainer.config.max_steps, trainer.step + args.stop_after)
    )
    every = args.save_every or stop
    while trainer.step < stop:
        trainer.train(steps=min(every, stop - trainer.step))
        trainer.save_checkpoint(trainer.checkpoint_path())
    if args.result:
        write_result(trainer, args.result)
    evaluate = not args.no_eval and (rank == 0 or trainer.every_rank_evaluates)
    metrics = trainer.evaluate() if evaluate else None
    if rank == 0:
        held, whole = trainer.held_bytes()
        accuracy = f", eval accuracy {metrics['accuracy']:.1%}" if metrics else ""
        print(f"[{world} processes] step {trainer.step}, loss {trainer.history[-1]['loss']:.4f}{accuracy}; "
              f"rank 0 holds {held:,} of the model's {whole:,} bytes of parameters and buffers", flush=True)  # fmt: skip
    trainer.save_adapter()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv), DistributedTrainer, "torchrun -m training.distributed")


if __name__ == "__main__":
    main()
