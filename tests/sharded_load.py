"""Run as a script with 8 fake host devices: `pvjax.load(..., mesh=)` on data=2 x model=4 places
each weight's shards straight from host memory. Prints one JSON line: per weight, its shard sizes
against the whole, and the largest logit difference from the unsharded load.

    python tests/sharded_load.py MODEL_DIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json

import jax
import numpy as np

import pvjax
from pvjax.parallel import sharding


def main(folder):
    mesh = sharding.make_mesh(model=4, data=2)
    plain, placed = pvjax.load(folder), pvjax.load(folder, mesh=mesh)
    weights = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(placed.params):
        name = sharding._path(keys)
        spec = sharding.spec_for(name, leaf.shape, mesh.shape)
        weights[name] = {
            "size": int(leaf.size),
            "model_split": "model" in jax.tree_util.tree_leaves(tuple(spec)),
            "shard_sizes": sorted({int(s.data.size) for s in leaf.addressable_shards}),
            "devices": len(leaf.sharding.device_set),
            "spec": str(leaf.sharding.spec),
        }
    ids = np.random.default_rng(0).integers(0, plain.config.vocab_size, (2, 12)).astype(np.int32)
    a = np.asarray(pvjax.forward(plain, ids).logits)
    b = np.asarray(pvjax.forward(placed, sharding.shard_batch(ids, mesh)).logits)
    print(
        json.dumps(
            {
                "weights": weights,
                "logits": float(np.abs(a - b).max()),
                "scale": float(np.abs(a).max()),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
