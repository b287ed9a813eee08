"""Steering study: which layer steers the trait best, and what each coefficient costs.

    pvjax run --config configs/steer.py:runlocal --config.trait=evil --workdir runs/steer-evil

On the trait's eval questions (never seen by extraction), for every layer x coefficient (negative
coefficients suppress) at one position mode, it measures
- `margin`: the judge-free likelihood margin, mean log p(pos reference answer) - mean log p(neg
  reference answer) per token, with the steering applied and no system prompt (`grid.margins`);
  the reference answers are the model's own, unsteered, under the trait's first instruction pair;
- `trait_score`, `coherence` (0-100) of the steered answers, when `judge.backend` is configured
  (any backend of the extraction);
- `distinct2`: the share of distinct word bigrams in the answers (judge-free; over-steering
  collapses into repetition);
- `accuracy`, `p_correct` on a multiple-choice set (`mc.path`) under the same steering.

Closed loop (`caps`, `targets`, beyond the paper): each ceiling in `caps` adds a row per layer
steered by `interventions.cap(ceiling)` (only the part of the projection onto the unit vector above
the ceiling is removed, token by token), each value in `targets` a row per layer steered by
`interventions.target(value)` (the projection is moved toward the value, token by token), both with
`gain` and `max_step` as `pvjax generate --gain/--max-step`; they get the same measurements, so the
summary compares them with fixed coefficients. A row's `control` says its mode (fixed, cap or
target); closed-loop rows carry their ceiling or set point in `value`, their `gain` and `max_step`,
and no `coef`. The best-layer rule and the plots are over the fixed coefficients.

A grid point is a batch row: every (setting, question) of the grid is a row of the same batched
generation (`grid.generate_grid`) and the same batched forwards, each row carrying its own
intervention; coefficient 0 is one shared unsteered setting. The grid costs the compiles of its
shape buckets, not one per point.

Best layer (`best.json`, and `best` = 1 on its rows): the layer whose metric (trait score with a
judge, else the margin) rises most per unit coefficient (least-squares slope over the coefficients),
counting only coefficients whose mean coherence is at least `best.min_coherence` when a judge gives
coherence; ties go to the earlier layer.

Work directory: `reference_answers.csv`, `margins.csv`, `answers/part_*.csv` (then `answers.csv`),
`judged.csv`, `mc.csv`, `best.json`, `steer.png`, `capability.png`; each written atomically when
finished and reused by a rerun.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvjax.files import atomic
from pvjax.interventions import POSITION_MODES
from pvjax.settings import fields as F
from pvjax.settings.types import Judging
from pvjax.studies import checks as C
from pvjax.studies import grid

_maybe_floats = lambda v: None if isinstance(v, (list, tuple)) and not v else F.numbers(v)  # noqa: E731
FIELDS = {
    **C.COMMON_FIELDS,
    **C.JUDGE_FIELDS,
    "layers": F.integers,
    "coefs": F.numbers,
    "caps": _maybe_floats,
    "targets": _maybe_floats,
    "gain": F.number(0.0, lo_open=True),
    "max_step": lambda v: (
        None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        else f"must be a number > 0 (inf: no limit), got {v!r}"
    ),
    "positions": F.choice(*POSITION_MODES),
    "best.min_coherence": F.number(0.0, 100.0),
}
COLUMNS = (
    "layer",
    "coef",
    "positions",
    "margin",
    "trait_score",
    "coherence",
    "accuracy",
    "p_correct",
    "distinct2",
    "answer_tokens",
    "best",
    "control",
    "value",
    "gain",
    "max_step",
)


def validate(cfg, work: Path) -> C.Checked:
    """Every field and everything it names, before any compute (`checks.check_study`), plus the
    layers (hidden_states rows 1..n_layers) and the coefficients."""
    checked = C.check_study(cfg, FIELDS, work, "steer")
    mc, problems = checked.model_config, checked.problems
    if mc is not None and not F.integers(checked.flat.get("layers")):
        F.check_layers(list(checked.flat["layers"]), mc.num_layers, "layers", problems)
    for name in ("coefs", "caps", "targets"):
        values = checked.flat.get(name)
        if not _maybe_floats(values) and len(set(values)) != len(values):
            problems.append(f"{name} {list(values)} repeats a value")
    checked.raise_if("steer")
    return checked


def settings(
    vector_LD,
    layers,
    coefs,
    L: int,
    D: int,
    caps=(),
    targets=(),
    *,
    gain: float = 1.0,
    max_step: float = float("inf"),
):
    """(stacked intervention of batch S, index of setting per (layer, coef)): setting 0 is the
    unsteered model, shared by every coefficient 0. Each ceiling in `caps` and each value in
    `targets` adds a closed-loop row per layer (`interventions.cap` / `interventions.target`, with
    `gain` and `max_step`), indexed by (layer, ("cap", ceiling)) or (layer, ("target", value));
    fixed and closed-loop rows share one batch and one compiled program (the rule is data)."""
    from pvjax import interventions as ivs

    rules = [("cap", float(x), ivs.cap) for x in caps] + [
        ("target", float(x), ivs.target) for x in targets
    ]
    items, index = [ivs.build(L, D)], {}
    for layer in layers:
        for c in coefs:
            if c == 0:
                index[(layer, c)] = 0
                continue
            index[(layer, c)] = len(items)
            items.append(ivs.build(L, D, steer=[(vector_LD, layer, float(c))]))
        for mode, value, rule in rules:
            index[(layer, (mode, value))] = len(items)
            items.append(
                ivs.build(
                    L, D, steer=[(vector_LD, layer, [rule(value, gain=gain, max_step=max_step)])]
                )
            )
    return grid.stack(items), index


def _control(key, gain: float = 1.0, max_step: float = float("inf")) -> dict:
    """The summary columns of a setting key's coefficient: fixed `coef`, or a closed-loop rule."""
    if isinstance(key, tuple):
        return {
            "coef": None,
            "control": key[0],
            "value": key[1],
            "gain": gain,
            "max_step": max_step,
        }
    return {"coef": key, "control": "fixed", "value": None, "gain": None, "max_step": None}


def distinct2(text: str) -> float | None:
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else None


def answer_questions(
    model, iv, questions, cfg, work: Path, positions: str, progress: bool
) -> list[dict]:
    """Every question answered under every setting of `iv` (`grid.generate_grid`, resumed from
    `work`; sampling, seed and batch size from `cfg`), each answer given its "question"."""
    from pvjax.engine.generate import SamplingParams

    prompt_ids = [
        model.tokenizer(
            model.chat_text([{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in questions
    ]
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    answers = grid.generate_grid(
        model,
        iv,
        prompt_ids,
        sampling,
        work=work,
        positions=positions,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    for a in answers:
        a["question"] = questions[a["prompt"]]
    return answers


def best_layer(rows: list[dict], metric: str, min_coherence: float) -> dict:
    """The rule in the module docstring, with each layer's slope."""
    slopes = {}
    for layer in sorted({r["layer"] for r in rows}):
        mine = [
            r
            for r in rows
            if r["layer"] == layer
            and r.get(metric) is not None
            and (r.get("coherence") is None or r["coherence"] >= min_coherence)
        ]
        if len({r["coef"] for r in mine}) >= 2:
            slopes[layer] = float(
                np.polyfit([r["coef"] for r in mine], [r[metric] for r in mine], 1)[0]
            )
    best = max(slopes, key=lambda l: (slopes[l], -l)) if slopes else None
    return {
        "layer": best,
        "metric": metric,
        "slopes": slopes,
        "min_coherence": min_coherence,
        "rule": f"largest least-squares slope of {metric} over the coefficients"
        + (
            f", counting coefficients with mean coherence >= {min_coherence:g}"
            if metric == "trait_score"
            else ""
        ),
    }


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the study into `work`; returns one summary row per (layer, coefficient or
    closed-loop rule)."""
    work = Path(work)
    checked = validate(cfg, work)
    trait = checked.trait
    model, vector, layers, questions = grid.study_inputs(cfg, checked, work, progress=progress)
    L, D = model.n_layers + 1, model.hidden_size
    coefs = [float(c) for c in cfg.coefs]
    loop = dict(gain=float(cfg.gain), max_step=float(cfg.max_step))
    iv, index = settings(
        vector,
        layers,
        coefs,
        L,
        D,
        [float(c) for c in cfg.caps],
        [float(c) for c in cfg.targets],
        **loop,
    )
    S = iv.steer_vectors.shape[1]

    refs = grid.reference_answers(
        model, trait, questions, work, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    if not (work / "margins.csv").exists():
        m = grid.margins(
            model, iv, refs, positions=cfg.positions, batch_size=cfg.forward_batch_size
        )
        atomic.write_csv(
            work / "margins.csv",
            [{"setting": s, "margin": float(m[s])} for s in range(S)],
            ("setting", "margin"),
        )
    margin = {int(r["setting"]): float(r["margin"]) for r in atomic.read_csv(work / "margins.csv")}

    answers = answer_questions(model, iv, questions, cfg, work, cfg.positions, progress)
    layer_coef = {s: lc for lc, s in index.items()}
    if not (work / "answers.csv").exists():
        atomic.write_csv(
            work / "answers.csv",
            [
                {
                    "setting": a["setting"],
                    "layer": layer_coef[a["setting"]][0] if a["setting"] else "",
                    **_control(layer_coef[a["setting"]][1] if a["setting"] else 0.0, **loop),
                    **a,
                }
                for a in answers
            ],
            (
                "setting",
                "layer",
                "coef",
                "control",
                "value",
                "gain",
                "max_step",
                "question",
                "text",
                "n_tokens",
                "finish",
            ),
        )
    judged = grid.judged_scores(Judging.of(cfg.judge), model, work, trait, answers, progress)
    mc = grid.mc_scores(model, work, checked.mc_items, iv, cfg.positions, cfg.forward_batch_size)

    rows = []
    for (layer, c), s in index.items():
        mine = [a for a in answers if a["setting"] == s]
        row = {
            "layer": layer,
            **_control(c, **loop),
            "positions": cfg.positions,
            "margin": margin[s],
            "distinct2": grid.mean_or_none(distinct2(a["text"]) for a in mine),
            "answer_tokens": float(np.mean([a["n_tokens"] for a in mine])),
        }
        if judged is not None:
            row["trait_score"] = grid.mean_or_none(judged[s]["trait"])
            row["coherence"] = grid.mean_or_none(judged[s]["coherence"])
        if mc is not None:
            row["accuracy"], row["p_correct"] = mc[s]
        rows.append(row)
    metric = "trait_score" if judged is not None else "margin"
    fixed = [
        r for r in rows if r["control"] == "fixed"
    ]  # the rule and the plots are over coefficients
    best = best_layer(fixed, metric, cfg.best.min_coherence)
    atomic.write_json(work / "best.json", best)
    for r in rows:
        r["best"] = int(r["layer"] == best["layer"])
    if cfg.plot:
        from pvjax.studies.plots import steer_plots

        steer_plots(work, fixed, metric, trait.name)
    return [{k: r.get(k) for k in COLUMNS if k in r} for r in rows]
