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
- `accuracy`, `p_correct` on a multiple-choice set (`mc.path`) under the same steering;
- `perplexity`: the unsteered model's perplexity of the steered answers (below).

Closed loop (`caps`, `targets`, beyond the paper): each ceiling in `caps` adds a row per layer
steered by `interventions.cap(ceiling)` (only the part of the projection onto the unit vector above
the ceiling is removed, token by token), each value in `targets` a row per layer steered by
`interventions.target(value)` (the projection is moved toward the value, token by token), both with
`gain` and `max_step` as `pvjax generate --gain/--max-step`; they get the same measurements, so the
summary compares them with fixed coefficients. A row's `control` says its mode (fixed, cap or
target); closed-loop rows carry their ceiling or set point in `value`, their `gain` and `max_step`,
and no `coef`. The best-layer rule and the plots are over the fixed coefficients.

Modes and terms (beyond the paper, `pvjax.engine.terms`): `modes` lists the steering modes of
the layer grid, `add` (the paper's), `rescale` (add `coef * v`, then restore each steered position's
norm: the coefficients of `coefs` again) and `rotate` (turn the residual toward the vector by each
angle in `angles`, radians); `terms` adds grid points of any composition, each a list of term dicts
(`{vector, layer, coef | angle | cap | target, mode, without, when}`; a term without `vector` uses
the study's). Every row reports `shift`, the mean change (against the unsteered rows) of the
answers' projection at the steered layer onto the unit vector, so modes can be compared at matched
shift. `seeds` (with `temperature` > 0) answers every question once per seed and reports, per
point, the mean over seeds of `distinct2` and `shift` with a 95% interval (`*_low`, `*_high`,
Student t over the seeds); the judge and the margin read the first seed's answers. `perplexity`
is the unsteered model's perplexity of the steered answers (exp of the mean per-token NLL of each
answer after its question, averaged over answers; `grid.unsteered_nll`), a judge-free fluency
measure beside `distinct2` (invented words score high; repetition, which `distinct2` catches, is
easy to predict and scores low), with its seed interval like `distinct2`.

A grid point is a batch row: every (setting, question) of the grid is a row of the same batched
generation (`grid.generate_grid`) and the same batched forwards, each row carrying its own
intervention; coefficient 0 is one shared unsteered setting. The grid costs the compiles of its
shape buckets, not one per point.

Best layer (`best.json`, and `best` = 1 on its rows): the layer whose metric (trait score with a
judge, else the margin) rises most per unit coefficient (least-squares slope over the coefficients),
counting only coefficients whose mean coherence is at least `best.min_coherence` when a judge gives
coherence; ties go to the earlier layer.

Work directory: `reference_answers.csv`, `margins.csv`, `answers/part_*.csv` (then `answers.csv`),
`perplexity.csv` (per answer, beside each seed's answers), `judged.csv`, `mc.csv`, `best.json`,
`steer.png`, `capability.png`; each written atomically when finished and reused by a rerun.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvjax.engine import terms as T
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
    "modes": lambda v: (
        None
        if isinstance(v, (list, tuple)) and v and all(m in T.MODES for m in v)
        else f"must be a non-empty tuple of {', '.join(T.MODES)}, got {v!r}"
    ),
    "angles": _maybe_floats,
    "terms": lambda v: None if isinstance(v, (list, tuple)) else f"must be a list, got {v!r}",
    "seeds": F.integers,
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
    "angle",
    "shift",
    "terms",
    "n_seeds",
    "distinct2_low",
    "distinct2_high",
    "shift_low",
    "shift_high",
    "perplexity",
    "perplexity_low",
    "perplexity_high",
)


def validate(cfg, work: Path) -> C.Checked:
    """Every field and everything it names, before any compute (`checks.check_study`), plus the
    layers (hidden_states rows 1..n_layers) and the coefficients."""
    checked = C.check_study(cfg, FIELDS, work, "steer")
    mc, problems = checked.model_config, checked.problems
    if mc is not None and not F.integers(checked.flat.get("layers")):
        F.check_layers(list(checked.flat["layers"]), mc.num_layers, "layers", problems)
    for name in ("coefs", "caps", "targets", "angles", "seeds", "modes"):
        values = checked.flat.get(name)
        if isinstance(values, (list, tuple)) and len(set(values)) != len(values):
            problems.append(f"{name} {list(values)} repeats a value")
    flat = checked.flat
    angles = flat.get("angles")
    if not _maybe_floats(angles) and angles:
        bad = [a for a in angles if not -np.pi <= a <= np.pi]
        if bad:
            problems.append(f"angles: {bad[0]} is outside [-pi, pi] (radians)")
    if "rotate" in (flat.get("modes") or ()) and not angles:
        problems.append("modes has rotate: give the rotation angles in angles (radians)")
    if flat.get("seeds") and not flat.get("temperature", 0) > 0:
        problems.append("seeds repeat a sampled generation: set temperature > 0")
    try:
        study_vector = None if mc is None else np.ones(mc.hidden_size, np.float32)
        points = term_points(flat.get("terms") or (), study_vector)
        if mc is not None and points:
            from pvjax.model import Model

            T.check_terms(
                points, Model(config=mc, params=None, tokenizer=None, source=flat["model"])
            )
        T.request_positions(points, default=flat.get("positions"))
    except T.TermError as e:
        problems.append(str(e))
    checked.raise_if("steer")
    return checked


def term_points(items, vector=None) -> list[list]:
    """The config's `terms`: one list of term dicts per grid point (a lone dict is a one-term
    point), as `SteerTerm`s; a term (or its `when`) without `vector` takes `vector` (the study's;
    a placeholder, for the checks, when None)."""
    points = []
    for k, point in enumerate(items):
        if isinstance(point, dict) or hasattr(point, "keys"):
            point = [point]
        terms = []
        for j, d in enumerate(point):
            d = d.to_dict() if hasattr(d, "to_dict") else dict(d)  # a ConfigDict, or a dict
            study = vector if vector is not None else np.ones(1, np.float32)
            if not d.get("vector"):
                d["vector"] = study
            if isinstance(d.get("when"), dict) and not d["when"].get("vector"):
                d["when"] = {**d["when"], "vector": study}
            terms.append(T.from_dict(d, label=f"terms[{k}][{j}]"))
        points.append(terms)
    return points


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
    modes=("add",),
    angles=(),
    points=(),
    model=None,
):
    """(stacked intervention of batch S, index of setting per (layer, coef)): setting 0 is the
    unsteered model, shared by every coefficient 0. Each ceiling in `caps` and each value in
    `targets` adds a closed-loop row per layer (`interventions.cap` / `interventions.target`, with
    `gain` and `max_step`), indexed by (layer, ("cap", ceiling)) or (layer, ("target", value));
    `modes` beyond `add` add per layer a `rescale` row per coefficient, (layer, ("rescale", coef)),
    and a `rotate` row per angle, (layer, ("rotate", angle)); each point of `points` (lists of
    `SteerTerm`s, `term_points`) one row, ("terms", k). Fixed, closed-loop, rescaled, rotated and
    composed rows share one batch and one compiled program (the rule and the mode are data)."""
    from pvjax import interventions as ivs

    shape = model if model is not None else _Shape(L - 1, D)
    one = lambda terms: T.build_intervention([terms], shape)  # noqa: E731
    rules = [("cap", float(x), ivs.cap) for x in caps] + [
        ("target", float(x), ivs.target) for x in targets
    ]
    items, index = [ivs.build(L, D)], {}
    for layer in layers:
        for c in coefs if "add" in modes else ():
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
        extra = [("rescale", float(c)) for c in coefs if "rescale" in modes]
        extra += [("rotate", float(a)) for a in angles if "rotate" in modes]
        for mode, value in extra:
            if value == 0:  # rescaling by 0 and rotating by 0 are the unsteered model
                index[(layer, (mode, value))] = 0
                continue
            index[(layer, (mode, value))] = len(items)
            strength = {"angle": value} if mode == "rotate" else {"coef": value, "mode": mode}
            items.append(one([T.SteerTerm(vector_LD, (layer,), **strength)]))
    for k, terms in enumerate(points):
        index[("terms", k)] = len(items)
        items.append(one(list(terms)))
    return grid.stack(items), index


class _Shape:
    """A model's depth and width alone: enough to build terms whose vectors are arrays."""

    def __init__(self, n_layers: int, hidden_size: int):
        self.n_layers, self.hidden_size, self.model_id = n_layers, hidden_size, "the model"


def _control(key, gain: float = 1.0, max_step: float = float("inf")) -> dict:
    """The summary columns of a setting key's coefficient: fixed `coef`, a closed-loop rule, a
    rescaled coefficient or a rotation's angle."""
    none = {"coef": None, "angle": None, "value": None, "gain": None, "max_step": None}
    if isinstance(key, tuple) and key[0] == "rescale":
        return {**none, "coef": key[1], "control": "rescale"}
    if isinstance(key, tuple) and key[0] == "rotate":
        return {**none, "angle": key[1], "control": "rotate"}
    if isinstance(key, tuple):
        return {**none, "control": key[0], "value": key[1], "gain": gain, "max_step": max_step}
    return {**none, "coef": key, "control": "fixed"}


def distinct2(text: str) -> float | None:
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else None


def answer_questions(
    model,
    iv,
    questions,
    cfg,
    work: Path,
    positions: str,
    progress: bool,
    *,
    seed: int | None = None,
    probes=None,
) -> list[dict]:
    """Every question answered under every setting of `iv` (`grid.generate_grid`, resumed from
    `work`; sampling, seed (unless `seed`) and batch size from `cfg`; `probes` as there), each
    answer given its "question"."""
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
        seed=cfg.seed if seed is None else seed,
        batch_size=cfg.batch_size,
        progress=progress,
        probes=probes,
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


def _key_columns(key, points, loop) -> dict:
    """`layer`, the control columns and `terms` of a setting's index key."""
    if key[0] == "terms":
        terms = points[key[1]]
        return {
            "layer": terms[0].layers[0] if terms else None,
            **_control(0.0, **loop),
            "control": "terms",
            "coef": None,
            "terms": T.describe(terms),
        }
    return {"layer": key[0], **_control(key[1], **loop)}


def _shifts(answers, key_layer: dict) -> dict:
    """Per setting, the mean projection at its layer of its answers minus the unsteered
    setting's (0) at that layer; None where an answer set is empty."""
    by: dict[int, list] = {}
    for a in answers:
        if a.get("projection") is not None:
            by.setdefault(a["setting"], []).append(a["projection"])
    out = {}
    for s, layer in key_layer.items():
        if s == 0:
            out[s] = 0.0
            continue
        if layer is None or s not in by or 0 not in by:
            out[s] = None
            continue
        mean = lambda rows: float(np.mean([r[layer] for r in rows]))  # noqa: E731
        out[s] = mean(by[s]) - mean(by[0])
    return out


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the study into `work`; returns one summary row per (layer, coefficient,
    closed-loop rule, mode) and per composed point of `terms`."""
    from pvjax.measure.stats import mean_interval, unit_rows

    work = Path(work)
    checked = validate(cfg, work)
    trait = checked.trait
    model, vector, layers, questions = grid.study_inputs(cfg, checked, work, progress=progress)
    L, D = model.n_layers + 1, model.hidden_size
    coefs = [float(c) for c in cfg.coefs]
    loop = dict(gain=float(cfg.gain), max_step=float(cfg.max_step))
    points = term_points(cfg.terms, vector)
    positions = T.request_positions(points, default=cfg.positions)
    iv, index = settings(
        vector,
        layers,
        coefs,
        L,
        D,
        [float(c) for c in cfg.caps],
        [float(c) for c in cfg.targets],
        **loop,
        modes=tuple(cfg.modes),
        angles=[float(a) for a in cfg.angles],
        points=points,
        model=model,
    )
    S = iv.steer_vectors.shape[1]

    refs = grid.reference_answers(
        model, trait, questions, work, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    if not (work / "margins.csv").exists():
        m = grid.margins(model, iv, refs, positions=positions, batch_size=cfg.forward_batch_size)
        atomic.write_csv(
            work / "margins.csv",
            [{"setting": s, "margin": float(m[s])} for s in range(S)],
            ("setting", "margin"),
        )
    margin = {int(r["setting"]): float(r["margin"]) for r in atomic.read_csv(work / "margins.csv")}

    probes = unit_rows(vector)[:, None]
    seeds = [int(x) for x in cfg.seeds] or [None]
    dirs = [work if x is None else work / "seeds" / str(x) for x in seeds]
    runs = [
        answer_questions(model, iv, questions, cfg, d, positions, progress, seed=x, probes=probes)
        for x, d in zip(seeds, dirs)
    ]
    # the unsteered model's NLL of every answer: one scoring pass, kept beside each seed's answers
    nlls = [
        grid.unsteered_nll(model, r, d, batch_size=cfg.forward_batch_size)
        for r, d in zip(runs, dirs)
    ]
    answers = runs[0]
    key_of = {s: key for key, s in index.items()}

    def columns(s: int) -> dict:  # setting 0, the unsteered model, belongs to no layer
        if s == 0:
            return {"layer": "", **_control(0.0, **loop)}
        return _key_columns(key_of[s], points, loop)

    if not (work / "answers.csv").exists():
        atomic.write_csv(
            work / "answers.csv",
            [{"setting": a["setting"], **columns(a["setting"]), **a} for a in answers],
            (
                "setting",
                "layer",
                "coef",
                "angle",
                "control",
                "value",
                "gain",
                "max_step",
                "terms",
                "question",
                "text",
                "n_tokens",
                "finish",
            ),
        )
    judged = grid.judged_scores(Judging.of(cfg.judge), model, work, trait, answers, progress)
    mc = grid.mc_scores(model, work, checked.mc_items, iv, positions, cfg.forward_batch_size)

    key_layer = {s: columns(s)["layer"] if s else None for s in range(S)}
    shifts = [_shifts(r, key_layer) for r in runs]
    rows = []
    for key, s in index.items():
        mine = [a for a in answers if a["setting"] == s]
        row = {
            **_key_columns(key, points, loop),
            "positions": positions,
            "margin": margin[s],
            "distinct2": grid.mean_or_none(distinct2(a["text"]) for a in mine),
            "answer_tokens": float(np.mean([a["n_tokens"] for a in mine])),
            "shift": shifts[0][s],
            "perplexity": grid.perplexity(nlls[0].get(s, [])),
        }
        if cfg.seeds:
            per_seed = {
                "distinct2": [
                    grid.mean_or_none(distinct2(a["text"]) for a in r if a["setting"] == s)
                    for r in runs
                ],
                "shift": [sh[s] for sh in shifts],
                "perplexity": [grid.perplexity(n.get(s, [])) for n in nlls],
            }
            row["n_seeds"] = len(runs)
            for name, values in per_seed.items():
                row[name], row[f"{name}_low"], row[f"{name}_high"] = mean_interval(
                    [v for v in values if v is not None]
                )
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
