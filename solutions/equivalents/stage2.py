"""Equivalents of Stage 2: correct model-level LoRA code written differently; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "get_lora_model_by_parent_setattr",
        "2.1",
        "Targets collected first, checked, then swapped in with setattr on each parent module.",
        block="2.1: find the targets, check them all, then wrap them and freeze the rest",
        code="""
            names = [target_modules] if isinstance(target_modules, str) else target_modules
            names = list(DEFAULT_TARGET_MODULES if names is None else names)
            if not names:
                raise ValueError("target_modules must name at least one module, got an empty list")
            modules = dict(model.named_modules())
            lora_paths = [p for p, m in modules.items() if isinstance(m, LoRALayer)]
            chosen = {}
            for path, module in modules.items():
                if any(path.startswith(p + ".") for p in lora_paths):
                    continue
                if any(matches_target(path, name) for name in names):
                    if path in lora_paths:
                        raise ValueError(f"module {path!r} already has LoRA")
                    if not is_linear_like(module):
                        raise ValueError(f"target module {path!r} is a {type(module).__name__}, not a linear layer")
                    chosen[path] = module
            for name in names if target_modules is not None else []:
                if not any(matches_target(p, name) for p in chosen):
                    raise ValueError(f"target_modules entry {name!r} matches no linear layer")
            if not chosen:
                linear = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if is_linear_like(m)})
                raise ValueError(f"target_modules {names} match no linear layer; the model's linear layers: {linear}")
            wrappers = {p: LoRALayer.from_linear(m, r, lora_alpha, lora_dropout, init_lora_weights) for p, m in chosen.items()}
            for path, wrapper in wrappers.items():
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, wrapper)
            mark_only_lora_as_trainable(model)
            return model
            """,
    ),
    Variant(
        "count_by_identity",
        "2.2",
        "Parameters deduplicated by id() over named_parameters(remove_duplicate=False).",
        block="2.2: count parameters",
        code="""
            unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
            return (sum(p.numel() for p in unique.values() if p.requires_grad), sum(p.numel() for p in unique.values()))
            """,
    ),
    Variant(
        "unload_into_fresh_linear",
        "2.3",
        "merge_and_unload builds a fresh nn.Linear holding the merged weight and the same bias.",
        block="2.3: check every layer, then merge and put",
        code="""
            layers = list(lora_layers(model))
            for _, layer in layers:
                if not layer.merged and not isinstance(layer.base_layer, nn.Linear):
                    raise TypeError(f"cannot merge into a {type(layer.base_layer).__name__}: it is not an nn.Linear")
            for path, layer in layers:
                layer.merge()
                base = layer.base_layer
                plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
                plain = plain.to(device=base.weight.device, dtype=base.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(base.weight)
                    if base.bias is not None:
                        plain.bias.copy_(base.bias)
                plain.requires_grad_(False)
                model.set_submodule(path, plain)
            return model
            """,
    ),
    Variant(
        "merge_lora_restores_copies_on_error",
        "2.3",
        "merge_lora merges layer after layer and, if one refuses, puts back exact copies of the weights it changed.",
        block="2.3: check every layer, then merge each",
        code="""
            done = []
            try:
                for _, layer in lora_layers(model):
                    if not layer.merged:
                        saved = layer.base_layer.weight.detach().clone() if hasattr(layer.base_layer, "weight") else None
                        layer.merge()
                        done.append((layer, saved))
            except TypeError:
                with torch.no_grad():
                    for layer, saved in done:
                        layer.base_layer.weight.copy_(saved)
                        layer.merged = False
                raise
            return model
            """,
    ),
]
