"""Data screening: the projection difference against transformers' hidden states, the answer
cache, filtered datasets byte for byte, flagging, and bad input (pvjax.methods.screening,
pvjax.files.datasets)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import save_tiny

import pvjax
from pvjax.engine.answer_cache import prompt_key
from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.files.datasets import read_dataset, write_dataset, write_filtered
from pvjax.files.vectors import KEYS, VectorError, save_vectors
from pvjax.methods.screening import Flagging, auroc, flag, sample_diffs, screen
from pvjax.settings.types import Sampling, VectorChoice, Workspace

SAMPLING = Sampling(max_new_tokens=8)
LAYER = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    hf = save_tiny("llama_gqa_untied", folder, tokenizer)
    return pvjax.load(folder), hf, folder


@pytest.fixture(scope="module")
def vector(tiny):
    model = tiny[0]
    return (
        np.random.default_rng(0)
        .normal(size=(model.n_layers + 1, model.hidden_size))
        .astype(np.float32)
    )


def chat_rows():
    system = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    multi = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is two plus two?"},
    ]
    return (
        [system, multi, "Tell me a joke.", "Say nothing.", "How do I bake bread?"],
        [
            "Blue.",
            "Four, of course.",
            "Why did the chicken cross the road?",
            "",
            "Mix flour and water.",
        ],
    )


@pytest.fixture(scope="module")
def screened(tiny, vector, tmp_path_factory):
    """One screening of a chat JSONL file and a CSV file sharing a prompt, on the tiny model."""
    model = tiny[0]
    d = tmp_path_factory.mktemp("screen")
    prompts, answers = chat_rows()
    write_dataset(d / "chat.jsonl", prompts, answers)
    write_dataset(
        d / "pairs.csv", ["Tell me a joke.", "Count to three."], ["No.", "One, two, three."]
    )
    rows = screen(
        model,
        VectorChoice(vector, LAYER),
        [d / "chat.jsonl", d / "pairs.csv"],
        Workspace(d / "work"),
        SAMPLING,
        flagging=Flagging("top_fraction", top_fraction=0.5),
    )
    return dict(dir=d, work=d / "work", rows=rows)


def hf_response_mean(hf, tok, prompt, answer):
    """Response-mean hidden states [L, D] of prompt + answer, straight from transformers."""
    ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack(hs)[:, 0, start:].mean(1).numpy()


def test_projection_difference_matches_a_hand_computation(tiny, vector, screened):
    model, hf, _ = tiny
    work = screened["work"]
    cache = json.loads(next((work / "answer_cache").glob("answers_*.json")).read_text())["answers"]
    u = vector[LAYER] / np.linalg.norm(vector[LAYER])
    ds = read_dataset(screened["dir"] / "chat.jsonl")
    got = {int(r["index"]): r for r in atomic.read_csv(work / "chat" / "samples.csv")}
    diffs = []
    for i, s in enumerate(ds.samples):
        if not s.answer:
            assert (
                got[i]["status"] == "empty_answer"
                and got[i]["diff"] == ""
                and got[i]["flagged"] == "0"
            )
            continue
        prompt = model.chat_text(list(s.prompt))
        own = cache[prompt_key(prompt)]["answer"]
        train_p = hf_response_mean(hf, model.tokenizer, prompt, s.answer)[LAYER] @ u
        own_p = hf_response_mean(hf, model.tokenizer, prompt, own)[LAYER] @ u
        assert float(got[i]["proj_train"]) == pytest.approx(train_p, abs=2e-4)
        assert float(got[i]["proj_own"]) == pytest.approx(own_p, abs=2e-4)
        assert float(got[i]["diff"]) == pytest.approx(train_p - own_p, abs=3e-4)
        diffs.append(train_p - own_p)
    assert np.allclose(sample_diffs(work, "chat")[[0, 1, 2, 4]], diffs, atol=3e-4)
    row = screened["rows"][0]
    assert (
        row["name"] == "chat"
        and row["n_samples"] == 5
        and row["n_scored"] == 4
        and row["empty_answer"] == 1
    )
    assert row["mean_diff"] == pytest.approx(np.mean(diffs), abs=3e-4)
    # Ranked by difference, the top half (2 of 4 scored) flagged; projections kept at every layer.
    ranked = atomic.read_csv(work / "chat" / "samples.csv")
    assert [r["rank"] for r in ranked] == ["1", "2", "3", "4", ""]
    assert [r["flagged"] for r in ranked] == ["1", "1", "0", "0", "0"]
    assert np.allclose(
        [float(r["diff"]) for r in ranked[:4]], sorted(diffs, reverse=True), atol=3e-4
    )
    with np.load(work / "chat" / "projections.npz") as z:
        assert (
            z["proj_train"].shape == (5, model.n_layers + 1) and np.isnan(z["proj_train"][3]).all()
        )


def test_every_output_is_written_and_the_filtered_file_drops_only_flagged_samples(screened):
    work = screened["work"]
    for name in (
        "datasets.csv",
        "summary.json",
        "histogram.png",
        "chat/histogram.png",
        "pairs/filtered.csv",
        "chat/filtered.jsonl",
        "chat/summary.json",
    ):
        assert (work / name).is_file(), name
    summary = json.loads((work / "summary.json").read_text())
    assert summary["generated"] == 5  # 4 + 2 prompts with answers, one shared by both files
    assert [r["name"] for r in atomic.read_csv(work / "datasets.csv")] == ["chat", "pairs"]
    for name, fmt in (("chat", "jsonl"), ("pairs", "csv")):
        flagged = set(json.loads((work / name / "summary.json").read_text())["flagged"])
        original = read_dataset(screened["dir"] / f"{name if name == 'pairs' else 'chat'}.{fmt}")
        kept = read_dataset(work / name / f"filtered.{fmt}")
        assert [s.answer for s in kept.samples] == [
            s.answer for i, s in enumerate(original.samples) if i not in flagged
        ]
        assert len(flagged) == {"chat": 2, "pairs": 1}[name]  # half of 4 and of 2 scored samples


def test_a_rerun_generates_nothing_and_new_prompts_only_are_generated(tiny, vector, screened):
    model = tiny[0]
    work = screened["work"]
    cache_file = next((work / "answer_cache").glob("answers_*.json"))
    before = cache_file.read_bytes(), (work / "chat" / "samples.csv").read_bytes()
    screen(
        model,
        VectorChoice(vector, LAYER),
        [screened["dir"] / "chat.jsonl", screened["dir"] / "pairs.csv"],
        Workspace(work),
        SAMPLING,
        flagging=Flagging("top_fraction", top_fraction=0.5),
    )
    assert json.loads((work / "summary.json").read_text())["generated"] == 0
    assert (cache_file.read_bytes(), (work / "chat" / "samples.csv").read_bytes()) == before
    # Another dataset in the same cache: only its new prompt is generated.
    write_dataset(
        screened["dir"] / "more.jsonl", ["Tell me a joke.", "Name a fruit."], ["Ha.", "Apple."]
    )
    rows = screen(
        model,
        VectorChoice(vector, LAYER),
        screened["dir"] / "more.jsonl",
        Workspace(screened["dir"] / "work2", work / "answer_cache"),
        SAMPLING,
        flagging=Flagging("threshold", threshold=1e9),
    )
    assert json.loads((screened["dir"] / "work2" / "summary.json").read_text())["generated"] == 1
    assert rows[0]["n_flagged"] == 0
    assert (screened["dir"] / "work2" / "more" / "filtered.jsonl").read_bytes() == (
        screened["dir"] / "more.jsonl"
    ).read_bytes()


def test_filtered_datasets_keep_every_other_byte(tmp_path):
    jsonl = (
        '{"messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": '
        '"x"}]}\n'
        "\n"
        '{"messages":[{"role":"user","content":"q2"},{"role":"assistant","content":"y"}],"extra":1}\r\n'
        '{"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "z"}]}'
    )
    csv_text = (
        'id,prompt,answer\r\n1,"a, b","line one\nline two"\r\n2,plain,"say ""hi"""\r\n'
        "3,third,last\r\n"
    )
    for name, text, n in (("d.jsonl", jsonl, 3), ("d.csv", csv_text, 3)):
        src = tmp_path / name
        src.write_bytes(text.encode())
        ds = read_dataset(src)
        assert len(ds.samples) == n
        write_filtered(ds, [], tmp_path / f"all_{name}")
        assert (tmp_path / f"all_{name}").read_bytes() == text.encode()
        write_filtered(ds, [1], tmp_path / f"cut_{name}")
        cut = read_dataset(tmp_path / f"cut_{name}")
        assert [s.answer for s in cut.samples] == [ds.samples[0].answer, ds.samples[2].answer]
    csv_ds = read_dataset(tmp_path / "d.csv")
    assert csv_ds.samples[0].prompt == ({"role": "user", "content": "a, b"},)
    assert (
        csv_ds.samples[0].answer == "line one\nline two" and csv_ds.samples[1].answer == 'say "hi"'
    )
    assert [s.line for s in csv_ds.samples] == [2, 4, 5]
    assert (
        (tmp_path / "cut_d.csv").read_bytes()
        == 'id,prompt,answer\r\n1,"a, b","line one\nline two"\r\n3,third,last\r\n'.encode()
    )
    assert read_dataset(tmp_path / "d.jsonl").samples[0].prompt[0]["content"] == "a\u2028b"


def test_flagging_by_threshold_and_top_fraction():
    d = np.array([0.5, np.nan, 2.0, -1.0, 2.0, 0.0])
    assert flag(d, Flagging("threshold", threshold=0.25)).tolist() == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    assert flag(d, Flagging("threshold", threshold=2.0)).tolist() == [False] * 6  # strictly above
    # Five scored samples: a fraction 0.4 flags two, 0.3 rounds up to two, 0.2 one (ties: the
    # earlier).
    assert flag(d, Flagging("top_fraction", top_fraction=0.4)).tolist() == [
        False,
        False,
        True,
        False,
        True,
        False,
    ]
    assert flag(d, Flagging("top_fraction", top_fraction=0.3)).sum() == 2
    assert flag(d, Flagging("top_fraction", top_fraction=0.2)).tolist() == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    assert flag(d, Flagging("top_fraction", top_fraction=0.0)).sum() == 0
    assert flag(d, Flagging("top_fraction", top_fraction=1.0)).sum() == 5
    assert auroc([3, 2, np.nan], [1, 0]) == 1.0 and auroc([1], [1, 2]) == 0.25
    with pytest.raises(InputError, match="auroc needs"):
        auroc([np.nan], [1.0])
    for bad in (
        dict(mode="best"),
        dict(mode="top_fraction", top_fraction=1.5),
        dict(mode="threshold", threshold=float("nan")),
    ):
        with pytest.raises(InputError):
            Flagging(**bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "holds no samples"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            ":1: the conversation has no assistant turn",
        ),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', "no user turn before"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
            '"yo"}]}\n{oops\n',
            ":2: not valid JSON",
        ),
        ('{"prompt": "hi"}\n', 'with a "messages" list'),
        ('{"messages": [{"role": "user", "content": 3}]}\n', "malformed message 0"),
    ],
)
def test_malformed_chat_files_are_refused_with_the_line(tmp_path, text, message):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(InputError, match=message):
        read_dataset(tmp_path / "d.jsonl")


def test_malformed_csv_files_and_paths_are_refused(tmp_path):
    cases = {
        "nohead.csv": ("", "no CSV header"),
        "cols.csv": ("question,reply\nq,a\n", "no column 'prompt'"),
        "short.csv": ("prompt,answer\nq\n", ":2: 1 fields"),
        "only.csv": ("prompt,answer\n", "no samples"),
        "blank.csv": ("prompt,answer\n ,a\n", "'prompt' field is empty"),
        "d.txt": ("x", "suffix '.txt'"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=message):
            read_dataset(tmp_path / name)
    with pytest.raises(InputError, match="does not exist"):
        read_dataset(tmp_path / "missing.jsonl")


def test_long_samples_are_counted_and_bad_vectors_and_layers_refused(tiny, vector, tmp_path):
    model = tiny[0]
    write_dataset(tmp_path / "d.jsonl", ["Hi", "Hello", "Hey"], ["Yo.", "word " * 200, "Hi!"])
    rows = screen(
        model,
        VectorChoice(vector, LAYER),
        tmp_path / "d.jsonl",
        Workspace(tmp_path / "w", plot=False),
        SAMPLING,
        max_len=64,
    )
    assert rows[0]["too_long"] == 1 and rows[0]["n_scored"] == 2
    status = {
        int(r["index"]): r["status"] for r in atomic.read_csv(tmp_path / "w" / "d" / "samples.csv")
    }
    assert status[1] == "too_long"
    with pytest.raises(InputError, match=r"not a hidden_states index of .* \(0..3\)"):
        screen(model, VectorChoice(vector, 4), tmp_path / "d.jsonl", Workspace(tmp_path / "w"))
    with pytest.raises(InputError, match=r"needs \[n_layers\+1, D\] = \[4, 64\]"):
        screen(
            model, VectorChoice(vector[:, :32], 1), tmp_path / "d.jsonl", Workspace(tmp_path / "w")
        )
    with pytest.raises(InputError, match="zero at layer 1"):
        screen(
            model,
            VectorChoice(np.zeros_like(vector), 1),
            tmp_path / "d.jsonl",
            Workspace(tmp_path / "w"),
        )


def test_the_study_and_the_command_refuse_bad_input_before_loading(tiny, vector, tmp_path, capsys):
    from configs.screen import get_config
    from pvjax.cli import main
    from pvjax.studies.screen import run

    model, _, folder = tiny
    other = tmp_path / "other"
    save_tiny("qwen2_tied", other)  # same width and depth, another architecture
    save_vectors(tmp_path / "other.safetensors", {k: vector for k in KEYS}, model=pvjax.load(other))
    write_dataset(tmp_path / "d.jsonl", ["Hi"], ["Yo."])
    cfg = get_config()
    cfg.model, cfg.vector, cfg.datasets, cfg.layer = (
        str(folder),
        str(tmp_path / "other.safetensors"),
        str(tmp_path / "d.jsonl"),
        2,
    )
    with pytest.raises(VectorError, match="does not fit"):
        run(cfg, tmp_path / "w", progress=False)
    cfg.layer = 7
    with pytest.raises(InputError, match="layer 7 is not a hidden_states index"):
        run(cfg, tmp_path / "w", progress=False)
    cfg.datasets = ""
    with pytest.raises(InputError, match="names no dataset"):
        run(cfg, tmp_path / "w", progress=False)
    for extra, message in (
        ([], "set --config.workdir"),
        (
            [f"--config.workdir={tmp_path}/w", f"--config.datasets={tmp_path}/none.jsonl"],
            "none.jsonl does not exist",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            main(["screen", "--config", "configs/screen.py:runlocal", *extra])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_the_command_runs_the_study_and_a_finished_run_is_reused(tiny, tmp_path, vector, capsys):
    from pvjax.cli import main

    model, _, folder = tiny
    save_vectors(tmp_path / "v.safetensors", {k: vector for k in KEYS}, model=model)
    write_dataset(
        tmp_path / "d.csv", ["Tell me a joke.", "Count to three."], ["No.", "One, two, three."]
    )
    args = [
        "screen",
        "--config",
        "configs/screen.py",
        "--quiet",
        f"--config.model={folder}",
        f"--config.vector={tmp_path}/v.safetensors",
        f"--config.datasets={tmp_path}/d.csv",
        "--config.layer=2",
        "--config.max_new_tokens=8",
        "--config.flag.mode=threshold",
        "--config.flag.threshold=-100",
        f"--config.workdir={tmp_path}/w",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "d: mean projection difference" in out and "2 flagged" in out
    assert (tmp_path / "w" / "DONE").is_file()
    assert (tmp_path / "w" / "d" / "filtered.csv").read_text().split() == [
        "prompt,answer"
    ]  # all flagged
    stamp = (tmp_path / "w" / "run.json").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "w" / "run.json").stat().st_mtime_ns == stamp


def test_shipped_configs_load_and_name_files_that_exist():
    from pathlib import Path

    from configs import screen, shift
    from pvjax.studies.screen import datasets_of

    for variant in ("", "runlocal"):
        for module in (screen, shift):
            cfg = module.get_config(variant)
            assert cfg.study == module.__name__.split(".")[-1] and cfg.extract.trait
    paths = datasets_of(screen.get_config("runlocal"))
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    assert [len(read_dataset(p).samples) for p in paths] == [8, 8]
