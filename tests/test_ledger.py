"""The run-directory ledger (`pvjax.files.ledger`): refusals that name every changed field, reruns
of the stages after a change only, no-op reruns that rewrite nothing, resumption after a kill, and
writes that never leave part of a file."""

from __future__ import annotations

import json
import os

import pytest

from pvjax.errors import UserError
from pvjax.files import atomic
from pvjax.files.ledger import Ledger, RunMismatch, Stage


def stages(tmp_path, *, a=1, b=2, c=3, data=None):
    """A three-stage pipeline: `answers` (kept: refused when changed), `judge`, `report`."""
    data = data or tmp_path / "data.txt"
    return [
        Stage(
            "answers", {"model": "m", "n": a}, inputs=(data,), outputs=("answers/*.csv",), keep=True
        ),
        Stage("judge", {"judge": b}, outputs=("judged.csv",)),
        Stage("report", {"plot": c}, outputs=("report.json", "figs")),
    ]


def run(work, sts, calls):
    """Run every unfinished stage as a job would: record first, outputs, then the finished mark."""
    led = Ledger(work, sts)
    if led.done:
        return led
    led.open()
    writes = {
        "answers": ("answers/0.csv",),
        "judge": ("judged.csv",),
        "report": ("report.json", "figs/a.png"),
    }
    for s in sts:
        if not led.finished(s.name):
            calls.append(s.name)
            for f in writes[s.name]:
                atomic.write_text(work / f, f"{s.name} {json.dumps(s.settings)}")
            led.finish(s.name)
    led.complete()
    return led


def snapshot(work):
    return {
        str(p.relative_to(work)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(work.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def work(tmp_path):
    (tmp_path / "data.txt").write_text("the input file")
    return tmp_path / "run"


def test_a_finished_run_rerun_unchanged_rewrites_nothing(tmp_path, work):
    calls = []
    run(work, stages(tmp_path), calls)
    assert calls == ["answers", "judge", "report"] and (work / "DONE").is_file()
    before = snapshot(work)
    assert set(before) == {
        "stages.json",
        "DONE",
        "answers/0.csv",
        "judged.csv",
        "report.json",
        "figs/a.png",
    }
    calls.clear()
    assert run(work, stages(tmp_path), calls).done and calls == []
    # Opening again (a job that opens before deciding) changes nothing either: same bytes, same
    # mtimes.
    Ledger(work, stages(tmp_path)).open()
    assert snapshot(work) == before
    rec = json.loads((work / "stages.json").read_text())
    assert rec["stages"]["judge"] == {"judge": 2} and rec["finished"] == [
        "answers",
        "judge",
        "report",
    ]
    assert rec["inputs"]["answers"] == {
        str(tmp_path / "data.txt"): atomic_sha(tmp_path / "data.txt")
    }


def atomic_sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_kept_stage_is_refused_naming_every_field_and_touching_nothing(tmp_path, work):
    run(work, stages(tmp_path), [])
    before = snapshot(work)
    sts = stages(tmp_path, a=5)
    sts[0] = Stage(
        "answers",
        {"model": "other", "n": 5},
        inputs=sts[0].inputs,
        outputs=sts[0].outputs,
        keep=True,
    )
    with pytest.raises(
        RunMismatch, match=r"different model, n \(model: 'm' -> 'other'; n: 1 -> 5\)"
    ) as e:
        Ledger(work, sts).open()
    assert isinstance(e.value, UserError) and "use a new workdir" in str(e.value)
    (tmp_path / "data.txt").write_text("changed content")
    with pytest.raises(RunMismatch, match=r"content of .*data.txt: sha256"):
        Ledger(work, stages(tmp_path)).stale()
    assert snapshot(work) == before


def test_nested_settings_are_named_by_their_dotted_field(tmp_path):
    Ledger(
        tmp_path, [Stage("point", {"opts": {"scale": 3.0}, "x": 1}, outputs=("*",), keep=True)]
    ).open()
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(RunMismatch, match=r"opts.scale: 3.0 -> 2.0"):
        Ledger(
            tmp_path, [Stage("point", {"opts": {"scale": 2.0}, "x": 1}, outputs=("*",), keep=True)]
        ).open()


def test_a_record_without_outputs_never_blocks_a_rerun(tmp_path):
    """A run that failed (on a bad setting) after its record, before any output, leaves nothing to
    protect."""
    Ledger(tmp_path, [Stage("point", {"layer": 99}, outputs=("*",), keep=True)]).open()
    led = Ledger(tmp_path, [Stage("point", {"layer": 3}, outputs=("*",), keep=True)])
    assert led.open() == ["point"]
    assert json.loads((tmp_path / "stages.json").read_text())["stages"]["point"] == {"layer": 3}


def test_outputs_without_a_record_are_refused(tmp_path, work):
    run(work, stages(tmp_path), [])
    (work / "stages.json").unlink()
    with pytest.raises(RunMismatch, match="no record of what produced them"):
        Ledger(work, stages(tmp_path)).open()


def test_a_changed_stage_reruns_with_the_stages_after_it_only(tmp_path, work):
    calls = []
    run(work, stages(tmp_path), calls)
    kept = snapshot(work)["answers/0.csv"]
    calls.clear()
    led = Ledger(work, stages(tmp_path, b=7))
    assert led.stale() == ["judge", "report"] and not led.done
    led.open()  # deletes the stale outputs and DONE before anything new is written
    assert (
        not (work / "judged.csv").exists()
        and not (work / "figs").exists()
        and not (work / "DONE").exists()
    )
    assert snapshot(work)["answers/0.csv"] == kept
    run(work, stages(tmp_path, b=7), calls)
    assert calls == ["judge", "report"] and snapshot(work)["answers/0.csv"] == kept
    assert (work / "judged.csv").read_text() == 'judge {"judge": 7}'
    calls.clear()
    run(work, stages(tmp_path, b=7, c=9), calls)
    assert calls == ["report"]


def test_without_cascade_each_stage_stands_alone(tmp_path):
    sts = lambda b: [
        Stage("one", 1, outputs=("one.txt",)),
        Stage("two", b, outputs=("two.txt",)),
        Stage("three", 3, outputs=("three.txt",)),
    ]
    led = Ledger(tmp_path, sts(2), cascade=False)
    led.open()
    for n in ("one", "two", "three"):
        atomic.write_text(tmp_path / f"{n}.txt", n)
        led.finish(n)
    assert Ledger(tmp_path, sts(5), cascade=False).stale() == ["two"]


def test_stages_entered_late_are_recorded_and_reset_when_changed(tmp_path):
    led = Ledger(tmp_path, [Stage("config", {"x": 1})], cascade=False)
    led.open()
    assert not led.enter(Stage("round2", {"key": "k1"}, outputs=("r2_*.csv",)))
    atomic.write_text(tmp_path / "r2_0.csv", "a")
    led.finish("round2")
    led.finish("config")
    led.complete()
    again = Ledger(tmp_path, [Stage("config", {"x": 1})], cascade=False)
    assert again.done  # a stage not declared keeps its record
    again.open()
    assert again.enter(Stage("round2", {"key": "k1"}, outputs=("r2_*.csv",)))
    assert not again.enter(Stage("round2", {"key": "k2"}, outputs=("r2_*.csv",)))
    assert not (tmp_path / "r2_0.csv").exists() and not (tmp_path / "DONE").exists()


def test_a_killed_stage_is_redone_and_done_needs_every_stage(tmp_path, work):
    """Killed after a stage wrote its output but before its finished mark: the stage is redone,
    and no DONE appears until it is."""
    calls = []
    led = Ledger(work, stages(tmp_path))
    led.open()
    atomic.write_text(work / "answers/0.csv", "answers")
    led.finish("answers")
    atomic.write_text(work / "judged.csv", "half")  # the kill: no finished mark for judge
    assert not Ledger(work, stages(tmp_path)).done
    run(work, stages(tmp_path), calls)
    assert calls == ["judge", "report"] and (work / "judged.csv").read_text().startswith("judge")
    # DONE present but a stage's mark missing (a record edited, a stage added): not done.
    rec = json.loads((work / "stages.json").read_text())
    rec["finished"].remove("report")
    (work / "stages.json").write_text(json.dumps(rec))
    calls.clear()
    run(work, stages(tmp_path), calls)
    assert calls == ["report"]


def test_a_write_killed_midway_leaves_the_old_file_whole(tmp_path, work, monkeypatch):
    run(work, stages(tmp_path), [])
    before = (work / "stages.json").read_bytes()

    def killed(src, dst):
        # the process dies between writing the temporary file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    led = Ledger(work, stages(tmp_path, c=4))
    with pytest.raises(KeyboardInterrupt):
        led.open()
    monkeypatch.undo()
    assert (work / "stages.json").read_bytes() == before
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp")], "a partial file was left"
    # The kill came before the stale outputs were deleted: the record says nothing else.
    calls = []
    run(work, stages(tmp_path, c=4), calls)
    assert calls == ["report"]


def test_a_kill_while_resetting_a_stage_leaves_it_unfinished(tmp_path, work, monkeypatch):
    """Killed after the stale outputs are gone but before the new record: the old record no longer
    calls that stage finished, so a rerun under the old settings too redoes it."""
    run(work, stages(tmp_path), [])

    def killed(self, extra, settings=True):
        if settings:
            raise KeyboardInterrupt
        return real(self, extra, settings)

    real = Ledger._write
    monkeypatch.setattr(Ledger, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        Ledger(work, stages(tmp_path, c=4)).open()
    monkeypatch.undo()
    assert not (work / "report.json").exists()
    calls = []
    run(work, stages(tmp_path), calls)
    assert calls == ["report"]
