"""Real checkpoints and more than one process (given code, not graded): what lesson 08 promises.

- ``model/hf_checkpoint.py``: a Hugging Face Llama directory (single file or shards, grouped-query
  attention, tied embeddings, Llama 3.1 RoPE scaling) loads into TinyLlama and writes back, bit for
  bit; what it cannot represent is refused by name. The parity with transformers itself is shown by
  the dev-only ``solutions/tools/check_hf_checkpoint.py``.
- ``training/finetune.py`` and ``training/generate.py`` run end to end on a checkpoint and tokenizer
  made on the spot (``training/toy_checkpoint.py``; nothing is downloaded).
- ``training/distributed.py``: two torchrun processes (gloo) train as one process with the same
  global batch, and resume from a checkpoint bit for bit.
- Stage 6's memory estimate equals its measurement beyond the graded configs (grouped-query
  attention, tied embeddings, two layers): lesson 08's table of 1B / 7B / 70B rests on it.

These run Stages 1–4 (the memory test also Stage 6), in whichever implementation ``--impl`` /
LORA_IMPL selects; where those are still stubs the tests skip, saying so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testcases.helpers import generator

REPO = Path(__file__).resolve().parents[1]
NEEDS = range(1, 5)  # the stages these commands run


@pytest.fixture
def stages_done() -> None:
    from model._impl import missing_exercises

    if missing := missing_exercises(NEEDS):
        pytest.skip(f"needs Stages 1-4, where exercises {', '.join(missing[:4])}… are still stubs")


def small_config(**overrides):
    from model.tiny_llama import LlamaConfig

    settings = {"vocab_size": 40, "max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 48}
    return LlamaConfig(**{**settings, **overrides})


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # fmt: skip
CONFIGS = {
    "gqa": {"n_kv_heads": 2},
    "tied": {"tie_word_embeddings": True},
    "llama3-rope": {"rope_scaling": LLAMA3, "n_kv_heads": 1},
}


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """A command of the repository in a child process with this run's implementation (LORA_IMPL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


# ---- loading and writing checkpoints -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shard", [None, 6000])
def test_hf_checkpoint_round_trip(tmp_path, name, shard):
    """save_hf_checkpoint then load_hf_checkpoint gives the same model bit for bit (one file or shards + index)."""
    from model.hf_checkpoint import INDEX_NAME, load_hf_checkpoint, save_hf_checkpoint
    from model.tiny_llama import TinyLlama

    torch.manual_seed(0)
    model = TinyLlama(small_config(**CONFIGS[name])).eval()
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=shard)
    assert (tmp_path / INDEX_NAME).is_file() == (shard is not None), "shards come with an index, a single file without"
    loaded = load_hf_checkpoint(tmp_path)
    ids = torch.randint(0, 40, (2, 40), generator=generator(1))
    assert torch.equal(loaded(ids), model(ids)), f"{name}: the loaded model must compute exactly the saved one"
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight, "a tied head stays tied after loading"
    assert loaded.config == model.config, f"config.json must carry the whole config: {loaded.config} vs {model.config}"


def test_bf16_loading_casts_once(tmp_path):
    """dtype=bfloat16 gives bf16 parameters equal to the fp32 ones rounded to bf16."""
    from model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from model.tiny_llama import TinyLlama

    model = TinyLlama(small_config(n_kv_heads=2))
    save_hf_checkpoint(model, tmp_path)
    loaded = load_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.bfloat16, f"{name} is {param.dtype}"
        assert torch.equal(param, model.get_parameter(name).to(torch.bfloat16)), f"{name} is not the bf16 rounding"


def test_grouped_query_attention_is_shared_heads():
    """With n_kv_heads = 2 of 4, the model equals a 4-head model whose k/v heads are the 2 repeated (h0 h0 h1 h1)."""
    from model.tiny_llama import TinyLlama

    torch.manual_seed(2)
    gqa = TinyLlama(small_config(n_kv_heads=2)).double().eval()
    full = TinyLlama(small_config()).double().eval()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[key].view(2, 8, 32)  # (kv heads, hd, C)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(32, 32)
    full.load_state_dict(state)
    ids = torch.randint(0, 40, (2, 12), generator=generator(3))
    torch.testing.assert_close(gqa(ids), full(ids), rtol=0, atol=1e-12)


def test_llama3_rope_frequencies():
    """llama3_frequencies: long wavelengths ÷ factor, short ones kept, a linear blend in between (Llama 3.1)."""
    from model.tiny_llama import llama3_frequencies

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).double() / 64))
    out = llama3_frequencies(inv_freq, LLAMA3)
    for f, g in zip(inv_freq.tolist(), out.tolist(), strict=True):
        wavelength = 2 * math.pi / f
        if wavelength < 16 / 4:
            expected = f
        elif wavelength > 16 / 1:
            expected = f / 8
        else:
            smooth = (16 / wavelength - 1) / (4 - 1)
            expected = (1 - smooth) * f / 8 + smooth * f
        assert g == pytest.approx(expected, rel=1e-12), f"wavelength {wavelength:.3g}: expected {expected}, got {g}"


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"model_type": "gpt2"}, "UnsupportedCheckpoint", "model_type"),
        ({"attention_bias": True}, "UnsupportedCheckpoint", "attention_bias"),
        ({"hidden_act": "gelu"}, "UnsupportedCheckpoint", "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "UnsupportedCheckpoint", "yarn"),
        ({"num_hidden_layers": 3}, "ValueError", "missing"),
        ({"intermediate_size": 50}, "ValueError", "shape"),
    ],
)
def test_unsupported_or_inconsistent_checkpoints_are_refused(tmp_path, change, error, words):
    """A config the model cannot represent, or weights that do not fit it, is refused with the reason named."""
    from model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from model.tiny_llama import TinyLlama

    save_hf_checkpoint(TinyLlama(small_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=words) as info:
        load_hf_checkpoint(tmp_path)
    assert type(info.value).__name__ == error, f"expected {error}, got {type(info.value).__name__}: {info.value}"


def test_missing_files_are_named(tmp_path):
    """No config.json, or no safetensors (only pytorch_model.bin), or a missing shard: FileNotFoundError naming it."""
    from model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from model.tiny_llama import TinyLlama

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    save_hf_checkpoint(TinyLlama(small_config()), tmp_path, max_shard_bytes=6000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_checkpoint(tmp_path)
    for path in tmp_path.glob("model*"):
        path.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(tmp_path)


# ---- data for instruction tuning -------------------------------------------------------------------


def test_instruction_data_masks_the_prompt(tmp_path):
    """Labels are the next token on response tokens (and EOS) only; padding and prompt are −100; packing fills rows."""
    from training.data import IGNORE_INDEX
    from training.finetune import build_dataset, encode_record, load_tokenizer, read_records, special_token_ids
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=12)
    tokenizer = load_tokenizer(tmp_path / "model")
    bos, eos = special_token_ids(tmp_path / "model", tokenizer)
    records = read_records(tmp_path / "data.jsonl")
    sequences = [encode_record(r, tokenizer, bos, eos) for r in records]
    ids, scored = sequences[0]
    assert ids[0] == bos and ids[-1] == eos and scored[-1] and not scored[0], "BOS … EOS, only the response scored"
    response = tokenizer.decode([t for t, s in zip(ids, scored, strict=True) if s and t != eos])
    assert response.strip() == records[0]["output"], f"the scored tokens spell the output: {response!r}"
    data = build_dataset(sequences, max_length=64, pad=eos)
    x, y = data["input_ids"][0], data["labels"][0]
    n = len(ids) - 1
    assert torch.equal(x[:n], torch.tensor(ids[:-1])), "input_ids: the sequence without its last token"
    expected = torch.where(torch.tensor(scored[1:]), torch.tensor(ids[1:]), IGNORE_INDEX)
    assert torch.equal(y[:n], expected) and (y[n:] == IGNORE_INDEX).all(), "labels[t] = token t+1 on the response only"
    packed = build_dataset(sequences, max_length=16, pad=eos, packing=True)
    assert packed["input_ids"].shape[1] == 16 and (packed["input_ids"] != eos).any(), "packed rows are full rows"


def test_bad_records_name_their_line(tmp_path):
    """A record without "output" (or not JSON) is refused with its file and line number."""
    from training.finetune import read_records

    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2.*output"):
        read_records(path)
    path.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2"):
        read_records(path)


# ---- the commands end to end ------------------------------------------------------------------------


@pytest.mark.timeout(600)  # child processes (torch imports, torchrun) on a possibly busy machine
def test_finetune_and_generate_end_to_end(tmp_path, stages_done):
    """make finetune's module on a sharded toy checkpoint: the loss falls, the adapter has HF names and loads back."""
    from safetensors.torch import load_file

    from model.hf_checkpoint import load_hf_adapter, load_hf_checkpoint
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=64, sharded=True)
    model_dir, out = tmp_path / "model", tmp_path / "run"
    result = run([sys.executable, "-m", "training.finetune", "--model", str(model_dir), "--data", str(tmp_path / "data.jsonl"),
                  "--output-dir", str(out), "--max-steps", "12", "--batch-size", "8", "--learning-rate", "1e-2",
                  "--save-every", "6", "--progress", "false", "--max-length", "48"])  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("eval loss"))
    before, after = (float(v) for v in line.split(",")[0].removeprefix("eval loss ").split(" -> "))
    assert after < before, f"12 steps must lower the eval loss of a random model: {line}"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve()) and config["task_type"] == "CAUSAL_LM"
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys), (
        f"PEFT names the HF model's modules: base_model.model.model.layers…, got {sorted(keys)[:2]}"
    )
    model = load_hf_adapter(load_hf_checkpoint(model_dir), out / "adapter")
    assert any(name.endswith("lora_B") and p.abs().sum() > 0 for name, p in model.named_parameters()), (
        "the loaded adapter holds the trained (non-zero) B"
    )
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file(), "checkpoint and metrics written"
    args = [sys.executable, "-m", "training.generate", "--model", str(model_dir), "--prompt", "Reverse the digits.",
            "--input", "1 2 3", "--max-new-tokens", "5"]  # fmt: skip
    first, second = run(args).stdout, run([*args, "--adapter", str(out / "adapter")]).stdout
    assert "### Response:" in first and "### Response:" in second, "the prompt is printed in the instruction format"
    assert run(args).stdout == first, "greedy decoding is deterministic"
    ddp = tmp_path / "ddp"
    torchrun_args = ["--model", str(model_dir), "--data", str(tmp_path / "data.jsonl"), "--output-dir", str(ddp),
                     "--max-steps", "3", "--batch-size", "8", "--progress", "false", "--max-length", "48"]  # fmt: skip
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "training.finetune", *torchrun_args]
    )
    assert "2 processes" in result.stdout and result.stdout.count("eval loss") == 1, (
        "under torchrun rank 0 reports, once"
    )
    assert (ddp / "adapter" / "adapter_model.safetensors").is_file(), "rank 0 writes the adapter under torchrun"


# ---- more than one process ------------------------------------------------------------------------


def ddp_args(out: Path, *extra: str) -> list[str]:
    return ["--batch-size", "16", "--max-steps", "4", "--progress", "false", "--output-dir", str(out), *extra]


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "-m", "training.distributed", *args]
    )


@pytest.mark.timeout(600)  # child processes (torch imports, torchrun) on a possibly busy machine
def test_two_processes_train_as_one(tmp_path, stages_done):
    """torchrun with 2 gloo processes = one process with the same global batch (float64: max |Δθ| ≤ 1e-10)."""
    from safetensors.torch import load_file

    from training.distributed import build, parse_args, write_result
    from training.qlora_trainer import QLoRATrainer

    args = ddp_args(tmp_path / "ddp", "--quantize", "none", "--float64", "--result", str(tmp_path / "ddp.safetensors"))
    torchrun(2, args)
    single = build(parse_args(ddp_args(tmp_path / "one", "--quantize", "none", "--float64")), QLoRATrainer)
    single.train()
    write_result(single, tmp_path / "one.safetensors")
    two, one = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert sorted(two) == sorted(one), "the same trainable parameters, without DDP's 'module.' prefix"
    # Exact arithmetic gives equality: the two processes' gradients average to the single process's
    # (equal numbers of labelled tokens per share). float64 rounding (u = 1.1e-16) in the sums, the
    # all-reduce and four Adam steps (|update| ≤ lr = 3e-3 each) stays below 1e-13 here (measured
    # 2e-14); 1e-10 leaves room and is still 10⁷ times smaller than one step of a wrong gradient.
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst <= 1e-10, f"2 processes and 1 process disagree by {worst:.3g} after 4 steps"
    losses = [json.loads(Path(str(tmp_path / f"{n}.safetensors.json")).read_text())["losses"] for n in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-12), f"the logged loss is the global mean: {losses}"


@pytest.mark.timeout(600)  # child processes (torch imports, torchrun) on a possibly busy machine
def test_two_processes_resume_bit_for_bit(tmp_path, stages_done):
    """A 2-process QLoRA run stopped after 2 of 4 steps and resumed equals the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(2, ddp_args(whole, "--result", str(tmp_path / "whole.safetensors")))
    torchrun(2, ddp_args(parts, "--stop-after", "2", "--save-every", "2"))
    torchrun(2, ddp_args(parts, "--resume", "--result", str(tmp_path / "parts.safetensors")))
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "parts.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must continue exactly where the first stopped"
    assert (parts / "adapter" / "adapter_config.json").is_file(), "rank 0 writes the adapter"
    lines = (parts / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "only rank 0 logs: no line twice"


# ---- memory at real sizes --------------------------------------------------------------------------

MEMORY_CELLS = [(m, p, c) for m in ("full", "lora", "qlora") for p in ("fp32", "bf16") for c in (False, True)]


@pytest.mark.parametrize("shape, overrides", [("bundled", {"n_kv_heads": 2, "tie_word_embeddings": True}),
                                              ("bundled", {"n_kv_heads": 1}),
                                              ("wide", {"n_kv_heads": 2, "tie_word_embeddings": True}),
                                              ("bundled", {"n_layers": 2})],
                         ids=["bundled-gqa2-tied", "bundled-gqa1", "wide-gqa2-tied", "bundled-2-layers"])  # fmt: skip
def test_memory_estimate_equals_measurement_beyond_the_graded_configs(shape, overrides):
    """Stage 6's estimate_memory_parts = measure_memory, part by part and to the byte, in all 12 cells, on
    grouped-query and tied variants of the bundled shape and of wide_config() (lesson 08 §1.5's table rests
    on it) and on a 2-layer model (where a freed block input's address once hid a saved tensor)."""
    import dataclasses

    from model._impl import missing_exercises
    from model.tiny_llama import TinyLlama, load_base_model

    if missing := missing_exercises([1, 2, 3, 4, 6]):
        pytest.skip(f"needs Stages 1-4 and 6, where exercises {', '.join(missing[:4])}… are still stubs")
    from training import memory
    from training.qlora_trainer import prepare_qlora_model

    base = load_base_model().config if shape == "bundled" else memory.wide_config()
    config = dataclasses.replace(base, **overrides)
    wrong = []
    for method, precision, checkpointing in MEMORY_CELLS:
        settings = memory.MemoryConfig(quantize="nf4" if method == "qlora" else "none", precision=precision,
                                       gradient_checkpointing=checkpointing, optimizer="adamw", min_8bit_size=0,
                                       device="cpu", r=8, progress=False)  # fmt: skip
        model = TinyLlama(config)  # random weights: bytes do not depend on values
        if method == "full":
            model.gradient_checkpointing = checkpointing
        else:
            model = prepare_qlora_model(model, settings)
        ids = torch.randint(0, config.vocab_size, (3, 19), generator=generator(0))
        measured = memory.measure_memory(model, (ids, ids.clone()), settings)
        estimated = memory.estimate_memory_parts(config, method, "adamw", 3, 19, precision, checkpointing, 8, 0)
        off = {part: f"measured {measured[part]:,}, estimated {value:,}" for part, value in estimated.items()
               if measured[part] != value}  # fmt: skip
        if off:
            wrong.append(f"{method}, {precision}, checkpointing={checkpointing}: {off}")
    assert not wrong, (
        f"{config.n_layers} layers, {config.kv_heads} key/value heads of {config.n_heads}, "
        f"tied={config.tie_word_embeddings}: the estimate misses the measurement in these cells (k_proj / v_proj "
        "are (kv_heads · head_dim, d); a tied head is the embedding, counted once; largest_block_recompute "
        "holds the blocks' inputs until it counts):\n" + "\n".join(wrong)
    )
