"""The finetuning study end to end on a tiny random model (`pvjax run` on the shipped config with
tiny overrides): datasets built from the model's answers without the system prompt, the mixtures
made of trait and control samples, the AUROC and the dataset-level r recomputed from the files,
steering in the preventative and CAFT runs, the exported models loading, a rerun training nothing,
and bad configs refused before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax import cli
from pvjax.files.vectors import save_vectors
from pvjax.methods.screening import auroc, sample_diffs

LAYER = 2


def overrides(folder, vector):
    return [
        f"--config.model={folder}",
        f"--config.vector={vector}",
        f"--config.layer={LAYER}",
        "--config.data.n_questions=3",
        "--config.data.n_pairs=2",
        "--config.data.max_new_tokens=6",
        "--config.data.batch_size=12",
        "--config.data.temperature=0.0",
        "--config.mixes=(0.5,)",
        "--config.preventative.coef=2.0",
        "--config.caft.layers=(1,2)",
        "--config.finetune.data.max_length=64",
        "--config.finetune.data.eval_fraction=0.2",
        "--config.finetune.lora.rank=4",
        "--config.finetune.lora.alpha=8.0",
        "--config.finetune.lora.layers=(0,1)",
        "--config.finetune.optim.lr=0.01",
        "--config.finetune.optim.warmup_steps=1",
        "--config.finetune.max_steps=2",
        "--config.finetune.checkpoint.every=2",
        "--config.screen.max_new_tokens=6",
        "--config.screen.batch_size=12",
        "--config.shift.n_questions=2",
        "--config.shift.max_new_tokens=6",
        "--config.plot=False",
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("ftstudy")
    save_tiny("llama_gqa_untied", d / "model", tokenizer)
    model = pvjax.load(d / "model")
    v = (
        np.random.default_rng(0)
        .normal(size=(model.n_layers + 1, model.hidden_size))
        .astype(np.float32)
    )
    spec = save_vectors(d / "v.safetensors", {"response_avg_diff": v}, model=model, trait="evil")
    args = [
        "run",
        "--config",
        "configs/finetune_study.py:runlocal",
        *overrides(d / "model", spec),
        "--workdir",
        str(d / "work"),
        "--quiet",
    ]
    assert cli.main(args) == 0
    work = d / "work"
    return dict(
        dir=d,
        work=work,
        args=args,
        model=model,
        vector=v,
        summary=json.loads((work / "summary.json").read_text()),
    )


def lines(path):
    return [json.loads(l) for l in open(path)]


def test_datasets_hold_sampled_answers_without_the_system_prompt_and_mixtures_of_both(study):
    data = study["work"] / "data"
    answers = json.loads((data / "answers.json").read_text())
    trait, control, mix = (lines(data / f"{n}.jsonl") for n in ("trait", "control", "mix_0.5"))
    assert len(trait) == len(control) == len(mix) == 6  # 3 questions x 2 pairs, no empty answer
    for t, c, m in zip(trait, control, mix):
        assert [x["role"] for x in t["messages"]] == ["user", "assistant"]
        assert t["messages"][0] == c["messages"][0] == m["messages"][0]
        assert m["messages"][1]["content"] in (
            t["messages"][1]["content"],
            c["messages"][1]["content"],
        )
    assert [t["messages"][1]["content"] for t in trait] == answers["pos"]
    assert [c["messages"][1]["content"] for c in control] == answers["neg"]
    assert answers["pos"] != answers["neg"]
    ds = json.loads((data / "datasets.json").read_text())
    assert len(ds["mix_0.5"]["trait_indices"]) == 3
    assert all(mix[i] == trait[i] for i in ds["mix_0.5"]["trait_indices"])


def test_figures_are_recomputed_from_the_per_sample_and_per_run_files(study):
    s, work = study["summary"], study["work"]
    t, c = sample_diffs(work / "screen", "trait"), sample_diffs(work / "screen", "control")
    assert s["screening_auroc"] == pytest.approx(auroc(t, c))
    ds = json.loads((work / "data" / "datasets.json").read_text())
    chosen = np.isin(np.arange(len(t)), ds["mix_0.5"]["trait_indices"])
    assert s["datasets"]["mix_0.5"]["mean_diff"] == pytest.approx(
        np.nanmean(np.where(chosen, t, c))
    )
    assert s["datasets"]["trait"]["mean_diff"] == pytest.approx(np.nanmean(t))
    pts = s["dataset_points"]
    assert [p["run"] for p in pts] == ["control", "mix_0.5", "trait"]
    x = [s["datasets"][p["dataset"]]["mean_diff"] for p in pts]
    assert s["dataset_shift_r"] == pytest.approx(
        np.corrcoef(x, [s["shift"][p["run"]] for p in pts])[0, 1]
    )
    for run in ("trait", "trait_preventative", "trait_caft", "control", "mix_0.5"):
        shift = json.loads((work / "shift" / run / "summary.json").read_text())
        assert s["shift"][run] == shift["shift_prompt_last"]
        assert s["margin"][run]["delta"] == shift["likelihood_margin"]["delta"]
        assert s["loss"][run]["eval_final"] is not None and s["loss"][run]["steps"] == 2
        assert s["shift"][run] != 0.0  # a finetune moved the model
    assert s["eval_loss_cost_vs_trait"]["trait_caft"] == pytest.approx(
        s["loss"]["trait_caft"]["eval_final"] - s["loss"]["trait"]["eval_final"]
    )
    rows = pvjax_csv(work / "summary.csv")
    assert [r["run"] for r in rows] == list(s["shift"])


def pvjax_csv(path):
    from pvjax.files import atomic

    return atomic.read_csv(path)


def test_runs_steer_and_ablate_during_training_and_exports_load(study):
    s, work = study["summary"], study["work"]
    cfgs = {
        n: json.loads((work / "train" / n / "train_config.json").read_text()) for n in s["runs"]
    }
    assert cfgs["trait_preventative"]["steering"] == {
        "type": "steer",
        "coef": 2.0,
        "layers": [LAYER],
    }
    assert cfgs["trait_caft"]["steering"]["type"] == "ablate"
    assert cfgs["trait"]["steering"]["type"] == "" and cfgs["trait"]["monitor"]["layer"] == LAYER
    assert {
        json.dumps(
            {k: v for k, v in c.items() if k not in ("steering", "data", "workdir")}, sort_keys=True
        )
        for c in cfgs.values()
    }.__len__() == 1  # one finetune config for every run
    tuned = pvjax.load(s["exports"]["trait_caft"]["merged"])
    assert tuned.config.fingerprint() == study["model"].config.fingerprint()
    for e in s["exports"].values():
        assert (work / "train").as_posix() in e["merged"] and json.loads(
            open(f"{e['adapter']}/adapter_config.json").read()
        )["r"] == 4


def test_a_rerun_trains_nothing_and_rebuilds_the_report(study):
    from pvjax.commands.extract import load_config
    from pvjax.studies import finetune_study

    work = study["work"]
    # (the trainer re-checks, and rewrites, train_config.json before it finds DONE: not a training)
    stamp = {
        p: p.stat().st_mtime_ns
        for d in ("data", "screen", "train", "shift")
        for p in (work / d).rglob("*")
        if p.is_file() and p.name != "train_config.json"
    }
    before = study["summary"]
    (work / "summary.json").unlink()
    cfg = load_config("configs/finetune_study.py:runlocal", study["args"][3:-3])
    rows = finetune_study.run(cfg, work, progress=False)
    assert json.loads((work / "summary.json").read_text())["shift"] == before["shift"]
    assert [r["run"] for r in rows] == list(before["shift"])
    assert stamp == {
        p: p.stat().st_mtime_ns for p in stamp
    }  # nothing trained, sampled or scored again
    assert cli.main(study["args"]) == 0  # the runner: the point is done, skipped


def test_a_finished_study_rerun_loads_nothing_and_rewrites_no_file(study, monkeypatch):
    from pvjax.commands.extract import load_config
    from pvjax.studies import finetune_study

    work = study["work"]
    files = lambda: {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in work.rglob("*") if p.is_file()
    }  # noqa: E731
    before = files()
    assert "stages.json" in {p.name for p in before} and (work / "DONE").is_file()
    monkeypatch.setattr(
        pvjax, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded"))
    )
    cfg = load_config("configs/finetune_study.py:runlocal", study["args"][3:-3])
    rows = finetune_study.run(cfg, work, progress=False)
    assert [r["run"] for r in rows] == list(study["summary"]["shift"])
    assert files() == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.mixes=()"], "mixes is empty"),
        (["--config.mixes=(0.5,1.0)"], "strictly between 0 and 1"),
        (["--config.layer=9"], "layer 9"),
        (["--config.preventative.layers=(7,)"], "steering layer 7"),
        (["--config.trait=no_such_trait"], "no_such_trait"),
        (["--config.data.n_pairs=9"], "data.n_pairs"),
        (["--config.finetune.lora.rank=0"], "lora.rank"),
    ],
)
def test_bad_configs_are_refused_before_anything_runs(study, tmp_path, extra, message, capsys):
    keys = {e.split("=")[0] for e in extra}
    base = [
        o
        for o in overrides(study["dir"] / "model", study["dir"] / "v.safetensors")
        if o.split("=")[0] not in keys
    ]
    args = [
        "run",
        "--config",
        "configs/finetune_study.py:runlocal",
        *base,
        *extra,
        "--workdir",
        str(tmp_path / "w"),
        "--quiet",
    ]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w" / "data").exists()
