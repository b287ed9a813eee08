"""Interventions on the residual stream, as data.

Shape legend: L = n_layers + 1 rows indexed like `hidden_states` (row 0 = embeddings, row l = output
of block l), B = batch (or 1 to broadcast), T = positions, D = hidden size.

An `Intervention` is a pytree of arrays passed into the forward and applied inside the layer scan,
right after block l-1 writes row l. At each row, ablation runs first, then addition:

    h <- h - a * m_abl * (h . u) u        (directional ablation, a = 1 removes the projection: CAFT)
    h <- h + c * m_steer * v              (additive steering)

Coefficient 0 is the identity, so steering, ablation, preventative steering and multi-layer steering
share one compiled program: coefficients, vectors, layer choice and position masks are all traced,
so sweeping them never recompiles. Every batch row may carry its own coefficients and vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pvjax.errors import UserError

POSITION_MODES = ("all", "prompt", "response")


class InterventionError(UserError, ValueError):
    """An intervention that does not fit the model it is applied to."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
    steer_vectors: jax.Array  # [L, B|1, D]
    steer_coefs: jax.Array  # [L, B|1]
    ablate_dirs: jax.Array  # [L, B|1, D], unit vectors
    ablate_coefs: jax.Array  # [L, B|1]
    steer_mask: jax.Array  # [B|1, T] 1 where steering applies
    ablate_mask: jax.Array  # [B|1, T]

    @property
    def n_rows(self) -> int:
        return self.steer_vectors.shape[0]

    def with_masks(self, steer_mask, ablate_mask=None) -> "Intervention":
        return dataclasses.replace(self, steer_mask=steer_mask,
                                   ablate_mask=steer_mask if ablate_mask is None else ablate_mask)


def apply_row(h_BTD, steer_v_BD, steer_c_B, abl_u_BD, abl_c_B, steer_m_BT, abl_m_BT):
    """Edit one residual row; the edit is computed in float32 whatever the activation dtype."""
    h = h_BTD.astype(jnp.float32)
    u = abl_u_BD.astype(jnp.float32)[:, None, :]
    proj_BT = jnp.sum(h * u, axis=-1)
    h = h - (abl_c_B[:, None] * abl_m_BT * proj_BT)[..., None] * u
    h = h + (steer_c_B[:, None] * steer_m_BT)[..., None] * steer_v_BD.astype(jnp.float32)[:, None, :]
    return h.astype(h_BTD.dtype)


def _check_vector(v: np.ndarray, n_rows: int, width: int, what: str) -> np.ndarray:
    try:
        v = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InterventionError(f"{what} is not an array of numbers ({e})") from None
    if v.ndim not in (1, 2):
        raise InterventionError(f"{what} must be [D] or [n_layers+1, D], got shape {v.shape}")
    if v.shape[-1] != width:
        raise InterventionError(f"{what} has width {v.shape[-1]} but the model's hidden size is {width}")
    if not np.all(np.isfinite(v)):
        raise InterventionError(f"{what} contains NaN or infinite values")
    if v.ndim == 2 and v.shape[0] != n_rows:
        raise InterventionError(
            f"{what} has {v.shape[0]} rows but the model has n_layers+1 = {n_rows} hidden states")
    return v


def _check_layers(layers: Sequence[int], n_rows: int) -> list[int]:
    out = []
    for l in np.atleast_1d(np.asarray(layers, dtype=object)):
        if isinstance(l, (bool, np.bool_)) or not isinstance(l, (int, np.integer)):
            raise InterventionError(f"layer {l!r} is not an integer (hidden_states indices)")
        if not 0 <= l < n_rows:
            raise InterventionError(f"layer {l} is outside 0..{n_rows - 1} (hidden_states indices)")
        out.append(int(l))
    return out


def _check_coefs(coef, batch: int, what: str) -> np.ndarray:
    """`[batch]` finite float32 values from a scalar (every row) or one value per row. A sequence
    of another length is refused rather than broadcast: it names rows that do not exist."""
    try:
        with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
            c = np.asarray(coef, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InterventionError(f"{what} {coef!r} is not a number ({e})") from None
    if c.ndim > 1 or (c.ndim == 1 and len(c) != batch):
        raise InterventionError(f"{what} has shape {c.shape}: give one number, or one per batch row "
                                f"(batch={batch})")
    if not np.all(np.isfinite(c)):
        raise InterventionError(f"{what} must be finite, got {coef!r}")
    return np.broadcast_to(c, (batch,))


def _brief(item) -> str:
    return f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")


def empty(n_rows: int, width: int, batch: int = 1, dtype=jnp.float32) -> Intervention:
    """The identity intervention (all coefficients zero)."""
    return Intervention(
        steer_vectors=jnp.zeros((n_rows, batch, width), dtype),
        steer_coefs=jnp.zeros((n_rows, batch), jnp.float32),
        ablate_dirs=jnp.zeros((n_rows, batch, width), dtype),
        ablate_coefs=jnp.zeros((n_rows, batch), jnp.float32),
        steer_mask=jnp.ones((1, 1), jnp.float32),
        ablate_mask=jnp.ones((1, 1), jnp.float32),
    )


def build(n_rows: int, width: int, *, steer: Sequence[tuple] = (), ablate: Sequence[tuple] = (),
          batch: int = 1) -> Intervention:
    """Assemble an intervention from plain numbers, validating everything before any compute.

    `steer` holds `(vector, layer, coef)` items and `ablate` holds `(vector, layer)` or
    `(vector, layer, strength)` items. A vector is `[D]` or `[n_layers+1, D]` (then row `layer` is
    used, the reference implementation's file layout). `coef` (and `strength`) may be a scalar or a
    length-`batch` sequence, one value per batch row; every value must be finite. Ablation
    directions are normalised to unit length.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InterventionError(f"batch must be a positive integer, got {batch!r}")
    sv = np.zeros((n_rows, batch, width), np.float32)
    sc = np.zeros((n_rows, batch), np.float32)
    au = np.zeros((n_rows, batch, width), np.float32)
    ac = np.zeros((n_rows, batch), np.float32)
    for item in steer:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InterventionError(f"each steer item is (vector, layer, coef), got {_brief(item)}")
        vec, layer, coef = item
        vec = _check_vector(vec, n_rows, width, "steering vector")
        coef = _check_coefs(coef, batch, "steering coefficient")
        for l in _check_layers(layer, n_rows):
            if np.any(sc[l] != 0):
                raise InterventionError(f"two steering vectors target layer {l}; add them first")
            sv[l] = vec[l] if vec.ndim == 2 else vec
            sc[l] = coef
    for item in ablate:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise InterventionError(f"each ablate item is (vector, layer[, strength]), got {_brief(item)}")
        vec, layer = item[:2]
        strength = _check_coefs(item[2] if len(item) > 2 else 1.0, batch, "ablation strength")
        vec = _check_vector(vec, n_rows, width, "ablation direction")
        for l in _check_layers(layer, n_rows):
            u = vec[l] if vec.ndim == 2 else vec
            norm = float(np.linalg.norm(u))
            if norm == 0:
                raise InterventionError(f"ablation direction at layer {l} is zero")
            au[l] = u / norm
            ac[l] = strength
    iv = empty(n_rows, width, batch)
    return dataclasses.replace(iv, steer_vectors=jnp.asarray(sv), steer_coefs=jnp.asarray(sc),
                               ablate_dirs=jnp.asarray(au), ablate_coefs=jnp.asarray(ac))


def position_mask(mode: str, attention_mask_BT, prompt_end: int | np.ndarray | None = None):
    """Where steering applies in a plain forward over `prompt (+ response)` tokens.

    `all`: every real token. `prompt`: tokens before `prompt_end` (a column index, or one per row).
    `response`: the last prompt token and every token after it, which is exactly what the reference
    implementation's KV-cached generation steers (the last position of each forward pass).
    """
    if mode not in POSITION_MODES:
        raise InterventionError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
    m = jnp.asarray(attention_mask_BT, jnp.float32)
    if mode == "all":
        return m
    T = m.shape[1]
    end = jnp.asarray(T if prompt_end is None else prompt_end).reshape(-1, 1)
    col = jnp.arange(T)[None, :]
    sel = col < end if mode == "prompt" else col >= end - 1
    return m * sel.astype(jnp.float32)
