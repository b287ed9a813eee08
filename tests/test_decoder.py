"""The decoder's modes agree: `forward` in every weight layout, and `prefill` then `decode_step`
(with a KV cache) against `forward` over the whole sequence."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax.capture import Capture
from pvjax.model import default_positions, left_pad
from pvjax.models.decoder import decode_step, forward, init_cache, prefill
from pvjax.models.layout import PerLayer, Scanned, Sliced, unstack_layers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny("llama31_gqa_llama3rope", folder, vocab_size=300)
    return pvjax.load(folder)


def _weights(model, layout):
    if isinstance(layout, PerLayer):
        return unstack_layers(model.params, model.config, layout.packed, layout.fused)
    return model.params


LAYOUTS = [Scanned(), Sliced(), PerLayer(fused=True), PerLayer(fused=False)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: repr(l))
def test_layouts_and_cached_steps_match_forward(tiny, layout):
    cfg = tiny.config
    tokens, mask = left_pad([[5, 17, 2, 99, 42, 7, 8, 31], [3, 250, 11, 64]], 8)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    pos = default_positions(mask)
    params = _weights(tiny, layout)
    full = forward(params, cfg, layout, tokens, pos, mask, capture=Capture(logits="all"))
    ref = forward(tiny.params, cfg, Scanned(), tokens, pos, mask, capture=Capture(logits="all"))
    np.testing.assert_allclose(
        np.asarray(full.logits),
        np.asarray(ref.logits),
        rtol=0,
        atol=1e-5 * float(jnp.abs(ref.logits).max()),
    )
    # The first 5 columns as a prompt, then one token per step: each step's logits are the full
    # forward's at that column.
    cache = init_cache(cfg, layout, 2, 8, params["embed"].dtype)
    out = prefill(
        params,
        cfg,
        layout,
        tokens[:, :5],
        pos[:, :5],
        mask[:, :5],
        cache,
        capture=Capture(logits="last", hidden=False),
    )
    got = [out.logits[:, -1]]
    for t in range(5, 8):
        out = decode_step(
            params,
            cfg,
            layout,
            tokens[:, t : t + 1],
            pos[:, t : t + 1],
            mask[:, t : t + 1],
            out.cache,
            capture=Capture(logits="last", hidden=False),
        )
        got.append(out.logits[:, -1])
    np.testing.assert_allclose(
        np.stack(got, 1),
        np.asarray(ref.logits[:, 4:]),
        rtol=0,
        atol=1e-5 * float(jnp.abs(ref.logits).max()),
    )
    assert int(out.cache.index) == 8
