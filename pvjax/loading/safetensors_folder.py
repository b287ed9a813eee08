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

from pvjax.config import ConfigError, ModelConfig
from pvjax.loading.layout import CheckpointError, assemble

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

_HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of one `.safetensors` file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = raw[base + start:base + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from e
    return ModelConfig.from_hf(cfg, name=folder.name)


def load_folder(folder: str | os.PathLike, dtype) -> tuple[ModelConfig, dict]:
    folder = Path(folder)
    cfg = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [w for w in wanted if not (folder / w).exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {missing} listed in {index.name} are missing")
        files = [folder / w for w in wanted]
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))

    def name_of(key, layer):
        return _HF_NAMES[key] if layer is None else f"model.layers.{layer}.{_HF_NAMES[key]}"

    def transform(key, arr):
        return arr.T if arr.ndim == 2 and key != "embed" else arr

    def ignore(name):
        return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")

    params = assemble(cfg, tensors, tensors.__getitem__, name_of, transform, ignore, str(folder), dtype)
    return cfg, params
