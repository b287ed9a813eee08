"""A finetuning config checked whole before anything is loaded or written.

`check(cfg, n_layers)` looks at every field of `configs/finetune.py` (types, ranges, choices, layer
indices against the model's depth read from its metadata) and reports every problem in one
`InvalidConfig` message, so a typo never costs a model load or a half-written run directory.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from pvjax.finetune.lora import TARGETS, LoraSpec
from pvjax.settings.fields import InvalidConfig, as_dict

__all__ = ["Checked", "InvalidConfig", "as_dict", "check", "resolve_data", "shipped_datasets"]

STEERING_TYPES = ("", "steer", "ablate")
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "finetune"


@dataclasses.dataclass(frozen=True)
class Checked:
    lora: LoraSpec
    train_file: Path
    eval_file: Path | None
    steering_layers: tuple[int, ...]
    penalty_layers: tuple[int, ...]
    monitor_layer: int
    needs_vector: bool


def shipped_datasets() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))


def resolve_data(name: str) -> Path:
    """A path, or the name of a dataset shipped in `pvjax/data/finetune/`."""
    p = Path(name).expanduser()
    if not p.exists() and (DATA_DIR / f"{name}.jsonl").is_file():
        return DATA_DIR / f"{name}.jsonl"
    return p


def check(cfg, n_layers: int) -> Checked:
    c = as_dict(cfg)
    problems: list[str] = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    def is_int(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def is_num(v, lo, open_=False):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > lo if open_ else v >= lo))

    d, lo, st, pen, mon, opt, b = (c["data"], c["lora"], c["steering"], c["penalty"], c["monitor"],
                                    c["optim"], c["batch"])
    need(c.get("model"), "model: empty (a Hugging Face folder, a .gguf, or smollm2-135m-instruct)")
    need(c.get("compute_dtype") in ("float32", "bfloat16"), f"compute_dtype: float32 or bfloat16, got {c.get('compute_dtype')!r}")
    need(c.get("dtype") in ("", "float32", "bfloat16"), f"dtype: '', float32 or bfloat16, got {c.get('dtype')!r}")
    need(c.get("method") in ("lora", "full"), f"method: lora or full, got {c.get('method')!r}")
    need(d.get("train_file"), f"data.train_file: empty (a .jsonl/.csv path or one of {shipped_datasets()})")
    train = resolve_data(d.get("train_file") or "")
    need(not d.get("train_file") or train.is_file(), f"data.train_file: {train} is not a file")
    ev = resolve_data(d["eval_file"]) if d.get("eval_file") else None
    need(ev is None or ev.is_file(), f"data.eval_file: {ev} is not a file")
    need(is_num(d.get("eval_fraction"), 0) and d["eval_fraction"] < 1, "data.eval_fraction: must be in [0, 1)")
    need(is_int(d.get("max_length"), 8), f"data.max_length: an integer >= 8, got {d.get('max_length')!r}")
    need(d.get("too_long") in ("truncate", "drop", "error"), f"data.too_long: truncate, drop or error, got {d.get('too_long')!r}")
    need(is_int(lo.get("rank"), 1), f"lora.rank: a positive integer, got {lo.get('rank')!r}")
    need(is_num(lo.get("alpha"), 0, True), f"lora.alpha: a positive number, got {lo.get('alpha')!r}")
    targets = tuple(lo.get("targets") or ())
    need(targets and set(targets) <= set(TARGETS) and len(set(targets)) == len(targets),
         f"lora.targets: a non-empty subset of {list(TARGETS)}, got {list(targets)}")
    for l in lo.get("layers") or ():
        need(is_int(l, 0) and l < n_layers, f"lora.layers: {l!r} is not a block index 0..{n_layers - 1}")
    need(is_num(opt.get("lr"), 0, True), f"optim.lr: a positive number, got {opt.get('lr')!r}")
    need(is_num(opt.get("weight_decay"), 0), "optim.weight_decay: a number >= 0")
    need(is_int(opt.get("warmup_steps"), 0), "optim.warmup_steps: an integer >= 0")
    need(opt.get("schedule") in ("linear", "cosine"), f"optim.schedule: linear or cosine, got {opt.get('schedule')!r}")
    need(is_num(opt.get("max_grad_norm"), 0), "optim.max_grad_norm: a number >= 0 (0 = no clipping)")
    need(is_int(b.get("rows"), 1), "batch.rows: a positive integer")
    need(is_int(b.get("accum"), 1), "batch.accum: a positive integer")
    need(is_num(c.get("epochs"), 0, True), "epochs: a positive number")
    need(is_int(c.get("max_steps"), 0), "max_steps: an integer >= 0")
    need(is_int(c.get("eval_every"), 0), "eval_every: an integer >= 0")
    need(is_int(c["checkpoint"].get("every"), 1), "checkpoint.every: a positive integer")
    need(is_int(c["checkpoint"].get("keep"), 1), "checkpoint.keep: a positive integer")
    need(is_int(c.get("mesh_model"), 1), "mesh_model: a positive integer")

    rows_range = f"0..{n_layers} (hidden-state rows: 0 embeddings, l = output of block l)"
    need(st.get("type") in STEERING_TYPES, f"steering.type: steer, ablate or empty, got {st.get('type')!r}")
    s_layers = tuple(st.get("layers") or ())
    for l in s_layers:
        need(is_int(l, 0) and l <= n_layers, f"steering.layers: {l!r} is outside {rows_range}")
    need(is_num(st.get("coef"), -math.inf), "steering.coef: a finite number")
    if st.get("type"):
        need(s_layers, f"steering.type={st['type']!r} needs steering.layers")
        need(st["type"] != "steer" or st.get("coef"), "steering.type='steer' with coef 0 steers nothing")
    p_layers = tuple(pen.get("layers") or ())
    for l in p_layers:
        need(is_int(l, 0) and l <= n_layers, f"penalty.layers: {l!r} is outside {rows_range}")
    need(is_num(pen.get("weight"), -math.inf), "penalty.weight: a finite number")
    m_layer = mon.get("layer", 0)
    need(is_int(m_layer, 0) and m_layer <= n_layers, f"monitor.layer: {m_layer!r} is outside {rows_range}")
    need(is_num(mon.get("max_shift"), 0), "monitor.max_shift: a number >= 0 (0 = never stop early)")
    uses_vector = bool(st.get("type")) or bool(pen.get("weight")) or bool(mon.get("max_shift"))
    need(not uses_vector or c.get("vector"), "steering, penalty.weight or monitor.max_shift need `vector` (FILE[:KEY])")
    if problems:
        raise InvalidConfig("bad finetuning config:\n  " + "\n  ".join(problems))

    if not m_layer:
        m_layer = s_layers[0] if s_layers and s_layers[0] else max(1, round(2 * n_layers / 3))
    lora = LoraSpec(rank=lo["rank"], alpha=float(lo["alpha"]), rslora=bool(lo["rslora"]), targets=targets,
                    layers=tuple(lo.get("layers") or ()), full=c["method"] == "full")
    return Checked(lora=lora, train_file=train, eval_file=ev, steering_layers=s_layers,
                   penalty_layers=p_layers or s_layers or (m_layer,), monitor_layer=m_layer,
                   needs_vector=bool(c.get("vector")))
