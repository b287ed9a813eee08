"""Field validators for configs, and the one error a bad config raises.

A validator takes a value and returns `None` when it is fine, else the problem in words ("must be an
integer, got 'x'"); `check_fields` runs a table of them over a flat config and collects every
problem, so one message can list them all. Extraction, the studies and finetuning use this table
form; their configs differ in fields, not in how a field is checked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from pvjax.errors import InputError

Validator = Callable[[Any], "str | None"]


class InvalidConfig(InputError):
    """One or more bad config fields; the message lists them all. (An `InputError`, so a
    `UserError` and a `ValueError`.)"""


def integer(lo: int, hi: int | None = None) -> Validator:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        if v < lo or (hi is not None and v > hi):
            return f"must be >= {lo}, got {v}" if hi is None else f"must be in {lo}..{hi}, got {v}"

    return check


def number(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Validator:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if v < lo or (lo_open and v == lo) or v > hi:
            if hi < math.inf:
                return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}"
            return f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}"

    return check


def choice(*options: str) -> Validator:
    def check(v):
        if v not in options:
            return f"must be one of {', '.join(map(repr, options))}, got {v!r}"

    return check


def string(nonempty: bool = False) -> Validator:
    def check(v):
        if not isinstance(v, str):
            return f"must be a string, got {v!r}"
        if nonempty and not v.strip():
            return "must be set"

    return check


def boolean(v) -> str | None:
    if not isinstance(v, bool):
        return f"must be True or False, got {v!r}"


def integers(v) -> str | None:
    if not isinstance(v, (list, tuple)) or any(
        isinstance(x, bool) or not isinstance(x, int) for x in v
    ):
        return f"must be a tuple of integers, got {v!r}"


def numbers(v) -> str | None:
    finite = lambda x: (  # noqa: E731
        not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)
    )
    if not isinstance(v, (list, tuple)) or not v or not all(map(finite, v)):
        return f"must be a non-empty tuple of finite numbers, got {v!r}"


def as_dict(cfg) -> dict:
    """A config as a plain nested dict, whether it came as an ml_collections `ConfigDict` or a
    dict: the one place that tells them apart."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the keys `--config.a.b=...` names."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Fields a config may leave out (configs written before they existed), checked when present:
# `enable_thinking`, what a chat template with a thinking switch (Qwen3's) is given.
OPTIONAL_FIELDS: dict[str, Validator] = {"enable_thinking": boolean}


def check_fields(
    flat: dict, fields: dict[str, Validator], problems: list[str], *, known=()
) -> set[str]:
    """Append a problem for every unknown field (not in `fields`, `known` or `OPTIONAL_FIELDS`),
    missing field and bad value; return the keys that are missing or bad, so later checks can
    skip them."""
    for key, check in OPTIONAL_FIELDS.items():
        if key in flat and (msg := check(flat[key])):
            problems.append(f"{key} {msg}")
    allowed = [*known, *(k for k in fields if k not in known)]
    allowed += [k for k in OPTIONAL_FIELDS if k not in allowed]
    unknown = sorted(set(flat) - set(allowed))
    if unknown:
        problems.append(
            f"unknown config field(s) {', '.join(unknown)} (known: {', '.join(allowed)})"
        )
    bad = {k for k in fields if k not in flat}
    if bad:
        problems.append(f"missing config field(s) {', '.join(k for k in fields if k in bad)}")
    for key, check in fields.items():
        if key in flat and (msg := check(flat[key])):
            problems.append(f"{key} {msg}")
            bad.add(key)
    return bad


def workdir_problem(work: Path) -> str | None:
    """Why `work` cannot be (or become) a directory, or None."""
    if work.exists():
        return None if work.is_dir() else f"workdir {str(work)!r} is a file, not a directory"
    parent = work.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"workdir {str(work)!r} cannot be created: {str(parent)!r} is a file"
    return None


def model_config(source: str, what: str, problems: list[str]):
    """The model's config read from its metadata (no weights), or None with the problem added."""
    from pvjax.loading import read_model_config

    try:
        return read_model_config(source)
    except Exception as e:  # a missing, truncated or foreign file: every kind is the user's to fix
        problems.append(f"{what}: {e}")
        return None


def trait_split(name: str, split: str, problems: list[str]):
    """The trait's `split` loaded and validated, or None with the problem added."""
    from pvjax.files.traits import TraitError, load_trait

    try:
        return load_trait(name, split).validate()
    except TraitError as e:
        problems.append(f"trait: {e}")
        return None


def check_layers(
    layers, n_layers: int, what: str, problems: list, *, lo: int = 1, note: str = ""
) -> None:
    """Layers are hidden_states rows `lo..n_layers`, without repeats. `note` replaces the
    parenthesis after a layer out of range."""
    outside = [la for la in layers if not lo <= la <= n_layers]
    if outside:
        note = note or f"hidden_states rows; the model has {n_layers} layers"
        problems.append(f"{what} {outside} outside {lo}..{n_layers} ({note})")
    if len(set(layers)) != len(layers):
        problems.append(f"{what} {list(layers)} repeats a layer")


def spread_layers(n_layers: int, k: int = 5) -> list[int]:
    """`k` layers spread between a quarter and three quarters of the depth (an empty `layers`;
    extraction's causality check takes k=4)."""
    import numpy as np

    return sorted({int(round(x)) for x in np.linspace(n_layers / 4, 3 * n_layers / 4, k)})


def enable_thinking(cfg) -> bool:
    """A config's `enable_thinking` (`OPTIONAL_FIELDS`; False where it has none): what
    `pvjax.load(..., enable_thinking=)` takes for the models the config names."""
    return bool(cfg.get("enable_thinking", False))
