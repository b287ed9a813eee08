"""A layer x coefficient steering grid: the study engine against the reference workflow, same run.

    python benchmarks/sweep.py           # last line: ratio=<x>
    python benchmarks/sweep.py --quick   # 2 layers x 2 coefficients x 4 prompts, to try it out

Grid: 5 layers x 5 coefficients (negative ones too, no zero) x 8 prompts, 48 new tokens, greedy,
every answer forced to 48 tokens (`min_new_tokens`) on both sides so both produce the same number
of tokens. SmolLM2-135M-Instruct (the embedded GGUF) on the CPU.

- pvjax: the steering study's engine (`pvjax.studies.steer.settings` + `grid.generate_grid`):
  every (layer, coefficient, prompt) is a row with its own intervention, 200 rows through the
  batched generation in a handful of compiled programs. Timed twice: the first run includes the
  compiles (reported apart, with the number of programs), the second is the steady state.
- reference: what the reference implementation does per grid point: register a forward hook that
  adds coef * v to the output of block `layer - 1`, run transformers' `generate` on the 8 prompts
  (left-padded, one batch), remove the hook; 25 calls.

`--positions` is where the steering acts, on both sides: `response` (default: the steering
study's default and the paper's; the reference's steerer then adds to the last position of every
forward call, which is the last prompt token in the prompt pass and the new token after it) or
`all` (every position). With `response` the prompts are untouched but for their last token, so
pvjax runs each of the 8 questions' prompts once for the whole grid (`pvjax.engine.prompt_split`).

`ratio` = reference seconds / pvjax steady-state seconds; `ratio_with_compile` counts pvjax's first
run instead.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from common import QUESTIONS, Timer, hf_embedded

import pvjax
from pvjax.engine.generate import SamplingParams, compile_count
from pvjax.studies import grid, steer

LAYERS = (6, 10, 14, 18, 22)
COEFS = (-4.0, -2.0, 2.0, 4.0, 6.0)
NEW = 48


def run_pvjax(model, prompts, vector, layers, coefs, batch_size, positions):
    ids = [
        model.tokenizer(
            model.chat_text([{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in prompts
    ]
    sp = SamplingParams(max_new_tokens=NEW, min_new_tokens=NEW)

    def once():
        iv, index = steer.settings(vector, layers, coefs, model.n_layers + 1, model.hidden_size)
        rows = grid.generate_grid(model, iv, ids, sp, positions=positions, batch_size=batch_size)
        return rows, index

    c0 = compile_count()
    with Timer() as first:
        once()
    compiles = compile_count() - c0
    with Timer() as steady:
        rows, index = once()
    assert compile_count() - c0 == compiles, "the second run compiled again"
    return rows, index, first.seconds, steady.seconds, compiles


def run_reference(hf, tok, prompts, vector, layers, coefs, positions):
    import torch

    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in prompts
    ]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    with torch.no_grad():
        hf.generate(
            **enc,
            max_new_tokens=2,
            min_new_tokens=2,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        with Timer() as t:
            for layer in layers:
                for coef in coefs:
                    v = torch.tensor(coef * vector[layer])

                    def hook(module, inputs, output, v=v):
                        h = output[0] if isinstance(output, tuple) else output
                        if positions == "response":  # in place, as the reference's steerer does
                            h[:, -1] += v
                            return output
                        h = h + v
                        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

                    handle = hf.model.layers[layer - 1].register_forward_hook(hook)
                    try:
                        g = hf.generate(
                            **enc,
                            max_new_tokens=NEW,
                            min_new_tokens=NEW,
                            do_sample=False,
                            pad_token_id=tok.pad_token_id,
                        )
                    finally:
                        handle.remove()
                    out[(layer, coef)] = g[:, enc["input_ids"].shape[1] :].tolist()
    return out, t.seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--batch",
        type=int,
        default=64,
        help="pvjax rows per generation batch (the steering study's default batch_size)",
    )
    p.add_argument("--positions", choices=("response", "all"), default="response")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()

    hf = hf_embedded(args.threads).eval()
    layers, coefs, prompts = (
        (LAYERS[:2], COEFS[:2], QUESTIONS[:4]) if args.quick else (LAYERS, COEFS, QUESTIONS)
    )
    model = pvjax.load("smollm2-135m-instruct")
    rng = np.random.default_rng(0)
    v = rng.standard_normal((model.n_layers + 1, model.hidden_size)).astype(np.float32)
    v *= 2.0 / np.linalg.norm(
        v, axis=-1, keepdims=True
    )  # a direction of norm 2: coefficients -8..12 in norm
    n_tokens = len(layers) * len(coefs) * len(prompts) * NEW
    print(
        f"grid: {len(layers)} layers x {len(coefs)} coefficients x {len(prompts)} prompts, {NEW} "
        "new tokens "
        f"({n_tokens} tokens), steering on {args.positions} positions, threads={args.threads}"
    )

    rows, index, first, steady, compiles = run_pvjax(
        model, prompts, v, layers, coefs, args.batch, args.positions
    )
    print(
        f"pvjax: {steady:.1f} s steady ({n_tokens / steady:.0f} new tokens/s); first run "
        f"{first:.1f} s, of which "
        f"compiles about {first - steady:.1f} s for {compiles} programs"
    )
    ref, ref_s = run_reference(hf, model.tokenizer, prompts, v, layers, coefs, args.positions)
    print(
        f"reference (transformers generate + hook per grid point, {len(layers) * len(coefs)} "
        f"calls): {ref_s:.1f} s "
        f"({n_tokens / ref_s:.0f} new tokens/s)"
    )
    same = sum(r["n_tokens"] == NEW for r in rows)
    agree = compared = 0
    for (layer, coef), s in index.items():
        mine = [r for r in rows if r["setting"] == s]
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in ref[(layer, coef)]]
        agree += sum(a["text"] == b for a, b in zip(mine, texts))
        compared += len(mine)
    print(
        f"check: {same}/{len(rows)} pvjax rows hold {NEW} tokens (the grid's rows and the "
        "unsteered baseline's, "
        f"which the study adds); {agree}/{compared} steered answers identical to the reference's "
        "(fp32 summation "
        f"order can flip a greedy near-tie, after which a row diverges)"
    )
    print(
        f"machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"ratio_with_compile={ref_s / first:.2f}")
    print(f"ratio={ref_s / steady:.2f}")


if __name__ == "__main__":
    main()
