"""`pvjax extract --config configs/extract.py[:runlocal] --config.trait=evil --config.workdir=DIR`.

Config overrides use ml_collections' `--config.<field>=<value>` syntax. A killed run resumes when
started again with the same workdir.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pvjax.commands.model_args import add_thinking_argument
from pvjax.errors import UsageError
from pvjax.settings.config_files import load_config


def add_parser(sub):
    return add_config_command(
        sub, "extract", "extract persona vectors for a trait (config-driven)", __doc__, run
    )


def add_config_command(sub, name: str, help: str, doc: str, func, *, example: str = ""):
    """A config-driven subcommand: `--config FILE[:ARG]` (e.g. `example`, default
    configs/<name>.py:runlocal), `--quiet`, `--thinking` (the config's `enable_thinking`), and
    `--config.x=y` overrides (left in `args.extra`; `overrides(args)` gives them to `load_config`
    with `--thinking`'s); its description is the first paragraph of `doc`. Returns the parser."""
    p = sub.add_parser(name, help=help, description=doc.split("\n\n")[0])
    p.add_argument(
        "--config",
        required=True,
        help=f"config file, e.g. {example or f'configs/{name}.py:runlocal'}",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_thinking_argument(p)
    p.set_defaults(func=func, accepts_extra=True)
    return p


def overrides(args) -> list[str]:
    """The `--config.x=y` overrides, with `--thinking` as `--config.enable_thinking=True`."""
    extra = list(args.extra)
    if getattr(args, "thinking", False):
        extra.append("--config.enable_thinking=True")
    return extra


def log_setup() -> None:
    """pvjax's own INFO messages on the console; other libraries only at WARNING (orbax and jax log
    every checkpoint transfer and backend probe at INFO, which buries the run's progress)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("pvjax").setLevel(logging.INFO)


def study_config(args):
    """(config, workdir) of a config-driven study command: logging on, `--config.x=y` overrides
    applied (`load_config`), and `--config.workdir` required (a `UsageError` without it)."""
    log_setup()
    cfg = load_config(args.config, overrides(args))
    if not cfg.workdir:
        raise UsageError("set --config.workdir=DIR (where the results go)")
    return cfg, Path(cfg.workdir)


def run(args) -> int:
    from pvjax.methods.extraction import run as extract
    from pvjax.settings.extraction import settings_for_run

    log_setup()
    settings = settings_for_run(
        load_config(args.config, overrides(args))
    )  # the config, checked and unpacked
    summary = extract(
        settings, progress=not args.quiet
    )  # its UserErrors reach the CLI's one-line report
    c = summary["counts"]
    print(
        f"kept {c['kept']} of {c['pairs']} pairs; vectors in "
        f"{summary['workdir']}/vectors.safetensors"
    )
    for layer, r in summary["causality"]["layers"].items():
        print(
            f"layer {layer}: likelihood margin {['%.3f' % m for m in r['margins']]} over coefs "
            f"{summary['causality']['coefs']} "
            f"({'monotonic' if r['monotonic'] else 'not monotonic'})"
        )
    print(json.dumps({"workdir": summary["workdir"], "kept": c["kept"]}))
    return 0
