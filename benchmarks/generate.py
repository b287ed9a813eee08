"""New tokens/s of steered generation: pvjax against transformers' `generate` with a steering hook
(what the reference implementation does), SmolLM2, 64 new tokens, batch 1 and batch 16, same run.

    python benchmarks/generate.py             # last line: ratio_b1=<x> ratio_b16=<y>
    python benchmarks/generate.py --family qwen3moe  # a random Qwen3-MoE at SmolLM2's size
    python benchmarks/generate.py --dtype bfloat16  # bf16 weights (half the bytes per step)
    python benchmarks/generate.py --random-7b # GPU: batch 64, 7B-shaped random bf16, bandwidth
    share

Both engines are forced to produce exactly 64 tokens (`min_new_tokens`), greedy, with the same
vector added at the same block on every position. Compile time is reported apart.

Limits printed beside the rates: batch 1 decode reads every weight once per step
(`bytes read / bandwidth`, bandwidth measured here with a large array copy; the bytes are those of
the weights generation actually runs on, so half for `--dtype bfloat16`); batch 16 is compute
bound (`2 * params` FLOP per token at the measured float32 matmul rate, for both dtypes: the
kernel widens bf16 weights and multiplies in float32). With `--dtype bfloat16` the reference
(transformers) runs in bfloat16 too. Each share is printed twice: end to end (the 64 new tokens'
run, prompt pass included) and for the decode step alone (a 64-token run less a 1-token run,
over the 63 steps between), which is what the limit describes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    QUESTIONS,
    Timer,
    hf_embedded,
    measured_bandwidth,
    measured_ceilings,
    measured_flops,
    peak_for,
)
from families import active_bytes, active_params, add_family_argument, family_models

import pvjax
from pvjax import interventions
from pvjax.engine.generate import SamplingParams, generate

LAYER, COEF, NEW = 12, 4.0, 64


def run_pvjax(model, prompts, vector, layer=LAYER):
    """(new tokens/s end to end, compile seconds, seconds per decode step). The step is the
    difference between a 64-token and a 1-token run (prompt pass and first token alike) over the
    63 steps between them."""
    iv = interventions.build(model.n_layers + 1, model.hidden_size, steer=[(vector, layer, COEF)])
    timed = {}
    for n in (NEW, 1):
        sp = SamplingParams(max_new_tokens=n, min_new_tokens=n)
        with Timer() as first:
            generate(model, prompts, sampling=sp, intervention=iv, batch_size=len(prompts))
        best = float("inf")
        for _ in range(3):  # best of three: this shared machine varies by tens of percent
            with Timer() as t:
                g = generate(model, prompts, sampling=sp, intervention=iv, batch_size=len(prompts))
            best = min(best, t.seconds)
        timed[n] = (best, first.seconds - best, sum(len(x) for x in g.tokens))
    (best, compile_s, n), (one, _, _) = timed[NEW], timed[1]
    return n / best, compile_s, (best - one) / (NEW - 1)


def run_reference(hf, tok, prompts, vector, layer=LAYER):
    import torch

    v = torch.tensor(vector).to(hf.dtype)

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + COEF * v,) + tuple(output[1:])
        return output + COEF * v

    handle = hf.model.layers[layer - 1].register_forward_hook(hook)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    try:
        with torch.no_grad():
            hf.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            best = float("inf")
            for _ in range(2):  # best of two (each batch-16 run takes tens of seconds)
                with Timer() as t:
                    out = hf.generate(
                        **enc,
                        max_new_tokens=NEW,
                        min_new_tokens=NEW,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )
                best = min(best, t.seconds)
    finally:
        handle.remove()
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts) / best


def smollm2(args):
    import torch

    if args.family:
        model, hf = family_models(args.family, args.threads, args.layers)
    else:
        hf = hf_embedded(args.threads).eval().to(getattr(torch, args.dtype))
        model = pvjax.load("smollm2-135m-instruct", dtype=args.dtype)
    layer = min(LAYER, model.n_layers // 2 or 1)
    vector = np.random.default_rng(0).standard_normal(model.hidden_size).astype(np.float32)
    # What a token reads and multiplies by: every weight in the dtype generation runs on (half for
    # bfloat16; SmolLM2's input table is its output head), a MoE's routed experts only
    # (`families.active_bytes`).
    weight_bytes, n_params = active_bytes(model), active_params(model)
    bw, fl = measured_bandwidth(), measured_flops()
    print(
        f"machine: copy bandwidth {bw / 1e9:.1f} GB/s, matmul {fl / 1e9:.0f} GFLOP/s; "
        f"model {model.model_id}: {args.dtype} weights read per token {weight_bytes / 1e9:.3f} GB, "
        f"{2 * n_params / 1e9:.2f} GFLOP/token"
    )
    ratios, shares, steps = {}, {}, {}
    for batch in (1, 16):
        prompts = [
            model.chat_text([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(batch)
        ]
        chats = [q for q in QUESTIONS * 2][:batch]
        ours, compile_s, step = run_pvjax(model, chats, vector, layer)
        ref = run_reference(hf, model.tokenizer, prompts, vector, layer)
        limit = bw / weight_bytes if batch == 1 else fl / (2 * n_params)
        print(
            f"{args.dtype} batch {batch}: pvjax {ours:.1f} new tokens/s "
            f"(compile {compile_s:.1f} s), "
            f"transformers {ref:.1f} new tokens/s; pvjax at {ours / limit:.0%} of the "
            f"{'memory' if batch == 1 else 'compute'} limit ({limit:.0f} tokens/s); "
            f"decode step alone {step * 1e3:.1f} ms, {batch / step / limit:.0%} of it"
        )
        ratios[batch], shares[batch] = ours / ref, ours / limit
        steps[batch] = batch / step / limit
    print(
        f"{model.model_id}: memory_share_b1={shares[1]:.2f} compute_share_b16={shares[16]:.2f} "
        f"(decode steps alone: {steps[1]:.2f}, {steps[16]:.2f})"
    )
    print(f"ratio_b1={ratios[1]:.2f} ratio_b16={ratios[16]:.2f}")


def random_7b(args):
    """GPU: batch 64 on a Qwen2.5-7B-shaped random bf16 model (no tokenizer: random prompt ids).
    Decode reads every weight and the whole KV cache once per step; the share of the device's
    memory bandwidth that this traffic reaches is the figure of merit."""
    import dataclasses

    from pvjax.engine.generate import generate_ids
    from pvjax.models.random_init import QWEN25_7B, random_params

    cfg = QWEN25_7B
    if args.tiny:  # exercise this code path on a CPU
        cfg = dataclasses.replace(
            cfg,
            hidden_size=256,
            intermediate_size=512,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            vocab_size=1024,
            name="random-tiny-qwen2",
        )
    params = random_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    model = pvjax.Model(cfg, params, tokenizer=None, source="")
    B, P = args.batch, 128
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, P)).tolist()
    v = np.random.default_rng(1).standard_normal(cfg.hidden_size).astype(np.float32)
    iv = interventions.build(
        cfg.num_layers + 1, cfg.hidden_size, steer=[(v, cfg.num_layers // 2, 1.0)]
    )
    sp = SamplingParams(max_new_tokens=NEW, min_new_tokens=NEW)
    mesh = None
    if args.mesh:  # the sharded path on whatever devices there are (one GPU: a 1 x 1 mesh)
        from pvjax.parallel.sharding import make_mesh, shard_model

        mesh = make_mesh(model=1)
        model = shard_model(model, mesh)
    run = lambda n: generate_ids(
        model,
        ids,
        sampling=dataclasses.replace(sp, max_new_tokens=n, min_new_tokens=n),
        intervention=iv,
        batch_size=B,
        unroll=not args.scan,
        mesh=mesh,
    )
    with Timer() as first:
        run(NEW)
    run(1)
    with Timer() as t1:
        run(1)
    with Timer() as t:
        run(NEW)
    step = (t.seconds - t1.seconds) / (NEW - 1)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    if not cfg.tie_embeddings:  # a step gathers B rows of the input embedding, not the table
        weights -= params["embed"].nbytes
    kv = 2 * cfg.num_layers * B * (P + NEW // 2) * cfg.num_kv_heads * cfg.head_dim * 2
    kind = jax.devices()[0].device_kind
    layout = ("scanned layers" if args.scan else "unrolled layers") + (
        ", on a mesh" if mesh else ""
    )
    print(
        f"device={kind} model={cfg.name} bf16 batch={B} prompt={P} new={NEW} {layout} "
        f"compile={first.seconds - t.seconds:.1f}s"
    )
    print(
        f"new tokens/s={B * NEW / t.seconds:,.0f} (decode only {B / step:,.0f}); "
        f"step {step * 1e3:.2f} ms reads {(weights + kv) / 1e9:.1f} GB"
    )
    if jax.default_backend() != "cpu":
        _, copy = measured_ceilings()
        peak = peak_for(kind)
        share = (weights + kv) / step / 1e12
        print(
            f"memory bandwidth share={share / copy:.2f} of measured copy {copy:.2f} TB/s"
            + (f", {share / peak[1]:.2f} of datasheet {peak[1]} TB/s" if peak else "")
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the SmolLM2 run's weights (and the reference's)",
    )
    p.add_argument("--random-7b", action="store_true")
    p.add_argument(
        "--tiny", action="store_true", help="tiny random shapes for --random-7b on a CPU"
    )
    p.add_argument("--batch", type=int, default=64, help="batch for --random-7b")
    p.add_argument(
        "--scan",
        action="store_true",
        help="with --random-7b: scan stacked layers (one weight copy) instead of unrolling",
    )
    p.add_argument(
        "--mesh",
        action="store_true",
        help="with --random-7b: the sharded path (generate_ids(mesh=...)) on the devices there are",
    )
    add_family_argument(p)
    args = p.parse_args()
    (random_7b if args.random_7b else smollm2)(args)


if __name__ == "__main__":
    main()
