"""Trait files: the contrastive system prompts, questions and judge rubric that define one trait.

A trait is data, not code, so that new traits need no new Python and so that files written for the
reference persona_vectors repository (`trait_data_extract/<trait>.json`) load unchanged. The format
is that repository's JSON; unknown keys are ignored rather than rejected for the same reason. All
problems surface as `TraitError` naming the file and the field, because a typo in a hand-written
trait file should not show up later as a silently empty vector or a judge that never scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from pvjax.errors import UserError

SPLITS = ("extract", "eval")
_PLACEHOLDERS = ("{question}", "{answer}")
_PLACEHOLDER_RE = re.compile(r"\{question\}|\{answer\}")


class TraitError(UserError, ValueError):
    """A malformed or missing trait file, with the file and the field named."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One contrastive instruction: `pos` elicits the trait, `neg` its opposite."""

    pos: str
    neg: str


@dataclasses.dataclass(frozen=True)
class Trait:
    name: str
    instruction: tuple[Pair, ...]
    questions: tuple[str, ...]
    eval_prompt: str
    description: str = ""
    # Where it was read from, only so `validate` errors can name the file; not part of identity.
    source: str = dataclasses.field(default="", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str, source: str = "<dict>") -> Trait:
        """Parse the published JSON layout; checks only types here, content in `validate`."""

        def fail(msg: str) -> TraitError:
            return TraitError(f"{source}: {msg}")

        if not isinstance(d, Mapping):
            raise fail(f"top level must be a JSON object, got {type(d).__name__}")
        for key in ("instruction", "questions", "eval_prompt"):
            if key not in d:
                raise fail(f"lacks the required field {key!r}")
        raw_pairs = d["instruction"]
        if not isinstance(raw_pairs, list):
            raise fail("instruction must be a list of {'pos': ..., 'neg': ...} objects")
        pairs = []
        for i, p in enumerate(raw_pairs):
            if not isinstance(p, Mapping):
                raise fail(f"instruction[{i}] must be an object with 'pos' and 'neg'")
            for side in ("pos", "neg"):
                if side not in p:
                    raise fail(f"instruction[{i}] lacks {side!r}")
                if not isinstance(p[side], str):
                    raise fail(f"instruction[{i}].{side} must be a string")
            pairs.append(Pair(p["pos"], p["neg"]))
        qs = d["questions"]
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise fail("questions must be a list of strings")
        if not isinstance(d["eval_prompt"], str):
            raise fail("eval_prompt must be a string")
        desc = d.get("description", "")
        if not isinstance(desc, str):
            raise fail("description must be a string")
        return cls(name, tuple(pairs), tuple(qs), d["eval_prompt"], desc, source)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "instruction": [{"pos": p.pos, "neg": p.neg} for p in self.instruction],
            "questions": list(self.questions),
            "eval_prompt": self.eval_prompt,
        }
        # Omitted when empty so a reference-format file round-trips to the same keys.
        if self.description:
            d["description"] = self.description
        return d

    def validate(self, min_pairs: int = 1, min_questions: int = 1) -> Trait:
        """Content checks; returns self so `load_trait(...).validate()` chains."""

        def fail(msg: str) -> TraitError:
            return TraitError(f"{self.source or self.name}: {msg}")

        if len(self.instruction) < min_pairs:
            raise fail(f"instruction has {len(self.instruction)} pairs, need at least {min_pairs}")
        for i, p in enumerate(self.instruction):
            for side in ("pos", "neg"):
                if not getattr(p, side).strip():
                    raise fail(f"instruction[{i}].{side} is empty")
        if len(self.questions) < min_questions:
            raise fail(
                f"questions has {len(self.questions)} entries, need at least {min_questions}"
            )
        seen: dict[str, int] = {}
        for i, q in enumerate(self.questions):
            if not q.strip():
                raise fail(f"questions[{i}] is empty")
            # Near-duplicates differing in case or spacing would double-weight one prompt.
            key = q.strip().casefold()
            if key in seen:
                raise fail(
                    f"questions: duplicate question {q.strip()!r} (entries {seen[key]} and {i})"
                )
            seen[key] = i
        for ph in _PLACEHOLDERS:
            if ph not in self.eval_prompt:
                raise fail(f"eval_prompt lacks the {ph} placeholder")
        return self

    def render_eval(self, question: str, answer: str) -> str:
        # Rubrics often quote JSON or code, so str.format would choke on their braces; one regex
        # pass
        # also keeps a question that happens to contain "{answer}" from being substituted twice.
        values = {"{question}": question, "{answer}": answer}
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(0)], self.eval_prompt)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, so an interrupted save never leaves a half-written trait file."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        # mkstemp makes 0600 files; keep an existing file's mode, else the usual 0644 for data
        # files.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _traits_root():
    return resources.files("pvjax").joinpath("data", "traits")


def shipped_traits() -> list[str]:
    root = _traits_root()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.joinpath("extract.json").is_file()
    )


def _parse(text: str, name: str, source: str) -> Trait:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraitError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    return Trait.from_dict(d, name, source)


def load_trait(name_or_path: str | os.PathLike, split: str = "extract") -> Trait:
    """A trait from a .json path (name = file stem) or a shipped trait name and split."""
    path = Path(name_or_path)
    # Only .json files count as paths, so a stray file called "evil" in the cwd can't shadow a
    # trait.
    if path.suffix.lower() == ".json" and path.is_file():
        return _parse(path.read_text(encoding="utf-8"), path.stem, path.name)
    if split not in SPLITS:
        raise TraitError(f"split must be one of {SPLITS}, got {split!r}")
    shipped = ", ".join(shipped_traits()) or "none"
    if path.suffix == ".json" or len(path.parts) > 1:
        # Looks like a path, so say so rather than "no shipped trait 'dir/evil.json'".
        raise TraitError(f"{path}: trait file not found; shipped traits: {shipped}")
    name = str(name_or_path)
    res = _traits_root().joinpath(name, f"{split}.json")
    if not res.is_file():
        raise TraitError(
            f"no shipped trait {name!r} (split {split!r}); shipped traits: {shipped}; "
            "or pass a path to a .json file"
        )
    return _parse(res.read_text(encoding="utf-8"), name, f"{name}/{split}.json")


def check_disjoint(extract: Trait, eval: Trait) -> None:
    """Extraction and evaluation questions must not overlap, or steering scores are in-sample."""
    ev = {q.strip().casefold() for q in eval.questions}
    shared = [q for q in extract.questions if q.strip().casefold() in ev]
    if shared:
        raise TraitError(
            f"{extract.name}/{eval.name}: {len(shared)} question(s) in both splits: "
            + "; ".join(repr(q) for q in shared)
        )
