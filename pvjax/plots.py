"""Figures written beside results (matplotlib, headless)."""

from __future__ import annotations

import io

from pvjax import atomic


def extraction_plot(path, norms: dict, causality: dict, trait: str):
    """Vector norm per layer for each pooling, and the causality slope (likelihood margin per unit
    coefficient) at the layers where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, values in norms.items():
        a.plot(range(len(values)), values, label=key.replace("_diff", ""))
    a.set(xlabel="layer (hidden_states index)", ylabel="||v||", title=f"{trait}: vector norm per layer")
    a.legend()
    layers = sorted(causality["layers"], key=int)
    b.bar(range(len(layers)), [causality["layers"][l]["slope"] for l in layers],
          color=["tab:green" if causality["layers"][l]["monotonic"] else "tab:gray" for l in layers])
    b.set_xticks(range(len(layers)), [str(l) for l in layers])
    b.axhline(0, color="black", lw=0.5)
    b.set(xlabel="layer", ylabel="d margin / d coef",
          title="causality: log-lik margin slope (green = monotonic)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic.write_bytes(path, buf.getvalue())
