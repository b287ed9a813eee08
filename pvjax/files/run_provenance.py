"""What produced each stage of a run directory, and what a rerun under another config must do.

A run directory is resumed by skipping the files that exist, so it must know exactly what produced
them, or a rerun with other settings returns old results under a new label. `stages.json` records,
per stage, every input that can change that stage's files: the config fields it reads (resolved:
the dtype the model really loaded in, the layer list an empty `causality.layers` stands for), the
trait content it reads (instruction pairs and questions for the answers, the rubric for the judge)
as a hash, and the digest of the stage before it, so a change anywhere upstream reaches every stage
below. The invariant: every stage output present was produced under the provenance recorded for
its stage. `stages.json` is written, atomically, after stale outputs are deleted and before any new
output is written, so a kill at any point keeps it true.

A rerun compares the recorded provenance with the config's:
- answers (expensive, and the thing a run exists to keep) are never deleted or relabelled: a
  difference there is refused, naming each field with its old and new value;
- the contrast scores (`filter.mode=contrast`) depend on the answers alone: they are computed once,
  when a contrast filter first asks for them, and kept across judge and filter changes;
- a difference in judge, filter or causality deletes that stage's outputs and everything downstream
  (the judge cache stays: it is keyed by the exact request, so it can only serve identical calls).
Fields that cannot change a result (plot on/off, judge concurrency and batch size, progress bars)
are not recorded and so never cause either; neither are seed and top_p under greedy decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pvjax.files import atomic
from pvjax.errors import UserError

FORMAT = 1
STAGES = ("answers", "contrast", "judge", "filter", "causality")


class RunMismatch(UserError, ValueError):
    """The workdir holds answers made under other settings; the message names them."""


def outputs(stage: str, trait_name: str) -> tuple[str, ...]:
    """The files a stage writes, relative to the run directory (the answers stage: its parts)."""
    return {"answers": ("answers/parts",),
            "contrast": ("contrast_scores.csv",),
            "judge": (f"{trait_name}_pos.csv", f"{trait_name}_neg.csv"),
            "filter": ("kept_pairs.csv", "scores.csv", "vectors.safetensors"),
            "causality": ("causality.json", "summary.json", "plot.png", "DONE")}[stage]


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_provenance(checked) -> dict[str, dict]:
    """Per stage, the inputs that can change its files, from a `CheckedConfig`."""
    cfg, trait = checked.cfg, checked.trait
    pairs = trait.instruction[: cfg["n_pairs"] or None]
    questions = trait.questions[: cfg["n_questions"] or None]
    answers = {
        "trait": trait.name,
        # The whole lists, not the prefix used, so a change of n_pairs is not reported as a content change too.
        "trait_content": _digest({"instruction": [[p.pos, p.neg] for p in trait.instruction],
                                  "questions": list(trait.questions)}),
        "model": cfg["model"], "model_fingerprint": checked.model_config.fingerprint(), "dtype": checked.dtype,
        "n_pairs": len(pairs), "n_questions": len(questions), "n_per_question": cfg["n_per_question"],
        "max_new_tokens": cfg["max_new_tokens"], "temperature": float(cfg["temperature"]),
        # Batch composition changes the matmul shapes, and so the last bits, and so greedy ties.
        "batch_size": cfg["batch_size"],
        "pos_name": cfg["pos_name"] or trait.name, "neg_name": cfg["neg_name"] or "helpful",
    }
    if cfg["temperature"] > 0:
        answers.update(seed=cfg["seed"], top_p=float(cfg["top_p"]))
    if not cfg["unroll"]:  # recorded only when scanned, so runs made before the field existed still match
        answers["unroll"] = False
    # What the contrast scores are a function of: the answers (model, prompts and texts) and the score's
    # definition. The file exists only once a contrast filter asked for it.
    contrast = {"score": "mean token logprob | pos prompt - | neg prompt", "after": _digest(answers)}
    j = cfg["judge"]
    # A local judge named "" or "same" is the answering model, which the answers' digest pins.
    judge_model = "same" if j["backend"] == "local" and j["model"] in ("", "same") else j["model"]
    judge = {"backend": j["backend"], "model": judge_model, "coherence": j["coherence"],
             "trait_rubric": _digest(trait.eval_prompt), "after": _digest(answers)}
    if j["backend"] == "none":  # no judge: no model, rubric or coherence can change its (empty) scores
        judge = {"backend": "none", "after": _digest(answers)}
    elif j["backend"] == "openai":
        from pvjax.llm.openai_http import DEFAULT_BASE_URL

        judge["base_url"] = (j["base_url"] or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    else:
        judge["numeric_only"] = j["numeric_only"]
    f = cfg["filter"]
    filt = {"mode": f["mode"], "coherence": float(f["coherence"]), "min_pairs": f["min_pairs"],
            "after": _digest(judge)}
    rule = {"threshold": "threshold", "margin": "margin", "contrast": "contrast_margin"}.get(f["mode"])
    if rule:
        filt[rule] = float(f[rule])
    if f["mode"] == "contrast":
        filt["contrast"] = _digest(contrast)
    c = cfg["causality"]
    causality = {"layers": list(checked.causality_layers), "coefs": [float(x) for x in c["coefs"]],
                 "max_pairs": c["max_pairs"], "batch_size": cfg["batch_size"], "after": _digest(filt)}
    return {"answers": answers, "contrast": contrast, "judge": judge, "filter": filt, "causality": causality}


def read(work: Path) -> dict[str, dict]:
    """The recorded provenance per stage; empty for a directory without (or with an older) record."""
    path = work / "stages.json"
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return d.get("stages", {}) if isinstance(d, dict) and d.get("format") == FORMAT else {}


def _answers_exist(work: Path) -> bool:
    parts = work / "answers" / "parts"
    return parts.is_dir() and any(parts.glob("*.csv"))


def stale_stages(work: Path, new: dict[str, dict]) -> list[str]:
    """The stages whose outputs no longer match `new` (the first changed stage and all after it).
    Raises `RunMismatch` when answers exist that were made under other (or unrecorded) settings.
    Reads only."""
    old = read(work)
    if _answers_exist(work) and old.get("answers") != new["answers"]:
        if "answers" not in old:
            raise RunMismatch(f"{work} holds answers with no record of what produced them (a run of an "
                              "older pvjax); use a new workdir")
        was, now = old["answers"], new["answers"]
        keys = [k for k in dict.fromkeys([*was, *now]) if was.get(k) != now.get(k)]
        hint = (" (trait_content hashes the trait's instruction pairs and questions)"
                if "trait_content" in keys else "")
        raise RunMismatch(
            f"{work} holds answers made with different {', '.join(keys)} "
            f"({'; '.join(f'{k}: {was.get(k)!r} -> {now.get(k)!r}' for k in keys)}){hint}; answers are "
            "never relabelled or deleted: use a new workdir, or rerun with the old values")
    for i, stage in enumerate(STAGES):
        if old.get(stage) != new[stage]:
            return list(STAGES[max(i, 1):])
    return []


def reset(work: Path, new: dict[str, dict], stale: list[str], trait_name: str) -> None:
    """Delete the outputs of the `stale` stages (never answers), then record `new` atomically."""
    for stage in stale:
        assert stage != "answers", "answers are never deleted"
        for name in outputs(stage, trait_name):
            (work / name).unlink(missing_ok=True)
    atomic.write_json(work / "stages.json", {"format": FORMAT, "stages": new})
