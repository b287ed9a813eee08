"""Every notebook (`notebooks/*.py`, percent format) runs top to bottom in its short configuration.

Each runs as its own process, as CI and a reader would run it, from a working directory outside the
checkout (so no path may depend on where it is started), with `PVJAX_NOTEBOOK_SHORT=1` and one
shared `PVJAX_NOTEBOOK_WORKDIR`: the walkthrough runs first and extracts the vector, the others
reuse that extraction. A shared JAX compilation cache lets later notebooks reuse earlier compiles.
Any exception fails the test with the notebook's output; the plots each notebook promises must
exist and be non-empty PNGs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if not p.name.startswith("_"))
# The walkthrough extracts the vector the others read: it goes first.
NOTEBOOKS.sort(key=lambda p: p.name != "walkthrough.py")
PLOTS = {
    "walkthrough.py": (
        "vector_norms.png",
        "steer_projection.png",
        "steer_margin.png",
        "monitor.png",
        "ablate.png",
    ),
    "monitoring.py": ("monitoring_trace.png",),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def test_every_notebook_has_expected_plots():
    assert [p.name for p in NOTEBOOKS][:1] == ["walkthrough.py"]
    assert {p.name for p in NOTEBOOKS} == set(PLOTS), (
        "a new notebook needs its plots listed in PLOTS"
    )


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, shared):
    work, cwd = shared / "work", shared / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PVJAX_NOTEBOOK_SHORT": "1",
        "PVJAX_NOTEBOOK_WORKDIR": str(work),
        "MPLBACKEND": "Agg",
        "JAX_COMPILATION_CACHE_DIR": str(shared / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(notebook)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{notebook.name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-6000:]}"
    )
    for name in PLOTS[notebook.name]:
        png = work / "plots" / name
        assert png.exists(), f"{notebook.name} wrote no {png}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000, png
