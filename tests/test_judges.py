"""The logprob-weighted judge score, and the Judge end to end over loopback HTTP."""

from __future__ import annotations

import math

import pytest
from openai_server import OpenAIServer

from pvjax.llm import CachedBackend, ChatCache, OpenAIChat
from pvjax.measure.judges import (
    COHERENCE_RUBRIC,
    Judge,
    JudgeStats,
    count_missing,
    render,
    score_from_logprobs,
)

ln = math.log


def test_weighted_mean_by_hand():
    # 0.5*80 + 0.3*90 + 0.1*70 = 74 over mass 0.9; "Sure" (0.1) is ignored.
    lp = {"80": ln(0.5), "90": ln(0.3), "70": ln(0.1), "Sure": ln(0.1)}
    assert score_from_logprobs(lp) == pytest.approx(74 / 0.9)


def test_whitespace_tokens_count_and_same_integer_sums():
    lp = {" 85": ln(0.4), "85": ln(0.2), "85 ": ln(0.1), "\n0": ln(0.3)}
    assert score_from_logprobs(lp) == pytest.approx(0.7 * 85 / 1.0)


def test_numbers_above_100_and_non_integers_ignored():
    lp = {
        "100": ln(0.3),
        "150": ln(0.3),
        "2.5": ln(0.1),
        "-5": ln(0.1),
        "1e2": ln(0.1),
        "²": ln(0.05),
        "0": ln(0.05),
    }
    assert score_from_logprobs(lp) == pytest.approx(0.3 * 100 / 0.35)


def test_low_mass_refusal_and_missing_give_none():
    assert score_from_logprobs({"REFUSAL": ln(0.95), "50": ln(0.05)}) is None
    assert score_from_logprobs({"REF": ln(0.76), "40": ln(0.24)}) is None
    assert score_from_logprobs({"REF": ln(0.74), "40": ln(0.26)}) == pytest.approx(40)
    assert score_from_logprobs({"REF": ln(0.9), "40": ln(0.1)}, min_mass=0.05) == pytest.approx(40)
    assert score_from_logprobs(None) is None
    assert score_from_logprobs({}) is None
    assert score_from_logprobs({"Hello": 0.0}) is None


def test_count_missing_and_stats():
    scores = [10.0, None, 30.0, None]
    assert count_missing(scores) == 2
    st = JudgeStats.of(scores)
    assert (st.n, st.missing, st.mean, st.missing_fraction) == (4, 2, 20.0, 0.5)
    assert JudgeStats.of([]).mean is None


def test_render_is_literal_and_single_pass():
    rubric = 'JSON like {"a": 1}. Q: {question} A: {answer}'
    out = render(rubric, "what is {answer}?", "it is {question}")
    assert out == 'JSON like {"a": 1}. Q: what is {answer}? A: it is {question}'
    assert "{question}" in COHERENCE_RUBRIC and "{answer}" in COHERENCE_RUBRIC
    with pytest.raises(ValueError, match="answer"):
        Judge(None, "only {question}")


def test_judge_over_http(tmp_path):
    # The scripted judge reads the answer from the prompt: "evil" answers score high, "nice" low,
    # "refuse" is a refusal; each distribution has a known mean.
    def responder(req):
        assert req["max_tokens"] == 1 and req["temperature"] == 0 and req["top_logprobs"] == 20
        prompt = req["messages"][-1]["content"]
        answer = prompt.split("[ANSWER START]\n")[1].split("\n[ANSWER END]")[0]
        if answer.startswith("evil"):
            return "90", [("90", ln(0.6)), ("80", ln(0.4))]
        if answer.startswith("nice"):
            return "0", [("0", ln(0.5)), ("10", ln(0.25)), (" 20", ln(0.25))]
        return "REFUSAL", [("REFUSAL", ln(0.99)), ("0", ln(0.01))]

    pairs = [("q1", "evil plan"), ("q2", "nice words"), ("q3", "refuse"), ("q4", "evil again")]
    with OpenAIServer(responder) as srv:
        chat = OpenAIChat("judge", base_url=srv.base_url, api_key="k", backoff=0.01)
        with ChatCache(tmp_path / "j.sqlite") as cache:
            judge = Judge(CachedBackend(chat, cache), COHERENCE_RUBRIC)
            scores = judge.score(pairs)
            assert judge.score(pairs) == scores
        assert srv.calls == 4
        sent = [
            b["messages"][0]["content"].split("[QUESTION START]\n")[1].split("\n")[0]
            for b in srv.bodies()
        ]
        assert sorted(sent) == ["q1", "q2", "q3", "q4"]
    assert scores[0] == pytest.approx(86.0)
    assert scores[1] == pytest.approx(7.5)
    assert scores[2] is None
    assert scores[3] == pytest.approx(86.0)
    assert count_missing(scores) == 1
