"""Real checkpoints: a Hugging Face Llama-family directory in and out of the course's TinyLlama (given code).

The course's model already has Llama's architecture and module names (``model/tiny_llama.py``), so
a real checkpoint is a matter of reading its config and copying its tensors by name:

    config.json                       -> LlamaConfig (read_hf_config)
    model.safetensors                 -> one file of tensors, or
    model.safetensors.index.json      -> {"weight_map": {tensor name: shard file}} and the shards

    HF tensor name                              course name
    model.embed_tokens.weight                   embed_tokens.weight
    model.layers.3.self_attn.q_proj.weight      layers.3.self_attn.q_proj.weight
    model.norm.weight                           norm.weight
    lm_head.weight                              lm_head.weight   (absent when tie_word_embeddings)

``load_hf_checkpoint`` builds the model on the meta device (no memory, no random init), allocates it
once in the requested dtype, then copies the tensors in shard by shard with ``safetensors.safe_open``,
which memory-maps the file: the process's own memory holds the model once (a 1 B model: ≈ 4.4 GB in
fp32, ≈ 2.2 GB in bf16), plus the mapped pages of the shard being read (clean page cache, which the
OS can drop, but which RSS counts: a single-file checkpoint peaks near twice the model, a sharded
one near the model plus one shard). ``save_hf_checkpoint`` writes the same layout (sharded if asked), which is
how the tests make tiny checkpoints without downloading anything, and how a merged model goes back
to the Hugging Face stack.

Supported: ``model_type`` "llama" (Llama 2 / 3 / 3.1 / 3.2, TinyLlama, SmolLM/SmolLM2, and other
checkpoints saved as ``LlamaForCausalLM``): grouped-query attention, ``rope_theta``,
``rms_norm_eps``, tied or untied embeddings, and Llama 3.1's "llama3" RoPE scaling. Anything else
(biases, another activation, another RoPE scaling, a head_dim that is not hidden_size / heads)
is refused with the field that is not supported. ``solutions/tools/check_hf_checkpoint.py``
(dev-only) shows the same logits as transformers' ``LlamaForCausalLM`` on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.tiny_llama import LlamaConfig, TinyLlama

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("llama",)


class UnsupportedCheckpoint(ValueError):
    """The directory holds a model this loader cannot represent faithfully (the message says which field)."""


# ---- names ------------------------------------------------------------------------------------


def course_name(hf_name: str) -> str | None:
    """The course's parameter name for an HF tensor name; None for tensors the course recomputes (rotary buffers)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    return hf_name.removeprefix("model.")


def hf_name(name: str) -> str:
    """The HF name of a course parameter or module path: everything but ``lm_head`` lives under ``model.``."""
    return name if name.startswith("lm_head") else f"model.{name}"


# ---- config ------------------------------------------------------------------------------------


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config.json of transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    parameters = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (
        parameters if parameters.get("rope_type", "default") != "default" else None
    )
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise UnsupportedCheckpoint(f"rope scaling {kind!r} is not supported (only 'llama3' and none)")
        else:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = {"rope_type": "llama3", **{k: scaling[k] for k in keys}}
    return float(theta), scaling


def read_hf_config(directory: str | Path) -> LlamaConfig:
    """The LlamaConfig of an HF checkpoint directory (its config.json); UnsupportedCheckpoint names what does not fit."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a Hugging Face model directory has a config.json beside its weights"
        )
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = config.get("architectures")
        raise UnsupportedCheckpoint(
            f"model_type {model_type!r} ({architectures}) is not supported; this loader reads {SUPPORTED_MODEL_TYPES}"
        )
    for field, expected in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(field, expected) != expected:
            raise UnsupportedCheckpoint(
                f"{field}={config[field]!r} is not supported (the course's Llama has {expected!r})"
            )
    d_model, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, d_model // n_heads):
        raise UnsupportedCheckpoint(f"head_dim={config['head_dim']} differs from hidden_size / num_attention_heads")
    theta, scaling = _rope(config)
    kv_heads = config.get("num_key_value_heads") or n_heads
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        d_model=d_model,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        d_ff=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        n_kv_heads=None if kv_heads == n_heads else kv_heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
    )


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json for this LlamaConfig (``LlamaForCausalLM``), in transformers 4's layout (transformers 5 reads it too)."""
    rope = {"rope_theta": config.rope_theta}
    rope_scaling = dict(config.rope_scaling) if config.rope_scaling else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        **rope,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": str(dtype).removeprefix("torch."),  # transformers 5 reads "dtype"
        "torch_dtype": str(dtype).removeprefix("torch."),  # and transformers 4 "torch_dtype"
    }


# ---- weights -------------------------------------------------------------------------------------


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names (in order)."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index.name} names shards that are missing in {directory}: {missing}")
        return [directory / s for s in shards]
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "the directory does not exist"
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory} (found: {found}). Only safetensors weights are read; "
        "convert a pytorch_model.bin with transformers' save_pretrained(..., safe_serialization=True)"
    )


def load_hf_checkpoint(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TinyLlama:
    """A TinyLlama holding the checkpoint in ``directory`` (config.json + safetensors), in eval mode.

    Streams the weights shard by shard into a model allocated once in ``dtype`` on ``device``.
    Raises FileNotFoundError for a missing file, UnsupportedCheckpoint for an architecture the
    course's model cannot represent, ValueError for tensors that are missing, unexpected or of the
    wrong shape (names listed).
    """
    config = read_hf_config(directory)
    files = weight_files(directory)
    with torch.device("meta"):
        model = TinyLlama(config).to(dtype)  # shapes and dtypes only: no memory, no random init
    model = model.to_empty(device=device)  # one allocation, in dtype, filled below
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made two tensors of the tied one
    params = dict(model.named_parameters())
    loaded, unexpected = set(), []
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                for key in shard.keys():  # noqa: SIM118  (safe_open is not a dict)
                    name = course_name(key)
                    if name is None or (config.tie_word_embeddings and name == "lm_head.weight"):
                        continue  # recomputed (rotary tables), or a stored copy of the tied head (transformers ignores it too)
                    if name not in params:
                        unexpected.append(key)
                        continue
                    tensor = shard.get_tensor(key)
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise ValueError(
                            f"{key} has shape {tuple(tensor.shape)}, the config says {tuple(params[name].shape)}"
                        )
                    params[name].copy_(tensor)
                    loaded.add(name)
    if config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def save_hf_checkpoint(
    model: TinyLlama, directory: str | Path, max_shard_bytes: int | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model`` as an HF Llama directory: config.json and model.safetensors (or shards + index).

    ``max_shard_bytes``: split into model-0000i-of-0000n.safetensors files of at most this many
    bytes each (a tensor is never split), with model.safetensors.index.json, as transformers does.
    ``dtype``: the stored dtype (default: the model's). A tied lm_head is stored once (as embed_tokens).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    tensors = {
        hf_name(name): tensor.detach().to("cpu", dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_word_embeddings and name == "lm_head.weight")
    }
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n")
    if max_shard_bytes is None:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return directory


# ---- adapters for the HF model -------------------------------------------------------------------


def save_hf_adapter(model: TinyLlama, directory: str | Path, base_model_name_or_path: str | Path) -> Path:
    """The model's LoRA adapter in PEFT's format, named for the HF model: ``PeftModel.from_pretrained`` loads it.

    Writes with Stage 2's ``save_lora`` (your code under IMPL=student), then renames every tensor
    from the course's path to transformers' (``layers.0…`` -> ``model.layers.0…``, see ``hf_name``)
    and records ``base_model_name_or_path`` and ``task_type="CAUSAL_LM"`` in adapter_config.json.
    """
    from safetensors.torch import load_file

    from model.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_KEY_PREFIX, save_lora

    directory = save_lora(model, directory)
    weights = directory / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(weights))
    renamed = {PEFT_KEY_PREFIX + hf_name(key.removeprefix(PEFT_KEY_PREFIX)): value for key, value in tensors.items()}
    save_file(renamed, str(weights), metadata={"format": "pt"})
    config_path = directory / ADAPTER_CONFIG_NAME
    config = json.loads(config_path.read_text())
    config.update(base_model_name_or_path=str(base_model_name_or_path), task_type="CAUSAL_LM")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_hf_adapter(model: TinyLlama, directory: str | Path) -> TinyLlama:
    """Load an adapter written for the HF model (by ``save_hf_adapter`` or by PEFT) into the course's model.

    The inverse renaming of ``save_hf_adapter``, then Stage 2's ``load_lora`` (from a temporary copy).
    """
    import tempfile

    from safetensors.torch import load_file

    from model.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_KEY_PREFIX, load_lora

    directory = Path(directory)
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} is missing: an adapter directory holds {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
            )
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    renamed = {
        PEFT_KEY_PREFIX + course_name(key.removeprefix(PEFT_KEY_PREFIX)): value for key, value in tensors.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ADAPTER_CONFIG_NAME).write_text((directory / ADAPTER_CONFIG_NAME).read_text())
        save_file(renamed, str(Path(tmp) / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        return load_lora(model, tmp)
