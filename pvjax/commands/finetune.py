"""`pvjax finetune --config configs/finetune.py:runlocal --workdir DIR [--config.x=y ...]`.

Trains (or resumes: the same command on the same workdir continues from the last checkpoint) and
exports the merged model to `DIR/export/merged` (a Hugging Face folder) and the LoRA adapters to
`DIR/export/adapter` (peft's layout).
"""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser(
        "finetune",
        help="supervised finetuning, with preventative steering or CAFT (config-driven)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", required=True, help="config file, e.g. configs/finetune.py:runlocal")
    p.add_argument("--workdir", default="", help="run directory (default: config.workdir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, accepts_extra=True)
    return p


def run(args) -> int:
    from pvjax.finetune import train
    from pvjax.settings.config_files import load_config

    cfg = load_config(args.config, args.extra)
    summary = train(cfg, args.workdir or None, progress=not args.quiet)
    import jax

    if jax.process_index() != 0:  # a multi-process job (config.distributed): process 0 reports
        return 0
    ev = summary.get("eval") or {}
    print(
        f"{summary['steps']} steps ({summary['stopped']}); final training loss "
        f"{summary['final_loss']:.4f}"
        + (f", eval loss {ev['eval_loss']:.4f}" if "eval_loss" in ev else "")
        + (
            f", trait shift {summary['shift']:+.4f} at layer {summary['monitor_layer']}"
            if summary.get("shift") is not None
            else ""
        )
    )
    for kind, path in summary["export"].items():
        print(f"exported {kind}: {path}")
    print(
        json.dumps(
            {"workdir": summary["workdir"], "steps": summary["steps"], "export": summary["export"]}
        )
    )
    return 0
