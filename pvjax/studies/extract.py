"""Extraction as a study: `pvjax run --config configs/extract.py:runlocal --workdir DIR` runs
`pvjax.methods.extraction.run` into DIR (the same directory `pvjax extract --config.workdir=DIR`
makes), and a sweep over `configs/extract.py`'s `sweep(add)` extracts every trait it lists.

Extraction tracks its own provenance per stage (its ledger, `pvjax.files.ledger`): a rerun under
another judge or filter redoes only what follows, so the runner hands every rerun to it
(`OWN_PROVENANCE`) instead of refusing a changed config. In a multi-process job each extraction is
split between the processes (`JOINT`), not the sweep's points. Summary rows: the causality check,
one row per (layer, coefficient) with its likelihood margin, and the kept pair counts.
"""

from __future__ import annotations

from pathlib import Path

from pvjax.settings.fields import as_dict

OWN_PROVENANCE = True
# In a multi-process job every process runs every point: the extraction splits its own work between
# them.
JOINT = True


def _plain(cfg, work: Path) -> dict:
    """The extraction config as `pvjax.methods.extraction` takes it: no `study` field, `workdir` =
    the point's."""
    d = as_dict(cfg)
    d.pop("study", None)
    d["workdir"] = str(work)
    return d


def validate(cfg, work: Path):
    from pvjax.settings.extraction import validate_config

    return validate_config(_plain(cfg, work))


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    from pvjax.methods.extraction import run as extract
    from pvjax.settings.extraction import settings_for_run

    s = extract(settings_for_run(_plain(cfg, work)), progress=progress)
    caus = s["causality"]
    rows = []
    for layer, r in sorted(caus["layers"].items(), key=lambda kv: int(kv[0])):
        for coef, margin in zip(caus["coefs"], r["margins"]):
            rows.append(
                {
                    "layer": int(layer),
                    "coef": float(coef),
                    "positions": "response",
                    "margin": margin,
                    "slope": r["slope"],
                    "monotonic": r["monotonic"],
                    "trait": s["trait"],
                    "kept": s["counts"]["kept"],
                    "pairs": s["counts"]["pairs"],
                }
            )
    return rows
