"""experiments/conditional.py on a tiny random Llama: the shipped prompt sets, a condition fitted
per split and layer, its held-out hit rates, the first split refitted through `fit_condition` /
`hit_rate` (they must agree), and the generation check (conditional answers equal the
unconditional ones where the condition fires, the unsteered ones where it does not)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax.files.vectors import save_vectors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import conditional  # noqa: E402

CONFIG = str(ROOT / "configs" / "conditional.py") + ":runlocal"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_conditional")
    save_tiny("llama31_gqa_llama3rope", folder, tokenizer=tokenizer)
    model = pvjax.load(folder)
    v = np.random.default_rng(0).standard_normal((model.n_layers + 1, model.hidden_size))
    vec = save_vectors(
        tmp_path_factory.mktemp("vector") / "v.safetensors",
        {"response_avg_diff": 8 * v.astype("f4")},
        model=model,
    )
    return folder, vec


def test_conditional_experiment_runs_and_its_paths_agree(tiny, tmp_path):
    folder, vec = tiny
    work = tmp_path / "run"
    rc = conditional.main(
        [
            "--config", CONFIG, "--workdir", str(work),
            f"--config.model={folder}", "--config.layers=(1, 2)", "--config.splits=3",
            f"--config.steer.vector={vec}", "--config.steer.layer=2",
            "--config.steer.when_layer=1", "--config.steer.n_prompts=3",
            "--config.steer.max_new_tokens=4",
        ]
    )  # fmt: skip
    assert rc == 0
    table = list(csv.DictReader(open(work / "table.csv")))
    assert [int(r["layer"]) for r in table] == [1, 2]
    for r in table:
        assert r["n_train"] == "21+21" and r["n_test"] == "21+21"
        for key in ("pos_hit", "neg_hit"):
            lo, mid, hi = (float(r[k]) for k in (f"{key}_low", key, f"{key}_high"))
            assert 0 <= lo <= mid <= hi <= 1
    splits = list(csv.DictReader(open(work / "splits.csv")))
    assert len(splits) == 3 * 2
    for r in table:  # the table's mean is the mean over its splits
        mine = [float(s["pos_hit"]) for s in splits if s["layer"] == r["layer"]]
        assert float(r["pos_hit"]) == pytest.approx(np.mean(mine))
    check = json.loads((work / "check.json").read_text())
    assert set(check) == {"1", "2"} and all(v["agree"] for v in check.values()), check
    gen = list(csv.DictReader(open(work / "generation.csv")))
    assert len(gen) == 6 and all(r["as_expected"] == "True" for r in gen), gen


def test_conditional_experiment_refuses_bad_fields_in_one_line(tmp_path, capsys):
    rc = conditional.main(
        ["--config", CONFIG, "--workdir", str(tmp_path), "--config.train_share=1.5"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "train_share must be in (0, 1), got 1.5" in err
    assert not any(tmp_path.iterdir())
