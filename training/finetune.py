"""QLoRA on a real checkpoint and your own data (`make finetune MODEL=<dir> DATA=<file.jsonl>`).

The same recipe as Stage 4, on a Hugging Face Llama-family directory instead of the bundled toy:

    MODEL/config.json, model.safetensors (or shards), tokenizer.json   ->  load_hf_checkpoint, load_tokenizer
    DATA: one JSON object per line, {"instruction": …, "input": … (optional), "output": …}
          or a conversation, {"messages": [{"role": "system" | "user" | "assistant", "content": …}, …]}
    prepare_qlora_model (Stage 4.2)  ->  QLoRATrainer (Stage 4.3)  ->  an adapter PEFT loads onto MODEL

A conversation is laid out by MODEL's chat template (``training/chat_template.py``: the same ids as
transformers' ``apply_chat_template``), and the loss is on the assistant turns only (their text and
the end-of-turn marker after it); a MODEL without a template gets the Alpaca format below, and a
message saying so. Each instruction record becomes one sequence in the instruction format below
(Alpaca's, without its preamble); the loss is on the response tokens and the closing EOS only (the
prompt's labels are −100, as in every instruction-tuning recipe):

    <bos>### Instruction:
    {instruction}

    ### Input:                      (only when "input" is non-empty)
    {input}

    ### Response:
    {output}<eos>

Sequences are cut to ``--max-length`` tokens and right-padded to the longest (a causal model never
looks right, so padding needs no attention mask). ``--packing`` instead concatenates the
sequences into one stream and cuts it into blocks of exactly ``--max-length`` (no padding; an
example may then attend to the end of the previous one, as in GPT-style pretraining). A share
``--eval-fraction`` of the records (at least one) is held out for the eval loss and exact-match
accuracy of the responses.

Outputs in ``--output-dir`` (default runs/finetune): metrics.jsonl, loss_curve.png,
checkpoint.pt (every ``--save-every`` steps; ``--resume`` continues from it with the same result
as an uninterrupted run: the Stage 4 checkpoint), and adapter/ in PEFT's format with the HF
tensor names and ``base_model_name_or_path`` = MODEL, so that PEFT's ``PeftModel.from_pretrained``
loads it onto transformers' ``AutoModelForCausalLM`` of MODEL (lesson 08 shows the two lines). Every TrainConfig option of Stage 4 is accepted too (``--r``, ``--learning-rate``,
``--max-steps``, ``--batch-size``, ``--quantize none`` for plain LoRA, …); ``--help`` lists them.
``IMPL=student`` (``LORA_IMPL=student``) runs your Stage 1–4 code. Under torchrun it trains with
DistributedDataParallel (``training/distributed.py``), or with ``--fsdp`` sharded by FSDP2
(``training/fsdp.py``; checkpoints are then sharded directories ``checkpoint-<step>/``): each of the
N processes takes every N-th row of each micro-batch, rank 0 writes the outputs.

    torchrun --nproc_per_node=2 -m training.finetune --model DIR --data FILE.jsonl [--fsdp]

    make finetune MODEL=~/models/SmolLM2-135M DATA=my_data.jsonl ARGS="--max-steps 200"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

from model._impl import refuse_stubs, use_default_for

use_default_for("show")  # the reference where this checkout has it, unless IMPL / LORA_IMPL says otherwise

from model.hf_checkpoint import load_hf_checkpoint, save_hf_adapter  # noqa: E402
from training.chat_template import ChatFormat, check_messages, load_chat_format  # noqa: E402
from training.cli import override_defaults, train_config  # noqa: E402
from training.data import IGNORE_INDEX  # noqa: E402
from training.qlora_trainer import QLoRATrainer, config_parser, prepare_qlora_model  # noqa: E402

TOKENIZER_NAME = "tokenizer.json"
PROMPT = "### Instruction:\n{instruction}\n\n"
INPUT = "### Input:\n{input}\n\n"
RESPONSE = "### Response:\n"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- tokenizer and special tokens ----------------------------------------------------------------


def load_tokenizer(model_dir: str | Path):
    """The model's ``tokenizer.json`` through the ``tokenizers`` library (no transformers needed)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the fast-tokenizer file of the model (checkpoints on the Hub ship one; "
            "a directory with only tokenizer.model can be converted with transformers' AutoTokenizer.save_pretrained)"
        )
    return Tokenizer.from_file(str(path))


def _first(value: object) -> int | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def special_token_ids(model_dir: str | Path, tokenizer) -> tuple[int | None, int]:
    """(bos, eos) token ids: config.json, then generation_config.json, then tokenizer_config.json's strings.

    A model without a BOS token gets None (nothing is prepended); one without an EOS is refused:
    fine-tuning must teach the model where a response ends.
    """
    model_dir = Path(model_dir)
    found: dict[str, int | None] = {"bos": None, "eos": None}
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            config = json.loads(path.read_text())
            for kind in found:
                found[kind] = found[kind] if found[kind] is not None else _first(config.get(f"{kind}_token_id"))
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        for kind in found:
            token = config.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if found[kind] is None and isinstance(token, str):
                found[kind] = tokenizer.token_to_id(token)
    if found["eos"] is None:
        raise ValueError(
            f"no EOS token id in {model_dir} (config.json eos_token_id or tokenizer_config.json eos_token)"
        )
    return found["bos"], found["eos"]


# ---- data -------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict]:
    """The JSONL records: instructions (a non-empty "instruction" and "output", "input" optional) or conversations.

    A conversation is {"messages": [...]}: roles system (first only), user, assistant, string contents,
    at least one assistant turn, and not an assistant turn first. Errors name the file and line.
    """
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if isinstance(record, dict) and "messages" in record:
            records.append({"messages": conversation(record["messages"], f"{path}:{number}: messages")})
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str) or not record[k]]
        if missing:
            raise ValueError(
                f"{path}:{number}: needs string fields instruction and output (or a messages list); "
                f"missing or empty: {missing}"
            )
        records.append(
            {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
        )
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def conversation(messages: object, where: str) -> list[dict[str, str]]:
    """A checked conversation for training: valid messages, an assistant turn to learn from, a prompt before it."""
    messages = check_messages(messages, where)
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError(f"{where}: no assistant turn, so nothing to learn from")
    if roles[0] == "assistant":
        raise ValueError(f"{where}[0]: a conversation cannot open with an assistant turn")
    return messages


def prompt_text(instruction: str, input_text: str = "") -> str:
    """The prompt of the instruction format, ending with the response header."""
    return PROMPT.format(instruction=instruction) + (INPUT.format(input=input_text) if input_text else "") + RESPONSE


def encode_record(record: dict[str, str], tokenizer, bos: int | None, eos: int) -> tuple[list[int], list[bool]]:
    """(token ids of the whole sequence, which of them are response tokens the loss is on)."""
    prompt = ([bos] if bos is not None else []) + tokenizer.encode(
        prompt_text(record["instruction"], record["input"]), add_special_tokens=False
    ).ids
    response = tokenizer.encode(record["output"], add_special_tokens=False).ids + [eos]
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def encode_example(
    record: dict, tokenizer, bos: int | None, eos: int, chat: ChatFormat | None
) -> tuple[list[int], list[bool]]:
    """An instruction record (``encode_record``) or a conversation (the chat format: assistant turns scored)."""
    if "messages" in record:
        return chat.encode_conversation(record["messages"])
    return encode_record(record, tokenizer, bos, eos)


def build_dataset(
    sequences: list[tuple[list[int], list[bool]]], max_length: int, pad: int, packing: bool = False
) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels"}, each (N, T): labels[t] = token t+1 where it is a response token, else −100.

    Without packing: one row per sequence, cut to max_length + 1 tokens, padded to the longest.
    With packing: the sequences concatenated, cut into rows of max_length + 1 (the last partial row dropped).
    """
    if packing:
        ids = [t for s, _ in sequences for t in s]
        scored = [m for _, mask in sequences for m in mask]
        width = max_length + 1
        rows = [(ids[i : i + width], scored[i : i + width]) for i in range(0, len(ids) - width + 1, max_length)]
        if not rows:
            raise ValueError(f"packing needs at least max_length + 1 = {width} tokens, the data has {len(ids)}")
    else:
        rows = [(s[: max_length + 1], m[: max_length + 1]) for s, m in sequences]
    length = max(len(s) for s, _ in rows) - 1  # T
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, mask) in enumerate(rows):
        n = len(seq) - 1
        input_ids[i, :n] = torch.tensor(seq[:-1])
        target = torch.tensor(seq[1:])
        labels[i, :n] = torch.where(torch.tensor(mask[1:]), target, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


def split(data: dict[str, torch.Tensor], eval_fraction: float, seed: int) -> tuple[dict, dict]:
    """(train, eval): a seeded shuffle, at least one example in each part."""
    n = data["input_ids"].shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 sequences to hold one out for evaluation, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    pick = lambda rows: {k: v[rows] for k, v in data.items()}  # noqa: E731
    return pick(order[n_eval:]), pick(order[:n_eval])


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 8) -> dict[str, float]:
    """Eval loss per response token and the share of responses predicted exactly (teacher forcing), in batches.

    The Stage 4 trainer's ``evaluate`` runs the whole eval set in one batch, which is fine for the toy
    and too much for a real vocabulary (B·T·V logits); this is the same computation in pieces.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, tokens, exact = 0.0, 0, 0
    for i in range(0, data["input_ids"].shape[0], batch_size):
        x, y = data["input_ids"][i : i + batch_size].to(device), data["labels"][i : i + batch_size].to(device)
        logits = model(x).float()  # (b, T, V)
        scored = y != IGNORE_INDEX
        loss_sum += torch.nn.functional.cross_entropy(logits[scored], y[scored], reduction="sum").item()
        tokens += int(scored.sum())
        exact += int(((logits.argmax(-1) == y) | ~scored).all(dim=1).sum())
    model.train(was_training)
    return {"eval_loss": loss_sum / max(tokens, 1), "accuracy": exact / data["input_ids"].shape[0]}


# ---- the run -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_parser()
    parser.prog = "python -m training.finetune"
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face Llama-family directory (config.json, safetensors, tokenizer.json)",
    )
    parser.add_argument(
        "--data", required=True, help="JSONL: instruction, input (optional), output; or messages (a conversation)"
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training sequence (default: 256)")
    parser.add_argument("--packing", action="store_true", help="concatenate the sequences into full rows")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of records held out (default: 0.1)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights' dtype before quantization")
    parser.add_argument("--save-every", type=int, default=0, help="write checkpoint.pt every N steps (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt if present")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2, not DDP")
    override_defaults(parser, output_dir="runs/finetune", max_steps=100, batch_size=8, precision="fp32", log_every=10)
    args = parser.parse_args(argv)
    if args.fsdp and "RANK" not in os.environ:
        parser.error("--fsdp shards the model over processes: launch with torchrun --nproc_per_node=N")
    if args.dtype == "bf16" and args.precision != "bf16":
        parser.error(
            "--dtype bf16 needs --precision bf16: the 4-bit layers compute in the precision's dtype, "
            "and the bf16 embeddings, norms and head need autocast to meet them"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    refuse_stubs("make finetune", range(1, 5))  # the stages it runs
    distributed = "RANK" in os.environ  # launched by torchrun: one process of N (training/distributed.py)
    rank, world = 0, 1
    if distributed:
        from training.distributed import DistributedTrainer, init_distributed
        from training.fsdp import FSDPTrainer

        rank, world, _ = init_distributed()
    config = train_config(args)
    tokenizer = load_tokenizer(args.model)
    bos, eos = special_token_ids(args.model, tokenizer)
    records = read_records(args.data)
    note = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    chat = load_chat_format(args.model, tokenizer, bos, eos, note) if any("messages" in r for r in records) else None
    sequences = [encode_example(r, tokenizer, bos, eos, chat) for r in records]
    train_data, eval_data = split(
        build_dataset(sequences, args.max_length, eos, args.packing), args.eval_fraction, config.seed
    )
    rows = train_data["input_ids"].shape[0]
    config.batch_size = max(world, min(config.batch_size, rows) // world * world)  # each process gets batch / N rows
    model = load_hf_checkpoint(args.model, dtype=DTYPES[args.dtype])
    model = prepare_qlora_model(model, config)
    trainer_class = (FSDPTrainer if args.fsdp else DistributedTrainer) if distributed else QLoRATrainer
    trainer = trainer_class(model, config, train_data, eval_data)
    module = getattr(trainer, "module", trainer.model)  # the model itself, without DDP's wrapper
    single = Path(config.output_dir) / "checkpoint.pt"  # one process: Stage 4's checkpoint file
    checkpoint_path = trainer.checkpoint_path if distributed else lambda: single
    latest = trainer.latest_checkpoint() if distributed else single if single.is_file() else None
    if args.resume and latest is not None:
        trainer.load_checkpoint(latest)
        print(f"resumed from {latest} at step {trainer.step}", flush=True)
    before = evaluate(module, eval_data)  # under FSDP every rank runs it: a forward gathers every unit
    every = args.save_every or config.max_steps
    while trainer.step < config.max_steps:
        trainer.train(steps=every)
        trainer.save_checkpoint(checkpoint_path())
    after = evaluate(module, eval_data)
    adapter = Path(config.output_dir) / "adapter"
    with trainer.full_parameters() if distributed else contextlib.nullcontext():  # FSDP: the adapter gathered
        if rank == 0:
            save_hf_adapter(module, adapter, Path(args.model).resolve())
    if rank == 0:
        trainer.save_loss_curve()
        print(f"eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, response exact match "
              f"{before['accuracy']:.1%} -> {after['accuracy']:.1%} ({len(sequences)} records, {rows} train rows "
              f"of {train_data['input_ids'].shape[1]} tokens, {world} process{'es' * (world > 1)})")  # fmt: skip
        print(f"adapter (PEFT format, base_model_name_or_path={Path(args.model).resolve()}) in {adapter}")
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"], "step": trainer.step}


if __name__ == "__main__":
    main()
