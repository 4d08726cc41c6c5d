"""Stage 6 basic tests: 8-bit and paged optimizers, the trainer's choice of optimizer, memory measured
(training/memory.py), as lesson 06 describes them.

bitsandbytes' numbers come from testcases/fixtures/adamw8bit_golden.safetensors, written by
solutions/tools/make_adamw8bit_golden.py with bitsandbytes 0.50.2 on CPU; the tests never import
bitsandbytes. The file does not store the inputs: ``initial_param`` and ``gradient`` (testcases/stage6/golden_inputs.py,
shared with that script) rebuild them from its fixed seeds with ``torch.rand`` / ``torch.randint`` and exact
float32 arithmetic, so they are bit-identical on every CPU (the file's metadata holds their SHA-256).
Those seeds belong to the data, not to the test: ``--seed`` does not shift them.

How close is close enough (testcases/tolerances.py). The quantizer (6.1) is pure float32 arithmetic with
one rounding per operation — no fused multiply-add — so its codes are compared exactly with an
independent evaluation (``quantize_reference``: float64 with a rounding to float32 after every operation,
which gives the float32 result bit for bit: double rounding is harmless for +, −, ×, ÷ when 53 ≥ 2·24 + 2).
The AdamW step (6.2) is not compared with bitsandbytes' stored bits, which differ between CPUs: every step
is held to the exact value of bitsandbytes' formula, computed in the test from the state before the step,
within the worst-case rounding of any float32 evaluation, and every code to the one the exact moment
quantizes to (either neighbour where the moment lies within that bound of a bin boundary);
``testcases/stage6/oracle.py`` derives the bound. The golden file still says WHAT is computed: its
inputs and bitsandbytes' step-99 states start the tests, and a support test shows that bitsandbytes' own
steps, on the golden host and on every machine in ``testcases/fixtures/cpu-records/``, pass the same check.

Failure messages: a "Hint" says what the check tests ("the check: …"), never which part of the code is
wrong; a "Likely cause" appears only when ``helpers.diagnose`` found that the output IS what a named
mistake produces. A refusal is checked with ``helpers.refuses``, whose failure shows the call and the
arguments it was given.
"""

from __future__ import annotations

import copy
import json
import weakref
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from testcases.helpers import SEED_OFFSET, copy_of, diagnose, generator, refuses
from testcases.stage6.golden_inputs import gradient, initial_param
from testcases.stage6.oracle import STATE_KEYS, check_step, expected_step, f32, lut_reference
from testcases.tolerances import UNIT_ROUNDOFF, expect_tensor, fixture

U32 = UNIT_ROUNDOFF[torch.float32]
GOLDEN_FILE = "adamw8bit_golden.safetensors"
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
STEP_HINT = (
    "the check: bitsandbytes' step: dequantize m and v (Stage 3's dequantize_blockwise with the signed / unsigned code), "
    "m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², decay p ← p·(1 − lr·λ), then p ← p − (lr / c1)·m / (√v / c2 + ε) "
    "with c1 = 1 − β1^t, c2 = √(1 − β2^t) (tensors under min_8bit_size: p − (lr·c2 / c1)·m / (√v + ε·c2)), then "
    "re-quantize m with the signed and v with the unsigned code through the lookup table"
)


# ---- helpers shared with advanced.py --------------------------------------------------------------


def adamw8bit_golden() -> tuple[Mapping[str, torch.Tensor], dict[str, dict]]:
    """bitsandbytes' tensors (each key under its rule in testcases/tolerances.py, a fresh copy per read) and the
    cases' metadata (shape, lr, seed, ...)."""
    golden = fixture(GOLDEN_FILE)
    return golden, json.loads(golden.metadata["cases"])


def golden_optimizer(memory, case: dict, param: torch.Tensor):
    """(parameter, the student's AdamW8bit over it with the case's hyper-parameters)."""
    p = nn.Parameter(param.clone())
    opt = memory.AdamW8bit([p], lr=case["lr"], betas=tuple(case["betas"]), eps=case["eps"],
                           weight_decay=case["weight_decay"])  # fmt: skip
    return p, opt


def bins_reference(s: torch.Tensor) -> torch.Tensor:
    """⌊(s + 1)·0.5·65535 + 0.5⌋ with a float32 rounding after every operation (s float64 holding float32 values)."""
    return f32(f32(f32(f32(s + 1) * 0.5) * 65535) + 0.5).floor().long()


def quantize_reference(x: torch.Tensor, lut: torch.Tensor, block_size: int = 256):
    """bitsandbytes' CPU quantizer, independently: (codes uint8 (numel,), absmax fp32 (n_blocks,))."""
    flat = x.detach().reshape(-1).double().cpu()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, f32(1 / absmax.clamp(min=1e-300)), torch.zeros_like(absmax))
    scaled = f32(blocks * inverse[:, None]).clamp(-1, 1)
    codes = lut.cpu()[bins_reference(scaled)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax.float()


def reachable_gap(code: torch.Tensor, lut: torch.Tensor) -> float:
    """The widest gap between two neighbouring levels the table can reach (a bound on the rounding error)."""
    levels = code.double().cpu()[lut.long().unique()]
    return (levels[1:] - levels[:-1]).max().item()


def check_codes(actual: object, expected: torch.Tensor, what: str, hint: str, causes: dict | None = None) -> None:
    """Codes: uint8, the expected shape, every one equal; the message counts and shows the first mismatch."""
    __tracebackhide__ = True
    expect_tensor(actual, tuple(expected.shape), what, hint, dtype=torch.uint8)
    actual = actual.cpu()
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()
        i = tuple(int(j) for j in bad[0])
        cause = diagnose(actual.double(), causes or {}, 0.0)
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {expected.numel()} codes differ; first at index {i}: expected "
            f"{int(expected[i])}, got {int(actual[i])}" + (f"\nLikely cause: {cause}" if cause else f"\nHint: {hint}")
        )


def state_of(opt, p) -> dict:
    return opt.state[p]


def checked_step(memory, opt, p: torch.Tensor, g: torch.Tensor, t: int, hyper: dict, what: str, **kw) -> None:
    """Step ``opt`` once with gradient ``g`` and hold p and its state to the exact step from what it held before.

    ``hyper``: the lr, betas, eps and weight_decay the test gave p's group; ``kw``: min_8bit_size and
    block_size where they are not the defaults. The parameter and the state are copied before the step, so
    the oracle (testcases/stage6/oracle.py) reads exactly what the step read.
    """
    __tracebackhide__ = True
    before = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
    start = p.detach().clone()
    p.grad = g
    opt.step()
    state = opt.state[p]
    assert state.get("step") == t, (
        f"{what}: state['step'] must count this parameter's steps: expected {t}, got {state.get('step')!r} "
        "(the bias corrections use it)"
    )
    expected = expected_step(start, g, before, eight_bit=p.numel() >= kw.get("min_8bit_size", 4096), step=t,
                             books=memory.state_code_books("cpu"), block_size=kw.get("block_size", 256), **hyper)  # fmt: skip
    check_step(what, p, state, expected, STEP_HINT)


def hyper_of(case: dict) -> dict:
    """A golden case's hyper-parameters, as AdamW8bit takes them."""
    return {"lr": case["lr"], "betas": tuple(case["betas"]), "eps": case["eps"], "weight_decay": case["weight_decay"]}


def from_golden_state(memory, name: str, case: dict, golden: dict, step: int):
    """The student's optimizer holding bitsandbytes' parameter and state after ``step`` (0: the initial parameter)."""
    shape = tuple(case["shape"])
    if step == 0:
        return golden_optimizer(memory, case, initial_param(shape, case["seed"]))
    p, opt = golden_optimizer(memory, case, golden[f"{name}.param_{step}"])
    opt.state[p]["step"] = step
    for key in STATE_KEYS:
        if f"{name}.{key}_{step}" in golden:
            opt.state[p][key] = golden[f"{name}.{key}_{step}"].clone()
    return p, opt


def check_bnb_steps_record(fixture: Mapping, other: Mapping, keys: list[str]) -> None:
    """bitsandbytes' recorded steps pass the tests' own check: step 1 from the initial parameter and step 100
    from its own step-99 state, each the exact step within the bound (testcases/stage6/oracle.py)."""
    books = {"signed": fixture["code.signed"], "unsigned": fixture["code.unsigned"]}
    for name, case in json.loads(fixture.metadata["cases"]).items():
        shape = tuple(case["shape"])
        start = (initial_param(shape, case["seed"]), {})
        late = (
            other[f"{name}.param_99"],
            {k: other[f"{name}.{k}_99"] for k in STATE_KEYS if f"{name}.{k}_99" in other},
        )
        for t, (p, state) in ((1, start), (100, late)):
            g = gradient(shape, case["seed"], t, case["zero_prefix"])
            expected = expected_step(p, g, state, eight_bit=case["eight_bit"], step=t, books=books, **hyper_of(case))
            after = {k: other[f"{name}.{k}_{t}"] for k in STATE_KEYS if f"{name}.{k}_{t}" in other}
            check_step(
                f"{name}, bitsandbytes' recorded step {t}", other[f"{name}.param_{t}"], after, expected, STEP_HINT
            )


def seeded_grads(params: list[torch.Tensor], seed: int) -> None:
    """Give every parameter a seeded gradient of its shape (N(0, 0.1²) + a small offset)."""
    gen = generator(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.1 + 0.01


def state_bytes(opt) -> int:
    """Bytes of every state tensor but the step counter (what a pager moves)."""
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if torch.is_tensor(t) and key != "step"
    )


def three_groups(seed: int) -> list[dict]:
    """Three parameter groups (own lr / weight decay) of tensors with 8-bit-sized and small shapes."""
    gen = generator(seed)
    shapes = [[(40, 30), (5,)], [(300,), (7, 9)], [(64, 8)]]
    lrs, decays = [1e-2, 3e-3, 5e-2], [0.0, 0.1, 0.02]
    return [
        {"params": [nn.Parameter(torch.randn(s, generator=gen)) for s in group], "lr": lr, "weight_decay": wd}
        for group, lr, wd in zip(shapes, lrs, decays)
    ]


def memory_config(memory, tmp_path, **overrides):
    """A small, fast MemoryConfig (fp32, r 2, 6 steps of 16, warmup, decay): the trainer tests' defaults."""
    settings = {"r": 2, "precision": "fp32", "max_steps": 6, "batch_size": 16, "progress": False, "seed": SEED_OFFSET,
                "warmup_ratio": 0.2, "weight_decay": 0.01, "learning_rate": 3e-3, "output_dir": str(tmp_path)}  # fmt: skip
    settings.update(overrides)
    return memory.MemoryConfig(**settings)


def memory_trainer(memory, qlora_trainer, base: nn.Module, data: dict, tmp_path, **overrides):
    config = memory_config(memory, tmp_path, **overrides)
    model = qlora_trainer.prepare_qlora_model(copy_of(base), config)
    return memory.MemoryTrainer(model, config, data, data)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def measure_setup(
    memory, qlora_trainer, method: str, precision: str, checkpointing: bool, optimizer: str, base_dtype: str = "fp32"
):
    """(bundled model prepared for ``method``, its MemoryConfig) with r 8 and min_8bit_size 0 (8-bit on every adapter);
    ``base_dtype`` is TrainConfig's (lora in bf16: "bf16" stores the frozen projections in bf16)."""
    from model.tiny_llama import load_base_model

    config = memory.MemoryConfig(quantize="nf4" if method == "qlora" else "none", precision=precision,
                                 gradient_checkpointing=checkpointing, optimizer=optimizer, min_8bit_size=0,
                                 device="cpu", r=8, progress=False, base_dtype=base_dtype)  # fmt: skip
    model = load_base_model()
    if method == "full":
        model.gradient_checkpointing = checkpointing
    else:
        model = qlora_trainer.prepare_qlora_model(model, config)
    return model, config


def saved_activation_bytes(memory, model: nn.Module, batch: tuple, config) -> int:
    """The activations of one forward of a copy of ``model``, measured independently of the student's measure_memory.

    The given ``activation_bytes`` formula describes the tensors the reference's LoRA forward (Stage 1) saves;
    a correct forward written differently (einsum, scaling applied elsewhere) saves other tensors. So the
    measured activations are held to this measurement of the same model, and weights, gradients and optimizer
    states to the estimate: distinct storages seen by a pack hook, the model's own excluded, the batch copied,
    plus (checkpointing) the largest one block saves when recomputed (the given ``largest_block_recompute``).
    Counted once the forward is done, while the loss keeps the graph alive: a forward that throws a
    graph away (a base layer called twice) frees what it saved, and its addresses may be reused.
    """
    from training.data import lm_loss

    model = copy.deepcopy(model)
    model.train()
    input_ids, labels = (t.clone() for t in batch)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: list[weakref.ref] = []  # counted after the forward: a graph thrown away frees what it saved

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            logits = model(input_ids)
        loss = lm_loss(logits, labels)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for r in saved if (t := r()) is not None}
    total = sum(n for key, n in storages.items() if key not in own)
    del loss
    if config.gradient_checkpointing:
        total += memory.largest_block_recompute(model, input_ids, autocast, own)
    return total


def check_parts(measured: object, estimated: dict, what: str, hint: str) -> None:
    __tracebackhide__ = True
    assert isinstance(measured, dict), f"{what}: expected a dict of parts, got {type(measured).__name__}"
    keys = ("weights", "gradients", "optimizer", "activations", "total")
    assert set(measured) == set(keys), f"{what}: expected the keys {keys}, got {sorted(measured)}"
    wrong = {k: (estimated[k], measured[k]) for k in keys if measured[k] != estimated[k]}
    assert not wrong, (
        f"{what}: these parts differ (expected, got): "
        + ", ".join(f"{k} {e:,} vs {m:,} ({m - e:+,} bytes)" for k, (e, m) in wrong.items())
        + f"\nHint: {hint}"
    )


# ---- Exercise 6.1: state quantization --------------------------------------------------------------


@pytest.mark.exercise("6.1")
def test_unsigned_dynamic_code_book(memory):
    """256 sorted float32 levels from 0 to 1: 2^(e+1) midpoints per exponent e = 0…6 scaled by 10^(e−6), then 0 and 1."""
    code = memory.unsigned_dynamic_code_book()
    hint = ("the check: for each e = 0…6 the 2^(e+1) midpoints of linspace(0.1, 1, 2^(e+1) + 1), times 10^(e − 6), positive "
            "only; then 0 and 1: 254 + 2 = 256 levels")  # fmt: skip
    expect_tensor(code, (256,), "unsigned_dynamic_code_book()", hint, dtype=torch.float32)
    assert bool((code[1:] >= code[:-1]).all()), "the code must be sorted ascending (the lookup table searches it)"
    assert bool((code >= 0).all()), (
        f"the unsigned code has no negative levels (v = E[g²] ≥ 0), got min {code.min().item():.4g}: this is the signed code"
    )
    expected = []  # exact (float64) values of the levels; each float32 level is within one rounding of 2 of them
    for e in range(7):
        b = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float64)
        expected += ((b[:-1] + b[1:]) / 2 * 10.0 ** (e - 6)).tolist()
    expected = torch.tensor(sorted(expected + [0.0, 1.0]), dtype=torch.float64)
    error = (code.double() - expected).abs()
    bound = 4 * U32 * expected  # linspace, midpoint, scale: ≤ 4 float32 roundings of the level
    assert bool((error <= bound).all()), (
        f"{int((error > bound).sum())} of 256 levels are wrong; e.g. index {int((error - bound).argmax())}: expected "
        f"{expected[int((error - bound).argmax())].item():.6g}, got {code[int((error - bound).argmax())].item():.6g}"
        f"\nHint: {hint}"
    )
    assert code[0].item() == 0.0 and code[-1].item() == 1.0 and code[1].item() == pytest.approx(3.25e-7, rel=1e-6), (
        f"the unsigned code runs 0, 3.25e-7, …, 1 (sorted, no negatives): got {code[:2].tolist()} … {code[-1].item()}"
    )


@pytest.mark.exercise("6.1")
@pytest.mark.parametrize("which", ["signed", "unsigned"])
def test_quantization_lut_is_the_nearest_level_of_each_bin(memory, quant, which):
    """Bin k (centre k·2/65535 − 1) → the index of the level nearest that centre, a tie to the lower; uint8 (65536,)."""
    code = quant.dynamic_code_book() if which == "signed" else memory.unsigned_dynamic_code_book()
    lut = memory.quantization_lut(code)
    expected = lut_reference(code)
    check_codes(lut, expected, f"quantization_lut({which} code)",
                "the check: centres = arange(65536) · 2 / 65535 − 1 in float32, then nearest_code(centres, code)")  # fmt: skip
    reachable = lut.unique().numel()
    assert reachable == {"signed": 249, "unsigned": 246}[which], f"{reachable} levels reachable, expected 249 / 246"


@pytest.mark.exercise("6.1")
@pytest.mark.parametrize("which", ["signed", "unsigned"])
def test_quantize_blockwise_lut_codes_and_absmax(memory, quant, which):
    """Blocks of 256 of the flattened tensor (the last partial): fp32 absmax, codes from the table, round trip bounded."""
    code = quant.dynamic_code_book() if which == "signed" else memory.unsigned_dynamic_code_book()
    lut = lut_reference(code)
    x = torch.randn(6, 250, generator=generator(601)) * torch.logspace(-3, 1, 6)[:, None]  # 1,500: 5 blocks + 220
    if which == "unsigned":
        x = x.square()
    result = memory.quantize_blockwise_lut(x, lut)
    assert isinstance(result, tuple) and len(result) == 2, "quantize_blockwise_lut returns (codes, absmax)"
    codes, absmax = result
    want_codes, want_absmax = quantize_reference(x, lut)
    expect_tensor(absmax, (6,), "absmax: one per block of 256 (the last one partial)", dtype=torch.float32)
    assert torch.equal(absmax, want_absmax), "absmax must be max |x| of each block of 256 of the flattened tensor"
    causes = {"the scaled values are rounded to the nearest level directly (nearest_code); bitsandbytes rounds "
              "them to one of 65,536 bins first and reads the level from the table":
              quant.nearest_code(torch.nn.functional.pad(x.reshape(-1), (0, 36)).view(6, 256).div(want_absmax[:, None])
                                 .reshape(-1)[:1500], code).double()}  # fmt: skip
    check_codes(codes, want_codes, f"codes of a (6, 250) tensor ({which} table)",
                "the check: a = max|x| per block; s = clamp(x · (1/a), −1, 1); bin ⌊(s + 1)·0.5·65535 + 0.5⌋; code = lut[bin]",
                causes)  # fmt: skip
    decoded = quant.dequantize_blockwise(codes, absmax, code, 256).reshape(x.shape)
    # the bin centre is ≤ 1/65535 from s, the table's level is ≤ half the widest reachable gap from the centre
    bound = (reachable_gap(code, lut) / 2 + 1 / 65535 + 4 * U32) * absmax.repeat_interleave(256)[:1500].view(6, 250)
    assert bool(((decoded - x).abs() <= bound).all()), (
        "decoding the codes (Stage 3) must give x back within half a level"
    )


# ---- Exercise 6.2: 8-bit AdamW ----------------------------------------------------------------------


@pytest.mark.exercise("6.2")
def test_adamw8bit_state_layout(memory):
    """Tensors of ≥ 4096 elements get uint8 codes + fp32 absmax per block of 256; smaller ones fp32 m and v."""
    big, small = nn.Parameter(torch.randn(64, 65, generator=generator(610))), nn.Parameter(torch.zeros(10, 10))
    unused = nn.Parameter(torch.zeros(50, 100))
    opt = memory.AdamW8bit([big, small, unused], lr=1e-3)
    seeded_grads([big, small], seed=611)
    opt.step()
    opt.step()
    state = opt.state[big]
    assert state.get("step") == 2, (
        f"state['step'] counts the steps of each parameter: expected 2, got {state.get('step')!r}"
    )
    for key, shape, dtype in [("state1", (64, 65), torch.uint8), ("state2", (64, 65), torch.uint8),
                              ("absmax1", (17,), torch.float32), ("absmax2", (17,), torch.float32)]:  # fmt: skip
        assert key in state, f"a 4160-element parameter's state must hold {key!r}, it has {sorted(state)}"
        expect_tensor(state[key], shape, f"state[{key!r}] of a (64, 65) parameter (17 blocks of 256)", dtype=dtype)
    state = opt.state[small]
    assert "absmax1" not in state, "a 100-element parameter (< min_8bit_size 4096) keeps fp32 states, no absmax"
    expect_tensor(state.get("state1"), (10, 10), "state1 of a small parameter: fp32 m", dtype=torch.float32)
    expect_tensor(state.get("state2"), (10, 10), "state2 of a small parameter: fp32 v", dtype=torch.float32)
    assert len(opt.state.get(unused, {})) == 0, "a parameter without a gradient gets no state and is not updated"
    assert torch.equal(unused, torch.zeros(50, 100)), "a parameter without a gradient must not change (no decay either)"


@pytest.mark.exercise("6.2")
@pytest.mark.parametrize("name", ["w64x64", "v4097", "b10x10"])
def test_adamw8bit_first_step_is_bitsandbytes_step(memory, name):
    """Step 1 from a golden case's initial parameter: the exact bitsandbytes step, within float32 rounding.

    w64x64: 16 blocks, the first never sees a gradient (code 0, absmax 0); v4097: a last block of one
    element; b10x10: under min_8bit_size, fp32 states and bitsandbytes' 32-bit formula.
    """
    golden, cases = adamw8bit_golden()
    case = cases[name]
    p, opt = from_golden_state(memory, name, case, golden, 0)
    g = gradient(tuple(case["shape"]), case["seed"], 1, case["zero_prefix"])
    checked_step(memory, opt, p, g, 1, hyper_of(case), f"{name}, step 1")


@pytest.mark.exercise("6.2")
@pytest.mark.parametrize("name", ["w64x64", "v4097", "b10x10"])
def test_adamw8bit_step_100_from_bitsandbytes_state(memory, name):
    """From bitsandbytes' own step-99 parameter and state (its codes, absmax, fp32 moments), step 100: the exact step."""
    golden, cases = adamw8bit_golden()
    case = cases[name]
    p, opt = from_golden_state(memory, name, case, golden, 99)
    g = gradient(tuple(case["shape"]), case["seed"], 100, case["zero_prefix"])
    checked_step(memory, opt, p, g, 100, hyper_of(case), f"{name}, step 100 from bitsandbytes' step-99 state")


# ---- Exercise 6.3: a paged optimizer ------------------------------------------------------------------


@pytest.mark.exercise("6.3")
@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_paged_equals_unpaged_bit_for_bit(memory, kind):
    """Three groups, four steps: paged and unpaged optimizers give identical parameters and states."""
    groups_a, groups_b = three_groups(620), three_groups(620)

    def build(groups):
        if kind == "adamw":
            return torch.optim.AdamW(groups, lr=1e-2)
        return memory.AdamW8bit(groups, lr=1e-2, min_8bit_size=0)

    plain, paged = build(groups_a), memory.PagedOptimizer(build(groups_b))
    for step in range(4):
        for groups in (groups_a, groups_b):
            seeded_grads([p for g in groups for p in g["params"]], seed=621 + step)
        plain.step()
        paged.step()
    for ga, gb in zip(groups_a, groups_b):
        for a, b in zip(ga["params"], gb["params"]):
            assert torch.equal(a, b), (
                f"a parameter of shape {tuple(a.shape)} differs between the paged and the unpaged {kind}: the wrapped "
                "optimizer must do the arithmetic (one group at a time, with that group's hyper-parameters)"
            )
            for key, value in plain.state[a].items():
                other = paged.state[b].get(key)
                same = torch.equal(value, other) if torch.is_tensor(value) else value == other
                assert same, f"state[{key!r}] differs between the paged and the unpaged {kind}"


@pytest.mark.exercise("6.3")
@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_bytes_paged_per_step(memory, kind):
    """Step 1 pages in 0 bytes (no states yet) and out every state byte; each later step moves every byte in and out."""
    groups = three_groups(630)
    base = torch.optim.AdamW(groups, lr=1e-2) if kind == "adamw" else memory.AdamW8bit(groups, min_8bit_size=0)
    paged = memory.PagedOptimizer(base)
    assert (paged.bytes_paged_in, paged.bytes_paged_out) == (0, 0), "a new pager has moved nothing"
    seen = []
    for step in range(3):
        seeded_grads([p for g in groups for p in g["params"]], seed=631 + step)
        paged.step()
        seen.append((paged.bytes_paged_in, paged.bytes_paged_out))
    total = state_bytes(base)
    expected = [(0, total), (total, 2 * total), (2 * total, 3 * total)]
    assert total > 0 and seen == expected, (
        f"(bytes_paged_in, bytes_paged_out) after steps 1, 2, 3: expected {expected}, got {seen} ({total:,} bytes of "
        "state, the step counters excluded). Every group's states go in before and out after its update; the "
        "first step has nothing to page in (its states are created by the update)"
    )
    assert paged.state is base.state and paged.param_groups is base.param_groups, (
        "the pager shares state and param_groups with the wrapped optimizer (one optimizer for schedulers and checkpoints)"
    )


@pytest.mark.exercise("6.3")
def test_min_paged_size_keeps_small_tensors_on_the_device(memory):
    """min_paged_size=300: the states of tensors of 300 elements and more are paged, those of smaller ones stay put
    (bitsandbytes' rule, at its 100,000); the parameters are those of the unpaged optimizer, bit for bit."""
    groups, twin = three_groups(640), three_groups(640)
    plain = torch.optim.AdamW(groups, lr=1e-2)
    paged = memory.PagedOptimizer(torch.optim.AdamW(twin, lr=1e-2), min_paged_size=300)
    for step in range(3):
        for gs in (groups, twin):
            seeded_grads([p for g in gs for p in g["params"]], seed=641 + step)
        plain.step()
        paged.step()
    large = sum(t.numel() * t.element_size() for p, state in paged.state.items() if p.numel() >= 300
                for key, t in state.items() if torch.is_tensor(t) and key != "step")  # fmt: skip
    sizes = sorted(p.numel() for g in twin for p in g["params"])
    expected = (2 * large, 3 * large)
    got = (paged.bytes_paged_in, paged.bytes_paged_out)
    assert large > 0 and got == expected, (
        f"tensors of {sizes} elements, min_paged_size=300: after 3 steps expected (bytes_paged_in, bytes_paged_out) = "
        f"{expected} (the states of the 300-, 512- and 1200-element tensors only), got {got}. A parameter with fewer "
        "than min_paged_size elements is skipped by page_in and page_out; one with exactly that many is paged"
    )
    for g, h in zip(groups, twin):
        for a, b in zip(g["params"], h["params"]):
            assert torch.equal(a, b), f"a {a.numel()}-element parameter differs from the unpaged optimizer's"


# ---- Exercise 6.4: choosing the optimizer in the trainer ---------------------------------------------------


@pytest.mark.exercise("6.4")
def test_make_optimizer_builds_each_kind(memory):
    """adamw → torch AdamW, adamw8bit → AdamW8bit, paged_* → PagedOptimizer around them; hyper-parameters passed."""
    for name in OPTIMIZER_NAMES:
        params = [nn.Parameter(torch.zeros(8, 8)), nn.Parameter(torch.zeros(3))]
        opt = memory.make_optimizer(name, params, min_8bit_size=16, lr=0.25, weight_decay=0.5)
        inner = opt.optimizer if name.startswith("paged_") else opt
        if name.startswith("paged_"):
            assert isinstance(opt, memory.PagedOptimizer), (
                f"{name!r} must return a PagedOptimizer, got {type(opt).__name__}"
            )
        kind = memory.AdamW8bit if name.endswith("8bit") else torch.optim.AdamW
        assert type(inner) is kind, (
            f"{name!r} must build a {kind.__name__} (wrapped if paged), got {type(inner).__name__}"
        )
        group = opt.param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (0.25, 0.5), f"{name!r}: pass lr and weight_decay through"
        if kind is memory.AdamW8bit:
            assert inner.min_8bit_size == 16, f"{name!r}: pass min_8bit_size to AdamW8bit"
    refuses(memory.make_optimizer, "sgd", [nn.Parameter(torch.zeros(2))], match="paged_adamw8bit")


@pytest.mark.exercise("6.4")
def test_memory_trainer_adamw_equals_qlora_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path):
    """optimizer="adamw" trains bit for bit as Stage 4's QLoRATrainer (LoRA+ groups, warmup, decay, scheduler)."""
    settings = {"loraplus_lr_ratio": 4.0, "quantize": "nf4"}
    ours = memory_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path / "a", optimizer="adamw", **settings)
    stage4_config = qlora_trainer.TrainConfig(**{
        k: v for k, v in vars(memory_config(memory, tmp_path / "b", **settings)).items()
        if k not in ("optimizer", "min_8bit_size")
    })  # fmt: skip
    theirs = qlora_trainer.QLoRATrainer(qlora_trainer.prepare_qlora_model(copy_of(tiny_model), stage4_config),
                                        stage4_config, task_data, task_data)  # fmt: skip
    ours.train()
    theirs.train()
    lrs_ours, lrs_theirs = [h["lr"] for h in ours.history], [h["lr"] for h in theirs.history]
    assert lrs_ours == lrs_theirs, (
        f"learning rates per step differ: MemoryTrainer {lrs_ours}, QLoRATrainer {lrs_theirs}. Rebuild the groups at "
        "their base rate (the group's initial_lr, not the already-scheduled lr) and a new LambdaLR over the new optimizer"
    )
    a, b = trainable_state(ours.model), trainable_state(theirs.model)
    for name in b:
        assert torch.equal(a[name], b[name]), (
            f"{name} differs from Stage 4's run: with optimizer='adamw' the MemoryTrainer must be the QLoRATrainer "
            "(same parameter groups, lr, weight decay, scheduler)"
        )


@pytest.mark.exercise("6.4")
@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_memory_trainer_8bit_trains_the_adapters(memory, qlora_trainer, tiny_model, task_data, tmp_path, optimizer):
    """With min_8bit_size 0 every adapter gets uint8 states; the adapters move, the frozen base stays bit-identical."""
    t = memory_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path, optimizer=optimizer, min_8bit_size=0,
                       max_steps=3)  # fmt: skip
    frozen = {n: v.clone() for n, v in t.model.state_dict().items() if "lora_" not in n}
    before = trainable_state(t.model)
    t.train()
    moved = [n for n, p in trainable_state(t.model).items() if not torch.equal(p, before[n])]
    assert moved, "three 8-bit steps must change the adapters"
    for name, value in t.model.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"{name} is frozen and must stay bit-identical"
    states = list(t.optimizer.state.values())
    assert states and all(s["state1"].dtype == torch.uint8 for s in states), (
        f"optimizer={optimizer!r} with min_8bit_size=0 must keep uint8 codes for every adapter tensor (config.min_8bit_size "
        "reaches AdamW8bit through make_optimizer)"
    )


# ---- Exercise 6.5: memory accounting ---------------------------------------------------------------------


@pytest.mark.exercise("6.5")
def test_optimizer_state_bytes_per_tensor(memory):
    """adamw 8n + 4 (m, v, step tensor); 8-bit: 2n + 8·⌈n/256⌉, or 8n under min_8bit_size."""
    sizes = [4096, 4095, 257, 1]
    assert memory.optimizer_state_bytes(sizes, "adamw") == sum(8 * n + 4 for n in sizes), (
        "adamw: 4 bytes each for m and v, plus torch's 4-byte step tensor, per tensor"
    )
    assert memory.optimizer_state_bytes(sizes, "paged_adamw") == sum(8 * n + 4 for n in sizes), (
        "paging moves bytes, it keeps them"
    )
    expected = (2 * 4096 + 8 * 16) + 8 * 4095 + 8 * 257 + 8 * 1
    got = memory.optimizer_state_bytes(sizes, "adamw8bit")
    assert got == expected, (
        f"adamw8bit with the default min_8bit_size 4096: expected {expected:,} bytes, got {got:,}: 4096 elements are "
        "8-bit (two uint8 codes + two fp32 absmax per block of 256), smaller tensors keep fp32 m and v, no step tensor"
    )
    expected = sum(2 * n + 8 * -(-n // 256) for n in sizes)
    got = memory.optimizer_state_bytes(sizes, "paged_adamw8bit", min_8bit_size=0)
    assert got == expected, f"paged_adamw8bit, min_8bit_size 0: expected {expected:,}, got {got:,}"


@pytest.mark.exercise("6.5")
def test_estimate_memory_parts_of_the_wide_config(memory):
    """The lesson's numbers for wide_config(), batch 64 × 19, bf16 (LoRA also with its base stored in bf16)."""
    config = memory.wide_config()
    parts = memory.estimate_memory_parts(config, "qlora", "adamw", 64, 19, "bf16")
    expected = {"weights": 15_657_216, "gradients": 2_498_560, "optimizer": 4_997_568, "activations": 249_443_332}
    expected["total"] = sum(expected.values())
    check_parts(parts, expected, "estimate_memory_parts(wide, qlora, adamw, bf16)",
                "the check: weights = weight_bytes, gradients = 4 B per trainable element, optimizer = optimizer_state_bytes, activations = activation_bytes; total = their sum")  # fmt: skip
    parts = memory.estimate_memory_parts(config, "qlora", "adamw8bit", 64, 19, "bf16")
    assert parts["optimizer"] == 1_268_800, (
        f"qlora + adamw8bit: expected 1,268,800 state bytes, got {parts['optimizer']:,}"
    )
    parts = memory.estimate_memory_parts(config, "lora", "adamw", 64, 19, "bf16", base_dtype="bf16")
    got = (parts["weights"], parts["activations"])
    assert got == (53_200_896, 249_443_332), (
        f"lora in bf16 with base_dtype='bf16': expected weights 53,200,896 (the projections at 2 B, the rest fp32) and "
        f"activations 249,443,332 (no cast copy of a weight: QLoRA's), got {got}: pass base_dtype to weight_bytes and "
        "activation_bytes"
    )
    parts = memory.estimate_memory_parts(config, "full", "adamw", 64, 19, "bf16")
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (101_296_128, 101_296_128, 202_592_556), (
        f"full fine-tuning: expected weights = gradients = 101,296,128 and optimizer 202,592,556, got {parts}"
    )


@pytest.mark.exercise("6.5")
def test_measure_memory_equals_the_estimate(memory, qlora_trainer, task_data):
    """QLoRA, fp32, AdamW on the bundled model, batch 4 × 19: every measured part equals the estimate to the byte."""
    model, config = measure_setup(memory, qlora_trainer, "qlora", "fp32", False, "adamw")
    batch = (task_data["input_ids"][:4], task_data["labels"][:4])
    measured = memory.measure_memory(model, batch, config)
    estimated = memory.estimate_memory_parts(model.config, "qlora", "adamw", 4, 19, "fp32", False, 8, 0)
    estimated["activations"] = saved_activation_bytes(memory, model, batch, config)  # = the estimate's, for the
    estimated["total"] = sum(v for k, v in estimated.items() if k != "total")  # reference's LoRA forward
    check_parts(measured, estimated, "measure_memory vs estimate_memory_parts (qlora, fp32, adamw)",
                "the check: weights: storages of parameters and buffers; activations: storages the pack hook sees, the model's own "
                "excluded; gradients: the trainable .grad; optimizer: every state tensor after one step")  # fmt: skip
