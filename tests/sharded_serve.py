"""Run as a script with 8 fake host devices: `pvjax serve` on a data=2 x model=4 mesh answers
steered requests, sent together, with the greedy texts of the single-device library
(`generate`). Prints one JSON line."""

import os
import sys

# LLVM optimisation off: compiling is this script's cost, and both sides compile alike.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
)

import concurrent.futures as cf
import dataclasses
import json

import httpx
import jax
import numpy as np
from loopback import serving

import pvjax
from pvjax.engine import rows
from pvjax.engine import terms as T
from pvjax.engine.generate import SamplingParams, generate
from pvjax.parallel import sharding
from pvjax.serve.app import build_app
from pvjax.serve.service import ServeSettings, Service
from pvjax.serve.terms import Catalog

NEW = 8
PROMPTS = ["The capital of France is", "Once upon a time", "Rain falls on the"]


def main(folder):
    assert len(jax.devices()) == 8, jax.devices()
    model = pvjax.load(folder)
    L, D = model.n_layers + 1, model.hidden_size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((L, D)).astype(np.float32)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    cases = [  # (prompt, terms): addition, rescale, rotation, a condition true and one false
        (PROMPTS[0], [{"vector": "a", "layer": 1, "coef": 6.0}]),
        (PROMPTS[1], [{"vector": "a", "layer": 1, "coef": 6.0, "mode": "rescale"}]),
        (PROMPTS[2], [{"vector": "a", "layers": [1, 2], "angle": 1.0}]),
        (PROMPTS[0], [{"vector": "a", "layer": 2, "coef": -6.0, "when": _when(-1e6)}]),
        (PROMPTS[1], [{"vector": "a", "layer": 2, "coef": -6.0, "when": _when(1e6)}]),
        (PROMPTS[2], []),
    ]
    mesh = sharding.make_mesh(model=4, data=2)
    settings = ServeSettings(
        model_name="tiny", max_batch=6, max_prompt=16, max_new=NEW, prompt_widths=(16,), mesh=mesh
    )
    service = Service(model, Catalog({"a": a}, {}), settings)
    with serving(service, build_app(service)) as url:
        compiles = service.scheduler.compiles_since_ready()

        def ask(case):
            body = {"model": "tiny", "prompt": case[0], "max_tokens": NEW, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json={**body, "steer": case[1]}, timeout=600)
            assert r.status_code == 200, r.text
            return r.json()

        with cf.ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(ask, cases))
        compiles = service.scheduler.compiles_since_ready() - compiles
        wq = service.engine.params["layers"][0]["wq"].sharding
    arrayed = [[_arrayed(t, a) for t in terms] for _, terms in cases]
    iv = T.build_intervention(arrayed, model)
    same = []
    for i, (prompt, _) in enumerate(cases):
        want = generate(
            model,
            [prompt],
            chat=False,
            intervention=rows.take(iv, [i]),
            positions="response",
            sampling=SamplingParams(max_new_tokens=NEW),
        )
        same.append(got[i]["choices"][0]["text"] == want.texts[0])
    held = [got[i]["pvjax"]["steer"][0]["when"]["held"] for i in (3, 4)]
    print(
        json.dumps(
            {
                "same": same,
                "held": held,
                "compiles_after_warmup": compiles,
                "rows": service.engine.B,
                "wq_spec": str(wq.spec),
                "wq_devices": len(wq.device_set),
                "cache_spec": str(
                    jax.tree_util.tree_leaves(service.engine.slots.cache.k)[0].sharding.spec
                ),
            }
        )
    )


def _when(threshold):
    return {"vector": "a", "layer": 1, "threshold": threshold}


def _arrayed(t, a):
    t = T.from_dict({**t, "vector": a})
    if t.when is not None:
        t = dataclasses.replace(t, when=dataclasses.replace(t.when, vector=a))
    return t


if __name__ == "__main__":
    main(sys.argv[1])
