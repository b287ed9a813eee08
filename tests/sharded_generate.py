"""Run as a script with 8 fake host devices: generation on ("data", "model") meshes must give the
greedy tokens of one device. Prints one JSON line."""

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
import logging

import jax
import numpy as np

import pvjax
import pvjax.engine.mesh
from pvjax import interventions as ivs
from pvjax.engine.generate import SamplingParams, generate_ids
from pvjax.parallel import sharding


def main(folder):
    assert len(jax.devices()) == 8, jax.devices()
    logging.basicConfig(level=logging.WARNING)
    model = pvjax.load(folder)
    L, D = model.n_layers + 1, model.hidden_size
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (7, 12, 19)]
    v = rng.standard_normal(D).astype(np.float32)
    v *= 2 / np.linalg.norm(v)
    iv = ivs.build(
        L,
        D,
        steer=[(v, 1, [0.0, 4.0, ivs.cap(0.0)])],
        ablate=[(rng.standard_normal(D), 2, 0.5)],
        batch=3,
    )
    kw = dict(
        sampling=SamplingParams(max_new_tokens=12, min_new_tokens=12),
        intervention=iv,
        probes=v[None] / 2,
    )
    result = {}
    for unroll, shapes in ((True, ((8, 1), (2, 4), (1, 8))), (False, ((2, 4),))):
        ref = generate_ids(model, ids, unroll=unroll, **kw)
        for data, mdl in shapes:
            mesh = sharding.make_mesh(model=mdl, data=data)
            g = generate_ids(model, ids, mesh=mesh, unroll=unroll, **kw)
            name = f"data={data},model={mdl},unroll={unroll}"
            proj = max(float(np.abs(a - b).max()) for a, b in zip(g.projections, ref.projections))
            result[name] = {"same_tokens": g.tokens == ref.tokens, "projections": proj}
    # A grid (3 prompts x 2 settings) with `response` steering runs each distinct prompt once:
    # on the mesh as on one device without sharing.
    grid = dict(
        kw,
        intervention=ivs.build(L, D, steer=[(v, 1, [3.0] * 3 + [-3.0] * 3)], batch=6),
        positions="response",
    )
    full = generate_ids(model, ids * 2, share_prefix=False, **grid)
    g = generate_ids(model, ids * 2, mesh=sharding.make_mesh(model=4, data=2), **grid)
    result["grid_shared_prefix"] = {
        "same_tokens": g.tokens == full.tokens,
        "projections": max(
            float(np.abs(a - b).max())
            for a, b in zip(
                g.prompt_projections + g.projections, full.prompt_projections + full.projections
            )
        ),
    }
    mesh = sharding.make_mesh(model=4, data=2)
    placed, _ = pvjax.engine.mesh.place_params(model, mesh, True)
    result["wq_spec"] = str(placed["layers"][0]["wq"].sharding.spec)
    result["wq_devices"] = len(placed["layers"][0]["wq"].sharding.device_set)
    result["n_new"] = [len(t) for t in ref.tokens]
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
