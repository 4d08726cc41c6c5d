"""Fixtures shared by every stage's tests; the grading plugin is registered here.

Student modules are reached through fixtures (``lora``, ``quant``, ``trainer``), never imported at
the top of a test module: the plugin imports them once before the first test, and a file that does
not import fails the tests that need it, with one line naming the file and the error.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch
from torch import nn

from testcases.manifest import student_modules

pytest_plugins = ["testcases.plugin"]

DEVICES = ["cpu", "cuda"]


def student_fixture(module: str):
    """A fixture returning the student module ``module`` (``model.lora``, ...) as the switch loads it."""

    @pytest.fixture(name=module.rsplit(".", 1)[-1])
    def fixture() -> ModuleType:
        return importlib.import_module(module)

    return fixture


# One fixture per student file in the manifest, named after the file: lora, quant, qlora_trainer, ...
for _module in student_modules():
    globals()[f"_student_{_module.replace('.', '_')}"] = student_fixture(_module)


@pytest.fixture
def trainer(qlora_trainer) -> ModuleType:
    """The Stage 4 student module under its short name."""
    return qlora_trainer


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """cpu always; cuda only where a GPU is present (the skip says so, visibly)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine: the CUDA case runs where a GPU is present")
    return torch.device(request.param)


def tiny_config(**overrides):
    from model.tiny_llama import LlamaConfig

    settings = {"vocab_size": 18, "max_seq_len": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}
    return LlamaConfig(**{**settings, **overrides})


@pytest.fixture
def tiny_model() -> nn.Module:
    """A randomly initialised TinyLlama small enough for a unit test (2 layers, width 16, no biases)."""
    from model.tiny_llama import TinyLlama

    return TinyLlama(tiny_config()).eval()


@pytest.fixture
def tiny_model64(tiny_model) -> nn.Module:
    """The same model in float64, for comparing two evaluations of a network (tolerances.py)."""
    return tiny_model.double()


@pytest.fixture
def wide_model() -> nn.Module:
    """A TinyLlama whose layers span many NF4 blocks (36–75 per layer) and more than one DQ block."""
    from model.tiny_llama import TinyLlama

    return TinyLlama(tiny_config(d_model=48, d_ff=100, n_heads=2)).eval()


@pytest.fixture
def biased_model() -> nn.Module:
    """A SwiGLU block whose linear layers HAVE biases and partial last NF4 blocks (see helpers.BiasedMLP)."""
    from testcases.helpers import BiasedMLP

    return BiasedMLP().eval()


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A (2, 10) batch of token ids for tiny_model."""
    from testcases.helpers import generator

    return torch.randint(0, 18, (2, 10), generator=generator(1))


@pytest.fixture(scope="session")
def golden():
    """Golden vectors made by bitsandbytes 0.50.2 (solutions/tools/make_nf4_golden.py made them), each key read
    under the rule testcases/tolerances.py names for it (FIXTURE_RULES), a fresh copy per read."""
    from testcases.tolerances import fixture

    return fixture("nf4_golden.safetensors")


@pytest.fixture
def task_data() -> dict[str, torch.Tensor]:
    """64 examples of the fine-tuning task, {"input_ids", "labels"} of shape (64, 19)."""
    from training.data import finetune_data

    return finetune_data("train", n=64)
