"""From a trait file to persona vectors: answer, judge, filter, pool, difference of means.

A run directory holds every stage's output, each written atomically as soon as it is finished, so
a run killed at any point resumes where it stopped:

    config.json                      the config of the run that produced the files present
    stages.json                      the ledger: per stage, every input that produced its files, and
                                     which stages are finished (pvjax.files.ledger, run_provenance)
    answers/parts/{pos,neg}_<k>.csv  answers under instruction pair k (skipped once present)
    judge_cache.sqlite               every judgement as it arrives (a rerun never pays twice);
    process k > 0
                                     of a multi-process job keeps its own,
                                     judge_cache.process<k>.sqlite
    <trait>_pos.csv, <trait>_neg.csv question, prompt, answer, question_id, <trait>, coherence, ...
    contrast_scores.csv              filter.mode=contrast: per answer, its mean per-token
    log-likelihood
                                     under the pos and the neg system prompt and their difference
    scores.csv                       filter.mode=contrast: judge and contrast scores side by side
    kept_pairs.csv                   the pairs that passed the filter
    vectors.safetensors              response_avg_diff, prompt_avg_diff, prompt_last_diff [L, D]
    causality.json, summary.json, plot.png
    DONE                             written last

System prompts follow the reference: "You are a(n) <name> assistant. <pos>" and "You are a helpful
assistant. <neg>". A score is missing when the judge's numeric tokens hold under a quarter of the
probability mass; such answers are dropped and counted, as are empty answers and questions whose
prompt does not fit the model's context with `max_new_tokens` (never sent to the model).

Filters (`filter.mode`): `threshold` and `margin` read the judge's scores; `contrast` needs no
judge: an answer's contrast score is its mean per-token log-likelihood given (pos system prompt,
question) minus given (neg system prompt, question), computed by the answering model in batched
forwards (no generation), and a pair is kept when its pos answer's score exceeds its neg answer's by
at least
`filter.contrast_margin` (nats per token); `none` keeps every non-empty pair. With a judge and the
contrast filter, both scores are recorded per answer and their Spearman rank correlation lands in
`summary.json` (`agreement`).

`mesh.data` x `mesh.model` runs generation and the forwards on a mesh of the process's devices;
`distributed.*` makes the run one process of a job that splits every stage between its processes,
with process 0 alone writing the directory (`pvjax.parallel.multihost`; README, "Running on a pod").

A rerun first checks the whole config (`pvjax.settings.extraction`), then its provenance against the
directory's ledger (`pvjax.files.ledger`, stages from `pvjax.files.run_provenance`): answers made
under other settings are refused, never relabelled; a changed judge, filter or causality setting
reruns that stage and what follows. An OpenAI-compatible judge is probed before any answer is
generated, so an unreachable one is a one-line error, not a traceback after the answers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pvjax.files import atomic, run_provenance
from pvjax.files.ledger import Ledger
from pvjax.methods.pair_filter import (
    ExtractionError,
    agreement,
    contrast_scores,
    filter_pairs,
    n_tokens,
    pair_key,
)
from pvjax.parallel.multihost import SINGLE, Job
from pvjax.settings.extraction import Answering, ExtractionSettings, settings_for_run
from pvjax.settings.types import Judging

log = logging.getLogger(__name__)
COLUMNS = ("question", "prompt", "answer", "question_id", "instruction_id", "sample")


def system_prompt(name: str, instruction: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"You are {article} {name} assistant. {instruction}"


def make_judge_backend(judging: Judging, model, work: Path, job: Job = SINGLE):
    """The judge `judging` names behind a cache of every judgement (`work/judge_cache.sqlite`), or
    None for backend 'none'. `model` is the answering model, which a local judge named '' or 'same'
    reuses. In a multi-process job each process judges its own share and keeps its own cache
    (`judge_cache.process<k>.sqlite` beside process 0's); a local judge runs on the process's
    mesh."""
    from pvjax.llm.cache import CachedBackend, ChatCache

    j = judging
    if j.backend == "local":
        import pvjax
        from pvjax.llm.local import LocalChat

        judge_model = model if j.model in (None, "", "same") else pvjax.load(j.model)
        inner = LocalChat(
            judge_model, batch_size=j.batch_size, numeric_only=j.numeric_only, mesh=job.mesh
        )
    elif j.backend == "openai":
        from pvjax.llm.openai_http import OpenAIChat

        inner = OpenAIChat(j.model, j.base_url or None, concurrency=j.concurrency)
    elif j.backend == "none":
        return None
    else:
        raise ExtractionError(
            f"judge.backend must be 'local', 'openai' or 'none', got {j.backend!r}"
        )
    name = "judge_cache.sqlite" if job.writer else f"judge_cache.process{job.index}.sqlite"
    return CachedBackend(inner, ChatCache(work / name))


def generate_answers(
    model, trait, answering: Answering, work: Path, progress: bool, job: Job = SINGLE
) -> dict[str, list[dict]]:
    """Every answer part (one per polarity and instruction pair), from the run directory where
    finished, else generated and written as each finishes. In a multi-process job the parts left
    are dealt out one per process per wave, each wave's parts written by process 0 (and sent to
    all), so a part is never generated twice and a killed job loses at most one wave."""
    pairs = list(trait.instruction[: answering.n_pairs or None])
    parts = [
        (pol_i, pol, k, pair)
        for pol_i, pol in enumerate(("pos", "neg"))
        for k, pair in enumerate(pairs)
    ]
    path = lambda pol, k: work / "answers" / "parts" / f"{pol}_{k}.csv"
    texts = job.from_writer(
        lambda: {
            f"{pol}_{k}": path(pol, k).read_text()
            for _, pol, k, _ in parts
            if path(pol, k).exists()
        }
    )
    todo = [p for p in parts if f"{p[1]}_{p[2]}" not in texts]
    for w in range(0, len(todo), job.count):
        wave = todo[w : w + job.count]
        mine = wave[job.index] if job.index < len(wave) else None
        got = job.each(
            lambda: (
                _answer_part(model, trait, answering, *mine, progress, job.mesh).encode()
                if mine
                else b""
            ),
            raw=True,
        )
        for (_, pol, k, _), text in zip(wave, got):
            if job.writer:
                atomic.write_bytes(path(pol, k), text)
            texts[f"{pol}_{k}"] = text.decode()
    return {
        pol: [r for _, p, k, _ in parts if p == pol for r in atomic.parse_csv(texts[f"{p}_{k}"])]
        for pol in ("pos", "neg")
    }


def _answer_part(
    model, trait, a: Answering, pol_i: int, pol: str, k: int, pair, progress: bool, mesh
) -> str:
    """The CSV text of answer part `pol`_`k`: every question `n_per_question` times under that
    instruction's system prompt."""
    from pvjax.engine.generate import SamplingParams, generate, render_prompts

    questions = list(trait.questions[: a.n_questions or None])
    n = a.n_per_question
    name = (a.pos_name or trait.name) if pol == "pos" else (a.neg_name or "helpful")
    system = system_prompt(name, pair.pos if pol == "pos" else pair.neg)
    prompts = [q for q in questions for _ in range(n)]
    texts = render_prompts(model, prompts, system=system)
    # A prompt that cannot fit the context with max_new_tokens is never sent to the model:
    # its answer stays empty, and the filter counts it as too long.
    fits = [i for i, t in enumerate(texts) if prompt_fits(model, t, a.sampling.max_new_tokens)]
    answers = [""] * len(prompts)
    log.info(
        "answering %d prompts under %s instruction %d (%d too long)",
        len(fits),
        pol,
        k,
        len(prompts) - len(fits),
    )
    if fits:
        # Sample i of a question draws from its own key (generate folds the prompt index
        # into the seed), so the n samples differ and the same seed repeats them.
        g = generate(
            model,
            [prompts[i] for i in fits],
            system=system,
            sampling=SamplingParams(**a.sampling.engine_fields()),
            seed=a.sampling.seed * 1000 + pol_i * 100 + k,
            batch_size=a.batch_size,
            progress=progress,
            mesh=mesh,
            unroll=a.unroll,
        )
        for i, text in zip(fits, g.texts):
            answers[i] = text
    rows = [
        {
            "question": q,
            "prompt": texts[i],
            "answer": answers[i],
            "question_id": f"{trait.name}_{i // n}",
            "instruction_id": k,
            "sample": i % n,
        }
        for i, q in enumerate(prompts)
    ]
    return atomic.csv_text(rows, COLUMNS)


def prompt_fits(model, prompt: str, max_new_tokens: int) -> bool:
    """Whether a rendered prompt leaves room for `max_new_tokens` in the model's context."""
    return n_tokens(model, prompt) + max_new_tokens <= model.config.max_position_embeddings


def judge_answers(
    answers, trait, backend, work: Path, progress: bool, coherence: bool = True, job: Job = SINGLE
) -> dict[str, list[dict]]:
    """Trait and (unless switched off) coherence scores for every non-empty answer; with no judge
    (`backend` None, `judge.backend='none'`) the files hold the answers with empty scores. In a
    multi-process job each process judges every `count`-th answer; process 0 writes the files."""
    from pvjax.measure.judges import COHERENCE_RUBRIC, Judge

    names = {pol: f"{trait.name}_{pol}.csv" for pol in answers}
    texts = job.from_writer(
        lambda: {pol: (work / n).read_text() for pol, n in names.items() if (work / n).exists()}
    )
    for pol, rows in answers.items():
        if pol not in texts:
            live = (
                [i for i, r in enumerate(rows) if r["answer"].strip()]
                if backend is not None
                else []
            )
            pairs = [(rows[i]["question"], rows[i]["answer"]) for i in live]

            def score():
                mine = [pairs[i] for i in job.mine(len(pairs))]
                s = Judge(backend, trait.eval_prompt).score(mine, progress=progress) if mine else []
                c = (
                    Judge(backend, COHERENCE_RUBRIC).score(mine, progress=progress)
                    if coherence and mine
                    else [None] * len(mine)
                )
                return list(zip(s, c))

            scored = dict(zip(live, job.unshare(len(pairs), job.each(score))))
            out = [
                {**r, trait.name: scored[i][0], "coherence": scored[i][1]} if i in scored else r
                for i, r in enumerate(rows)
            ]
            texts[pol] = atomic.csv_text(out, COLUMNS + (trait.name, "coherence"))
            if job.writer:
                atomic.write_text(work / names[pol], texts[pol])
    return {pol: atomic.parse_csv(texts[pol]) for pol in answers}


def pooled_difference(model, kept, job: Job = SINGLE, rows_per_batch: int = 8) -> np.ndarray:
    """Mean over the kept pairs of the per-layer pooled activations `[L, 3, D]` (response mean,
    prompt mean, last prompt token) of pos minus neg prompt + answer, tokenized as the reference
    does (the prompt alone fixes where the response starts). Sums run in float64; in a
    multi-process job each process pools every `count`-th sequence on its mesh and the sums are
    added, so the result equals one process's up to float summation order."""
    from pvjax.measure.packing import pooled_activations

    tok = model.tokenizer
    rows = [p for p, _ in kept] + [n for _, n in kept]
    shape = (2, model.n_layers + 1, 3, model.hidden_size)

    def sums() -> bytes:
        acc = np.zeros(shape, np.float64)
        mine = job.mine(len(rows))
        if mine:
            seqs = [
                tok(rows[i]["prompt"] + rows[i]["answer"], add_special_tokens=False)["input_ids"]
                for i in mine
            ]
            starts = [
                len(tok(rows[i]["prompt"], add_special_tokens=False)["input_ids"]) for i in mine
            ]
            pooled = pooled_activations(
                model, seqs, starts, rows_per_batch=rows_per_batch, mesh=job.mesh
            )
            for j, i in enumerate(mine):
                acc[int(i >= len(kept))] += pooled[j]
        return acc.tobytes()

    total = sum(np.frombuffer(b, np.float64).reshape(shape) for b in job.each(sums, raw=True))
    return ((total[0] - total[1]) / len(kept)).astype(np.float32)


def run(settings, *, progress: bool = True) -> dict:
    """Run (or resume) an extraction; returns the summary. See the module docstring.

    `settings` are `ExtractionSettings` (`pvjax.settings.extraction`), or a config (a dict or
    `ConfigDict`), which is turned into them first (`settings_for_run`): before anything is written
    or loaded, the whole config is checked (`InvalidConfig` lists every problem). They are then
    compared with the provenance recorded in the workdir: answers made under other settings are
    refused (`RunMismatch`), a changed judge, filter or causality setting deletes that stage's
    outputs and what follows it (`pvjax.files.ledger`). A finished run whose provenance matches is
    returned as it is, and its files, `config.json` included, are left untouched. An unreachable
    OpenAI-compatible judge is refused (`Unreachable`) before the model loads.

    `mesh.data` x `mesh.model` > 1 runs every stage (generation, pooling, contrast and causality
    scores, a local judge) on a mesh of this process's devices. With `distributed.coordinator` set,
    this is one process of a job that runs the same config everywhere (`pvjax.parallel.multihost`):
    each process does its share of every stage, process 0 alone reads and writes the workdir, every
    process returns the same summary."""
    import pvjax
    from pvjax.files.vectors import KEYS, save_vectors
    from pvjax.measure.causality import likelihood_margins
    from pvjax.parallel import multihost

    s = settings if isinstance(settings, ExtractionSettings) else settings_for_run(settings)
    # The job was joined before checking started JAX (settings_for_run); joining again returns it.
    # From here on an error on one process is raised on all (none waits for a process that gave up).
    dist = s.distributed.as_dict()
    joined = multihost.join(dist) if s.distributed.coordinator else SINGLE
    box = []
    joined.each(lambda: box.append(multihost.join(dist, s.mesh.data, s.mesh.model)))
    job = box[0]
    job.check_same("config", {**s.cfg, "distributed": {**s.cfg["distributed"], "process_id": None}})
    progress = progress and job.writer
    work, trait, a = s.work, s.trait, s.answering
    from pvjax.llm.openai_http import base_url_of

    provenance = run_provenance.stage_provenance(s, base_url_of(s.judging.base_url))
    ledgers = []

    def start():  # on process 0, the only one that looks at the workdir
        ledger = Ledger(work, run_provenance.stages(s, provenance))
        ledger.stale()  # refusals first, before anything is probed or touched
        if ledger.done:
            return json.loads((work / "summary.json").read_text())
        judged = all((work / f"{trait.name}_{pol}.csv").exists() for pol in ("pos", "neg"))
        if s.judging.backend == "openai" and not (judged and ledger.current("judge")):
            from pvjax.llm.openai_http import probe

            probe(s.judging.base_url, "judge.base_url")
        work.mkdir(parents=True, exist_ok=True)
        ledger.open()
        ledgers.append(ledger)
        # Written only now that every stage output left in the directory matches this config.
        atomic.write_json(work / "config.json", s.cfg)
        return None

    finished = job.from_writer(start)
    # noqa: E731
    finish = lambda *stages: [ledgers[0].finish(s) for s in stages] if job.writer else None
    if finished is not None:
        return {**finished, "workdir": str(work)}
    model = pvjax.load(s.model, dtype=s.dtype, enable_thinking=s.enable_thinking)

    answers = generate_answers(model, trait, a, work, progress, job)
    finish("answers")
    f = s.filter
    contrast = (
        contrast_scores(model, answers, work, batch_size=a.batch_size, job=job)
        if f.mode == "contrast"
        else None
    )
    finish("contrast")
    judged = judge_answers(
        answers,
        trait,
        make_judge_backend(s.judging, model, work, job),
        work,
        progress,
        coherence=s.judging.coherence and s.judging.backend != "none",
        job=job,
    )
    finish("judge")
    too_long = frozenset(
        pair_key(r)
        for rows in answers.values()
        for r in rows
        if not prompt_fits(model, r["prompt"], a.sampling.max_new_tokens)
    )
    kept, counts = filter_pairs(judged, trait.name, f, contrast, too_long)
    c_of = lambda pol, r: "" if contrast is None else contrast.get((pol, *pair_key(r)), "")
    if job.writer:
        atomic.write_csv(
            work / "kept_pairs.csv",
            [
                {
                    "question": p["question"],
                    "question_id": p["question_id"],
                    "instruction_id": p["instruction_id"],
                    "sample": p["sample"],
                    "pos_answer": p["answer"],
                    "neg_answer": n["answer"],
                    "pos_score": p[trait.name],
                    "neg_score": n[trait.name],
                    "pos_contrast": c_of("pos", p),
                    "neg_contrast": c_of("neg", n),
                }
                for p, n in kept
            ],
            (
                "question",
                "question_id",
                "instruction_id",
                "sample",
                "pos_answer",
                "neg_answer",
                "pos_score",
                "neg_score",
                "pos_contrast",
                "neg_contrast",
            ),
        )
    agree = None
    if contrast is not None:
        if job.writer:
            atomic.write_csv(
                work / "scores.csv",
                [
                    {
                        "polarity": pol,
                        "instruction_id": r["instruction_id"],
                        "question_id": r["question_id"],
                        "sample": r["sample"],
                        trait.name: r[trait.name],
                        "coherence": r["coherence"],
                        "contrast": c_of(pol, r),
                    }
                    for pol, rows in judged.items()
                    for r in rows
                ],
                (
                    "polarity",
                    "instruction_id",
                    "question_id",
                    "sample",
                    trait.name,
                    "coherence",
                    "contrast",
                ),
            )
        if s.judging.backend != "none":
            agree = agreement(judged, trait.name, contrast)

    from pvjax.files.vectors import vectors_from_bytes

    vec_path = work / "vectors.safetensors"
    read_vec = lambda: vec_path.read_bytes() if vec_path.exists() else b""
    blob = job.from_writer(read_vec, raw=True)
    if not blob:
        diff = pooled_difference(model, kept, job)
        if job.writer:
            save_vectors(
                vec_path,
                {k: diff[:, i] for i, k in enumerate(KEYS)},
                model=model,
                trait=trait.name,
                extra={
                    "counts": counts,
                    "filter": s.cfg["filter"],
                    "judge": s.judging.backend,
                    "provenance": {
                        k: provenance[k] for k in ("answers", "contrast", "judge", "filter")
                    },
                },
            )
        blob = job.from_writer(read_vec, raw=True)
    finish("filter")
    # Every process steers with the file process 0 wrote, so the causality scores match one
    # process's.
    vectors = vectors_from_bytes(blob, model, name=vec_path)[0]

    caus_path = work / "causality.json"
    text = job.from_writer(lambda: caus_path.read_text() if caus_path.exists() else None)
    if text is None:
        c = s.causality
        sub = kept[: c.max_pairs]
        layers = list(c.layers)

        # one layer per process and wave: each layer's coefficients share one program
        def margins():
            mine = [layers[i] for i in job.mine(len(layers))]
            if not mine:
                return {}
            res = likelihood_margins(
                model,
                vectors["response_avg_diff"],
                mine,
                c.coefs,
                [p["question"] for p, _ in sub],
                [p["answer"] for p, _ in sub],
                [n["answer"] for _, n in sub],
                batch_size=a.batch_size,
                mesh=job.mesh,
            )
            return {str(l): r for l, r in res["layers"].items()}

        per_layer = {k: v for got in job.each(margins) for k, v in got.items()}
        res = {
            "coefs": [float(x) for x in c.coefs],
            "layers": {l: per_layer[str(l)] for l in layers},
        }
        text = json.dumps(res, indent=2, default=str) + "\n"  # what atomic.write_json writes
        if job.writer:
            atomic.write_text(caus_path, text)
    causality = json.loads(text)

    norms = {k: np.linalg.norm(v, axis=-1).tolist() for k, v in vectors.items()}
    summary = {
        "trait": trait.name,
        "model": model.model_id,
        "counts": counts,
        "filter": f.mode,
        "vector_norms": norms,
        "causality": causality,
        "workdir": str(work),
        "chat": model.chat_conventions(),
        # What ran it (provenance, not part of the result: a resume may change it).
        "job": {k: v for k, v in job.describe().items() if k != "process"},
    }
    if agree is not None:
        summary["agreement"] = agree
    if job.writer:
        if s.plot:
            from pvjax.files.plots import extraction_plot

            extraction_plot(work / "plot.png", norms, causality, trait.name)
        atomic.write_json(work / "summary.json", summary)
        finish("causality")
        ledgers[0].complete()
    return summary
