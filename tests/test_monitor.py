"""`pvjax.methods.monitoring`: the statistics against hand computations (no scipy), the
last-prompt-token projection against transformers' hidden states on a tiny random model, and the
monitor file's round trip and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monitor_tiny import tiny_checkpoint
from test_stats import X, Y, hand_r
from tiny_models import save_tiny

import pvjax
from pvjax.files.vectors import save_vectors
from pvjax.methods import monitoring as mon
from pvjax.settings.types import Bootstrap, ScoreMeaning, VectorChoice


def test_correlation_by_layer_notes_a_constant_layer():
    # per layer: a constant layer (the embeddings of one shared last token) is a row with a note
    proj = np.stack([np.full(len(X), 0.25), X], axis=1)
    rows = mon.correlation_by_layer(proj, Y, n_boot=200)
    assert rows[0]["r"] is None and "the projection is constant" in rows[0]["note"]
    assert rows[1]["r"] == pytest.approx(hand_r(X, Y)) and rows[1]["note"] == ""


def test_threshold_rules():
    s, y = [0.1, 0.4, 0.35, 0.8], [False, False, True, True]
    # candidates: 0.1 (all flagged), midpoints 0.225, 0.375, 0.6, and just above 0.8
    pts = mon.roc_points(s, y)
    assert [round(p[0], 6) for p in pts[:4]] == [0.1, 0.225, 0.375, 0.6]
    assert [(p[1], p[2]) for p in pts] == [(1, 1), (1, 0.5), (0.5, 0.5), (0.5, 0), (0, 0)]
    # Youden's J is 0.5 at 0.225 and at 0.6: the tie goes to the higher threshold
    assert mon.choose_threshold(s, y, "youden") == pytest.approx((0.6, 0.5, 0.0))
    assert mon.choose_threshold(s, y, "fpr", target_fpr=0.5) == pytest.approx((0.225, 1.0, 0.5))
    assert mon.choose_threshold(s, y, "fpr", target_fpr=0.0) == pytest.approx((0.6, 0.5, 0.0))
    with pytest.raises(mon.MonitorError, match="threshold rule"):
        mon.choose_threshold(s, y, "best")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    _, hf, model = tiny_checkpoint(tokenizer)
    return model, hf


def test_last_prompt_projection_matches_transformers_hidden_states(tiny):
    model, hf = tiny
    L, D = model.n_layers + 1, model.hidden_size
    v = np.random.default_rng(1).standard_normal((L, D)).astype(np.float32)
    prompts = [
        "Hi",
        "What is the capital of France?",
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b c d"},
            {"role": "user", "content": "e"},
        ],
    ]
    ids = mon.prompt_ids(model, prompts, system="Be brief.")
    got = mon.last_prompt_projections(model, ids, v)
    assert got.shape == (3, L)
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    for i, seq in enumerate(ids):
        with torch.no_grad():
            hs = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
        want = [float(hs[l][0, -1].numpy() @ u[l]) for l in range(L)]
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)


def test_monitor_file_round_trip_and_refusals(tiny, tmp_path):
    model, _ = tiny
    L, D = model.n_layers + 1, model.hidden_size
    vector = np.random.default_rng(2).standard_normal((L, D)).astype(np.float32)
    vpath = save_vectors(
        tmp_path / "vectors.safetensors", {"response_avg_diff": vector}, model=model, trait="evil"
    )
    spec = str(vpath)
    rng = np.random.default_rng(3)
    proj = rng.standard_normal((12, L))
    scores = proj[:, 2] + 0.3 * rng.standard_normal(12)
    m = mon.calibrate(
        proj,
        scores,
        scores >= 0,
        choice=VectorChoice(vector, None, spec),
        model=model,
        meaning=ScoreMeaning("evil", "contrast", "contrast score (nats/token) >= 0"),
        bootstrap=Bootstrap(n=200),
    )
    assert m.layer == 2  # the layer the scores follow has the largest r
    assert m.auroc == mon.auroc(proj[:, 2], scores >= 0) and m.r == mon.pearson(proj[:, 2], scores)
    assert (m.threshold, m.tpr, m.fpr) == mon.choose_threshold(proj[:, 2], scores >= 0, "youden")
    assert (m.n, m.n_pos + m.n_neg) == (12, 12)
    path = mon.monitor_path(spec)
    assert path == tmp_path / "vectors.response_avg_diff.monitor.json"
    assert (
        mon.monitor_path(f"{spec}:prompt_last_diff").name == "vectors.prompt_last_diff.monitor.json"
    )
    mon.save_monitor(path, m)
    back = mon.load_monitor(path, model, vector_LD=vector)
    assert back == m
    assert back.flag(m.threshold) and not back.flag(np.nextafter(m.threshold, -np.inf))
    # the monitor's own projection is the study's projection at its layer
    ids = mon.prompt_ids(model, ["Hi", "Tell me a story."])
    np.testing.assert_allclose(
        back.projections(model, ids),
        mon.last_prompt_projections(model, ids, vector)[:, m.layer],
        rtol=1e-5,
        atol=1e-5,
    )

    other_dir = tmp_path / "other"
    save_tiny("qwen2_tied", other_dir, vocab_size=300)
    other = pvjax.load(other_dir)
    with pytest.raises(
        mon.MonitorError,
        match=r"calibrated on .* \(3 layers, width 64\); it does not fit "
        r"other \(3 layers, width 64\)",
    ):
        mon.load_monitor(path, other)
    with pytest.raises(mon.MonitorError, match="calibrated on another vector"):
        mon.load_monitor(path, model, vector_LD=vector + 1)
    with pytest.raises(mon.MonitorError, match="does not exist"):
        mon.load_monitor(tmp_path / "nope.monitor.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**m.to_json(), "format": "other"}))
    with pytest.raises(mon.MonitorError, match="not a pvjax monitor file"):
        mon.load_monitor(bad)
    d = m.to_json()
    del d["threshold"]
    bad.write_text(json.dumps(d))
    with pytest.raises(mon.MonitorError, match=r"lacks the fields \['threshold'\]"):
        mon.load_monitor(bad)
    bad.write_text(json.dumps({**m.to_json(), "direction": [1.0, 2.0]}))
    with pytest.raises(mon.MonitorError, match="direction must hold 64 finite numbers"):
        mon.load_monitor(bad)
