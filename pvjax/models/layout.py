"""How the decoder's block weights are laid out, said by the caller as a type: `Scanned`, `Sliced`
or `PerLayer`.

Shape legend: N blocks.

The decoder never guesses the layout from the parameter pytree: whoever made the parameters knows
it and passes the matching layout (as penzai picks a sampling mode by the type it is handed). The
layout runs the blocks (`run_blocks`), picks a block's weights, writes a block's slice of the KV
cache (`write`) and says whether q/k/v and gate/up come fused and whether the matrices are packed
for the CPU kernels. Layouts are frozen and hashable: static arguments of a jitted function, so
each layout is its own compiled program, as each pytree structure was before.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pvjax.kernels import PackedWeight
from pvjax.models.config import ModelConfig
from pvjax.models.moe import blocks_holding


def _put(c, x, idx):
    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), idx)


class _Stacked:
    """Shared by the layouts over stacked weights: `params["layers"]` maps each name to `[N, ...]`,
    and the KV cache is stacked alike (`[N, ...]` per key and value)."""

    fused = False
    packed = False
    stacked_cache = True

    def write(self, cache_N, i, x, idx):
        """`(block i's updated cache, the whole updated cache)`, `x` written at `idx` of block i."""
        new = _put(cache_N, x[None], (i,) + idx)
        return new[i], new


class _Loop:
    def run_blocks(self, body, carry, layers, xs, n_blocks: int):
        """`body(carry, (weights, i, *xs[i]))` for each block in a Python loop, `i` a Python int;
        the per-block outputs stacked on a leading N axis (as `lax.scan` returns them)."""
        outs = []
        for n in range(n_blocks):
            rest = jax.tree_util.tree_map(lambda x: x[n], xs)
            carry, out = body(carry, (self.layer(layers, n), n) + rest)
            outs.append(out)
        return carry, jax.tree_util.tree_map(lambda *x: jnp.stack(x), *outs)


@dataclasses.dataclass(frozen=True)
class Scanned(_Stacked):
    """Stacked weights, the blocks under `lax.scan`: a model of any depth compiles one block, and
    the per-row captures come out stacked. `remat` recomputes each block in the backward pass
    (`jax.checkpoint` on the block): training keeps one `[B, T, D]` residual per block instead of
    every intermediate, the memory that lets long packed rows fit."""

    remat: bool = False

    def run_blocks(self, body, carry, layers, xs, n_blocks: int):
        """`lax.scan` of `body(carry, (weights, i, *xs))` over the blocks, `i` traced."""
        # The scan already stops CSE across iterations, hence prevent_cse=False (jax's advice).
        step = jax.checkpoint(body, prevent_cse=False) if self.remat else body
        return jax.lax.scan(step, carry, (layers, jnp.arange(n_blocks)) + xs)


@dataclasses.dataclass(frozen=True)
class Sliced(_Loop, _Stacked):
    """Stacked weights, the blocks unrolled in Python, each reading its slice of every weight: the
    same numbers as `Scanned`, without a loop in the program (`pvjax.forward(scan=False)`)."""

    def layer(self, layers, n: int):
        return {k: v[n] for k, v in layers.items()}


@dataclasses.dataclass(frozen=True)
class PerLayer(_Loop):
    """`params["layers"]` a tuple of N per-layer dicts, as `unstack_layers(params, cfg, packed,
    fused)` makes them; the blocks unrolled; the KV cache a tuple of N per-layer buffers. `fused`:
    q/k/v and gate/up come as single matrices (`wqkv`, `w_gate_up`). `packed`: every matrix and the
    output head (`params["head"]`) are `PackedWeight`s for the CPU kernels, which then also serve
    the one-token attention."""

    fused: bool = True
    packed: bool = False
    stacked_cache = False

    def layer(self, layers, n: int):
        return layers[n]

    def write(self, cache_N, i: int, x, idx):
        """`(block i's updated cache, the whole updated cache)`, `x` written at `idx` of block i."""
        layers = list(cache_N)
        layers[i] = _put(cache_N[i], x, idx)
        return layers[i], tuple(layers)


Layout = Scanned | Sliced | PerLayer


def unstack_layers(params, cfg: ModelConfig, pack: bool = False, fuse: bool = True):
    """The same weights as N per-layer dicts, for `PerLayer(fused=fuse, packed=pack)`: q/k/v and
    gate/up fused into single matrices (unless `fuse=False`: a tensor-parallel mesh splits each
    over its heads, which a fused matrix would mix). With `pack`, every matrix (and the output
    head, as `head`) becomes a `PackedWeight` for the CPU decode kernel (`pvjax.kernels`).

    XLA copies the weight slice that `lax.scan` feeds each step, which doubles the memory traffic
    of small-batch decoding (measured on CPU, 43 ms vs 23 ms per step for SmolLM2's MLPs, and on
    an H100, 17.1 vs 7.45 ms per 7B batch-64 step); an unrolled program over separate arrays
    reads each weight once. Costs one extra copy of the weights while both are alive.
    """
    layers = params["layers"]
    held = {k: blocks_holding(cfg, k) for k in layers}  # an expert model's MLPs: their blocks only
    out = []
    for i in range(cfg.num_layers):
        lp = {k: v[held[k].index(i)] for k, v in layers.items() if i in held[k]}
        if not fuse:
            out.append(lp)
            continue
        lp["wqkv"] = jnp.concatenate([lp.pop("wq"), lp.pop("wk"), lp.pop("wv")], axis=-1)
        if cfg.qkv_bias:
            lp["bqkv"] = jnp.concatenate([lp.pop("bq"), lp.pop("bk"), lp.pop("bv")], axis=-1)
        if "w_gate" in lp:  # a dense MLP (expert weights stay per expert)
            lp["w_gate_up"] = jnp.concatenate([lp.pop("w_gate"), lp.pop("w_up")], axis=-1)
        if pack:
            lp = {k: PackedWeight.pack(v) if v.ndim == 2 else v for k, v in lp.items()}
        out.append(lp)
    extra = {}
    if pack:
        extra["head"] = PackedWeight.pack(
            params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        )
    return {**params, **extra, "layers": tuple(out)}
