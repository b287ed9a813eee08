"""LoRA training step: pvjax against transformers + peft, same model, same rows, same run.

    python benchmarks/train.py          # SmolLM2 on this CPU; last line: ratio=<pvjax/reference>
    python benchmarks/train.py --family gemma3  # a random Gemma 3 at SmolLM2's size
    python benchmarks/train.py --random-7b   # GPU: 7B-shaped bf16 LoRA step and full step, MFU

Both sides train a rank-32 LoRA (alpha 64) on all seven linear targets of SmolLM2-135M-Instruct,
fp32, AdamW, on the same packed 512-token rows of chat samples (loss on assistant tokens only).
pvjax runs its jitted step (`pvjax.finetune.step`) with attention kept inside each packed
segment; transformers runs the rows as they are (causal over the row, the same FLOPs), loss,
backward and an AdamW step on the adapters. Neither side rematerialises (transformers' default);
pvjax's default, per-block remat, is timed too and printed. Tokens/s counts every token of the
rows; best of `--reps` steps after a warm-up (this shared machine varies by tens of percent).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np
from common import ANSWER, QUESTIONS, Timer, hf_embedded, measured_flops
from families import active_params, add_family_argument, family_models

import pvjax
from pvjax.finetune import data, lora
from pvjax.finetune import step as st
from pvjax.parallel import sharding

RANK, ALPHA = 32, 64.0


def rows_for(model, width, n_rows):
    chats = [
        [
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
            {"role": "assistant", "content": ANSWER * (1 + i % 3)},
        ]
        for i in range(16 * n_rows)
    ]
    ex, _ = data.build_examples(model.tokenizer, chats, max_length=width)
    rows = data.pack_rows(ex, width)
    order = np.argsort(-(rows.segment_ids > 0).sum(1))[:n_rows]  # the fullest rows
    return rows.take(order)


def targets_for(model) -> tuple[str, ...]:
    """All seven linear targets; a MoE's attention only (its experts are not LoRA targets)."""
    return ("q", "k", "v", "o") if model.config.num_experts else tuple(lora.TARGETS)


def run_pvjax(model, batch, reps, remat):
    spec = lora.LoraSpec(rank=RANK, alpha=ALPHA, targets=targets_for(model))
    settings = st.StepSettings(model.config, spec, "float32", remat)
    mesh = sharding.make_mesh()
    key = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(lambda p, k: lora.split(spec, p, k)[0], model.params, key)
    opt, _ = st.make_optimizer(
        1e-4, 1000, warmup_steps=0, decay_mask=lora.decay_mask(spec, abstract)
    )
    state, frozen, shardings = st.init_state(settings, opt, model.params, key, mesh)
    fn = st.compile_step(settings, opt, mesh, shardings, frozen)
    placed = st.place({k: v[None] for k, v in batch.items()}, st.batch_sharding(mesh))
    with Timer() as first:
        state, met = fn(state, frozen, placed, st.TrainingForward())
        float(met["loss"])
    times, losses = [], []
    for _ in range(reps):
        with Timer() as t:
            state, met = fn(state, frozen, placed, st.TrainingForward())
            losses.append(float(met["loss"]))
        times.append(t.seconds)
    return min(times), first.seconds - min(times), losses


def run_reference(model, batch, reps, targets):
    import torch
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=[lora.TARGETS[t][1].split(".")[-1] for t in targets],
    )
    model = get_peft_model(model, conf)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.tensor(batch["tokens"], dtype=torch.long)
    pos = torch.tensor(batch["positions"], dtype=torch.long)
    labels = ids.clone()
    labels[torch.tensor(batch["loss_mask"]) == 0] = -100

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()
    times, losses = [], []
    for _ in range(reps):
        with Timer() as t:
            losses.append(step())
        times.append(t.seconds)
    return min(times), losses


def random_7b(args):
    """MFU of a bf16 LoRA step (all 28 blocks) and of a full-finetuning step (fewer blocks, so
    float32 masters and AdamW moments fit one device) on Qwen2.5-7B-shaped random weights.
    Model FLOPs per token: forward F (`flops_per_token`), LoRA backward F (input gradients only;
    the thin adapter products are left out), full backward 2F; remat's recomputation not counted."""
    import dataclasses

    import jax.numpy as jnp
    from common import measured_ceilings, peak_for

    from pvjax.models.random_init import QWEN25_7B, flops_per_token, random_params

    mm, _ = measured_ceilings()
    kind = jax.devices()[0].device_kind
    peak = peak_for(kind)
    W, R = args.width, args.rows
    rng = np.random.default_rng(0)
    for method, n_layers in (("lora", QWEN25_7B.num_layers), ("full", args.full_layers)):
        cfg = dataclasses.replace(QWEN25_7B, num_layers=n_layers)
        params = random_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
        spec = lora.LoraSpec(rank=RANK, alpha=ALPHA, full=method == "full")
        settings = st.StepSettings(cfg, spec, "bfloat16", True)
        mesh = sharding.make_mesh()
        key = jax.random.PRNGKey(0)
        abstract = jax.eval_shape(lambda p, k: lora.split(spec, p, k)[0], params, key)
        opt, _ = st.make_optimizer(1e-5, 1000, decay_mask=lora.decay_mask(spec, abstract))
        state, frozen, shardings = st.init_state(settings, opt, params, key, mesh)
        del params
        fn = st.compile_step(settings, opt, mesh, shardings, frozen)
        seg = np.repeat(np.arange(1, 5), W // 4)[None].repeat(R, 0).astype(np.int32)
        batch = {
            "tokens": rng.integers(0, cfg.vocab_size, (1, R, W)).astype(np.int32),
            "segment_ids": seg[None],
            "positions": np.tile(np.arange(W // 4), 4)[None, None].repeat(R, 1).astype(np.int32),
            "loss_mask": np.ones((1, R, W), np.float32),
        }
        placed = st.place(batch, st.batch_sharding(mesh))
        with Timer() as first:
            state, met = fn(state, frozen, placed, st.TrainingForward())
            float(met["loss"])
        times = []
        for _ in range(args.reps):
            with Timer() as t:
                state, met = fn(state, frozen, placed, st.TrainingForward())
                float(met["loss"])
            times.append(t.seconds)
        secs = min(times)
        flops = (2 if method == "lora" else 3) * flops_per_token(cfg, W // 8) * R * W
        achieved = flops / secs / 1e12
        print(
            f"{method} ({n_layers} blocks, rows {R}x{W}, bf16, remat): {R * W / secs:,.0f} "
            "tokens/s, "
            f"{secs * 1e3:.1f} ms/step, {achieved:.0f} TFLOP/s, MFU {achieved / mm:.3f} of the "
            "measured "
            f"{mm:.0f} TFLOP/s"
            + (f" ({achieved / peak[0]:.3f} of the {kind} datasheet)" if peak else "")
            + f", compile {first.seconds - secs:.1f} s"
        )
        del state, frozen, fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--random-7b", action="store_true")
    ap.add_argument("--full-layers", type=int, default=8)
    add_family_argument(ap)
    args = ap.parse_args()
    if args.random_7b:
        return random_7b(args)
    if args.family:
        model, hf = family_models(args.family, os.cpu_count(), args.layers)
    else:
        model, hf = pvjax.load("smollm2-135m-instruct"), hf_embedded(os.cpu_count())
    batch = rows_for(model, args.width, args.rows)
    n_tokens = batch["tokens"].size
    real = int((batch["segment_ids"] > 0).sum())
    secs, compile_s, ours = run_pvjax(model, batch, args.reps, remat=False)
    remat_secs, _, _ = run_pvjax(model, batch, args.reps, remat=True)
    ref_secs, ref = run_reference(hf, batch, args.reps, targets_for(model))
    print(
        f"rows={args.rows}x{args.width} tokens={n_tokens} ({real / n_tokens:.0%} real) "
        f"backend={jax.default_backend()} model={model.model_id} LoRA r={RANK} alpha={ALPHA:g} "
        f"targets {'/'.join(targets_for(model))}"
    )
    print(
        f"pvjax: {n_tokens / secs:,.0f} tokens/s ({secs:.2f} s/step, compile {compile_s:.1f} s); "
        f"with per-block remat {n_tokens / remat_secs:,.0f} tokens/s"
    )
    print(
        f"reference (transformers + peft): {n_tokens / ref_secs:,.0f} tokens/s ({ref_secs:.2f} "
        "s/step)"
    )
    print(
        f"loss after one step: pvjax {ours[0]:.4f}, reference {ref[0]:.4f} (the reference attends "
        "across "
        f"the packed samples of a row and can copy their repeated answers, hence lower)"
    )
    # The compute limit: forward + LoRA's backward (input gradients), 2 x 2 FLOP per active
    # parameter per token (the thin adapter products and attention left out).
    fl = measured_flops()
    limit = fl / (4 * active_params(model))
    print(
        f"{model.model_id}: compute_share={n_tokens / secs / limit:.2f} of the measured "
        f"{fl / 1e9:.0f} GFLOP/s ({limit:,.0f} tokens/s); "
        f"with remat {n_tokens / remat_secs / limit:.2f}"
    )
    print(f"ratio={ref_secs / secs:.2f} ratio_remat={ref_secs / remat_secs:.2f}")


if __name__ == "__main__":
    main()
