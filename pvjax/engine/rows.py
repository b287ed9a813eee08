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
    """S batch-1 interventions (`interventions.build`) as one intervention of batch S. When any
    setting is closed loop (`cap`/`target`), every setting carries a `closed_loop` (fixed where it
    had none), so the grid stays one pytree structure: one program for all its rows."""
    cat = lambda name: jnp.concatenate([getattr(s, name) for s in settings], axis=1)
    first = settings[0]
    closed = None
    if any(s.closed_loop is not None for s in settings):
        loops = [s.with_closed_loop().closed_loop for s in settings]
        closed = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1), *loops)
    return dataclasses.replace(
        first,
        steer_vectors=cat("steer_vectors"),
        steer_coefs=cat("steer_coefs"),
        ablate_dirs=cat("ablate_dirs"),
        ablate_coefs=cat("ablate_coefs"),
        closed_loop=closed,
    )


def take(iv: ivs.Intervention, rows) -> ivs.Intervention:
    """The intervention of batch `len(rows)` whose row b is setting `rows[b]` of `iv` (batch S, or
    1: then every row gets it); closed-loop rules travel with their rows."""
    rows = jnp.asarray(rows)
    pick = lambda x: x[:, jnp.zeros_like(rows)] if x.shape[1] == 1 else x[:, rows]
    closed = None if iv.closed_loop is None else jax.tree_util.tree_map(pick, iv.closed_loop)
    return dataclasses.replace(
        iv,
        steer_vectors=pick(iv.steer_vectors),
        steer_coefs=pick(iv.steer_coefs),
        ablate_dirs=pick(iv.ablate_dirs),
        ablate_coefs=pick(iv.ablate_coefs),
        closed_loop=closed,
    )
