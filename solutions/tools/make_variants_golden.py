#!/usr/bin/env python3
"""Record golden vectors for Stage 5 (the LoRA family) from PEFT 0.21.2.

DEV-ONLY. The graded tests never import peft: they read the file this script writes,
``testcases/fixtures/peft_variants_golden.safetensors``, and hold ``model/lora_variants.py`` to
PEFT's numbers. Only whoever regenerates the fixture needs peft, in a separate env:

    python3 -m venv /tmp/peftenv
    /tmp/peftenv/bin/pip install torch==2.13.0 peft==0.21.2 safetensors
    /tmp/peftenv/bin/python solutions/tools/make_variants_golden.py

Every input comes from a ``torch.Generator`` with a fixed seed, so a rerun with the same versions
writes the same tensors. One layer, ``nn.Linear(12 → 10)`` with a bias, float64 (PEFT's modules
follow the base layer's dtype), and one input ``x`` (6, 12). Keys:

    x (6, 12), weight (10, 12), bias (10,)                         the layer and its input
    rslora.A (4, 12), rslora.B (10, 4), rslora.out (6, 10)          r=4, lora_alpha=8, use_rslora
    dora.magnitude_init (10,)                                        PEFT's magnitude right after wrapping (B = 0)
    dora.A, dora.B, dora.magnitude, dora.out (6, 10)                 A, B, m set; eval forward
    dora.merged_weight (10, 12)                                      the base weight after PEFT's merge
    pissa.A, pissa.B, pissa.product (10, 12), pissa.residual         init_lora_weights="pissa" (product = s·B A);
    olora.A, olora.B, olora.product, olora.residual                  "olora"; both run in fp32 inside PEFT, so
                                                                     these four are float32
    vera.A (16, 12), vera.B (10, 16)                                 float32: PEFT's shared pair, key 0, r=16
    vera.key3.A (5, 12), vera.key3.B (10, 5)                         float32: key 3, r=5
    vera.lambda_d (16,), vera.lambda_b (10,), vera.out (6, 10)       λ set; eval forward, key 0 (in float64)
    adalora.A (6, 12), adalora.E (6, 1), adalora.B (10, 6)           init_r=6, lora_alpha=8: Q, Λ, P set
    adalora.out (6, 10)                                              eval forward
    adalora.budget (20,) int64, adalora.mask_ind (20,) bool          RankAllocator.budget_schedule(step) for
                                                                     step 0..19: total_step=20, tinit=3,
                                                                     tfinal=4, deltaT=2, init_r=6, target_r=2,
                                                                     on TWO layers (budgets 12 → 4)

Everything not drawn by PEFT itself (A, B, m, λ, Λ, x, the weight) is drawn here from seeded
generators and copied into PEFT's modules before the forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parents[2] / "testcases" / "fixtures" / "peft_variants_golden.safetensors"
IN, OUT_FEATURES = 12, 10


class OneLayer(nn.Module):
    """The smallest model PEFT can wrap: one float64 ``proj`` layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT_FEATURES, dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TwoLayers(nn.Module):
    """Two targets, for AdaLoRA's budget (the sum of the layers' ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(IN, OUT_FEATURES)
        self.second = nn.Linear(OUT_FEATURES, IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def draw(seed: int, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std


def inner(peft_model: nn.Module, name: str = "proj") -> nn.Module:
    return dict(peft_model.named_modules())[f"base_model.model.{name}"]


def record_rslora(golden: dict, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> None:
    model = get_peft_model(
        OneLayer(weight, bias), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_rslora=True)
    )
    layer = inner(model)
    golden["rslora.A"], golden["rslora.B"] = draw(11, 4, IN, std=0.3), draw(12, OUT_FEATURES, 4, std=0.3)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(golden["rslora.A"])
        layer.lora_B["default"].weight.copy_(golden["rslora.B"])
        golden["rslora.out"] = model.eval()(x)


def record_dora(golden: dict, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> None:
    model = get_peft_model(
        OneLayer(weight, bias), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True)
    )
    layer = inner(model)
    golden["dora.magnitude_init"] = layer.lora_magnitude_vector["default"].weight.detach().clone()
    golden["dora.A"], golden["dora.B"] = draw(21, 4, IN, std=0.3), draw(22, OUT_FEATURES, 4, std=0.3)
    golden["dora.magnitude"] = golden["dora.magnitude_init"] * (1 + 0.5 * draw(23, OUT_FEATURES).tanh())
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(golden["dora.A"])
        layer.lora_B["default"].weight.copy_(golden["dora.B"])
        layer.lora_magnitude_vector["default"].weight.copy_(golden["dora.magnitude"])
        golden["dora.out"] = model.eval()(x)
        model.merge_adapter()
        golden["dora.merged_weight"] = layer.base_layer.weight.detach().clone()


def record_w0_init(golden: dict, weight: torch.Tensor, bias: torch.Tensor, method: str) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=method)
    model = get_peft_model(OneLayer(weight.float(), bias.float()).float(), config)
    layer = inner(model)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    golden[f"{method}.A"], golden[f"{method}.B"] = A.clone(), B.clone()
    golden[f"{method}.product"] = layer.scaling["default"] * B @ A
    golden[f"{method}.residual"] = layer.base_layer.weight.detach().clone()


def record_vera(golden: dict, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> None:
    for key, r, prefix in ((3, 5, "vera.key3"), (0, 16, "vera")):
        config = VeraConfig(r=r, target_modules=["proj"], projection_prng_key=key, d_initial=0.1)
        model = get_peft_model(OneLayer(weight.float(), bias.float()).float(), config)
        golden[f"{prefix}.A"] = model.base_model.vera_A["default"].detach().clone()
        golden[f"{prefix}.B"] = model.base_model.vera_B["default"].detach().clone()
    model = model.double()  # the fp32 draws widen exactly
    layer = inner(model)
    golden["vera.lambda_d"], golden["vera.lambda_b"] = draw(41, 16, std=0.5), draw(42, OUT_FEATURES, std=0.5)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(bias)
        layer.vera_lambda_d["default"].copy_(golden["vera.lambda_d"])
        layer.vera_lambda_b["default"].copy_(golden["vera.lambda_b"])
        golden["vera.out"] = model.eval()(x)


def record_adalora(golden: dict, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> None:
    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=["proj"], total_step=20)
    model = get_peft_model(OneLayer(weight, bias), config)
    layer = inner(model)
    golden["adalora.A"], golden["adalora.B"] = draw(51, 6, IN, std=0.3), draw(52, OUT_FEATURES, 6, std=0.3)
    golden["adalora.E"] = draw(53, 6, 1)
    with torch.no_grad():
        layer.lora_A["default"].copy_(golden["adalora.A"])
        layer.lora_E["default"].copy_(golden["adalora.E"])
        layer.lora_B["default"].copy_(golden["adalora.B"])
        golden["adalora.out"] = model.eval()(x)
    schedule = AdaLoraConfig(
        init_r=6, target_r=2, tinit=3, tfinal=4, deltaT=2, total_step=20, target_modules=["first", "second"]
    )
    allocator = get_peft_model(TwoLayers(), schedule).base_model.rankallocator
    steps = [allocator.budget_schedule(step) for step in range(20)]
    golden["adalora.budget"] = torch.tensor([budget for budget, _ in steps], dtype=torch.int64)
    golden["adalora.mask_ind"] = torch.tensor([mask for _, mask in steps], dtype=torch.bool)


def main() -> None:
    x, weight, bias = draw(1, 6, IN), draw(2, OUT_FEATURES, IN, std=0.4), draw(3, OUT_FEATURES, std=0.1)
    golden = {"x": x, "weight": weight, "bias": bias}
    record_rslora(golden, weight, bias, x)
    record_dora(golden, weight, bias, x)
    for method in ("pissa", "olora"):
        record_w0_init(golden, weight, bias, method)
    record_vera(golden, weight, bias, x)
    record_adalora(golden, weight, bias, x)
    tensors = {key: value.detach().contiguous() for key, value in golden.items()}
    save_file(tensors, OUT, metadata={"source": "peft 0.21.2, solutions/tools/make_variants_golden.py"})
    for key, value in tensors.items():
        print(f"{key:24s} {str(tuple(value.shape)):10s} {value.dtype}")
    print(f"wrote {OUT.relative_to(OUT.parents[2])}")


if __name__ == "__main__":
    main()
