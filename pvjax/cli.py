"""The `pvjax` command line. Each subcommand lives in `pvjax/commands/<name>.py` and exposes
`add_parser(subparsers)` returning its parser with `func` set; imports stay lazy so `--help` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("generate", "extract", "traits")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pvjax", description="Persona vectors in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pvjax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pvjax.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.extra = rest
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
