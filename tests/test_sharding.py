"""The forward on 8 fake host devices, parameters and batch sharded, equals one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

from pvjax.loading.embedded import embedded_gguf_path
from pvjax.loading.tokenizer import load_gguf_tokenizer


@pytest.mark.parametrize("kind", ["llama31_gqa_llama3rope", "qwen2_untied"])
def test_sharded_forward_equals_single_device(kind, tmp_path):
    save_tiny(kind, tmp_path, tokenizer=load_gguf_tokenizer(embedded_gguf_path()))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharded_forward.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["n_devices_wq"] == 8 and "model" in res["wq_spec"], res
    assert res["logits_devices"] == 8, res
    assert res["param_elements_device0"] == res["param_elements_predicted"], res
    for name in ("logits", "hidden_states", "pooled", "projections"):
        assert res[name] < 1e-5, (name, res)


def test_two_process_job_on_loopback_equals_single_process(tmp_path):
    """The multi-host path for real: jax.distributed over a loopback coordinator, gloo
    collectives."""
    import socket

    import numpy as np

    import pvjax

    save_tiny("qwen2_untied", tmp_path / "m", tokenizer=load_gguf_tokenizer(embedded_gguf_path()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("multihost_forward.py")
    out = tmp_path / "logits.npy"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "m"), str(port), str(i), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    model = pvjax.load(tmp_path / "m")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    ref = np.asarray(pvjax.forward(model, ids).logits)
    got = np.load(out)
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
