"""A study's grid as batch rows: settings stacked into one per-row intervention, then generation,
answer likelihoods and judging over (setting, prompt) rows in the batched engine.

A *setting* is one intervention (a coefficient at a layer, an ablation at some layers, nothing).
`stack` puts S settings on the batch axis; `take` gathers the rows of a batch from them. Every
grid point is then a row of the same compiled programs: the whole grid costs the compiles of its
shape buckets (a handful), never one per point.

Shape legend: L hidden-state rows, S settings, N prompts, B rows, T positions, D width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pvjax import interventions as ivs
from pvjax.engine.rows import stack, take  # noqa: F401  (stack: the grid's rows, for its studies)
from pvjax.files import atomic
from pvjax.settings.types import Judging


def study_inputs(cfg, checked, work: Path, *, progress: bool = True):
    """(model, vector [L, D], layers, questions) of a grid study (steer, ablate) whose config passed
    its checks (`checked`): the model loaded, its vector read or extracted into `work`
    (`vector_source.study_vector`), `layers` or five spread over the middle half, and the first
    `n_questions` eval questions (all when 0)."""
    import pvjax
    from pvjax.settings.fields import enable_thinking, spread_layers
    from pvjax.studies.vector_source import study_vector

    model = pvjax.load(cfg.model, dtype=cfg.dtype or None, enable_thinking=enable_thinking(cfg))
    vector, _ = study_vector(cfg, model, work, progress=progress)
    layers = list(cfg.layers) or spread_layers(model.n_layers)
    return model, vector, layers, list(checked.trait.questions[: cfg.n_questions or None])


ANSWER_COLUMNS = ("setting", "prompt", "text", "n_tokens", "finish")


def generate_grid(
    model,
    iv_S: ivs.Intervention,
    prompt_ids: Sequence[Sequence[int]],
    sampling,
    *,
    work: Path | None = None,
    positions: str = "response",
    ablate_positions: str = "all",
    seed: int = 0,
    batch_size: int = 32,
    part_rows: int = 0,
    progress: bool = False,
    probes=None,
) -> list[dict]:
    """Answers for every (setting, prompt) row, setting-major: `S x N` dicts with `setting`,
    `prompt` (indices), `text`, `n_tokens`, `finish`; with `probes` (`[L, 1, D]`, one unit vector
    per hidden-state row) also `projection`, the answer's mean projection at every row (a list of
    L floats, None for an empty answer).

    Rows go through `pvjax.engine.generate.generate_ids` in parts of `part_rows` (default: 4
    batches), each with an intervention of one row per prompt. With `work`, each part is written to
    `work/answers/part_<k>.csv` as it finishes and read back instead of recomputed, so a killed
    study loses at most one part. Sampling (temperature > 0) draws row k of a part from the key of
    `seed + the part's first row` folded with k, so the same config repeats the same texts."""
    from pvjax.engine.generate import generate_ids

    S, N = iv_S.steer_vectors.shape[1], len(prompt_ids)
    rows = [(s, i) for s in range(S) for i in range(N)]
    part_rows = part_rows or 4 * batch_size
    columns = ANSWER_COLUMNS + (("projection",) if probes is not None else ())
    out = []
    for k, start in enumerate(range(0, len(rows), part_rows)):
        chunk = rows[start : start + part_rows]
        path = None if work is None else Path(work) / "answers" / f"part_{k:04d}.csv"
        if path is not None and path.exists():
            for r in atomic.read_csv(path):
                r = {
                    **r,
                    "setting": int(r["setting"]),
                    "prompt": int(r["prompt"]),
                    "n_tokens": int(r["n_tokens"]),
                }
                if "projection" in r:
                    r["projection"] = json.loads(r["projection"] or "null")
                out.append(r)
            continue
        g = generate_ids(
            model,
            [prompt_ids[i] for _, i in chunk],
            sampling=sampling,
            seed=seed + start,
            intervention=take(iv_S, [s for s, _ in chunk]),
            positions=positions,
            ablate_positions=ablate_positions,
            batch_size=batch_size,
            progress=progress,
            probes=probes,
        )
        part = [
            {"setting": s, "prompt": i, "text": t, "n_tokens": len(toks), "finish": f}
            for (s, i), t, toks, f in zip(chunk, g.texts, g.tokens, g.finish_reasons)
        ]
        if probes is not None:
            for r, p in zip(part, g.projections):  # p: [L, new tokens, 1]
                r["projection"] = p[:, :, 0].mean(axis=1).round(5).tolist() if p.size else None
        if path is not None:
            written = [{**r, "projection": json.dumps(r.get("projection"))} for r in part]
            atomic.write_csv(path, written if probes is not None else part, columns)
        out += part
    return out


def answer_logprobs(
    model,
    iv_S: ivs.Intervention,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    positions: str = "response",
    ablate_positions: str = "all",
    batch_size: int = 16,
) -> np.ndarray:
    """Mean per-token log-probability `[S, N]` of answer n after (chat-templated) prompt n under
    setting s, every (setting, answer) pair a row of batched forwards. Steering applies on
    `positions` (`response`: the last prompt token and the answer, as in generation), ablation on
    `ablate_positions`. Rows are sorted by length, each batch padded to its own longest (in steps
    of 64 tokens, which bounds the compiles)."""
    from pvjax.measure.causality import answer_batch, logprob_rows, tokenize_answers

    tok = model.tokenizer
    seqs, starts = tokenize_answers(tok, prompts, answers)
    S = iv_S.steer_vectors.shape[1]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows = [(s, i) for i in order for s in range(S)]
    out = np.zeros((S, len(seqs)), np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        T = -(-max(len(seqs[i]) for _, i in chunk) // 64) * 64
        idx = [i for _, i in chunk]
        tokens, mask, answer, end = answer_batch(seqs, starts, idx, T, batch_size)
        setting = [s for s, _ in chunk] + [0] * (batch_size - len(chunk))
        iv = (
            take(iv_S, setting)
            .with_masks(
                ivs.position_mask(positions, mask, end),
                ivs.position_mask(ablate_positions, mask, end),
            )
            .with_condition_column(end - 1)
        )  # a condition reads the last prompt token, not the answer
        # The head runs on the answer tail only (`answer_logprob`); 32-token steps bound the
        # compiles.
        tail = min(T - 1, -(-max(len(seqs[i]) - starts[i] for _, i in chunk) // 32) * 32)
        batch = (tokens, mask, answer)
        logprob_rows(model.params, model.config, batch, iv, tail=tail, out=out, cells=chunk)
    return out


def reference_answers(
    model,
    trait_eval,
    questions: Sequence[str],
    work: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    unroll: bool = True,
) -> list[dict]:
    """Greedy unsteered answers to `questions` under the trait's first instruction pair (pos: "You
    are a(n) <trait> assistant. ...", neg: "You are a helpful assistant. ..."), written to
    `work/reference_answers.csv` once: the answers the judge-free likelihood margin compares.
    `unroll` is generation's layer layout (`pvjax.engine.generate.decode_params`)."""
    path = work / "reference_answers.csv"
    if not path.exists():
        from pvjax.engine.generate import SamplingParams, generate
        from pvjax.methods.extraction import system_prompt

        pair = trait_eval.instruction[0]
        sp = SamplingParams(max_new_tokens=max_new_tokens)
        pos = generate(
            model,
            list(questions),
            system=system_prompt(trait_eval.name, pair.pos),
            sampling=sp,
            batch_size=batch_size,
            unroll=unroll,
        ).texts
        neg = generate(
            model,
            list(questions),
            system=system_prompt("helpful", pair.neg),
            sampling=sp,
            batch_size=batch_size,
            unroll=unroll,
        ).texts
        atomic.write_csv(
            path,
            [
                {"question": q, "pos_answer": p, "neg_answer": n}
                for q, p, n in zip(questions, pos, neg)
            ],
            ("question", "pos_answer", "neg_answer"),
        )
    return atomic.read_csv(path)


def margins(
    model,
    iv_S,
    refs: Sequence[dict],
    *,
    positions: str,
    ablate_positions: str = "all",
    batch_size: int,
) -> np.ndarray:
    """The judge-free likelihood margin per setting `[S]`: mean over questions of the mean
    per-token log-likelihood of the pos reference answer minus the neg one, with no system prompt
    (the intervention alone must carry the trait), as
    `pvjax.measure.causality.likelihood_margins`."""
    prompts = [model.chat_text([{"role": "user", "content": r["question"]}]) for r in refs]
    lp = answer_logprobs(
        model,
        iv_S,
        prompts * 2,
        [r["pos_answer"] for r in refs] + [r["neg_answer"] for r in refs],
        positions=positions,
        ablate_positions=ablate_positions,
        batch_size=batch_size,
    )
    n = len(refs)
    return (lp[:, :n] - lp[:, n:]).mean(axis=1)


def judge(
    judging: Judging,
    model,
    work: Path,
    trait_eval,
    pairs: Sequence[tuple[str, str]],
    *,
    progress: bool = False,
) -> tuple[list, list] | None:
    """Trait scores and coherence (0-100, None where the judge gave no number) for (question,
    answer) pairs with the study's judge (`judging` as in extraction; its calls are cached in
    `work/judge_cache.sqlite`, so a resumed study never pays twice); None when no judge is
    configured. Empty answers are not sent and score None."""
    from pvjax.measure.judges import COHERENCE_RUBRIC, Judge
    from pvjax.methods.extraction import make_judge_backend

    if judging.backend == "none":
        return None
    backend = make_judge_backend(judging, model, work)
    live = [k for k, (_, a) in enumerate(pairs) if a.strip()]
    sent = [pairs[k] for k in live]
    trait = [None] * len(pairs)
    coh = [None] * len(pairs)
    if sent:
        for k, s in zip(
            live, Judge(backend, trait_eval.eval_prompt).score(sent, progress=progress)
        ):
            trait[k] = s
        for k, s in zip(live, Judge(backend, COHERENCE_RUBRIC).score(sent, progress=progress)):
            coh[k] = s
    return trait, coh


def mean_or_none(values) -> float | None:
    v = [x for x in values if x is not None and x != ""]
    return float(np.mean([float(x) for x in v])) if v else None


def judged_scores(judging: Judging, model, work: Path, trait, answers, progress) -> dict | None:
    """Per setting, the trait scores and coherence of its answers (`judged.csv`); None without a
    judge."""
    path = work / "judged.csv"
    if judging.backend == "none":
        return None
    if not path.exists():
        scores = judge(
            judging,
            model,
            work,
            trait,
            [(a["question"], a["text"]) for a in answers],
            progress=progress,
        )
        atomic.write_csv(
            path,
            [
                {"setting": a["setting"], "prompt": a["prompt"], "trait": t, "coherence": c}
                for a, t, c in zip(answers, *scores)
            ],
            ("setting", "prompt", "trait", "coherence"),
        )
    out: dict[int, dict] = {}
    for r in atomic.read_csv(path):
        d = out.setdefault(int(r["setting"]), {"trait": [], "coherence": []})
        d["trait"].append(r["trait"])
        d["coherence"].append(r["coherence"])
    return out


def mc_scores(model, work: Path, items, iv, positions: str, batch_size: int) -> dict | None:
    """Per setting, (accuracy, p_correct) on the multiple-choice items (`mc.csv`), scored in
    forwards of `batch_size` rows; None when off."""
    from pvjax.measure import mc

    if not items:
        return None
    path = work / "mc.csv"
    if not path.exists():
        lp = mc.score(model, items, intervention=iv, positions=positions, batch_size=batch_size)
        acc, pc = mc.accuracy(lp, items), mc.p_correct(lp, items)
        atomic.write_csv(
            path,
            [
                {
                    "setting": s,
                    "accuracy": float(acc[s]),
                    "p_correct": float(pc[s]),
                    "n_items": len(items),
                }
                for s in range(len(acc))
            ],
            ("setting", "accuracy", "p_correct", "n_items"),
        )
    return {
        int(r["setting"]): (float(r["accuracy"]), float(r["p_correct"]))
        for r in atomic.read_csv(path)
    }


def unsteered_nll(model, answers: Sequence[dict], work: Path | None, *, batch_size: int) -> dict:
    """Per setting, the unsteered model's mean per-token negative log-likelihood of each of its
    answers (a list per setting, empty answers left out), read as the answer's text after its
    (chat-templated) question, one forward per batch of rows (`answer_logprobs` with the one
    unsteered setting). With `work`, kept in `work/perplexity.csv` and read back there.
    exp of a setting's mean is its perplexity: how surprising the steered answers are to the
    model that was not steered, a fluency measure that needs no judge."""
    from pvjax.measure.causality import tokenize_answers

    path = None if work is None else Path(work) / "perplexity.csv"
    if path is None or not path.exists():
        prompts = [model.chat_text([{"role": "user", "content": a["question"]}]) for a in answers]
        texts = [a["text"] for a in answers]
        seqs, starts = tokenize_answers(model.tokenizer, prompts, texts)
        n = [len(s) - st for s, st in zip(seqs, starts)]
        live = [k for k in range(len(answers)) if n[k] > 0]
        nll = np.full(len(answers), np.nan)
        if live:
            iv = stack([ivs.build(model.n_layers + 1, model.hidden_size)])
            lp = answer_logprobs(
                model,
                iv,
                [prompts[k] for k in live],
                [texts[k] for k in live],
                batch_size=batch_size,
            )
            nll[live] = -lp[0]
        rows = [
            {
                "setting": a["setting"],
                "prompt": a["prompt"],
                "nll": None if np.isnan(x) else float(x),
                "answer_tokens": k,
            }
            for a, x, k in zip(answers, nll, n)
        ]
        if path is None:
            got = rows
        else:
            atomic.write_csv(path, rows, ("setting", "prompt", "nll", "answer_tokens"))
    if path is not None:
        got = atomic.read_csv(path)
    out: dict[int, list] = {}
    for r in got:
        d = out.setdefault(int(r["setting"]), [])
        if r["nll"] not in (None, ""):
            d.append(float(r["nll"]))
    return out


def perplexity(nlls: Sequence[float]) -> float | None:
    """exp of the mean per-token NLL over answers (`unsteered_nll`): the geometric mean of the
    answers' perplexities; None for no answers."""
    return float(np.exp(np.mean(nlls))) if len(nlls) else None
