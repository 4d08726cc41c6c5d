"""Chat formats: a checkpoint's Jinja chat template, rendered the way transformers' ``apply_chat_template`` does.

An instruct checkpoint was trained on conversations laid out in one format, and it answers well
only in that format. The format ships with the tokenizer as a Jinja2 template: ``chat_template`` in
``tokenizer_config.json`` (or, written by newer transformers, a ``chat_template.jinja`` file beside
it). Three families cover the checkpoints of lesson 08 (``EXAMPLE_TEMPLATES`` has one of each):

    ChatML (SmolLM2, Qwen)   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
    Llama 3                  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
                             <|start_header_id|>assistant<|end_header_id|>\\n\\nHello<|eot_id|>
    Zephyr (TinyLlama-Chat)  <|user|>\\nHi</s>\\n<|assistant|>\\nHello</s>\\n

Rendering follows transformers (``utils/chat_template_utils.py``): an ``ImmutableSandboxedEnvironment``
(templates come from the Hub: untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception(message)``, ``strftime_now(format)``, a ``tojson`` that
does not escape HTML, guarded ``dict`` and ``namespace``; the template sees ``messages``,
``add_generation_prompt``, ``tools`` and ``documents`` (None here) and the special tokens' strings
(``bos_token``, ``eos_token``, …). The text is then tokenized as a whole with
``add_special_tokens=False``: the template writes BOS itself where the model wants one. The same
conversation gives the same token ids as ``tokenizer.apply_chat_template(messages, tokenize=True)``
(``solutions/tools/check_chat_template.py`` checks it against transformers, dev-only).

The loss mask of a conversation (``ChatFormat.encode_conversation``): a token is scored when it
overlaps an assistant turn, i.e. the text between the prompt rendered with the generation prompt
and the conversation rendered up to that turn (its content and the end-of-turn marker the template
writes after it, without trailing whitespace). That needs a template that renders conversations
incrementally (a shorter conversation renders as a prefix of a longer one); one that does not is
refused by name. transformers marks assistant tokens only in templates written with
``{% generation %}`` blocks; this works with any incremental template, and it marks the same
tokens where both apply (the dev-only check compares them).

A checkpoint without a template gets the Alpaca instruction format of ``make finetune``
(``ALPACA_TEMPLATE``), and a message saying so.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ROLES = ("system", "user", "assistant")
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# ---- three templates in the style of the lesson's checkpoints, and the fallback ---------------------

CHATML = """{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("After the system message only user and assistant turns are supported, got " + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

EXAMPLE_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}

# make finetune's instruction format (training/finetune.py) as a template: a user turn is the instruction and
# ends with the response header, an assistant turn is the response and EOS (the response header belongs to the
# prompt, so it is written whether or not add_generation_prompt asks for it).
ALPACA_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}
    {%- elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}
    {%- else %}{{ message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}"""


# ---- reading a checkpoint's template and special tokens ---------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_chat_template(model_dir: str | Path) -> tuple[str | None, str]:
    """(template, where it was found): chat_template.jinja, else tokenizer_config.json's chat_template; (None, "")."""
    model_dir = Path(model_dir)
    if (model_dir / TEMPLATE_FILE).is_file():  # transformers prefers the file when both exist
        return (model_dir / TEMPLATE_FILE).read_text(), TEMPLATE_FILE
    template = _read_json(model_dir / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": …}, {"name": "tool_use", …}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template, TOKENIZER_CONFIG
    return None, ""


def template_tokens(model_dir: str | Path, tokenizer, bos: int | None, eos: int) -> dict[str, str]:
    """The special tokens' strings a template may use (transformers passes its ``special_tokens_map``).

    From tokenizer_config.json, then special_tokens_map.json; BOS and EOS from their ids if neither names them.
    """
    found: dict[str, str] = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        config = _read_json(Path(model_dir) / name)
        for key in TOKEN_NAMES:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if key not in found and isinstance(value, str):
                found[key] = value
    for key, token_id in (("bos_token", bos), ("eos_token", eos)):
        if key not in found and token_id is not None:
            found[key] = tokenizer.id_to_token(token_id)
    return found


# ---- rendering -------------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` renders its body (transformers tracks it for masks; see the docstring)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()``, refusing underscore names (CPython internals), as transformers' TemplateNamespace."""

    def __init__(*args, **kwargs):  # Namespace's own signature trick: `self` may be a keyword argument
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore names on a namespace: {name!r}"
            )


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment (sandboxed, trim_blocks, lstrip_blocks, its globals)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda format: datetime.now().strftime(format),
        dict=_Dict(),
        namespace=_Namespace,
    )
    return environment.from_string(source)


def check_messages(messages: object, where: str = "messages") -> list[dict[str, str]]:
    """The conversation as plain {"role", "content"} dicts; a ValueError naming ``where`` and the problem otherwise.

    Roles: system (first only), user, assistant; contents are strings.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role': …, 'content': …}} messages")
    plain = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(
                f"{where}[{i}]: needs a role in {ROLES} and a string content, got {json.dumps(message)[:80]}"
            )
        if role == "system" and i > 0:
            raise ValueError(f"{where}[{i}]: a system message may only come first")
        plain.append({"role": role, "content": content})
    return plain


def render(source: str, messages: list[dict[str, str]], add_generation_prompt: bool = False, **tokens: str) -> str:
    """The template's text for ``messages`` (transformers' ``apply_chat_template(..., tokenize=False)``)."""
    return compile_template(source).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **tokens
    )


# ---- a checkpoint's chat format ----------------------------------------------------------------------------


@dataclass
class ChatFormat:
    """A template with the special tokens it renders and the tokenizer that reads its text."""

    template: str  # the Jinja source
    tokens: dict[str, str]  # bos_token, eos_token, … as strings
    tokenizer: object  # a tokenizers.Tokenizer
    source: str  # where the template came from (a file name, or the fallback)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return render(self.template, messages, add_generation_prompt, **self.tokens)

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered text, tokenized whole without added special tokens (as transformers does)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, [start, end) of each assistant turn in it): see the module docstring."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("a conversation cannot open with an assistant turn: there is no prompt to answer")
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise ValueError(
                    f"the chat template ({self.source}) does not render conversations incrementally at message {i}: "
                    "the prompt before an assistant turn is not a prefix of the conversation, so the turn's tokens "
                    "cannot be told apart for the loss"
                )
            spans.append((len(prompt), len(turn.rstrip())))
        return text, spans

    def encode_conversation(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """(token ids of the whole conversation, which tokens overlap an assistant turn: the ones the loss is on)."""
        text, spans = self.assistant_spans(messages)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        scored = [any(start < end_ and end > start_ for start_, end_ in spans) for start, end in encoding.offsets]
        return encoding.ids, scored

    def end_of_turn(self) -> str:
        """The marker the template writes after an assistant's text (<|im_end|>, <|eot_id|>, </s>), stripped."""
        marker = "\x00END-OF-CONTENT\x00"
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
        text = self.render(messages)
        return text[text.index(marker) + len(marker) :].strip()

    def stops(self, eos: int) -> tuple[set[int], list[str]]:
        """(stop token ids, stop strings) for generation: EOS, and the end-of-turn marker as a token if it is one."""
        marker = self.end_of_turn()
        marker_id = self.tokenizer.token_to_id(marker) if marker else None
        if marker_id is not None:
            return {eos, marker_id}, []
        return {eos}, [marker] if marker else []


def load_chat_format(
    model_dir: str | Path,
    tokenizer,
    bos: int | None,
    eos: int,
    note: Callable[[str], object] | None = None,
) -> ChatFormat:
    """The checkpoint's chat format; without a template, the Alpaca format, and ``note`` says so (default: stderr)."""
    template, source = read_chat_template(model_dir)
    if template is None:
        (note or (lambda text: print(text, file=sys.stderr)))(
            f"{model_dir} has no chat template (no chat_template in {TOKENIZER_CONFIG}, no {TEMPLATE_FILE}): "
            "conversations use make finetune's Alpaca format (### Instruction: … ### Response: …)"
        )
        template, source = ALPACA_TEMPLATE, "the Alpaca format (no chat template)"
    return ChatFormat(template, template_tokens(model_dir, tokenizer, bos, eos), tokenizer, source)
