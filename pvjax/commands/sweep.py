"""`pvjax sweep`: `pvjax run` over every point of the config's `sweep(add)` (see
`pvjax.commands.run`)."""

from __future__ import annotations


def add_parser(sub):
    from pvjax.commands.run import add_parser as add

    return add(sub, "sweep")
