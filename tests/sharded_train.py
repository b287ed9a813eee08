"""Run as a script with 8 fake host devices: the train step on a ("data", "model") mesh gives the
losses of one device. Prints one JSON line: both loss curves and where the state lives.

    python tests/sharded_train.py MODEL_DIR DATA.jsonl
"""

import os
import sys

# LLVM optimisation off: compiling is this script's cost (a few steps of a tiny model; measured 22%
# less
# CPU time for sharded_generate.py), and both sides of every comparison here compile alike.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
)

import json

import jax

import pvjax
from pvjax.finetune import data
from pvjax.finetune import step as st
from pvjax.finetune.trainer import setup
from pvjax.parallel import sharding

sys.path.insert(0, os.path.dirname(__file__))
from finetune_tiny import tiny_config  # noqa: E402


def curve(cfg, model, mesh, n_steps=2):
    s = setup(cfg, model=model, mesh=mesh)
    fn = st.compile_step(s.step_settings, s.optimizer, s.mesh, s.shardings, s.frozen)
    per_step = cfg.batch.rows * cfg.batch.accum
    state, losses = s.state, []
    for k in range(n_steps):
        b = data.stack_step(
            s.rows, data.step_rows(s.rows.n_rows, k, per_step, cfg.seed), cfg.batch.accum
        )
        state, met = fn(state, s.frozen, st.place(b, st.batch_sharding(mesh)), s.fwd)
        losses.append(float(met["loss"]))
    leaf = jax.tree_util.tree_leaves(state.trainable)[0]
    mu = jax.tree_util.tree_leaves(state.opt_state)[1]
    return losses, len(leaf.sharding.device_set), str(leaf.sharding.spec), str(mu.sharding.spec)


def main(folder, train_file):
    assert len(jax.devices()) == 8, jax.devices()
    model = pvjax.load(folder)
    for method in ("lora",):  # full finetuning shares the step; its layout is the inference table's
        cfg = tiny_config(folder, train_file, method=method, rows=4, accum=2, remat=False)
        one = curve(cfg, model, sharding.make_mesh(devices=jax.devices()[:1]))
        eight = curve(cfg, model, sharding.make_mesh(model=2))
        print(
            json.dumps(
                {
                    "method": method,
                    "single": one[0],
                    "sharded": eight[0],
                    "devices": eight[1],
                    "spec": eight[2],
                    "moment_spec": eight[3],
                }
            )
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
