"""`pvjax shift --config configs/shift.py[:runlocal] --config.finetuned=SOURCE --config.workdir=DIR`.

The finetuning shift along a persona vector per layer, base vs finetuned model, on the trait's
eval questions, beside the judge-free likelihood margin (see `pvjax.shift`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pvjax.errors import UsageError


def add_parser(sub):
    p = sub.add_parser("shift", help="finetuning shift along a persona vector (config-driven)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/shift.py:runlocal")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, accepts_extra=True)
    return p


def run(args) -> int:
    from pvjax.commands.extract import load_config
    from pvjax.studies.shift import run as shift

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, args.extra)
    if not cfg.workdir:
        raise UsageError("set --config.workdir=DIR (where the results go)")
    (r,) = shift(cfg, Path(cfg.workdir), progress=not args.quiet)
    fmt = lambda x: "n/a" if x is None else f"{x:+.4f}"
    print(f"{r['finetuned']} vs {r['base']} at layer {r['layer']}: shift {fmt(r['shift_prompt_last'])} (last prompt "
          f"token), {fmt(r['shift_response_avg'])} (response mean, {r['response_source']} answers); likelihood "
          f"margin {fmt(r['margin_base'])} -> {fmt(r['margin_finetuned'])}")
    print(json.dumps({"workdir": cfg.workdir, **{k: r[k] for k in ("shift_prompt_last", "shift_response_avg")}}))
    return 0
