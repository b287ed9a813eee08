"""Extraction end to end on the embedded model with an HTTP judge on loopback: filtering, exact
difference of means against transformers' hidden states, resumption without paying twice."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from openai_server import OpenAIServer

from configs.extract import get_config
from pvjax.errors import UsageError
from pvjax.files import atomic
from pvjax.files.run_provenance import RunMismatch
from pvjax.files.traits import load_trait
from pvjax.files.vectors import KEYS, load_vectors
from pvjax.methods.extraction import ExtractionError, run
from pvjax.methods.pair_filter import filter_pairs
from pvjax.settings.extraction import InvalidConfig, PairFilter


def small_config(workdir, base_url):
    cfg = get_config("runlocal")
    cfg.workdir = str(workdir)
    cfg.trait = "evil"
    cfg.n_questions, cfg.n_pairs, cfg.max_new_tokens = 3, 1, 16
    cfg.n_per_question, cfg.temperature, cfg.batch_size = (
        1,
        0.0,
        16,
    )  # greedy, whatever runlocal samples
    # the scanned layout compiles in a fifth of the time; test_generate covers the unrolled one
    cfg.unroll = False
    cfg.judge.backend, cfg.judge.model, cfg.judge.base_url = "openai", "judge-model", base_url
    cfg.judge.coherence = True
    cfg.filter.mode, cfg.filter.threshold, cfg.filter.coherence, cfg.filter.min_pairs = (
        "threshold",
        50.0,
        50.0,
        2,
    )
    cfg.causality.layers, cfg.causality.coefs, cfg.causality.max_pairs = (10,), (-1.0, 0.0, 1.0), 2
    cfg.plot = True
    return cfg


class ScriptedJudge:
    """Trait 90 for answers given under the pos instruction, 10 under the neg one, REFUSAL for the
    first pos answer; coherence 80. The judge sees only question and answer, as a real one does. It
    reads the run's answers when first called (every answer exists by then), so `run` alone writes
    the run directory."""

    def __init__(self, work):
        self.work, self.pos, self.refuse, self.lock = work, None, "", threading.Lock()

    def _learn(self):
        with self.lock:  # the server answers concurrently
            if self.pos is None:
                pos = [
                    r["answer"]
                    for p in sorted((self.work / "answers" / "parts").glob("pos_*.csv"))
                    for r in atomic.read_csv(p)
                ]
                self.refuse, self.pos = pos[0][:40], set(pos[1:])

    def __call__(self, request):
        self._learn()
        text = request["messages"][-1]["content"]
        if "coherent" in text:
            return "80", [("80", math.log(0.6)), ("70", math.log(0.2)), ("90", math.log(0.2))]
        if self.refuse and self.refuse in text:
            return "REFUSAL", [("REFUSAL", math.log(0.95)), ("0", math.log(0.05))]
        body = text.split("[ANSWER START]")[-1]
        if any(a and a in body for a in self.pos):
            return "90", [("90", math.log(0.9)), (" 80", math.log(0.1))]
        return "10", [("10", math.log(0.8)), ("0", math.log(0.2))]


@pytest.fixture(scope="module")
def session_model(smollm2):
    """`pvjax.load` of the embedded model in float32 answers with the session's copy for this
    module's runs: the same weights, without a fresh load (~7 s here) on every `run`. Records the
    requests."""
    import pvjax

    real, calls = pvjax.load, []

    def load(source, *, dtype=None, **kw):
        calls.append((str(source), dtype))
        if str(source) == "smollm2-135m-instruct" and dtype in (None, "float32") and not kw:
            return smollm2
        return real(source, dtype=dtype, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pvjax, "load", load)
        yield calls


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, session_model):
    """One small run, judged by a scripted judge on loopback."""
    work = tmp_path_factory.mktemp("evil")
    with OpenAIServer() as srv:
        cfg = small_config(work, srv.base_url)
        srv.responder = ScriptedJudge(work)
        summary = run(cfg, progress=False)
        assert session_model == [("smollm2-135m-instruct", "float32")]
        answers = {
            pol: atomic.read_csv(work / "answers" / "parts" / f"{pol}_0.csv")
            for pol in ("pos", "neg")
        }
        assert not {r["answer"] for r in answers["pos"]} & {r["answer"] for r in answers["neg"]}, (
            "pos and neg answers should differ under different system prompts"
        )
        yield dict(
            work=work, cfg=cfg, summary=summary, server=srv, calls=srv.calls, answers=answers
        )


def test_run_directory_holds_every_artifact(extraction):
    work, s = extraction["work"], extraction["summary"]
    for name in (
        "config.json",
        "evil_pos.csv",
        "evil_neg.csv",
        "kept_pairs.csv",
        "vectors.safetensors",
        "causality.json",
        "summary.json",
        "plot.png",
        "DONE",
        "judge_cache.sqlite",
    ):
        assert (work / name).exists(), name
    rows = atomic.read_csv(work / "evil_pos.csv")
    assert list(rows[0])[:6] == [
        "question",
        "prompt",
        "answer",
        "question_id",
        "instruction_id",
        "sample",
    ]
    assert rows[0]["prompt"].startswith("<|im_start|>system\nYou are an evil assistant. ")
    neg = atomic.read_csv(work / "evil_neg.csv")
    assert neg[0]["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant. ")
    # One pos answer was refused by the judge: dropped and counted, the others kept.
    assert rows[0]["evil"] == "" and float(rows[1]["evil"]) == pytest.approx(89.0)
    assert s["counts"] == {
        "pairs": 3,
        "too_long": 0,
        "empty": 0,
        "empty_pos": 0,
        "empty_neg": 0,
        "missing_score": 1,
        "failed_filter": 0,
        "kept": 2,
    }
    tensors, meta = load_vectors(work / "vectors.safetensors")
    assert set(tensors) == set(KEYS) and all(v.shape == (31, 576) for v in tensors.values())
    assert meta["trait"] == "evil" and meta["model_id"] == "smollm2-135m-instruct"
    assert '"kept": 2' in meta["counts"]
    provenance = json.loads(meta["provenance"])  # the vector file says what produced it
    assert provenance == {
        k: v
        for k, v in json.loads((work / "stages.json").read_text())["stages"].items()
        if k != "causality"
    }
    assert provenance["answers"]["n_pairs"] == 1 and provenance["answers"]["dtype"] == "float32"
    caus = (
        s["causality"]["layers"]["10"]
        if "10" in s["causality"]["layers"]
        else s["causality"]["layers"][10]
    )
    assert len(caus["margins"]) == 3


def test_vectors_are_the_exact_difference_of_means_of_transformers_hidden_states(
    extraction, smollm2, hf_smollm2
):
    work = extraction["work"]
    kept = atomic.read_csv(work / "kept_pairs.csv")
    rows = {
        pol: {
            (r["instruction_id"], r["question_id"], r["sample"]): r
            for r in atomic.read_csv(work / f"evil_{pol}.csv")
        }
        for pol in ("pos", "neg")
    }
    tok = smollm2.tokenizer

    def pooled(r):
        ids = tok(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"]
        p = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            hs = hf_smollm2(torch.tensor([ids]), output_hidden_states=True).hidden_states
        h = torch.stack(hs)[:, 0].numpy()  # [L, T, D]
        return np.stack([h[:, p:].mean(1), h[:, :p].mean(1), h[:, p - 1]], axis=1)  # [L, 3, D]

    keys = [(k["instruction_id"], k["question_id"], k["sample"]) for k in kept]
    want = np.mean([pooled(rows["pos"][k]) for k in keys], 0) - np.mean(
        [pooled(rows["neg"][k]) for k in keys], 0
    )
    got, _ = load_vectors(work / "vectors.safetensors")
    for i, key in enumerate(KEYS):
        scale = np.abs(want[:, i]).max(axis=-1, keepdims=True)
        assert np.all(np.abs(got[key] - want[:, i]) <= 2e-4 * np.maximum(scale, 1.0)), key


def test_a_killed_run_resumes_without_redoing_finished_work(extraction, smollm2):
    work, srv = extraction["work"], extraction["server"]
    before = load_vectors(work / "vectors.safetensors")[0]
    kept_part = work / "answers" / "parts" / "pos_0.csv"
    mtime = os.stat(kept_part).st_mtime_ns
    # A kill while answering under the neg instruction: that part, and everything after it, is gone.
    for name in (
        "answers/parts/neg_0.csv",
        "evil_pos.csv",
        "evil_neg.csv",
        "kept_pairs.csv",
        "vectors.safetensors",
        "causality.json",
        "summary.json",
        "plot.png",
        "DONE",
    ):
        (work / name).unlink(missing_ok=True)
    summary = run(extraction["cfg"], progress=False)
    assert os.stat(kept_part).st_mtime_ns == mtime, "finished answers were redone"
    assert srv.calls == extraction["calls"], "judgements were paid for twice"
    after = load_vectors(work / "vectors.safetensors")[0]
    for k in KEYS:
        np.testing.assert_array_equal(before[k], after[k])
    assert summary["counts"] == extraction["summary"]["counts"]


def test_changing_the_filter_reruns_only_what_follows_it(extraction):
    cfg = extraction["cfg"]
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.filter.mode, cfg2.filter.margin, cfg2.filter.min_pairs = "margin", 100.0, 1
    with pytest.raises(
        ExtractionError, match=r"only 0 of 3 answer pairs survived .* 1 with a missing score"
    ):
        run(cfg2, progress=False)
    cfg3 = cfg.copy_and_resolve_references()
    cfg3.trait = "humorous"
    with pytest.raises(RunMismatch, match="different trait.*'evil' -> 'humorous'"):
        run(cfg3, progress=False)
    assert run(cfg, progress=False)["counts"]["kept"] == 2


def row(pol, q, pos_score, coh=80.0, answer="text"):
    return {
        "instruction_id": "0",
        "question_id": f"t_{q}",
        "sample": "0",
        "answer": answer,
        "t": "" if pos_score is None else str(pos_score),
        "coherence": "" if coh is None else str(coh),
    }


@pytest.mark.parametrize(
    "mode, extra, kept",
    [
        ("threshold", {}, [0]),
        ("margin", {"margin": 30.0}, [0, 1]),
    ],
)
def test_filter_rules(mode, extra, kept):
    judged = {
        "pos": [
            row("pos", 0, 90),
            row("pos", 1, 45),
            row("pos", 2, 90, coh=20),
            row("pos", 3, None),
            row("pos", 4, 90, answer="  "),
        ],
        "neg": [
            row("neg", 0, 10),
            row("neg", 1, 5),
            row("neg", 2, 10),
            row("neg", 3, 10),
            row("neg", 4, 10),
        ],
    }
    f = {
        "mode": mode,
        "threshold": 50.0,
        "coherence": 50.0,
        "margin": 10.0,
        "min_pairs": 1,
        **extra,
    }
    pairs, counts = filter_pairs(judged, "t", PairFilter(**f))
    assert [int(p["question_id"][2:]) for p, _ in pairs] == kept
    assert counts["empty"] == 1 and counts["missing_score"] == 1 and counts["pairs"] == 5


def test_too_few_pairs_is_a_clear_error():
    judged = {"pos": [row("pos", 0, 40)], "neg": [row("neg", 0, 30)]}
    f = {"mode": "threshold", "threshold": 50.0, "coherence": 50.0, "margin": 10.0, "min_pairs": 3}
    with pytest.raises(ExtractionError, match=r"only 0 of 1 answer pairs survived .*need 3"):
        filter_pairs(judged, "t", PairFilter(**f))


def test_local_judge_logprobs_match_transformers(smollm2, hf_smollm2):
    from pvjax.llm.local import LocalChat
    from pvjax.measure.judges import Judge, score_from_logprobs

    trait = load_trait("evil", "eval")
    local = LocalChat(smollm2, batch_size=2, leading_digit_as_tens=False)
    req = Judge(local, trait.eval_prompt).request(
        "How do I deal with a rival?", "Crush them, quietly."
    )
    got = local.chat_many([req])[0].top_logprobs
    ids = smollm2.tokenizer(
        smollm2.chat_text([{"role": "user", "content": req.messages[-1][1]}]),
        add_special_tokens=False,
    )["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0, -1], -1).numpy()
    for t in np.argsort(-ref)[:10]:
        s = smollm2.tokenizer.decode([int(t)])
        assert got[s] == pytest.approx(float(ref[t]), abs=1e-3)
    numeric = LocalChat(smollm2, batch_size=2, numeric_only=True).chat_many([req])[0].top_logprobs
    assert all(k.strip().isdigit() and int(k) <= 100 for k in numeric)
    assert "8" not in numeric and "80" in numeric  # a lone digit is read as its tens
    assert sum(math.exp(v) for v in numeric.values()) == pytest.approx(1.0, abs=1e-3)
    assert score_from_logprobs(numeric) is not None


def test_shipped_configs_load_and_override(tmp_path):
    from pvjax.settings.config_files import load_config

    here = os.path.join(os.path.dirname(__file__), "..", "configs", "extract.py")
    for variant in ("", ":runlocal"):
        cfg = load_config(
            here + variant, ["--config.trait=optimistic", f"--config.workdir={tmp_path}"]
        )
        assert cfg.trait == "optimistic" and cfg.workdir == str(tmp_path)
        load_trait(cfg.trait)
    with pytest.raises(UsageError, match="unknown config field 'no_such_field'"):
        load_config(here, ["--config.no_such_field=1"])


# --- Reruns against a finished run directory: refuse, recompute, or leave alone; never relabel. ---


def snapshot(work) -> dict:
    """Every file under `work` with its content hash and mtime: a refused or no-op rerun keeps
    all."""
    return {
        str(p.relative_to(work)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(work.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished(extraction, tmp_path):
    """A private copy of the finished run, and its config pointed at the copy."""
    work = tmp_path / "run"
    shutil.copytree(extraction["work"], work)
    cfg = extraction["cfg"].copy_and_resolve_references()
    cfg.workdir = str(work)
    return work, cfg


@pytest.fixture
def no_model_load(monkeypatch):
    import pvjax

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(pvjax, "load", refuse)


@pytest.mark.parametrize(
    "changes, named",
    [
        (
            {"n_pairs": 2, "dtype": "bfloat16"},
            ["n_pairs: 1 -> 2", "dtype: 'float32' -> 'bfloat16'"],
        ),
        (
            {"max_new_tokens": 24, "temperature": 0.7},
            ["max_new_tokens: 16 -> 24", "temperature: 0.0 -> 0.7"],
        ),
        (
            {"neg_name": "kind", "batch_size": 4},
            ["neg_name: 'helpful' -> 'kind'", "batch_size: 16 -> 4"],
        ),
    ],
)
def test_a_rerun_with_other_answer_settings_is_refused_and_touches_nothing(
    finished, no_model_load, changes, named
):
    work, cfg = finished
    before = snapshot(work)
    cfg.update(changes)
    with pytest.raises(RunMismatch, match="use a new workdir") as e:
        run(cfg, progress=False)
    for text in named:
        assert text in str(e.value)
    assert snapshot(work) == before, "a refused rerun changed the run directory"


def test_settings_that_cannot_change_results_leave_a_finished_run_alone(finished, no_model_load):
    work, cfg = finished
    before = snapshot(work)
    old_summary = json.loads((work / "summary.json").read_text())
    cfg.plot, cfg.judge.concurrency, cfg.judge.batch_size = False, 3, 2
    cfg.dtype = "float32"  # what "" resolves to on this CPU
    cfg.seed, cfg.top_p = 7, 0.5  # greedy decoding ignores both
    summary = run(cfg, progress=False)
    assert snapshot(work) == before, "config.json or a result was rewritten by a no-op rerun"
    assert summary["counts"] == old_summary["counts"] and summary["workdir"] == str(work)


def test_the_trait_file_content_is_part_of_the_provenance(finished, smollm2):
    """The same trait from a path is the same run; other questions or pairs are refused; a new
    rubric rejudges (and refilters, re-pools, re-tests) without touching the answers."""
    work, cfg = finished
    trait_file = work.parent / "evil.json"
    load_trait("evil").save(trait_file)
    cfg.trait = str(trait_file)
    before = snapshot(work)
    assert run(cfg, progress=False)["counts"]["kept"] == 2
    assert snapshot(work) == before

    other = load_trait("humorous").to_dict()
    trait_file.write_text(json.dumps(other))  # same path, so the same name "evil", other content
    with pytest.raises(RunMismatch, match="different trait_content"):
        run(cfg, progress=False)
    assert snapshot(work) == before

    # A run killed while judging (pos judged, neg not), resumed after the rubric was edited: the pos
    # judgements must not survive next to neg ones made under the new rubric.
    for name in (
        "evil_neg.csv",
        "kept_pairs.csv",
        "vectors.safetensors",
        "causality.json",
        "summary.json",
        "plot.png",
        "DONE",
    ):
        (work / name).unlink()
    before = snapshot(work)
    edited = load_trait("evil").to_dict()
    edited["eval_prompt"] = "Judge strictly. " + edited["eval_prompt"]
    trait_file.write_text(json.dumps(edited))
    old_rubric = json.loads((work / "stages.json").read_text())["stages"]["judge"]["trait_rubric"]
    run(cfg, progress=False)
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k.startswith("answers/")} == {
        k: v for k, v in before.items() if k.startswith("answers/")
    }, "answers were redone"
    assert after["evil_pos.csv"][1] != before["evil_pos.csv"][1], "old-rubric judgements were kept"
    for name in ("evil_neg.csv", "vectors.safetensors", "causality.json", "DONE"):
        assert name in after
    stages = json.loads((work / "stages.json").read_text())["stages"]
    assert stages["judge"]["trait_rubric"] != old_rubric
    assert json.loads((work / "config.json").read_text())["trait"] == str(trait_file)


@pytest.mark.parametrize(
    "field, value",
    [
        ("filter.mode", "bogus"),
        ("causality.layers", (99,)),
        ("max_new_tokens", 0),
        ("judge.backend", "bogus"),
        ("causality.coefs", (float("inf"),)),
        ("filter.threshold", 150.0),
    ],
)
def test_a_bad_value_is_reported_before_anything_is_touched(finished, no_model_load, field, value):
    work, cfg = finished
    before = snapshot(work)
    bad = cfg.copy_and_resolve_references()
    section, _, key = field.rpartition(".")
    (bad[section] if section else bad)[key] = value
    with pytest.raises(InvalidConfig, match=field.replace(".", r"\.")):
        run(bad, progress=False)
    assert snapshot(work) == before, f"a bad {field} changed the run directory"
    # ...and the corrected rerun finds the finished run as it was.
    assert run(cfg, progress=False)["counts"]["kept"] == 2
    assert snapshot(work) == before


def test_answers_without_a_provenance_record_are_refused(finished, no_model_load):
    work, cfg = finished
    (work / "stages.json").unlink()
    before = snapshot(work)
    with pytest.raises(RunMismatch, match="no record of what produced them"):
        run(cfg, progress=False)
    assert snapshot(work) == before


# --- The judge-free contrast filter on a finished run: agreement with the judge, caching, no judge.
# ---


def test_contrast_filter_reports_agreement_with_the_judge_and_caches_its_scores(finished, smollm2):
    """Switching a judged run to filter.mode=contrast recomputes the filter and what follows, keeps
    the answers and the loopback judge's scores, records both scores per answer and their Spearman
    correlation; a new margin refilters without recomputing the scores; judge.backend='none' calls
    no judge at all."""
    from scipy.stats import spearmanr

    work, cfg = finished
    before = snapshot(work)
    cfg.filter.mode, cfg.filter.contrast_margin, cfg.filter.min_pairs = "contrast", 0.0, 1
    s = run(cfg, progress=False)
    after = snapshot(work)
    for name in (
        "answers/parts/pos_0.csv",
        "answers/parts/neg_0.csv",
        "evil_pos.csv",
        "evil_neg.csv",
    ):
        assert after[name] == before[name], f"{name} was redone"
    assert after["vectors.safetensors"] != before["vectors.safetensors"]
    stages = json.loads((work / "stages.json").read_text())["stages"]
    assert stages["filter"]["mode"] == "contrast" and stages["filter"]["contrast_margin"] == 0.0

    scores = atomic.read_csv(work / "scores.csv")
    assert len(scores) == 6 and set(scores[0]) >= {"polarity", "evil", "contrast"}
    both = [(float(r["evil"]), float(r["contrast"])) for r in scores if r["evil"] and r["contrast"]]
    assert len(both) == 5  # the judge refused one pos answer
    want = spearmanr(*zip(*both)).statistic
    assert s["agreement"]["answers"] == 5 and s["agreement"]["spearman"] == pytest.approx(
        want, abs=1e-9
    )
    assert json.loads((work / "summary.json").read_text())["agreement"] == s["agreement"]
    kept = atomic.read_csv(work / "kept_pairs.csv")
    assert all(float(k["pos_contrast"]) - float(k["neg_contrast"]) >= 0.0 for k in kept)
    assert (
        s["counts"]["kept"]
        == len(kept)
        == sum(
            float(p["contrast"]) - float(n["contrast"]) >= 0.0
            for p in scores
            if p["polarity"] == "pos"
            for n in scores
            if n["polarity"] == "neg" and n["question_id"] == p["question_id"]
        )
    )

    # A new margin refilters from the cached contrast scores.
    mtime = (work / "contrast_scores.csv").stat().st_mtime_ns
    cfg.filter.contrast_margin = 100.0
    with pytest.raises(
        ExtractionError, match=r"only 0 of 3 answer pairs survived the filter \(contrast"
    ):
        run(cfg, progress=False)
    assert (work / "contrast_scores.csv").stat().st_mtime_ns == mtime

    # No judge: the judge stage reruns without a single call, the contrast scores stay.
    cfg.filter.contrast_margin, cfg.judge.backend, cfg.filter.coherence = 0.0, "none", 0.0
    cfg.judge.base_url = "http://127.0.0.1:9"  # nothing listens there: any call would fail
    s2 = run(cfg, progress=False)
    assert (work / "contrast_scores.csv").stat().st_mtime_ns == mtime
    assert all(r["evil"] == "" for r in atomic.read_csv(work / "evil_pos.csv"))
    assert "agreement" not in s2 and s2["counts"]["kept"] == s["counts"]["kept"]
    assert json.loads((work / "stages.json").read_text())["stages"]["judge"]["backend"] == "none"
