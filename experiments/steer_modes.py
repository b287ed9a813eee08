"""The steering modes compared: add, rescale and rotate on one figure, margin and distinct-2 against
the projection shift each setting caused (the mean change of the answers' projection at the
steered layer), so that the modes are read at matched shift, each point with its seed interval.

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
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6.4), squeeze=False)
    for j, layer in enumerate(layers):
        for control, label in MODES.items():
            pts = [r for r in rows if int(r["layer"]) == layer and r["control"] == control]
            pts.sort(key=lambda r: num(r["shift"]))
            x = [num(r["shift"]) for r in pts]
            for i, key in enumerate(("margin", "distinct2")):
                y = [num(r[key]) for r in pts]
                ax = axes[i][j]
                if key == "distinct2":  # the seeds' 95% interval, clipped to what a share can be
                    lo = [y_ - max(num(r["distinct2_low"]), 0.0) for r, y_ in zip(pts, y)]
                    hi = [min(num(r["distinct2_high"]), 1.0) - y_ for r, y_ in zip(pts, y)]
                    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
                else:
                    ax.plot(x, y, marker="o", label=label)
                ax.set_xlabel(f"projection shift at layer {layer}")
                ax.set_ylabel(key)
        axes[0][j].set_title(f"layer {layer}")
    axes[0][0].legend()
    fig.tight_layout()
    out = args.out or args.run / "modes.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
