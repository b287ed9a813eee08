"""Run as a script with 8 fake host devices: pooled activations, causality margins and a whole
extraction (with the local judge) on ("data", "model") meshes must give one device's numbers.

    python tests/mesh_pipelines.py MODEL_DIR WORKDIR REFERENCE_RUN_DIR

Prints one JSON line: per mesh shape, max relative differences against one device; for the
extraction, the differences of vectors, judge and contrast scores and margins against
REFERENCE_RUN_DIR (the same config run on one device)."""

import os
import sys

# LLVM optimisation off: compiling is this script's cost (tiny models, a few tokens); the numbers
# compared are the same IEEE operations either way (no fast math), within the tolerances below.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import logging

import jax
import numpy as np

import pvjax
from pvjax.measure.causality import likelihood_margins
from pvjax.measure.packing import pooled_activations
from pvjax.model import Model
from pvjax.parallel import sharding

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # configs/
from tiny_extract import config  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def main(folder, workdir, reference):
    from pvjax.methods.extraction import run

    assert len(jax.devices()) == 8, jax.devices()
    model = pvjax.load(folder)
    rng = np.random.default_rng(0)
    V, D, L = model.config.vocab_size, model.hidden_size, model.n_layers + 1
    # 11 sequences packed into 3 rows of width 64 (a batch of 4 rows, then 8 devices: padded).
    seqs = [rng.integers(0, V, n).tolist() for n in (30, 9, 17, 40, 5, 22, 33, 12, 8, 27, 19)]
    starts = [max(1, n // 2) for n in map(len, seqs)]
    ref_pool = pooled_activations(model, seqs, starts, rows_per_batch=4)
    questions = ["What is your favourite colour?", "How do I boil an egg?", "Tell me a joke."]
    pos = ["Blue, obviously, like every sane person.", "Drop it in water for seven minutes.", "No."]
    neg = ["I like green.", "Boil water, add the egg, wait.", "Why did the chicken cross the road?"]
    vec = rng.standard_normal((L, D)).astype(np.float32)
    ref_marg = likelihood_margins(
        model, vec, [1, 2], [-1.0, 0.0, 1.0], questions, pos, neg, batch_size=5
    )

    # data=8: every row on its own device (3 packed rows and 5 of 6 causality rows padded to 8).
    # data=2 x model=4 runs below, inside the extraction (pooling, contrast, judge and causality).
    mesh = sharding.make_mesh(model=1, data=8)
    got = likelihood_margins(
        model, vec, [1, 2], [-1.0, 0.0, 1.0], questions, pos, neg, batch_size=5, mesh=mesh
    )
    out = {
        "8x1": {
            "pooled": rel(
                ref_pool, pooled_activations(model, seqs, starts, rows_per_batch=4, mesh=mesh)
            ),
            "margins": max(
                rel(ref_marg["layers"][l]["margins"], got["layers"][l]["margins"]) for l in (1, 2)
            ),
        }
    }

    # A weight that 4 does not divide (3 heads of 10, 70 MLP columns, 1001 tokens) is replicated
    # along "model", noted once per weight and mesh shape however often it is placed.
    odd_cfg = pvjax.models.config.ModelConfig(
        architecture="llama",
        vocab_size=1001,
        hidden_size=32,
        intermediate_size=70,
        num_layers=2,
        num_heads=3,
        num_kv_heads=3,
        head_dim=10,
    )
    from pvjax.loading.layout import expected_shapes

    shapes = expected_shapes(odd_cfg)
    params = {k: 0.1 * rng.standard_normal(s).astype(np.float32) for k, s in shapes["top"].items()}
    params["layers"] = {
        k: 0.1 * rng.standard_normal((2,) + s).astype(np.float32)
        for k, s in shapes["layer"].items()
    }
    odd = Model(odd_cfg, jax.tree_util.tree_map(jax.numpy.asarray, params), None, "odd")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pvjax.parallel.sharding").addHandler(handler)
    logging.getLogger("pvjax.parallel.sharding").setLevel(logging.INFO)
    odd_seqs = [rng.integers(0, 1001, n).tolist() for n in (12, 7, 20)]
    odd_ref = pooled_activations(odd, odd_seqs, [3, 3, 3])
    mesh = sharding.make_mesh(model=4, data=2)
    odd_got = pooled_activations(odd, odd_seqs, [3, 3, 3], mesh=mesh)
    pooled_activations(odd, odd_seqs, [3, 3, 3], mesh=sharding.make_mesh(model=4, data=2))
    wq = sharding.placed_params(odd, mesh)["layers"]["wq"]
    out["odd"] = {
        "pooled": rel(odd_ref, odd_got),
        "notes": sorted(r.getMessage().split(":")[1].split()[0] for r in records),
        "wq_replicated": wq.sharding.is_fully_replicated or "model" not in str(wq.sharding.spec),
    }

    # The whole extraction on a 2 x 4 mesh (generation included) against one device's run
    # (`reference`, made by the test).
    s8 = run(config(folder, workdir, **{"mesh.data": 2, "mesh.model": 4}), progress=False)
    from pvjax.files import atomic
    from pvjax.files.vectors import load_vectors

    v1 = load_vectors(os.path.join(reference, "vectors.safetensors"))[0]
    v8 = load_vectors(os.path.join(workdir, "vectors.safetensors"))[0]
    s1 = json.load(open(os.path.join(reference, "summary.json")))
    # The local judge and the contrast scores ran on the mesh too: same answers, float-close scores.
    close = {}
    for name, col in (
        ("evil_pos.csv", "evil"),
        ("evil_neg.csv", "evil"),
        ("contrast_scores.csv", "contrast"),
    ):
        a, b = (atomic.read_csv(os.path.join(d, name)) for d in (reference, workdir))
        assert [x[col] == "" for x in a] == [y[col] == "" for y in b], (
            name
        )  # the same answers scored
        close[name] = [
            sum(x[col] != "" for x in a),
            max((abs(float(x[col]) - float(y[col])) for x, y in zip(a, b) if x[col]), default=0.0),
        ]
    layers = s1["causality"]["layers"]
    out["extract"] = {
        "vectors": max(rel(v1[k], v8[k]) for k in v1),
        "scores": close,
        "kept": [s1["counts"]["kept"], s8["counts"]["kept"]],
        "job": s8["job"],
        "margins": max(
            rel(layers[l]["margins"], s8["causality"]["layers"][l]["margins"]) for l in layers
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
