"""An extraction config is checked whole before anything is written or loaded: every problem in one
message, from the API and from the command line. No model is loaded here (the embedded model's
config is read from its GGUF metadata)."""

from __future__ import annotations

import json

import pytest

from configs.extract import get_config
from pvjax.settings.extraction import FIELDS, InvalidConfig, validate_config
from pvjax.settings.fields import OPTIONAL_FIELDS


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    import pvjax

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(pvjax, "load", refuse)


def runlocal(workdir, **changes) -> dict:
    """The runlocal config as a plain dict (API callers may pass one; ConfigDict would refuse a
    value of the wrong type before the check under test sees it), with `section__key` changes."""
    cfg = get_config("runlocal").to_dict()
    cfg["workdir"], cfg["trait"] = str(workdir), "humorous"
    for field, value in changes.items():
        section, _, key = field.rpartition("__")
        (cfg[section] if section else cfg)[key] = value
    return cfg


def flat_keys(d, prefix=""):
    return [
        k
        for key, v in d.items()
        for k in (flat_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])
    ]


def test_the_schema_is_exactly_the_shipped_config():
    """The shipped config writes every field out, the optional ones (`enable_thinking`) too."""
    for variant in ("", "runlocal"):
        assert sorted(flat_keys(get_config(variant).to_dict())) == sorted(
            [*FIELDS, *OPTIONAL_FIELDS]
        )


def test_an_old_config_without_enable_thinking_still_checks_and_a_bad_one_is_named(tmp_path):
    old = runlocal(tmp_path / "new")
    del old["enable_thinking"]
    assert validate_config(old).enable_thinking is False
    assert validate_config(runlocal(tmp_path / "new", enable_thinking=True)).enable_thinking
    with pytest.raises(InvalidConfig, match="enable_thinking must be True or False"):
        validate_config(runlocal(tmp_path / "new", enable_thinking="yes"))


def test_a_good_config_resolves_what_the_run_needs(tmp_path):
    checked = validate_config(runlocal(tmp_path / "new"))
    assert checked.model_config.num_layers == 30 and checked.causality_layers == (10, 20)
    assert checked.dtype == "float32" and checked.trait.name == "humorous"
    assert validate_config(runlocal(tmp_path / "new", causality__layers=())).causality_layers == (
        8,
        12,
        18,
        22,
    )
    assert not (tmp_path / "new").exists()


def test_every_problem_is_reported_at_once_and_nothing_is_written(tmp_path):
    work = tmp_path / "new" / "run"
    bad = {
        "max_new_tokens": 0,
        "temperature": -1.0,
        "top_p": 1.5,
        "n_per_question": 0,
        "batch_size": 0,
        "dtype": "float8",
        "plot": "yes",
        "judge__backend": "bogus",
        "judge__concurrency": 0,
        "filter__mode": "bogus",
        "filter__threshold": 150.0,
        "filter__coherence": -1.0,
        "filter__min_pairs": 0,
        "causality__layers": (0, 99),
        "causality__coefs": (1.0, float("nan")),
        "causality__max_pairs": 0,
    }
    with pytest.raises(InvalidConfig) as e:
        validate_config(runlocal(work, **bad))
    msg = str(e.value)
    assert "\n" not in msg
    for field in bad:
        assert field.replace("__", ".") in msg, field
    assert "causality.layers [0, 99] outside 1..30" in msg
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"n_pairs": 9}, "n_pairs=9 but trait 'humorous' has only 5 instruction pairs"),
        ({"n_questions": 50}, "n_questions=50 but trait 'humorous' has only 20 questions"),
        (
            {"filter__min_pairs": 13, "n_per_question": 1},
            "filter.min_pairs=13 exceeds the 12 answer pairs",
        ),
        (
            {"filter__coherence": 50.0, "judge__backend": "local"},
            "filter.coherence=50 needs coherence scores, but judge.coherence is False",
        ),
        ({"trait": "nosuch"}, "trait: no shipped trait 'nosuch'"),
        ({"model": "/nonexistent/model"}, "model: model source '/nonexistent/model' is neither"),
        (
            {"judge__model": "/nonexistent/judge", "judge__backend": "local"},
            "judge.model: model source '/nonexistent/judge'",
        ),
        (
            {"judge__backend": "openai", "judge__model": ""},
            "judge.model must name the served model",
        ),
        ({"causality__layers": (10, 10)}, "repeats a layer"),
        (
            {"judge__backend": "none", "filter__mode": "margin"},
            "filter.mode='margin' reads judge scores, but judge.backend is 'none'",
        ),
        (
            {"judge__backend": "none", "filter__mode": "contrast", "filter__coherence": 50.0},
            "filter.coherence=50 needs coherence scores, but judge.backend is 'none'",
        ),
        (
            {"n_per_question": 2, "temperature": 0.0},
            "n_per_question=2 with temperature=0 repeats one greedy answer",
        ),
        ({"filter__contrast_margin": -0.5}, "filter.contrast_margin must be >= 0, got -0.5"),
    ],
)
def test_what_a_field_names_is_checked_too(tmp_path, changes, expected):
    with pytest.raises(
        InvalidConfig, match="bad extraction config: .*" + expected.replace("(", r"\(")
    ):
        validate_config(runlocal(tmp_path, **changes))


def test_judge_free_filters_validate(tmp_path):
    for mode in ("contrast", "none"):
        checked = validate_config(
            runlocal(
                tmp_path,
                judge__backend="none",
                filter__mode=mode,
                filter__coherence=0.0,
                n_per_question=3,
                temperature=1.0,
            )
        )
        assert checked.cfg["filter"]["mode"] == mode


def test_a_trait_file_that_does_not_validate_is_reported(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "instruction": [{"pos": "a", "neg": ""}],
                "questions": ["q"],
                "eval_prompt": "{question} {answer}",
            }
        )
    )
    with pytest.raises(InvalidConfig, match=r"trait: mine.json: instruction\[0\].neg is empty"):
        validate_config(runlocal(tmp_path / "w", trait=str(path), n_pairs=0, n_questions=0))


def test_unknown_and_missing_fields_of_a_plain_dict(tmp_path):
    d = runlocal(tmp_path)
    d["nosuch"] = 1
    d["judge"]["typo"] = 2
    del d["filter"]["margin"]
    with pytest.raises(
        InvalidConfig,
        match=r"unknown config field\(s\) judge.typo, nosuch \(known: trait, "
        r".*missing config field\(s\) filter.margin",
    ):
        validate_config(d)


def test_a_workdir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    for work, expected in ((f, "is a file, not a directory"), (f / "sub", "cannot be created")):
        with pytest.raises(InvalidConfig, match=expected):
            validate_config(runlocal(work))
    assert f.read_text() == "keep me"


# --- The command line: one line naming the problem, non-zero exit, no traceback, no model load. ---


@pytest.fixture
def cli_error(capsys):
    """The one line `pvjax extract ARGV` prints on stderr, asserting it exits with status 2."""
    from pvjax.cli import main

    def run(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(["extract", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("pvjax extract: error: ") and "error: error:" not in err, err
        return err.removeprefix("pvjax extract: error: ")

    return run


CONFIG = "configs/extract.py:runlocal"


def test_cli_config_file_mistakes(tmp_path, monkeypatch, cli_error):
    import os

    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))
    assert "config file 'configs/nosuch.py' not found" in cli_error("--config", "configs/nosuch.py")
    assert "config 'configs' is a directory, not a config file" in cli_error("--config", "configs")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=''):\n    raise RuntimeError('no such variant')\n")
    assert "cannot load config file" in cli_error("--config", str(broken))
    msg = cli_error("--config", CONFIG, "--config.nosuch=1")
    assert msg.startswith("unknown config field 'nosuch' (known: ") and "judge.backend" in msg
    assert "unknown config field 'judge.nosuch'" in cli_error(
        "--config", CONFIG, "--config.judge.nosuch=1"
    )
    assert "--config.n_pairs=abc" in cli_error("--config", CONFIG, "--config.n_pairs=abc")


def test_cli_bad_values_are_reported_before_the_workdir_or_model(tmp_path, monkeypatch, cli_error):
    import os

    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))
    f = tmp_path / "file"
    f.write_text("")
    assert "is a file, not a directory" in cli_error("--config", CONFIG, f"--config.workdir={f}")
    work = tmp_path / "run"
    msg = cli_error(
        "--config",
        CONFIG,
        f"--config.workdir={work}",
        "--config.max_new_tokens=0",
        "--config.judge.backend=bogus",
        "--config.causality.layers=(99,)",
    )
    assert "max_new_tokens" in msg and "judge.backend" in msg and "causality.layers [99]" in msg
    assert not work.exists()


def test_the_model_config_is_read_from_metadata_alone(tmp_path):
    """The same ModelConfig as gguf's own reader gives a load, and a broken file is named as
    such."""
    import gguf

    from pvjax.loading import read_model_config
    from pvjax.loading.embedded import embedded_gguf_path
    from pvjax.loading.gguf_file import gguf_config

    path = embedded_gguf_path()
    assert read_model_config("smollm2-135m-instruct") == gguf_config(
        gguf.GGUFReader(str(path)), "smollm2-135m-instruct"
    )
    head = path.read_bytes()[:200_000]
    for name, blob, expected in (
        ("cut.gguf", head, "truncated GGUF file"),
        ("text.gguf", b"not a model\n" * 10, "not a GGUF file"),
    ):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(InvalidConfig, match=f"model: .*{name}: {expected}"):
            validate_config(runlocal(tmp_path / "w", model=str(tmp_path / name)))
