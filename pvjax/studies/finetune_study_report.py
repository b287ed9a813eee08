"""The finetuning study's report: `summary.json`, the summary rows, a printed table and two plots.

`summary.json` holds, at the study layer: `shift` (run -> the last-prompt-token shift, the paper's
measure), `shift_response_avg` (run -> the shift of response-mean activations over each model's own
answers), `margin` (run -> likelihood margin base / finetuned / delta), `loss` (run -> held-out loss
of the base and the finetune, mean training loss over the last steps, and the held-out shift of
assistant-token projections the trainer monitors), `exports` (run -> merged and adapter folders),
`screening_auroc`, `datasets` (mean projection difference per dataset) and `dataset_shift_r`
(Pearson r of the datasets' mean difference against their unsteered runs' shift;
`dataset_shift_r_response` the same with the response-mean shift).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvjax.files import atomic
from pvjax.measure.stats import pearson_or_none

LAST_STEPS = 5  # training loss reported as the mean over the last steps: one step's loss is noisy


def summarize(
    cfg,
    work: Path,
    spec: str,
    datasets: dict,
    screened: dict,
    runs: dict,
    trained: dict,
    shifts: dict,
) -> dict:
    shift = {n: s["shift_prompt_last"] for n, s in shifts.items()}
    shift_resp = {n: s["shift_response_avg"] for n, s in shifts.items()}
    margin = {n: s["likelihood_margin"] for n, s in shifts.items()}
    loss = {}
    for n, t in trained.items():
        evals = t.get("evals") or []
        losses = t.get("losses") or []
        loss[n] = {
            "eval_base": evals[0]["eval_loss"] if evals else None,
            "eval_final": evals[-1]["eval_loss"] if evals else None,
            "train_final": float(np.mean(losses[-LAST_STEPS:])) if losses else None,
            "monitor_shift": t.get("shift"),
            "steps": t.get("steps"),
        }
    # The dataset-level correlation: every run without steering is one dataset.
    plain = [n for n, r in runs.items() if not r["steering"]]
    points = [
        {
            "run": n,
            "dataset": runs[n]["dataset"],
            "share": runs[n]["share"],
            "mean_diff": screened["mean_diff"][runs[n]["dataset"]],
            "shift": shift[n],
            "shift_response_avg": shift_resp[n],
        }
        for n in plain
    ]
    points.sort(key=lambda p: p["share"])
    x = [p["mean_diff"] for p in points]
    cost = {
        n: None
        if None in (loss[n]["eval_final"], loss["trait"]["eval_final"])
        else loss[n]["eval_final"] - loss["trait"]["eval_final"]
        for n in ("trait_preventative", "trait_caft")
    }
    return {
        "study": "finetune_study",
        "model": cfg.model,
        "trait": cfg.trait,
        "layer": int(cfg.layer),
        "vector": spec,
        "screening_auroc": screened["auroc"],
        "screening_n_scored": screened["n_scored"],
        "dataset_shift_r": pearson_or_none(x, [p["shift"] for p in points]),
        "dataset_shift_r_response": pearson_or_none(x, [p["shift_response_avg"] for p in points]),
        "dataset_points": points,
        "datasets": {
            n: {
                "path": d["path"],
                "share": d["share"],
                "n_samples": d["n_samples"],
                "mean_diff": screened["mean_diff"][n],
            }
            for n, d in datasets.items()
        },
        "shift": shift,
        "shift_response_avg": shift_resp,
        "margin": margin,
        "loss": loss,
        "eval_loss_cost_vs_trait": cost,
        "exports": {n: t["export"] for n, t in trained.items()},
        "runs": {
            n: {"dataset": r["dataset"], "share": r["share"], "steering": r["steering"]}
            for n, r in runs.items()
        },
        "workdir": str(work),
    }


def rows_of(summary: dict) -> list[dict]:
    """One row per finetune, for the runner's summary table."""
    out = []
    for n, r in summary["runs"].items():
        m, l = summary["margin"].get(n) or {}, summary["loss"][n]
        out.append(
            {
                "run": n,
                "dataset": r["dataset"],
                "share": r["share"],
                "steering": r["steering"].get("type", ""),
                "mean_diff": summary["datasets"][r["dataset"]]["mean_diff"],
                "shift": summary["shift"][n],
                "shift_response_avg": summary["shift_response_avg"][n],
                "margin_delta": m.get("delta"),
                "eval_loss": l["eval_final"],
                "train_loss": l["train_final"],
                "monitor_shift": l["monitor_shift"],
                "merged": summary["exports"][n].get("merged", ""),
            }
        )
    return out


def write(work: Path, summary: dict, *, plot: bool = True) -> list[dict]:
    """Write `summary.json` (and the plots); returns the summary rows."""
    if plot:
        summary["plots"] = [
            str(shift_plot(work / "shift.png", summary)),
            str(dataset_plot(work / "dataset_shift.png", summary)),
        ]
    atomic.write_json(work / "summary.json", summary)
    return rows_of(summary)


def _f(x, fmt="{:+.3f}"):
    return "-" if x is None else fmt.format(x)


def table(summary: dict) -> str:
    lines = [
        f"finetuning study: {summary['model']}, trait {summary['trait']}, layer {summary['layer']}",
        f"{'run':20s} {'mean_diff':>9s} {'shift':>8s} {'shift_resp':>10s} {'margin_d':>8s} "
        f"{'eval_loss':>9s} {'train_loss':>10s}",
    ]
    for r in rows_of(summary):
        lines.append(
            f"{r['run']:20s} {_f(r['mean_diff'], '{:+9.2f}')} {_f(r['shift'], '{:+8.3f}')} "
            f"{_f(r['shift_response_avg'], '{:+10.3f}')} {_f(r['margin_delta'], '{:+8.3f}')} "
            f"{_f(r['eval_loss'], '{:9.3f}')} {_f(r['train_loss'], '{:10.3f}')}"
        )
    lines.append(
        f"screening AUROC (trait above control samples): {_f(summary['screening_auroc'], '{:.3f}')}"
    )
    lines.append(
        f"dataset mean difference vs shift, Pearson r: {_f(summary['dataset_shift_r'], '{:+.3f}')} "
        f"(response-mean shift: {_f(summary['dataset_shift_r_response'], '{:+.3f}')}; "
        f"{len(summary['dataset_points'])} datasets)"
    )
    return "\n".join(lines)


def shift_plot(path: Path, summary: dict) -> Path:
    """Bars: the shift of every run at the study layer (last prompt token and response mean)."""
    from pvjax.files.plots import pyplot as _plt
    from pvjax.files.plots import save as _save

    plt = _plt()
    names = list(summary["shift"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    val = lambda d: [np.nan if d[n] is None else d[n] for n in names]
    ax.bar(x - 0.2, val(summary["shift"]), 0.4, label="last prompt token")
    ax.bar(x + 0.2, val(summary["shift_response_avg"]), 0.4, label="response mean")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(
        ylabel="(finetuned - base) . v / |v|", title=f"finetuning shift at layer {summary['layer']}"
    )
    ax.legend()
    return _save(fig, path)


def dataset_plot(path: Path, summary: dict) -> Path:
    """Scatter: each dataset's mean projection difference against its run's shift."""
    from pvjax.files.plots import pyplot as _plt
    from pvjax.files.plots import save as _save

    plt = _plt()
    pts = summary["dataset_points"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([p["mean_diff"] for p in pts], [p["shift"] for p in pts])
    for p in pts:
        ax.annotate(
            f"{p['share']:g}",
            (p["mean_diff"], p["shift"]),
            textcoords="offset points",
            xytext=(4, 4),
        )
    r = summary["dataset_shift_r"]
    ax.set(
        xlabel="dataset mean projection difference",
        ylabel="finetuning shift (last prompt token)",
        title=f"share of trait samples; r = {_f(r, '{:.2f}')}",
    )
    return _save(fig, path)
