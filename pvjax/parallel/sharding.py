"""One mesh, one table: how parameters and batches are laid out over devices.

The same code runs on 1 CPU, 8 GPUs or a TPU pod: build a `Mesh(("data", "model"))`, place the
parameters with `shard_params` (tensor-parallel over "model" along head / MLP / vocab dims) and the
batch with `shard_batch` (over "data"); jit propagates the layout through the forward, and results
equal a single device's up to float summation order.

Multi-host (several processes, e.g. a TPU pod slice or GPUs over several nodes): call
`initialize_distributed(...)` first in every process, then build the mesh from `jax.devices()`,
which then lists every process's devices; each process feeds its shard of the global batch.

The pipelines (`pooled_activations`, the causality scores, the local judge, extraction) take
`mesh=`: their weights are placed once per (model, mesh) by `placed_params`, their rows padded to
a multiple of the data axis (`pad_batch`) and split over it (`put_rows`).
"""

from __future__ import annotations

import logging
import re
import weakref

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

# (path regex, spec). Paths are "/"-joined pytree keys; per-layer leaves carry the stacked N axis.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed$", P("model", None)),
    (r"^lm_head$", P(None, "model")),
    (r"^layers/(wq|wk|wv|w_gate|w_up)$", P(None, None, "model")),
    (r"^layers/(bq|bk|bv)$", P(None, "model")),
    (r"^layers/(wo|w_down)$", P(None, "model", None)),
    (r"^layers/(w_gate_e|w_up_e|w_down_e)$", P(None, "model")),  # experts over "model"
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
        if (
            key not in ("data", "model")
            or not eq
            or not value.strip().isdigit()
            or int(value) < 1
            or key in sizes
        ):
            raise UsageError(f"--mesh {text!r}: expected data=D,model=M with positive integers")
        sizes[key] = int(value)
    return sizes.get("data", 0), sizes.get("model", 1)


def mesh_from_flag(text: str) -> Mesh:
    """The mesh of `--mesh data=D,model=M`, refused when it does not cover this job's devices."""
    from pvjax.errors import UsageError

    data, model = parse_mesh(text)
    n = len(jax.devices())
    if (data or n // model) * model != n or n % model:
        raise UsageError(
            f"--mesh {text!r} does not cover the {n} devices here (data x model must equal {n})"
        )
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
    return jax.tree_util.tree_map_with_path(
        lambda keys, leaf: spec_for(_path(keys), leaf.shape, mesh.shape), params
    )


def shard_params(params, mesh: Mesh):
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs
    )


def shard_batch(x, mesh: Mesh):
    """Place a `[B, ...]` array with its batch split over "data" (replicated if B does not
    divide)."""
    spec = _fit(P("data"), np.shape(x), mesh.shape)
    return jax.device_put(x, NamedSharding(mesh, spec))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kw):
    """Join a multi-process JAX job; call once per process before touching any device."""
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kw,
    )


def shard_model(model, mesh: Mesh):
    """The same model with its parameters laid out over `mesh`."""
    return model.replace(params=shard_params(model.params, mesh))


# ---- Pipelines on a mesh: pooled activations, causality, the local judge, extraction. ----

_PLACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {mesh: params}
_NOTED: set = set()  # (model id, path, mesh shape) already logged


def check_mesh(mesh) -> Mesh:
    """`mesh` if it is a ("data", "model") `Mesh`, else an `InputError` saying what to pass."""
    from pvjax.errors import InputError

    if not isinstance(mesh, Mesh):
        raise InputError(
            f"mesh must be a jax.sharding.Mesh (see pvjax.parallel.sharding.make_mesh), "
            f"got a {type(mesh).__name__}"
        )
    if tuple(mesh.axis_names) != ("data", "model"):
        raise InputError(f"mesh axes must be ('data', 'model'), got {tuple(mesh.axis_names)}")
    return mesh


def pad_batch(B: int, mesh: Mesh | None) -> int:
    """`B` rounded up to a multiple of the data axis: the rows a batch of `B` is padded to, so that
    every device holds the same number of rows (the extra rows compute nothing anyone reads)."""
    d = 1 if mesh is None else mesh.shape["data"]
    return -(-B // d) * d


def placed_params(model, mesh: Mesh):
    """`model.params` laid out by the rule table over `mesh`, placed once per (model, mesh) and
    reused by every later call. A weight whose dimension the model axis does not divide (9 heads on
    4 devices) is replicated along that axis; that is logged once per weight and mesh shape."""
    check_mesh(mesh)
    per_model = _PLACED.setdefault(model, {})
    if mesh not in per_model:
        specs = param_specs(model.params, mesh)

        def note(keys, leaf, spec):
            path = _path(keys)
            want = next(s for pattern, s in PARAM_RULES if re.match(pattern, path))
            pad = lambda s: tuple(s) + (None,) * (leaf.ndim - len(tuple(s)))
            key = (model.model_id, path, tuple(mesh.shape.items()))
            if pad(spec) != pad(want) and key not in _NOTED:
                _NOTED.add(key)
                log.info(
                    "%s: %s %s does not divide over mesh %s: replicated along 'model' (%s, not %s)",
                    model.model_id,
                    path,
                    tuple(leaf.shape),
                    dict(mesh.shape),
                    spec,
                    want,
                )
            return jax.device_put(leaf, NamedSharding(mesh, spec))

        per_model[mesh] = jax.tree_util.tree_map_with_path(note, model.params, specs)
    return per_model[mesh]


def on_mesh(model, mesh: Mesh | None):
    """The model with its parameters on `mesh` (`placed_params`), or the model itself without
    one."""
    return model if mesh is None else model.replace(params=placed_params(model, mesh))


def put_rows(x, mesh: Mesh | None):
    """A `[B, ...]` host array split over "data" (B a multiple of it, see `pad_batch`); unchanged
    without a mesh."""
    if mesh is None:
        return x
    return jax.device_put(np.asarray(x), NamedSharding(mesh, P("data")))


def local_mesh(data: int = 1, model: int = 1) -> Mesh | None:
    """The mesh of config keys `mesh.data` x `mesh.model` over this process's devices; None for
    1 x 1 (no mesh: one device, as without the keys). In a multi-process job each process has its
    own mesh over its own devices and the processes split the work between them
    (`pvjax.parallel.multihost`). Refused, naming the counts, when data x model is not the number of
    devices here."""
    from pvjax.errors import UsageError

    if data * model == 1:
        return None
    devices = jax.local_devices()
    if data * model != len(devices):
        raise UsageError(
            f"mesh data={data} x model={model} = {data * model} devices, but this process has "
            f"{len(devices)} ({devices[0].platform}); set mesh.data x mesh.model to "
            f"{len(devices)}, "
            "or 1 x 1 for one device"
        )
    return make_mesh(model=model, data=data, devices=devices)
