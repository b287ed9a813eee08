"""Model configuration: one Llama-like decoder, with flags for the families it covers.

Qwen2/Qwen2.5 is Llama plus biases on the q/k/v projections; SmolLM2 is Llama with tied embeddings;
Mistral and Ministral are Llama with sliding-window attention; Qwen3 adds RMSNorms over each head's
queries and keys, and Qwen3-MoE routes its MLP to experts (`pvjax.models.moe`); Gemma 2 and 3
scale norms by `1 + w`, scale the embeddings, use a tanh GeGLU MLP and norms around both
attention and MLP, soft-cap logits and alternate local (sliding) and global blocks.
Every new field's default is Llama's, so a Llama or Qwen2 config is what it always was.
The config is a frozen, hashable dataclass so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

from pvjax.errors import UserError

SUPPORTED_ARCHITECTURES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "ministral",
    "gemma2",
    "gemma3_text",
    "qwen3_moe",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' names of the activations pvjax runs, by config field value.
_HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_GEMMA = ("gemma2", "gemma3_text")
# transformers' config-class defaults that differ from the generic fallbacks below, for config.json
# files written without them (older transformers saved only what differed from the class).
_GEMMA_DEFAULTS = dict(
    head_dim=256,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)
_DEFAULTS = {
    "qwen2": dict(sliding_window=4096, max_window_layers=28),
    "qwen3": dict(head_dim=128, sliding_window=4096, max_window_layers=28),
    "qwen3_moe": dict(sliding_window=4096, max_window_layers=28),
    "mistral": dict(sliding_window=4096),
    "ministral": dict(sliding_window=4096),
    "gemma2": dict(_GEMMA_DEFAULTS, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(
        _GEMMA_DEFAULTS,
        vocab_size=262_208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
# A multimodal Gemma 3 folder (`model_type` gemma3) loads as its text tower.
_TEXT_TOWERS = {"gemma3": "gemma3_text"}


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
    # The families past Llama. Each default is Llama's: the decoder branches on these statically,
    # so a family that does not use one pays nothing for it.
    qk_norm: bool = False  # RMSNorm over each head's q and k, before rope (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm weights applied as 1 + w (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype (Gemma)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma)
    activation: str = "silu"  # the MLP gate's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    query_scale: float | None = None  # attention score scale; None is head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> c tanh(scores / c) before the softmax (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits
    sliding_window: int | None = None  # a sliding block sees its last `sliding_window` tokens
    # Per block, transformers' "full_attention" or "sliding_attention"; () when every block is full.
    layer_types: tuple[str, ...] = ()
    # Rope base of the sliding blocks, unscaled (Gemma 3's local layers); None: as the full ones.
    local_rope_theta: float | None = None
    # Routed experts in the blocks' MLPs (Qwen3-MoE); 0 experts: the dense MLP everywhere.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    # Blocks of an expert model whose MLP is the dense one of `intermediate_size` (transformers'
    # `mlp_only_layers` and `decoder_sparse_step`), sorted; () when every block routes.
    dense_blocks: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; pvjax supports "
                f"{SUPPORTED_ARCHITECTURES}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {self.rope_type!r} (rope_parameters / rope_scaling); "
                f"supported: {SUPPORTED_ROPE_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not supported: {ACTIVATIONS}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"layer_types {bad} are not supported attention kinds: {LAYER_TYPES}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.dense_blocks and (
            not self.num_experts
            or list(self.dense_blocks) != sorted(set(self.dense_blocks))
            or not all(0 <= i < self.num_layers for i in self.dense_blocks)
        ):
            raise ConfigError(
                f"dense_blocks={self.dense_blocks} must be sorted distinct block indices "
                f"below {self.num_layers} of an expert model"
            )

    @property
    def rope_params(self) -> dict[str, float]:
        return dict(self.rope_scaling)

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per block: attends within the sliding window (all False without a window)."""
        if self.sliding_window is None or not self.layer_types:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def routed(self) -> tuple[bool, ...]:
        """Per block: its MLP routes to experts (all False without experts)."""
        dense = set(self.dense_blocks)
        return tuple(bool(self.num_experts) and i not in dense for i in range(self.num_layers))

    @property
    def local_rope(self) -> tuple[bool, ...]:
        """Per block: rotates with the local rope (`local_rope_theta`), not the global one."""
        if self.local_rope_theta is None or not self.layer_types:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

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
        """From a transformers `config.json` dict: Llama 2/3/3.1, SmolLM2, Qwen2/2.5, Qwen3,
        Mistral, Ministral, Gemma 2, Gemma 3 text. A field whose value this port does not
        implement (a rope type, an attention kind, an activation, a bias) is refused by name."""
        model_type = cfg.get("model_type")
        if model_type is None:
            archs = cfg.get("architectures") or []
            raise ConfigError(f"config.json has no 'model_type' (architectures={archs})")
        if model_type in _TEXT_TOWERS:  # its text_config, with the folder's token ids
            text = dict(cfg.get("text_config") or {})
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in cfg and text.get(key) is None:
                    text[key] = cfg[key]
            if "tie_word_embeddings" in cfg:  # the composite model ties (or not) its head
                text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
            model_type = text["model_type"] = _TEXT_TOWERS[model_type]
            cfg = text
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture model_type={model_type!r} in config.json; "
                f"pvjax supports {SUPPORTED_ARCHITECTURES} (and gemma3's text tower)"
            )
        cfg = {**_DEFAULTS.get(model_type, {}), **cfg}

        def need(key):
            if key not in cfg:
                raise ConfigError(f"config.json is missing the field {key!r}")
            return cfg[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        n_layers = need("num_hidden_layers")
        gemma = model_type in _GEMMA
        theta, rope_type, scaling_items, local_theta = _rope(cfg, model_type)
        if cfg.get("attention_bias") and model_type != "qwen2":
            raise ConfigError(f"{model_type} configs with attention_bias=True are not supported")
        if cfg.get("mlp_bias"):
            raise ConfigError("configs with mlp_bias=True are not supported")
        if gemma and cfg.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention=True is not supported (causal only)")
        act_field = "hidden_activation" if gemma else "hidden_act"
        act = cfg.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
        want = "gelu_pytorch_tanh" if gemma else "silu"
        if act != want:
            raise ConfigError(
                f"{act_field}={act!r} is not supported for {model_type} (only {want})"
            )
        window, layer_types = _windows(cfg, model_type, n_layers)
        query_scale = None
        if gemma:
            scalar = cfg.get("query_pre_attn_scalar", 256)
            query_scale = None if scalar == head_dim else float(scalar) ** -0.5
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            architecture=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling=scaling_items if rope_type != "default" else (),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=cfg.get("pad_token_id"),
            name=name or cfg.get("_name_or_path", "") or "",
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            norm_plus_one=gemma,
            embed_scale=gemma,
            sandwich_norms=gemma,
            activation=_HF_ACTIVATIONS[act],
            query_scale=query_scale,
            # transformers' Gemma 3 attention never soft-caps, whatever its config says.
            attn_softcap=_cap(cfg.get("attn_logit_softcapping"))
            if model_type == "gemma2"
            else None,
            final_softcap=_cap(cfg.get("final_logit_softcapping")) if gemma else None,
            sliding_window=window,
            layer_types=layer_types,
            local_rope_theta=local_theta,
            **_experts(cfg, model_type, n_layers),
        )


def _cap(v) -> float | None:
    return None if v is None else float(v)


def _rope_fields(rope: Mapping[str, Any], default_theta: float):
    """`(theta, type, sorted numeric scaling items)` of one rope parameter dict."""
    rope = dict(rope)
    theta = rope.pop("rope_theta", default_theta)
    rope_type = rope.pop("rope_type", rope.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope_type {rope_type!r} (rope_parameters / rope_scaling); "
            f"supported: {SUPPORTED_ROPE_TYPES}"
        )
    items = tuple(
        sorted(
            (k, float(v))
            for k, v in rope.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
    )
    return float(theta), rope_type, items


def _rope(cfg: Mapping[str, Any], model_type: str):
    """`(theta, type, scaling items, local theta or None)`. transformers 5 moved rope settings into
    `rope_parameters` (Gemma 3: one dict per attention kind); older files use rope_theta,
    rope_scaling and Gemma 3's rope_local_base_freq. Both are read."""
    params = dict(cfg.get("rope_parameters") or {})
    if model_type == "gemma3_text":
        if "full_attention" in params or "sliding_attention" in params:
            full = dict(params.get("full_attention") or {})
            local = dict(params.get("sliding_attention") or {})
        else:
            full = {**(cfg.get("rope_scaling") or {}), **params}
            local = {}
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        theta, rope_type, items = _rope_fields(full, 1_000_000.0)
        local_theta, local_type, _ = _rope_fields(local, 10_000.0)
        if local_type != "default":
            raise ConfigError(
                f"rope_parameters.sliding_attention.rope_type={local_type!r} is not supported "
                "(Gemma 3's local layers rotate with the default rope)"
            )
        return theta, rope_type, items, local_theta
    rope = {**(cfg.get("rope_scaling") or {}), **params}
    return (*_rope_fields(rope, cfg.get("rope_theta", 10000.0)), None)


def _windows(cfg: Mapping[str, Any], model_type: str, n_layers: int):
    """`(sliding_window or None, layer_types)` as transformers derives them for `model_type`
    (its config classes' defaults when `layer_types` is absent); `layer_types` is () when every
    block is a full-attention block and no local rope depends on it."""
    window = cfg.get("sliding_window")
    if model_type == "llama" or (
        model_type in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False)
    ):
        window = None
    types = cfg.get("layer_types")
    if types is None:
        if model_type in ("qwen2", "qwen3"):
            start = cfg.get("max_window_layers", 28)
            types = [
                "sliding_attention" if window and i >= start else "full_attention"
                for i in range(n_layers)
            ]
        elif model_type in ("mistral", "ministral", "qwen3_moe"):
            types = ["sliding_attention" if window else "full_attention"] * n_layers
        elif model_type == "gemma2":
            types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
            ]
        elif model_type == "gemma3_text":
            pattern = cfg.get("sliding_window_pattern", 6)
            types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(n_layers)
            ]
        else:
            types = []
    elif model_type in ("mistral", "qwen3_moe"):
        # transformers' Mistral and Qwen3-MoE ignore layer_types: a window, if any, is everywhere.
        types = ["sliding_attention" if window else "full_attention"] * n_layers
    types = tuple(types)
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise ConfigError(
            f"layer_types holds {bad}: attention kinds pvjax does not implement "
            f"(supported: {LAYER_TYPES})"
        )
    if window is None and model_type != "gemma3_text":
        types = ()
    if all(t == "full_attention" for t in types):
        types = ()
    return (int(window) if window is not None and types else None), types


def _experts(cfg: Mapping[str, Any], model_type: str, n_layers: int) -> dict:
    """Qwen3-MoE's expert fields. A block routes to experts unless it is in `mlp_only_layers` or
    `decoder_sparse_step` skips it (transformers' `Qwen3MoeDecoderLayer`); the others keep the
    dense MLP of `intermediate_size` (`dense_blocks`)."""
    if model_type != "qwen3_moe":
        return {}
    n = int(
        cfg.get("num_experts", cfg.get("num_local_experts", 128))
    )  # transformers 5 saves the latter
    if n <= 0:
        raise ConfigError(f"num_experts={n}: a qwen3_moe config needs experts")
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, (list, tuple)) or not all(isinstance(i, int) for i in only):
        raise ConfigError(f"mlp_only_layers={only!r} must be a list of block indices")
    step = int(cfg.get("decoder_sparse_step", 1))
    if step < 1:
        raise ConfigError(f"decoder_sparse_step={step} must be >= 1")
    dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
    if len(dense) == n_layers:
        raise ConfigError(
            f"mlp_only_layers={list(only)}, decoder_sparse_step={step}: no block routes to "
            "experts (a dense model: use model_type qwen3)"
        )
    k = int(cfg.get("num_experts_per_tok", 8))
    if not 1 <= k <= n:
        raise ConfigError(f"num_experts_per_tok={k} must be in 1..num_experts={n}")
    return dict(
        num_experts=n,
        experts_per_token=k,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        dense_blocks=dense,
    )
