"""One Llama-like decoder (Llama 2/3/3.1, SmolLM2, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3) as pure
functions of a param pytree:
`forward` (a full sequence, no cache) and `prefill` / `decode_step` (with a KV cache), one block
function under both (`pvjax.models.block`).

Shape legend: B batch, T new positions, S cache slots, D hidden, K kv heads, E head dim,
N blocks, L = N + 1 rows of `hidden_states`.

Each function takes the weights' layout from its caller (`pvjax.models.layout`: `Scanned`,
`Sliced` or `PerLayer`) instead of reading it off the pytree. Row l of every capture is what
transformers reports as `hidden_states[l]`: row 0 the embeddings, row l < N the raw output of block
l, row N the output of the last block *after the final norm* (transformers' convention; the raw
block-N output is never reported). Interventions at row N act on the raw block output, before the
final norm.

Sliding-window blocks (Mistral, Qwen3 with a window, Gemma's local blocks) attend to the last
`cfg.sliding_window` tokens, themselves included: a mask over the same cache (the cache keeps every
slot; a masked cache, not a ring). The distance counts real tokens, so it is transformers' slot
distance on a left-padded row, and stays right across the padding gap a shared prefix leaves in a
cache. Which blocks slide (and which rotate with a local rope) is static: unrolled layouts pick
per block while tracing, a scan selects per block on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pvjax.capture import Capture, ForwardOutput, Routing, row_capture
from pvjax.interventions import Intervention, apply_row, condition_gate, gated_mask
from pvjax.kernels import decode_attention
from pvjax.models.block import attention, block, matmul, merged_attention, rms_norm
from pvjax.models.config import ModelConfig
from pvjax.models.layout import Layout
from pvjax.models.moe import blocks_holding, group_weights, grouped_keys
from pvjax.models.rope import inverse_frequencies, rope_tables


@struct.dataclass
class KVCache:
    """Keys and values of every block. Stacked layouts hold `[N, ...]` arrays, `PerLayer` a tuple
    of N arrays (`init_cache`). `split` (static) keeps batch and kv heads on two axes."""

    k: jax.Array | tuple  # [N, B*K, E, S] ([N, B, K, E, S] split), or N arrays without the N axis
    v: jax.Array | tuple  # [N, B*K, S, E] ([N, B, K, S, E] split), or N arrays
    valid: jax.Array  # [B, S] bool: slot holds a real token
    index: jax.Array  # [] int32: next slot to write
    split: bool = struct.field(pytree_node=False, default=False)


def init_cache(
    cfg: ModelConfig, layout: Layout, batch: int, slots: int, dtype, *, split: bool = False
) -> KVCache:
    """An empty cache for blocks in `layout`. `split` keeps batch and kv heads on two axes
    (`[.., B, K, E, S]` and `[.., B, K, S, E]`), so that a mesh can lay the batch over "data" and
    the kv heads over "model"; the merged default is the faster single-device layout."""
    # Heads before slots, keys transposed: both decode-attention products are then plain batched
    # matmuls over contiguous blocks (q [G, E] @ k [E, S], p [G, S] @ v [S, E]). Batch and kv heads
    # share one axis so that no axis has size 1 at batch 1: XLA turns a size-1 axis into a bitcast,
    # which stops the cache update from running in place (measured: three copies of every cache
    # buffer per step, 4 ms of a 36 ms SmolLM2 step on this CPU).
    # The CPU kernels' layout keeps float32 keys and values whatever the weights: a bfloat16
    # model's keys are bf16 values, exact in float32, and the attention kernel reads float32.
    # Measured at batch 1 on SmolLM2 in bf16: XLA's attention over a bf16 cache converted it
    # every step, 2.2 of a 13.7 ms step.
    if layout.packed:
        dtype = jnp.float32
    bk = (batch, cfg.num_kv_heads) if split else (batch * cfg.num_kv_heads,)
    v_shape = bk + (slots, cfg.head_dim)
    k_shape = bk + (cfg.head_dim, slots)

    def zeros(shape):  # separate buffers, so a cache can be donated
        if layout.stacked_cache:
            return jnp.zeros((cfg.num_layers,) + shape, dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

    return KVCache(
        zeros(k_shape),
        zeros(v_shape),
        jnp.zeros((batch, slots), bool),
        jnp.zeros((), jnp.int32),
        split,
    )


def forward(
    params,
    cfg: ModelConfig,
    layout: Layout,
    tokens_BT,
    positions_BT,
    attention_mask_BT,
    *,
    intervention: Intervention | None = None,
    capture: Capture = Capture(),
    segment_ids_BT=None,
) -> ForwardOutput:
    """The decoder over a whole sequence, no cache: attention is causal over `tokens` masked by
    `attention_mask`; with `segment_ids` (packed rows, 0 = padding) a token also attends only
    within its own segment. Returns what `capture` asks for (`cache` None)."""
    mask_BTS = _causal_mask(tokens_BT.shape[1], attention_mask_BT, segment_ids_BT)
    local_BTS = _slot_window(cfg, mask_BTS)

    def attend(q_BTHE, k_BTKE, v_BTKE, i, kv):
        m = _per_block(cfg.sliding, i, local_BTS, mask_BTS)
        k, v = k_BTKE.transpose(0, 2, 3, 1), v_BTKE.transpose(0, 2, 1, 3)
        return attention(q_BTHE, k, v, m, cfg.query_scale, cfg.attn_softcap), kv

    out, _ = _run(params, cfg, layout, tokens_BT, positions_BT, intervention, capture, attend, None)
    return out


def prefill(*args, **kwargs) -> ForwardOutput:
    """`decode_step(..., fresh=True)`: tokens into an empty cache (index 0, as `init_cache` makes
    it), attending among themselves only, not over the cache's empty slots (a prompt of P tokens
    in a cache of P + new slots), so a prompt costs what its own length costs."""
    return decode_step(*args, fresh=True, **kwargs)


def _causal_mask(T: int, attention_mask_BT, segment_ids_BT=None):
    """`[B, T, T]`: causal, over real tokens, within a segment when rows are packed."""
    valid_BT = jnp.asarray(attention_mask_BT).astype(bool)
    causal = jnp.tril(jnp.ones((T, T), bool))
    mask_BTS = causal[None] & valid_BT[:, None, :]
    if segment_ids_BT is not None:
        mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return mask_BTS


def _slot_window(cfg: ModelConfig, mask_BTS):
    """`mask_BTS` narrowed to the sliding window, for rows whose real tokens are contiguous
    (a left-padded or packed row, a prompt into an empty cache); None without sliding blocks."""
    if not any(cfg.sliding):
        return None
    T, S = mask_BTS.shape[1], mask_BTS.shape[2]
    near = (jnp.arange(T)[:, None] - jnp.arange(S)[None, :]) < cfg.sliding_window
    return mask_BTS & near[None]


def _per_block(flags: tuple[bool, ...], i, when_set, otherwise):
    """`when_set` for a block whose flag is set, else `otherwise` (pytrees alike). Chosen while
    tracing when every flag agrees or `i` is a Python int (unrolled layouts); a select on device
    under a scan."""
    if not any(flags):
        return otherwise
    if all(flags):
        return when_set
    if isinstance(i, int):
        return when_set if flags[i] else otherwise
    pick = jnp.asarray(flags)[i]
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pick, a, b), when_set, otherwise)


def decode_step(
    params,
    cfg: ModelConfig,
    layout: Layout,
    tokens_BT,
    positions_BT,
    attention_mask_BT,
    cache: KVCache,
    *,
    intervention: Intervention | None = None,
    capture: Capture = Capture(),
    fresh: bool = False,
    rope=None,
) -> ForwardOutput:
    """`tokens` written into `cache` at `cache.index`, attending to every valid earlier slot; the
    updated cache is returned in the output. One token per row in a decode loop (the CPU kernel's
    attention with a `PerLayer(packed=True)` layout), or a prompt's tail after a shared prefix.
    `fresh` (static; `prefill`): the cache is empty and the tokens attend among themselves only.
    `rope`: `rope_for(cfg, positions)`, computed by the caller (default: here)."""
    T = tokens_BT.shape[1]
    valid_BT = jnp.asarray(attention_mask_BT).astype(bool)
    local_valid = None
    if fresh:
        mask_BTS = _causal_mask(T, attention_mask_BT)
        local_BTS = _slot_window(cfg, mask_BTS)
        slots = jnp.zeros_like(cache.valid).at[:, :T].set(valid_BT)
        kv_valid = None
    else:
        S = cache.valid.shape[1]
        kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid_BT, (0, cache.index))
        q_slot = cache.index + jnp.arange(T)
        mask_BTS = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & kv_valid[:, None, :]
        slots = kv_valid
        local_BTS = None
        if any(cfg.sliding):  # distance in real tokens: the cache may hold a padding gap
            count_BS = jnp.cumsum(kv_valid, axis=1)
            count_BT = jnp.take(count_BS, q_slot, axis=1)
            near = (count_BT[:, :, None] - count_BS[:, None, :]) < cfg.sliding_window
            local_BTS = mask_BTS & near
            local_valid = kv_valid & near[:, -1]  # the kernel's one query (T == 1)
    # The CPU kernel's one-token attention reads the merged float32 cache (`pvjax.kernels`).
    native = layout.packed and jax.tree_util.tree_leaves(cache.k)[0].dtype == jnp.float32
    scale, cap = cfg.query_scale, cfg.attn_softcap

    def attend(q_BTHE, k_BTKE, v_BTKE, i, kv):
        ck, cv = kv
        k, v = k_BTKE.transpose(0, 2, 3, 1), v_BTKE.transpose(0, 2, 1, 3)
        Bk, K, E = k.shape[0], k.shape[1], k.shape[2]
        new = (k, v)
        if not cache.split:
            k, v = k.reshape(Bk * K, E, T), v.reshape(Bk * K, T, E)
        start = 0 if fresh else cache.index
        keys, ck = layout.write(ck, i, k, (0,) * (k.ndim - 1) + (start,))
        values, cv = layout.write(cv, i, v, (0,) * (v.ndim - 2) + (start, 0))
        m = _per_block(cfg.sliding, i, local_BTS, mask_BTS)
        if fresh:  # an empty cache: the new tokens attend among themselves only
            return attention(q_BTHE, *new, m, scale, cap), (ck, cv)
        if cache.split:  # already [B, K, E, S] and [B, K, S, E]
            return attention(q_BTHE, keys, values, m, scale, cap), (ck, cv)
        if native and T == 1:
            valid = _per_block(cfg.sliding, i, local_valid, kv_valid)
            o = decode_attention(q_BTHE, keys, values, valid, cache.index + 1, scale, cap)
            return o, (ck, cv)
        return merged_attention(q_BTHE, keys, values, m, scale, cap), (ck, cv)

    out, (ck, cv) = _run(
        params,
        cfg,
        layout,
        tokens_BT,
        positions_BT,
        intervention,
        capture,
        attend,
        (cache.k, cache.v),
        rope,
    )
    return out._replace(cache=cache.replace(k=ck, v=cv, valid=slots, index=cache.index + T))


def _routed(cfg: ModelConfig, i):
    """Whether block `i` runs its experts: None without experts or when every block does (no
    branch), else a Python bool (unrolled) or a traced one (scanned), for `block`."""
    flags = cfg.routed
    if not cfg.num_experts or all(flags):
        return None
    if isinstance(i, int):
        return flags[i]
    return jnp.asarray(flags)[i]


def _row_intervention(iv: Intervention | None, row):
    if iv is None:
        return None
    at = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda x: x[row], tree)
    return (
        iv.steer_vectors[row],
        iv.steer_coefs[row],
        iv.ablate_dirs[row],
        iv.ablate_coefs[row],
        at(iv.closed_loop),
        at(iv.modes),
        None if iv.condition is None else iv.condition.gated[row],
    )


def _edit(h, iv: Intervention | None, row_iv, row, gate):
    """Row `row`'s edit: `(h, gate)`. With a condition, the gate is updated from this row's
    residual (before its edit) and shuts the row's steering mask where it is gated."""
    if iv is None:
        return h, gate
    *edits, closed, modes, gated = row_iv
    steer_m = iv.steer_mask
    if iv.condition is not None:
        gate = condition_gate(h, iv.condition, row, gate)
        steer_m = gated_mask(steer_m, gated, gate)
    mode = None if modes is None else modes.mode
    return apply_row(h, *edits, steer_m, iv.ablate_mask, closed, mode), gate


def rope_for(cfg: ModelConfig, positions_BT):
    """`((cos, sin), local (cos, sin) or None)`, each `[B, T, head_dim]` float32: the rotary
    tables for `positions`, and those of Gemma 3's sliding blocks, which rotate with their own
    base."""
    tables = rope_tables(jnp.asarray(inverse_frequencies(cfg)), positions_BT)
    local = None
    if any(cfg.local_rope):
        local = rope_tables(jnp.asarray(inverse_frequencies(cfg, local=True)), positions_BT)
    return tables, local


def _run(
    params,
    cfg: ModelConfig,
    layout: Layout,
    tokens_BT,
    positions_BT,
    intervention,
    capture,
    attend,
    kv,
    rope=None,
):
    """What `forward` and the cached step share: embeddings, the blocks (`attend(q, k, v, block
    index, kv) -> (output, kv)` threading `kv` through them), the final norm, the per-row edits
    and captures, the head. Returns `(ForwardOutput without cache, the final kv)`."""
    n_blocks = cfg.num_layers
    if intervention is not None and intervention.n_rows != n_blocks + 1:
        raise ValueError(f"intervention has {intervention.n_rows} rows, model has {n_blocks + 1}")
    probes = capture.probes
    if probes is not None and probes.ndim == 2:
        probes = jnp.broadcast_to(probes, (n_blocks + 1,) + probes.shape)

    h = params["embed"][tokens_BT]
    if cfg.embed_scale:  # Gemma: sqrt(hidden_size) rounded to the compute dtype, as transformers
        h = h * jnp.asarray(cfg.hidden_size**0.5, h.dtype)
    if rope is None:
        # Meant to be materialised once; XLA's CPU compiler drops the barrier, though, and
        # recomputes the cosines and sines inside every layer's rotary fusion (a decode loop
        # passes tables it computed before the loop: `rope`).
        rope = jax.lax.optimization_barrier(rope_for(cfg, positions_BT))
    tables, local_tables = rope
    gate = None  # the condition's gate per batch row, carried from its layer to the later ones
    if intervention is not None and intervention.condition is not None:
        gate = jnp.broadcast_to(intervention.condition.state[0], h.shape[:1]).astype(jnp.float32)
    h, gate = _edit(h, intervention, _row_intervention(intervention, 0), 0, gate)
    first = row_capture(h, capture, None if probes is None else probes[0])

    # An expert model with dense blocks: the MLP weights stacked per group, not per block
    # (`pvjax.models.moe`), travel beside the scan and are picked per block in it.
    layers, grouped = params["layers"], {}
    if isinstance(layers, dict) and grouped_keys(cfg):
        grouped = {k: layers[k] for k in grouped_keys(cfg)}
        layers = {k: v for k, v in layers.items() if k not in grouped}
    want_router = capture.router and cfg.num_experts > 0

    def body(carry, xs):
        h, kv, gate = carry
        lp, i, row_iv, probe = xs
        if grouped:
            lp = {**lp, **group_weights(cfg, grouped, i)}
        cos, sin = _per_block(cfg.local_rope, i, local_tables, tables)
        routed = _routed(cfg, i)
        h, kv, routing = block(
            cfg, layout.fused, lp, h, cos, sin, lambda q, k, v: attend(q, k, v, i, kv), routed
        )
        h, gate = _edit(h, intervention, row_iv, i + 1, gate)
        out = row_capture(h, capture, probe)
        if want_router:
            out["router"] = routing
        return (h, kv, gate), out

    row_ivs = None
    if intervention is not None:
        row_ivs = jax.tree_util.tree_map(
            lambda x: x[1:], _row_intervention(intervention, slice(None))
        )
    xs = (row_ivs, None if probes is None else probes[1:])
    (h, kv, gate), rows = layout.run_blocks(body, (h, kv, gate), layers, xs, n_blocks)
    router = None
    if want_router:  # the routed blocks' rows, in block order
        held = np.asarray(blocks_holding(cfg, "router"))
        router = Routing(*(a[held] for a in rows.pop("router")))

    normed = rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    last = row_capture(normed, capture, None if probes is None else probes[-1])
    # Rows 1..N-1 come from the blocks; row N is replaced by its normed version (see module
    # docstring).
    stacked = jax.tree_util.tree_map(
        lambda a, mid, z: jnp.concatenate([a[None], mid[:-1], z[None]]), first, rows, last
    )

    logits = None
    if capture.logits != "none":
        x = {"last": normed[:, -1:], "all": normed}.get(capture.logits)
        if x is None:  # "tail:N": the last N positions (left-padded answers end the row)
            x = normed[:, -int(capture.logits.split(":")[1]) :]
        if layout.packed:  # the head packed for the CPU kernel (`unstack_layers`)
            head = params["head"]
        else:
            head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        logits = matmul(x, head).astype(jnp.float32)
        if cfg.final_softcap is not None:  # Gemma: c tanh(logits / c)
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap

    out = ForwardOutput(
        logits=logits,
        hidden_states=stacked.get("hidden"),
        pooled=stacked.get("pooled"),
        projections=stacked.get("projections"),
        gate=gate,
        router=router,
    )
    return out, kv
