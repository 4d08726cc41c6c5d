"""A conversation with a checkpoint in its own chat format, streamed as it is generated (`make chat`).

    make chat                                              the toy checkpoint (runs/toy/model, made if missing)
    make chat MODEL=<dir> ADAPTER=runs/finetune/adapter    a real checkpoint, with your adapter merged in
    printf 'Reverse the digits.\\n1 2 3\\n' | make chat      a conversation piped in: one line per user turn

Each line you type is a user turn (a literal ``\\n`` in it stands for a line break). The whole
conversation is rendered with the checkpoint's chat template (``training/chat_template.py``; without
one, make finetune's Alpaca format, and a message says so), the model continues it with a KV cache
(``training/generate.py``) and the reply appears token by token. The reply ends at EOS, at the
template's end-of-turn marker (<|im_end|>, <|eot_id|>, </s>) or after ``--max-new-tokens``.

The conversation must fit the context (``--context``, default the model's max_seq_len): the prompt
may use the context minus the reply's room (``--max-new-tokens``, at most half the context). When
it would not fit, the oldest turns are dropped (a system message stays) and a line on stderr says
how many. End with Ctrl-D (EOF) or Ctrl-C; the exit status is 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable

from model._impl import use_default_for

use_default_for("show")

from training.chat_template import ChatFormat, load_chat_format  # noqa: E402
from training.finetune import DTYPES  # noqa: E402
from training.generate import Sampling, load_for_generation, stream_reply  # noqa: E402


def fit_history(chat: ChatFormat, messages: list[dict[str, str]], budget: int) -> tuple[list[int], int]:
    """(prompt ids, exchanges dropped): drop the oldest user message and its answer (a system message stays)
    until the prompt fits ``budget`` tokens; ``messages`` is shortened in place.

    The newest user message always stays; if it alone is too long, the ids are returned over budget.
    """
    dropped = 0
    first = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids = chat.encode(messages, add_generation_prompt=True)
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids, dropped
        end = first + 2 if messages[first + 1]["role"] == "assistant" else first + 1
        del messages[first:end]  # the oldest exchange: a user message and the reply to it
        dropped += 1


def converse(
    model,
    chat: ChatFormat,
    eos: int,
    lines: Iterable[str],
    sampling: Sampling,
    max_new_tokens: int,
    context: int,
    system: str | None = None,
    echo: bool = False,
    write: Callable[[str], object] | None = None,
    note: Callable[[str], object] | None = None,
) -> list[dict[str, str]]:
    """Answer each line as a user turn, streaming the replies through ``write``; returns the conversation kept."""
    write = write or (lambda text: print(text, end="", flush=True))
    note = note or (lambda text: print(text, file=sys.stderr, flush=True))
    reply_room = min(max_new_tokens, context // 2)
    stop_ids, stop_strings = chat.stops(eos)
    messages = [{"role": "system", "content": system}] if system else []
    for line in lines:
        text = line.rstrip("\n").replace("\\n", "\n")
        if not text.strip():
            continue
        if echo:
            write(f"user: {text}\n")
        messages.append({"role": "user", "content": text})
        prompt, dropped = fit_history(chat, messages, context - reply_room)
        if dropped:
            note(f"[dropped the {dropped} oldest exchange{'s' * (dropped > 1)} to fit the {context}-token context]")
        if len(prompt) >= context:
            note(f"[this message makes a prompt of {len(prompt)} tokens, over the {context}-token context: not sent]")
            messages.pop()
            continue
        write("assistant: ")
        reply = stream_reply(
            model, prompt, chat.tokenizer.decode, stop_ids, min(reply_room, context - len(prompt)), sampling,
            stop_strings, write,
        )  # fmt: skip
        write("\n")
        messages.append({"role": "assistant", "content": reply})
    return messages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face Llama-family directory")
    parser.add_argument("--adapter", help="an adapter directory (make finetune writes runs/finetune/adapter)")
    parser.add_argument("--system", help="a system message to open the conversation with")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (at most half the context)")
    parser.add_argument("--context", type=int, help="tokens the conversation may fill (default: max_seq_len)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        args.sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as error:
        parser.error(f"--{str(error).replace('_', '-')}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer, bos, eos = load_for_generation(args.model, args.adapter, args.dtype)
    context = args.context or model.config.max_seq_len
    if not 2 <= context <= model.config.max_seq_len:
        raise SystemExit(f"--context must be in [2, max_seq_len={model.config.max_seq_len}], got {context}")
    chat = load_chat_format(args.model, tokenizer, bos, eos)
    interactive = sys.stdin.isatty()
    print(f"[chat: {args.model}{f' + {args.adapter}' if args.adapter else ''}, format: {chat.source}, "
          f"{context}-token context; end with Ctrl-D]", file=sys.stderr, flush=True)  # fmt: skip
    lines = iter(lambda: _read_line("user: "), None) if interactive else sys.stdin
    try:
        converse(
            model, chat, eos, lines, args.sampling, args.max_new_tokens, context, args.system, echo=not interactive
        )
    except KeyboardInterrupt:
        print(flush=True)
    return 0


def _read_line(prompt: str) -> str | None:
    """One line typed at the terminal; None at EOF (Ctrl-D), which ends the conversation."""
    try:
        return input(prompt)
    except EOFError:
        print(flush=True)
        return None


if __name__ == "__main__":
    sys.exit(main())
