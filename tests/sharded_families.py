"""Run as a script with 8 fake host devices: for each family folder given, the forward's
hidden_states and greedy generation on a data=2 x model=4 mesh must equal one device's. Prints
one JSON line: per folder, the largest hidden-state difference (relative to the largest
magnitude), whether the tokens are equal, and the specs the expert weights got."""

import os
import sys

# LLVM optimisation off: compiling is this script's cost, and both sides compile alike.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
)

import json
import time

import jax
import numpy as np

import pvjax
import pvjax.engine.mesh
from pvjax.engine.generate import SamplingParams, generate_ids
from pvjax.parallel import sharding


def _spec(array):
    """The sharding spec padded to the array's rank, as strings (jax prints specs variously)."""
    spec = tuple(array.sharding.spec)
    return [repr(a) for a in spec + (None,) * (array.ndim - len(spec))]


def one(folder, mesh):
    t0 = time.process_time()
    model = pvjax.load(folder)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    ids = rng.integers(1, V, (4, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[3, :11] = 0
    ref = pvjax.forward(model, ids, attention_mask=mask).hidden_states
    sharded = sharding.shard_model(model, mesh)
    out = pvjax.forward(
        sharded,
        sharding.shard_batch(ids, mesh),
        attention_mask=sharding.shard_batch(mask, mesh),
    ).hidden_states
    a, b = np.asarray(ref), np.asarray(out)
    sel = mask.astype(bool)
    t1 = time.process_time()
    prompts = [rng.integers(1, V, n).tolist() for n in (7, 12, 19)]
    kw = dict(sampling=SamplingParams(max_new_tokens=10, min_new_tokens=10))
    single = generate_ids(model, prompts, unroll=False, **kw)
    meshed = generate_ids(model, prompts, mesh=mesh, unroll=False, **kw)
    placed, _ = pvjax.engine.mesh.place_params(model, mesh, True)
    experts = {
        k: _spec(v)
        for k, v in sharded.params["layers"].items()
        if k.endswith("_e") or k == "router"
    }
    per_layer = [_spec(lp["w_gate_e"]) for lp in placed["layers"] if "w_gate_e" in lp]
    print(
        f"{os.path.basename(folder)}: CPU seconds: forward {t1 - t0:.1f}, generate "
        f"{time.process_time() - t1:.1f}",
        file=sys.stderr,
    )
    return {
        "hidden": float(np.abs(a[:, sel] - b[:, sel]).max() / np.abs(a[:, sel]).max()),
        "same_tokens": single.tokens == meshed.tokens,
        "n_new": [len(t) for t in single.tokens],
        "expert_specs": experts,
        "per_layer_expert_specs": per_layer,
    }


def main(folders):
    assert len(jax.devices()) == 8, jax.devices()
    mesh = sharding.make_mesh(model=4, data=2)
    print(json.dumps({os.path.basename(f): one(f, mesh) for f in folders}))


if __name__ == "__main__":
    main(sys.argv[1:])
