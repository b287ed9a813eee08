"""The screening study: `configs/screen.py`, run by `pvjax screen` (or any runner of studies).

`run(cfg, work)` checks the config and every dataset file (`validate`, also what `pvjax run` calls
before it writes anything) before loading the model, gets the vector (a file, or extracted into
`work/vector`), and calls `pvjax.methods.screening.screen`. Its answers and projections are cached,
so a rerun recomputes nothing; a finished run (`DONE`, with the same config and dataset contents in
`run.json`, the run's ledger, `pvjax.files.ledger`) returns its rows without loading the model at
all, and without rewriting a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from pvjax.errors import InputError
from pvjax.files.ledger import Ledger, Stage


def datasets_of(cfg) -> list[str]:
    """The config's dataset paths: `datasets` is a path, a comma-separated string of paths or a
    tuple of them."""
    d = cfg.datasets
    paths = [p.strip() for p in d.split(",")] if isinstance(d, str) else [str(p) for p in d]
    paths = [p for p in paths if p]
    if not paths:
        raise InputError(
            "the config names no dataset to screen (--config.datasets=FILE.jsonl[,FILE.csv])"
        )
    return paths


def check_layer(source, layer: int) -> None:
    """`layer` is a hidden_states index of the model `source`, read from its metadata alone."""
    from pvjax.loading import read_model_config

    n = read_model_config(source).num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise InputError(
            f"layer {layer!r} is not a hidden_states index of {source} (0..{n}; row 0 is the "
            "embeddings, row l the output of block l)"
        )


def study_ledger(work: Path, cfg, files=()) -> Ledger:
    """The run's ledger, recorded in `run.json`: one stage, `run`, keyed by the whole config and the
    content (sha256) of its input files. Answers and projections are cached by what they are, so a
    changed config is redone (from the caches), never refused; `finish` stores the result rows."""
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    return Ledger(work, [Stage("run", config, inputs=tuple(files))], record="run.json")


def finished(ledger: Ledger):
    """The rows of a finished run under this ledger's config and files, or None. Reads only."""
    return ledger.extra.get("rows") if ledger.done else None


def finish(ledger: Ledger, rows: list[dict]) -> list[dict]:
    ledger.finish("run", rows=rows)
    ledger.complete()
    return rows


def validate(cfg, work: Path = Path(".")) -> tuple:
    """The whole config and every dataset file, before anything is written or loaded: datasets,
    flagging, sampling, `layer` against the model's depth (metadata only). Returns (paths,
    datasets, flagging, sampling)."""
    from pvjax.files.datasets import read_dataset
    from pvjax.methods.screening import Flagging
    from pvjax.settings.types import Sampling

    paths = datasets_of(cfg)
    datasets = [
        read_dataset(
            p, cfg.format, prompt_column=cfg.prompt_column, answer_column=cfg.answer_column
        )
        for p in paths
    ]
    flagging = Flagging(cfg.flag.mode, float(cfg.flag.threshold), float(cfg.flag.top_fraction))
    sampling = Sampling.of(cfg)  # checked now: before anything loads
    check_layer(cfg.model, cfg.layer)
    from pvjax.studies.vector_source import check_vector

    check_vector(cfg, work)
    return paths, datasets, flagging, sampling


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Screen the config's datasets into `work`; one summary row per dataset (see
    pvjax.methods.screening)."""
    import pvjax
    from pvjax.methods.screening import screen
    from pvjax.settings.fields import enable_thinking
    from pvjax.settings.types import VectorChoice, Workspace
    from pvjax.studies.vector_source import study_vector

    work = Path(work)
    paths, datasets, flagging, sampling = validate(cfg, work)
    ledger = study_ledger(work, cfg, paths)
    done = finished(ledger)
    if done is not None:
        return done
    ledger.open()
    model = pvjax.load(cfg.model, dtype=cfg.dtype or None, enable_thinking=enable_thinking(cfg))
    vector, spec = study_vector(cfg, model, work, progress=progress)
    space = Workspace(
        work, cfg.cache_dir or None, batch_size=cfg.batch_size, plot=cfg.plot, progress=progress
    )
    rows = screen(
        model,
        VectorChoice(vector, cfg.layer, spec),
        datasets,
        space,
        sampling,
        flagging=flagging,
        max_len=cfg.max_len,
    )
    return finish(ledger, rows)
