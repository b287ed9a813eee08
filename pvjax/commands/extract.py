"""`pvjax extract --config configs/extract.py[:runlocal] --config.trait=evil --config.workdir=DIR`.

Config overrides use ml_collections' `--config.<field>=<value>` syntax. A killed run resumes when
started again with the same workdir.
"""

from __future__ import annotations

import json
import logging


def add_parser(sub):
    p = sub.add_parser("extract", help="extract persona vectors for a trait (config-driven)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/extract.py:runlocal")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, accepts_extra=True)
    return p


def load_config(path: str, overrides: list[str]):
    """Load a `get_config(arg)` file and apply `--config.a.b=value` overrides through absl flags,
    exactly as `ml_collections.config_flags` does for scripts."""
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise SystemExit(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.trait=evil)")
    argv = ["pvjax", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    # The override flags are found by scanning an argv at definition time; give it ours, not sys.argv.
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, KeyError, AttributeError, FileNotFoundError) as e:
        raise SystemExit(f"bad config: {e}")
    return fv.config


def run(args) -> int:
    from pvjax.extract import ExtractionError
    from pvjax.extract import run as extract

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, args.extra)
    try:
        summary = extract(cfg, progress=not args.quiet)
    except (ExtractionError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    c = summary["counts"]
    print(f"kept {c['kept']} of {c['pairs']} pairs; vectors in {summary['workdir']}/vectors.safetensors")
    for layer, r in summary["causality"]["layers"].items():
        print(f"layer {layer}: likelihood margin {['%.3f' % m for m in r['margins']]} over coefs "
              f"{summary['causality']['coefs']} ({'monotonic' if r['monotonic'] else 'not monotonic'})")
    print(json.dumps({"workdir": summary["workdir"], "kept": c["kept"]}))
    return 0
