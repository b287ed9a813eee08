"""The steering modes compared: add, rescale and rotate on one figure, margin, distinct-2 and the
unsteered model's perplexity of the answers against the projection shift each setting caused (the
mean change of the answers' projection at the steered layer), so that the modes are read at matched
shift, each point with its seed interval.

    pvjax run --config configs/steer.py:runlocal,modes --config.trait=humorous \
        --workdir runs/steer-modes
    python experiments/steer_modes.py runs/steer-modes --out docs/img/steer_modes.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

MODES = {"fixed": "add", "rescale": "rescale", "rotate": "rotate"}


def num(v: str) -> float | None:
    return None if v in ("", None) else float(v)


def r_has(rows, key: str) -> bool:
    """Whether every row has a value in column `key` (a run from before the column has none)."""
    return all(r.get(key) not in ("", None) for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the steering study's run directory (summary.csv)")
    p.add_argument("--out", type=Path, default=None, help="the figure (default RUN/modes.png)")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(args.run / "summary.csv")))
    layers = sorted({int(r["layer"]) for r in rows})
    keys = ("margin", "distinct2", "perplexity")
    fig, axes = plt.subplots(
        len(keys), len(layers), figsize=(4.2 * len(layers), 9.4), squeeze=False
    )
    for j, layer in enumerate(layers):
        for control, label in MODES.items():
            pts = [r for r in rows if int(r["layer"]) == layer and r["control"] == control]
            pts.sort(key=lambda r: num(r["shift"]))
            x = [num(r["shift"]) for r in pts]
            for i, key in enumerate(keys):
                y = [num(r.get(key, "")) for r in pts]
                ax = axes[i][j]
                if key == "margin" or not r_has(pts, f"{key}_low"):  # no seed interval
                    ax.plot(x, y, marker="o", label=label)
                else:  # the seeds' 95% interval, clipped to what the value can be
                    floor, ceil = (0.0, 1.0) if key == "distinct2" else (1.0, float("inf"))
                    lo = [y_ - max(num(r[f"{key}_low"]), floor) for r, y_ in zip(pts, y)]
                    hi = [min(num(r[f"{key}_high"]), ceil) - y_ for r, y_ in zip(pts, y)]
                    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
                ax.set_xlabel(f"projection shift at layer {layer}")
                ax.set_ylabel(key)
                if key == "perplexity":  # from about 4 unsteered to hundreds for gibberish
                    ax.set_yscale("log")
        axes[0][j].set_title(f"layer {layer}")
    axes[0][0].legend()
    fig.tight_layout()
    out = args.out or args.run / "modes.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
