"""How close is close enough: tolerances derived from the computation, and a comparison that teaches.

The rule. A correct implementation may add, multiply and reduce in any order, on any CPU, with
any number of threads; only rounding may differ. Each check therefore compares the student's
result with the EXACT value of the formula (evaluated in float64, whose rounding, 2^-53, is
negligible here) and allows, per element, the classic worst-case rounding bound

    |computed - exact| <= steps · u(dtype) · magnitude

where u(dtype) is the unit roundoff of the dtype the computation runs in (half its machine
epsilon: fp32 2^-24, bf16 2^-8, fp16 2^-11, fp64 2^-53), ``magnitude`` is the same formula
evaluated on the absolute values of its inputs (Σ|terms|: what can cancel, can carry rounding),
and ``steps`` is the length of the longest chain of roundings in the formula: a dot product of
length k contributes k (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1: the
error of any summation order is at most γ_k = k·u / (1 − k·u) times Σ|terms|), each elementwise
operation or cast 1, and rounding the inputs to a lower precision 1 per factor. Every test that
uses ``reference`` states its steps in a comment.

This bound is a worst case, so it never fails a correct implementation, yet it is tiny next to
the mistakes the tests exist to catch: a wrong scaling or orientation changes results by tens of
percent, a forgotten term by the term's whole size.

Whole networks (merged vs unmerged models, saved vs loaded adapters) are compared in float64:
both evaluations round at 2^-53 ≈ 1.1e-16 per operation, a logit of the tiny test model is the
end of fewer than 10^4 roundings, and ``NETWORK_RTOL`` = 1e-9 of the logits' scale sits five
orders of magnitude above that and six below the smallest planted mistake (≥ 1e-3).

Where a network must run in float32 (a 4-bit base computes in float32), the test measures, on the
same input, how far a float32 evaluation of the reference network lies from its float64
evaluation, and allows ``FP32_NETWORK_FACTOR`` = 64 times that, plus 64 units of roundoff of the
logits' scale (``fp32_network_bound``): two evaluations of one network in different operation
orders differ by a small multiple of either one's own rounding error.

Bit-exact checks (``torch.equal``) are kept where the contract is exact: integer codes, the
published NF4 table, a frozen weight that must not change, values copied unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
NETWORK_RTOL = 1e-9  # float64 network-level comparisons, relative to max |logit| (see above)


@dataclass
class Reference:
    value: torch.Tensor  # the exact result, float64
    bound: torch.Tensor  # allowed |computed - exact| per element, float64


def reference(
    formula: Callable[..., torch.Tensor],
    *tensors: torch.Tensor,
    dtype: torch.dtype,
    steps: int,
    magnitude: Callable[..., torch.Tensor] | None = None,
) -> Reference:
    """The exact value of ``formula(*tensors)`` and its rounding bound for a computation in ``dtype``.

    ``formula`` must be built from sums, products and matrix products, so that evaluating it on
    |inputs| gives Σ|terms|; a formula with a subtraction passes ``magnitude``, the same formula
    with every − written as + (what cancels still carried rounding). A small floor (``steps``
    smallest normal numbers) keeps an exact zero comparable.
    """
    __tracebackhide__ = True
    exact = [t.detach().double().cpu() for t in tensors]
    try:
        value = formula(*exact)
        magnitude = (magnitude or formula)(*(t.abs() for t in exact))
    except RuntimeError as error:  # a wrong shape gets a sentence, not an error from the test's own line
        shapes = ", ".join(str(tuple(t.shape)) for t in exact)
        raise AssertionError(
            f"the expected value cannot even be computed: the tensors this check reads have shapes {shapes}, which "
            f"do not fit its formula ({str(error).splitlines()[0]}). Check the shapes and orientation (A is "
            "(r, in_features), B is (out_features, r), weights are (out_features, in_features))"
        ) from None
    bound = steps * UNIT_ROUNDOFF[dtype] * magnitude + steps * torch.finfo(dtype).tiny
    return Reference(value, bound)


def shape_of(tensor: object) -> str:
    return tuple(tensor.shape).__repr__() if isinstance(tensor, torch.Tensor) else type(tensor).__name__


def expect_tensor(
    actual: object, shape: tuple[int, ...], what: str, hint: str = "", dtype: torch.dtype | None = None
) -> None:
    """Type, shape, then dtype: checked before any value is computed from ``actual``."""
    __tracebackhide__ = True
    hint = f"\nHint: {hint}" if hint else ""
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor of shape {shape}, got {type(actual).__name__}{hint}")
    if tuple(actual.shape) != tuple(shape):
        raise AssertionError(f"{what}: expected shape {tuple(shape)}, got {tuple(actual.shape)}{hint}")
    if dtype is not None and actual.dtype != dtype:
        raise AssertionError(f"{what}: expected dtype {dtype}, got {actual.dtype}{hint}")


def assert_close(
    actual: object,
    expected: torch.Tensor,
    what: str,
    *,
    bound: torch.Tensor | float,
    hint: str = "",
    cause: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """Shape (and ``dtype`` if given), then every |actual − expected| ≤ bound.

    On a mismatch the message names ``what``, how many elements differ, the worst one (index,
    expected, got, allowed), then ``cause`` ("Likely cause": only what the output itself shows,
    see helpers.diagnose) or else ``hint`` (the rule the check holds the code to), and nothing else.
    """
    __tracebackhide__ = True
    expect_tensor(actual, tuple(expected.shape), what, hint, dtype)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    allowed = torch.as_tensor(bound, dtype=torch.float64).expand_as(e)
    error = (a - e).abs()
    bad = ~(error <= allowed)  # NaN counts as bad
    if bad.any():
        excess = torch.where(
            bad, torch.nan_to_num(error - allowed, nan=float("inf")), torch.tensor(-1.0, dtype=torch.float64)
        )
        worst = int(excess.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        hint = f"\nLikely cause: {cause}" if cause else f"\nHint: {hint}" if hint else ""
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} values are wrong; worst at index {index}: "
            f"expected {e.flatten()[worst].item():.6g}, got {a.flatten()[worst].item():.6g} "
            f"(allowed difference {allowed.flatten()[worst].item():.2g}){hint}"
        )


def assert_network_close(actual: object, expected: torch.Tensor, what: str, hint: str = "") -> None:
    """Two float64 evaluations of the same network agree within NETWORK_RTOL of the output's scale."""
    __tracebackhide__ = True
    scale = expected.detach().abs().max().item() + 1.0
    assert_close(actual, expected, what, bound=NETWORK_RTOL * scale, hint=hint)


FP32_NETWORK_FACTOR = 64


def fp32_network_bound(reference32: torch.Tensor, reference64: torch.Tensor) -> float:
    """Allowed |student − exact| for a float32 network: 64 × the reference's own float32 error here."""
    noise = (reference32.detach().double().cpu() - reference64.detach().double().cpu()).abs().max().item()
    scale = reference64.detach().abs().max().item()
    return FP32_NETWORK_FACTOR * (noise + UNIT_ROUNDOFF[torch.float32] * scale)


# ---- Stored values: the rule each comparison with a fixture follows -------------------------------
#
# A fixture (testcases/fixtures/*.safetensors) holds numbers that bitsandbytes or PEFT computed on ONE
# machine. They say WHAT is computed; they are not the bits another machine must reproduce: float32 and
# float64 results differ between CPUs in the last bits (summation order, fused multiply-adds, torch's
# DEFAULT vs AVX2 vs AVX512 code paths, LAPACK's blocking), and bitsandbytes' own AdamW8bit step differs
# between an AMD and an Intel AVX512 CPU. So every key of every fixture names, below, the rule its
# comparisons follow:
#
#   input    an input the test feeds in; the same on every machine (a record with other inputs is not the
#            same computation);
#   start    a state one machine reached (bitsandbytes after 99 steps) that a test starts from; another
#            machine reaches its own; not compared;
#   exact    integers, published constants, or ONE correctly rounded IEEE 754 operation per element of
#            stored inputs (absmax = max |x|, code[q] · absmax): every conforming evaluation gives these bits;
#   network  float64 evaluations of one formula on the same inputs: |Δ| ≤ NETWORK_RTOL · (max |value| + 1);
#   derived  a bound the test derives from the computation (the named checker states it);
#   oracle   not compared with the stored bits: the test computes the exact result in the test process from
#            the same inputs, and the stored value must pass the same check (the named checker);
#   unused   recorded, compared by no test.
#
# ``fixture(name)`` loads a file and refuses a key without a rule. testcases/support_test.py checks that
# every key has exactly one rule and applies each rule to the same computations recorded on other CPUs
# (testcases/fixtures/cpu-records/): a rule that holds on every CPU accepts them all.

INPUT, START, EXACT, NETWORK = "input", "start", "exact", "network"
DERIVED, ORACLE, UNUSED = "derived", "oracle", "unused"


@dataclass(frozen=True)
class FixtureRule:
    pattern: str  # fnmatch pattern over the file's keys
    rule: str  # one of the seven above
    why: str  # why it holds on every CPU
    checker: str = ""  # derived / oracle: "module:function(key, fixture, other)", raises AssertionError


S3, S5, S6 = "testcases.stage3.basic:", "testcases.stage5.basic:", "testcases.stage6.basic:"
R = FixtureRule
FIXTURE_RULES: dict[str, tuple[FixtureRule, ...]] = {
    "nf4_golden.safetensors": (
        R("*.input", INPUT, "bitsandbytes' inputs, stored"),
        R("codebook.nf4", EXACT, "bitsandbytes' published table; every conforming evaluation of Exercise 3.3's recipe "
          "rounds to it (support test: test_nf4_table_is_robust)"),
        R("codebook.*", UNUSED, "the other code books bitsandbytes defines, for the record"),
        R("dq_*.absmax_fp32", INPUT, "the NF4 absmax that double quantization starts from"),
        R("*.absmax", EXACT, "max |x| per block: no rounding at all"),
        R("*.packed", EXACT, "codes: x · fl(1/absmax), two correctly rounded operations, then comparisons with float32 "
          "midpoints (a tie to the lower code)"),
        R("*.codes", EXACT, "the same codes, unpacked"),
        R("*.q", UNUSED, "8-bit blockwise codes of bitsandbytes' CPU lookup table (Stage 6 computes its own)"),
        R("*.dequant", EXACT, "code[q] · absmax: one correctly rounded product (then one cast)"),
        R("*.dequant_bnb_cpu_avx512", UNUSED, "what bitsandbytes' AVX-512 kernel returns (a bnb bug), kept to document it"),
        R("dq_*.offset", DERIVED, "a mean of n values: any summation order is within (n + 1)·u·mean|absmax| of the "
          "exact mean", S3 + "check_offset_record"),
        R("dq_*.absmax2", DERIVED, "max |absmax − offset| per block: moves with the offset, plus a rounding",
          S3 + "check_scale_record"),
        R("dq_*.qabsmax", DERIVED, "8-bit codes of bitsandbytes' lookup table: at least 99 % equal (the table misses "
          "the nearest level for 1 value in 300–500)", S3 + "check_qabsmax_record"),
        R("dq_*.absmax_dequant", DERIVED, "code[q] · scale + offset: two roundings of terms ≤ |value| + 2·|offset|",
          S3 + "check_absmax_dequant_record"),
        R("dq_*.code8", UNUSED, "bitsandbytes' 8-bit code for the absmax, for the record"),
    ),
    "peft_variants_golden.safetensors": (
        R("weight", INPUT, "the nn.Linear(12 → 10) every case wraps"),
        R("bias", INPUT, "its bias"),
        R("x", INPUT, "the input batch (6, 12)"),
        R("vera.A", DERIVED, "PEFT's uniform draw for key 0: the same generator's draws, scaled by a bound whose "
          "rounding may differ by 4 ulps on another CPU path", S5 + "check_draw_record"),
        R("vera.B", DERIVED, "as vera.A", S5 + "check_draw_record"),
        R("vera.key3.*", DERIVED, "as vera.A, key 3", S5 + "check_draw_record"),
        R("vera.lambda_*", INPUT, "VeRA's scaling vectors, set into the layer"),
        R("vera.out", DERIVED, "float64 output (network rule) plus the draws' own difference carried through "
          "λ_b ⊙ B(λ_d ⊙ A x) (vera_draw_bound)", S5 + "check_vera_out_record"),
        R("pissa.[AB]", UNUSED, "the factors of an fp32 SVD: not unique (signs, rounding); compared through their "
          "product (pissa.product)"),
        R("olora.[AB]", UNUSED, "the factors of an fp32 QR: compared through their product (olora.product)"),
        R("*.[ABE]", INPUT, "adapter weights set into the layer"),
        R("dora.magnitude", INPUT, "DoRA's trained magnitude, set into the layer"),
        R("*.out", NETWORK, "float64 outputs of one formula on stored inputs"),
        R("dora.magnitude_init", NETWORK, "‖W0‖ per row, float64"),
        R("dora.merged_weight", NETWORK, "W0 + s·B A, scaled by m / ‖·‖, float64"),
        R("pissa.*", DERIVED, "an fp32 SVD is backward stable: the product is within the SVD's backward error times "
          "the spectral gap of the exact top-r part (pissa_product_bound); the residual adds a subtraction",
          S5 + "check_pissa_record"),
        R("olora.*", DERIVED, "an fp32 Householder QR is backward stable: bounded through σ_min of the first r "
          "columns (olora_product_bound); the residual adds a subtraction", S5 + "check_olora_record"),
        R("adalora.budget", EXACT, "integers: PEFT's rank budget per step"),
        R("adalora.mask_ind", EXACT, "booleans: whether PEFT masks at each step"),
    ),
    "adamw8bit_golden.safetensors": (
        R("code.*", EXACT, "bitsandbytes' float32 code books (its state's qmap1, qmap2): constants"),
        R("*_1", ORACLE, "bitsandbytes' step 1 from the initial parameter: the exact step within the rounding bound of "
          "testcases/stage6/oracle.py, each code the exact moment's (or a neighbour where the moment lies within the "
          "bound of a bin boundary)", S6 + "check_bnb_steps_record"),
        R("*_99", START, "bitsandbytes' parameter and states after step 99 on the recording machine: step 100 starts "
          "from them"),
        R("*_100", ORACLE, "bitsandbytes' step 100 from its own step-99 state: the exact step within the bound",
          S6 + "check_bnb_steps_record"),
        R("*.param_10", UNUSED, "the trajectory at step 10 (no test: two conforming trajectories may part ways)"),
    ),
}  # fmt: skip


def rule_for(file: str, key: str) -> FixtureRule:
    """The rule ``key`` of fixture ``file`` follows: the FIRST pattern it matches (a KeyError names a key without)."""
    from fnmatch import fnmatchcase

    for entry in FIXTURE_RULES.get(file, ()):
        if fnmatchcase(key, entry.pattern):
            return entry
    raise KeyError(
        f"{file}: the key {key!r} names no rule in testcases/tolerances.py FIXTURE_RULES; a stored value is "
        "compared only under a rule that holds on every CPU"
    )


class Fixture(Mapping):
    """A fixture file's tensors, each read under its rule (a fresh copy per read)."""

    def __init__(self, file: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.file, self._tensors, self.metadata = file, tensors, metadata

    def __getitem__(self, key: str) -> torch.Tensor:
        rule_for(self.file, key)
        return self._tensors[key].clone()

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.cache
def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def fixture(file: str, folder: Path = FIXTURES) -> Fixture:
    """``testcases/fixtures/<file>`` (or ``folder/<file>``), each key under the rule FIXTURE_RULES names."""
    tensors, metadata = _read(folder / file)
    return Fixture(file, tensors, metadata)
