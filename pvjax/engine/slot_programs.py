"""The compiled programs of the slot engine (`pvjax.engine.slots`): a running batch of B rows
("slots") over one KV cache, each row its own request.

Shape legend: B slots, P prompt columns (a bucket), S cache columns, V vocabulary, L = n_layers + 1
hidden-state rows, K probe vectors, D hidden size.

The programs, compiled once per shape and reused for every request:
- `admit`: one newcomer's prompt through the prefill, its keys and values written into its slot
  at columns `[column - P, column)`, its last-position logits and its intervention row stored
  (with its condition's gate, read on the prompt and kept for every step: a row's steering
  mode, add, rescale or rotate, and its condition are data of that row); returns the prompt's
  last-token projections (the monitoring signal) and the gate.
- `step`: every slot draws its next token from its stored logits (its own sampling settings and
  PRNG key, folded with its own token count, as `pvjax.engine.generate` does), then the tokens
  run through one `decode_step` at cache column `column`; the logits it returns are stored for
  the next step. Rows that are free run along and are ignored.
- `shift`: the cache moved left by `m` columns, when the oldest rows have left.
- `prefix` and `admit_after`: prompt-prefix sharing. `prefix` runs a shared prefix (a system
  prompt) once, unsteered, and returns its keys and values; `admit_after` admits a prompt that
  opens with it by running only its tail against those keys and values.

On a `("data", "model")` mesh (`mesh`, static) the slots' state stays where `slot_shardings`
puts it (rows over "data", the cache's kv heads over "model", in the split cache layout of
`pvjax.engine.mesh`): every program pins its output to it, so a call's output is the next call's
input and nothing recompiles.

Every row writes the same cache column at a step (the cache's `index`); which columns a row
attends to is its `valid` mask. A row's columns are in the order `generate` puts them (prompt,
then its answer), and masked columns add exact zeros in the CPU kernel's attention, so a row's
numbers do not depend on the rows beside it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pvjax.capture import Capture
from pvjax.interventions import Intervention
from pvjax.model import default_positions
from pvjax.models.decoder import KVCache, decode_step, init_cache, prefill

_NEG = -1e30
MODES = ("greedy", "sample", "filter")


@struct.dataclass
class Slots:
    """The running batch on the device: cache, each row's next-token logits, each row's
    intervention (batch B; `closed_loop`, `modes` and `condition` always present, so fixed,
    closed-loop, add, rescale, rotate and conditional rows share the programs; masks given per
    call)."""

    cache: KVCache
    logits_BV: jax.Array  # [B, V] float32
    iv: Intervention


@struct.dataclass
class Feed:
    """What the host says each step: which rows run, their positions, sampling, masks."""

    active_B: jax.Array  # [B] int32, 1 for a row holding a request
    positions_B: jax.Array  # [B] int32, the position id of the token fed
    count_B: jax.Array  # [B] int32, tokens drawn so far (the PRNG fold-in step)
    keys_B2: jax.Array  # [B, 2] uint32
    temperature_B: jax.Array  # [B] float32 (0: greedy)
    top_p_B: jax.Array  # [B] float32
    top_k_B: jax.Array  # [B] int32 (0: off)
    min_new_B: jax.Array  # [B] int32: stop tokens are forbidden until this many are drawn
    steer_B1: jax.Array  # [B, 1] float32, steering mask of the token fed
    ablate_B1: jax.Array  # [B, 1] float32
    column: jax.Array  # [] int32, the cache column written
    stop_ids: jax.Array  # [n_stop] int32


@struct.dataclass
class Newcomer:
    """One request entering slot `slot`: its prompt left-padded to a bucket, its masks and its
    intervention row (batch 1, with `closed_loop`, `modes` and `condition`)."""

    tokens_1P: jax.Array
    mask_1P: jax.Array
    steer_1P: jax.Array
    ablate_1P: jax.Array
    iv: Intervention
    slot: jax.Array  # [] int32
    column: jax.Array  # [] int32, the prompt ends just before this column


def empty_slots(
    cfg, layout, iv: Intervention, batch: int, columns: int, dtype, *, split: bool = False
) -> Slots:
    return Slots(
        cache=init_cache(cfg, layout, batch, columns, dtype, split=split),
        logits_BV=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
        iv=iv,
    )


def slot_shardings(slots: Slots, cfg, mesh):
    """Where each leaf of `slots` lives on `mesh`: the B rows over "data" (cache, logits, the
    rows of the intervention), the cache's kv heads over "model" when they divide, the rest
    replicated."""
    B = slots.logits_BV.shape[0]
    data = "data" if B % mesh.shape["data"] == 0 else None
    kv = "model" if cfg.num_kv_heads % mesh.shape["model"] == 0 else None
    at = lambda *spec: NamedSharding(mesh, P(*spec))
    cache_spec = lambda x: at(*((None,) * (x.ndim - 4) + (data, kv, None, None)))
    row_spec = lambda x: at(None, data) if x.ndim > 1 and x.shape[1] == B else at()
    c = slots.cache
    return Slots(
        cache=c.replace(
            k=jax.tree_util.tree_map(cache_spec, c.k),
            v=jax.tree_util.tree_map(cache_spec, c.v),
            valid=at(data, None),
            index=at(),
        ),
        logits_BV=at(data, None),
        iv=jax.tree_util.tree_map(row_spec, slots.iv),
    )


def _pinned(slots: Slots, cfg, mesh) -> Slots:
    if mesh is None:
        return slots
    return jax.lax.with_sharding_constraint(slots, slot_shardings(slots, cfg, mesh))


def _draw(logits_BV, feed: Feed, mode: str):
    """Each row's next token. A row's draw depends only on its own logits, settings, key and
    count, so the program's mode (the most general any row needs) never changes a row's text."""
    stop_cols = jnp.zeros(logits_BV.shape[-1], bool).at[feed.stop_ids].set(True)
    early = (feed.count_B < feed.min_new_B)[:, None]
    logits_BV = jnp.where(stop_cols[None] & early, _NEG, logits_BV)
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    V = logits_BV.shape[-1]
    t = feed.temperature_B[:, None]
    x = logits_BV / jnp.where(t > 0, t, 1.0)
    if mode == "filter":  # as `decode_loop._sample`, with per-row top-k and top-p
        srt = -jnp.sort(-x, axis=-1)
        k = jnp.where(feed.top_k_B > 0, jnp.minimum(feed.top_k_B, V), V)[:, None]
        srt = jnp.where(jnp.arange(V) < k, srt, _NEG)
        p = jax.nn.softmax(srt, axis=-1)
        keep = (jnp.cumsum(p, axis=-1) - p) < feed.top_p_B[:, None]
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        filters = (feed.top_k_B > 0) | (feed.top_p_B < 1)
        x = jnp.where(filters[:, None] & (x < cutoff), _NEG, x)
    keys = jax.vmap(jax.random.fold_in)(feed.keys_B2, feed.count_B)
    drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(feed.temperature_B > 0, drawn, greedy)


@functools.partial(
    jax.jit, static_argnames=("cfg", "layout", "mode", "mesh"), donate_argnames=("slots",)
)
def step(params, slots: Slots, feed: Feed, probes, *, cfg, layout, mode: str, mesh=None):
    """`(slots, tokens [B], their log-probabilities [B], their projections [L, B, K] or None)`:
    one token drawn and fed for every row."""
    logits = slots.logits_BV
    tok_B = _draw(logits, feed, mode)
    lse_B = jax.nn.logsumexp(logits, axis=-1)
    logprob_B = jnp.take_along_axis(logits, tok_B[:, None], axis=-1)[:, 0] - lse_B
    tok_B = jnp.where(feed.active_B > 0, tok_B, 0)
    out = decode_step(
        params,
        cfg,
        layout,
        tok_B[:, None],
        feed.positions_B[:, None],
        feed.active_B[:, None],
        slots.cache.replace(index=feed.column),
        intervention=slots.iv.with_masks(feed.steer_B1, feed.ablate_B1),
        capture=Capture(probes=probes, logits="last", hidden=False),
    )
    proj = None if probes is None else out.projections[:, :, 0]
    slots = _pinned(slots.replace(cache=out.cache, logits_BV=out.logits[:, -1]), cfg, mesh)
    return slots, tok_B, logprob_B, proj


def _put(dst, src, idx):
    return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), idx)


def _write_layers(dst, src, idx):
    """`src` (one row's blocks, stacked `[N, ...]` or a tuple of N) written at `idx` of every block
    of `dst` (stacked or a tuple, as the decode layout keeps its cache)."""
    if isinstance(dst, tuple):
        return tuple(_put(d, src[i], idx) for i, d in enumerate(dst))
    stacked = jnp.stack(src) if isinstance(src, tuple) else src
    return _put(dst, stacked, (0,) + idx)


@functools.partial(
    jax.jit, static_argnames=("cfg", "prefill_layout", "mesh"), donate_argnames=("slots",)
)
def admit(prefill_params, slots: Slots, new: Newcomer, probes, *, cfg, prefill_layout, mesh=None):
    """`(slots, the prompt's last-token projections [L, K] or None, the condition's gate [])`
    with `new` in its slot."""
    P = new.tokens_1P.shape[1]
    dtype = prefill_params["embed"].dtype
    pre = prefill(
        prefill_params,
        cfg,
        prefill_layout,
        new.tokens_1P,
        default_positions(new.mask_1P),
        new.mask_1P,
        init_cache(cfg, prefill_layout, 1, P, dtype, split=slots.cache.split),
        intervention=new.iv.with_masks(new.steer_1P, new.ablate_1P),
        capture=Capture(probes=probes, logits="last", hidden=False),
    )
    return _install(slots, new, pre, new.mask_1P.astype(bool), probes, cfg, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "prefill_layout", "split"))
def prefix(prefill_params, tokens_1C, *, cfg, prefill_layout, split=False):
    """`(k, v)`: the keys and values of a shared prompt prefix `[1, C]` (every column a real
    token, run unsteered), in the prefill layout's cache form, for `admit_after`."""
    C = tokens_1C.shape[1]
    mask = jnp.ones_like(tokens_1C)
    dtype = prefill_params["embed"].dtype
    pre = prefill(
        prefill_params,
        cfg,
        prefill_layout,
        tokens_1C,
        default_positions(mask),
        mask,
        init_cache(cfg, prefill_layout, 1, C, dtype, split=split),
        capture=Capture(logits="none", hidden=False),
    )
    return pre.cache.k, pre.cache.v


@functools.partial(
    jax.jit, static_argnames=("cfg", "prefill_layout", "mesh"), donate_argnames=("slots",)
)
def admit_after(
    prefill_params, slots: Slots, new: Newcomer, kv, probes, *, cfg, prefill_layout, mesh=None
):
    """`admit` for a prompt whose first C tokens are a shared prefix with keys and values `kv`
    (`prefix`): only the tail `new.tokens_1P` runs, attending to the prefix, and the slot gets
    the prefix's C columns, then the tail's. The same numbers as `admit` on the whole prompt up
    to the order of the attention's sums (as `generate`'s shared prefixes)."""
    P = new.tokens_1P.shape[1]
    C = jax.tree_util.tree_leaves(kv[0])[0].shape[-1]
    dtype = prefill_params["embed"].dtype
    cache = init_cache(cfg, prefill_layout, 1, C + P, dtype, split=slots.cache.split)
    at = (0,) * (4 if cache.split else 3)
    cache = cache.replace(
        k=_write_layers(cache.k, kv[0], at),
        v=_write_layers(cache.v, kv[1], at),
        valid=cache.valid.at[:, :C].set(True),
        index=jnp.int32(C),
    )
    pre = decode_step(
        prefill_params,
        cfg,
        prefill_layout,
        new.tokens_1P,
        default_positions(new.mask_1P) + C,
        new.mask_1P,
        cache,
        intervention=new.iv.with_masks(new.steer_1P, new.ablate_1P),
        capture=Capture(probes=probes, logits="last", hidden=False),
    )
    valid = jnp.concatenate([jnp.ones((1, C), bool), new.mask_1P.astype(bool)], axis=1)
    return _install(slots, new, pre, valid, probes, cfg, mesh)


def _install(slots: Slots, new: Newcomer, pre, valid_1W, probes, cfg, mesh):
    """The newcomer's prompt pass `pre` (its cache of W columns, `valid_1W`) written into its slot
    at columns `[column - W, column)`, with its logits and its intervention row."""
    W = valid_1W.shape[1]
    K = cfg.num_kv_heads
    col = new.column - W
    cache = slots.cache
    # The merged layout keeps a row as K consecutive entries of its batch axis; the split one
    # (a mesh) has the row and its kv heads on two axes.
    row = (new.slot, 0) if cache.split else (new.slot * K,)
    k = _write_layers(cache.k, pre.cache.k, row + (0, col))
    v = _write_layers(cache.v, pre.cache.v, row + (col, 0))
    valid = cache.valid.at[new.slot].set(False)
    valid = jax.lax.dynamic_update_slice(valid, valid_1W, (new.slot, col))
    strip = lambda iv: iv.replace(steer_mask=None, ablate_mask=None)
    put_row = lambda a, b: a.at[:, new.slot].set(b[:, 0].astype(a.dtype))
    iv = jax.tree_util.tree_map(put_row, strip(slots.iv), strip(new.iv))
    # The condition was read on the prompt (its last token is the prefill's last column): every
    # step keeps the gate it found, as `generate`'s decode loop does.
    gate = pre.gate[0]
    cond = iv.condition
    iv = iv.replace(
        condition=cond.replace(
            known=cond.known.at[0, new.slot].set(1.0), state=cond.state.at[0, new.slot].set(gate)
        )
    )
    iv = iv.with_masks(slots.iv.steer_mask, slots.iv.ablate_mask)
    slots = Slots(
        cache=cache.replace(k=k, v=v, valid=valid),
        logits_BV=slots.logits_BV.at[new.slot].set(pre.logits[0, -1]),
        iv=iv,
    )
    slots = _pinned(slots, cfg, mesh)
    proj = None if probes is None else pre.projections[:, 0, -1]
    return slots, proj, gate


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("slots",))
def shift(slots: Slots, m, *, cfg=None, mesh=None):
    """The cache moved `m` columns to the left; the columns that come in are empty."""

    def left(x, axis):
        S = x.shape[axis]
        both = jnp.concatenate([x, jnp.zeros_like(x)], axis=axis)
        return jax.lax.dynamic_slice_in_dim(both, m, S, axis=axis)

    c = slots.cache
    slots = slots.replace(
        cache=c.replace(
            k=jax.tree_util.tree_map(lambda x: left(x, x.ndim - 1), c.k),
            v=jax.tree_util.tree_map(lambda x: left(x, x.ndim - 2), c.v),
            valid=left(c.valid, 1),
        )
    )
    return _pinned(slots, cfg, mesh)


def compile_count() -> int:
    """Programs the slot engine has compiled in this process (for the no-recompile checks)."""
    return sum(f._cache_size() for f in (step, admit, shift, prefix, admit_after))
