"""A tiny Hugging Face-layout checkpoint, tokenizer and instruction data, made on the spot (no downloads).

`make finetune` and `make generate` run on any Llama-family directory; without one (CI, the tests, a
first try offline) they run on this: ``python -m training.toy_checkpoint DIR`` writes

    DIR/model/config.json, model.safetensors (or shards + index)   a random TinyLlama in transformers' layout:
                                                                   2 layers, grouped-query attention (4 query,
                                                                   2 key/value heads), tied embeddings
    DIR/model/tokenizer.json, tokenizer_config.json               a byte-level BPE tokenizer trained here with
                                                                   the ``tokenizers`` library on the data below,
                                                                   with a ChatML chat template (SmolLM2's style:
                                                                   <|im_start|> and <|im_end|> are special tokens)
    DIR/data.jsonl                                                 instruction records of the course's digit
                                                                   tasks in words ("Reverse the digits." …)
    DIR/chat.jsonl                                                 the same tasks as conversations of 1-3 turns
                                                                   ({"messages": [...]}, for make finetune / chat)

The model is random, so a short run teaches it the format and some of the tasks; the point is that
every piece of the real path runs: config, shards, tokenizer, special tokens, masking, chat template,
QLoRA, checkpoints, the PEFT-format adapter.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from model.hf_checkpoint import save_hf_checkpoint
from model.tiny_llama import LlamaConfig, TinyLlama

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML's turn markers, special tokens as in SmolLM2-Instruct
TASKS = {
    "Copy the digits.": lambda d: d,
    "Reverse the digits.": lambda d: d[::-1],
    "Sort the digits.": sorted,
    "Add one to every digit.": lambda d: [str((int(x) + 1) % 10) for x in d],
}


def toy_records(n: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """``n`` instruction records: a task in words, 3–6 digits as input, the answer as output."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        instruction = rng.choice(list(TASKS))
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 6))]
        records.append(
            {"instruction": instruction, "input": " ".join(digits), "output": " ".join(TASKS[instruction](digits))}
        )
    return records


def toy_conversations(records: list[dict[str, str]], seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """The records as conversations of 1-3 turns: the user gives the task and its digits, the assistant the answer."""
    rng = random.Random(seed)
    conversations, i = [], 0
    while i < len(records):
        turns = records[i : i + rng.randint(1, 3)]
        i += len(turns)
        messages = []
        for r in turns:
            messages += [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                         {"role": "assistant", "content": r["output"]}]  # fmt: skip
        conversations.append({"messages": messages})
    return conversations


def train_tokenizer(texts: list[str], vocab_size: int = 512, special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 style) trained on ``texts``, with <s>, </s>, <pad> and ``special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_toy_checkpoint(directory: str | Path, n_records: int = 200, sharded: bool = False, seed: int = 0) -> Path:
    """Write DIR/model (checkpoint + tokenizer) and DIR/data.jsonl; returns DIR."""
    from training.chat_template import CHATML, render
    from training.finetune import prompt_text  # the same instruction format the fine-tuning uses

    directory = Path(directory)
    model_dir = directory / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    records = toy_records(n_records, seed)
    conversations = toy_conversations(records, seed)
    with open(directory / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(directory / "chat.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conversations)
    texts = [prompt_text(r["instruction"], r["input"]) + r["output"] for r in records]
    texts += [render(CHATML, c["messages"]) for c in conversations]
    tokenizer = train_tokenizer(texts, special_tokens=CHATML_TOKENS)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": CHATML,
               "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (model_dir / "tokenizer_config.json").write_text(json.dumps(special, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        max_seq_len=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=128,
        n_kv_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = TinyLlama(config)
    # TinyLlama's N(0, 0.02²) embeddings, read back through the tied head after a unit-scale norm, cap every
    # logit near ±2 (a random model then barely moves in 100 steps); a wider table gives the logits room.
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.3)
    save_hf_checkpoint(model, model_dir, max_shard_bytes=40_000 if sharded else None)
    hf_config = json.loads((model_dir / "config.json").read_text())
    hf_config.update(bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS))
    (model_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.toy_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write model/ and data.jsonl")
    parser.add_argument("--records", type=int, default=200, help="instruction records (default: 200)")
    parser.add_argument("--sharded", action="store_true", help="write the weights as several shards + an index")
    args = parser.parse_args(argv)
    directory = write_toy_checkpoint(args.directory, args.records, args.sharded)
    print(f"toy checkpoint in {directory / 'model'}, data in {directory / 'data.jsonl'} and {directory / 'chat.jsonl'}")


if __name__ == "__main__":
    main()
