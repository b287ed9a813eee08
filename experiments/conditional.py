"""Conditional steering on the embedded model: a condition fitted from two prompt sets (a topic and
its opposite), its hit rate on held-out prompts of each set, and (with a steering vector) a check
that conditional answers are the unconditional ones where the condition fires and the unsteered
ones where it does not.

    python experiments/conditional.py --config configs/conditional.py:runlocal \
        --config.steer.vector=runs/steer-modes/vector/vectors.safetensors --workdir runs/conditional

What it computes is in configs/conditional.py's docstring. The last-prompt-token residuals of every
prompt are read once (one packed forward, `pvjax.measure.packing.pooled_activations`, as the
generation program reads a condition); each split then fits, per layer, the direction (difference
of the training sets' means) and its threshold with `pvjax.methods.conditions`'
`choose_condition_threshold` on those residuals. The first split is fitted again through
`fit_condition` and scored through `hit_rate` (their own forwards), and the two must agree
(`check.json`). Writes `table.csv`, `table.md`, `splits.csv` (every split and layer), `check.json`
and, with `steer.vector`, `generation.csv` to `--workdir`, each atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

TABLE = (
    "layer",
    "n_train",
    "n_test",
    "train_f1",
    "auroc",
    "pos_hit",
    "pos_hit_low",
    "pos_hit_high",
    "neg_hit",
    "neg_hit_low",
    "neg_hit_high",
)
SPLIT_COLUMNS = ("split", "layer", "threshold", "train_f1", "auroc", "pos_hit", "neg_hit")


def read_prompts(path: str, what: str) -> list[str]:
    """One prompt a line; blank lines skipped."""
    from pvjax.errors import UsageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what}: prompt file {path!r} not found")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def check(cfg) -> tuple[list[str], list[str]]:
    """The two prompt sets; every field checked before the model loads (one line naming each
    problem, `UsageError`)."""
    from pvjax.engine.terms import CONDITION_ON
    from pvjax.errors import UsageError
    from pvjax.methods.conditions import RULES

    pos, neg = read_prompts(cfg.positives, "positives"), read_prompts(cfg.negatives, "negatives")
    problems = []
    if not 0 < cfg.train_share < 1:
        problems.append(f"train_share must be in (0, 1), got {cfg.train_share}")
    for name, prompts in (("positives", pos), ("negatives", neg)):
        k = n_train(len(prompts), cfg.train_share)
        if not 1 <= k < len(prompts):
            problems.append(
                f"{name}: {len(prompts)} prompts leave no training or no held-out prompt at "
                f"train_share {cfg.train_share}"
            )
    layers = list(cfg.layers)
    if not layers or len(set(layers)) != len(layers) or any(not isinstance(x, int) for x in layers):
        problems.append(f"layers must be distinct integers, got {layers}")
    if cfg.rule not in RULES:
        problems.append(f"rule must be one of {list(RULES)}, got {cfg.rule!r}")
    if cfg.on not in CONDITION_ON:
        problems.append(f"on must be one of {list(CONDITION_ON)}, got {cfg.on!r}")
    if not isinstance(cfg.splits, int) or cfg.splits < 1:
        problems.append(f"splits must be an integer >= 1, got {cfg.splits!r}")
    if cfg.steer.vector and not 1 <= cfg.steer.n_prompts:
        problems.append(f"steer.n_prompts must be >= 1, got {cfg.steer.n_prompts}")
    if cfg.steer.vector and cfg.steer.when_layer > cfg.steer.layer:
        problems.append(
            f"steer.when_layer {cfg.steer.when_layer} is after steer.layer {cfg.steer.layer}: a "
            "condition gates only layers at or after its own"
        )
    if problems:
        raise UsageError("conditional: " + "; ".join(problems))
    return pos, neg


def n_train(n: int, share: float) -> int:
    return int(round(n * share))


def last_token_residuals(model, prompts) -> np.ndarray:
    """`[N, L, D]` float64: each prompt's last token at every hidden-state row, read unsteered from
    the ids generation feeds (`monitoring.prompt_ids`)."""
    from pvjax.capture import POOLINGS
    from pvjax.measure.packing import pooled_activations
    from pvjax.methods.monitoring import prompt_ids

    ids = prompt_ids(model, prompts)
    pooled = pooled_activations(model, ids, [len(x) for x in ids])
    return pooled[:, :, POOLINGS.index("prompt_last")].astype(np.float64)


def splits(n_pos: int, n_neg: int, cfg):
    """Per split, (train, test) index arrays of each set: a fresh permutation of each set."""
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.splits):
        p, q = rng.permutation(n_pos), rng.permutation(n_neg)
        kp, kq = n_train(n_pos, cfg.train_share), n_train(n_neg, cfg.train_share)
        yield (p[:kp], p[kp:]), (q[:kq], q[kq:])


def direction(X_pos, X_neg, layer: int) -> np.ndarray:
    """The condition direction at `layer`: mean positive minus mean negative residual, `[D]`."""
    return X_pos[:, layer].mean(0) - X_neg[:, layer].mean(0)


def scores(X, w, layer: int, on: str) -> np.ndarray:
    """As `conditions.condition_scores` reads them (float32, as the program compares)."""
    u = w / np.linalg.norm(w)
    x = X[:, layer]
    s = x @ u
    if on == "cosine":
        s = s / np.maximum(np.linalg.norm(x, axis=-1), 1e-30)
    return s.astype(np.float32)


def fit_splits(X_pos, X_neg, cfg) -> tuple[list[dict], list]:
    """Every split x layer: threshold, training F1, held-out AUROC and hit rates; with the first
    split's indices."""
    from pvjax.measure.stats import auroc
    from pvjax.methods.conditions import choose_condition_threshold

    out, first = [], None
    for k, ((ptr, pte), (ntr, nte)) in enumerate(splits(len(X_pos), len(X_neg), cfg)):
        first = first or ((ptr, pte), (ntr, nte))
        for layer in cfg.layers:
            w = direction(X_pos[ptr], X_neg[ntr], layer)
            s_tr = np.concatenate(
                [scores(X_pos[ptr], w, layer, cfg.on), scores(X_neg[ntr], w, layer, cfg.on)]
            )
            y_tr = [True] * len(ptr) + [False] * len(ntr)
            thr, _, _, f1 = choose_condition_threshold(s_tr, y_tr, cfg.rule, cfg.target_fpr)
            sp, sn = scores(X_pos[pte], w, layer, cfg.on), scores(X_neg[nte], w, layer, cfg.on)
            out.append(
                {
                    "split": k,
                    "layer": layer,
                    "threshold": thr,
                    "train_f1": f1,
                    "auroc": auroc(np.concatenate([sp, sn]), [True] * len(sp) + [False] * len(sn)),
                    "pos_hit": float(np.mean(sp >= thr)),
                    "neg_hit": float(np.mean(sn >= thr)),
                }
            )
    return out, first


def table(per_split: list[dict], n_train_: str, n_test: str) -> list[dict]:
    """Per layer, the means over splits and the 2.5-97.5 percentiles of the hit rates."""
    rows = []
    for layer in dict.fromkeys(r["layer"] for r in per_split):
        mine = [r for r in per_split if r["layer"] == layer]
        row = {"layer": layer, "n_train": n_train_, "n_test": n_test}
        for key in ("train_f1", "auroc"):
            row[key] = float(np.mean([r[key] for r in mine]))
        for key in ("pos_hit", "neg_hit"):
            v = np.array([r[key] for r in mine])
            row[key] = float(v.mean())
            row[f"{key}_low"], row[f"{key}_high"] = (
                float(x) for x in np.percentile(v, [2.5, 97.5])
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| layer | train F1 | held-out AUROC | hit rate, positives [range] "
        "| hit rate, negatives [range] |"
    )
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['train_f1']:.3f} | {r['auroc']:.3f} | "
            f"{r['pos_hit']:.3f} [{r['pos_hit_low']:.2f}, {r['pos_hit_high']:.2f}] | "
            f"{r['neg_hit']:.3f} [{r['neg_hit_low']:.2f}, {r['neg_hit_high']:.2f}] |"
        )
    return "\n".join(lines) + "\n"


def cross_check(model, pos, neg, X_pos, X_neg, first, cfg, per_split) -> dict:
    """The first split fitted through `fit_condition` and scored through `hit_rate`, against this
    script's own path, per layer."""
    from pvjax.methods.conditions import fit_condition, hit_rate

    (ptr, pte), (ntr, nte) = first
    out = {}
    for layer in cfg.layers:
        w = direction(X_pos[ptr], X_neg[ntr], layer)
        fit = fit_condition(
            model,
            [pos[i] for i in ptr],
            [neg[i] for i in ntr],
            w,
            layer,
            on=cfg.on,
            rule=cfg.rule,
            target_fpr=cfg.target_fpr,
        )
        mine = next(r for r in per_split if r["split"] == 0 and r["layer"] == layer)
        got = {
            "threshold": fit.condition.threshold,
            "train_f1": fit.f1,
            "pos_hit": hit_rate(model, [pos[i] for i in pte], fit.condition, w),
            "neg_hit": hit_rate(model, [neg[i] for i in nte], fit.condition, w),
        }
        scale = max(abs(mine["threshold"]), 1.0)
        out[str(layer)] = {
            **got,
            "script_threshold": mine["threshold"],
            "agree": abs(got["threshold"] - mine["threshold"]) <= 1e-3 * scale
            and all(got[k] == mine[k] for k in ("pos_hit", "neg_hit", "train_f1")),
        }
    return out


def generation_check(model, pos, neg, X_pos, X_neg, first, cfg) -> list[dict]:
    """Held-out prompts of each set answered greedily under the conditional term, the same term
    unconditional and nothing, as rows of one batch; per prompt, whether the condition fired and
    which answer the conditional one equals."""
    from pvjax.engine import terms as T
    from pvjax.engine.generate import SamplingParams, generate
    from pvjax.files.vectors import read_vector
    from pvjax.methods.conditions import condition_scores, fit_condition
    from pvjax.methods.monitoring import prompt_ids

    s = cfg.steer
    (ptr, pte), (ntr, nte) = first
    w = direction(X_pos[ptr], X_neg[ntr], s.when_layer)
    fit = fit_condition(
        model,
        [pos[i] for i in ptr],
        [neg[i] for i in ntr],
        w,
        s.when_layer,
        on=cfg.on,
        rule=cfg.rule,
        target_fpr=cfg.target_fpr,
    )
    vector = read_vector(s.vector, model)
    gated = T.SteerTerm(vector=vector, layers=(s.layer,), coef=float(s.coef), when=fit.condition)
    plain = T.SteerTerm(vector=vector, layers=(s.layer,), coef=float(s.coef))
    held = [("positive", pos[i]) for i in pte[: s.n_prompts]]
    held += [("negative", neg[i]) for i in nte[: s.n_prompts]]
    prompts = [p for _, p in held]
    n = len(prompts)
    rows = [[gated]] * n + [[plain]] * n + [[]] * n
    g = generate(
        model,
        prompts * 3,
        intervention=T.build_intervention(rows, model),
        positions="response",
        sampling=SamplingParams(max_new_tokens=s.max_new_tokens),
        batch_size=3 * n,
    )
    fired = condition_scores(model, prompt_ids(model, prompts), w, s.when_layer, cfg.on)
    fired = fired >= fit.condition.threshold
    out = []
    for k, (which, prompt) in enumerate(held):
        cond, steer, none = g.tokens[k], g.tokens[n + k], g.tokens[2 * n + k]
        same = "unconditional" if cond == steer else "unsteered" if cond == none else "neither"
        if cond == steer == none:
            same = "both"
        out.append(
            {
                "set": which,
                "prompt": prompt,
                "fired": bool(fired[k]),
                "same_as": same,
                "as_expected": cond == (steer if fired[k] else none),
                "steering_changed": steer != none,
                "conditional": g.texts[k],
                "unsteered": g.texts[2 * n + k],
            }
        )
    return out


def run(cfg, work: Path, *, log=print) -> dict:
    """The experiment into `work`; returns the table, the cross-check and the generation rows."""
    import pvjax
    from pvjax.errors import UsageError
    from pvjax.files import atomic

    pos, neg = check(cfg)
    model = pvjax.load(cfg.model, dtype=cfg.dtype or None)
    wanted = [*cfg.layers] + ([cfg.steer.when_layer] if cfg.steer.vector else [])
    bad = [x for x in wanted if not 0 <= x < model.n_layers]
    if bad:
        raise UsageError(
            f"conditional: layer {bad[0]} is outside the condition's rows 0..{model.n_layers - 1}"
        )
    X = last_token_residuals(model, pos + neg)
    X_pos, X_neg = X[: len(pos)], X[len(pos) :]
    per_split, first = fit_splits(X_pos, X_neg, cfg)
    kp, kq = n_train(len(pos), cfg.train_share), n_train(len(neg), cfg.train_share)
    rows = table(per_split, f"{kp}+{kq}", f"{len(pos) - kp}+{len(neg) - kq}")
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(work / "splits.csv", per_split, SPLIT_COLUMNS)
    atomic.write_csv(work / "table.csv", rows, TABLE)
    atomic.write_text(work / "table.md", markdown(rows))
    checked = cross_check(model, pos, neg, X_pos, X_neg, first, cfg, per_split)
    atomic.write_json(work / "check.json", checked)
    log(markdown(rows))
    log(
        "first split through fit_condition / hit_rate: "
        + ", ".join(
            f"layer {k} {'agrees' if v['agree'] else 'DIFFERS'}" for k, v in checked.items()
        )
    )
    gen = None
    if cfg.steer.vector:
        gen = generation_check(model, pos, neg, X_pos, X_neg, first, cfg)
        atomic.write_csv(work / "generation.csv", gen, tuple(gen[0]))
        for which in ("positive", "negative"):
            mine = [r for r in gen if r["set"] == which]
            log(
                f"{which}: {sum(r['fired'] for r in mine)}/{len(mine)} fired, "
                f"{sum(r['as_expected'] for r in mine)}/{len(mine)} conditional answers as "
                f"expected, steering changed {sum(r['steering_changed'] for r in mine)}"
            )
    return {"table": rows, "check": checked, "generation": gen}


def main(argv=None) -> int:
    from pvjax.errors import UsageError
    from pvjax.settings.config_files import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/conditional.py:runlocal")
    p.add_argument("--workdir", type=Path, default=None)
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        work = args.workdir or Path(cfg.workdir or "runs/conditional")
        run(cfg, work)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
