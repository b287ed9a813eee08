"""Generation on ("data", "model") meshes of 8 fake host devices gives one device's greedy
tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

from pvjax.engine.generate import generate_ids
from pvjax.errors import InputError


def test_generation_on_8_host_devices_equals_one_device(tmp_path, tokenizer):
    """data=8 (3 prompts padded to 8 rows), data=2 x model=4 and model=8, with per-row fixed,
    closed-loop and ablation rows, unrolled (and scanned on one shape); and a grid whose distinct
    prompts run once (`response` steering) against one device running every row in full."""
    save_tiny("llama_heads8", tmp_path, tokenizer=tokenizer)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharded_generate.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["wq_devices"] == 8 and "model" in res["wq_spec"], res
    assert res["n_new"] == [12, 12, 12]
    shapes = [k for k in res if k.startswith("data=")]
    assert len(shapes) == 4
    for name in shapes:
        assert res[name]["same_tokens"], (name, res)
        assert res[name]["projections"] < 1e-4, (name, res)
    assert (
        res["grid_shared_prefix"]["same_tokens"] and res["grid_shared_prefix"]["projections"] < 1e-4
    ), res
    assert "does not divide" not in proc.stderr  # every weight and kv head divides here


def test_a_mesh_that_is_not_a_data_model_mesh_is_refused(smollm2):
    import jax
    from jax.sharding import Mesh

    with pytest.raises(InputError, match="mesh must be a jax.sharding.Mesh"):
        generate_ids(smollm2, [[1, 2, 3]], mesh="data=1")
    with pytest.raises(InputError, match=r"mesh axes must be \('data', 'model'\)"):
        generate_ids(smollm2, [[1, 2, 3]], mesh=Mesh(jax.devices()[:1], ("batch",)))
