"""Continue a prompt with a real checkpoint, with or without your adapter (`make generate`).

    make generate MODEL=<dir> PROMPT="Reverse the digits." INPUT="1 2 3"               the base model
    make generate MODEL=<dir> ADAPTER=runs/finetune/adapter PROMPT="…" INPUT="…"      with the adapter
    python -m training.generate --model DIR --prompt "…" --raw --temperature 0.8 --top-p 0.9 --seed 1

The prompt is put in the fine-tuning's instruction format (``training/finetune.py``) unless
``--raw``; decoding stops at EOS or after ``--max-new-tokens``. Greedy by default; with
``--temperature`` > 0, sampling from softmax(logits / T), optionally restricted to the smallest set of
tokens whose probability reaches ``--top-p`` (nucleus sampling, Holtzman et al. 2019).

Without a KV cache: each new token runs the whole sequence again (cost grows with the square of its
length; fine for a few dozen tokens on a small model). The adapter is loaded with ``load_hf_adapter``
onto the full-precision model (Stage 2's ``load_lora``; ``IMPL=student`` runs yours) and merged
(Stage 2's ``merge_lora``), so generation costs what the base model costs.
"""

from __future__ import annotations

import argparse

import torch

from model._impl import refuse_stubs, use_default_for

use_default_for("show")

from model.hf_checkpoint import load_hf_adapter, load_hf_checkpoint  # noqa: E402
from training.finetune import DTYPES, load_tokenizer, prompt_text, special_token_ids  # noqa: E402


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from the last position's logits (V,): argmax if temperature == 0, else a (nucleus) sample."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest prefix whose mass reaches top_p
    sorted_probs = torch.where(keep, sorted_probs, 0.0)
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    ids: list[int],
    eos: int | None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """The new token ids after ``ids`` (EOS excluded), at most ``max_new_tokens`` and within max_seq_len."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    limit = model.config.max_seq_len
    while len(out) < max_new_tokens and len(ids) + len(out) < limit:
        logits = model(torch.tensor([ids + out], device=device))[0, -1].cpu()  # (V,)
        token = next_token(logits, temperature, top_p, generator)
        if token == eos:
            break
        out.append(token)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face Llama-family directory")
    parser.add_argument("--adapter", help="an adapter directory (make finetune writes runs/finetune/adapter)")
    parser.add_argument("--prompt", required=True, help="the instruction (or the raw text with --raw)")
    parser.add_argument("--input", default="", help="the instruction's input, if any")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as it is, without the format")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.adapter:
        refuse_stubs("make generate", range(1, 3))  # loading and merging an adapter runs Stages 1-2
    tokenizer = load_tokenizer(args.model)
    bos, eos = special_token_ids(args.model, tokenizer)
    model = load_hf_checkpoint(args.model, dtype=DTYPES[args.dtype])
    if args.adapter:
        from model.lora import merge_lora

        model = merge_lora(load_hf_adapter(model, args.adapter))
    text = args.prompt if args.raw else prompt_text(args.prompt, args.input)
    ids = ([bos] if bos is not None else []) + tokenizer.encode(
        text, add_special_tokens=False
    ).ids  # BOS as in training
    new = generate(model, ids, eos, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    completion = tokenizer.decode(new)
    print(text + completion)
    return completion


if __name__ == "__main__":
    main()
