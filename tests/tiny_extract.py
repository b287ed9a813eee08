"""One tiny extraction config, shared by the mesh and multi-process tests: a random 3-layer model,
two questions under two instruction pairs, six greedy tokens, the model judging itself, the contrast
filter (margin 0) and causality at layers 1 and 2. Runs in seconds."""

from __future__ import annotations

SETTINGS = {
    "trait": "evil",
    "n_questions": 2,
    "n_pairs": 2,
    "n_per_question": 1,
    "max_new_tokens": 6,
    "temperature": 0.0,
    "batch_size": 4,
    "plot": False,
    "judge.backend": "local",
    "judge.model": "same",
    "judge.batch_size": 3,  # 3: padded on a mesh
    "filter.mode": "contrast",
    "filter.contrast_margin": 0.0,
    "filter.min_pairs": 1,
    "causality.layers": (1, 2),
    "causality.coefs": (-1.0, 0.0, 1.0),
    "causality.max_pairs": 3,
}


def settings(model_dir, workdir, **more) -> dict:
    return {**SETTINGS, "model": str(model_dir), "workdir": str(workdir), **more}


def config(model_dir, workdir, **more):
    """The config object (`configs/extract.py:runlocal` with `SETTINGS`); `more` as "a.b"=value."""
    from configs.extract import get_config

    cfg = get_config("runlocal")
    for key, value in settings(model_dir, workdir, **more).items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def overrides(model_dir, workdir, **more) -> list[str]:
    """The same as `pvjax extract` command-line overrides."""
    fmt = lambda v: "(" + ",".join(map(str, v)) + ",)" if isinstance(v, tuple) else str(v)
    return [f"--config.{k}={fmt(v)}" for k, v in settings(model_dir, workdir, **more).items()]
