"""What a request asks of the residual stream: steering terms, ablation terms, monitors and
per-token projections, as frozen data, and the one function that turns them into an
intervention row (`intervention_for`).

Shape legend: L = n_layers + 1 hidden-state rows, D hidden size, K probe columns.

Vectors and monitors are named when the server starts; a request only names them. The probes the
engine reads on every token are fixed at startup too (`Catalog.probes`): one column per vector
(its unit row at every layer) and one per monitor (its direction at its layer, zero elsewhere), so
any request's readings come from the same compiled program.

`intervention_for` is the only place where the request's terms meet `pvjax.interventions`; a
shared steering-term format can replace these classes without touching the server around them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pvjax import interventions as ivs


@dataclasses.dataclass(frozen=True)
class SteerTerm:
    """`coef` (fixed), or `cap` / `target` (closed loop, with `gain` and `max_step`)."""

    vector: str
    layer: int
    coef: float | None = None
    cap: float | None = None
    target: float | None = None
    gain: float = 1.0
    max_step: float = math.inf
    positions: str = "response"

    def applied(self) -> dict:
        """The term as the response reports it."""
        out = {"vector": self.vector, "layer": self.layer}
        if self.coef is not None:
            out["coef"] = self.coef
        else:
            out["cap" if self.cap is not None else "target"] = (
                self.cap if self.cap is not None else self.target
            )
            out["gain"] = self.gain
            out["max_step"] = None if math.isinf(self.max_step) else self.max_step
        out["positions"] = self.positions
        return out


@dataclasses.dataclass(frozen=True)
class AblateTerm:
    vector: str
    layers: tuple[int, ...]
    strength: float = 1.0

    def applied(self) -> dict:
        return {"vector": self.vector, "layers": list(self.layers), "strength": self.strength}


@dataclasses.dataclass(frozen=True)
class Steering:
    """Everything a request asks beside its text: edits, monitors to read, projections."""

    steer: tuple[SteerTerm, ...] = ()
    ablate: tuple[AblateTerm, ...] = ()
    monitors: tuple[str, ...] = ()
    projections: bool = False

    @property
    def positions(self) -> str:
        return self.steer[0].positions if self.steer else "response"

    def summary(self) -> str:
        """One short line for the request log (names and numbers, never text)."""
        parts = []
        for t in self.steer:
            how = (
                f"coef={t.coef:g}"
                if t.coef is not None
                else f"cap={t.cap:g}"
                if t.cap is not None
                else f"target={t.target:g}"
            )
            parts.append(f"{t.vector}@{t.layer}:{how}:{t.positions}")
        parts += [f"ablate:{a.vector}@{','.join(map(str, a.layers))}" for a in self.ablate]
        return " ".join(parts) or "-"


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """The vectors (`[L, D]` each) and monitors (`pvjax.methods.monitoring.Monitor`) a server
    was started with, by name."""

    vectors: dict
    monitors: dict

    def probes(self, L: int, D: int) -> np.ndarray | None:
        """`[L, K, D]`: the unit vector rows, then each monitor's direction at its layer."""
        cols = []
        for v in self.vectors.values():
            rows = np.broadcast_to(np.asarray(v, np.float32), (L, D))
            cols.append(rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12))
        for m in self.monitors.values():
            col = np.zeros((L, D), np.float32)
            col[m.layer] = m.direction
            cols.append(col)
        return np.stack(cols, axis=1).astype(np.float32) if cols else None

    def vector_column(self, name: str) -> int:
        return list(self.vectors).index(name)

    def monitor_column(self, name: str) -> int:
        return len(self.vectors) + list(self.monitors).index(name)


def intervention_for(steering: Steering, catalog: Catalog, L: int, D: int):
    """`(intervention of batch 1 or None, steering position mode)` for one request. Raises
    `pvjax.interventions.InterventionError` for terms the model cannot take."""
    steer = []
    for t in steering.steer:
        if t.coef is not None:
            coef = t.coef
        elif t.cap is not None:
            coef = ivs.cap(t.cap, gain=t.gain, max_step=t.max_step)
        else:
            coef = ivs.target(t.target, gain=t.gain, max_step=t.max_step)
        steer.append((catalog.vectors[t.vector], t.layer, coef))
    ablate = [(catalog.vectors[a.vector], list(a.layers), a.strength) for a in steering.ablate]
    if not steer and not ablate:
        return None, steering.positions
    return ivs.build(L, D, steer=steer, ablate=ablate, batch=1), steering.positions
