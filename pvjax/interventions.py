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

Closed-loop steering (optional `closed_loop` field, `ClosedLoop`): a row and layer whose mode is
`cap` or `target` does not use its fixed coefficient; at every position the steering mask selects,
the current projection `p = h . v / |v|` (after that row's ablation, before steering) sets it:

    cap:     delta = min(0, value - p)       only the part above the ceiling `value` is removed
    target:  delta = value - p               steer toward `value`
    delta <- clip(gain * delta, -max_step, max_step);   h <- h + delta * v / |v|

so with gain 1 the projection lands exactly on the ceiling or the target. `p`, `value` and
`max_step` are in units of the projection onto the unit vector, the same numbers `probes=` of a unit
vector report. Mode `fixed` rows use `c` exactly as above (bit for bit: the coefficient is selected,
not recomputed), so fixed, cap and target rows share one batch and one compiled program. Each
position is edited from its own projection only, so the rule is causal: in generation it acts per
new token (and on the prompt tokens where the position mask covers them), and a plain forward over
prompt and answer reproduces what generation did.

Modes (optional `modes` field, `Modes`): per layer and row, how the steering vector edits the
residual. `ADD` is the addition above (bit for bit: the selected result is the same sum).
`RESCALE` adds, then scales each steered position back to the norm it had before the edit.
`ROTATE` reads the coefficient as an angle `theta` (radians) and turns each steered position
toward the vector within the plane of the two, keeping its norm:

    w = v / |v|,  p = h . w,  h_perp = h - p w,  phi = atan2(|h_perp|, p)
    psi = clip(phi - theta, 0, pi);   h <- |h| (cos(psi) w + sin(psi) h_perp / |h_perp|)

so `theta = 0` is the identity (the input is selected, not recomputed), `theta > 0` raises the
projection on `w` monotonically (never past the vector itself) and `theta < 0` lowers it. Modes
are data: add, rescale and rotate rows share one compiled program.

Conditions (optional `condition` field, `Condition`): a row's steering at the layers marked
`gated` applies only when the last prompt token's residual at the condition's layer, projected on
the unit condition vector (or its cosine with it), is `>= threshold` (CAST, arXiv 2409.05907). The
decoder reads it once the scan reaches that layer, before that layer's edit, and carries the gate
through the later layers; generation evaluates it in the prompt pass and hands the result to
every decode step (`known`, `state`). A false gate zeroes the row's steering mask at the gated
layers (bit for bit unsteered there), a true one leaves it as it is (bit for bit the
unconditional steering); so a condition may gate only layers at or after its own.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pvjax.errors import UserError

POSITION_MODES = ("all", "prompt", "response")


class InterventionError(UserError, ValueError):
    """An intervention that does not fit the model it is applied to."""


FIXED, CAP, TARGET = 0, 1, 2  # ClosedLoop.mode values
ADD, RESCALE, ROTATE = 0, 1, 2  # Modes.mode values


@struct.dataclass
class ClosedLoop:
    """Per-layer, per-row feedback rule for the steering vector (see the module docstring)."""

    mode: jax.Array  # [L, B|1] int32: FIXED, CAP or TARGET
    value: jax.Array  # [L, B|1] float32: the ceiling (CAP) or the set point (TARGET)
    gain: jax.Array  # [L, B|1] float32: share of the gap closed per position (1: all of it)
    max_step: jax.Array  # [L, B|1] float32: largest |delta| per position (inf: no limit)

    @classmethod
    def fixed(cls, n_rows: int, batch: int = 1) -> "ClosedLoop":
        """Every row and layer in fixed mode: the same edits as no closed loop at all."""
        return cls(
            mode=jnp.zeros((n_rows, batch), jnp.int32),
            value=jnp.zeros((n_rows, batch), jnp.float32),
            gain=jnp.ones((n_rows, batch), jnp.float32),
            max_step=jnp.full((n_rows, batch), jnp.inf, jnp.float32),
        )


@struct.dataclass
class Modes:
    """Per-layer, per-row steering mode (see the module docstring)."""

    mode: jax.Array  # [L, B|1] int32: ADD, RESCALE or ROTATE (then the coefficient is an angle)

    @classmethod
    def add(cls, n_rows: int, batch: int = 1) -> "Modes":
        return cls(mode=jnp.zeros((n_rows, batch), jnp.int32))


@struct.dataclass
class Condition:
    """Per-row condition on the prompt (see the module docstring). The batch is axis 1 of every
    leaf, as in the rest of the intervention, so rows are taken and stacked alike."""

    vector: jax.Array  # [1, B|1, D] float32 unit vector
    layer: jax.Array  # [1, B|1] int32: the row read (-1: no condition)
    threshold: jax.Array  # [1, B|1] float32: steer where score >= threshold
    cosine: jax.Array  # [1, B|1] float32: 1 scores the cosine, 0 the projection
    gated: jax.Array  # [L, B|1] float32: 1 where the row's steering waits for the condition
    known: jax.Array  # [1, B|1] float32: 1 where `state` holds the gate (decode steps)
    state: jax.Array  # [1, B|1] float32: the gate where known (1 steer, 0 not)
    column: jax.Array  # [1, B|1] int32: the last prompt token's column (-1: the last column)

    @classmethod
    def none(cls, n_rows: int, width: int, batch: int = 1) -> "Condition":
        """No row conditioned: every gate open, nothing gated."""
        return cls(
            vector=jnp.zeros((1, batch, width), jnp.float32),
            layer=jnp.full((1, batch), -1, jnp.int32),
            threshold=jnp.zeros((1, batch), jnp.float32),
            cosine=jnp.zeros((1, batch), jnp.float32),
            gated=jnp.zeros((n_rows, batch), jnp.float32),
            known=jnp.zeros((1, batch), jnp.float32),
            state=jnp.ones((1, batch), jnp.float32),
            column=jnp.full((1, batch), -1, jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class Feedback:
    """A closed-loop steering coefficient for `build`: use `cap(...)` or `target(...)`."""

    mode: int
    value: float
    gain: float = 1.0
    max_step: float = float("inf")

    def __post_init__(self):
        for name in ("value", "gain", "max_step"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float, np.integer, np.floating))
                or np.isnan(v)
            ):
                raise InterventionError(f"closed-loop {name} must be a number, got {v!r}")
        if not np.isfinite(self.value):
            raise InterventionError(f"closed-loop value must be finite, got {self.value!r}")
        if not (np.isfinite(self.gain) and self.gain > 0):
            raise InterventionError(
                f"closed-loop gain must be a finite number > 0, got {self.gain!r}"
            )
        if not self.max_step > 0:
            raise InterventionError(
                f"closed-loop max_step must be > 0 (inf: no limit), got {self.max_step!r}"
            )


def cap(ceiling: float, *, gain: float = 1.0, max_step: float = float("inf")) -> Feedback:
    """Closed-loop coefficient: remove only the part of the projection onto the unit vector above
    `ceiling`, at every steered position (rows below the ceiling are left untouched)."""
    return Feedback(CAP, ceiling, gain, max_step)


def target(value: float, *, gain: float = 1.0, max_step: float = float("inf")) -> Feedback:
    """Closed-loop coefficient: move the projection onto the unit vector toward `value` (by
    `gain` of the gap, at most `max_step`) at every steered position."""
    return Feedback(TARGET, value, gain, max_step)


@struct.dataclass
class Intervention:
    """The edits of every hidden-state row (see the module docstring). Every field is data (a pytree
    leaf, traced), none static: a new vector, coefficient, layer or mask never recompiles."""

    steer_vectors: jax.Array  # [L, B|1, D]
    steer_coefs: jax.Array  # [L, B|1]
    ablate_dirs: jax.Array  # [L, B|1, D], unit vectors
    ablate_coefs: jax.Array  # [L, B|1]
    steer_mask: jax.Array  # [B|1, T] 1 where steering applies
    ablate_mask: jax.Array  # [B|1, T]
    closed_loop: ClosedLoop | None = None  # None: every row fixed (and no projection computed)
    modes: Modes | None = None  # None: every row ADD (and no norms computed)
    condition: Condition | None = None  # None: nothing gated (and no gate computed)

    @property
    def n_rows(self) -> int:
        return self.steer_vectors.shape[0]

    def with_masks(self, steer_mask, ablate_mask=None) -> "Intervention":
        return self.replace(
            steer_mask=steer_mask, ablate_mask=steer_mask if ablate_mask is None else ablate_mask
        )

    def with_closed_loop(self) -> "Intervention":
        """The same edits, with a `closed_loop` field in any case (all fixed when absent), so
        that fixed and closed-loop requests share a compiled program."""
        if self.closed_loop is not None:
            return self
        return self.replace(closed_loop=ClosedLoop.fixed(self.n_rows))

    def with_modes(self) -> "Intervention":
        """The same edits, with a `modes` field in any case (all ADD when absent)."""
        if self.modes is not None:
            return self
        return self.replace(modes=Modes.add(self.n_rows))

    def with_condition(self) -> "Intervention":
        """The same edits, with a `condition` field in any case (nothing gated when absent)."""
        if self.condition is not None:
            return self
        return self.replace(condition=Condition.none(self.n_rows, self.steer_vectors.shape[-1]))

    def with_condition_column(self, column_B) -> "Intervention":
        """The condition read at column `column_B[b]` of row b (a plain forward over prompt and
        answer: the last prompt token's column), instead of the last column."""
        if self.condition is None:
            return self
        col = jnp.asarray(column_B, jnp.int32).reshape(1, -1)
        return self.replace(condition=self.condition.replace(column=col))

    def with_gate(self, gate_B) -> "Intervention":
        """The condition's gate fixed to `gate_B` (from the prompt pass): decode steps."""
        if self.condition is None:
            return self
        gate = jnp.asarray(gate_B, jnp.float32).reshape(1, -1)
        return self.replace(condition=self.condition.replace(known=jnp.ones_like(gate), state=gate))

    def take_rows(self, rows, n_total: int, pad_to: int) -> "Intervention":
        """The intervention for a chunk of `n_total` inputs: per-input leaves (batch `n_total` on
        axis 1) take `rows` and are zero-padded to `pad_to` rows (zero is the identity); shared
        ones (batch 1) are broadcast. So shared, per-input and absent interventions all run one
        program. The masks are left as they are."""
        rows = np.asarray(rows)

        def take(x):
            if x.shape[1] == 1:
                return jnp.broadcast_to(x, (x.shape[0], pad_to) + x.shape[2:])
            if x.shape[1] != n_total:
                raise InterventionError(
                    f"intervention batch {x.shape[1]} matches neither 1 nor the {n_total} inputs"
                )
            x = x[:, rows]
            pad = [(0, 0)] * x.ndim
            pad[1] = (0, pad_to - len(rows))
            return jnp.pad(x, pad)

        masks = (self.steer_mask, self.ablate_mask)
        out = jax.tree_util.tree_map(take, self.replace(steer_mask=None, ablate_mask=None))
        return out.with_masks(*masks)


def apply_row(
    h_BTD,
    steer_v_BD,
    steer_c_B,
    abl_u_BD,
    abl_c_B,
    steer_m_BT,
    abl_m_BT,
    closed: ClosedLoop | None = None,
    mode_B=None,
):
    """Edit one residual row; the edit is computed in float32 whatever the activation dtype.
    `closed` holds this row's `ClosedLoop` leaves (`[B]` each), or None (all fixed); `mode_B`
    this row's `Modes.mode`, or None (all ADD)."""
    h = h_BTD.astype(jnp.float32)
    u = abl_u_BD.astype(jnp.float32)[:, None, :]
    proj_BT = jnp.sum(h * u, axis=-1)
    h = h - (abl_c_B[:, None] * abl_m_BT * proj_BT)[..., None] * u
    v = steer_v_BD.astype(jnp.float32)[:, None, :]
    if closed is not None:  # measured before the fixed edit, which is zero on closed-loop rows
        norm_B1 = jnp.sqrt(jnp.sum(v * v, axis=-1))
        inv_B1 = jnp.where(norm_B1 > 0, 1 / jnp.where(norm_B1 > 0, norm_B1, 1), 0)
        p_BT = jnp.sum(h * v, axis=-1) * inv_B1
        delta_BT = closed.value[:, None] - p_BT
        delta_BT = jnp.where(closed.mode[:, None] == CAP, jnp.minimum(delta_BT, 0), delta_BT)
        step_B1 = closed.max_step[:, None]
        delta_BT = jnp.clip(closed.gain[:, None] * delta_BT, -step_B1, step_B1)
        closed_c_BT = jnp.where(closed.mode[:, None] == FIXED, 0.0, delta_BT * inv_B1)
    h_in = h
    coef_B = steer_c_B
    if mode_B is not None:  # a rotation's coefficient is its angle, not an added amount
        coef_B = jnp.where(mode_B == ROTATE, 0.0, steer_c_B)
    h = h + (coef_B[:, None] * steer_m_BT)[..., None] * v
    if closed is not None:
        # A second, separate edit: on fixed rows it adds exact zeros.
        h = h + (closed_c_BT * steer_m_BT)[..., None] * v
    if mode_B is not None:
        h = _norm_keeping(h_in, h, v, steer_c_B, steer_m_BT, mode_B)
    return h.astype(h_BTD.dtype)


def _norm_keeping(h0_BTD, h1_BTD, v_B1D, angle_B, m_BT, mode_B):
    """RESCALE and ROTATE rows of `apply_row` (the module docstring's formulas); ADD rows, and
    positions the mask leaves out, keep `h1` (the addition) as it is."""
    on_BT = m_BT > 0
    n0_BT = jnp.sqrt(jnp.sum(h0_BTD * h0_BTD, axis=-1))
    n1_BT = jnp.sqrt(jnp.sum(h1_BTD * h1_BTD, axis=-1))
    rescaled = h1_BTD * (n0_BT / jnp.where(n1_BT > 0, n1_BT, 1))[..., None]
    vn_B1 = jnp.sqrt(jnp.sum(v_B1D * v_B1D, axis=-1))
    w_B1D = v_B1D / jnp.where(vn_B1 > 0, vn_B1, 1)[..., None]
    p_BT = jnp.sum(h0_BTD * w_B1D, axis=-1)
    perp_BTD = h0_BTD - p_BT[..., None] * w_B1D
    s_BT = jnp.sqrt(jnp.sum(perp_BTD * perp_BTD, axis=-1))
    theta_B1 = angle_B[:, None]
    psi_BT = jnp.clip(jnp.arctan2(s_BT, p_BT) - theta_B1, 0.0, jnp.pi)
    rotated = (n0_BT * jnp.cos(psi_BT))[..., None] * w_B1D + (
        n0_BT * jnp.sin(psi_BT) / jnp.where(s_BT > 0, s_BT, 1)
    )[..., None] * perp_BTD
    mode_B1 = mode_B[:, None]
    rescale_BT = (mode_B1 == RESCALE) & on_BT
    rotate_BT = (mode_B1 == ROTATE) & on_BT & (theta_B1 != 0) & (s_BT > 0) & (vn_B1 > 0)
    h = jnp.where(rescale_BT[..., None], rescaled, h1_BTD)
    return jnp.where(rotate_BT[..., None], rotated, h)


def condition_gate(h_BTD, cond: Condition, row, gate_B):
    """The gate `[B]` after the scan reaches hidden-state row `row` with residual `h`: rows whose
    condition reads this row (and is not `known`) score the residual at their column."""
    B, T = h_BTD.shape[:2]
    col_B = jnp.broadcast_to(cond.column[0], (B,))
    col_B = jnp.where(col_B < 0, T + col_B, col_B)
    x_BD = h_BTD[jnp.arange(B), col_B].astype(jnp.float32)
    w_BD = cond.vector[0].astype(jnp.float32)
    dot_B = jnp.sum(x_BD * w_BD, axis=-1)
    norm_B = jnp.sqrt(jnp.sum(x_BD * x_BD, axis=-1))
    score_B = jnp.where(cond.cosine[0] > 0, dot_B / jnp.maximum(norm_B, 1e-30), dot_B)
    fire_B = (cond.layer[0] == row) & (cond.known[0] == 0)
    return jnp.where(fire_B, (score_B >= cond.threshold[0]).astype(jnp.float32), gate_B)


def gated_mask(steer_m_BT, gated_B, gate_B):
    """The steering mask of a row under its gate: zero where the row is gated and the gate shut,
    unchanged (multiplied by exactly 1) elsewhere."""
    return steer_m_BT * (1.0 - gated_B * (1.0 - gate_B))[:, None]


def _check_vector(v: np.ndarray, n_rows: int, width: int, what: str) -> np.ndarray:
    try:
        v = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InterventionError(f"{what} is not an array of numbers ({e})") from None
    if v.ndim not in (1, 2):
        raise InterventionError(f"{what} must be [D] or [n_layers+1, D], got shape {v.shape}")
    if v.shape[-1] != width:
        raise InterventionError(
            f"{what} has width {v.shape[-1]} but the model's hidden size is {width}"
        )
    if not np.all(np.isfinite(v)):
        raise InterventionError(f"{what} contains NaN or infinite values")
    if v.ndim == 2 and v.shape[0] != n_rows:
        raise InterventionError(
            f"{what} has {v.shape[0]} rows but the model has n_layers+1 = {n_rows} hidden states"
        )
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
        raise InterventionError(
            f"{what} has shape {c.shape}: give one number, or one per batch row (batch={batch})"
        )
    if not np.all(np.isfinite(c)):
        raise InterventionError(f"{what} must be finite, got {coef!r}")
    return np.broadcast_to(c, (batch,))


def _steer_coefs(coef, batch: int):
    """`([batch] fixed coefficients (0 on closed-loop rows), [batch] Feedback or None)` from a
    number, a `Feedback`, or one of either per row."""
    items = (
        [coef] * batch
        if isinstance(coef, Feedback)
        else coef
        if isinstance(coef, (list, tuple))
        else None
    )
    if items is None or not any(isinstance(x, Feedback) for x in items):
        return _check_coefs(coef, batch, "steering coefficient"), [None] * batch
    if len(items) != batch:
        raise InterventionError(
            f"steering coefficient has {len(items)} entries: give one, or one per "
            f"batch row (batch={batch})"
        )
    fixed = [0.0 if isinstance(x, Feedback) else x for x in items]
    return _check_coefs(fixed, batch, "steering coefficient"), [
        x if isinstance(x, Feedback) else None for x in items
    ]


def _brief(item) -> str:
    return f"a {type(item).__name__}" + (
        f" of {len(item)}" if isinstance(item, (tuple, list)) else ""
    )


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


def build(
    n_rows: int,
    width: int,
    *,
    steer: Sequence[tuple] = (),
    ablate: Sequence[tuple] = (),
    batch: int = 1,
) -> Intervention:
    """Assemble an intervention from plain numbers, validating everything before any compute.

    `steer` holds `(vector, layer, coef)` items and `ablate` holds `(vector, layer)` or
    `(vector, layer, strength)` items. A vector is `[D]` or `[n_layers+1, D]` (then row `layer` is
    used, the reference implementation's file layout). `coef` (and `strength`) may be a scalar or a
    length-`batch` sequence, one value per batch row; every value must be finite. Ablation
    directions are normalised to unit length.

    A steering `coef` (or any entry of a per-row list) may also be closed loop: `cap(ceiling)` or
    `target(value, gain=, max_step=)` (see the module docstring), e.g.
    `steer=[(v, 12, [4.0, cap(2.5), target(0.0, gain=0.5)])]` with `batch=3` runs a fixed, a capped
    and a targeted row side by side. The intervention then carries a `ClosedLoop`.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InterventionError(f"batch must be a positive integer, got {batch!r}")
    sv = np.zeros((n_rows, batch, width), np.float32)
    sc = np.zeros((n_rows, batch), np.float32)
    au = np.zeros((n_rows, batch, width), np.float32)
    ac = np.zeros((n_rows, batch), np.float32)
    fixed = ClosedLoop.fixed(n_rows, batch)
    loop = {f.name: np.array(getattr(fixed, f.name)) for f in dataclasses.fields(ClosedLoop)}
    for item in steer:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InterventionError(f"each steer item is (vector, layer, coef), got {_brief(item)}")
        vec, layer, coef = item
        vec = _check_vector(vec, n_rows, width, "steering vector")
        coef, feedback = _steer_coefs(coef, batch)
        for l in _check_layers(layer, n_rows):
            if np.any(sc[l] != 0) or np.any(loop["mode"][l] != FIXED):
                raise InterventionError(f"two steering vectors target layer {l}; add them first")
            sv[l] = vec[l] if vec.ndim == 2 else vec
            sc[l] = coef
            for b, fb in enumerate(feedback):
                if fb is None:
                    continue
                if not np.any(sv[l]):
                    raise InterventionError(f"closed-loop steering vector at layer {l} is zero")
                for name in loop:
                    loop[name][l, b] = getattr(fb, name)
    for item in ablate:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise InterventionError(
                f"each ablate item is (vector, layer[, strength]), got {_brief(item)}"
            )
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
    closed = None
    if np.any(loop["mode"] != FIXED):
        closed = ClosedLoop(**{k: jnp.asarray(x) for k, x in loop.items()})
    return dataclasses.replace(
        iv,
        steer_vectors=jnp.asarray(sv),
        steer_coefs=jnp.asarray(sc),
        ablate_dirs=jnp.asarray(au),
        ablate_coefs=jnp.asarray(ac),
        closed_loop=closed,
    )


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
