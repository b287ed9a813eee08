"""Qwen3-MoE's routed expert MLP: a router picks `k` of `X` experts per token (softmax, top-k,
renormalised when the config says `norm_topk_prob`), and the token's MLP output is the
router-weighted sum of those experts' SwiGLU outputs.

Shape legend: M tokens (B * T), D hidden, X experts, k experts per token, I expert width.

Two ways to run the same numbers, chosen by the static count of token-expert pairs:
- few pairs (decoding: one token per row): each pair gathers its expert's weights, so a step
  reads only the routed experts (`M k` expert matrices), never all `X`;
- many pairs (a prompt, training): the pairs are sorted by expert and run as one grouped matmul
  per weight (`jax.lax.ragged_dot`), each expert's weights read once for all its tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pvjax.models.config import ModelConfig


def route(cfg: ModelConfig, router_DX, x_MD, matmul):
    """`(weights [M, k] in x's dtype, expert ids [M, k])`: float32 softmax over the router
    logits, top-k, renormalised if `cfg.norm_topk_prob` (transformers' order)."""
    probs = jax.nn.softmax(matmul(x_MD, router_DX).astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return top_p.astype(x_MD.dtype), top_i


def moe_mlp(cfg: ModelConfig, lp, x_BTD, matmul):
    """The expert MLP on the normed residual `x` `[B, T, D]` (`matmul` as the block's, for the
    router). Expert weights: `w_gate_e`/`w_up_e` `[X, D, I]`, `w_down_e` `[X, I, D]`."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    w_Mk, idx_Mk = route(cfg, lp["router"], x, matmul)
    M, k = idx_Mk.shape
    if M * k < cfg.num_experts:  # decoding: gather the routed experts only
        gate = jnp.einsum("md,mkdi->mki", x, lp["w_gate_e"][idx_Mk])
        up = jnp.einsum("md,mkdi->mki", x, lp["w_up_e"][idx_Mk])
        y = jnp.einsum("mki,mkid->mkd", jax.nn.silu(gate) * up, lp["w_down_e"][idx_Mk])
        out = jnp.einsum("mkd,mk->md", y, w_Mk)
    else:  # grouped by expert
        flat = idx_Mk.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
        xs = x[token]
        gate = jax.lax.ragged_dot(xs, lp["w_gate_e"], sizes)
        up = jax.lax.ragged_dot(xs, lp["w_up_e"], sizes)
        y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, lp["w_down_e"], sizes)
        y = y * w_Mk.reshape(-1)[order][:, None]
        out = jnp.zeros_like(x).at[token].add(y)
    return out.reshape(B, T, D)
