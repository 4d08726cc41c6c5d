#!/usr/bin/env python3
"""Check, with the real PEFT library, that Stage 5's LoRA variants match PEFT 0.21.2 (dev-only).

The graded tests never import peft; this script is how we know that ``model/lora_variants.py``
computes PEFT's functions. On the bundled base model, for each method, ours and PEFT's get the
same weights (copied from ours), and we report max |Δ| of the logits (and of the pieces):

     rsLoRA     logits with use_rslora=True
     DoRA       magnitude at init; logits (eval, and train mode with dropout under one seed);
                gradients of A, B and the magnitude; logits and weights after merge; after unmerge
     PiSSA      s·B·A and the residual W0 − s·B·A against init_lora_weights="pissa" (products, so the
                SVD's sign freedom does not matter); logits at init and with the same trained A, B
     OLoRA      the same against init_lora_weights="olora"
     VeRA       the shared vera_A / vera_B (bit for bit) and logits with the same λ_d, λ_b, at r = 16
                (PEFT's thin products) and r = 256 (our forward forms ΔW first, the cheaper order there)
     AdaLoRA    logits with the same P, Λ, Q; the orthogonal regulariser; 12 training steps of the
                RankAllocator (attached through optimizer hooks) against PEFT's update_and_allocate
     files      PEFT loads our rsLoRA, DoRA, PiSSA and OLoRA adapters (PiSSA/OLoRA converted, onto the
                ORIGINAL base) with the same logits; we load PEFT's DoRA adapter
                PEFT's DEFAULT files of a trained PiSSA / OLoRA model (init_lora_weights kept, A and B relative
                to the residual): we load them as PEFT does (W0's residual recomputed) — logits, residuals, and
                the file read as a plain LoRA for scale; then saved again (converted), PEFT loads ours
                PEFT's default LoftQ files (1 and 2 iterations, s = 1 and 2; PEFT's LoftQ made to run on the CPU
                as on a GPU, see peft_loftq_on_cpu): we recompute Q̂ as PEFT does — logits and the bases
                VeRA both ways, with the shared pair saved (save_projection) and regenerated from the key
                AdaLoRA both ways, before any mask and after the allocator run (rank_pattern, resized tensors)
     LoftQ      (informational) ‖W − (Q̂ + s·BA)‖ per iteration

One line per check; exit 1 if any exceeds 1e-5 (fp32) or, where PEFT itself rounds more (a
comparison with the base model, merged vs unmerged, a different operation order), PEFT's own
error on the same comparison. Run from the repository root (the environment needs peft):

    LORA_IMPL=solutions OMP_NUM_THREADS=1 /tmp/bnbenv/bin/python solutions/tools/check_peft_variants.py
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import model  # noqa: E402, F401  (installs the switch between student files and the reference)
from model.lora import DEFAULT_TARGET_MODULES, get_lora_model, lora_layers, merge_lora, unmerge_lora  # noqa: E402
from model.tiny_llama import load_base_model  # noqa: E402
from training.data import lm_loss  # noqa: E402

TOLERANCE = 1e-5
TARGETS = list(DEFAULT_TARGET_MODULES)
results: list[tuple[str, float, float]] = []


V = importlib.import_module("model.lora_variants")  # through the switch (LORA_IMPL)


def check(name: str, value: float, note: str = "", peft_own: float | None = None) -> None:
    """Record one comparison; it passes within TOLERANCE, or within PEFT's own error on the same comparison.

    ``peft_own``: how far PEFT itself lands from the value compared against (its own rounding);
    matching PEFT that closely is all one can ask of an implementation in another operation order.
    """
    allowed = TOLERANCE if peft_own is None else max(TOLERANCE, 1.01 * peft_own)
    results.append((name, value, allowed))
    print(f"{'ok  ' if value <= allowed else 'FAIL'} {name:<62} max |Δ| = {value:.2e}{note}")


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def peft_module(peft_model: PeftModel, path: str, inner: str = "") -> nn.Module:
    """The PEFT layer at our module ``path`` (``inner`` = "lm." when PEFT wraps the loss wrapper)."""
    return peft_model.base_model.model.get_submodule(inner + path)


def randomize(params: list[torch.Tensor], seed: int, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


class WithLoss(nn.Module):
    """The base LM returning an object with ``.loss``: PEFT's AdaLoraModel.forward adds its regulariser there."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.zero_loss = False  # True: loss = 0, so PEFT's loss is exactly orth_reg_weight · R

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.lm(input_ids)
        loss = None if labels is None else lm_loss(logits, labels) * (0.0 if self.zero_loss else 1.0)
        return SimpleNamespace(logits=logits, loss=loss)


# ---- rsLoRA --------------------------------------------------------------------------------------


def check_rslora(base: nn.Module, ids: torch.Tensor) -> nn.Module:
    ours = get_lora_model(copy.deepcopy(base), r=4, lora_alpha=8)
    V.use_rslora(ours)
    for path, layer in lora_layers(ours):
        randomize([layer.lora_A, layer.lora_B], seed=len(path))
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS)
    ).eval()
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            target = peft_module(theirs, path)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    check("rsLoRA: logits", maxdiff(ours(ids), theirs(ids)))
    return ours


# ---- DoRA ----------------------------------------------------------------------------------------


def copy_dora(ours: nn.Module, theirs: PeftModel) -> None:
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            target = peft_module(theirs, path)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def check_dora(base: nn.Module, ids: torch.Tensor) -> nn.Module:
    ours = V.get_dora_model(copy.deepcopy(base), r=4, lora_alpha=8, lora_dropout=0.1).eval()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True, target_modules=TARGETS)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    init = max(
        maxdiff(layer.magnitude, peft_module(theirs, path).lora_magnitude_vector["default"].weight)
        for path, layer in lora_layers(ours)
    )
    check("DoRA: magnitude at init (row norms of W0)", init)
    for path, layer in lora_layers(ours):
        randomize([layer.lora_A, layer.lora_B], seed=len(path))
        with torch.no_grad():
            layer.magnitude.mul_(
                1 + 0.2 * torch.rand(layer.magnitude.shape, generator=torch.Generator().manual_seed(3))
            )
    copy_dora(ours, theirs)
    check("DoRA: logits (eval)", maxdiff(ours(ids), theirs(ids)))

    ours.train(), theirs.train()
    torch.manual_seed(7)
    loss_ours = lm_loss(ours(ids), ids)
    torch.manual_seed(7)
    loss_theirs = lm_loss(theirs(ids), ids)
    check("DoRA: loss in train mode, dropout 0.1 (same seed)", abs(loss_ours.item() - loss_theirs.item()))
    loss_ours.backward(), loss_theirs.backward()
    grads = 0.0
    for path, layer in lora_layers(ours):
        target = peft_module(theirs, path)
        grads = max(
            grads,
            maxdiff(layer.lora_A.grad, target.lora_A["default"].weight.grad),
            maxdiff(layer.lora_B.grad, target.lora_B["default"].weight.grad),
            maxdiff(layer.magnitude.grad, target.lora_magnitude_vector["default"].weight.grad),
        )
    check("DoRA: gradients of A, B, magnitude (norm detached)", grads)
    ours.eval(), theirs.eval()

    before, merged = ours(ids), copy.deepcopy(ours)  # merge a copy: the files check gets unrounded weights
    merge_lora(merged)
    theirs.merge_adapter()
    weights = max(
        maxdiff(layer.base_layer.weight, peft_module(theirs, path).base_layer.weight)
        for path, layer in lora_layers(merged)
    )
    check("DoRA: merged weights", weights)
    check("DoRA: logits after merge (ours vs PEFT merged)", maxdiff(merged(ids), theirs(ids)))
    peft_rounding = maxdiff(theirs(ids), theirs.unmerge_adapter() or theirs(ids))
    note = f"   (PEFT's own merged vs unmerged: {peft_rounding:.2e})"
    check("DoRA: logits after merge (ours merged vs unmerged)", maxdiff(merged(ids), before), note, peft_rounding)
    unmerge_lora(merged)
    check("DoRA: logits after unmerge", maxdiff(merged(ids), before))
    return ours


# ---- PiSSA and OLoRA -----------------------------------------------------------------------------


def check_w0_init(base: nn.Module, ids: torch.Tensor, method: str) -> tuple[nn.Module, PeftModel]:
    init = {"pissa": V.pissa_init, "olora": V.olora_init}[method]
    ours = get_lora_model(copy.deepcopy(base), r=4, lora_alpha=8)
    for _, layer in lora_layers(ours):
        init(layer)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=method, target_modules=TARGETS)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    with tempfile.TemporaryDirectory() as tmp:  # PEFT's recipe: save the initial adapter as a plain LoRA init
        theirs.peft_config["default"].init_lora_weights = True
        theirs.save_pretrained(tmp)
        theirs.initial_adapter = {k: v.clone() for k, v in load_file(Path(tmp) / "adapter_model.safetensors").items()}
    products = residuals = factors = 0.0
    for path, layer in lora_layers(ours):
        target = peft_module(theirs, path)
        A, B = target.lora_A["default"].weight, target.lora_B["default"].weight
        products = max(products, maxdiff(layer.delta_weight(), target.scaling["default"] * B @ A))
        residuals = max(residuals, maxdiff(layer.base_layer.weight, target.base_layer.weight))
        signs = torch.sign((layer.lora_A * A).sum(dim=1))  # a factor may come out with flipped signs
        factors = max(factors, maxdiff(layer.lora_A, signs[:, None] * A), maxdiff(layer.lora_B, B * signs))
    name = {"pissa": "PiSSA", "olora": "OLoRA"}[method]
    check(f"{name}: s·B·A (products)", products)
    check(f"{name}: residual W0 − s·B·A", residuals)
    check(f"{name}: A and B up to the sign of each direction", factors)
    check(f"{name}: logits at init (ours vs PEFT)", maxdiff(ours(ids), theirs(ids)))
    own = maxdiff(theirs(ids), base(ids))
    check(
        f"{name}: logits at init (ours vs the base model)",
        maxdiff(ours(ids), base(ids)),
        f"   (PEFT's own: {own:.2e})",
        own,
    )
    with torch.no_grad():  # "train": the same new A, B in both
        for path, layer in lora_layers(ours):
            layer.lora_A.add_(0.05 * torch.randn(layer.lora_A.shape, generator=torch.Generator().manual_seed(1)))
            layer.lora_B.add_(0.05 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(2)))
            target = peft_module(theirs, path)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    check(f"{name}: logits with the same trained A, B", maxdiff(ours(ids), theirs(ids)))
    return ours, theirs


# ---- VeRA ----------------------------------------------------------------------------------------


def check_vera(base: nn.Module, ids: torch.Tensor, r: int) -> None:
    """r = 16 runs PEFT's thin products; r = 256 (PEFT's default) runs the ΔW order (VeRALayer.forward)."""
    ours = V.get_vera_model(copy.deepcopy(base), r=r, d_initial=0.1, projection_prng_key=0)
    config = VeraConfig(r=r, d_initial=0.1, projection_prng_key=0, target_modules=TARGETS)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    shared = next(V.vera_layers(ours))[1]
    check(f"VeRA r={r}: shared vera_A (bit for bit)", maxdiff(shared.vera_A, theirs.base_model.vera_A["default"]))
    check(f"VeRA r={r}: shared vera_B (bit for bit)", maxdiff(shared.vera_B, theirs.base_model.vera_B["default"]))
    init = max(
        max(
            maxdiff(layer.lambda_d, peft_module(theirs, path).vera_lambda_d["default"]),
            maxdiff(layer.lambda_b, peft_module(theirs, path).vera_lambda_b["default"]),
        )
        for path, layer in V.vera_layers(ours)
    )
    check(f"VeRA r={r}: λ_d, λ_b at init", init)
    with torch.no_grad():
        for path, layer in V.vera_layers(ours):
            randomize([layer.lambda_d, layer.lambda_b], seed=len(path), std=0.5)
            target = peft_module(theirs, path)
            target.vera_lambda_d["default"].copy_(layer.lambda_d)
            target.vera_lambda_b["default"].copy_(layer.lambda_b)
    # At r = 256 our forward forms ΔW first (the cheaper order), so the two round differently:
    # compare each with PEFT's model evaluated in float64, and ours may be as far off as PEFT's is.
    exact = copy.deepcopy(theirs).double()(ids)
    own = maxdiff(theirs(ids), exact)
    note = f"   (PEFT vs PEFT in float64: {own:.2e})"
    check(f"VeRA r={r}: logits (ours vs PEFT in float64)", maxdiff(ours(ids), exact), note, 2 * own)
    check(f"VeRA r={r}: logits (ours vs PEFT)", maxdiff(ours(ids), theirs(ids)), "", 3 * own)


# ---- AdaLoRA -------------------------------------------------------------------------------------


def copy_adalora(ours: nn.Module, theirs: PeftModel, inner: str) -> None:
    with torch.no_grad():
        for path, layer in V.adalora_layers(ours):
            target = peft_module(theirs, path, inner)
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(target, name)["default"].copy_(getattr(layer, name))


def check_adalora(base: nn.Module, ids: torch.Tensor) -> tuple[nn.Module, PeftModel, object]:
    total_step, steps = 10, 12
    ours = V.get_adalora_model(copy.deepcopy(base), init_r=6, lora_alpha=8)
    config = AdaLoraConfig(
        init_r=6, target_r=3, lora_alpha=8, total_step=total_step, tinit=2, tfinal=3, deltaT=2, target_modules=TARGETS
    )
    theirs = get_peft_model(WithLoss(copy.deepcopy(base)), config)
    for path, layer in V.adalora_layers(ours):
        randomize([layer.lora_A, layer.lora_E, layer.lora_B], seed=len(path), std=0.2)
    copy_adalora(ours, theirs, "lm.")
    ours.eval(), theirs.eval()
    check("AdaLoRA: logits", maxdiff(ours(ids), theirs(ids).logits))
    theirs.base_model.model.zero_loss = True
    peft_r = theirs.base_model(ids, labels=ids).loss / config.orth_reg_weight  # AdaLoraModel.forward adds λ·R
    theirs.base_model.model.zero_loss = False
    check("AdaLoRA: orthogonal regulariser R", abs(V.orthogonal_regularization(ours).item() - peft_r.item()))

    # The rank allocator over a short run: ours through optimizer hooks, PEFT's by hand.
    allocator = V.RankAllocator(ours, total_step=total_step, target_r=3, tinit=2, tfinal=3, deltaT=2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    allocator.attach(opt_ours)
    ours.train(), theirs.train()
    gen = torch.Generator().manual_seed(5)
    values = patterns = 0.0
    for step in range(steps):
        batch = torch.randint(0, 18, (8, 19), generator=gen)
        lm_loss(ours(batch), batch).backward()
        opt_ours.step()  # pre-hook: + λ·∇R; post-hook: update_and_allocate(step)
        opt_ours.zero_grad()
        theirs.base_model(batch, labels=batch).loss.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        for path, layer in V.adalora_layers(ours):
            target_E = peft_module(theirs, path, "lm.").lora_E["default"]
            values = max(values, maxdiff(layer.lora_E, target_E))
            patterns = max(patterns, ((layer.lora_E == 0) != (target_E == 0)).float().sum().item())
    allocator.detach()
    ranks = sum(allocator.ranks().values())
    check(f"AdaLoRA: Λ over {steps} allocator steps (final rank sum {ranks})", values)
    check("AdaLoRA: masked singular values that differ (count)", patterns)
    ours.eval(), theirs.eval()
    check("AdaLoRA: logits after the allocator run", maxdiff(ours(ids), theirs(ids).logits))
    return ours, theirs, allocator


# ---- Files: our adapters in PEFT, PEFT's in ours -------------------------------------------------


def peft_converted(peft_init: PeftModel, tmp: str) -> tuple[dict, dict]:
    """PEFT's own conversion of a trained PiSSA/OLoRA adapter to plain LoRA (config, tensors)."""
    init_dir, out_dir = Path(tmp) / "init", Path(tmp) / "out"
    init_dir.mkdir()
    from safetensors.torch import save_file

    save_file(peft_init.initial_adapter, init_dir / "adapter_model.safetensors")
    peft_init.peft_config["default"].save_pretrained(str(init_dir))
    peft_init.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(init_dir))
    config = json.loads((out_dir / "adapter_config.json").read_text())
    return config, load_file(out_dir / "adapter_model.safetensors")


def check_files(base: nn.Module, ids: torch.Tensor, rslora: nn.Module, dora: nn.Module, **inits) -> None:
    for name, ours in (("rsLoRA", rslora), ("DoRA", dora)):
        with tempfile.TemporaryDirectory() as tmp:
            V.save_variant_adapter(ours, tmp)
            theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
            check(f"files: PEFT loads our {name} adapter (logits)", maxdiff(ours(ids), theirs(ids)))
    for name, (ours, peft_init) in inits.items():
        with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp2:
            V.save_variant_adapter(ours, tmp)
            mine = load_file(Path(tmp) / "adapter_model.safetensors")
            config = json.loads((Path(tmp) / "adapter_config.json").read_text())
            peft_config, peft_tensors = peft_converted(peft_init, tmp2)
            same_config = all(config[k] == peft_config[k] for k in ("r", "lora_alpha", "use_rslora"))
            tensors = max(maxdiff(mine[k], peft_tensors[k]) for k in peft_tensors) if same_config else float("inf")
            check(f"files: our converted {name} = PEFT's conversion (rank {config['r']})", tensors)
            theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()  # onto the ORIGINAL base
            own = maxdiff(peft_init(ids), theirs(ids))
            note = f"   (PEFT's own conversion: {own:.2e})"
            check(f"files: PEFT loads our {name} adapter on W0 (logits)", maxdiff(ours(ids), theirs(ids)), note, own)

    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.mul_(1.1).add_(0.05)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = V.load_variant_adapter(copy.deepcopy(base), tmp).eval()
        check("files: we load PEFT's DoRA adapter (logits)", maxdiff(ours(ids), theirs(ids)))


# ---- Files PEFT writes by default for PiSSA, OLoRA, LoftQ; VeRA and AdaLoRA files both ways ------------


def peft_reload(base: nn.Module, tmp: str) -> PeftModel:
    """PEFT's own from_pretrained of a folder onto a copy of the original base (eval mode)."""
    return PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()


def check_residual_files(base: nn.Module, ids: torch.Tensor, name: str, method: str, theirs: PeftModel) -> None:
    """PEFT's default save_pretrained of a trained PiSSA/OLoRA model (init_lora_weights kept): we load it as PEFT does."""
    theirs.peft_config["default"].init_lora_weights = method  # check_w0_init set it to True for its initial adapter
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        print(f"info {name}: PEFT's default file has init_lora_weights={config['init_lora_weights']!r}")
        ours = V.load_variant_adapter(copy.deepcopy(base), tmp).eval()
        own = maxdiff(peft_reload(base, tmp)(ids), theirs(ids))
        note = f"   (PEFT's own reload: {own:.2e}; the file read as a plain LoRA would be off by "
        plain = copy.deepcopy(base)
        get_lora_model(plain, r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"])
        tensors = load_file(Path(tmp) / "adapter_model.safetensors")
        with torch.no_grad():
            for path, layer in lora_layers(plain):
                layer.lora_A.copy_(tensors[f"base_model.model.{path}.lora_A.weight"])
                layer.lora_B.copy_(tensors[f"base_model.model.{path}.lora_B.weight"])
        note += f"{maxdiff(plain.eval()(ids), theirs(ids)):.2f})"
        check(
            f"files: we load PEFT's default {name} file (logits vs PEFT's model)", maxdiff(ours(ids), theirs(ids)), note
        )
        residual = max(
            maxdiff(layer.base_layer.weight, peft_module(theirs, path).base_layer.weight)
            for path, layer in lora_layers(ours)
        )
        check(f"files: {name} residual W0 − s·B0A0 recomputed on load (vs PEFT's)", residual)
        V.save_variant_adapter(ours, tmp + "/converted")  # and on to a plain LoRA for the original base, as ours
        back = peft_reload(base, tmp + "/converted")
        check(f"files: {name} loaded, saved converted, PEFT loads it on W0 (logits)", maxdiff(back(ids), theirs(ids)))
    theirs.peft_config["default"].init_lora_weights = True


def peft_loftq_on_cpu() -> None:
    """Let PEFT 0.21.2's LoftQ run here as it runs on a GPU: its ``loftq_init`` source with two edits.

    1. It sends the weight to "cuda" (or "xpu"): "cpu" instead (bitsandbytes 0.50 quantizes NF4 on the CPU).
    2. Its dequantization, ``bnb.functional.dequantize_4bit``, takes bitsandbytes' AVX-512 CPU kernel on this
       host, which indexes absmax by row and is wrong when in_features is not a multiple of 64 (down_proj's
       176; see make_nf4_golden.py, case nf4_fp32_16x64_bs128): bitsandbytes' flat-block reference instead,
       what CUDA and every other CPU compute.
    Its LoraConfig also wants scipy, which 4-bit LoftQ does not use (``without_scipy_check``).
    """
    import inspect

    import peft.tuners.lora.layer as lora_layer
    import peft.utils.loftq_utils as loftq_utils
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    def flat_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
        return _dequantize_4bit_compute(
            packed.reshape(-1), state.absmax, state.code, state.blocksize, tuple(state.shape), state.dtype
        )

    source = inspect.getsource(loftq_utils.loftq_init)
    edits = {
        'compute_device = "xpu" if is_xpu_available() else "cuda"': 'compute_device = "cpu"',
        "bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)": "flat_dequantize(qweight.data, qweight.quant_state)",
    }
    for old, new in edits.items():
        assert source.count(old) == 1, f"PEFT's loftq_init changed: {old!r} not found once"
        source = source.replace(old, new)
    namespace = dict(vars(loftq_utils)) | {"flat_dequantize": flat_dequantize}
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)
    lora_layer.loftq_init = namespace["loftq_init"]


def without_scipy_check():
    import importlib.util
    from unittest import mock

    real = importlib.util.find_spec
    return mock.patch("importlib.util.find_spec", lambda name, *a: real(name, *a) or (name == "scipy") or None)


def check_loftq_files(base: nn.Module, ids: torch.Tensor, iters: int, lora_alpha: float) -> None:
    """PEFT's LoftQ (on the CPU) trained and saved by default (init_lora_weights "loftq"): we load it as PEFT does."""
    targets = ["q_proj", "v_proj", "down_proj"]
    with without_scipy_check():
        config = LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=targets)
        config.init_lora_weights, config.loftq_config = "loftq", {"loftq_bits": 4, "loftq_iter": iters}
        theirs = get_peft_model(copy.deepcopy(base), config).eval()
        randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=iters, std=0.05)
        label = f"LoftQ {iters} iter{'s' if iters > 1 else ''}, s={lora_alpha / 4:g}"
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = V.load_variant_adapter(copy.deepcopy(base), tmp).eval()
            own = maxdiff(peft_reload(base, tmp)(ids), theirs(ids))
    check(f"files: we load PEFT's default {label} file (logits)", maxdiff(ours(ids), theirs(ids)),
          f"   (PEFT's own reload: {own:.2e})")  # fmt: skip
    bases = max(
        maxdiff(layer.base_layer.dequantize_weight(torch.float32), peft_module(theirs, path).base_layer.weight)
        for path, layer in lora_layers(ours)
    )
    check(f"files: {label}: our NF4 base Q̂ vs PEFT's recomputed base", bases)


def check_vera_files(base: nn.Module, ids: torch.Tensor) -> None:
    """Our VeRA adapter into PEFT and PEFT's into ours, with the shared pair saved and regenerated from the key."""
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    for save_projection in (True, False):
        note = f"save_projection={save_projection}"
        ours = V.get_vera_model(copy.deepcopy(base), r=16, target_modules=targets, projection_prng_key=5).eval()
        for path, layer in V.vera_layers(ours):
            randomize([layer.lambda_d, layer.lambda_b], seed=len(path), std=0.5)
        with tempfile.TemporaryDirectory() as tmp:
            V.save_variant_adapter(ours, tmp, save_projection=save_projection)
            check(
                f"files: PEFT loads our VeRA adapter, {note} (logits)", maxdiff(ours(ids), peft_reload(base, tmp)(ids))
            )
        config = VeraConfig(r=16, target_modules=targets, projection_prng_key=5, save_projection=save_projection)
        theirs = get_peft_model(copy.deepcopy(base), config).eval()
        randomize([p for n, p in theirs.named_parameters() if "vera_lambda" in n], seed=3, std=0.5)
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            mine = V.load_variant_adapter(copy.deepcopy(base), tmp).eval()
            check(f"files: we load PEFT's VeRA adapter, {note} (logits)", maxdiff(mine(ids), theirs(ids)))


def check_adalora_files(base: nn.Module, ids: torch.Tensor, ours: nn.Module, theirs: PeftModel, allocator) -> None:
    """After the allocator run (masked triplets): ours into PEFT, PEFT's (a plain-base twin of ``theirs``) into ours."""
    pattern = sum(int((~kept).sum()) for kept in allocator.rank_pattern.values())
    with tempfile.TemporaryDirectory() as tmp:
        V.save_variant_adapter(ours, tmp, allocator=allocator)
        loaded = peft_reload(base, tmp)
        check(
            f"files: PEFT loads our AdaLoRA adapter, {pattern} triplets masked (logits)",
            maxdiff(ours(ids), loaded(ids)),
        )
    fresh = V.get_adalora_model(copy.deepcopy(base), init_r=6, lora_alpha=8)
    with tempfile.TemporaryDirectory() as tmp:  # before any mask: rank_pattern null, init_r everywhere
        allocator_fresh = V.RankAllocator(fresh, total_step=10, target_r=3)
        for path, layer in V.adalora_layers(fresh):
            randomize([layer.lora_E], seed=len(path), std=0.2)
        V.save_variant_adapter(fresh, tmp, allocator=allocator_fresh)
        check(
            "files: PEFT loads our AdaLoRA adapter before any mask (logits)",
            maxdiff(fresh.eval()(ids), peft_reload(base, tmp)(ids)),
        )
    config = copy.deepcopy(theirs.peft_config["default"])
    config.rank_pattern = {key.removeprefix("lm."): value for key, value in config.rank_pattern.items()}
    plain = get_peft_model(copy.deepcopy(base), config).eval()  # PEFT's model on the plain base, theirs's weights
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if ".lora_" in name:
                param.copy_(theirs.get_parameter(name.replace("base_model.model.", "base_model.model.lm.", 1)))
    with tempfile.TemporaryDirectory() as tmp:
        plain.save_pretrained(tmp)
        saved = json.loads((Path(tmp) / "adapter_config.json").read_text())
        kept = sum(sum(v) for v in saved["rank_pattern"].values())
        mine = V.load_variant_adapter(copy.deepcopy(base), tmp).eval()
        check(f"files: we load PEFT's AdaLoRA adapter ({kept} triplets kept; logits)", maxdiff(mine(ids), plain(ids)),
              f"   (vs PEFT's own reload: {maxdiff(mine(ids), peft_reload(base, tmp)(ids)):.2e})")  # fmt: skip


def report_loftq(base: nn.Module) -> None:
    ours = get_lora_model(copy.deepcopy(base), r=4, lora_alpha=4, target_modules=["q_proj"])
    path, layer = next(lora_layers(ours))
    errors = V.loftq_init(layer, num_iters=5)
    print(f"info LoftQ on {path} (r=4, s=1): ‖W − (Q̂ + s·BA)‖_F = " + " → ".join(f"{e:.4f}" for e in errors))


def main() -> int:
    warnings.filterwarnings("ignore", module="peft")  # save_projection=False, rank_pattern keys, zero-rank layers
    torch.manual_seed(0)
    base = load_base_model().eval()
    ids = torch.randint(0, 18, (4, 19))
    rslora = check_rslora(base, ids)
    dora = check_dora(base, ids)
    pissa = check_w0_init(base, ids, "pissa")
    olora = check_w0_init(base, ids, "olora")
    check_vera(base, ids, r=16)
    check_vera(base, ids, r=256)
    adalora = check_adalora(base, ids)
    check_files(base, ids, rslora, dora, PiSSA=pissa, OLoRA=olora)
    check_residual_files(base, ids, "PiSSA", "pissa", pissa[1])
    check_residual_files(base, ids, "OLoRA", "olora", olora[1])
    peft_loftq_on_cpu()
    for iters, lora_alpha in ((1, 4), (2, 4), (2, 8)):
        check_loftq_files(base, ids, iters, lora_alpha)
    check_vera_files(base, ids)
    check_adalora_files(base, ids, *adalora)
    report_loftq(base)
    failed = [name for name, value, allowed in results if not value <= allowed]
    print(
        f"{len(results) - len(failed)}/{len(results)} checks within {TOLERANCE:g} (or PEFT's own error)"
        + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
