#!/usr/bin/env python3
"""Check, with the real transformers library, that ``training/chat_template.py`` renders as ``apply_chat_template`` (dev-only).

For each template of ``EXAMPLE_TEMPLATES`` (ChatML as SmolLM2-Instruct writes it, Llama 3's header
tokens with ``strftime_now`` and ``raise_exception``, Zephyr's as TinyLlama-Chat writes it, which
leans on ``trim_blocks`` / ``lstrip_blocks``) a byte-level BPE tokenizer is trained here with that
family's special tokens (``training.toy_checkpoint.train_tokenizer``) and saved with the template
and its special-token strings in tokenizer_config.json; transformers loads the directory with
``AutoTokenizer``, the course with ``load_tokenizer`` and ``load_chat_format``. Nothing is downloaded.

    1 text     apply_chat_template(tokenize=False) == ChatFormat.render, with and without the
               generation prompt, on five conversations (one turn; system + several turns; an
               assistant turn last; unicode and surrounding spaces, which Llama 3's template trims)
    2 ids      apply_chat_template(tokenize=True) == ChatFormat.encode, the same cases
    3 masks    ChatML with {% generation %} blocks around each assistant content and <|im_end|>:
               transformers' return_assistant_tokens_mask == our encode_conversation's mask
               (which finds the turns by rendering prefixes, and needs no generation blocks)
    4 errors   Llama 3 on a "tool" turn: both raise jinja2's TemplateError with the template's message;
               the sandbox: both refuse ``''.__class__`` (SecurityError)

One line per check; exit 1 if any fails:

    /tmp/bnbenv/bin/python solutions/tools/check_chat_template.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jinja2  # noqa: E402
import transformers  # noqa: E402

from training.chat_template import CHATML, EXAMPLE_TEMPLATES, load_chat_format, render  # noqa: E402
from training.finetune import load_tokenizer, special_token_ids  # noqa: E402
from training.toy_checkpoint import train_tokenizer  # noqa: E402

FAMILIES = {  # special tokens, and the strings tokenizer_config.json names (as the real checkpoints do)
    "chatml": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
               {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}),
    "llama3": (("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "zephyr": (("<unk>",), {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}  # fmt: skip
CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the digits.\n1 2 3"}],
    [{"role": "system", "content": "You answer in digits."},
     {"role": "user", "content": "Sort the digits.\n9 1 5"}, {"role": "assistant", "content": "1 5 9"},
     {"role": "user", "content": "Copy the digits.\n4 4"}],
    [{"role": "user", "content": "Add one to every digit.\n0 8"}, {"role": "assistant", "content": "1 9"}],
    [{"role": "user", "content": "  héllo — ✓ 数字  "}, {"role": "assistant", "content": " spaced answer \n"},
     {"role": "user", "content": "and again"}, {"role": "assistant", "content": "done"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}],
]  # fmt: skip
# ChatML as SmolLM3-style templates mark what the assistant writes, for transformers' assistant mask
CHATML_GENERATION = CHATML.replace(
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}",
)
results: list[tuple[str, bool]] = []


def record(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name:<50} {detail}")


def tokenizer_dir(tmp: Path, family: str, template: str, name: str | None = None) -> Path:
    """tmp/name: a tokenizer of ``family``'s special tokens, saved with ``template`` in tokenizer_config.json."""
    specials, strings = FAMILIES[family]
    texts = [m["content"] + " user assistant system" for c in CONVERSATIONS for m in c]
    directory = tmp / (name or family)
    directory.mkdir()
    train_tokenizer(texts * 5, special_tokens=specials).save(str(directory / "tokenizer.json"))
    config = {**strings, "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def ours_and_theirs(directory: Path):
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer = load_tokenizer(directory)
    bos, eos = special_token_ids(directory, tokenizer)
    return load_chat_format(directory, tokenizer, bos, eos), theirs


def check_family(tmp: Path, family: str) -> None:
    ours, theirs = ours_and_theirs(tokenizer_dir(tmp, family, EXAMPLE_TEMPLATES[family]))
    texts = ids = cases = 0
    first_difference = ""
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            cases += 1
            text = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            tokens = theirs.apply_chat_template(conversation, tokenize=True, add_generation_prompt=prompt)
            tokens = tokens["input_ids"] if isinstance(tokens, dict | transformers.BatchEncoding) else tokens
            texts += text == ours.render(conversation, prompt)
            ids += tokens == ours.encode(conversation, prompt)
            if not first_difference and text != ours.render(conversation, prompt):
                first_difference = f"\n     theirs {text!r}\n     ours   {ours.render(conversation, prompt)!r}"
    record(
        f"1. {family}: rendered text",
        texts == cases,
        f"{texts}/{cases} equal (specials {ours.tokens}){first_difference}",
    )
    example = ours.encode(CONVERSATIONS[1], True)
    record(f"2. {family}: token ids", ids == cases, f"{ids}/{cases} equal ({len(example)} ids for conversation 2)")


def check_masks(tmp: Path) -> None:
    ours, theirs = ours_and_theirs(tokenizer_dir(tmp, "chatml", CHATML_GENERATION, "chatml_generation"))
    same = cases = 0
    for conversation in CONVERSATIONS:
        if not any(m["role"] == "assistant" for m in conversation):
            continue
        cases += 1
        out = theirs.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, scored = ours.encode_conversation(conversation)
        same += out["input_ids"] == ids and out["assistant_masks"] == [int(s) for s in scored]
    record("3. assistant masks vs {% generation %} blocks", same == cases,
           f"{same}/{cases} conversations: the same ids and the same scored tokens")  # fmt: skip


def outcome(call) -> str:
    try:
        return f"rendered {call()!r}"
    except Exception as error:  # the check compares what each one raises
        return f"{type(error).__name__}: {error}"


def check_errors(tmp: Path) -> None:
    ours, theirs = ours_and_theirs(tmp / "llama3")
    tool = [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]
    mine = outcome(lambda: render(EXAMPLE_TEMPLATES["llama3"], tool, **ours.tokens))
    their = outcome(lambda: theirs.apply_chat_template(tool, tokenize=False))
    record("4. raise_exception (llama3, a tool turn)", mine == their and "TemplateError" in mine, mine)
    escape = "{{ ''.__class__.__mro__ }}"
    mine = outcome(lambda: render(escape, tool))
    their = outcome(lambda: theirs.apply_chat_template(tool, chat_template=escape, tokenize=False))
    record("4. the sandbox refuses ''.__class__", "SecurityError" in mine and "SecurityError" in their, mine)


def main() -> int:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print(f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for family in EXAMPLE_TEMPLATES:
            check_family(tmp, family)
        check_masks(tmp)
        check_errors(tmp)
    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
