"""Figures of the monitoring study (matplotlib, headless), each written atomically."""

from __future__ import annotations

import numpy as np

from pvjax.files.plots import pyplot as _pyplot
from pvjax.files.plots import save as _save

TITLES = {
    "system_prompts": "system prompts (encouraging -> discouraging)",
    "many_shot": "many-shot examples",
    "combined": "both experiments",
}


def scatter(
    path, points: dict, corr: dict, layer: int, score_label: str, trait: str, threshold=None
):
    """Projection at `layer` against the trait score, one panel per experiment, coloured by the
    condition's strength. `points[exp]` is a list of dicts with `strength`, `score`, `proj` [L];
    `corr[exp]` the rows of `correlation_by_layer`."""
    plt = _pyplot()
    exps = [e for e in points if points[e]]
    fig, axes = plt.subplots(1, len(exps), figsize=(5.5 * len(exps), 4.2), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        pts = points[exp]
        sc = ax.scatter(
            [p["proj"][layer] for p in pts],
            [p["score"] for p in pts],
            c=[p["strength"] for p in pts],
            cmap="coolwarm",
            vmin=-1 if exp == "system_prompts" else 0,
            vmax=1,
            s=22,
            edgecolors="black",
            linewidths=0.3,
        )
        c = corr[exp][layer]
        r = "undefined" if c["r"] is None else f"{c['r']:.2f} [{c['r_low']:.2f}, {c['r_high']:.2f}]"
        if threshold is not None:
            ax.axvline(threshold, color="gray", ls="--", lw=0.8, label="monitor threshold")
            ax.legend(loc="lower right", fontsize=8)
        ax.set(
            xlabel=f"last-prompt-token projection, layer {layer}",
            ylabel=score_label,
            title=f"{trait}: {TITLES[exp]}\nr = {r}, n = {c['n']}",
        )
        fig.colorbar(
            sc,
            ax=ax,
            label="trait encouragement" if exp == "system_prompts" else "shots / max shots",
        )
    return _save(fig, path)


def r_by_layer(path, corr: dict, trait: str, monitor_layer=None):
    """r and its bootstrap interval per layer, one line per experiment."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for exp, rows in corr.items():
        ok = [r for r in rows if r["r"] is not None]
        if not ok:
            continue
        x = [r["layer"] for r in ok]
        (line,) = ax.plot(x, [r["r"] for r in ok], marker=".", label=TITLES[exp])
        ax.fill_between(
            x,
            [r["r_low"] for r in ok],
            [r["r_high"] for r in ok],
            color=line.get_color(),
            alpha=0.15,
        )
    if monitor_layer is not None:
        ax.axvline(
            monitor_layer, color="gray", ls="--", lw=0.8, label=f"monitor layer {monitor_layer}"
        )
    ax.axhline(0, color="black", lw=0.5)
    ax.set(
        xlabel="layer (hidden_states index)",
        ylabel="Pearson r (bootstrap interval)",
        ylim=(-1.05, 1.05),
        title=f"{trait}: last-prompt-token projection vs trait score",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def trace(path, tr: dict, layers, trait: str):
    """Per-token projection over the conversation at `layers`; message spans shaded by role, the
    generated answer after the dotted line."""
    plt = _pyplot()
    proj = np.asarray(tr["projections"])  # [L, T]
    fig, ax = plt.subplots(figsize=(11, 4))
    roles = tr["roles"]
    start = 0
    for t in range(1, len(roles) + 1):
        if t == len(roles) or tr["messages"][t] != tr["messages"][start]:
            if roles[start] == "user":
                ax.axvspan(start - 0.5, t - 0.5, color="tab:blue", alpha=0.08, lw=0)
            start = t
    for l in layers:
        ax.plot(proj[l], lw=0.9, label=f"layer {l}")
    ax.axvline(tr["n_prompt"] - 0.5, color="black", ls=":", lw=1, label="answer starts")
    # The first token is an attention sink with a residual norm hundreds of times the others':
    # the axis is scaled to the rest.
    rest = proj[list(layers), 1:]
    if rest.size:
        lo, hi = float(rest.min()), float(rest.max())
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set(
        xlabel="token position (user turns shaded; token 0 off scale)",
        ylabel="projection onto unit vector",
        title=f"{trait}: per-token projection over a {tr['n_turns']}-exchange conversation, then a "
        "question",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)
