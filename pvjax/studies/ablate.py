"""Layer-ablation study: which layers carry the trait? Project the vector out and watch.

    pvjax run --config configs/ablate.py:runlocal --config.trait=evil --workdir runs/ablate-evil

Variants (each a setting, all of them rows of the same batched forwards), with `u_l = v_l/|v_l|`:
- `baseline`: no intervention;
- `ablate` at layer l: directional ablation at row l, `h <- h - (h . u_l) u_l` on every position;
- `window` at layer l: the same at rows l - window//2 .. l + window//2;
- `ablate_all`: at every row 1..n_layers (CAFT's ablation, applied at inference);
- `mean` (control): mean-ablation, the projection replaced by its mean `mu_l` over the unsteered
  reference answers' tokens instead of zero: `h <- h - (h . u_l) u_l + mu_l u_l`;
- `random` (control): directional ablation of a random direction of the same norm as v at each row
  (seeded by `seed`), which should change little;
- `mean_all`, `random_all`: the controls at every row.

Per variant: the judge-free likelihood margin (as in the steering study) and its change against the
baseline; with a judge, the trait score and coherence of generated answers; with `mc.path`,
multiple-choice accuracy. The plot (`ablation.png`): the change of each against the baseline per
layer, the all-layer variants as horizontal lines. Ablation and the mean-ablation's shift apply at
every position. (At the last row, `hidden_states` is read after the final norm while the edit acts
on the block output before it, so `mu` there is measured in the normed space: an approximation.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvjax import interventions as ivs
from pvjax.files import atomic
from pvjax.settings import fields as F
from pvjax.settings.types import Judging
from pvjax.studies import checks as C
from pvjax.studies import grid
from pvjax.studies.steer import answer_questions, distinct2

FIELDS = {**C.COMMON_FIELDS, **C.JUDGE_FIELDS, "layers": F.integers, "window": F.integer(1)}
COLUMNS = (
    "variant",
    "layer",
    "layers",
    "margin",
    "margin_change",
    "trait_score",
    "coherence",
    "trait_change",
    "accuracy",
    "accuracy_change",
    "distinct2",
    "direction_norm",
)


def validate(cfg, work: Path) -> C.Checked:
    checked = C.check_study(cfg, FIELDS, work, "ablate")
    if checked.model_config is not None and not F.integers(checked.flat.get("layers")):
        F.check_layers(
            list(checked.flat["layers"]),
            checked.model_config.num_layers,
            "layers",
            checked.problems,
        )
    checked.raise_if("ablate")
    return checked


def random_like(vector_LD: np.ndarray, seed: int) -> np.ndarray:
    """Gaussian directions `[L, D]` with the norm of `vector_LD` row by row."""
    r = np.random.default_rng(seed).standard_normal(vector_LD.shape).astype(np.float32)
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    return r * np.linalg.norm(vector_LD, axis=-1, keepdims=True)


def variants(vector_LD, random_LD, mu_L, layers, window: int, n_layers: int) -> list[dict]:
    """The variants of the module docstring, each `{"variant", "layer", "layers", "iv"}` (a batch-1
    intervention)."""
    L, D = vector_LD.shape
    every = list(range(1, n_layers + 1))
    unit = vector_LD / np.maximum(np.linalg.norm(vector_LD, axis=-1, keepdims=True), 1e-30)

    def ablation(rows, direction=vector_LD):
        return ivs.build(L, D, ablate=[(direction, rows)])

    def mean_ablation(rows):
        return ivs.build(
            L, D, ablate=[(vector_LD, rows)], steer=[(unit, [l], float(mu_L[l])) for l in rows]
        )

    out = [{"variant": "baseline", "layer": "", "layers": "", "iv": ivs.build(L, D)}]
    for l in layers:
        lo, hi = max(1, l - window // 2), min(n_layers, l + window // 2)
        out += [
            {"variant": "ablate", "layer": l, "layers": str(l), "iv": ablation([l])},
            {
                "variant": "window",
                "layer": l,
                "layers": f"{lo}-{hi}",
                "iv": ablation(list(range(lo, hi + 1))),
            },
            {"variant": "mean", "layer": l, "layers": str(l), "iv": mean_ablation([l])},
            {"variant": "random", "layer": l, "layers": str(l), "iv": ablation([l], random_LD)},
        ]
    span = f"1-{n_layers}"
    out += [
        {"variant": "ablate_all", "layer": "all", "layers": span, "iv": ablation(every)},
        {"variant": "mean_all", "layer": "all", "layers": span, "iv": mean_ablation(every)},
        {"variant": "random_all", "layer": "all", "layers": span, "iv": ablation(every, random_LD)},
    ]
    return out


def mean_projections(model, vector_LD, refs, work: Path) -> np.ndarray:
    """`mu_l`: the mean over reference answers (pos and neg) of their response-mean residual at row
    l, projected on `u_l` (`mean_projection.npy`)."""
    path = work / "mean_projection.npy"
    if not path.exists():
        from pvjax.measure.packing import pooled_activations

        tok = model.tokenizer
        prompts = [model.chat_text([{"role": "user", "content": r["question"]}]) for r in refs]
        texts = [
            (p, r[k])
            for p, r in zip(prompts, refs)
            for k in ("pos_answer", "neg_answer")
            if r[k].strip()
        ]
        seqs = [tok(p + a, add_special_tokens=False)["input_ids"] for p, a in texts]
        starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in texts]
        m_LD = pooled_activations(model, seqs, starts)[:, :, 0].mean(axis=0)
        unit = vector_LD / np.maximum(np.linalg.norm(vector_LD, axis=-1, keepdims=True), 1e-30)
        import io

        buf = io.BytesIO()
        np.save(buf, np.sum(m_LD * unit, axis=-1).astype(np.float32))
        atomic.write_bytes(path, buf.getvalue())
    return np.load(path)


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the study into `work`; returns one summary row per variant."""
    work = Path(work)
    checked = validate(cfg, work)
    trait = checked.trait
    model, vector, layers, questions = grid.study_inputs(cfg, checked, work, progress=progress)
    refs = grid.reference_answers(
        model, trait, questions, work, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    mu = mean_projections(model, vector, refs, work)
    rnd = random_like(vector, cfg.seed)
    vs = variants(vector, rnd, mu, layers, cfg.window, model.n_layers)
    iv = grid.stack([v["iv"] for v in vs])
    S = len(vs)

    if not (work / "margins.csv").exists():
        m = grid.margins(model, iv, refs, positions="all", batch_size=cfg.forward_batch_size)
        atomic.write_csv(
            work / "margins.csv",
            [
                {
                    "setting": s,
                    "variant": vs[s]["variant"],
                    "layer": vs[s]["layer"],
                    "margin": float(m[s]),
                }
                for s in range(S)
            ],
            ("setting", "variant", "layer", "margin"),
        )
    margin = {int(r["setting"]): float(r["margin"]) for r in atomic.read_csv(work / "margins.csv")}

    judged, answers = None, []
    if cfg.judge.backend != "none":
        answers = answer_questions(model, iv, questions, cfg, work, "all", progress)
        judged = grid.judged_scores(Judging.of(cfg.judge), model, work, trait, answers, progress)
    mc = grid.mc_scores(model, work, checked.mc_items, iv, "all", cfg.forward_batch_size)

    rows = []
    for s, v in enumerate(vs):
        layer = v["layer"]
        norm = (
            ""
            if layer in ("", "all")
            else float(np.linalg.norm((rnd if v["variant"] == "random" else vector)[layer]))
        )
        row = {
            "variant": v["variant"],
            "layer": layer,
            "layers": v["layers"],
            "margin": margin[s],
            "margin_change": margin[s] - margin[0],
            "direction_norm": norm,
        }
        mine = [a for a in answers if a["setting"] == s]
        if mine:
            row["distinct2"] = grid.mean_or_none(distinct2(a["text"]) for a in mine)
        if judged is not None:
            row["trait_score"] = grid.mean_or_none(judged[s]["trait"])
            row["coherence"] = grid.mean_or_none(judged[s]["coherence"])
        if mc is not None:
            row["accuracy"] = mc[s][0]
        rows.append(row)
    for r in rows:
        if (
            judged is not None
            and r["trait_score"] is not None
            and rows[0]["trait_score"] is not None
        ):
            r["trait_change"] = r["trait_score"] - rows[0]["trait_score"]
        if mc is not None:
            r["accuracy_change"] = r["accuracy"] - rows[0]["accuracy"]
    if cfg.plot:
        from pvjax.studies.plots import ablation_plot

        ablation_plot(
            work / "ablation.png", rows, "trait_score" if judged is not None else "margin"
        )
    return [{k: r.get(k) for k in COLUMNS if k in r} for r in rows]
