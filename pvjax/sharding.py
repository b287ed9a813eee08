"""One mesh, one table: how parameters and batches are laid out over devices.

The same code runs on 1 CPU, 8 GPUs or a TPU pod: build a `Mesh(("data", "model"))`, place the
parameters with `shard_params` (tensor-parallel over "model" along head / MLP / vocab dims) and the
batch with `shard_batch` (over "data"); jit propagates the layout through the forward, and results
equal a single device's up to float summation order.

Multi-host (several processes, e.g. a TPU pod slice or GPUs over several nodes): call
`initialize_distributed(...)` first in every process, then build the mesh from `jax.devices()`,
which then lists every process's devices; each process feeds its shard of the global batch.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (path regex, spec). Paths are "/"-joined pytree keys; per-layer leaves carry the stacked N axis.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed$", P("model", None)),
    (r"^lm_head$", P(None, "model")),
    (r"^layers/(wq|wk|wv|w_gate|w_up)$", P(None, None, "model")),
    (r"^layers/(bq|bk|bv)$", P(None, "model")),
    (r"^layers/(wo|w_down)$", P(None, "model", None)),
    (r".*", P()),
)


def make_mesh(model: int = 1, data: int | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all); `data` defaults to what is left."""
    devices = list(jax.devices() if devices is None else devices)
    data = data or len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} does not cover {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def parse_mesh(text: str) -> tuple[int, int]:
    """`(data, model)` from the CLI's `data=D,model=M` (either part may be left out: 1 model,
    data = what is left). Raises `UsageError` naming the problem."""
    from pvjax.errors import UsageError

    sizes = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if key not in ("data", "model") or not eq or not value.strip().isdigit() or int(value) < 1 \
                or key in sizes:
            raise UsageError(f"--mesh {text!r}: expected data=D,model=M with positive integers")
        sizes[key] = int(value)
    return sizes.get("data", 0), sizes.get("model", 1)


def mesh_from_flag(text: str) -> Mesh:
    """The mesh of `--mesh data=D,model=M`, refused when it does not cover this job's devices."""
    from pvjax.errors import UsageError

    data, model = parse_mesh(text)
    n = len(jax.devices())
    if (data or n // model) * model != n or n % model:
        raise UsageError(f"--mesh {text!r} does not cover the {n} devices here "
                         f"(data x model must equal {n})")
    return make_mesh(model=model, data=data or None)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def _fit(spec: P, shape, axis_sizes) -> P:
    """Drop an axis from the spec where the dim does not divide evenly (e.g. 9 heads on 4 devices).
    `axis_sizes` is a mesh or a map from axis name to size (planning without devices)."""
    if isinstance(axis_sizes, Mesh):
        axis_sizes = axis_sizes.shape
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(axis if axis is None or dim % axis_sizes[axis] == 0 else None)
    return P(*out)


def spec_for(path: str, shape, axis_sizes) -> P:
    """The `PartitionSpec` of the parameter at `path` ("layers/wq", ...) with `shape`, on a mesh of
    `axis_sizes` (`mesh.shape`, or a plain dict for planning without devices)."""
    for pattern, s in PARAM_RULES:
        if re.match(pattern, path):
            return _fit(s, shape, axis_sizes)
    raise AssertionError(path)


def param_specs(params, mesh: Mesh):
    return jax.tree_util.tree_map_with_path(lambda keys, leaf: spec_for(_path(keys), leaf.shape, mesh.shape),
                                            params)


def shard_params(params, mesh: Mesh):
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def shard_batch(x, mesh: Mesh):
    """Place a `[B, ...]` array with its batch split over "data" (replicated if B does not divide)."""
    spec = _fit(P("data"), np.shape(x), mesh.shape)
    return jax.device_put(x, NamedSharding(mesh, spec))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kw):
    """Join a multi-process JAX job; call once per process before touching any device."""
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kw)


def shard_model(model, mesh: Mesh):
    """The same model with its parameters laid out over `mesh`."""
    return model.replace(params=shard_params(model.params, mesh))
