"""Benchmarks (`make bench`): speed lives here, never in the graded tests.

1. LoRA layer forward vs its base nn.Linear (1024 tokens, 512 → 512, r = 8, fp32, 2 threads):
   the reference forward (fused in-place add), the plain out-of-place sum
   ``base(x) + scaling · B(A(x))`` with the same weights (a local function below), and the
   merged layer. The LoRA branch adds 2·r·(k + d) / (2·k·d) ≈ 3 % FLOPs, so the aim is
   ≤ 1.10× unmerged and ≤ 1.02× merged. PEFT's LoRA layer is timed alongside only when
   ``peft`` is importable; otherwise a line says it was skipped.
2. NF4 quantize / dequantize on a 4096 × 4096 fp32 weight, side by side with bitsandbytes'
   ``quantize_4bit`` / ``dequantize_4bit`` on the CPU when ``bitsandbytes`` is importable (aim:
   ours / bitsandbytes ≤ 1.00×; measured in alternating rounds, like section 1; ours alone
   otherwise), NF4Linear forward vs nn.Linear, and bits per parameter measured from
   ``weight_nbytes()`` (4.127 with double quantization, 4.5 without). A "fresh output" line
   times ``torch.empty`` + ``fill_`` of a 64 MiB fp32 tensor: every dequantize pays for a fresh
   output's pages, and on the machines we measured that alone is most of bitsandbytes' time
   (lesson 06, section 7). Then dequantize at the bundled model's largest projection, 1376 × 512:
   memory that small is reused, so no fresh pages hide the decode's own cost.
3. One training step on the bundled model: LoRA vs QLoRA, side by side, the step's time (the cost
   of dequantizing on the fly, twice: in the forward and again in the backward, as bitsandbytes'
   ``MatMul4Bit`` does; aim ≤ 1.5×) and its activation bytes (``measure_memory``, lesson 06: what
   autograd saves for the backward pass; aim: QLoRA's ≤ LoRA's). A third row computes NF4Linear
   with ``F.linear(x, Ŵ, b)`` instead of its 4-bit matmul (lesson 03, §7), to show what the
   Function saves: every dequantized weight kept until the backward pass. In the precision named
   by the environment variable ``BENCH_PRECISION`` (fp32, bf16 or fp16; default fp32).
   ``make bench PRECISION=bf16`` sets it.
4. One training step per LoRA-family method on the bundled model relative to LoRA, same precision
   (aim ≤ 1.5× for DoRA, VeRA and AdaLoRA; Stage 5): LoRA and DoRA at r = 8, VeRA at PEFT's
   default r = 256 (its forward picks the cheaper of two multiplication orders), AdaLoRA from
   rank 12 towards 8 with its RankAllocator attached (importance and masking after every step),
   Delta-LoRA with its W0 update attached. Measured in alternating rounds, like section 1.
5. Greedy generation (``training/generate.py``) after a 16-token prompt, 32, 128 and 512 new
   tokens, with and without the KV cache, on a random model of the toy checkpoint's family
   (grouped-query attention 4/2, tied embeddings) at width 128 and 4 layers, where the
   projections' compute, not Python's overhead per call, sets the pace: tokens per second and
   milliseconds per new token. With the cache the cost per token stays flat in the length;
   without it, each token reruns the whole sequence, so it grows with the length.

Every number is the median of repeated runs in one process (torch.utils.benchmark).
Run it on a quiet machine: other processes using the cores distort every timing.

    python -m training.bench                        (fp32 training steps)
    BENCH_PRECISION=bf16 python -m training.bench   (bf16 autocast training steps)
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from model._impl import use_default_for

use_default_for("show")  # the reference where this checkout has it, unless IMPL / LORA_IMPL says otherwise

from model.lora import LoRALayer  # noqa: E402  (after the switch is set)
from model.quant import NF4Linear, bits_per_parameter, dequantize_nf4, quantize_nf4  # noqa: E402
from model.tiny_llama import load_base_model  # noqa: E402
from training.data import finetune_data  # noqa: E402
from training.qlora_trainer import PRECISIONS, QLoRATrainer, TrainConfig, prepare_qlora_model  # noqa: E402

THREADS = 2
PRECISION_ENV = "BENCH_PRECISION"


def bench_precision() -> str:
    """The training-step precision from $BENCH_PRECISION (fp32 when unset); a clear error otherwise."""
    precision = os.environ.get(PRECISION_ENV, "").strip() or "fp32"
    if precision not in PRECISIONS:
        raise SystemExit(f"{PRECISION_ENV}={precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def median_seconds(fn, min_run_time: float = 1.0) -> float:
    """Median wall time of ``fn()`` over blocks of runs lasting at least ``min_run_time`` in all."""
    return (
        Timer(stmt="fn()", globals={"fn": fn}, num_threads=THREADS).blocked_autorange(min_run_time=min_run_time).median
    )


def interleaved(fns: dict[str, object], rounds: int = 5) -> dict[str, float]:
    """Median seconds of each callable, measured in alternating rounds (drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, 0.4))
    return {name: statistics.median(values) for name, values in times.items()}


def plain_lora_forward(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The readable out-of-place LoRA forward, with ``layer``'s weights: base(x) + scaling · B(A(x)).

    No dropout (the benchmarked layer has none) and no in-place add: the version Exercise 1.2's
    recipe describes, timed next to the reference's fused ``addmm_``.
    """
    z = F.linear(x, layer.lora_A)  # (tokens, r)
    return layer.base_layer(x) + layer.scaling * F.linear(z, layer.lora_B)  # (tokens, out)


def peft_lora_model(base: nn.Linear):
    """PEFT's LoRA layer around a copy of ``base`` (r = 8, alpha = 16), or None without peft."""
    try:  # dev-only comparison; the course never needs peft
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    return model


def lora_layer_overhead() -> None:
    torch.manual_seed(0)
    base = nn.Linear(512, 512)
    layer = LoRALayer.from_linear(copy.deepcopy(base), r=8, lora_alpha=16)
    nn.init.normal_(layer.lora_B, std=0.02)
    merged = copy.deepcopy(layer)
    merged.merge()
    x = torch.randn(1024, 512)
    with torch.no_grad():
        fused, plain = layer(x), plain_lora_forward(layer, x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5, msg="fused and plain forwards disagree")
    fns = {
        "nn.Linear": lambda: base(x),
        "LoRALayer (fused)": lambda: layer(x),
        "plain out-of-place": lambda: plain_lora_forward(layer, x),
        "LoRALayer merged": lambda: merged(x),
    }
    peft_model = peft_lora_model(base)
    if peft_model is not None:
        fns["PEFT lora.Linear"] = lambda: peft_model(x)
    with torch.no_grad():
        times = interleaved(fns)
    aims = {"LoRALayer (fused)": "   (aim <= 1.10x)", "LoRALayer merged": "   (aim <= 1.02x)"}
    print("1. LoRA layer forward, 1024 tokens, 512 -> 512, r = 8, fp32, 2 threads (median of 5 rounds)")
    for name, seconds in times.items():
        ratio = seconds / times["nn.Linear"]
        print(f"   {name:<20} {seconds * 1e3:8.3f} ms   {ratio:5.2f}x{aims.get(name, '')}")
    if peft_model is None:
        print("   PEFT lora.Linear     skipped: peft is not installed (pip install peft to compare its LoRA layer)")


def bitsandbytes_nf4(weight: torch.Tensor):
    """bitsandbytes' CPU ``quantize_4bit`` / ``dequantize_4bit`` of ``weight`` (NF4, blocks of 64),
    as {"quantize": fn, "dequantize": fn} plus its packed bytes and absmax; None without bitsandbytes."""
    try:  # dev-only comparison; the course never needs bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    fns = {
        "quantize": lambda: bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4"),
        "dequantize": lambda: bnbf.dequantize_4bit(packed, state),
    }
    return fns, packed.reshape(-1), state.absmax


def nf4_throughput() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    n = weight.numel()
    packed, absmax = quantize_nf4(weight)
    ours = {
        "quantize": lambda: quantize_nf4(weight),
        "dequantize": lambda: dequantize_nf4(packed, absmax, weight.shape),
    }
    theirs = bitsandbytes_nf4(weight)
    fns = {f"{op} ours": fn for op, fn in ours.items()}
    if theirs is not None:
        fns.update({f"{op} bitsandbytes": fn for op, fn in theirs[0].items()})
    fns["fresh output"] = lambda: torch.empty(n).fill_(1.0)  # the pages of a new fp32 output, written once
    times = interleaved(fns)  # ours and bitsandbytes' in alternating rounds: machine load hits both alike
    print("\n2. NF4 on a 4096 x 4096 fp32 weight, 2 threads (median of 5 alternating rounds)")
    for op in ours:
        t_ours = times[f"{op} ours"]
        line = f"   {op + '_nf4':<16} {t_ours * 1e3:8.1f} ms   {n / t_ours / 1e6:6.1f} M weights/s"
        if theirs is not None:
            t_bnb = times[f"{op} bitsandbytes"]
            line += f"   bitsandbytes {t_bnb * 1e3:8.1f} ms   ours / bnb {t_ours / t_bnb:4.2f}x   (aim <= 1.00x)"
        print(line)
    t_fresh = times["fresh output"]
    print(f"   fresh output     {t_fresh * 1e3:8.1f} ms   (torch.empty + fill_ of the {n * 4 >> 20} MiB fp32 result: "
          f"the floor of any dequantize that allocates)")  # fmt: skip
    if theirs is None:
        print("   bitsandbytes         skipped: not installed (pip install bitsandbytes to time its CPU NF4 alongside)")
    else:
        same = torch.equal(packed, theirs[1]) and torch.equal(absmax, theirs[2])
        print(f"   packed bytes and absmax {'identical to' if same else 'DIFFER from'} bitsandbytes'")
    small_dequantize()
    linear = nn.Linear(4096, 4096, bias=False)
    x = torch.randn(256, 4096)
    with torch.no_grad():
        t_lin = median_seconds(lambda: linear(x))
        for dq in (False, True):
            layer = NF4Linear.from_linear(linear, double_quant=dq)
            t_nf4 = median_seconds(lambda layer=layer: layer(x))
            bits = layer.weight_nbytes() * 8 / linear.weight.numel()
            print(f"   NF4Linear dq={dq!s:<5}  forward {t_nf4 * 1e3:7.1f} ms = {t_nf4 / t_lin:4.2f}x nn.Linear "
                  f"({t_lin * 1e3:.1f} ms, 256 tokens); {bits:.4f} bits/param "
                  f"(analytic {bits_per_parameter(64, dq):.4f})")  # fmt: skip


def small_dequantize() -> None:
    """dequantize_nf4 on the bundled model's largest projection (1376 x 512, a 2.7 MiB result).

    Memory that small is reused by the allocator, so no fresh pages hide the decode's own cost.
    """
    torch.manual_seed(0)
    weight = torch.randn(1376, 512) * 0.02
    packed, absmax = quantize_nf4(weight)
    fns = {"ours": lambda: dequantize_nf4(packed, absmax, weight.shape)}
    theirs = bitsandbytes_nf4(weight)
    if theirs is not None:
        fns["bitsandbytes"] = theirs[0]["dequantize"]
    times = interleaved(fns)
    line = f"   dequantize_nf4 on 1376 x 512 (the bundled model's largest projection) {times['ours'] * 1e3:6.3f} ms"
    if theirs is not None:
        line += f"   bitsandbytes {times['bitsandbytes'] * 1e3:6.3f} ms   ours / bnb {times['ours'] / times['bitsandbytes']:4.2f}x"
    print(line)


def f_linear_forward(self: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    """NF4Linear as F.linear(x, Ŵ, b): the same values, but autograd keeps Ŵ until the backward pass."""
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return F.linear(x.to(self.compute_dtype), self.dequantize_weight(), bias)


STEP_ROWS = {  # label: (TrainConfig.quantize, NF4Linear.forward for the row; None: the layer's own)
    "LoRA": ("none", None),
    "QLoRA": ("nf4", None),
    "QLoRA, F.linear(x, Ŵ, b)": ("nf4", f_linear_forward),
}


@contextlib.contextmanager
def nf4_forward(forward):
    """NF4Linear.forward replaced by ``forward`` inside the block (None: the layer's own), restored after."""
    own = NF4Linear.forward
    NF4Linear.forward = forward or own
    try:
        yield
    finally:
        NF4Linear.forward = own


def training_step(precision: str) -> None:
    from training.memory import MemoryConfig, measure_memory

    data = finetune_data("train")
    steps, activations = {}, {}
    print(f"\n3. One training step of the bundled model, batch 64, {precision}, CPU (median of alternating rounds; "
          "activation bytes: measure_memory)")  # fmt: skip
    for label, (quantize, forward) in STEP_ROWS.items():
        try:
            config = MemoryConfig(quantize=quantize, precision=precision, max_steps=10_000, batch_size=64,
                                  progress=False, device="cpu", output_dir="runs/bench")  # fmt: skip
        except ValueError as error:  # a trainer that refuses this precision on the CPU
            print(f"   skipped: TrainConfig(precision={precision!r}, device='cpu') was refused: {error}")
            return
        trainer = QLoRATrainer(prepare_qlora_model(load_base_model(), config), config, data)
        batch = [trainer.micro_batch(0)]

        def step(trainer=trainer, batch=batch, forward=forward) -> None:
            with nf4_forward(forward):
                trainer.train_step(batch)

        step()  # warm up
        steps[label] = step
        with nf4_forward(forward):
            activations[label] = measure_memory(trainer.model, batch[0], config)["activations"]
    times = interleaved(steps)
    aims = {"QLoRA": "   (aims: time <= 1.5x, activations <= 1.00x)"}
    for label in STEP_ROWS:
        print(f"   {label:<26} {times[label] * 1e3:7.1f} ms = {times[label] / times['LoRA']:4.2f}x LoRA   activations "
              f"{activations[label]:>12,} B = {activations[label] / activations['LoRA']:4.2f}x LoRA{aims.get(label, '')}")  # fmt: skip


VARIANT_STEPS = {
    # label: (apply_variant method, r) — LoRA and DoRA as in section 3; VeRA at PEFT's default rank
    "LoRA": ("lora", 8),
    "DoRA": ("dora", 8),
    "VeRA r=256": ("vera", 256),
    "AdaLoRA": ("adalora", 8),
    "Delta-LoRA": ("delta-lora", 8),
}
VARIANT_AIMS = {"DoRA": "   (aim <= 1.5x)", "VeRA r=256": "   (aim <= 1.5x)", "AdaLoRA": "   (aim <= 1.5x)"}


def variant_steps(precision: str) -> None:
    data = finetune_data("train")
    print(f"\n4. One training step per LoRA-family method, bundled model, batch 64, {precision}, CPU "
          "(median of 5 alternating rounds)")  # fmt: skip
    fns, hooks = {}, []
    try:
        from model.lora_variants import apply_variant  # Stage 5, through the switch; imported here so a

        # submission without it still runs sections 1-3
        for label, (method, r) in VARIANT_STEPS.items():
            config = TrainConfig(quantize="none", precision=precision, max_steps=10_000, batch_size=64,
                                 progress=False, device="cpu", output_dir="runs/bench")  # fmt: skip
            torch.manual_seed(0)
            model, attach = apply_variant(load_base_model(), method, r=r, lora_alpha=16, total_step=100_000)
            trainer = QLoRATrainer(model, config, data)
            hooks.append(attach(trainer.optimizer))  # AdaLoRA's allocator, Delta-LoRA's W0 update; else None
            batch = [trainer.micro_batch(0)]
            trainer.train_step(batch)  # warm up
            fns[label] = lambda trainer=trainer, batch=batch: trainer.train_step(batch)
    except (ImportError, NotImplementedError) as error:
        print(f"   skipped: model/lora_variants.py is missing or not finished ({error})")
        return
    except ValueError as error:  # a trainer that refuses this precision on the CPU
        print(f"   skipped: {error}")
        return
    times = interleaved(fns)
    for label, seconds in times.items():
        ratio = seconds / times["LoRA"]
        print(f"   {label:<12} {seconds * 1e3:7.1f} ms   {ratio:4.2f}x LoRA{VARIANT_AIMS.get(label, '')}")
    for hook in hooks:
        if hook is not None:
            hook.detach()


GENERATION_LENGTHS = (32, 128, 512)  # new tokens after the prompt


def generation_speed(rounds: int = 3) -> None:
    """Section 5: tokens per second of greedy generation with and without the KV cache (median of ``rounds``).

    Wall time, and the process's CPU time beside it (all threads): on a shared machine the CPU time
    still shows the cost per token when the wall time mostly shows the other processes.
    """
    import time

    from model.tiny_llama import KVCache, LlamaConfig, TinyLlama
    from training.generate import generate

    config = LlamaConfig(vocab_size=353, max_seq_len=640, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                         d_ff=352, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = TinyLlama(config).eval()
    prompt = [list(range(1, 17))]
    generate(model, prompt, None, 8)  # warm up
    print(f"\n5. Greedy generation after a 16-token prompt: a random {config.n_layers}-layer model, width "
          f"{config.d_model}, {config.n_heads} / {config.kv_heads} heads, fp32, {torch.get_num_threads()} threads "
          f"(median of {rounds})")  # fmt: skip
    print("   new tokens   with the cache: tok/s, ms/token (CPU)   without: tok/s, ms/token (CPU)   speed-up")
    for n in GENERATION_LENGTHS:
        wall: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):  # alternating, so that drift hits both alike
            for use_cache in wall:
                start, start_cpu = time.perf_counter(), time.process_time()
                generate(model, prompt, None, n, use_cache=use_cache)
                wall[use_cache].append(time.perf_counter() - start)
                cpu[use_cache].append(time.process_time() - start_cpu)
        (cached, full), (cached_cpu, full_cpu) = ([statistics.median(t[k]) for k in (True, False)] for t in (wall, cpu))
        print(f"   {n:10d}   {n / cached:13.0f} {cached / n * 1e3:6.2f} ({cached_cpu / n * 1e3:5.2f})"
              f"   {n / full:20.0f} {full / n * 1e3:6.2f} ({full_cpu / n * 1e3:5.2f})   {full / cached:6.1f}x")  # fmt: skip
    per_token = KVCache.bytes_per_token(config, torch.float32)
    print(f"   the cache: {per_token:,} bytes per token (2 · {config.n_layers} layers · {config.kv_heads} kv heads · "
          f"head_dim {config.head_dim} · 4 bytes), {per_token * (16 + 511):,} bytes at 16 + 511 positions")  # fmt: skip


def main() -> None:
    precision = bench_precision()
    torch.set_num_threads(THREADS)
    lora_layer_overhead()
    nf4_throughput()
    training_step(precision)
    variant_steps(precision)
    generation_speed()


if __name__ == "__main__":
    main()
