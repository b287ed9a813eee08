"""Qwen3-MoE's routed expert MLP: a router picks `k` of `X` experts per token (softmax, top-k,
renormalised when the config says `norm_topk_prob`), and the token's MLP output is the
router-weighted sum of those experts' SwiGLU outputs.

Shape legend: M tokens (B * T), D hidden, X experts, k experts per token, I expert width.

Three ways to run the same numbers. On accelerators, by the static count of token-expert pairs:
- few pairs (decoding: one token per row): each pair gathers its expert's weights, so a step
  reads only the routed experts (`M k` expert matrices), never all `X`;
- many pairs (a prompt, training): the pairs are sorted by expert and run as one grouped matmul
  per weight (`jax.lax.ragged_dot`), each expert's weights read once for all its tokens.
On CPU with float32 experts, a scan over the pairs (`experts_paired`), faster there than either.

A model may keep the dense MLP in some blocks (`ModelConfig.dense_blocks`). Its stacked weights
then hold each MLP only for the blocks that run it (`blocks_holding`): the expert weights
`[routed blocks, X, ...]`, the dense ones `[dense blocks, ...]`, the rest `[N, ...]`. The other
way, every block holding both kinds at full size so that one `[N, ...]` stack covers all, would
cost Qwen3-30B-A3B's shapes (D 2048, X 128, I 768, F 6144) 604 M expert parameters (1.2 GB in
bf16) for each dense block and 38 M dense ones for each routed block; grouping costs nothing,
and the scan still runs every block: it picks the block's slot of each group
(`group_weights`) and branches on `lax.cond`, which runs one MLP, not both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pvjax.models.config import ModelConfig

EXPERT_KEYS = ("router", "w_gate_e", "w_up_e", "w_down_e")
DENSE_KEYS = ("w_gate", "w_up", "w_down")


def blocks_holding(cfg: ModelConfig, key: str) -> tuple[int, ...]:
    """The blocks whose weights the stacked layer weight `key` holds, in stack order: the routed
    blocks for an expert weight, the dense blocks for a dense MLP weight of an expert model,
    every block otherwise."""
    if cfg.num_experts and key in EXPERT_KEYS:
        return tuple(i for i, r in enumerate(cfg.routed) if r)
    if cfg.num_experts and key in DENSE_KEYS:
        return tuple(cfg.dense_blocks)
    return tuple(range(cfg.num_layers))


def grouped_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """The layer weights stacked over fewer than all blocks (an expert model with dense blocks)."""
    return EXPERT_KEYS + DENSE_KEYS if cfg.dense_blocks else ()


def group_weights(cfg: ModelConfig, grouped: dict, i) -> dict:
    """Block `i`'s slice of each grouped weight (`grouped_keys`). `i` a Python int: only the
    weights block `i` holds; traced (a scan): every group's, at the block's slot (slot 0 of the
    group the block is not in, which its `lax.cond` branch never reads)."""
    out = {}
    for key, stack in grouped.items():
        held = blocks_holding(cfg, key)
        if isinstance(i, int):
            if i in held:
                out[key] = stack[held.index(i)]
            continue
        slots = [held.index(n) if n in held else 0 for n in range(cfg.num_layers)]
        out[key] = stack[jnp.asarray(slots, jnp.int32)[i]]
    return out


def route(cfg: ModelConfig, router_DX, x_MD, matmul):
    """`(logits [M, X] float32, weights [M, k] in x's dtype, expert ids [M, k] int32)`: float32
    softmax over the router logits, top-k, renormalised if `cfg.norm_topk_prob` (transformers'
    order)."""
    logits = matmul(x_MD, router_DX).astype(jnp.float32)
    top_p, top_i = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.experts_per_token)
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return logits, top_p.astype(x_MD.dtype), top_i.astype(jnp.int32)


def expert_path(cfg: ModelConfig, tokens: int, dtype) -> str:
    """Which way `moe_mlp` runs the experts for `tokens` tokens: "paired", "gathered" or
    "grouped" (the module's docstring)."""
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32:
        # XLA's CPU gather copies float32 experts element by element (0.6 GB/s at Qwen3-30B-A3B's
        # shapes) and its ragged_dot is slower still; a scan over the pairs slices each expert
        # whole and beat both at every size measured, 1 to 1024 tokens. Not for bf16 weights:
        # there XLA converts the whole expert stack inside the scan, 14x slower than the gather
        # (benchmarks/NOTES.md)
        return "paired"
    return "gathered" if tokens * cfg.experts_per_token < cfg.num_experts else "grouped"


def moe_mlp(cfg: ModelConfig, lp, x_BTD, matmul):
    """The expert MLP on the normed residual `x` `[B, T, D]` (`matmul` as the block's, for the
    router): `(output [B, T, D], (router logits [B, T, X], expert ids [B, T, k], their weights
    [B, T, k]))`. Expert weights: `w_gate_e`/`w_up_e` `[X, D, I]`, `w_down_e` `[X, I, D]`."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    logits_MX, w_Mk, idx_Mk = route(cfg, lp["router"], x, matmul)
    M, k = idx_Mk.shape
    path = expert_path(cfg, M, lp["w_gate_e"].dtype)
    if path == "paired":
        out = experts_paired(lp, x, w_Mk, idx_Mk)
    elif path == "gathered":
        out = experts_gathered(lp, x, w_Mk, idx_Mk)
    else:
        out = experts_grouped(lp, x, w_Mk, idx_Mk, cfg.num_experts)
    routing = (logits_MX.reshape(B, T, -1), idx_Mk.reshape(B, T, k), w_Mk.reshape(B, T, k))
    return out.reshape(B, T, D), routing


def experts_gathered(lp, x_MD, w_Mk, idx_Mk):
    """The routed experts' outputs summed, each token-expert pair gathering its expert's weights
    (`[M, k, D, I]`): reads the `M k` routed expert matrices, duplicates included."""
    gate = jnp.einsum("md,mkdi->mki", x_MD, lp["w_gate_e"][idx_Mk])
    up = jnp.einsum("md,mkdi->mki", x_MD, lp["w_up_e"][idx_Mk])
    y = jnp.einsum("mki,mkid->mkd", jax.nn.silu(gate) * up, lp["w_down_e"][idx_Mk])
    return jnp.einsum("mkd,mk->md", y, w_Mk)


def experts_paired(lp, x_MD, w_Mk, idx_Mk):
    """The same sum as a scan over the `M k` token-expert pairs, each slicing its expert's three
    matrices whole: reads the routed experts only, one pair at a time."""
    M, k = idx_Mk.shape

    def pair(out_MD, p):
        m, e, w = p
        x_D = x_MD[m]
        gate = x_D @ jax.lax.dynamic_index_in_dim(lp["w_gate_e"], e, keepdims=False)
        up = x_D @ jax.lax.dynamic_index_in_dim(lp["w_up_e"], e, keepdims=False)
        y = (jax.nn.silu(gate) * up) @ jax.lax.dynamic_index_in_dim(
            lp["w_down_e"], e, keepdims=False
        )
        return out_MD.at[m].add(w * y), None

    pairs = (jnp.repeat(jnp.arange(M), k), idx_Mk.reshape(-1), w_Mk.reshape(-1))
    out, _ = jax.lax.scan(pair, jnp.zeros_like(x_MD), pairs)
    return out


def experts_grouped(lp, x_MD, w_Mk, idx_Mk, n_experts: int):
    """The same sum with the pairs sorted by expert and one `ragged_dot` per weight."""
    k = idx_Mk.shape[1]
    flat = idx_Mk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    xs = x_MD[token]
    gate = jax.lax.ragged_dot(xs, lp["w_gate_e"], sizes)
    up = jax.lax.ragged_dot(xs, lp["w_up_e"], sizes)
    y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, lp["w_down_e"], sizes)
    y = y * w_Mk.reshape(-1)[order][:, None]
    return jnp.zeros_like(x_MD).at[token].add(y)
