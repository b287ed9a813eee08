"""Loopback for the tests: a free port, a `pvjax serve` app served in a thread, the subprocess
environment of multi-process jobs, and N processes started together and waited for (a job's
processes block until all of them joined)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(service, app, warmup_s: float = 900):
    """`service` started and `app` served by uvicorn on a free loopback port, in a thread; yields
    the base URL once `/health` answers 200 (the programs compiled), stops both afterwards."""
    import httpx
    import uvicorn

    service.start()
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + warmup_s
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert service.scheduler.failed is None, service.scheduler.failed
            assert time.monotonic() < deadline, "the server did not warm up"
            time.sleep(0.5)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        service.stop()


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


def monitor_on(model, vector, layer: int):
    """A monitor on `vector[layer]` with threshold 0 and placeholder fit statistics, as the served
    app's tests name it ("evil"): only its direction, threshold and model identity matter there."""
    from pvjax.methods import monitoring as mon

    return mon.Monitor(
        layer=layer,
        threshold=0.0,
        direction=tuple(float(x) for x in vector[layer]),
        rule="youden",
        target_fpr=0.1,
        auroc=0.5,
        r=0.0,
        r_low=0.0,
        r_high=0.0,
        tpr=0.0,
        fpr=0.0,
        n=0,
        n_pos=0,
        n_neg=0,
        label="test",
        score_kind="contrast",
        trait="evil",
        model_id=model.model_id,
        model_fingerprint=model.config.fingerprint(),
        n_layers=model.n_layers,
        hidden_size=model.hidden_size,
        vector="test",
        vector_sha256=mon.vector_sha256(vector),
    )


def random_unit_rows(rng, L, D):
    """`[L, D]` random rows of unit norm (`pvjax.measure.stats.unit_rows`): the served app's
    tests' vectors."""
    from pvjax.measure.stats import unit_rows

    return unit_rows(rng.standard_normal((L, D)).astype("float32"))
