"""Load a local Hugging Face folder: `config.json` plus one or many `*.safetensors` files.

Tensors are memory-mapped straight from the files (bf16 included, via ml_dtypes), so a sharded 7B
checkpoint is read once, tensor by tensor, without torch.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from pvjax.loading.layout import CheckpointError, assemble
from pvjax.models.config import ConfigError, ModelConfig

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "router": "mlp.gate.weight",
    "w_gate_e": "mlp.experts.gate_proj",  # [X, I, D], stacked by `_stack_experts`
    "w_up_e": "mlp.experts.up_proj",
    "w_down_e": "mlp.experts.down_proj",
}
# Gemma names its four norms by place: the MLP's input norm is `pre_feedforward_layernorm`, and
# `post_attention_layernorm` normalises the attention output (Llama's MLP input norm).
GEMMA_NAMES = {
    **HF_NAMES,
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """pvjax parameter key -> transformers tensor name (inside `model.layers.i.` for a block's)."""
    return GEMMA_NAMES if cfg.sandwich_norms else HF_NAMES


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of one `.safetensors` file, after checking that the header parses
    and that every tensor's bytes lie inside the file and match its shape: a cut download is
    reported as truncated, not as a reshape error deep in the loader."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims "
                f"{n} bytes, the file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path} is not a safetensors file (its header is not JSON)"
            ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + n
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {base + end}, "
                f"the file has {size}"
            )
        if end - start != int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize or start < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {end - start} bytes, not the "
                f"{shape} {dtype} its header declares"
            )
        out[name] = raw[base + start : base + end].view(_DTYPES[dtype]).reshape(shape)
    return out


def read_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not any(folder.iterdir()):
        raise CheckpointError(
            f"{folder} is empty: a model folder holds config.json and *.safetensors"
        )
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return ModelConfig.from_hf(cfg, name=folder.name)


def load_folder(folder: str | os.PathLike, dtype) -> tuple[ModelConfig, dict]:
    folder = Path(folder)
    cfg = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index}: not a safetensors index (a JSON object with a "
                f"'weight_map' of tensor name to file)"
            ) from e
        missing = [w for w in wanted if not (folder / w).exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) {missing} listed in {index.name} are missing"
            )
        files = [folder / w for w in wanted]
    if not files:
        raise CheckpointError(
            f"{folder}: config.json but no *.safetensors weights (pvjax reads "
            f"safetensors only; .bin and .pt checkpoints are not supported)"
        )
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    tensors = _stack_experts(tensors, cfg)

    names = hf_names(cfg)
    prefix, head = _text_tower(tensors)

    def name_of(key, layer):
        if layer is not None:
            return f"{prefix}layers.{layer}.{names[key]}"
        return head if key == "lm_head" else prefix + names[key].removeprefix("model.")

    def transform(key, arr):
        if arr.ndim == 3:  # experts: [X, out, in] -> [X, in, out]
            return arr.swapaxes(1, 2)
        return arr.T if arr.ndim == 2 and key != "embed" else arr

    def ignore(name):
        return (
            name.endswith("rotary_emb.inv_freq")
            or (cfg.tie_embeddings and name == head)
            or name.startswith(_OTHER_TOWERS)
        )

    params = assemble(
        cfg, tensors, tensors.__getitem__, name_of, transform, ignore, str(folder), dtype
    )
    return cfg, params


# A multimodal folder's text tower, by the name of its embeddings (transformers 5's layout, then the
# hub's older one), and its output head. Other towers are not read.
_TEXT_TOWERS = ("model.language_model.", "language_model.model.")
_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
_OTHER_TOWERS = (
    "model.vision_tower.",
    "vision_tower.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
)


def _text_tower(tensors) -> tuple[str, str]:
    """`(prefix of the decoder's tensors, name of the output head)`."""
    prefix = next((p for p in _TEXT_TOWERS if p + "embed_tokens.weight" in tensors), "model.")
    return prefix, next((h for h in _HEADS if h in tensors), _HEADS[0])


def _stack_experts(tensors: dict, cfg: ModelConfig) -> dict:
    """An expert model's tensors with each block's experts as one `[X, out, in]` tensor per weight
    (`mlp.experts.gate_proj`, `up_proj`, `down_proj`): from the hub's per-expert tensors
    (`mlp.experts.{j}.gate_proj.weight`) or from transformers 5's fused `mlp.experts.gate_up_proj`
    `[X, 2I, D]` (its `down_proj` is already `[X, D, I]`). Other models' tensors pass unchanged."""
    if not cfg.num_experts:
        return tensors
    out = dict(tensors)
    n, width = cfg.num_experts, cfg.moe_intermediate_size
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        fused = out.pop(p + "gate_up_proj", None)
        if fused is not None:
            out[p + "gate_proj"], out[p + "up_proj"] = fused[:, :width], fused[:, width:]
            continue
        for w in ("gate_proj", "up_proj", "down_proj"):
            names = [f"{p}{j}.{w}.weight" for j in range(n)]
            if all(name in out for name in names):
                out[p + w] = np.stack([out.pop(name) for name in names])
    return out
