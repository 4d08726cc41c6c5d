"""Small helpers the graded suites share (not graded themselves).

Seeds: tests never call ``torch.manual_seed`` or ``torch.Generator().manual_seed`` directly; they
call ``seed(n)`` and ``generator(n)``, which add ``SEED_OFFSET`` (pytest's ``--seed``; 0 when
grading). ``make stress`` runs the reference under many offsets: a test that holds only for one
seed fails there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

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


class KeptForBackward:
    """What a forward pass keeps for its backward: the tensors autograd saves, and any other it left alive.

    Inside ``with KeptForBackward(numel) as kept:`` a ``saved_tensors_hooks`` pack hook sees every tensor
    autograd saves (``save_for_backward`` and what built-in ops such as ``F.linear`` save), and a dispatch
    mode sees every tensor an op makes (views included). Only floating-point tensors whose storage holds at
    least ``numel`` elements count ("big"): ``kept.saved`` describes the big saved ones; ``kept.alive()`` the
    big ones made during the forward that are still alive after it (weak references, after ``gc.collect()``):
    a copy kept as a ``ctx`` attribute, in a closure or a cache, which no pack hook sees. Tensors that existed
    before the forward (a module's own buffers) are never counted. Each entry: (shape, dtype, op).
    """

    def __init__(self, numel: int) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        kept = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and kept.big(t):
                        kept._made.append((weakref.ref(t), tuple(t.shape), t.dtype, str(func)))
                return out

        self.numel, self.mode = numel, Mode()
        self.saved: list[tuple[tuple[int, ...], torch.dtype, str]] = []
        self._made: list[tuple[object, tuple[int, ...], torch.dtype, str]] = []

    def big(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.untyped_storage().nbytes() >= self.numel * t.element_size()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.big(t):
            self.saved.append((tuple(t.shape), t.dtype, "saved for backward"))  # a description, never t itself
        return t

    def __enter__(self) -> KeptForBackward:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        self._hooks.__exit__(*exc)

    def alive(self) -> list[tuple[tuple[int, ...], torch.dtype, str]]:
        import gc

        gc.collect()
        return [(shape, dtype, op) for ref, shape, dtype, op in self._made if ref() is not None]


# ---- Refusals: an error that names what is wrong, and nothing changed ---------------------------------


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN equals NaN): dtype, shape, device and every value."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _frozen(value: object) -> object:
    """A deep copy of nested dicts, lists and tensors (tensors cloned), to compare with later."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _frozen(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_frozen(item) for item in value)
    return copy.deepcopy(value)


def _differences(before: object, after: object, where: str) -> list[str]:
    """Where two nested structures of dicts, lists, tensors and plain values differ, in words."""
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            return [f"{where} (was {type(before).__name__}, now {type(after).__name__})"]
        if before.dtype != after.dtype or before.shape != after.shape:
            return [f"{where} (was {tuple(before.shape)} {before.dtype}, now {tuple(after.shape)} {after.dtype})"]
        if not _same_tensor(before, after):
            changed = int((before != after).sum()) if before.numel() else 0
            return [f"{where} ({changed} of {before.numel()} values)"]
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{where}: {key!r} appeared" for key in after if key not in before]
        found += [f"{where}: {key!r} disappeared" for key in before if key not in after]
        for key in before:
            if key in after:
                found += _differences(before[key], after[key], f"{where}[{key!r}]")
        return found
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        if len(before) != len(after):
            return [f"{where} (had {len(before)} entries, now {len(after)})"]
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in _differences(b, a, f"{where}[{i}]")]
    if isinstance(before, float) and isinstance(after, float) and before != before and after != after:
        return []  # NaN, e.g. the loss of a skipped step
    return [] if before == after else [f"{where} ({before!r} → {after!r})"]


def _model_state(model: nn.Module) -> dict[str, object]:
    return {
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "tensors": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()},
        "training": {name: module.training for name, module in model.named_modules()},
        "merged": {name: module.merged for name, module in model.named_modules() if hasattr(module, "merged")},
        "checkpointing": getattr(model, "gradient_checkpointing", None),
    }


def _files(directory: str | os.PathLike) -> dict[str, bytes] | str:
    """Every file (its bytes) and folder under ``directory``, or "absent"."""
    root = Path(directory)
    if not root.exists():
        return "absent"
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<folder>" for p in sorted(root.rglob("*"))
    }


def _trainer_state(trainer) -> dict[str, object]:
    return {
        "step": trainer.step,
        "skipped_steps": trainer.skipped_steps,
        "history": _frozen(trainer.history),
        "config": _frozen(dataclasses.asdict(trainer.config)),
        "optimizer": _frozen(trainer.optimizer.state_dict()),
        "scheduler": _frozen(trainer.scheduler.state_dict()),
        "scaler": _frozen(trainer.scaler.state_dict()),
    }


class Unchanged:
    """What a refused call must leave exactly as it was: a model, the files under a folder, a trainer, tensors.

    Compared bit for bit afterwards (``changes``): for a model its modules (names and types), every tensor of
    its state dict (values, dtype, shape), which parameters train, their gradients, each module's training
    flag, each LoRA layer's ``merged`` flag, and which Parameter objects it holds; for a folder whether it
    exists and every file's bytes; for a trainer its model, step counts, history, config and the states of
    its optimizer, scheduler and GradScaler (and that they are the same objects); tensors by value and dtype.
    """

    def __init__(self, model=None, directory=None, trainer=None, tensors: dict[str, torch.Tensor] | None = None):
        self.model, self.directory, self.trainer, self.tensors = model, directory, trainer, dict(tensors or {})
        models = {"the model": model} if model is not None else {}
        if trainer is not None and trainer.model is not model:
            models["the trainer's model"] = trainer.model
        self.models = {label: (m, _model_state(m), dict(m.named_parameters())) for label, m in models.items()}
        self.files = None if directory is None else _files(directory)
        if trainer is not None:
            self.trainer_state = _trainer_state(trainer)
            self.parts = {name: getattr(trainer, name) for name in ("model", "optimizer", "scheduler", "scaler")}
        self.tensor_state = {name: t.detach().clone() for name, t in self.tensors.items()}

    def changes(self) -> list[str]:
        """What changed since construction, in words (empty if nothing did)."""
        found: list[str] = []
        for label, (model, state, params) in self.models.items():
            now = _model_state(model)
            if now["modules"] != state["modules"]:
                was, new = dict(state["modules"]), dict(now["modules"])
                moved = [n for n in sorted(set(was) | set(new)) if was.get(n) != new.get(n)]
                found.append(f"{label}'s modules ({moved[0]}: {was.get(moved[0])} → {new.get(moved[0])})")
            found += _differences(state["tensors"], now["tensors"], f"{label}'s state dict")
            for key in ("requires_grad", "grads", "training", "merged", "checkpointing"):
                found += _differences(state[key], now[key], f"{label}'s {key}")
            replaced = [n for n, p in model.named_parameters() if n in params and params[n] is not p]
            found += [f"{label}'s Parameter {replaced[0]} (a new object)"] if replaced else []
        if self.directory is not None:
            now_files = _files(self.directory)
            if now_files != self.files:
                if self.files == "absent":
                    found.append(f"the folder {Path(self.directory).name!r} (it was created)")
                elif now_files == "absent":
                    found.append(f"the folder {Path(self.directory).name!r} (it was deleted)")
                else:
                    names = sorted(set(self.files) | set(now_files))
                    found += [f"the file {n!r}" for n in names if self.files.get(n) != now_files.get(n)][:3]
        if self.trainer is not None:
            found += _differences(self.trainer_state, _trainer_state(self.trainer), "the trainer")
            found += [
                f"the trainer's {n} (a new object)"
                for n, obj in self.parts.items()
                if getattr(self.trainer, n) is not obj
            ]
        for name, tensor in self.tensors.items():
            found += _differences(self.tensor_state[name], tensor.detach(), f"the argument {name}")
        return found


def describe_value(value: object) -> str:
    """A short, readable description of an argument for a failure message."""
    if isinstance(value, torch.Tensor):
        layout = "" if value.is_contiguous() else ", non-contiguous"
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}{layout}"
    if isinstance(value, nn.Module):
        wrapped = sum(1 for m in value.modules() if hasattr(m, "lora_A") and hasattr(m, "merged"))
        layers = f" with {wrapped} LoRA layer{'s' if wrapped > 1 else ''}" if wrapped else ""
        return f"<{type(value).__name__}{layers}>"
    if isinstance(value, os.PathLike):
        path = Path(value)
        return repr(f"…/{path.parent.name}/{path.name}")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = [
            f"{f.name}={getattr(value, f.name)!r}"
            for f in dataclasses.fields(value)
            if f.default is not dataclasses.MISSING and getattr(value, f.name) != f.default and f.name != "output_dir"
        ]
        return f"{type(value).__name__}({', '.join(changed)})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_call(call, args: tuple, kwargs: dict) -> str:
    """``load_lora(<TinyLlama with 14 LoRA layers>, '…/tmp/adapter')``: the call as a student would write it."""
    name = getattr(call, "__qualname__", None) or type(call).__name__
    parts = [describe_value(a) for a in args] + [f"{k}={describe_value(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def expect_refusal(
    call,
    *args,
    error: type[Exception] = ValueError,
    names: tuple[str, ...] = (),
    allowed: tuple[str, ...] = (),
    what: str = "",
    model: nn.Module | None = None,
    directory: str | os.PathLike | None = None,
    trainer=None,
    tensors: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> Exception:
    """``call(*args, **kwargs)`` must raise ``error`` whose message names each of ``names`` (whole words) and
    contains each of ``allowed``, and leave ``model``, the files under ``directory``, ``trainer`` and
    ``tensors`` exactly as they were (``Unchanged``). Every failure message shows the call as it was made
    (``what`` adds what it means). Returns the error."""
    __tracebackhide__ = True
    shown = describe_call(call, args, kwargs) + (f" ({what})" if what else "")
    expected = f"a {error.__name__}" + (f" naming {' and '.join(repr(n) for n in names)}" if names else "")
    before = Unchanged(model, directory, trainer, tensors)
    try:
        result = call(*args, **kwargs)
    except (NotImplementedError, ImportError):
        raise  # a stub or a file that does not import: the grader reports it as such
    except error as raised:
        message = str(raised)
        missing = [n for n in names if not re.search(word(n), message)] + [a for a in allowed if a not in message]
        if missing:
            raise AssertionError(
                f"{shown} raised {error.__name__}: {message!r}; the message must name {missing[0]!r}: say which "
                "argument is wrong and what is allowed"
            ) from None
        if changes := before.changes():
            raise AssertionError(
                f"{shown} raised {error.__name__} as it should, but first changed {'; '.join(changes[:3])}. A refusal "
                "leaves everything as it was: check everything first, then change"
            ) from None
        return raised
    except Exception as other:
        first = (str(other).strip().splitlines() or [""])[0][:200]
        raise AssertionError(
            f"{shown} must be refused with {expected}, but it raised {type(other).__name__}: {first}"
        ) from None
    raise AssertionError(f"{shown} must be refused with {expected}, but it returned {describe_value(result)}")


# ---- refusals that say what they passed (Stages 5–7) ------------------------------------------------


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
                f"{describe_call(call, args, kwargs)} raised {type(raised).__name__}: {raised}\n"
                f"but its message must name {pattern_text(match)}"
            ) from None
        return raised
    naming = f" naming {pattern_text(match)}" if match is not None else ""
    raise AssertionError(
        f"{describe_call(call, args, kwargs)} must raise {error.__name__}{naming}, but it returned without an error"
    )
