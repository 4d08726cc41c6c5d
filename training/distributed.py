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

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model._impl import refuse_stubs, use_default_for

use_default_for("show")

from model.lora import save_lora  # noqa: E402
from training.finetune import override_defaults  # noqa: E402
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
    """QLoRATrainer for one process of a torchrun group (see the module docstring)."""

    def __init__(self, model, config: TrainConfig, train_data, eval_data=None) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the {self.world} processes")
        super().__init__(model, config, train_data, eval_data)
        self.module = self.model  # the model itself; self.model is what train_step calls
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(self.module, device_ids=device_ids, forward_sync_buffers=False)

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
        if self.rank == 0:
            save_lora(self.module, path)
        dist.barrier()
        return path


def parse_args(argv: list[str] | None = None):
    parser = config_parser()
    parser.prog = "torchrun --nproc_per_node=N -m training.distributed"
    parser.description = "QLoRA on the bundled task with DistributedDataParallel (see the module docstring)."
    parser.add_argument("--save-every", type=int, default=0, help="write checkpoint.pt every N steps (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt if present")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many steps of this launch (tests)")
    parser.add_argument("--float64", action="store_true", help="train in float64 (the tests' exact comparison)")
    parser.add_argument("--result", help="rank 0 writes {trainable parameters, losses} here (safetensors + .json)")
    override_defaults(parser, output_dir="runs/ddp", precision="fp32")
    return parser.parse_args(argv)


def build(args, trainer_class=DistributedTrainer):
    """The bundled base model, prepared as Stage 4 prepares it, in a trainer of ``trainer_class``."""
    from model.tiny_llama import load_base_model
    from training.data import finetune_data

    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields})
    model = load_base_model()
    if args.float64:
        model = model.double()
    model = prepare_qlora_model(model, config)
    return trainer_class(model, config, finetune_data("train"), finetune_data("eval"))


def write_result(trainer: QLoRATrainer, path: str | Path) -> None:
    """The trainable parameters (safetensors, names without DDP's ``module.``) and the loss history (JSON)."""
    from safetensors.torch import save_file

    model = getattr(trainer, "module", trainer.model)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path))
    Path(str(path) + ".json").write_text(
        json.dumps({"losses": [h["loss"] for h in trainer.history], "step": trainer.step})
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    refuse_stubs("torchrun -m training.distributed", range(1, 5))  # the stages it runs
    rank, world, _ = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the cores
    trainer = build(args)
    checkpoint = Path(trainer.config.output_dir) / "checkpoint.pt"
    if args.resume and checkpoint.is_file():
        trainer.load_checkpoint(checkpoint)
    stop = (
        trainer.config.max_steps
        if not args.stop_after
        else min(trainer.config.max_steps, trainer.step + args.stop_after)
    )
    every = args.save_every or stop
    while trainer.step < stop:
        trainer.train(steps=min(every, stop - trainer.step))
        trainer.save_checkpoint(checkpoint)
    if rank == 0:
        if args.result:
            write_result(trainer, args.result)
        metrics = trainer.evaluate()
        print(f"[{world} processes] step {trainer.step}, loss {trainer.history[-1]['loss']:.4f}, "
              f"eval accuracy {metrics['accuracy']:.1%}", flush=True)  # fmt: skip
    trainer.save_adapter()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
