#!/usr/bin/env python3
"""Check, with the real PEFT library, that Stage 7's methods match PEFT 0.21.2 (dev-only).

The graded tests never import peft; this script is how we know that ``model/peft_methods.py``
computes PEFT's functions. PEFT needs a transformers model, so the script builds the bundled
base model's twin: a ``LlamaForCausalLM`` (fp32, SDPA attention) holding the same weights. For
each method, ours and PEFT's get the same parameters (random, copied from PEFT's into ours by
``load_state_dict``, so the names are checked too), and we report max |Δ| of the logits of the
real tokens, over a batch of 4 at T = 20 and T = 12:

     base           TinyLlama vs the LlamaForCausalLM twin (everything below rests on it)
     prompt tuning  PromptTuningConfig; the "random" and "sample_vocab" inits under one seed
     P-tuning       PromptEncoderConfig, MLP and LSTM encoders; the init under one seed; the
                    table ``fold_reparameterization`` computes vs the one PEFT saves; logits after the fold
     prefix tuning  PrefixTuningConfig(prefix_projection=True); the init under one seed; the table
                    ``fold_reparameterization`` computes vs the one PEFT saves
                    (``get_prompt_embedding_to_save``); logits after the fold
     P-tuning v2    PrefixTuningConfig(prefix_projection=False)
     GQA            prefix tuning and P-tuning v2 again on a grouped-query model (6 query heads, 2 key/value
                    heads of hd 8, 3 virtual tokens, PEFT's default hidden size): PEFT sizes the prefixes by the
                    key/value heads (token_dim = 16, ``peft/utils/other.py``); trainable counts, draws, logits
     IA³            IA3Config defaults (PEFT picks k_proj, v_proj, down_proj; down_proj feed-forward);
                    logits, merged weights and logits after ``merge_ia3`` / ``merge_and_unload``

PEFT's prompt-learning models get ``attention_mask=ones`` (as a tokenizer would give) and return
n + T positions for prompt tuning and P-tuning (compared: ``logits[:, n:]``), T for prefix tuning.
PEFT's TEXT init of prompt tuning needs a tokenizer (a string turned into ids); our "tokens" init
takes the ids themselves, so there is nothing to compare without one: not checked.

One line per check; exit 1 if any exceeds 1e-5 (fp32). Run from the repository root (the
environment needs peft and transformers):

    LORA_IMPL=solutions OMP_NUM_THREADS=1 /tmp/bnbenv/bin/python solutions/tools/check_peft_methods.py
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import (  # noqa: E402
    IA3Config,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from torch import nn  # noqa: E402

import model  # noqa: E402, F401  (installs the switch between student files and the reference)
from model.hf_checkpoint import hf_config_dict, hf_name  # noqa: E402
from model.tiny_llama import load_base_model  # noqa: E402

TOLERANCE = 1e-5
N_VIRTUAL = 8
HIDDEN = 48  # encoder_hidden_size / our hidden_size: not d_model, so a mix-up of the two would show
results: list[tuple[str, float]] = []
BASE_LOGITS: dict[tuple[str, int], torch.Tensor] = {}  # (base label, T) -> its logits on that batch (check_base)

M = importlib.import_module("model.peft_methods")  # through the switch (LORA_IMPL)


def check(name: str, value: float, note: str = "") -> None:
    results.append((name, value))
    print(f"{'ok  ' if value <= TOLERANCE else 'FAIL'} {name:<62} max |Δ| = {value:.2e}{note}")


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def hf_twin(base: nn.Module) -> transformers.LlamaForCausalLM:
    """A transformers LlamaForCausalLM with the bundled model's architecture and weights (fp32, eval).

    The config and the tensor names are the ones ``model/hf_checkpoint.py`` writes (``hf_config_dict``, ``hf_name``).
    """
    settings = hf_config_dict(base.config) | {"max_position_embeddings": 64}  # room for the virtual tokens
    config = transformers.LlamaConfig(**settings, attn_implementation="sdpa")  # ours calls SDPA; eager rounds otherwise
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the global generator alone
        twin = transformers.LlamaForCausalLM(config)
    twin.load_state_dict({hf_name(k): v for k, v in base.state_dict().items()}, strict=True)
    return twin.float().eval()


def peft_logits(peft_model: PeftModel, ids: torch.Tensor, prepended: int = 0) -> torch.Tensor:
    """PEFT's logits for the T real tokens (``prepended``: virtual positions PEFT returns first)."""
    logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, prepended:]


def compare(
    name: str, ours: nn.Module, theirs: PeftModel, batches: list[torch.Tensor], prepended: int = 0, base: str = "base"
) -> None:
    """Logits of ours vs PEFT's per batch; the note also says how far the method moves them from the base."""
    with torch.no_grad():
        logits = [ours(ids) for ids in batches]
        diffs = [maxdiff(mine, peft_logits(theirs, ids, prepended)) for ids, mine in zip(batches, logits)]
        moved = max(maxdiff(mine, BASE_LOGITS[base, ids.shape[1]]) for ids, mine in zip(batches, logits))
    note = (
        "   (" + ", ".join(f"T={ids.shape[1]}: {d:.2e}" for ids, d in zip(batches, diffs)) + f"; vs base {moved:.1f})"
    )
    check(name, max(diffs), note)


def randomize(module: nn.Module, seed: int, std: float) -> None:
    """Every parameter of ``module`` ← N(0, std²), from its own generator (the global one is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def same_draws(ours: nn.Module, theirs: nn.Module) -> float:
    """max |Δ| over the parameters of two encoders with the same names (inf if the names differ)."""
    a, b = ours.state_dict(), theirs.state_dict()
    if a.keys() != b.keys():
        return float("inf")
    return max(maxdiff(a[k], b[k]) for k in a)


def peft_on(twin: nn.Module, config: PeftConfig, seed: int = 0) -> PeftModel:
    """PEFT's method on a copy of the twin, built after ``torch.manual_seed(seed)`` (eval mode)."""
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(twin), config).eval()


def check_folded_table(label: str, table: torch.Tensor, theirs: PeftModel) -> None:
    """Our folded table vs the one PEFT saves for a prompt-learning adapter (its encoder's output).

    PEFT computes it with autograd on; our fold runs under no_grad. PyTorch's CPU LSTM takes another
    kernel in the two modes (~1e-6 apart after the MLP head), so the note gives PEFT's under no_grad too.
    """
    saved = theirs.get_prompt_embedding_to_save("default")  # (n, C) P-tuning, (n, 2·L·C) prefix tuning
    with torch.no_grad():
        exact = theirs.get_prompt_embedding_to_save("default")
    check(
        f"{label}: folded table vs PEFT's saved one",
        maxdiff(table, saved),
        f"   (under no_grad: {maxdiff(table, exact):.2e})",
    )


# ---- base ----------------------------------------------------------------------------------------


def check_base(base: nn.Module, twin: nn.Module, batches: list[torch.Tensor], label: str = "base") -> None:
    """Our model vs its transformers twin; remembers the base logits under ``label`` (for compare's note)."""
    with torch.no_grad():
        logits = {ids.shape[1]: base(ids) for ids in batches}
        diffs = [
            maxdiff(logits[ids.shape[1]], twin(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
            for ids in batches
        ]
        eager = copy.deepcopy(twin)
        eager.set_attn_implementation("eager")
        own = max(maxdiff(logits[ids.shape[1]], eager(input_ids=ids).logits) for ids in batches)
        scale = max(value.abs().max().item() for value in logits.values())
    check(f"{label}: TinyLlama vs LlamaForCausalLM (sdpa)", max(diffs))
    print(f"info {label}: with attn_implementation='eager' instead, max |Δ| = {own:.2e} (logits reach {scale:.1f})")
    BASE_LOGITS.update({(label, t): value for t, value in logits.items()})


# ---- 7.2 prompt tuning ---------------------------------------------------------------------------


def check_prompt_tuning(base: nn.Module, twin: nn.Module, batches: list[torch.Tensor]) -> None:
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    theirs = peft_on(twin, config, seed=1)
    torch.manual_seed(1)
    ours = M.get_prompt_tuning_model(copy.deepcopy(base), N_VIRTUAL).eval()
    encoder = theirs.prompt_encoder["default"]
    check("prompt tuning: 'random' init, same seed (bit for bit)", same_draws(ours.prompt_encoder, encoder))

    randomize(encoder, seed=2, std=0.5)
    ours.prompt_encoder.load_state_dict(encoder.state_dict(), strict=True)
    compare("prompt tuning: logits", ours, theirs, batches, prepended=N_VIRTUAL)

    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
    )
    theirs = peft_on(twin, config, seed=3)
    torch.manual_seed(3)
    ours = M.get_prompt_tuning_model(copy.deepcopy(base), N_VIRTUAL, init="sample_vocab").eval()
    check(
        "prompt tuning: 'sample_vocab' init, same seed (bit for bit)",
        same_draws(ours.prompt_encoder, theirs.prompt_encoder["default"]),
    )
    compare("prompt tuning: logits at the 'sample_vocab' init", ours, theirs, batches, prepended=N_VIRTUAL)


# ---- 7.3 P-tuning --------------------------------------------------------------------------------


def check_p_tuning(base: nn.Module, twin: nn.Module, batches: list[torch.Tensor], encoder_type: str) -> None:
    label = f"P-tuning {encoder_type.upper()}"
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N_VIRTUAL,
        encoder_reparameterization_type=encoder_type.upper(),
        encoder_hidden_size=HIDDEN,
    )
    theirs = peft_on(twin, config, seed=4)
    torch.manual_seed(4)
    ours = M.get_p_tuning_model(copy.deepcopy(base), N_VIRTUAL, encoder_type=encoder_type, hidden_size=HIDDEN).eval()
    encoder = theirs.prompt_encoder["default"]
    check(f"{label}: init, same seed (bit for bit)", same_draws(ours.prompt_encoder, encoder))

    randomize(encoder, seed=5, std=0.3)
    ours.prompt_encoder.load_state_dict(encoder.state_dict(), strict=True)
    compare(f"{label}: logits", ours, theirs, batches, prepended=N_VIRTUAL)
    M.fold_reparameterization(ours)
    check_folded_table(label, ours.prompt_encoder(), theirs)
    compare(f"{label}: logits after fold_reparameterization (ours)", ours, theirs, batches, prepended=N_VIRTUAL)


# ---- 7.4 prefix tuning, 7.5 P-tuning v2 ----------------------------------------------------------


def check_prefix_tuning(
    base: nn.Module,
    twin: nn.Module,
    batches: list[torch.Tensor],
    projection: bool,
    n_virtual: int = N_VIRTUAL,
    hidden: int | None = HIDDEN,
    base_label: str = "base",
) -> None:
    """PEFT's prefix tuning (projection) or P-tuning v2 against ours; ``hidden`` None: both take their default."""
    label = ("prefix tuning" if projection else "P-tuning v2") + ("" if base_label == "base" else f" ({base_label})")
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=n_virtual,
        prefix_projection=projection,
        encoder_hidden_size=hidden if projection else None,
    )
    theirs = peft_on(twin, config, seed=6)
    torch.manual_seed(6)
    if projection:
        ours = M.get_prefix_tuning_model(copy.deepcopy(base), n_virtual, projection=True, hidden_size=hidden)
    else:
        ours = M.get_p_tuning_v2_model(copy.deepcopy(base), n_virtual)
    ours.eval()
    encoder = theirs.prompt_encoder["default"]
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    print(f"info {label}: trainable parameters ours {counts[0]:,}, PEFT's {counts[1]:,}")
    check(f"{label}: trainable parameters (count differing)", float(abs(counts[0] - counts[1])))
    check(f"{label}: init, same seed (bit for bit)", same_draws(ours.prefix_encoder, encoder))

    randomize(encoder, seed=7, std=0.5)
    ours.prefix_encoder.load_state_dict(encoder.state_dict(), strict=True)
    compare(f"{label}: logits", ours, theirs, batches, base=base_label)
    if projection:
        M.fold_reparameterization(ours)
        check_folded_table(label, ours.prefix_encoder(), theirs)
        compare(f"{label}: logits after fold_reparameterization (ours)", ours, theirs, batches, base=base_label)


def gqa_base() -> nn.Module:
    """A random TinyLlama with grouped-query attention: 6 query heads share 2 key/value heads of hd 8 (issue 22)."""
    from model.tiny_llama import LlamaConfig, TinyLlama

    config = LlamaConfig(d_model=48, n_heads=6, n_kv_heads=2, n_layers=3, d_ff=96)
    with torch.random.fork_rng(devices=[]):
        model = TinyLlama(config)
    randomize(model, seed=11, std=0.15)  # larger than the init's 0.02, so the logits (and a wrong prefix) show
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    return model.eval()


# ---- 7.6 IA³ -------------------------------------------------------------------------------------


def check_ia3(base: nn.Module, twin: nn.Module, batches: list[torch.Tensor]) -> None:
    theirs = peft_on(twin, IA3Config(task_type="CAUSAL_LM"))
    config = theirs.peft_config["default"]
    picked = (sorted(config.target_modules), sorted(config.feedforward_modules))
    print(f"info IA³: PEFT's defaults for llama: target_modules {picked[0]}, feedforward_modules {picked[1]}")
    assert picked == (sorted(M.IA3_TARGET_MODULES), sorted(M.IA3_FEEDFORWARD_MODULES)), f"PEFT picked {picked}"
    ours = M.get_ia3_model(copy.deepcopy(base)).eval()
    ours_layers = {path: m for path, m in ours.named_modules() if isinstance(m, M.IA3Layer)}
    peft_layers = {
        path.removeprefix("model."): m
        for path, m in theirs.base_model.model.named_modules()
        if hasattr(m, "ia3_l") and isinstance(m.ia3_l, nn.ParameterDict)
    }
    assert ours_layers.keys() == peft_layers.keys(), (sorted(ours_layers), sorted(peft_layers))
    sides = max(float(ours_layers[p].feedforward != peft_layers[p].is_feedforward) for p in ours_layers)
    check("IA³: same layers, same feed-forward side (count differing)", sides)
    init = max(maxdiff(ours_layers[p].ia3_l, peft_layers[p].ia3_l["default"].flatten()) for p in ours_layers)
    check("IA³: ia3_l at init (ones)", init)

    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for path, layer in peft_layers.items():
            vector = layer.ia3_l["default"]  # (out, 1) or (1, in)
            vector.copy_(0.5 + torch.rand(vector.shape, generator=gen))
            ours_layers[path].ia3_l.copy_(vector.reshape(-1))
    compare("IA³: logits", ours, theirs, batches)

    M.merge_ia3(ours)
    merged = theirs.merge_and_unload().eval()
    weights = max(maxdiff(ours_layers[p].base_layer.weight, merged.model.get_submodule(p).weight) for p in ours_layers)
    check("IA³: merged weights (merge_ia3 vs merge_and_unload)", weights)
    with torch.no_grad():
        diffs = [maxdiff(ours(ids), merged(input_ids=ids).logits) for ids in batches]
    check("IA³: logits after merge (ours vs PEFT's merged model)", max(diffs))


def main() -> int:
    # PEFT 0.21.2 passes its prefixes as ``past_key_values``, which transformers 5.24 deprecates (FutureWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="peft")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = load_base_model().eval()
    batches = [torch.randint(0, 18, (4, 20)), torch.randint(0, 18, (4, 12))]
    twin = hf_twin(base)
    check_base(base, twin, batches)
    check_prompt_tuning(base, twin, batches)
    check_p_tuning(base, twin, batches, "mlp")
    check_p_tuning(base, twin, batches, "lstm")
    check_prefix_tuning(base, twin, batches, projection=True)
    check_prefix_tuning(base, twin, batches, projection=False)
    gqa = gqa_base()  # 3 virtual tokens, PEFT's default hidden size (token_dim = 2 · 8 = 16)
    gqa_twin = hf_twin(gqa)
    check_base(gqa, gqa_twin, batches, label="GQA base")
    for projection in (True, False):
        check_prefix_tuning(gqa, gqa_twin, batches, projection, n_virtual=3, hidden=None, base_label="GQA base")
    check_ia3(base, twin, batches)
    failed = [name for name, value in results if not value <= TOLERANCE]
    print(
        f"{len(results) - len(failed)}/{len(results)} checks within {TOLERANCE:g}"
        + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
