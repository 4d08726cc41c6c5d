#!/usr/bin/env python3
"""Check, with the real transformers library, that ``model/hf_checkpoint.py`` is faithful (dev-only).

The graded tests never import transformers; this script is how we know that a Hugging Face Llama
directory loaded by ``load_hf_checkpoint`` computes what transformers' ``LlamaForCausalLM``
computes on the same weights, and that ``save_hf_checkpoint`` writes directories transformers
reads. Nothing is downloaded: every model is random and built here, with its weights redrawn at a
scale where the logits are O(1–10) (transformers' init, std 0.02 and norms of ones, gives logits
near 0, where an absolute 1e-5 says little and a swapped norm weight would not show). All
comparisons are fp32, eval, SDPA attention (the kernel ours calls; "eager" rounds differently, its
Δ is printed as information), on random ids, B = 3:

    1 single file    2 layers, hidden 64, 4 heads, 2 kv heads (GQA), untied; save_pretrained
    2 sharded        the same model, save_pretrained(max_shard_size="20KB"): shards + index
    3 tied           tie_word_embeddings=True (no lm_head.weight in the file)
      llama3 RoPE    rope_type "llama3", original_max_position_embeddings 16, at T = 40; then 32
                     with rope_theta 20000, where all three frequency bands occur; the config.json
                     transformers writes (rope_parameters) and the transformers-4 shape (rope_theta
                     + rope_scaling) must read alike; the Δ of the same weights without the scaling
                     shows the check is sensitive to it
    4 course -> HF   TinyLlama written by save_hf_checkpoint (single, sharded, GQA, tied, llama3)
                     loads with LlamaForCausalLM.from_pretrained: no missing or unexpected keys, same logits
    5 bf16           load_hf_checkpoint(dtype=bfloat16) vs from_pretrained(dtype=bfloat16); bound below
    6 refusals       gpt2, attention_bias, only pytorch_model.bin (and the other documented ones)
    7 memory         peak RSS of load_hf_checkpoint on a ~125 M-parameter checkpoint (fp32, ~476 MiB),
                     in a fresh subprocess: anonymous memory vs file-backed (mmap'd safetensors) pages.
                     safetensors' get_tensor returns a view of the mmap'd file, so the anonymous peak
                     is the parameters alone; the second copy is the page cache of the open file
                     (clean, reclaimable), which ru_maxrss counts: ~2 × params for a single file

bf16 bound: the two implementations round differently only where their op order differs, so the
yardstick is transformers' own bf16 error: max |ours_bf16 − HF_bf16| must not exceed max
|HF_bf16 − HF_fp32| (ours disagrees with HF by no more than HF in bf16 disagrees with HF in
fp32). It is also printed in units of u·max|logit|, u = 2^-8 the unit roundoff of bf16 (8
significant bits).

One line per check; exit 1 if any fails. Run from the repository root (the environment needs
torch, transformers 5 and safetensors; ~25 s on 2 cores, half of it the memory check):

    OMP_NUM_THREADS=1 /tmp/peftenv/bin/python solutions/tools/check_hf_checkpoint.py [--skip-memory]
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from model.hf_checkpoint import (  # noqa: E402
    UnsupportedCheckpoint,
    load_hf_checkpoint,
    read_hf_config,
    save_hf_checkpoint,
)
from model.tiny_llama import LlamaConfig, TinyLlama, llama3_frequencies  # noqa: E402

TOLERANCE = 1e-5
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SMALL = {  # the tiny transformers config every check starts from
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
results: list[tuple[str, bool]] = []


def record(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58} {detail}")


def check(name: str, value: float, note: str = "", bound: float = TOLERANCE) -> None:
    record(name, value <= bound, f"max |Δ| = {value:.2e}{note}")


def info(name: str, detail: str) -> None:
    print(f"info {name:<58} {detail}")


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def randomize(model: nn.Module, seed: int) -> None:
    """Redraw every weight: matrices N(0, 1/fan_in), the embedding N(0, 1), norms 1 + N(0, 0.2²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def hf_model(seed: int, **overrides) -> transformers.LlamaForCausalLM:
    """A random transformers LlamaForCausalLM (fp32, SDPA, eval): SMALL with ``overrides``."""
    config = transformers.LlamaConfig(**(SMALL | overrides), attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        model = transformers.LlamaForCausalLM(config)
    randomize(model, seed)
    return model.float().eval()


def hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def from_pretrained(directory: Path, **kwargs) -> transformers.LlamaForCausalLM:
    """LlamaForCausalLM.from_pretrained, refusing missing, unexpected or mismatched keys (transformers would init them)."""
    model, loading = transformers.LlamaForCausalLM.from_pretrained(
        directory, attn_implementation=kwargs.pop("attn_implementation", "sdpa"), output_loading_info=True, **kwargs
    )
    problems = {k: v for k, v in loading.items() if v}  # missing, unexpected, mismatched keys; error messages
    if problems:
        raise AssertionError(f"from_pretrained({directory.name}) loading info: {problems}")
    return model.eval()


def files_of(directory: Path) -> str:
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    index = (directory / "model.safetensors.index.json").is_file()
    return f"{len(shards)} safetensors file{'s' if len(shards) > 1 else ''}{' + index' if index else ''}"


# ---- 1–3: transformers writes, we read ----------------------------------------------------------


def check_hf_to_ours(tmp: Path) -> None:
    ids = torch.randint(0, 100, (3, 24))
    hf = hf_model(seed=1)
    expected = hf_logits(hf, ids)
    info("logit scale (model of checks 1–2)", f"max |logit| = {expected.abs().max():.2f}")

    single = tmp / "hf_single"
    hf.save_pretrained(single)
    ours = load_hf_checkpoint(single)
    check(f"1. HF single file ({files_of(single)}) -> ours, GQA", maxdiff(our_logits(ours, ids), expected))
    eager = from_pretrained(single, attn_implementation="eager")
    info(
        "   the same, transformers with eager attention",
        f"max |Δ| = {maxdiff(our_logits(ours, ids), hf_logits(eager, ids)):.2e}",
    )
    info("   transformers eager vs transformers SDPA", f"max |Δ| = {maxdiff(hf_logits(eager, ids), expected):.2e}")

    sharded = tmp / "hf_sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1, "max_shard_size did not shard"
    check(
        f"2. HF sharded ({files_of(sharded)}) -> ours", maxdiff(our_logits(load_hf_checkpoint(sharded), ids), expected)
    )

    tied_dir = tmp / "hf_tied"
    tied = hf_model(seed=2, tie_word_embeddings=True)
    tied.save_pretrained(tied_dir)
    with safe_open(str(tied_dir / "model.safetensors"), framework="pt") as f:
        stored_head = "lm_head.weight" in f.keys()  # noqa: SIM118
    ours = load_hf_checkpoint(tied_dir)
    shared = ours.lm_head.weight is ours.embed_tokens.weight
    check(
        "3a. HF tied embeddings -> ours",
        maxdiff(our_logits(ours, ids), hf_logits(tied, ids)) if shared else math.inf,
        f"  (lm_head.weight in file: {stored_head}; ours shares one tensor: {shared})",
    )


def check_rope(tmp: Path, label: str, rope: dict, seq_len: int) -> None:
    """llama3 RoPE: transformers 5's config.json and the transformers-4 shape read alike, same logits at seq_len."""
    directory = tmp / f"hf_rope_{label}"
    hf = hf_model(seed=3, rope_parameters=rope, max_position_embeddings=2 * seq_len)
    hf.save_pretrained(directory)
    written = json.loads((directory / "config.json").read_text())
    rope_keys = {k: written[k] for k in ("rope_parameters", "rope_scaling", "rope_theta") if k in written}
    info(f"3{label}. config.json rope fields (transformers {transformers.__version__})", json.dumps(rope_keys))
    config = read_hf_config(directory)
    info(f"3{label}. read_hf_config", f"rope_theta={config.rope_theta}, rope_scaling={config.rope_scaling}")

    legacy_dir = tmp / f"hf_rope_{label}_v4"  # the shape transformers 4 (and most Hub checkpoints) write
    legacy_dir.mkdir()
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    legacy["rope_theta"] = rope["rope_theta"]
    legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (legacy_dir / "config.json").write_text(json.dumps(legacy))
    same = read_hf_config(legacy_dir) == config
    record(
        f"3{label}. transformers-4 config.json shape reads alike", same, "" if same else f"{read_hf_config(legacy_dir)}"
    )

    ids = torch.randint(0, 100, (3, seq_len))
    ours = load_hf_checkpoint(directory)
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    ratio = llama3_frequencies(inv_freq, rope) / inv_freq
    bands = f"kept {int((ratio == 1).sum())}, blended {int(((ratio < 1) & (ratio > 1 / 8)).sum())}, /8 {int((ratio == 1 / 8).sum())}"
    plain = TinyLlama(dataclasses.replace(config, rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    sensitivity = maxdiff(our_logits(plain, ids), our_logits(ours, ids))
    orig = rope["original_max_position_embeddings"]
    check(
        f"3{label}. HF llama3 RoPE (orig {orig}, θ {rope['rope_theta']:g}) -> ours, T={seq_len}",
        maxdiff(our_logits(ours, ids), hf_logits(hf, ids)),
        f"  (frequencies {bands}; without the scaling Δ = {sensitivity:.2f})",
    )
    if sensitivity <= 100 * TOLERANCE:
        record(f"3{label}. the scaling changes the logits", False, f"only {sensitivity:.2e}")


# ---- 4: we write, transformers reads -----------------------------------------------------------


def check_ours_to_hf(tmp: Path) -> None:
    cases = [
        ("GQA, untied, single file", {"n_kv_heads": 2}, None),
        ("GQA, untied, sharded", {"n_kv_heads": 2}, 20_000),
        ("GQA, tied, single file", {"n_kv_heads": 2, "tie_word_embeddings": True}, None),
        ("MHA, tied, sharded", {"tie_word_embeddings": True}, 20_000),
        ("GQA, llama3 RoPE, sharded, T=40", {"n_kv_heads": 2, "rope_scaling": LLAMA3, "rope_theta": 20000.0}, 20_000),
    ]
    for i, (label, extra, shard) in enumerate(cases):
        config = LlamaConfig(vocab_size=100, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, **extra)
        torch.manual_seed(10 + i)
        ours = TinyLlama(config).eval()
        randomize(ours, seed=10 + i)
        directory = save_hf_checkpoint(ours, tmp / f"ours_{i}", max_shard_bytes=shard)
        theirs = from_pretrained(directory)
        ids = torch.randint(0, 100, (3, 40 if config.rope_scaling else 24))
        tied_ok = not config.tie_word_embeddings or theirs.lm_head.weight is theirs.model.embed_tokens.weight
        check(
            f"4. ours -> HF from_pretrained: {label} ({files_of(directory)})",
            maxdiff(our_logits(ours, ids), hf_logits(theirs, ids)) if tied_ok else math.inf,
            "" if tied_ok else "  (transformers did not tie lm_head)",
        )
        if config.rope_scaling:
            info("   transformers' rope_parameters for that config.json", json.dumps(theirs.config.rope_parameters))


# ---- 5: bf16 -------------------------------------------------------------------------------------


def check_bf16(tmp: Path) -> None:
    directory = tmp / "hf_single"  # written in check 1 (fp32 weights, rounded to bf16 at load by both)
    ids = torch.randint(0, 100, (3, 24))
    exact = hf_logits(from_pretrained(directory, dtype=torch.float32), ids)
    theirs = from_pretrained(directory, dtype=torch.bfloat16)
    ours = load_hf_checkpoint(directory, dtype=torch.bfloat16)
    assert next(theirs.parameters()).dtype == next(ours.parameters()).dtype == torch.bfloat16
    ours_bf16, theirs_bf16 = our_logits(ours, ids), hf_logits(theirs, ids)
    hf_error, our_error = maxdiff(theirs_bf16, exact), maxdiff(ours_bf16, exact)
    delta, scale = maxdiff(ours_bf16, theirs_bf16), exact.abs().max().item()
    check(
        "5. bf16: ours vs HF (bound: HF bf16's own error vs fp32)",
        delta,
        f" = {delta / (BF16_U * scale):.2f} u·max|logit|; bf16 vs fp32: HF {hf_error:.2e}, ours {our_error:.2e};"
        f" max|logit| {scale:.2f}, u·max|logit| = {BF16_U * scale:.2e}",
        bound=hf_error,
    )


# ---- 6: refusals -----------------------------------------------------------------------------------


def expect_refusal(name: str, directory: Path, error: type[Exception], load: bool = True) -> None:
    try:
        load_hf_checkpoint(directory) if load else read_hf_config(directory)
    except error as e:
        record(f"6. refuses {name}", True, f"{type(e).__name__}: {e}")
    except Exception as e:  # any other error is a failure of this check
        record(f"6. refuses {name}", False, f"expected {error.__name__}, got {type(e).__name__}: {e}")
    else:
        record(f"6. refuses {name}", False, f"expected {error.__name__}, nothing raised")


def variant(tmp: Path, name: str, edit: dict | None = None, weights: str | None = "copy") -> Path:
    """A copy of check 1's checkpoint with config.json fields changed and the weights copied (or not)."""
    source, directory = tmp / "hf_single", tmp / f"refuse_{name}"
    directory.mkdir()
    config = json.loads((source / "config.json").read_text()) | (edit or {})
    (directory / "config.json").write_text(json.dumps(config))
    if weights == "copy":
        (directory / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    return directory


def check_refusals(tmp: Path) -> None:
    expect_refusal(
        "model_type gpt2",
        variant(tmp, "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
        UnsupportedCheckpoint,
        load=False,
    )
    expect_refusal(
        "attention_bias true", variant(tmp, "bias", {"attention_bias": True}), UnsupportedCheckpoint, load=False
    )
    only_bin = variant(tmp, "bin", weights=None)
    with safe_open(str(tmp / "hf_single" / "model.safetensors"), framework="pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, only_bin / "pytorch_model.bin")  # noqa: SIM118
    expect_refusal("a directory with only pytorch_model.bin", only_bin, FileNotFoundError)
    expect_refusal("mlp_bias true", variant(tmp, "mlp_bias", {"mlp_bias": True}), UnsupportedCheckpoint, load=False)
    expect_refusal("hidden_act gelu", variant(tmp, "gelu", {"hidden_act": "gelu"}), UnsupportedCheckpoint, load=False)
    expect_refusal(
        "head_dim 32 != 64 / 4", variant(tmp, "head_dim", {"head_dim": 32}), UnsupportedCheckpoint, load=False
    )
    yarn = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}
    expect_refusal("rope_type yarn", variant(tmp, "yarn", yarn), UnsupportedCheckpoint, load=False)
    no_config = tmp / "refuse_no_config"
    no_config.mkdir()
    expect_refusal("no config.json", no_config, FileNotFoundError)
    expect_refusal("a vocab the weights do not have", variant(tmp, "shape", {"vocab_size": 101}), ValueError)
    missing = variant(tmp, "missing")
    with safe_open(str(missing / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}  # noqa: SIM118
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    expect_refusal("a missing tensor (model.norm.weight)", missing, ValueError)


# ---- 7: memory -------------------------------------------------------------------------------------

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
from model.hf_checkpoint import load_hf_checkpoint
from model.tiny_llama import LlamaConfig, TinyLlama

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

peak, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()
def sample():  # the kernel keeps only the peak of the total (VmHWM); the split is sampled every 0.5 ms
    while not done.is_set():
        now = status()
        for key in peak:
            peak[key] = max(peak[key], now[key])
        time.sleep(0.0005)

with torch.device("meta"):  # warm-up: the first meta build + to_empty costs ~70 MiB whatever the model's size
    TinyLlama(LlamaConfig()).to_empty(device="cpu")
before = status()
sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
model = load_hf_checkpoint(sys.argv[2], dtype=torch.float32)
seconds = time.perf_counter() - start
done.set()
sampler.join()
after = status()
params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
print(json.dumps({"before": before, "after": after, "peak": peak, "seconds": seconds,
                  "param_bytes": sum(params.values()), "largest_param": max(params.values())}))
"""


def measure(directory: Path) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(directory)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(run.stdout)


def check_memory(tmp: Path) -> None:
    """~125 M parameters (vocab 32000, hidden 768, 12 layers, 12 heads, 4 kv heads, d_ff 2048), fp32."""
    config = LlamaConfig(
        vocab_size=32000, max_seq_len=2048, d_model=768, n_layers=12, n_heads=12, d_ff=2048, n_kv_heads=4
    )
    with torch.random.fork_rng(devices=[]):
        big = TinyLlama(config)
    tensors = {name: p.numel() * 4 for name, p in big.state_dict().items()}
    save_hf_checkpoint(big, tmp / "big_single")
    save_hf_checkpoint(big, tmp / "big_sharded", max_shard_bytes=100 * 2**20)
    del big
    mib = 2**20
    for label in ("single", "sharded"):
        directory = tmp / f"big_{label}"
        files = sorted(directory.glob("*.safetensors"))
        largest_file = max(f.stat().st_size for f in files)
        m = measure(directory)
        params, largest = m["param_bytes"], m["largest_param"]
        assert largest == max(tensors.values())
        total = m["before"]["VmHWM"], m["after"]["VmHWM"]
        anon = m["peak"]["RssAnon"] - m["before"]["RssAnon"]
        file_pages = m["peak"]["RssFile"] - m["before"]["RssFile"]
        info(
            f"7. load {label} ({len(files)} file{'s' if len(files) > 1 else ''}, largest {largest_file / mib:.0f} MiB)",
            f"{params / 1e6 / 4:.1f} M params = {params / mib:.0f} MiB fp32, largest tensor {largest / mib:.1f} MiB,"
            f" {m['seconds']:.1f} s",
        )
        info(
            "   peak RSS growth (VmHWM = ru_maxrss, exact)",
            f"{(total[1] - total[0]) / mib:.0f} MiB = {(total[1] - total[0]) / params:.2f} × params",
        )
        info(
            "   of which (sampled peaks) anonymous / file-backed",
            f"{anon / mib:.0f} MiB = params {(anon - params) / mib:+.1f} MiB / {file_pages / mib:.0f} MiB"
            f" (anonymous after load: params {(m['after']['RssAnon'] - m['before']['RssAnon'] - params) / mib:+.1f} MiB)",
        )
        record(
            f"7. {label}: anonymous peak ≤ params + largest tensor",
            anon <= params + largest,
            f"{anon / mib:.0f} ≤ {(params + largest) / mib:.0f} MiB",
        )
        record(
            f"7. {label}: total peak ≤ params + largest tensor + largest file",
            total[1] - total[0] <= params + largest + largest_file,
            f"{(total[1] - total[0]) / mib:.0f} ≤ {(params + largest + largest_file) / mib:.0f} MiB",
        )


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        check_hf_to_ours(tmp)
        check_rope(tmp, "b", {**LLAMA3, "rope_theta": 10000.0}, seq_len=40)
        check_rope(tmp, "c", {**LLAMA3, "original_max_position_embeddings": 32, "rope_theta": 20000.0}, seq_len=48)
        check_ours_to_hf(tmp)
        check_bf16(tmp)
        check_refusals(tmp)
        if "--skip-memory" in sys.argv:
            info("7. memory", "skipped (--skip-memory)")
        else:
            check_memory(tmp)
    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
