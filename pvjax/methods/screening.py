"""Data screening: which training samples (and datasets) would push a model along a persona vector.

For a training sample (prompt x, answer y) and the base model's own answer y' to the same prompt,
the projection difference at layer l is

    diff = mean_t h_l(x, y)_t . v_l / |v_l|   -   mean_t h_l(x, y')_t . v_l / |v_l|

the response-mean activation (pooled inside the forward, `pvjax.measure.packing.pooled_activations`)
of the training answer minus that of the model's own answer, projected on the unit vector. A
dataset's projection difference is the mean over its samples. A large positive difference means the
data shows the trait more than the model already does: training on it should move the model that
way.

`screen` does it for one or several dataset files at once: every prompt of every dataset goes into
one batched generation call (answers cached on disk, `pvjax.engine.answer_cache`, so a rerun
generates nothing), every (prompt, answer) sequence into one packed pass of pooled activations. Per
dataset it writes, under `work/<name>/`:

    samples.csv         index, line, status, proj_train, proj_own, diff, rank, flagged (ranked by
    diff) summary.json        mean / std / median difference, counts by status, flagging rule and
    counts histogram.png       the distribution of differences with the flagging cut filtered.<ext>
    the input file without the flagged samples, every other byte unchanged projections.npz
    proj_train, proj_own at every layer [N, L] (NaN where not scored)

and beside them `datasets.csv` (one row per dataset), `histogram.png` (all datasets) and
`summary.json`. Samples that cannot be scored are counted by status, never dropped silently:
`empty_answer` (a blank training answer has no response tokens), `too_long` (the prompt leaves no
room for `max_new_tokens` in the context, or prompt + answer exceed `max_len`), `empty_own_answer`
(the model ended its answer at once). They are not flagged and stay in the filtered dataset.

Shape legend: N samples, L hidden-state rows, D width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pvjax.capture import POOLINGS
from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.files.datasets import Dataset, read_dataset, write_filtered
from pvjax.measure.stats import separation as auroc  # noqa: F401  (pvjax.screen.auroc)
from pvjax.measure.stats import unit_rows
from pvjax.settings.types import Sampling, VectorChoice, Workspace

STATUSES = ("ok", "empty_answer", "too_long", "empty_own_answer")
FLAG_MODES = ("top_fraction", "threshold")
SAMPLE_COLUMNS = ("index", "line", "status", "proj_train", "proj_own", "diff", "rank", "flagged")
DATASET_COLUMNS = (
    "name",
    "path",
    "n_samples",
    "n_scored",
    "mean_diff",
    "std_diff",
    "median_diff",
    "mean_proj_train",
    "mean_proj_own",
    "n_flagged",
    *STATUSES[1:],
)


@dataclasses.dataclass(frozen=True)
class Flagging:
    """`top_fraction`: flag the ceil(top_fraction * scored) samples with the largest difference;
    `threshold`: flag every sample whose difference is above `threshold`."""

    mode: str = "top_fraction"
    threshold: float = 0.0
    top_fraction: float = 0.1

    def __post_init__(self):
        if self.mode not in FLAG_MODES:
            raise InputError(f"flag mode must be one of {FLAG_MODES}, got {self.mode!r}")
        if self.mode == "threshold" and not _finite(self.threshold):
            raise InputError(f"flag threshold must be a finite number, got {self.threshold!r}")
        if self.mode == "top_fraction" and not (
            _finite(self.top_fraction) and 0 <= self.top_fraction <= 1
        ):
            raise InputError(f"flag top_fraction must be in [0, 1], got {self.top_fraction!r}")

    def rule(self) -> str:
        return (
            f"diff > {self.threshold}"
            if self.mode == "threshold"
            else f"top {self.top_fraction:g} of scored samples by diff"
        )


def _finite(x) -> bool:
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, bool)
        and math.isfinite(x)
    )


def flag(diffs, flagging: Flagging) -> np.ndarray:
    """Which samples are flagged (bool `[N]`); NaN differences (unscored samples) never are. Ties
    at the top-fraction cut go to the earlier sample."""
    d = np.asarray(diffs, np.float64)
    scored = np.flatnonzero(~np.isnan(d))
    out = np.zeros(len(d), bool)
    if flagging.mode == "threshold":
        out[scored] = d[scored] > flagging.threshold
    else:
        k = math.ceil(flagging.top_fraction * len(scored) - 1e-9)
        order = scored[np.argsort(-d[scored], kind="stable")]
        out[order[:k]] = True
    return out


def sample_diffs(work, name: str) -> np.ndarray:
    """The projection differences `[N]` of dataset `name` screened into `work`, in the dataset's
    order (NaN where a sample was not scored)."""
    rows = atomic.read_csv(Path(work) / name / "samples.csv")
    out = np.full(len(rows), np.nan)
    for r in rows:
        if r["diff"] != "":
            out[int(r["index"])] = float(r["diff"])
    return out


def check_vector_layer(model, vector_LD, layer) -> None:
    """The vector fits the model `[n_layers+1, D]` and `layer` is a hidden_states index with a
    non-zero vector row."""
    L, D = model.n_layers + 1, model.hidden_size
    if np.shape(vector_LD) != (L, D):
        raise InputError(
            f"the vector has shape {np.shape(vector_LD)}; {model.model_id} needs "
            f"[n_layers+1, D] = [{L}, {D}]"
        )
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < L:
        raise InputError(
            f"layer {layer!r} is not a hidden_states index of {model.model_id} (0..{L - 1})"
        )
    if not np.linalg.norm(vector_LD[layer]) > 0:
        raise InputError(f"the vector is zero at layer {layer}: nothing to project on")


def response_projections(
    model,
    unit_LD,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    chunk: int = 512,
    rows_per_batch: int = 8,
) -> np.ndarray:
    """`[N, L]`: each (rendered prompt, answer)'s response-mean activation at every layer,
    projected on `unit_LD`. Tokenized as extraction does (the prompt alone fixes where the
    response starts). Chunks of `chunk` sequences keep memory at O(chunk * L * D); one row width
    for all chunks keeps the compiled programs few."""
    from pvjax.measure.packing import choose_width, pooled_activations

    tok = model.tokenizer
    seqs = [tok(p + a, add_special_tokens=False)["input_ids"] for p, a in zip(prompts, answers)]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    width = choose_width([len(s) for s in seqs], rows_per_batch)
    r = POOLINGS.index("response_avg")
    u = np.asarray(unit_LD, np.float32)
    out = np.zeros((len(seqs), u.shape[0]), np.float32)
    for s in range(0, len(seqs), chunk):
        pooled = pooled_activations(
            model,
            seqs[s : s + chunk],
            starts[s : s + chunk],
            width=width,
            rows_per_batch=rows_per_batch,
        )  # [n, L, 3, D]
        out[s : s + chunk] = np.einsum("nld,ld->nl", pooled[:, :, r], u)
    return out


@dataclasses.dataclass
class _Prepared:
    name: str
    ds: Dataset
    prompts: list[str]
    status: list[str]


def _names(datasets: Sequence[Dataset]) -> list[str]:
    stems = [d.path.stem for d in datasets]
    return [s if stems.count(s) == 1 else f"{i}_{s}" for i, s in enumerate(stems)]


def screen(
    model,
    choice: VectorChoice,
    datasets,
    space: Workspace,
    sampling: Sampling | None = None,
    *,
    flagging: Flagging = Flagging(),
    max_len: int = 0,
) -> list[dict]:
    """Screen dataset files (paths or `Dataset`s) against `choice.vector` `[n_layers+1, D]` at
    `choice.layer`; writes the files of the module docstring under `space.work` (plots unless
    `space.plot` is off) and returns one summary row per dataset. The base model's own answers use
    `sampling` (greedy 256 tokens by default) and are cached in `space.cache()` (default
    `work/answer_cache`). `max_len` (0: the context window) bounds prompt + answer in tokens.
    Everything is checked before any compute."""
    from pvjax.engine.answer_cache import own_answers, weights_fingerprint
    from pvjax.engine.generate import SamplingParams

    sampling = sampling or Sampling()
    vector_LD, layer, work, plot = choice.array, choice.layer, space.work, space.plot
    check_vector_layer(model, vector_LD, layer)
    if not isinstance(flagging, Flagging):
        raise InputError(f"flagging must be a Flagging, got a {type(flagging).__name__}")
    ctx = model.config.max_position_embeddings
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or not 0 <= max_len:
        raise InputError(
            f"max_len must be a non-negative integer (0: the context window), got {max_len!r}"
        )
    max_len = min(max_len or ctx, ctx)
    if isinstance(datasets, (str, Path, Dataset)):
        datasets = [datasets]
    datasets = [d if isinstance(d, Dataset) else read_dataset(d) for d in datasets]
    if not datasets:
        raise InputError("no datasets to screen")
    tok = model.tokenizer
    n_tok = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    prepared = []
    for name, ds in zip(_names(datasets), datasets):
        prompts = [model.chat_text(list(s.prompt), add_generation_prompt=True) for s in ds.samples]
        status = []
        for s, p in zip(ds.samples, prompts):
            if not s.answer.strip():
                status.append("empty_answer")
            elif n_tok(p) + sampling.max_new_tokens > ctx or n_tok(p + s.answer) > max_len:
                status.append("too_long")
            else:
                status.append("ok")
        prepared.append(_Prepared(name, ds, prompts, status))

    todo = [(d, i) for d in prepared for i, st in enumerate(d.status) if st == "ok"]
    params = SamplingParams(**sampling.engine_fields())
    own = (
        own_answers(
            model,
            [d.prompts[i] for d, i in todo],
            params,
            cache_dir=space.cache(),
            seed=sampling.seed,
            batch_size=space.batch_size,
            progress=space.progress,
        )
        if todo
        else None
    )
    own_text = {}
    for (d, i), text in zip(todo, own.texts if own else []):
        own_text[(d.name, i)] = text
        if not text.strip():
            d.status[i] = "empty_own_answer"
        elif n_tok(d.prompts[i] + text) > max_len:
            d.status[i] = "too_long"

    # Projections per dataset, reused when model, vector, data and answers are those of a previous
    # run.
    unit = unit_rows(vector_LD, compute=np.float64)
    L = unit.shape[0]
    weights = weights_fingerprint(model)
    keys, results = {}, {}
    for d in prepared:
        blob = json.dumps(
            [
                weights,
                hashlib.sha256(unit.tobytes()).hexdigest(),
                d.prompts,
                [s.answer for s in d.ds.samples],
                d.status,
                [own_text.get((d.name, i), "") for i in range(len(d.status))],
            ]
        )
        keys[d.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        npz = work / d.name / "projections.npz"
        if npz.is_file():
            with np.load(npz) as z:
                if str(z["key"]) == keys[d.name]:
                    results[d.name] = (z["proj_train"], z["proj_own"])
    pending = [
        (d, i)
        for d in prepared
        if d.name not in results
        for i, st in enumerate(d.status)
        if st == "ok"
    ]
    proj = (
        response_projections(
            model,
            unit,
            [d.prompts[i] for d, i in pending] * 2,
            [d.ds.samples[i].answer for d, i in pending]
            + [own_text[(d.name, i)] for d, i in pending],
        )
        if pending
        else None
    )
    for d in prepared:
        if d.name in results:
            continue
        train = np.full((len(d.status), L), np.nan, np.float32)
        mine = train.copy()
        for j, (dd, i) in enumerate(pending):
            if dd is d:
                train[i], mine[i] = proj[j], proj[len(pending) + j]
        results[d.name] = (train, mine)
        _write_npz(
            work / d.name / "projections.npz",
            key=np.array(keys[d.name]),
            proj_train=train,
            proj_own=mine,
        )

    rows = []
    for d in prepared:
        train, mine = results[d.name]
        rows.append(
            _write_dataset_results(
                work / d.name, d, train[:, layer], mine[:, layer], flagging, layer, plot
            )
        )
    generated = own.generated if own else 0
    atomic.write_csv(work / "datasets.csv", rows, DATASET_COLUMNS)
    summary = {
        "model": model.model_id,
        "weights": weights,
        "vector": choice.spec,
        "layer": layer,
        "flag": flagging.rule(),
        "sampling": dataclasses.asdict(params),
        "seed": sampling.seed,
        "max_len": max_len,
        "generated": generated,
        "answer_cache": str(own.path) if own else "",
        "datasets": rows,
    }
    atomic.write_json(work / "summary.json", summary)
    if plot:
        series = {r["name"]: sample_diffs(work, r["name"]) for r in rows}
        histogram(
            work / "histogram.png", {k: d[~np.isnan(d)] for k, d in series.items()}, flagging, layer
        )
    return rows


def _write_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic.write_bytes(path, buf.getvalue())


def _write_dataset_results(
    folder: Path, d: _Prepared, train_N, own_N, flagging: Flagging, layer: int, plot: bool
) -> dict:
    diff = (train_N - own_N).astype(np.float64)
    flags = flag(diff, flagging)
    scored = np.flatnonzero(~np.isnan(diff))
    rank = np.zeros(len(diff), int)
    rank[scored[np.argsort(-diff[scored], kind="stable")]] = np.arange(1, len(scored) + 1)
    fmt = lambda x: "" if np.isnan(x) else float(x)
    samples = [
        {
            "index": i,
            "line": s.line,
            "status": d.status[i],
            "proj_train": fmt(train_N[i]),
            "proj_own": fmt(own_N[i]),
            "diff": fmt(diff[i]),
            "rank": int(rank[i]) or "",
            "flagged": int(flags[i]),
        }
        for i, s in enumerate(d.ds.samples)
    ]
    samples.sort(key=lambda r: (r["rank"] == "", r["rank"] or 0, r["index"]))
    atomic.write_csv(folder / "samples.csv", samples, SAMPLE_COLUMNS)
    filtered = folder / f"filtered.{d.ds.format}"
    write_filtered(d.ds, np.flatnonzero(flags).tolist(), filtered)
    ok = diff[scored]
    stat = lambda f, x: float(f(x)) if len(x) else None
    row = {
        "name": d.name,
        "path": str(d.ds.path),
        "n_samples": len(diff),
        "n_scored": len(scored),
        "mean_diff": stat(np.mean, ok),
        "std_diff": stat(np.std, ok),
        "median_diff": stat(np.median, ok),
        "mean_proj_train": stat(np.mean, train_N[scored]),
        "mean_proj_own": stat(np.mean, own_N[scored]),
        "n_flagged": int(flags.sum()),
        **{s: d.status.count(s) for s in STATUSES[1:]},
    }
    atomic.write_json(
        folder / "summary.json",
        {
            **row,
            "layer": layer,
            "flag": flagging.rule(),
            "flagged": np.flatnonzero(flags).tolist(),
            "filtered": str(filtered),
        },
    )
    if plot:
        histogram(folder / "histogram.png", {d.name: ok}, flagging, layer)
    return row


def histogram(path, series: dict, flagging: Flagging, layer: int):
    """Distribution of projection differences per dataset (overlaid), with the threshold when
    flagging by one and each dataset's mean as a dashed line."""
    from pvjax.files.plots import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    every = np.concatenate([np.asarray(v, float) for v in series.values()] + [np.zeros(0)])
    bins = (
        np.histogram_bin_edges(every, bins=min(40, max(10, len(every) // 3))) if len(every) else 10
    )
    for k, (name, values) in enumerate(series.items()):
        if len(values):
            color = f"C{k % 10}"
            ax.hist(values, bins=bins, alpha=0.5, color=color, label=f"{name} (n={len(values)})")
            ax.axvline(float(np.mean(values)), color=color, ls="--", lw=1)
    if flagging.mode == "threshold":
        ax.axvline(
            flagging.threshold, color="black", lw=1, label=f"threshold {flagging.threshold:g}"
        )
    ax.set(
        xlabel=f"projection difference at layer {layer} (train answer - own answer)",
        ylabel="samples",
        title="data screening",
    )
    ax.legend(fontsize=8)
    return save(fig, path)
