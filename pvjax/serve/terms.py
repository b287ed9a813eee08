"""What a request asks of the residual stream beyond its text, and the one function that turns it
into an intervention row (`intervention_for`).

Shape legend: L = n_layers + 1 hidden-state rows, D hidden size, K probe columns.

Steering terms are `pvjax.engine.terms.SteerTerm`s, the format the CLI, configs and studies
share (`from_dict` reads each request item); only two things are the server's own. A term's
`vector` (and `without`) is the name of a vector the server was started with, resolved to its
`[L, D]` rows here (`resolved`) before `check_terms` and `build_intervention` see it. Ablation
terms (`AblateTerm`) are `build_intervention`'s `ablate` items by name.

Vectors and monitors are named when the server starts; a request only names them. The probes the
engine reads on every token are fixed at startup too (`Catalog.probes`): one column per vector
(its unit row at every layer) and one per monitor (its direction at its layer, zero elsewhere), so
any request's readings come from the same compiled program.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pvjax.engine import terms as T


@dataclasses.dataclass(frozen=True)
class AblateTerm:
    vector: str
    layers: tuple[int, ...]
    strength: float = 1.0

    def applied(self) -> dict:
        return {"vector": self.vector, "layers": list(self.layers), "strength": self.strength}


def applied(t: T.SteerTerm, positions: str) -> dict:
    """A steering term as the response reports it: `layer` for one layer, `layers` for several."""
    out: dict = {"vector": t.vector}
    if len(t.layers) == 1:
        out["layer"] = t.layers[0]
    else:
        out["layers"] = list(t.layers)
    which, value = t.strength
    out[which] = value
    if t.mode == "rescale":  # rotate goes with angle, add with the rest: said by the strength
        out["mode"] = t.mode
    if which in ("cap", "target"):
        out["gain"] = t.gain
        out["max_step"] = None if math.isinf(t.max_step) else t.max_step
    if t.without is not None:
        out["without"] = t.without
    if t.when is not None:
        c = t.when
        out["when"] = {"vector": c.vector, "layer": c.layer, "threshold": c.threshold, "on": c.on}
    out["positions"] = positions
    return out


@dataclasses.dataclass(frozen=True)
class Steering:
    """Everything a request asks beside its text: steering terms (vectors by name), ablations,
    monitors to read, projections, and the request's one position mode."""

    steer: tuple[T.SteerTerm, ...] = ()
    ablate: tuple[AblateTerm, ...] = ()
    monitors: tuple[str, ...] = ()
    projections: bool = False
    positions: str = "response"

    def summary(self) -> str:
        """One short line for the request log (names and numbers, never text)."""
        parts = [f"{T.describe(self.steer)}:{self.positions}"] if self.steer else []
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

    def resolved(self, t: T.SteerTerm) -> T.SteerTerm:
        """The term with its vector names (its own, `without`'s and its condition's) replaced by
        the startup vectors' `[L, D]` rows."""
        without = None if t.without is None else self.vectors[t.without]
        when = t.when
        if when is not None:
            when = dataclasses.replace(when, vector=self.vectors[when.vector])
        return dataclasses.replace(t, vector=self.vectors[t.vector], without=without, when=when)


def intervention_for(steering: Steering, catalog: Catalog, model):
    """The intervention of batch 1 for one request (None: the identity row), through
    `pvjax.engine.terms`. Raises `TermError` for terms the model cannot take."""
    if not steering.steer and not steering.ablate:
        return None
    rows = [[catalog.resolved(t) for t in steering.steer]]
    ablate = [(catalog.vectors[a.vector], list(a.layers), a.strength) for a in steering.ablate]
    T.check_terms(rows, model)
    return T.build_intervention(rows, model, ablate=ablate)
