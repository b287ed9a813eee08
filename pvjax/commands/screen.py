"""`pvjax screen --config configs/screen.py[:runlocal] --config.datasets=FILE[,FILE]
--config.workdir=DIR`.

Screens training data against a persona vector: per sample, the projection of the training answer
minus that of the base model's own answer (see `pvjax.methods.screening`); flags, filters, plots.
Overrides use `--config.<field>=<value>`; a rerun reuses the cached answers and projections.
"""

from __future__ import annotations

import json

from pvjax.commands.extract import add_config_command, study_config


def add_parser(sub):
    return add_config_command(
        sub, "screen", "screen training data by projection difference (config-driven)", __doc__, run
    )


def run(args) -> int:
    from pvjax.studies.screen import run as screen

    cfg, work = study_config(args)
    rows = screen(cfg, work, progress=not args.quiet)
    for r in rows:
        mean = "n/a" if r["mean_diff"] is None else f"{r['mean_diff']:+.3f}"
        print(
            f"{r['name']}: mean projection difference {mean} over {r['n_scored']} of "
            f"{r['n_samples']} samples, "
            f"{r['n_flagged']} flagged ({r['empty_answer']} empty, {r['too_long']} too long, "
            f"{r['empty_own_answer']} with an empty own answer)"
        )
    print(json.dumps({"workdir": cfg.workdir, "datasets": [r["name"] for r in rows]}))
    return 0
