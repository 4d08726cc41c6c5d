"""Recompute the figures the lesson pages quote and check that each page prints them as computed.

    .venv/bin/python -m solutions.tools.figures      (exit 0: every figure matches; 1: a mismatch)

Every number in ``tutorial/01``–``04`` that follows from the code or from arithmetic (bits per
parameter, parameter counts, fp16/bf16 limits, the NF4 table, worked examples, memory tables,
schedule values, deterministic ratios), and the memory budgets of ``tutorial/06`` and ``08`` (Stage 6's
``estimate_memory_parts``, which ``measure_memory`` equals to the byte: testcases/stage6 and
``real_models_test.py``), has an entry below: a function that computes it with the
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
    "06": REPO / "tutorial" / "06-memory.md",
    "08": REPO / "tutorial" / "08-real-models-and-scale.md",
}


@dataclass(frozen=True)
class Figure:
    page: str  # "01" … "04", "06", "08"
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


# ---- Lessons 06 and 08: memory budgets (Stage 6's estimate, equal to measure_memory) --------------

RTX_A6000_BYTES = 49_140 * 2**20  # a "48 GB" card: nvidia-smi reports 49,140 MiB (48 GiB less a reserve)


def llama_7b():
    from model.tiny_llama import LlamaConfig

    return LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048)


def llama_65b():
    from model.tiny_llama import LlamaConfig

    return LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, d_ff=22016, max_seq_len=2048)


def gb_cell(n_bytes: float) -> str:
    """A GB cell of the budget tables: 2 decimals from 1 GB up, 3 below (1 GB = 10^9 B)."""
    return f"{n_bytes / 1e9:,.{2 if n_bytes >= 1e9 else 3}f}"


def budget_row(label: str, parts: dict, bold_total: bool = False) -> str:
    cells = [gb_cell(parts[k]) for k in ("weights", "gradients", "optimizer", "activations")]
    total = f"{parts['total'] / 1e9:,.2f}"
    return f"| {label} | " + " | ".join(cells) + f" | {'**' + total + '**' if bold_total else total} |"


def parts(config, method, optimizer="adamw", n=512, checkpointing=False, r=8, base_dtype="fp32", precision="bf16"):
    from training.memory import MIN_8BIT_SIZE, estimate_memory_parts

    return estimate_memory_parts(
        config, method, optimizer, 1, n, precision, checkpointing, r, MIN_8BIT_SIZE, base_dtype
    )


LESSON06_7B_ROWS = (
    ("full fine-tuning, AdamW", "full", "adamw", False, "fp32", True),
    ("full fine-tuning, AdamW8bit", "full", "adamw8bit", False, "fp32", False),
    ("LoRA ($r = 8$, fp32 base), AdamW", "lora", "adamw", False, "fp32", False),
    ('LoRA ($r = 8$, bf16 base: `base_dtype="bf16"`), AdamW', "lora", "adamw", False, "bf16", False),
    ("QLoRA, AdamW", "qlora", "adamw", False, "fp32", False),
    ("QLoRA, AdamW8bit", "qlora", "adamw8bit", False, "fp32", False),
    ("QLoRA, AdamW8bit, checkpointing", "qlora", "adamw8bit", True, "fp32", True),
)


@figure("06", "§1: the 7B budget, 512 tokens, bf16 (every row of the table)")
def _lesson06_7b():
    cfg = llama_7b()
    return [
        budget_row(label, parts(cfg, m, o, 512, c, base_dtype=b), bold) for label, m, o, c, b, bold in LESSON06_7B_ROWS
    ]


@figure("06", "§1: the 65B budget, 512 and 2,048 tokens, bf16 (every row of the table)")
def _lesson06_65b():
    cfg = llama_65b()
    rows = [
        ("full fine-tuning, AdamW, $N = 512$", "full", "adamw", 512, False, "fp32", True),
        ("full fine-tuning, AdamW8bit, $N = 512$", "full", "adamw8bit", 512, False, "fp32", False),
        ("LoRA, fp32 base, AdamW, $N = 512$", "lora", "adamw", 512, False, "fp32", False),
        ("LoRA, bf16 base, AdamW, $N = 512$", "lora", "adamw", 512, False, "bf16", False),
        ("QLoRA, AdamW, $N = 512$", "qlora", "adamw", 512, False, "fp32", False),
        ("QLoRA, AdamW8bit, checkpointing, $N = 512$", "qlora", "adamw8bit", 512, True, "fp32", True),
        ("QLoRA, AdamW8bit, checkpointing, $N = 2048$", "qlora", "adamw8bit", 2048, True, "fp32", True),
        ("QLoRA, AdamW8bit, **no** checkpointing, $N = 2048$", "qlora", "adamw8bit", 2048, False, "fp32", False),
    ]
    return [budget_row(label, parts(cfg, m, o, n, c, base_dtype=b), bold) for label, m, o, n, c, b, bold in rows]


@figure("06", "§1: the arithmetic behind the 7B cells, the 65B text and the A6000's bytes")
def _lesson06_text():
    from training.memory import projection_shapes

    cfg7, cfg65 = llama_7b(), llama_65b()
    lora = parts(cfg7, "lora", base_dtype="fp32")
    lora16 = parts(cfg7, "lora", base_dtype="bf16")
    qlora = parts(cfg7, "qlora")
    proj7 = sum(o * i for o, i in projection_shapes(cfg7).values()) * cfg7.n_layers
    copies = 2 * sum(o * i for o, i in projection_shapes(cfg7).values())
    no_ckpt = parts(cfg65, "qlora", "adamw8bit", 2048)
    ckpt = parts(cfg65, "qlora", "adamw8bit", 2048, True)
    return [
        f'a bf16 base (`base_dtype="bf16"`) is $2 \\cdot {tex_int(proj7)} + 4 \\cdot (262{{,}}144{{,}}000 + '
        f"266{{,}}240) = {gb_cell(lora16['weights'] - 4 * 19_988_480)}$ GB",
        f"**Activations** (§5): {gb_cell(lora['activations'])} GB for LoRA on its fp32 base",
        f"{gb_cell(lora['activations'] - lora16['activations'])} GB of them are copies of the weights",
        f"$2 \\cdot (4d^2 + 3df) = {tex_int(copies)}$ B per block",
        f"QLoRA and LoRA on a bf16 base keep none: {gb_cell(qlora['activations'])} GB",
        f"one 2,048-token sequence needs {gb_cell(no_ckpt['activations'])} GB of activations",
        f"checkpointing brings them to {gb_cell(ckpt['activations'])} GB",
        f"{RTX_A6000_BYTES:,} B = {RTX_A6000_BYTES / 1e9:.2f} GB",
    ]


@figure("06", "§1: which trick removes which part (7B, bf16, 512 tokens)")
def _lesson06_tricks():
    cfg = llama_7b()
    full, lora = parts(cfg, "full"), parts(cfg, "lora")
    q8, q8c = parts(cfg, "qlora", "adamw8bit"), parts(cfg, "qlora", "adamw8bit", 512, True)
    full_ckpt = parts(cfg, "full", checkpointing=True)
    return [
        f"| gradients | {gb_cell(full['gradients'])} GB | LoRA: only the adapters have a `.grad` (Stages 1–2) | "
        f"{gb_cell(lora['gradients'])} GB |",
        f"| optimizer states | {gb_cell(full['optimizer'])} GB | LoRA ({gb_cell(lora['optimizer'])} GB), then 8-bit "
        f"states (§2) | {gb_cell(q8['optimizer'])} GB |",
        f"| weights | {gb_cell(full['weights'])} GB | NF4 + double quantization (Stage 3) | {gb_cell(q8['weights'])} GB |",
        f"| activations | {gb_cell(full['activations'])} GB | gradient checkpointing (§5) | "
        f"{gb_cell(full_ckpt['activations'])} GB (full) / {gb_cell(q8c['activations'])} GB (QLoRA) |",
    ]


@figure("06", "§3.3: the 65B r = 64 step, paged and unpaged, against the A6000's bytes")
def _lesson06_paging():
    from training.memory import trainable_numels

    cfg = llama_65b()
    short, long = parts(cfg, "qlora", "adamw", 512, True, 64), parts(cfg, "qlora", "adamw", 2048, True, 64)
    eight = parts(cfg, "qlora", "adamw8bit", 2048, True, 64)
    return [
        f"{gb_cell(short['weights'])} GB of weights, {gb_cell(short['gradients'])} GB of gradients, "
        f"**{gb_cell(short['optimizer'])} GB of states**, {gb_cell(short['activations'])} GB of activations at 512 tokens — "
        f"{gb_cell(short['total'])} GB",
        f"At 2,048 tokens the activations grow to {gb_cell(long['activations'])} GB: {gb_cell(long['total'])} GB unpaged",
        f"paged, {gb_cell(long['total'] - long['optimizer'])} GB",
        f"8-bit states ({gb_cell(eight['optimizer'])} GB) bring the unpaged step to {gb_cell(eight['total'])} GB",
        f"the largest has $8 \\cdot 11{{,}}008 = {tex_int(max(trainable_numels(llama_7b(), 'lora', 8)))}$ elements",
        f"the smallest has $64 \\cdot 8192 = {tex_int(min(trainable_numels(cfg, 'lora', 64)))}$",
    ]


def block_terms(config, n: int, precision: str, seq_len: int, r: int = 8) -> dict[str, int]:
    """The terms of one (non-first) QLoRA block's activations, as activation_bytes sums them (lesson 06 §5.1)."""
    from training.memory import projection_shapes

    d, f, H, h = config.d_model, config.d_ff, config.n_heads, config.head_dim
    c, bf16 = (4, False) if precision == "fp32" else (2, True)
    shapes = projection_shapes(config)
    return {
        "norms": 2 * (4 * n * d + 4 * n),
        "attention": 4 * c * n * d + 4 * n * H + (4 * seq_len * h * c if bf16 else 0),  # bf16: RoPE tables cast
        "SwiGLU": 3 * c * n * f,
        "linear inputs": 4 * (2 * n * d + n * f) if not bf16 else 2 * (6 * n * d + n * f),
        "LoRA": 7 * c * n * r + (2 * r * sum(o + i for o, i in shapes.values()) if bf16 else 0),
    }


@figure("06", "§5.1: the bundled QLoRA worked example (fp32, 64 × 19) and its measurement")
def _lesson06_bundled_terms():
    from model.tiny_llama import load_base_model
    from training.memory import activation_bytes

    cfg = load_base_model().config
    n, d = 64 * 19, cfg.d_model
    terms = block_terms(cfg, n, "fp32", 19)
    block = sum(terms.values())
    first = block - (4 * n * d + 4 * n)
    total = activation_bytes(cfg, 64, 19, "qlora", "fp32")
    once = total - first - (cfg.n_layers - 1) * block
    return [
        f"| norms | $2(4 \\cdot 1216 \\cdot 64 + 4 \\cdot 1216)$ | {terms['norms']:,} |",
        f"| attention | $16 \\cdot 1216 \\cdot 64 + 4 \\cdot 1216 \\cdot 4$ | {terms['attention']:,} |",
        f"| SwiGLU | $12 \\cdot 1216 \\cdot 176$ | {terms['SwiGLU']:,} |",
        f"| linear inputs | $4(2 \\cdot 1216 \\cdot 64 + 1216 \\cdot 176)$ | {terms['linear inputs']:,} |",
        f"| LoRA $Ax$ | $28 \\cdot 1216 \\cdot 8$ | {terms['LoRA']:,} |",
        f"| **$A_{{\\text{{block}}}}$** | | **{block:,}** |",
        f"| $A_{{\\text{{first}}}}$ | $A_{{\\text{{block}}}} - {tex_int(4 * n * d + 4 * n)}$ | {first:,} |",
        f"| $A_{{\\text{{once}}}}$ + RoPE | $311{{,}}296 + 4{{,}}864 + 87{{,}}552 + 9{{,}}728 + 4 + 2{{,}}432$ | {once:,} |",
        f"| **total** | ${tex_int(first)} + 3 \\cdot {tex_int(block)} + {tex_int(once)}$ | **{total:,}** |",
        f"`measure_memory` counts {total:,} bytes on the real step",
    ]


@figure("06", "§5.1–5.2: one 7B block in bf16, and what checkpointing keeps (bundled, wide, 7B, 65B)")
def _lesson06_checkpointing():
    from model.tiny_llama import load_base_model
    from training.memory import activation_bytes, wide_config

    cfg7 = llama_7b()
    terms = block_terms(cfg7, 512, "bf16", 512)
    mb = {k: f"{v / 1e6:.1f} MB" for k, v in terms.items()}
    bundled = load_base_model().config
    n, d = 64 * 19, bundled.d_model
    block = sum(block_terms(bundled, n, "fp32", 19).values())
    ckpt = activation_bytes(bundled, 64, 19, "qlora", "fp32", True)
    once = ckpt - bundled.n_layers * 4 * n * d - 2432 - (block - 4 * n * d)
    plain = activation_bytes(bundled, 64, 19, "qlora", "fp32")
    wide = wide_config()

    def drop(cfg, n_tokens, batch=1, unit=1e9, digits=(2, 3), suffix=" GB"):
        a = activation_bytes(cfg, batch, n_tokens, "qlora", "bf16" if unit == 1e9 else "fp32")
        b = activation_bytes(cfg, batch, n_tokens, "qlora", "bf16" if unit == 1e9 else "fp32", True)
        return f"{a / unit:.{digits[0]}f}{suffix} → {b / unit:.{digits[1]}f}{suffix} ({a / b:.0f}×)"

    return [
        f"one block saves {sum(terms.values()) / 1e6:.1f} MB: {mb['linear inputs']} of linear inputs, {mb['SwiGLU']} of "
        f"SwiGLU, {mb['attention']} of attention, {mb['norms']} of norms, {mb['LoRA']} of LoRA",
        f"$4 \\cdot 311{{,}}296 + {tex_int(once)} + 2{{,}}432 + ({tex_int(block)} - 311{{,}}296) = {tex_int(ckpt)}$",
        f"(measured: {ckpt:,}), down from {plain:,}",
        f"the drop is {drop(wide, 19, 64, 1e6, (1, 1), ' MB')}",
        f"(bf16, 512 tokens), {drop(cfg7, 512)}",
        f"at 65B and 2,048 tokens, {drop(llama_65b(), 2048, digits=(1, 2))}",
    ]


def measured_row(label: str, cfg, method: str, optimizer: str, precision: str, checkpointing: bool,
                 base_dtype: str = "fp32") -> str:  # fmt: skip
    from training.memory import estimate_memory_parts

    p = estimate_memory_parts(cfg, method, optimizer, 64, 19, precision, checkpointing, 8, 0, base_dtype)
    return (
        f"| {label} | "
        + " | ".join(f"{p[k]:,}" for k in ("weights", "gradients", "optimizer", "activations", "total"))
        + " |"
    )


@figure("06", "§6: the bundled and wide tables (estimate = measure_memory, 64 × 19, r 8, min_8bit_size 0)")
def _lesson06_measured():
    from model.tiny_llama import load_base_model
    from training.memory import wide_config

    bundled, wide = load_base_model().config, wide_config()
    return [
        measured_row("full, AdamW", bundled, "full", "adamw", "fp32", False),
        measured_row("full, AdamW, checkpointing", bundled, "full", "adamw", "fp32", True),
        measured_row("LoRA, AdamW", bundled, "lora", "adamw", "fp32", False),
        measured_row("QLoRA, AdamW", bundled, "qlora", "adamw", "fp32", False),
        measured_row("QLoRA, AdamW8bit (`min_8bit_size=0`)", bundled, "qlora", "adamw8bit", "fp32", False),
        measured_row("QLoRA, AdamW8bit, checkpointing", bundled, "qlora", "adamw8bit", "fp32", True),
        measured_row("QLoRA, bf16, AdamW8bit, checkpointing", bundled, "qlora", "adamw8bit", "bf16", True),
        measured_row("full, fp32, AdamW", wide, "full", "adamw", "fp32", False),
        measured_row("full, fp32, AdamW, checkpointing", wide, "full", "adamw", "fp32", True),
        measured_row("LoRA, fp32, AdamW", wide, "lora", "adamw", "fp32", False),
        measured_row("QLoRA, fp32, AdamW", wide, "qlora", "adamw", "fp32", False),
        measured_row("LoRA, bf16, fp32 base, AdamW", wide, "lora", "adamw", "bf16", False),
        measured_row("LoRA, bf16, bf16 base, AdamW", wide, "lora", "adamw", "bf16", False, "bf16"),
        measured_row("QLoRA, bf16, AdamW", wide, "qlora", "adamw", "bf16", False),
        measured_row("QLoRA, fp32, AdamW8bit, checkpointing", wide, "qlora", "adamw8bit", "fp32", True),
        measured_row("QLoRA, bf16, AdamW8bit, checkpointing", wide, "qlora", "adamw8bit", "bf16", True),
    ]


def llama_08():
    from model.tiny_llama import LlamaConfig

    return {
        "1B": LlamaConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                          tie_word_embeddings=True, max_seq_len=2048),
        "7B": LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048),
        "70B": LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                           max_seq_len=2048),
    }  # fmt: skip


@figure("08", "§1.5: memory at real sizes (r 16, 2,048 tokens, bf16, checkpointing), Stage 4's column")
def _lesson08_memory():
    from training.memory import trainable_numels
    from training.qlora_trainer import estimate_memory

    rows = []
    for name, cfg in llama_08().items():
        total_p, total_t = sum(trainable_numels(cfg, "full")), sum(trainable_numels(cfg, "lora", 16))
        for i, (label, method, base) in enumerate(
            (
                ("full", "full", "fp32"),
                ("LoRA", "lora", "fp32"),
                ("LoRA, bf16 base", "lora", "bf16"),
                ("QLoRA", "qlora", "fp32"),
            )
        ):
            p = parts(cfg, method, "adamw", 2048, True, 16, base)
            stage4 = estimate_memory(total_p, method, trainable_params=0 if method == "full" else total_t)["total"]
            cells = [gb_cell(p[k]) for k in ("weights", "gradients", "optimizer", "activations")]
            rows.append(f"| {name if i == 0 else ''} | {label} | " + " | ".join(cells)
                        + f" | **{p['total'] / 1e9:,.2f}** | {stage4 / 1e9:,.2f} |")  # fmt: skip
    return rows


@figure("08", "§1.5: activations without checkpointing, and the 70B step against the A6000's bytes")
def _lesson08_text():
    models = llama_08()
    plain = [parts(cfg, "lora", "adamw", 2048, False, 16)["activations"] for cfg in models.values()]
    qlora = [parts(cfg, "qlora", "adamw", 2048, False, 16)["activations"] for cfg in models.values()]
    q70 = parts(models["70B"], "qlora", "adamw", 2048, True, 16)
    texts = [
        "Without it LoRA's activations on the fp32 base are " + " / ".join(gb_cell(a) for a in plain) + " GB",
        "QLoRA's (and LoRA's on a bf16 base) " + " / ".join(gb_cell(a) for a in qlora) + " GB",
    ]
    cfg = models["70B"]
    head = 2 * cfg.vocab_size * cfg.d_model * 4  # fp32 embedding and head
    inputs = 4 * cfg.n_layers * 2048 * cfg.d_model  # fp32 checkpointed block inputs
    return [
        *texts,
        f"QLoRA at 70B needs {gb_cell(q70['total'])} GB",
        f"are {gb_cell(head)} GB and the fp32 checkpointed block inputs ($4LNd$) {gb_cell(inputs)} GB",
        f"49,140 MiB = {RTX_A6000_BYTES / 1e9:.2f} GB in the same units, so the step fits with "
        f"{(RTX_A6000_BYTES - q70['total']) / 1e9:.2f} GB",
        f"({gb_cell(head / 2)} and {inputs / 2 / 1e9:.2f} GB), about {(q70['total'] - head / 2 - inputs / 2) / 1e9:.2f} GB in all",
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
