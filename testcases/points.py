"""The one points table: exercise id -> (points, title).

An exercise's points are shared equally by its graded tests that ran (a test skipped for a
missing GPU neither earns nor costs points). tutorial/README.md shows the same table.
"""

EXERCISES: dict[str, tuple[int, str]] = {
    # Stage 1: the LoRA layer (model/lora.py)
    "1.1": (8, "LoRALayer: arguments, frozen base, init of A and B"),
    "1.2": (8, "LoRALayer.forward"),
    "1.3": (8, "delta_weight, merge, unmerge"),
    # Stage 2: LoRA in a model (model/lora.py)
    "2.1": (10, "get_lora_model, mark_only_lora_as_trainable"),
    "2.2": (4, "count_parameters, print_trainable_parameters"),
    "2.3": (6, "merge_lora, unmerge_lora, merge_and_unload"),
    "2.4": (8, "save_lora, load_lora in PEFT's format"),
    # Stage 3: quantization (model/quant.py)
    "3.1": (5, "uniform (affine) quantization"),
    "3.2": (5, "absmax quantization, per tensor and per block"),
    "3.3": (4, "the NF4 and FP4 code books"),
    "3.4": (10, "NF4 blockwise quantization"),
    "3.5": (6, "double quantization"),
    "3.6": (8, "NF4Linear"),
    "3.7": (4, "fake quantization with a straight-through estimator"),
    # Stage 4: QLoRA training (training/qlora_trainer.py)
    "4.1": (4, "TrainConfig checks"),
    "4.2": (8, "prepare_qlora_model"),
    "4.3": (14, "the mixed-precision trainer"),
    "4.4": (4, "merge_and_export"),
    "4.5": (4, "estimate_memory"),
}


def points(exercise: str) -> int:
    return EXERCISES[exercise][0]


def title(exercise: str) -> str:
    return EXERCISES[exercise][1]
