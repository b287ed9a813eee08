"""A weight with a low-rank delta beside it, `W + scale * A @ B`, applied without forming the sum.

Shape legend: N blocks (the stacked layer axis, absent inside the scan), I input width, O output
width, r rank.

LoRA training runs the one decoder on parameters where some stacked matrices are `LowRank`
instead of arrays (`pvjax.finetune.lora.apply`). The decoder's matmul computes
`x @ W + scale * (x @ A) @ B`: the frozen `W` gets no gradient at all (it is not an argument of the
differentiated function), and the backward pass costs two thin matmuls per weight instead of the
`[I, O]` weight gradient that differentiating a merged `W + s A B` would compute.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class LowRank:
    base: jax.Array  # [N, I, O] (frozen)
    a: jax.Array  # [N, I, r]
    b: jax.Array  # [N, r, O]
    scale: jax.Array  # [N]: alpha / r (or / sqrt r), 0 in blocks left out

    def __getitem__(self, n) -> "LowRank":
        """Block `n`'s weight (the unrolled decoder indexes layers this way)."""
        return jax.tree_util.tree_map(lambda x: x[n], self)

    @property
    def shape(self):
        return self.base.shape

    def merged(self) -> jax.Array:
        """`W + scale * A @ B`, computed in float32 and returned in W's dtype."""
        import jax.numpy as jnp

        delta = jnp.einsum(
            "...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        )
        s = self.scale.astype(jnp.float32)[..., None, None]
        return (self.base.astype(jnp.float32) + s * delta).astype(self.base.dtype)
