"""Monitoring study: does the last prompt token's projection onto the persona vector predict how
strongly the answer will express the trait? The paper's two prompt-induced shifts:

(a) `system_prompts`: eight system prompts from trait-encouraging to trait-discouraging
    (`monitor_prompts.system_ladder`), each with every eval-split question;
(b) `many_shot`: 0..N trait-expressing exchanges before each question (`cfg.shots`); the examples
    are extract-split questions answered under the extraction's pos system prompt (experiment
    `shots` in the answers).

A point is one (condition, question): its projection per layer
(`pvjax.methods.monitoring.last_prompt_projections`) and the mean trait score of its `n_samples`
answers. The score is the judge's (0-100, the trait's eval rubric) when `judge.backend` is not
`none`, else the judge-free contrast score (nats per token: mean log-likelihood of the answer given
the extraction's pos system prompt and the bare question, minus given the neg one, averaged over the
first `score.contrast_pairs` instruction pairs); the output says which (`score` column,
`summary.json`). Per experiment and for both together, Pearson r per layer with a seeded percentile
bootstrap interval. A conversation of `trace_turns` exchanges and a question is answered with
per-token probes: its projection trace. The monitor is calibrated on all points (layer of largest r
unless `monitor.layer` is set; label: score >= the stated threshold; threshold rule `monitor.rule`)
and saved beside the vector (`pvjax.methods.monitoring.monitor_path`).

Generation runs in two rounds, each in as few engine calls as possible (a call may compile a
program): the examples and experiment (a), then experiment (b) and the trace's answer.

Files in `work` (each written atomically; `stages.json`, the ledger's record (`pvjax.files.ledger`),
holds the inputs of every expensive stage, a changed input reruns that stage and what depends on
it; a killed run resumes per block of `answer_block` answers). The whole config is checked first
(`validate`: `monitor.layer` against the model's depth from its metadata), before anything is
written:

    config.json, stages.json
    answers/round{1,2}_<k>.csv    experiment, condition, strength, question_id, question, sample,
    answer scores.csv                    + score (and logprob_pos, logprob_neg for the contrast
    score) projections.npy               [prompts, L] float32, every (experiment, condition,
    question) trace.csv, trace.json         per token: position, token, message, role, generated,
    layer_<l> points.csv                    experiment, condition, strength, question, n_scored,
    score, layer_<l> correlations.csv              experiment, layer, r, r_low, r_high, n, score,
    note scatter.png, r_by_layer.png, trace.png, monitor.json, summary.json, DONE
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.files.ledger import Ledger, Stage
from pvjax.settings.fields import as_dict
from pvjax.settings.types import VectorChoice, Workspace
from pvjax.studies import monitor_prompts as mp

log = logging.getLogger(__name__)
EXPERIMENTS = ("system_prompts", "many_shot")
ANSWER_COLUMNS = (
    "experiment",
    "condition",
    "strength",
    "question_id",
    "question",
    "sample",
    "answer",
)


class MonitorStudyError(InputError):
    """A monitoring config that cannot run; found before any model is loaded."""


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _enter(ledger: Ledger, name: str, key: str, files, patterns=None) -> bool:
    """Whether stage `name` is finished under `key` with its files present; a changed key deletes
    its files first. A key names the keys of the stages it reads: the ledger needs no cascade."""
    patterns = patterns or [str(Path(f).relative_to(ledger.work)) for f in files]
    return ledger.enter(Stage(name, {"key": key}, outputs=patterns)) and all(
        Path(f).exists() for f in files
    )


def check_config(cfg):
    """Every check that needs no model: the trait's two splits, sizes, rules, the vector's source.
    Returns `(extract trait, eval trait, questions)`."""
    from pvjax.files.traits import load_trait
    from pvjax.methods.monitoring import RULES

    problems = []
    trait, ev = (
        load_trait(cfg.trait, "extract").validate(),
        load_trait(cfg.trait, "eval").validate(),
    )
    n_q = cfg.n_questions or len(ev.questions)
    if not 1 <= n_q <= len(ev.questions):
        problems.append(
            f"n_questions={cfg.n_questions}: the eval split has {len(ev.questions)} questions"
        )
    exps = [
        e
        for e in EXPERIMENTS
        if (e == "system_prompts" and cfg.system_prompts) or (e == "many_shot" and cfg.shots)
    ]
    if not exps:
        problems.append(
            "no experiment: set system_prompts=True or shots to a list of example counts"
        )
    shots = list(cfg.shots)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots) or len(
        set(shots)
    ) != len(shots):
        problems.append(f"shots must be distinct non-negative integers, got {shots}")
    elif max(shots + [cfg.trace_turns]) > len(trait.questions):
        problems.append(
            f"shots/trace_turns ask for {max(shots + [cfg.trace_turns])} examples; the extract "
            f"split has {len(trait.questions)} questions"
        )
    if cfg.trace_turns < 0:
        problems.append(f"trace_turns must be >= 0, got {cfg.trace_turns}")
    for exp, n_cond in (("system_prompts", 8), ("many_shot", len(shots))):
        if exp in exps and n_cond * n_q < 3:
            problems.append(
                f"{exp}: {n_cond} conditions x {n_q} questions = {n_cond * n_q} points; "
                "a correlation needs at least 3"
            )
    if cfg.n_samples < 1:
        problems.append(f"n_samples must be >= 1, got {cfg.n_samples}")
    if cfg.judge.backend not in ("none", "local", "openai"):
        problems.append(
            f"judge.backend must be 'none', 'local' or 'openai', got {cfg.judge.backend!r}"
        )
    if not 1 <= cfg.score.contrast_pairs <= len(trait.instruction):
        problems.append(
            f"score.contrast_pairs must be in 1..{len(trait.instruction)}, got "
            f"{cfg.score.contrast_pairs}"
        )
    if cfg.bootstrap.n < 100 or not 0 < cfg.bootstrap.level < 1:
        problems.append(
            f"bootstrap.n must be >= 100 and bootstrap.level in (0, 1), got {cfg.bootstrap.n}, "
            f"{cfg.bootstrap.level}"
        )
    if cfg.monitor.rule not in RULES:
        problems.append(f"monitor.rule must be one of {RULES}, got {cfg.monitor.rule!r}")
    if not 0 <= cfg.monitor.target_fpr < 1:
        problems.append(f"monitor.target_fpr must be in [0, 1), got {cfg.monitor.target_fpr}")
    if problems:
        raise MonitorStudyError("monitoring config: " + "; ".join(problems))
    return trait, ev, list(ev.questions[:n_q]), exps


def validate(cfg, work: Path = Path(".")):
    """The whole config, before anything is written or loaded: `check_config`, the vector, and
    `monitor.layer` against the model's depth, read from its metadata (no weights). Returns what
    `check_config` returns."""
    from pvjax.settings.fields import model_config
    from pvjax.studies.vector_source import check_vector

    checked = check_config(cfg)
    _vector_check(cfg, checked[0].name)
    if not cfg.get("vector", ""):
        check_vector(cfg, Path(work))  # the extraction that will make it, checked whole
    problems = []
    config = model_config(cfg.model, "model", problems)
    layer = cfg.monitor.layer
    if config is not None and (
        isinstance(layer, bool)
        or not isinstance(layer, int)
        or not (layer == -1 or 0 <= layer <= config.num_layers)
    ):
        problems.append(
            f"monitor.layer must be -1 (the layer of largest r) or a hidden_states index "
            f"0..{config.num_layers} of {cfg.model}, got {layer!r}"
        )
    if problems:
        raise MonitorStudyError("monitoring config: " + "; ".join(problems))
    return checked


def _vector_check(cfg, trait_name: str) -> None:
    """A named vector file must exist, hold its key, be finite and belong to this trait: before any
    model is loaded. An empty `vector` needs the `extract` config (checked by vector_source)."""
    from pvjax.files.vectors import VectorError, load_vectors, read_vector, split_spec
    from pvjax.studies.vector_source import extraction_config

    if not cfg.get("vector", ""):
        extraction_config(cfg, Path("."))
        return
    try:
        read_vector(cfg.vector)
    except VectorError as e:
        raise VectorError(f"the monitor of trait {trait_name!r} needs its vector: {e}") from None
    meta = load_vectors(split_spec(cfg.vector)[0])[1]
    if meta.get("trait") and meta["trait"] != trait_name:
        raise MonitorStudyError(
            f"vector {cfg.vector} was extracted for trait {meta['trait']!r}, not {trait_name!r}"
        )


def run(cfg, work: Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the study into `work`; returns the rows of `correlations.csv`. A finished
    run (DONE) with the same config is returned as it is, without loading the model."""
    import pvjax
    from pvjax.files.vectors import read_vector
    from pvjax.methods.monitoring import vector_sha256
    from pvjax.settings.fields import enable_thinking
    from pvjax.studies.monitor_report import report
    from pvjax.studies.vector_source import study_vector

    work = Path(work)
    trait, ev, questions, exps = validate(cfg, work)
    snapshot = json.loads(json.dumps(as_dict(cfg), default=str))
    # One stage keyed by the config and the vector's content; the expensive ones enter as their
    # inputs are known.
    ledger = Ledger(
        work,
        [
            Stage(
                "config",
                {
                    "config": snapshot,
                    "vector_sha256": vector_sha256(read_vector(cfg.vector)) if cfg.vector else None,
                },
            )
        ],
        cascade=False,
    )
    if ledger.done:
        return _read_rows(work)
    work.mkdir(parents=True, exist_ok=True)
    ledger.open()
    if (
        not (work / "config.json").is_file()
        or json.loads((work / "config.json").read_text()) != snapshot
    ):
        atomic.write_json(work / "config.json", snapshot)
    model = pvjax.load(
        cfg.model, dtype=cfg.get("dtype") or None, enable_thinking=enable_thinking(cfg)
    )
    vector, spec = study_vector(cfg, model, work, progress=progress)

    base = {
        "model": str(cfg.model),
        "fingerprint": model.config.fingerprint(),
        "dtype": str(model.dtype),
        "trait": trait.to_dict(),
        "eval": ev.to_dict(),
        "seed": cfg.seed,
        "batch": cfg.batch_size,
        "sampling": [cfg.temperature, cfg.top_p, cfg.max_new_tokens],
    }
    st = ledger
    # Two rounds of generation, each as few engine calls as possible (every call may compile a
    # program): what needs nothing, then what needs the examples the first round wrote.
    first = _shot_items(trait, cfg) + (
        _items(
            "system_prompts",
            mp.conditions("system_prompts", trait, cfg, []),
            questions,
            cfg.n_samples,
        )
        if "system_prompts" in exps
        else []
    )
    rows1, key1 = _generate_round(model, "round1", first, cfg, work, st, base, progress)
    shots = [
        {"question": r["question"], "answer": r["answer"].strip()}
        for r in rows1
        if r["experiment"] == "shots"
    ]
    conds = {e: mp.conditions(e, trait, cfg, shots) for e in exps}
    second = (
        _items("many_shot", conds["many_shot"], questions, cfg.n_samples)
        if "many_shot" in exps
        else []
    ) + (
        [
            {
                "experiment": "trace",
                "condition": f"exchanges_{cfg.trace_turns}",
                "strength": 1.0,
                "question_id": 0,
                "question": questions[0],
                "sample": 0,
                "messages": _trace_messages(shots, cfg, questions[0]),
            }
        ]
        if cfg.trace_turns
        else []
    )
    rows2, key2 = _generate_round(
        model, "round2", second, cfg, work, st, {**base, "round1": key1}, progress
    )
    answers = [r for r in rows1 + rows2 if r["experiment"] in exps]
    scores, kind = _scores(model, answers, trait, ev, cfg, work, st, _hash([key1, key2]), progress)
    vec_key = vector_sha256(vector)
    prompts = [
        (e, name, qi, make(q))
        for e in exps
        for name, _, make in conds[e]
        for qi, q in enumerate(questions)
    ]
    proj = _projections(
        model, [p[3] for p in prompts], vector, work, st, {**base, "vector": vec_key}
    )
    results = {
        e: _points(
            e, conds[e], questions, scores, proj[[i for i, p in enumerate(prompts) if p[0] == e]]
        )
        for e in exps
    }
    trace_row = next((r for r in rows2 if r["experiment"] == "trace"), None)
    trace = (
        _trace(
            model,
            trace_row,
            _trace_messages(shots, cfg, questions[0]),
            vector,
            work,
            st,
            {"round2": key2, "vector": vec_key},
        )
        if trace_row
        else None
    )
    layer = None if cfg.monitor.layer < 0 else cfg.monitor.layer
    space = Workspace(work, plot=bool(cfg.plot), progress=progress)
    rows = report(cfg, space, model, trait, results, kind, trace, VectorChoice(vector, layer, spec))
    ledger.finish("config")
    ledger.complete()
    return rows


def _read_rows(work: Path) -> list[dict]:
    def num(v):
        return None if v == "" else float(v)

    return [
        {
            **r,
            "layer": int(r["layer"]),
            "n": int(r["n"]),
            "r": num(r["r"]),
            "r_low": num(r["r_low"]),
            "r_high": num(r["r_high"]),
        }
        for r in atomic.read_csv(work / "correlations.csv")
    ]


def _sampling(cfg):
    from pvjax.engine.generate import SamplingParams

    return SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
    )


def _items(exp, conds, questions, n_samples) -> list[dict]:
    return [
        {
            "experiment": exp,
            "condition": name,
            "strength": strength,
            "question_id": qi,
            "question": q,
            "sample": k,
            "messages": make(q),
        }
        for name, strength, make in conds
        for qi, q in enumerate(questions)
        for k in range(n_samples)
    ]


def _shot_items(trait, cfg) -> list[dict]:
    """Trait-expressing examples for the many-shot prompts and the trace: the first
    max(shots, trace_turns) extract-split questions answered under the extraction's pos system
    prompt (instruction pair 0)."""
    from pvjax.methods.extraction import system_prompt

    n = max(list(cfg.shots) + [cfg.trace_turns, 0])
    system = system_prompt(cfg.pos_name or trait.name, trait.instruction[0].pos)
    return [
        {
            "experiment": "shots",
            "condition": "pos_persona",
            "strength": 1.0,
            "question_id": i,
            "question": q,
            "sample": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
        }
        for i, q in enumerate(trait.questions[:n])
    ]


def _trace_messages(shots, cfg, question) -> list[dict]:
    return mp.exchanges(shots, cfg.trace_turns) + [{"role": "user", "content": question}]


def _generate_round(model, name, items, cfg, work, st, base, progress):
    """Answer every item (`messages` and its labels), `cfg.answer_block` prompts per engine call,
    each block written as `answers/<name>_<k>.csv` when done (a killed run redoes one block at
    most). Returns the rows with their answers and the round's stage key."""
    from pvjax.engine.generate import generate

    key = _hash({**base, "items": [{k: v for k, v in it.items()} for it in items]})
    block = cfg.answer_block
    files = [work / "answers" / f"{name}_{k}.csv" for k in range(-(-len(items) // block))]
    if not _enter(st, name, key, files, [f"answers/{name}_*.csv"]):
        for k, path in enumerate(files):
            if path.exists():
                continue
            chunk = items[k * block : (k + 1) * block]
            log.info(
                "%s: answering %d prompts (block %d of %d)", name, len(chunk), k + 1, len(files)
            )
            g = generate(
                model,
                [it["messages"] for it in chunk],
                sampling=_sampling(cfg),
                seed=cfg.seed * 1000 + (name == "round2") * 100 + k,
                batch_size=cfg.batch_size,
                progress=progress,
            )
            atomic.write_csv(
                path, [{**it, "answer": t} for it, t in zip(chunk, g.texts)], ANSWER_COLUMNS
            )
        st.finish(name)
    return [r for f in files for r in atomic.read_csv(f)], key


def _scores(model, answers, trait, ev, cfg, work, st, a_key, progress):
    """Per answer a trait score (None for an empty answer or a judge without a number), and the
    kind: "judge" or "contrast"."""
    from pvjax.methods.extraction import make_judge_backend
    from pvjax.settings.types import Judging

    kind = "contrast" if cfg.judge.backend == "none" else "judge"
    path = work / "scores.csv"
    j = as_dict(cfg.judge)
    key = _hash(
        {
            "answers": a_key,
            "kind": kind,
            "judge": j if kind == "judge" else None,
            "pairs": cfg.score.contrast_pairs if kind == "contrast" else None,
            "names": [cfg.pos_name, cfg.neg_name] if kind == "contrast" else None,
        }
    )
    if not _enter(st, "scores", key, [path]):
        live = [i for i, r in enumerate(answers) if r["answer"].strip()]
        out = [dict(r, score=None) for r in answers]
        if kind == "judge" and live:
            from pvjax.measure.judges import Judge

            scores = Judge(make_judge_backend(Judging.of(j), model, work), ev.eval_prompt).score(
                [(answers[i]["question"], answers[i]["answer"]) for i in live], progress=progress
            )
            for i, s in zip(live, scores):
                out[i]["score"] = s
        elif live:
            pos, neg = _contrast(model, [answers[i] for i in live], trait, cfg)
            for i, p, n in zip(live, pos, neg):
                out[i].update(score=float(p - n), logprob_pos=float(p), logprob_neg=float(n))
        atomic.write_csv(path, out, ANSWER_COLUMNS + ("score", "logprob_pos", "logprob_neg"))
        st.finish("scores")
    return [
        dict(r, score=None if r["score"] == "" else float(r["score"]))
        for r in atomic.read_csv(path)
    ], kind


def _contrast(model, rows, trait, cfg):
    """Mean per-token log-likelihood of each answer after (pos system prompt, question) and after
    (neg system prompt, question), averaged over the first `score.contrast_pairs` instruction
    pairs."""
    from pvjax.measure.causality import answer_logprobs
    from pvjax.methods.extraction import system_prompt

    k = cfg.score.contrast_pairs
    prompts, answers, slots = [], [], []
    for pair in trait.instruction[:k]:
        for side, name, text in (
            ("pos", cfg.pos_name or trait.name, pair.pos),
            ("neg", cfg.neg_name or "helpful", pair.neg),
        ):
            for i, r in enumerate(rows):
                prompts.append(
                    model.chat_text(
                        [
                            {"role": "system", "content": system_prompt(name, text)},
                            {"role": "user", "content": r["question"]},
                        ]
                    )
                )
                answers.append(r["answer"])
                slots.append((side, i))
    acc = {"pos": np.zeros(len(rows)), "neg": np.zeros(len(rows))}
    # Similar lengths share a call, so each call pads only to its own longest sequence.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    step = 4 * cfg.batch_size
    for s in range(0, len(order), step):
        ix = order[s : s + step]
        lp = answer_logprobs(
            model, [prompts[i] for i in ix], [answers[i] for i in ix], batch_size=cfg.batch_size
        )[0]
        for i, v in zip(ix, lp):
            side, r = slots[i]
            acc[side][r] += v / k
    return acc["pos"], acc["neg"]


def _projections(model, prompts, vector, work, st, base):
    """`[prompts, L]` last-prompt-token projections, one packed forward for every prompt."""
    from pvjax.methods.monitoring import last_prompt_projections, prompt_ids

    path = work / "projections.npy"
    key = _hash({**base, "prompts": prompts})
    if not _enter(st, "projections", key, [path]):
        proj = last_prompt_projections(model, prompt_ids(model, prompts), vector)
        buf = io.BytesIO()
        np.save(buf, proj)
        atomic.write_bytes(path, buf.getvalue())
        st.finish("projections")
    return np.load(path)


def _points(exp, conds, questions, scores, proj_NL):
    """One point per (condition, question): its projections and the mean of its defined scores."""
    by = {}
    for r in scores:
        if r["experiment"] == exp and r["score"] is not None:
            by.setdefault((r["condition"], int(r["question_id"])), []).append(r["score"])
    pts, i = [], 0
    for name, strength, _ in conds:
        for qi, q in enumerate(questions):
            s = by.get((name, qi), [])
            if s:
                pts.append(
                    {
                        "experiment": exp,
                        "condition": name,
                        "strength": strength,
                        "question": q,
                        "n_scored": len(s),
                        "score": float(np.mean(s)),
                        "proj": proj_NL[i],
                    }
                )
            i += 1
    return pts


def _trace(model, row, msgs, vector, work, st, base):
    """Per-token projections over the conversation `msgs` and its generated answer (`row`), from one
    forward with probes; per token its position, text, message index, role and every layer."""
    from pvjax.measure.stats import unit_rows
    from pvjax.model import activations, left_pad

    paths = [work / "trace.csv", work / "trace.json"]
    key = _hash(base)
    if not _enter(st, "trace", key, paths):
        tok = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = model.chat_text(msgs)
        # The prompt alone fixes where the answer starts, as in extraction's pooling.
        ids, n_prompt = tok(prompt + row["answer"]), len(tok(prompt))
        T = -(-len(ids) // 64) * 64  # a few widths, a few programs
        tokens, mask = left_pad([ids], T)
        out = activations(
            model, tokens, attention_mask=mask, probes=unit_rows(vector)[:, None, :], hidden=False
        )
        proj = np.asarray(out.projections)[:, 0, T - len(ids) :, 0]  # [L, T]
        ends = [
            len(tok(model.chat_text(msgs[: j + 1], add_generation_prompt=False)))
            for j in range(len(msgs))
        ]
        rows, which = [], []
        for t, tid in enumerate(ids):
            m = next((j for j, end in enumerate(ends) if t < end), len(msgs))
            which.append(m)
            rows.append(
                {
                    "position": t,
                    "token": model.tokenizer.decode([tid]),
                    "message": m,
                    "role": msgs[m]["role"] if m < len(msgs) else "assistant",
                    "generated": int(t >= n_prompt),
                    **{f"layer_{l}": float(proj[l, t]) for l in range(len(proj))},
                }
            )
        atomic.write_csv(
            paths[0],
            rows,
            (
                "position",
                "token",
                "message",
                "role",
                "generated",
                *(f"layer_{l}" for l in range(len(proj))),
            ),
        )
        atomic.write_json(
            paths[1],
            {
                "messages": which,
                "roles": [r["role"] for r in rows],
                "tokens": [r["token"] for r in rows],
                "n_prompt": n_prompt,
                "n_turns": len(msgs) // 2,
                "answer": row["answer"],
                "projections": proj.round(5).tolist(),
            },
        )
        st.finish("trace")
    return json.loads(paths[1].read_text())
