#!/usr/bin/env python3
"""Check, with the real transformers library, that ``training/generate.py`` decodes as transformers does (dev-only).

The tests hold the KV cache to the full recomputation (``testcases/generation_test.py``); this script
holds the whole decoding loop to transformers' ``generate`` on the same weights. Nothing is
downloaded: a random ``LlamaForCausalLM`` (2 layers, hidden 64, 4 heads, 2 kv heads) is built, its
weights redrawn at a scale where logits are O(1-10) (``check_hf_checkpoint.randomize``), saved, and
loaded by ``load_hf_checkpoint``. fp32, eval, SDPA.

    1 greedy, one prompt            our generate (KV cache) vs model.generate(do_sample=False): same ids
    2 greedy, a batch of 4          prompts of 3-17 tokens, left-padded with an attention mask on both
                                    sides (transformers: padding_side="left"): same ids, every row
    3 EOS                           an eos id that the greedy run meets: both stop the row there
    4 llama3 RoPE + tied            the same on a config with Llama 3.1's RoPE scaling and a tied head
    5 the cache's logits            each step's logits of our cached decoding vs transformers' full
                                    forward of the same sequence (left-padded rows included): max |Δ|,
                                    bounded by 64 × transformers' own fp32-vs-fp64 difference
    6 sampling filters              our sampling_weights vs transformers' Temperature, TopK, TopP
                                    warpers on random logits: the same kept tokens, probabilities
                                    within 1e-6

Greedy ids are integers, and an argmax can flip only where two logits tie to within rounding;
each greedy check prints the smallest top-1 / top-2 margin it met, so a flip can be told from a
bug. One line per check; exit 1 if any fails:

    OMP_NUM_THREADS=1 /tmp/bnbenv/bin/python solutions/tools/check_generation.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

from model.hf_checkpoint import load_hf_checkpoint  # noqa: E402
from solutions.tools.check_hf_checkpoint import LLAMA3, hf_model  # noqa: E402
from training.generate import Sampling, decode_steps, generate, sampling_weights  # noqa: E402

results: list[tuple[str, bool]] = []


def record(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name:<52} {detail}")


def pair(tmp: Path, label: str, seed: int, **overrides):
    """(transformers model, ours) with the same random weights (ours read from what transformers saved)."""
    theirs = hf_model(seed, **overrides)
    theirs.generation_config.pad_token_id = 0
    directory = tmp / label
    theirs.save_pretrained(directory)
    return theirs, load_hf_checkpoint(directory)


def their_greedy(model, prompts: list[list[int]], new: int, eos: int | None) -> list[list[int]]:
    """transformers' greedy continuation of left-padded prompts, cut at eos (excluded), as lists."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
            pad_token_id=0, min_new_tokens=0,
        )  # fmt: skip
    rows = []
    for row in out[:, T:].tolist():
        rows.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    return rows


def smallest_margin(model, prompts: list[list[int]], new: int) -> float:
    """The smallest gap between the largest and second-largest logit along our greedy decoding."""
    gaps = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top = logits.float().topk(2, dim=-1).values  # (B, 2)
        gaps.append((top[:, 0] - top[:, 1]).min().item())
        return logits.argmax(dim=-1).cpu()

    for _ in decode_steps(model, prompts, new, pick):
        pass
    return min(gaps)


def check_greedy(label: str, theirs, ours, prompts: list[list[int]], new: int, eos: int | None = None) -> None:
    mine = generate(ours, prompts, eos, new)
    expected = their_greedy(theirs, prompts, new, eos)
    same = mine == expected
    lengths = [len(r) for r in mine]
    detail = f"{len(prompts)} row(s), new tokens {lengths}; smallest top-1/top-2 margin {smallest_margin(ours, prompts, new):.2e}"
    if not same:
        detail += f"\n     ours   {mine}\n     theirs {expected}"
    record(label, same, detail)


def check_cached_logits(theirs, ours, prompts: list[list[int]], new: int) -> None:
    """Our cached decoding's logits at each step vs transformers' full forward of the same left-padded sequence."""
    steps = []
    for _ in decode_steps(ours, prompts, new, lambda logits: (steps.append(logits.clone()), logits.argmax(-1))[1]):
        pass
    chosen = generate(ours, prompts, None, new)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p + c for p, c in zip(prompts, chosen, strict=True)])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * (len(p) + new) for p in prompts])
    double = copy.deepcopy(theirs).double()  # the yardstick: transformers' own fp32 rounding
    with torch.no_grad():
        full = theirs(input_ids=ids, attention_mask=mask).logits  # (B, T+new, V)
        full64 = double(input_ids=ids, attention_mask=mask).logits
    positions = range(T - 1, T + new - 1)  # the logits that chose each new token
    ours_steps = torch.stack([s for s in steps], dim=1)  # (B, new, V)
    theirs_steps = full[:, list(positions)]
    noise = (full - full64).abs().max().item()
    delta = (ours_steps.double() - theirs_steps.double()).abs().max().item()
    bound = 64 * (noise + 2.0**-24 * full64.abs().max().item())
    record(
        "5. cached logits vs transformers' full forward",
        delta <= bound,
        f"max |Δ| = {delta:.2e} over {len(prompts)} rows × {new} steps (bound {bound:.2e}: 64 × transformers' "
        f"fp32-vs-fp64 {noise:.2e} + 64 u·max|logit|)",
    )


def check_sampling_filters() -> None:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 100, generator=generator)
    worst, same_support = 0.0, True
    for temperature, top_k, top_p in [(1.0, 0, 0.9), (0.7, 20, 1.0), (1.3, 10, 0.8), (0.5, 50, 0.95), (1.0, 1, 1.0)]:
        ours = sampling_weights(logits, Sampling(temperature, top_k, top_p))
        ours = ours / ours.sum(dim=-1, keepdim=True)
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        theirs = torch.softmax(scores, dim=-1)
        same_support &= torch.equal(ours > 0, theirs > 0)
        worst = max(worst, (ours - theirs).abs().max().item())
    record("6. sampling filters vs transformers' warpers", same_support and worst <= 1e-6,
           f"same kept tokens: {same_support}; max |Δp| = {worst:.1e} (T, top-k, top-p: 5 settings × 6 rows)")  # fmt: skip


def main() -> int:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        theirs, ours = pair(tmp, "gqa", seed=1)
        generator = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, 100, (n,), generator=generator).tolist() for n in (17, 3, 9, 12)]
        check_greedy("1. greedy, one prompt (17 tokens, 30 new)", theirs, ours, prompts[:1], 30)
        check_greedy("2. greedy, a left-padded batch (17/3/9/12 tokens)", theirs, ours, prompts, 30)
        greedy = generate(ours, prompts, None, 30)
        eos = greedy[1][5]  # a token row 1 meets at step 5: rows stop at its first occurrence
        check_greedy(f"3. the same with eos={eos}", theirs, ours, prompts, 30, eos)
        rope = {**LLAMA3, "rope_theta": 10000.0, "rope_type": "llama3"}
        theirs3, ours3 = pair(tmp, "llama3", seed=2, rope_parameters=rope, tie_word_embeddings=True)
        check_greedy("4. greedy, llama3 RoPE + tied head, batch, to T=47", theirs3, ours3, prompts, 30)
        check_cached_logits(theirs, ours, prompts, 12)
        check_sampling_filters()
    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
