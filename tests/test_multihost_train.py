"""Finetuning as a two-process job on loopback (jax.distributed over 127.0.0.1, one CPU device
each, the mesh's `data` axis spanning both): the loss curve of one process, and one run directory
written by process 0 (orbax checkpoints by both, as orbax requires)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from finetune_tiny import chats, tiny_config
from loopback import ROOT, free_port, run_together
from tiny_models import save_tiny

from pvjax.finetune import data, train

SMALL = dict(rows=2, max_steps=2, **{"export.adapters": False})  # one checkpoint, evals at 0 and 2

CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from finetune_tiny import tiny_config

def get_config(arg=""):
    return tiny_config({folder!r}, {train!r}, **{small!r})
"""


def _curve(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_two_process_finetune_gives_the_one_process_loss_curve(tmp_path, tokenizer):
    folder = tmp_path / "model"
    save_tiny("qwen2_untied", folder, tokenizer=tokenizer)
    train_file = data.write_jsonl(tmp_path / "chat.jsonl", chats())
    one = train(tiny_config(folder, train_file, **SMALL), tmp_path / "one", progress=False)

    config = tmp_path / "tiny_finetune.py"
    config.write_text(
        CONFIG.format(
            tests=str(ROOT / "tests"), folder=str(folder), train=str(train_file), small=SMALL
        )
    )
    port, work = free_port(), tmp_path / "two"
    done = run_together(
        [
            [
                sys.executable,
                "-m",
                "pvjax.cli",
                "finetune",
                "--config",
                str(config),
                "--workdir",
                str(work),
                "--quiet",
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.timeout=120",
            ]
            for i in range(2)
        ],
        cwd=tmp_path,
    )
    for rc, _, err in done:
        assert rc == 0, err[-3000:]
    outs = [(out, err) for _, out, err in done]
    assert "final training loss" in outs[0][0] and "loss" not in outs[1][0], (
        "process 0 alone reports"
    )

    a, b = _curve(tmp_path / "one"), _curve(work)
    assert [sorted(m) for m in a] == [sorted(m) for m in b]
    for key in ("loss", "eval_loss", "grad_norm"):
        x = [m[key] for m in a if key in m]
        assert x, key
        np.testing.assert_allclose([m[key] for m in b if key in m], x, rtol=1e-5, err_msg=key)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["job"] == {"processes": 2, "mesh": {"data": 2, "model": 1}, "devices": 1}, (
        summary["job"]
    )
    assert one["job"]["processes"] == 1 and summary["steps"] == one["steps"] == 2
    files = lambda d: sorted(
        str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "checkpoints" not in p.parts
    )
    assert files(work) == files(tmp_path / "one")
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "checkpoints").iterdir()
    )
