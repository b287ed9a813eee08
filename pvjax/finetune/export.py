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
from pvjax.loading.safetensors_folder import hf_names
from pvjax.models.config import ModelConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


class ExportError(UserError, ValueError):
    """An export that cannot be written as asked."""


def hf_config(cfg: ModelConfig, dtype) -> dict:
    """A transformers `config.json` for a pvjax `ModelConfig` (the inverse of
    `ModelConfig.from_hf`): every family's fields written out, the attention kind of each block
    as `layer_types`, so that neither transformers nor `from_hf` derives anything from defaults."""
    if cfg.architecture not in _ARCHITECTURES:
        raise ExportError(
            f"exporting a {cfg.architecture} model as a Hugging Face folder is not supported yet "
            f"(only {sorted(_ARCHITECTURES)}); save the LoRA adapters instead"
        )
    eos = list(cfg.eos_token_ids)
    gemma = cfg.architecture in ("gemma2", "gemma3_text")
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
    d["hidden_activation" if gemma else "hidden_act"] = (
        "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "silu"
    )
    if cfg.architecture == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    elif cfg.architecture != "qwen2":
        d.update(attention_bias=False)
    if cfg.rope_type != "default":
        d["rope_scaling"] = {"rope_type": cfg.rope_type, **cfg.rope_params}
    d.update(_window_fields(cfg))
    if gemma:
        scalar = cfg.head_dim if cfg.query_scale is None else float(cfg.query_scale) ** -2
        # transformers' config class takes an int (the scale came from one, so this is exact)
        d["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-3 else scalar
        d["final_logit_softcapping"] = cfg.final_softcap
        d["attn_logit_softcapping"] = cfg.attn_softcap
    if cfg.architecture == "gemma3_text":
        # transformers 5's layout: one rope dict per attention kind (the local one unscaled)
        full = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **cfg.rope_params}
        local = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
        d.pop("rope_theta")
        d.pop("rope_scaling", None)
        d["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
        d["use_bidirectional_attention"] = False
    if cfg.num_experts:
        d.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    return d


def _window_fields(cfg: ModelConfig) -> dict:
    """The sliding window and each block's attention kind, in the fields each family reads."""
    types = list(cfg.layer_types) or ["full_attention"] * cfg.num_layers
    window = cfg.sliding_window if any(cfg.sliding) else None
    if cfg.architecture == "llama":
        return {}
    if cfg.architecture in ("qwen2", "qwen3", "qwen3_moe"):
        out = {"use_sliding_window": window is not None, "sliding_window": window}
        if window is not None:  # Qwen2/3 derive the kinds from max_window_layers otherwise
            first = cfg.sliding.index(True)
            out.update(max_window_layers=first, layer_types=types)
        return out
    if cfg.architecture == "mistral":  # transformers' Mistral ignores layer_types
        return {"sliding_window": window}
    if cfg.architecture == "gemma3_text" or window is not None:
        return {"sliding_window": cfg.sliding_window or window, "layer_types": types}
    return {"sliding_window": None, "layer_types": types}


def _to_numpy(x, dtype):
    return np.ascontiguousarray(np.asarray(jax.device_get(x)).astype(dtype))


def _hf_tensors(cfg: ModelConfig, params, dtype):
    """`(name, array)` pairs in transformers' names and `[out, in]` layout, one at a time. Gemma's
    norms are stored as transformers stores them (`w`, applied as `1 + w`: pvjax keeps the same);
    experts go out one tensor per expert (`mlp.experts.{j}.gate_proj.weight`), the hub's layout,
    which transformers 4 reads as it is and 5 fuses on load."""
    names = hf_names(cfg)
    for key in ("embed", "final_norm", "lm_head"):
        if key in params:
            a = _to_numpy(params[key], dtype)
            yield names[key], a.T.copy() if key == "lm_head" else a
    for key, stacked in params["layers"].items():
        arr = _to_numpy(stacked, dtype)
        for i in range(cfg.num_layers):
            a = arr[i]
            if a.ndim == 3:  # [X, in, out] experts: "mlp.experts.gate_proj" -> one per expert
                where, what = names[key].rsplit(".", 1)
                for j in range(a.shape[0]):
                    name = f"model.layers.{i}.{where}.{j}.{what}.weight"
                    yield name, np.ascontiguousarray(a[j].T)
                continue
            yield (
                f"model.layers.{i}.{names[key]}",
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
