"""Steering terms (`pvjax.engine.terms`): the format and its one-line errors, composition, the
rescale and rotate modes, conditional steering, and the CLI's `--steer`/`--when`, on a tiny random
Llama (3 blocks, width 64) and transformers' forward with the same edit as a hook."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import save_tiny

import pvjax
from pvjax import interventions as ivs
from pvjax.engine import terms as T
from pvjax.engine.generate import SamplingParams, compile_count, generate_ids

LAYER = 2  # hidden_states row: the raw output of block 2 of 3
COND = 1  # the condition's row


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_terms")


@pytest.fixture(scope="module")
def tiny(folder, tokenizer):
    hf = save_tiny("llama31_gqa_llama3rope", folder, tokenizer=tokenizer)
    return pvjax.load(folder), hf


@pytest.fixture(scope="module")
def prompts(tiny):
    rng = np.random.default_rng(0)
    return [rng.integers(3, tiny[0].config.vocab_size, n).tolist() for n in (9, 14, 11, 12)]


def unit(v):
    return v / np.linalg.norm(v)


def rand(model, seed, scale=3.0):
    return scale * unit(np.random.default_rng(seed).standard_normal(model.hidden_size)).astype(
        np.float32
    )


def term(v, layer=LAYER, **kw):
    return T.SteerTerm(vector=v, layers=(layer,) if isinstance(layer, int) else layer, **kw)


def hidden(model, ids_BT, rows):
    iv = T.build_intervention(rows, model)
    out = pvjax.forward(model, np.asarray(ids_BT), intervention=iv)
    return np.asarray(out.hidden_states)


# ---------------------------------------------------------------------------------------------
# The format


def test_cli_and_dict_forms_build_the_same_term():
    t = T.parse_cli("v.safetensors:prompt_avg_diff,layer=12+14,coef=2.5,positions=all")
    assert t.layers == (12, 14) and t.coef == 2.5 and t.mode == "add" and t.positions == "all"
    assert T.from_dict(T.to_dict(t)) == t
    r = T.parse_cli("v.pt,layer=10-12,angle=pi/4")
    assert r.mode == "rotate" and r.layers == (10, 11, 12) and math.isclose(r.angle, math.pi / 4)
    c = T.parse_condition("c.pt,layer=8,threshold=-1.5,on=cosine")
    t = T.parse_cli("v.pt,layer=9,coef=1,mode=rescale,without=w.pt", when=c)
    d = T.to_dict(t)
    assert d["when"] == {"vector": "c.pt", "layer": 8, "threshold": -1.5, "on": "cosine"}
    assert d["mode"] == "rescale" and d["without"] == "w.pt"
    assert T.from_dict(d) == t
    assert T.terms_from_config({"vector": "v.pt", "layer": 3, "cap": 1.0})[0].cap == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("v.pt,layer=3,coef=1,angle=0.5", "two strengths (coef and angle)"),
        ("v.pt,layer=3,angle=3.5", "angle 3.5 is outside [-pi, pi]"),
        ("v.pt,layer=3,coef=1,mode=shove", "unknown mode 'shove'"),
        ("v.pt,layer=3", "no strength"),
        ("v.pt,coef=1", "no layer"),
        ("v.pt,layer=3,coef=1,mode=rotate", "mode rotate takes angle="),
        ("v.pt,layer=3,cap=1,mode=rescale", "cap= is closed-loop addition"),
        ("v.pt,layer=3,coef=x", "coef='x' is not a number"),
        ("v.pt,layer=3,coef=1,size=2", "unknown key 'size'"),
        ("v.pt,layer=3,coef=1,positions=middle", "positions='middle'"),
        ("layer=3,coef=1", "the vector FILE[:KEY] comes first"),
    ],
)
def test_bad_terms_name_the_term_and_the_problem(text, message):
    with pytest.raises(T.TermError) as e:
        T.parse_cli(text)
    assert message in str(e.value) and f"--steer {text!r}" in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_conditions_and_dicts():
    with pytest.raises(T.TermError, match="a condition needs a threshold"):
        T.parse_condition("c.pt,layer=3")
    with pytest.raises(T.TermError, match="before its condition is read at layer 5"):
        T.parse_cli("v.pt,layer=3,coef=1", when=T.parse_condition("c.pt,layer=5,threshold=0"))
    with pytest.raises(T.TermError, match=r"terms\[1\]: unknown key 'coeff'"):
        T.terms_from_config([{"vector": "v", "layer": 1, "coef": 1}, {"vector": "v", "coeff": 1}])
    with pytest.raises(T.TermError, match="on='dot'"):
        T.from_dict(
            {
                "vector": "v",
                "layer": 4,
                "coef": 1,
                "when": {"vector": "c", "layer": 2, "threshold": 0, "on": "dot"},
            }
        )


def test_build_refuses_what_cannot_meet_at_a_layer(tiny):
    model, _ = tiny
    v, w = rand(model, 1), rand(model, 2)
    for a, b, message in [
        (term(v, coef=1.0), term(w, coef=1.0, mode="rescale"), "terms at one layer share a mode"),
        (term(v, angle=0.3), term(w, angle=0.2), "must be alone at layer 2"),
        (term(v, cap=1.0), term(w, coef=1.0), "must be alone at layer 2"),
    ]:
        with pytest.raises(T.TermError, match=message):
            T.build_intervention([[a, b]], model)
    with pytest.raises(T.TermError, match="layer 4 is outside 0..3"):
        T.build_intervention([[term(v, layer=4, coef=1.0)]], model)
    with pytest.raises(T.TermError, match="different positions"):
        T.request_positions([[term(v, coef=1.0, positions="all")]], default="response")


# ---------------------------------------------------------------------------------------------
# Composition and modes in the forward


def test_one_term_is_interventions_build_bit_for_bit(tiny, prompts):
    model, _ = tiny
    v = rand(model, 1)
    a = T.build_intervention([[term(v, coef=1.5)], [term(v, cap=0.5, gain=0.5)]], model)
    b = ivs.build(
        model.n_layers + 1,
        model.hidden_size,
        steer=[(v, LAYER, [1.5, ivs.cap(0.5, gain=0.5)])],
        batch=2,
    )
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.modes is None and a.condition is None


def jax_leaves(iv):
    import jax

    return jax.tree_util.tree_leaves(iv)


def test_two_terms_at_a_layer_are_their_weighted_sum(tiny, prompts):
    model, _ = tiny
    v, w, x = rand(model, 1), rand(model, 2), rand(model, 3)
    ids = np.array([prompts[0]] * 3)
    summed = (np.float32(1.5) * v + np.float32(-0.5) * w).astype(np.float32)
    h = hidden(
        model,
        ids,
        [
            [term(v, coef=1.5), term(w, coef=-0.5), term(x, layer=1, coef=2.0)],
            [term(summed, coef=1.0), term(x, layer=1, coef=2.0)],
            [term(x, layer=(1,), coef=2.0)],
        ],
    )
    np.testing.assert_array_equal(h[:, 0], h[:, 1])  # bit for bit
    np.testing.assert_array_equal(h[:LAYER, 0], h[:LAYER, 2])  # row 1 steered alike
    np.testing.assert_allclose(
        h[LAYER, 0] - h[LAYER, 2], np.broadcast_to(summed, h[LAYER, 0].shape), atol=1e-5
    )


def test_without_projects_a_direction_out_of_the_vector(tiny, prompts):
    model, _ = tiny
    v, w = rand(model, 1), rand(model, 2)
    h = hidden(model, [prompts[0]] * 2, [[term(v, coef=1.0, without=w)], []])
    edit = h[LAYER, 0] - h[LAYER, 1]
    assert np.abs(edit @ unit(w)).max() < 1e-5
    expect = v - (v @ unit(w)) * unit(w)
    np.testing.assert_allclose(edit, np.broadcast_to(expect, edit.shape), atol=1e-5)


def test_rescale_keeps_norms_and_rotate_turns_toward_the_vector(tiny, prompts):
    model, _ = tiny
    v = rand(model, 1)
    angles = [0.0, 0.1, 0.3, 0.6, 1.0, 2.0, -0.4]
    rows = [[]] + [[term(v, coef=4.0, mode="rescale")]] + [[term(v, angle=a)] for a in angles]
    ids = np.array([prompts[1]] * len(rows))
    h = hidden(model, ids, rows)
    base = h[LAYER, 0]
    np.testing.assert_array_equal(h[:LAYER], np.broadcast_to(h[:LAYER, :1], h[:LAYER].shape))
    # rescale: every steered position keeps its norm, and the direction moved toward v
    n0, n1 = np.linalg.norm(base, axis=-1), np.linalg.norm(h[LAYER, 1], axis=-1)
    np.testing.assert_allclose(n1, n0, rtol=1e-5)
    assert (h[LAYER, 1] @ unit(v) > base @ unit(v) + 1e-3).all()
    # rotate by 0 is the identity, bit for bit; norms kept; projection monotonic in the angle
    np.testing.assert_array_equal(h[:, 2], h[:, 0])
    proj = np.stack([h[LAYER, 2 + k] @ unit(v) for k in range(len(angles))])  # [angles, T]
    order = np.argsort(angles)
    assert (np.diff(proj[order], axis=0) >= -1e-5).all()
    assert (proj[angles.index(0.3)] > proj[angles.index(0.0)] + 1e-3).all()
    for k in range(len(angles)):
        np.testing.assert_allclose(np.linalg.norm(h[LAYER, 2 + k], axis=-1), n0, rtol=1e-5)
    # cosine with v after rotating by theta: cos(max(phi - theta, 0))
    phi = np.arccos(np.clip(base @ unit(v) / n0, -1, 1))
    k = angles.index(0.6)
    want = np.cos(np.clip(phi - 0.6, 0, np.pi))
    np.testing.assert_allclose(proj[k] / n0, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Generation: each mode against a transformers hook, one program for mixed modes


def torch_edit(mode, v, strength):
    """The edit of `apply_row` for one mode, written again in torch (a forward hook)."""
    vt = torch.tensor(v)
    w = vt / vt.norm()

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if mode == "add":
            h = h + strength * vt
        elif mode == "rescale":
            h1 = h + strength * vt
            h = h1 * (h.norm(dim=-1, keepdim=True) / h1.norm(dim=-1, keepdim=True))
        else:
            p = h @ w
            perp = h - p[..., None] * w
            s = perp.norm(dim=-1)
            psi = torch.clamp(torch.atan2(s, p) - strength, 0, math.pi)
            r = h.norm(dim=-1)
            h = (r * torch.cos(psi))[..., None] * w + (r * torch.sin(psi) / s)[..., None] * perp
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return hook


def test_each_mode_generates_what_a_transformers_hook_does(tiny, prompts):
    """Add, rescale and rotate rows in one batch (`positions="all"`); transformers' forward over
    each row's tokens with the same edit as a hook picks the same greedy tokens."""
    model, hf = tiny
    v = rand(model, 1, scale=1.0)
    settings = [("add", 6.0), ("rescale", 6.0), ("rotate", 0.8)]
    rows = [
        [term(v, mode=m, **({"angle": s} if m == "rotate" else {"coef": s}))] for m, s in settings
    ] + [[]]
    ids = [prompts[0]] * 4
    sp = SamplingParams(max_new_tokens=8, min_new_tokens=8)
    iv = T.build_intervention(rows, model)
    g = generate_ids(model, ids, sampling=sp, intervention=iv, positions="all", unroll=False)
    assert sum(t != g.tokens[3] for t in g.tokens[:3]) >= 2, "the edits should change answers"
    for (mode, s), toks in zip(settings, g.tokens[:3]):
        seq = ids[0] + toks
        handle = hf.model.layers[LAYER - 1].register_forward_hook(torch_edit(mode, v, s))
        try:
            with torch.no_grad():
                logits = hf(torch.tensor([seq])).logits[0].numpy()
        finally:
            handle.remove()
        P = len(ids[0])
        for j, t in enumerate(toks):
            row = logits[P - 1 + j]
            assert row[row.argmax()] - row[t] < 1e-3, (mode, j, t, row.argmax())


def test_modes_share_one_program_and_add_rows_stay_bit_identical(tiny, prompts):
    model, _ = tiny
    v = rand(model, 1)
    kw = dict(
        sampling=SamplingParams(max_new_tokens=6),
        positions="response",
        unroll=False,
        probes=unit(v)[None],
        batch_size=4,
    )
    three = [prompts[2]] * 3
    a = [[term(v, coef=2.0)], [term(v, coef=2.0, mode="rescale")], [term(v, angle=0.5)]]
    b = [[term(v, angle=-0.3)], [term(v, coef=2.0)], [term(v, coef=1.0, mode="rescale")]]
    first = generate_ids(model, three, intervention=T.build_intervention(a, model), **kw)
    before = compile_count()
    second = generate_ids(model, three, intervention=T.build_intervention(b, model), **kw)
    assert compile_count() == before
    plain_add = generate_ids(  # the plain program (no modes), the same batch
        model, three, intervention=T.build_intervention([[term(v, coef=2.0)]] * 3, model), **kw
    )
    assert plain_add.tokens[0] == first.tokens[0] == second.tokens[1]
    np.testing.assert_array_equal(first.projections[0], plain_add.projections[0])
    np.testing.assert_array_equal(second.projections[1], plain_add.projections[0])
    assert first.tokens[1] != first.tokens[0] or first.tokens[2] != first.tokens[0]


# ---------------------------------------------------------------------------------------------
# Conditions


@pytest.mark.parametrize("positions", ["response", "all"])
def test_condition_false_rows_are_unsteered_and_true_rows_steered(tiny, prompts, positions):
    """Rows of one batch: two prompts under a conditional term, the same term unconditional, and
    nothing; the condition's threshold lies between the prompts' scores."""
    model, _ = tiny
    v, c = rand(model, 1, scale=6.0), rand(model, 5)
    pa, pb = prompts[0], prompts[3]
    h = np.asarray(pvjax.forward(model, np.array([pa])).hidden_states)[COND, 0, -1]
    g = np.asarray(pvjax.forward(model, np.array([pb])).hidden_states)[COND, 0, -1]
    sa, sb = h @ unit(c), g @ unit(c)
    if sa < sb:
        c, sa, sb = -c, -sa, -sb
    cond = T.Condition(vector=c, layer=COND, threshold=float((sa + sb) / 2))
    gated, plain = term(v, coef=1.0, when=cond), term(v, coef=1.0)
    rows = [[gated], [gated], [plain], [plain], [], []]
    ids = [pa, pb] * 3
    kw = dict(
        sampling=SamplingParams(max_new_tokens=8),
        positions=positions,
        unroll=False,
        probes=unit(v)[None],
        batch_size=8,
    )
    out = generate_ids(model, ids, intervention=T.build_intervention(rows, model), **kw)
    assert out.tokens[0] == out.tokens[2] and out.tokens[1] == out.tokens[5]
    for x, y in [(0, 2), (1, 5)]:
        np.testing.assert_array_equal(out.projections[x], out.projections[y])
        np.testing.assert_array_equal(out.prompt_projections[x], out.prompt_projections[y])
    assert not np.array_equal(out.projections[0], out.projections[4]), "steering should show"
    if positions == "response":  # and against programs without any condition
        alone = T.build_intervention([[plain]] * 2, model)
        alone = generate_ids(model, [pa, pb], intervention=alone, **kw)
        none = generate_ids(model, [pa, pb], **kw)
        assert out.tokens[0] == alone.tokens[0] and out.tokens[1] == none.tokens[1]


def test_condition_thresholds_fit_best_f1_or_a_false_positive_rate(tiny, prompts):
    from pvjax.methods.conditions import choose_condition_threshold, condition_scores

    scores = [0.1, 0.4, 0.35, 0.8, 0.9, 0.7]
    labels = [False, False, True, True, True, False]
    t, tpr, fpr, f1 = choose_condition_threshold(scores, labels, "f1")
    assert (tpr, fpr, f1) == (2 / 3, 0.0, 0.8) and 0.7 < t <= 0.8
    t, tpr, fpr, _ = choose_condition_threshold(scores, labels, "fpr", target_fpr=0.7)
    assert (tpr, fpr) == (1.0, 2 / 3) and 0.1 < t <= 0.35
    model, _ = tiny
    c = rand(model, 5)
    s = condition_scores(model, prompts[:2], c, COND)
    h = np.asarray(pvjax.forward(model, np.array([prompts[0]])).hidden_states)[COND, 0, -1]
    np.testing.assert_allclose(s[0], h @ unit(c), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_steer_and_when_are_the_library_terms(capsys, tiny, folder, tmp_path):
    from pvjax.cli import main
    from pvjax.engine.generate import generate
    from pvjax.files.vectors import save_vectors

    model, _ = tiny
    L = model.n_layers + 1
    v, w, c = rand(model, 1), rand(model, 2), rand(model, 5)
    for name, x in (("v", v), ("w", w), ("c", c)):
        save_vectors(
            tmp_path / f"{name}.safetensors", {"response_avg_diff": np.tile(x, (L, 1))}, model=model
        )
    prompt = "Tell me a story about the sea"
    argv = [
        "generate",
        "--model",
        str(folder),
        "--raw",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--steer",
        f"{tmp_path}/v.safetensors,layer=2,coef=2",
        "--steer",
        f"{tmp_path}/w.safetensors,layer=1+2,angle=0.5,mode=rotate",
        "--when",
        f"{tmp_path}/c.safetensors,layer=1,threshold=-100",
        "--json",
        "--scanned",
    ]
    with pytest.raises(SystemExit):
        main(argv)
    assert "terms at one layer share a mode" in capsys.readouterr().err
    argv[argv.index(f"{tmp_path}/w.safetensors,layer=1+2,angle=0.5,mode=rotate")] = (
        f"{tmp_path}/w.safetensors,layer=1,angle=0.5"
    )
    main(argv)
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [t["layers"] for t in row["terms"]] == [[2], [1]] and row["positions"] == "response"
    cond = T.Condition(vector=str(tmp_path / "c.safetensors"), layer=1, threshold=-100.0)
    rows = [
        [
            term(str(tmp_path / "v.safetensors"), coef=2.0, when=cond),
            term(str(tmp_path / "w.safetensors"), layer=1, angle=0.5, when=cond),
        ]
    ]
    want = generate(
        model,
        [prompt],
        chat=False,
        sampling=SamplingParams(max_new_tokens=6),
        positions="response",
        intervention=T.build_intervention(rows, model),
        unroll=False,
    )
    assert row["tokens"] == want.tokens[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steer", "V,layer=2,coef=1,angle=0.2"], "two strengths (coef and angle)"),
        (["--steer", "V,layer=2,angle=4"], "angle 4.0 is outside [-pi, pi]"),
        (["--steer", "V,layer=2,coef=1", "--when", "V,layer=1"], "needs a threshold"),
        (["--steer", "V,layer=2,coef=1,mode=push"], "unknown mode 'push'"),
        (["--steer", "V,layer=9,coef=1"], "layer 9 is outside 0..3"),
        (["--steer", "OTHER,layer=2,coef=1"], "it does not fit"),
        (["--when", "V,layer=1,threshold=0"], "--when gates steering"),
    ],
)
def test_cli_term_errors_are_one_line_before_the_load(
    capsys, monkeypatch, tiny, folder, tmp_path, smollm2_shape, extra, message
):
    from pvjax.cli import main
    from pvjax.files.vectors import save_vectors

    model, _ = tiny
    L, D = model.n_layers + 1, model.hidden_size
    save_vectors(
        tmp_path / "v.safetensors", {"response_avg_diff": np.ones((L, D), np.float32)}, model=model
    )
    other = smollm2_shape
    save_vectors(
        tmp_path / "o.safetensors",
        {"response_avg_diff": np.ones((other.n_layers + 1, other.hidden_size), np.float32)},
        model=other,
    )
    extra = [
        x.replace("OTHER", str(tmp_path / "o.safetensors")).replace(
            "V", str(tmp_path / "v.safetensors")
        )
        for x in extra
    ]
    monkeypatch.setattr(pvjax, "load", lambda *a, **k: pytest.fail("pvjax.load was called"))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), "--prompt", "Hi", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def smollm2_shape():
    """The embedded model's config without its weights: a vector file of another model."""
    from pvjax.loading import read_model_config
    from pvjax.model import Model

    return Model(
        config=read_model_config("smollm2-135m-instruct"),
        params=None,
        tokenizer=None,
        source="smollm2-135m-instruct",
    )


def test_fit_condition_separates_two_prompt_sets_and_builds_a_term(tiny):
    from pvjax.methods.conditions import fit_condition, hit_rate

    model, _ = tiny
    c = rand(model, 5)
    pos = ["Tell me about the sea.", "Describe a storm at sea."]
    neg = ["How do I bake bread?", "What is a good cake?"]
    fit = fit_condition(model, pos, neg, c, COND, rule="f1")
    assert fit.n_pos == fit.n_neg == 2 and fit.condition.layer == COND and fit.f1 > 0
    assert hit_rate(model, pos, fit.condition, c) == fit.tpr
    assert hit_rate(model, neg, fit.condition, c) == fit.fpr
    T.build_intervention([[term(rand(model, 1), coef=1.0, when=fit.condition)]], model)
