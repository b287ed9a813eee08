"""The cheap end of the monitoring study, redone on every unfinished run: correlations with their
bootstrap intervals, the calibrated monitor (saved beside the vector), plots and the summary."""

from __future__ import annotations

import logging

import numpy as np

from pvjax.files import atomic
from pvjax.settings.types import (
    Bootstrap,
    ScoreMeaning,
    ThresholdRule,
    VectorChoice,
    Workspace,
)

COLUMNS = ("experiment", "layer", "r", "r_low", "r_high", "n", "score", "note")

log = logging.getLogger(__name__)


def report(
    cfg, space: Workspace, model, trait, results: dict, kind: str, trace, choice: VectorChoice
) -> list[dict]:
    """Correlations, the calibrated monitor, plots and `summary.json` in `space.work`, from the
    scored `results` (`kind`: judge or contrast) and the per-token `trace` of `choice`'s vector
    (its `layer` None: the monitor picks it)."""
    work, vector, spec = space.work, choice.vector, choice.spec
    from pvjax.methods.monitoring import (
        UndefinedStatistic,
        calibrate,
        correlation_by_layer,
        monitor_path,
        save_monitor,
    )
    from pvjax.studies import monitor_plots as plots

    L = model.n_layers + 1
    groups = dict(results)
    if len(results) > 1:
        groups["combined"] = [p for pts in results.values() for p in pts]
    b = Bootstrap.of(cfg.bootstrap)
    corr, rows = {}, []
    for exp, pts in groups.items():
        if len(pts) < 3:
            corr[exp] = [
                {
                    "layer": l,
                    "r": None,
                    "r_low": None,
                    "r_high": None,
                    "n": len(pts),
                    "note": (
                        f"r undefined: {len(pts)} scored points, a correlation needs at least 3"
                    ),
                }
                for l in range(L)
            ]
        else:
            corr[exp] = correlation_by_layer(
                np.stack([p["proj"] for p in pts]),
                [p["score"] for p in pts],
                n_boot=b.n,
                level=b.level,
                seed=b.seed,
            )
        rows += [{"experiment": exp, **r, "score": kind} for r in corr[exp]]
    atomic.write_csv(work / "correlations.csv", rows, COLUMNS)
    atomic.write_csv(
        work / "points.csv",
        [
            {
                **{k: v for k, v in p.items() if k != "proj"},
                **{f"layer_{l}": float(p["proj"][l]) for l in range(L)},
            }
            for pts in results.values()
            for p in pts
        ],
        (
            "experiment",
            "condition",
            "strength",
            "question",
            "n_scored",
            "score",
            *(f"layer_{l}" for l in range(L)),
        ),
    )

    label_at = cfg.monitor.judge_label if kind == "judge" else cfg.monitor.contrast_label
    scale = "judge score (0-100)" if kind == "judge" else "contrast score (nats/token)"
    label = f"{scale} >= {label_at:g}"
    pts = groups["combined" if "combined" in groups else next(iter(results))]
    mon, mon_error, mon_path = None, None, None
    try:
        if len(pts) < 3:
            raise UndefinedStatistic(f"{len(pts)} scored points; calibration needs at least 3")
        scores = np.array([p["score"] for p in pts])
        mon = calibrate(
            np.stack([p["proj"] for p in pts]),
            scores,
            scores >= label_at,
            choice=choice,
            model=model,
            meaning=ScoreMeaning(trait.name, kind, label),
            bootstrap=b,
            thresholding=ThresholdRule(cfg.monitor.rule, cfg.monitor.target_fpr),
        )
        save_monitor(work / "monitor.json", mon)
        if cfg.monitor.save_beside_vector:
            mon_path = str(save_monitor(monitor_path(spec), mon))
    except UndefinedStatistic as e:
        mon_error = f"no monitor calibrated: {e}"
        log.warning("%s", mon_error)

    layer = mon.layer if mon else _best_layer(corr[next(iter(corr))], L)
    if space.plot:
        score_label = (
            "judge trait score (0-100)" if kind == "judge" else "contrast score (nats/token)"
        )
        plots.scatter(
            work / "scatter.png",
            results,
            corr,
            layer,
            score_label,
            trait.name,
            threshold=mon.threshold if mon else None,
        )
        plots.r_by_layer(work / "r_by_layer.png", corr, trait.name, monitor_layer=layer)
        if trace is not None:
            plots.trace(work / "trace.png", trace, sorted({L // 3, layer, 2 * L // 3}), trait.name)

    def best(exp):
        ok = [r for r in corr[exp] if r["r"] is not None]
        return max(ok, key=lambda r: r["r"]) if ok else None

    from pvjax.methods.monitoring import vector_sha256

    summary = {
        "trait": trait.name,
        "model": model.model_id,
        "vector": spec,
        "vector_sha256": vector_sha256(vector),
        "score": kind,
        "score_meaning": label.split(" >=")[0],
        "experiments": list(results),
        "points": {e: len(p) for e, p in groups.items()},
        "best_layer": {e: best(e) for e in corr},
        "plot_layer": layer,
        "monitor": None
        if mon is None
        else {
            k: getattr(mon, k)
            for k in (
                "layer",
                "threshold",
                "rule",
                "target_fpr",
                "auroc",
                "r",
                "r_low",
                "r_high",
                "tpr",
                "fpr",
                "n",
                "n_pos",
                "n_neg",
                "label",
            )
        },
        "monitor_file": mon_path,
        "monitor_error": mon_error,
    }
    atomic.write_json(work / "summary.json", summary)
    if space.progress:
        m = summary["monitor"]
        print(
            f"monitor ({kind} score): "
            + (
                mon_error
                or f"layer {m['layer']}, threshold {m['threshold']:.3f} "
                f"({m['rule']}), AUROC {m['auroc']:.3f}, r {m['r']:.3f} [{m['r_low']:.3f}, "
                f"{m['r_high']:.3f}], "
                f"n {m['n']}"
                + (f"; saved to {mon_path}" if mon_path else "")
            )
        )
    return rows


def _best_layer(rows, L):
    ok = [r for r in rows if r["r"] is not None]
    return max(ok, key=lambda r: r["r"])["layer"] if ok else L // 2
