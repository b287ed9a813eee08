"""Checking a study config whole, before any model loads or any file is written.

A sweep runs many points; a bad value found at the tenth costs the nine before it. Each study lists
its fields (`FIELDS`, checked like extraction's, `pvjax.settings.extraction`), and `check_study` looks at
everything a study names: the model's metadata (layer count, without the weights), the trait's eval
split, the vector file (does it fit the model: width, depth, config fingerprint), the nested
extraction config when the vector is to be extracted, the multiple-choice file (every line). Every
problem found is reported in one `StudyConfigError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from pvjax.errors import InputError
from pvjax.settings.extraction import (JUDGE_BACKENDS, DTYPES, _bool, _choice, _flatten, _float, _floats, _int, _ints,
                                  _model_config, _str, _workdir_problem)
from pvjax.interventions import POSITION_MODES


class StudyConfigError(InputError):
    """One or more bad study config fields; the message lists them all."""


COMMON_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "model": _str(nonempty=True), "dtype": _choice(*DTYPES), "trait": _str(nonempty=True), "vector": _str(),
    "workdir": _str(), "n_questions": _int(0), "max_new_tokens": _int(1), "temperature": _float(0.0),
    "seed": _int(0), "batch_size": _int(1), "forward_batch_size": _int(1), "plot": _bool, "mc.path": _str(), "mc.n_items": _int(0),
}
JUDGE_FIELDS = {
    "judge.backend": _choice(*JUDGE_BACKENDS), "judge.model": _str(), "judge.base_url": _str(),
    "judge.concurrency": _int(1), "judge.batch_size": _int(1), "judge.numeric_only": _bool,
}


@dataclasses.dataclass(frozen=True)
class Checked:
    """What checking resolved: the flat config, the model's config, the trait's eval split, the
    multiple-choice items (empty when off) and the problems found so far (the study adds its own
    and calls `raise_if`)."""

    flat: dict
    model_config: Any
    trait: Any
    mc_items: list
    problems: list

    def raise_if(self, study: str) -> None:
        if self.problems:
            raise StudyConfigError(f"bad {study} config: " + "; ".join(self.problems))


def check_study(cfg, fields: dict, work: Path, study: str) -> Checked:
    """Check types and ranges of `fields`, unknown fields (the nested `extract` config aside), the
    model, trait (eval split), vector and multiple-choice file. Collects problems; loads no weights."""
    from pvjax.measure.mc import MCError, read_items
    from pvjax.files.traits import TraitError, load_trait

    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    flat = _flatten({k: v for k, v in d.items() if k != "extract"})
    problems: list[str] = []
    known = {"study", *fields}
    unknown = sorted(set(flat) - known)
    if unknown:
        problems.append(f"unknown config field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    bad = set()
    for key, check in fields.items():
        if key not in flat:
            problems.append(f"missing config field {key}")
            bad.add(key)
        elif msg := check(flat[key]):
            problems.append(f"{key} {msg}")
            bad.add(key)
    ok = lambda *keys: not bad.intersection(keys)
    if (msg := _workdir_problem(work)):
        problems.append(msg)

    trait = None
    if ok("trait"):
        try:
            trait = load_trait(flat["trait"], "eval").validate()
        except TraitError as e:
            problems.append(f"trait: {e}")
    if trait is not None and ok("n_questions") and flat["n_questions"] > len(trait.questions):
        problems.append(f"n_questions={flat['n_questions']} but the eval split of {trait.name!r} has "
                        f"only {len(trait.questions)} questions")

    model_config = _model_config(flat["model"], "model", problems) if ok("model") else None
    if model_config is not None and ok("vector"):
        _check_vector(cfg, flat, model_config, work, problems)

    items = []
    if ok("mc.path", "mc.n_items") and flat["mc.path"]:
        try:
            items = read_items(flat["mc.path"], flat["mc.n_items"])
        except MCError as e:
            problems.append(f"mc.path: {e}")
    if ok("judge.backend", "judge.model") and flat.get("judge.backend") == "openai" and not flat["judge.model"].strip():
        problems.append("judge.model must name the served model for judge.backend='openai'")
    return Checked(flat, model_config, trait, items, problems)


def _check_vector(cfg, flat, model_config, work: Path, problems: list) -> None:
    """A named vector file must fit the model (read_vector's checks, against the model's metadata);
    an empty `vector` needs a valid extraction config."""
    import warnings

    import pvjax
    from pvjax.settings.extraction import InvalidConfig, validate_config
    from pvjax.studies.vector_source import MissingVector, extraction_config
    from pvjax.files.vectors import VectorError, read_vector

    if flat["vector"]:
        shim = pvjax.Model(config=model_config, params=None, tokenizer=None, source=str(flat["model"]))
        try:
            with warnings.catch_warnings():  # the same shape under another name only warns, at load time
                warnings.simplefilter("ignore")
                read_vector(flat["vector"], shim)
        except VectorError as e:
            problems.append(f"vector: {e}")
        return
    try:
        validate_config(extraction_config(cfg, work))
    except (InvalidConfig, MissingVector) as e:
        problems.append(f"vector is empty, so the trait's vector is extracted first, but: {e}")


def check_layers(layers, n_layers: int, what: str, problems: list, *, lo: int = 1) -> None:
    """Layers are hidden_states rows `lo..n_layers`, without repeats."""
    outside = [l for l in layers if not lo <= l <= n_layers]
    if outside:
        problems.append(f"{what} {outside} outside {lo}..{n_layers} (hidden_states rows; the model has "
                        f"{n_layers} layers)")
    if len(set(layers)) != len(layers):
        problems.append(f"{what} {list(layers)} repeats a layer")


def spread_layers(n_layers: int, k: int = 5) -> list[int]:
    """`k` layers spread between a quarter and three quarters of the depth (an empty `layers`)."""
    import numpy as np

    return sorted({int(round(x)) for x in np.linspace(n_layers / 4, 3 * n_layers / 4, k)})
