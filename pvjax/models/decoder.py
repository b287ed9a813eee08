"""One Llama-like decoder (Llama 2/3/3.1, SmolLM2, Qwen2/2.5) as a pure function of a param pytree.

Shape legend: B batch, T new positions, S cache slots, D hidden, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim, F mlp width, V vocab, N blocks, L = N + 1 rows of
`hidden_states`.

Per-layer weights are stacked on a leading N axis and the blocks run under `lax.scan`, so a model of
any depth compiles once and the per-row captures come out stacked. Row l of every capture is what
transformers reports as `hidden_states[l]`: row 0 the embeddings, row l < N the raw output of block
l, row N the output of the last block *after the final norm* (transformers' convention; the raw
block-N output is never reported). Interventions at row N act on the raw block output, before the
final norm.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pvjax.capture import Capture, ForwardOutput, row_capture
from pvjax.models.config import ModelConfig
from pvjax.interventions import Intervention, apply_row
from pvjax.kernels import PackedWeight, decode_attention
from pvjax.models.low_rank import LowRank
from pvjax.models.rope import apply_rope, inverse_frequencies, rope_tables

_MASKED = -1e30  # finite, so fully padded query rows give garbage, not NaN that could leak into sums


class KVCache(NamedTuple):
    k: jax.Array | tuple  # [N, B*K, E, S], or N arrays [B*K, E, S] for unstacked layers
    v: jax.Array | tuple  # [N, B*K, S, E], or N arrays [B*K, S, E]
    valid: jax.Array  # [B, S] bool: slot holds a real token
    index: jax.Array  # [] int32: next slot to write


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype, *, stacked: bool = True,
               split: bool = False) -> KVCache:
    """An empty cache. `split` keeps batch and kv heads on two axes (`[.., B, K, E, S]` and
    `[.., B, K, S, E]`), so that a mesh can lay the batch over "data" and the kv heads over
    "model"; the merged default is the faster single-device layout."""
    # Heads before slots, keys transposed: both decode-attention products are then plain batched
    # matmuls over contiguous blocks (q [G, E] @ k [E, S], p [G, S] @ v [S, E]). Batch and kv heads
    # share one axis so that no axis has size 1 at batch 1: XLA turns a size-1 axis into a bitcast,
    # which stops the cache update from running in place (measured: three copies of every cache
    # buffer per step, 4 ms of a 36 ms SmolLM2 step on this CPU).
    bk = (batch, cfg.num_kv_heads) if split else (batch * cfg.num_kv_heads,)
    v_shape = bk + (slots, cfg.head_dim)
    k_shape = bk + (cfg.head_dim, slots)

    def zeros(shape):  # separate buffers, so a cache can be donated
        if stacked:
            return jnp.zeros((cfg.num_layers,) + shape, dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

    return KVCache(zeros(k_shape), zeros(v_shape), jnp.zeros((batch, slots), bool),
                   jnp.zeros((), jnp.int32))


def unstack_layers(params, cfg: ModelConfig, pack: bool = False, fuse: bool = True):
    """The same weights as N per-layer dicts, with q/k/v and gate/up fused into single matrices
    (unless `fuse=False`: a tensor-parallel mesh splits each over its heads, which a fused matrix
    would mix). With `pack`, every matrix (and the output head, as `head`) becomes a
    `PackedWeight` for the CPU decode kernel (`pvjax.kernels`).

    XLA copies the weight slice that `lax.scan` feeds each step, which doubles the memory traffic
    of small-batch decoding (measured on CPU, 43 ms vs 23 ms per step for SmolLM2's MLPs, and on
    an H100, 17.1 vs 7.45 ms per 7B batch-64 step); an unrolled program over separate arrays
    reads each weight once. Costs one extra copy of the weights while both are alive.
    """
    layers = params["layers"]
    out = []
    for i in range(cfg.num_layers):
        lp = {k: v[i] for k, v in layers.items()}
        if not fuse:
            out.append(lp)
            continue
        lp["wqkv"] = jnp.concatenate([lp.pop("wq"), lp.pop("wk"), lp.pop("wv")], axis=-1)
        if cfg.qkv_bias:
            lp["bqkv"] = jnp.concatenate([lp.pop("bq"), lp.pop("bk"), lp.pop("bv")], axis=-1)
        lp["w_gate_up"] = jnp.concatenate([lp.pop("w_gate"), lp.pop("w_up")], axis=-1)
        if pack:
            lp = {k: PackedWeight.pack(v) if v.ndim == 2 else v for k, v in lp.items()}
        out.append(lp)
    extra = {}
    if pack:
        extra["head"] = PackedWeight.pack(params["embed"].T if cfg.tie_embeddings else params["lm_head"])
    return {**params, **extra, "layers": tuple(out)}


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def _attention(q_BTHE, k_BKES, v_BKSE, mask_BTS):
    """Grouped-query attention as two batched matmuls over (batch, kv head), queries of a group
    stacked on the rows. Scores and the softmax are float32 (as transformers); the probabilities
    are normalised after the value product, which saves a pass over the [.., T, S] tensor (a
    third of the attention time of a packed 256-token row on CPU). Keys and values may come in
    the cache's merged layout, `[B*K, E, S]` and `[B*K, S, E]`."""
    B, T, H, E = q_BTHE.shape
    if k_BKES.ndim == 3:
        if T == 1:
            return _decode_attention(q_BTHE, k_BKES, v_BKSE, mask_BTS)
        K = k_BKES.shape[0] // B
        k_BKES = k_BKES.reshape(B, K, E, -1)
        v_BKSE = v_BKSE.reshape(B, K, -1, E)
    K, S = k_BKES.shape[1], k_BKES.shape[3]
    G = H // K
    q = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
    s = jnp.einsum("bkqe,bkes->bkqs", q, k_BKES).astype(jnp.float32).reshape(B, K, G, T, S) * (E ** -0.5)
    s = jnp.where(mask_BTS[:, None, None], s, _MASKED)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("bkqs,bkse->bkqe", e.reshape(B, K, G * T, S).astype(v_BKSE.dtype), v_BKSE)
    o = (o.astype(jnp.float32) / jnp.sum(e, axis=-1).reshape(B, K, G * T, 1)).astype(v_BKSE.dtype)
    return o.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H * E)


def _decode_attention(q_BTHE, k_NES, v_NSE, mask_BTS):
    """One new token against the merged cache (N = B*K rows of kv heads): a batched matmul per
    kv head over its contiguous block, the group's queries on the rows. The cache is read in its
    own shape: a reshape here would make XLA duplicate the cache update into a second fusion and
    copy the whole cache for both (measured, batch 16)."""
    B, T, H, E = q_BTHE.shape
    N = k_NES.shape[0]
    K = N // B
    q = q_BTHE.reshape(N, H // K, E)
    s = jnp.einsum("nge,nes->ngs", q, k_NES).astype(jnp.float32) * (E ** -0.5)
    mask = jnp.repeat(mask_BTS, K, axis=0)  # [N, 1, S]
    s = jnp.where(mask, s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v_NSE.dtype)
    return jnp.einsum("ngs,nse->nge", p, v_NSE).reshape(B, T, H * E)


def _mm(x, w_IO):
    """`x @ w` with the leading axes folded into one: XLA's CPU dots run the 2-D form faster."""
    if isinstance(w_IO, PackedWeight):
        return (x @ w_IO).astype(x.dtype)
    if isinstance(w_IO, LowRank):  # LoRA in training: x @ W + s (x @ A) @ B, W never updated
        return _mm(x, w_IO.base) + (_mm(_mm(x, w_IO.a), w_IO.b) * w_IO.scale).astype(x.dtype)
    y = x.reshape(-1, x.shape[-1]) @ w_IO
    return y.reshape(x.shape[:-1] + y.shape[-1:])


def _block(cfg: ModelConfig, lp, h, cos, sin, attend):
    """One decoder block. `attend(q, k, v) -> (attention output, new cache)` hides the cache."""
    B, T, _ = h.shape
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    if "wqkv" in lp:  # unstacked layers (see `unstack_layers`)
        qkv = _mm(x, lp["wqkv"]) + (lp["bqkv"] if cfg.qkv_bias else 0)
        nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    else:
        q, k, v = _mm(x, lp["wq"]), _mm(x, lp["wk"]), _mm(x, lp["wv"])
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q.reshape(B, T, cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rope(k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    o, new_cache = attend(q, k, v)
    h = h + _mm(o, lp["wo"])
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    if "w_gate_up" in lp:
        gu = _mm(x, lp["w_gate_up"])
        gate, up = gu[..., :cfg.intermediate_size], gu[..., cfg.intermediate_size:]
        h = h + _mm(jax.nn.silu(gate) * up, lp["w_down"])
    else:
        h = h + _mm(jax.nn.silu(_mm(x, lp["w_gate"])) * _mm(x, lp["w_up"]), lp["w_down"])
    return h, new_cache


def _row_intervention(iv: Intervention | None, row):
    if iv is None:
        return None
    closed = None if iv.closed_loop is None else jax.tree_util.tree_map(lambda x: x[row], iv.closed_loop)
    return (iv.steer_vectors[row], iv.steer_coefs[row], iv.ablate_dirs[row], iv.ablate_coefs[row], closed)


def _edit(h, iv: Intervention | None, row_iv):
    if iv is None:
        return h
    *edits, closed = row_iv
    return apply_row(h, *edits, iv.steer_mask, iv.ablate_mask, closed)


def decode(params, cfg: ModelConfig, tokens_BT, positions_BT, attention_mask_BT, *,
           intervention: Intervention | None = None, capture: Capture = Capture(),
           cache: KVCache | None = None, segment_ids_BT=None, scan: bool = True,
           prefill: bool = False, remat: bool = False) -> ForwardOutput:
    """Run the decoder. Without `cache`, attention is causal over `tokens` masked by
    `attention_mask`; with `segment_ids` (packed rows, 0 = padding) a token also attends only within
    its own segment. With `cache`, the new tokens are written at `cache.index` and attend to every
    valid earlier slot; the updated cache is returned in the output. `prefill` promises an empty
    cache (index 0): the tokens then attend among themselves only, not over the cache's empty
    slots (a prompt of P tokens in a cache of P + new slots). `remat` recomputes each scanned block
    in the backward pass (`jax.checkpoint` on the block): training keeps one `[B, T, D]` residual
    per block instead of every intermediate, the memory that lets long packed rows fit."""
    n_blocks = cfg.num_layers
    if intervention is not None and intervention.n_rows != n_blocks + 1:
        raise ValueError(f"intervention has {intervention.n_rows} rows, model has {n_blocks + 1}")
    probes = capture.probes
    if probes is not None and probes.ndim == 2:
        probes = jnp.broadcast_to(probes, (n_blocks + 1,) + probes.shape)

    h = params["embed"][tokens_BT]
    # Materialised once: left to fusion, XLA recomputes the cosines and sines inside every
    # layer's rotary fusion, for every head (measured: 3 ms of a 50 ms batch-16 CPU decode step).
    cos, sin = jax.lax.optimization_barrier(rope_tables(jnp.asarray(inverse_frequencies(cfg)), positions_BT))
    B, T = tokens_BT.shape
    valid_BT = jnp.asarray(attention_mask_BT).astype(bool)
    if cache is None or prefill:
        causal = jnp.tril(jnp.ones((T, T), bool))
        mask_BTS = causal[None] & valid_BT[:, None, :]
        if segment_ids_BT is not None:
            mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        slots = None if cache is None else jnp.zeros_like(cache.valid).at[:, :T].set(valid_BT)
        kv_valid = None
    else:
        S = cache.valid.shape[1]
        kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid_BT, (0, cache.index))
        q_slot = cache.index + jnp.arange(T)
        mask_BTS = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & kv_valid[:, None, :]
        slots = kv_valid

    h = _edit(h, intervention, _row_intervention(intervention, 0))
    first = row_capture(h, capture, None if probes is None else probes[0])

    def body(carry, xs):
        h, ck, cv = carry
        lp, i, row_iv, probe = xs

        def attend(q_BTHE, k_BTKE, v_BTKE):
            k, v = k_BTKE.transpose(0, 2, 3, 1), v_BTKE.transpose(0, 2, 1, 3)
            if cache is None:
                return _attention(q_BTHE, k, v, mask_BTS), (ck, cv)
            Bk, K, E = k.shape[0], k.shape[1], k.shape[2]
            local = (k, v)
            if not split:
                k, v = k.reshape(Bk * K, E, T), v.reshape(Bk * K, T, E)
            at = lambda c, x, idx: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), idx)
            start = 0 if prefill else cache.index
            at_k, at_v = (0,) * (k.ndim - 1) + (start,), (0,) * (v.ndim - 2) + (start, 0)
            if unstacked:  # per-layer caches; `i` is a Python int
                nk, nv = list(ck), list(cv)
                nk[i], nv[i] = at(ck[i], k, at_k), at(cv[i], v, at_v)
                keys, values, new = nk[i], nv[i], (tuple(nk), tuple(nv))
            else:
                nk, nv = at(ck, k[None], (i,) + at_k), at(cv, v[None], (i,) + at_v)
                keys, values, new = nk[i], nv[i], (nk, nv)
            if prefill:  # an empty cache: the new tokens attend among themselves only
                return _attention(q_BTHE, *local, mask_BTS), new
            if native and T == 1 and not split:
                return decode_attention(q_BTHE, keys, values, kv_valid, cache.index + 1), new
            return _attention(q_BTHE, keys, values, mask_BTS), new

        h, (ck, cv) = _block(cfg, lp, h, cos, sin, attend)
        h = _edit(h, intervention, row_iv)
        return (h, ck, cv), row_capture(h, capture, probe)


    row_ivs = None
    if intervention is not None:
        row_ivs = jax.tree_util.tree_map(lambda x: x[1:], _row_intervention(intervention, slice(None)))
    unstacked = isinstance(params["layers"], (list, tuple))
    # Packed weights mean the CPU kernels are built here (`unstack_layers(pack=True)`).
    native = unstacked and isinstance(params.get("head"), PackedWeight) and h.dtype == jnp.float32
    ck, cv = (cache.k, cache.v) if cache is not None else (jnp.zeros(()), jnp.zeros(()))
    # The split layout (`init_cache(split=True)`) has one more axis than the merged one.
    split = cache is not None and (ck[0].ndim == 4 if isinstance(ck, tuple) else ck.ndim == 5)
    if scan and not unstacked:
        xs = (params["layers"], jnp.arange(n_blocks), row_ivs, None if probes is None else probes[1:])
        # The scan already stops CSE across iterations, hence prevent_cse=False (jax's advice).
        step = jax.checkpoint(body, prevent_cse=False) if remat else body
        (h, ck, cv), rows = jax.lax.scan(step, (h, ck, cv), xs)
    else:
        carry, outs = (h, ck, cv), []
        for n in range(n_blocks):
            lp = params["layers"][n] if unstacked else {k: v[n] for k, v in params["layers"].items()}
            rest = jax.tree_util.tree_map(lambda x: x[n], (row_ivs, None if probes is None else probes[1:]))
            carry, out = body(carry, (lp, n) + rest)
            outs.append(out)
        (h, ck, cv) = carry
        rows = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *outs)

    normed = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    last = row_capture(normed, capture, None if probes is None else probes[-1])
    # Rows 1..N-1 come from the scan; row N is replaced by its normed version (see module docstring).
    stacked = jax.tree_util.tree_map(
        lambda a, mid, z: jnp.concatenate([a[None], mid[:-1], z[None]]), first, rows, last)

    logits = None
    if capture.logits != "none":
        x = {"last": normed[:, -1:], "all": normed}.get(capture.logits)
        if x is None:  # "tail:N": the last N positions (left-padded answers end the row)
            x = normed[:, -int(capture.logits.split(":")[1]):]
        head = params.get("head")  # packed for the CPU kernel (`unstack_layers`)
        if head is None:
            head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        logits = _mm(x, head).astype(jnp.float32)

    new_cache = None
    if cache is not None:
        new_cache = KVCache(ck, cv, slots, cache.index + T)
    return ForwardOutput(logits=logits, hidden_states=stacked.get("hidden"),
                         pooled=stacked.get("pooled"), projections=stacked.get("projections"),
                         cache=new_cache)
