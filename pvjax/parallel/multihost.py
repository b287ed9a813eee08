"""Several processes, one run: joining the job, splitting work, exchanging results.

A multi-process job (a TPU pod slice: one process per host; a multi-node GPU job: one per node or
per GPU) runs the same command in every process. `join` connects them (`jax.distributed`); a `Job`
then says which share of the work is this process's (`mine`: item i belongs to process i mod P),
and moves results between processes with collectives (`jax.experimental.multihost_utils`), never
through files: hosts of a pod share no filesystem. Only process 0 (the writer) reads and writes the
run directory; what it finds there (finished parts, an error) it sends to the others, so every
process takes the same decisions and nothing is computed twice.

Everything travels as bytes (JSON, CSV text, safetensors) in one all-gather: lengths first, then
the bytes padded to a power of two (few distinct shapes, few compiled programs). An error raised
inside `each` or `from_writer` reaches every process, so no process is left waiting in a collective
for one that gave up; a process that dies outright is noticed by the coordinator (heartbeats), which
stops the others; the writer's files are whole (`pvjax.files.atomic`), so a rerun resumes.

Joining: with `HOST:PORT`, the processes first meet at the coordinator's port (`rendezvous`): a
process that never comes, or was told another process count, is a `JobError` naming the
coordinator, the count and the process, where JAX would abort the process. `alone()` lets a
process work by itself inside a joined job (the study runner's points).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import re
import socket
import time
from typing import Any, Callable

import numpy as np

from pvjax.errors import UsageError, UserError

log = logging.getLogger(__name__)


class JobError(UserError, RuntimeError):
    """Another process of the job raised a `UserError`; the message is its, naming the process."""


@dataclasses.dataclass(frozen=True)
class Job:
    """This process's place in the job: `index` of `count` processes, and the mesh of its own
    devices (None: one device). `Job()` is a single process, for which every method is a plain
    call."""

    index: int = 0
    count: int = 1
    mesh: Any = None

    @property
    def writer(self) -> bool:
        """Whether this process reads and writes the run directory (process 0)."""
        return self.index == 0

    def describe(self) -> dict:
        """What ran a result, for its provenance: this process's index, the process count, and the
        mesh shape (`data` x `model`, 1 x 1 without a mesh) and device count of this process."""
        shape = dict(self.mesh.shape) if self.mesh is not None else {"data": 1, "model": 1}
        return {
            "process": self.index,
            "processes": self.count,
            "mesh": shape,
            "devices": int(self.mesh.devices.size) if self.mesh is not None else 1,
        }

    def mine(self, n: int) -> list[int]:
        """The indices of `n` work items this process does: every `count`-th, from `index`."""
        return list(range(self.index, n, self.count))

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every process's `data`, in process order (all processes must call it)."""
        if self.count == 1:
            return [data]
        from jax.experimental import multihost_utils

        lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32)))[
            :, 0
        ]
        width = 1 << max(int(lengths.max()) - 1, 0).bit_length()
        buf = np.zeros(width, np.uint8)
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        got = np.asarray(multihost_utils.process_allgather(buf))
        return [got[i, : int(n)].tobytes() for i, n in enumerate(lengths)]

    def gather(self, obj) -> list:
        """Every process's JSON-able `obj`, in process order."""
        return [json.loads(b) for b in self.gather_bytes(json.dumps(obj).encode())]

    def each(self, fn: Callable[[], Any], *, raw: bool = False) -> list:
        """`fn()` on every process, every process's value in process order (JSON-able, or bytes
        with `raw`), with errors shared: an exception on any process is raised on every one (as
        itself where it happened, as a `JobError` naming the process elsewhere), so no process is
        left waiting in a collective for one that gave up."""
        if self.count == 1:
            return [fn()]
        value, error, raised = b"" if raw else None, "", None
        try:
            value = fn()
        except (
            Exception
        ) as e:  # any error, not only a UserError: the others would wait for this process
            error, raised = (
                f"process {self.index}: "
                f"{e if isinstance(e, UserError) else f'{type(e).__name__}: {e}'}",
                e,
            )
        head = json.dumps({"error": error}).encode()  # one line: json escapes newlines
        got = self.gather_bytes(head + b"\n" + (value if raw else json.dumps(value).encode()))
        heads = [json.loads(b.split(b"\n", 1)[0])["error"] for b in got]
        if raised is not None:
            raise raised
        if any(heads):
            raise JobError(next(h for h in heads if h))
        bodies = [b.split(b"\n", 1)[1] for b in got]
        return bodies if raw else [json.loads(b) for b in bodies]

    def from_writer(self, fn: Callable[[], Any], *, raw: bool = False):
        """`fn()` run by the writer alone (it reads the run directory), its value sent to every
        process; its `UserError` raised on every process."""
        return self.each(fn if self.writer else (lambda: b"" if raw else None), raw=raw)[0]

    def unshare(self, n: int, values: list) -> list:
        """The `n` results of work split by `mine`, back in item order, from `values[p]` (the list
        of results of process p's items)."""
        out = [None] * n
        for p, vals in enumerate(values):
            for i, v in zip(range(p, n, self.count), vals):
                out[i] = v
        return out

    def check_same(self, what: str, value) -> None:
        """Refuse to go on (every process, naming the difference) unless every process passes the
        same JSON-able `value`: the processes of a job must run the same command."""
        if self.count == 1:
            return
        values = self.gather(_flat(value))
        odd = [i for i, v in enumerate(values) if v != values[0]]
        if odd:
            a, b = values[0], values[odd[0]]
            diff = (
                ", ".join(
                    f"{k}: {a.get(k)!r} vs {b.get(k)!r}"
                    for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)
                )
                if isinstance(a, dict) and isinstance(b, dict)
                else f"{b!r}"
            )
            raise UsageError(
                f"process(es) {odd} run with another {what} than process 0 ({diff}): start "
                "every process with the same command (only distributed.process_id may differ)"
            )


SINGLE = Job()

_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pvjax_multihost_alone", default=False
)


@contextlib.contextmanager
def alone():
    """Within it, this process works by itself: `join` returns a one-process `Job` even inside a
    joined job. The study runner runs each process's own sweep points so; a pipeline that would
    otherwise split its work between processes (extraction) then does all of it, writing its own
    directory, and waits for no other process."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def _flat(value, prefix: str = ""):
    """Nested dicts as one dict of "a.b" keys (JSON round trip: tuples become lists), so that a
    difference can be named by its field."""
    if not isinstance(value, dict):
        return json.loads(json.dumps(value))
    out = {}
    for k, v in value.items():
        out.update(
            _flat(v, f"{prefix}{k}.")
            if isinstance(v, dict)
            else {f"{prefix}{k}": json.loads(json.dumps(v))}
        )
    return out


_ADDRESS = re.compile(r"^[\w.\-\[\]:]+:\d{1,5}$")


def check_distributed(d: dict) -> list[str]:
    """The problems of a `distributed` config section (empty when fine); pure Python, no JAX."""
    coord, n, pid, timeout = (
        d.get("coordinator"),
        d.get("num_processes"),
        d.get("process_id"),
        d.get("timeout"),
    )
    problems = []
    if not isinstance(coord, str) or not (coord in ("", "auto") or _ADDRESS.match(coord)):
        problems.append(
            f"distributed.coordinator must be '' (one process), 'auto' (detect a TPU slice, "
            f"SLURM or Open MPI job) or HOST:PORT of process 0, got {coord!r}"
        )
    for key, v, lo in (("num_processes", n, 0), ("process_id", pid, -1), ("timeout", timeout, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            problems.append(f"distributed.{key} must be an integer >= {lo}, got {v!r}")
    if problems:
        return problems
    if coord == "" and (n > 1 or pid > 0):
        problems.append(
            f"distributed.num_processes={n}, process_id={pid} need distributed.coordinator "
            "(HOST:PORT of process 0, or 'auto')"
        )
    if n and pid >= n:
        problems.append(
            f"distributed.process_id={pid} is not in 0..{n - 1} (distributed.num_processes={n})"
        )
    return problems


def join(d: dict, mesh_data: int = 1, mesh_model: int = 1) -> Job:
    """This process's `Job`: joins the multi-process job that `d` (a config's `distributed`
    section) describes, unless it is already joined or `d` names none, and builds the mesh
    `mesh_data` x `mesh_model` over this process's devices (`pvjax.parallel.sharding.local_mesh`).
    Must run before anything touches a JAX device. Errors say what to change (`UsageError`)."""
    import jax

    from pvjax.parallel.sharding import local_mesh

    problems = check_distributed(d)
    if problems:
        raise UsageError("bad distributed config: " + "; ".join(problems))
    if _ALONE.get():
        return Job(0, 1, local_mesh(mesh_data, mesh_model))
    coord, n, pid = d["coordinator"], d["num_processes"], d["process_id"]
    if coord and not jax.distributed.is_initialized():
        if coord != "auto" and n > 0 and pid >= 0:
            # JAX aborts the process when another does not come in time; meet them first, with an
            # error.
            rendezvous(coord, n, pid, d["timeout"])
        kw = {} if coord == "auto" else {"coordinator_address": coord}
        kw.update(
            {
                k: v
                for k, v in (("num_processes", n or None), ("process_id", None if pid < 0 else pid))
                if v is not None
            }
        )
        who = f"process {pid if pid >= 0 else '?'} of {n or '?'} at coordinator {coord}"
        log.info("joining the job as %s", who)
        try:
            jax.distributed.initialize(initialization_timeout=d["timeout"], **kw)
        except Exception as e:  # jax raises RuntimeError / ValueError / XlaRuntimeError here
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "before any JAX" in str(e):
                raise UsageError(
                    f"cannot join as {who}: JAX already started in this process; join first "
                    "(pvjax extract does, in a fresh process)"
                ) from None
            raise UsageError(
                f"could not join the job as {who} within {d['timeout']} s ({first}). Start "
                "every process with the same coordinator and num_processes, and the ids "
                "0..num_processes-1 once each"
            ) from None
    job = Job(jax.process_index(), jax.process_count(), None)
    if n and job.count != n:
        raise UsageError(f"distributed.num_processes={n}, but the job has {job.count} processes")
    if job.count > 1:
        log.info(
            "process %d of %d, %d local devices", job.index, job.count, jax.local_device_count()
        )
    return dataclasses.replace(job, mesh=local_mesh(mesh_data, mesh_model))


# --- meeting before JAX does: a process that never comes, or counts differently, is an error ---


def _hello(n: int, pid: int) -> bytes:
    return (json.dumps({"process_id": pid, "num_processes": n}) + "\n").encode()


def _line(conn: socket.socket, deadline: float) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return json.loads(buf)


def rendezvous(coord: str, n: int, pid: int, timeout: float) -> None:
    """Every process of the job meets at the coordinator's port before JAX starts its own service
    there: process 0 listens, the others connect and say their id and process count. Raises a
    `JobError` naming the coordinator, the expected count and this process when a process does not
    come within `timeout` seconds, counts differently, or takes an id twice: JAX itself aborts the
    process then (DEADLINE_EXCEEDED), with no exception to catch and nothing said about who is
    missing. The port is free again when this returns (clients close first, so no socket of
    process 0 lingers on it)."""
    host, port = coord.rsplit(":", 1)
    host = host.strip("[]")
    who = f"process {pid} of {n} (distributed.num_processes) at coordinator {coord}"
    deadline = time.monotonic() + timeout
    if pid != 0:
        reply = None
        while reply is None:
            try:
                with socket.create_connection(
                    (host, int(port)), timeout=max(deadline - time.monotonic(), 0.01)
                ) as c:
                    c.sendall(_hello(n, pid))
                    reply = _line(c, deadline + 30)  # process 0 answers by its own deadline
            except (ConnectionError, OSError, json.JSONDecodeError):
                if time.monotonic() >= deadline:
                    raise JobError(
                        f"{who}: process 0 did not answer within {timeout:g} s "
                        "(distributed.timeout); "
                        "start process 0 with the same distributed.coordinator, reachable from here"
                    ) from None
                time.sleep(0.2)
        if reply.get("error"):
            raise JobError(f"{who}: {reply['error']}")
        return
    family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
    try:
        server = socket.create_server(
            ("", int(port)), family=family, dualstack_ipv6=family == socket.AF_INET6
        )
    except OSError as e:
        raise JobError(
            f"{who}: cannot listen on port {port} ({e.strerror}); pick a free port"
        ) from None
    came: set[int] = set()
    conns: list[socket.socket] = []
    problems: list[str] = []
    with server:
        while len(came) < n - 1 and not problems and time.monotonic() < deadline:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = server.accept()
                hello = _line(conn, deadline)
            except (OSError, ConnectionError, json.JSONDecodeError):
                continue
            conns.append(conn)
            other, count = hello.get("process_id"), hello.get("num_processes")
            if count != n:
                problems.append(
                    f"process {other} was started with distributed.num_processes={count}, "
                    f"process 0 with {n}"
                )
            elif not isinstance(other, int) or not 0 < other < n or other in came:
                problems.append(
                    f"a process came with distributed.process_id={other}"
                    + (" twice" if other in came else f", not in 1..{n - 1}")
                )
            else:
                came.add(other)
        missing = [i for i in range(1, n) if i not in came]
        if not problems and missing:
            problems.append(
                f"process(es) {missing} did not join within {timeout:g} s (distributed.timeout): "
                f"start all {n} processes, with ids 0..{n - 1} once each and the same coordinator"
            )
        error = "; ".join(problems)
        for conn in conns:
            with conn:
                try:
                    conn.sendall((json.dumps({"error": error}) + "\n").encode())
                    conn.settimeout(5)
                    conn.recv(1)  # the client closes first: no socket of ours lingers on the port
                except OSError:
                    pass
    if error:
        raise JobError(f"{who}: {error}")
