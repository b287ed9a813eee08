"""One decoder block and its parts, shared by the forward without cache and the cached decode step.

Shape legend: B batch, T new positions, S key slots, D hidden, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim, F mlp width.

The block is Llama's; the families past it switch parts on with static config flags
(`pvjax.models.config.ModelConfig`): q/k norms (Qwen3, Gemma 3), `1 + w` norms, norms after
attention and MLP, a GeGLU MLP and soft-capped scores (Gemma), routed experts (Qwen3-MoE,
`pvjax.models.moe`). A family that leaves a flag off compiles exactly the Llama program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pvjax.kernels import PackedWeight
from pvjax.models.config import ModelConfig
from pvjax.models.low_rank import LowRank
from pvjax.models.moe import moe_mlp
from pvjax.models.rope import apply_rope

_MASKED = (
    -1e30
)  # finite, so fully padded query rows give garbage, not NaN that could leak into sums


def rms_norm(x, w, eps, plus_one: bool = False):
    """RMSNorm over the last axis, statistics in float32. `plus_one` (Gemma) scales by `1 + w`
    in float32 before the cast back, as transformers' Gemma norms do; otherwise `w` scales the
    normalised value after the cast, as Llama's do."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * x32.astype(x.dtype)


def _scores(s, E, scale, softcap):
    """Raw float32 scores scaled (`scale`, default `E ** -0.5`) and soft-capped
    (`softcap * tanh(s / softcap)`, Gemma 2) as transformers orders it."""
    s = s * (E**-0.5 if scale is None else scale)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def attention(q_BTHE, k_BKES, v_BKSE, mask_BTS, scale=None, softcap=None):
    """Grouped-query attention as two batched matmuls over (batch, kv head), queries of a group
    stacked on the rows. Scores and the softmax are float32 (as transformers); the probabilities
    are normalised after the value product, which saves a pass over the [.., T, S] tensor (a
    third of the attention time of a packed 256-token row on CPU)."""
    B, T, H, E = q_BTHE.shape
    K, S = k_BKES.shape[1], k_BKES.shape[3]
    G = H // K
    q = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
    s = jnp.einsum("bkqe,bkes->bkqs", q, k_BKES).astype(jnp.float32).reshape(B, K, G, T, S)
    s = _scores(s, E, scale, softcap)
    s = jnp.where(mask_BTS[:, None, None], s, _MASKED)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("bkqs,bkse->bkqe", e.reshape(B, K, G * T, S).astype(v_BKSE.dtype), v_BKSE)
    o = (o.astype(jnp.float32) / jnp.sum(e, axis=-1).reshape(B, K, G * T, 1)).astype(v_BKSE.dtype)
    return o.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H * E)


def merged_attention(q_BTHE, k_NES, v_NSE, mask_BTS, scale=None, softcap=None):
    """`attention` against keys and values in the cache's merged layout (N = B*K rows of kv
    heads, `[N, E, S]` and `[N, S, E]`)."""
    B, T, H, E = q_BTHE.shape
    if T == 1:
        return one_token_attention(q_BTHE, k_NES, v_NSE, mask_BTS, scale, softcap)
    K = k_NES.shape[0] // B
    return attention(
        q_BTHE, k_NES.reshape(B, K, E, -1), v_NSE.reshape(B, K, -1, E), mask_BTS, scale, softcap
    )


def one_token_attention(q_BTHE, k_NES, v_NSE, mask_BTS, scale=None, softcap=None):
    """One new token against the merged cache (N = B*K rows of kv heads): a batched matmul per
    kv head over its contiguous block, the group's queries on the rows. The cache is read in its
    own shape: a reshape here would make XLA duplicate the cache update into a second fusion and
    copy the whole cache for both (measured, batch 16)."""
    B, T, H, E = q_BTHE.shape
    N = k_NES.shape[0]
    K = N // B
    q = q_BTHE.reshape(N, H // K, E)
    s = _scores(jnp.einsum("nge,nes->ngs", q, k_NES).astype(jnp.float32), E, scale, softcap)
    mask = jnp.repeat(mask_BTS, K, axis=0)  # [N, 1, S]
    s = jnp.where(mask, s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v_NSE.dtype)
    return jnp.einsum("ngs,nse->nge", p, v_NSE).reshape(B, T, H * E)


def matmul(x, w_IO):
    """`x @ w`, by the weight's type: a `PackedWeight` runs the CPU kernel, a `LowRank` adds its
    delta without forming `W + s A B`, an array runs XLA's dot with the leading axes folded into
    one (XLA's CPU dots run the 2-D form faster)."""
    if isinstance(w_IO, PackedWeight):
        return (x @ w_IO).astype(x.dtype)
    if isinstance(w_IO, LowRank):  # LoRA in training: x @ W + s (x @ A) @ B, W never updated
        return matmul(x, w_IO.base) + (matmul(matmul(x, w_IO.a), w_IO.b) * w_IO.scale).astype(
            x.dtype
        )
    y = x.reshape(-1, x.shape[-1]) @ w_IO
    return y.reshape(x.shape[:-1] + y.shape[-1:])


def _gate(cfg: ModelConfig, g):
    if cfg.activation == "gelu_tanh":  # transformers' gelu_pytorch_tanh
        return jax.nn.gelu(g, approximate=True)
    return jax.nn.silu(g)


def block(cfg: ModelConfig, fused: bool, lp, h, cos, sin, attend, routed=None):
    """One decoder block on the residual `h` `[B, T, D]`: `(new residual, what attend returned
    beside its output, routing)`. `attend(q [B, T, H, E], k, v [B, T, K, E]) -> (output
    [B, T, H*E], carry)` is where the forward and the cached step differ (a cache written or not).
    `fused`: the block's weights hold q/k/v and gate/up as single matrices (`PerLayer(fused=True)`).
    `routed`: whether an expert model's block runs its experts (a Python bool, or a traced one
    under a scan over mixed blocks: `lax.cond`); routing is `moe_mlp`'s `(router logits, expert
    ids, weights)`, zeros from a dense block of an expert model, None without experts."""
    B, T, _ = h.shape
    eps, one = cfg.rms_norm_eps, cfg.norm_plus_one
    x = rms_norm(h, lp["attn_norm"], eps, one)
    if fused:
        qkv = matmul(x, lp["wqkv"]) + (lp["bqkv"] if cfg.qkv_bias else 0)
        nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
    else:
        q, k, v = matmul(x, lp["wq"]), matmul(x, lp["wk"]), matmul(x, lp["wv"])
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # per head, before rope (Qwen3, Gemma 3)
        q, k = rms_norm(q, lp["q_norm"], eps, one), rms_norm(k, lp["k_norm"], eps, one)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    o, carry = attend(q, k, v)
    if cfg.sandwich_norms:  # Gemma: the attention output is normed before the residual add
        h = h + rms_norm(matmul(o, lp["wo"]), lp["post_attn_norm"], eps, one)
    else:
        h = h + matmul(o, lp["wo"])
    x = rms_norm(h, lp["mlp_norm"], eps, one)
    routing = None
    if not cfg.num_experts:
        m = _dense_mlp(cfg, fused, lp, x)
    elif routed is None or routed is True:  # Qwen3-MoE: routed experts
        m, routing = moe_mlp(cfg, lp, x, matmul)
    elif routed is False:  # a dense block of an expert model, known while tracing
        m, routing = _dense_mlp(cfg, fused, lp, x), _no_routing(cfg, x)
    else:  # traced under a scan over mixed blocks: one branch runs
        m, routing = jax.lax.cond(
            routed,
            lambda: moe_mlp(cfg, lp, x, matmul),
            lambda: (_dense_mlp(cfg, fused, lp, x), _no_routing(cfg, x)),
        )
    if cfg.sandwich_norms:
        m = rms_norm(m, lp["post_mlp_norm"], eps, one)
    return h + m, carry, routing


def _dense_mlp(cfg: ModelConfig, fused: bool, lp, x):
    if fused and "w_gate_up" in lp:
        gu = matmul(x, lp["w_gate_up"])
        gate, up = gu[..., : cfg.intermediate_size], gu[..., cfg.intermediate_size :]
        return matmul(_gate(cfg, gate) * up, lp["w_down"])
    return matmul(_gate(cfg, matmul(x, lp["w_gate"])) * matmul(x, lp["w_up"]), lp["w_down"])


def _no_routing(cfg: ModelConfig, x_BTD):
    """A dense block's routing in an expert model: zero logits, expert 0 at weight 0 (the shapes
    and dtypes of `moe_mlp`'s, so that a scan over mixed blocks can stack them)."""
    B, T, _ = x_BTD.shape
    k = cfg.experts_per_token
    return (
        jnp.zeros((B, T, cfg.num_experts), jnp.float32),
        jnp.zeros((B, T, k), jnp.int32),
        jnp.zeros((B, T, k), x_BTD.dtype),
    )
