"""The finetuning study: `configs/finetune_study.py`, run by `pvjax run` (or any runner of studies).

The paper's finetuning experiment on one model, end to end from a config:

1. the vector (`vector_source`: a file, or extracted into `work/vector`);
2. datasets (`work/data/`): the base model answers the trait's extract-split questions under each
   instruction pair's pos system prompt (`trait.jsonl`) and neg one (`control.jsonl`), sampled,
   stored as chat JSONL without the system prompt. Sample i of both files answers the same
   question, so `mix_<r>.jsonl` takes the trait answer for a share r of the indices (one seeded
   permutation: the trait indices of a smaller share are a subset of a larger one's) and the control
   answer for the rest; every dataset has the same prompts and size;
3. screening (`work/screen/`, `pvjax.methods.screening.screen`) of trait and control: per-sample
projection
   differences, their AUROC (trait above control), and each dataset's mean difference. A mixture's
   samples are trait or control samples with the same prompt (the base model's own answer is the
   same greedy answer), so its mean difference is the mean of those samples' differences;
4. finetunes (`work/train/<run>/`, `pvjax.finetune.train`, one config for all): trait, control,
   trait with preventative steering, trait with CAFT, one per mixture;
5. the finetuning shift of each merged export (`work/shift/<run>/`,
`pvjax.methods.finetune_shift.finetuning_shift`)
   on the eval-split questions, disjoint from the training questions, with the likelihood margin;
6. the report (`finetune_study_report`): `summary.json`, `shift.png`, `dataset_shift.png`.

Every stage writes atomically; the study's ledger (`work/stages.json`, `pvjax.files.ledger`) records
what produced data, screen and each shift and which are finished, each finetune's own ledger its
training; a rerun skips what is finished and redoes what a changed setting made stale. `DONE`
comes last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.files.ledger import Ledger, Stage

BASE_RUNS = ("trait", "control", "trait_preventative", "trait_caft")


def mix_name(share: float) -> str:
    return f"mix_{float(share):g}"


def _rows_or_default(layers, layer: int) -> tuple[int, ...]:
    return tuple(int(l) for l in layers) or (int(layer),)


def runs(cfg) -> dict[str, dict]:
    """Every finetune of the study: name -> {dataset, share of trait samples, steering}."""
    out = {
        "trait": {"dataset": "trait", "share": 1.0, "steering": {}},
        "control": {"dataset": "control", "share": 0.0, "steering": {}},
        "trait_preventative": {
            "dataset": "trait",
            "share": 1.0,
            "steering": {
                "type": "steer",
                "coef": float(cfg.preventative.coef),
                "layers": _rows_or_default(cfg.preventative.layers, cfg.layer),
            },
        },
        "trait_caft": {
            "dataset": "trait",
            "share": 1.0,
            "steering": {
                "type": "ablate",
                "coef": 0.0,
                "layers": _rows_or_default(cfg.caft.layers, cfg.layer),
            },
        },
    }
    for r in cfg.mixes:
        out[mix_name(r)] = {"dataset": mix_name(r), "share": float(r), "steering": {}}
    return out


def validate(cfg, work: Path) -> None:
    """Everything that can be wrong with the config, from metadata alone (no model loaded)."""
    from pvjax.files.traits import load_trait
    from pvjax.finetune import settings
    from pvjax.loading import read_model_config
    from pvjax.settings.fields import integer
    from pvjax.studies.screen import check_layer

    positive = integer(1)
    ext, ev = load_trait(cfg.trait, "extract"), load_trait(cfg.trait, "eval")
    check_layer(cfg.model, cfg.layer)
    n = read_model_config(cfg.model).num_layers
    mixes = list(cfg.mixes)
    if not mixes:
        raise InputError(
            "mixes is empty: the dataset-level correlation needs at least one mixture "
            "between control (0) and trait (1), e.g. --config.mixes='(0.25,0.5,0.75)'"
        )
    for r in mixes:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise InputError(
                f"mixes: {r!r} is not a share strictly between 0 and 1 (0 and 1 are the control "
                "and trait runs themselves)"
            )
    if len({mix_name(r) for r in mixes}) != len(mixes):
        raise InputError(f"mixes {tuple(mixes)} lists a share twice")
    d = cfg.data
    for key in (
        "data.n_per_question",
        "data.max_new_tokens",
        "data.batch_size",
        "screen.max_new_tokens",
        "screen.batch_size",
        "shift.max_new_tokens",
        "shift.batch_size",
    ):
        part, field = key.split(".")
        if msg := positive(cfg[part][field]):
            raise InputError(f"{key} {msg}")
    if not 0 <= d.n_pairs <= len(ext.instruction):
        raise InputError(
            f"data.n_pairs must be in 0..{len(ext.instruction)} (0: all), got {d.n_pairs!r}"
        )
    if not 0 <= d.n_questions <= len(ext.questions):
        raise InputError(
            f"data.n_questions must be in 0..{len(ext.questions)} (0: all), got {d.n_questions!r}"
        )
    if not 1 <= cfg.shift.n_pairs <= len(ev.instruction):
        raise InputError(
            f"shift.n_pairs must be in 1..{len(ev.instruction)}, got {cfg.shift.n_pairs!r}"
        )
    for name, r in runs(cfg).items():  # each finetune config checked whole, as the trainer will
        for l in r["steering"].get("layers", ()):
            if isinstance(l, bool) or not isinstance(l, int) or not 1 <= l <= n:
                raise InputError(
                    f"{name}: steering layer {l!r} is not a hidden-state row of {cfg.model} with a "
                    f"block before it (1..{n})"
                )
        # The datasets do not exist yet: a shipped one stands in for them in the check.
        settings.check(
            settings.as_dict(finetune_config(cfg, name, r, Path("helpful_chat"), "vector")), n
        )


def finetune_config(cfg, name: str, run: dict, train_file: Path, vector: str):
    """The study's finetune config for one run: the shared `finetune` settings with this run's data,
    the vector (monitor at the study layer), and its steering."""
    ft = cfg.finetune.copy_and_resolve_references()
    ft.model, ft.dtype, ft.workdir = cfg.model, cfg.dtype, ""
    ft.data.train_file = str(train_file)
    ft.vector = vector
    ft.monitor.layer = int(cfg.layer)
    ft.steering.type = run["steering"].get("type", "")
    ft.steering.coef = float(run["steering"].get("coef", 0.0))
    ft.steering.layers = tuple(run["steering"].get("layers", ()))
    return ft


def study_ledger(cfg, work: Path, spec: str, names) -> Ledger:
    """The study's ledger (`work/stages.json`): data, screen and each run's shift, in that order,
    each recorded with the settings that change it (and the vector's content where it is read); a
    change redoes that stage and the ones after it (the finetunes have their own ledgers, which
    refuse a changed config or data file instead)."""
    from pvjax.files.vectors import split_spec

    plain = lambda c: c.to_dict() if hasattr(c, "to_dict") else c  # noqa: E731
    vector = (split_spec(spec)[0],)
    data = {
        "model": str(cfg.model),
        "dtype": cfg.dtype,
        "trait": str(cfg.trait),
        "data": plain(cfg.data),
        "mixes": [float(r) for r in cfg.mixes],
    }
    stages = [
        Stage("data", data, outputs=("data",)),
        Stage(
            "screen",
            {"layer": cfg.layer, "screen": plain(cfg.screen), "vector": spec},
            inputs=vector,
            outputs=("screen",),
        ),
    ]
    stages += [
        Stage(
            f"shift/{n}",
            {
                "layer": cfg.layer,
                "shift": plain(cfg.shift),
                "vector": spec,
                "finetune": plain(cfg.finetune),
                "run": r,
            },
            inputs=vector,
            outputs=(f"shift/{n}",),
        )
        for n, r in names.items()
    ]
    return Ledger(work, stages)


def make_datasets(
    cfg, model, work: Path, *, progress: bool = True, ledger: Ledger | None = None
) -> dict[str, dict]:
    """`work/data/{trait,control,mix_<r>}.jsonl` (see the module docstring); returns name ->
    {path, share, trait_indices}. The sampled answers are kept in `answers.json`."""
    from pvjax.engine.generate import SamplingParams, generate
    from pvjax.files.datasets import write_dataset
    from pvjax.files.traits import load_trait
    from pvjax.methods.extraction import system_prompt

    folder = work / "data"
    if ledger is not None and ledger.finished("data"):
        return json.loads((folder / "datasets.json").read_text())
    trait = load_trait(cfg.trait, "extract")
    d = cfg.data
    questions = list(trait.questions[: d.n_questions or None])
    pairs = list(trait.instruction[: d.n_pairs or None])
    sampling = SamplingParams(
        temperature=float(d.temperature), top_p=float(d.top_p), max_new_tokens=int(d.max_new_tokens)
    )
    prompts = [q for q in questions for _ in range(d.n_per_question)]
    systems = {
        (pol, k): system_prompt(trait.name, pair.pos)
        if pol == "pos"
        else system_prompt("helpful", pair.neg)
        for k, pair in enumerate(pairs)
        for pol in ("pos", "neg")
    }
    answers_file = folder / "answers.json"
    if not answers_file.is_file():
        # Every conversation (both polarities, every pair, every sample) in one batched call: on a
        # CPU a decode step costs about the same for one row as for dozens. Sample i of a question
        # draws from its own key (generate folds the prompt's index into the seed).
        convs = [
            [{"role": "system", "content": systems[pol, k]}, {"role": "user", "content": q}]
            for pol in ("pos", "neg")
            for k in range(len(pairs))
            for q in prompts
        ]
        g = generate(
            model, convs, sampling=sampling, seed=d.seed, batch_size=d.batch_size, progress=progress
        )
        half = len(convs) // 2
        atomic.write_json(
            answers_file,
            {
                "systems": {f"{p}_{k}": v for (p, k), v in systems.items()},
                "questions": prompts * len(pairs),
                "pos": list(g.texts[:half]),
                "neg": list(g.texts[half:]),
            },
        )
    answers = json.loads(answers_file.read_text())
    all_prompts = answers["questions"]
    # An index whose trait or control answer is empty is left out of every dataset, so all stay
    # aligned.
    keep = [
        i
        for i in range(len(all_prompts))
        if answers["pos"][i].strip() and answers["neg"][i].strip()
    ]
    if not keep:
        raise InputError("every sampled answer pair had an empty side; raise data.max_new_tokens")
    qs = [all_prompts[i] for i in keep]
    pos, neg = [answers["pos"][i] for i in keep], [answers["neg"][i] for i in keep]
    order = np.random.default_rng(d.seed).permutation(len(keep))
    out = {}
    for name, share in [("trait", 1.0), ("control", 0.0)] + [
        (mix_name(r), float(r)) for r in cfg.mixes
    ]:
        chosen = set(order[: int(round(share * len(keep)))].tolist())
        path = write_dataset(
            folder / f"{name}.jsonl",
            qs,
            [pos[i] if i in chosen else neg[i] for i in range(len(qs))],
        )
        out[name] = {
            "path": str(path),
            "share": share,
            "n_samples": len(qs),
            "trait_indices": sorted(chosen),
        }
    atomic.write_json(folder / "datasets.json", out)
    atomic.write_json(
        folder / "counts.json",
        {
            "sampled": len(all_prompts),
            "kept": len(keep),
            "questions": len(questions),
            "pairs": len(pairs),
        },
    )
    if ledger is not None:
        ledger.finish("data")
    return out


def stage_space(cfg, work: Path, folder: Path, batch_size: int, progress: bool):
    """The `Workspace` of a stage writing into `folder`: answers cached in the study's shared
    `work/answer_cache`."""
    from pvjax.settings.types import Workspace

    return Workspace(
        folder, work / "answer_cache", batch_size=batch_size, plot=cfg.plot, progress=progress
    )


def screen_datasets(
    cfg,
    model,
    vector,
    spec: str,
    datasets: dict,
    work: Path,
    *,
    progress: bool = True,
    ledger: Ledger | None = None,
) -> dict:
    """Per-sample projection differences of trait and control, their AUROC, and every dataset's
    mean difference (a mixture's from its samples)."""
    from pvjax.measure.stats import separation
    from pvjax.methods.screening import Flagging, sample_diffs, screen
    from pvjax.settings.types import Sampling, VectorChoice

    folder = work / "screen"
    if ledger is None or not ledger.finished("screen"):
        space = stage_space(cfg, work, folder, cfg.screen.batch_size, progress)
        screen(
            model,
            VectorChoice(vector, cfg.layer, spec),
            [datasets["trait"]["path"], datasets["control"]["path"]],
            space,
            Sampling(max_new_tokens=int(cfg.screen.max_new_tokens)),
            flagging=Flagging(),
        )
        if ledger is not None:
            ledger.finish("screen")
    t, c = sample_diffs(folder, "trait"), sample_diffs(folder, "control")
    mean_diff = {}
    for name, ds in datasets.items():
        chosen = np.zeros(len(t), bool)
        chosen[ds["trait_indices"]] = True
        mean_diff[name] = float(np.nanmean(np.where(chosen, t, c)))
    return {
        "auroc": separation(t, c),
        "mean_diff": mean_diff,
        "n_scored": {"trait": int((~np.isnan(t)).sum()), "control": int((~np.isnan(c)).sum())},
    }


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Run or resume the study into `work`; one summary row per finetune."""
    import pvjax
    from pvjax.files.traits import load_trait
    from pvjax.files.vectors import read_vector
    from pvjax.finetune import train
    from pvjax.methods.finetune_shift import finetuning_shift
    from pvjax.settings.fields import enable_thinking
    from pvjax.settings.types import Sampling, VectorChoice
    from pvjax.studies import finetune_study_report as report
    from pvjax.studies.vector_source import vector_spec

    work = Path(work)
    validate(cfg, work)
    spec = vector_spec(cfg, work, progress=progress)
    ledger = study_ledger(cfg, work, spec, runs(cfg))
    if (
        ledger.done and (work / "summary.json").is_file()
    ):  # finished: nothing loaded, nothing rewritten
        return report.rows_of(json.loads((work / "summary.json").read_text()))
    ledger.open()
    base = pvjax.load(cfg.model, dtype=cfg.dtype or None, enable_thinking=enable_thinking(cfg))
    vector = read_vector(spec, base)
    datasets = make_datasets(cfg, base, work, progress=progress, ledger=ledger)
    screened = screen_datasets(
        cfg, base, vector, spec, datasets, work, progress=progress, ledger=ledger
    )

    eval_trait = load_trait(cfg.trait, "eval")
    questions = list(eval_trait.questions[: cfg.shift.n_questions or None])
    sampling = Sampling(max_new_tokens=int(cfg.shift.max_new_tokens))
    trained, shifts = {}, {}
    for name, r in runs(cfg).items():
        ft = finetune_config(cfg, name, r, Path(datasets[r["dataset"]]["path"]), spec)
        if progress:
            print(f"finetune {name}: {r['dataset']} {r['steering'] or ''}", flush=True)
        trained[name] = train(ft, work / "train" / name, model=base, progress=progress)
        folder = work / "shift" / name
        if not ledger.finished(f"shift/{name}"):
            tuned = pvjax.load(
                trained[name]["export"]["merged"],
                dtype=cfg.dtype or None,
                enable_thinking=enable_thinking(cfg),
            )
            space = stage_space(cfg, work, folder, cfg.shift.batch_size, progress)
            finetuning_shift(
                base,
                tuned,
                VectorChoice(vector, cfg.layer, spec),
                questions,
                space,
                sampling,
                trait=eval_trait,
                n_pairs=cfg.shift.n_pairs,
            )
            ledger.finish(f"shift/{name}")
        shifts[name] = json.loads((folder / "summary.json").read_text())
    summary = report.summarize(cfg, work, spec, datasets, screened, runs(cfg), trained, shifts)
    rows = report.write(work, summary, plot=cfg.plot)
    if progress:
        print(report.table(summary), flush=True)
    ledger.complete()
    return rows
