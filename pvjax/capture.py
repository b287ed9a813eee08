"""What a forward pass keeps: logits, full hidden states, pooled statistics, per-token projections.

Shape legend: L = n_layers + 1 hidden-state rows, B batch, T positions, D hidden size, K poolings or
probe vectors, V vocabulary.

Pooling and projection happen inside the layer scan, so asking only for them keeps activation memory
at O(L·B·K·D) instead of O(L·B·T·D): the full `[L, B, T, D]` tensor is never materialised.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

POOLINGS = ("response_avg", "prompt_avg", "prompt_last")


@struct.dataclass
class Capture:
    """A capture spec. Flags are static (they change the program); weights and probes are data.

    logits: "all" positions, "last" position only, "tail:N" the last N positions (scoring
        left-padded answers: the head, a V x D matmul per position, runs only where it is read), or
        "none".
    hidden: return `hidden_states [L, B, T, D]`.
    pool_weights: `[B, K, T]`; returns `pooled[L, B, K, D] = sum_t w[b,k,t] * h[l,b,t]`.
    probes: `[L, K, D]` or `[K, D]`; returns `projections[L, B, T, K] = h[l,b,t] . probe[l,k]`.
    router: an expert model's routing (`Routing`), stacked over its routed blocks in block order
        as transformers' `output_router_logits` lists them (a dense model returns None).
    """

    pool_weights: jax.Array | None = None
    probes: jax.Array | None = None
    logits: str = struct.field(pytree_node=False, default="all")
    hidden: bool = struct.field(pytree_node=False, default=True)
    router: bool = struct.field(pytree_node=False, default=False)


def activations_only(pool_weights=None, probes=None, hidden=False) -> Capture:
    """A spec that skips the LM head: the cheap path for extraction and monitoring."""
    return Capture(pool_weights=pool_weights, probes=probes, logits="none", hidden=hidden)


class Routing(NamedTuple):
    """What the routers of an expert model chose, one row per routed block (R of them, in block
    order; a dense block of a mixed model has none). `logits` are the router's raw scores over all
    X experts, as transformers' `output_router_logits` returns them (`[R, B*T, X]` there, the
    same numbers); `experts` and `weights` are the top-k the block ran and the weights its outputs
    were summed with (after `norm_topk_prob`), so expert usage needs no second top-k.
    Padded positions hold what the router made of the pad token's residual."""

    logits: jax.Array  # [R, B, T, X] float32
    experts: jax.Array  # [R, B, T, k] int32
    weights: jax.Array  # [R, B, T, k], the compute dtype


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] or [B, 1, V], float32
    hidden_states: jax.Array | None  # [L, B, T, D]
    pooled: jax.Array | None  # [L, B, K, D], float32
    projections: jax.Array | None  # [L, B, T, K], float32
    cache: object | None = None
    gate: jax.Array | None = None  # [B] float32: a conditional intervention's gate (1 steered)
    router: Routing | None = None  # with `Capture(router=True)` on an expert model


def pooling_weights(attention_mask_BT, prompt_end) -> jax.Array:
    """Weights `[B, 3, T]` for the three poolings of `POOLINGS`, in that order.

    `prompt_end` is the column where each row's response starts (left padding puts it at the same
    column for every row). Response mean: real tokens at or after it; prompt mean: real tokens
    before it; prompt last: the token just before it. A row with no response tokens gets a zero
    response weight, so its response mean is 0 rather than NaN; callers count such rows themselves.
    """
    m = jnp.asarray(attention_mask_BT, jnp.float32)
    T = m.shape[1]
    end = jnp.broadcast_to(jnp.asarray(prompt_end).reshape(-1, 1), (m.shape[0], 1))
    col = jnp.arange(T)[None, :]
    resp = m * (col >= end)
    prompt = m * (col < end)
    last = m * (col == end - 1)

    def normalise(w):
        return w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)

    return jnp.stack([normalise(resp), normalise(prompt), last], axis=1)


def row_capture(h_BTD, capture: Capture, probes_KD):
    """What the scan emits for one hidden-state row."""
    out = {}
    if capture.hidden:
        out["hidden"] = h_BTD
    if capture.pool_weights is not None:
        out["pooled"] = jnp.einsum(
            "bkt,btd->bkd", capture.pool_weights.astype(jnp.float32), h_BTD.astype(jnp.float32)
        )
    if probes_KD is not None:
        out["projections"] = jnp.einsum(
            "btd,kd->btk", h_BTD.astype(jnp.float32), probes_KD.astype(jnp.float32)
        )
    return out
