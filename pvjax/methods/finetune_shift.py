"""Finetuning shift: how far finetuning moved a model along a persona vector, per layer.

On the trait's eval questions (chat-templated, no system prompt), for the base model B and the
finetuned model F of the same architecture:

    shift_prompt_last[l]  = (mean_q h^F_l(q)_last - mean_q h^B_l(q)_last) . v_l / |v_l|
    shift_response_avg[l] = (mean_q mean_t h^F_l(q, a^F_q)_t - mean_q mean_t h^B_l(q, a^B_q)_t) .
    v_l / |v_l|

The first is the paper's finetuning shift (the last prompt token, before the assistant answers: it
needs no answers at all). For the second, `response_source="own"` (the default) runs each model on
the answers it generated itself, as the paper's response projections do: the shift then holds both
what the model writes and how it represents it. `"base"` or `"finetuned"` runs both models over
the same answers (that model's), which isolates the change of representation from the change of
text. Questions where an answer used is empty are left out of the response mean and counted.

Beside the shift, judge-free measures of trait expression before and after finetuning:
- `likelihood_margin`: for reference answers that the base model writes under the eval trait's
  pos and neg system prompts, the mean per-token log-likelihood of the pos answer minus the neg
  answer given the bare question (`pvjax.measure.causality.answer_logprobs`), under each model; it
  rises when finetuning makes trait answers likelier.
- `contrast`: each model's own answers scored as `pvjax.methods.pair_filter.contrast_scores` does,
by the base
  model: log-likelihood under the pos system prompt minus under the neg one, per token.
and, with a judge, the judged trait score of each model's answers.

Shape legend: N questions, L hidden-state rows, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pvjax.capture import POOLINGS
from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.measure.stats import unit_rows
from pvjax.settings.types import Sampling, VectorChoice, Workspace

RESPONSE_SOURCES = ("own", "base", "finetuned")
LAYER_COLUMNS = (
    "layer",
    "shift_prompt_last",
    "shift_response_avg",
    "norm_diff_prompt_last",
    "norm_diff_response_avg",
    "cos_prompt_last",
    "cos_response_avg",
    "vector_norm",
)


def describe(cfg) -> str:
    return (
        f"{cfg.name or '?'} ({cfg.architecture}, {cfg.num_layers} layers, width {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size})"
    )


def check_same_shape(base_cfg, finetuned_cfg) -> None:
    """Two `ModelConfig`s of the same architecture and shapes (config fingerprints), or an error
    naming both: a shift between residual streams of different geometry means nothing."""
    if base_cfg.fingerprint() != finetuned_cfg.fingerprint():
        raise InputError(
            f"the finetuned model {describe(finetuned_cfg)} does not have the base model's "
            f"architecture and shapes {describe(base_cfg)}; a finetuning shift compares two "
            "models of one shape"
        )


def _pooled(model, prompts, answers):
    from pvjax.measure.packing import pooled_activations

    tok = model.tokenizer
    seqs = [tok(p + a, add_special_tokens=False)["input_ids"] for p, a in zip(prompts, answers)]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return pooled_activations(model, seqs, starts)  # [N, L, 3, D]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def finetuning_shift(
    base,
    finetuned,
    choice: VectorChoice,
    questions: Sequence[str],
    space: Workspace,
    sampling: Sampling | None = None,
    *,
    response_source: str = "own",
    trait=None,
    n_pairs: int = 1,
    judge=None,
) -> dict:
    """The finetuning shift of the module docstring at every layer along `choice.vector`, written to
    `space.work` (`shift.csv` per layer, `answers.csv` per question, `summary.json`, `plot.png`
    unless `space.plot` is off); returns the summary, whose per-question projections and headline
    numbers are read at `choice.layer`. `trait` (a `pvjax.files.traits.Trait`, eval split) enables
    the likelihood margin and the contrast (its first `n_pairs` instruction pairs); `judge` (a
    `pvjax.measure.judges.Judge`) the judged scores. Both models answer as `sampling` says (default
    `Sampling()`: greedy, 256 tokens); answers are cached in `space.cache()` (default
    `work/answer_cache`)."""
    from pvjax.engine.answer_cache import weights_fingerprint
    from pvjax.methods.screening import check_vector_layer

    sampling = sampling or Sampling()
    vector_LD, layer, work = choice.array, choice.layer, space.work
    check_same_shape(base.config, finetuned.config)
    if (
        not finetuned.tokenizer
    ):  # weights alone (a common way to ship finetunes): the base's tokenizer
        finetuned = finetuned.replace(tokenizer=base.tokenizer)
    finetuned_id = finetuned.model_id
    if dataclasses.replace(finetuned.config, name=base.config.name) == base.config:
        # Compiled programs are keyed by the config, name included: with the base's config, one set
        # of programs serves both models instead of compiling every one twice.
        finetuned = finetuned.replace(config=base.config)
    check_vector_layer(base, vector_LD, layer)
    if response_source not in RESPONSE_SOURCES:
        raise InputError(
            f"response_source must be one of {RESPONSE_SOURCES}, got {response_source!r}"
        )
    if (
        isinstance(questions, str)
        or not questions
        or not all(isinstance(q, str) and q.strip() for q in questions)
    ):
        raise InputError("questions must be a non-empty list of non-blank strings")
    if trait is not None and not 1 <= n_pairs <= len(trait.instruction):
        raise InputError(
            f"n_pairs must be in 1..{len(trait.instruction)} (the trait's instruction pairs), "
            f"got {n_pairs!r}"
        )
    prompts = [base.chat_text([{"role": "user", "content": q}]) for q in questions]
    ctx = base.config.max_position_embeddings
    for i, p in enumerate(prompts):
        n = len(base.tokenizer(p, add_special_tokens=False)["input_ids"])
        if n + sampling.max_new_tokens > ctx:
            raise InputError(
                f"question {i} takes {n} tokens; with max_new_tokens={sampling.max_new_tokens} "
                f"it exceeds the context window of {base.model_id} ({ctx})"
            )
    a_base, a_ft = (_answers(m, prompts, sampling, space) for m in (base, finetuned))

    src = {
        "own": (a_base.texts, a_ft.texts),
        "base": (a_base.texts, a_base.texts),
        "finetuned": (a_ft.texts, a_ft.texts),
    }[response_source]
    p_base, p_ft = _pooled(base, prompts, src[0]), _pooled(finetuned, prompts, src[1])
    r, last = POOLINGS.index("response_avg"), POOLINGS.index("prompt_last")
    ok = np.array([bool(x.strip()) and bool(y.strip()) for x, y in zip(*src)])
    unit = unit_rows(vector_LD, compute=np.float64)
    d_last = p_ft[:, :, last].mean(0) - p_base[:, :, last].mean(0)  # [L, D]
    d_resp = (
        (p_ft[ok, :, r].mean(0) - p_base[ok, :, r].mean(0))
        if ok.any()
        else np.full_like(d_last, np.nan)
    )
    vnorm = np.linalg.norm(vector_LD, axis=-1)
    cos = lambda d: np.einsum("ld,ld->l", d, unit) / np.maximum(np.linalg.norm(d, axis=-1), 1e-30)
    rows = [
        {
            "layer": l,
            "shift_prompt_last": float(d_last[l] @ unit[l]),
            "shift_response_avg": float(d_resp[l] @ unit[l]),
            "norm_diff_prompt_last": float(np.linalg.norm(d_last[l])),
            "norm_diff_response_avg": float(np.linalg.norm(d_resp[l])),
            "cos_prompt_last": float(cos(d_last)[l]),
            "cos_response_avg": float(cos(d_resp)[l]),
            "vector_norm": float(vnorm[l]),
        }
        for l in range(unit.shape[0])
    ]
    atomic.write_csv(work / "shift.csv", rows, LAYER_COLUMNS)

    per_q = [
        {
            "question": q,
            "base_answer": x,
            "finetuned_answer": y,
            "proj_last_base": float(p_base[i, layer, last] @ unit[layer]),
            "proj_last_finetuned": float(p_ft[i, layer, last] @ unit[layer]),
            "proj_response_base": float(p_base[i, layer, r] @ unit[layer]) if ok[i] else None,
            "proj_response_finetuned": float(p_ft[i, layer, r] @ unit[layer]) if ok[i] else None,
        }
        for i, (q, x, y) in enumerate(zip(questions, a_base.texts, a_ft.texts))
    ]
    generated = {"base": a_base.generated, "finetuned": a_ft.generated}
    margin = contrast = judged = None
    if trait is not None:
        answers = (a_base.texts, a_ft.texts)
        margin, contrast, generated["reference"] = _likelihood_measures(
            base, finetuned, trait, n_pairs, questions, prompts, answers, per_q, sampling, space
        )
    if judge is not None:
        s_base = judge.score(list(zip(questions, a_base.texts)), progress=space.progress)
        s_ft = judge.score(list(zip(questions, a_ft.texts)), progress=space.progress)
        for row, x, y in zip(per_q, s_base, s_ft):
            row["judge_base"], row["judge_finetuned"] = x, y
        jb, jf = _mean(s_base), _mean(s_ft)
        judged = {
            "base": jb,
            "finetuned": jf,
            "delta": None if None in (jb, jf) else jf - jb,
            "missing": sum(s is None for s in list(s_base) + list(s_ft)),
        }
    atomic.write_csv(work / "answers.csv", per_q, list(per_q[0]))
    summary = {
        "base": base.model_id,
        "finetuned": finetuned_id,
        "base_weights": weights_fingerprint(base),
        "finetuned_weights": weights_fingerprint(finetuned),
        "vector": choice.spec,
        "layer": layer,
        "response_source": response_source,
        "shift_prompt_last": rows[layer]["shift_prompt_last"],
        "shift_response_avg": rows[layer]["shift_response_avg"],
        "likelihood_margin": margin,
        "contrast": contrast,
        "judge": judged,
        "counts": {
            "questions": len(questions),
            "response_rows": int(ok.sum()),
            "empty_base": sum(not t.strip() for t in a_base.texts),
            "empty_finetuned": sum(not t.strip() for t in a_ft.texts),
        },
        "generated": generated,
        "sampling": dataclasses.asdict(_params(sampling)),
        "seed": sampling.seed,
    }
    atomic.write_json(work / "summary.json", summary)
    if space.plot:
        shift_plot(work / "plot.png", rows, layer)
    return summary


def _params(sampling: Sampling):
    from pvjax.engine.generate import SamplingParams

    return SamplingParams(**sampling.engine_fields())


def _answers(model, prompts, sampling: Sampling, space: Workspace):
    """The model's own answers to `prompts`, through the answer cache."""
    from pvjax.engine.answer_cache import own_answers

    return own_answers(
        model,
        prompts,
        _params(sampling),
        cache_dir=space.cache(),
        seed=sampling.seed,
        batch_size=space.batch_size,
        progress=space.progress,
    )


def _likelihood_measures(
    base,
    finetuned,
    trait,
    n_pairs,
    questions,
    prompts,
    answers,
    per_q,
    sampling: Sampling,
    space: Workspace,
):
    """(likelihood margin per model, contrast of each model's answers, answers generated): see the
    module docstring. `answers` are (base's, finetuned's) texts. Reference answers come from the
    base model under each pair's system prompts, cached like the others, and are written to
    `reference_answers.csv`."""
    from pvjax.measure.causality import answer_logprobs
    from pvjax.methods.extraction import system_prompt

    N, batch_size, work = len(questions), space.batch_size, space.work
    ans_base, ans_ft = answers
    sys_prompts = [
        (system_prompt(trait.name, p.pos), system_prompt("helpful", p.neg))
        for p in trait.instruction[:n_pairs]
    ]
    render = lambda system: [
        base.chat_text([{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in questions
    ]
    ref_prompts = [render(s) for pair in sys_prompts for s in pair]  # pos_0, neg_0, pos_1, ...
    ref = _answers(base, [p for group in ref_prompts for p in group], sampling, space)
    margins = {"base": [], "finetuned": []}
    ref_rows = []
    for k in range(n_pairs):
        pos, neg = (
            ref.texts[2 * k * N : (2 * k + 1) * N],
            ref.texts[(2 * k + 1) * N : (2 * k + 2) * N],
        )
        ref_rows += [
            {"pair": k, "question": q, "pos_answer": x, "neg_answer": y}
            for q, x, y in zip(questions, pos, neg)
        ]
        keep = [i for i in range(N) if pos[i].strip() and neg[i].strip()]
        if not keep:
            continue
        for name, m in (("base", base), ("finetuned", finetuned)):
            lp = answer_logprobs(
                m,
                [prompts[i] for i in keep] * 2,
                [pos[i] for i in keep] + [neg[i] for i in keep],
                batch_size=batch_size,
            )[0]
            margins[name] += list(lp[: len(keep)] - lp[len(keep) :])
    atomic.write_csv(
        work / "reference_answers.csv", ref_rows, ("pair", "question", "pos_answer", "neg_answer")
    )
    mb, mf = _mean(margins["base"]), _mean(margins["finetuned"])
    margin = {
        "base": mb,
        "finetuned": mf,
        "delta": None if None in (mb, mf) else mf - mb,
        "pairs": len(margins["base"]),
    }

    contrast = {}
    for name, answers in (("base_answers", ans_base), ("finetuned_answers", ans_ft)):
        keep = [i for i in range(N) if answers[i].strip()]
        per = np.zeros((n_pairs, N))
        for k, (pos_p, neg_p) in enumerate(zip(ref_prompts[0::2], ref_prompts[1::2])):
            if keep:
                lp = answer_logprobs(
                    base,
                    [pos_p[i] for i in keep] + [neg_p[i] for i in keep],
                    [answers[i] for i in keep] * 2,
                    batch_size=batch_size,
                )[0]
                per[k, keep] = lp[: len(keep)] - lp[len(keep) :]
        col = "contrast_base" if name == "base_answers" else "contrast_finetuned"
        for i in range(N):
            per_q[i][col] = float(per[:, i].mean()) if i in keep else None
        contrast[name] = float(per[:, keep].mean()) if keep else None
    cb, cf = contrast["base_answers"], contrast["finetuned_answers"]
    contrast["delta"] = None if None in (cb, cf) else cf - cb
    return margin, contrast, ref.generated


def shift_plot(path, rows, layer: int):
    """The shift along the vector per layer (last prompt token and response mean)."""
    from pvjax.files.plots import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    ls = [r["layer"] for r in rows]
    ax.plot(ls, [r["shift_prompt_last"] for r in rows], marker="o", ms=3, label="last prompt token")
    ax.plot(ls, [r["shift_response_avg"] for r in rows], marker="o", ms=3, label="response mean")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(layer, color="gray", ls=":", lw=1)
    ax.set(
        xlabel="layer (hidden_states index)",
        ylabel="(finetuned - base) . v / |v|",
        title="finetuning shift along the persona vector",
    )
    ax.legend()
    return save(fig, path)
