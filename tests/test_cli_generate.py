"""`pvjax generate` in-process: a coefficient sweep in one batch, prompts files, and argument
errors that stop before any model work.

The sweep runs the whole path, loading the embedded model inside the command. The other tests
hand the command the session's model (`same_model`: a spy on `pvjax.load` that checks what it was
asked for), saving a load each, and share shapes (batch 2, short prompts) with the library
reference call, so they reuse its compiled program. Everything runs on the scanned layer layout
(`--scanned`, `unroll=False`), which compiles in a fifth of the unrolled time; test_generate.py
holds the unrolled default to transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pvjax
from pvjax.cli import main
from pvjax.engine.generate import SamplingParams, generate

A = "What is the capital of France?"
B = "Give me advice on dealing with a rude coworker."
L, D = 31, 576
N_NEW = 12


@pytest.fixture(scope="module")
def reference(smollm2):
    """Unsteered greedy answers from the library, the baseline every CLI run is held to."""
    return generate(smollm2, [A, B], sampling=SamplingParams(max_new_tokens=N_NEW), unroll=False)


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

    def load(source, *, dtype=None, enable_thinking=False):
        calls.append((str(source), dtype))
        assert str(source) == "smollm2-135m-instruct" and dtype is None and not enable_thinking
        return smollm2

    monkeypatch.setattr(pvjax, "load", load)
    return calls


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_coefficient_sweep_json(capsys, unit_pt, reference):
    """Every prompt under every coefficient, prompt-major within a coefficient: A@0, B@0, A@60,
    B@60. Residual norms at layer 12 are ~800, so 60 along a unit direction visibly steers."""
    rc = main(
        [
            "generate",
            "--prompt",
            A,
            "--prompt",
            B,
            "--vector",
            str(unit_pt),
            "--layer",
            "12",
            "--coef",
            "0",
            "--coef",
            "60",
            "--json",
            "--max-new-tokens",
            str(N_NEW),
            "--scanned",
        ]
    )
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
        assert s["prompt_last_projection"]["12"] - u["prompt_last_projection"][
            "12"
        ] == pytest.approx(60, abs=0.01)


def test_prompts_files(capsys, tmp_path, reference, same_model):
    """A .txt file (one prompt a line, blank lines skipped) in the plain output format, then a
    .jsonl with a bare prompt and a conversation, as JSON."""
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"\n{A}\n\n   \n{B}\n\n")
    assert (
        main(["generate", "--prompts-file", str(txt), "--max-new-tokens", str(N_NEW), "--scanned"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("### ") == 2
    assert out.index(f"### {A}\n{reference.texts[0]}\n") < out.index(
        f"### {B}\n{reference.texts[1]}\n"
    )

    jsonl = tmp_path / "prompts.jsonl"
    conversation = [{"role": "user", "content": A}]
    jsonl.write_text(
        json.dumps({"prompt": B}) + "\n\n" + json.dumps({"messages": conversation}) + "\n"
    )
    assert (
        main(
            [
                "generate",
                "--prompts-file",
                str(jsonl),
                "--max-new-tokens",
                "4",
                "--json",
                "--scanned",
            ]
        )
        == 0
    )
    rows = json_lines(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == [B, conversation]
    # a one-message conversation is the same chat prompt as the bare string
    assert rows[0]["tokens"] == reference.tokens[1][:4]
    assert rows[1]["tokens"] == reference.tokens[0][:4]
    assert all("coef" not in r for r in rows)  # no vector, no steering fields
    assert len(same_model) == 2


def user_error(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit status 2 and exactly one line on stderr (no
    traceback), `pvjax generate: error: ...`; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvjax generate: error: "), err
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """`pvjax.load` that fails the test if called: these mistakes must be caught before it."""

    def load(*a, **kw):
        raise AssertionError("pvjax.load was called")

    monkeypatch.setattr(pvjax, "load", load)


def test_errors_before_loading(capsys, tmp_path, unit_pt, no_load):
    err = lambda *argv: user_error(capsys, ["generate", *argv])
    assert "--vector needs --layer" in err("--prompt", A, "--vector", str(unit_pt), "--coef", "4")
    assert "--ablate needs --ablate-layer or --layer" in err(
        "--prompt", A, "--ablate", str(unit_pt)
    )
    msg = err("--max-new-tokens", "4")
    assert "no prompts" in msg and "--prompt" in msg and "--prompts-file" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in err("--prompts-file", str(empty))
    missing = tmp_path / "nope.txt"
    msg = err("--prompts-file", str(missing))
    assert str(missing) in msg and "does not exist" in msg
    assert f"{tmp_path} is a directory" in err("--prompts-file", str(tmp_path))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00prompt")
    assert "is not UTF-8 text" in err("--prompts-file", str(tmp_path / "binary.txt"))
    assert "--prompt number 2 is empty" in err("--prompt", A, "--prompt", "  ")


def test_steering_flags_need_a_vector(capsys, unit_pt, no_load):
    """They used to be ignored: an unsteered answer and exit 0."""
    err = lambda *argv: user_error(capsys, ["generate", "--prompt", A, *argv])
    assert "--layer, --coef steer along a vector: pass --vector" in err(
        "--layer", "12", "--coef", "4"
    )
    assert "--coef steer along a vector" in err("--coef", "4")
    assert "--positions steer along a vector" in err("--positions", "all")
    assert "--ablate-layer needs --ablate" in err("--ablate-layer", "12")
    assert "--ablate-layer needs --ablate" in err(
        "--vector", str(unit_pt), "--layer", "3", "--ablate-layer", "4"
    )
    assert "--coef must be finite, got nan" in err(
        "--vector", str(unit_pt), "--layer", "12", "--coef", "nan"
    )
    assert "--coef must be finite, got inf" in err(
        "--vector", str(unit_pt), "--layer", "12", "--coef", "inf"
    )
    assert "--layer takes hidden_states indices" in err("--vector", str(unit_pt), "--layer", "-1")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (
            ["--min-new-tokens", "9", "--max-new-tokens", "4"],
            "min_new_tokens must be in 0..max_new_tokens",
        ),
        (["--stop", ""], "stop must be a tuple of non-empty strings"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--seed", "-1"], "--seed must be in 0..2**32-1"),
        (["--max-new-tokens", "x"], "argument --max-new-tokens: invalid int value"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such folder or .gguf file"),
    ],
)
def test_sampling_and_argument_errors_before_loading(capsys, argv, message, no_load):
    """Checked in a fraction of a second, not after a model load."""
    assert message in user_error(capsys, ["generate", "--prompt", A, *argv])


def test_model_file_that_is_not_gguf(capsys, tmp_path, no_load):
    (tmp_path / "weights.bin").write_bytes(b"x")
    msg = user_error(capsys, ["generate", "--prompt", A, "--model", str(tmp_path / "weights.bin")])
    assert "a file must be a .gguf" in msg


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": []}, "'messages' is an empty conversation"),
        ({"messages": [{"role": "user"}]}, "'messages' has a malformed message 0"),
        ({"messages": [{"role": "user", "content": 3}]}, "'messages' has a malformed message 0"),
        (
            {"messages": [{"role": "human", "content": "hi"}]},
            "'messages' has a malformed message 0",
        ),
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"prompt": 42}, "'prompt' must be a string, got int"),
        ({"prompt": ""}, "'prompt' is empty"),
        ({"prompt": [{"role": "user", "content": "hi"}]}, "'prompt' must be a string, got list"),
    ],
)
def test_malformed_jsonl_rows_name_their_line(capsys, tmp_path, row, message, no_load):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": A}) + "\n" + json.dumps(row) + "\n")
    assert f"{path}:2: {message}" in user_error(capsys, ["generate", "--prompts-file", str(path)])
    path.write_text(json.dumps({"prompt": A}) + "\n{not json\n")
    assert f"{path}:2: not JSON" in user_error(capsys, ["generate", "--prompts-file", str(path)])
    path.write_text(json.dumps({"question": A}) + "\n")
    assert "'prompt' or 'messages'" in user_error(capsys, ["generate", "--prompts-file", str(path)])


def test_vector_path_errors_before_loading(capsys, tmp_path, unit_pt, no_load):
    err = lambda spec: user_error(
        capsys, ["generate", "--prompt", A, "--vector", spec, "--layer", "12"]
    )
    assert f"vector file {tmp_path / 'missing.pt'} does not exist" in err(
        str(tmp_path / "missing.pt")
    )
    assert f"vector file {tmp_path} is a directory" in err(str(tmp_path))
    assert "does not exist" in err(str(tmp_path / "missing.safetensors") + ":prompt_avg_diff")
    msg = user_error(
        capsys, ["generate", "--prompt", A, "--ablate", str(tmp_path), "--layer", "12"]
    )
    assert "is a directory" in msg
    from safetensors.numpy import save_file

    save_file({"response_avg_diff": np.ones((L, D), np.float32)}, str(tmp_path / "v.safetensors"))
    assert "has no tensor 'nokey'" in err(str(tmp_path / "v.safetensors") + ":nokey")
    save_file(
        {"response_avg_diff": np.full((L, D), np.nan, np.float32)},
        str(tmp_path / "nan.safetensors"),
    )
    assert "contains NaN or infinite values" in err(str(tmp_path / "nan.safetensors"))


def test_errors_after_loading(capsys, tmp_path, same_model):
    """What needs the model (its width, depth and context) is refused with the reason, before
    anything compiles."""
    from pvjax.engine.generate import compile_count

    before = compile_count()
    torch.save(torch.randn(L, 100), tmp_path / "narrow.pt")
    msg = user_error(
        capsys,
        ["generate", "--prompt", A, "--vector", str(tmp_path / "narrow.pt"), "--layer", "12"],
    )
    assert "width 100" in msg and "576" in msg
    torch.save(torch.randn(L, D), tmp_path / "x.pt")
    msg = user_error(
        capsys, ["generate", "--prompt", A, "--vector", str(tmp_path / "x.pt"), "--layer", "31"]
    )
    assert "layer 31 is outside 0..30" in msg
    msg = user_error(capsys, ["generate", "--prompt", A, "--prompt", "hi " * 9000])
    assert "prompt 1 has 90" in msg and "context window of smollm2-135m-instruct (8192)" in msg
    assert len(same_model) == 1  # the width and the layer are refused before the load now
    assert compile_count() == before
