"""Pooled activations, causality margins, the local judge and a whole extraction on a mesh of 8 fake
host devices, and the extraction as a two-process job on loopback, against one device and one
process: the same answers, the same run directory, vectors equal up to float summation order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from loopback import env, free_port, run_together
from tiny_extract import config, overrides
from tiny_models import save_tiny

from pvjax.errors import UsageError
from pvjax.files import atomic
from pvjax.files.vectors import load_vectors
from pvjax.loading.embedded import embedded_gguf_path
from pvjax.loading.tokenizer import load_gguf_tokenizer
from pvjax.methods.extraction import run
from pvjax.settings.extraction import InvalidConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer model with the embedded tokenizer, and the tiny extraction run on it in this
    process, on one device: the reference."""
    base = tmp_path_factory.mktemp("mesh")
    save_tiny(
        "llama31_gqa_llama3rope",
        base / "model",
        tokenizer=load_gguf_tokenizer(embedded_gguf_path()),
    )
    summary = run(config(base / "model", base / "one"), progress=False)
    assert summary["counts"]["kept"] >= 1
    return base


def test_pipelines_on_8_host_devices_equal_one_device(tiny):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "mesh_pipelines.py"),
            str(tiny / "model"),
            str(tiny / "mesh"),
            str(tiny / "one"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["8x1"]["pooled"] < 1e-5 and res["8x1"]["margins"] < 1e-5, res
    # 3 heads of 10, 70 MLP columns, 1001 tokens on model=4: replicated, noted once per weight.
    assert res["odd"]["pooled"] < 1e-5 and res["odd"]["wq_replicated"], res
    assert res["odd"]["notes"] == [
        "embed",
        "layers/w_down",
        "layers/w_gate",
        "layers/w_up",
        "layers/wk",
        "layers/wo",
        "layers/wq",
        "layers/wv",
        "lm_head",
    ], res
    ext = res[
        "extract"
    ]  # on data=2 x model=4: generation, pooling, contrast scores, local judge, causality
    assert ext["vectors"] < 1e-5 and ext["margins"] < 1e-5 and ext["kept"][0] == ext["kept"][1], ext
    assert ext["job"] == {"processes": 1, "mesh": {"data": 2, "model": 4}, "devices": 8}, (
        ext
    )  # provenance
    for name, (n_scored, diff) in ext[
        "scores"
    ].items():  # judge scores 0..100, contrast in nats/token
        assert n_scored > 0 and diff < 1e-3, (name, ext)
    kept = lambda d: [
        (r["instruction_id"], r["question_id"]) for r in atomic.read_csv(d / "kept_pairs.csv")
    ]
    assert kept(tiny / "mesh") == kept(tiny / "one")
    for part in (
        "pos_0",
        "pos_1",
        "neg_0",
        "neg_1",
    ):  # greedy answers generated on the mesh: the same text
        name = f"answers/parts/{part}.csv"
        assert (tiny / "mesh" / name).read_bytes() == (tiny / "one" / name).read_bytes(), name


def _job(tiny, workdir, per_process=((), ())):
    """Start `pvjax extract` as process 0 and 1 of a loopback job (the tiny config plus each
    process's extra overrides); returns [(returncode, stdout, stderr)] once both exited."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "pvjax.cli",
        "extract",
        "--config",
        str(ROOT / "configs" / "extract.py:runlocal"),
        "--quiet",
        *overrides(tiny / "model", workdir),
    ]
    return run_together(
        [
            cmd
            + [
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.timeout=120",
                *extra,
            ]
            for i, extra in enumerate(per_process)
        ],
        cwd=tiny,
    )


def test_two_process_job_resumes_and_writes_one_process_run_directory(tiny):
    """Two processes on loopback (gloo collectives, one CPU device each), resuming a run that was
    killed after two of its four answer parts: the other two are generated, one per process, and
    the run directory equals the one-process run's; only process 0 writes there."""
    one, two = tiny / "one", tiny / "two"
    (two / "answers" / "parts").mkdir(parents=True)
    for name in (
        "stages.json",
        "config.json",
        "answers/parts/pos_0.csv",
        "answers/parts/neg_1.csv",
    ):
        shutil.copy2(one / name, two / name)
    kept_mtime = os.stat(two / "answers/parts/pos_0.csv").st_mtime_ns
    results = _job(tiny, two)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    # Both processes report the same summary.
    assert results[0][1].splitlines()[-1] == results[1][1].splitlines()[-1]
    assert os.stat(two / "answers/parts/pos_0.csv").st_mtime_ns == kept_mtime, (
        "a finished part was redone"
    )
    files = lambda d: sorted(
        str(p.relative_to(d))
        for p in d.rglob("*")
        if p.is_file() and p.name != "config.json" and not p.name.startswith("judge_cache")
    )
    assert files(two) == files(one)
    assert (two / "judge_cache.process1.sqlite").exists(), (
        "process 1 judged its share, with its own cache"
    )
    for name in files(one):
        if name not in ("vectors.safetensors", "summary.json", "causality.json"):
            assert (two / name).read_bytes() == (one / name).read_bytes(), name
    v1, v2 = (
        load_vectors(one / "vectors.safetensors")[0],
        load_vectors(two / "vectors.safetensors")[0],
    )
    for k in v1:  # each process sums its share of the pooled activations: float summation order
        np.testing.assert_allclose(v2[k], v1[k], rtol=1e-5, atol=1e-6 * np.abs(v1[k]).max())
    job = lambda d: json.loads((d / "summary.json").read_text())["job"]  # provenance: what ran it
    assert job(two) == {"processes": 2, "mesh": {"data": 1, "model": 1}, "devices": 1}, job(two)
    assert job(one)["processes"] == 1
    c1, c2 = (json.loads((d / "causality.json").read_text()) for d in (one, two))
    for layer in c1["layers"]:
        np.testing.assert_allclose(
            c2["layers"][layer]["margins"], c1["layers"][layer]["margins"], rtol=1e-5
        )


def test_bad_mesh_and_process_settings_are_refused_before_any_model_loads(tiny, tmp_path):
    with pytest.raises(InvalidConfig, match=r"distributed.process_id=2 is not in 0..1"):
        run(
            config(
                tiny / "model",
                tmp_path / "a",
                **{
                    "distributed.coordinator": "127.0.0.1:1234",
                    "distributed.num_processes": 2,
                    "distributed.process_id": 2,
                },
            ),
            progress=False,
        )
    with pytest.raises(InvalidConfig, match=r"need distributed.coordinator"):
        run(
            config(tiny / "model", tmp_path / "b", **{"distributed.num_processes": 2}),
            progress=False,
        )
    with pytest.raises(InvalidConfig, match=r"distributed.coordinator must be"):
        run(
            config(tiny / "model", tmp_path / "c", **{"distributed.coordinator": "localhost"}),
            progress=False,
        )
    with pytest.raises(
        UsageError, match=r"mesh data=3 x model=1 = 3 devices, but this process has 1"
    ):
        run(config(tiny / "model", tmp_path / "d", **{"mesh.data": 3}), progress=False)
    with pytest.raises(InvalidConfig, match=r"mesh.model must be >= 1"):
        run(config(tiny / "model", tmp_path / "e", **{"mesh.model": 0}), progress=False)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused config"


def test_processes_started_with_different_configs_are_refused_by_every_process(tiny, tmp_path):
    results = _job(tiny, tmp_path / "run", per_process=((), ("--config.n_questions=1",)))
    for (
        code,
        _,
        err,
    ) in results:  # one line each, exit 2, before any model loads or anything is written
        assert code == 2, err[-3000:]
        assert (
            "process(es) [1] run with another config than process 0 (n_questions: 2 vs 1)" in err
        ), err[-2000:]
    assert not (tmp_path / "run").exists()
