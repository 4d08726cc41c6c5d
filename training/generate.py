"""Continue a prompt with a real checkpoint, with or without your adapter (`make generate`).

    make generate MODEL=<dir> PROMPT="Reverse the digits." INPUT="1 2 3"               the base model
    make generate MODEL=<dir> ADAPTER=runs/finetune/adapter PROMPT="…" INPUT="…"      with the adapter
    python -m training.generate --model DIR --prompt "…" --raw --temperature 0.8 --top-k 50 --top-p 0.9 --seed 1
    python -m training.generate --model DIR --prompt "…" --prompt "…"                  a batch (left-padded)

The prompt is put in the fine-tuning's instruction format (``training/finetune.py``) unless
``--raw``; decoding stops at EOS, at a ``--stop`` string or after ``--max-new-tokens``. Greedy by
default; with ``--temperature`` > 0, sampling from softmax(logits / T), restricted to the ``--top-k``
most likely tokens and then to the smallest set whose probability reaches ``--top-p`` (nucleus
sampling, Holtzman et al. 2019), in transformers' order (temperature, top-k, top-p).

With a KV cache (``model.tiny_llama.KVCache``; ``--no-cache`` turns it off to compare): the prompt
runs once (prefill), then each step feeds only the new token and attends over the cached keys and
values, so a token costs the same at position 500 as at position 5, up to attention's reads of the
cache. Without it, every step runs the whole sequence again (cost grows with the square of the
length). Several prompts run as one batch, padded on the left with an attention mask, so every row's
next token sits in the last column; each row keeps its own positions (``TinyLlama.forward_cached``).

The adapter is loaded with ``load_hf_adapter`` onto the full-precision model (Stage 2's
``load_lora``; ``IMPL=student`` runs yours) and merged (Stage 2's ``merge_lora``), so generation
costs what the base model costs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model._impl import refuse_stubs, use_default_for

use_default_for("show")

from model.hf_checkpoint import load_hf_adapter, load_hf_checkpoint  # noqa: E402
from model.tiny_llama import KVCache, TinyLlama  # noqa: E402
from training.finetune import DTYPES, load_tokenizer, prompt_text, special_token_ids  # noqa: E402

# ---- choosing the next token ---------------------------------------------------------------------


@dataclass
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else a draw (transformers' warpers, in its order)."""

    temperature: float = 0.0  # 0: argmax; else softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # then the smallest set whose probability reaches top_p (1: all)
    seed: int = 0  # seeds the sampler's own generator

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def picker(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function from last-position logits (B, V) to token ids (B,), with a fresh generator seeded by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return lambda logits: next_tokens(logits, self, generator)


def sampling_weights(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """What a draw is made from, (B, V) fp32: softmax(logits / T) with the tokens outside top-k and top-p at 0.

    Not renormalised (torch.multinomial divides by the sum): softmax over the top-k logits, then every
    token whose more likely predecessors already hold ``top_p`` of that mass is dropped (the top one stays).
    """
    logits = logits.detach().float().cpu() / sampling.temperature  # (B, V)
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay, as in transformers
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the mass before it already reaches p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return probs


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Token ids (B,) from logits (B, V): the argmax at temperature 0, else a draw from ``sampling_weights``."""
    if sampling.temperature == 0:
        return logits.detach().argmax(dim=-1).cpu()
    return torch.multinomial(sampling_weights(logits, sampling), 1, generator=generator)[:, 0]  # (B,)


# ---- decoding ----------------------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths as one batch: ids (B, T) padded on the left, and the mask (B, T) (None if none is).

    Left, so that every row's next token goes to the same last column. The pad id is 0; the mask hides it.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    if all(len(p) == T for p in prompts):
        return ids, None
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
    return ids, mask


@torch.no_grad()
def decode_steps(
    model: TinyLlama,
    prompts: list[list[int]],
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), step after step: at most max_new_tokens and within max_seq_len.

    With the cache: one prefill of the padded prompts, then one position per step. Without: the whole
    sequence every step. The caller stops whenever it likes (a generator computes nothing ahead).
    """
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, device)
    B, T = ids.shape
    steps = min(max_new_tokens, model.config.max_seq_len - T)
    if steps <= 0:
        return
    cache = KVCache(model.config, B, T + steps - 1) if use_cache else None  # the last token is never fed back
    if cache is None and mask is None:
        logits = model(ids)  # (B, T, V): the plain forward pass, as generation always ran
    else:
        logits = model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)  # (B, 1, V): the head on one position
    for step in range(steps):
        token = pick(logits[:, -1])  # (B,)
        yield token
        if step + 1 == steps:
            return
        new = token[:, None].to(device)  # (B, 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, P+1)
        if cache is not None:
            logits = model(new, cache=cache, attention_mask=mask)  # (B, 1, V)
        else:
            ids = torch.cat([ids, new], dim=1)  # (B, T+step+1)
            logits = model(ids) if mask is None else model(ids, attention_mask=mask, logits_to_keep=1)


class TextStream:
    """The text of a growing list of tokens, released as soon as it is final, cut at the first stop string.

    Each ``push`` decodes all tokens so far and returns the new text that can no longer change: it holds
    back a trailing U+FFFD (a character whose bytes are split across tokens) and any ending that could
    still grow into a stop string. ``text`` is everything so far (before the stop string), ``stopped``
    whether one appeared, ``finish()`` the rest.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Collection[str] = ()) -> None:
        self.decode, self.stop_strings = decode, tuple(s for s in stop_strings if s)
        self.tokens: list[int] = []
        self.text, self.stopped, self.released = "", False, 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cuts = [text.find(s) for s in self.stop_strings if s in text]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self._release(len(self.text))
        self.text = text
        final = len(text.rstrip("\ufffd"))
        held = max((k for s in self.stop_strings for k in range(1, len(s)) if text[:final].endswith(s[:k])), default=0)
        return self._release(final - held)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece


def stop_set(eos: int | Collection[int] | None) -> set[int]:
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


@torch.no_grad()
def generate(
    model: TinyLlama,
    prompts: list[list[int]],
    eos: int | Collection[int] | None,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    use_cache: bool = True,
    stop_strings: Collection[str] = (),
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """The new token ids after each prompt (a batch, left-padded): at most ``max_new_tokens``, within max_seq_len.

    A row stops at a token in ``eos`` (not returned) or once its text (``decode``) holds a stop string
    (the tokens up to the one completing it are returned); decoding ends when every row has stopped.
    """
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode (token ids -> text) to recognise them")
    stop_ids, sampling = stop_set(eos), sampling or Sampling()
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    streams = [TextStream(decode, stop_strings) for _ in prompts] if stop_strings else None
    for tokens in decode_steps(model, prompts, max_new_tokens, sampling.picker(), use_cache):
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if token in stop_ids:
                done[b] = True
                continue
            outputs[b].append(token)
            if streams is not None:
                streams[b].push(token)
                done[b] = streams[b].stopped
        if all(done):
            break
    return outputs


def stream_reply(
    model: TinyLlama,
    prompt: list[int],
    decode: Callable[[list[int]], str],
    eos: int | Collection[int] | None,
    max_new_tokens: int,
    sampling: Sampling,
    stop_strings: Collection[str] = (),
    write: Callable[[str], object] | None = None,
) -> str:
    """Generate after one prompt with the cache, writing the text as it comes (``write``); returns the whole text."""
    write = write or (lambda piece: print(piece, end="", flush=True))
    stop_ids, stream = stop_set(eos), TextStream(decode, stop_strings)
    for tokens in decode_steps(model, [prompt], max_new_tokens, sampling.picker()):
        token = int(tokens[0])
        if token in stop_ids:
            break
        write(stream.push(token))
        if stream.stopped:
            break
    write(stream.finish())
    return stream.text


# ---- the command ---------------------------------------------------------------------------------------


def load_for_generation(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "fp32"):
    """(model, tokenizer, bos, eos): the checkpoint in ``dtype``, with the adapter merged into it if one is given."""
    if adapter:
        refuse_stubs("make generate / make chat with an adapter", range(1, 3))  # loading and merging: Stages 1-2
    tokenizer = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tokenizer)
    model = load_hf_checkpoint(model_dir, dtype=DTYPES[dtype])
    if adapter:
        from model.lora import merge_lora

        model = merge_lora(load_hf_adapter(model, adapter))
    return model, tokenizer, bos, eos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face Llama-family directory")
    parser.add_argument("--adapter", help="an adapter directory (make finetune writes runs/finetune/adapter)")
    parser.add_argument(
        "--prompt", required=True, action="append", help="the instruction (or the raw text with --raw); repeat: a batch"
    )
    parser.add_argument("--input", action="append", help="the instruction's input, if any (once per --prompt)")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as it is, without the format")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--stop", action="append", default=[], help="stop when the text holds this string (repeatable)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (to compare)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.input is not None and len(args.input) != len(args.prompt):
        parser.error(f"--input: give one per --prompt ({len(args.prompt)}) or none, got {len(args.input)}")
    try:
        args.sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as error:
        parser.error(f"--{str(error).replace('_', '-')}")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    model, tokenizer, bos, eos = load_for_generation(args.model, args.adapter, args.dtype)
    inputs = args.input or [""] * len(args.prompt)
    texts = [p if args.raw else prompt_text(p, i) for p, i in zip(args.prompt, inputs, strict=True)]
    head = [bos] if bos is not None else []  # BOS as in training
    prompts = [head + tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    if len(prompts) == 1 and not args.no_cache:  # one prompt: stream the text as it comes
        print(texts[0], end="", flush=True)
        completion = stream_reply(
            model, prompts[0], tokenizer.decode, eos, args.max_new_tokens, args.sampling, args.stop
        )
        print()
        return [completion]
    new = generate(
        model, prompts, eos, args.max_new_tokens, args.sampling, not args.no_cache, args.stop, tokenizer.decode
    )
    completions = []
    for text, tokens in zip(texts, new, strict=True):
        stream = TextStream(tokenizer.decode, args.stop)
        for token in tokens:
            stream.push(token)
        completions.append(stream.text)
        print(text + stream.text, file=sys.stdout)
    return completions


if __name__ == "__main__":
    main()
