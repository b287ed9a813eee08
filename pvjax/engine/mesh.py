"""Generation on a `("data", "model")` mesh (`pvjax.parallel.sharding.make_mesh`): where each array
lives.

The batch, its KV cache, masks, PRNG keys and per-row interventions are split over "data"; the
weights follow `pvjax.parallel.sharding.PARAM_RULES` over "model" (q/k/v and gate/up by output
column, i.e. by head; o and down by input row; the vocabulary of the embedding and head), and the
cache's kv-head axis is split over "model" too, so each device holds the heads its q/k/v columns
make. A weight or cache axis that the model axis does not divide is replicated instead, with a
logged note. A batch is padded up to a multiple of the data axis (padded rows are dropped from the
results). jit then propagates the layout through prefill and decode loop; the numbers equal one
device's up to float summation order.

The CPU packed-kernel path (`pvjax.kernels`) stays the single-device fast path: on a mesh the
layers are unrolled without fusing q/k/v (a fused matrix split by columns would mix heads) and run
on XLA's dots.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import weakref

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pvjax.engine.decode_loop import PromptBatch, Sampler, Steering
from pvjax.models.layout import Layout, PerLayer, Scanned, unstack_layers
from pvjax.parallel import sharding
from pvjax.parallel.sharding import check_mesh, pad_batch  # noqa: F401  (generate calls them from here)

log = logging.getLogger(__name__)

_PLACED = weakref.WeakKeyDictionary()  # model -> {(mesh, unroll): (decode params, prefill params)}


def _rule(path: str) -> P:
    return next(s for pattern, s in sharding.PARAM_RULES if re.match(pattern, path))


def _specs(params, mesh: Mesh, model_id: str):
    """`pvjax.parallel.sharding.param_specs`, logging each weight that falls back to replication."""
    specs = sharding.param_specs(params, mesh)

    def note(keys, leaf, spec):
        want = _rule(sharding._path(keys))
        full = lambda s: tuple(s) + (None,) * (leaf.ndim - len(tuple(s)))
        if full(spec) != full(want):
            log.warning(
                "%s: %s of shape %s does not divide over mesh %s; spec %s becomes %s "
                "(that axis replicated)",
                model_id,
                sharding._path(keys),
                tuple(leaf.shape),
                dict(mesh.shape),
                want,
                spec,
            )
        return spec

    return jax.tree_util.tree_map_with_path(note, params, specs)


def layouts(unroll: bool) -> tuple[Layout, Layout]:
    """The layouts of `place_params`' `(decode params, prefill params)`."""
    return (PerLayer(fused=False) if unroll else Scanned()), Scanned()


def place_params(model, mesh: Mesh, unroll: bool):
    """`(decode params, prefill params)` laid out over `mesh`, made once per model and mesh
    (their layouts: `layouts(unroll)`). Unrolled: per-layer dicts (unfused), each leaf with its
    stacked rule minus the layer axis."""
    placed = _PLACED.setdefault(model, {})
    if (mesh, unroll) not in placed:
        specs = _specs(model.params, mesh, model.model_id)
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
        stacked = jax.tree_util.tree_map(put, model.params, specs)
        decode = stacked
        if unroll:
            layer_specs = {k: P(*tuple(s)[1:]) for k, s in specs["layers"].items()}
            layers = unstack_layers(stacked, model.config, False, False)["layers"]
            decode = {
                **stacked,
                "layers": tuple(
                    {k: put(v, layer_specs[k]) for k, v in lp.items()} for lp in layers
                ),
            }
        placed[(mesh, unroll)] = (decode, stacked)
    return placed[(mesh, unroll)]


def _over_data(x, mesh: Mesh, axis: int = 0):
    """`x` split over "data" on `axis` when that axis divides, else replicated."""
    spec = [None] * np.ndim(x)
    if np.ndim(x) > axis and np.shape(x)[axis] % mesh.shape["data"] == 0 and np.shape(x)[axis] > 1:
        spec[axis] = "data"
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def place_inputs(mesh: Mesh, batch: PromptBatch, sampler: Sampler, steering: Steering):
    """The chunk's arrays with their rows over "data"; shared ones (the prefix, the sampling
    settings, batch-1 leaves) replicated."""
    rep = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
    batch = PromptBatch(
        prefix_UC=rep(batch.prefix_UC),
        prefix_mask_UC=rep(batch.prefix_mask_UC),
        prefix_of_B=_over_data(batch.prefix_of_B, mesh),
        prefix_first_U=rep(batch.prefix_first_U),
        tokens_BP=_over_data(batch.tokens_BP, mesh),
        mask_BP=_over_data(batch.mask_BP, mesh),
        positions_BP=_over_data(batch.positions_BP, mesh),
    )
    settings = jax.tree_util.tree_map(rep, dataclasses.replace(sampler, keys_B2=None))
    sampler = dataclasses.replace(settings, keys_B2=_over_data(sampler.keys_B2, mesh))
    iv = steering.iv
    rows = jax.tree_util.tree_map(
        lambda x: _over_data(x, mesh, axis=1),
        dataclasses.replace(iv, steer_mask=None, ablate_mask=None),
    )
    steering = Steering(
        iv=rows.with_masks(rep(iv.steer_mask), rep(iv.ablate_mask)),
        prefill_masks=tuple(_over_data(m, mesh) for m in steering.prefill_masks),
        decode_masks=tuple(rep(m) for m in steering.decode_masks),
    )
    return batch, sampler, steering


def note_cache_layout(cfg, mesh: Mesh, model_id: str) -> None:
    m = mesh.shape["model"]
    if m > 1 and cfg.num_kv_heads % m:
        log.warning(
            "%s: %d kv heads do not divide over model=%d; the KV cache's head axis is replicated",
            model_id,
            cfg.num_kv_heads,
            m,
        )
