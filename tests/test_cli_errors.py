"""`pvjax.cli.main` tells user mistakes from bugs: a `UserError` (or an extraction config error, or
a path that is missing or a directory) is one line on stderr and exit status 2; anything else keeps
its traceback. Bad `--model` sources go through the real `pvjax.load`, which refuses them before
reading any weights."""

from __future__ import annotations

import json

import pytest

import pvjax.commands.generate as generate_command
from pvjax.cli import main
from pvjax.errors import UserError
from pvjax.loading.layout import CheckpointError


def run_cli(capsys, argv):
    """(exit status, stderr) of an in-process CLI call that exits."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def failing_command(monkeypatch, error):
    def run(args):
        raise error

    monkeypatch.setattr(generate_command, "run", run)


@pytest.mark.parametrize(
    "error",
    [
        UserError("something the user can fix"),
        CheckpointError("something the user can fix"),
        FileNotFoundError("something the user can fix"),
        IsADirectoryError("something the user can fix"),
    ],
)
def test_user_errors_are_one_line_and_status_2(capsys, monkeypatch, error):
    failing_command(monkeypatch, error)
    code, err = run_cli(capsys, ["generate", "--prompt", "hi"])
    assert code == 2
    assert err == "pvjax generate: error: something the user can fix\n"


def test_extraction_errors_count_as_user_errors(capsys, monkeypatch):
    from pvjax.methods.extraction import ExtractionError

    failing_command(monkeypatch, ExtractionError("filter.mode must be 'threshold' or 'margin'"))
    code, err = run_cli(capsys, ["generate", "--prompt", "hi"])
    assert (code, err) == (
        2,
        "pvjax generate: error: filter.mode must be 'threshold' or 'margin'\n",
    )


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(capsys, monkeypatch):
    failing_command(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        main(["generate", "--prompt", "hi"])
    failing_command(monkeypatch, ValueError("a plain ValueError is not a user error"))
    with pytest.raises(ValueError):
        main(["generate", "--prompt", "hi"])
    failing_command(monkeypatch, UserError("shown with its traceback"))
    monkeypatch.setenv("PVJAX_DEBUG", "1")
    with pytest.raises(UserError):
        main(["generate", "--prompt", "hi"])


def test_argparse_errors_are_one_line(capsys):
    code, err = run_cli(capsys, ["generate", "--coef", "x"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("pvjax generate: error: argument --coef: invalid float value: 'x'")


def test_bad_model_sources(capsys, tmp_path):
    """Every bad --model gives one line, before any weights are read."""

    def err(model):
        code, text = run_cli(capsys, ["generate", "--prompt", "hi", "--model", str(model)])
        assert code == 2 and len(text.strip().splitlines()) == 1, text
        return text

    assert "no such folder or .gguf file" in err(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty} is empty" in err(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "config.json is missing the field" in err(empty)
    (empty / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    assert "config.json but no *.safetensors weights" in err(empty)
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + bytes(20))
    assert "cut.gguf is truncated or corrupt" in err(tmp_path / "cut.gguf")
    (tmp_path / "other.gguf").write_bytes(b"<html>not a model</html>")
    assert "other.gguf is not a GGUF file" in err(tmp_path / "other.gguf")
    (tmp_path / "dir.gguf").mkdir()
    assert "dir.gguf is a directory" in err(tmp_path / "dir.gguf")
