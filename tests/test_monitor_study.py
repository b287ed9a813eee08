"""The monitoring study end to end on a tiny random model (with the embedded tokenizer): its files,
resumption without regenerating, a judge on loopback replacing the contrast score, the monitor
it saves beside the vector read back by `pvjax generate --json`, and the errors raised before any
model is loaded."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from monitor_tiny import tiny_checkpoint
from openai_server import OpenAIServer

import pvjax
from configs.monitor import get_config
from pvjax.cli import main
from pvjax.files import atomic
from pvjax.files.vectors import VectorError, save_vectors
from pvjax.methods import monitoring as mon
from pvjax.studies import monitor as study
from pvjax.studies.vector_source import MissingVector


@pytest.fixture(scope="module")
def setup(tokenizer):
    folder, _, model = tiny_checkpoint(tokenizer)
    root = folder.parent
    v = (
        np.random.default_rng(0)
        .standard_normal((model.n_layers + 1, model.hidden_size))
        .astype(np.float32)
    )
    vpath = save_vectors(
        root / "vec" / "vectors.safetensors", {"response_avg_diff": v}, model=model, trait="evil"
    )
    return root, model, v, vpath


def small_config(setup, **kw):
    root, model, v, vpath = setup
    cfg = get_config("runlocal")
    cfg.model, cfg.vector, cfg.trait = str(root / "tiny"), str(vpath), "evil"
    cfg.n_questions, cfg.shots, cfg.trace_turns = 2, (0, 1, 2), 1
    cfg.max_new_tokens = 8
    cfg.bootstrap.n, cfg.batch_size = 200, 32  # one engine call per round
    for k, val in kw.items():  # "a.b": nested fields
        *parents, leaf = k.split(".")
        target = cfg
        for p in parents:
            target = target[p]
        target[leaf] = val
    return cfg


@pytest.fixture(scope="module")
def finished(setup):
    root = setup[0]
    work = root / "run"
    rows = study.run(small_config(setup), work, progress=False)
    return work, rows


def no_engine(monkeypatch):
    """Generation and model loads fail loudly: what runs must come from the files."""

    def boom(*a, **k):
        raise AssertionError("recomputed")

    import pvjax.engine.generate

    monkeypatch.setattr(pvjax.engine.generate, "generate", boom)
    monkeypatch.setattr(pvjax.engine.generate, "generate_ids", boom)
    return boom


def test_study_writes_its_tables_plots_and_monitor(finished, setup):
    work, rows = finished
    _, model, v, vpath = setup
    L = model.n_layers + 1
    for f in (
        "config.json",
        "stages.json",
        "answers/round1_0.csv",
        "answers/round2_0.csv",
        "scores.csv",
        "projections.npy",
        "points.csv",
        "correlations.csv",
        "trace.csv",
        "trace.json",
        "scatter.png",
        "r_by_layer.png",
        "trace.png",
        "monitor.json",
        "summary.json",
        "DONE",
    ):
        assert (work / f).exists(), f
    assert [(r["experiment"], r["layer"]) for r in rows] == [
        (e, l) for e in ("system_prompts", "many_shot", "combined") for l in range(L)
    ]
    assert {r["score"] for r in rows} == {"contrast"}
    points = atomic.read_csv(work / "points.csv")
    assert len(points) == 8 * 2 + 3 * 2
    # every row's r is the hand Pearson of the points it summarises
    for exp in ("system_prompts", "many_shot"):
        pts = [p for p in points if p["experiment"] == exp]
        for r in rows:
            if r["experiment"] == exp and r["r"] is not None:
                x = [float(p[f"layer_{r['layer']}"]) for p in pts]
                assert r["r"] == pytest.approx(
                    mon.pearson(x, [float(p["score"]) for p in pts]), abs=1e-6
                )
                assert r["r_low"] <= r["r"] <= r["r_high"] and r["n"] == len(pts)
    # layer 0 holds the embedding of the same last token for every prompt: undefined, said so
    assert all(
        r["r"] is None and "projection is constant" in r["note"] for r in rows if r["layer"] == 0
    )
    # the contrast scores are the engine's log-likelihoods under the pos and neg prompts
    s = atomic.read_csv(work / "scores.csv")[0]
    assert float(s["score"]) == pytest.approx(
        float(s["logprob_pos"]) - float(s["logprob_neg"]), abs=1e-6
    )
    # the monitor beside the vector is the one in the run directory, and fits model and vector
    m = mon.load_monitor(mon.monitor_path(str(vpath)), model, vector_LD=v)
    assert m == mon.load_monitor(work / "monitor.json")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["score"] == "contrast" and summary["monitor"]["layer"] == m.layer
    assert m.n == 22 and m.score_kind == "contrast" and m.label.startswith("contrast score")
    # the trace covers the conversation and the answer, and its projections are the engine's
    tr = json.loads((work / "trace.json").read_text())
    assert len(tr["tokens"]) == len(tr["roles"]) > tr["n_prompt"]
    assert tr["roles"][: tr["n_prompt"]].count("assistant") > 0 and tr["roles"][-1] == "assistant"
    trace = atomic.read_csv(work / "trace.csv")
    gen = [r for r in trace if r["generated"] == "1"]
    assert len(gen) == len(trace) - tr["n_prompt"] > 0
    answers = atomic.read_csv(work / "answers" / "round2_0.csv")
    assert answers[-1]["experiment"] == "trace" and tr["answer"] == answers[-1]["answer"]
    # at the last prompt token the trace reads what the monitor reads
    shots = [
        {"question": r["question"], "answer": r["answer"].strip()}
        for r in atomic.read_csv(work / "answers" / "round1_0.csv")
        if r["experiment"] == "shots"
    ]
    msgs = study._trace_messages(shots, small_config(setup), answers[-1]["question"])
    want = mon.last_prompt_projections(model, mon.prompt_ids(model, [msgs]), v)[0]
    got = [float(trace[tr["n_prompt"] - 1][f"layer_{l}"]) for l in range(L)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_finished_run_is_returned_without_the_model(finished, setup, monkeypatch, tmp_path):
    work, rows = finished
    monkeypatch.setattr(
        pvjax, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
    )
    assert study.run(small_config(setup), work, progress=False) == rows
    # the same config naming a file whose vector changed is not the finished run: the work starts
    # again
    import shutil

    root, model, v, _ = setup
    other = save_vectors(
        tmp_path / "v.safetensors", {"response_avg_diff": v + 1}, model=model, trait="evil"
    )
    shutil.copytree(work, tmp_path / "run")
    cfg = small_config(setup, vector=str(other))
    atomic.write_json(tmp_path / "run" / "config.json", cfg.to_dict())
    with pytest.raises(AssertionError, match="loaded"):
        study.run(cfg, tmp_path / "run", progress=False)


def test_an_interrupted_run_resumes_from_its_files(finished, setup, tmp_path, monkeypatch):
    import shutil

    work, rows = finished
    copy = tmp_path / "run"
    shutil.copytree(work, copy)
    for f in ("DONE", "correlations.csv", "monitor.json", "summary.json", "scatter.png"):
        (copy / f).unlink()
    (copy / "scores.csv").unlink()  # killed while scoring
    no_engine(monkeypatch)
    assert study.run(small_config(setup), copy, progress=False) == rows


def test_a_judge_replaces_the_contrast_score_and_reuses_the_answers(
    finished, setup, tmp_path, monkeypatch
):
    import shutil

    work, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(work, copy)
    no_engine(monkeypatch)

    def judge(request):  # a deterministic judge: 89 (90 and 80 mixed) or 10, by the request's hash
        high = hashlib.sha256(request["messages"][-1]["content"].encode()).digest()[0] % 2
        return (
            ("90", [("90", math.log(0.9)), ("80", math.log(0.1))])
            if high
            else ("10", [("10", 0.0)])
        )

    with OpenAIServer(judge) as srv:
        cfg = small_config(
            setup,
            **{
                "judge.backend": "openai",
                "judge.model": "j",
                "judge.base_url": srv.base_url,
                "monitor.save_beside_vector": False,
            },
        )
        rows = study.run(cfg, copy, progress=False)
        assert srv.calls > 0
    assert {r["score"] for r in rows} == {"judge"}
    scores = {float(r["score"]) for r in atomic.read_csv(copy / "scores.csv")}
    assert scores <= {10.0, 89.0}
    assert json.loads((copy / "summary.json").read_text())["score"] == "judge"


def test_generate_json_reports_the_monitor_flag(finished, setup, capsys):
    _, model, v, vpath = setup
    m = mon.load_monitor(mon.monitor_path(str(vpath)))
    prompts = ["Hi there", "How do I fix a bike?"]
    args = [
        "generate",
        "--model",
        str(setup[0] / "tiny"),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--max-new-tokens",
        "4",
        "--json",
    ]
    # beside --vector (coefficient 0: the unsteered prompt), found without asking
    assert main(args + ["--vector", str(vpath), "--layer", "1", "--coef", "0"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = mon.last_prompt_projections(model, mon.prompt_ids(model, prompts), v)[:, m.layer]
    for r, w in zip(rows, want):
        assert r["monitor"]["layer"] == m.layer and r["monitor"]["threshold"] == m.threshold
        assert r["monitor"]["projection"] == pytest.approx(float(w), abs=2e-3)
        assert r["monitor"]["flagged"] == (r["monitor"]["projection"] >= m.threshold)
    # given explicitly, with no vector at all
    assert main(args + ["--monitor", str(mon.monitor_path(str(vpath)))]) == 0
    alone = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["monitor"]["flagged"] for r in alone] == [r["monitor"]["flagged"] for r in rows]


def test_generate_refuses_a_monitor_of_another_model(setup, tmp_path, capsys):
    root, model, v, vpath = setup
    other = mon.load_monitor(mon.monitor_path(str(vpath)))
    bad = tmp_path / "x.monitor.json"
    bad.write_text(
        json.dumps({**other.to_json(), "model_fingerprint": "0" * 16, "model_id": "big-model"})
    )
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(root / "tiny"), "--prompt", "Hi", "--monitor", str(bad)])
    assert e.value.code == 2 and "calibrated on big-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "generate",
                "--model",
                str(root / "tiny"),
                "--prompt",
                "Hi",
                "--monitor",
                str(tmp_path / "none.json"),
            ]
        )
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(
        pvjax, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded"))
    )


def test_bad_input_is_refused_before_the_model_loads(setup, tmp_path, no_load):
    root = setup[0]
    with pytest.raises(
        VectorError, match="the monitor of trait 'evil' needs its vector: .* does not exist"
    ):
        study.run(
            small_config(setup, vector=str(root / "missing.safetensors")), tmp_path, progress=False
        )
    with pytest.raises(study.MonitorStudyError, match="extracted for trait 'evil', not 'humorous'"):
        study.run(small_config(setup, trait="humorous"), tmp_path, progress=False)
    cfg = small_config(setup, vector="")
    del cfg["extract"]
    with pytest.raises(MissingVector, match="no `vector`"):
        study.run(cfg, tmp_path, progress=False)
    with pytest.raises(
        study.MonitorStudyError, match="many_shot: 1 conditions x 1 questions = 1 points"
    ):
        study.run(
            small_config(setup, system_prompts=False, shots=(0,), n_questions=1),
            tmp_path,
            progress=False,
        )
    with pytest.raises(study.MonitorStudyError, match="monitor.rule must be one of"):
        study.run(small_config(setup, **{"monitor.rule": "best"}), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()


def test_shipped_config_variants_load_and_pass_the_checks():
    from pathlib import Path

    from pvjax.commands.extract import load_config

    here = str(Path(__file__).parent.parent / "configs" / "monitor.py")
    for variant in ("", ":runlocal"):
        cfg = load_config(
            here + variant, ["--config.trait=humorous", "--config.extract.n_questions=3"]
        )
        assert cfg.study == "monitor" and cfg.extract.n_questions == 3 and cfg.vector == ""
        _, _, questions, exps = study.check_config(cfg)
        assert exps == ["system_prompts", "many_shot"] and len(questions) == (6 if variant else 20)
