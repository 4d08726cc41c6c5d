"""Synthetic digit tasks for pretraining and fine-tuning the tiny Llama.

Every example is one fixed-length token sequence

    BOS <task> d1 d2 ... dn SEP a1 a2 ... an EOS

where d1..dn are random digits and a1..an is the answer the task asks for:

    copy       3 1 4 1 5 9  ->  3 1 4 1 5 9
    reverse    3 1 4 1 5 9  ->  9 5 1 4 1 3
    sort       3 1 4 1 5 9  ->  1 1 3 4 5 9
    increment  3 1 4 1 5 9  ->  4 2 5 2 6 0    (each digit + 1, mod 10)
    increment-reverse         ->  0 6 2 5 2 4    (the harder task of Stage 5: increment, then reverse)

The base model is pretrained on the PRETRAIN_TASKS mixture only. FINETUNE_TASK
has its own task token that the base never sees, so it is a new skill that
the fine-tuning chapters have to teach. HARD_TASK (Stage 5) combines that new
skill with a known one; its task token is the PAD id, which no sequence uses
(so the bundled checkpoint needs no new vocabulary). Plain LoRA at rank 1–2
does not learn it in the variants demo's budget, so the LoRA variants can differ.

Tensors follow the usual next-token-prediction layout: ``input_ids`` is the
sequence without its last token and ``labels`` the sequence without its
first token (already shifted), with every non-answer position set to -100 so
that the loss only counts the answer digits and the final EOS.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

N_DIGITS = 8  # digits per problem (n above)
IGNORE_INDEX = -100  # label value skipped by the loss (PyTorch's default)


class Vocab:
    """Token ids. Digits come first so that token id == digit value."""

    DIGITS = tuple(range(10))  # ids 0..9 are the digits '0'..'9'
    PAD = 10  # padding (unused while all sequences have the same length)
    BOS = 11  # beginning of sequence
    SEP = 12  # separates the question from the answer
    EOS = 13  # end of sequence
    TASK_BASE = 14  # first task token; task i has id TASK_BASE + i


PRETRAIN_TASKS = ("copy", "reverse", "sort")  # what the base model learns
FINETUNE_TASK = "increment"  # new skill, never seen during pretraining
TASKS = (*PRETRAIN_TASKS, FINETUNE_TASK)
HARD_TASK = "increment-reverse"  # Stage 5's harder task: increment each digit, then reverse the answer
VOCAB_SIZE = Vocab.TASK_BASE + len(TASKS)  # 18
SEQ_LEN = 2 * N_DIGITS + 4  # BOS, task, n digits, SEP, n digits, EOS


def task_token(task: str) -> int:
    """Token id of a task name."""
    return Vocab.TASK_BASE + TASKS.index(task)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Human-readable string for a 1-D sequence of token ids."""
    names = {Vocab.PAD: "PAD", Vocab.BOS: "BOS", Vocab.SEP: "SEP", Vocab.EOS: "EOS"}
    names |= {task_token(t): f"<{t}>" for t in TASKS}
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return " ".join(str(i) if i < 10 else names.get(i, f"?{i}") for i in ids)


# ---------------------------------------------------------------------------
# Building examples
# ---------------------------------------------------------------------------


def _answer(task: str, digits: torch.Tensor) -> torch.Tensor:
    """The answer digits for a batch of problems. digits: (N, n) -> (N, n)."""
    if task == "copy":
        return digits.clone()
    if task == "reverse":
        return digits.flip(dims=[1])
    if task == "sort":
        return digits.sort(dim=1).values
    if task == "increment":
        return (digits + 1) % 10
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _build(tasks: torch.Tensor, digits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Assemble sequences from task indices (N,) and digits (N, n)."""
    answers = torch.empty_like(digits)
    for i, task in enumerate(TASKS):
        rows = tasks == i
        if rows.any():
            answers[rows] = _answer(task, digits[rows])
    return _build_with_token(tasks + Vocab.TASK_BASE, digits, answers)


def _build_with_token(
    token: torch.Tensor | int, digits: torch.Tensor, answers: torch.Tensor
) -> dict[str, torch.Tensor]:
    """BOS <token> digits SEP answers EOS, shifted into input_ids / labels (only the answer is scored)."""
    N = digits.shape[0]

    def col(value: int | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.long).expand(N).unsqueeze(1)  # (N, 1)

    seq = torch.cat(
        [col(Vocab.BOS), col(token), digits, col(Vocab.SEP), answers, col(Vocab.EOS)], dim=1
    )  # (N, SEQ_LEN)
    input_ids = seq[:, :-1].contiguous()  # (N, T)
    labels = seq[:, 1:].clone()  # (N, T) target at position t is token t+1
    # Only the answer digits and EOS are scored: they sit after SEP.
    labels[:, : N_DIGITS + 2] = IGNORE_INDEX  # task, digits, SEP -> ignored
    return {"input_ids": input_ids, "labels": labels}


def make_examples(task: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` examples of one task: {"input_ids": (n, T), "labels": (n, T)}, int64."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (n, N_DIGITS), generator=g)  # (n, N_DIGITS)
    tasks = torch.full((n,), TASKS.index(task), dtype=torch.long)
    return _build(tasks, digits)


def pretraining_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` examples drawn uniformly from the PRETRAIN_TASKS mixture."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (n, N_DIGITS), generator=g)  # (n, N_DIGITS)
    tasks = torch.randint(0, len(PRETRAIN_TASKS), (n,), generator=g)  # (n,)
    return _build(tasks, digits)


_SPLIT_SEED = {"train": 1_000_001, "eval": 2_000_003}  # keeps the splits' RNG streams apart
_MAX_TRAIN = 20_000  # eval rows are checked against this many training rows


def hard_finetune_data(split: str, n: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The harder task (HARD_TASK): the answer is the reversed increment, the task token is PAD.

    Same layout, sizes and split seeds as ``finetune_data`` (2000 training, 500 evaluation examples);
    the problems are drawn from their own streams, and eval rows that occur in training are dropped.
    """
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    default = 2000 if split == "train" else 500
    n = default if n is None else n
    g = torch.Generator().manual_seed(_SPLIT_SEED[split] + 7 + 2 * seed)
    digits = torch.randint(0, 10, (n + (64 if split == "eval" else 0), N_DIGITS), generator=g)
    data = _build_with_token(Vocab.PAD, digits, ((digits + 1) % 10).flip(dims=[1]))
    if split == "train":
        return data
    train = hard_finetune_data("train", _MAX_TRAIN, seed)
    seen = {tuple(row) for row in train["input_ids"].tolist()}
    keep = torch.tensor([tuple(row) not in seen for row in data["input_ids"].tolist()])
    return {k: v[keep][:n] for k, v in data.items()}


def finetune_data(split: str, n: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The fine-tuning task (FINETUNE_TASK): {"input_ids": (n, T), "labels": (n, T)}.

    Defaults: 2000 training examples, 500 evaluation examples. The splits use
    disjoint seeds, and any eval problem that also occurs among the first
    20 000 training problems (same ``seed``) is dropped, so eval accuracy
    measures generalisation, not memorisation. A larger ``n`` for "train"
    extends the same stream: the first 2000 rows never change.
    """
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "train":
        return make_examples(FINETUNE_TASK, 2000 if n is None else n, seed=_SPLIT_SEED["train"] + 2 * seed)
    n = 500 if n is None else n
    # Draw a few spare rows, drop the ones that clash with training, keep n.
    # (With 10**N_DIGITS possible problems, clashes are very rare.)
    data = make_examples(FINETUNE_TASK, n + 64, seed=_SPLIT_SEED["eval"] + 2 * seed)
    train = make_examples(FINETUNE_TASK, _MAX_TRAIN, seed=_SPLIT_SEED["train"] + 2 * seed)
    seen = {tuple(row) for row in train["input_ids"].tolist()}
    keep = torch.tensor([tuple(row) not in seen for row in data["input_ids"].tolist()])
    return {k: v[keep][:n] for k, v in data.items()}


# ---------------------------------------------------------------------------
# Batching, loss and evaluation
# ---------------------------------------------------------------------------


def batches(
    data: dict[str, torch.Tensor], batch_size: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of shuffled ``(input_ids, labels)`` batches, each (B, T).

    Each pass over the data uses a new permutation from a local generator;
    the last incomplete batch of a pass is dropped so every batch has shape
    (batch_size, T). Stop it yourself, e.g. ``zip(range(steps), batches(...))``.
    """
    g = torch.Generator().manual_seed(seed)
    n = data["input_ids"].shape[0]
    assert n >= batch_size, f"need at least {batch_size} examples, got {n}"
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield data["input_ids"][idx], data["labels"][idx]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions. logits (B, T, V), labels (B, T).

    Computed in fp32 even if the logits are bf16 (e.g. under autocast); float64 logits stay float64.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def exact_match_accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 500) -> float:
    """Fraction of examples whose whole answer (digits + EOS) is predicted right.

    We run the model once on the full sequence (teacher forcing) and check the
    argmax at every labelled position. This gives exactly the same verdict as
    greedy decoding token by token: if every teacher-forced argmax is correct,
    greedy decoding produces those same tokens, so at each step it sees the
    same prefix as teacher forcing and repeats the same correct choice. If
    some argmax is wrong, greedy decoding reaches that first wrong position
    with the identical (correct) prefix and makes the same mistake. One
    forward pass per batch is just much cheaper than n sequential ones.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    n = data["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        x = data["input_ids"][i : i + batch_size].to(device)  # (B, T)
        y = data["labels"][i : i + batch_size].to(device)  # (B, T)
        pred = model(x).argmax(dim=-1)  # (B, T)
        ok = (pred == y) | (y == IGNORE_INDEX)  # unlabelled positions always "ok"
        correct += int(ok.all(dim=1).sum())
    model.train(was_training)
    return correct / n


def per_task_accuracy(
    model: nn.Module, tasks: tuple[str, ...] = TASKS, n: int = 1000, seed: int = 12345
) -> dict[str, float]:
    """Exact-match accuracy of ``model`` on ``n`` fresh examples of each task."""
    return {t: exact_match_accuracy(model, make_examples(t, n, seed + i)) for i, t in enumerate(tasks)}
