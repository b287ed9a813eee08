"""Checking a study config whole, before any model loads or any file is written.

A sweep runs many points; a bad value found at the tenth costs the nine before it. Each study lists
its fields (`FIELDS`, checked like extraction's, `pvjax.settings.extraction`), and `check_study`
looks at everything a study names: the model's metadata (layer count, without the weights), the
trait's eval split, the vector file (does it fit the model: width, depth, config fingerprint), the
nested extraction config when the vector is to be extracted, the multiple-choice file (every line).
Every problem found is reported in one `StudyConfigError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pvjax.interventions import POSITION_MODES as POSITION_MODES  # the studies' `positions`
from pvjax.settings import fields as F
from pvjax.settings.extraction import DTYPES, JUDGE_BACKENDS

# The name studies' callers caught before there was one error class for every config.
StudyConfigError = F.InvalidConfig


COMMON_FIELDS: dict[str, F.Validator] = {
    "model": F.string(nonempty=True),
    "dtype": F.choice(*DTYPES),
    "trait": F.string(nonempty=True),
    "vector": F.string(),
    "workdir": F.string(),
    "n_questions": F.integer(0),
    "max_new_tokens": F.integer(1),
    "temperature": F.number(0.0),
    "seed": F.integer(0),
    "batch_size": F.integer(1),
    "forward_batch_size": F.integer(1),
    "plot": F.boolean,
    "mc.path": F.string(),
    "mc.n_items": F.integer(0),
}
JUDGE_FIELDS = {
    "judge.backend": F.choice(*JUDGE_BACKENDS),
    "judge.model": F.string(),
    "judge.base_url": F.string(),
    "judge.concurrency": F.integer(1),
    "judge.batch_size": F.integer(1),
    "judge.numeric_only": F.boolean,
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
    model, trait (eval split), vector and multiple-choice file. Collects problems; loads no
    weights."""
    from pvjax.measure.mc import MCError, read_items

    d = F.as_dict(cfg)
    flat = F.flatten({k: v for k, v in d.items() if k != "extract"})
    problems: list[str] = []
    bad = F.check_fields(flat, fields, problems, known=("study",))
    ok = lambda *keys: not bad.intersection(keys)
    if msg := F.workdir_problem(work):
        problems.append(msg)

    trait = F.trait_split(flat["trait"], "eval", problems) if ok("trait") else None
    if trait is not None and ok("n_questions") and flat["n_questions"] > len(trait.questions):
        problems.append(
            f"n_questions={flat['n_questions']} but the eval split of {trait.name!r} has "
            f"only {len(trait.questions)} questions"
        )

    model_config = F.model_config(flat["model"], "model", problems) if ok("model") else None
    if model_config is not None and ok("vector"):
        _check_vector(cfg, flat, model_config, work, problems)

    items = []
    if ok("mc.path", "mc.n_items") and flat["mc.path"]:
        try:
            items = read_items(flat["mc.path"], flat["mc.n_items"])
        except MCError as e:
            problems.append(f"mc.path: {e}")
    if (
        ok("judge.backend", "judge.model")
        and flat.get("judge.backend") == "openai"
        and not flat["judge.model"].strip()
    ):
        problems.append("judge.model must name the served model for judge.backend='openai'")
    return Checked(flat, model_config, trait, items, problems)


def _check_vector(cfg, flat, model_config, work: Path, problems: list) -> None:
    """A named vector file must fit the model (read_vector's checks, against the model's metadata);
    an empty `vector` needs a valid extraction config."""
    import warnings

    import pvjax
    from pvjax.files.vectors import VectorError, read_vector
    from pvjax.settings.extraction import validate_config
    from pvjax.studies.vector_source import MissingVector, extraction_config

    if flat["vector"]:
        shim = pvjax.Model(
            config=model_config, params=None, tokenizer=None, source=str(flat["model"])
        )
        try:
            with (
                warnings.catch_warnings()
            ):  # the same shape under another name only warns, at load time
                warnings.simplefilter("ignore")
                read_vector(flat["vector"], shim)
        except VectorError as e:
            problems.append(f"vector: {e}")
        return
    try:
        validate_config(extraction_config(cfg, work))
    except (F.InvalidConfig, MissingVector) as e:
        problems.append(f"vector is empty, so the trait's vector is extracted first, but: {e}")
