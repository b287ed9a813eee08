"""Parallelism: the `("data", "model")` mesh and its sharding table (`sharding`), memory per
device (`memory`), and multi-process jobs (`multihost`).

A leaf (with `pvjax.errors`); `memory` reads model configs from `models`."""
