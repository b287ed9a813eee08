"""`pvjax shift --config configs/shift.py[:runlocal] --config.finetuned=SOURCE
--config.workdir=DIR`.

The finetuning shift along a persona vector per layer, base vs finetuned model, on the trait's
eval questions, beside the judge-free likelihood margin (see `pvjax.methods.finetune_shift`).
"""

from __future__ import annotations

import json

from pvjax.commands.extract import add_config_command, study_config


def add_parser(sub):
    return add_config_command(
        sub, "shift", "finetuning shift along a persona vector (config-driven)", __doc__, run
    )


def run(args) -> int:
    from pvjax.studies.shift import run as shift

    cfg, work = study_config(args)
    (r,) = shift(cfg, work, progress=not args.quiet)
    fmt = lambda x: "n/a" if x is None else f"{x:+.4f}"
    print(
        f"{r['finetuned']} vs {r['base']} at layer {r['layer']}: shift "
        f"{fmt(r['shift_prompt_last'])} (last prompt "
        f"token), {fmt(r['shift_response_avg'])} (response mean, {r['response_source']} answers); "
        "likelihood "
        f"margin {fmt(r['margin_base'])} -> {fmt(r['margin_finetuned'])}"
    )
    print(
        json.dumps(
            {
                "workdir": cfg.workdir,
                **{k: r[k] for k in ("shift_prompt_last", "shift_response_avg")},
            }
        )
    )
    return 0
