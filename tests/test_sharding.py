"""The forward on 8 fake host devices, parameters and batch sharded, equals one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvjax.embedded import embedded_gguf_path
from pvjax.loading.tokenizer import load_gguf_tokenizer
from tiny_models import save_tiny


@pytest.mark.parametrize("kind", ["llama31_gqa_llama3rope", "qwen2_untied"])
def test_sharded_forward_equals_single_device(kind, tmp_path):
    save_tiny(kind, tmp_path, tokenizer=load_gguf_tokenizer(embedded_gguf_path()))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharded_forward.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["n_devices_wq"] == 8 and "model" in res["wq_spec"], res
    assert res["logits_devices"] == 8, res
    for name in ("logits", "hidden_states", "pooled", "projections"):
        assert res[name] < 1e-5, (name, res)
