"""`pvjax screen --config configs/screen.py[:runlocal] --config.datasets=FILE[,FILE] --config.workdir=DIR`.

Screens training data against a persona vector: per sample, the projection of the training answer
minus that of the base model's own answer (see `pvjax.screen`); flags, filters, plots. Overrides
use `--config.<field>=<value>`; a rerun reuses the cached answers and projections.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pvjax.errors import UsageError


def add_parser(sub):
    p = sub.add_parser("screen", help="screen training data by projection difference (config-driven)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/screen.py:runlocal")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, accepts_extra=True)
    return p


def run(args) -> int:
    from pvjax.commands.extract import load_config
    from pvjax.studies.screen import run as screen

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, args.extra)
    if not cfg.workdir:
        raise UsageError("set --config.workdir=DIR (where the results go)")
    rows = screen(cfg, Path(cfg.workdir), progress=not args.quiet)
    for r in rows:
        mean = "n/a" if r["mean_diff"] is None else f"{r['mean_diff']:+.3f}"
        print(f"{r['name']}: mean projection difference {mean} over {r['n_scored']} of {r['n_samples']} samples, "
              f"{r['n_flagged']} flagged ({r['empty_answer']} empty, {r['too_long']} too long, "
              f"{r['empty_own_answer']} with an empty own answer)")
    print(json.dumps({"workdir": cfg.workdir, "datasets": [r["name"] for r in rows]}))
    return 0
