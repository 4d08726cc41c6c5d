"""Stage 6 advanced tests: 100 steps each held to bitsandbytes' step, strong decay and tiny moments, the
quantizer's edge cases, bad input, checkpoints with 8-bit states, paging on a device, estimate =
measurement in every configuration.

Bad input must raise a ValueError naming the argument and leave everything as it was. The tolerances are
those of stage6/basic.py (its module docstring) and testcases/stage6/oracle.py.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from testcases.helpers import assert_unchanged, copy_of, generator, refuses, snapshot, word
from testcases.stage6.basic import (
    adamw8bit_golden,
    bins_reference,
    check_codes,
    check_parts,
    checked_step,
    f32,
    golden_optimizer,
    hyper_of,
    lut_reference,
    measure_setup,
    memory_config,
    memory_trainer,
    quantize_reference,
    saved_activation_bytes,
    seeded_grads,
    state_bytes,
    three_groups,
    trainable_state,
)
from testcases.stage6.golden_inputs import gradient, initial_param, sha256

# ---- Exercise 6.1: state quantization ------------------------------------------------------------------


@pytest.mark.exercise("6.1")
@pytest.mark.parametrize("which", ["signed", "unsigned"])
def test_quantize_every_bin_of_the_table(memory, quant, which):
    """One block with absmax 1 (s = x exactly), 131,073 values over [−1, 1] (0 … 1 unsigned): every bin, both sides."""
    code = quant.dynamic_code_book() if which == "signed" else memory.unsigned_dynamic_code_book()
    lut = lut_reference(code)
    low = -1.0 if which == "signed" else 0.0
    x = torch.linspace(low, 1.0, 131_073, dtype=torch.float32)
    codes, absmax = memory.quantize_blockwise_lut(x, lut, block_size=x.numel())
    expect_absmax = torch.ones(1)
    assert torch.equal(absmax, expect_absmax), f"absmax of one block holding ±1 is 1, got {absmax}"
    expected = lut[bins_reference(x.double())]
    s = x.double()
    causes = {
        "the scaled values are rounded to the nearest level directly (Stage 3's nearest_code); bitsandbytes rounds "
        "them to one of 65,536 bins and reads that bin's level from the table": quant.nearest_code(x, code).double(),
        "the bin is rounded (round) instead of truncated after adding 0.5: k = ⌊(s + 1)·0.5·65535 + 0.5⌋": lut[
            f32(f32(f32(f32(s + 1) * 0.5) * 65535) + 0.5).round().long().clamp(max=65535)
        ].double(),
        "the bin forgets the + 0.5 (it truncates (s + 1)·0.5·65535: always the lower bin)": lut[
            f32(f32(f32(s + 1) * 0.5) * 65535).floor().long()
        ].double(),
    }
    check_codes(codes, expected, f"codes of every bin ({which} table)",
                "the check: k = ⌊(s + 1)·0.5·65535 + 0.5⌋ in float32, truncated (.long()); code = lut[k]", causes)  # fmt: skip


def division_traps(lut: torch.Tensor, absmax: float) -> torch.Tensor:
    """Values whose code differs between x · (1/a) (bitsandbytes) and x / a, for the block maximum a = ``absmax``.

    Near every bin boundary where the table changes level, scan float32 neighbours for a disagreement.
    """
    a = f32(torch.tensor(absmax, dtype=torch.float64))
    edges = (lut[1:] != lut[:-1]).nonzero().flatten().double() + 1  # bins where the level changes
    x = ((edges - 0.5) / 32767.5 - 1) * a  # the s-boundary of those bins, times a
    up, down, found = x.float(), x.float(), []
    for _ in range(64):
        found += [up, down]
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
    xs = torch.cat(found).unique().double()
    xs = xs[xs.abs() < a]
    reciprocal = lut[bins_reference(f32(xs * f32(1 / a)))]
    divided = lut[bins_reference(f32(xs / a))]
    return xs[reciprocal != divided].float()


@pytest.mark.exercise("6.1")
def test_quantize_multiplies_by_the_reciprocal(memory, quant):
    """s = x · (1/a): the float32 reciprocal first, then a multiply; x / a rounds differently at bin boundaries."""
    lut = lut_reference(quant.dynamic_code_book())
    blocks = []
    for a in (0.3, 1.3, 3.1):
        traps = division_traps(lut, a)[:255]
        assert traps.numel() >= 10, "the test could not find its trap values (a bug in the test, not in your code)"
        blocks.append(torch.nn.functional.pad(torch.cat([torch.tensor([a]), traps]), (0, 255 - traps.numel())))
    x = torch.cat(blocks)  # three blocks of 256, each led by its maximum a
    codes, absmax = memory.quantize_blockwise_lut(x, lut)
    want_codes, want_absmax = quantize_reference(x, lut)
    assert torch.equal(absmax, want_absmax), "absmax must be max |x| of each block"
    divided = lut[bins_reference(f32(x.double() / want_absmax.double().repeat_interleave(256)))]
    causes = {"x is divided by absmax; bitsandbytes multiplies by the float32 reciprocal (x · (1/a)), which rounds "
              "differently near a bin boundary": divided.double()}  # fmt: skip
    check_codes(
        codes,
        want_codes,
        "codes of values near bin boundaries",
        "the check: a = max|x|; s = clamp(x · fl(1/a), −1, 1); bin ⌊(s + 1)·0.5·65535 + 0.5⌋ truncated; code = lut[bin], each step rounded in float32",
        causes,
    )


@pytest.mark.exercise("6.1")
@pytest.mark.parametrize("which", ["signed_lut", "unsigned_lut"])
def test_all_zero_block_is_code_zero(memory, quant, which):
    """A block whose absmax is 0 skips the table: code 0 (not the code of 0.0), absmax 0; its neighbours are normal."""
    lut = lut_reference(memory.unsigned_dynamic_code_book() if which == "unsigned_lut" else quant.dynamic_code_book())
    x = torch.rand(3 * 256 + 10, generator=generator(640)) + 0.01
    x[256:512] = 0.0
    codes, absmax = memory.quantize_blockwise_lut(x, lut)
    want_codes, want_absmax = quantize_reference(x, lut)
    assert torch.equal(absmax, want_absmax), f"absmax per block: expected {want_absmax.tolist()}, got {absmax}"
    zero_code = int(lut[32768])
    check_codes(codes, want_codes, "codes with an all-zero second block", "the check: an all-zero block's codes are all 0",
                {f"the all-zero block got the code of 0.0 ({zero_code}); bitsandbytes writes code 0 there":
                 torch.where(torch.arange(codes.numel()).div(256, rounding_mode="floor") == 1,
                             torch.tensor(zero_code), want_codes.long()).double()})  # fmt: skip


@pytest.mark.exercise("6.1")
def test_quantize_default_block_size_and_a_partial_last_block(memory):
    """The default block is 256 (bitsandbytes' hard-coded one); 257 elements = a full block and a block of 1."""
    lut = memory.state_code_books()["signed_lut"]
    x = torch.randn(257, generator=generator(641))
    codes, absmax = memory.quantize_blockwise_lut(x, lut)
    want_codes, want_absmax = quantize_reference(x, lut)
    assert tuple(absmax.shape) == (2,), (
        f"257 elements in blocks of 256 make 2 blocks (one fp32 absmax each), got absmax of shape {tuple(absmax.shape)}: "
        "the default block_size must be STATE_BLOCK_SIZE = 256"
    )
    assert torch.equal(absmax, want_absmax), f"absmax per block: expected {want_absmax.tolist()}, got {absmax.tolist()}"
    check_codes(
        codes, want_codes, "codes of 257 elements", "the check: the last block holds one element, with its own absmax"
    )
    assert absmax[1].item() == abs(x[256].item()), "a block of one element has that element's |x| as its absmax"


@pytest.mark.exercise("6.1")
@pytest.mark.parametrize("block_size", [0, -256, 2.5, True])
def test_quantize_rejects_a_bad_block_size(memory, block_size):
    """A block size that is not a positive int: ValueError naming block_size, x unchanged."""
    lut = memory.state_code_books()["signed_lut"]
    x = torch.randn(10, generator=generator(642))
    before = x.clone()
    refuses(memory.quantize_blockwise_lut, x, lut, block_size=block_size, match=word("block_size"))
    assert torch.equal(x, before), "a refused call must leave its input unchanged"


@pytest.mark.exercise("6.1")
def test_state_quantization_on_device(memory, device):
    """The table is built on the code's device; quantizing there gives the CPU's codes."""
    code = memory.unsigned_dynamic_code_book().to(device)
    lut = memory.quantization_lut(code)
    assert lut.device.type == device.type, f"the table must live on the code's device ({device.type})"
    x = torch.rand(600, generator=generator(643)).square().to(device)
    codes, absmax = memory.quantize_blockwise_lut(x, lut)
    want_codes, want_absmax = quantize_reference(x.cpu(), lut_reference(code.cpu()))
    assert codes.device.type == device.type and absmax.device.type == device.type, "results stay on x's device"
    check_codes(codes.cpu(), want_codes, f"codes on {device.type}", "the check: the same codes on every device")
    assert torch.equal(absmax.cpu(), want_absmax), f"absmax on {device.type} must equal the CPU's"


# ---- Exercise 6.2: 8-bit AdamW ----------------------------------------------------------------------


@pytest.mark.exercise("6.2")
@pytest.mark.parametrize("name", ["w64x64", "v4097", "b10x10"])
def test_adamw8bit_100_steps_each_bitsandbytes_step(memory, name):
    """100 steps on the golden inputs: EVERY step is the exact bitsandbytes step from the state the optimizer held.

    Two correct implementations (or bitsandbytes on two CPUs) may part ways: where a moment lands within a
    rounding of a bin boundary, its code may be either neighbour, and that element then follows its own
    path. So each step is checked from the student's own state before it (testcases/stage6/oracle.py), not
    against bitsandbytes' trajectory: the bias corrections at t = 1 … 100, the re-quantization after every
    step and the state the next step reads are all held to the formula.
    """
    golden, cases = adamw8bit_golden()
    case = cases[name]
    shape = tuple(case["shape"])
    start = initial_param(shape, case["seed"])
    assert sha256([start]) == case["sha256_initial_param"], (
        "the test's initial parameter differs from the golden file's (torch.rand behaves differently here): not your code"
    )
    p, opt = golden_optimizer(memory, case, start)
    for t in range(1, 101):
        g = gradient(shape, case["seed"], t, case["zero_prefix"])
        checked_step(memory, opt, p, g, t, hyper_of(case), f"{name}, step {t} of 100")


@pytest.mark.exercise("6.2")
@pytest.mark.parametrize("shape", [(70, 73), (9, 11)], ids=["8-bit", "fp32-states"])
def test_adamw8bit_strong_decay_and_tiny_moments(memory, shape):
    """lr·λ = 0.05, gradients from 1e-9 to 1 and an all-zero block, 4 steps: decay before the step, ε where it belongs.

    With lr·λ that large, decaying after the step instead of before moves p by lr·λ·|step|, thousands of
    roundings; with gradients near 1e-9, √v/c2 is near ε and ε's place in the denominator shows.
    """
    gen = generator(660)
    p = nn.Parameter(torch.randn(shape, generator=gen))
    hyper = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 1.0}
    opt = memory.AdamW8bit([p], **hyper)
    scales = torch.logspace(-9, 0, 10)[torch.randint(0, 10, shape, generator=gen)]
    for t in range(1, 5):
        g = torch.randn(shape, generator=gen) * scales
        g.view(-1)[:300] = 0.0  # the first block of 256 never sees a gradient
        checked_step(memory, opt, p, g, t, hyper, f"{tuple(shape)}, lr·λ = 0.05, step {t}")


@pytest.mark.exercise("6.2")
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"block_size": 0}, "block_size"),
        ({"min_8bit_size": -1}, "min_8bit_size"),
        ({"min_8bit_size": 1.5}, "min_8bit_size"),
    ],
)
def test_adamw8bit_rejects_bad_arguments(memory, kwargs, argument):
    """Each bad hyper-parameter: ValueError naming it and its allowed range, raised before any state exists."""
    p = nn.Parameter(torch.ones(3))
    refuses(memory.AdamW8bit, [p], **kwargs, match=word(argument))
    assert torch.equal(p, torch.ones(3)) and p.grad is None, "a refused optimizer must leave the parameter alone"


@pytest.mark.exercise("6.2")
def test_min_8bit_size_is_a_lower_bound(memory):
    """numel ≥ min_8bit_size is 8-bit (4096 of 4096 is), fewer stay fp32; min_8bit_size 0 makes even 1 element 8-bit."""
    at, below, one = nn.Parameter(torch.ones(4096)), nn.Parameter(torch.ones(4095)), nn.Parameter(torch.ones(1))
    opt = memory.AdamW8bit([at, below], lr=1e-3)
    seeded_grads([at, below], seed=650)
    opt.step()
    assert opt.state[at]["state1"].dtype == torch.uint8, "4096 elements with min_8bit_size 4096: 8-bit (numel >= min)"
    assert opt.state[below]["state1"].dtype == torch.float32, "4095 elements: fp32 states (numel < min_8bit_size)"
    opt = memory.AdamW8bit([one], lr=1e-3, min_8bit_size=0)
    seeded_grads([one], seed=651)
    opt.step()
    assert opt.state[one]["state1"].dtype == torch.uint8 and opt.state[one]["absmax1"].shape == (1,), (
        "min_8bit_size 0: every tensor gets codes, a 1-element one a single block"
    )


@pytest.mark.exercise("6.2")
def test_parameter_groups_keep_their_hyper_parameters(memory):
    """One optimizer over three groups = three optimizers, one per group (each group's lr, betas, eps, decay)."""
    groups = three_groups(652)
    groups[1]["betas"], groups[2]["eps"] = (0.8, 0.99), 1e-6
    alone = [dict(g, params=[nn.Parameter(p.detach().clone()) for p in g["params"]]) for g in groups]
    together = memory.AdamW8bit(groups, min_8bit_size=256)
    separate = [memory.AdamW8bit([g], min_8bit_size=256) for g in alone]
    for step in range(3):
        seeded_grads([p for g in groups for p in g["params"]], seed=653 + step)
        seeded_grads([p for g in alone for p in g["params"]], seed=653 + step)
        together.step()
        for opt in separate:
            opt.step()
    for i, (g, h) in enumerate(zip(groups, alone)):
        for a, b in zip(g["params"], h["params"]):
            assert torch.equal(a, b), f"group {i}: its parameters must follow the group's own lr / betas / eps / decay"


@pytest.mark.exercise("6.2")
def test_state_dict_keeps_the_codes_uint8_and_resumes(memory):
    """state_dict → load_state_dict: codes stay uint8 (torch casts them to the parameter's dtype), next steps identical."""
    torch_params = [nn.Parameter(torch.randn(30, 20, generator=generator(655))), nn.Parameter(torch.randn(7))]
    twin = [nn.Parameter(p.detach().clone()) for p in torch_params]
    first = memory.AdamW8bit(torch_params, lr=1e-2, min_8bit_size=64)
    seeded_grads(torch_params, seed=656)
    first.step()
    saved = copy.deepcopy(first.state_dict())  # as if through torch.save: no tensor shared with `first`
    with torch.no_grad():
        for a, b in zip(twin, torch_params):
            a.copy_(b)
    second = memory.AdamW8bit(twin, lr=1e-2, min_8bit_size=64)
    second.load_state_dict(saved)
    state = second.state[twin[0]]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, (
        f"after load_state_dict the codes are {state['state1'].dtype}: torch.optim.Optimizer.load_state_dict casts "
        "state tensors to the parameter's dtype; turn state1 / state2 back into uint8 afterwards"
    )
    assert second.state[twin[1]]["state1"].dtype == torch.float32, "the fp32 states of a small tensor stay fp32"
    assert torch.equal(state["absmax1"], first.state[torch_params[0]]["absmax1"]), "absmax must survive unchanged"
    for step in range(2):
        seeded_grads(torch_params, seed=657 + step)
        seeded_grads(twin, seed=657 + step)
        first.step()
        second.step()
    for a, b in zip(torch_params, twin):
        assert torch.equal(a, b), "a loaded optimizer must continue bit-identically to the one it was saved from"


@pytest.mark.exercise("6.2")
def test_step_runs_the_closure(memory):
    """step(closure) re-evaluates the loss and returns it, as every torch optimizer does."""
    p = nn.Parameter(torch.ones(5))
    opt = memory.AdamW8bit([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() == 5.0, "step(closure) returns the closure's loss"
    assert bool((p < 1).all()), "the closure's gradient (2p > 0) must be used: p decreases"


@pytest.mark.exercise("6.2")
def test_adamw8bit_on_device(memory, device):
    """States live on the parameter's device and each step there is the exact bitsandbytes step."""
    there = nn.Parameter(torch.randn(40, 20, generator=generator(658)).to(device))
    hyper = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    opt = memory.AdamW8bit([there], min_8bit_size=0, **hyper)
    for step in range(1, 3):
        g = (torch.randn(40, 20, generator=generator(659 + step)) * 0.1).to(device)
        checked_step(memory, opt, there, g, step, hyper, f"step {step} on {device.type}", min_8bit_size=0)
    state = opt.state[there]
    assert all(state[k].device.type == device.type for k in ("state1", "state2", "absmax1", "absmax2")), (
        f"the states must live on the parameter's device ({device.type})"
    )


# ---- Exercise 6.3: a paged optimizer ------------------------------------------------------------------


@pytest.mark.exercise("6.3")
def test_paged_optimizer_refuses_what_it_cannot_wrap(memory):
    """PagedOptimizer wraps a torch optimizer only (not a pager, a name or a parameter list), and then steps."""
    p = nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([p])
    paged = memory.PagedOptimizer(inner)
    for bad in (paged, "adamw", [p]):
        refuses(memory.PagedOptimizer, bad, match=word("optimizer"))
    assert len(inner.param_groups) == 1 and inner.param_groups[0]["params"] == [p], "a refusal changes nothing"
    p.grad = torch.ones(3)
    paged.step()  # the first pager still works
    assert bool((p < 1).all()), "the pager that was accepted must still step its parameter"


@pytest.mark.exercise("6.3")
def test_paged_page_in_and_out_return_the_bytes(memory):
    """page_in / page_out return the bytes they moved (the group's state tensors, the step counter excluded)."""
    groups = three_groups(660)
    paged = memory.PagedOptimizer(memory.AdamW8bit(groups, min_8bit_size=0))
    seeded_grads([p for g in groups for p in g["params"]], seed=661)
    paged.step()
    for group in paged.param_groups:
        expected = sum(
            t.numel() * t.element_size()
            for p in group["params"]
            for key, t in paged.state[p].items()
            if torch.is_tensor(t) and key != "step"
        )
        moved_in, moved_out = paged.page_in(group), paged.page_out(group)
        assert moved_in == moved_out == expected, (
            f"a group with {expected:,} state bytes: page_in returned {moved_in!r}, page_out {moved_out!r}"
        )


@pytest.mark.exercise("6.3")
def test_paged_optimizer_works_with_a_scheduler(memory):
    """A LambdaLR over the pager changes the wrapped optimizer's rates: the step uses them (one optimizer)."""
    a = [nn.Parameter(torch.ones(6, 6)) for _ in range(2)]
    b = [nn.Parameter(torch.ones(6, 6)) for _ in range(2)]
    plain = torch.optim.AdamW([{"params": [a[0]]}, {"params": [a[1]], "lr": 0.2}], lr=0.1)
    paged = memory.PagedOptimizer(torch.optim.AdamW([{"params": [b[0]]}, {"params": [b[1]], "lr": 0.2}], lr=0.1))
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)) for opt in (plain, paged)]
    for step in range(3):
        seeded_grads(a, seed=662 + step)
        seeded_grads(b, seed=662 + step)
        for opt, schedule in zip((plain, paged), schedules):
            opt.step()
            schedule.step()
            opt.zero_grad()
    for x, y in zip(a, b):
        assert torch.equal(x, y), "with a scheduler the paged optimizer must equal the plain one"


@pytest.mark.exercise("6.3")
def test_paged_state_dict_round_trip(memory):
    """Paged 8-bit optimizer: state_dict / load_state_dict keep uint8 codes, the pool is shared again, bytes stay honest."""
    groups, twin = three_groups(664), three_groups(664)
    first = memory.PagedOptimizer(memory.AdamW8bit(groups, min_8bit_size=0))
    seeded_grads([p for g in groups for p in g["params"]], seed=665)
    first.step()
    second = memory.PagedOptimizer(memory.AdamW8bit(twin, min_8bit_size=0))
    with torch.no_grad():
        for g, h in zip(groups, twin):
            for a, b in zip(g["params"], h["params"]):
                b.copy_(a)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert second.state is second.optimizer.state and second.param_groups is second.optimizer.param_groups, (
        "after load_state_dict the pager must share the wrapped optimizer's (new) state and param_groups again"
    )
    codes = [s["state1"].dtype for s in second.state.values()]
    assert codes and all(c == torch.uint8 for c in codes), f"codes after loading must be uint8, got {set(codes)}"
    total = state_bytes(second.optimizer)
    in_before, out_before = second.bytes_paged_in, second.bytes_paged_out
    for step in range(2):
        seeded_grads([p for g in groups for p in g["params"]], seed=666 + step)
        seeded_grads([p for g in twin for p in g["params"]], seed=666 + step)
        first.step()
        second.step()
    assert second.bytes_paged_in - in_before == 2 * total, (
        f"after loading, each step pages every state byte in: expected {2 * total:,} over 2 steps, got "
        f"{second.bytes_paged_in - in_before:,}"
    )
    assert second.bytes_paged_out - out_before == 2 * total, "… and out again"
    for g, h in zip(groups, twin):
        for a, b in zip(g["params"], h["params"]):
            assert torch.equal(a, b), "a loaded paged optimizer must continue bit-identically"


@pytest.mark.exercise("6.3")
def test_paged_step_restores_the_groups_when_the_update_fails(memory):
    """If the wrapped step raises, the wrapped optimizer gets its full list of groups back."""

    class Boom(Exception):
        pass

    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            raise Boom("boom")

    groups = [{"params": [nn.Parameter(torch.ones(2))]}, {"params": [nn.Parameter(torch.ones(3))]}]
    inner = Failing(groups, lr=0.1)
    everything = list(inner.param_groups)
    paged = memory.PagedOptimizer(inner)
    refuses(paged.step, error=Boom)
    assert inner.param_groups == everything and len(inner.param_groups) == 2, (
        "put the full param_groups back in a finally: after a failed step the wrapped optimizer holds only one group"
    )


@pytest.mark.exercise("6.3")
def test_paged_optimizer_on_device(memory, device):
    """Parameters on the device, states in the CPU pool between steps, the same result as unpaged, bytes counted."""
    groups, twin = three_groups(668), three_groups(668)
    for g in groups + twin:
        g["params"] = [nn.Parameter(p.detach().to(device)) for p in g["params"]]
    plain = memory.AdamW8bit(groups, min_8bit_size=0)
    paged = memory.PagedOptimizer(memory.AdamW8bit(twin, min_8bit_size=0), pool_device="cpu")
    for step in range(3):
        for gs in (groups, twin):
            seeded_grads([p for g in gs for p in g["params"]], seed=669 + step)
            for g in gs:
                for p in g["params"]:
                    p.grad = p.grad.to(device)
        plain.step()
        paged.step()
    homes = {t.device.type for s in paged.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"}
    assert homes == {"cpu"}, f"between steps every state lives in the pool (cpu), found them on {homes}"
    total = state_bytes(paged.optimizer)
    assert (paged.bytes_paged_in, paged.bytes_paged_out) == (2 * total, 3 * total), "bytes counted as on the CPU"
    for g, h in zip(groups, twin):
        for a, b in zip(g["params"], h["params"]):
            assert torch.equal(a, b), f"paged and unpaged runs on {device.type} must agree bit for bit"


@pytest.mark.exercise("6.3")
def test_bitsandbytes_paging_threshold(memory):
    """BNB_MIN_PAGED_SIZE = 100,000 (bitsandbytes' get_state_buffer: p.numel() < 1e5 gets an ordinary tensor): with it,
    a 100,000-element tensor is paged, a 99,999-element one (or any 7B r = 8 adapter: at most 88,064) is not."""
    assert memory.BNB_MIN_PAGED_SIZE == 100_000, "bitsandbytes pages the states of tensors of >= 100,000 elements"
    big, small = nn.Parameter(torch.zeros(100_000)), nn.Parameter(torch.zeros(99_999))
    paged = memory.PagedOptimizer(torch.optim.AdamW([big, small], lr=1e-3), min_paged_size=memory.BNB_MIN_PAGED_SIZE)
    for _ in range(2):
        big.grad, small.grad = torch.ones(100_000), torch.ones(99_999)
        paged.step()
    assert (paged.bytes_paged_in, paged.bytes_paged_out) == (800_000, 1_600_000), (
        f"the 100,000-element tensor's m and v (800,000 bytes) are paged in once (step 2) and out twice; the 99,999-element "
        f"one's never: expected (800,000, 1,600,000), got ({paged.bytes_paged_in:,}, {paged.bytes_paged_out:,})"
    )
    assert memory.PagedOptimizer(torch.optim.AdamW([small])).min_paged_size == 0, "the default pages every tensor"


@pytest.mark.exercise("6.3")
@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_paged_optimizer_refuses_a_bad_min_paged_size(memory, value):
    """min_paged_size is an int >= 0: anything else is a ValueError naming it, and the optimizer can still be wrapped."""
    p = nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([p])
    refuses(memory.PagedOptimizer, inner, min_paged_size=value, match=word("min_paged_size"))
    assert len(inner.param_groups) == 1 and inner.param_groups[0]["params"] == [p], "a refusal changes nothing"
    paged = memory.PagedOptimizer(inner, min_paged_size=3)  # the optimizer, wrapped after all: 3 elements are paged
    p.grad = torch.ones(3)
    paged.step()
    assert paged.bytes_paged_out == 24, (
        f"min_paged_size=3 pages a 3-element m and v out: 24 bytes, got {paged.bytes_paged_out!r}"
    )


@pytest.mark.exercise("6.3")
def test_min_paged_size_on_device(memory, device):
    """On the device: between steps the large tensors' states live in the CPU pool, the small ones' on the device."""
    groups = three_groups(670)
    for g in groups:
        g["params"] = [nn.Parameter(p.detach().to(device)) for p in g["params"]]
    paged = memory.PagedOptimizer(torch.optim.AdamW(groups, lr=1e-2), pool_device="cpu", min_paged_size=300)
    for step in range(2):
        seeded_grads([p for g in groups for p in g["params"]], seed=671 + step)
        for g in groups:
            for p in g["params"]:
                p.grad = p.grad.to(device)
        paged.step()
    for p, state in paged.state.items():
        where = {t.device.type for key, t in state.items() if torch.is_tensor(t) and key != "step"}
        expected = "cpu" if p.numel() >= 300 else device.type
        assert where == {expected}, f"a {p.numel()}-element parameter's states live on {where}, expected {expected}"


# ---- Exercise 6.4: choosing the optimizer in the trainer ---------------------------------------------------


@pytest.mark.exercise("6.4")
@pytest.mark.parametrize(
    "overrides, field",
    [({"optimizer": "sgd"}, "optimizer"), ({"min_8bit_size": -1}, "min_8bit_size"),
     ({"min_8bit_size": True}, "min_8bit_size"), ({"min_8bit_size": 2.5}, "min_8bit_size"), ({"r": 0}, "r")],
)  # fmt: skip
def test_memory_config_names_the_field(memory, tmp_path, overrides, field):
    """A bad optimizer name or min_8bit_size (or a bad Stage 4 field): ValueError naming the field."""
    refuses(memory_config, memory, tmp_path, **overrides, match=word(field))


@pytest.mark.exercise("6.4")
def test_memory_trainer_refuses_a_plain_train_config(memory, qlora_trainer, tiny_model, task_data):
    """A TrainConfig has no optimizer field: refused by name, the model left as it was."""
    config = qlora_trainer.TrainConfig(r=2, precision="fp32", max_steps=2, batch_size=16, progress=False)
    model = qlora_trainer.prepare_qlora_model(copy_of(tiny_model), config)
    before = snapshot(model)
    refuses(memory.MemoryTrainer, model, config, task_data, match=word("config"))
    assert_unchanged(model, before, "MemoryTrainer(a TrainConfig)")


@pytest.mark.exercise("6.4")
def test_make_optimizer_refusal_lists_the_four_and_changes_nothing(memory):
    """An unknown optimizer name: ValueError listing the four allowed names; the parameter is untouched."""
    p = nn.Parameter(torch.ones(4))
    error = refuses(memory.make_optimizer, "adam8bit", [p], lr=0.1)
    missing = [n for n in ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit") if n not in str(error)]
    assert not missing, f"the error must list the four optimizers, it lacks {missing}: {error}"
    assert torch.equal(p, torch.ones(4)) and p.requires_grad and p.grad is None, "a refusal changes nothing"


@pytest.mark.exercise("6.4")
def test_make_optimizer_keeps_dict_groups(memory):
    """Dict groups keep their own lr / weight_decay; the keyword arguments are the defaults."""
    groups = [{"params": [nn.Parameter(torch.ones(20, 20))], "lr": 0.5},
              {"params": [nn.Parameter(torch.ones(3))], "weight_decay": 0.0}]  # fmt: skip
    opt = memory.make_optimizer("paged_adamw8bit", groups, min_8bit_size=0, lr=0.1, weight_decay=0.3)
    got = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert got == [(0.5, 0.3), (0.1, 0.0)], (
        f"(lr, weight_decay) per group: expected [(0.5, 0.3), (0.1, 0.0)], got {got}"
    )


@pytest.mark.exercise("6.4")
def test_memory_trainer_keeps_stage_4_groups(memory, qlora_trainer, tiny_model, task_data, tmp_path):
    """LoRA+ and decay: the rebuilt optimizer has Stage 4's groups (params, base lr, decay) and the schedule starts at 0."""
    t = memory_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path, optimizer="paged_adamw8bit",
                       loraplus_lr_ratio=8.0, min_8bit_size=0)  # fmt: skip
    stage4 = qlora_trainer.build_optimizer(t.model, t.config)
    assert isinstance(t.optimizer, memory.PagedOptimizer), "optimizer='paged_adamw8bit' must give a PagedOptimizer"
    ours = [([id(p) for p in g["params"]], g["initial_lr"], g["weight_decay"]) for g in t.optimizer.param_groups]
    theirs = [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in stage4.param_groups]
    assert ours == theirs, "the groups must be Stage 4's: same parameters, base lr (LoRA+ for B) and weight decay"
    assert all(g["lr"] == 0.0 for g in t.optimizer.param_groups), (
        "warmup starts at lr 0 (a LambdaLR over the new optimizer)"
    )
    assert t.scheduler.optimizer is t.optimizer, "the scheduler must drive the new optimizer"


@pytest.mark.exercise("6.4")
@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_resume_with_8bit_states_is_bit_identical(memory, qlora_trainer, tiny_model, task_data, tmp_path, optimizer):
    """Saving after 2 of 4 steps and resuming: 8-bit states (uint8 codes, absmax) restored, adapters bit-identical."""
    settings = {"optimizer": optimizer, "min_8bit_size": 0, "max_steps": 4}
    straight = memory_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path / "a", **settings)
    straight.train()
    first = memory_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path / "b", **settings)
    first.train(steps=2)
    path = first.save_checkpoint(tmp_path / "ckpt.pt")
    torch.manual_seed(4321)
    resumed = memory_trainer(memory, qlora_trainer, tiny_model, task_data, tmp_path / "c", **settings)
    resumed.load_checkpoint(path)
    dtypes = {s["state1"].dtype for s in resumed.optimizer.state.values()}
    assert dtypes == {torch.uint8}, f"the loaded states must keep uint8 codes, got {dtypes}"
    resumed.train()
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), (
            f"{name} differs between the uninterrupted and the resumed {optimizer} run"
        )


# ---- Exercise 6.5: memory accounting ---------------------------------------------------------------------

CONFIGS = [(*cell, "fp32") for cell in itertools.product(["full", "lora", "qlora"], ["fp32", "bf16"], [False, True],
                                                         ["adamw", "adamw8bit"])]  # fmt: skip
CONFIGS += [("lora", "bf16", checkpointing, "adamw", "bf16") for checkpointing in (False, True)]  # the base in bf16


@pytest.mark.exercise("6.5")
def test_measure_memory_counts_only_what_backward_keeps(memory, qlora_trainer, task_data):
    """A graph thrown away during the forward frees what it saved: count the storages alive after the forward."""
    model, config = measure_setup(memory, qlora_trainer, "lora", "fp32", False, "adamw")

    def throw_away(module, args, output):
        torch.sin(output[..., :7] * 2.0).sum()  # sin saves its input, a new (B, T, 7) tensor, for a graph nobody keeps

    for layer in model.layers:
        layer.self_attn.q_proj.register_forward_hook(throw_away)
    batch = (task_data["input_ids"][:4], task_data["labels"][:4])
    measured = memory.measure_memory(model, batch, config)["activations"]
    expected = saved_activation_bytes(memory, model, batch, config)
    assert measured == expected, (
        f"measure_memory counted {measured:,} bytes of activations, but {expected:,} are alive when backward "
        "starts. A forward hook here computes sin of 7 output features and drops the result: autograd saved its input "
        "(your pack hook saw it), then freed it with its graph, and the allocator may give its address to the next "
        "tensor. Keep a weak reference in the pack hook and count after the forward (the given live_bytes)."
    )


@pytest.mark.exercise("6.5")
@pytest.mark.parametrize("method, precision, checkpointing, optimizer, base_dtype", CONFIGS)
def test_measure_equals_estimate(memory, qlora_trainer, task_data, method, precision, checkpointing, optimizer,
                                 base_dtype):  # fmt: skip
    """The bundled model, batch 3 × 19, r 8, min_8bit_size 0: measurement = estimate, part by part, to the byte
    (also for LoRA with its frozen base stored in bf16: base_dtype reaches weight_bytes)."""
    model, config = measure_setup(memory, qlora_trainer, method, precision, checkpointing, optimizer, base_dtype)
    batch = (task_data["input_ids"][5:8], task_data["labels"][5:8])  # a slice of a bigger storage
    measured = memory.measure_memory(model, batch, config)
    estimated = memory.estimate_memory_parts(model.config, method, optimizer, 3, 19, precision, checkpointing, 8, 0,
                                             base_dtype=base_dtype)  # fmt: skip
    # activations: what this model's forward saves (your Stage 1 forward may save other tensors than the
    # reference's, which the given formula describes: stage6/basic.py saved_activation_bytes)
    estimated["activations"] = saved_activation_bytes(memory, model, batch, config)
    estimated["total"] = sum(v for k, v in estimated.items() if k != "total")
    check_parts(measured, estimated, f"{method}, {precision}, checkpointing={checkpointing}, {optimizer}, base {base_dtype}",
                "the check: activations: distinct storages the pack hook sees (not the model's own parameters and buffers; "
                "the batch copied first), plus with checkpointing the largest one block saves when recomputed; "
                "optimizer: min_8bit_size from the config, in the measurement and in the estimate")  # fmt: skip


@pytest.mark.exercise("6.5")
def test_measure_memory_leaves_the_model_alone(memory, qlora_trainer, task_data):
    """measure_memory works on a copy: the caller's parameters and gradients are as they were."""
    model, config = measure_setup(memory, qlora_trainer, "lora", "fp32", True, "adamw8bit")
    before = snapshot(model)
    memory.measure_memory(model, (task_data["input_ids"][:2], task_data["labels"][:2]), config)
    assert_unchanged(model, before, "measure_memory")
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert not grads, f"measure_memory must deep-copy the model: the caller's {grads[:2]} got gradients"
    assert model.gradient_checkpointing is True, "the caller's checkpointing flag must stay as it was"


@pytest.mark.exercise("6.5")
def test_optimizer_state_bytes_of_a_model_and_a_bad_name(memory, qlora_trainer):
    """A model counts its trainable parameters only; the lesson's example: 315,616 and 80,128 bytes; bad names refused."""
    model, _ = measure_setup(memory, qlora_trainer, "lora", "fp32", False, "adamw")
    assert memory.optimizer_state_bytes(model, "adamw") == 315_616, "bundled model, LoRA r 8, adamw: 315,616 bytes"
    got = memory.optimizer_state_bytes(model, "adamw8bit", min_8bit_size=0)
    assert got == 80_128, f"bundled model, LoRA r 8, adamw8bit with min_8bit_size 0: expected 80,128 bytes, got {got:,}"
    refuses(memory.optimizer_state_bytes, [10], "adam", match=word("optimizer"))
