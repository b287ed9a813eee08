"""Finetuning shift between two tiny models (a random one and a perturbed copy shipped without
tokenizer files): the shift per layer, the likelihood margin and the contrast against transformers,
the study and command with a judge on loopback, and models of another shape refused."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from openai_server import OpenAIServer
from safetensors.numpy import load_file, save_file
from tiny_models import DTYPE_KW, save_tiny

import pvjax
from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.files.traits import load_trait
from pvjax.files.vectors import KEYS, save_vectors
from pvjax.methods.extraction import system_prompt
from pvjax.methods.finetune_shift import finetuning_shift
from pvjax.settings.types import Sampling, VectorChoice, Workspace

SAMPLING = Sampling(max_new_tokens=8)
LAYER = 2
N_QUESTIONS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(base, finetuned) as pvjax models and transformers models, and their folders. The finetune
    is the base with every weight perturbed, saved without tokenizer files."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("shift")
    hf_base = save_tiny("llama_gqa_untied", d / "base", tokenizer)
    (d / "ft").mkdir()
    shutil.copy(d / "base" / "config.json", d / "ft" / "config.json")
    rng = np.random.default_rng(1)
    save_file(
        {
            k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
            for k, v in load_file(d / "base" / "model.safetensors").items()
        },
        d / "ft" / "model.safetensors",
    )
    hf_ft = AutoModelForCausalLM.from_pretrained(str(d / "ft"), **{DTYPE_KW: torch.float32}).eval()
    return dict(
        base=pvjax.load(d / "base"), ft=pvjax.load(d / "ft"), hf_base=hf_base, hf_ft=hf_ft, dir=d
    )


@pytest.fixture(scope="module")
def vector(models):
    base = models["base"]
    return (
        np.random.default_rng(0)
        .normal(size=(base.n_layers + 1, base.hidden_size))
        .astype(np.float32)
    )


@pytest.fixture(scope="module")
def trait():
    return load_trait("evil", "eval")


@pytest.fixture(scope="module")
def shifted(models, vector, trait):
    work = models["dir"] / "work"
    s = finetuning_shift(
        models["base"],
        models["ft"],
        VectorChoice(vector, LAYER),
        list(trait.questions[:N_QUESTIONS]),
        Workspace(work),
        SAMPLING,
        trait=trait,
        n_pairs=1,
    )
    return dict(work=work, summary=s)


def hf_pooled(hf, tok, prompt, answer):
    """(last prompt token [L, D], response mean [L, D]) of prompt + answer from transformers."""
    ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        h = torch.stack(hf(torch.tensor([ids]), output_hidden_states=True).hidden_states)[
            :, 0
        ].numpy()
    return h[:, start - 1], h[:, start:].mean(1)


def hf_logprob(hf, tok, prompt, answer):
    """Mean log-probability per answer token after the prompt."""
    ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return float(np.mean([logp[t - 1, ids[t]] for t in range(start, len(ids))]))


def expected_shift(models, vector, prompts, base_answers, ft_answers):
    tok = models["base"].tokenizer
    u = vector / np.linalg.norm(vector, axis=-1, keepdims=True)
    b = [hf_pooled(models["hf_base"], tok, p, a) for p, a in zip(prompts, base_answers)]
    f = [hf_pooled(models["hf_ft"], tok, p, a) for p, a in zip(prompts, ft_answers)]
    d_last = np.mean([x[0] for x in f], 0) - np.mean([x[0] for x in b], 0)
    d_resp = np.mean([x[1] for x in f], 0) - np.mean([x[1] for x in b], 0)
    return (d_last * u).sum(-1), (d_resp * u).sum(-1)


def test_shift_per_layer_matches_a_hand_computation(models, vector, trait, shifted):
    base = models["base"]
    questions = list(trait.questions[:N_QUESTIONS])
    prompts = [base.chat_text([{"role": "user", "content": q}]) for q in questions]
    answers = atomic.read_csv(shifted["work"] / "answers.csv")
    a_base, a_ft = [r["base_answer"] for r in answers], [r["finetuned_answer"] for r in answers]
    assert (
        all(a.strip() for a in a_base + a_ft) and a_base != a_ft
    )  # the finetune answers differently
    want_last, want_resp = expected_shift(models, vector, prompts, a_base, a_ft)
    rows = atomic.read_csv(shifted["work"] / "shift.csv")
    assert [int(r["layer"]) for r in rows] == list(range(base.n_layers + 1))
    np.testing.assert_allclose([float(r["shift_prompt_last"]) for r in rows], want_last, atol=3e-4)
    np.testing.assert_allclose([float(r["shift_response_avg"]) for r in rows], want_resp, atol=3e-4)
    assert abs(want_last[LAYER]) > 1e-2  # a real shift, not zero against zero
    s = shifted["summary"]
    assert s["shift_prompt_last"] == pytest.approx(want_last[LAYER], abs=3e-4)
    assert s["finetuned"] == "ft" and s["base_weights"] != s["finetuned_weights"]
    assert s["counts"] == {
        "questions": 3,
        "response_rows": 3,
        "empty_base": 0,
        "empty_finetuned": 0,
    }
    assert s["generated"] == {"base": 3, "finetuned": 3, "reference": 6}
    assert (shifted["work"] / "plot.png").is_file()


def test_likelihood_margin_and_contrast_match_a_hand_computation(models, trait, shifted):
    base, tok = models["base"], models["base"].tokenizer
    questions = list(trait.questions[:N_QUESTIONS])
    prompts = [base.chat_text([{"role": "user", "content": q}]) for q in questions]
    ref = atomic.read_csv(shifted["work"] / "reference_answers.csv")
    assert [r["question"] for r in ref] == questions
    s = shifted["summary"]
    for name, hf in (("base", models["hf_base"]), ("finetuned", models["hf_ft"])):
        want = np.mean(
            [
                hf_logprob(hf, tok, p, r["pos_answer"]) - hf_logprob(hf, tok, p, r["neg_answer"])
                for p, r in zip(prompts, ref)
            ]
        )
        assert s["likelihood_margin"][name] == pytest.approx(want, abs=2e-3)
    pair = trait.instruction[0]
    render = lambda system, q: base.chat_text(
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
    )
    answers = atomic.read_csv(shifted["work"] / "answers.csv")
    for name, col in (("base_answers", "base_answer"), ("finetuned_answers", "finetuned_answer")):
        want = np.mean(
            [
                hf_logprob(
                    models["hf_base"], tok, render(system_prompt(trait.name, pair.pos), q), r[col]
                )
                - hf_logprob(
                    models["hf_base"], tok, render(system_prompt("helpful", pair.neg), q), r[col]
                )
                for q, r in zip(questions, answers)
            ]
        )
        assert s["contrast"][name] == pytest.approx(want, abs=2e-3)
    assert s["contrast"]["delta"] == pytest.approx(
        s["contrast"]["finetuned_answers"] - s["contrast"]["base_answers"]
    )


def test_response_shift_over_the_same_answers_reuses_the_cache(models, vector, trait, shifted):
    questions = list(trait.questions[:N_QUESTIONS])
    work = models["dir"] / "work_base"
    s = finetuning_shift(
        models["base"],
        models["ft"],
        VectorChoice(vector, LAYER),
        questions,
        Workspace(work, shifted["work"] / "answer_cache", plot=False),
        SAMPLING,
        response_source="base",
    )
    assert s["generated"] == {"base": 0, "finetuned": 0} and s["likelihood_margin"] is None
    a_base = [r["base_answer"] for r in atomic.read_csv(work / "answers.csv")]
    prompts = [models["base"].chat_text([{"role": "user", "content": q}]) for q in questions]
    want_last, want_resp = expected_shift(models, vector, prompts, a_base, a_base)
    rows = atomic.read_csv(work / "shift.csv")
    np.testing.assert_allclose([float(r["shift_response_avg"]) for r in rows], want_resp, atol=3e-4)
    assert s["shift_prompt_last"] == pytest.approx(
        shifted["summary"]["shift_prompt_last"], abs=1e-6
    )


def test_models_of_another_shape_and_bad_arguments_are_refused(models, vector, trait, tmp_path):
    from configs.shift import get_config
    from pvjax.studies.shift import run

    save_tiny("qwen2_tied", tmp_path / "qwen")  # same width and depth, another architecture
    qs = list(trait.questions[:2])
    with pytest.raises(
        InputError, match=r"qwen2.*does not have the base model's architecture.*llama"
    ):
        finetuning_shift(
            models["base"],
            pvjax.load(tmp_path / "qwen"),
            VectorChoice(vector, 1),
            qs,
            Workspace(tmp_path),
        )
    cfg = get_config()
    cfg.model, cfg.finetuned, cfg.vector, cfg.layer = (
        str(models["dir"] / "base"),
        str(tmp_path / "qwen"),
        "x",
        1,
    )
    with pytest.raises(InputError, match="does not have the base model's architecture"):
        run(cfg, tmp_path / "w", progress=False)  # from the configs alone: nothing loaded
    cfg.finetuned, cfg.layer = str(models["dir"] / "ft"), 9
    with pytest.raises(InputError, match="layer 9 is not a hidden_states index"):
        run(cfg, tmp_path / "w", progress=False)
    cases = (
        (dict(layer=4), "not a hidden_states index"),
        (dict(response_source="mine"), "response_source"),
        (dict(vector_LD=vector[:, :8]), r"needs \[n_layers\+1, D\]"),
        (dict(questions=[]), "non-empty"),
        (dict(trait=trait, n_pairs=9), "n_pairs must be in 1..5"),
    )
    for kw, message in cases:
        args = dict(vector_LD=vector, questions=qs, layer=1) | kw
        with pytest.raises(InputError, match=message):
            finetuning_shift(
                models["base"],
                models["ft"],
                VectorChoice(args.pop("vector_LD"), args.pop("layer")),
                args.pop("questions"),
                Workspace(tmp_path),
                **args,
            )


def test_the_command_reports_the_shift_and_the_judged_scores(models, vector, tmp_path, capsys):
    from pvjax.cli import main

    save_vectors(tmp_path / "v.safetensors", {k: vector for k in KEYS}, model=models["base"])
    with OpenAIServer(
        lambda request: ("70", [("70", math.log(0.75)), ("90", math.log(0.25))])
    ) as srv:
        args = [
            "shift",
            "--config",
            "configs/shift.py",
            "--quiet",
            f"--config.model={models['dir'] / 'base'}",
            f"--config.finetuned={models['dir'] / 'ft'}",
            f"--config.vector={tmp_path}/v.safetensors",
            f"--config.n_questions={N_QUESTIONS}",
            "--config.max_new_tokens=8",
            f"--config.layer={LAYER}",
            "--config.margin=False",
            "--config.judge.backend=openai",
            "--config.judge.model=judge",
            f"--config.judge.base_url={srv.base_url}",
            f"--config.workdir={tmp_path}/w",
        ]
        assert main(args) == 0
        calls = srv.calls
    out = capsys.readouterr().out
    assert "ft vs base at layer 2: shift" in out
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert calls == 2 * N_QUESTIONS
    assert summary["judge"] == {
        "base": pytest.approx(75.0),
        "finetuned": pytest.approx(75.0),
        "delta": pytest.approx(0.0),
        "missing": 0,
    }
    assert (tmp_path / "w" / "DONE").is_file()
    assert main(args) == 0  # finished: reused without loading or judging again
    assert json.loads((tmp_path / "w" / "run.json").read_text())["rows"][0][
        "judge_base"
    ] == pytest.approx(75.0)
