"""The train step: one jitted function over the ("data", "model") mesh, train state donated.

Shape legend: A micro-batches per step, R rows per micro-batch, W row width, V vocabulary,
L = n_layers + 1 hidden-state rows, D hidden size.

The step runs the one decoder (`pvjax.models.decoder.forward`, scanned) on `lora.assemble(trainable,
frozen)`, with the training-only `TrainingForward` (preventative steering or CAFT as an
`Intervention`, and the projection-penalty probes) passed in as data. Gradients of the A
micro-batches are summed inside the step (`lax.scan`), each micro-batch's loss divided by the
number of assistant tokens of the whole step, so the loss is the mean over the step's assistant
tokens however the step is cut into micro-batches or devices. Parameters follow
`pvjax.parallel.sharding`'s rule table, the batch is split over "data", optimiser moments are laid
out like their parameters, and the state is born sharded and donated to each step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pvjax.capture import Capture
from pvjax.finetune import lora
from pvjax.interventions import Intervention
from pvjax.models import decoder
from pvjax.models.config import ModelConfig
from pvjax.models.layout import Scanned
from pvjax.parallel import sharding


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimiser updates done
    trainable: Any
    opt_state: Any
    rng: (
        jax.Array
    )  # [2] uint32, advanced every step (for stochastic training parts; resumes exactly)


@struct.dataclass
class TrainingForward:
    """What the training forward adds to the model, as data (never part of the exported model).

    intervention: preventative steering (`steer`: + coef v at the chosen rows) or CAFT (`ablate`:
    the unit v projected out), or None.
    penalty_probes `[L, 1, D]`: unit v / (number of penalised rows) at the penalised rows, zero
    elsewhere, or None; the loss gains `penalty_weight * mean over assistant tokens of h . probe`.
    """

    intervention: Intervention | None = None
    penalty_probes: jax.Array | None = None
    penalty_weight: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static half of the step (hashable): what changes the compiled program."""

    cfg: ModelConfig
    lora: lora.LoraSpec
    compute_dtype: str = "float32"
    remat: bool = True


def token_nll(logits_BTV, tokens_BT, loss_mask_BT):
    """Sum of `-log p(token t | tokens < t)` over tokens whose mask is 1, float32."""
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    target = tokens_BT[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * loss_mask_BT[:, 1:])


def micro_loss(settings: StepSettings, trainable, frozen, mb, fwd: TrainingForward):
    """`(nll_sum, projection_sum)` of one micro-batch `{tokens, segment_ids, positions, loss_mask}`
    `[R, W]`: the summed next-token loss over assistant tokens, and the summed penalty projection
    over the same tokens (0 without penalty probes)."""
    params = lora.assemble(settings.lora, trainable, frozen, jnp.dtype(settings.compute_dtype))
    seg = mb["segment_ids"]
    cap = Capture(probes=fwd.penalty_probes, logits="all", hidden=False)
    out = decoder.forward(
        params,
        settings.cfg,
        Scanned(remat=settings.remat),
        mb["tokens"],
        mb["positions"],
        seg > 0,
        intervention=fwd.intervention,
        capture=cap,
        segment_ids_BT=seg,
    )
    nll = token_nll(out.logits, mb["tokens"], mb["loss_mask"])
    proj = jnp.zeros((), jnp.float32)
    if fwd.penalty_probes is not None:
        proj = jnp.sum(out.projections[..., 0].sum(0) * mb["loss_mask"])
    return nll, proj


def objective(settings, trainable, frozen, mb, fwd, n_total):
    """The differentiated quantity of one micro-batch: its share of the step's mean loss."""
    nll, proj = micro_loss(settings, trainable, frozen, mb, fwd)
    return (nll + fwd.penalty_weight * proj) / n_total, (nll, proj)


def train_step(
    settings: StepSettings, optimizer, state: TrainState, frozen, batch, fwd: TrainingForward
):
    """One optimiser update from `batch` `{name: [A, R, W]}`. Returns the new state and metrics:
    `loss` (mean next-token loss over assistant tokens), `projection` (mean penalty projection),
    `grad_norm` (before clipping), `tokens` (assistant tokens in the step)."""
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"][:, :, 1:]), 1.0)
    grad_fn = jax.grad(objective, argnums=1, has_aux=True)

    def body(acc, mb):
        g, (nll, proj) = grad_fn(settings, state.trainable, frozen, mb, fwd, n_total)
        return jax.tree_util.tree_map(jnp.add, acc, g), (nll, proj)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    grads, (nll, proj) = jax.lax.scan(body, zeros, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    rng, _ = jax.random.split(state.rng)
    metrics = {
        "loss": jnp.sum(nll) / n_total,
        "projection": jnp.sum(proj) / n_total,
        "grad_norm": _norm(grads),
        "tokens": n_total,
    }
    return TrainState(state.step + 1, trainable, opt_state, rng), metrics


def _norm(tree):
    return jnp.sqrt(
        sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))
    )


def eval_sums(settings: StepSettings, trainable, frozen, mb, probes):
    """Evaluation of the model as inference sees it (no steering): `(nll_sum, tokens, proj_sum)` of
    one micro-batch, projections onto `probes` `[L, 1, D]` summed over assistant tokens."""
    nll, proj = micro_loss(settings, trainable, frozen, mb, TrainingForward(penalty_probes=probes))
    return nll, jnp.sum(mb["loss_mask"][:, 1:]), proj


def make_optimizer(
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_mask=None,
):
    """AdamW with linear warmup from 0, then linear (transformers' `linear`) or cosine decay to 0
    at `total_steps`, after clipping the global gradient norm to `max_grad_norm` (0 = no clip)."""
    warmup = max(int(warmup_steps), 0)
    rest = max(total_steps - warmup, 1)
    decay = (
        optax.linear_schedule(lr, 0.0, rest)
        if schedule == "linear"
        else optax.cosine_decay_schedule(lr, rest)
    )
    sched = (
        optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
        if warmup
        else decay
    )
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    parts.append(
        optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), sched


def state_shardings(settings: StepSettings, optimizer, trainable_abstract, mesh):
    """NamedShardings of a `TrainState`: trainable leaves by the rule table, optimiser moments like
    their parameters, counters and the PRNG key replicated."""
    specs = lora.trainable_specs(settings.lora, trainable_abstract, mesh)
    opt_abstract = jax.eval_shape(optimizer.init, trainable_abstract)
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        opt_abstract,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    named = lambda s: NamedSharding(mesh, s)
    tree = TrainState(P(), specs, opt_specs, P())
    return jax.tree_util.tree_map(named, tree, is_leaf=lambda x: isinstance(x, P))


def init_state(settings: StepSettings, optimizer, params, key, mesh, *, opt_key=None):
    """`(state, frozen)` born sharded: the frozen base placed by the rule table, the trainable tree
    and its optimiser state created inside one jit with their output shardings. With `opt_key`
    (the optimiser's hyperparameters), the program of an equal earlier run is reused."""
    spec = settings.lora
    frozen = {} if spec.full else sharding.shard_params(params, mesh)
    trainable_abstract = jax.eval_shape(lambda p, k: lora.split(spec, p, k)[0], params, key)
    shardings = state_shardings(settings, optimizer, trainable_abstract, mesh)

    def make(p, k):
        trainable = lora.split(spec, p, k)[0]
        return TrainState(
            jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), jax.random.fold_in(k, 1)
        )

    cache_key = None if opt_key is None else ("init", spec, opt_key, mesh, _layout_key(params))
    fn = _COMPILED.get(cache_key) or jax.jit(make, out_shardings=shardings)
    if cache_key is not None:
        _COMPILED[cache_key] = fn
    return fn(params, key), frozen, shardings


# Compiled steps by (settings, optimiser key, mesh, layouts): runs that differ only in data (the
# steering vector, coefficient, layers; the dataset) reuse one program, as the design promises.
_COMPILED: dict = {}


def _layout_key(tree):
    return tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree_util.tree_leaves(tree))


def compile_step(settings: StepSettings, optimizer, mesh, shardings, frozen, *, key=None):
    """The jitted step `(state, frozen, batch, fwd) -> (state, metrics)`, state donated. With
    `key` (the optimiser's hyperparameters), an equal earlier compilation is reused."""
    cache_key = None if key is None else ("step", settings, key, mesh, _layout_key(frozen))
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    repl = NamedSharding(mesh, P())
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)

    def step(state, frozen, batch, fwd):
        return train_step(settings, optimizer, state, frozen, batch, fwd)

    fn = jax.jit(
        step,
        donate_argnums=0,
        in_shardings=(shardings, frozen_sh, batch_sharding(mesh), repl),
        out_shardings=(shardings, repl),
    )
    if cache_key is not None:
        _COMPILED[cache_key] = fn
    return fn


def compile_eval(settings: StepSettings, mesh, shardings, frozen):
    cache_key = ("eval", settings, mesh, _layout_key(frozen), str(shardings.trainable))
    if cache_key not in _COMPILED:
        repl = NamedSharding(mesh, P())
        frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
        row = NamedSharding(mesh, P("data", None))
        _COMPILED[cache_key] = jax.jit(
            lambda t, f, mb, p: eval_sums(settings, t, f, mb, p),
            in_shardings=(shardings.trainable, frozen_sh, row, repl),
            out_shardings=repl,
        )
    return _COMPILED[cache_key]


def batch_sharding(mesh):
    return NamedSharding(mesh, P(None, "data", None))


def place(batch: dict[str, np.ndarray], sharding_) -> dict[str, jax.Array]:
    """A host batch (the same global batch in every process) as global arrays: each process
    places only the shards its own devices hold, so this is the multi-host feed too."""

    def one(x):
        return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])

    return {k: one(v) for k, v in batch.items()}
