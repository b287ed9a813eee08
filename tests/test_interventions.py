"""Behaviour of interventions and captures inside the forward (embedded model, fp32)."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

import pvjax
from pvjax import interventions as ivs
from pvjax.capture import Capture, pooling_weights
from pvjax.model import _forward, default_positions
from pvjax.models.decoder import forward
from pvjax.models.layout import Scanned

L, D = 31, 576


@pytest.fixture(scope="module")
def batch(smollm2):
    texts = [
        smollm2.chat_text([{"role": "user", "content": q}]) + a
        for q, a in [("Say hello.", "Hello! How can I help?"), ("Name a colour.", "Blue.")]
    ]
    seqs = [smollm2.tokenizer(t)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = np.full((2, T), 2, np.int32)
    mask = np.zeros((2, T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    return ids, mask


@pytest.fixture(scope="module")
def baseline(smollm2, batch):
    return pvjax.forward(smollm2, batch[0], attention_mask=batch[1])


def vec(seed=0):
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def test_coefficient_zero_is_the_identity(smollm2, batch, baseline):
    iv = ivs.build(L, D, steer=[(vec(), 10, 0.0)], ablate=[(vec(1), 4, 0.0)])
    out = pvjax.forward(smollm2, batch[0], attention_mask=batch[1], intervention=iv)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(baseline.logits))


def test_steering_shifts_exactly_hidden_state_row_l(smollm2, batch, baseline):
    v = vec()
    out = pvjax.forward(
        smollm2,
        batch[0],
        attention_mask=batch[1],
        intervention=ivs.build(L, D, steer=[(v, 12, 3.0)]),
    )
    h, h0 = np.asarray(out.hidden_states), np.asarray(baseline.hidden_states)
    np.testing.assert_array_equal(h[:12], h0[:12])
    np.testing.assert_allclose(h[12] - h0[12], np.broadcast_to(3.0 * v, h[12].shape), atol=1e-3)
    assert np.abs(h[13] - h0[13]).max() > 1.0


def test_ablation_zeroes_the_projection(smollm2, batch, baseline):
    u = vec(3)
    out = pvjax.forward(
        smollm2, batch[0], attention_mask=batch[1], intervention=ivs.build(L, D, ablate=[(u, 9)])
    )
    u = u / np.linalg.norm(u)
    before = np.abs(np.asarray(baseline.hidden_states[9]) @ u).max()
    after = np.abs(np.asarray(out.hidden_states[9]) @ u).max()
    assert before > 0.1 and after < 1e-4 * before


def test_each_row_carries_its_own_coefficient(smollm2, batch):
    ids, mask = np.repeat(batch[0][:1], 3, 0), np.repeat(batch[1][:1], 3, 0)
    v = vec()
    swept = pvjax.forward(
        smollm2,
        ids,
        attention_mask=mask,
        intervention=ivs.build(L, D, steer=[(v, 8, [0.0, 2.0, -4.0])], batch=3),
    )
    for row, c in enumerate([0.0, 2.0, -4.0]):
        single = pvjax.forward(
            smollm2,
            ids[:1],
            attention_mask=mask[:1],
            intervention=ivs.build(L, D, steer=[(v, 8, c)]),
        )
        np.testing.assert_allclose(swept.logits[row], single.logits[0], atol=2e-4, rtol=1e-4)


def test_sweeping_coefficients_vectors_and_layers_never_recompiles(smollm2, batch):
    """One trace serves every layer, coefficient, vector, ablation and position mode (chex counts
    the traces of the decoder itself), and the public forward's program cache does not grow."""
    ids, mask = batch
    traced = jax.jit(
        chex.assert_max_traces(
            lambda params, iv: (
                forward(
                    params,
                    smollm2.config,
                    Scanned(),
                    ids,
                    default_positions(mask),
                    mask,
                    intervention=iv,
                    capture=Capture(logits="last", hidden=False),
                ).logits
            ),
            n=1,
        )
    )
    warm = ivs.build(L, D, steer=[(vec(), 3, 1.0)]).with_masks(ivs.position_mask("all", mask))
    pvjax.forward(smollm2, ids, attention_mask=mask, intervention=warm)
    before = _forward._cache_size()
    for layer, coef, seed, mode in [
        (5, 2.0, 1, "all"),
        (20, -8.0, 2, "prompt"),
        (30, 0.5, 3, "response"),
    ]:
        iv = ivs.build(L, D, steer=[(vec(seed), layer, coef)], ablate=[(vec(seed + 9), layer - 1)])
        iv = iv.with_masks(ivs.position_mask(mode, mask, ids.shape[1] - 3))
        traced(smollm2.params, iv)
        pvjax.forward(smollm2, ids, attention_mask=mask, intervention=iv)
    assert _forward._cache_size() == before


def test_position_masks_select_prompt_or_response(smollm2, batch, baseline):
    ids, mask = batch
    end = ids.shape[1] - 4
    v = vec()
    for mode in ("prompt", "response"):
        iv = ivs.build(L, D, steer=[(v, 6, 2.0)]).with_masks(ivs.position_mask(mode, mask, end))
        h = np.asarray(
            pvjax.forward(smollm2, ids, attention_mask=mask, intervention=iv).hidden_states[6]
        )
        delta = np.abs(h - np.asarray(baseline.hidden_states[6])).max(-1)
        steered = delta > 1.0
        expect = (
            (np.arange(ids.shape[1]) < end)
            if mode == "prompt"
            else (np.arange(ids.shape[1]) >= end - 1)
        )
        np.testing.assert_array_equal(steered, expect[None] & mask.astype(bool))


def test_attention_is_causal_and_padding_is_ignored(smollm2, batch, baseline):
    ids, mask = batch
    changed = ids.copy()
    changed[:, -1] = 42
    out = pvjax.forward(smollm2, changed, attention_mask=mask)
    real = mask[:, :-1].astype(
        bool
    )  # padded query rows hold garbage by design; real ones must not move
    np.testing.assert_array_equal(
        np.asarray(out.hidden_states[:, :, :-1])[:, real],
        np.asarray(baseline.hidden_states[:, :, :-1])[:, real],
    )
    assert np.abs(np.asarray(out.logits[:, -1]) - np.asarray(baseline.logits[:, -1])).max() > 1.0
    padded = ids.copy()
    padded[mask == 0] = 7  # what sits under the mask must not matter
    out = pvjax.forward(smollm2, padded, attention_mask=mask)
    sel = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(out.logits)[sel], np.asarray(baseline.logits)[sel], atol=1e-4
    )


def test_pooled_and_projection_captures_match_full_hidden_states(smollm2, batch, baseline):
    ids, mask = batch
    w = pooling_weights(mask, ids.shape[1] - 5)
    probes = np.random.default_rng(0).standard_normal((L, 2, D)).astype(np.float32)
    out = pvjax.activations(
        smollm2, ids, attention_mask=mask, pool_weights=w, probes=probes, hidden=False
    )
    assert out.logits is None and out.hidden_states is None
    h = np.asarray(baseline.hidden_states, np.float64)
    np.testing.assert_allclose(
        out.pooled, np.einsum("bkt,lbtd->lbkd", np.asarray(w), h), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(
        out.projections, np.einsum("lbtd,lkd->lbtk", h, probes), rtol=1e-4, atol=1e-2
    )


def test_jitted_and_eager_agree(smollm2, batch, baseline):
    ids, mask = batch
    with jax.disable_jit():
        eager = pvjax.forward(smollm2, ids[:1, -12:], attention_mask=mask[:1, -12:])
    jitted = pvjax.forward(smollm2, ids[:1, -12:], attention_mask=mask[:1, -12:])
    np.testing.assert_allclose(eager.logits, jitted.logits, atol=1e-3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(steer=[(np.ones(100), 3, 1.0)]), "width 100 .* hidden size is 576"),
        (dict(steer=[(np.full(D, np.nan), 3, 1.0)]), "NaN"),
        (dict(steer=[(np.ones(D), 31, 1.0)]), "layer 31 is outside 0..30"),
        (dict(steer=[(np.ones((20, D)), 3, 1.0)]), "20 rows .* n_layers\\+1 = 31"),
        (dict(ablate=[(np.zeros(D), 3)]), "zero"),
    ],
)
def test_bad_interventions_fail_before_compute(bad, message):
    with pytest.raises(ivs.InterventionError, match=message):
        ivs.build(L, D, **bad)
