"""Steering terms: the one format the CLI, configs, studies and the server share.

A *term* steers along one vector at one or more layers (`hidden_states` rows):

    {vector, layer | layers, coef | angle | cap | target, positions, mode, without, when}

- `vector`: `FILE[:KEY]` (a pvjax vector file or a reference `.pt`), or an array `[D]` /
  `[n_layers+1, D]` (row `layer` is used).
- one strength: `coef` (add `coef * v`, or with `mode: rescale` add and then restore each steered
  position's norm), `angle` (radians in [-pi, pi], `mode: rotate`: turn the residual toward the
  vector by that angle within the plane of the two), `cap` or `target` (closed loop, mode `add`;
  with `gain` and `max_step`, `pvjax.interventions.cap`).
- `positions`: `all`, `prompt` or `response`; every term of one request must agree (one position
  mode per generation call).
- `mode`: `add` (default), `rescale`, `rotate` (default when `angle` is given).
- `without`: a direction (`FILE[:KEY]` or array) projected out of the vector first (at each of
  the term's layers), so two traits' shared component can be removed.
- `when`: a `Condition` (`{vector, layer, threshold, on: projection | cosine}`): the term steers
  only where the last prompt token's residual at the condition's layer, projected on the unit
  condition vector (or its cosine with it), is `>= threshold`. Evaluated inside the compiled
  program; a condition gates layers at or after its own (it is read before that layer's edit).

The CLI writes a term as `VECTOR,layer=L,coef=C[,positions=P][,mode=M][,without=V]` (`--steer`,
repeatable; `layer=10-14` or `layer=10+14` for several) and a condition as
`VECTOR,layer=L,threshold=X[,on=cosine]` (`--when`); configs and the server as dicts
(`from_dict`, `to_dict`). Every check that needs no model runs when a term is made; `check_terms`
adds those against a model's shape (a model or a weightless stand-in: depth, width, the vector
files' model), so bad input fails before any weights load, as one line naming the term.

`build_intervention(rows, model)` turns one list of terms per batch row into the existing
`pvjax.interventions.Intervention` data: terms that meet at a layer of a row are summed (two terms
at one layer equal one term with their weighted sum), the mode and the condition become per-row
arrays, so a grid mixing modes and conditions runs as one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from pvjax import interventions as ivs
from pvjax.errors import UserError

MODES = ("add", "rescale", "rotate")
CONDITION_ON = ("projection", "cosine")
STRENGTHS = ("coef", "angle", "cap", "target")
TERM_KEYS = (
    "vector",
    "layer",
    "layers",
    *STRENGTHS,
    "gain",
    "max_step",
    "positions",
    "mode",
    "without",
    "when",
)
CONDITION_KEYS = ("vector", "layer", "threshold", "on")


class TermError(UserError, ValueError):
    """A steering term or condition that cannot run; the message names the term."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _vector_name(v) -> str:
    if isinstance(v, str):
        return v
    return f"<array {list(np.shape(v))}>"


@dataclasses.dataclass(frozen=True)
class Condition:
    """When a term steers: `score >= threshold`, the score being the last prompt token's residual
    at `layer` projected on the unit `vector` (`on="projection"`) or its cosine with it."""

    vector: Any
    layer: int
    threshold: float | None = None
    on: str = "projection"
    label: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        who = self.label or f"condition {_vector_name(self.vector)}"
        if self.threshold is None:
            raise TermError(f"{who}: a condition needs a threshold (threshold=X)")
        if not _is_number(self.threshold) or not math.isfinite(self.threshold):
            raise TermError(f"{who}: threshold must be a finite number, got {self.threshold!r}")
        if not isinstance(self.layer, (int, np.integer)) or isinstance(self.layer, bool):
            raise TermError(f"{who}: layer must be one integer, got {self.layer!r}")
        if self.layer < 0:
            raise TermError(f"{who}: layer {self.layer} is not a hidden_states index (0..)")
        if self.on not in CONDITION_ON:
            raise TermError(f"{who}: on={self.on!r} is not one of {list(CONDITION_ON)}")
        _check_vector_value(self.vector, who)

    def key(self) -> tuple:
        """What makes two conditions the same one (a row holds one condition)."""
        v = self.vector if isinstance(self.vector, str) else np.asarray(self.vector).tobytes()
        return (v, int(self.layer), float(self.threshold), self.on)


@dataclasses.dataclass(frozen=True)
class SteerTerm:
    """One steering term (see the module docstring). Exactly one of `coef`, `angle`, `cap`,
    `target`; `mode` None resolves to `rotate` with an angle and `add` otherwise."""

    vector: Any
    layers: tuple[int, ...]
    coef: float | None = None
    angle: float | None = None
    cap: float | None = None
    target: float | None = None
    gain: float = 1.0
    max_step: float = math.inf
    positions: str | None = None
    mode: str | None = None
    without: Any = None
    when: Condition | None = None
    label: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        who = self.name
        layers = self.layers
        if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
            layers = (layers,)
        try:
            layers = tuple(layers)
        except TypeError:
            raise TermError(f"{who}: layers must be integers, got {self.layers!r}") from None
        if not layers:
            raise TermError(f"{who}: no layer (layer=L)")
        for l in layers:
            if not isinstance(l, (int, np.integer)) or isinstance(l, bool):
                raise TermError(f"{who}: layer {l!r} is not an integer (hidden_states index)")
            if l < 0:
                raise TermError(f"{who}: layer {l} is not a hidden_states index (0..)")
        if len(set(layers)) != len(layers):
            raise TermError(f"{who}: layers {list(layers)} repeat a layer")
        object.__setattr__(self, "layers", tuple(int(l) for l in layers))
        given = [s for s in STRENGTHS if getattr(self, s) is not None]
        if len(given) > 1:
            raise TermError(
                f"{who}: two strengths ({' and '.join(given)}); give one of {', '.join(STRENGTHS)}"
            )
        if not given:
            raise TermError(f"{who}: no strength; give one of coef=, angle=, cap=, target=")
        strength = given[0]
        value = getattr(self, strength)
        if not _is_number(value) or not math.isfinite(value):
            raise TermError(f"{who}: {strength} must be a finite number, got {value!r}")
        if strength == "angle" and not -math.pi <= value <= math.pi:
            raise TermError(f"{who}: angle {value} is outside [-pi, pi] (radians)")
        mode = self.mode if self.mode is not None else "rotate" if strength == "angle" else "add"
        if mode not in MODES:
            raise TermError(f"{who}: unknown mode {mode!r}; one of {list(MODES)}")
        object.__setattr__(self, "mode", mode)
        if mode == "rotate" and strength != "angle":
            raise TermError(f"{who}: mode rotate takes angle= (radians), not {strength}=")
        if strength == "angle" and mode != "rotate":
            raise TermError(f"{who}: angle= rotates; mode {mode} takes coef=")
        if strength in ("cap", "target") and mode != "add":
            raise TermError(f"{who}: {strength}= is closed-loop addition; mode {mode} takes coef=")
        if not (_is_number(self.gain) and math.isfinite(self.gain) and self.gain > 0):
            raise TermError(f"{who}: gain must be a finite number > 0, got {self.gain!r}")
        if not (_is_number(self.max_step) and self.max_step > 0):
            raise TermError(f"{who}: max_step must be > 0 (inf: no limit), got {self.max_step!r}")
        if self.positions is not None and self.positions not in ivs.POSITION_MODES:
            raise TermError(
                f"{who}: positions={self.positions!r} is not one of {list(ivs.POSITION_MODES)}"
            )
        _check_vector_value(self.vector, who)
        if self.without is not None:
            _check_vector_value(self.without, f"{who}: without")
        if self.when is not None:
            if not isinstance(self.when, Condition):
                raise TermError(f"{who}: when must be a Condition, got {type(self.when).__name__}")
            early = [l for l in self.layers if l < self.when.layer]
            if early:
                raise TermError(
                    f"{who}: steers layer {early[0]} before its condition is read at layer "
                    f"{self.when.layer}; a condition gates layers at or after its own"
                )

    @property
    def name(self) -> str:
        """How messages name the term: its label, else its vector and layers."""
        if self.label:
            return self.label
        return f"term {_vector_name(self.vector)} layer={'+'.join(map(str, self.layers))}"

    @property
    def strength(self) -> tuple[str, float]:
        """`(which, value)`: the term's one strength."""
        for s in STRENGTHS:
            if getattr(self, s) is not None:
                return s, float(getattr(self, s))
        raise AssertionError("a term without a strength")  # refused in __post_init__

    def coefficient(self):
        """What `interventions.build` calls a coefficient: a number or a closed-loop rule."""
        which, value = self.strength
        if which == "cap":
            return ivs.cap(value, gain=self.gain, max_step=self.max_step)
        if which == "target":
            return ivs.target(value, gain=self.gain, max_step=self.max_step)
        return value


def _check_vector_value(v, who: str) -> None:
    if isinstance(v, str):
        if not v:
            raise TermError(f"{who}: empty vector (FILE[:KEY])")
        return
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError):
        raise TermError(
            f"{who}: the vector must be FILE[:KEY] or an array, got {type(v).__name__}"
        ) from None
    if a.ndim not in (1, 2):
        raise TermError(f"{who}: a vector array must be [D] or [n_layers+1, D], got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise TermError(f"{who}: the vector contains NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# The command line: `--steer VECTOR,key=value,...` and `--when VECTOR,key=value,...`

_CLI_TERM_KEYS = ("layer", "layers", *STRENGTHS, "gain", "max_step", "positions", "mode", "without")
_ANGLE = re.compile(r"^([+-]?)(\d*\.?\d*)\*?pi(?:/(\d+\.?\d*))?$")


def _number(text: str, key: str, who: str) -> float:
    """A float; angles may also be written with pi (`pi/4`, `-pi`, `0.5pi`)."""
    try:
        return float(text)
    except ValueError:
        pass
    m = _ANGLE.match(text.strip()) if key == "angle" else None
    if m:
        sign, mult, div = m.groups()
        x = math.pi * (float(mult) if mult else 1.0) / (float(div) if div else 1.0)
        return -x if sign == "-" else x
    raise TermError(f"{who}: {key}={text!r} is not a number")


def _layers(text: str, who: str) -> tuple[int, ...]:
    """`12`, `10-14` (inclusive) or `10+12+14`."""
    try:
        if "-" in text.strip()[1:]:
            a, b = text.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise TermError(f"{who}: layer range {text!r} runs backwards")
            return tuple(range(lo, hi + 1))
        return tuple(int(x) for x in text.split("+"))
    except ValueError:
        raise TermError(
            f"{who}: layer={text!r} is not an integer, a range A-B or a list A+B"
        ) from None


def _fields(text: str, flag: str, allowed: Sequence[str]) -> tuple[str, dict, str]:
    """`(vector, {key: text}, label)` of `VECTOR,key=value,...`."""
    who = f"{flag} {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise TermError(f"{who}: empty; expected VECTOR,layer=L,...")
    vector, *rest = [p.strip() for p in text.split(",")]
    if not vector or "=" in vector.split(":")[0]:
        raise TermError(f"{who}: starts with a key; the vector FILE[:KEY] comes first")
    out: dict[str, str] = {}
    for part in rest:
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise TermError(f"{who}: {part!r} is not key=value")
        if key not in allowed:
            raise TermError(f"{who}: unknown key {key!r}; one of {', '.join(allowed)}")
        if key in out or (key in ("layer", "layers") and {"layer", "layers"} & set(out)):
            raise TermError(f"{who}: {key} given twice")
        out[key] = value.strip()
    return vector, out, who


def parse_cli(text: str, *, when: Condition | None = None, flag: str = "--steer") -> SteerTerm:
    """A term from `--steer VECTOR,layer=L,coef=C[,positions=P][,mode=M][,without=V]` (also
    `angle=`, `cap=`, `target=`, `gain=`, `max_step=`); `when` attaches a condition."""
    vector, f, who = _fields(text, flag, _CLI_TERM_KEYS)
    layer = f.pop("layer", None) or f.pop("layers", None)
    if layer is None:
        raise TermError(f"{who}: no layer (layer=L)")
    kw: dict[str, Any] = {"layers": _layers(layer, who)}
    for key in (*STRENGTHS, "gain", "max_step"):
        if key in f:
            kw[key] = _number(f.pop(key), key, who)
    for key in ("positions", "mode", "without"):
        if key in f:
            kw[key] = f.pop(key)
    return SteerTerm(vector=vector, when=when, label=who, **kw)


def parse_condition(text: str, *, flag: str = "--when") -> Condition:
    """A condition from `--when VECTOR,layer=L,threshold=X[,on=projection|cosine]`."""
    vector, f, who = _fields(text, flag, ("layer", "threshold", "on"))
    if "layer" not in f:
        raise TermError(f"{who}: no layer (layer=L)")
    layers = _layers(f["layer"], who)
    if len(layers) != 1:
        raise TermError(f"{who}: a condition is read at one layer, got {f['layer']!r}")
    threshold = _number(f["threshold"], "threshold", who) if "threshold" in f else None
    return Condition(
        vector=vector,
        layer=layers[0],
        threshold=threshold,
        on=f.get("on", "projection"),
        label=who,
    )


# ---------------------------------------------------------------------------------------------
# Configs and the server: dicts


def from_dict(d: dict, *, label: str = "term") -> SteerTerm:
    """A term from a config or request dict (the module docstring's keys; `when` a dict with
    `vector`, `layer`, `threshold`, `on`)."""
    if isinstance(d, SteerTerm):
        return d
    if not isinstance(d, dict):
        raise TermError(f"{label}: a term is a dict of {', '.join(TERM_KEYS)}; got {d!r}")
    d = {str(k).replace("-", "_"): v for k, v in dict(d).items()}
    unknown = sorted(set(d) - set(TERM_KEYS))
    if unknown:
        raise TermError(f"{label}: unknown key {unknown[0]!r}; one of {', '.join(TERM_KEYS)}")
    if "vector" not in d:
        raise TermError(f"{label}: no vector (FILE[:KEY])")
    if "layer" in d and "layers" in d:
        raise TermError(f"{label}: give layer or layers, not both")
    layers = d.pop("layer", None)
    layers = d.pop("layers", None) if layers is None else layers
    if layers is None:
        raise TermError(f"{label}: no layer")
    if isinstance(layers, str):
        layers = _layers(layers, label)
    when = d.pop("when", None)
    if when is not None and not isinstance(when, Condition):
        if not isinstance(when, dict):
            raise TermError(f"{label}: when must be a dict of {', '.join(CONDITION_KEYS)}")
        bad = sorted(set(when) - set(CONDITION_KEYS))
        if bad:
            raise TermError(
                f"{label}: when has unknown key {bad[0]!r}; one of {', '.join(CONDITION_KEYS)}"
            )
        if "vector" not in when or "layer" not in when:
            raise TermError(f"{label}: when needs a vector and a layer")
        when = Condition(label=f"{label}.when", **when)
    return SteerTerm(layers=layers, when=when, label=label, **d)


def _plain(x):
    if isinstance(x, str) or x is None:
        return x
    return np.asarray(x, np.float32).tolist()


def to_dict(t: SteerTerm) -> dict:
    """The dict `from_dict` reads back (defaults left out; array vectors as lists)."""
    which, value = t.strength
    out: dict[str, Any] = {"vector": _plain(t.vector), "layers": list(t.layers), which: value}
    if t.mode != ("rotate" if which == "angle" else "add"):
        out["mode"] = t.mode
    if which in ("cap", "target"):
        out.update(gain=t.gain, max_step=t.max_step)
    for key in ("positions", "without"):
        if getattr(t, key) is not None:
            out[key] = _plain(getattr(t, key))
    if t.when is not None:
        c = t.when
        out["when"] = {
            "vector": _plain(c.vector),
            "layer": c.layer,
            "threshold": c.threshold,
            "on": c.on,
        }
    return out


def terms_from_config(items, *, label: str = "terms") -> list[SteerTerm]:
    """A config's list of term dicts (or one dict) as terms, each named by its index."""
    if isinstance(items, dict):
        items = [items]
    return [from_dict(dict(x), label=f"{label}[{i}]") for i, x in enumerate(items)]


def describe(terms: Sequence[SteerTerm]) -> str:
    """A short text for tables and logs: `V@20 coef 2 + W@12 angle 0.5 rotate when ...`."""
    parts = []
    for t in terms:
        which, value = t.strength
        vec = _vector_name(t.vector).rsplit("/", 1)[-1]
        s = f"{vec}@{'+'.join(map(str, t.layers))} {which} {value:g}"
        if t.mode not in ("add", "rotate"):
            s += f" {t.mode}"
        if t.without is not None:
            s += f" without {_vector_name(t.without).rsplit('/', 1)[-1]}"
        if t.when is not None:
            s += f" when@{t.when.layer}>={t.when.threshold:g}"
        parts.append(s)
    return " + ".join(parts) or "unsteered"


# ---------------------------------------------------------------------------------------------
# Checks against a model, and the intervention


def request_positions(rows: Sequence[Sequence[SteerTerm]], default: str | None = None):
    """The one position mode of a request: the terms' (they must agree), else `default`."""
    seen = {}
    for terms in rows:
        for t in terms:
            if t.positions is not None:
                seen.setdefault(t.positions, t)
    if default is not None:
        seen.setdefault(default, None)
    if len(seen) > 1:
        named = ", ".join(f"{p} ({t.name if t else 'the request'})" for p, t in seen.items())
        raise TermError(f"terms steer at different positions in one request: {named}")
    return next(iter(seen), None)


def _resolver(model):
    """`load(spec_or_array, who) -> float32 array`, each file read once and checked against the
    model (`pvjax.files.vectors.read_vector`: another model's file is refused, naming both)."""
    from pvjax.files.vectors import read_vector

    cache: dict[str, np.ndarray] = {}
    L, D = model.n_layers + 1, model.hidden_size

    def load(v, who: str) -> np.ndarray:
        if isinstance(v, str):
            if v not in cache:
                try:
                    cache[v] = read_vector(v, model)
                except UserError as e:
                    raise TermError(f"{who}: {e}") from None
            a = cache[v]
        else:
            a = np.asarray(v, np.float32)
        if a.shape[-1] != D or (a.ndim == 2 and a.shape[0] != L):
            raise TermError(
                f"{who}: vector of shape {list(a.shape)} does not fit {model.model_id} "
                f"([{D}] or [{L}, {D}])"
            )
        return a

    return load


def check_terms(rows: Sequence[Sequence[SteerTerm]], model) -> None:
    """Everything `build_intervention` would refuse, with no weights needed: layers within the
    model's depth, vector files that fit it (`model` may be a weightless stand-in with `config`,
    `n_layers`, `hidden_size` and `model_id`), and how terms meet at a layer."""
    build_intervention(rows, model, _arrays_only=True)


def _row_of(v: np.ndarray, layer: int) -> np.ndarray:
    return v[layer] if v.ndim == 2 else v


def build_intervention(
    rows: Sequence[Sequence[SteerTerm]],
    model,
    *,
    ablate: Sequence[tuple] = (),
    _arrays_only: bool = False,
):
    """The `Intervention` of batch `len(rows)`, row b steered by the terms `rows[b]` (an empty
    list: unsteered). `ablate` holds `interventions.build`'s `(vector, layer[, strength])` items,
    applied to every row. Raises `TermError` naming the term for anything that cannot run.

    At a layer of a row, `add` terms (and `rescale` terms) are summed: one term keeps its vector
    and coefficient (bit for bit `interventions.build`'s), several become one vector
    `sum(coef_i * v_i)` with coefficient 1. A rotation, a closed-loop term or a mix of modes at
    one layer of a row is refused, as are two different conditions in one row or a layer where
    gated and ungated terms meet. Without rescale/rotate terms the intervention carries no `modes`,
    without conditions no `condition`: the plain program, unchanged."""
    L, D = model.n_layers + 1, model.hidden_size
    B = len(rows)
    if B == 0:
        raise TermError("no rows to steer")
    load = _resolver(model)
    slots: dict[tuple[int, int], list] = {}
    conds: dict[int, tuple[Condition, np.ndarray]] = {}
    for b, terms in enumerate(rows):
        for t in terms:
            if not isinstance(t, SteerTerm):
                raise TermError(f"row {b}: expected SteerTerms, got a {type(t).__name__}")
            bad = [l for l in t.layers if l >= L]
            if bad:
                raise TermError(
                    f"{t.name}: layer {bad[0]} is outside 0..{L - 1} (the hidden_states rows "
                    f"of {model.model_id})"
                )
            v = load(t.vector, t.name)
            w = None if t.without is None else load(t.without, f"{t.name}: without")
            if t.when is not None:
                c = t.when
                if c.layer >= L - 1:
                    raise TermError(
                        f"{c.label or t.name}: condition layer {c.layer} is outside 0..{L - 2} "
                        f"(a condition reads a row below the last of {model.model_id})"
                    )
                cv = _row_of(load(c.vector, c.label or f"{t.name}: when"), c.layer)
                if not np.any(cv):
                    raise TermError(f"{c.label or t.name}: the condition vector is zero")
                if b in conds and conds[b][0].key() != c.key():
                    raise TermError(
                        f"{t.name}: a second condition in one row; the terms of a row share one"
                    )
                conds[b] = (c, cv)
            for l in t.layers:
                x = _row_of(v, l).astype(np.float32)
                if w is not None:
                    u = _row_of(w, l).astype(np.float64)
                    n = np.linalg.norm(u)
                    if n == 0:
                        raise TermError(f"{t.name}: without: the direction at layer {l} is zero")
                    u = u / n
                    x = (x - (x.astype(np.float64) @ u) * u).astype(np.float32)
                if t.mode == "rotate" and not np.any(x):
                    raise TermError(f"{t.name}: cannot rotate toward a zero vector at layer {l}")
                slots.setdefault((l, b), []).append((t, x))
    steer = np.zeros((L, B, D), np.float32)
    coefs = np.zeros((L, B), np.float32)
    modes = np.zeros((L, B), np.int32)
    gated = np.zeros((L, B), np.float32)
    loop = {
        "mode": np.zeros((L, B), np.int32),
        "value": np.zeros((L, B), np.float32),
        "gain": np.ones((L, B), np.float32),
        "max_step": np.full((L, B), np.inf, np.float32),
    }
    mode_ids = {"add": ivs.ADD, "rescale": ivs.RESCALE, "rotate": ivs.ROTATE}
    for (l, b), items in slots.items():
        first = items[0][0]
        for t, _ in items[1:]:
            if t.mode != first.mode:
                raise TermError(
                    f"{t.name}: mode {t.mode} meets {first.name} (mode {first.mode}) at layer "
                    f"{l}; terms at one layer share a mode"
                )
            if (t.when is None) != (first.when is None):
                raise TermError(
                    f"{t.name}: meets {first.name} at layer {l}, one with a condition and one "
                    f"without; give both the condition or steer another layer"
                )
        if len(items) > 1:
            odd = [t for t, _ in items if t.mode == "rotate" or t.strength[0] in ("cap", "target")]
            if odd:
                raise TermError(
                    f"{odd[0].name}: a {odd[0].strength[0]} term must be alone at layer {l}; "
                    f"another term steers it too"
                )
        if len(items) == 1:
            t, x = items[0]
            coef = t.coefficient()
            steer[l, b] = x
            if isinstance(coef, ivs.Feedback):
                if not np.any(x):
                    raise TermError(f"{t.name}: closed-loop steering vector at layer {l} is zero")
                for k in loop:
                    loop[k][l, b] = getattr(coef, k)
            else:
                coefs[l, b] = coef
        else:  # the weighted sum, coefficient 1
            acc = np.zeros(D, np.float32)
            for t, x in items:
                acc = acc + np.float32(t.strength[1]) * x
            steer[l, b] = acc
            coefs[l, b] = 1.0
        modes[l, b] = mode_ids[first.mode]
        gated[l, b] = float(first.when is not None)
    iv = ivs.build(L, D, ablate=ablate, batch=B)  # the ablation items checked too
    if _arrays_only:
        return None
    iv = iv.replace(steer_vectors=jnp.asarray(steer), steer_coefs=jnp.asarray(coefs))
    if np.any(loop["mode"] != ivs.FIXED):
        iv = iv.replace(closed_loop=ivs.ClosedLoop(**{k: jnp.asarray(x) for k, x in loop.items()}))
    if np.any(modes != ivs.ADD):
        iv = iv.replace(modes=ivs.Modes(mode=jnp.asarray(modes)))
    if conds:
        cond = ivs.Condition.none(L, D, B)
        fields = {k: np.array(getattr(cond, k)) for k in ("vector", "layer", "threshold", "cosine")}
        for b, (c, cv) in conds.items():
            fields["vector"][0, b] = cv / np.linalg.norm(cv.astype(np.float64))
            fields["layer"][0, b] = c.layer
            fields["threshold"][0, b] = c.threshold
            fields["cosine"][0, b] = float(c.on == "cosine")
        fields["gated"] = gated
        iv = iv.replace(condition=cond.replace(**{k: jnp.asarray(x) for k, x in fields.items()}))
    return iv
