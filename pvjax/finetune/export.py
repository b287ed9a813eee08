"""Export a finetune: merged weights as a Hugging Face folder, or the LoRA adapters in peft's
layout.

- `save_hf_folder(folder, cfg, params, tokenizer)`: `config.json` + `model.safetensors` (sharded
  with an index past `shard_bytes`) + the tokenizer files. transformers loads it with
  `AutoModelForCausalLM.from_pretrained`, and so does `pvjax.load`, with the same logits.
- `save_peft_adapter(folder, spec, trainable, cfg, base)`: `adapter_config.json` +
  `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base_model, folder)` loads.

Both write into a temporary folder beside the target and rename it into place, so an export is
whole or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from pvjax.errors import UserError
from pvjax.finetune.lora import TARGETS, LoraSpec
from pvjax.loading.safetensors_folder import HF_NAMES
from pvjax.models.config import ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class ExportError(UserError, ValueError):
    """An export that cannot be written as asked."""


def hf_config(cfg: ModelConfig, dtype) -> dict:
    """A transformers `config.json` for a pvjax `ModelConfig` (the inverse of
    `ModelConfig.from_hf`)."""
    if cfg.architecture not in _ARCHITECTURES:
        raise ExportError(
            f"exporting a {cfg.architecture} model as a Hugging Face folder is not supported yet "
            f"(only {sorted(_ARCHITECTURES)}); save the LoRA adapters instead"
        )
    eos = list(cfg.eos_token_ids)
    d = {
        "architectures": [_ARCHITECTURES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(np.dtype(dtype))
        if np.dtype(dtype) != np.dtype("float32")
        else "float32",
        "use_cache": True,
    }
    if cfg.architecture == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    else:
        d.update(use_sliding_window=False)
    if cfg.rope_type != "default":
        d["rope_scaling"] = {"rope_type": cfg.rope_type, **cfg.rope_params}
    return d


def _to_numpy(x, dtype):
    return np.ascontiguousarray(np.asarray(jax.device_get(x)).astype(dtype))


def _hf_tensors(cfg: ModelConfig, params, dtype):
    """`(name, array)` pairs in transformers' names and `[out, in]` layout, one at a time."""
    for key in ("embed", "final_norm", "lm_head"):
        if key in params:
            a = _to_numpy(params[key], dtype)
            yield HF_NAMES[key], a.T.copy() if key == "lm_head" else a
    for key, stacked in params["layers"].items():
        arr = _to_numpy(stacked, dtype)
        for i in range(cfg.num_layers):
            a = arr[i]
            yield (
                f"model.layers.{i}.{HF_NAMES[key]}",
                np.ascontiguousarray(a.T) if a.ndim == 2 else a,
            )


def _replace_dir(tmp: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _tmpdir(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))


@contextlib.contextmanager
def _staged(folder: Path, extra: dict | None):
    """A temporary folder beside `folder` to write into; when the block ends without an error it
    gets `extra` as `pvjax_finetune.json` (provenance) and replaces `folder` whole, so a reader
    never sees half an export. The temporary folder is removed in any case."""
    tmp = _tmpdir(folder)
    try:
        yield tmp
        if extra is not None:
            (tmp / "pvjax_finetune.json").write_text(json.dumps(extra, indent=2, default=str))
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_hf_folder(
    folder,
    cfg: ModelConfig,
    params,
    tokenizer=None,
    *,
    dtype=None,
    shard_bytes: int = 4 << 30,
    extra: dict | None = None,
) -> Path:
    """Write plain (merged) parameters as a Hugging Face model folder. `dtype` defaults to the
    parameters' own; `extra` lands in `pvjax_finetune.json` beside (provenance)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    dtype = np.dtype(dtype or params["embed"].dtype)
    with _staged(folder, extra) as tmp:
        shards, cur, size = [], {}, 0
        for name, arr in _hf_tensors(cfg, params, dtype):
            if cur and size + arr.nbytes > shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name], size = arr, size + arr.nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(a.nbytes for s in shards for a in s.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
        if tokenizer:
            tokenizer.save_pretrained(str(tmp))
    return folder


def save_peft_adapter(
    folder,
    spec: LoraSpec,
    trainable,
    cfg: ModelConfig,
    *,
    base: str = "",
    extra: dict | None = None,
) -> Path:
    """Write LoRA adapters as peft does (`adapter_config.json`, `adapter_model.safetensors` with
    `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` per module and selected block)."""
    from safetensors.numpy import save_file

    if spec.full:
        raise ExportError("export.adapters needs LoRA; a full finetune exports merged weights only")
    folder = Path(folder)
    layers = spec.selected_layers(cfg.num_layers)
    tensors = {}
    for t in spec.targets:
        key, module = TARGETS[t]
        a = _to_numpy(trainable[key]["a"], np.float32)
        b = _to_numpy(trainable[key]["b"], np.float32)
        for i in layers:
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "use_rslora": spec.rslora,
        "target_modules": sorted(TARGETS[t][1].split(".")[-1] for t in spec.targets),
        "layers_to_transform": list(spec.layers) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with _staged(folder, extra) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    return folder
