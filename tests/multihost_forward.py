"""One process of a two-process JAX job on loopback (4 fake CPU devices each, gloo collectives).

    python tests/multihost_forward.py MODEL_DIR PORT PROCESS_ID OUT.npy

Both processes build one ("data", "model") mesh over all 8 devices, shard parameters and batch with
pvjax.parallel.sharding, run the forward, and process 0 saves the gathered logits.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np
from jax.experimental import multihost_utils

import pvjax
from pvjax.parallel import sharding


def main(folder, port, pid, out):
    sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()
    model = pvjax.load(folder)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    mesh = sharding.make_mesh(model=2)
    sharded = sharding.shard_model(model, mesh)
    out_logits = pvjax.forward(sharded, sharding.shard_batch(ids, mesh)).logits
    gathered = multihost_utils.process_allgather(out_logits, tiled=True)
    if int(pid) == 0:
        np.save(out, np.asarray(gathered))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
