"""The experiment runner without a model: sweep expansion, point directories, the summary table,
resuming a killed sweep, and every bad input refused before anything runs."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from pvjax import cli
from pvjax.errors import UsageError
from pvjax.studies import runner

REPO = os.path.join(os.path.dirname(__file__), "..")

STUDY = '''
"""A study that squares `x`, in two resumable parts, and can be killed between them."""
import json
from pvjax.files import atomic

CALLS = []      # (x, "part" | "resumed") per run call
KILL_AT = None  # an x whose run dies after its first part


def validate(cfg, work):
    if cfg.x < 0:
        from pvjax.errors import InputError
        raise InputError(f"x must be >= 0, got {cfg.x}")


def run(cfg, work, *, progress=True):
    part = work / "part1.json"
    if part.exists():
        CALLS.append((cfg.x, "resumed"))
    else:
        CALLS.append((cfg.x, "part"))
        atomic.write_json(part, {"half": cfg.x})
    if KILL_AT == cfg.x:
        raise KeyboardInterrupt
    return [{"x": cfg.x, "square": cfg.x ** 2, "scale": cfg.opts.scale}]
'''

CONFIG = """
import ml_collections
from pvjax.studies.runner import product

def get_config(arg=""):
    c = ml_collections.ConfigDict()
    c.study = "mystudies.square"
    c.x = 0
    c.workdir = ""
    c.opts = ml_collections.ConfigDict()
    c.opts.scale = 1.0
    if arg == "big":
        c.x = 10
    return c

def sweep(add):
    add(product(x=[1, 2, 3], **{"opts.scale": [1.0, 0.5]}))
"""


@pytest.fixture
def study(tmp_path, monkeypatch):
    pkg = tmp_path / "mods" / "mystudies"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "square.py").write_text(STUDY)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import importlib

    import mystudies.square as mod

    mod = importlib.reload(mod)
    mod.CALLS.clear()
    config = tmp_path / "square.py"
    config.write_text(CONFIG)
    return mod, str(config)


def test_product_and_zip():
    assert runner.product(a=[1, 2], b=["x"]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert runner.zip_(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(UsageError, match="axis 'b' is empty"):
        runner.product(a=[1], b=[])
    with pytest.raises(UsageError, match="different lengths"):
        runner.zip_(a=[1, 2], b=[3])


def test_point_names_are_readable_and_unique():
    assert runner.point_name({"layers": (10, 20), "coefs": 2.0}) == "layers=10_20,coefs=2"
    odd = runner.point_name({"vector": "/runs/evil/vectors.safetensors:prompt_last_diff"})
    assert "/" not in odd and len(odd) <= 69
    assert odd != runner.point_name({"vector": "/runs/evil/vectors.safetensors:prompt_avg_diff"})


def test_sweep_runs_every_point_and_a_killed_one_resumes(study, tmp_path, capsys):
    mod, config = study
    work = tmp_path / "out"
    mod.KILL_AT = 2
    with pytest.raises(KeyboardInterrupt):
        cli.main(["sweep", "--config", config, "--workdir", str(work), "--quiet"])
    done = sorted(p.parent.name for p in work.glob("*/DONE"))
    assert done == ["x=1,scale=0.5", "x=1,scale=1"]  # finished points are whole on disk
    assert (work / "x=2,scale=1" / "part1.json").exists() and not (
        work / "x=2,scale=1" / "DONE"
    ).exists()

    mod.KILL_AT = None
    mod.CALLS.clear()
    assert cli.main(["sweep", "--config", config, "--workdir", str(work), "--quiet"]) == 0
    # Finished points are not run again; the killed one resumes from its part.
    assert mod.CALLS[0] == (2, "resumed") and (1, "part") not in mod.CALLS and len(mod.CALLS) == 4
    out = capsys.readouterr().out
    assert "x=1,scale=1: done before, skipped" in out
    rows = (work / "summary.csv").read_text().splitlines()
    assert rows[0] == "x,square,scale,point" and len(rows) == 7
    assert '9,0.5,"x=3,scale=0.5"' in rows[-1]
    point = json.loads((work / "x=3,scale=0.5" / "point.json").read_text())
    assert (
        point["values"] == {"x": 3, "opts.scale": 0.5} and point["config"]["opts"]["scale"] == 0.5
    )
    assert point["study"] == "mystudies.square" and point["pvjax_version"] and point["git_revision"]
    assert json.loads((work / "x=3,scale=0.5" / "results.json").read_text()) == [
        {"x": 3, "square": 9, "scale": 0.5}
    ]
    assert "square" in out and "scale" in out  # the printed table

    mod.CALLS.clear()
    cli.main(["sweep", "--config", config, "--workdir", str(work), "--quiet"])
    assert mod.CALLS == []  # all done: nothing runs


def test_run_is_one_point_in_the_workdir(study, tmp_path, capsys):
    mod, config = study
    assert (
        cli.main(
            [
                "run",
                "--config",
                config + ":big",
                "--config.opts.scale=3.0",
                "--workdir",
                str(tmp_path / "one"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "one" / "DONE").exists()
    assert (tmp_path / "one" / "summary.csv").read_text().splitlines() == [
        "x,square,scale",
        "10,100,3.0",
    ]
    # The same directory under another config is refused, naming the field.
    with pytest.raises(SystemExit):
        cli.main(
            [
                "run",
                "--config",
                config + ":big",
                "--config.opts.scale=2.0",
                "--workdir",
                str(tmp_path / "one"),
            ]
        )
    assert "opts.scale: 3.0 -> 2.0" in capsys.readouterr().err


def test_a_finished_point_rerun_rewrites_no_file(study, tmp_path):
    mod, config = study
    argv = ["run", "--config", config + ":big", "--workdir", str(tmp_path / "one"), "--quiet"]
    assert cli.main(argv) == 0
    files = lambda: {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in (tmp_path / "one").rglob("*")  # noqa: E731
        if p.is_file()
    }
    before = files()
    assert {p.name for p in before} == {
        "point.json",
        "part1.json",
        "results.json",
        "results.csv",
        "DONE",
        "summary.csv",
    }
    assert json.loads((tmp_path / "one" / "point.json").read_text())["finished"] == ["point"]
    mod.CALLS.clear()
    assert cli.main(argv) == 0 and mod.CALLS == []
    assert files() == before


def write_config(tmp_path, sweep_body: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(
        CONFIG.split("def sweep")[0]
        + "def sweep(add):\n"
        + textwrap.indent(sweep_body, "    ")
        + "\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "body, message",
    [
        ("add(y=1)", "sweep key 'y' is not a config field"),
        ("add(**{'opts.scal': 1.0})", "sweep key 'opts.scal' is not a config field"),
        ("add(product(x=[]))", "sweep axis 'x' is empty"),
        ("pass", "adds no points"),
        ("add(x=1)\nadd(x=1)", "adds the point {'x': 1} twice"),
        ("add(x='one')", "sweep value x='one' does not fit the field"),
        ("add(x=-1)", "x must be >= 0, got -1"),
    ],
)
def test_bad_sweeps_are_refused_before_any_point_runs(study, tmp_path, capsys, body, message):
    mod, _ = study
    config = write_config(tmp_path, body)
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--config", config, "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert mod.CALLS == [] and not (tmp_path / "w" / "summary.csv").exists()


def test_other_usage_errors(study, tmp_path, capsys):
    _, config = study
    for argv, message in [
        (["run", "--config", config], "no work directory"),
        (
            ["sweep", "--config", config, "--config.x=2", "--workdir", str(tmp_path)],
            "--config.x is also set by the sweep",
        ),
        (
            [
                "run",
                "--config",
                os.path.join(REPO, "configs", "steer.py"),
                "--config.study=nosuch",
                "--workdir",
                str(tmp_path),
            ],
            "unknown study 'nosuch'",
        ),
    ]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err


def test_shipped_study_configs_load_with_their_sweeps(tmp_path, monkeypatch):
    from pvjax.commands.extract import load_config

    monkeypatch.chdir(tmp_path)  # from anywhere: configs that nest others load them by path
    for name in ("steer", "ablate", "extract", "monitor", "screen", "shift", "finetune_study"):
        path = os.path.join(REPO, "configs", f"{name}.py")
        for variant in ("", ":runlocal"):
            cfg = load_config(path + variant, [])
            assert cfg.get("study", "extract") == name
        if name in ("steer", "ablate", "extract"):
            assert runner.sweep_points(path)


def test_a_point_that_names_its_workdir_runs_there(study, tmp_path):
    """configs/extract.py's sweep gives each trait its own directory; the summary stays in
    --workdir."""
    mod, _ = study
    where = tmp_path / "elsewhere"
    config = write_config(
        tmp_path,
        f"add(x=1, workdir={str(where / 'one')!r})\nadd(x=2, workdir={str(where / 'two')!r})",
    )
    assert cli.main(["sweep", "--config", config, "--workdir", str(tmp_path / "w"), "--quiet"]) == 0
    assert (where / "one" / "DONE").exists() and (where / "two" / "results.csv").exists()
    assert [
        r.split(",")[-1] for r in (tmp_path / "w" / "summary.csv").read_text().splitlines()
    ] == ["point", "x=1", "x=2"]


def test_where_a_point_ran_is_not_part_of_its_config_at_any_depth():
    """A study nests extraction and finetuning configs, each with a `distributed` section: a point
    resumed under another process count (or by an older pvjax without the section) is the same
    point."""
    snap = {
        "layer": 20,
        "distributed": {"num_processes": 2},
        "finetune": {"lr": 1e-3, "distributed": {"process_id": 1}, "lora": {"rank": 8}},
        "extract": {"distributed": {"coordinator": "h:1"}, "n": 3},
    }
    assert runner._comparable(snap) == {
        "layer": 20,
        "finetune": {"lr": 1e-3, "lora": {"rank": 8}},
        "extract": {"n": 3},
    }
    from pvjax.files.ledger import differences

    assert differences(runner._comparable(snap), runner._comparable({**snap, "layer": 10})) != []
