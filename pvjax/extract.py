"""From a trait file to persona vectors: answer, judge, filter, pool, difference of means.

A run directory holds every stage's output, each written atomically as soon as it is finished, so
a run killed at any point resumes where it stopped:

    config.json                      the config of the run that produced the files present
    stages.json                      per stage, every input that produced its files (run_provenance)
    answers/parts/{pos,neg}_<k>.csv  answers under instruction pair k (skipped once present)
    judge_cache.sqlite               every judgement as it arrives (a rerun never pays twice)
    <trait>_pos.csv, <trait>_neg.csv question, prompt, answer, question_id, <trait>, coherence, ...
    kept_pairs.csv                   the pairs that passed the filter
    vectors.safetensors              response_avg_diff, prompt_avg_diff, prompt_last_diff [L, D]
    causality.json, summary.json, plot.png
    DONE                             written last

System prompts follow the reference: "You are a(n) <name> assistant. <pos>" and "You are a helpful
assistant. <neg>". A score is missing when the judge's numeric tokens hold under a quarter of the
probability mass; such answers are dropped and counted, as are empty answers.

A rerun first checks the whole config (`pvjax.extract_config`), then its provenance against the
directory's (`pvjax.run_provenance`): answers made under other settings are refused, never
relabelled; a changed judge, filter or causality setting reruns that stage and what follows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pvjax import atomic, run_provenance
from pvjax.errors import UserError
from pvjax.extract_config import validate_config

log = logging.getLogger(__name__)
COLUMNS = ("question", "prompt", "answer", "question_id", "instruction_id", "sample")


class ExtractionError(UserError, RuntimeError):
    """A run that cannot go on; the message says what to change."""


def system_prompt(name: str, instruction: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"You are {article} {name} assistant. {instruction}"


def make_judge_backend(cfg, model, work: Path):
    from pvjax.llm.cache import CachedBackend, ChatCache

    j = cfg["judge"]
    if j["backend"] == "local":
        import pvjax
        from pvjax.llm.local import LocalChat

        judge_model = model if j.get("model") in (None, "", "same") else pvjax.load(j["model"])
        inner = LocalChat(judge_model, batch_size=j.get("batch_size", 8), numeric_only=j.get("numeric_only", False))
    elif j["backend"] == "openai":
        from pvjax.llm.openai_http import OpenAIChat

        inner = OpenAIChat(j["model"], j.get("base_url") or None, concurrency=j.get("concurrency", 8))
    else:
        raise ExtractionError(f"judge.backend must be 'local' or 'openai', got {j['backend']!r}")
    return CachedBackend(inner, ChatCache(work / "judge_cache.sqlite"))


def generate_answers(model, trait, cfg, work: Path, progress: bool) -> dict[str, list[dict]]:
    from pvjax.generate import SamplingParams, generate

    questions = list(trait.questions[: cfg["n_questions"] or None])
    pairs = list(trait.instruction[: cfg["n_pairs"] or None])
    n = cfg["n_per_question"]
    sampling = SamplingParams(temperature=cfg["temperature"], top_p=cfg.get("top_p", 1.0),
                              max_new_tokens=cfg["max_new_tokens"])
    names = {"pos": cfg.get("pos_name") or trait.name, "neg": cfg.get("neg_name") or "helpful"}
    out = {"pos": [], "neg": []}
    for pol_i, pol in enumerate(("pos", "neg")):
        for k, pair in enumerate(pairs):
            part = work / "answers" / "parts" / f"{pol}_{k}.csv"
            if not part.exists():
                system = system_prompt(names[pol], pair.pos if pol == "pos" else pair.neg)
                prompts = [q for q in questions for _ in range(n)]
                log.info("answering %d prompts under %s instruction %d", len(prompts), pol, k)
                g = generate(model, prompts, system=system, sampling=sampling,
                             seed=cfg["seed"] * 1000 + pol_i * 100 + k, batch_size=cfg["batch_size"],
                             progress=progress)
                rows = [{"question": q, "prompt": g.prompts[i], "answer": g.texts[i],
                         "question_id": f"{trait.name}_{i // n}", "instruction_id": k, "sample": i % n}
                        for i, q in enumerate(prompts)]
                atomic.write_csv(part, rows, COLUMNS)
            out[pol] += atomic.read_csv(part)
    return out


def judge_answers(answers, trait, backend, work: Path, progress: bool,
                  coherence: bool = True) -> dict[str, list[dict]]:
    """Trait and (unless switched off) coherence scores for every non-empty answer."""
    from pvjax.judges import COHERENCE_RUBRIC, Judge

    judged = {}
    for pol, rows in answers.items():
        path = work / f"{trait.name}_{pol}.csv"
        if not path.exists():
            live = [r for r in rows if r["answer"].strip()]
            pairs = [(r["question"], r["answer"]) for r in live]
            scores = Judge(backend, trait.eval_prompt).score(pairs, progress=progress)
            coh = (Judge(backend, COHERENCE_RUBRIC).score(pairs, progress=progress) if coherence
                   else [None] * len(pairs))
            for r, s, c in zip(live, scores, coh):
                r[trait.name], r["coherence"] = s, c
            atomic.write_csv(path, rows, COLUMNS + (trait.name, "coherence"))
        judged[pol] = atomic.read_csv(path)
    return judged


def _score(row, key):
    v = row.get(key, "")
    return None if v in ("", None) else float(v)


def filter_pairs(judged, trait_name: str, f) -> tuple[list[tuple[dict, dict]], dict]:
    """Pair pos and neg answers by (instruction, question, sample) and keep the pairs that really
    differ: `threshold` mode is the reference's rule (pos trait >= T, neg trait < 100 - T, both
    coherence >= C); `margin` mode, for weak judges, asks pos trait - neg trait >= margin and both
    coherence >= C. Returns the kept pairs and counts of what was dropped and why."""
    key = lambda r: (r["instruction_id"], r["question_id"], r["sample"])
    neg = {key(r): r for r in judged["neg"]}
    counts = {"pairs": 0, "empty": 0, "missing_score": 0, "failed_filter": 0, "kept": 0}
    kept = []
    for p in judged["pos"]:
        n = neg.get(key(p))
        if n is None:
            continue
        counts["pairs"] += 1
        if not p["answer"].strip() or not n["answer"].strip():
            counts["empty"] += 1
            continue
        ps, ns = _score(p, trait_name), _score(n, trait_name)
        pc, nc = _score(p, "coherence"), _score(n, "coherence")
        if None in (ps, ns) or (f["coherence"] > 0 and None in (pc, nc)):
            counts["missing_score"] += 1
            continue
        coherent = f["coherence"] <= 0 or (pc >= f["coherence"] and nc >= f["coherence"])
        if f["mode"] == "threshold":
            ok = ps >= f["threshold"] and ns < 100 - f["threshold"] and coherent
        elif f["mode"] == "margin":
            ok = ps - ns >= f["margin"] and coherent
        else:
            raise ExtractionError(f"filter.mode must be 'threshold' or 'margin', got {f['mode']!r}")
        if ok:
            kept.append((p, n))
        else:
            counts["failed_filter"] += 1
    counts["kept"] = len(kept)
    if len(kept) < f["min_pairs"]:
        rule = (f"pos >= {f['threshold']}, neg < {100 - f['threshold']}" if f["mode"] == "threshold"
                else f"pos - neg >= {f['margin']}")
        raise ExtractionError(
            f"only {len(kept)} of {counts['pairs']} answer pairs survived the filter ({f['mode']}: {rule}, "
            f"coherence >= {f['coherence']}; {counts['empty']} empty, {counts['missing_score']} with a "
            f"missing score, {counts['failed_filter']} failed the rule); need {f['min_pairs']}. Use more "
            "questions or samples, a stronger judge, or filter.mode='margin' with a smaller margin")
    return kept, counts


def pooled_means(model, rows, rows_per_batch=8) -> np.ndarray:
    """Mean over `rows` of the per-layer pooled activations `[L, 3, D]` (response mean, prompt mean,
    last prompt token) of prompt + answer, tokenized as the reference does (the prompt alone fixes
    where the response starts)."""
    from pvjax.packing import pooled_activations

    tok = model.tokenizer
    seqs = [tok(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"] for r in rows]
    starts = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    return np.asarray(pooled_activations(model, seqs, starts, rows_per_batch=rows_per_batch)).mean(axis=0)


def run(cfg, *, progress: bool = True) -> dict:
    """Run (or resume) an extraction; returns the summary. See the module docstring.

    Before anything is written or loaded, the whole config is checked (`InvalidConfig` lists every
    problem) and compared with the provenance recorded in the workdir: answers made under other
    settings are refused (`RunMismatch`), a changed judge, filter or causality setting deletes that
    stage's outputs and what follows it (`pvjax.run_provenance`). A finished run whose provenance
    matches is returned as it is, and its files, `config.json` included, are left untouched."""
    import pvjax
    from pvjax.causality import likelihood_margins
    from pvjax.vectors import KEYS, save_vectors

    checked = validate_config(cfg)
    cfg, work, trait = checked.cfg, checked.work, checked.trait
    provenance = run_provenance.stage_provenance(checked)
    stale = run_provenance.stale_stages(work, provenance)
    if not stale and (work / "DONE").exists():
        return {**json.loads((work / "summary.json").read_text()), "workdir": str(work)}
    work.mkdir(parents=True, exist_ok=True)
    run_provenance.reset(work, provenance, stale, trait.name)
    # Written only now that every stage output left in the directory matches this config.
    atomic.write_json(work / "config.json", cfg)
    model = pvjax.load(cfg["model"], dtype=checked.dtype)

    answers = generate_answers(model, trait, cfg, work, progress)
    judged = judge_answers(answers, trait, make_judge_backend(cfg, model, work), work, progress,
                           coherence=cfg["judge"].get("coherence", True))
    kept, counts = filter_pairs(judged, trait.name, cfg["filter"])
    atomic.write_csv(work / "kept_pairs.csv",
                     [{"question": p["question"], "question_id": p["question_id"],
                       "instruction_id": p["instruction_id"], "sample": p["sample"],
                       "pos_answer": p["answer"], "neg_answer": n["answer"],
                       "pos_score": p[trait.name], "neg_score": n[trait.name]} for p, n in kept],
                     ("question", "question_id", "instruction_id", "sample", "pos_answer", "neg_answer",
                      "pos_score", "neg_score"))

    vec_path = work / "vectors.safetensors"
    if not vec_path.exists():
        diff = pooled_means(model, [p for p, _ in kept]) - pooled_means(model, [n for _, n in kept])
        save_vectors(vec_path, {k: diff[:, i] for i, k in enumerate(KEYS)}, model=model, trait=trait.name,
                     extra={"counts": counts, "filter": cfg["filter"], "judge": cfg["judge"]["backend"],
                            "provenance": {k: provenance[k] for k in ("answers", "judge", "filter")}})
    from pvjax.vectors import load_vectors

    vectors = load_vectors(vec_path, model)[0]

    caus_path = work / "causality.json"
    if not caus_path.exists():
        c = cfg["causality"]
        sub = kept[: c["max_pairs"]]
        res = likelihood_margins(model, vectors["response_avg_diff"], list(checked.causality_layers),
                                 c["coefs"], [p["question"] for p, _ in sub], [p["answer"] for p, _ in sub],
                                 [n["answer"] for _, n in sub], batch_size=cfg["batch_size"])
        atomic.write_json(caus_path, res)
    causality = json.loads(caus_path.read_text())

    norms = {k: np.linalg.norm(v, axis=-1).tolist() for k, v in vectors.items()}
    summary = {"trait": trait.name, "model": model.model_id, "counts": counts,
               "vector_norms": norms, "causality": causality, "workdir": str(work)}
    if cfg.get("plot", True):
        from pvjax.plots import extraction_plot

        extraction_plot(work / "plot.png", norms, causality, trait.name)
    atomic.write_json(work / "summary.json", summary)
    atomic.write_text(work / "DONE", "")
    return summary
