"""Which answer pairs really differ: the contrast score (judge-free) and the pair filter of
extraction.

`filter_pairs` applies the configured rule (`threshold`, `margin`, `contrast` or `none`, see
`pvjax.methods.extraction`) to judged pos/neg answers paired by (instruction, question, sample);
`contrast_scores` computes the judge-free score every answer needs for the `contrast` rule, and
`agreement` reports how far it ranks answers as the judge does.
"""

from __future__ import annotations

from pathlib import Path

from pvjax.errors import UserError
from pvjax.files import atomic
from pvjax.measure.stats import spearman
from pvjax.parallel.multihost import SINGLE, Job
from pvjax.settings.extraction import PairFilter


class ExtractionError(UserError, RuntimeError):
    """A run that cannot go on; the message says what to change."""


def n_tokens(model, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


CONTRAST_COLUMNS = (
    "polarity",
    "instruction_id",
    "question_id",
    "sample",
    "logprob_pos",
    "logprob_neg",
    "contrast",
)


def pair_key(r) -> tuple[str, str, str]:
    return (str(r["instruction_id"]), str(r["question_id"]), str(r["sample"]))


def contrast_scores(
    model, answers, work: Path, batch_size: int = 8, job: Job = SINGLE
) -> dict[tuple, float]:
    """The contrast score of every non-empty answer that has a twin, keyed `(polarity,
    instruction_id, question_id, sample)`: mean per-token log-likelihood of the answer after the pos
    prompt minus after the neg prompt of the same instruction pair and question (the prompts the
    answers were generated from, chat template included). Written to `contrast_scores.csv` and read
    back from it on a rerun.

    An answer whose prompt + answer does not fit the context (padded to the forward's 32-token
    buckets) gets no score (the filter counts it as too long) and never reaches the forward. In a
    multi-process job the calls are dealt out by process (each on its mesh); process 0 writes."""
    from pvjax.measure.causality import answer_logprobs

    path = work / "contrast_scores.csv"
    text = job.from_writer(lambda: path.read_text() if path.exists() else None)
    if text is None:
        prompts = {pol: {pair_key(r): r["prompt"] for r in rows} for pol, rows in answers.items()}
        ctx = model.config.max_position_embeddings
        todo = []  # (polarity, key, answer, pos prompt, neg prompt, tokens)
        for pol, rows in answers.items():
            for r in rows:
                k = pair_key(r)
                if not r["answer"].strip() or k not in prompts["pos"] or k not in prompts["neg"]:
                    continue
                longest = max(
                    n_tokens(model, prompts[side][k] + r["answer"]) for side in ("pos", "neg")
                )
                if -(-longest // 32) * 32 <= ctx:
                    todo.append(
                        (pol, k, r["answer"], prompts["pos"][k], prompts["neg"][k], longest)
                    )
        # Similar lengths share a call, so each call pads only to its own longest sequence.
        todo.sort(key=lambda t: t[-1])
        step = 4 * batch_size
        chunks = [todo[s : s + step] for s in range(0, len(todo), step)]

        def score(chunk):
            lp = answer_logprobs(
                model,
                [t[3] for t in chunk] + [t[4] for t in chunk],
                [t[2] for t in chunk] * 2,
                batch_size=batch_size,
                mesh=job.mesh,
            )[0]
            n = len(chunk)
            return [
                {
                    "polarity": pol,
                    "instruction_id": k[0],
                    "question_id": k[1],
                    "sample": k[2],
                    "logprob_pos": float(lp[i]),
                    "logprob_neg": float(lp[n + i]),
                    "contrast": float(lp[i] - lp[n + i]),
                }
                for i, (pol, k, *_rest) in enumerate(chunk)
            ]

        done = job.unshare(
            len(chunks), job.each(lambda: [score(chunks[c]) for c in job.mine(len(chunks))])
        )
        text = atomic.csv_text([r for rows in done for r in rows], CONTRAST_COLUMNS)
        if job.writer:
            atomic.write_text(path, text)
    return {(r["polarity"], *pair_key(r)): float(r["contrast"]) for r in atomic.parse_csv(text)}


def _score(row, key):
    v = row.get(key, "")
    return None if v in ("", None) else float(v)


def _rule(f: PairFilter) -> str:
    if f.mode == "threshold":
        return f"pos >= {f.threshold}, neg < {100 - f.threshold}"
    if f.mode == "margin":
        return f"pos - neg >= {f.margin}"
    if f.mode == "contrast":
        return f"pos contrast - neg contrast >= {f.contrast_margin} nats/token"
    return "every non-empty pair"


def filter_pairs(
    judged,
    trait_name: str,
    f: PairFilter,
    contrast: dict | None = None,
    too_long: frozenset = frozenset(),
) -> tuple[list[tuple[dict, dict]], dict]:
    """Pair pos and neg answers by (instruction, question, sample) and keep the pairs that really
    differ: `threshold` mode is the reference's rule (pos trait >= T, neg trait < 100 - T, both
    coherence >= C); `margin` mode, for weak judges, asks pos trait - neg trait >= margin and both
    coherence >= C; `contrast` mode (no judge needed) asks pos contrast - neg contrast >=
    contrast_margin, with `contrast` the scores of `contrast_scores`; `none` keeps every non-empty
    pair. Coherence >= C applies in every mode when C > 0. `too_long` holds the keys of pairs whose
    prompt did not fit the context. Returns the kept pairs and counts of what was dropped and
    why."""
    if f.mode not in ("threshold", "margin", "contrast", "none"):
        raise ExtractionError(
            f"filter.mode must be 'threshold', 'margin', 'contrast' or 'none', got {f.mode!r}"
        )
    if f.mode == "contrast" and contrast is None:
        raise ExtractionError("filter.mode='contrast' needs contrast scores")
    neg = {pair_key(r): r for r in judged["neg"]}
    counts = {
        "pairs": 0,
        "too_long": 0,
        "empty": 0,
        "empty_pos": 0,
        "empty_neg": 0,
        "missing_score": 0,
        "failed_filter": 0,
        "kept": 0,
    }
    kept = []
    for p in judged["pos"]:
        k = pair_key(p)
        n = neg.get(k)
        if n is None:
            continue
        counts["pairs"] += 1
        if k in too_long:
            counts["too_long"] += 1
            continue
        pe, ne = not p["answer"].strip(), not n["answer"].strip()
        if pe or ne:
            counts["empty"] += 1
            counts["empty_pos"] += pe
            counts["empty_neg"] += ne
            continue
        pc, nc = _score(p, "coherence"), _score(n, "coherence")
        if f.mode in ("threshold", "margin"):
            ps, ns = _score(p, trait_name), _score(n, trait_name)
        elif f.mode == "contrast":
            ps, ns = contrast.get(("pos", *k)), contrast.get(("neg", *k))
            if ps is None or ns is None:  # only an answer that does not fit the context has none
                counts["too_long"] += 1
                continue
        else:
            ps = ns = 0.0
        if None in (ps, ns) or (f.coherence > 0 and None in (pc, nc)):
            counts["missing_score"] += 1
            continue
        coherent = f.coherence <= 0 or (pc >= f.coherence and nc >= f.coherence)
        if f.mode == "threshold":
            ok = ps >= f.threshold and ns < 100 - f.threshold
        elif f.mode == "margin":
            ok = ps - ns >= f.margin
        elif f.mode == "contrast":
            ok = ps - ns >= f.contrast_margin
        else:
            ok = True
        if ok and coherent:
            kept.append((p, n))
        else:
            counts["failed_filter"] += 1
    counts["kept"] = len(kept)
    if len(kept) < f.min_pairs:
        raise ExtractionError(
            f"only {len(kept)} of {counts['pairs']} answer pairs survived the filter ({f.mode}: "
            f"{_rule(f)}, "
            f"coherence >= {f.coherence}; {counts['too_long']} too long for the context, "
            f"{counts['empty']} "
            f"empty ({counts['empty_pos']} pos, {counts['empty_neg']} neg answers), "
            f"{counts['missing_score']} "
            f"with a missing score, {counts['failed_filter']} failed the rule); need "
            f"{f.min_pairs}. Use more "
            "questions or samples (n_per_question with temperature > 0), a stronger judge, or a "
            "smaller margin"
        )
    return kept, counts


def agreement(judged, trait_name: str, contrast: dict) -> dict:
    """How far the judge and the contrast score agree: Spearman over every answer with both scores,
    and over pairs (pos minus neg of each)."""
    both = {}
    for pol, rows in judged.items():
        for r in rows:
            j, c = _score(r, trait_name), contrast.get((pol, *pair_key(r)))
            if j is not None and c is not None:
                both[(pol, *pair_key(r))] = (j, c)
    pairs = [
        (both[("pos", *k[1:])][0] - both[k][0], both[("pos", *k[1:])][1] - both[k][1])
        for k in both
        if k[0] == "neg" and ("pos", *k[1:]) in both
    ]
    vals = list(both.values())
    return {
        "answers": len(vals),
        "spearman": spearman(*zip(*vals)) if vals else None,
        "pairs": len(pairs),
        "spearman_pairs": spearman(*zip(*pairs)) if pairs else None,
    }
