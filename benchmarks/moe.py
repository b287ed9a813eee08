"""One MoE layer's decode step at Qwen3-30B-A3B's shapes (hidden 2048, expert width 768, 128
experts, 8 active per token), random bf16 weights: time per step against the bytes the routed
experts read, as a share of the memory limit.

    python benchmarks/moe.py                 # batch 1 and 16
    python benchmarks/moe.py --batch 1 4 16 --compare   # each expert path alone too

The step is `pvjax.models.moe.moe_mlp` on one new token per row, as decoding runs it: the
router, then the routed experts the way `moe.expert_path` picks: on CPU with float32 weights a scan
over the token-expert pairs (tiles of pairs sorted by expert from two pairs per expert up); else
gathered `[tokens, k, D, I]` when tokens x k < experts, grouped by expert with `ragged_dot`
otherwise. `--compare` also times each expert path on its own, so the printout says what the
others would cost at that batch.

Bytes: a step must read at least the distinct routed experts' three matrices (`distinct x 3 D I`
elements), plus the router; the gathered path reads `tokens x k` expert matrices (an expert two
tokens pick is read twice). The limit is that minimum over the memory bandwidth measured here
(a large array read on CPU, `common.measured_ceilings`' copy elsewhere). The router's weights are
random, so the routing is near uniform; a trained router's skew lowers the distinct count at
batch 16. Figures on a shared CPU are indicative: print `uptime` beside them.

Memory: the layer's experts are 1.2 GB in bf16 (2.4 GB in float32); on CPU the process peaked at
4.6 GB (batch 1) and 7.7 GB (batch 1 and 16 with `--compare`), so run it alone there. On CPU
XLA's gather copies the routed experts element by element and its bf16 dots convert their
operands, so the figures there say little about a GPU's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
import numpy as np

from pvjax.models.block import matmul
from pvjax.models.config import ModelConfig
from pvjax.models.moe import (
    expert_path,
    experts_blocked,
    experts_gathered,
    experts_grouped,
    experts_paired,
    moe_mlp,
    route,
)

# Qwen3-30B-A3B's MoE shapes (config.json of the public checkpoint): the one layer timed here.
QWEN3_30B_A3B = ModelConfig(
    architecture="qwen3_moe",
    vocab_size=151_936,
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=48,
    num_heads=32,
    num_kv_heads=4,
    head_dim=128,
    num_experts=128,
    experts_per_token=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    name="random-qwen3-30b-a3b-shape",
)


def layer_params(cfg: ModelConfig, dtype, key):
    """One layer's router and experts, each drawn in its own dtype by its own program (a float32
    draw of all three expert tensors at once would peak at 2.4 GB beside them)."""
    D, X, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    ks = jax.random.split(key, 4)
    shapes = {"router": (D, X), "w_gate_e": (X, D, I), "w_up_e": (X, D, I), "w_down_e": (X, I, D)}
    draw = jax.jit(lambda k, shape: 0.02 * jax.random.normal(k, shape, dtype), static_argnums=1)
    return {name: draw(k, shape) for k, (name, shape) in zip(ks, shapes.items())}


def read_bandwidth() -> float:
    """Bytes/s: on CPU a 512 MB array summed (reads only, as a decode step mostly does);
    elsewhere the copy rate of `common.measured_ceilings` (reads plus writes)."""
    if jax.default_backend() != "cpu":
        from common import measured_ceilings

        return measured_ceilings()[1] * 1e12
    a = jnp.ones(128 * 2**20, jnp.float32)
    f = jax.jit(jnp.sum)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * a.nbytes / (time.perf_counter() - t)


def timed(f, *args, reps: int):
    out = f(*args)  # compiles
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--compare",
        action="store_true",
        help="also time each expert path alone (paired, gathered, grouped)",
    )
    args = p.parse_args()
    cfg = QWEN3_30B_A3B
    dtype = jnp.dtype(args.dtype)
    D, X, I, k = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.experts_per_token
    lp = layer_params(cfg, dtype, jax.random.PRNGKey(0))
    expert_bytes = 3 * D * I * dtype.itemsize
    bw = read_bandwidth()
    print(
        f"{jax.devices()[0].device_kind}; {args.dtype}; load average "
        f"{os.getloadavg()[0]:.1f}; read bandwidth {bw / 1e9:.1f} GB/s; one expert "
        f"{expert_bytes / 1e6:.1f} MB, the layer's {X} experts {X * expert_bytes / 1e9:.2f} GB"
    )
    step = jax.jit(lambda lp, x: moe_mlp(cfg, lp, x, matmul))
    gathered = jax.jit(lambda lp, x, w, i: experts_gathered(lp, x, w, i))
    grouped = jax.jit(lambda lp, x, w, i: experts_grouped(lp, x, w, i, X))
    paired = jax.jit(lambda lp, x, w, i: experts_paired(lp, x, w, i))
    blocked = jax.jit(lambda lp, x, w, i: experts_blocked(lp, x, w, i, X))
    for B in args.batch:
        x = jax.random.normal(jax.random.PRNGKey(B), (B, 1, D), jnp.float32).astype(dtype)
        _, w, idx = route(cfg, lp["router"], x.reshape(B, D), matmul)
        distinct = len(np.unique(np.asarray(idx)))
        need = distinct * expert_bytes + D * X * dtype.itemsize
        limit = need / bw
        path = expert_path(cfg, B, dtype)
        t_step = timed(step, lp, x, reps=args.reps)
        print(
            f"batch {B}: {B * k} token-expert pairs, {distinct} distinct experts, "
            f"{need / 1e6:.0f} MB to read (limit {limit * 1e3:.2f} ms); decode step ({path}) "
            f"{t_step * 1e3:.2f} ms = {limit / t_step:.1%} of the memory limit",
            flush=True,
        )
        if args.compare:
            t_gather = timed(gathered, lp, x.reshape(B, D), w, idx, reps=args.reps)
            t_group = timed(grouped, lp, x.reshape(B, D), w, idx, reps=args.reps)
            t_pair = timed(paired, lp, x.reshape(B, D), w, idx, reps=args.reps)
            t_tile = timed(blocked, lp, x.reshape(B, D), w, idx, reps=args.reps)
            print(
                f"  experts alone: paired {t_pair * 1e3:.2f} ms ({limit / t_pair:.1%}), "
                f"tiles {t_tile * 1e3:.2f} ms ({limit / t_tile:.1%}), "
                f"gathered {t_gather * 1e3:.2f} ms ({limit / t_gather:.1%}; "
                f"reads {B * k * expert_bytes / 1e6:.0f} MB), grouped {t_group * 1e3:.2f} ms "
                f"({limit / t_group:.1%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
