"""The study runner in a multi-process job (`pvjax.studies.runner.run_points` with a `Job`):
which job a sweep joins, and the vectors its points share.

Every process runs the same `pvjax run` / `pvjax sweep` command. The job comes from the config's
`distributed` section, or from its `extract` config's (every study config carries one there), as
for `pvjax extract`. The points are split by process (`Job.mine`) and each runs alone
(`pvjax.parallel.multihost.alone`); a vector that unfinished points share is extracted once, before
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pvjax.files import atomic
from pvjax.parallel import multihost
from pvjax.parallel.multihost import SINGLE, Job
from pvjax.settings.fields import as_dict


def share_vectors(job: Job, shared: dict, done: dict[int, bool], progress: bool, log) -> None:
    """In a multi-process sweep, each vector that unfinished points share is extracted once: by the
    process of the first such point, alone, before any point runs; its file then goes to every
    process that lacks it (hosts of a pod share no filesystem)."""
    from pvjax.studies.vector_source import vector_spec

    todo = {int(i) for got in job.gather([i for i, d in done.items() if not d]) for i in got}
    owner: dict[Path, tuple[int, Any]] = {}
    for i in sorted(todo):
        if i in shared:
            owner.setdefault(shared[i][0], (i % job.count, shared[i][1]))
    for where, (proc, cfg) in owner.items():
        path = (
            where / "vector" / "vectors.safetensors"
        )  # what `shared_vectors` points the points at
        if proc == job.index and not path.exists():
            log(f"extracting the shared vector into {where} (process {job.index})")
            with multihost.alone():
                vector_spec(cfg, where, progress=progress)
    for where, (proc, cfg) in owner.items():
        path = where / "vector" / "vectors.safetensors"
        data = job.each(lambda: path.read_bytes() if proc == job.index else b"", raw=True)[proc]
        if not path.exists():
            atomic.write_bytes(path, data)


def join_job(points) -> Job:
    """The job the points run in: one process, unless their config's `distributed` section (its
    own, or its `extract` config's: every study config carries one there) names a coordinator;
    then this process joins it (`pvjax.parallel.multihost.join`), before anything touches a JAX
    device."""
    d = distributed_section(points[0].cfg)
    return multihost.join(d) if d and d.get("coordinator") else SINGLE


def distributed_section(cfg) -> dict | None:
    for node in (cfg, cfg.get("extract") or {}):
        if "distributed" in node and node["distributed"] is not None:
            d = node["distributed"]
            return as_dict(d)
    return None
