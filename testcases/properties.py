"""Property-based checks (Hypothesis): the input space covered systematically, the same examples on every machine.

A property test states what must hold for EVERY input of a kind and lets Hypothesis draw the inputs:
shapes (no leading dimension, dimensions of size 1, sizes that do not divide a block), dtypes (float32,
float64, bfloat16, float16), magnitudes (about 1, 2^-20, 2^-100, float32 subnormals, up to 2^127 — half of
float32's largest value —, and all of them mixed in one tensor) and memory layouts (contiguous, transposed,
every other element of a wider tensor, one element into its storage). Each example is checked against an
oracle computed in the test process (float64, or the exact IEEE operations the contract names), never
against stored values.

The grade does not depend on the machine, the clock or the seed: the profile ``course`` is derandomized (the
examples follow from each check's name), keeps no example database, has no deadline, suppresses the
health checks (some measure time) and draws a modest number of examples. ``--seed N`` with N ≠ 0 (``make
stress``) switches to the ``course-stress`` profile seeded with N, so other examples are explored; grading
(``--seed 0``) always sees the same ones.

When a check fails, Hypothesis shrinks the input to a smallest failing one and replays it; the message the
student reads ends with that input, in words (``for_all``).
"""

from __future__ import annotations

import functools
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import providers as _providers

from testcases import helpers

# Hypothesis 6.170 also draws, about one time in twenty, constants it finds in the source of every "local" module
# loaded (a student's files included) and caches them under .hypothesis/constants: the examples would then depend on
# the submission and on what else was imported. This switches that off: the examples follow from the checks alone.
# (An internal hook: requirements.txt pins hypothesis, and a release that renames it fails here, loudly.)
if not hasattr(_providers, "_get_local_constants"):
    raise RuntimeError("hypothesis changed: testcases/properties.py can no longer switch off its local constants")
_providers._get_local_constants = lambda: _providers.Constants()

PROFILE = "course"
EXAMPLES = 12  # per property (and per parameter): the suites also run inside the mutant runner, hundreds of times
settings.register_profile(
    PROFILE,
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=EXAMPLES,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    report_multiple_bugs=False,
    print_blob=False,
)
settings.register_profile(f"{PROFILE}-stress", parent=settings.get_profile(PROFILE), derandomize=False)


def for_all(strategy: st.SearchStrategy, check, salt: str = "", max_examples: int = EXAMPLES) -> None:
    """Run ``check(case)`` on examples drawn from ``strategy``; on a failure, name the smallest failing case.

    The examples follow from check's qualified name and ``salt`` (a parametrized test passes its parameter,
    so each case draws its own examples, as Hypothesis's pytest plugin does for parametrized tests). A stub's
    NotImplementedError and an import error pass through unchanged (the grader reports them as such); any
    other error becomes an AssertionError whose message ends with the case that caused it.
    """
    __tracebackhide__ = True

    @functools.wraps(check)
    def run(case):
        __tracebackhide__ = True
        try:
            check(case)
        except (NotImplementedError, ImportError):
            raise
        except AssertionError as failure:  # the same error, its traceback kept: the grader points at the check
            failure.args = (f"{failure}\n  The smallest failing input Hypothesis found: {case}",)
            raise
        except Exception as error:
            from _pytest._code import ExceptionInfo

            from testcases.plugin import student_frame

            first = (str(error).strip().splitlines() or [""])[0][:300]
            where = student_frame(ExceptionInfo.from_exception(error))
            on = "".join(f"\n  on {note}" for note in getattr(error, "__notes__", ()))  # what the check added
            message = f"{type(error).__name__}: {first}{where}{on}\n  raised on the smallest failing input Hypothesis found: {case}"
            raise AssertionError(message).with_traceback(_up_to_the_check(error.__traceback__)) from None

    del run.__wrapped__  # Hypothesis calls run(case=...) whatever check's own parameter is called
    key = f"{check.__qualname__}:{salt}"
    run._hypothesis_internal_add_digest = key.encode()  # what Hypothesis's pytest plugin sets for parametrized tests
    stress = helpers.SEED_OFFSET != 0
    test = given(strategy)(run)
    test = settings(settings.get_profile(f"{PROFILE}-stress" if stress else PROFILE), max_examples=max_examples)(test)
    if stress:
        test = hypothesis.seed(helpers.SEED_OFFSET * 1_000_003 + zlib.crc32(key.encode()))(test)
    test()


TESTS = Path(__file__).resolve().parent


def _up_to_the_check(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback cut after its last frame in a stage's test module (the grader names that line as the check)."""
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    checks = [i for i, f in enumerate(frames) if Path(f.tb_frame.f_code.co_filename).resolve().parent.parent == TESTS]
    cut = None
    for f in reversed(frames[: checks[-1] + 1] if checks else []):
        cut = types.TracebackType(cut, f.tb_frame, f.tb_lasti, f.tb_lineno)
    return cut


# ---- dtypes, magnitudes, layouts -----------------------------------------------------------------------

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # Hypothesis shrinks toward the first
HALF = (torch.bfloat16, torch.float16)


def short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The absolute rounding step at zero: 2^-149 for float32 (and float64 read as float32), 2^-133 bf16, 2^-24 fp16."""
    return {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}.get(dtype, 2.0**-149)


# The scale of the values, as a power of two, per magnitude; float16 has its own (its range is 2^-24 … 65504).
MAGNITUDES = ("1", "small", "tiny", "subnormal", "huge", "mixed")
_EXPONENT = {"1": 0, "small": -20, "tiny": -100, "subnormal": -140, "huge": 127}  # huge: many at ±2^127 exactly
_EXPONENT_FP16 = {"1": 0, "small": -8, "tiny": -14, "subnormal": -20, "huge": 15}
_WORDS = {"1": "of order 1", "small": "small", "tiny": "tiny", "subnormal": "subnormal", "huge": "huge"}


def limit(dtype: torch.dtype) -> float:
    """The largest magnitude a test feeds in: half the dtype's largest finite value (2^127, or 2^15 for float16)."""
    return 2.0**15 if dtype == torch.float16 else 2.0**127


def exponents(dtype: torch.dtype, top: int | None = None) -> dict[str, int]:
    table = _EXPONENT_FP16 if dtype == torch.float16 else _EXPONENT
    return table if top is None else {**table, "huge": top}


def random_values(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    magnitude: str,
    seed: int,
    zeros: bool,
    positive: bool = False,
    top: int | None = None,
) -> torch.Tensor:
    """Values of ``shape`` exactly representable in ``dtype`` (float64): N(0, 1) × 2^e, clamped to ±limit(dtype).

    "mixed" gives every element its own exponent across the dtype's range; ``zeros`` sets about a quarter of
    the elements to exactly 0; ``positive`` takes |value| (plus a floor, so nothing is 0); ``top`` lowers the
    exponent of "huge" (and the top of "mixed")."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen, dtype=torch.float64)
    table = exponents(dtype, top)
    if magnitude == "mixed":
        e = torch.randint(table["subnormal"], table["huge"] + 1, shape, generator=gen).double()
    else:
        e = torch.full(shape, float(table[magnitude]), dtype=torch.float64)
    values = values * torch.pow(2.0, e)
    if positive:
        values = values.abs() + torch.pow(2.0, e) / 16
    if zeros:
        values = torch.where(torch.rand(shape, generator=gen) < 0.25, torch.zeros_like(values), values)
    values = values.clamp(-limit(dtype), limit(dtype))
    return values.to(dtype).double()


LAYOUTS = ("contiguous", "transposed", "strided", "offset")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a fresh tensor or a view of one; never ``t`` itself).

    transposed: its dimensions stored in reverse order (column-major; a 1-D tensor is strided instead);
    strided: every other element of a tensor twice as wide; offset: starting one element into its storage
    (for packed bytes: misaligned for a 16-bit view)."""
    if t.dim() == 0 or layout == "contiguous":
        return t.clone()
    if layout == "transposed" and t.dim() >= 2:
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout in ("transposed", "strided"):
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    flat = t.new_zeros(t.numel() + 1)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


def describe_layout(t: torch.Tensor, layout: str) -> str:
    if layout == "contiguous" or t.dim() == 0:
        return "contiguous"
    if layout == "offset":
        return "contiguous from one element into its storage (storage_offset 1)"
    kind = "transposed" if layout == "transposed" and t.dim() >= 2 else "every other element of a wider tensor"
    return f"{kind} (strides {t.stride()})"


@dataclass(frozen=True)
class TensorCase:
    """A tensor to feed in, drawn by ``tensor_cases``; ``make()`` builds it, ``str()`` says what it is."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    magnitude: str
    layout: str
    zeros: bool
    seed: int
    positive: bool = False
    top: int | None = None

    def values(self) -> torch.Tensor:
        """The tensor's values in float64 (exactly its dtype's values)."""
        return random_values(self.shape, self.dtype, self.magnitude, self.seed, self.zeros, self.positive, self.top)

    def make(self) -> torch.Tensor:
        return in_layout(self.values().to(self.dtype), self.layout)

    def __str__(self) -> str:
        table = exponents(self.dtype, self.top)
        if self.magnitude == "mixed":
            size = f"each of its own magnitude 2^{table['subnormal']} … 2^{table['huge']}"
        else:
            e = table[self.magnitude]
            size = f"{_WORDS[self.magnitude]}: N(0, 1) × 2^{e} ≈ {2.0**e:.3g}"
        extra = ", a quarter of them exactly 0" if self.zeros else ""
        sign = "|values|, " if self.positive else ""
        t = self.make()
        return (f"a {short(self.dtype)} tensor of shape {self.shape}, {sign}values {size}{extra} (seed {self.seed}), "
                f"{describe_layout(t, self.layout)}")  # fmt: skip


def shapes(max_dims: int = 3, max_side: int = 9, allow_scalar: bool = False) -> st.SearchStrategy:
    """Tuples of 0 (if allowed) or 1 … max_dims sides from 1 to max_side (Hypothesis shrinks toward (1,))."""
    lists = st.lists(st.integers(1, max_side), min_size=0 if allow_scalar else 1, max_size=max_dims)
    return lists.map(tuple)


def tensor_cases(
    shape: st.SearchStrategy | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOATS,
    magnitudes: tuple[str, ...] = MAGNITUDES,
    layouts: tuple[str, ...] = LAYOUTS,
    positive: bool = False,
    top: int | None = None,
) -> st.SearchStrategy:
    return st.builds(
        TensorCase,
        shape=shape if shape is not None else shapes(),
        dtype=st.sampled_from(dtypes),
        magnitude=st.sampled_from(magnitudes),
        layout=st.sampled_from(layouts),
        zeros=st.booleans(),
        seed=st.integers(0, 2**16),
        positive=st.just(positive),
        top=st.just(top),
    )


@dataclass(frozen=True)
class Case:
    """A drawn combination of named settings, printed as ``name=value, ...`` (tensors by their description)."""

    settings: tuple[tuple[str, object], ...]

    def __getattr__(self, name: str):
        for key, value in self.settings:
            if key == name:
                return value
        raise AttributeError(name)

    def __str__(self) -> str:
        def show(value):
            if isinstance(value, torch.dtype):
                return short(value)
            return str(value) if isinstance(value, TensorCase) else repr(value)

        return "; ".join(f"{key}={show(value)}" for key, value in self.settings)


def cases(**strategies: st.SearchStrategy) -> st.SearchStrategy:
    """A ``Case`` with one drawn value per keyword, in the order given (each shrinks on its own)."""
    names = list(strategies)
    return st.tuples(*strategies.values()).map(lambda values: Case(tuple(zip(names, values))))


def per_element(values: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    """One value per block -> one per element of the flattened tensor (numel,), float64."""
    return values.detach().double().reshape(-1).repeat_interleave(block_size)[:numel]


def blocks_of(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """(numel,) -> (ceil(numel / block_size), block_size), zero-padded (the tests' own blocking)."""
    pad = -flat.numel() % block_size
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def first_bad(bad: torch.Tensor) -> int:
    """The flat index of the first True element."""
    return int(bad.reshape(-1).nonzero()[0])
