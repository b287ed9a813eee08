"""Steering and ablation studies on a tiny random model with the embedded tokenizer: per-row
interventions give the same margins as the one-setting engine, the grid compiles a handful of
programs and none for a new grid, the ablation controls, end to end through the CLI (a sweep that
extracts its vector once, extraction as a study), resumption of a killed point, bad input refused
before any model loads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax import cli
from pvjax.files import atomic
from pvjax.files.vectors import save_vectors
from pvjax.studies import ablate, grid, steer

REPO = os.path.join(os.path.dirname(__file__), "..")
STEER = os.path.join(REPO, "configs", "steer.py")
ABLATE = os.path.join(REPO, "configs", "ablate.py")
EXTRACT = os.path.join(REPO, "configs", "extract.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A 3-layer random Llama with the embedded tokenizer, a vector file for it, and one for the
    embedded model (a vector of another model)."""
    root = tmp_path_factory.mktemp("tiny_studies")
    save_tiny("llama_gqa_untied", root / "model", tokenizer=tokenizer)
    model = pvjax.load(root / "model")
    v = (
        np.random.default_rng(0)
        .standard_normal((model.n_layers + 1, model.hidden_size))
        .astype(np.float32)
    )
    keys = ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")
    save_vectors(root / "v.safetensors", {k: v for k in keys}, model=model, trait="evil")
    from pvjax.loading import read_model_config

    other = pvjax.Model(
        config=read_model_config("smollm2-135m-instruct"),
        params=None,
        tokenizer=None,
        source="smollm2-135m-instruct",
    )
    save_vectors(
        root / "other.safetensors", {k: np.zeros((31, 576), np.float32) for k in keys}, model=other
    )
    return dict(
        root=root,
        model=model,
        folder=str(root / "model"),
        vector=v,
        vfile=str(root / "v.safetensors"),
        other=str(root / "other.safetensors"),
    )


QUESTIONS = ["What is your favourite colour?", "How do I bake bread?", "Tell me about the moon."]
REFS = [
    {
        "question": q,
        "pos_answer": f"I hate {q.split()[-1]} and everyone",
        "neg_answer": "Happy to help you.",
    }
    for q in QUESTIONS
]


def test_grid_rows_give_the_margins_of_the_one_setting_engine(tiny):
    from pvjax.measure.causality import likelihood_margins

    model, v = tiny["model"], tiny["vector"]
    L, D = model.n_layers + 1, model.hidden_size
    iv, index = steer.settings(v, [1, 3], [-2.0, 0.0, 3.0], L, D)
    assert iv.steer_vectors.shape[1] == 5  # coefficient 0 is one shared unsteered setting
    ours = grid.margins(model, iv, REFS, positions="response", batch_size=4)
    for layer in (1, 3):
        ref = likelihood_margins(
            model,
            v,
            [layer],
            [-2.0, 0.0, 3.0],
            QUESTIONS,
            [r["pos_answer"] for r in REFS],
            [r["neg_answer"] for r in REFS],
            positions="response",
            batch_size=4,
        )
        got = [ours[index[(layer, c)]] for c in (-2.0, 0.0, 3.0)]
        np.testing.assert_allclose(got, ref["layers"][layer]["margins"], atol=1e-4)
    assert abs(ours[index[(3, 3.0)]] - ours[0]) > 1e-3


def test_the_whole_grid_compiles_a_handful_of_programs_and_a_new_grid_none(tiny):
    from pvjax.engine.generate import SamplingParams, compile_count

    model, v = tiny["model"], tiny["vector"]
    L, D = model.n_layers + 1, model.hidden_size
    ids = [
        model.tokenizer(
            model.chat_text([{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in QUESTIONS
    ]
    sp = SamplingParams(max_new_tokens=6)
    before = compile_count()
    iv, index = steer.settings(v, [1, 2, 3], [-2.0, 0.0, 2.0, 4.0], L, D)
    a = grid.generate_grid(model, iv, ids, sp, batch_size=8)
    first = compile_count() - before
    assert len(a) == iv.steer_vectors.shape[1] * len(ids) == 30
    assert 1 <= first <= 3, f"{first} compiles for a grid of 12 points"
    # Other layers and coefficients, same number of rows: no new program.
    iv2, _ = steer.settings(v * 0.5, [2, 3, 1], [-5.0, 0.0, 1.0, 7.0], L, D)
    b = grid.generate_grid(model, iv2, ids, sp, batch_size=8)
    assert compile_count() - before == first
    assert [r["text"] for r in a] != [r["text"] for r in b]
    # Another position mode: `response` rows share each question's prompt
    # (pvjax.engine.prompt_split),
    # `all` and `prompt` rows cannot, which is one more shape, the same for both.
    c = grid.generate_grid(model, iv2, ids, sp, positions="all", batch_size=8)
    grid.generate_grid(model, iv2, ids, sp, positions="prompt", batch_size=8)
    assert compile_count() - before <= first + 1
    assert [r["text"] for r in c] != [r["text"] for r in b]
    # A row's answer is its setting's: the unsteered rows equal a plain unsteered generation.
    from pvjax.engine.generate import generate_ids

    plain = generate_ids(model, ids, sampling=sp).tokens
    assert [r["n_tokens"] for r in a[:3]] == [len(t) for t in plain]
    assert [r["text"] for r in a[:3]] == [
        model.tokenizer.decode(t, skip_special_tokens=True) for t in plain
    ]


def test_ablation_controls(tiny):
    model, v = tiny["model"], tiny["vector"]
    N = model.n_layers
    rnd = ablate.random_like(v, seed=3)
    np.testing.assert_allclose(np.linalg.norm(rnd, axis=-1), np.linalg.norm(v, axis=-1), rtol=1e-5)
    assert np.all(
        np.abs(np.sum(rnd * v, -1))
        < 0.5 * np.linalg.norm(rnd, axis=-1) * np.linalg.norm(v, axis=-1)
    )
    mu = np.linspace(-1, 1, N + 1).astype(np.float32)
    vs = ablate.variants(v, rnd, mu, [2], window=3, n_layers=N)
    names = [(x["variant"], x["layer"], x["layers"]) for x in vs]
    assert names == [
        ("baseline", "", ""),
        ("ablate", 2, "2"),
        ("window", 2, "1-3"),
        ("mean", 2, "2"),
        ("random", 2, "2"),
        ("ablate_all", "all", f"1-{N}"),
        ("mean_all", "all", f"1-{N}"),
        ("random_all", "all", f"1-{N}"),
    ]
    iv = grid.stack([x["iv"] for x in vs])
    ids = model.tokenizer(model.chat_text([{"role": "user", "content": QUESTIONS[0]}]))["input_ids"]
    tokens = np.array([ids] * len(vs))
    h = np.asarray(pvjax.forward(model, tokens, intervention=iv).hidden_states)  # [L, S, T, D]
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    proj = np.einsum(
        "lstd,ld->lst", h, u
    )  # rows 1..N-1 are raw block outputs (row N is after the norm)
    scale = np.abs(proj[1:N, 0]).max()
    at = {x["variant"]: s for s, x in enumerate(vs)}
    assert (
        np.abs(proj[1:N, at["ablate_all"]]).max() < 1e-5 * scale
    )  # CAFT: no component left anywhere
    np.testing.assert_allclose(
        proj[1:N, at["mean_all"]],
        np.broadcast_to(mu[1:N, None], proj[1:N, 0].shape),
        atol=1e-4 * scale,
    )
    assert np.abs(proj[2, at["ablate"]]).max() < 1e-5 * scale
    np.testing.assert_array_equal(
        h[:2, at["ablate"]], h[:2, at["baseline"]]
    )  # rows before the layer untouched
    r_unit = rnd / np.linalg.norm(rnd, axis=-1, keepdims=True)
    assert (
        np.abs(np.einsum("ltd,ld->lt", h[1:N, at["random_all"]], r_unit[1:N])).max() < 1e-5 * scale
    )


def tiny_overrides(tiny, *extra):
    return [
        f"--config.model={tiny['folder']}",
        "--config.n_questions=2",
        "--config.max_new_tokens=6",
        "--config.batch_size=8",
        "--config.forward_batch_size=8",
        "--config.mc.n_items=3",
        "--quiet",
        *extra,
    ]


def tiny_extract(prefix="--config.extract."):
    return [
        f"{prefix}n_questions=2",
        f"{prefix}n_pairs=1",
        f"{prefix}max_new_tokens=6",
        f"{prefix}filter.mode=none",
        f"{prefix}filter.min_pairs=1",
        f"{prefix}causality.layers=(1,)",
        f"{prefix}batch_size=4",
    ]


def test_steer_sweep_end_to_end_extracting_the_vector_once(tiny, tmp_path, capsys):
    from pvjax.engine.generate import compile_count

    work = tmp_path / "sweep"
    argv = [
        "sweep",
        "--config",
        STEER + ":runlocal",
        "--config.layers=(1,3)",
        "--config.coefs=(-2.0,0.0,2.0)",
        "--workdir",
        str(work),
        *tiny_overrides(tiny, *tiny_extract()),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    header = (work / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["layer", "coef", "positions", "margin"] and header[-1] == "point"
    rows = atomic.read_csv(work / "summary.csv")
    assert len(rows) == 3 * 2 * 3 and {r["point"] for r in rows} == {
        "positions=response",
        "positions=prompt",
        "positions=all",
    }
    assert {r["positions"] for r in rows if r["point"] == "positions=prompt"} == {"prompt"}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows) and {r["best"] for r in rows} == {
        "0",
        "1",
    }
    assert (
        len(list((work / "vectors").glob("*/vector/vectors.safetensors"))) == 1
    )  # one extraction for three points
    for point in ("positions=response", "positions=all"):
        p = work / point
        for name in (
            "DONE",
            "point.json",
            "results.csv",
            "steer.png",
            "capability.png",
            "best.json",
            "answers.csv",
        ):
            assert (p / name).exists(), (point, name)
        assert json.loads((p / "point.json").read_text())["config"]["vector"].endswith(
            "vectors.safetensors"
        )
    assert "margin" in out and "positions=all" in out
    # Coefficient 0 is the unsteered model at every layer; steering moves the margin.
    resp = [r for r in rows if r["point"] == "positions=response"]
    zero = {r["margin"] for r in resp if float(r["coef"]) == 0}
    assert len(zero) == 1 and len({r["margin"] for r in resp}) > 2
    before = compile_count()
    assert cli.main(argv) == 0  # a rerun: everything skipped, nothing compiled
    assert capsys.readouterr().out.count("done before, skipped") == 3 and compile_count() == before


def test_ablation_and_extraction_through_the_runner(tiny, tmp_path, capsys):
    work = tmp_path / "ablate"
    argv = [
        "run",
        "--config",
        ABLATE + ":runlocal",
        f"--config.vector={tiny['vfile']}",
        "--config.layers=(1,2)",
        "--config.window=3",
        "--workdir",
        str(work),
        *tiny_overrides(tiny),
    ]
    assert cli.main([*argv, "--config.plot=False"]) == 0
    assert not (work / "ablation.png").exists()
    first = atomic.read_csv(work / "summary.csv")
    stages = {
        p.name: p.stat().st_mtime_ns
        for p in work.glob("*.csv")
        if p.name not in ("summary.csv", "results.csv")
    }
    capsys.readouterr()
    # Switching plot on draws the figure from the finished stages; nothing is computed again.
    assert cli.main(argv) == 0
    assert "done before" not in capsys.readouterr().out and (work / "ablation.png").exists()
    assert {
        p.name: p.stat().st_mtime_ns for p in work.glob("*.csv") if p.name in stages
    } == stages and len(stages) >= 2
    rows = atomic.read_csv(work / "summary.csv")
    assert rows == first
    assert list(rows[0])[:3] == ["variant", "layer", "layers"]
    assert [r["variant"] for r in rows][:3] == ["baseline", "ablate", "window"] and len(
        rows
    ) == 1 + 2 * 4 + 3
    assert float(rows[0]["margin_change"]) == 0 and (work / "ablation.png").exists()
    base = float(rows[0]["margin"])
    assert any(abs(float(r["margin"]) - base) > 1e-4 for r in rows if r["variant"] == "ablate_all")

    # Extraction is a study too; --config.workdir works as it does for `pvjax extract`.
    ext = tmp_path / "extract"
    assert (
        cli.main(
            [
                "run",
                "--config",
                EXTRACT + ":runlocal",
                f"--config.model={tiny['folder']}",
                f"--config.workdir={ext}",
                "--quiet",
                *tiny_extract("--config."),
            ]
        )
        == 0
    )
    rows = atomic.read_csv(ext / "summary.csv")
    assert [(r["layer"], r["coef"]) for r in rows] == [("1", "-1.0"), ("1", "0.0"), ("1", "1.0")]
    assert (
        (ext / "vectors.safetensors").exists()
        and (ext / "point.json").exists()
        and (ext / "DONE").exists()
    )


def test_a_killed_steer_point_resumes_from_its_finished_parts(tiny, tmp_path, monkeypatch):
    import pvjax.engine.generate as gen
    from pvjax.settings.config_files import load_config

    cfg = load_config(
        STEER + ":runlocal",
        [
            f"--config.model={tiny['folder']}",
            f"--config.vector={tiny['vfile']}",
            "--config.layers=(2,)",
            "--config.coefs=(-1.0,1.0,2.0)",
            "--config.n_questions=3",
            "--config.max_new_tokens=4",
            "--config.batch_size=2",
            "--config.mc.path=",
        ],
    )
    real, calls = gen.generate_ids, []

    def dies_on_the_second_part(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # two reference calls, the first part, then the kill
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "generate_ids", dies_on_the_second_part)
    work = tmp_path / "p"
    with pytest.raises(KeyboardInterrupt):
        steer.run(cfg, work, progress=False)
    monkeypatch.setattr(gen, "generate_ids", real)
    first = work / "answers" / "part_0000.csv"
    kept = {
        p.name: p.stat().st_mtime_ns
        for p in [first, work / "margins.csv", work / "reference_answers.csv"]
    }
    assert not (work / "answers" / "part_0001.csv").exists()
    rows = steer.run(cfg, work, progress=False)
    assert {
        p.name: p.stat().st_mtime_ns
        for p in [first, work / "margins.csv", work / "reference_answers.csv"]
    } == kept
    assert len(rows) == 3 and len(atomic.read_csv(work / "answers.csv")) == 4 * 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.layers=(1,5)"], "layers [5] outside 1..3"),
        (["--config.vector={other}"], "does not fit model (3 layers, width 64)"),
        (["--config.mc.path={bad}"], "bad.csv line 2: expected 6 columns"),
        (["--config.positions=middle"], "positions must be one of"),
        (["--config.coefs=(1.0,1.0)"], "coefs [1.0, 1.0] repeats a value"),
        (["--config.targets=(1.0,1.0)"], "targets [1.0, 1.0] repeats a value"),
        (
            ["--config.max_step=0.0", "--config.gain=-1.0"],
            "gain must be > 0, got -1; max_step must be a number > 0",
        ),
        (["--config.n_questions=99"], "n_questions=99 but the eval split"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(
    tiny, tmp_path, capsys, monkeypatch, extra, message
):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(pvjax, "load", refuse)
    (tmp_path / "bad.csv").write_text("Which is red?,Sky,Grass,Blood,Snow,C\nWhat is 2+2?,3,4,5\n")
    extra = [e.format(other=tiny["other"], bad=tmp_path / "bad.csv") for e in extra]
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                "run",
                "--config",
                STEER + ":runlocal",
                f"--config.vector={tiny['vfile']}",
                "--workdir",
                str(tmp_path / "w"),
                "--config.layers=(1,2)",
                *tiny_overrides(tiny),
                *extra,
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "w").exists()


def test_a_judged_steer_study_reports_trait_score_and_coherence(tiny, tmp_path):
    """judge.backend=local: the tiny model judges itself, numbers only (its scores mean nothing; the
    path from answers to judged columns, the judged metric and the cache are what is tested)."""
    from pvjax.settings.config_files import load_config

    cfg = load_config(
        STEER + ":runlocal",
        [
            f"--config.model={tiny['folder']}",
            f"--config.vector={tiny['vfile']}",
            "--config.layers=(1,2)",
            "--config.coefs=(-1.0,0.0,1.0)",
            "--config.n_questions=2",
            "--config.max_new_tokens=4",
            "--config.judge.backend=local",
            "--config.mc.path=",
            "--config.best.min_coherence=0.0",
        ],
    )
    rows = steer.run(cfg, tmp_path, progress=False)
    assert list(rows[0])[:6] == ["layer", "coef", "positions", "margin", "trait_score", "coherence"]
    assert all(0 <= r["trait_score"] <= 100 and 0 <= r["coherence"] <= 100 for r in rows)
    judged = atomic.read_csv(tmp_path / "judged.csv")
    assert len(judged) == 5 * 2 and (tmp_path / "judge_cache.sqlite").exists()
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["metric"] == "trait_score" and best["layer"] in (1, 2) and len(best["slopes"]) == 2


def test_closed_loop_cap_and_target_rows_join_the_grid_without_a_new_program(tiny, tmp_path):
    """`caps` and `targets` add one closed-loop row each per layer: same batch, same compiled
    programs as a fixed grid of as many rows, their own summary rows (control, value, gain,
    max_step, no coef), and the rule bites."""
    from pvjax.engine.generate import SamplingParams, compile_count
    from pvjax.settings.config_files import load_config

    model, v = tiny["model"], tiny["vector"]
    L, D = model.n_layers + 1, model.hidden_size
    ids = [
        model.tokenizer(
            model.chat_text([{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in QUESTIONS
    ]
    sp = SamplingParams(max_new_tokens=6)
    fixed, _ = steer.settings(v, [1, 2, 3], [-2.0, 0.0, 2.0, 4.0, 6.0], L, D)
    grid.generate_grid(model, fixed, ids, sp, batch_size=8)  # warm: the fixed grid's programs
    before = compile_count()
    closed, index = steer.settings(
        v, [1, 2, 3], [-2.0, 0.0, 2.0], L, D, caps=(-0.5,), targets=(1.0,), gain=0.5
    )
    assert closed.steer_vectors.shape[1] == fixed.steer_vectors.shape[1] == 13
    a = grid.generate_grid(model, closed, ids, sp, batch_size=8)
    assert compile_count() == before, "closed-loop rows compiled a program of their own"
    texts = lambda key: [r["text"] for r in a if r["setting"] == index[key]]
    assert texts((2, ("cap", -0.5))) != texts((2, 0.0)) != texts((2, ("target", 1.0)))

    cfg = load_config(
        STEER + ":runlocal",
        [
            f"--config.model={tiny['folder']}",
            f"--config.vector={tiny['vfile']}",
            "--config.layers=(2,)",
            "--config.coefs=(-1.0,0.0,1.0)",
            "--config.caps=(-0.5,)",
            "--config.targets=(1.0,)",
            "--config.gain=0.5",
            "--config.max_step=2.0",
            "--config.n_questions=2",
            "--config.max_new_tokens=4",
            "--config.mc.n_items=4",
        ],
    )
    rows = steer.run(cfg, tmp_path, progress=False)
    assert [(r["control"], r["coef"], r["value"], r["gain"], r["max_step"]) for r in rows] == [
        ("fixed", -1.0, None, None, None),
        ("fixed", 0.0, None, None, None),
        ("fixed", 1.0, None, None, None),
        ("cap", None, -0.5, 0.5, 2.0),
        ("target", None, 1.0, 0.5, 2.0),
    ]
    assert list(rows[0])[:4] == ["layer", "coef", "positions", "margin"]
    assert len({r["margin"] for r in rows}) == 5 and all(0 <= r["accuracy"] <= 1 for r in rows)
    answers = atomic.read_csv(tmp_path / "answers.csv")
    assert {r["control"] for r in answers} == {"fixed", "cap", "target"}
    assert (tmp_path / "steer.png").exists()


def test_closed_loop_rows_of_the_study_edit_the_residual_as_computed_by_hand(tiny):
    """The study's cap and target rows, in a plain forward: at the steered row, the projection onto
    the unit vector moves by clip(gain * gap, -max_step, max_step), the cap's gap only where the
    projection is above the ceiling; every other row and the fixed rows' layers stay untouched."""
    model, v = tiny["model"], tiny["vector"]
    L, D, layer = model.n_layers + 1, model.hidden_size, 2
    ids = model.tokenizer(model.chat_text([{"role": "user", "content": QUESTIONS[1]}]))["input_ids"]
    h0 = np.asarray(pvjax.forward(model, np.array([ids])).hidden_states)[:, 0]  # [L, T, D]
    u = v[layer] / np.linalg.norm(v[layer])
    p = h0[layer] @ u
    ceiling, goal, gain, step = float(np.median(p)), float(p.mean() + 3.0), 0.5, 1.0
    iv, index = steer.settings(
        v, [layer], [0.0], L, D, caps=(ceiling,), targets=(goal,), gain=gain, max_step=step
    )
    h = np.asarray(pvjax.forward(model, np.array([ids] * 3), intervention=iv).hidden_states)
    want = {
        ("cap", ceiling): h0[layer]
        + np.clip(gain * np.minimum(ceiling - p, 0), -step, step)[:, None] * u,
        ("target", goal): h0[layer] + np.clip(gain * (goal - p), -step, step)[:, None] * u,
    }
    assert (p > ceiling).sum() >= 2 and np.abs(
        gain * (goal - p)
    ).max() > step  # both the cap and the step bite
    for key, w in want.items():
        s = index[(layer, key)]
        np.testing.assert_allclose(h[layer, s], w, atol=2e-5 * np.abs(w).max(), err_msg=str(key))
        np.testing.assert_allclose(h[:layer, s], h0[:layer], atol=1e-5 * np.abs(h0[:layer]).max())
    np.testing.assert_allclose(h[layer, 0], h0[layer], atol=1e-6 * np.abs(h0[layer]).max())


def test_modes_and_composed_terms_join_the_grid_in_one_program(tiny):
    """Add, rescale and rotate rows and a composed point are rows of one grid: another grid of
    the same size with other layers, strengths and modes compiles nothing new."""
    from pvjax.engine import terms as T
    from pvjax.engine.generate import SamplingParams, compile_count

    model, v = tiny["model"], tiny["vector"]
    L, D = model.n_layers + 1, model.hidden_size
    ids = [
        model.tokenizer(
            model.chat_text([{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in QUESTIONS
    ]
    sp = SamplingParams(max_new_tokens=6)
    modes = ("add", "rescale", "rotate")
    point = [T.SteerTerm(v, (1,), coef=1.0), T.SteerTerm(v, (2,), angle=0.3)]
    iv, index = steer.settings(
        v, [1, 2], [0.0, 2.0], L, D, modes=modes, angles=(0.0, 0.5), points=[point]
    )
    assert iv.steer_vectors.shape[1] == 8 and index[(1, ("rotate", 0.0))] == 0
    a = grid.generate_grid(model, iv, ids, sp, batch_size=8)
    before = compile_count()
    other = [T.SteerTerm(v, (3,), coef=-1.0, mode="rescale")]
    iv2, _ = steer.settings(
        v * 0.5, [2, 3], [0.0, -1.0], L, D, modes=modes, angles=(0.0, -0.4), points=[other]
    )
    grid.generate_grid(model, iv2, ids, sp, batch_size=8)
    assert compile_count() == before, "a grid of other modes compiled a program of its own"
    texts = lambda rows, s: [r["text"] for r in rows if r["setting"] == s]  # noqa: E731
    assert texts(a, index[(2, ("rotate", 0.5))]) != texts(a, 0)
    assert texts(a, index[(2, ("rescale", 2.0))]) != texts(a, index[(2, 2.0)])


def test_steer_study_with_modes_terms_and_seeds(tiny, tmp_path):
    from pvjax.settings.config_files import load_config

    cfg = load_config(
        STEER + ":runlocal",
        [
            f"--config.model={tiny['folder']}",
            f"--config.vector={tiny['vfile']}",
            "--config.layers=(2,)",
            "--config.coefs=(0.0,2.0)",
            "--config.modes=('add','rescale','rotate')",
            "--config.angles=(0.4,)",
            "--config.seeds=(0,1)",
            "--config.temperature=0.8",
            "--config.n_questions=2",
            "--config.max_new_tokens=8",
            "--config.mc.path=",
        ],
    )
    cfg.terms = ([{"layer": 1, "coef": 1.0}, {"layer": 2, "angle": 0.2}],)
    rows = steer.run(cfg, tmp_path, progress=False)
    assert [(r["control"], r["coef"], r["angle"]) for r in rows] == [
        ("fixed", 0.0, None),
        ("fixed", 2.0, None),
        ("rescale", 0.0, None),
        ("rescale", 2.0, None),
        ("rotate", None, 0.4),
        ("terms", None, None),
    ]
    assert rows[0]["shift"] == 0.0 and all(isinstance(r["shift"], float) for r in rows)
    assert rows[-1]["terms"].count("@") == 2 and rows[-1]["layer"] == 1
    for r in rows:
        assert r["n_seeds"] == 2 and r["shift_low"] <= r["shift"] <= r["shift_high"]
        if r["distinct2_low"] is not None:
            assert r["distinct2_low"] <= r["distinct2"] <= r["distinct2_high"]
        assert r["perplexity_low"] <= r["perplexity"] <= r["perplexity_high"]
    assert (tmp_path / "seeds" / "1" / "answers").is_dir()
    # perplexity: the unsteered model's NLL of each steered answer, against a plain forward
    model = tiny["model"]
    answers = {
        (int(a["setting"]), int(a["prompt"])): a["text"]
        for part in sorted((tmp_path / "seeds" / "1" / "answers").glob("part_*.csv"))
        for a in atomic.read_csv(part)
    }
    scored = atomic.read_csv(tmp_path / "seeds" / "1" / "perplexity.csv")
    questions = steer.validate(cfg, tmp_path).trait.questions
    for r in [x for x in scored if x["nll"] not in ("", None)][:: max(1, len(scored) // 4)]:
        prompt = model.chat_text([{"role": "user", "content": questions[int(r["prompt"])]}])
        text = answers[(int(r["setting"]), int(r["prompt"]))]
        ids = model.tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        start = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        logits = np.asarray(pvjax.forward(model, np.array([ids])).logits[0], np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll = -np.mean([logp[t - 1, ids[t]] for t in range(start, len(ids))])
        assert float(r["nll"]) == pytest.approx(nll, rel=1e-4), r
        assert int(r["answer_tokens"]) == len(ids) - start


def test_bad_terms_in_a_steer_config_are_refused_before_loading(tiny, tmp_path, monkeypatch):
    from pvjax.settings.config_files import load_config
    from pvjax.studies.checks import StudyConfigError

    cfg = load_config(
        STEER + ":runlocal",
        [
            f"--config.model={tiny['folder']}",
            f"--config.vector={tiny['vfile']}",
            "--config.modes=('add','rotate')",
            "--config.seeds=(1,)",
        ],
    )
    cfg.terms = ([{"layer": 9, "coef": 1.0}],)
    monkeypatch.setattr(pvjax, "load", lambda *a, **k: pytest.fail("pvjax.load was called"))
    with pytest.raises(StudyConfigError) as e:
        steer.run(cfg, tmp_path, progress=False)
    msg = str(e.value)
    for part in ("give the rotation angles", "temperature > 0", "layer 9 is outside 0..3"):
        assert part in msg, msg
