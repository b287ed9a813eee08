"""The experiment runner: one config file, one command, a directory per point, one summary table.

    pvjax run   --config configs/steer.py:runlocal --config.trait=evil --workdir runs/steer
    pvjax sweep --config configs/steer.py:runlocal --workdir runs/steer-sweep

`run` runs the config as given (after `--config.x=y` overrides) into `--workdir` (or the config's
own `workdir`). `sweep` expands the config module's `sweep(add)` declaration, as big_vision does:
each `add(**values)` call is a point whose values (dotted keys for nested fields:
`add(**{"judge.backend": "local"})`) override the config; `product` and `zip_` build lists of
points. Each point runs in `DIR/<name>/`, its name made of its values (`layers=10,coefs=2`), or in
the `workdir` its values name.

Each point's directory holds `point.json` (its ledger's record, `pvjax.files.ledger`: the study, the
resolved config, the sweep values, the git revision and pvjax version that produced it, and whether
the point finished), the study's own files and plots, `results.csv` / `results.json` (its summary
rows) and `DONE`, written last. `DIR/summary.csv` gathers the rows of
every point (with a `point` column in a sweep) and is printed as a table.

Resumption: a point whose `DONE` exists under the same config is skipped; one that was killed is
run again, and the study skips what it finished (each study writes its pieces atomically). A
directory that holds a point made under another config is refused, naming the fields that differ
(except for studies that track their own provenance, like extraction); a `point.json` alone, left by
a run that failed before writing anything, is not. Every point is checked (`validate`, the whole
config, against the model's metadata where it matters) before the first one runs and before
anything is written, so a bad value anywhere in a sweep costs no compute and blocks no rerun.

Several processes (`pvjax.studies.jobs`): with the config's `distributed` section (or its `extract`
config's) naming a job, every process runs the same command; process p runs the points i with
i mod P = p, each alone, and process 0 writes `summary.csv` from everyone's rows.

The study is `cfg.study` (the module `pvjax.studies.<study>`, or a dotted module path of your own);
a config without that field (`configs/extract.py`) is named by its file: `extract`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from pvjax.errors import UsageError
from pvjax.files import atomic
from pvjax.files.ledger import Ledger, RunMismatch, Stage
from pvjax.parallel import multihost
from pvjax.parallel.multihost import SINGLE, Job
from pvjax.settings.config_files import config_module, flat_keys, load_config
from pvjax.settings.fields import as_dict

# Fields that name where a point runs, or how it shows progress: not part of what it computes.
UNCOMPARED = ("workdir",)
# Fields that only switch figures on: a finished point run without them runs again when they are
# switched on (every study resumes from its finished stages, so that draws the figures and little
# else); switched off, a finished point stays finished.
REDRAWN = ("plot",)


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # "" for `pvjax run`: the point is the workdir itself
    values: dict  # sweep overrides, dotted keys
    cfg: Any  # the resolved ConfigDict


# --- sweep declarations ---


def product(**axes) -> list[dict]:
    """Every combination of the axes' values: `product(layers=[(10,), (20,)], coefs=[(1.0,),
    (2.0,)])`."""
    for k, v in axes.items():
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            raise UsageError(f"sweep axis {k!r} must be a list of values, got {v!r}")
        if not list(v):
            raise UsageError(f"sweep axis {k!r} is empty, so the product has no points")
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(axes[k]) for k in keys))]


def zip_(**axes) -> list[dict]:
    """The i-th values of every axis together; the axes must have one length."""
    lengths = {k: len(list(v)) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise UsageError(f"sweep zip over axes of different lengths: {lengths}")
    if not lengths or not next(iter(lengths.values())):
        raise UsageError("sweep zip over empty axes has no points")
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in zip(*(list(axes[k]) for k in keys))]


def sweep_points(config_path: str) -> list[dict]:
    """The values of every point the config module's `sweep(add)` declares (`add(**values)` once per
    point, or `add(list_of_dicts)` from `product` / `zip_`); `sweep(add, arg)` also gets the
    variant string. Refused: no `sweep`, no points, a point added twice."""
    module = config_module(config_path)
    fn = getattr(module, "sweep", None)
    if fn is None:
        raise UsageError(
            f"{config_path.split(':', 1)[0]} declares no sweep(add); use `pvjax run` for one point"
        )
    points: list[dict] = []

    def add(*many, **values):
        for group in many:
            for p in [group] if isinstance(group, dict) else group:
                points.append(dict(p))
        if values or not many:
            points.append(values)

    arg = config_path.split(":", 1)[1] if ":" in config_path else ""
    import inspect

    try:
        fn(add, arg) if len(inspect.signature(fn).parameters) > 1 else fn(add)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"sweep() of {config_path} failed: {type(e).__name__}: {e}") from None
    if not points:
        raise UsageError(f"sweep() of {config_path} adds no points")
    seen = set()
    for p in points:
        key = json.dumps(p, sort_keys=True, default=str)
        if key in seen:
            raise UsageError(f"sweep() of {config_path} adds the point {p} twice")
        seen.add(key)
    return points


def point_name(values: dict) -> str:
    """A directory name from the point's values: `key=value` pairs, readable when they are short
    and plain, with a hash of the values when anything had to be shortened or replaced."""

    def text(v):
        if isinstance(v, (list, tuple)):
            return "_".join(text(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    raw = ",".join(f"{k.split('.')[-1]}={text(v)}" for k, v in values.items() if k != "workdir")
    clean = re.sub(r"[^A-Za-z0-9=,._+-]", "_", raw)
    if clean == raw and len(raw) <= 80:
        return raw or "default"
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[
        :8
    ]
    return f"{clean[:60]}-{digest}"


def _set(cfg, key: str, value, known: list[str]):
    if key not in known:
        close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
        raise UsageError(
            f"sweep key {key!r} is not a config field"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; known: {', '.join(known)}"
        )
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    try:
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"sweep value {key}={value!r} does not fit the field: {e}") from None


# --- points and their directories ---


def load(
    config_path: str, overrides: list[str], workdir: str, *, sweep: bool
) -> tuple[str, Path, list[Point]]:
    """(study name, root directory, points), everything checked that can be without a model."""
    base = load_config(config_path, overrides)
    study = base.get("study", "") or Path(config_path.split(":", 1)[0]).stem
    root = workdir or base.get("workdir", "")
    if not root:
        raise UsageError("no work directory: pass --workdir DIR (or --config.workdir=DIR)")
    root = Path(root).expanduser()
    if not sweep:
        cfg = base.copy_and_resolve_references()
        return study, root, [Point("", {}, cfg)]
    known = flat_keys(base.to_dict())
    overridden = {o[len("--config.") :].split("=", 1)[0] for o in overrides}
    points = []
    for values in sweep_points(config_path):
        clash = overridden.intersection(values)
        if clash:
            raise UsageError(
                f"--config.{sorted(clash)[0]} is also set by the sweep; drop one of them"
            )
        cfg = base.copy_and_resolve_references()
        for k, v in values.items():
            _set(cfg, k, v, known)
        points.append(Point(point_name(values), values, cfg))
    dirs = [str(point_dir(root, p)) for p in points]
    if len(set(dirs)) != len(dirs):
        raise UsageError(
            "two sweep points share the directory "
            f"{sorted(d for d in dirs if dirs.count(d) > 1)[0]}"
        )
    return study, root, points


def study_module(study: str):
    """`pvjax.studies.<study>`, or `study` itself when it is a dotted module path."""
    name = study if "." in study else f"pvjax.studies.{study}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name and not name.startswith(f"{e.name}."):
            raise
        raise UsageError(f"unknown study {study!r}: no module {name}") from None
    if not callable(getattr(module, "run", None)):
        raise UsageError(f"study module {name} has no run(cfg, work, progress=...)")
    return module


def git_revision() -> str:
    """The commit of the pvjax checkout that runs (with `-dirty` for uncommitted changes), or
    "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if rev.returncode:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _snapshot(cfg) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in UNCOMPARED}


def point_ledger(work: Path, cfg, module) -> Ledger:
    """The point's ledger, recorded in `point.json`: one stage, `point`, whose settings are the
    config without where it runs (`UNCOMPARED`, `distributed`) and its figure switches (`REDRAWN`).
    A changed config is refused where the directory holds anything of the point's (a record alone,
    left by a run that failed on a bad setting, never blocks the corrected rerun), unless the study
    tracks its own provenance (`OWN_PROVENANCE`): then only the runner's results are redone."""
    own = getattr(module, "OWN_PROVENANCE", False)
    settings = {k: v for k, v in _comparable(_snapshot(cfg)).items() if k not in REDRAWN}
    return Ledger(
        work,
        [
            Stage(
                "point",
                settings,
                outputs=("results.json", "results.csv") if own else ("**/*",),
                keep=not own,
            )
        ],
        record="point.json",
        error=PointMismatch,
    )


class PointMismatch(RunMismatch, UsageError):
    """A point directory holds results of another config; the message names every changed field."""


def check_directory(work: Path, cfg, module) -> bool:
    """Whether `work` holds this point finished (`DONE` under the same config). Refuses a directory
    that holds the point under another config, unless the study tracks its own provenance. Reads
    only."""
    ledger = point_ledger(work, cfg, module)
    ledger.stale()
    old = ledger.extra.get("config") or {}
    if any(_snapshot(cfg).get(k) and not old.get(k) for k in REDRAWN):
        return (
            False  # run again: the study reuses its finished stages and draws what was switched on
        )
    return ledger.done and (work / "results.json").exists()


def run_points(
    study: str,
    root: Path,
    points: list[Point],
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    job: Job = SINGLE,
) -> list[dict]:
    """Run (or skip, or resume) every point; returns the summary rows (with `point` in a sweep) and
    writes `root/summary.csv`. In a multi-process `job` (`join_job`) process p runs the points
    i with i mod P = p (a study that splits its own work between processes, `JOINT`, runs every
    point on every process), the rows meet on process 0, which alone writes `summary.csv`; every
    process returns the same rows."""
    module = study_module(study)
    works = [point_dir(root, p) for p in points]
    joint = job.count > 1 and getattr(module, "JOINT", False)
    job.check_same(
        "sweep",
        {"study": study, **{str(w): _comparable(_snapshot(p.cfg)) for p, w in zip(points, works)}},
    )

    # everything checked before anything runs, on every process (a refusal reaches all)
    def validate():
        for p, work in zip(points, works):
            _cfg_with_workdir(p.cfg, work)
            if hasattr(module, "validate"):
                module.validate(p.cfg, work)

    job.each(validate)
    shared = shared_vectors(root, points) if any(p.name for p in points) else {}
    job.each(
        lambda: [
            check_directory(w, p.cfg, module)
            for p, w in zip(points, works)
            if job.writer or not joint
        ]
    )
    where = {"process": "every" if joint else job.index, "processes": job.count}

    def one(i: int, p: Point, work: Path, done: bool, writes: bool) -> list[dict]:
        label = p.name or str(work)
        if done:
            log(f"[{i + 1}/{len(points)}] {label}: done before, skipped")
            read = lambda: json.loads((work / "results.json").read_text())
            return job.from_writer(read) if joint else read()  # hosts of a pod share no filesystem
        log(
            f"[{i + 1}/{len(points)}] {label}: running {study}"
            + (f" (process {job.index})" if job.count > 1 else "")
        )
        if i in shared and not Path(p.cfg.vector).exists():
            from pvjax.studies.vector_source import vector_spec

            log(f"extracting the vector for {label} into {shared[i][0]}")
            vector_spec(shared[i][1], shared[i][0], progress=progress)
        import pvjax

        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        mesh = (
            p.cfg.mesh.to_dict()
            if "mesh" in p.cfg and hasattr(p.cfg.mesh, "to_dict")
            else job.describe()["mesh"]
        )
        ledger = point_ledger(work, p.cfg, module)
        if writes:
            work.mkdir(parents=True, exist_ok=True)
            ledger.open(
                study=study,
                values=p.values,
                config=_snapshot(p.cfg),
                git_revision=git_revision(),
                pvjax_version=pvjax.__version__,
                python=sys.version.split()[0],
                started=started,
                job={**where, "mesh": mesh},
                **_chat(p.cfg),
            )
        rows = [dict(r) for r in module.run(p.cfg, work, progress=progress)]
        if writes:
            atomic.write_json(work / "results.json", rows)
            atomic.write_csv(work / "results.csv", rows, columns(rows))
            ledger.finish("point")
            ledger.complete()
        return rows

    if job.count == 1 or joint:
        done = job.from_writer(
            lambda: [check_directory(w, p.cfg, module) for p, w in zip(points, works)]
        )
        got = [one(i, p, w, done[i], job.writer) for i, (p, w) in enumerate(zip(points, works))]
    else:
        mine = job.mine(len(points))
        from pvjax.studies.jobs import share_vectors

        share_vectors(
            job,
            shared,
            {i: check_directory(works[i], points[i].cfg, module) for i in mine},
            progress,
            log,
        )

        def my_points():
            with multihost.alone():  # a point runs whole in one process (its extraction too)
                return [
                    one(
                        i,
                        points[i],
                        works[i],
                        check_directory(works[i], points[i].cfg, module),
                        True,
                    )
                    for i in mine
                ]

        got = job.unshare(len(points), job.each(my_points))
    summary = [
        ({**r, "point": p.name} if p.name else r) for p, rows in zip(points, got) for r in rows
    ]
    text = atomic.csv_text(summary, columns(summary)).encode()
    path = root / "summary.csv"
    if job.writer and not (
        path.is_file() and path.read_bytes() == text
    ):  # a no-op rerun rewrites nothing
        atomic.write_bytes(path, text)
    return summary


def _chat(cfg) -> dict:
    """`{"chat": conventions}`: how the model's chat template renders the point's prompts
    (`pvjax.loading.tokenizer.chat_conventions`: Qwen3's thinking switch, a system prompt folded
    into the first user turn), read from the model's files; {} for a config without a model."""
    if not cfg.get("model"):
        return {}
    from pvjax.loading.tokenizer import source_chat_conventions
    from pvjax.settings.fields import enable_thinking

    return {"chat": source_chat_conventions(cfg.model, enable_thinking=enable_thinking(cfg))}


def _comparable(snapshot: dict) -> dict:
    """The snapshot without its `distributed` sections, at any depth (a study nests extraction and
    finetuning configs): where a point ran is not what it computed (process ids differ between
    processes; a rerun with another process count resumes). `enable_thinking` is left out where
    it is off, its value before the field existed, so points recorded then still match."""
    return {
        k: _comparable(v) if isinstance(v, dict) else v
        for k, v in snapshot.items()
        if k != "distributed" and not (k == "enable_thinking" and v is False)
    }


def point_dir(root: Path, p: Point) -> Path:
    """`root/<name>`; `root` itself for `pvjax run`; the point's own `workdir` when its sweep values
    set one (configs/extract.py's sweep names a directory per trait)."""
    if "workdir" in p.values and p.values["workdir"]:
        return Path(p.values["workdir"]).expanduser()
    return root / p.name if p.name else root


def shared_vectors(root: Path, points: list[Point]) -> dict[int, tuple[Path, Any]]:
    """Sweep points that extract their vector first (empty `vector`) share one extraction per
    distinct (trait, model, extraction config), in `root/vectors/<trait>-<hash>/vector/`: a sweep
    over positions or coefficients extracts once. Those points' `vector` is pointed at that file
    (so their recorded config names it); returns, per point index, (directory, config to extract
    with)."""
    from pvjax.studies.vector_source import extraction_config

    out = {}
    for i, p in enumerate(points):
        if "vector" not in p.cfg or p.cfg.vector or not p.cfg.get("extract"):
            continue
        ext = extraction_config(p.cfg, Path("."))
        ext = as_dict(ext)
        ext.pop("workdir")
        ext.pop("distributed", None)  # where it runs, not what it computes: one vector for any job
        if not ext.get("enable_thinking"):  # off: the directory of vectors made before the field
            ext.pop("enable_thinking", None)
        digest = hashlib.sha256(json.dumps(ext, sort_keys=True, default=str).encode()).hexdigest()[
            :8
        ]
        where = (
            root
            / "vectors"
            / f"{re.sub(r'[^A-Za-z0-9._-]', '_', Path(str(p.cfg.trait)).stem)}-{digest}"
        )
        out[i] = (where, p.cfg.copy_and_resolve_references())
        p.cfg.vector = str(where / "vector" / "vectors.safetensors")
    return out


def _cfg_with_workdir(cfg, work: Path) -> None:
    """The point's directory is its config's `workdir` (extraction writes there)."""
    if "workdir" in cfg:
        cfg.workdir = str(work)


def columns(rows: list[dict]) -> list[str]:
    """Column names in first-seen order (the study's own order), `point` last."""
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "point"))
    return cols + (["point"] if any("point" in r for r in rows) else [])


def table(rows: list[dict], max_width: int = 24) -> str:
    """The rows as a fixed-width text table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = columns(rows)

    def cell(v):
        if v is None:
            return ""
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        return s if len(s) <= max_width else s[: max_width - 1] + "~"

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(cols)] + [line(row) for row in cells])
