"""The finetuning-shift study: `configs/shift.py`, run by `pvjax shift` (or any runner of studies).

`run(cfg, work)` checks the config, then that the base (`model`) and the finetuned model
(`finetuned`: any model source) share one architecture and shape, from their metadata alone,
before loading either (`validate`, also what `pvjax run` calls before it writes anything); gets the
vector of the base model (a file, or extracted into `work/vector`) and calls
`pvjax.methods.finetune_shift.finetuning_shift` on the trait's eval questions. Answers are cached; a
finished run with the same config (`run.json`, the run's ledger) returns its row without loading
anything.
"""

from __future__ import annotations

from pathlib import Path

from pvjax.errors import InputError
from pvjax.settings.types import Judging, Sampling, VectorChoice, Workspace
from pvjax.studies.screen import check_layer, finish, finished, study_ledger


def validate(cfg, work: Path = Path(".")) -> tuple:
    """The whole config, before anything is written or loaded: the finetuned model, the response
    source, the judge, the trait, `layer` against the base model's depth and both models' shapes
    (metadata only). Returns (eval trait, questions, sampling, judging)."""
    from pvjax.files.traits import load_trait
    from pvjax.loading import read_model_config
    from pvjax.methods.finetune_shift import RESPONSE_SOURCES, check_same_shape

    if not cfg.finetuned:
        raise InputError(
            "the config names no finetuned model (--config.finetuned=FOLDER|FILE.gguf)"
        )
    if cfg.response_source not in RESPONSE_SOURCES:
        raise InputError(
            f"response_source must be one of {RESPONSE_SOURCES}, got {cfg.response_source!r}"
        )
    trait = load_trait(cfg.trait, "eval")
    questions = list(trait.questions[: cfg.n_questions or None])
    sampling = Sampling.of(cfg)  # checked now: before anything loads
    judging = Judging.of(cfg.judge)
    check_layer(cfg.model, cfg.layer)
    check_same_shape(read_model_config(cfg.model), read_model_config(cfg.finetuned))
    if judging.backend not in ("none", "local", "openai"):
        raise InputError(
            f"judge.backend must be 'none', 'local' or 'openai', got {judging.backend!r}"
        )
    from pvjax.studies.vector_source import check_vector

    check_vector(cfg, work)
    return trait, questions, sampling, judging


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """One row: the shift at the study layer, the likelihood margin, contrast and judged scores."""
    import pvjax
    from pvjax.measure.judges import Judge
    from pvjax.methods.finetune_shift import finetuning_shift
    from pvjax.settings.fields import enable_thinking
    from pvjax.studies.vector_source import study_vector

    work = Path(work)
    trait, questions, sampling, judging = validate(cfg, work)
    space = Workspace(
        work, cfg.cache_dir or None, batch_size=cfg.batch_size, plot=cfg.plot, progress=progress
    )
    ledger = study_ledger(work, cfg)
    done = finished(ledger)
    if done is not None:
        return done
    ledger.open()
    base = pvjax.load(cfg.model, dtype=cfg.dtype or None, enable_thinking=enable_thinking(cfg))
    finetuned = (
        base
        if cfg.finetuned == cfg.model
        else pvjax.load(
            cfg.finetuned, dtype=cfg.dtype or None, enable_thinking=enable_thinking(cfg)
        )
    )
    vector, spec = study_vector(cfg, base, work, progress=progress)
    judge = None
    if judging.backend != "none":
        from pvjax.methods.extraction import make_judge_backend

        judge = Judge(make_judge_backend(judging, base, work), trait.eval_prompt)
    s = finetuning_shift(
        base,
        finetuned,
        VectorChoice(vector, cfg.layer, spec),
        questions,
        space,
        sampling,
        response_source=cfg.response_source,
        trait=trait if cfg.margin else None,
        n_pairs=cfg.n_pairs,
        judge=judge,
    )
    pick = lambda d, k: None if d is None else d.get(k)
    row = {
        "base": s["base"],
        "finetuned": s["finetuned"],
        "trait": trait.name,
        "layer": s["layer"],
        "response_source": s["response_source"],
        "shift_prompt_last": s["shift_prompt_last"],
        "shift_response_avg": s["shift_response_avg"],
        "margin_base": pick(s["likelihood_margin"], "base"),
        "margin_finetuned": pick(s["likelihood_margin"], "finetuned"),
        "margin_delta": pick(s["likelihood_margin"], "delta"),
        "contrast_delta": pick(s["contrast"], "delta"),
        "judge_base": pick(s["judge"], "base"),
        "judge_finetuned": pick(s["judge"], "finetuned"),
    }
    return finish(ledger, [row])
