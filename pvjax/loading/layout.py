"""The parameter pytree and the stacking of per-layer tensors into it.

Layout (kernels are stored `[in, out]` so the forward is `x @ W`; N = number of blocks):

    embed [V, D], final_norm [D], lm_head [D, V] (untied models only)
    layers: attn_norm [N, D], wq [N, D, H*E], wk/wv [N, D, K*E], bq [N, H*E], bk/bv [N, K*E]
            (qkv_bias models only), wo [N, H*E, D], mlp_norm [N, D], w_gate/w_up [N, D, F],
            w_down [N, F, D]; q_norm/k_norm [N, E] (qk_norm models: Qwen3, Gemma 3),
            post_attn_norm/post_mlp_norm [N, D] (sandwich_norms models: Gemma). Norm weights are
            kept as the checkpoint holds them (Gemma's applied as 1 + w). Expert models
            (Qwen3-MoE) hold router [N, D, X], w_gate_e/w_up_e [N, X, D, I] and w_down_e
            [N, X, I, D] in place of w_gate/w_up/w_down; one with dense blocks among them
            (`ModelConfig.dense_blocks`) holds both, each stacked over only the blocks that
            run it (`pvjax.models.moe.blocks_holding`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from pvjax.errors import UserError
from pvjax.models.config import ModelConfig
from pvjax.models.moe import blocks_holding


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match its config: names the tensor and the file."""


def expected_shapes(cfg: ModelConfig) -> dict:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = {
        "attn_norm": (D,),
        "wq": (D, q),
        "wk": (D, kv),
        "wv": (D, kv),
        "wo": (q, D),
        "mlp_norm": (D,),
        "w_gate": (D, F),
        "w_up": (D, F),
        "w_down": (F, D),
    }
    if cfg.qkv_bias:
        layer.update(bq=(q,), bk=(kv,), bv=(kv,))
    if cfg.qk_norm:
        layer.update(q_norm=(cfg.head_dim,), k_norm=(cfg.head_dim,))
    if cfg.sandwich_norms:
        layer.update(post_attn_norm=(D,), post_mlp_norm=(D,))
    if cfg.num_experts:  # the MLP is routed experts (Qwen3-MoE)
        X, I = cfg.num_experts, cfg.moe_intermediate_size
        if not cfg.dense_blocks:
            for key in ("w_gate", "w_up", "w_down"):
                del layer[key]
        layer.update(router=(D, X), w_gate_e=(X, D, I), w_up_e=(X, D, I), w_down_e=(X, I, D))
    top = {"embed": (V, D), "final_norm": (D,)}
    if not cfg.tie_embeddings:
        top["lm_head"] = (D, V)
    return {"top": top, "layer": layer}


def assemble(
    cfg: ModelConfig,
    names: Iterable[str],
    fetch: Callable[[str], np.ndarray],
    name_of: Callable[[str, int | None], str],
    transform: Callable[[str, np.ndarray], np.ndarray],
    ignore: Callable[[str], bool],
    source: str,
    dtype,
) -> dict:
    """Build the pytree. `name_of(key, layer)` gives the source tensor name for a pytree key;
    `transform(key, array)` brings it to pvjax's layout; `ignore(name)` marks tensors that are
    known and deliberately unused (rotary buffers, a tied lm_head copy)."""
    shapes = expected_shapes(cfg)
    available = set(names)
    used: set[str] = set()

    def get(key, layer=None):
        name = name_of(key, layer)
        if name not in available:
            raise CheckpointError(
                f"{source}: tensor {name!r} is missing (needed for {key}"
                f"{'' if layer is None else f' of layer {layer}'})"
            )
        used.add(name)
        arr = transform(key, fetch(name))
        want = shapes["top"].get(key) or shapes["layer"][key]
        if tuple(arr.shape) != tuple(want):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                f"expected {tuple(want)} from the config (pvjax layout)"
            )
        return arr.astype(dtype)

    params = {k: get(k) for k in shapes["top"]}
    params["layers"] = {
        k: np.stack([get(k, i) for i in blocks_holding(cfg, k)]) for k in shapes["layer"]
    }
    unused = sorted(n for n in available - used if not ignore(n))
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) not used by the {cfg.architecture} "
            f"layout, e.g. {unused[:5]} (wrong num_hidden_layers or architecture?)"
        )
    return params
