"""Shared fixtures for the graded suites, and the grading plugin's hooks.

Student modules are imported inside fixtures, never at the top of a test file, so a file that
does not import (a syntax error, say) costs the tests that need it, not the whole run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

from model._impl import implementation_file
from testcases.grading import *  # noqa: F403  (the plugin's hooks)

DEVICES = ["cpu", "cuda"]


def import_student(name: str) -> ModuleType:
    """Import ``model.lora`` / ``model.quant`` / ``training.qlora_trainer`` under the switch."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # a syntax error, a bad import, ...: fail this test, not the run
        pytest.fail(
            f"{implementation_file(name)} could not be imported: {type(error).__name__}: {error}", pytrace=False
        )


@pytest.fixture
def lora() -> ModuleType:
    return import_student("model.lora")


@pytest.fixture
def quant() -> ModuleType:
    return import_student("model.quant")


@pytest.fixture
def trainer() -> ModuleType:
    return import_student("training.qlora_trainer")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """cpu always; cuda only where a GPU is present (the skip says so, visibly)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine: the CUDA case runs where a GPU is present")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _torch_state():
    """Seed every test with 0 and put global torch state back afterwards."""
    saved = (
        torch.get_rng_state(),
        torch.get_default_dtype(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
    )
    torch.manual_seed(0)
    yield
    rng, dtype, threads, grad, deterministic = saved
    torch.set_rng_state(rng)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def tiny_model():
    """A randomly initialised TinyLlama small enough for a unit test (2 layers, width 16)."""
    from model.tiny_llama import LlamaConfig, TinyLlama

    config = LlamaConfig(vocab_size=18, max_seq_len=32, d_model=16, n_layers=2, n_heads=2, d_ff=32)
    return TinyLlama(config).eval()


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A (2, 10) batch of token ids for tiny_model."""
    return torch.randint(0, 18, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    """Golden vectors made by bitsandbytes 0.50.2 (testcases/fixtures/make_nf4_golden.py made them)."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(Path(__file__).parent / "fixtures" / "nf4_golden.safetensors")


@pytest.fixture
def task_data() -> dict[str, torch.Tensor]:
    """64 examples of the fine-tuning task, {"input_ids", "labels"} of shape (64, 19)."""
    from training.data import finetune_data

    return finetune_data("train", n=64)
