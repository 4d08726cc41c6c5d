"""Recompute the figures the lesson pages quote and check that each page prints them as computed.

    .venv/bin/python -m solutions.tools.figures      (exit 0: every figure matches; 1: a mismatch)

Every number in ``tutorial/01``–``04`` that follows from the code or from arithmetic (bits per
parameter, parameter counts, fp16/bf16 limits, the NF4 table, worked examples, memory tables,
schedule values, deterministic ratios) has an entry below: a function that computes it with the
reference implementation (``LORA_IMPL=solutions``) or with torch, and returns the exact text the
page must contain. Pages are compared after collapsing runs of whitespace, so a snippet may span a
line break. A check fails when its text is missing from the page: either the page drifted from the
code or the code from the page. Runs in a few seconds (no training).

Not checked here, on purpose:

* Timings (``make bench``): they vary from run to run and machine to machine. The pages label them
  "measured on 2 cores, ``make bench``" and give ranges.
* Figures that need a training run. The notebook cell that prints each one asserts it instead:
    - notebook 01: merged vs unmerged output differences "around 1e-6"; the FLOP counts also here.
    - notebook 02: 0 % → 100 % on ``increment`` and 100 % → 0 % on the pretraining tasks; merged vs
      unmerged logits "a few times 1e-5"; rank(ΔW) = r; the adapter file's 164 KB (also here).
    - notebook 03: the outlier experiment (~30 % of the weights rounded to 0, about a dozen distinct
      codes, ~20× the error); NF4 + DQ measured 4.12696 against the analytic 4.12695 (also here).
    - notebook 04: ‖ΔW‖/‖Ŵ0‖ ≈ 0.4 for the trained ``q_proj``, ~99 % of it kept and ~9 % of ‖W‖ of
      fresh error after re-quantizing, ~2 % kept at 1 % of ‖Ŵ0‖, the merged 4-bit model at 100 %;
      clipping before unscaling (SGD's steps > 10,000× smaller, AdamW's ~0.9×); the CPU autocast
      dtypes; the LoRA weights at 1.72× the bf16-base estimate.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("LORA_IMPL", "solutions")  # before any `import model.*`: check against the reference

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PAGES = {
    "01": REPO / "tutorial" / "01-lora-layer.md",
    "02": REPO / "tutorial" / "02-lora-in-a-model.md",
    "03": REPO / "tutorial" / "03-quantization.md",
    "04": REPO / "tutorial" / "04-qlora-training.md",
}


@dataclass(frozen=True)
class Figure:
    page: str  # "01" … "04"
    what: str  # what the figure is, for the report
    snippets: Callable[[], list[str]]  # the texts the page must contain, computed


FIGURES: list[Figure] = []


def figure(page: str, what: str):
    """Register a function returning the snippet(s) ``page`` must contain."""

    def register(fn: Callable[[], str | list[str]]):
        def snippets() -> list[str]:
            result = fn()
            return [result] if isinstance(result, str) else list(result)

        FIGURES.append(Figure(page, what, snippets))
        return fn

    return register


# ---- formatting helpers: print numbers the way the pages do ---------------------------------


def tex_int(n: int) -> str:
    """65536 -> '65{,}536' (LaTeX thousands separator)."""
    return f"{n:,}".replace(",", "{,}")


def minus(x: float, digits: int) -> str:
    """-0.69619 -> '−0.6962' (typographic minus, as in the NF4 table)."""
    text = f"{x:.{digits}f}"
    return text.replace("-", "−")


def level(x: float) -> str:
    """An NF4 level as the table prints it: 4 decimals, ±1.0 and 0.0 with one."""
    if x in (-1.0, 0.0, 1.0):
        return minus(x, 1)
    return minus(x, 4)


def gb(n_bytes: float, digits: int) -> str:
    return f"{n_bytes / 1e9:,.{digits}f} GB"


def lora_params_llama(n_layers: int, d: int, d_ff: int, r: int = 8) -> int:
    """r·(in + out) for q, k, v, o (d → d), gate, up (d → d_ff) and down (d_ff → d), every layer."""
    return n_layers * r * (4 * (d + d) + 2 * (d + d_ff) + (d_ff + d))


def llama_params(vocab: int, n_layers: int, d: int, d_ff: int) -> int:
    """Parameters of a Llama-style model without biases, untied embedding and head."""
    per_layer = 4 * d * d + 3 * d * d_ff + 2 * d  # attention, SwiGLU MLP, two RMSNorm gains
    return 2 * vocab * d + n_layers * per_layer + d  # embedding + head, blocks, final norm


LLAMA2_7B = llama_params(32_000, 32, 4096, 11_008)  # 6,738,415,616
T_7B = lora_params_llama(32, 4096, 11_008)
T_65B = lora_params_llama(80, 8192, 22_016)


# ---- Lesson 01: the LoRA layer --------------------------------------------------------------


@figure("01", "LoRA parameters for d = k = 4096, r = 8, and the ratio to the full layer")
def _lesson01_counts():
    from model.lora import LoRALayer

    layer = LoRALayer(4096, 4096, r=8, base_layer=nn.Linear(4096, 4096, bias=False, device="meta"))
    lora = layer.lora_A.numel() + layer.lora_B.numel()
    full = 4096 * 4096
    return [
        f"$8 \\cdot (4096 + 4096) = {tex_int(lora)}$",
        f"$4096^2 = {tex_int(full)}$: **{full // lora}× fewer**",
        f'"about 250× fewer" (exactly {full // lora}×)',
    ]


@figure("01", "FLOPs per token of the LoRA path, the base layer and B·A (4096 × 4096, r = 8)")
def _lesson01_flops():
    d = k = 4096
    r = 8
    lora, base, ba = 2 * r * (k + d), 2 * d * k, 2 * d * k * r
    return [
        f"about {100 * lora / base:.1f} % for $d = k = 4096$, $r = 8$ ({lora:,} against {base:,})",
        f"({round(ba / 1e6)} million for the same layer)",
    ]


@figure("01", "LoRA's share of the FLOPs of a 512 → 512 layer (the bench layer)")
def _lesson01_bench_flops():
    d = k = 512
    return f"LoRA adds only {round(100 * 2 * 8 * (k + d) / (2 * d * k))} % of the FLOPs"


@figure("01", "a square 64 × 64 layer with r = 8 trains a quarter as many parameters")
def _lesson01_quarter():
    share = Fraction(8 * (64 + 64), 64 * 64)
    name = {Fraction(1, 4): "a quarter", Fraction(1, 2): "half"}[share]
    return f"still trains {name} as many parameters as it has"


@figure("01", "the default scaling and the alpha-only mistake at r = 64")
def _lesson01_scaling():
    from model.lora import LoRALayer

    default = LoRALayer(4, 4)
    r, alpha = 64, 16
    return [
        f"`r={default.r}`, `lora_alpha={default.lora_alpha:g}`, scaling {default.scaling:g}",
        f"$r = {r}$ with $\\alpha = {alpha}$ scales the update {round(alpha / (alpha / r))} times more",
    ]


@figure("01", "Kaiming-uniform with a = √5: gain √(1/3), bound 1/√k")
def _lesson01_kaiming():
    a2 = 5  # a = sqrt(5)
    gain_sq = Fraction(2, 1 + a2)
    assert gain_sq == Fraction(1, 3)
    k = 1024  # the bound gain·√(3/k) = 1/√k, checked against torch's own init
    w = torch.empty(64, k)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    assert w.abs().max() <= 1 / math.sqrt(k)
    return f"$\\sqrt{{2/(1+a^2)}} = \\sqrt{{{gain_sq}}}$"


# ---- Lesson 02: LoRA in a model -------------------------------------------------------------


def _peft_line(model: nn.Module) -> str:
    from model.lora import print_trainable_parameters

    with contextlib.redirect_stdout(io.StringIO()):
        return print_trainable_parameters(model)


@figure("02", "PEFT's line for LoRALayer(64, 64, r=8) and its two counts")
def _lesson02_layer_line():
    from model.lora import LoRALayer

    layer = LoRALayer(64, 64, r=8)
    base = sum(p.numel() for p in layer.base_layer.parameters())
    lora = layer.lora_A.numel() + layer.lora_B.numel()
    return [
        _peft_line(layer),
        f"$8 \\cdot (64 + 64) = {tex_int(lora)}$ LoRA parameters next to $64 \\cdot 64 + 64 = {tex_int(base)}$",
    ]


@figure("02", "the tiny Llama with r = 8 on the seven projections: per block, total, PEFT's line, shares")
def _lesson02_tiny_llama():
    from model.lora import get_lora_model
    from model.tiny_llama import load_base_model

    base = load_base_model()
    n_base = sum(p.numel() for p in base.parameters())
    cfg = base.config
    attention, mlp = 4 * 8 * (cfg.d_model * 2), 3 * 8 * (cfg.d_model + cfg.d_ff)
    model = get_lora_model(load_base_model(), r=8, lora_alpha=16)
    line = _peft_line(model)
    trainable = int(re.search(r"trainable params: ([\d,]+)", line).group(1).replace(",", ""))
    total = n_base + trainable
    assert trainable == cfg.n_layers * (attention + mlp)
    return [
        f"= {tex_int(attention)} + {tex_int(mlp)} = {tex_int(attention + mlp)},",
        f"so ${tex_int(trainable)}$ trainable parameters next to the base's ${tex_int(n_base)}$:",
        f"`{line}`",
        f"{100 * trainable / n_base:.1f} % of the base's parameter count (about a fifth), or "
        f"{100 * trainable / total:.1f} % of all parameters once it is added (about a sixth",
    ]


@figure("02", "a 7B Llama with the same recipe: adapter size and share, adapter file and fp16 base")
def _lesson02_7b():
    return [
        f"is about {round(T_7B / 1e6)} million parameters, {100 * T_7B / LLAMA2_7B:.1f} % of the model",
        f"({LLAMA2_7B / 1e9:.2f} billion parameters) about {round(4 * T_7B / 1e6)} MB in fp32 against "
        f"{2 * LLAMA2_7B / 1e9:.1f} GB for the fp16 base",
    ]


@figure("02", "the saved r = 8 adapter file and the base checkpoint, in KB")
def _lesson02_file_sizes():
    from model.lora import ADAPTER_WEIGHTS_NAME, get_lora_model, save_lora
    from model.tiny_llama import load_base_model

    with tempfile.TemporaryDirectory() as tmp:
        save_lora(get_lora_model(load_base_model(), r=8, lora_alpha=16), tmp)
        adapter = (Path(tmp) / ADAPTER_WEIGHTS_NAME).stat().st_size
    checkpoint = (REPO / "model" / "checkpoints" / "base_model.safetensors").stat().st_size
    return f"{round(adapter / 1e3)} KB for the tiny Llama's $r = 8$ adapter, against {round(checkpoint / 1e3)} KB"


# ---- Lesson 03: quantization ----------------------------------------------------------------


@figure("03", "the uniform 4-bit worked example x = [-0.2, 0.1, 0.5]")
def _lesson03_uniform():
    from model.quant import dequantize_tensor, quantize_tensor

    x = torch.tensor([-0.2, 0.1, 0.5])
    q, scale, zero = quantize_tensor(x, num_bits=4)
    x_hat = dequantize_tensor(q, scale, zero)
    s = scale.item()
    assert (x_hat - x).abs().max().item() <= s / 2
    return [
        f"$s = 0.7/15 = {s:.5f}$, $z = \\operatorname{{round}}({0.2 / s:.2f}) = {zero.item()}$, "
        f"$q = [{', '.join(str(v) for v in q.tolist())}]$",
        f"$\\hat x = [{', '.join(f'{v:.4f}' for v in x_hat.tolist())}]$",
        f"$s/2 = {s / 2:.4f}$",
    ]


@figure("03", "one outlier of 100σ under int8 absmax: scale, rounding threshold, fraction rounded to 0")
def _lesson03_outlier():
    s = 100 / 127
    p_zero = math.erf((s / 2) / math.sqrt(2))  # P(|Z| < s/2)
    return [
        f"$s = 100\\sigma/127 \\approx {s:.2f}\\sigma$",
        f"$|x| < s/2 \\approx {s / 2:.2f}\\sigma$ is rounded to 0 — about {round(100 * p_zero, -1):.0f} %",
        f"($P(|Z| < {s / 2:.2f}) \\approx {p_zero:.2f}$)",
        f"$32/64 = {32 / 64}$",
    ]


@figure("03", "the NF4 offset, its reconstruction, Φ⁻¹(δ), the 16 levels")
def _lesson03_nf4():
    from model.quant import NF4_OFFSET, NF4_PUBLISHED, nf4_code_book

    code = nf4_code_book()
    assert code.tolist() == list(NF4_PUBLISHED)
    reconstruction = ((1 - Fraction(1, 30)) + (1 - Fraction(1, 32))) / 2
    assert round(float(reconstruction), 7) == NF4_OFFSET
    levels = [level(v) for v in code.tolist()]
    levels[7] = f"**{levels[7]}**"
    largest = torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)).item()
    return [
        f"`NF4_OFFSET` $= {NF4_OFFSET}$",
        f"= {float(reconstruction):.8f}\\ldots",
        f"$\\Phi^{{-1}}(\\delta) \\approx {largest:.4f}$",
        "| level | " + " | ".join(levels[:8]) + " |",
        "| level | " + " | ".join(levels[8:]) + " |",
        "**8 positive** levels (" + ", ".join(f"{v:.4f}" for v in code[8:15].tolist()) + ", 1.0)",
    ]


@figure("03", "FP4 (E2M1): 15 distinct values, steps 1/12 near 0 and 1/3 at the top")
def _lesson03_fp4():
    from model.quant import fp4_code_book

    code = fp4_code_book()
    steps = [Fraction(b - a).limit_denominator(100) for a, b in zip(code[:-1].tolist(), code[1:].tolist())]
    return [
        f"**{code.numel()} distinct values**",
        f"the steps near 0 are {min(steps)} wide, the top step, from 4/6 to 1, is {steps[-1]} wide",
    ]


@figure("03", "the NF4 worked example x = [0.1, 0.2, 0.3, -0.3] and the (7, 13) sizes")
def _lesson03_nf4_example():
    from model.quant import dequantize_nf4, quantize_nf4, unpack_nibbles

    x = torch.tensor([0.1, 0.2, 0.3, -0.3])
    packed, absmax = quantize_nf4(x)
    codes = unpack_nibbles(packed, 4).tolist()
    x_hat = dequantize_nf4(packed, absmax, x.shape).tolist()
    hat = ", ".join(f"{v:.4f}".rstrip("0").rstrip(".") if abs(abs(v) - 0.3) < 1e-6 else f"{v:.4f}" for v in x_hat)
    u = [v / absmax.item() for v in x.tolist()]
    w_packed, w_absmax = quantize_nf4(torch.randn(7, 13))
    return [
        f"$u \\approx [{', '.join(f'{v:.3f}'.rstrip('0').rstrip('.') for v in u)}]$",
        f"codes `[{', '.join(map(str, codes))}]`",
        f"= [{', '.join(map(str, packed.tolist()))}]`",
        f"$\\hat x = [{hat}]$",
        f"a `(7, 13)` weight has {7 * 13} elements → {w_absmax.numel()} blocks (64 and {7 * 13 - 64}) → "
        f"{w_packed.numel()} bytes and {w_absmax.numel()} absmax values",
    ]


@figure("03", "bits per parameter: 4.5, 4.127, their terms, the saving and its size at 65B")
def _lesson03_bits():
    from model.quant import NF4Linear, bits_per_parameter

    plain, dq = bits_per_parameter(64), bits_per_parameter(64, double_quant=True)
    saving = plain - dq
    n = 4096 * 4096
    measured = NF4Linear(4096, 4096, bias=False, double_quant=True).weight_nbytes() * 8 / n
    assert NF4Linear(4096, 4096, bias=False, double_quant=False).weight_nbytes() * 8 / n == plain
    return [
        f"4 + \\frac{{32}}{{64}} = {plain} \\text{{ bits per parameter.}}",
        f"= 4 + {8 / 64} + {32 / (64 * 256):.5f} = {dq:.3f} \\text{{ bits}}",
        f"4 + 8/64 = {4 + 8 / 64} is not the paper's {dq:.3f}",
        f"The saving, ${saving:.3f}$ bits per parameter, is ${saving:.3f} \\times 65 \\cdot 10^9 / 8 "
        f"\\approx {saving * 65e9 / 8 / 1e9:.1f}$ GB",
        f"(0.5/{plain} = {0.5 / plain * 100:.0f} % of the storage)",
        f"measured {measured:.5f} against the analytic {dq:.5f}",
    ]


@figure("03", "the memory table (7B and 65B) and the bf16 comparison")
def _lesson03_memory_table():
    from model.quant import bits_per_parameter

    rows = []
    for name, bits in (("fp32", 32), ("fp16", 16), ("bf16", 16), ("int8 (+ its scales)", 8)):
        rows.append(f"| {name} | {bits} | {bits // 8} | {gb(7e9 * bits / 8, 1)} | {gb(65e9 * bits / 8, 1)} |")
    plain, dq = bits_per_parameter(64), bits_per_parameter(64, double_quant=True)
    rows.append(f"| NF4, blocks of 64, fp32 absmax | {plain} | {plain / 8:.4f} | {gb(7e9 * plain / 8, 2)} | "
                f"{gb(65e9 * plain / 8, 1)} |")  # fmt: skip
    rows.append(f"| NF4 + double quantization | {dq:.3f} | {dq / 8:.4f} | {gb(7e9 * dq / 8, 2)} | "
                f"{gb(65e9 * dq / 8, 1)} |")  # fmt: skip
    return [
        *rows,
        f"$65 \\cdot 10^9 \\times {dq:.3f} / 8 \\approx {65e9 * dq / 8 / 1e9:.1f}$ GB",
        f"In bf16 the same weights alone would need {round(65e9 * 2 / 1e9)} GB.",
    ]


@figure("03", "what F.linear keeps of the 4-bit weights on wide_config(): weights, bytes in fp32 and bf16")
def _lesson03_weight_copies():
    from training.memory import projection_shapes, wide_config

    config = wide_config()
    shapes = projection_shapes(config)
    # Block 0's q, k and v read the frozen embedding's output (no gradient needed): F.linear saves nothing there.
    numel = config.n_layers * sum(o * i for o, i in shapes.values()) - sum(shapes[n][0] * shapes[n][1] for n in
                                                                             ("q_proj", "k_proj", "v_proj"))  # fmt: skip
    projections = config.n_layers * len(shapes)
    return [
        f"The difference is {4 * numel:,} bytes in fp32: 4 bytes for each of {numel:,} weights, those of",
        f"{projections - 3} of the {projections} projections",
        f"in bf16 it is 2 bytes each, {2 * numel:,} bytes",
    ]


@figure("03", "bitsandbytes' CPU 8-bit lookup table: how often it misses the nearest code (golden cases)")
def _lesson03_lut_misses():
    from safetensors.torch import load_file

    from model.quant import double_quantize

    golden = load_file(REPO / "testcases" / "fixtures" / "nf4_golden.safetensors")
    rates = []
    for case in ("dq_fp32_40x500", "dq_fp32_64x512"):
        codes, _, _ = double_quantize(golden[f"{case}.absmax_fp32"])
        differ = int((codes != golden[f"{case}.qabsmax"].reshape(-1)).sum())
        rates.append(codes.numel() / max(differ, 1))
    low, high = sorted(round(rate, -2) for rate in rates)
    return f"about 1 code in {low:.0f}–{high:.0f} in the golden cases"


# ---- Lesson 04: QLoRA training --------------------------------------------------------------


def _sci(x: float, digits: int = 1) -> str:
    """3.4e38 -> '3.4 \\times 10^{38}'."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa} \\times 10^{{{int(exponent)}}}"


@figure("04", "the fp32 / fp16 / bf16 table")
def _lesson04_formats():
    f32, f16, b16 = torch.finfo(torch.float32), torch.finfo(torch.float16), torch.finfo(torch.bfloat16)
    tiny16 = torch.tensor(2.0**-24, dtype=torch.float16)
    assert tiny16.item() > 0 and (tiny16.float() / 2).half().item() == 0  # the smallest fp16 subnormal
    return [
        f"| fp32 | 1 / 8 / 23 | ${_sci(f32.max)}$ | ${_sci(f32.smallest_normal)}$ | "
        f"$2^{{-23}} \\approx {_sci(f32.eps)}$ | 7 |",
        f"| fp16 | 1 / 5 / 10 | ${f16.max:,.0f}$ | ${_sci(f16.smallest_normal)}$ (subnormals down to "
        f"$2^{{-24}} \\approx {_sci(tiny16.item(), 2)}$) | $2^{{-10}} \\approx {_sci(f16.eps)}$ | 3 |".replace(
            "65,504", "65\\,504"
        ),
        f"| bf16 | 1 / 8 / 7 | ${_sci(b16.max)}$ | ${_sci(b16.smallest_normal)}$ | $2^{{-7}} = {_sci(b16.eps)}$ | 2 |",
    ]


@figure("04", "fp16's edges: 2^-25 rounds to 0, 65,504 is the largest, 65,520 overflows")
def _lesson04_fp16_edges():
    half_tiny = torch.tensor(2.0**-25)
    assert half_tiny.half().item() == 0.0
    assert torch.nextafter(half_tiny, torch.tensor(1.0)).half().item() == 2.0**-24
    assert torch.tensor(1e-8).half().item() == 0.0
    largest = torch.finfo(torch.float16).max
    first_inf = next(v for v in range(65_504, 66_000) if torch.tensor(float(v)).half().isinf())
    assert torch.tensor(first_inf - 0.01).half().item() == largest
    return [
        f"$2^{{-25}} \\approx {_sci(half_tiny.item(), 2)}$, to zero",
        f"{largest:,.0f} is the largest finite value, values up to just below {first_inf:,} still round down",
        f"{first_inf:,} and everything above become `inf`",
    ]


def _smallest_kept_change(x: float) -> float:
    lo, hi = 0.0, 0.01
    for _ in range(50):
        mid = (lo + hi) / 2
        same = torch.tensor(x * (1 + mid)).bfloat16() == torch.tensor(x).bfloat16()
        lo, hi = (mid, hi) if same else (lo, mid)
    return hi


@figure("04", "bf16: 1 + 1e-3 = 1, the lost-change range and the spacing")
def _lesson04_bf16():
    assert (torch.tensor(1.0).bfloat16() + torch.tensor(1e-3).bfloat16()).item() == 1.0
    low, high = _smallest_kept_change(2 - 2**-7), _smallest_kept_change(1.0)
    eps = torch.finfo(torch.bfloat16).eps
    spacing = f"{100 * eps / 2:.2f}–{100 * eps:.2f} %"
    lost = f"{100 * low:.1f}–{100 * high:.2f} %"
    return [
        f"changes smaller than {lost} of a number are lost",
        f"bf16 numbers lie {spacing} apart",
        f"a step below half the spacing ({lost})",
    ]


@figure("04", "the NF4 grid steps, relative to the block's absmax: smallest and largest")
def _lesson04_nf4_steps():
    from model.quant import nf4_code_book

    gaps = nf4_code_book().diff()
    return (
        f"whose steps are {round(100 * gaps.min().item())} % (near zero, where most weights are) to "
        f"{round(100 * gaps.max().item())} % (near ±1)"
    )


@figure("04", "the learning-rate schedule's worked values (N = 100, warmup 0.1) and the default warmup")
def _lesson04_schedule():
    from training.qlora_trainer import TrainConfig, lr_factor

    def f(step: int, scheduler: str = "linear", n: int = 100, ratio: float = 0.1) -> float:
        return lr_factor(step, TrainConfig(max_steps=n, warmup_ratio=ratio, lr_scheduler=scheduler))

    def g(v: float) -> str:
        return f"{v:g}"

    default = TrainConfig()
    warmup = math.ceil(default.warmup_ratio * default.max_steps)
    assert (
        f(warmup - 1, n=default.max_steps, ratio=default.warmup_ratio)
        < 1
        == f(warmup, n=default.max_steps, ratio=default.warmup_ratio)
    )
    return [
        f"linear $f(0) = {g(f(0))}$, $f(5) = {g(f(5))}$, $f(10) = {g(f(10))}$, "
        f"$f(55) = 1 - 45/90 = {g(f(55))}$, $f(100) = {g(f(100))}$",
        f"cosine $f(10) = {g(f(10, 'cosine'))}$, $f(55) = \\tfrac12(1 + \\cos\\tfrac{{\\pi}}{{2}}) = {g(f(55, 'cosine'))}$",
        f"constant $f(70) = {g(f(70, 'constant'))}$",
        f"($N = {default.max_steps}$, ratio {default.warmup_ratio:g}) the warmup is {warmup} steps",
    ]


@figure("04", "the memory table for 7B and 65B, the adapter counts and the bytes per parameter")
def _lesson04_memory():
    from training.qlora_trainer import estimate_memory

    def total(n: float, method: str, t: float = 0) -> float:
        return estimate_memory(n, method, trainable_params=t)["total"]

    qlora_weights = estimate_memory(1.0, "qlora")["weights"]
    no_dq = estimate_memory(1.0, "qlora", double_quant=False)["weights"]
    full = estimate_memory(1.0, "full")
    share = (full["gradients"] + full["optimizer"]) / full["total"]
    return [
        f"has $T = {T_7B:,}$".replace(",", "\\,"),
        f"has $T \\approx {T_65B / 1e6:.1f}$ M",
        f"| full fine-tuning, fp32 AdamW: $16N$ | **{gb(total(7e9, 'full'), 0)}** | **{gb(total(65e9, 'full'), 0)}** |",
        f'$12N$ (our reading of the paper\'s ">780GB") | {gb(12 * 7e9, 0)} | **{gb(12 * 65e9, 0)}** |',
        f"| LoRA, bf16 base: $2N + 16T$ | {gb(total(7e9, 'lora', T_7B), 1)} | {gb(total(65e9, 'lora', T_65B), 1)} |",
        f"| QLoRA weights alone: $N \\cdot 4.127 / 8$ | {gb(estimate_memory(7e9, 'qlora')['weights'], 2)} | "
        f"**{gb(estimate_memory(65e9, 'qlora')['weights'], 1)}** |",
        f"| QLoRA: $N \\cdot 4.127/8 + 16T$ | {gb(total(7e9, 'qlora', T_7B), 2)} | {gb(total(65e9, 'qlora', T_65B), 1)} |",
        f"bits with double quantization ({qlora_weights:.3f} B per parameter), 4.5 bits ({no_dq:.4f} B)",
        f"gradients and optimizer states are {'three quarters' if share == 0.75 else share} of the bill",
    ]


@figure("04", "the bundled model: base parameters, the share in the 28 projections, the r = 8 adapter")
def _lesson04_bundled():
    from model.tiny_llama import load_base_model

    base = load_base_model()
    n = sum(p.numel() for p in base.parameters())
    linears = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    in_projections = sum(m.weight.numel() for _, m in linears)
    cfg = base.config
    return [
        f"($N$ = {n:,}, of which {in_projections:,} sit in the {len(linears)} projections; $T$ = "
        f"{lora_params_llama(cfg.n_layers, cfg.d_model, cfg.d_ff):,}",
        f"The base model ({cfg.n_layers} layers, $d = {cfg.d_model}$, {n:,} parameters)",
    ]


# ---- the checker ----------------------------------------------------------------------------


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def main() -> int:
    started = time.perf_counter()
    pages = {key: normalise(path.read_text()) for key, path in PAGES.items()}
    failures, checked = [], 0
    for fig in FIGURES:
        try:
            snippets = fig.snippets()
        except Exception as error:  # the code itself disagrees with an assumption above
            failures.append(f"tutorial/{PAGES[fig.page].name}: {fig.what}: computing it failed: {error!r}")
            continue
        for snippet in snippets:
            checked += 1
            if normalise(snippet) not in pages[fig.page]:
                failures.append(
                    f"tutorial/{PAGES[fig.page].name}: {fig.what}:\n    expected the page to contain: {snippet}"
                )
    seconds = time.perf_counter() - started
    for failure in failures:
        print("MISMATCH", failure)
    print(
        json.dumps(
            {"figures": len(FIGURES), "snippets": checked, "mismatches": len(failures), "seconds": round(seconds, 1)}
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
