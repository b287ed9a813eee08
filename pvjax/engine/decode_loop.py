"""The compiled generation program: prefill and decode loop in one `jax.jit`, the small pytree
dataclasses its arguments travel in, and the weights it decodes with (`decode_weights`: the
parameters and their layout); see `pvjax.engine.generate` for the engine around it.

Shape legend: B batch, C shared-prefix tokens (may be 0), P prompt columns, S cache slots,
N new-token budget, L = n_layers + 1 hidden-state rows, K probe vectors, V vocabulary.

The arguments are grouped by what travels together: the prompt batch (`PromptBatch`), the sampling
settings and per-row PRNG keys (`Sampler`), and the intervention with its prefill and decode
position masks (`Steering`). Every field is an array (traced) except `Sampler.mode` and
`Sampler.n_new`, which are pytree metadata and so pick the compiled program, as the static
arguments they replace did; `mesh` (None on one device), which picks the KV-cache layout; and the
two weight layouts (`pvjax.models.layout`), of the prompt pass's and the decode loop's weights.
"""

from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pvjax import kernels
from pvjax.capture import Capture
from pvjax.interventions import Intervention
from pvjax.model import default_positions
from pvjax.models.decoder import KVCache, decode_step, init_cache, prefill, rope_for
from pvjax.models.layout import Layout, PerLayer, Scanned, unstack_layers

_NEG = -1e30


@struct.dataclass
class PromptBatch:
    """Left-padded prompts, each split into a prefix, run once per distinct prefix, and a tail,
    run per row. Row b continues prefix `prefix_of_B[b]`; prefix u runs with the intervention and
    prompt masks of row `prefix_first_U[u]`, which is exact because rows share a prefix only when
    their interventions cannot tell it apart (one intervention for all, or none acting before the
    last prompt token). `tokens_BP` positions already count the prefix. No sharing: C = 0."""

    prefix_UC: jax.Array  # [U, C] int32, left-padded
    prefix_mask_UC: jax.Array  # [U, C] 1 for real tokens
    prefix_of_B: jax.Array  # [B] int32
    prefix_first_U: jax.Array  # [U] int32
    tokens_BP: jax.Array  # [B, P] int32
    mask_BP: jax.Array  # [B, P] 1 for real tokens
    positions_BP: jax.Array  # [B, P] int32


@struct.dataclass
class Sampler:
    """What picks each new token, and when a row stops. `mode` ("greedy", "sample" or "filter")
    and `n_new` (the token buffer, a bucket) are static: they choose the program."""

    keys_B2: jax.Array  # [B, 2] one PRNG key per row
    temperature: jax.Array  # [] float32
    top_p: jax.Array  # [] float32
    top_k: jax.Array  # [] int32
    min_new: jax.Array  # [] int32
    max_new: jax.Array  # [] int32
    stop_ids: jax.Array  # [n_stop] int32
    pad_id: jax.Array  # [] int32
    mode: str = struct.field(pytree_node=False, default="greedy")
    n_new: int = struct.field(pytree_node=False, default=32)


@struct.dataclass
class Steering:
    """The intervention and where it acts: `prefill_masks` (steer, ablate) `[B, C + P]` over the
    prompt columns, `decode_masks` (steer, ablate) `[1, 1]` for every new token."""

    iv: Intervention
    prefill_masks: tuple[jax.Array, jax.Array]
    decode_masks: tuple[jax.Array, jax.Array]


_UNSTACKED = weakref.WeakKeyDictionary()


def decode_params(model, unroll: bool = True):
    """The parameters generation runs on: by default unstacked per layer (see
    `pvjax.models.layout.unstack_layers`), because a decode loop that scans stacked weights copies
    each layer's slice every step. Measured: twice the step time on this CPU, and 17.1 against
    7.45 ms per step on an H100 (7B shape, bf16, batch 64; benchmarks/NOTES.md). The cost is a
    second copy of the weights while the model lives; `unroll=False` keeps one copy and scans.

    float32 or bfloat16 weights on a single CPU device are also packed for the native decode
    kernel (`pvjax.kernels`), when it builds here: about twice the speed of XLA's dots at batch 16
    (float32), and bfloat16 weights stream half the bytes."""
    return decode_weights(model, unroll)[0]


def decode_weights(model, unroll: bool = True) -> tuple[dict, Layout]:
    """`decode_params` with their layout, which the decoder is told rather than reading it off
    the pytree."""
    if not unroll:
        return model.params, Scanned()
    if model not in _UNSTACKED:
        pack = _use_kernel(model.params)
        _UNSTACKED[model] = (
            jax.jit(unstack_layers, static_argnums=(1, 2))(model.params, model.config, pack),
            PerLayer(fused=True, packed=pack),
        )
    return _UNSTACKED[model]


def _use_kernel(params) -> bool:
    leaves = jax.tree_util.tree_leaves(params)
    on_one_cpu = all(
        getattr(x, "sharding", None) is not None
        and len(x.sharding.device_set) == 1
        and next(iter(x.sharding.device_set)).platform == "cpu"
        for x in leaves
    )
    # One float dtype throughout: float32, or bfloat16 (packed as bfloat16, half the bytes).
    dtypes = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    one_dtype = dtypes in ({jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)})
    return on_one_cpu and one_dtype and kernels.available()


def _sample(logits_BV, keys_B2, step, temperature, top_p, top_k, mode: str):
    """`mode` (static) is "greedy", "sample" or "filter" (top-k and/or top-p on). Temperature,
    then top-k, then top-p, then a draw from each row's own key folded with the step, so a
    prompt's text does not depend on which other prompts share its batch. The mode is static
    because XLA on CPU pays for a `lax.cond` over the vocabulary on every step (measured: a
    quarter of a batch-16 decode step)."""
    if mode == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]
    x = logits_BV / temperature
    if mode == "filter":
        srt = -jnp.sort(-x, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        srt = jnp.where(jnp.arange(V) < k, srt, _NEG)
        p = jax.nn.softmax(srt, axis=-1)
        keep = (jnp.cumsum(p, axis=-1) - p) < top_p  # the first token always survives
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        x = jnp.where(x < cutoff, _NEG, x)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B2)
    return jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)


def run(
    params,
    layout: Layout,
    prefill_params,
    prefill_layout: Layout,
    cfg,
    batch: PromptBatch,
    sampler: Sampler,
    steering: Steering,
    probes,
    mesh: Mesh | None = None,
):
    """Generate `sampler.n_new` tokens for every row: `(tokens [B, N], prompt projections
    [L, B, C + P, K] or None, new-token projections [L, B, N, K])`. The decode loop runs on
    `params` laid out as `layout`, the prompt on `prefill_params` laid out as `prefill_layout`.
    With a `mesh`, the KV cache takes the split layout with its batch over "data" and kv heads
    over "model" (see `pvjax.engine.mesh`, which places the inputs)."""
    return _generate(
        params,
        prefill_params,
        cfg,
        batch,
        sampler,
        steering,
        probes,
        mesh=mesh,
        layout=layout,
        prefill_layout=prefill_layout,
    )


def _cache_on_mesh(cache: KVCache, cfg, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    kv = "model" if cfg.num_kv_heads % mesh.shape["model"] == 0 else None
    data = "data" if cache.valid.shape[0] % mesh.shape["data"] == 0 else None
    spec = lambda x: NamedSharding(mesh, P(*((None,) * (x.ndim - 4) + (data, kv, None, None))))
    put = lambda x: jax.lax.with_sharding_constraint(x, spec(x))
    return cache.replace(
        k=jax.tree_util.tree_map(put, cache.k),
        v=jax.tree_util.tree_map(put, cache.v),
        valid=jax.lax.with_sharding_constraint(cache.valid, NamedSharding(mesh, P(data, None))),
    )


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "layout", "prefill_layout"))
def _generate(
    params,
    prefill_params,
    cfg,
    batch: PromptBatch,
    sampler: Sampler,
    steering: Steering,
    probes,
    mesh=None,
    *,
    layout: Layout,
    prefill_layout: Layout,
):
    B, P = batch.tokens_BP.shape
    C = batch.prefix_UC.shape[1]
    n_new = sampler.n_new
    iv, prefill_masks, decode_masks = steering.iv, steering.prefill_masks, steering.decode_masks
    stop_ids = sampler.stop_ids
    stacked = prefill_layout.stacked_cache
    split = mesh is not None  # batch and kv heads on separate cache axes, for the mesh
    dtype = params["embed"].dtype
    capture = Capture(probes=probes, logits="last", hidden=False)
    is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=-1)

    def pick(logits_BV, step):
        # Stop tokens are forbidden until min_new tokens exist.
        stop_cols = jnp.zeros(logits_BV.shape[-1], bool).at[stop_ids].set(True)
        logits_BV = jnp.where(stop_cols[None] & (step < sampler.min_new), _NEG, logits_BV)
        return _sample(
            logits_BV,
            sampler.keys_B2,
            step,
            sampler.temperature,
            sampler.top_p,
            sampler.top_k,
            sampler.mode,
        )

    S = C + P + n_new
    if C:
        rows_U = batch.prefix_first_U
        cols = lambda m: m[rows_U, :C]
        pre_iv = jax.tree_util.tree_map(
            lambda x: x[:, rows_U] if x.shape[1] == B else x,
            iv.replace(steer_mask=None, ablate_mask=None),
        )
        U = batch.prefix_UC.shape[0]
        pre = prefill(
            prefill_params,
            cfg,
            prefill_layout,
            batch.prefix_UC,
            default_positions(batch.prefix_mask_UC),
            batch.prefix_mask_UC,
            init_cache(cfg, prefill_layout, U, S, dtype, split=split),
            intervention=pre_iv.with_masks(*map(cols, prefill_masks)),
            capture=capture.replace(logits="none"),
        )
        # Each row's copy of its prefix's keys and values; in the merged layout a row is K
        # consecutive entries (one per kv head) of the batch axis.
        K = cfg.num_kv_heads
        entries = (
            batch.prefix_of_B
            if split
            else (batch.prefix_of_B[:, None] * K + jnp.arange(K)).reshape(-1)
        )
        gather = lambda x: jnp.take(x, entries, axis=int(stacked))
        k, v = jax.tree_util.tree_map(gather, (pre.cache.k, pre.cache.v))
        cache = pre.cache.replace(k=k, v=v, valid=pre.cache.valid[batch.prefix_of_B])
    else:
        cache = init_cache(cfg, prefill_layout, B, S, dtype, split=split)
    cache = _cache_on_mesh(cache, cfg, mesh)
    # Without a shared prefix the cache is empty: the prompt attends among its own tokens only.
    run_prompt = decode_step if C else prefill
    out = run_prompt(
        prefill_params,
        cfg,
        prefill_layout,
        batch.tokens_BP,
        batch.positions_BP,
        batch.mask_BP,
        cache,
        intervention=iv.with_masks(*(m[:, C:] for m in prefill_masks)),
        capture=capture,
    )
    if C and probes is not None:
        shared = pre.projections[:, batch.prefix_of_B]
        out = out._replace(projections=jnp.concatenate([shared, out.projections], axis=2))
    if stacked and not layout.stacked_cache:  # the decode loop's blocks each own their buffers
        out = out._replace(cache=out.cache.replace(k=tuple(out.cache.k), v=tuple(out.cache.v)))
    first = pick(out.logits[:, -1], 0)
    toks_BN = jnp.full((B, n_new), sampler.pad_id, jnp.int32).at[:, 0].set(first)
    L = cfg.num_layers + 1
    n_probes = 0 if probes is None else probes.shape[-2]
    proj_LBNK = jnp.zeros((L, B, n_new, n_probes), jnp.float32)
    next_pos = batch.positions_BP[:, -1] + 1
    # A condition is read on the prompt; every decode step keeps the gate the prompt pass found.
    decode_iv = iv.with_masks(*decode_masks).with_gate(out.gate)
    ones = jnp.ones((B, 1), jnp.int32)
    # Every step's rotary tables, before the loop: computed inside it, XLA's CPU compiler puts
    # the cosines and sines into each layer's q and k rotary fusions (measured on SmolLM2 at
    # batch 16: 60 such fusions, 2-3 ms of a 46 ms step).
    positions_BN = next_pos[:, None] + jnp.arange(n_new)[None]
    rope_BN = rope_for(cfg, positions_BN)

    def feed(toks_BN, i, cache, proj):
        """Run token i of every row through the model: next logits and its projections."""
        o = decode_step(
            params,
            cfg,
            layout,
            jax.lax.dynamic_slice_in_dim(toks_BN, i, 1, axis=1),
            (next_pos + i)[:, None],
            ones,
            cache,
            intervention=decode_iv,
            capture=capture,
            rope=jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1), rope_BN
            ),
        )
        if probes is not None:
            proj = jax.lax.dynamic_update_slice_in_dim(proj, o.projections, i, axis=2)
        return o.logits[:, -1], o.cache, proj

    def cond(state):
        i, _, done, _, _ = state
        return (i < sampler.max_new) & ~jnp.all(done)

    def body(state):
        i, toks, done, cache, proj = state
        logits, cache, proj = feed(toks, i - 1, cache, proj)
        t = jnp.where(done, sampler.pad_id, pick(logits, i))
        return i + 1, toks.at[:, i].set(t), done | is_stop(t), cache, proj

    state = (jnp.int32(1), toks_BN, is_stop(first), out.cache, proj_LBNK)
    n, toks_BN, _, cache, proj_LBNK = jax.lax.while_loop(cond, body, state)
    if probes is not None:  # the last token was sampled but never fed; feed it for its projection
        _, _, proj_LBNK = feed(toks_BN, n - 1, cache, proj_LBNK)
    return toks_BN, out.projections, proj_LBNK


def compile_count() -> int:
    """How many programs the generation engine has compiled in this process (for tests)."""
    return _generate._cache_size()
