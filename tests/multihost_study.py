"""A study for the multi-process runner test: squares `x` with a jitted JAX program on this
process's device, in two resumable parts, and notes every run call in `calls.txt` (so a test can
count how often each point was computed). Its config (`get_config`) carries a `distributed` section,
as the extraction config does."""

from __future__ import annotations

import os

import ml_collections

from pvjax.files import atomic
from pvjax.parallel import multihost


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.study = "tests.multihost_study"
    c.x = 0
    c.workdir = ""
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator="", num_processes=0, process_id=-1, timeout=60)
    )
    return c


def sweep(add):
    for x in range(5):
        add(x=x)


def run(cfg, work, *, progress=True):
    import jax
    import jax.numpy as jnp

    # Inside a point the process works alone, even in a joined job: a pipeline that joins sees one
    # process.
    alone = multihost.join(cfg.distributed.to_dict())
    with open(work / "calls.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    part = work / "part1.json"
    if not part.exists():
        atomic.write_json(part, {"half": cfg.x})
    square = float(jax.jit(lambda v: v * v)(jnp.float32(cfg.x)))
    return [{"x": cfg.x, "square": square, "processes_seen": alone.count}]
