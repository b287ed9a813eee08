"""Training checkpoints (orbax): the train state, the step's data position and what produced them.

A run directory holds:

    stages.json            the ledger (`train_ledger`): what produced the run (config, data files'
    sha256),
                           whether it finished; a resume under another config or data is refused
    train_config.json      the training config (what `load_finetuned` rebuilds the run from)
    vector.json            the steering/penalty/monitor vector's provenance (file, key, sha256,
    metadata) checkpoints/<step>/    orbax: `state` (TrainState: step, trainable params, optimiser
    state, PRNG)
                           and `meta` (data position, model fingerprint, config hash, the monitor's
                           base projection); orbax writes a step atomically, so a step that is
                           listed is whole.
    metrics.jsonl          one line per step (loss, grad norm, lr) and per evaluation

Resuming restores the latest step into a state laid out like a fresh one (same shardings), and
the data position follows from the step (`data.step_rows`), so the loss curve of a resumed run is
identical to an uninterrupted one. In a multi-process job every process calls `save` / `restore`
(orbax writes each process's shards and lets the primary process write the metadata; the
checkpoint directory must be one filesystem all processes see); everything else in the run
directory is written by process 0 alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax

from pvjax.files import atomic
from pvjax.files.ledger import Ledger, RunMismatch, Stage

# Config fields a resumed run may change: where it runs and how often it reports or saves.
MAY_DIFFER = (
    "workdir",
    "checkpoint.every",
    "checkpoint.keep",
    "log_every",
    "export.merged",
    "export.adapters",
    "progress",
    "distributed.coordinator",
    "distributed.num_processes",
    "distributed.process_id",
    "distributed.timeout",
)


class CheckpointMismatch(RunMismatch):
    """A run directory whose checkpoints come from another config or another base model."""


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_hash(cfg: dict) -> str:
    kept = {k: v for k, v in _flat(cfg).items() if k not in MAY_DIFFER}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_ledger(work: Path, cfg: dict) -> Ledger:
    """The run directory's ledger (`stages.json`, `pvjax.files.ledger`): one stage, `train`,
    recorded with every config field but `MAY_DIFFER` and the content (sha256) of the training and
    eval files. Checkpoints are never relabelled: a resume under another config or changed data is
    refused (`CheckpointMismatch`), naming each field, where the directory holds anything of the
    run's; `DONE` (after `summary.json`) marks it finished."""
    from pvjax.finetune.settings import resolve_data

    d = cfg.get("data") or {}
    files = [resolve_data(f) for f in (d.get("train_file"), d.get("eval_file")) if f]
    kept = {
        k: v
        for k, v in _flat(json.loads(json.dumps(cfg, default=str))).items()
        if k not in MAY_DIFFER
    }
    return Ledger(
        work,
        [
            Stage(
                "train",
                kept,
                inputs=tuple(f for f in files if f.is_file()),
                outputs=("checkpoints", "metrics.jsonl", "vector.json", "export", "summary.json"),
                keep=True,
            )
        ],
        error=CheckpointMismatch,
    )


def write_config(work: Path, cfg: dict) -> None:
    """`train_config.json`, the config a reload (`load_finetuned`) rebuilds the run from; left as it
    is (bytes and mtime) when it already holds this config."""
    path = work / "train_config.json"
    text = json.dumps(cfg, indent=2, default=str) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic.write_text(path, text)


class Checkpoints:
    """An orbax CheckpointManager over `<work>/checkpoints` that keeps the last `keep` steps."""

    def __init__(self, work: Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.dir = Path(work).absolute() / "checkpoints"
        self.mngr = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        ocp = self._ocp
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.mngr.wait_until_finished()

    def meta(self, step: int) -> dict:
        ocp = self._ocp
        return dict(
            self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        )

    def restore(self, step: int, like_state, shardings):
        """The state of `step`, laid out with `shardings` (a fresh state's)."""
        ocp = self._ocp
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like_state, shardings
        )
        got = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return got.state, dict(got.meta)

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def check_meta(meta: dict, model, cfg_hash: str, where: Path) -> None:
    """Refuse a checkpoint of another base model or another config."""
    fp = model.config.fingerprint()
    if meta.get("model_fingerprint") != fp or meta.get("model_id") != model.model_id:
        raise CheckpointMismatch(
            f"{where} was trained from {meta.get('model_id')!r} (fingerprint "
            f"{meta.get('model_fingerprint')}), "
            f"not {model.model_id!r} ({fp}); use a new workdir"
        )
    if meta.get("config_hash") != cfg_hash:
        raise CheckpointMismatch(
            f"{where} was saved by another training config (hash {meta.get('config_hash')}, "
            f"now {cfg_hash}); use a new workdir"
        )


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
