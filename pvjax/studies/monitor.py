"""Monitoring study: does the last prompt token's projection onto the persona vector predict how
strongly the answer will express the trait? The paper's two prompt-induced shifts:

(a) `system_prompts`: eight system prompts from trait-encouraging to trait-discouraging
    (`monitor_prompts.system_ladder`), each with every eval-split question;
(b) `many_shot`: 0..N trait-expressing exchanges before each question (`cfg.shots`); the examples
    are extract-split questions answered under the extraction's pos system prompt (`shots.csv`).

A point is one (condition, question): its projection per layer (`pvjax.monitor.last_prompt_projections`)
and the mean trait score of its `n_samples` answers. The score is the judge's (0-100, the trait's
eval rubric) when `judge.backend` is not `none`, else the judge-free contrast score (nats per token:
mean log-likelihood of the answer given the extraction's pos system prompt and the bare question,
minus given the neg one, averaged over the first `score.contrast_pairs` instruction pairs); the
output says which (`score` column, `summary.json`). Per experiment and for both together, Pearson r
per layer with a seeded percentile bootstrap interval. A conversation of `trace_turns` exchanges
and a question is answered with per-token probes: its projection trace. The monitor is calibrated
on all points (layer of largest r unless `monitor.layer` is set; label: score >= the stated
threshold; threshold rule `monitor.rule`) and saved beside the vector (`pvjax.monitor.monitor_path`).

Files in `work` (each written atomically; `stages.json` records the inputs of every expensive
stage, a changed input reruns that stage and what depends on it, a killed run resumes per condition):

    config.json, stages.json, shots.csv
    <experiment>/parts/<condition>.csv   answers (condition, strength, question, sample, answer)
    <experiment>/scores.csv              + score (and logprob_pos, logprob_neg for contrast)
    <experiment>/projections.npy         [prompts, L] float32
    trace.csv, trace.json                per token: position, token, message, role, generated, layer_<l>
    points.csv                           experiment, condition, strength, question, n_scored, score, layer_<l>
    correlations.csv                     experiment, layer, r, r_low, r_high, n, score, note
    scatter.png, r_by_layer.png, trace.png, monitor.json, summary.json, DONE
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from pvjax import atomic
from pvjax.errors import InputError
from pvjax.studies import monitor_prompts as mp

log = logging.getLogger(__name__)
EXPERIMENTS = ("system_prompts", "many_shot")
COLUMNS = ("experiment", "layer", "r", "r_low", "r_high", "n", "score", "note")
ANSWER_COLUMNS = ("condition", "strength", "question_id", "question", "sample", "answer")


class MonitorStudyError(InputError):
    """A monitoring config that cannot run; found before any model is loaded."""


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Expensive stages keyed by a hash of their inputs. `begin` wipes a stage's files when its
    inputs changed (so parts left by a killed run are reused only under the same inputs); `end`
    marks it finished. Recorded in `stages.json`."""

    def __init__(self, work: Path):
        self.path = work / "stages.json"
        self.rec = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, name, key, files) -> bool:
        return self.rec.get(name) == {"key": key, "done": True} and all(Path(f).exists() for f in files)

    def begin(self, name, key, files):
        if self.rec.get(name, {}).get("key") != key:
            for f in files:
                f = Path(f)
                if f.is_dir():
                    for g in f.glob("*"):
                        g.unlink()
                elif f.exists():
                    f.unlink()
        self._write(name, {"key": key, "done": False})

    def end(self, name, key):
        self._write(name, {"key": key, "done": True})

    def _write(self, name, value):
        self.rec[name] = value
        atomic.write_json(self.path, self.rec)


def check_config(cfg):
    """Every check that needs no model: the trait's two splits, sizes, rules, the vector's source.
    Returns `(extract trait, eval trait, questions)`."""
    from pvjax.monitor import RULES
    from pvjax.traits import load_trait

    problems = []
    trait, ev = load_trait(cfg.trait, "extract").validate(), load_trait(cfg.trait, "eval").validate()
    n_q = cfg.n_questions or len(ev.questions)
    if not 1 <= n_q <= len(ev.questions):
        problems.append(f"n_questions={cfg.n_questions}: the eval split has {len(ev.questions)} questions")
    exps = [e for e in EXPERIMENTS if (e == "system_prompts" and cfg.system_prompts) or (e == "many_shot" and cfg.shots)]
    if not exps:
        problems.append("no experiment: set system_prompts=True or shots to a list of example counts")
    shots = list(cfg.shots)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots) or len(set(shots)) != len(shots):
        problems.append(f"shots must be distinct non-negative integers, got {shots}")
    elif max(shots + [cfg.trace_turns]) > len(trait.questions):
        problems.append(f"shots/trace_turns ask for {max(shots + [cfg.trace_turns])} examples; the extract "
                        f"split has {len(trait.questions)} questions")
    if cfg.trace_turns < 0:
        problems.append(f"trace_turns must be >= 0, got {cfg.trace_turns}")
    for exp, n_cond in (("system_prompts", 8), ("many_shot", len(shots))):
        if exp in exps and n_cond * n_q < 3:
            problems.append(f"{exp}: {n_cond} conditions x {n_q} questions = {n_cond * n_q} points; "
                            "a correlation needs at least 3")
    if cfg.n_samples < 1:
        problems.append(f"n_samples must be >= 1, got {cfg.n_samples}")
    if cfg.judge.backend not in ("none", "local", "openai"):
        problems.append(f"judge.backend must be 'none', 'local' or 'openai', got {cfg.judge.backend!r}")
    if not 1 <= cfg.score.contrast_pairs <= len(trait.instruction):
        problems.append(f"score.contrast_pairs must be in 1..{len(trait.instruction)}, got {cfg.score.contrast_pairs}")
    if cfg.bootstrap.n < 100 or not 0 < cfg.bootstrap.level < 1:
        problems.append(f"bootstrap.n must be >= 100 and bootstrap.level in (0, 1), got {cfg.bootstrap.n}, "
                        f"{cfg.bootstrap.level}")
    if cfg.monitor.rule not in RULES:
        problems.append(f"monitor.rule must be one of {RULES}, got {cfg.monitor.rule!r}")
    if not 0 <= cfg.monitor.target_fpr < 1:
        problems.append(f"monitor.target_fpr must be in [0, 1), got {cfg.monitor.target_fpr}")
    if problems:
        raise MonitorStudyError("monitoring config: " + "; ".join(problems))
    return trait, ev, list(ev.questions[:n_q]), exps


def _vector_check(cfg, trait_name: str) -> None:
    """A named vector file must exist, hold its key, be finite and belong to this trait: before any
    model is loaded. An empty `vector` needs the `extract` config (checked by vector_source)."""
    from pvjax.studies.vector_source import extraction_config
    from pvjax.vectors import VectorError, load_vectors, read_vector, split_spec

    if not cfg.get("vector", ""):
        extraction_config(cfg, Path("."))
        return
    try:
        read_vector(cfg.vector)
    except VectorError as e:
        raise VectorError(f"the monitor of trait {trait_name!r} needs its vector: {e}") from None
    meta = load_vectors(split_spec(cfg.vector)[0])[1]
    if meta.get("trait") and meta["trait"] != trait_name:
        raise MonitorStudyError(f"vector {cfg.vector} was extracted for trait {meta['trait']!r}, not {trait_name!r}")


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the study into `work`; returns the rows of `correlations.csv`. A finished
    run (DONE) with the same config is returned as it is, without loading the model."""
    import pvjax
    from pvjax.studies.vector_source import study_vector

    work = Path(work)
    trait, ev, questions, exps = check_config(cfg)
    _vector_check(cfg, trait.name)
    snapshot = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if (work / "DONE").exists() and json.loads((work / "config.json").read_text()) == json.loads(
            json.dumps(snapshot, default=str)):
        return _read_rows(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "DONE").unlink(missing_ok=True)
    atomic.write_json(work / "config.json", snapshot)
    model = pvjax.load(cfg.model, dtype=cfg.get("dtype") or None)
    vector, spec = study_vector(cfg, model, work, progress=progress)
    from pvjax.monitor import vector_sha256

    base = {"model": str(cfg.model), "fingerprint": model.config.fingerprint(), "dtype": str(model.dtype),
            "trait": trait.to_dict(), "eval": ev.to_dict(), "questions": questions, "seed": cfg.seed,
            "sampling": [cfg.temperature, cfg.top_p, cfg.max_new_tokens], "names": [cfg.pos_name, cfg.neg_name]}
    vec_key = vector_sha256(vector)
    st = Stages(work)
    shots, shots_key = _shots(model, trait, cfg, work, st, base, progress)
    results = {}
    for e, exp in enumerate(exps):
        conds = mp.conditions(exp, trait, cfg, shots)
        answers, a_key = _answers(model, exp, e, conds, questions, cfg, work, st, {**base, "shots": shots_key}, progress)
        scores, kind = _scores(model, exp, answers, trait, ev, cfg, work, st, a_key, progress)
        proj = _projections(model, exp, conds, questions, vector, work, st, {**base, "shots": shots_key,
                                                                          "vector": vec_key})
        results[exp] = _points(exp, conds, questions, scores, proj)
    trace = _trace(model, shots, questions[0], vector, cfg, work, st, {**base, "shots": shots_key, "vector": vec_key,
                                                                      "turns": cfg.trace_turns})
    from pvjax.studies.monitor_report import report

    rows = report(cfg, work, model, trait, results, kind, trace, vector, spec, progress)
    atomic.write_text(work / "DONE", "")
    return rows


def _read_rows(work: Path) -> list[dict]:
    def num(v):
        return None if v == "" else float(v)

    return [{**r, "layer": int(r["layer"]), "n": int(r["n"]), "r": num(r["r"]), "r_low": num(r["r_low"]),
             "r_high": num(r["r_high"])} for r in atomic.read_csv(work / "correlations.csv")]


def _sampling(cfg, max_new=None):
    from pvjax.generate import SamplingParams

    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new or cfg.max_new_tokens)


def _shots(model, trait, cfg, work, st, base, progress):
    """Trait-expressing examples: the first max(shots, trace_turns) extract-split questions answered
    under the extraction's pos system prompt (instruction pair 0), `shot_max_new_tokens` long."""
    from pvjax.extract import system_prompt
    from pvjax.generate import generate

    n = max(list(cfg.shots) + [cfg.trace_turns, 0])
    path = work / "shots.csv"
    key = _hash({**base, "n": n, "shot_tokens": cfg.shot_max_new_tokens})
    if not st.done("shots", key, [path]):
        st.begin("shots", key, [path])
        qs = list(trait.questions[:n])
        answers = generate(model, qs, system=system_prompt(cfg.pos_name or trait.name, trait.instruction[0].pos),
                           sampling=_sampling(cfg, cfg.shot_max_new_tokens), seed=cfg.seed,
                           batch_size=cfg.batch_size, progress=progress).texts if qs else []
        atomic.write_csv(path, [{"question": q, "answer": a.strip()} for q, a in zip(qs, answers)], ("question", "answer"))
        st.end("shots", key)
    return atomic.read_csv(path), key


def _answers(model, exp, e, conds, questions, cfg, work, st, base, progress):
    from pvjax.generate import generate

    parts = work / exp / "parts"
    key = _hash({**base, "exp": exp, "prompts": [c[2]("{question}") for c in conds], "n": cfg.n_samples})
    files = [parts / f"{name}.csv" for name, *_ in conds]
    if not st.done(f"answers/{exp}", key, files):
        st.begin(f"answers/{exp}", key, [parts])
        for c, ((name, strength, make), path) in enumerate(zip(conds, files)):
            if path.exists():
                continue
            prompts = [make(q) for q in questions for _ in range(cfg.n_samples)]
            log.info("%s: answering %d prompts under %s", exp, len(prompts), name)
            g = generate(model, prompts, sampling=_sampling(cfg), seed=cfg.seed * 1000 + e * 100 + c,
                         batch_size=cfg.batch_size, progress=progress)
            atomic.write_csv(path, [{"condition": name, "strength": strength, "question_id": i // cfg.n_samples,
                                     "question": questions[i // cfg.n_samples], "sample": i % cfg.n_samples,
                                     "answer": t} for i, t in enumerate(g.texts)], ANSWER_COLUMNS)
        st.end(f"answers/{exp}", key)
    return [r for f in files for r in atomic.read_csv(f)], key


def _scores(model, exp, answers, trait, ev, cfg, work, st, a_key, progress):
    """Per answer a trait score (None for an empty answer or a judge without a number), and the
    kind: "judge" or "contrast"."""
    from pvjax.extract import make_judge_backend

    kind = "contrast" if cfg.judge.backend == "none" else "judge"
    path = work / exp / "scores.csv"
    j = cfg.judge.to_dict() if hasattr(cfg.judge, "to_dict") else dict(cfg.judge)
    key = _hash({"answers": a_key, "kind": kind, "judge": j if kind == "judge" else None,
                 "pairs": cfg.score.contrast_pairs if kind == "contrast" else None})
    if not st.done(f"scores/{exp}", key, [path]):
        st.begin(f"scores/{exp}", key, [path])
        live = [i for i, r in enumerate(answers) if r["answer"].strip()]
        out = [dict(r, score=None) for r in answers]
        if kind == "judge" and live:
            from pvjax.judges import Judge

            scores = Judge(make_judge_backend(cfg, model, work), ev.eval_prompt).score(
                [(answers[i]["question"], answers[i]["answer"]) for i in live], progress=progress)
            for i, s in zip(live, scores):
                out[i]["score"] = s
        elif live:
            pos, neg = _contrast(model, [answers[i] for i in live], trait, cfg)
            for i, p, n in zip(live, pos, neg):
                out[i].update(score=float(p - n), logprob_pos=float(p), logprob_neg=float(n))
        atomic.write_csv(path, out, ANSWER_COLUMNS + ("score", "logprob_pos", "logprob_neg"))
        st.end(f"scores/{exp}", key)
    return [dict(r, score=None if r["score"] == "" else float(r["score"])) for r in atomic.read_csv(path)], kind


def _contrast(model, rows, trait, cfg):
    """Mean per-token log-likelihood of each answer after (pos system prompt, question) and after
    (neg system prompt, question), averaged over the first `score.contrast_pairs` instruction pairs."""
    from pvjax.causality import answer_logprobs
    from pvjax.extract import system_prompt

    pos = np.zeros(len(rows))
    neg = np.zeros(len(rows))
    k = cfg.score.contrast_pairs
    for pair in trait.instruction[:k]:
        for side, name, text, acc in (("pos", cfg.pos_name or trait.name, pair.pos, pos),
                                      ("neg", cfg.neg_name or "helpful", pair.neg, neg)):
            prompts = [model.chat_text([{"role": "system", "content": system_prompt(name, text)},
                                        {"role": "user", "content": r["question"]}]) for r in rows]
            order = sorted(range(len(rows)), key=lambda i: len(prompts[i]) + len(rows[i]["answer"]))
            step = 4 * cfg.batch_size  # similar lengths share a call: each pads only to its own longest
            for s in range(0, len(order), step):
                ix = order[s:s + step]
                lp = answer_logprobs(model, [prompts[i] for i in ix], [rows[i]["answer"] for i in ix],
                                     batch_size=cfg.batch_size)[0]
                acc[ix] += lp / k
    return pos, neg


def _projections(model, exp, conds, questions, vector, work, st, base):
    from pvjax.monitor import last_prompt_projections, prompt_ids

    path = work / exp / "projections.npy"
    prompts = [make(q) for _, _, make in conds for q in questions]
    key = _hash({**base, "prompts": prompts})
    if not st.done(f"projections/{exp}", key, [path]):
        st.begin(f"projections/{exp}", key, [path])
        proj = last_prompt_projections(model, prompt_ids(model, prompts), vector)
        buf = io.BytesIO()
        np.save(buf, proj)
        atomic.write_bytes(path, buf.getvalue())
        st.end(f"projections/{exp}", key)
    return np.load(path)


def _points(exp, conds, questions, scores, proj_NL):
    """One point per (condition, question): its projections and the mean of its defined scores."""
    by = {}
    for r in scores:
        if r["score"] is not None:
            by.setdefault((r["condition"], int(r["question_id"])), []).append(r["score"])
    pts, i = [], 0
    for name, strength, _ in conds:
        for qi, q in enumerate(questions):
            s = by.get((name, qi), [])
            if s:
                pts.append({"experiment": exp, "condition": name, "strength": strength, "question": q,
                            "n_scored": len(s), "score": float(np.mean(s)), "proj": proj_NL[i]})
            i += 1
    return pts


def _trace(model, shots, question, vector, cfg, work, st, base):
    """The first `trace_turns` shots as a conversation, then `question`, answered with per-token
    probes; per token its position, text, message index, role and the projection at every layer."""
    from pvjax.generate import generate_ids
    from pvjax.monitor import prompt_ids, unit_rows

    if not cfg.trace_turns:
        return None
    paths = [work / "trace.csv", work / "trace.json"]
    key = _hash(base)
    if not st.done("trace", key, paths):
        st.begin("trace", key, paths)
        msgs = mp.exchanges(shots, cfg.trace_turns) + [{"role": "user", "content": question}]
        ids = prompt_ids(model, [msgs])[0]
        g = generate_ids(model, [ids], sampling=_sampling(cfg), seed=cfg.seed,
                         probes=unit_rows(vector)[:, None, :])
        proj = np.concatenate([g.prompt_projections[0][..., 0], g.projections[0][..., 0]], axis=1)  # [L, T]
        ends = [len(model.tokenizer(model.chat_text(msgs[:j + 1], add_generation_prompt=False),
                                    add_special_tokens=False)["input_ids"]) for j in range(len(msgs))]
        toks = list(ids) + list(g.tokens[0])
        rows, which = [], []
        for t, tok in enumerate(toks):
            m = next((j for j, end in enumerate(ends) if t < end), len(msgs))
            role = msgs[m]["role"] if m < len(msgs) else "assistant"
            which.append(m)
            rows.append({"position": t, "token": model.tokenizer.decode([tok]), "message": m, "role": role,
                         "generated": int(t >= len(ids)), **{f"layer_{l}": float(proj[l, t]) for l in range(len(proj))}})
        atomic.write_csv(paths[0], rows, ("position", "token", "message", "role", "generated",
                                          *(f"layer_{l}" for l in range(len(proj)))))
        atomic.write_json(paths[1], {"messages": which, "roles": [r["role"] for r in rows],
                                     "tokens": [r["token"] for r in rows], "n_prompt": len(ids),
                                     "n_turns": cfg.trace_turns, "answer": g.texts[0],
                                     "projections": proj.round(5).tolist()})
        st.end("trace", key)
    return json.loads(paths[1].read_text())
