"""A bad setting costs no compute and blocks no rerun: through `pvjax run` every study checks its
whole config (against the model's depth, read from metadata) before anything is written or
loaded, and `pvjax extract` refuses an unreachable judge before generating an answer. Each case
fails before any model load, so these run in seconds on the embedded model."""

from __future__ import annotations

import socket

import pytest

import pvjax
from pvjax import cli
from pvjax.studies import runner


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(
        pvjax, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded"))
    )


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "config, bad, good, message",
    [
        (
            "configs/monitor.py:runlocal",
            "monitor.layer=99",
            "monitor.layer=12",
            "monitor.layer must be -1 (the layer of largest r) or a hidden_states index 0..30",
        ),
        (
            "configs/monitor.py:runlocal",
            "monitor.rule=bogus",
            "monitor.rule=fpr",
            "monitor.rule must be one of",
        ),
        (
            "configs/screen.py:runlocal",
            "flag.mode=bogus",
            "flag.mode=threshold",
            "flag mode must be one of",
        ),
        (
            "configs/shift.py:runlocal",
            "layer=99",
            "layer=12",
            "layer 99 is not a hidden_states index",
        ),
    ],
)
def test_a_bad_setting_fails_before_anything_is_written_and_never_blocks_the_fix(
    config, bad, good, message, tmp_path, no_load, capsys
):
    work = tmp_path / "w"
    err = one_line_error(
        capsys, ["run", "--config", config, f"--config.{bad}", "--workdir", str(work), "--quiet"]
    )
    assert message in err
    assert not work.exists() or not [p for p in work.rglob("*") if p.is_file()], (
        "written before the check"
    )
    # The corrected config passes every check and finds nothing that refuses it.
    study, _, points = runner.load(config, [f"--config.{good}"], str(work), sweep=False)
    module = runner.study_module(study)
    module.validate(points[0].cfg, work)
    assert runner.check_directory(work, points[0].cfg, module) is False
    # Even a record left by a run that failed on a bad setting (as before the check came first),
    # with nothing else beside it, does not block the corrected rerun.
    _, _, bad_points = runner.load(config, [f"--config.{bad}"], str(work), sweep=False)
    work.mkdir(exist_ok=True)
    runner.point_ledger(work, bad_points[0].cfg, module).open(config={})
    assert runner.check_directory(work, points[0].cfg, module) is False


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: a connect is refused at once
    return port


def test_extract_with_an_unreachable_judge_is_one_line_before_any_answer(tmp_path, no_load, capsys):
    work = tmp_path / "w"
    url = f"http://127.0.0.1:{closed_port()}/v1"
    err = one_line_error(
        capsys,
        [
            "extract",
            "--config",
            "configs/extract.py:runlocal",
            "--config.judge.backend=openai",
            f"--config.judge.base_url={url}",
            "--config.judge.model=x",
            f"--config.workdir={work}",
            "--quiet",
        ],
    )
    assert f"judge.base_url {url}: cannot connect" in err
    assert not work.exists(), "written before the judge was probed"
