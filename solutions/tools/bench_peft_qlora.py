#!/usr/bin/env python3
"""Time one QLoRA training step, the course's against PEFT + bitsandbytes, on the same Llama (dev-only).

Issue 20 asks that one QLoRA step of the course (NF4Linear through its 4-bit matmul, which dequantizes
in the forward pass and again in the backward pass) take at most 1.0× the time of PEFT's LoRA over
bitsandbytes' ``Linear4bit`` (NF4, double quantization), which does the same two dequantizations in
its ``MatMul4Bit``. Both run on the CPU, in fp32, on one random transformers ``LlamaForCausalLM``
saved once to a temporary directory:

    ours   load_hf_checkpoint -> prepare_qlora_model(TrainConfig(quantize="nf4", precision="fp32"))
    PEFT   LlamaForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32))
           -> get_peft_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0, all seven projections))

Both quantize every projection and keep the head in fp32; both train the same 56 pairs of A and B.
One step = forward, the mean next-token cross-entropy, backward, ``torch.optim.AdamW.step`` over the
trainable parameters, ``zero_grad``. The two steps are timed in alternating rounds (drift and other
processes on the machine hit both alike); the script prints the medians and their ratio. It also
checks that both models compute the same loss before any step, to the 4-bit rounding: the two
quantize the same weights with the same NF4 rules.

Run it three times from the repository root (the environment needs torch, transformers, peft,
bitsandbytes and safetensors; never a dependency of the graded tests):

    OMP_NUM_THREADS=2 /tmp/bnbenv/bin/python solutions/tools/bench_peft_qlora.py [--layers 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from model._impl import use_default_for  # noqa: E402

use_default_for("show")  # the reference where this checkout has it, unless LORA_IMPL says otherwise

from model.hf_checkpoint import load_hf_checkpoint  # noqa: E402
from training.data import lm_loss  # noqa: E402
from training.qlora_trainer import TrainConfig, prepare_qlora_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_llama(directory: Path, layers: int, seed: int = 0) -> None:
    """A random fp32 LlamaForCausalLM (hidden 512, d_ff 1376, 8 heads: the width of wide_config()), saved."""
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():  # O(1) activations, not transformers' near-zero std 0.02
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features**-0.5)
    model.save_pretrained(directory)


def ours(directory: Path) -> nn.Module:
    model = load_hf_checkpoint(directory)
    config = TrainConfig(quantize="nf4", precision="fp32", r=8, lora_alpha=16, lora_dropout=0.0, device="cpu",
                         progress=False, output_dir=str(directory / "runs"))  # fmt: skip
    return prepare_qlora_model(model, config).train()


def peft_bnb(directory: Path) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                          device_map="cpu", dtype=torch.float32)  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    return get_peft_model(model, lora).train()


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def make_step(model: nn.Module, ids: torch.Tensor):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> float:
        loss = lm_loss(logits_of(model, ids[:, :-1]), ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in trainable)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round; the round's time is their mean")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "llama"
        save_llama(directory, args.layers)
        models = {"ours": ours(directory), "PEFT + bitsandbytes": peft_bnb(directory)}
        ids = torch.randint(0, 1000, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            losses = {name: lm_loss(logits_of(m, ids[:, :-1]), ids[:, 1:]).item() for name, m in models.items()}
        steps = {}
        for name, model in models.items():
            steps[name], trainable = make_step(model, ids)
            print(f"{name:<20} {trainable:,} trainable, loss before any step {losses[name]:.6f}")
        assert abs(losses["ours"] - losses["PEFT + bitsandbytes"]) < 1e-2 * abs(losses["ours"]), losses
        for step in steps.values():
            step()  # warm up
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - started) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"one QLoRA step, {args.layers} layers, d 512, batch {args.batch} × {args.seq}, fp32, "
          f"{torch.get_num_threads()} threads (median of {args.rounds} alternating rounds):")  # fmt: skip
    for name, seconds in median.items():
        print(f"   {name:<20} {seconds * 1e3:8.1f} ms")
    ratio = median["ours"] / median["PEFT + bitsandbytes"]
    print(f"   ours / PEFT + bitsandbytes = {ratio:.2f}x   (aim <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
