"""Checking an extraction config whole, before anything is written or loaded.

A bad value found halfway through a run costs the answers generated before it, and a check made
after the run directory was touched can leave it half rewritten. So `validate_config` looks at every
field (type and range), loads the trait, reads the model's config from its metadata (for the layer
count, without loading weights) and looks at the workdir, then reports every problem in one
message. It writes nothing.

`FIELDS` is the schema: every field `configs/extract.py` defines, and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pvjax.settings.fields import (
    InvalidConfig,
    Validator,
    as_dict,
    boolean,
    check_fields,
    check_layers,
    choice,
    flatten,
    integer,
    integers,
    number,
    numbers,
    spread_layers,
    string,
    trait_split,
    workdir_problem,
)
from pvjax.settings.fields import (
    model_config as read_config,
)
from pvjax.settings.types import Judging, Sampling

DTYPES = ("", "float32", "bfloat16")
JUDGE_BACKENDS = ("openai", "local", "none")
FILTER_MODES = ("threshold", "margin", "contrast", "none")


FIELDS: dict[str, Validator] = {
    "trait": string(nonempty=True),
    "workdir": string(nonempty=True),
    "model": string(nonempty=True),
    "dtype": choice(*DTYPES),
    "n_questions": integer(0),
    "n_pairs": integer(0),
    "n_per_question": integer(1),
    "max_new_tokens": integer(1),
    "temperature": number(0.0),
    "top_p": number(0.0, 1.0, lo_open=True),
    "seed": integer(0),
    "batch_size": integer(1),
    "unroll": boolean,
    "pos_name": string(),
    "neg_name": string(),
    "plot": boolean,
    "judge.backend": choice(*JUDGE_BACKENDS),
    "judge.model": string(),
    "judge.base_url": string(),
    "judge.concurrency": integer(1),
    "judge.batch_size": integer(1),
    "judge.coherence": boolean,
    "judge.numeric_only": boolean,
    "filter.mode": choice(*FILTER_MODES),
    "filter.threshold": number(0.0, 100.0),
    "filter.coherence": number(0.0, 100.0),
    "filter.margin": number(0.0, 100.0),
    "filter.min_pairs": integer(1),
    "filter.contrast_margin": number(0.0),
    "causality.layers": integers,
    "causality.coefs": numbers,
    "causality.max_pairs": integer(1),
    "mesh.data": integer(1),
    "mesh.model": integer(1),
    "distributed.coordinator": string(),
    "distributed.num_processes": integer(0),
    "distributed.process_id": integer(-1),
    "distributed.timeout": integer(1),
}


@dataclasses.dataclass(frozen=True)
class Answering:
    """Which answers extraction generates: the first `n_pairs` instruction pairs x `n_questions`
    questions (0: all) x `n_per_question` samples, under the system prompts named `pos_name` (''
    the trait's name) and `neg_name` ('' 'helpful'), `batch_size` rows per call, `unroll`ed
    layers or scanned, drawn as `sampling` says."""

    n_questions: int
    n_pairs: int
    n_per_question: int
    sampling: Sampling
    batch_size: int = 16
    pos_name: str = ""
    neg_name: str = "helpful"
    unroll: bool = True

    @classmethod
    def of(cls, cfg) -> "Answering":
        return cls(
            n_questions=cfg["n_questions"],
            n_pairs=cfg["n_pairs"],
            n_per_question=cfg["n_per_question"],
            sampling=Sampling.of(cfg),
            batch_size=cfg["batch_size"],
            pos_name=cfg.get("pos_name", ""),
            neg_name=cfg.get("neg_name", "helpful"),
            unroll=cfg.get("unroll", True),
        )


@dataclasses.dataclass(frozen=True)
class PairFilter:
    """Which answer pairs are kept (`filter.*`; the rules are
    `pvjax.methods.pair_filter.filter_pairs`'s)."""

    mode: str = "threshold"
    threshold: float = 50.0
    coherence: float = 50.0
    margin: float = 0.0
    min_pairs: int = 1
    contrast_margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class Causality:
    """The causality check: steer with the response vector at `layers` (resolved: never empty) by
    each of `coefs`, on the first `max_pairs` kept pairs."""

    layers: tuple[int, ...]
    coefs: tuple[float, ...]
    max_pairs: int


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """`data` x `model` devices of this process (1 x 1: one device, no mesh)."""

    data: int = 1
    model: int = 1


@dataclasses.dataclass(frozen=True)
class Distributed:
    """The multi-process job this run is one process of (`coordinator` '' : none); the fields of
    `pvjax.parallel.multihost.join`'s section."""

    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    timeout: int = 300

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """A config that passed every check, unpacked: what `pvjax.methods.extraction.run` takes. Beside
    the typed groups, what checking resolved: the trait, the model's config (layer count,
    fingerprint), the dtype the model will load in. `cfg` is the config as written (a plain dict):
    the record `config.json` holds and provenance reads, never a source of parameters."""

    cfg: dict
    work: Path
    trait: Any
    model_config: Any
    dtype: str
    model: str
    answering: Answering
    judging: Judging
    filter: PairFilter
    causality: Causality
    mesh: MeshShape
    distributed: Distributed
    plot: bool = True
    # What a chat template with a thinking switch (Qwen3's) is given, and the conventions the
    # model's template gets (`pvjax.loading.tokenizer.chat_conventions`), for provenance.
    enable_thinking: bool = False
    chat: dict = dataclasses.field(default_factory=dict)

    @property
    def causality_layers(self) -> tuple[int, ...]:
        return self.causality.layers


CheckedConfig = ExtractionSettings  # the name before the settings were typed


def validate_config(cfg) -> ExtractionSettings:
    """Check every field of an extraction config (an ml_collections ConfigDict or a plain dict) and
    what it names: the trait loads and validates, the model's metadata reads, causality layers lie
    in 1..n_layers, the workdir is (or can become) a directory, the filter can be met by the number
    of pairs the config produces. Returns the typed settings; raises `InvalidConfig` listing every
    problem found; writes nothing, loads no weights."""
    cfg = as_dict(cfg)
    flat = flatten(cfg)
    problems = []
    bad = check_fields(flat, FIELDS, problems)
    ok = lambda *keys: not bad.intersection(keys)

    work = Path(flat["workdir"]).expanduser() if ok("workdir") else None
    if work is not None and (msg := workdir_problem(work)):
        problems.append(msg)

    trait = trait_split(flat["trait"], "extract", problems) if ok("trait") else None
    if trait is not None:
        for key, have, what in (
            ("n_pairs", len(trait.instruction), "instruction pairs"),
            ("n_questions", len(trait.questions), "questions"),
        ):
            if ok(key) and flat[key] > have:
                problems.append(
                    f"{key}={flat[key]} but trait {trait.name!r} has only {have} {what}"
                )
        if ok("n_pairs", "n_questions", "n_per_question", "filter.min_pairs"):
            n = (
                (flat["n_pairs"] or len(trait.instruction))
                * (flat["n_questions"] or len(trait.questions))
                * flat["n_per_question"]
            )
            if flat["filter.min_pairs"] > n:
                problems.append(
                    f"filter.min_pairs={flat['filter.min_pairs']} exceeds the {n} answer pairs "
                    "this config produces (n_pairs x n_questions x n_per_question)"
                )

    if ok("filter.coherence", "judge.coherence", "judge.backend") and flat["filter.coherence"] > 0:
        if flat["judge.backend"] == "none":
            problems.append(
                f"filter.coherence={flat['filter.coherence']:g} needs coherence scores, but "
                "judge.backend is 'none' (set filter.coherence=0 or configure a judge)"
            )
        elif not flat["judge.coherence"]:
            problems.append(
                f"filter.coherence={flat['filter.coherence']:g} needs coherence scores, but "
                "judge.coherence is False (set filter.coherence=0 or judge.coherence=True)"
            )
    if (
        ok("filter.mode", "judge.backend")
        and flat["judge.backend"] == "none"
        and flat["filter.mode"] in ("threshold", "margin")
    ):
        problems.append(
            f"filter.mode={flat['filter.mode']!r} reads judge scores, but judge.backend is 'none' "
            "(use filter.mode='contrast' or 'none', or configure a judge)"
        )
    if (
        ok("n_per_question", "temperature")
        and flat["n_per_question"] > 1
        and flat["temperature"] == 0
    ):
        problems.append(
            f"n_per_question={flat['n_per_question']} with temperature=0 repeats one greedy answer "
            "(set temperature > 0 to sample, or n_per_question=1)"
        )
    if ok("judge.backend", "judge.model"):
        if flat["judge.backend"] == "openai" and not flat["judge.model"].strip():
            problems.append("judge.model must name the served model for judge.backend='openai'")
        if flat["judge.backend"] == "local" and flat["judge.model"] not in ("", "same"):
            read_config(flat["judge.model"], "judge.model", problems)

    if ok(
        "distributed.coordinator",
        "distributed.num_processes",
        "distributed.process_id",
        "distributed.timeout",
    ):
        from pvjax.parallel.multihost import check_distributed

        problems += check_distributed(
            {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("distributed.")}
        )

    model_config = read_config(flat["model"], "model", problems) if ok("model") else None
    layers: tuple[int, ...] = ()
    if model_config is not None and ok("causality.layers"):
        n_layers = model_config.num_layers
        layers = tuple(flat["causality.layers"]) or tuple(spread_layers(n_layers, k=4))
        who = model_config.name or flat["model"]
        check_layers(
            layers, n_layers, "causality.layers", problems, note=f"{who} has {n_layers} layers"
        )

    if problems:
        raise InvalidConfig("bad extraction config: " + "; ".join(problems))
    from pvjax.loading.tokenizer import source_chat_conventions

    thinking = bool(cfg.get("enable_thinking", False))
    c = cfg["causality"]
    return ExtractionSettings(
        cfg=cfg,
        work=work,
        trait=trait,
        model_config=model_config,
        dtype=_resolved_dtype(flat["dtype"]),
        model=cfg["model"],
        answering=Answering.of(cfg),
        judging=Judging.of(cfg["judge"]),
        filter=PairFilter(**cfg["filter"]),
        causality=Causality(layers, tuple(c["coefs"]), c["max_pairs"]),
        mesh=MeshShape(**cfg["mesh"]),
        distributed=Distributed(**cfg["distributed"]),
        plot=cfg["plot"],
        enable_thinking=thinking,
        chat=source_chat_conventions(flat["model"], enable_thinking=thinking),
    )


def settings_for_run(cfg) -> ExtractionSettings:
    """`validate_config` for a run that may be one process of a multi-process job (`distributed.*`):
    the job is joined first, since checking reads the backend's dtype and so starts JAX, which must
    come after joining; and a problem found on one process is raised on all, so none waits for a
    process that gave up. The one place a run turns its config into settings."""
    from pvjax.parallel import multihost

    plain = as_dict(cfg)
    dist = plain.get("distributed")
    joined = (
        multihost.join(dist)
        if isinstance(dist, dict)
        and dist.get("coordinator")
        and not multihost.check_distributed(dist)
        else multihost.SINGLE
    )
    box = []
    joined.each(lambda: box.append(validate_config(plain)))
    return box[0]


def _resolved_dtype(dtype: str) -> str:
    """The dtype name the model will load in: "" means the backend's default (float32 on CPU)."""
    if dtype:
        return dtype
    import jax.numpy as jnp

    from pvjax.model import default_dtype

    return jnp.dtype(default_dtype()).name
