"""Model configuration: one Llama-like decoder, with flags for the families it covers.

Qwen2/Qwen2.5 is Llama plus biases on the q/k/v projections; SmolLM2 is Llama with tied embeddings.
The config is a frozen, hashable dataclass so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

from pvjax.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(UserError, ValueError):
    """A model config that pvjax cannot run, with the offending field named."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 / linear rope scaling parameters, as a sorted tuple of (key, value) to stay hashable.
    rope_scaling: tuple[tuple[str, float], ...] = ()
    max_position_embeddings: int = 8192
    qkv_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Not compared (nor hashed): configs are jit's static arguments, and a finetune saved under
    # another name must reuse its base's compiled programs.
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; pvjax supports "
                f"{SUPPORTED_ARCHITECTURES}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_scaling type {self.rope_type!r}; "
                f"supported: {SUPPORTED_ROPE_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def rope_params(self) -> dict[str, float]:
        return dict(self.rope_scaling)

    def fingerprint(self) -> str:
        """A short hash of everything that fixes the residual-stream geometry.

        Two checkpoints with the same fingerprint have the same shapes and layer count; vector files
        carry it so a vector is not silently applied to another model.
        """
        keys = (
            "architecture",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        )
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """From a transformers `config.json` dict (Llama 2/3/3.1, SmolLM2, Qwen2, Qwen2.5)."""
        model_type = cfg.get("model_type")
        if model_type is None:
            archs = cfg.get("architectures") or []
            raise ConfigError(f"config.json has no 'model_type' (architectures={archs})")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture model_type={model_type!r} in config.json; "
                f"pvjax supports {SUPPORTED_ARCHITECTURES}"
            )

        def need(key):
            if key not in cfg:
                raise ConfigError(f"config.json is missing the field {key!r}")
            return cfg[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers 5 moved rope settings into `rope_parameters`; older files use rope_theta and
        # rope_scaling. Read both.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        rope = {**scaling, **rope}
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default")) or "default"
        if model_type == "llama" and cfg.get("attention_bias"):
            raise ConfigError("Llama configs with attention_bias=True are not supported")
        if cfg.get("mlp_bias"):
            raise ConfigError("configs with mlp_bias=True are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={cfg.get('hidden_act')!r} is not supported (only silu)")
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        scaling_items = tuple(
            sorted(
                (k, float(v))
                for k, v in rope.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
        )
        return cls(
            architecture=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling=scaling_items if rope_type != "default" else (),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=cfg.get("pad_token_id"),
            name=name or cfg.get("_name_or_path", "") or "",
        )
