"""Rotary position embeddings in transformers' "rotate half" layout, with llama3 and linear
scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from pvjax.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Per-pair rotation frequencies `[head_dim // 2]`, scaled as the config's rope type asks;
    `local`: the sliding blocks' unscaled rope of base `cfg.local_rope_theta` (Gemma 3)."""
    dim = cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if local:
        return inv.astype(np.float32)
    p = cfg.rope_params
    if cfg.rope_type == "linear":
        inv = inv / p["factor"]
    elif cfg.rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_ctx = p["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(inv_freq: jnp.ndarray, positions_BT: jnp.ndarray):
    """cos and sin `[B, T, head_dim]`, float32 (as transformers computes them)."""
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTNH: jnp.ndarray, cos_BTH: jnp.ndarray, sin_BTH: jnp.ndarray) -> jnp.ndarray:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = (
        cos_BTH[:, :, None, :].astype(x_BTNH.dtype),
        sin_BTH[:, :, None, :].astype(x_BTNH.dtype),
    )
    return x_BTNH * cos + rotated * sin
