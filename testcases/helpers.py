"""Small helpers the graded suites share (not graded themselves)."""

from __future__ import annotations

import torch
from torch import nn


def copy_of(model: nn.Module) -> nn.Module:
    """A fresh TinyLlama with ``model``'s config and weights, in eval mode (a second, untouched base)."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def randomize_lora(model: nn.Module, std: float = 0.5, seed: int = 1) -> None:
    """Give every lora_B (and lora_A) random values, as if the adapter had been trained.

    A fresh adapter has B = 0 and changes nothing; tests of merging and saving need one that does.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything that must stay unchanged when a call on ``model`` fails: module types, tensors, flags."""
    return {
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, object], what: str) -> None:
    __tracebackhide__ = True
    after = snapshot(model)
    assert after["modules"] == before["modules"], f"{what} changed the model's modules although it raised an error"
    assert after["requires_grad"] == before["requires_grad"], f"{what} changed requires_grad although it raised"
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{what} changed {key} although it raised an error"


def record_optimizer_steps(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Patch ``optimizer.step`` to record the gradients it sees; returns the (growing) record list."""
    seen: list[list[torch.Tensor]] = []
    original = optimizer.step

    def step(*args, **kwargs):
        seen.append(
            [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        )
        return original(*args, **kwargs)

    optimizer.step = step
    return seen


def make_trainer(trainer_module, model: nn.Module, data: dict[str, torch.Tensor], **overrides):
    """A QLoRATrainer on a prepared ``model`` with small, fast defaults (fp32, r=2, 8 steps of 16)."""
    settings = {"r": 2, "precision": "fp32", "max_steps": 8, "batch_size": 16, "progress": False, **overrides}
    config = trainer_module.TrainConfig(**settings)
    model = trainer_module.prepare_qlora_model(model, config)
    return trainer_module.QLoRATrainer(model, config, data, data)
