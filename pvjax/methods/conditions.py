"""Conditions for conditional steering (CAST, arXiv 2409.05907), fitted from two prompt sets.

A condition (`pvjax.engine.terms.Condition`) steers a prompt when the residual of its last token at
one layer, projected on a unit vector (or its cosine with it), is at or above a threshold; the
generation program reads it at that layer before the layer's edit. `fit_condition` picks the
threshold from prompts that should be steered (`positives`) and prompts that should not
(`negatives`), as the calibrated monitor picks its own (`pvjax.methods.monitoring`): the best F1
of the decision `score >= threshold` (`rule="f1"`), or the largest true-positive rate at a
false-positive rate at most `target_fpr` (`rule="fpr"`). Scores are read unsteered, from one packed
forward per batch (`pvjax.measure.packing.pooled_activations`, the `prompt_last` pooling), which is
what the program reads when no term steers a layer before the condition's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pvjax.capture import POOLINGS
from pvjax.engine.terms import CONDITION_ON, Condition, TermError
from pvjax.measure.stats import roc_points

RULES = ("f1", "fpr")


@dataclasses.dataclass(frozen=True)
class FittedCondition:
    """The fitted condition and how it splits the two sets it was fitted on."""

    condition: Condition
    rule: str
    tpr: float  # share of positives at or above the threshold
    fpr: float  # share of negatives at or above it
    f1: float
    n_pos: int
    n_neg: int


def condition_scores(
    model, ids: Sequence[Sequence[int]], vector, layer: int, on: str = "projection"
) -> np.ndarray:
    """`[N]`: each prompt's (token ids, as `pvjax.methods.monitoring.prompt_ids` makes them) last
    token at hidden-state row `layer`, projected on the unit vector (`vector` `[D]` or
    `[n_layers+1, D]`, row `layer`) or, `on="cosine"`, its cosine with it."""
    from pvjax.measure.packing import pooled_activations

    if on not in CONDITION_ON:
        raise TermError(f"on={on!r} is not one of {list(CONDITION_ON)}")
    if not 0 <= layer < model.n_layers:
        raise TermError(f"condition layer {layer} is outside 0..{model.n_layers - 1}")
    v = np.asarray(vector, np.float64)
    w = v[layer] if v.ndim == 2 else v
    if w.shape != (model.hidden_size,) or not np.any(w):
        raise TermError(f"condition vector of shape {list(v.shape)} is zero or of another width")
    w = w / np.linalg.norm(w)
    ids = [list(x) for x in ids]
    pooled = pooled_activations(model, ids, [len(x) for x in ids])
    x = pooled[:, layer, POOLINGS.index("prompt_last")].astype(np.float64)
    proj = x @ w
    if on == "cosine":
        proj = proj / np.maximum(np.linalg.norm(x, axis=-1), 1e-30)
    return proj.astype(np.float32)


def choose_condition_threshold(
    scores, labels, rule: str = "f1", target_fpr: float = 0.05
) -> tuple[float, float, float, float]:
    """`(threshold, tpr, fpr, f1)` of `score >= threshold` by `rule` (module docstring); the
    candidates are `pvjax.measure.stats.roc_points`' (midpoints between scores). Ties go to the
    higher threshold (fewer prompts steered)."""
    if rule not in RULES:
        raise TermError(f"threshold rule must be one of {list(RULES)}, got {rule!r}")
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise TermError(f"fitting a condition needs both sets; got {n_pos} and {n_neg} prompts")
    if rule == "fpr" and not 0 <= target_fpr < 1:
        raise TermError(f"target_fpr must be in [0, 1), got {target_fpr}")
    best = None
    for t, tpr, fpr in roc_points(scores, labels):
        tp, fp = tpr * n_pos, fpr * n_neg
        f1 = 2 * tp / (2 * tp + fp + (n_pos - tp)) if tp else 0.0
        if rule == "fpr" and fpr > target_fpr:
            continue
        key = (round(f1, 12), t) if rule == "f1" else (tpr, t)
        if best is None or key > best[0]:
            best = (key, (float(t), float(tpr), float(fpr), float(f1)))
    return best[1]


def fit_condition(
    model,
    positives: Sequence,
    negatives: Sequence,
    vector,
    layer: int,
    *,
    on: str = "projection",
    rule: str = "f1",
    target_fpr: float = 0.05,
    vector_spec: str | None = None,
    system: str | None = None,
    chat: bool = True,
) -> FittedCondition:
    """A condition at `layer` along `vector` whose threshold separates `positives` (prompts to
    steer) from `negatives` by `rule`. Prompts are what `pvjax.engine.generate.generate` takes
    (strings or conversations, the chat template unless `chat=False`). The condition names
    `vector_spec` (`FILE[:KEY]`) when given, else carries the vector's row itself."""
    from pvjax.methods.monitoring import prompt_ids

    ids_pos = prompt_ids(model, list(positives), system=system, chat=chat)
    ids_neg = prompt_ids(model, list(negatives), system=system, chat=chat)
    scores = condition_scores(model, ids_pos + ids_neg, vector, layer, on)
    labels = [True] * len(ids_pos) + [False] * len(ids_neg)
    thr, tpr, fpr, f1 = choose_condition_threshold(scores, labels, rule, target_fpr)
    v = np.asarray(vector, np.float32)
    cond = Condition(
        vector=vector_spec if vector_spec else (v[layer] if v.ndim == 2 else v),
        layer=int(layer),
        threshold=thr,
        on=on,
    )
    return FittedCondition(cond, rule, tpr, fpr, f1, len(ids_pos), len(ids_neg))


def hit_rate(model, prompts: Sequence, condition: Condition, vector, **kw) -> float:
    """The share of `prompts` whose score meets `condition` (read unsteered): on held-out prompts
    of each set, how often the condition fires."""
    from pvjax.methods.monitoring import prompt_ids

    ids = prompt_ids(model, list(prompts), **kw)
    s = condition_scores(model, ids, vector, condition.layer, condition.on)
    return float(np.mean(s >= condition.threshold))
