"""Finetuning on tiny random models: loss masking, LoRA equivalence, exports through transformers
and peft, exact resume, 8 sharded devices, steering/CAFT in the training forward only, the
projection penalty's arithmetic, and the bad inputs of the issue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from finetune_tiny import chats, tiny_config
from tiny_models import DTYPE_KW, save_tiny

import pvjax
from pvjax.finetune import data, lora, train, trainer
from pvjax.finetune import step as st
from pvjax.finetune.trainer import setup
from pvjax.settings.fields import as_dict as settings_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny("qwen2_untied", folder, tokenizer=tokenizer)
    train_file = data.write_jsonl(folder.parent / "chat.jsonl", chats())
    return folder, train_file, pvjax.load(folder)


def _vector_file(model, path, seed=0):
    from pvjax.files.vectors import save_vectors

    rng = np.random.default_rng(seed)
    v = rng.standard_normal((model.n_layers + 1, model.hidden_size)).astype(np.float32)
    save_vectors(path, {"response_avg_diff": v}, model=model, trait="test")
    return v


def _hf_logits(folder, ids, adapter=None):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), **{DTYPE_KW: torch.float32}).eval()
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter)).eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


def test_loss_mask_marks_exactly_the_assistant_turns(tokenizer):
    msgs = chats()[-1]
    ex = data.tokenize(tokenizer, msgs)
    trained = tokenizer.decode(ex.ids[ex.loss_mask == 1])
    assert trained == "Hi there.<|im_end|>\nGoodbye.<|im_end|>\n"
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(ex.ids) == full  # the pieces tokenize to the whole text
    csv_ex = data.tokenize(
        tokenizer,
        [
            {
                "role": "prompt",
                "content": tokenizer.apply_chat_template(
                    msgs[1:2], tokenize=False, add_generation_prompt=True
                ),
            },
            {"role": "assistant", "content": "Hi there."},
        ],
    )
    assert tokenizer.decode(csv_ex.ids[csv_ex.loss_mask == 1]) == "Hi there.<|im_end|>\n"


def test_packed_loss_is_the_mean_over_assistant_tokens_of_each_sequence_alone(tiny):
    """The step's loss equals a hand computation from per-sample (unpacked) logits."""
    folder, train_file, model = tiny
    exs, _ = data.build_examples(model.tokenizer, chats()[:6], max_length=64)
    rows = data.pack_rows(exs, 128)
    assert rows.n_rows < len(exs)  # several samples share a row
    settings = st.StepSettings(model.config, lora.LoraSpec(full=True), remat=False)
    loss = jax.jit(lambda p, mb: st.micro_loss(settings, p, {}, mb, st.TrainingForward()))
    nll, _ = loss(model.params, rows.take(np.arange(rows.n_rows)))
    padded = np.zeros(
        (len(exs), 64), np.int32
    )  # right padding: causal, so it changes nothing before it
    for i, e in enumerate(exs):
        padded[i, : len(e.ids)] = e.ids
    all_logits = np.asarray(pvjax.forward(model, padded).logits, np.float64)
    want, n = 0.0, 0
    for e, logits in zip(exs, all_logits):
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        t = np.nonzero(e.loss_mask[1:])[0] + 1
        want += -logp[t - 1, e.ids[t]].sum()
        n += len(t)
    assert n == int(rows.loss_mask.sum())
    np.testing.assert_allclose(float(nll), want, rtol=2e-5)


def test_lora_unmerged_forward_equals_merged(tiny):
    folder, _, model = tiny
    spec = lora.LoraSpec(
        rank=3, alpha=5.0, rslora=True, targets=("q", "v", "o", "up", "down"), layers=(0, 2)
    )
    trainable, frozen = lora.split(spec, model.params, jax.random.PRNGKey(1))
    trainable = jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable
    )
    ids = np.random.default_rng(0).integers(0, 1000, (2, 20))
    from pvjax.models.decoder import forward
    from pvjax.models.layout import Scanned

    pos, mask = np.tile(np.arange(20), (2, 1)), np.ones((2, 20), np.int32)
    fwd = jax.jit(lambda p: forward(p, model.config, Scanned(), ids, pos, mask).logits)
    a = fwd(lora.assemble(spec, trainable, frozen))
    merged = lora.merge(spec, trainable, frozen)
    b = fwd(merged)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(jnp.abs(b).max()))
    # block 1 was left out: its weights are the base's, the others moved
    assert np.array_equal(merged["layers"]["wq"][1], frozen["layers"]["wq"][1])
    assert not np.allclose(merged["layers"]["wq"][0], frozen["layers"]["wq"][0])
    assert np.array_equal(merged["layers"]["wk"], frozen["layers"]["wk"])  # not a target


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """One short LoRA run (4 steps, checkpoints at 2 and 4, exports)."""
    folder, train_file, model = tiny
    work = tmp_path_factory.mktemp("run")
    summary = train(tiny_config(folder, train_file), work, model=model, progress=False)
    return work, summary


def test_export_round_trips_through_transformers_and_peft(tiny, run):
    folder, _, model = tiny
    work, summary = run
    ids = np.random.default_rng(1).integers(0, 1000, (2, 16))
    ours = np.asarray(pvjax.forward(pvjax.load(summary["export"]["merged"]), ids).logits)
    scale = np.abs(ours).max()
    assert np.abs(_hf_logits(summary["export"]["merged"], ids) - ours).max() < 1e-5 * scale
    assert (
        np.abs(_hf_logits(folder, ids, adapter=summary["export"]["adapter"]) - ours).max()
        < 1e-5 * scale
    )
    base = np.asarray(pvjax.forward(model, ids).logits)
    assert np.abs(base - ours).max() > 1e-3 * scale  # training moved the model
    reloaded = trainer.load_finetuned(work, model=model)
    np.testing.assert_allclose(
        np.asarray(pvjax.forward(reloaded, ids).logits), ours, atol=1e-5 * scale
    )
    conf = json.loads((Path(summary["export"]["adapter"]) / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [0, 2] and conf["r"] == 4


def test_resume_gives_the_uninterrupted_loss_curve(tiny, run, tmp_path):
    folder, train_file, model = tiny
    _, full = run
    cfg = tiny_config(folder, train_file)
    paused = train(cfg, tmp_path, model=model, progress=False, until_step=1)
    assert paused["stopped"] == "paused" and not (tmp_path / "DONE").exists()
    resumed = train(cfg, tmp_path, model=model, progress=False)
    assert resumed["losses"] == full["losses"] and len(full["losses"]) == 4
    assert resumed["evals"] == full["evals"]
    assert train(cfg, tmp_path, model=model, progress=False) == resumed  # DONE: not rerun


def test_sharded_step_equals_single_device(tiny, tmp_path):
    folder, train_file, _ = tiny
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "sharded_train.py"), str(folder), str(train_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines()[-1:]:
        res = json.loads(line)
        assert (
            res["devices"] == 8 and "model" in res["spec"] and res["spec"] == res["moment_spec"]
        ), res
        np.testing.assert_allclose(res["sharded"], res["single"], rtol=1e-5)
        assert res["single"][0] != res["single"][-1]


def test_preventative_steering_and_caft_change_only_the_training_forward(tiny, tmp_path):
    folder, train_file, model = tiny
    v = _vector_file(model, tmp_path / "v.safetensors")
    steer = {
        "vector": str(tmp_path / "v.safetensors"),
        "steering.type": "steer",
        "steering.coef": 4.0,
        "steering.layers": (2,),
    }
    # A steered run whose weights cannot move (lr ~ 0): the export is the base model exactly, and
    # evaluation (the model as inference runs it) sees no steering.
    s = train(
        tiny_config(
            folder,
            train_file,
            max_steps=1,
            eval_every=1,
            **steer,
            **{"optim.lr": 1e-30, "export.adapters": False},
        ),
        tmp_path / "w",
        model=model,
        progress=False,
    )
    merged = pvjax.load(s["export"]["merged"])
    for a, b in zip(
        jax.tree_util.tree_leaves(merged.params), jax.tree_util.tree_leaves(model.params)
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert s["shift"] == pytest.approx(0.0, abs=1e-5)
    setup_ = setup(tiny_config(folder, train_file, **steer), model=model)
    ev = setup_.eval_rows.take(np.arange(setup_.eval_rows.n_rows))
    plain = st.StepSettings(model.config, lora.LoraSpec(full=True), remat=False)
    nll = jax.jit(lambda p, mb, f: st.micro_loss(plain, p, {}, mb, f)[0])
    base_eval = float(nll(model.params, ev, st.TrainingForward())) / ev["loss_mask"][:, 1:].sum()
    assert s["evals"][0]["eval_loss"] == pytest.approx(base_eval, rel=1e-5)
    # The training forward does change: loss with steering, with CAFT, without.
    from pvjax.finetune.trainer import _training_forward

    caft_cfg = settings_dict(
        tiny_config(folder, train_file, **{**steer, "steering.type": "ablate"})
    )
    caft = _training_forward(caft_cfg, setup_.checked, model, v)
    from pvjax.interventions import empty

    off = st.TrainingForward(
        empty(model.n_layers + 1, model.hidden_size)
    )  # same program as the others
    losses = [float(nll(model.params, ev, f)) for f in (off, setup_.fwd, caft)]
    assert losses[0] == pytest.approx(float(nll(model.params, ev, st.TrainingForward())), rel=1e-6)
    assert losses[1] != pytest.approx(losses[0], rel=1e-3) and losses[2] != pytest.approx(
        losses[0], rel=1e-4
    )

    # and so do the gradients
    s = setup_
    mb = s.rows.take(np.arange(2))
    g = jax.jit(
        lambda t, f: jax.grad(lambda t: st.micro_loss(s.step_settings, t, s.frozen, mb, f)[0])(t)
    )
    t = jax.tree_util.tree_map(lambda x: x + 0.01, s.state.trainable)
    g0, g1 = g(t, off), g(t, s.fwd)
    assert not np.allclose(np.asarray(g0["wq"]["b"]), np.asarray(g1["wq"]["b"]))


def test_projection_penalty_arithmetic(tiny, tmp_path):
    folder, train_file, model = tiny
    v = _vector_file(model, tmp_path / "v.safetensors", seed=3)
    cfg = tiny_config(
        folder,
        train_file,
        vector=str(tmp_path / "v.safetensors"),
        **{"penalty.weight": 0.5, "penalty.layers": (1, 3)},
    )
    s = setup(cfg, model=model)
    mb = s.rows.take(np.arange(2))
    n = float(mb["loss_mask"][:, 1:].sum())
    both = jax.jit(
        lambda t, f, mb, fwd: (
            st.micro_loss(s.step_settings, t, f, mb, fwd),
            st.objective(s.step_settings, t, f, mb, fwd, n)[0],
        )
    )
    (nll, proj), obj = both(s.state.trainable, s.frozen, mb, s.fwd)
    hs = np.asarray(
        pvjax.forward(
            model, mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"]
        ).hidden_states,
        np.float64,
    )
    want = 0.0
    for l in (1, 3):
        u = v[l] / np.linalg.norm(v[l])
        want += 0.5 * ((hs[l] @ u) * mb["loss_mask"]).sum()  # mean over the two rows
    np.testing.assert_allclose(float(proj), want, rtol=1e-4)
    np.testing.assert_allclose(float(obj), (float(nll) + 0.5 * want) / n, rtol=1e-5)


def test_bad_inputs_are_named(tiny, tmp_path):
    from pvjax.files.vectors import VectorError
    from pvjax.finetune.checkpoint import CheckpointMismatch
    from pvjax.finetune.settings import InvalidConfig

    folder, train_file, model = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: no assistant turn"):
        data.read_samples(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="holds no samples"):
        data.read_samples(tmp_path / "empty.jsonl")
    long = [
        [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    ] + chats()[:3]
    _, rep = data.build_examples(model.tokenizer, long, max_length=48, too_long="drop")
    assert rep.dropped_too_long == 1 and rep.kept == 3 and "1 dropped as too long" in rep.line()
    with pytest.raises(data.DataError, match="past data.max_length=48"):
        data.build_examples(model.tokenizer, long, max_length=48, too_long="error")
    with pytest.raises(data.DataError, match="no sample is left"):
        data.build_examples(model.tokenizer, long[:1], max_length=48, too_long="truncate")

    with pytest.raises(InvalidConfig, match=r"steering.layers: 9 is outside 0..3"):
        setup(
            tiny_config(
                folder,
                train_file,
                vector="x",
                **{"steering.type": "steer", "steering.coef": 1.0, "steering.layers": (9,)},
            ),
            model=model,
        )
    other = save_tiny("llama_mha_tied", tmp_path / "other", tokenizer=model.tokenizer)
    del other
    _vector_file(pvjax.load(tmp_path / "other"), tmp_path / "other.safetensors")
    with pytest.raises(VectorError, match="does not fit"):
        setup(
            tiny_config(
                folder,
                train_file,
                vector=str(tmp_path / "other.safetensors"),
                **{"steering.type": "ablate", "steering.layers": (1,)},
            ),
            model=model,
        )

    train(
        tiny_config(folder, train_file), tmp_path / "w", model=model, progress=False, until_step=1
    )
    with pytest.raises(CheckpointMismatch, match=r"lora.rank: 4 -> 8"):
        train(tiny_config(folder, train_file, **{"lora.rank": 8}), tmp_path / "w", model=model)

    from pvjax.finetune import TrainingDiverged

    blow = tiny_config(
        folder,
        train_file,
        max_steps=6,
        remat=False,
        **{
            "optim.lr": 1e30,
            "optim.max_grad_norm": 0.0,
            "checkpoint.every": 1,
            "optim.warmup_steps": 0,
        },
    )
    with pytest.raises(TrainingDiverged, match=r"at step \d of 6.*Last good checkpoint: step \d"):
        train(blow, tmp_path / "nan", model=model, progress=False)


def test_cli_finetune(tiny, tmp_path, capsys):
    from pvjax.cli import main

    folder, train_file, _ = tiny
    same = [
        "--config.data.max_length=64",
        "--config.data.eval_fraction=0.2",
        "--config.lora.rank=4",
        "--config.lora.alpha=8.0",
        "--config.lora.layers=(0,2)",
        "--config.optim.lr=0.01",
        "--config.optim.warmup_steps=1",
        "--config.optim.weight_decay=0.01",
        "--config.batch.rows=2",
        "--config.batch.accum=1",
        "--config.max_steps=4",
        "--config.eval_every=2",
    ]  # tiny_config's
    args = [
        "finetune",
        "--config",
        "configs/finetune.py",
        "--quiet",
        f"--config.model={folder}",
        f"--config.data.train_file={train_file}",
        *same,
    ]
    assert main(args + ["--workdir", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "4 steps (done)" in out and "exported merged" in out and "exported adapter" in out
    with pytest.raises(SystemExit) as e:
        main(args + ["--workdir", str(tmp_path / "bad"), "--config.steering.type=push"])
    assert e.value.code == 2
    assert (
        "steering.type must be one of '', 'steer', 'ablate', got 'push'" in capsys.readouterr().err
    )


def test_bf16_compute_keeps_float32_master_weights(tiny):
    folder, _, model = tiny
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    trainable, frozen = lora.split(spec, model.params, jax.random.PRNGKey(0))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.02, trainable)
    exs, _ = data.build_examples(model.tokenizer, chats()[:4], max_length=64)
    mb = data.pack_rows(exs, 64).take(np.arange(2))
    out = {}
    for dtype in ("float32", "bfloat16"):
        settings = st.StepSettings(model.config, spec, dtype)
        base = (
            frozen
            if dtype == "float32"
            else jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)
        )
        out[dtype] = jax.jit(
            jax.value_and_grad(
                lambda t: st.micro_loss(settings, t, base, mb, st.TrainingForward())[0]
            )
        )(trainable)
    (l32, _), (l16, g16) = out["float32"], out["bfloat16"]
    assert all(
        x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g16)
    )  # masters stay float32
    assert float(l16) == pytest.approx(float(l32), rel=2e-2) and float(l16) != float(l32)
