"""The figures of the steering and ablation studies (matplotlib, headless, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvjax.files.plots import pyplot as _plt
from pvjax.files.plots import save as _save


def _num(rows, key):
    return np.array([np.nan if r.get(key) in (None, "") else float(r[key]) for r in rows])


def steer_plots(work: Path, rows: list[dict], metric: str, trait: str) -> list[Path]:
    """`steer.png`: `metric` (trait score, or the likelihood margin without a judge) against the
    coefficient, one line per layer; coherence (or, without a judge, the share of distinct word
    bigrams, which falls when over-steering collapses into repetition) against the coefficient; and
    a layer x coefficient heat map of `metric`. `capability.png` (when a multiple-choice set ran):
    `metric` against accuracy, one point per (layer, coefficient)."""
    plt = _plt()
    layers = sorted({int(r["layer"]) for r in rows})
    coefs = sorted({float(r["coef"]) for r in rows})
    quality = (
        "coherence" if any(r.get("coherence") not in (None, "") for r in rows) else "distinct2"
    )
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    grid = np.full((len(layers), len(coefs)), np.nan)
    for li, layer in enumerate(layers):
        mine = sorted((r for r in rows if int(r["layer"]) == layer), key=lambda r: float(r["coef"]))
        x = [float(r["coef"]) for r in mine]
        a.plot(x, _num(mine, metric), marker="o", label=f"layer {layer}")
        b.plot(x, _num(mine, quality), marker="o", label=f"layer {layer}")
        for r in mine:
            grid[li, coefs.index(float(r["coef"]))] = _num([r], metric)[0]
    a.set(
        xlabel="steering coefficient",
        ylabel=metric.replace("_", " "),
        title=f"{trait}: {metric} vs coefficient",
    )
    a.axvline(0, color="black", lw=0.5)
    a.legend(fontsize=8)
    b.set(
        xlabel="steering coefficient",
        ylabel=quality,
        title="coherence (judge)" if quality == "coherence" else "distinct word bigrams (no judge)",
    )
    b.axvline(0, color="black", lw=0.5)
    span = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    # Diverging around "no trait" (score 50) or "no change" (margin 0).
    lo, hi = (0.0, 100.0) if metric == "trait_score" else (-span, span)
    im = c.imshow(grid, aspect="auto", cmap="coolwarm", origin="lower", vmin=lo, vmax=hi)
    c.set_xticks(range(len(coefs)), [f"{x:g}" for x in coefs])
    c.set_yticks(range(len(layers)), [str(l) for l in layers])
    c.set(xlabel="coefficient", ylabel="layer", title=f"{metric} by layer and coefficient")
    fig.colorbar(im, ax=c)
    out = [_save(fig, work / "steer.png")]
    if any(r.get("accuracy") not in (None, "") for r in rows):
        out.append(
            capability_plot(
                work / "capability.png",
                rows,
                metric,
                lambda r: f"L{r['layer']} c={float(r['coef']):g}",
            )
        )
    return out


def capability_plot(path: Path, rows: list[dict], metric: str, label) -> Path:
    """`metric` (x) against multiple-choice accuracy (y), one labelled point per setting."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x, y = _num(rows, metric), _num(rows, "accuracy")
    ax.scatter(x, y)
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(label(r), (xi, yi), fontsize=6)
    ax.set(
        xlabel=metric.replace("_", " "),
        ylabel="multiple-choice accuracy",
        title="trait against capability, one point per setting",
    )
    return _save(fig, path)


def ablation_plot(path: Path, rows: list[dict], metric: str) -> Path:
    """The change of `metric` against the unablated baseline per layer, for the directional
    ablation, the mean-ablation and random-direction controls and the window around each layer;
    the all-layer variants as horizontal lines. A second panel: accuracy change (when measured)."""
    plt = _plt()
    panels = [metric] + (
        ["accuracy"] if any(r.get("accuracy") not in (None, "") for r in rows) else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    base = {k: _num([r for r in rows if r["variant"] == "baseline"], k) for k in panels}
    styles = {"ablate": "tab:red", "window": "tab:purple", "mean": "tab:blue", "random": "tab:gray"}
    for ax, key in zip(axes[0], panels):
        for variant, color in styles.items():
            mine = sorted(
                (r for r in rows if r["variant"] == variant), key=lambda r: int(r["layer"])
            )
            if mine:
                ax.plot(
                    [int(r["layer"]) for r in mine],
                    _num(mine, key) - base[key][0],
                    marker="o",
                    color=color,
                    label=variant,
                )
            whole = [r for r in rows if r["variant"] == f"{variant}_all"]
            if whole:
                ax.axhline(
                    _num(whole, key)[0] - base[key][0],
                    color=color,
                    ls="--",
                    lw=1,
                    label=f"{variant} at all layers",
                )
        ax.axhline(0, color="black", lw=0.5)
        ax.set(
            xlabel="layer (hidden_states row)",
            ylabel=f"{key.replace('_', ' ')} - baseline",
            title=f"effect of ablation on {key.replace('_', ' ')}",
        )
        ax.legend(fontsize=8)
    return _save(fig, path)
