"""How much memory a model needs per device on a ("data", "model") mesh, computed from its config.

The numbers follow the layout pvjax actually uses: every parameter is split by the rule table of
`pvjax.parallel.sharding` (an axis is dropped where a dimension does not divide, exactly as
`shard_params` does), the KV cache of generation splits its batch over `data` and its kv heads over
`model` (or replicates them when they do not divide). What is not counted: XLA's temporaries and the
activations of one forward (for generation a few `[B, T, D]` and `[B, T, V]` buffers; small next to
the weights and cache at the batch sizes below), and the runtime's own reserve (on GPUs, leave
10-25% of the card for it).

    python -m pvjax.parallel.memory          # the README's table
    per_device(KNOWN["qwen2.5-7b"], data=1, model=4, batch=64, context=2048)["total_gib"]
"""

from __future__ import annotations

import math

from pvjax.loading.layout import expected_shapes
from pvjax.models.config import ModelConfig
from pvjax.models.known import KNOWN
from pvjax.models.moe import blocks_holding
from pvjax.parallel.sharding import spec_for

GIB = 2**30


# Bytes per parameter of each use: inference in bf16; full finetuning keeps fp32 master weights,
# fp32 gradients and AdamW's two fp32 moments (16 bytes), all laid out like the parameters.
BYTES = {"inference": 2, "full_finetune": 16}


def _leaves(cfg: ModelConfig):
    shapes = expected_shapes(cfg)
    for key, shape in shapes["top"].items():
        yield key, tuple(shape)
    for key, shape in shapes["layer"].items():
        yield f"layers/{key}", (len(blocks_holding(cfg, key)),) + tuple(shape)


def n_params(cfg: ModelConfig) -> int:
    return sum(math.prod(shape) for _, shape in _leaves(cfg))


def param_elements_per_device(cfg: ModelConfig, data: int = 1, model: int = 1) -> int:
    """Parameter elements one device holds under `pvjax.parallel.sharding`'s rule table."""
    sizes = {"data": data, "model": model}
    total = 0
    for path, shape in _leaves(cfg):
        spec = spec_for(path, shape, sizes)
        split = math.prod(sizes[a] for a in spec if a is not None)
        total += math.prod(shape) // split
    return total


def kv_cache_elements_per_device(
    cfg: ModelConfig, data: int, model: int, batch: int, context: int
) -> int:
    """Keys and values of `batch` rows of `context` slots, split as generation splits them."""
    rows = batch // data if batch % data == 0 else batch
    heads = cfg.num_kv_heads // model if cfg.num_kv_heads % model == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * rows * context * heads * cfg.head_dim


def per_device(
    cfg: ModelConfig,
    *,
    data: int = 1,
    model: int = 1,
    batch: int = 64,
    context: int = 2048,
    use: str = "inference",
    cache_bytes: int = 2,
) -> dict:
    """GiB per device for `use` ("inference": bf16 weights + a bf16 KV cache of `batch` x `context`;
    "full_finetune": weights, gradients and AdamW state, no cache)."""
    if use not in BYTES:
        raise ValueError(f"use must be one of {sorted(BYTES)}, got {use!r}")
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be positive, got data={data}, model={model}")
    weights = param_elements_per_device(cfg, data, model) * BYTES[use]
    cache = (
        kv_cache_elements_per_device(cfg, data, model, batch, context) * cache_bytes
        if use == "inference"
        else 0
    )
    return {
        "weights_gib": weights / GIB,
        "kv_cache_gib": cache / GIB,
        "total_gib": (weights + cache) / GIB,
    }


def table(
    names=("qwen2.5-7b", "llama-3.1-70b"),
    meshes=((8, 1), (2, 4), (1, 8)),
    *,
    batch: int = 64,
    context: int = 2048,
) -> str:
    """A markdown table of `per_device` over models and mesh shapes (the README's pod section)."""
    lines = [
        f"| model | params | mesh (data x model) | bf16 weights | KV cache (batch {batch} x "
        f"{context}) "
        "| inference total | full finetune (fp32 + AdamW) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cfg = KNOWN[name]
        for d, m in meshes:
            inf = per_device(cfg, data=d, model=m, batch=batch, context=context)
            ft = per_device(cfg, data=d, model=m, use="full_finetune")
            lines.append(
                f"| {cfg.name} | {n_params(cfg) / 1e9:.2f} B | {d} x {m} | "
                f"{inf['weights_gib']:.1f} GiB "
                f"| {inf['kv_cache_gib']:.1f} GiB | {inf['total_gib']:.1f} GiB | "
                f"{ft['total_gib']:.1f} GiB |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
