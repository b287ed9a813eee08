"""Figures written beside results (matplotlib, headless), and the two steps every figure of
pvjax shares: `pyplot()` (the headless backend, imported only when a figure is drawn) and
`save(fig, path)` (laid out, written atomically, closed)."""

from __future__ import annotations

import io

from pvjax.files import atomic


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported here, so results need no display and
    runs that draw nothing never import matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path):
    """Lay `fig` out, write it to `path` as a PNG (100 dpi) atomically, close it; returns the
    path."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def extraction_plot(path, norms: dict, causality: dict, trait: str):
    """Vector norm per layer for each pooling, and the causality slope (likelihood margin per unit
    coefficient) at the layers where it was measured."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, values in norms.items():
        a.plot(range(len(values)), values, label=key.replace("_diff", ""))
    a.set(
        xlabel="layer (hidden_states index)",
        ylabel="||v||",
        title=f"{trait}: vector norm per layer",
    )
    a.legend()
    layers = sorted(causality["layers"], key=int)
    b.bar(
        range(len(layers)),
        [causality["layers"][l]["slope"] for l in layers],
        color=["tab:green" if causality["layers"][l]["monotonic"] else "tab:gray" for l in layers],
    )
    b.set_xticks(range(len(layers)), [str(l) for l in layers])
    b.axhline(0, color="black", lw=0.5)
    b.set(
        xlabel="layer",
        ylabel="d margin / d coef",
        title="causality: log-lik margin slope (green = monotonic)",
    )
    return save(fig, path)
