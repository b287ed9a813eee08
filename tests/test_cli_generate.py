"""`pvjax generate` in-process: a coefficient sweep in one batch, prompts files, and argument
errors that stop before any model work.

The sweep runs the whole path, loading the embedded model inside the command. The other tests
hand the command the session's model (`same_model`: a spy on `pvjax.load` that checks what it was
asked for), saving a load each, and share shapes (batch 2, short prompts) with the library
reference call, so they reuse its compiled program.
"""

from __future__ import annotations

import json

import pytest
import torch

import pvjax
from pvjax.cli import main
from pvjax.generate import SamplingParams, generate

A = "What is the capital of France?"
B = "Give me advice on dealing with a rude coworker."
L, D = 31, 576
N_NEW = 12


@pytest.fixture(scope="module")
def reference(smollm2):
    """Unsteered greedy answers from the library, the baseline every CLI run is held to."""
    return generate(smollm2, [A, B], sampling=SamplingParams(max_new_tokens=N_NEW))


@pytest.fixture
def unit_pt(tmp_path):
    torch.manual_seed(0)
    t = torch.randn(L, D)
    path = tmp_path / "x.pt"
    torch.save(t / t.norm(dim=-1, keepdim=True), path)  # the reference implementation's format
    return path


@pytest.fixture
def same_model(monkeypatch, smollm2):
    """`pvjax.load` answering with the session's embedded model; records the requests."""
    calls = []

    def load(source, *, dtype=None):
        calls.append((str(source), dtype))
        assert str(source) == "smollm2-135m-instruct" and dtype is None
        return smollm2

    monkeypatch.setattr(pvjax, "load", load)
    return calls


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_coefficient_sweep_json(capsys, unit_pt, reference):
    """Every prompt under every coefficient, prompt-major within a coefficient: A@0, B@0, A@60, B@60.
    Residual norms at layer 12 are ~800, so 60 along a unit direction visibly steers."""
    rc = main(["generate", "--prompt", A, "--prompt", B, "--vector", str(unit_pt), "--layer", "12",
               "--coef", "0", "--coef", "60", "--json", "--max-new-tokens", str(N_NEW)])
    assert rc == 0
    rows = json_lines(capsys.readouterr().out)
    assert [(r["prompt"], r["coef"]) for r in rows] == [(A, 0.0), (B, 0.0), (A, 60.0), (B, 60.0)]
    for r in rows:
        assert {"prompt", "text", "tokens", "coef", "prompt_last_projection"} <= set(r)
        assert isinstance(r["text"], str) and 0 < len(r["tokens"]) <= N_NEW
        assert r["layers"] == [12] and r["positions"] == "response" and r["vector"] == str(unit_pt)
        assert list(r["prompt_last_projection"]) == ["12"]
    # coefficient 0 is the unsteered model, token for token
    assert [r["text"] for r in rows[:2]] == reference.texts
    assert [r["tokens"] for r in rows[:2]] == reference.tokens
    # coefficient 60 changes at least one answer
    assert any(s["text"] != u["text"] for s, u in zip(rows[2:], rows[:2]))
    # "response" steering includes the last prompt token, and the projection is read from the
    # steered run: along a unit row it rises by exactly the coefficient
    for u, s in zip(rows[:2], rows[2:]):
        assert s["prompt_last_projection"]["12"] - u["prompt_last_projection"]["12"] == pytest.approx(60, abs=0.01)


def test_prompts_files(capsys, tmp_path, reference, same_model):
    """A .txt file (one prompt a line, blank lines skipped) in the plain output format, then a .jsonl
    with a bare prompt and a conversation, as JSON."""
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"\n{A}\n\n   \n{B}\n\n")
    assert main(["generate", "--prompts-file", str(txt), "--max-new-tokens", str(N_NEW)]) == 0
    out = capsys.readouterr().out
    assert out.count("### ") == 2
    assert out.index(f"### {A}\n{reference.texts[0]}\n") < out.index(f"### {B}\n{reference.texts[1]}\n")

    jsonl = tmp_path / "prompts.jsonl"
    conversation = [{"role": "user", "content": A}]
    jsonl.write_text(json.dumps({"prompt": B}) + "\n\n" + json.dumps({"messages": conversation}) + "\n")
    assert main(["generate", "--prompts-file", str(jsonl), "--max-new-tokens", "4", "--json"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == [B, conversation]
    # a one-message conversation is the same chat prompt as the bare string
    assert rows[0]["tokens"] == reference.tokens[1][:4]
    assert rows[1]["tokens"] == reference.tokens[0][:4]
    assert all("coef" not in r for r in rows)  # no vector, no steering fields
    assert len(same_model) == 2


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), f"expected an error message, got exit code {e.value.code!r}"
    return e.value.code


def test_errors_before_loading(tmp_path, unit_pt, same_model):
    msg = exit_message(["generate", "--prompt", A, "--vector", str(unit_pt), "--coef", "4"])
    assert "--vector needs --layer" in msg
    msg = exit_message(["generate", "--prompt", A, "--ablate", str(unit_pt)])
    assert "--ablate needs --ablate-layer or --layer" in msg
    msg = exit_message(["generate", "--max-new-tokens", "4"])
    assert "no prompts" in msg and "--prompt" in msg and "--prompts-file" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in exit_message(["generate", "--prompts-file", str(empty)])
    missing = tmp_path / "nope.txt"
    msg = exit_message(["generate", "--prompts-file", str(missing)])
    assert str(missing) in msg and "does not exist" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": A}) + "\n{not json\n")
    assert f"{bad}:2: not JSON" in exit_message(["generate", "--prompts-file", str(bad)])
    bad.write_text(json.dumps({"question": A}) + "\n")
    assert "'prompt' or 'messages'" in exit_message(["generate", "--prompts-file", str(bad)])
    assert same_model == []  # all refused before the model was asked for


def test_vector_errors_after_loading(tmp_path, same_model):
    """A vector that does not fit the model is refused with the reason, before anything compiles."""
    torch.save(torch.randn(L, 100), tmp_path / "narrow.pt")
    msg = exit_message(["generate", "--prompt", A, "--vector", str(tmp_path / "narrow.pt"),
                        "--layer", "12"])
    assert msg.startswith("error:") and "width 100" in msg and "576" in msg
    msg = exit_message(["generate", "--prompt", A, "--vector", str(tmp_path / "missing.pt"),
                        "--layer", "12"])
    assert "missing.pt does not exist" in msg
    assert len(same_model) == 2
