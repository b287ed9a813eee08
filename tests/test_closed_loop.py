"""Closed-loop steering (cap / target) against a hand computation on a tiny random model: the
edited residual row, generation against a transformers forward with the same rule as a hook, one
program for fixed, cap and target rows, and a ceiling above every projection as the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import save_tiny

import pvjax
from pvjax import interventions as ivs
from pvjax.engine.generate import SamplingParams, compile_count, generate_ids

LAYER = 2  # hidden_states row: the raw output of block 2 of 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llama")


@pytest.fixture(scope="module")
def tiny(folder, tokenizer):
    hf = save_tiny("llama31_gqa_llama3rope", folder, tokenizer=tokenizer)
    return pvjax.load(folder), hf


@pytest.fixture(scope="module")
def prompts(tiny):
    rng = np.random.default_rng(0)
    return [rng.integers(3, tiny[0].config.vocab_size, n).tolist() for n in (9, 14, 11)]


def unit(v):
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def v(tiny):
    return 3.0 * unit(
        np.random.default_rng(1).standard_normal(tiny[0].hidden_size).astype(np.float32)
    )


def hf_hidden(hf, ids, hook=None):
    """transformers' hidden states and logits of one sequence, with an optional hook on the block
    whose output is `hidden_states[LAYER]`."""
    handle = hf.model.layers[LAYER - 1].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        if handle:
            handle.remove()
    return np.stack([h[0].numpy() for h in out.hidden_states]), out.logits[0].numpy()


def test_cap_and_target_edit_the_row_as_computed_by_hand(tiny, prompts, v):
    model, hf = tiny
    ids = prompts[1]
    h0, _ = hf_hidden(hf, ids)
    p = h0[LAYER] @ unit(v)  # the projection at the steered row before any edit, per token
    ceiling, tgt = float(np.median(p)), float(p.mean() + 1.0)
    coefs = [2.0, ivs.cap(ceiling), ivs.target(tgt, gain=0.5, max_step=0.3), ivs.cap(p.max() + 1)]
    iv = ivs.build(model.n_layers + 1, model.hidden_size, steer=[(v, LAYER, coefs)], batch=4)
    out = np.asarray(pvjax.forward(model, np.array([ids] * 4), intervention=iv).hidden_states)
    want = [
        h0[LAYER] + 2.0 * v,
        h0[LAYER] - np.maximum(p - ceiling, 0)[:, None] * unit(v),
        h0[LAYER] + np.clip(0.5 * (tgt - p), -0.3, 0.3)[:, None] * unit(v),
        h0[LAYER],
    ]
    assert (p > ceiling).sum() >= 3 and (
        p < ceiling
    ).sum() >= 3  # the cap bites on some tokens only
    for r, w in enumerate(want):
        np.testing.assert_allclose(
            out[LAYER, r], w, atol=2e-5 * np.abs(w).max(), err_msg=f"row {r}"
        )
        np.testing.assert_allclose(out[:LAYER, r], h0[:LAYER], atol=2e-5 * np.abs(h0).max())
    capped = out[LAYER, 1] @ unit(v)
    np.testing.assert_allclose(capped, np.minimum(p, ceiling), atol=1e-4)


def test_all_fixed_closed_loop_is_bit_identical(tiny, prompts, v):
    model, _ = tiny
    ids = np.array([prompts[0], prompts[0][::-1]])
    iv = ivs.build(
        model.n_layers + 1,
        model.hidden_size,
        steer=[(v, LAYER, [1.5, -2.0])],
        ablate=[(v[::-1].copy(), 1, 0.5)],
        batch=2,
    )
    assert iv.closed_loop is None
    a = pvjax.forward(model, ids, intervention=iv)
    b = pvjax.forward(model, ids, intervention=iv.with_closed_loop())
    np.testing.assert_array_equal(np.asarray(a.hidden_states), np.asarray(b.hidden_states))
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


@pytest.mark.parametrize("unroll", [False, True])
def test_capped_generation_matches_a_transformers_capping_hook(tiny, prompts, v, unroll):
    """Every token (prompt and new, `positions="all"`) has its projection capped as it is made;
    a transformers forward over the same tokens with the cap as a hook agrees, and its greedy
    choices are ours."""
    model, hf = tiny
    ids = prompts[0]
    base, _ = hf_hidden(hf, ids)
    ceiling = float(np.quantile(base[LAYER] @ unit(v), 0.4))
    iv = ivs.build(model.n_layers + 1, model.hidden_size, steer=[(v, LAYER, ivs.cap(ceiling))])
    g = generate_ids(
        model,
        [ids],
        sampling=SamplingParams(max_new_tokens=12, min_new_tokens=12),
        intervention=iv,
        positions="all",
        probes=unit(v)[None],
        unroll=unroll,
    )
    seq = ids + g.tokens[0]
    ut = torch.tensor(unit(v))
    pre = []

    def cap_hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        p = h @ ut
        pre.append(p[0].numpy().copy())
        h = h - torch.clamp(p - ceiling, min=0)[..., None] * ut
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    _, logits = hf_hidden(hf, seq, cap_hook)
    p_pre = pre[0]
    assert (p_pre > ceiling).sum() >= 3 and (p_pre < ceiling).sum() >= 3
    ours = np.concatenate([g.prompt_projections[0][LAYER, :, 0], g.projections[0][LAYER, :, 0]])
    np.testing.assert_allclose(ours, np.minimum(p_pre, ceiling), atol=2e-4)
    P = len(ids)
    for j, t in enumerate(g.tokens[0]):
        row = logits[P - 1 + j]
        assert row[row.argmax()] - row[t] < 1e-3, (j, t, row.argmax())


def test_fixed_cap_and_target_rows_share_one_program(tiny, prompts, v):
    """One batch of fixed, capped and targeted rows; other values and modes reuse the program;
    a fixed row's answer does not depend on its closed-loop batch mates, and a ceiling above
    every projection is the identity."""
    model, _ = tiny
    L, D = model.n_layers + 1, model.hidden_size
    sp = SamplingParams(max_new_tokens=10)
    kw = dict(sampling=sp, positions="response", probes=unit(v)[None], unroll=False, batch_size=4)
    three = [prompts[0]] * 3
    plain = generate_ids(model, three, **kw)
    ceiling = float(np.median(plain.projections[0][LAYER, :, 0]))
    before = compile_count()
    mixed = generate_ids(
        model,
        three,
        intervention=ivs.build(
            L, D, steer=[(v, LAYER, [4.0, ivs.cap(ceiling), ivs.target(2.0, gain=0.5)])], batch=3
        ),
        **kw,
    )
    swapped = generate_ids(
        model,
        three,
        intervention=ivs.build(
            L, D, steer=[(v, LAYER, [ivs.target(-1.0), 4.0, ivs.cap(1e6)])], batch=3
        ),
        **kw,
    )
    fixed = generate_ids(model, three, intervention=ivs.build(L, D, steer=[(v, LAYER, 4.0)]), **kw)
    assert compile_count() == before  # the unsteered run compiled the one program all of these use
    assert mixed.tokens[0] == swapped.tokens[1] == fixed.tokens[0]
    np.testing.assert_array_equal(mixed.projections[0], fixed.projections[0])
    assert swapped.tokens[2] == plain.tokens[2]  # a ceiling above every projection changes nothing
    np.testing.assert_array_equal(swapped.projections[2], plain.projections[2])
    np.testing.assert_array_equal(swapped.prompt_projections[2], plain.prompt_projections[2])
    # Every steered (response) position of the capped row ends at or under the ceiling.
    assert mixed.projections[1][LAYER, :, 0].max() <= ceiling + 1e-4
    assert mixed.prompt_projections[1][LAYER, -1, 0] <= ceiling + 1e-4


@pytest.mark.parametrize(
    "coef, message",
    [
        (ivs.cap(1.0), None),
        ([1.0, ivs.cap(1.0)], "2 entries"),
    ],
)
def test_closed_loop_needs_a_vector_and_one_value_per_row(coef, message):
    L, D = 4, 8
    if message is None:
        with pytest.raises(
            ivs.InterventionError, match="closed-loop steering vector at layer 1 is zero"
        ):
            ivs.build(L, D, steer=[(np.zeros(D), 1, coef)])
    else:
        with pytest.raises(ivs.InterventionError, match=message):
            ivs.build(L, D, steer=[(np.ones(D), 1, coef)], batch=3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ivs.cap(float("nan")), "value must be a number"),
        (lambda: ivs.target(float("inf")), "value must be finite"),
        (lambda: ivs.target(0.0, gain=0), "gain must be a finite number > 0"),
        (lambda: ivs.cap(0.0, max_step=-1), "max_step must be > 0"),
    ],
)
def test_bad_closed_loop_settings_fail_when_made(make, message):
    with pytest.raises(ivs.InterventionError, match=message):
        make()


def test_cli_runs_fixed_cap_and_target_rows_in_one_batch(capsys, tiny, folder, v, tmp_path):
    """`--coef`, `--cap` and `--target` rows of `pvjax generate` are the library's."""
    import json

    from pvjax.cli import main
    from pvjax.engine.generate import generate

    model, _ = tiny
    L, D = model.n_layers + 1, model.hidden_size
    torch.save(torch.tensor(np.broadcast_to(v, (L, D)).copy()), tmp_path / "v.pt")
    prompt = "Tell me a story about the sea"
    main(
        [
            "generate",
            "--model",
            str(folder),
            "--raw",
            "--prompt",
            prompt,
            "--vector",
            str(tmp_path / "v.pt"),
            "--layer",
            str(LAYER),
            "--coef",
            "2",
            "--cap",
            "-0.25",
            "--target",
            "1.5",
            "--gain",
            "0.5",
            "--positions",
            "all",
            "--max-new-tokens",
            "8",
            "--json",
        ]
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [(r.get("coef"), r.get("cap"), r.get("target")) for r in rows] == [
        (2.0, None, None),
        (None, -0.25, None),
        (None, None, 1.5),
    ]
    want = generate(
        model,
        [prompt] * 3,
        chat=False,
        positions="all",
        sampling=SamplingParams(max_new_tokens=8),
        intervention=ivs.build(
            L,
            D,
            steer=[(v, LAYER, [2.0, ivs.cap(-0.25, gain=0.5), ivs.target(1.5, gain=0.5)])],
            batch=3,
        ),
    )
    assert [r["tokens"] for r in rows] == want.tokens


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cap", "1"], "--cap steer along a vector"),
        (["--target", "1"], "--target steer along a vector"),
        (["--mesh", "data=2,heads=4"], "--mesh 'data=2,heads=4': expected data=D,model=M"),
        (["--mesh", "data=0"], "expected data=D,model=M with positive integers"),
        (["--mesh", "data=3,model=5"], "does not cover the"),
    ],
)
def test_cli_closed_loop_and_mesh_errors_before_loading(capsys, monkeypatch, argv, message):
    from pvjax.cli import main

    monkeypatch.setattr(pvjax, "load", lambda *a, **k: pytest.fail("pvjax.load was called"))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "Hi", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
