"""Every family end to end on a tiny folder with a chat template: `pvjax extract` (runlocal
settings, `--config.model=<folder>`) and the steering study (`pvjax run configs/steer.py:runlocal`)
with the vector it extracted. Qwen3 folders carry Qwen3's thinking switch and run with
`--thinking`; Gemma folders carry a template without a system role, so extraction's system
prompts are folded into the user turn. Both conventions are checked where the runs record them:
the answers stage of extraction's ledger (`stages.json`), its `summary.json`, the vector file and
the study point's `point.json`."""

from __future__ import annotations

import json
import os

import pytest
from tiny_models import GEMMA2_LIKE, QWEN3_LIKE, save_tiny_chat

from pvjax import cli
from pvjax.files import atomic
from pvjax.files.vectors import load_vectors

REPO = os.path.join(os.path.dirname(__file__), "..")
STEER = os.path.join(REPO, "configs", "steer.py")
EXTRACT = os.path.join(REPO, "configs", "extract.py")
TEMPLATES = {
    "qwen3_tied": QWEN3_LIKE,
    "qwen3_moe": QWEN3_LIKE,
    "mistral_window": None,  # the embedded tokenizer's own (a system role, no switch)
    "gemma2": GEMMA2_LIKE,
    "gemma3": GEMMA2_LIKE,
}
WIDER = {"mistral_window": {"sliding_window": 64}, "qwen3_moe": {"sliding_window": 64}}
SMALL = ["--quiet", "--config.n_questions=1", "--config.max_new_tokens=4"]


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_extract_and_steer_end_to_end(kind, tokenizer, tmp_path):
    template = TEMPLATES[kind]
    folder = tmp_path / "model"
    # Mistral's and Qwen3-MoE's windows (8, 6) would hide the system prompt from every answer
    # token, and so give a vector of zeros: here they span the prompt (the windows themselves are
    # tested in test_families).
    save_tiny_chat(kind, folder, tokenizer, template, **WIDER.get(kind, {}))
    thinking = template is QWEN3_LIKE
    flag = ["--thinking"] if thinking else []
    chat = {
        "system_folded": template is GEMMA2_LIKE,
        "enable_thinking": True if thinking else None,
    }

    ext = tmp_path / "extract"
    argv = ["extract", "--config", EXTRACT + ":runlocal", f"--config.model={folder}"]
    argv += [f"--config.workdir={ext}", *SMALL, *flag]
    argv += ["--config.n_pairs=1", "--config.n_per_question=1", "--config.temperature=0.0"]
    argv += ["--config.batch_size=2", "--config.filter.mode=none", "--config.filter.min_pairs=1"]
    argv += ["--config.causality.layers=(1,)", "--config.causality.max_pairs=1"]
    assert cli.main(argv) == 0
    summary = json.loads((ext / "summary.json").read_text())
    assert summary["chat"] == chat and summary["counts"]["kept"] == 1
    answers = json.loads((ext / "stages.json").read_text())["stages"]["answers"]
    # recorded where the template has a convention, absent where it has none (older records)
    assert answers.get("chat") == (chat if thinking or chat["system_folded"] else None)
    vec = ext / "vectors.safetensors"
    provenance = json.loads(load_vectors(vec)[1]["provenance"])
    assert provenance["answers"].get("chat") == answers.get("chat")

    steer = tmp_path / "steer"
    argv = ["run", "--config", STEER + ":runlocal", f"--config.model={folder}"]
    argv += [f"--config.vector={vec}", "--config.layers=(1,)", "--config.coefs=(0.0,8.0)"]
    argv += ["--config.mc.path=", "--config.batch_size=4", "--config.forward_batch_size=4"]
    argv += ["--config.plot=False", "--workdir", str(steer), *SMALL, *flag]
    assert cli.main(argv) == 0
    rows = atomic.read_csv(steer / "summary.csv")
    assert [float(r["coef"]) for r in rows] == [0.0, 8.0]
    # Steering moved the margin, or (where the tiny model gave one answer under both system
    # prompts, so every margin is 0) the answers.
    texts = {r["setting"]: r["text"] for r in atomic.read_csv(steer / "answers.csv")}
    moved = rows[0]["margin"] != rows[1]["margin"] or len(set(texts.values())) > 1
    assert moved, ("steering changed nothing", rows, texts)
    point = json.loads((steer / "point.json").read_text())
    assert point["chat"] == chat
    assert point["config"].get("enable_thinking", False) is thinking


def test_thinking_flag_reaches_the_template_and_each_answer_record(tokenizer, tmp_path, capsys):
    """`pvjax generate --thinking` on a tiny Qwen3 folder: the template renders as Qwen3's says
    (thinking off: an empty reasoning block opens the answer; on: none), the answers are those of
    the prompt rendered so, and each `--json` row records the conventions."""
    import pvjax
    from pvjax.engine.generate import SamplingParams, generate
    from pvjax.loading.tokenizer import render_chat

    folder = tmp_path / "qwen3"
    save_tiny_chat("qwen3_tied", folder, tokenizer, QWEN3_LIKE)
    chat = [{"role": "user", "content": "Hi"}]
    off, on = pvjax.load(folder), pvjax.load(folder, enable_thinking=True)
    assert off.chat_text(chat).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.chat_text(chat).endswith("<|im_start|>assistant\n")
    assert on.chat_text(chat) == render_chat(on.tokenizer, chat, enable_thinking=True)
    rows = {}
    for think in (False, True):
        argv = ["generate", "--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "6"]
        assert cli.main([*argv, "--json", *(["--thinking"] if think else [])]) == 0
        rows[think] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for think, model in ((False, off), (True, on)):
        assert rows[think]["chat"] == {"system_folded": False, "enable_thinking": think}
        want = generate(model, ["Hi"], sampling=SamplingParams(max_new_tokens=6)).tokens[0]
        assert rows[think]["tokens"] == list(want)
    assert rows[False]["tokens"] != rows[True]["tokens"]  # the two prompts answer differently
