"""`train(cfg, workdir)`: supervised finetuning from a `configs/finetune.py` config, resumable.

The run: check the config whole, load the model, read the vector (checked against the model),
tokenize and pack the data (every truncated or dropped sample counted), build the train state
already sharded, restore the latest checkpoint if the workdir has one (same config and base model,
or a clear refusal), then step. Every `eval_every` steps the model as inference sees it (no
steering) is evaluated on the held-out rows: loss, and the trait shift, the mean projection of
assistant tokens onto the unit vector at `monitor.layer` minus the base model's. A shift past
`monitor.max_shift` stops the run early; a NaN or infinite loss or gradient stops it with the step
and the last good checkpoint named. At the end the adapters are merged and exported
(`pvjax.finetune.export`), `summary.json` is written and `DONE` last; a finished run is not rerun
(the run directory's ledger, `checkpoint.train_ledger`, records what produced it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pvjax.errors import UsageError, UserError
from pvjax.files import atomic
from pvjax.finetune import checkpoint, data, export, lora, settings
from pvjax.finetune import step as st


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the gradient went NaN or infinite; names the step and the last good
    checkpoint."""


@dataclasses.dataclass
class Setup:
    """Everything a run (or a reload of its checkpoints) builds before the first step."""

    cfg: dict
    checked: settings.Checked
    model: object
    step_settings: st.StepSettings
    optimizer: object
    schedule: object
    mesh: object
    state: st.TrainState
    frozen: dict
    shardings: object
    fwd: st.TrainingForward
    monitor_probes: object
    vector_info: dict
    total_steps: int
    rows: data.PackedRows
    eval_rows: data.PackedRows | None
    reports: list
    optimizer_key: tuple = ()


def _training_forward(c, chk, model, v):
    """Preventative steering / CAFT and the penalty probes, from the config and the vector."""
    from pvjax import interventions

    L, D = model.n_layers + 1, model.hidden_size
    # No steering is the identity intervention (exact: every coefficient zero), not None: runs of a
    # study with and without steering or ablation then share one compiled step.
    iv = interventions.build(L, D)
    kind = c["steering"]["type"]
    if kind == "steer":
        iv = interventions.build(
            L, D, steer=[(v, list(chk.steering_layers), float(c["steering"]["coef"]))]
        )
    elif kind == "ablate":
        iv = interventions.build(L, D, ablate=[(v, list(chk.steering_layers))])
    probes = None
    if c["penalty"]["weight"]:
        probes = _unit_probes(v, chk.penalty_layers, L, D)
    return st.TrainingForward(iv, probes, jnp.asarray(float(c["penalty"]["weight"]), jnp.float32))


def _unit_probes(v, layers, L, D):
    """`[L, 1, D]`: the unit vector of each listed row divided by their number, zeros elsewhere, so
    summing the projections over rows gives the mean over the listed rows."""
    p = np.zeros((L, 1, D), np.float32)
    for l in layers:
        row = v[l] if v.ndim == 2 else v
        p[l, 0] = row / np.linalg.norm(row) / len(layers)
    return jnp.asarray(p)


def _datasets(c, chk, tokenizer):
    d = c["data"]
    samples = data.read_samples(chk.train_file)
    if chk.eval_file is not None:
        eval_samples = data.read_samples(chk.eval_file)
    else:
        n_eval = min(int(round(len(samples) * d["eval_fraction"])), len(samples) - 1)
        order = np.random.default_rng([c["seed"], 7]).permutation(len(samples))
        eval_samples = [samples[i] for i in sorted(order[:n_eval])]
        samples = [samples[i] for i in sorted(order[n_eval:])]

    def pack(some, source):
        ex, rep = data.build_examples(
            tokenizer, some, max_length=d["max_length"], too_long=d["too_long"], source=source
        )
        return data.pack_rows(ex, d["max_length"], rep), rep

    rows, rep = pack(samples, f"{chk.train_file.name} (train)")
    reports, eval_rows = [rep], None
    if eval_samples:
        eval_rows, erep = pack(eval_samples, f"{(chk.eval_file or chk.train_file).name} (eval)")
        reports.append(erep)
    return rows, eval_rows, reports


def setup(cfg, *, model=None, mesh=None) -> Setup:
    """Check the config, load what it names, and build the initial (sharded) train state."""
    import pvjax
    from pvjax.loading import read_model_config
    from pvjax.parallel import sharding

    c = settings.as_dict(cfg)
    n_layers = model.n_layers if model is not None else read_model_config(c["model"]).num_layers
    chk = settings.check(c, n_layers)
    if model is None:
        model = pvjax.load(c["model"], dtype=c["dtype"] or None)
    v, vinfo = None, {}
    if chk.needs_vector:
        from pvjax.files.vectors import read_vector, split_spec

        v = read_vector(c["vector"], model)
        path, key = split_spec(c["vector"])
        vinfo = {
            "spec": c["vector"],
            "file": str(path.absolute()),
            "key": key or "default",
            "sha256": checkpoint.file_sha256(path),
        }
    fwd = _training_forward(c, chk, model, v) if v is not None else st.TrainingForward()
    L, D = model.n_layers + 1, model.hidden_size
    monitor = _unit_probes(v, (chk.monitor_layer,), L, D) if v is not None else None

    mesh = mesh or sharding.make_mesh(model=c["mesh_model"])
    if c["batch"]["rows"] % mesh.shape["data"]:
        raise UsageError(
            f"batch.rows={c['batch']['rows']} does not split over the mesh's "
            f"{mesh.shape['data']} data devices"
        )
    rows, eval_rows, reports = _datasets(c, chk, model.tokenizer)
    per_step = c["batch"]["rows"] * c["batch"]["accum"]
    total = c["max_steps"] or max(1, math.ceil(c["epochs"] * rows.n_rows / per_step))

    compute = c["compute_dtype"]
    params = model.params
    if not chk.lora.full and compute != "float32":  # a frozen base needs no float32 master copy
        params = jax.tree_util.tree_map(lambda x: x.astype(compute), params)
    step_settings = st.StepSettings(model.config, chk.lora, compute, bool(c["remat"]))
    key = jax.random.PRNGKey(c["seed"])
    abstract = jax.eval_shape(lambda p, k: lora.split(chk.lora, p, k)[0], params, key)
    o = c["optim"]
    optimizer, schedule = st.make_optimizer(
        o["lr"],
        total,
        warmup_steps=o["warmup_steps"],
        schedule=o["schedule"],
        weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"],
        decay_mask=lora.decay_mask(chk.lora, abstract),
    )
    opt_key = (total, *sorted((k, v) for k, v in o.items()))
    state, frozen, shardings = st.init_state(
        step_settings, optimizer, params, key, mesh, opt_key=opt_key
    )
    return Setup(
        c,
        chk,
        model,
        step_settings,
        optimizer,
        schedule,
        mesh,
        state,
        frozen,
        shardings,
        fwd,
        monitor,
        vinfo,
        total,
        rows,
        eval_rows,
        reports,
        opt_key,
    )


def evaluate(s: Setup, state) -> dict:
    """Eval loss and mean monitor projection (no steering) over the held-out rows (else the
    training rows), in micro-batches of `batch.rows` (the last padded with empty rows)."""
    rows = s.eval_rows or s.rows
    R = s.cfg["batch"]["rows"]
    fn = _eval_fn(s)
    nll = tok = proj = 0.0
    probes = s.monitor_probes
    for start in range(0, rows.n_rows, R):
        idx = np.arange(start, start + R)
        mb = rows.take(np.minimum(idx, rows.n_rows - 1))
        for k in mb:  # padding rows: no tokens, no loss
            mb[k][idx >= rows.n_rows] = 0
        out = fn(
            state.trainable,
            s.frozen,
            st.place(
                mb, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec("data", None))
            ),
            probes,
        )
        n, t, p = (float(x) for x in jax.device_get(out))
        nll, tok, proj = nll + n, tok + t, proj + p
    out = {"eval_loss": nll / max(tok, 1.0)}
    if probes is not None:
        out["projection"] = proj / max(tok, 1.0)
    return out


def _eval_fn(s: Setup):
    return st.compile_eval(s.step_settings, s.mesh, s.shardings, s.frozen)


def train(
    cfg,
    workdir=None,
    *,
    model=None,
    progress: bool = True,
    mesh=None,
    until_step: int | None = None,
) -> dict:
    """Run (or resume, or return the summary of) the finetune `cfg` describes, in `workdir`
    (default `cfg.workdir`). `model` skips loading the base (a study that runs several finetunes
    of one model). Returns the summary also written to `<workdir>/summary.json`. `until_step`
    pauses after that step as a kill would (checkpoint saved, nothing exported, no summary): the
    next call resumes, for jobs cut into time slices."""
    c = settings.as_dict(cfg)
    work = Path(workdir or c.get("workdir") or "")
    if not str(workdir or c.get("workdir") or ""):
        raise UsageError("no workdir: pass --workdir DIR (or set config.workdir)")
    c["workdir"] = str(work)
    job = _join(c)  # before anything touches a device; one process unless `distributed` names a job
    progress = progress and job.writer

    ledger = checkpoint.train_ledger(work, c) if job.writer else None

    def finished():  # on process 0, the writer: before anything loads, another config is refused
        ledger.stale()
        return json.loads((work / "summary.json").read_text()) if ledger.done else None

    done = job.from_writer(finished)
    if done is not None:
        return done
    s = setup(c, model=model, mesh=mesh)
    if job.writer:
        work.mkdir(parents=True, exist_ok=True)
        ledger.open()
        checkpoint.write_config(work, c)
        atomic.write_json(work / "vector.json", s.vector_info)
        for r in s.reports:
            print(r.line(), flush=True)
    cfg_hash = checkpoint.config_hash(c)
    ckpts = checkpoint.Checkpoints(work, keep=c["checkpoint"]["keep"])
    meta_base = {
        "model_id": s.model.model_id,
        "model_fingerprint": s.model.config.fingerprint(),
        "config_hash": cfg_hash,
    }
    state, log = s.state, []
    latest = ckpts.latest()
    if latest is not None:
        checkpoint.check_meta(ckpts.meta(latest), s.model, cfg_hash, ckpts.dir / str(latest))
        state, meta = ckpts.restore(latest, s.state, s.shardings)
        base_proj = meta.get("base_projection")
        log = [m for m in job.from_writer(lambda: _read_log(work)) if m["step"] <= latest]
        if job.writer:
            print(f"resumed from step {latest} of {s.total_steps}", flush=True)
    else:  # the base model's eval loss (and projection, the shift's zero) as step 0
        ev0 = evaluate(s, state)
        base_proj = ev0.get("projection")
        log = [{"step": 0, **ev0, **({"shift": 0.0} if base_proj is not None else {})}]
    if job.writer:
        atomic.write_text(work / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in log))

    step_fn = st.compile_step(
        s.step_settings, s.optimizer, s.mesh, s.shardings, s.frozen, key=s.optimizer_key
    )
    per_step = c["batch"]["rows"] * c["batch"]["accum"]
    bsh = st.batch_sharding(s.mesh)
    k, stopped, last_saved = int(jax.device_get(state.step)), "done", latest
    bar = _progress(progress, s.total_steps, k)
    with open(work / "metrics.jsonl", "a") if job.writer else contextlib.nullcontext() as logf:

        def record(m):
            log.append(m)
            if logf is not None:
                logf.write(json.dumps(m) + "\n")
                logf.flush()

        def save(k):
            ckpts.save(
                k,
                state,
                {
                    **meta_base,
                    "step": k,
                    "data_position": k * per_step,
                    "base_projection": base_proj,
                },
            )

        end = s.total_steps if until_step is None else min(until_step, s.total_steps)
        while k < end:
            batch = data.stack_step(
                s.rows, data.step_rows(s.rows.n_rows, k, per_step, c["seed"]), c["batch"]["accum"]
            )
            t0 = time.perf_counter()
            state, met = step_fn(state, s.frozen, st.place(batch, bsh), s.fwd)
            met = {name: float(x) for name, x in jax.device_get(met).items()}
            k += 1
            if not (math.isfinite(met["loss"]) and math.isfinite(met["grad_norm"])):
                ckpts.close()
                where = (
                    f"step {last_saved} in {ckpts.dir}"
                    if last_saved is not None
                    else "none (no checkpoint was saved before it)"
                )
                raise TrainingDiverged(
                    f"the loss went {met['loss']} (gradient norm {met['grad_norm']}) at "
                    f"step {k} of {s.total_steps}; training stopped. Last good checkpoint: "
                    f"{where}; lower optim.lr or check the data"
                )
            record(
                {
                    "step": k,
                    **met,
                    "lr": float(s.schedule(k - 1)),
                    "seconds": time.perf_counter() - t0,
                }
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{met['loss']:.3f}")
            if (c["eval_every"] and k % c["eval_every"] == 0) or k == s.total_steps:
                ev = evaluate(s, state)
                if base_proj is not None:
                    ev["shift"] = ev["projection"] - base_proj
                record({"step": k, **ev})
                bound = c["monitor"]["max_shift"]
                if bound and ev.get("shift", 0.0) > bound:
                    stopped = (
                        f"trait shift {ev['shift']:.3f} > monitor.max_shift={bound} at step {k}"
                    )
            if k % c["checkpoint"]["every"] == 0 or k == s.total_steps or stopped != "done":
                save(k)
                last_saved = k
            if stopped != "done":
                break
    if bar is not None:
        bar.close()
    if last_saved != k:
        save(k)
    ckpts.close()
    if k < s.total_steps and stopped == "done":
        return {
            "workdir": str(work),
            "steps": k,
            "total_steps": s.total_steps,
            "stopped": "paused",
            "losses": [m["loss"] for m in log if "loss" in m],
        }
    summary = _finish(s, state, work, log, k, stopped, base_proj, job)
    summary["job"] = {k: v for k, v in job.describe().items() if k != "process"}
    summary["job"]["mesh"] = dict(s.mesh.shape)  # the training mesh spans every process's devices
    if job.writer:
        atomic.write_json(work / "summary.json", summary)
        ledger.finish("train")
        ledger.complete()
    return summary


def _join(c: dict):
    """The job this run is part of (`pvjax.parallel.multihost`): every process runs the same config,
    the mesh spans all their devices (each feeds its own shards of the batch, `step.place`)."""
    from pvjax.parallel import multihost

    d = c.get("distributed") or {}
    if not d.get("coordinator"):
        return multihost.SINGLE
    job = multihost.join(d)
    job.check_same("training config", {k: v for k, v in c.items() if k != "distributed"})
    return job


def _host(tree, job):
    """`tree` as whole host arrays on every process (all must call it): a weight sharded across
    processes is gathered first, since no process holds it all."""
    if job.count == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _finish(s: Setup, state, work: Path, log, k, stopped, base_proj, job) -> dict:
    c = s.cfg
    extra = {
        "base_model": s.model.model_id,
        "base_source": s.model.source,
        "step": k,
        "vector": s.vector_info,
        "config": c,
    }
    out = {}
    if c["export"]["merged"]:
        params = _host(
            lora.merge(s.checked.lora, state.trainable, s.frozen, dtype=s.model.dtype), job
        )
        out["merged"] = str(work / "export" / "merged")
        if job.writer:
            export.save_hf_folder(
                work / "export" / "merged", s.model.config, params, s.model.tokenizer, extra=extra
            )
    if c["export"]["adapters"] and not s.checked.lora.full:
        trainable = _host(state.trainable, job)
        out["adapter"] = str(work / "export" / "adapter")
        if job.writer:
            export.save_peft_adapter(
                work / "export" / "adapter",
                s.checked.lora,
                trainable,
                s.model.config,
                base=s.model.source,
                extra=extra,
            )
    losses = [m["loss"] for m in log if "loss" in m]
    evals = [m for m in log if "eval_loss" in m]
    return {
        "workdir": str(work),
        "model": s.model.model_id,
        "steps": k,
        "total_steps": s.total_steps,
        "stopped": stopped,
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "eval": evals[-1] if evals else None,
        "evals": evals,
        "monitor_layer": s.checked.monitor_layer,
        "base_projection": base_proj,
        "shift": evals[-1].get("shift") if evals else None,
        "data": [dataclasses.asdict(r) for r in s.reports],
        "vector": s.vector_info,
        "export": out,
    }


def _read_log(work: Path) -> list[dict]:
    path = work / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _progress(on: bool, total: int, done: int):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="finetune", unit="step")


def load_finetuned(workdir, *, model=None, step: int | None = None):
    """The finetuned model of a run directory (latest checkpoint, or `step`), adapters merged, for
    inference without steering: a plain `pvjax.Model`. `model` is the base, if already loaded."""
    work = Path(workdir)
    cfg_path = work / "train_config.json"
    if not cfg_path.exists():
        raise UsageError(f"{work} holds no finetuning run (no train_config.json)")
    s = setup(json.loads(cfg_path.read_text()), model=model)
    ckpts = checkpoint.Checkpoints(work)
    step = ckpts.latest() if step is None else step
    if step is None:
        raise UsageError(f"{work} has no checkpoint yet")
    checkpoint.check_meta(
        ckpts.meta(step), s.model, checkpoint.config_hash(s.cfg), ckpts.dir / str(step)
    )
    state, _ = ckpts.restore(step, s.state, s.shardings)
    ckpts.close()
    params = lora.merge(s.checked.lora, state.trainable, s.frozen, dtype=s.model.dtype)
    return s.model.replace(params=params, source=f"{work}@step{step}")
