"""Qwen3-MoE's routed expert MLP: a router picks `k` of `X` experts per token (softmax, top-k,
renormalised when the config says `norm_topk_prob`), and the token's MLP output is the
router-weighted sum of those experts' SwiGLU outputs.

Shape legend: M tokens (B * T), D hidden, X experts, k experts per token, I expert width.

Four ways to run the same numbers. On accelerators, by the static count of token-expert pairs:
- few pairs (decoding: one token per row): each pair gathers its expert's weights, so a step
  reads only the routed experts (`M k` expert matrices), never all `X`;
- many pairs (a prompt, training): the pairs are sorted by expert and run as one grouped matmul
  per weight (`jax.lax.ragged_dot`), each expert's weights read once for all its tokens.
On CPU with float32 experts, XLA's gather and `ragged_dot` are slow (copies element by element),
so two scans take their place there: over the pairs for a few tokens (`experts_paired`, a decode
step), over blocks of pairs sorted by expert for many (`experts_blocked`, a prompt or training
rows: each block multiplies a whole tile of tokens by its expert's weights).

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
    """Which way `moe_mlp` runs the experts for `tokens` tokens: "paired", "blocked",
    "gathered" or "grouped" (the module's docstring)."""
    pairs = tokens * cfg.experts_per_token
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32:
        # XLA's CPU gather copies float32 experts element by element (0.6 GB/s at Qwen3-30B-A3B's
        # shapes) and its ragged_dot is slower still; scans slice each expert whole. Not for bf16
        # weights: there XLA converts the whole expert stack inside a scan, 14x slower than the
        # gather (benchmarks/NOTES.md). Pairs one at a time read an expert per pair; tiles read
        # each routed expert once but multiply whole tiles, mostly padding while an expert has
        # few pairs. Measured at 8 experts (D 576, I 768): equal at 2 pairs per expert, tiles
        # 1.8x faster at 4 and 8.6x at 224 (a 224-token prompt row).
        return "paired" if pairs < 2 * cfg.num_experts else "blocked"
    return "gathered" if pairs < cfg.num_experts else "grouped"


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
    elif path == "blocked":
        out = experts_blocked(lp, x, w_Mk, idx_Mk, cfg.num_experts)
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


def experts_blocked(lp, x_MD, w_Mk, idx_Mk, n_experts: int, block: int | None = None):
    """The same sum with the pairs sorted by expert and each expert's run padded to whole tiles
    of `block` pairs: a scan over the tiles multiplies `[block, D]` tokens by the tile's expert.
    Every expert's pairs fill `ceil(pairs / block)` tiles, so there are at most
    `ceil(M k / block) + X` of them; tiles past the last filled one skip their products.
    `block` by default: 64 pairs where experts average 32 or more, else 32 (measured at 8
    experts, D 576, I 768: 896 tokens 46 against 54 ms, their gradient 203 against 278; 16
    tokens 8 against 12 ms)."""
    M, k = idx_Mk.shape
    if block is None:
        block = 64 if M * k >= 32 * n_experts else 32
    flat = idx_Mk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert_s = flat[order]
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    tiles = (sizes + block - 1) // block
    tile_end = jnp.cumsum(tiles)  # [X] tiles up to and including each expert's
    group_start = jnp.cumsum(sizes) - sizes
    slot_start = (tile_end - tiles) * block
    # Pair j of the sorted order goes to its expert's slot run, in order.
    slot = slot_start[expert_s] + jnp.arange(M * k, dtype=jnp.int32) - group_start[expert_s]
    n_tiles = -(-(M * k) // block) + n_experts
    rows = jnp.zeros((n_tiles * block,), jnp.int32).at[slot].set((order // k).astype(jnp.int32))
    tile_expert = jnp.minimum(
        jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), n_experts - 1
    )
    used = jnp.arange(n_tiles) < tile_end[-1]
    xs = x_MD[rows].reshape(n_tiles, block, -1)

    def tile(_, t):
        x_TD, e, on = t

        def run():
            w = lambda name: jax.lax.dynamic_index_in_dim(lp[name], e, keepdims=False)
            return (jax.nn.silu(x_TD @ w("w_gate_e")) * (x_TD @ w("w_up_e"))) @ w("w_down_e")

        return None, jax.lax.cond(on, run, lambda: jnp.zeros_like(x_TD))

    _, y = jax.lax.scan(tile, None, (xs, tile_expert.astype(jnp.int32), used))
    # Back to token order by a gather (each token's k slots), not a scatter-add over the tiles:
    # XLA's CPU scatter runs element by element.
    pair_slot = jnp.zeros((M * k,), jnp.int32).at[order].set(slot)
    y_MkD = y.reshape(n_tiles * block, -1)[pair_slot].reshape(M, k, -1)
    return jnp.einsum("mkd,mk->md", y_MkD, w_Mk)
