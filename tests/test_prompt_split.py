"""Prefix sharing in generation: the plan (`pvjax.engine.prompt_split`), when rows may share, and
that a study grid running each distinct question once gives the answers and projections of running
every row in full."""

import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax import interventions as ivs
from pvjax.engine import prompt_split
from pvjax.engine.generate import SamplingParams, compile_count, generate_ids, prefixes_shareable


def test_the_plan_runs_each_distinct_question_once_in_a_grid():
    template = list(range(100, 130))  # 30 tokens every prompt opens with
    questions = [template + [7] * 9 + [1], template + [8] * 4 + [2], template + [9] * 13 + [3]]
    grid = [q for _ in range(5) for q in questions]  # 5 settings x 3 questions, setting-major
    plan = prompt_split.split(grid, shareable=True, max_rows=16)
    assert plan.width == prompt_split.prompt_bucket(43) == 48 and plan.n_prefix_rows == 4
    assert plan.prefixes == [q[:-1] for q in questions]
    assert plan.prefix_of == [0, 1, 2] * 5 and plan.first == [0, 1, 2]
    assert plan.tails == [q[-1:] for q in grid] and plan.tail_width == 1
    # Distinct prompts under one template: the template runs once (rounded down to 24 tokens).
    plan = prompt_split.split(questions, shareable=True, max_rows=4)
    assert plan.width == 24 and plan.prefixes == [template[:24]] and plan.prefix_of == [0, 0, 0]
    assert plan.tails == [q[24:] for q in questions] and plan.tail_width == 24
    # Not shareable, or nothing in common: every prompt in full.
    for seqs, shareable in ((grid, False), ([[1, 2, 3], [4, 5, 6]], True)):
        plan = prompt_split.split(seqs, shareable=shareable, max_rows=16)
        assert (
            plan.width == 0
            and plan.tails == seqs
            and plan.tail_width == prompt_split.prompt_bucket(len(seqs[-1]))
        )


def test_rows_share_prefixes_only_when_their_interventions_cannot_tell_them_apart():
    L, D = 5, 8
    v = np.ones(D, np.float32)
    per_row = ivs.build(L, D, steer=[(v, 2, [1.0, -1.0])], batch=2)
    with_ablation = ivs.build(L, D, steer=[(v, 2, [1.0, -1.0])], ablate=[(v, 1, 1.0)], batch=2)
    zero_ablation = ivs.build(L, D, steer=[(v, 2, [1.0, -1.0])], ablate=[(v, 1, 0.0)], batch=2)
    one = ivs.build(L, D, steer=[(v, 2, 3.0)])
    assert prefixes_shareable(one, "all", "all")  # the same edit on every row
    assert prefixes_shareable(per_row, "response", "all")  # nothing acts before the last token
    assert not prefixes_shareable(per_row, "all", "all")
    assert not prefixes_shareable(per_row, "prompt", "all")
    assert not prefixes_shareable(with_ablation, "response", "all")  # ablation acts on the prompt
    assert prefixes_shareable(with_ablation, "response", "response")
    assert prefixes_shareable(zero_ablation, "response", "all")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny("llama_gqa_untied", folder, tokenizer=tokenizer)
    return pvjax.load(folder)


@pytest.mark.parametrize("unroll", [True, False])
def test_a_grid_of_settings_runs_each_question_once_and_changes_nothing(tiny, unroll):
    """3 questions (two differ only in their last token, so share all of their prefix) x 4 settings
    (fixed steering of both signs, a cap, none) with `response` steering and probes: sharing gives
    the tokens and prompt/response projections of running every row in full, and the distinct-prefix
    plan is the one taken."""
    L, D = tiny.n_layers + 1, tiny.hidden_size
    rng = np.random.default_rng(0)
    base = rng.integers(3, 1000, 30).tolist()
    questions = [base + [11, 12], base + [11, 13], base[:20] + [14]]
    v = rng.standard_normal(D).astype(np.float32)
    settings = [4.0, -4.0, ivs.cap(0.0), 0.0]
    grid = [q for _ in settings for q in questions]
    coefs = [c for c in settings for _ in questions]
    iv = ivs.build(L, D, steer=[(v, 1, coefs)], batch=len(grid))
    plan = prompt_split.split(sorted(grid, key=len, reverse=True), shareable=True, max_rows=16)
    assert (
        plan.tail_width == 1 and len(plan.prefixes) == 2
    )  # questions 0 and 1 differ in their last token
    kw = dict(
        sampling=SamplingParams(max_new_tokens=6, min_new_tokens=6),
        intervention=iv,
        positions="response",
        probes=np.stack([v, -v]) / 3,
        batch_size=16,
        unroll=unroll,
    )
    shared = generate_ids(tiny, grid, **kw)
    full = generate_ids(tiny, grid, share_prefix=False, **kw)
    assert shared.tokens == full.tokens
    assert len({tuple(t) for t in full.tokens}) > 1  # the settings do steer
    for a, b in zip(
        shared.prompt_projections + shared.projections, full.prompt_projections + full.projections
    ):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())
    assert [p.shape[1] for p in shared.prompt_projections] == [len(q) for q in grid]
    before = compile_count()
    again = generate_ids(
        tiny,
        grid,
        **{**kw, "intervention": ivs.build(L, D, steer=[(v, 1, coefs[::-1])], batch=len(grid))},
    )
    assert (
        compile_count() == before and again.tokens != shared.tokens
    )  # new coefficients, same program
