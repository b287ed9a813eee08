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
import math
from pathlib import Path
from typing import Any, Callable

from pvjax.errors import UserError

DTYPES = ("", "float32", "bfloat16")
JUDGE_BACKENDS = ("openai", "local", "none")
FILTER_MODES = ("threshold", "margin", "contrast", "none")


class InvalidConfig(UserError, ValueError):
    """One or more bad config fields; the message lists them all."""


def _int(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        if v < lo or (hi is not None and v > hi):
            return f"must be >= {lo}, got {v}" if hi is None else f"must be in {lo}..{hi}, got {v}"
    return check


def _float(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if v < lo or (lo_open and v == lo) or v > hi:
            left = "(" if lo_open else "["
            return f"must be in {left}{lo:g}, {hi:g}], got {v:g}" if hi < math.inf else \
                f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}"
    return check


def _choice(*options: str) -> Callable[[Any], str | None]:
    def check(v):
        if v not in options:
            return f"must be one of {', '.join(map(repr, options))}, got {v!r}"
    return check


def _str(nonempty: bool = False) -> Callable[[Any], str | None]:
    def check(v):
        if not isinstance(v, str):
            return f"must be a string, got {v!r}"
        if nonempty and not v.strip():
            return "must be set"
    return check


def _bool(v) -> str | None:
    if not isinstance(v, bool):
        return f"must be True or False, got {v!r}"


def _ints(v) -> str | None:
    if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        return f"must be a tuple of integers, got {v!r}"


def _floats(v) -> str | None:
    if (not isinstance(v, (list, tuple)) or not v
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
        return f"must be a non-empty tuple of finite numbers, got {v!r}"


FIELDS: dict[str, Callable[[Any], str | None]] = {
    "trait": _str(nonempty=True), "workdir": _str(nonempty=True), "model": _str(nonempty=True),
    "dtype": _choice(*DTYPES), "n_questions": _int(0), "n_pairs": _int(0), "n_per_question": _int(1),
    "max_new_tokens": _int(1), "temperature": _float(0.0), "top_p": _float(0.0, 1.0, lo_open=True),
    "seed": _int(0), "batch_size": _int(1), "unroll": _bool, "pos_name": _str(), "neg_name": _str(), "plot": _bool,
    "judge.backend": _choice(*JUDGE_BACKENDS), "judge.model": _str(), "judge.base_url": _str(),
    "judge.concurrency": _int(1), "judge.batch_size": _int(1), "judge.coherence": _bool,
    "judge.numeric_only": _bool,
    "filter.mode": _choice(*FILTER_MODES), "filter.threshold": _float(0.0, 100.0),
    "filter.coherence": _float(0.0, 100.0), "filter.margin": _float(0.0, 100.0), "filter.min_pairs": _int(1),
    "filter.contrast_margin": _float(0.0),
    "causality.layers": _ints, "causality.coefs": _floats, "causality.max_pairs": _int(1),
    "mesh.data": _int(1), "mesh.model": _int(1),
    "distributed.coordinator": _str(), "distributed.num_processes": _int(0), "distributed.process_id": _int(-1),
    "distributed.timeout": _int(1),
}


@dataclasses.dataclass(frozen=True)
class CheckedConfig:
    """A config that passed every check, with what checking it resolved: the trait, the model's
    config (layer count, fingerprint), the dtype the model will load in and the causality layers."""

    cfg: dict
    work: Path
    trait: Any
    model_config: Any
    dtype: str
    causality_layers: tuple[int, ...]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_causality_layers(n_layers: int) -> list[int]:
    """Four layers between a quarter and three quarters of the depth (`causality.layers=()`)."""
    import numpy as np

    return sorted({int(round(x)) for x in np.linspace(n_layers / 4, 3 * n_layers / 4, 4)})


def _workdir_problem(work: Path) -> str | None:
    if work.exists():
        return None if work.is_dir() else f"workdir {str(work)!r} is a file, not a directory"
    parent = work.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"workdir {str(work)!r} cannot be created: {str(parent)!r} is a file"
    return None


def _model_config(source: str, what: str, problems: list[str]):
    from pvjax.loading import read_model_config

    try:
        return read_model_config(source)
    except Exception as e:  # a missing, truncated or foreign file: every kind is the user's to fix
        problems.append(f"{what}: {e}")
        return None


def validate_config(cfg) -> CheckedConfig:
    """Check every field of an extraction config (an ml_collections ConfigDict or a plain dict) and
    what it names: the trait loads and validates, the model's metadata reads, causality layers lie in
    1..n_layers, the workdir is (or can become) a directory, the filter can be met by the number of
    pairs the config produces. Raises `InvalidConfig` listing every problem found; writes nothing,
    loads no weights."""
    from pvjax.files.traits import TraitError, load_trait

    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    flat = _flatten(cfg)
    problems = []
    unknown = sorted(set(flat) - set(FIELDS))
    if unknown:
        problems.append(f"unknown config field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    missing = [k for k in FIELDS if k not in flat]
    if missing:
        problems.append(f"missing config field(s) {', '.join(missing)}")
    bad = set(missing)
    for key, check in FIELDS.items():
        if key in flat and (msg := check(flat[key])):
            problems.append(f"{key} {msg}")
            bad.add(key)
    ok = lambda *keys: not bad.intersection(keys)

    work = Path(flat["workdir"]).expanduser() if ok("workdir") else None
    if work is not None and (msg := _workdir_problem(work)):
        problems.append(msg)

    trait = None
    if ok("trait"):
        try:
            trait = load_trait(flat["trait"], "extract").validate()
        except TraitError as e:
            problems.append(f"trait: {e}")
    if trait is not None:
        for key, have, what in (("n_pairs", len(trait.instruction), "instruction pairs"),
                                ("n_questions", len(trait.questions), "questions")):
            if ok(key) and flat[key] > have:
                problems.append(f"{key}={flat[key]} but trait {trait.name!r} has only {have} {what}")
        if ok("n_pairs", "n_questions", "n_per_question", "filter.min_pairs"):
            n = ((flat["n_pairs"] or len(trait.instruction)) * (flat["n_questions"] or len(trait.questions))
                 * flat["n_per_question"])
            if flat["filter.min_pairs"] > n:
                problems.append(f"filter.min_pairs={flat['filter.min_pairs']} exceeds the {n} answer pairs "
                                "this config produces (n_pairs x n_questions x n_per_question)")

    if ok("filter.coherence", "judge.coherence", "judge.backend") and flat["filter.coherence"] > 0:
        if flat["judge.backend"] == "none":
            problems.append(f"filter.coherence={flat['filter.coherence']:g} needs coherence scores, but "
                            "judge.backend is 'none' (set filter.coherence=0 or configure a judge)")
        elif not flat["judge.coherence"]:
            problems.append(f"filter.coherence={flat['filter.coherence']:g} needs coherence scores, but "
                            "judge.coherence is False (set filter.coherence=0 or judge.coherence=True)")
    if ok("filter.mode", "judge.backend") and flat["judge.backend"] == "none" \
            and flat["filter.mode"] in ("threshold", "margin"):
        problems.append(f"filter.mode={flat['filter.mode']!r} reads judge scores, but judge.backend is 'none' "
                        "(use filter.mode='contrast' or 'none', or configure a judge)")
    if ok("n_per_question", "temperature") and flat["n_per_question"] > 1 and flat["temperature"] == 0:
        problems.append(f"n_per_question={flat['n_per_question']} with temperature=0 repeats one greedy answer "
                        "(set temperature > 0 to sample, or n_per_question=1)")
    if ok("judge.backend", "judge.model"):
        if flat["judge.backend"] == "openai" and not flat["judge.model"].strip():
            problems.append("judge.model must name the served model for judge.backend='openai'")
        if flat["judge.backend"] == "local" and flat["judge.model"] not in ("", "same"):
            _model_config(flat["judge.model"], "judge.model", problems)

    if ok("distributed.coordinator", "distributed.num_processes", "distributed.process_id", "distributed.timeout"):
        from pvjax.parallel.multihost import check_distributed

        problems += check_distributed({k.split(".", 1)[1]: v for k, v in flat.items()
                                       if k.startswith("distributed.")})

    model_config = _model_config(flat["model"], "model", problems) if ok("model") else None
    layers: tuple[int, ...] = ()
    if model_config is not None and ok("causality.layers"):
        n_layers = model_config.num_layers
        layers = tuple(flat["causality.layers"]) or tuple(default_causality_layers(n_layers))
        outside = [l for l in layers if not 1 <= l <= n_layers]
        if outside:
            problems.append(f"causality.layers {outside} outside 1..{n_layers} "
                            f"({model_config.name or flat['model']} has {n_layers} layers)")
        if len(set(layers)) != len(layers):
            problems.append(f"causality.layers {list(layers)} repeats a layer")

    if problems:
        raise InvalidConfig("bad extraction config: " + "; ".join(problems))
    return CheckedConfig(cfg=cfg, work=work, trait=trait, model_config=model_config,
                         dtype=_resolved_dtype(flat["dtype"]), causality_layers=layers)


def _resolved_dtype(dtype: str) -> str:
    """The dtype name the model will load in: "" means the backend's default (float32 on CPU)."""
    if dtype:
        return dtype
    import jax.numpy as jnp

    from pvjax.model import default_dtype

    return jnp.dtype(default_dtype()).name
