"""Monitoring: does the last prompt token's projection onto a persona vector predict the answer?

Shape legend: N prompts (points), L = n_layers + 1 hidden-state rows, D hidden size, B bootstrap
resamples.

The paper's monitoring signal is the residual at the last prompt token (the position whose logits
start the answer), projected onto the unit persona vector of each layer, read before any token is
generated. This module computes it with the engine's packed, pooled forward
(`pvjax.measure.packing.pooled_activations`, the `prompt_last` pooling), measures how well it
predicts a trait score (Pearson r with a seeded percentile bootstrap interval; AUROC), and
calibrates a monitor: one layer, one threshold chosen by a stated rule, saved as JSON beside the
vector file (`monitor_path`) with the model's and the vector's identity, so it is never read against
another.

Undefined statistics are errors that say why (`UndefinedStatistic`): r of fewer than 3 points or of
a constant side (the embeddings row, layer 0, is constant whenever every prompt ends on the same
token, as chat templates make them), AUROC with one class empty.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pvjax.files.vectors import check_rows
from pvjax.measure.stats import (  # noqa: F401  (monitoring's statistics, under their old names)
    Correlation,
    StatisticError,
    UndefinedStatistic,
    auroc,
    bootstrap_indices,
    bootstrap_pearson,
    pearson,
    roc_points,
    unit_rows,
)
from pvjax.settings.types import Bootstrap, ScoreMeaning, ThresholdRule, VectorChoice

FORMAT = "pvjax.monitor/1"
RULES = ("youden", "fpr")


class MonitorError(StatisticError):
    """A monitor file that is malformed or does not fit the model or vector it is used with."""


# ---------------------------------------------------------------------------------------------
# The signal


def prompt_ids(
    model, prompts: Sequence, *, system: str | None = None, chat: bool = True
) -> list[list[int]]:
    """Token ids of prompts exactly as `pvjax.engine.generate.generate` feeds them (same template,
    same special-token rule), so a projection computed here is the one generation starts from."""
    from pvjax.engine.generate import render_prompts

    texts = render_prompts(model, prompts, system=system, chat=chat)
    return [model.tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]


def last_prompt_projections(
    model, ids: Sequence[Sequence[int]], vector_LD, *, rows_per_batch: int = 8, chunk: int = 256
) -> np.ndarray:
    """`[N, L]`: the hidden state of each prompt's last token at every layer (row 0 embeddings, row
    l the output of block l, the last after the final norm), projected onto the unit vector of that
    layer. One packed forward per `chunk` prompts, no LM head, no generation."""
    from pvjax.capture import POOLINGS
    from pvjax.measure.packing import pooled_activations

    check_rows(vector_LD, model, "vector", MonitorError)
    u_LD = unit_rows(vector_LD)
    last = POOLINGS.index("prompt_last")
    out = []
    for s in range(0, len(ids), chunk):
        part = [list(x) for x in ids[s : s + chunk]]
        pooled = pooled_activations(
            model, part, [len(x) for x in part], rows_per_batch=rows_per_batch
        )
        out.append(
            np.einsum("nld,ld->nl", pooled[:, :, last].astype(np.float64), u_LD.astype(np.float64))
        )
    if not out:
        raise MonitorError("no prompts to project")
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Statistics


def correlation_by_layer(
    proj_NL, scores_N, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> list[dict]:
    """One row per layer: `layer, r, r_low, r_high, n, note`; r and its interval are None, and
    `note` says why, where they are undefined (every layer is resampled with the same indices)."""
    proj_NL = np.asarray(proj_NL, np.float64)
    rows = []
    for l in range(proj_NL.shape[1]):
        row = {"layer": l, "r": None, "r_low": None, "r_high": None, "n": len(scores_N), "note": ""}
        try:
            c = bootstrap_pearson(proj_NL[:, l], scores_N, n_boot=n_boot, level=level, seed=seed)
            row.update(r=c.r, r_low=c.low, r_high=c.high)
        except UndefinedStatistic as e:
            row["note"] = (
                str(e).replace(": x is", ": the projection is").replace(": y is", ": the score is")
            )
        rows.append(row)
    return rows


def choose_threshold(
    scores, labels, rule: str = "youden", target_fpr: float = 0.1
) -> tuple[float, float, float]:
    """`(threshold, tpr, fpr)` of the decision `score >= threshold` picked by `rule`:

    - `youden`: the largest Youden's J = TPR - FPR;
    - `fpr`: the largest TPR with FPR <= `target_fpr` (on the calibration points).

    Ties go to the higher threshold (fewer flags). Both classes must be present."""
    if rule not in RULES:
        raise MonitorError(f"threshold rule must be one of {RULES}, got {rule!r}")
    if rule == "fpr" and not 0 <= target_fpr < 1:
        raise MonitorError(f"target_fpr must be in [0, 1), got {target_fpr}")
    auroc(scores, labels)  # both classes present, or a clear error
    pts = roc_points(scores, labels)
    if rule == "youden":
        return max(pts, key=lambda p: (round(p[1] - p[2], 12), p[0]))
    return max((p for p in pts if p[2] <= target_fpr), key=lambda p: (p[1], p[0]))


# ---------------------------------------------------------------------------------------------
# The calibrated monitor and its file


def vector_sha256(vector_LD) -> str:
    """A hash of the whole vector (shape and float32 bytes): a monitor knows which vector it
    read."""
    v = np.ascontiguousarray(vector_LD, np.float32)
    return hashlib.sha256(repr(v.shape).encode() + v.tobytes()).hexdigest()


def monitor_path(vector_spec: str) -> Path:
    """Where the monitor of `FILE[:KEY]` lives: beside FILE, `<stem>.<KEY>.monitor.json` (KEY
    resolved as `pvjax.files.vectors.read_vector` does: `response_avg_diff`, or `vector` for a
    `.pt`)."""
    from pvjax.files.vectors import KEYS, split_spec

    path, key = split_spec(vector_spec)
    return path.with_name(
        f"{path.stem}.{key or ('vector' if path.suffix == '.pt' else KEYS[0])}.monitor.json"
    )


@dataclasses.dataclass(frozen=True)
class Monitor:
    """A pre-generation flag: `projection >= threshold`, the projection being the last prompt
    token's hidden state at `layer` onto `direction` (the unit vector row at that layer)."""

    layer: int
    threshold: float
    direction: tuple[float, ...]
    rule: str
    target_fpr: float
    auroc: float
    r: float
    r_low: float
    r_high: float
    tpr: float
    fpr: float
    n: int
    n_pos: int
    n_neg: int
    label: str  # which scores counted as the trait expressed, e.g. "judge score >= 50"
    score_kind: str  # "judge" or "contrast"
    trait: str
    model_id: str
    model_fingerprint: str
    n_layers: int
    hidden_size: int
    vector: str  # FILE[:KEY] it was calibrated on
    vector_sha256: str
    created: str = ""
    pvjax_version: str = ""

    def flag(self, projection) -> np.ndarray | bool:
        return np.asarray(projection) >= self.threshold

    def projections(self, model, ids) -> np.ndarray:
        """`[N]` projections of prompts (token ids, see `prompt_ids`) at the monitor's layer."""
        check_fits(self, model)
        v = np.zeros((model.n_layers + 1, model.hidden_size), np.float32)
        v[self.layer] = self.direction
        return last_prompt_projections(model, ids, v)[:, self.layer]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            **dataclasses.asdict(self),
            "direction": [float(x) for x in self.direction],
            "flag_rule": "projection >= threshold",
        }


def calibrate(
    proj_NL,
    scores_N,
    labels_N,
    *,
    choice: VectorChoice,
    model,
    meaning: ScoreMeaning,
    thresholding: ThresholdRule = ThresholdRule(),
    bootstrap: Bootstrap = Bootstrap(),
) -> Monitor:
    """The monitor of the projections `[N, L]` (onto `choice.vector`, recorded with its spec)
    against trait scores `[N]` (for r, with its `bootstrap` interval) and labels `[N]` (trait
    expressed or not, for AUROC and the threshold `thresholding` picks): at `choice.layer`, or, when
    None, at the layer with the largest defined r (the stated rule; ties to the shallower layer)."""
    import pvjax

    vector_LD, layer, b = choice.vector, choice.layer, bootstrap
    rule, target_fpr = thresholding.rule, thresholding.target_fpr
    proj_NL = np.asarray(proj_NL, np.float64)
    labels_N = np.asarray(labels_N, bool)
    if layer is None:
        rs = []
        for l in range(proj_NL.shape[1]):
            try:
                rs.append((pearson(proj_NL[:, l], scores_N), -l))
            except UndefinedStatistic:
                pass
        if not rs:
            raise UndefinedStatistic("no layer has a defined r: cannot pick the monitor's layer")
        layer = -max(rs)[1]
    if not 0 <= layer < proj_NL.shape[1]:
        raise MonitorError(
            f"monitor layer {layer} is not a hidden_states index in 0..{proj_NL.shape[1] - 1}"
        )
    x = proj_NL[:, layer]
    c = bootstrap_pearson(x, scores_N, n_boot=b.n, level=b.level, seed=b.seed)
    threshold, tpr, fpr = choose_threshold(x, labels_N, rule, target_fpr)
    return Monitor(
        layer=int(layer),
        threshold=threshold,
        direction=tuple(map(float, unit_rows(vector_LD)[layer])),
        rule=rule,
        target_fpr=float(target_fpr),
        auroc=auroc(x, labels_N),
        r=c.r,
        r_low=c.low,
        r_high=c.high,
        tpr=tpr,
        fpr=fpr,
        n=len(x),
        n_pos=int(labels_N.sum()),
        n_neg=int((~labels_N).sum()),
        label=meaning.label,
        score_kind=meaning.kind,
        trait=meaning.trait,
        model_id=model.model_id,
        model_fingerprint=model.config.fingerprint(),
        n_layers=model.n_layers,
        hidden_size=model.hidden_size,
        vector=str(choice.spec),
        vector_sha256=vector_sha256(vector_LD),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        pvjax_version=pvjax.__version__,
    )


def save_monitor(path, monitor: Monitor) -> Path:
    from pvjax.files import atomic

    return atomic.write_json(path, monitor.to_json())


def load_monitor(path, model=None, *, vector_LD=None) -> Monitor:
    """A monitor file, checked: its format and fields; with `model`, that it was calibrated on this
    model (config fingerprint, depth, width); with `vector_LD`, on this very vector."""
    path = Path(path)
    if path.is_dir():
        raise MonitorError(f"monitor file {path} is a directory")
    if not path.is_file():
        raise MonitorError(
            f"monitor file {path} does not exist (the monitoring study writes "
            "<vector stem>.<key>.monitor.json beside the vector)"
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MonitorError(f"{path}: not a JSON monitor file ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise MonitorError(
            f"{path}: not a pvjax monitor file (format "
            f"{d.get('format') if isinstance(d, dict) else None!r}, "
            f"expected {FORMAT!r})"
        )
    fields = {f.name: f for f in dataclasses.fields(Monitor)}
    missing = [k for k, f in fields.items() if k not in d and f.default is dataclasses.MISSING]
    if missing:
        raise MonitorError(f"{path}: lacks the fields {missing}")
    try:
        m = Monitor(**{k: d[k] for k in fields if k in d})
        m = dataclasses.replace(
            m,
            direction=tuple(float(x) for x in m.direction),
            layer=int(m.layer),
            threshold=float(m.threshold),
        )
    except (TypeError, ValueError) as e:
        raise MonitorError(f"{path}: malformed field ({e})") from None
    if (
        len(m.direction) != m.hidden_size
        or not np.all(np.isfinite(m.direction))
        or not np.isfinite(m.threshold)
    ):
        raise MonitorError(
            f"{path}: direction must hold {m.hidden_size} finite numbers and the threshold be "
            "finite"
        )
    if not 0 <= m.layer <= m.n_layers:
        raise MonitorError(
            f"{path}: layer {m.layer} is not a hidden_states index in 0..{m.n_layers}"
        )
    if model is not None:
        check_fits(m, model, path)
    if vector_LD is not None and vector_sha256(vector_LD) != m.vector_sha256:
        raise MonitorError(
            f"{path} was calibrated on another vector ({m.vector}, sha256 {m.vector_sha256[:12]}), "
            f"not this one (sha256 {vector_sha256(vector_LD)[:12]}); rerun the monitoring study "
            "for this vector"
        )
    return m


def check_fits(m: Monitor, model, path="monitor") -> None:
    """Refuse a monitor calibrated on a model of another shape, naming both."""
    if (
        m.model_fingerprint != model.config.fingerprint()
        or m.n_layers != model.n_layers
        or m.hidden_size != model.hidden_size
    ):
        raise MonitorError(
            f"{path} was calibrated on {m.model_id} ({m.n_layers} layers, width {m.hidden_size}); "
            f"it does not fit {model.model_id} ({model.n_layers} layers, width {model.hidden_size})"
        )


def attach_monitor(file=None, vector_spec=None, model=None, vector_LD=None):
    """`(monitor or None, its path)` for `pvjax generate`: `file` when given (an error if it is
    missing, malformed or, with `model`, made for another model); else the monitor beside
    `vector_spec` if one exists, checked against the model and the vector, and skipped with a
    warning when it does not fit them (a stale file must not stop plain steering)."""
    import warnings

    if file:
        return load_monitor(file, model), str(file)
    if not vector_spec:
        return None, None
    path = monitor_path(vector_spec)
    if not path.is_file():
        return None, None
    try:
        return load_monitor(path, model, vector_LD=vector_LD), str(path)
    except MonitorError as e:
        warnings.warn(f"not reporting the monitor beside the vector: {e}", stacklevel=2)
        return None, None
