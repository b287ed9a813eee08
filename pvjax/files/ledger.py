"""One record of what a run directory holds: its stages, what produced each, which are finished.

Every long job in pvjax (extraction, the studies, the runner's points, finetuning) resumes by
skipping what it finished, so it must know exactly what produced the files it finds, or a rerun
with other settings returns old results under a new label. A `Ledger` keeps that knowledge in one
JSON file (the record, `stages.json` unless the caller names another) beside the outputs:

    {"format": 1, "stages": {name: settings}, "inputs": {name: {path: sha256}}, "finished": [name,
    ...], ...}

A stage is recorded with the settings that can change its results (the caller decides which: a
field that cannot change a result is left out, and so never causes a rerun) and the sha256 of
the content of its input files. The promises:

- every output present was produced under the record of its stage: the record is written (and
  stale outputs deleted) before a stage writes anything, its `finished` mark after it wrote
  everything, `DONE` after every stage is finished; all atomically (`pvjax.files.atomic`), so a
  kill at any moment keeps the promise, and a stage without its finished mark is redone;
- a stage whose record differs from the new one (a changed setting or input file) is either
  refused (`keep=True`: results too expensive to delete or relabel, such as answers, checkpoints
  or a runner's point; a `RunMismatch` names every changed field, old -> new) or stale: its
  outputs are deleted and it runs again. With `cascade` (the default) every stage after a stale
  one is stale too, since each reads what the one before wrote; without it each stage's settings
  must name what it depends on (a digest of the stage before);
- a stage is refused only when it has outputs: a record alone (a run that failed before
  writing anything, such as on a bad setting) never blocks a rerun;
- a rerun that changes nothing rewrites nothing: every file is left byte-identical, mtimes too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from pvjax.errors import UserError
from pvjax.files import atomic

FORMAT = 1


class RunMismatch(UserError, ValueError):
    """A run directory holds results made under other settings; the message names each changed
    field."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run directory.

    `settings`: everything (JSON-able) that can change the stage's results; `inputs`: files whose
    content does (their sha256 is recorded); `outputs`: glob patterns, relative to the directory,
    of what the stage writes (a pattern naming a folder covers the folder); `keep`: a changed
    record is refused where outputs exist, instead of deleting them."""

    name: str
    settings: Any = None
    inputs: Sequence = ()
    outputs: Sequence[str] = ()
    keep: bool = False


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(obj) -> str:
    """A short stable hash of a JSON-able value (settings too large to record whole)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(obj):
    """`obj` as JSON would read it back (tuples as lists, keys as strings), so records compare."""
    return json.loads(json.dumps(obj, default=str))


def _flat(v, prefix: str = "") -> dict:
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            out.update(_flat(x, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1] if prefix else "": v}


def differences(old, new) -> list[str]:
    """`field: old -> new` for every (dotted) field that differs, in first-seen order."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}" if k else f"{a.get(k)!r} -> {b.get(k)!r}"
        for k in dict.fromkeys([*a, *b])
        if a.get(k) != b.get(k)
    ]


class Ledger:
    """The record of `work`'s stages; see the module docstring.

    `stages` are declared up front (more may follow with `enter`, for a stage whose settings depend
    on an earlier stage's results). Nothing is written until `open`. The `extra` keywords of `open`
    and `finish` are kept at the top of the record beside the ledger's own keys (a runner's point
    description, a study's result rows); `error` is the class a refusal raises (a subclass of
    `RunMismatch`). A stage recorded by an earlier run but not declared now keeps its record."""

    def __init__(
        self,
        work,
        stages: Sequence[Stage] = (),
        *,
        record: str = "stages.json",
        cascade: bool = True,
        error: type[RunMismatch] = RunMismatch,
        done: str = "DONE",
    ):
        self.work, self.path, self.cascade, self.error = (
            Path(work),
            Path(work) / record,
            cascade,
            error,
        )
        self.done_path = self.work / done
        self.stages: dict[str, Stage] = {}
        self.new: dict[str, dict] = {}
        self.old = self._read()
        self.extra = {
            k: v for k, v in self.old.items() if k not in ("format", "stages", "inputs", "finished")
        }
        self.finished_set = set(self.old.get("finished", ()))
        for s in stages:
            self._declare(s)

    # --- reading ---

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            d = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # an unreadable record is no record: its outputs are treated as unrecorded
        return d if isinstance(d, dict) and d.get("format") == FORMAT else {}

    def _declare(self, s: Stage) -> None:
        self.stages[s.name] = s
        self.new[s.name] = {
            "settings": _plain(s.settings),
            "inputs": {str(p): sha256(p) for p in s.inputs},
        }

    def recorded(self, name: str) -> dict | None:
        """The recorded {settings, inputs} of a stage, or None."""
        stages = self.old.get("stages", {})
        if name not in stages:
            return None
        return {"settings": stages[name], "inputs": self.old.get("inputs", {}).get(name, {})}

    def current(self, name: str) -> bool:
        return self.recorded(name) == self.new[name]

    def _matches(self, s: Stage):
        """The stage's outputs present: files, and folders holding a file (the record and `DONE`
        are the ledger's, never a stage's)."""
        own = {self.path, self.done_path}
        for pattern in s.outputs:
            for p in self.work.glob(pattern):
                if p not in own and (
                    p.is_file() or (p.is_dir() and any(q.is_file() for q in p.rglob("*")))
                ):
                    yield p

    def has_outputs(self, name: str) -> bool:
        return next(self._matches(self.stages[name]), None) is not None

    def finished(self, name: str) -> bool:
        """Recorded under the current settings and inputs, and marked finished."""
        return name in self.finished_set and self.current(name)

    @property
    def done(self) -> bool:
        """`DONE` present and every declared stage finished: the directory is the run, whole."""
        return self.done_path.is_file() and all(self.finished(n) for n in self.stages)

    def stale(self, names: Sequence[str] | None = None) -> list[str]:
        """The declared stages whose outputs no longer match (with `cascade`, the first changed one
        and every one after it). Refuses (`error`) a changed `keep` stage that has outputs, and one
        with outputs but no record at all. Reads only."""
        names = list(self.stages) if names is None else list(names)
        stale, first = [], None
        for n in names:
            changed = not self.current(n)
            if changed or (self.cascade and first is not None):
                # A kept stage made stale by an earlier one is refused with that one's changes.
                self._refuse_if_kept(self.stages[n], n if changed else first)
                first = first or n
                stale.append(n)
        return stale

    def _refuse_if_kept(self, s: Stage, changed: str) -> None:
        if not s.keep or not self.has_outputs(s.name):
            return
        was = self.recorded(changed)
        what = s.name if s.name.endswith("s") else f"a {s.name}"
        if was is None:
            raise self.error(
                f"{self.work} holds {what} with no record of what produced them (a run of an "
                "older pvjax, or a record deleted); use a new workdir"
            )
        now = self.new[changed]
        diff = differences(was["settings"], now["settings"])
        keys = [d.split(":")[0] for d in diff]
        for p in dict.fromkeys([*was["inputs"], *now["inputs"]]):
            if was["inputs"].get(p) != now["inputs"].get(p):
                keys.append(p)
                diff.append(
                    f"content of {p}: sha256 {str(was['inputs'].get(p))[:12]} -> "
                    f"{str(now['inputs'].get(p))[:12]}"
                )
        raise self.error(
            f"{self.work} holds {what} made with different {', '.join(keys)} ({'; '.join(diff)}); "
            "results are never relabelled or deleted: use a new workdir, or rerun with the old "
            "values"
        )

    # --- writing ---

    def open(self, **extra) -> list[str]:
        """Check every declared stage (refusals first, before anything is touched), delete the
        outputs of the stale ones (never a `keep` stage's) and `DONE` unless the run is whole, then
        record the new settings. Returns the stale stages. Writes nothing when nothing changed."""
        stale = self.stale()
        if stale or not self.done:
            self.done_path.unlink(missing_ok=True)
        self._unfinish(stale)
        for n in stale:
            self._reset(n)
        self._write(extra)
        return stale

    def enter(self, stage: Stage) -> bool:
        """Declare one more stage after `open` (its settings known only now) and record it; a
        changed one is refused or has its outputs deleted. Returns whether it is finished."""
        self._declare(stage)
        if not self.current(stage.name):
            self.stale([stage.name])
            self.done_path.unlink(missing_ok=True)
            self._unfinish([stage.name])
            self._reset(stage.name)
            self._write({})
        return self.finished(stage.name)

    def finish(self, name: str, **extra) -> None:
        """Mark `name` finished (after its outputs are all written); `extra` joins the record's
        top."""
        self.finished_set.add(name)
        self._write(extra)

    def complete(self) -> None:
        """Write `DONE`, last; refused while a declared stage is unfinished (a bug, not a
        user's)."""
        unfinished = [n for n in self.stages if not self.finished(n)]
        assert not unfinished, f"DONE written with unfinished stages {unfinished}"
        if not self.done_path.is_file():
            atomic.write_text(self.done_path, "")

    def _unfinish(self, names) -> None:
        """Drop the finished marks of stages about to be reset, under their old settings, before
        their outputs go: a kill in between leaves unfinished stages, which are redone."""
        if any(n in self.finished_set for n in names):
            self.finished_set.difference_update(names)
            self._write({}, settings=False)

    def _reset(self, name: str) -> None:
        s = self.stages[name]
        if s.keep:
            return  # kept outputs are never deleted: only a stage without any reaches here
        for p in list(self._matches(s)):
            if p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def _write(self, extra: dict, settings: bool = True) -> None:
        stages = dict(self.old.get("stages", {}))
        inputs = dict(self.old.get("inputs", {}))
        for n, rec in self.new.items() if settings else ():
            stages[n] = rec["settings"]
            inputs[n] = rec["inputs"]
        self.extra.update(_plain(extra))
        body = {
            **self.extra,
            "format": FORMAT,
            "stages": stages,
            "inputs": {n: v for n, v in inputs.items() if v},
            "finished": [n for n in stages if n in self.finished_set],
        }
        self.old = body
        text = json.dumps(body, indent=2, ensure_ascii=False) + "\n"
        try:
            if self.path.read_text() == text:
                return  # nothing changed: the file, and its mtime, stay as they are
        except (OSError, UnicodeDecodeError):
            pass
        atomic.write_text(self.path, text)
