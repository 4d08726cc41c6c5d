#!/usr/bin/env python3
"""Record golden vectors of ``bitsandbytes.optim.AdamW8bit`` 0.50.2 on CPU (Stage 6, exercises 6.1–6.2).

DEV-ONLY. The course's tests never import bitsandbytes: they read the file this script writes,
``testcases/fixtures/adamw8bit_golden.safetensors``. Only whoever regenerates it needs bitsandbytes:

    python3 -m venv /tmp/bnbenv
    /tmp/bnbenv/bin/pip install torch==2.13.0 bitsandbytes==0.50.2 safetensors tqdm
    /tmp/bnbenv/bin/python solutions/tools/make_adamw8bit_golden.py [out.safetensors]

Before writing, every stored tensor is compared with the reference (``solutions/training/memory.py``,
loaded through the course's import switch with ``LORA_IMPL=solutions``): it must be bit-identical, or
nothing is written.

Keys ``<case>.<field>_<step>`` (float32 / uint8), and JSON metadata (``meta``, ``cases``):

    <case>.param_1 / _10 / _99 / _100          the parameter after steps 1, 10, 99, 100
    <case>.state1_1 / state2_1 / absmax1_1 / absmax2_1          the states after step 1
    <case>.state1_99 / …                       the states after step 99: the input of a one-step test
    <case>.state1_100 / …                      … and after step 100: its expected output
    (fp32 m and v as state1 / state2 and no absmax for the case under min_8bit_size)
    code.signed / code.unsigned                bitsandbytes' two float32 codes (its state's qmap1, qmap2)

What the tests do with it (testcases/tolerances.py FIXTURE_RULES): they do not demand these bits. The
same script on an Intel Sapphire Rapids (testcases/fixtures/cpu-records/) records other last bits for
every parameter tensor, although bitsandbytes and torch are the same versions: the tests hold every step
to the exact value of bitsandbytes' formula within a proven rounding bound (testcases/stage6/oracle.py),
and testcases/support_test.py checks that bitsandbytes' recorded steps, from every machine, pass it.

The inputs are NOT stored: ``initial_param`` and ``gradient`` (testcases/stage6/golden_inputs.py) rebuild them from seeds with
``torch.rand`` / ``torch.randint`` and exact float32 arithmetic only, so they are bit-identical on every
CPU capability (``torch.randn`` is not: its scalar DEFAULT path differs from AVX2/AVX512). The tests copy
these two functions; the SHA-256 of the inputs is in the metadata, so a test tells "inputs differ" from
"optimizer differs".

What the file shows about bitsandbytes' CPU AdamW8bit (``backends/cpu/ops.py``: dequantize in torch,
update in torch ops, re-quantize with the C++ ``cquantize_blockwise_cpu_fp32``):

* the signed code (m) is ``create_dynamic_map(signed=True)`` = Stage 3's ``dynamic_code_book``, bit for bit;
  the unsigned code (v) is ``create_dynamic_map(signed=False)``, 2^(e+1) fractions per exponent, no negatives;
* codes come from a 65,536-entry lookup table, index ``trunc(fmaf((s + 1) · 0.5, 65535, 0.5))``; torch's
  separate multiply and add give the same bin for every float32 within 8 ulps of a bin boundary (checked),
  and the exact-nearest-level quantizer of Stage 3 flips about 3 % of the codes;
* an all-zero block is stored as code 0 (not the code of 0.0) with absmax 0;
* tensors under 4096 elements keep fp32 m and v and use the 32-bit formula, ε·√(1 − β2^t) in the denominator;
* the op order matters: ``m.mul_(β1).add_(g, alpha=1 − β1)``; the textbook order flips a few codes by step 100.

The torch ops use FMA on AVX2/AVX512 and not on the scalar DEFAULT path, so the file is written on an AVX2
or AVX512 host; a test on another capability should check the 100-step trajectory with a tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from testcases.stage6.golden_inputs import gradient, initial_param, sha256  # noqa: E402  (one definition, shared with the tests)

OUT = REPO / "testcases" / "fixtures" / "adamw8bit_golden.safetensors"
BNB_VERSION = "0.50.2"
STEPS = 100
SNAPSHOTS = (1, 10, 99, 100)
STATE_SNAPSHOTS = (1, 99, 100)
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")

# name: shape, lr, weight_decay, seed, zero_prefix (leading gradient elements that are always 0)
CASES = {
    # 8-bit, 16 full blocks; block 0 never sees a gradient (all-zero block: code 0, absmax 0)
    "w64x64": dict(shape=(64, 64), lr=1e-3, weight_decay=0.01, seed=11, zero_prefix=300),
    # 8-bit, the last block holds 1 element; no weight decay
    "v4097": dict(shape=(4097,), lr=1e-2, weight_decay=0.0, seed=12, zero_prefix=0),
    # 100 < 4096 elements: fp32 states, bitsandbytes' 32-bit formula
    "b10x10": dict(shape=(10, 10), lr=1e-3, weight_decay=0.01, seed=13, zero_prefix=0),
}


# ---- the reference, through the course's switch ---------------------------------------------------------


def load_reference():
    """``training.memory`` with LORA_IMPL=solutions (by path while the manifest does not list it yet)."""
    os.environ["LORA_IMPL"] = "solutions"
    sys.path.insert(0, str(REPO))
    import training  # noqa: F401  (installs the switch)
    from model._impl import student_modules

    if "training.memory" in student_modules():
        import training.memory as memory

        return memory
    spec = importlib.util.spec_from_file_location("training.memory", REPO / "solutions" / "training" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    sys.modules["training.memory"] = memory
    spec.loader.exec_module(memory)
    return memory


# ---- recording ------------------------------------------------------------------------------------------


def trajectory(make_opt, spec: dict) -> dict[str, torch.Tensor]:
    """100 steps from the seeded inputs; the snapshot tensors under their field names."""
    p = torch.nn.Parameter(initial_param(spec["shape"], spec["seed"]))
    opt = make_opt([p], lr=spec["lr"], weight_decay=spec["weight_decay"])
    out = {}
    for t in range(1, STEPS + 1):
        p.grad = gradient(spec["shape"], spec["seed"], t, spec["zero_prefix"])
        opt.step()
        if t in SNAPSHOTS:
            out[f"param_{t}"] = p.detach().clone()
        if t in STATE_SNAPSHOTS:
            for key in STATE_KEYS:
                if key in opt.state[p]:
                    out[f"{key}_{t}"] = opt.state[p][key].detach().clone()
    return out


def canonicalize_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys so that a rerun writes a byte-identical file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    text = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def main() -> None:
    import bitsandbytes as bnb
    from safetensors.torch import save_file

    if bnb.__version__ != BNB_VERSION:
        raise SystemExit(f"regenerate with bitsandbytes=={BNB_VERSION}, found {bnb.__version__}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):  # torch's add(alpha=) and addcmul fuse (FMA) there, not on DEFAULT
        raise SystemExit(f"run on an AVX2/AVX512 host without ATEN_CPU_CAPABILITY, not {capability}")
    torch.set_flush_denormal(False)
    memory = load_reference()
    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT

    tensors, cases = {}, {}
    probe = torch.nn.Parameter(torch.zeros(4096))  # one 8-bit step, to read bitsandbytes' code books
    opt = bnb.optim.AdamW8bit([probe])
    probe.grad = torch.ones(4096)
    opt.step()
    tensors["code.signed"], tensors["code.unsigned"] = (
        opt.state[probe]["qmap1"].clone(),
        opt.state[probe]["qmap2"].clone(),
    )
    for name, spec in CASES.items():
        ref = trajectory(bnb.optim.AdamW8bit, spec)
        mine = trajectory(memory.AdamW8bit, spec)
        if set(ref) != set(mine):
            raise SystemExit(f"{name}: the reference stores {sorted(mine)}, bitsandbytes {sorted(ref)}")
        for field, t in ref.items():
            same = t.dtype == mine[field].dtype and torch.equal(
                t.view(-1).view(torch.uint8), mine[field].view(-1).view(torch.uint8)
            )
            if not same:
                raise SystemExit(f"{name}.{field}: the reference differs from bitsandbytes; nothing written")
            tensors[f"{name}.{field}"] = t.contiguous()
        grads = [gradient(spec["shape"], spec["seed"], t, spec["zero_prefix"]) for t in range(1, STEPS + 1)]
        cases[name] = {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()},
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "steps": STEPS,
            "eight_bit": "absmax1_1" in ref,
            "sha256_initial_param": sha256([initial_param(spec["shape"], spec["seed"])]),
            "sha256_gradients_1_to_100": sha256(grads),
        }

    meta = {
        "format": "adamw8bit_golden v1: keys '<case>.<field>_<step>', see 'cases'",
        "generator": "solutions/tools/make_adamw8bit_golden.py",
        "bitsandbytes_version": bnb.__version__,
        "torch_version": torch.__version__,
        "cpu_capability": capability,
        "optimizer": "bitsandbytes.optim.AdamW8bit(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay), "
        "block 256, min_8bit_size 4096",
        "inputs": "initial_param(shape, seed), gradient(shape, seed, step, zero_prefix) in the generator",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path), metadata={"meta": json.dumps(meta, sort_keys=True), "cases": json.dumps(cases, sort_keys=True)})  # fmt: skip
    canonicalize_header(out_path)
    size = out_path.stat().st_size
    print(f"wrote {out_path}: {len(tensors)} tensors, {size:,} bytes; the reference is bit-identical on every one")


if __name__ == "__main__":
    main()
