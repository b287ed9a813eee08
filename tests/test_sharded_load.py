"""`pvjax.load(..., mesh=)` on 8 fake host devices (a subprocess): every weight split over `model`
lands as shards of 1/4 of it, each device holding only its own, and the logits equal the unsharded
load's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

from pvjax.errors import InputError
from pvjax.parallel import sharding

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded_load") / "model"
    save_tiny("llama_gqa_untied", path)
    return path


def test_load_on_a_mesh_places_shards_from_host_memory(folder):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_load.py"), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    split = {k: w for k, w in res["weights"].items() if w["model_split"]}
    assert {"layers/wq", "layers/wo", "layers/w_up", "layers/w_down"} <= set(split), sorted(split)
    for name, w in res["weights"].items():
        assert w["devices"] == 8, (name, w)
        # Split over model=4 (replicated over data): each device holds a quarter; else the whole.
        assert w["shard_sizes"] == [w["size"] // 4 if w["model_split"] else w["size"]], (name, w)
    assert res["logits"] <= 1e-5 * max(res["scale"], 1.0), res


def test_load_refuses_a_mesh_that_is_not_one(folder):
    import pvjax

    with pytest.raises(InputError, match="mesh must be a jax.sharding.Mesh"):
        pvjax.load(folder, mesh="data=2")
    one = pvjax.load(folder, mesh=sharding.make_mesh(model=1))  # one device: a 1 x 1 mesh
    assert one.params["embed"].sharding.spec is not None
