"""Extraction's stages for the run-directory ledger (`pvjax.files.ledger`): what produced each.

A run directory is resumed by skipping the files that exist, so it must know exactly what produced
them, or a rerun with other settings returns old results under a new label. `stages.json` (the
ledger's record) holds, per stage, every input that can change that stage's files: the config fields
it reads (resolved: the dtype the model really loaded in, the layer list an empty `causality.layers`
stands for), the trait content it reads (instruction pairs and questions for the answers, the rubric
for the judge) as a hash, and the digest of the stage before it, so a change anywhere upstream
reaches every stage below. The invariant (the ledger's): every stage output present was produced
under the provenance recorded for its stage.

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

import os

from pvjax.files.ledger import RunMismatch, Stage
from pvjax.files.ledger import digest as _digest

__all__ = ["RunMismatch", "STAGES", "stage_provenance", "stages"]
STAGES = ("answers", "contrast", "judge", "filter", "causality")


def stage_provenance(checked, judge_url: str = "") -> dict[str, dict]:
    """Per stage, the inputs that can change its files, from a `CheckedConfig`; `judge_url` is an
    OpenAI-compatible judge's base URL with its defaults resolved."""
    cfg, trait = checked.cfg, checked.trait
    pairs = trait.instruction[: cfg["n_pairs"] or None]
    questions = trait.questions[: cfg["n_questions"] or None]
    answers = {
        "trait": trait.name,
        # The whole lists, not the prefix used, so a change of n_pairs is not reported as a content
        # change too.
        "trait_content": _digest(
            {
                "instruction": [[p.pos, p.neg] for p in trait.instruction],
                "questions": list(trait.questions),
            }
        ),
        "model": cfg["model"],
        "model_fingerprint": checked.model_config.fingerprint(),
        "dtype": checked.dtype,
        "n_pairs": len(pairs),
        "n_questions": len(questions),
        "n_per_question": cfg["n_per_question"],
        "max_new_tokens": cfg["max_new_tokens"],
        "temperature": float(cfg["temperature"]),
        # Batch composition changes the matmul shapes, and so the last bits, and so greedy ties.
        "batch_size": cfg["batch_size"],
        "pos_name": cfg["pos_name"] or trait.name,
        "neg_name": cfg["neg_name"] or "helpful",
    }
    if cfg["temperature"] > 0:
        answers.update(seed=cfg["seed"], top_p=float(cfg["top_p"]))
    # How the chat template rendered the prompts (a thinking switch's value, a system prompt
    # folded into the user turn): recorded where the template has either, so runs of models
    # without them match the records made before the field existed.
    chat = getattr(checked, "chat", None) or {}
    if chat.get("system_folded") or chat.get("enable_thinking") is not None:
        answers["chat"] = dict(chat)
    if not cfg[
        "unroll"
    ]:  # recorded only when scanned, so runs made before the field existed still match
        answers["unroll"] = False
    # What the contrast scores are a function of: the answers (model, prompts and texts) and the
    # score's
    # definition. The file exists only once a contrast filter asked for it.
    contrast = {
        "score": "mean token logprob | pos prompt - | neg prompt",
        "after": _digest(answers),
    }
    j = cfg["judge"]
    # A local judge named "" or "same" is the answering model, which the answers' digest pins.
    judge_model = "same" if j["backend"] == "local" and j["model"] in ("", "same") else j["model"]
    judge = {
        "backend": j["backend"],
        "model": judge_model,
        "coherence": j["coherence"],
        "trait_rubric": _digest(trait.eval_prompt),
        "after": _digest(answers),
    }
    if (
        j["backend"] == "none"
    ):  # no judge: no model, rubric or coherence can change its (empty) scores
        judge = {"backend": "none", "after": _digest(answers)}
    elif j["backend"] == "openai":
        # Resolved by the caller (`pvjax.llm.openai_http.base_url_of`: a leaf does not import the
        # client).
        judge["base_url"] = judge_url or (
            j["base_url"] or os.environ.get("OPENAI_BASE_URL", "")
        ).rstrip("/")
    else:
        judge["numeric_only"] = j["numeric_only"]
    f = cfg["filter"]
    filt = {
        "mode": f["mode"],
        "coherence": float(f["coherence"]),
        "min_pairs": f["min_pairs"],
        "after": _digest(judge),
    }
    rule = {"threshold": "threshold", "margin": "margin", "contrast": "contrast_margin"}.get(
        f["mode"]
    )
    if rule:
        filt[rule] = float(f[rule])
    if f["mode"] == "contrast":
        filt["contrast"] = _digest(contrast)
    c = cfg["causality"]
    causality = {
        "layers": list(checked.causality_layers),
        "coefs": [float(x) for x in c["coefs"]],
        "max_pairs": c["max_pairs"],
        "batch_size": cfg["batch_size"],
        "after": _digest(filt),
    }
    return {
        "answers": answers,
        "contrast": contrast,
        "judge": judge,
        "filter": filt,
        "causality": causality,
    }


def stages(checked, provenance: dict[str, dict] | None = None) -> list[Stage]:
    """Extraction's stages for its `Ledger`, in order: answers are kept (a change is refused where
    answers exist), the others are redone with every stage after them when their provenance
    changes (the judge cache stays: it is keyed by the exact request, so it only serves identical
    calls)."""
    provenance = provenance or stage_provenance(checked)
    name = checked.trait.name
    outputs = {
        "answers": ("answers/parts/*.csv",),
        "contrast": ("contrast_scores.csv",),
        "judge": (f"{name}_pos.csv", f"{name}_neg.csv"),
        "filter": ("kept_pairs.csv", "scores.csv", "vectors.safetensors"),
        "causality": ("causality.json", "summary.json", "plot.png"),
    }
    return [Stage(s, provenance[s], outputs=outputs[s], keep=s == "answers") for s in STAGES]
