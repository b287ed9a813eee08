"""Random parameters for a config: benchmarks of large shapes without a checkpoint on disk."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pvjax.loading.layout import expected_shapes
from pvjax.models.config import ModelConfig
from pvjax.models.known import KNOWN
from pvjax.models.moe import blocks_holding

# Qwen2.5-7B-Instruct's shapes (config.json of the public checkpoint).
QWEN25_7B = dataclasses.replace(KNOWN["qwen2.5-7b"], name="random-qwen2.5-7b-shape")


def random_params(cfg: ModelConfig, key, dtype=jnp.bfloat16, scale: float = 0.02):
    """Normal(0, scale) weights, unit norms (ones, or zeros where the config applies norm weights
    as 1 + w); created inside jit so they can be born sharded."""
    shapes = expected_shapes(cfg)

    def make(key):
        keys = iter(jax.random.split(key, 64))

        def leaf(shape, norm):
            return (
                jnp.full(shape, 0.0 if cfg.norm_plus_one else 1.0, dtype)
                if norm
                else (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
            )

        params = {k: leaf(s, k.endswith("norm")) for k, s in shapes["top"].items()}
        params["layers"] = {
            k: leaf((len(blocks_holding(cfg, k)),) + s, k.endswith("norm"))
            for k, s in shapes["layer"].items()
        }
        return params

    return jax.jit(make)(key)


def flops_per_token(cfg: ModelConfig, context: int = 0) -> float:
    """Forward FLOPs per token: 2 x matmul parameters, plus attention over `context` keys."""
    D, F, N = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * F
    attn = 2 * 2 * cfg.num_heads * cfg.head_dim * context
    return 2.0 * N * per_layer + N * attn + 2.0 * D * cfg.vocab_size
