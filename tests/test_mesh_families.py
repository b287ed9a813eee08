"""Each family past Llama on a data=2 x model=4 mesh of 8 fake host devices equals one device:
every hidden_states row (1e-5 of the largest magnitude) and greedy tokens. One subprocess for all
(`sharded_families.py`): compiles are the cost. The expert weights lie over "model" by expert."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny

# Qwen3 dense (tied), Qwen3-MoE with dense blocks among its expert blocks, Mistral with a
# window, Gemma 2, Gemma 3.
KINDS = ("qwen3_tied", "qwen3_moe_mixed", "mistral_window", "gemma2", "gemma3")


def test_families_on_a_mesh_equal_one_device(tmp_path):
    for kind in KINDS:
        save_tiny(kind, tmp_path / kind, vocab_size=512)
    script = Path(__file__).with_name("sharded_families.py")
    proc = subprocess.run(
        [sys.executable, str(script), *(str(tmp_path / k) for k in KINDS)],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(res) == sorted(KINDS)
    for kind, r in res.items():
        assert r["hidden"] < 1e-5, (kind, r)
        assert r["same_tokens"] and r["n_new"] == [10, 10, 10], (kind, r)
    moe = res["qwen3_moe_mixed"]
    for key in ("w_gate_e", "w_up_e", "w_down_e"):  # [routed blocks, X, ...]: X over "model"
        assert moe["expert_specs"][key] == ["None", "'model'", "None", "None"], moe
    assert moe["per_layer_expert_specs"] == [["'model'", "None", "None"]] * 3, moe
