"""Run as a script with 8 fake host devices: the forward on a ("data", "model") mesh must give the
numbers of one device. Prints one JSON line of max differences."""

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
import numpy as np

import pvjax
from pvjax.capture import Capture, pooling_weights
from pvjax.interventions import build
from pvjax.parallel import sharding
from pvjax.parallel.memory import param_elements_per_device


def main(folder):
    assert len(jax.devices()) == 8, jax.devices()
    model = pvjax.load(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (4, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[3, :11] = 0
    D, L = model.hidden_size, model.n_layers + 1
    iv = build(
        L,
        D,
        steer=[(rng.standard_normal(D), 2, [0.0, 1.0, 2.0, -1.0])],
        ablate=[(rng.standard_normal(D), 1)],
        batch=4,
    )
    cap = Capture(
        pool_weights=pooling_weights(mask, 16),
        probes=rng.standard_normal((2, D)).astype(np.float32),
    )
    ref = pvjax.forward(model, ids, attention_mask=mask, intervention=iv, capture=cap)

    mesh = sharding.make_mesh(model=4)
    sharded = sharding.shard_model(model, mesh)
    wq = sharded.params["layers"]["wq"]
    out = pvjax.forward(
        sharded,
        sharding.shard_batch(ids, mesh),
        attention_mask=sharding.shard_batch(mask, mesh),
        intervention=iv,
        capture=cap,
    )
    result = {
        "n_devices_wq": len(wq.sharding.device_set),
        "wq_spec": str(wq.sharding.spec),
        "logits_devices": len(out.logits.sharding.device_set),
        # What pvjax.parallel.memory predicts one device holds, against what it does hold.
        "param_elements_device0": int(
            sum(
                x.addressable_shards[0].data.size for x in jax.tree_util.tree_leaves(sharded.params)
            )
        ),
        "param_elements_predicted": param_elements_per_device(model.config, data=2, model=4),
    }
    for name in ("logits", "hidden_states", "pooled", "projections"):
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(out, name))
        result[name] = float(np.abs(a - b).max() / np.abs(a).max())
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
