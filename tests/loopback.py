"""Multi-process jobs on loopback for the tests: a free port, the subprocess environment, and N
processes started together and waited for (a job's processes block until all of them joined)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The parent's environment for a one-device CPU process: its XLA flags (conftest's compile
    settings, so both sides of a comparison compile alike) without a forced device count, and the
    repository and tests/ on the path."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
    e.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")]),
    )
    return e


def run_together(
    cmds: list[list[str]], *, cwd=None, timeout: float = 600
) -> list[tuple[int, str, str]]:
    """Start every command at once, wait for all; [(returncode, stdout, stderr)] in order. A process
    still running at `timeout` is killed with the others."""
    procs = [
        subprocess.Popen(
            c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=cwd
        )
        for c in cmds
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, *o) for p, o in zip(procs, outs)]
