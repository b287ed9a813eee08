"""Several intervention settings as the rows of one batch: a grid of steering settings runs as one
compiled program, its settings on the batch axis (`stack`), and any batch gathers its rows from them
(`take`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from pvjax import interventions as ivs


def stack(settings: Sequence[ivs.Intervention]) -> ivs.Intervention:
    """S batch-1 interventions (`interventions.build`, `pvjax.engine.terms.build_intervention`)
    as one intervention of batch S. When any setting is closed loop (`cap`/`target`), has a mode
    other than add or a condition, every setting carries that field (fixed, add or ungated where
    it had none), so the grid stays one pytree structure: one program for all its rows."""
    first = settings[0]
    if any(s.closed_loop is not None for s in settings):
        settings = [s.with_closed_loop() for s in settings]
    if any(s.modes is not None for s in settings):
        settings = [s.with_modes() for s in settings]
    if any(s.condition is not None for s in settings):
        settings = [s.with_condition() for s in settings]
    rows = [dataclasses.replace(s, steer_mask=None, ablate_mask=None) for s in settings]
    out = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1), *rows)
    return out.with_masks(first.steer_mask, first.ablate_mask)


def take(iv: ivs.Intervention, rows) -> ivs.Intervention:
    """The intervention of batch `len(rows)` whose row b is setting `rows[b]` of `iv` (batch S, or
    1: then every row gets it); closed-loop rules, modes and conditions travel with their rows."""
    rows = jnp.asarray(rows)
    pick = lambda x: x[:, jnp.zeros_like(rows)] if x.shape[1] == 1 else x[:, rows]
    out = jax.tree_util.tree_map(pick, dataclasses.replace(iv, steer_mask=None, ablate_mask=None))
    return out.with_masks(iv.steer_mask, iv.ablate_mask)
