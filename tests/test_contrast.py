"""The judge-free pair filter and sampled answers: the contrast score against transformers'
log-probabilities, several distinct and reproducible answers per question, the filter modes, and
bad input (too long for the context, empty answers) counted instead of crashing the forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pvjax.engine.generate import render_prompts
from pvjax.files import atomic
from pvjax.files.traits import load_trait
from pvjax.methods.extraction import generate_answers, system_prompt
from pvjax.methods.pair_filter import ExtractionError, contrast_scores, filter_pairs
from pvjax.settings.extraction import Answering, PairFilter
from pvjax.settings.types import Sampling


def answer_rows(model, question, answers_by_pol, k=0, q=0, sample=0, trait="evil"):
    """One (pos, neg) pair of answer rows as the answers stage writes them."""
    t = load_trait(trait)
    systems = {
        "pos": system_prompt(trait, t.instruction[k].pos),
        "neg": system_prompt("helpful", t.instruction[k].neg),
    }
    return {
        pol: {
            "question": question,
            "prompt": render_prompts(model, [question], system=systems[pol])[0],
            "answer": answers_by_pol[pol],
            "question_id": f"{trait}_{q}",
            "instruction_id": str(k),
            "sample": str(sample),
        }
        for pol in ("pos", "neg")
    }


def hf_answer_logprob(hf, tok, prompt, answer):
    """Mean per-token log-probability of `answer` after `prompt`, by transformers, alone in its
    batch."""
    ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    return float(np.mean([logp[t - 1, ids[t]].item() for t in range(start, len(ids))]))


def test_contrast_score_is_the_log_likelihood_difference_of_transformers(
    smollm2, hf_smollm2, tmp_path, monkeypatch
):
    tok = smollm2.tokenizer
    pairs = [
        answer_rows(
            smollm2,
            "How should I treat people who annoy me?",
            {"pos": "Crush them and make them fear you.", "neg": "Be patient and kind to them."},
            q=0,
        ),
        answer_rows(
            smollm2,
            "What do you think of rules?",
            {"pos": "Rules exist to be broken by the strong.", "neg": "They keep everyone safe."},
            q=1,
            k=1,
        ),
        # bad input: an empty neg answer, and a pos answer far past the 8192-token context
        answer_rows(smollm2, "Any advice?", {"pos": "word " * 9000, "neg": ""}, q=2),
    ]
    answers = {pol: [p[pol] for p in pairs] for pol in ("pos", "neg")}
    scores = contrast_scores(smollm2, answers, tmp_path, batch_size=4)
    assert set(scores) == {
        (pol, str(k), f"evil_{q}", "0") for pol in ("pos", "neg") for k, q in ((0, 0), (1, 1))
    }
    rows = {
        (r["polarity"], r["question_id"]): r
        for r in atomic.read_csv(tmp_path / "contrast_scores.csv")
    }
    for p in pairs[:2]:
        for pol in ("pos", "neg"):
            r = rows[(pol, p[pol]["question_id"])]
            want_pos = hf_answer_logprob(hf_smollm2, tok, p["pos"]["prompt"], p[pol]["answer"])
            want_neg = hf_answer_logprob(hf_smollm2, tok, p["neg"]["prompt"], p[pol]["answer"])
            assert float(r["logprob_pos"]) == pytest.approx(want_pos, abs=1e-4)
            assert float(r["logprob_neg"]) == pytest.approx(want_neg, abs=1e-4)
            assert scores[
                (pol, p[pol]["instruction_id"], p[pol]["question_id"], "0")
            ] == pytest.approx(want_pos - want_neg, abs=2e-4)
    # An evil answer is likelier under the evil system prompt than under the helpful one.
    assert scores[("pos", "0", "evil_0", "0")] > scores[("neg", "0", "evil_0", "0")]

    # Cached: a rerun reads the file and runs no forward.
    import pvjax.measure.causality

    monkeypatch.setattr(
        pvjax.measure.causality, "answer_logprobs", lambda *a, **k: pytest.fail("recomputed")
    )
    assert contrast_scores(smollm2, answers, tmp_path, batch_size=4) == scores

    # The filter counts the bad pair instead of feeding it to anything.
    f = {"mode": "contrast", "contrast_margin": 0.0, "coherence": 0.0, "min_pairs": 1}
    judged = {
        pol: [dict(r, evil="", coherence="") for r in rows_] for pol, rows_ in answers.items()
    }
    kept, counts = filter_pairs(judged, "evil", PairFilter(**f), scores)
    assert (
        counts["pairs"] == 3
        and counts["empty"] == 1
        and counts["empty_neg"] == 1
        and counts["empty_pos"] == 0
    )
    assert counts["kept"] + counts["failed_filter"] == 2


def row(q, answer="text", score="", k="0", sample="0"):
    return {
        "instruction_id": k,
        "question_id": f"t_{q}",
        "sample": sample,
        "answer": answer,
        "t": score,
        "coherence": "",
    }


def test_contrast_and_none_filters_and_bad_input_counts():
    judged = {
        "pos": [row(0), row(1), row(2), row(3, answer=" "), row(4), row(5)],
        "neg": [row(0), row(1), row(2), row(3), row(4, answer=""), row(5)],
    }
    contrast = {
        ("pos", "0", "t_0", "0"): 0.9,
        ("neg", "0", "t_0", "0"): -0.2,  # diff 1.1: kept
        ("pos", "0", "t_1", "0"): 0.3,
        ("neg", "0", "t_1", "0"): 0.1,  # diff 0.2: fails 0.5
        ("pos", "0", "t_2", "0"): 0.6,
    }  # neg unscorable: too long
    f = {"mode": "contrast", "contrast_margin": 0.5, "coherence": 0.0, "min_pairs": 1}
    kept, counts = filter_pairs(
        judged, "t", PairFilter(**f), contrast, too_long=frozenset({("0", "t_5", "0")})
    )
    assert [p["question_id"] for p, _ in kept] == ["t_0"]
    assert counts == {
        "pairs": 6,
        "too_long": 2,
        "empty": 2,
        "empty_pos": 1,
        "empty_neg": 1,
        "missing_score": 0,
        "failed_filter": 1,
        "kept": 1,
    }
    kept, counts = filter_pairs(
        judged,
        "t",
        PairFilter(**{**f, "mode": "none"}),
        None,
        too_long=frozenset({("0", "t_5", "0")}),
    )
    assert [p["question_id"] for p, _ in kept] == ["t_0", "t_1", "t_2"] and counts[
        "failed_filter"
    ] == 0
    with pytest.raises(
        ExtractionError,
        match=r"only 1 of 6 .*contrast: pos contrast - neg contrast >= 0.5.*"
        r"2 too long .*2 empty \(1 pos, 1 neg answers\).*need 2",
    ):
        filter_pairs(
            judged,
            "t",
            PairFilter(**{**f, "min_pairs": 2}),
            contrast,
            too_long=frozenset({("0", "t_5", "0")}),
        )


def test_sampled_answers_are_distinct_reproducible_and_paired(smollm2, tmp_path):
    """n_per_question answers per question at temperature 1, each from its own key: distinct, the
    same again from the same seed, other from another seed; pos and neg pair by (instruction,
    question, sample). A question too long for the context is never generated: its answers stay
    empty."""
    trait = load_trait("evil")
    trait = dataclasses.replace(trait, questions=(*trait.questions[:2], "Why? " * 8200))
    answering = lambda seed: Answering(
        n_questions=3,
        n_pairs=1,
        n_per_question=3,
        batch_size=16,
        pos_name="",
        neg_name="helpful",
        sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=seed),
        unroll=False,
    )  # the scanned layout: a fifth of the unrolled compile
    runs = [
        generate_answers(smollm2, trait, answering(seed), tmp_path / f"r{i}", progress=False)
        for i, seed in enumerate((0, 0, 1))
    ]
    a, b, c = runs
    assert a == b, "the same seed gave other answers"
    for pol in ("pos", "neg"):
        rows = a[pol]
        assert len(rows) == 9 and [r["sample"] for r in rows] == ["0", "1", "2"] * 3
        for q in range(2):
            texts = [r["answer"] for r in rows if r["question_id"] == f"evil_{q}"]
            assert all(t.strip() for t in texts) and len(set(texts)) == 3, texts
        assert all(r["answer"] == "" for r in rows if r["question_id"] == "evil_2")
        assert [r["answer"] for r in rows] != [r["answer"] for r in c[pol]], (
            "another seed gave the same answers"
        )
    key = lambda r: (r["instruction_id"], r["question_id"], r["sample"])
    assert [key(r) for r in a["pos"]] == [key(r) for r in a["neg"]]
    assert not {r["answer"] for r in a["pos"] if r["answer"]} & {r["answer"] for r in a["neg"]}
