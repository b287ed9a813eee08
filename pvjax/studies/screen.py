"""The screening study: `configs/screen.py`, run by `pvjax screen` (or any runner of studies).

`run(cfg, work)` checks the config and every dataset file before loading the model, gets the
vector (a file, or extracted into `work/vector`), and calls `pvjax.methods.screening.screen`. Its answers and
projections are cached, so a rerun recomputes nothing; a finished run (`DONE`, with the same config
and dataset contents in `run.json`) returns its rows without loading the model at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pvjax.files import atomic
from pvjax.errors import InputError


def datasets_of(cfg) -> list[str]:
    """The config's dataset paths: `datasets` is a path, a comma-separated string of paths or a
    tuple of them."""
    d = cfg.datasets
    paths = [p.strip() for p in d.split(",")] if isinstance(d, str) else [str(p) for p in d]
    paths = [p for p in paths if p]
    if not paths:
        raise InputError("the config names no dataset to screen (--config.datasets=FILE.jsonl[,FILE.csv])")
    return paths


def check_layer(source, layer: int) -> None:
    """`layer` is a hidden_states index of the model `source`, read from its metadata alone."""
    from pvjax.loading import read_model_config

    n = read_model_config(source).num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise InputError(f"layer {layer!r} is not a hidden_states index of {source} (0..{n}; row 0 is the "
                         "embeddings, row l the output of block l)")


def run_key(cfg, files=()) -> dict:
    """What a finished run must match to be reused: the config and the content of its input files."""
    digest = lambda p: hashlib.sha256(Path(p).expanduser().read_bytes()).hexdigest()
    return {"config": json.loads(json.dumps(cfg.to_dict(), default=str)), "files": {str(p): digest(p) for p in files}}


def finished(work: Path, key: dict):
    """The rows of a finished run with this key, or None."""
    if (work / "DONE").is_file() and (work / "run.json").is_file():
        saved = json.loads((work / "run.json").read_text())
        if saved.get("key") == key:
            return saved["rows"]
    return None


def finish(work: Path, key: dict, rows: list[dict]) -> list[dict]:
    atomic.write_json(work / "run.json", {"key": key, "rows": rows})
    atomic.write_text(work / "DONE", "")
    return rows


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Screen the config's datasets into `work`; one summary row per dataset (see pvjax.methods.screening)."""
    import pvjax
    from pvjax.files.datasets import read_dataset
    from pvjax.methods.screening import Flagging, screen
    from pvjax.settings.types import Sampling, VectorChoice, Workspace
    from pvjax.studies.vector_source import study_vector

    work = Path(work)
    paths = datasets_of(cfg)
    datasets = [read_dataset(p, cfg.format, prompt_column=cfg.prompt_column, answer_column=cfg.answer_column)
                for p in paths]
    flagging = Flagging(cfg.flag.mode, float(cfg.flag.threshold), float(cfg.flag.top_fraction))
    sampling = Sampling.of(cfg)  # checked now: before anything loads
    space = Workspace(work, cfg.cache_dir or None, batch_size=cfg.batch_size, plot=cfg.plot, progress=progress)
    check_layer(cfg.model, cfg.layer)
    key = run_key(cfg, paths)
    done = finished(work, key)
    if done is not None:
        return done
    (work / "DONE").unlink(missing_ok=True)
    model = pvjax.load(cfg.model, dtype=cfg.dtype or None)
    vector, spec = study_vector(cfg, model, work, progress=progress)
    rows = screen(model, VectorChoice(vector, cfg.layer, spec), datasets, space, sampling, flagging=flagging,
                  max_len=cfg.max_len)
    return finish(work, key, rows)
