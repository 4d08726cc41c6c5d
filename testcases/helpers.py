"""Small helpers the graded suites share (not graded themselves).

Seeds: tests never call ``torch.manual_seed`` or ``torch.Generator().manual_seed`` directly; they
call ``seed(n)`` and ``generator(n)``, which add ``SEED_OFFSET`` (pytest's ``--seed``; 0 when
grading). ``make stress`` runs the reference under many offsets: a test that holds only for one
seed fails there.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

SEED_OFFSET = 0  # set by the grading plugin from --seed


def observe(name: str, value: float) -> None:
    """Record a measured quantity for solutions/tools/calibrate.py (only when CALIBRATE_OUT is set).

    Thresholds on training progress come from the distribution of these values over many seeds.
    """
    if path := os.environ.get("CALIBRATE_OUT"):
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, "value": float(value), "seed": SEED_OFFSET}) + "\n")


def seed(n: int) -> torch.Generator:
    """Seed torch's global generator with ``n`` (+ the run's offset)."""
    return torch.manual_seed(n + SEED_OFFSET)


def generator(n: int) -> torch.Generator:
    """A private generator seeded with ``n`` (+ the run's offset)."""
    return torch.Generator().manual_seed(n + SEED_OFFSET)


def torch_global_state() -> dict[str, object]:
    """Everything global in torch that a test (or student code) could change."""
    return {
        "rng": torch.get_rng_state(),
        "dtype": torch.get_default_dtype(),
        "device": torch.get_default_device(),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
    }


def restore_torch_global_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["rng"])
    torch.set_default_dtype(state["dtype"])
    torch.set_default_device(state["device"])
    if torch.get_num_threads() != state["threads"]:
        torch.set_num_threads(state["threads"])
    torch.set_grad_enabled(state["grad"])
    torch.use_deterministic_algorithms(state["deterministic"])
    torch.set_anomaly_enabled(state["anomaly"])
    torch.set_autocast_enabled("cpu", state["autocast_cpu"])


def copy_of(model: nn.Module) -> nn.Module:
    """A fresh model of ``model``'s class and config with its weights, in eval mode (a second, untouched base)."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).dtype)


def randomize_lora(model: nn.Module, std: float = 0.5, seed: int = 1) -> None:
    """Give every lora_A and lora_B random values, as if the adapter had been trained.

    A fresh adapter has B = 0 and changes nothing; tests of merging and saving need one that does.
    """
    gen = generator(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * std)


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
    settings = {"r": 2, "precision": "fp32", "max_steps": 8, "batch_size": 16, "progress": False, "seed": SEED_OFFSET}
    settings.update(overrides)
    config = trainer_module.TrainConfig(**settings)
    model = trainer_module.prepare_qlora_model(model, config)
    return trainer_module.QLoRATrainer(model, config, data, data)


def word(name: str) -> str:
    """A ``pytest.raises(match=...)`` pattern: ``name`` as a whole word (``r`` must not match "error")."""
    import re

    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


def diagnose(actual: torch.Tensor, candidates: dict[str, torch.Tensor], bound: torch.Tensor | float) -> str:
    """The first cause whose wrong result ``actual`` reproduces (within ``bound``), or "".

    Lets a failure message name a mistake only when the output shows it, instead of guessing.
    """
    a = actual.detach().double().cpu()
    for cause, wrong in candidates.items():
        w = wrong.detach().double().cpu()
        if w.shape == a.shape and bool(((a - w).abs() <= torch.as_tensor(bound, dtype=torch.float64)).all()):
            return cause
    return ""


class BiasedConfig:
    """Sizes of BiasedMLP: 24 · 70 = 1,680 weights per projection = 26¼ NF4 blocks of 64."""

    def __init__(self, d: int = 24, f: int = 70, out: int = 10) -> None:
        self.d, self.f, self.out = d, f, out


class BiasedMLP(nn.Module):
    """x (B, d) -> (B, out): h = x + down(silu(gate(x)) * up(x)), then lm_head(h). Every linear has a bias."""

    def __init__(self, config: BiasedConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or BiasedConfig()
        self.gate_proj = nn.Linear(config.d, config.f)
        self.up_proj = nn.Linear(config.d, config.f)
        self.down_proj = nn.Linear(config.f, config.d)
        self.lm_head = nn.Linear(config.d, config.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, f)
        return self.lm_head(x + self.down_proj(h))  # (B, out)


class LargestAllocation:
    """A dispatch mode that records the largest tensor any non-view op creates (shape and op)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info is not None for r in func._schema.returns):  # views share memory
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, torch.Tensor) and t.numel() > record.numel:
                            record.numel, record.shape, record.op = t.numel(), tuple(t.shape), str(func)
                return out

        self.mode, self.numel, self.shape, self.op = Mode(), 0, (), ""

    def __enter__(self) -> LargestAllocation:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


# ---- refusals that say what they passed (Stages 5–7) ------------------------------------------------


def shown(value: object) -> str:
    """A short, readable repr of an argument for a failure message: tensors by shape, modules by type."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}" if value.numel() > 4 else repr(value.tolist())
    if isinstance(value, nn.Module):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def call_text(call, args: tuple, kwargs: dict) -> str:
    """``name(arg, key=value)`` as the failure message shows the refused call."""
    name = getattr(call, "__qualname__", None) or type(call).__name__
    parts = [shown(a) for a in args] + [f"{k}={shown(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def pattern_text(match: str) -> str:
    """What a ``match`` pattern asks for, in words: ``word(name)`` back to its name, else the pattern."""
    import re

    found = re.fullmatch(r"\(\?<!\[A-Za-z0-9_\]\)(.*)\(\?!\[A-Za-z0-9_\]\)", match)
    return repr(re.sub(r"\\(.)", r"\1", found.group(1)) if found else match)


def refuses(call, *args, match: str | None = None, error: type[Exception] = ValueError, **kwargs) -> Exception:
    """``call(*args, **kwargs)`` must raise ``error`` whose message matches ``match``; returns the error.

    ``match``: a regex, usually ``word(name)`` (the argument the message must name). Unlike a bare
    ``pytest.raises`` (whose failure reads "DID NOT RAISE"), a failure here shows the call with the
    arguments it was given, and the message it raised if that lacks the name. A stub's
    NotImplementedError (and any other error type) passes through unchanged.
    """
    __tracebackhide__ = True
    import re

    try:
        call(*args, **kwargs)
    except error as raised:
        if match is not None and not re.search(match, str(raised)):
            raise AssertionError(
                f"{call_text(call, args, kwargs)} raised {type(raised).__name__}: {raised}\n"
                f"but its message must name {pattern_text(match)}"
            ) from None
        return raised
    naming = f" naming {pattern_text(match)}" if match is not None else ""
    raise AssertionError(
        f"{call_text(call, args, kwargs)} must raise {error.__name__}{naming}, but it returned without an error"
    )
