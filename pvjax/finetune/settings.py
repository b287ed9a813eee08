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
from pvjax.settings import fields as F
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


FIELDS = {
    "model": F.string(nonempty=True),
    "compute_dtype": F.choice("float32", "bfloat16"),
    "dtype": F.choice("", "float32", "bfloat16"),
    "method": F.choice("lora", "full"),
    "remat": F.boolean,
    "seed": F.integer(0),
    "mesh_model": F.integer(1),
    "data.train_file": F.string(nonempty=True),
    "data.eval_file": F.string(),
    "data.eval_fraction": F.number(0.0, 1.0),
    "data.max_length": F.integer(8),
    "data.too_long": F.choice("truncate", "drop", "error"),
    "lora.rank": F.integer(1),
    "lora.alpha": F.number(0.0, lo_open=True),
    "lora.rslora": F.boolean,
    "lora.layers": F.integers,
    "optim.lr": F.number(0.0, lo_open=True),
    "optim.weight_decay": F.number(0.0),
    "optim.warmup_steps": F.integer(0),
    "optim.schedule": F.choice("linear", "cosine"),
    "optim.max_grad_norm": F.number(0.0),
    "batch.rows": F.integer(1),
    "batch.accum": F.integer(1),
    "epochs": F.number(0.0, lo_open=True),
    "max_steps": F.integer(0),
    "eval_every": F.integer(0),
    "log_every": F.integer(1),
    "checkpoint.every": F.integer(1),
    "checkpoint.keep": F.integer(1),
    "steering.type": F.choice(*STEERING_TYPES),
    "steering.coef": F.number(-math.inf),
    "steering.layers": F.integers,
    "penalty.weight": F.number(-math.inf),
    "penalty.layers": F.integers,
    "monitor.layer": F.integer(0),
    "monitor.max_shift": F.number(0.0),
    "vector": F.string(),
    "export.merged": F.boolean,
    "export.adapters": F.boolean,
}


def check(cfg, n_layers: int) -> Checked:
    c = F.as_dict(cfg)
    flat = F.flatten(c)
    problems: list[str] = []
    bad = F.check_fields(flat, FIELDS, problems, known=tuple(flat))  # unknown keys: load_config's
    ok = lambda *keys: not bad.intersection(keys)  # noqa: E731

    def need(good, msg):
        if not good:
            problems.append(msg)

    d, lo, st, pen, mon = c["data"], c["lora"], c["steering"], c["penalty"], c["monitor"]
    if ok("data.train_file"):
        train = resolve_data(d["train_file"])
        need(
            train.is_file(),
            f"data.train_file: {train} is not a file (a .jsonl/.csv path or one "
            f"of {shipped_datasets()})",
        )
    ev = resolve_data(d["eval_file"]) if ok("data.eval_file") and d["eval_file"] else None
    need(ev is None or ev.is_file(), f"data.eval_file: {ev} is not a file")
    need(
        not ok("data.eval_fraction") or d["eval_fraction"] < 1,
        "data.eval_fraction: must be in [0, 1)",
    )
    targets = tuple(lo.get("targets") or ())
    need(
        targets and set(targets) <= set(TARGETS) and len(set(targets)) == len(targets),
        f"lora.targets: a non-empty subset of {list(TARGETS)}, got {list(targets)}",
    )
    for l in lo["layers"] if ok("lora.layers") else ():
        need(l >= 0 and l < n_layers, f"lora.layers: {l!r} is not a block index 0..{n_layers - 1}")

    rows_range = f"0..{n_layers} (hidden-state rows: 0 embeddings, l = output of block l)"
    s_layers = tuple(st["layers"]) if ok("steering.layers") else ()
    for l in s_layers:
        need(0 <= l <= n_layers, f"steering.layers: {l!r} is outside {rows_range}")
    if st.get("type"):
        need(s_layers, f"steering.type={st['type']!r} needs steering.layers")
        need(
            st["type"] != "steer" or st.get("coef"),
            "steering.type='steer' with coef 0 steers nothing",
        )
    p_layers = tuple(pen["layers"]) if ok("penalty.layers") else ()
    for l in p_layers:
        need(0 <= l <= n_layers, f"penalty.layers: {l!r} is outside {rows_range}")
    m_layer = mon["layer"] if ok("monitor.layer") else 0
    need(m_layer <= n_layers, f"monitor.layer: {m_layer!r} is outside {rows_range}")
    uses_vector = bool(st.get("type")) or bool(pen.get("weight")) or bool(mon.get("max_shift"))
    need(
        not uses_vector or c.get("vector"),
        "steering, penalty.weight or monitor.max_shift need `vector` (FILE[:KEY])",
    )
    if problems:
        raise InvalidConfig("bad finetuning config:\n  " + "\n  ".join(problems))

    if not m_layer:
        m_layer = s_layers[0] if s_layers and s_layers[0] else max(1, round(2 * n_layers / 3))
    lora = LoraSpec(
        rank=lo["rank"],
        alpha=float(lo["alpha"]),
        rslora=bool(lo["rslora"]),
        targets=targets,
        layers=tuple(lo.get("layers") or ()),
        full=c["method"] == "full",
    )
    return Checked(
        lora=lora,
        train_file=train,
        eval_file=ev,
        steering_layers=s_layers,
        penalty_layers=p_layers or s_layers or (m_layer,),
        monitor_layer=m_layer,
        needs_vector=bool(c.get("vector")),
    )
