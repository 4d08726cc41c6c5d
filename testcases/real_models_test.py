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

from testcases.helpers import generator, seed

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
def test_finetune_and_generate_end_to_end(tmp_path, stages_done, capsys):
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
    from training.generate import main as generate

    first = run(args).stdout  # the command itself; then its main() in this process (one torch import less each)
    capsys.readouterr()
    generate([*args[3:], "--adapter", str(out / "adapter")])
    second = capsys.readouterr().out
    assert "### Response:" in first and "### Response:" in second, "the prompt is printed in the instruction format"
    generate(args[3:])
    assert capsys.readouterr().out == first, "greedy decoding is deterministic (here and in its own process)"
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


def launch(module: str, args: list[str], n: int = 2) -> str:
    """``python -m <module>`` in n processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT in the environment), without torchrun's own process: one torch import less per launch
    (test_finetune_and_generate_end_to_end goes through torchrun itself). Returns rank 0's output."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous (gloo's TCP store on rank 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}  # fmt: skip
    command = [sys.executable, "-m", module, *args]
    ranks = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for r in range(n)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    for r, (rank, (out, err)) in enumerate(zip(ranks, outputs, strict=True)):
        assert rank.returncode == 0, f"rank {r} of {' '.join(command)} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return outputs[0][0]


@pytest.mark.timeout(600)  # child processes (torch imports) on a possibly busy machine
def test_two_processes_train_as_one(tmp_path, stages_done):
    """torchrun with 2 gloo processes = one process with the same global batch (float64: max |Δθ| ≤ 1e-10)."""
    from safetensors.torch import load_file

    from training.distributed import build, parse_args, write_result
    from training.qlora_trainer import QLoRATrainer

    args = ddp_args(tmp_path / "ddp", "--quantize", "none", "--float64", "--result", str(tmp_path / "ddp.safetensors"))
    launch("training.distributed", args)
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


@pytest.mark.timeout(600)  # child processes (torch imports) on a possibly busy machine
def test_two_processes_resume_bit_for_bit(tmp_path, stages_done):
    """A 2-process QLoRA run stopped after 2 of 4 steps and resumed equals the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch("training.distributed", ddp_args(whole, "--result", str(tmp_path / "whole.safetensors")))
    launch("training.distributed", ddp_args(parts, "--stop-after", "2", "--save-every", "2"))
    launch("training.distributed", ddp_args(parts, "--resume", "--result", str(tmp_path / "parts.safetensors")))
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "parts.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must continue exactly where the first stopped"
    assert (parts / "adapter" / "adapter_config.json").is_file(), "rank 0 writes the adapter"
    lines = (parts / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "only rank 0 logs: no line twice"


# ---- memory at real sizes --------------------------------------------------------------------------

MEMORY_CELLS = [(m, p, c, "fp32") for m in ("full", "lora", "qlora") for p in ("fp32", "bf16") for c in (False, True)]
MEMORY_CELLS += [("lora", "bf16", c, "bf16") for c in (False, True)]  # TrainConfig.base_dtype: the base in bf16


@pytest.mark.timeout(600)  # 14 measured training steps of a 25 M-parameter model (about 50 s alone on 2 cores)
@pytest.mark.parametrize("shape, overrides", [("bundled", {"n_kv_heads": 2, "tie_word_embeddings": True}),
                                              ("bundled", {"n_kv_heads": 1}),
                                              ("wide", {"n_kv_heads": 2, "tie_word_embeddings": True}),
                                              ("bundled", {"n_layers": 2})],
                         ids=["bundled-gqa2-tied", "bundled-gqa1", "wide-gqa2-tied", "bundled-2-layers"])  # fmt: skip
def test_memory_estimate_equals_measurement_beyond_the_graded_configs(shape, overrides):
    """Stage 6's estimate_memory_parts = measure_memory, part by part and to the byte, in all 14 cells (12, and LoRA
    in bf16 with its base stored in bf16), on
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
    wrong, activations = [], {}
    for method, precision, checkpointing, base_dtype in MEMORY_CELLS:
        settings = memory.MemoryConfig(quantize="nf4" if method == "qlora" else "none", precision=precision,
                                       gradient_checkpointing=checkpointing, optimizer="adamw", min_8bit_size=0,
                                       device="cpu", r=8, progress=False, base_dtype=base_dtype)  # fmt: skip
        model = TinyLlama(config)  # random weights: bytes do not depend on values
        if method == "full":
            model.gradient_checkpointing = checkpointing
        else:
            model = prepare_qlora_model(model, settings)
        ids = torch.randint(0, config.vocab_size, (3, 19), generator=generator(0))
        measured = memory.measure_memory(model, (ids, ids.clone()), settings)
        activations[method, precision, checkpointing, base_dtype] = measured["activations"]
        estimated = memory.estimate_memory_parts(
            config, method, "adamw", 3, 19, precision, checkpointing, 8, 0, base_dtype
        )
        off = {part: f"measured {measured[part]:,}, estimated {value:,}" for part, value in estimated.items()
               if measured[part] != value}  # fmt: skip
        if off:
            wrong.append(f"{method}, {precision}, checkpointing={checkpointing}, base {base_dtype}: {off}")
    assert not wrong, (
        f"{config.n_layers} layers, {config.kv_heads} key/value heads of {config.n_heads}, "
        f"tied={config.tie_word_embeddings}: the estimate misses the measurement in these cells (k_proj / v_proj "
        "are (kv_heads · head_dim, d); a tied head is the embedding, counted once; largest_block_recompute "
        "holds the blocks' inputs until it counts):\n" + "\n".join(wrong)
    )
    for checkpointing in (False, True):  # issue 20: the 4-bit layers keep no dequantized weight for backward
        for precision, base in (("fp32", "fp32"), ("bf16", "bf16")):
            qlora = activations["qlora", precision, checkpointing, "fp32"]
            lora = activations["lora", precision, checkpointing, base]
            assert qlora <= lora, (
                f"{precision}, checkpointing={checkpointing}: QLoRA saves {qlora:,} bytes of activations, LoRA "
                f"(base in {base}) {lora:,}: NF4Linear must not keep a dequantized weight for the backward pass"
            )


@pytest.mark.timeout(300)  # three measured steps of a 25 M-parameter model on a possibly busy machine
@pytest.mark.parametrize("shape, overrides", [("bundled", {}), ("wide", {"n_kv_heads": 2, "tie_word_embeddings": True})],
                         ids=["bundled", "wide-gqa2-tied"])  # fmt: skip
def test_stage4_estimate_within_its_scope(shape, overrides):
    """Stage 4's estimate_memory against measure_memory, within the scope its docstring states: full fine-tuning exact
    (+ 4 B per step tensor); LoRA on a bf16 base exact for the projections (+ the fp32 rest); QLoRA within 4 to 9.5 B
    per NF4 layer (+ the fp32 rest). Stage 6's estimate_memory_parts is exact on all of it (the test above)."""
    import dataclasses

    from model._impl import missing_exercises
    from model.tiny_llama import TinyLlama, load_base_model

    if missing := missing_exercises([1, 2, 3, 4, 6]):
        pytest.skip(f"needs Stages 1-4 and 6, where exercises {', '.join(missing[:4])}… are still stubs")
    from training import memory
    from training.qlora_trainer import estimate_memory, prepare_qlora_model

    base = load_base_model().config if shape == "bundled" else memory.wide_config()
    config = dataclasses.replace(base, **overrides)
    every = sum(memory.trainable_numels(config, "full"))
    projections = sum(out * inp for out, inp in memory.projection_shapes(config).values()) * config.n_layers
    rest, layers = every - projections, 7 * config.n_layers
    adapters = memory.trainable_numels(config, "lora", 8)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=generator(0))
    for method, precision, base_dtype in (
        ("full", "fp32", "fp32"),
        ("lora", "bf16", "bf16"),
        ("qlora", "bf16", "fp32"),
    ):
        settings = memory.MemoryConfig(quantize="nf4" if method == "qlora" else "none", precision=precision,
                                       base_dtype=base_dtype, optimizer="adamw", device="cpu", r=8, progress=False)  # fmt: skip
        model = TinyLlama(config)
        if method != "full":
            model = prepare_qlora_model(model, settings)
        measured = memory.measure_memory(model, (ids, ids.clone()), settings)
        tensors = memory.trainable_numels(config, method, 8)
        if method == "full":
            stage4 = estimate_memory(every, "full")
        else:
            stage4 = estimate_memory(projections, method, trainable_params=sum(adapters))
        assert measured["gradients"] == stage4["gradients"], (
            f"{method}: gradients {measured['gradients']:,} vs {stage4}"
        )
        assert measured["optimizer"] == stage4["optimizer"] + 4 * len(tensors), (
            f"{method}: optimizer {measured['optimizer']:,} = 8 B per trainable parameter + 4 B per step tensor"
        )
        extra = measured["weights"] - stage4["weights"] - (0 if method == "full" else 4 * rest)
        allowed = (4 * layers, 9.5 * layers) if method == "qlora" else (0, 0)
        assert allowed[0] <= extra <= allowed[1], (
            f"{method}: measured weights {measured['weights']:,}, Stage 4's estimate {stage4['weights']:,.0f} "
            f"+ 4 B per fp32 parameter outside the projections: {extra:,.1f} bytes apart, the docstring allows {allowed}"
        )


# ---- generation with a KV cache --------------------------------------------------------------------------

PROMPT_LENGTHS = (9, 4, 7)  # a batch of prompts of different lengths: rows 1 and 2 are padded on the left


def batch_of_prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 4) -> list[list[int]]:
    g = generator(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def cached_logits(model, prompts: list[list[int]], continuation: torch.Tensor):
    """(logits (B, T + n, V), the cache): the left-padded prompts in one prefill, then the continuation one token
    per call."""
    from model.tiny_llama import KVCache
    from training.generate import left_pad

    ids, mask = left_pad(prompts, torch.device("cpu"))
    B, T = ids.shape
    n = continuation.shape[1]
    cache = KVCache(model.config, B, T + n)
    with torch.no_grad():
        steps = [model(ids, cache=cache, attention_mask=mask)]
        for j in range(n):
            mask = None if mask is None else torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # None: nothing padded
            steps.append(model(continuation[:, j : j + 1], cache=cache, attention_mask=mask))
    assert cache.length == T + n, f"the cache holds {cache.length} positions after {T} + {n} tokens"
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_the_full_recomputation(name):
    """A left-padded batch, prefilled once then fed one token per call through the KV cache, gives every real
    position the logits of the plain forward pass of its row alone, and caches the keys (rotated at the row's
    own positions: 0 at its first real token) that the row alone caches (float64, NETWORK_RTOL)."""
    from model.tiny_llama import TinyLlama
    from testcases.tolerances import assert_network_close

    seed(5)
    model = TinyLlama(small_config(**CONFIGS[name])).double().eval()
    prompts = batch_of_prompts(40)
    continuation = torch.randint(0, 40, (3, 6), generator=generator(6))
    logits, cache = cached_logits(model, prompts, continuation)
    T = max(PROMPT_LENGTHS)
    for b, prompt in enumerate(prompts):
        pads = T - len(prompt)
        with torch.no_grad():
            alone = model(torch.tensor([prompt + continuation[b].tolist()]))[0]  # the original forward, no padding
        assert_network_close(
            logits[b, pads:], alone, f"{name}, row {b} ({pads} pads on the left)",
            hint="cached keys are rotated at their own positions; no query sees a pad key",
        )  # fmt: skip
        _, own = cached_logits(model, [prompt], continuation[b : b + 1])
        # RoPE scores depend on position differences only, so logits cannot see a shifted row; cached keys can
        assert_network_close(
            cache.keys[:, b, :, pads:], own.keys[:, 0], f"{name}, row {b}: cached keys",
            hint="a left-padded row's positions count its real tokens only (attention_mask.cumsum - 1)",
        )  # fmt: skip


def test_cached_logits_in_fp32_within_the_derived_bound():
    """In float32 the cached and plain evaluations differ by rounding only: within 64 × the plain fp32
    evaluation's own distance from float64 (tolerances.fp32_network_bound), left-padded rows included."""
    from model.tiny_llama import TinyLlama
    from testcases.tolerances import assert_close, fp32_network_bound

    seed(7)
    model = TinyLlama(small_config(n_kv_heads=2)).eval()
    double = TinyLlama(small_config(n_kv_heads=2)).double().eval()
    double.load_state_dict(model.state_dict())
    prompts = batch_of_prompts(40)
    continuation = torch.randint(0, 40, (3, 6), generator=generator(8))
    logits, _ = cached_logits(model, prompts, continuation)
    T = max(PROMPT_LENGTHS)
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + continuation[b].tolist()])
        with torch.no_grad():
            plain32, plain64 = model(ids)[0], double(ids)[0]
        bound = fp32_network_bound(plain32, plain64)
        assert_close(logits[b, T - len(prompt) :], plain64, f"fp32 cached logits, row {b}", bound=bound)


def greedy_reference(model, prompt: list[int], n: int, bound: float) -> tuple[list[int], int]:
    """(n greedy tokens by the plain forward, no cache; how many of them no rounding within ``bound`` can flip)."""
    ids, safe = list(prompt), None
    for step in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        top = logits.topk(2).values
        if safe is None and (top[0] - top[1]).item() <= 2 * bound:
            safe = step  # a near tie: another evaluation order may pick the other token from here on
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], n if safe is None else safe


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_equals_each_prompt_alone(use_cache):
    """generate() on a left-padded batch, with or without the cache, gives every row the greedy tokens of its
    prompt decoded alone by the plain forward (float64; compared up to any near tie within the rounding bound)."""
    from model.tiny_llama import TinyLlama
    from testcases.tolerances import NETWORK_RTOL
    from training.generate import generate

    seed(9)
    model = TinyLlama(small_config(n_kv_heads=2, tie_word_embeddings=True)).double().eval()
    with torch.no_grad():  # a random model at init has logits near 0: widen them so that greedy is not all ties
        model.embed_tokens.weight.mul_(20)
    prompts = batch_of_prompts(40)
    out = generate(model, prompts, eos=None, max_new_tokens=12, use_cache=use_cache)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            scale = model(torch.tensor([prompt])).abs().max().item() + 1.0
        expected, safe = greedy_reference(model, prompt, 12, NETWORK_RTOL * scale)
        assert len(out[b]) == 12, f"row {b}: 12 new tokens expected without an EOS, got {len(out[b])}"
        assert out[b][:safe] == expected[:safe], (
            f"row {b} ({'cached' if use_cache else 'recomputed'}): {out[b]} instead of {expected} "
            f"(the first {safe} tokens cannot flip by rounding)"
        )
        assert safe >= 6, f"row {b}: a near tie after {safe} tokens leaves too little to compare (another seed?)"


def test_generation_stops_at_eos_stop_strings_and_the_limits():
    """A row ends at EOS (not returned) or once its text holds a stop string; the rest go on; nothing is
    generated past max_new_tokens or max_seq_len."""
    from model.tiny_llama import TinyLlama
    from training.generate import generate

    seed(10)
    model = TinyLlama(small_config(max_seq_len=20)).double().eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(20)
    prompts = batch_of_prompts(40, lengths=(5, 3))
    free = generate(model, prompts, eos=None, max_new_tokens=10)
    eos = free[1][3]  # the token row 1 meets at its 4th step
    stopped = generate(model, prompts, eos=eos, max_new_tokens=10)
    for b in range(2):
        cut = free[b].index(eos) if eos in free[b] else 10
        assert stopped[b] == free[b][:cut], f"row {b} stops right before its first EOS: {stopped[b]} vs {free[b]}"
    letters = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)  # noqa: E731  a decode for the test
    stop = letters(free[0][2:4])
    texts = [letters(r) for r in generate(model, prompts, None, 10, stop_strings=[stop], decode=letters)]
    for b, text in enumerate(texts):
        full = letters(free[b])
        end = full.index(stop) + len(stop) if stop in full else len(full)
        assert text == full[:end], f"row {b}: {text!r} should end with the token completing {stop!r} ({full!r})"
    assert len(generate(model, [[1] * 17], None, 10)[0]) == 3, "a 17-token prompt leaves 3 of max_seq_len=20"


def test_text_stream_releases_only_final_text():
    """TextStream holds back what may still change (a split UTF-8 character, a possible start of a stop string)
    and cuts the text at the stop string."""
    from training.generate import TextStream

    pieces = ["He", "llo <", "|en", "d|> tail"]
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop_strings=["<|end|>"])
    released = [stream.push(i) for i in range(4)]
    assert released == ["He", "llo ", "", ""] and stream.stopped and stream.text == "Hello ", (
        f"released {released}, text {stream.text!r}: '<' and '<|en' could begin the stop string"
    )
    partial = TextStream(lambda ids: "é"[: len(ids)] if len(ids) > 1 else "\ufffd")
    assert partial.push(0) == "" and partial.push(1) == "é", "a character split across tokens waits for its bytes"


def test_sampling_keeps_top_k_and_the_nucleus():
    """sampling_weights: temperature-scaled softmax on the top-k tokens, then the smallest prefix (by
    probability) whose mass reaches top_p; draws come from that set only, and a seed repeats them."""
    from training.generate import Sampling, generate, sampling_weights

    logits = torch.randn(4, 50, generator=generator(11), dtype=torch.float64) * 3
    weights = sampling_weights(logits, Sampling(temperature=0.7, top_k=10))
    exact = torch.softmax(logits / 0.7, dim=-1)
    top = exact.topk(10, dim=-1).indices
    kept = torch.zeros_like(exact, dtype=torch.bool).scatter(-1, top, True)
    assert torch.equal(weights > 0, kept), "top-k keeps exactly the k largest logits"
    expected = torch.where(kept, exact, 0.0)
    expected = expected / expected.sum(-1, keepdim=True)
    # fp32: a division, an exp, a sum of 10 terms and a division per value, each ≤ u relative: far below 64 u
    worst = (weights.double() - expected).abs().max().item()
    assert worst <= 64 * 2.0**-24, f"softmax over the top-k at T=0.7: off by {worst:.2e}"
    nucleus = sampling_weights(logits, Sampling(temperature=1.0, top_p=0.8))
    for row, probs in zip(nucleus, torch.softmax(logits, -1), strict=True):
        order = probs.argsort(descending=True)
        n = int((row > 0).sum())
        mass = probs[order[:n]].sum().item()
        assert mass >= 0.8 - 1e-6 and probs[order[: n - 1]].sum().item() < 0.8 + 1e-6, (
            f"the nucleus is the smallest prefix reaching 0.8: {n} tokens hold {mass:.4f}"
        )
    from model.tiny_llama import TinyLlama

    seed(12)
    model = TinyLlama(small_config()).eval()
    sampling = Sampling(temperature=1.0, top_k=3, seed=5)
    first = generate(model, [[1, 2, 3]], None, 8, sampling)
    assert generate(model, [[1, 2, 3]], None, 8, sampling) == first, "the same seed draws the same tokens"
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)


def test_kv_cache_memory_per_token():
    """2 · layers · kv_heads · head_dim · bytes per token: the cache allocates exactly that, and lesson 08's
    numbers for its checkpoints follow from their configs."""
    from model.tiny_llama import KVCache, LlamaConfig, TinyLlama

    model = TinyLlama(small_config(n_kv_heads=2)).eval()
    cache = KVCache(model.config, 3, 20)
    with torch.no_grad():
        model(torch.zeros(3, 5, dtype=torch.long), cache=cache)
    per_token = KVCache.bytes_per_token(model.config, torch.float32)
    assert per_token == 2 * 2 * 2 * 8 * 4, f"2 layers × 2 kv heads × head_dim 8, keys and values, fp32: {per_token}"
    assert cache.keys.nbytes + cache.values.nbytes == per_token * 3 * 20, "storage for 3 rows × 20 positions"
    lesson = {  # layers, hidden, heads, kv heads -> KV bytes per token in bf16 (lesson 08 §1.6)
        "SmolLM2-135M": ((30, 576, 9, 3), 23_040),
        "TinyLlama-1.1B": ((22, 2048, 32, 4), 22_528),
        "Llama-3.2-1B": ((16, 2048, 32, 8), 32_768),
        "Llama-2-7B": ((32, 4096, 32, 32), 524_288),
        "Llama-2-70B": ((80, 8192, 64, 8), 327_680),
    }
    for name, ((layers, d, heads, kv), expected) in lesson.items():
        config = LlamaConfig(n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv)
        assert KVCache.bytes_per_token(config, torch.bfloat16) == expected, f"{name}: lesson 08's table"


def test_logits_to_keep_gives_the_last_positions():
    """logits_to_keep=k runs the head on the last k positions only: the same values as the full output's last k
    columns (float64), with or without padding; the cache fills all the same."""
    from model.tiny_llama import KVCache, TinyLlama
    from testcases.tolerances import assert_network_close
    from training.generate import left_pad

    seed(15)
    model = TinyLlama(small_config(n_kv_heads=2)).double().eval()
    ids, mask = left_pad(batch_of_prompts(40), torch.device("cpu"))
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, 3, ids.shape[1])
        last = model(ids, cache=cache, attention_mask=mask, logits_to_keep=2)
    assert last.shape == (3, 2, 40) and cache.length == ids.shape[1], f"(B, k, V), cache full: {tuple(last.shape)}"
    assert_network_close(last, full[:, -2:], "logits_to_keep=2")


def test_cache_misuse_is_refused_and_changes_nothing():
    """A prefix with a cache, an attention mask of the wrong width, or tokens past the cache's end: a
    ValueError naming it, and the cache keeps what it held."""
    from model.tiny_llama import KVCache, TinyLlama

    model = TinyLlama(small_config()).eval()
    cache = KVCache(model.config, 1, 6)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        model(ids, cache=cache)
        keys = cache.keys.clone()
        prefix = [(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))] * 2
        for kwargs, words in [
            ({"cache": cache, "prefix": prefix}, "prefix"),
            ({"cache": cache, "attention_mask": torch.ones(1, 3)}, "attention_mask"),
            ({"cache": cache}, "do not fit"),
        ]:
            with pytest.raises(ValueError, match=words):
                model(ids[:, :3] if "attention_mask" not in kwargs else ids[:, :1], **kwargs)
    assert cache.length == 4 and torch.equal(cache.keys, keys), "a refused call leaves the cache as it was"
    with pytest.raises(ValueError, match="max_len"):
        KVCache(model.config, 1, model.config.max_seq_len + 1)


# ---- chat formats --------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer in digits."},
    {"role": "user", "content": "Reverse the digits.\n1 2 3"},
    {"role": "assistant", "content": "3 2 1"},
    {"role": "user", "content": "Copy the digits.\n4 5"},
    {"role": "assistant", "content": "4 5"},
]


def test_chat_templates_render_the_three_families():
    """The example templates render as their families do (the text transformers' apply_chat_template gives,
    as solutions/tools/check_chat_template.py checks): ChatML, Llama 3's headers, Zephyr's newlines."""
    from training.chat_template import EXAMPLE_TEMPLATES, render

    tokens = {"bos_token": "<B>", "eos_token": "</s>"}
    turn = CONVERSATION[1:3]
    expected = {
        "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nReverse the "
                  "digits.\n1 2 3<|im_end|>\n<|im_start|>assistant\n3 2 1<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<B><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday "
                  "Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nReverse the digits.\n"
                  "1 2 3<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n3 2 1<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "zephyr": "<|user|>\nReverse the digits.\n1 2 3</s>\n<|assistant|>\n3 2 1</s>\n<|assistant|>\n",
    }  # fmt: skip
    for name, text in expected.items():
        got = render(EXAMPLE_TEMPLATES[name], turn, add_generation_prompt=True, date_string="26 Jul 2024", **tokens)
        assert got == text, f"{name}: rendered {got!r}, expected {text!r}"


def test_chat_templates_run_in_transformers_environment():
    """raise_exception, strftime_now, a tojson that keeps '<', the sandbox and the guarded namespace work as in
    transformers' apply_chat_template."""
    import datetime

    import jinja2

    from training.chat_template import render

    messages = [{"role": "user", "content": "<b>"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools here"):
        render("{{ raise_exception('no tools here') }}", messages)
    today = datetime.datetime.now().strftime("%Y")
    assert render("{{ strftime_now('%Y') }}", messages) in (today, str(int(today) + 1)), "strftime_now: the date"
    assert render("{{ messages[0]['content'] | tojson }}", messages) == '"<b>"', "tojson does not escape HTML"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__ }}", messages)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{% set ns = namespace(_x=1) %}", messages)
    text = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert render(text, messages) == "<b>\n", "trim_blocks and lstrip_blocks, as transformers sets them"


@pytest.mark.parametrize("family", ["chatml", "llama3", "zephyr"])
def test_conversation_loss_is_on_the_assistant_turns_only(tmp_path, family):
    """encode_conversation scores exactly the tokens of each assistant turn (its text and end-of-turn marker);
    build_dataset turns that into labels: -100 everywhere else."""
    from training.chat_template import EXAMPLE_TEMPLATES, ChatFormat
    from training.data import IGNORE_INDEX
    from training.finetune import build_dataset, load_tokenizer
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=12)
    tokenizer = load_tokenizer(tmp_path / "model")
    chat = ChatFormat(EXAMPLE_TEMPLATES[family], {"bos_token": "<s>", "eos_token": "</s>"}, tokenizer, family)
    ids, scored = chat.encode_conversation(CONVERSATION)
    assert ids == chat.encode(CONVERSATION), "the same ids as the rendered conversation tokenized whole"
    marker = chat.end_of_turn()
    scored_text = tokenizer.decode([t for t, s in zip(ids, scored, strict=True) if s], skip_special_tokens=False)
    assert scored_text == f"3 2 1{marker}4 5{marker}", f"{family}: the scored tokens spell {scored_text!r}"
    data = build_dataset([(ids, scored)], max_length=len(ids), pad=0)
    labels, expected = data["labels"][0], torch.tensor(ids[1:])
    keep = torch.tensor(scored[1:])
    assert torch.equal(labels, torch.where(keep, expected, IGNORE_INDEX)), "labels[t] = token t+1 where scored"
    assert (labels != IGNORE_INDEX).sum() == sum(scored[1:]) < len(ids) // 2, "most of a conversation is not scored"


def test_a_checkpoint_without_a_template_gets_the_alpaca_format(tmp_path):
    """No chat_template: a message says so, and a one-turn conversation becomes the Alpaca record's ids and mask."""
    from training.chat_template import load_chat_format
    from training.finetune import encode_record, load_tokenizer, special_token_ids
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=12)
    model_dir = tmp_path / "model"
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tokenizer)
    notes = []
    chat = load_chat_format(model_dir, tokenizer, bos, eos, notes.append)
    assert notes and "no chat template" in notes[0] and "Alpaca" in notes[0], f"a clear message: {notes}"
    conversation = [{"role": "user", "content": "Reverse the digits."}, {"role": "assistant", "content": "3 2 1"}]
    record = {"instruction": "Reverse the digits.", "input": "", "output": "3 2 1"}
    assert chat.encode_conversation(conversation) == encode_record(record, tokenizer, bos, eos), (
        "the fallback is make finetune's instruction format: same ids, loss on the response and EOS"
    )
    assert chat.stops(eos) == ({eos}, []), "generation stops at EOS"


def test_bad_conversations_name_their_line(tmp_path):
    """A conversation with an unknown role, no assistant turn, an assistant turn first or a late system message
    is refused with its file and line."""
    from training.finetune import read_records

    path = tmp_path / "chat.jsonl"
    good = {"messages": CONVERSATION}
    for messages, words in [
        ([{"role": "robot", "content": "x"}], r"messages\[0\].*role"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "open with an assistant"),
        ([*CONVERSATION[1:3], {"role": "system", "content": "late"}], "system message may only come first"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "string content"),
    ]:
        path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
        with pytest.raises(ValueError, match=rf"chat.jsonl:2.*{words}"):
            read_records(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_records(path) == [good], "a good conversation is read as it is"


def test_finetune_on_conversations(tmp_path, stages_done):
    """make finetune's module on conversation JSONL (the toy's chat.jsonl): it trains, and reports once."""
    from training import finetune
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=40)
    result = finetune.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "chat.jsonl"),
                            "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4",
                            "--progress", "false", "--max-length", "64"])  # fmt: skip
    assert math.isfinite(result["eval_loss_after"]) and result["step"] == 2, result
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file(), "the adapter is written"


# ---- make chat -------------------------------------------------------------------------------------------


def test_history_is_trimmed_to_the_context(tmp_path):
    """fit_history drops the oldest exchanges (user message and reply), keeps the system message and the newest
    turn, and returns a prompt within the budget."""
    from training.chat import fit_history
    from training.chat_template import load_chat_format
    from training.finetune import load_tokenizer, special_token_ids
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=12)
    tokenizer = load_tokenizer(tmp_path / "model")
    chat = load_chat_format(tmp_path / "model", tokenizer, *special_token_ids(tmp_path / "model", tokenizer))
    messages = [dict(m) for m in CONVERSATION] + [{"role": "user", "content": "Sort the digits.\n3 1"}]
    whole = len(chat.encode(messages, add_generation_prompt=True))
    ids, dropped = fit_history(chat, messages, whole - 1)
    assert dropped == 1 and len(ids) <= whole - 1, f"one exchange dropped ({dropped}), {len(ids)} tokens"
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"], "system and newest turns stay"
    assert messages[1]["content"] == CONVERSATION[3]["content"], "the oldest exchange went first"
    ids, dropped = fit_history(chat, messages, 1)
    assert [m["role"] for m in messages] == ["system", "user"] and dropped == 1, "the newest user turn always stays"


def test_chat_answers_a_piped_conversation(tmp_path):
    """python -m training.chat with a conversation piped in: a streamed reply per line, the oldest turns dropped
    (and said) when the context is full, exit status 0 at EOF."""
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=12)
    lines = ["Reverse the digits.\\n1 2 3", "Copy the digits.\\n4 5 6", "Sort the digits.\\n9 1 5", "", "thanks"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "training.chat", "--model", str(tmp_path / "model"), "--max-new-tokens", "6",
         "--context", "64"],
        input="\n".join(lines) + "\n", cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr[-2000:]}"
    out = result.stdout
    assert out.count("user: ") == 4 and out.count("assistant: ") == 4, (
        f"four turns answered (a blank line skipped):\n{out}"
    )
    assert "user: Reverse the digits.\n1 2 3\nassistant: " in out, "a \\n in a line is a line break"
    assert "[dropped the" in result.stderr and "64-token context" in result.stderr, (
        f"a 64-token context holds two exchanges at most: the oldest are dropped, and stderr says so:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr


def test_chat_streams_each_token(tmp_path):
    """converse() writes a reply piece by piece as tokens arrive, and keeps the replies in the history."""
    from model.hf_checkpoint import load_hf_checkpoint
    from training.chat import converse
    from training.chat_template import load_chat_format
    from training.finetune import load_tokenizer, special_token_ids
    from training.generate import Sampling
    from training.toy_checkpoint import write_toy_checkpoint

    write_toy_checkpoint(tmp_path, n_records=12)
    model_dir = tmp_path / "model"
    tokenizer = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tokenizer)
    chat = load_chat_format(model_dir, tokenizer, bos, eos)
    writes: list[str] = []
    history = converse(load_hf_checkpoint(model_dir), chat, eos, ["Copy the digits.\\n1 2"],
                       Sampling(), 8, 128, write=writes.append)  # fmt: skip
    reply = history[-1]["content"]
    pieces = writes[writes.index("assistant: ") + 1 : -1]
    assert "".join(pieces) == reply and len(pieces) >= 2, f"the reply arrives in pieces: {pieces}"


# ---- FSDP: the model sharded over processes ------------------------------------------------------------


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float64, torch.uint8])
def test_quant_storage_holds_the_same_codes_and_computes_the_same(storage):
    """QuantStorageNF4Linear keeps NF4Linear's codes bit for bit in a parameter of the storage dtype and computes
    exactly NF4Linear's output; a cast to another float dtype (what a mixed-precision policy does to a
    parameter of another dtype) destroys the codes, a cast to its own dtype keeps them."""
    from model._impl import missing_exercises

    if missing := missing_exercises([3]):
        pytest.skip(f"needs Stage 3, where exercises {', '.join(missing[:4])}… are still stubs")
    from model.quant import NF4Linear
    from training.fsdp import QuantStorageNF4Linear

    seed(13)
    layer = NF4Linear.from_linear(torch.nn.Linear(48, 20, bias=False))  # 960 weights: 480 bytes of codes
    stored = QuantStorageNF4Linear(layer, storage)
    param = stored.packed_storage
    assert isinstance(param, torch.nn.Parameter) and not param.requires_grad and param.dtype == storage, (
        "the codes are a frozen parameter of the storage dtype: FSDP shards parameters, not buffers"
    )
    assert torch.equal(stored.codes(), layer.packed), "the storage's bytes are the packed codes"
    x = torch.randn(3, 48, generator=generator(14))
    assert torch.equal(stored(x), layer(x)), "the same dequantization and product as NF4Linear"
    if storage.is_floating_point:
        same = param.detach().to(storage)
        assert torch.equal(same.view(torch.uint8)[:480], layer.packed), "a cast to its own dtype changes nothing"
        other = torch.bfloat16 if storage != torch.bfloat16 else torch.float32
        cast = param.detach().to(other).view(torch.uint8)
        assert cast.numel() < 480 or not torch.equal(cast[:480], layer.packed), (
            f"a cast of {storage} storage to {other} must not pass for the codes"
        )


def fsdp_args(out: Path, *extra: str) -> list[str]:
    return ["--batch-size", "16", "--max-steps", "4", "--progress", "false", "--output-dir", str(out), "--float64",
            "--no-eval", *extra]  # fmt: skip


def one_process(args: list[str], path: Path) -> dict[str, torch.Tensor]:
    """The same model and data trained in this process, without FSDP: its trainable parameters after 4 steps."""
    from safetensors.torch import load_file

    from training.distributed import write_result
    from training.fsdp import build_fsdp, parse_args
    from training.qlora_trainer import QLoRATrainer

    single = build_fsdp(parse_args(args), QLoRATrainer)
    single.train()
    write_result(single, path)
    return load_file(str(path))


def expected_shard_bytes(args: list[str]) -> tuple[int, int]:
    """(rank 0's bytes under FSDP over 2 ranks, one whole copy): parameters split along dim 0 as torch.chunk
    splits them (rank 0 takes ceil(rows / 2)), buffers whole."""
    from training.fsdp import build_fsdp, parse_args
    from training.qlora_trainer import QLoRATrainer

    model = build_fsdp(parse_args(args), QLoRATrainer).model
    held = whole = 0
    for t in [*model.parameters(), *model.buffers()]:
        rows = t.shape[0] if t.dim() else 1
        per_row = t.numel() // rows * t.element_size()
        whole += t.numel() * t.element_size()
        held += (-(-rows // 2) * per_row) if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size()
    return held, whole


def resume_in_one_process(args: list[str], checkpoint: Path) -> dict[str, torch.Tensor]:
    """An FSDP trainer in this process alone (a gloo group of 1) resumed from ``checkpoint`` and trained to the end."""
    import torch.distributed as dist

    from training.fsdp import FSDPTrainer, build_fsdp, parse_args

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = build_fsdp(parse_args(args), FSDPTrainer)
        trainer.load_checkpoint(checkpoint)
        assert trainer.step == 2 and len(trainer.history) == 2, f"resumed at step {trainer.step}, expected 2"
        trainer.train()
        return trainer.trainable_state()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)  # child processes (torch imports) on a possibly busy machine
def test_fsdp_qlora_two_processes_train_as_one_and_resume(tmp_path, stages_done):
    """FSDP2 over 2 gloo processes, QLoRA with the NF4 codes sharded as float64 storage: equal to one process
    (float64: max |Δθ| ≤ 1e-10, the DDP test's bound); rank 0 holds half of every parameter; the sharded
    checkpoint of step 2 resumes (here in 1 process: torch.distributed.checkpoint reshards) to the same end."""
    whole_run = tmp_path / "whole"
    output = launch(
        "training.fsdp", fsdp_args(whole_run, "--save-every", "2", "--result", str(tmp_path / "two.safetensors"))
    )
    assert "[2 processes] step 4" in output, output
    for step in (2, 4):
        files = {p.name for p in (whole_run / f"checkpoint-{step}").iterdir()}
        assert {"__0_0.distcp", "__1_0.distcp", "trainer.pt", ".metadata"} <= files, (
            f"checkpoint-{step}: each rank writes its own shards (torch.distributed.checkpoint), found {files}"
        )
    from safetensors.torch import load_file

    two = load_file(str(tmp_path / "two.safetensors"))
    one = one_process(fsdp_args(tmp_path / "one"), tmp_path / "one.safetensors")
    assert sorted(two) == sorted(one), "the same trainable parameters, under the model's own names"
    # As in test_two_processes_train_as_one: equal in exact arithmetic, float64 rounding far below 1e-10,
    # while one step on a wrong gradient (or a lost optimizer state) moves an adapter by up to lr = 3e-3.
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst <= 1e-10, f"2 FSDP processes and 1 process disagree by {worst:.3g} after 4 steps"
    resumed = resume_in_one_process(fsdp_args(tmp_path / "resumed"), whole_run / "checkpoint-2")
    worst = max((resumed[k] - one[k]).abs().max().item() for k in one)
    assert worst <= 1e-10, f"resumed from checkpoint-2, the run ends {worst:.3g} away from the uninterrupted one"
    info = json.loads(Path(str(tmp_path / "two.safetensors") + ".json").read_text())
    assert (info["held_bytes"], info["whole_bytes"]) == expected_shard_bytes(fsdp_args(tmp_path / "x")), (
        f"rank 0 holds half of every parameter (NF4 codes included) and the buffers whole: {info}"
    )
    assert (whole_run / "adapter" / "adapter_model.safetensors").is_file(), "rank 0 writes the gathered adapter"
    lines = (whole_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "only rank 0 logs"


@pytest.mark.timeout(600)
def test_fsdp_lora_two_processes_train_as_one(tmp_path, stages_done):
    """FSDP2 over 2 gloo processes, plain LoRA (a float64 base sharded as it is): equal to one process."""
    from safetensors.torch import load_file

    launch(
        "training.fsdp",
        fsdp_args(tmp_path / "two", "--quantize", "none", "--result", str(tmp_path / "two.safetensors")),
    )
    two = load_file(str(tmp_path / "two.safetensors"))
    one = one_process(fsdp_args(tmp_path / "one", "--quantize", "none"), tmp_path / "one.safetensors")
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst <= 1e-10, f"2 FSDP processes and 1 process disagree by {worst:.3g} after 4 steps"
