"""LoRA as a tree rewrite, with the frozen base kept apart; and full finetuning in the same terms.

Shape legend: N blocks, I input width, O output width, r rank.

Training splits the parameters into `trainable` (what the optimiser sees) and `frozen` (the base
weights, never differentiated). `assemble(spec, trainable, frozen)` gives the pytree the one
decoder runs on: for LoRA, each targeted stacked matrix becomes a `LowRank(W, A, B, scale)`
(`pvjax.models.low_rank`), which the decoder's matmul applies as `x @ W + scale (x @ A) @ B`; for
full finetuning, the trainable tree is the parameter tree. `merge` folds the adapters into plain
weights for inference and export: after training the model is an ordinary parameter tree.

The adapters are stacked over all N blocks so the layer scan slices them like any other weight;
blocks left out by `layers` get scale 0 (their adapters stay at their initial values and are not
exported). Initialisation follows peft: A ~ U(-1/sqrt(I), 1/sqrt(I)) (kaiming-uniform with a=sqrt
5), B = 0, so training starts exactly at the base model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pvjax.errors import UserError
from pvjax.models.low_rank import LowRank

# Target name -> (pvjax parameter key, transformers module path inside a block).
TARGETS = {
    "q": ("wq", "self_attn.q_proj"),
    "k": ("wk", "self_attn.k_proj"),
    "v": ("wv", "self_attn.v_proj"),
    "o": ("wo", "self_attn.o_proj"),
    "gate": ("w_gate", "mlp.gate_proj"),
    "up": ("w_up", "mlp.up_proj"),
    "down": ("w_down", "mlp.down_proj"),
}


class LoraError(UserError, ValueError):
    """A LoRA setting that does not fit the model or does not make sense."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt: `rank`, `alpha`, rsLoRA scaling (alpha / sqrt(rank) instead of alpha / rank),
    `targets` among q/k/v/o/gate/up/down, and `layers`, block indices 0..N-1 (peft's
    `layers_to_transform`; empty = every block). `full` means full finetuning, no adapters."""

    rank: int = 32
    alpha: float = 64.0
    rslora: bool = False
    targets: tuple[str, ...] = tuple(TARGETS)
    layers: tuple[int, ...] = ()
    full: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check(self, n_layers: int) -> "LoraSpec":
        if self.full:
            return self
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"lora.rank must be a positive integer, got {self.rank!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise LoraError(
                f"lora.targets {list(self.targets)} must be a non-empty subset of {list(TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise LoraError(f"lora.targets {list(self.targets)} names a target twice")
        for l in self.layers:
            if not isinstance(l, (int, np.integer)) or not 0 <= l < n_layers:
                raise LoraError(f"lora.layers: {l!r} is not a block index 0..{n_layers - 1}")
        return self

    def layer_mask(self, n_layers: int) -> np.ndarray:
        m = np.ones(n_layers, np.float32)
        if self.layers:
            m[:] = 0
            m[list(self.layers)] = 1
        return m

    def selected_layers(self, n_layers: int) -> list[int]:
        return list(self.layers) if self.layers else list(range(n_layers))


def init(spec: LoraSpec, base, key) -> dict:
    """Adapters `{key: {"a": [N, I, r], "b": [N, r, O]}}` in float32 (the master weights)."""
    out = {}
    n_blocks = base["layers"]["wq"].shape[0]
    # an expert model (Qwen3-MoE) routes its MLP to experts in every block or in some: there the
    # MLP is not one matrix per block, and LoRA does not adapt experts here
    routed = [
        t
        for t in spec.targets
        if TARGETS[t][0] not in base["layers"] or base["layers"][TARGETS[t][0]].shape[0] != n_blocks
    ]
    if routed:
        raise LoraError(
            f"lora.targets {routed}: this model's blocks route their MLP to experts (all blocks or "
            "some), which LoRA does not adapt here; use the attention targets (q, k, v, o)"
        )
    for i, t in enumerate(spec.targets):
        w = base["layers"][TARGETS[t][0]]
        N, I, O = w.shape
        bound = 1.0 / math.sqrt(I)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (N, I, spec.rank), jnp.float32, -bound, bound
        )
        out[TARGETS[t][0]] = {"a": a, "b": jnp.zeros((N, spec.rank, O), jnp.float32)}
    return out


def split(spec: LoraSpec, params, key):
    """`(trainable, frozen)` for a model's parameters. Full finetuning trains every leaf in
    float32 (master weights); LoRA freezes the base as it is and trains fresh adapters."""
    if spec.full:
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params), {}
    return init(spec, params, key), params


def assemble(spec: LoraSpec, trainable, frozen, dtype=None):
    """The decoder's parameter tree. `dtype` (the compute dtype) casts trainable leaves; the frozen
    base is used in the dtype it is stored in."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    if spec.full:
        return jax.tree_util.tree_map(cast, trainable)
    n = frozen["layers"]["wq"].shape[0]
    scale = jnp.asarray(spec.layer_mask(n) * spec.scaling)
    layers = dict(frozen["layers"])
    for k, ab in trainable.items():
        layers[k] = LowRank(layers[k], cast(ab["a"]), cast(ab["b"]), scale)
    return {**frozen, "layers": layers}


def merge(spec: LoraSpec, trainable, frozen, dtype=None):
    """Plain parameters with the adapters folded in (`W + scale A B`, float32 sums), in `dtype`
    (default: the base's dtype; for full finetuning, the trainable tree's float32)."""
    params = assemble(spec, trainable, frozen)
    params = jax.tree_util.tree_map(
        lambda x: x.merged() if isinstance(x, LowRank) else x,
        params,
        is_leaf=lambda x: isinstance(x, LowRank),
    )
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return params


def decay_mask(spec: LoraSpec, trainable):
    """Which leaves AdamW decays: every adapter; in full finetuning the matrices, not the norms or
    biases (transformers' Trainer excludes those too)."""
    if not spec.full:
        return jax.tree_util.tree_map(lambda _: True, trainable)

    def rule(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("norm") or name in ("bq", "bk", "bv"))

    return jax.tree_util.tree_map_with_path(rule, trainable)


def trainable_specs(spec: LoraSpec, trainable, mesh):
    """PartitionSpecs of the trainable tree by `pvjax.parallel.sharding`'s rule table: full
    finetuning uses the table as is; an adapter A shards its input axis and B its output axis like
    the base matrix."""
    from jax.sharding import PartitionSpec as P

    from pvjax.parallel import sharding

    if spec.full:
        return sharding.param_specs(trainable, mesh)
    base = sharding.param_specs(
        {
            "layers": {
                k: jax.ShapeDtypeStruct(ab["a"].shape[:2] + ab["b"].shape[2:], jnp.float32)
                for k, ab in trainable.items()
            }
        },
        mesh,
    )["layers"]
    out = {}
    for k, ab in trainable.items():
        s = tuple(base[k]) + (None,) * (3 - len(tuple(base[k])))
        out[k] = {
            "a": sharding._fit(P(None, s[1], None), ab["a"].shape, mesh),
            "b": sharding._fit(P(None, None, s[2]), ab["b"].shape, mesh),
        }
    return out
