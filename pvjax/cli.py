"""The `pvjax` command line. Each subcommand lives in `pvjax/commands/<name>.py` and exposes
`add_parser(subparsers)` returning its parser with `func` set; imports stay lazy so `--help` is
fast.

Errors: a user mistake (any `pvjax.errors.UserError`, or a path that does not exist or is a
directory) prints one line, `pvjax <command>: error: <message>`, on stderr
and exits with status 2, as argparse does for bad arguments. Anything else is a bug and keeps its
traceback; `PVJAX_DEBUG=1` shows the traceback for user mistakes too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pvjax.errors import UserError

COMMANDS = (
    "generate",
    "extract",
    "traits",
    "run",
    "sweep",
    "screen",
    "shift",
    "finetune",
    "vectors",
    "serve",
)
EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other user error (no usage block)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the input is wrong", not "pvjax is wrong". Path errors
    count: pvjax opens no file the user did not name."""
    return (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def main(argv=None) -> int:
    parser = _Parser(prog="pvjax", description="Persona vectors in JAX.")
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
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not isinstance(e, user_errors()) or os.environ.get("PVJAX_DEBUG", "") not in ("", "0"):
            raise
        print(f"pvjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def _one_line(e: BaseException) -> str:
    """The message on one line (a path error's `strerror: 'filename'` form included)."""
    text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
