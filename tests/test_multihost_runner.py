"""The study runner as a multi-process job: a steer sweep on a tiny random model run by two
processes on loopback (jax.distributed over 127.0.0.1, one CPU device each) splits its points
between them, extracts the shared vector once, resumes what a one-process run left, and writes the
summary of the one-process run; and a job that cannot gather (a process that never comes, a
process count that differs) ends in a `JobError` naming the coordinator, the count and the process,
before JAX starts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
from loopback import ROOT, free_port, run_together
from tiny_models import save_tiny

from pvjax import cli
from pvjax.parallel import multihost
from pvjax.parallel.multihost import JobError

STEER = str(ROOT / "configs" / "steer.py") + ":runlocal"
POINTS = ("positions=response", "positions=prompt", "positions=all")  # the config's sweep, in order


def _argv(model: Path, work: Path) -> list[str]:
    ext = "--config.extract."
    return [
        "sweep",
        "--config",
        STEER,
        "--workdir",
        str(work),
        "--quiet",
        f"--config.model={model}",
        "--config.layers=(2,)",
        "--config.coefs=(0.0,2.0)",
        "--config.n_questions=2",
        "--config.mc.path=",
        "--config.max_new_tokens=4",
        "--config.batch_size=8",
        "--config.forward_batch_size=8",
        f"{ext}n_questions=1",
        f"{ext}n_pairs=1",
        f"{ext}max_new_tokens=4",
        f"{ext}filter.mode=none",
        f"{ext}filter.min_pairs=1",
        f"{ext}causality.layers=(1,)",
        f"{ext}causality.coefs=(0.0,1.0)",
        f"{ext}batch_size=4",
    ]


def _files(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}


def _two_processes(argv: list[str], key: str, cwd) -> list[tuple[str, str]]:
    """`python -m pvjax.cli ARGV` as processes 0 and 1 of a loopback job (`key`: the config's
    distributed section); returns their (stdout, stderr), both having exited 0."""
    port = free_port()
    done = run_together(
        [
            [
                sys.executable,
                "-m",
                "pvjax.cli",
                *argv,
                f"--config.{key}.coordinator=127.0.0.1:{port}",
                f"--config.{key}.num_processes=2",
                f"--config.{key}.process_id={i}",
                f"--config.{key}.timeout=120",
            ]
            for i in range(2)
        ],
        cwd=cwd,
    )
    for rc, _, err in done:
        assert rc == 0, err[-3000:]
    return [(out, err) for _, out, err in done]


def test_two_process_sweep_splits_points_resumes_and_writes_the_one_process_summary(tmp_path):
    """Five points (a jitted square each, `tests/multihost_study.py`) on two processes, resuming
    a run killed with point 0 finished and point 1 half done."""
    config = str(ROOT / "tests" / "multihost_study.py")
    argv = lambda work: ["sweep", "--config", config, "--workdir", str(work), "--quiet"]
    assert cli.main(argv(tmp_path / "one")) == 0  # one process: the reference
    names = [f"x={x}" for x in range(5)]
    assert json.loads((tmp_path / "one" / names[0] / "point.json").read_text())["job"] == {
        "process": 0,
        "processes": 1,
        "mesh": {"data": 1, "model": 1},
    }

    work = tmp_path / "two"  # killed: point 0 finished, point 1 after its first part
    shutil.copytree(tmp_path / "one" / names[0], work / names[0])
    shutil.copytree(tmp_path / "one" / names[1], work / names[1])
    (work / names[1] / "DONE").unlink()
    kept = _files(work / names[0])
    outs = _two_processes(argv(work), "distributed", tmp_path)

    assert (work / "summary.csv").read_bytes() == (tmp_path / "one" / "summary.csv").read_bytes()
    logs = [out for out, _ in outs]  # the runner's progress lines go to stdout
    assert "summary:" in logs[0] and "summary:" not in logs[1], "process 0 alone prints the table"
    assert _files(work / names[0]) == kept, "a finished point was redone"
    assert f"{names[0]}: done before, skipped" in logs[0]
    pids = [(work / n / "calls.txt").read_text().split() for n in names]
    assert len(pids[1]) == 2 and all(len(p) == 1 for i, p in enumerate(pids) if i != 1), (
        pids
    )  # once each
    for i in range(1, 5):  # point i by process i mod 2, which alone wrote its directory
        job = json.loads((work / names[i] / "point.json").read_text())["job"]
        assert job == {"process": i % 2, "processes": 2, "mesh": {"data": 1, "model": 1}}, (i, job)
        assert f"{names[i]}: running tests.multihost_study (process {i % 2})" in logs[i % 2]
        assert f"{names[i]}: running" not in logs[1 - i % 2]
    assert len({pids[i][-1] for i in (1, 3)}) == 1 and len({pids[i][0] for i in (2, 4)}) == 1
    assert pids[1][-1] != pids[2][0]


@pytest.mark.skipif(
    not os.environ.get("PVJAX_MULTIHOST_STEER"),
    reason="about a minute of CPU; PVJAX_MULTIHOST_STEER=1 runs it",
)
def test_two_process_steer_sweep_extracts_its_shared_vector_once(tmp_path, tokenizer):
    """The steer sweep on a tiny random model: the shared vector extracted by one process (alone,
    inside the joined job) and sent to the other, the summary of the one-process run."""
    save_tiny("llama_gqa_untied", tmp_path / "model", tokenizer=tokenizer)
    work = tmp_path / "sweep"
    assert cli.main(_argv(tmp_path / "model", work)) == 0  # one process: the reference
    reference = (work / "summary.csv").read_bytes()
    # Killed: point 0 finished, point 1 after its reference answers and margins, no shared vector
    # yet.
    (work / POINTS[1] / "DONE").unlink()
    for name in ("answers.csv", "results.json", "results.csv"):
        (work / POINTS[1] / name).unlink(missing_ok=True)
    shutil.rmtree(work / POINTS[2])
    shutil.rmtree(work / "vectors")
    (work / "summary.csv").unlink()
    kept = _files(work / POINTS[0])
    outs = _two_processes(_argv(tmp_path / "model", work), "extract.distributed", tmp_path)
    logs = [out + err for out, err in outs]
    assert (work / "summary.csv").read_bytes() == reference
    assert _files(work / POINTS[0]) == kept, "a finished point was redone"
    for i in (1, 2):
        assert json.loads((work / POINTS[i] / "point.json").read_text())["job"]["process"] == i % 2
        assert f"{POINTS[i]}: running steer (process {i % 2})" in logs[i % 2]
    # Extracted by the process of the first unfinished point (1), sent to process 0.
    assert "extracting the shared vector" in logs[1] and "extracting" not in logs[0]
    assert len(list((work / "vectors").glob("*/vector/vectors.safetensors"))) == 1


def test_a_process_that_never_joins_is_a_job_error_naming_coordinator_count_and_process(
    tmp_path, capsys
):
    port = free_port()
    d = {"coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": 0, "timeout": 2}
    with pytest.raises(
        JobError,
        match=rf"process 0 of 2 .* at coordinator 127.0.0.1:{port}: process\(es\) \[1\] "
        r"did not join within 2 s",
    ):
        multihost.join(d)
    # Process 1 whose process 0 never comes; through the CLI: one line, exit 2, nothing written.
    with pytest.raises(SystemExit) as exit_:
        cli.main(
            [
                "extract",
                "--config",
                str(ROOT / "configs" / "extract.py") + ":runlocal",
                f"--config.workdir={tmp_path / 'run'}",
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                "--config.distributed.process_id=1",
                "--config.distributed.timeout=2",
            ]
        )
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and f"process 1 of 2 (distributed.num_processes) at coordinator 127.0.0.1:{port}: "
        "process 0 did not answer within 2 s"
        in err
    ), err
    assert not (tmp_path / "run").exists()


def test_processes_that_count_differently_are_refused_by_both():
    port = free_port()
    errors = {}

    def attempt(n, pid):
        try:
            multihost.rendezvous(f"127.0.0.1:{port}", n, pid, 10)
        except JobError as e:
            errors[pid] = str(e)

    threads = [threading.Thread(target=attempt, args=a) for a in ((2, 0), (3, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(errors) == {0, 1}, errors
    for e in errors.values():
        assert "process 1 was started with distributed.num_processes=3, process 0 with 2" in e, e
