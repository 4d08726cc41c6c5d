"""Pretrain the tiny Llama base model on the synthetic task mixture.

    python -m training.pretrain                 # writes model/checkpoints/base_model.*
    python -m training.pretrain --steps 500 --out /tmp/base.safetensors

Training is fully deterministic: fixed seeds, a local RNG for the data and
deterministic kernels, so two runs on the same machine produce bit-identical
weights. Each step draws a fresh batch from the mixture, so the model never
sees the same examples twice and cannot simply memorise them.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.tiny_llama import BASE_MODEL_PATH, LlamaConfig, TinyLlama, save_model
from training.data import (
    FINETUNE_TASK,
    PRETRAIN_TASKS,
    SEQ_LEN,
    VOCAB_SIZE,
    exact_match_accuracy,
    finetune_data,
    lm_loss,
    per_task_accuracy,
    pretraining_data,
)

# Training hyper-parameters (the model's shape lives in LlamaConfig).
BATCH_SIZE = 128  # sequences per optimisation step
LR = 3e-3  # peak learning rate
WARMUP_STEPS = 100  # linear warm-up before the cosine decay
MIN_LR_FRAC = 0.1  # the cosine decays to LR * MIN_LR_FRAC
WEIGHT_DECAY = 0.1  # AdamW weight decay, only on the Linear weight matrices
GRAD_CLIP = 1.0  # max global gradient norm


def lr_at(step: int, total: int) -> float:
    """Linear warm-up followed by cosine decay."""
    if step < WARMUP_STEPS:
        return LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: TinyLlama) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear weights only (not norms, not embeddings).

    Keeping decay off the embedding matters here: the fine-tuning task token is
    never used in pretraining, and decay would otherwise shrink its row to ~0.
    """
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def train(steps: int, seed: int) -> TinyLlama:
    torch.manual_seed(seed)  # model initialisation uses the global RNG
    config = LlamaConfig(vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN)
    model = TinyLlama(config)
    print(f"TinyLlama: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = make_optimizer(model)
    model.train()
    pbar = tqdm(range(steps), desc="pretrain")
    for step in pbar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        # A fresh batch every step; the seed depends on (seed, step) only.
        batch = pretraining_data(BATCH_SIZE, seed=seed * 1_000_003 + step)
        logits = model(batch["input_ids"])  # (B, T, vocab)
        loss = lm_loss(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        if step % 20 == 0:
            pbar.set_postfix(loss=f"{loss.item():.4f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimisation steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data")
    parser.add_argument("--out", type=Path, default=BASE_MODEL_PATH, help=".safetensors path")
    args = parser.parse_args()

    # Same seed + same thread count + same machine => bit-identical weights.
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    t0 = time.time()
    model = train(args.steps, args.seed)
    train_seconds = time.time() - t0

    accs = per_task_accuracy(model, PRETRAIN_TASKS)  # 1000 fresh examples per task
    ft_acc = exact_match_accuracy(model, finetune_data("eval"))  # should be ~0
    metrics = {
        "pretrain_accuracy": accs,
        "finetune_task": FINETUNE_TASK,
        "finetune_task_accuracy": ft_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "seed": args.seed,
    }
    save_model(model, args.out, metrics)

    print(f"\ntrained {args.steps} steps in {train_seconds:.1f}s")
    print("exact-match accuracy of the base model:")
    for task in PRETRAIN_TASKS:
        print(f"  {task:<10} {accs[task]:6.1%}")
    print(f"  {FINETUNE_TASK:<10} {ft_acc:6.1%}  (the fine-tuning task, never seen)")
    print(f"saved {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
