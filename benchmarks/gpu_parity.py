"""Exactness on an accelerator: pvjax on the default device (fp32, highest matmul precision) against
transformers on the CPU, for the tiny random checkpoints of the parity tests. Checks every hidden
state and the logits of a left-padded batch (both layer layouts), a steered forward against a
forward hook, and greedy generation against `generate`. CI covers the same on the CPU; this runs
where a GPU is lent (benchmarks/gpu.sh), with a tokenizer folder given since the embedded GGUF
does not travel.

    python benchmarks/gpu_parity.py TOKENIZER_DIR
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np
import torch
from tiny_models import CONFIGS, save_tiny
from transformers import AutoTokenizer

import pvjax
from pvjax import interventions
from pvjax.engine.generate import SamplingParams, generate_ids

RTOL = 1e-4


def rel(ours, ref, sel):
    ours, ref = np.asarray(ours, np.float64)[..., sel, :], np.asarray(ref, np.float64)[..., sel, :]
    return np.abs(ours - ref).max() / np.abs(ref).max()


def main(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    rng = np.random.default_rng(0)
    failures = 0
    print(f"device: {jax.devices()[0].device_kind}")
    for kind in sorted(CONFIGS):
        with tempfile.TemporaryDirectory() as d:
            hf = save_tiny(kind, d, tokenizer=tok)
            model = pvjax.load(d, dtype="float32")
        seqs = [rng.integers(0, 49152, n).tolist() for n in (48, 31, 7)]
        ids, mask = pvjax.model.left_pad(seqs, 48, 3, 0)
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        L = model.n_layers
        v = rng.standard_normal(model.hidden_size).astype(np.float32)
        layer = L // 2 + 1
        with torch.no_grad():
            ref = hf(
                input_ids=torch.tensor(ids).long(),
                attention_mask=torch.tensor(mask).long(),
                position_ids=torch.tensor(pos).long(),
                output_hidden_states=True,
            )
            handle = hf.model.layers[layer - 1].register_forward_hook(
                lambda m, i, o: (
                    (o[0] + 2.0 * torch.tensor(v),) + tuple(o[1:])
                    if isinstance(o, tuple)
                    else o + 2.0 * torch.tensor(v)
                )
            )
            steered = hf(
                input_ids=torch.tensor(ids).long(),
                attention_mask=torch.tensor(mask).long(),
                position_ids=torch.tensor(pos).long(),
            ).logits.numpy()
            handle.remove()
        hs = np.stack([h.numpy() for h in ref.hidden_states])
        sel = mask.astype(bool)
        errs = {}
        for scan in (True, False):
            out = pvjax.forward(model, ids, attention_mask=mask, scan=scan)
            errs[f"hidden({'scan' if scan else 'unrolled'})"] = max(
                rel(out.hidden_states[l], hs[l], sel) for l in range(L + 1)
            )
            errs[f"logits({'scan' if scan else 'unrolled'})"] = rel(
                out.logits, ref.logits.numpy(), sel
            )
        iv = interventions.build(L + 1, model.hidden_size, steer=[(v, layer, 2.0)])
        out = pvjax.forward(model, ids, attention_mask=mask, intervention=iv)
        errs["steered logits"] = rel(out.logits, steered, sel)
        # Greedy generation, 24 new tokens, both layouts, against transformers' generate.
        prompt = seqs[1]
        with torch.no_grad():
            g = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=24,
                min_new_tokens=24,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        sp = SamplingParams(max_new_tokens=24, min_new_tokens=24)
        same = {
            u: generate_ids(model, [prompt], sampling=sp, unroll=u).tokens[0][:24] == g
            for u in (True, False)
        }
        ok = all(e <= RTOL for e in errs.values()) and all(same.values())
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {kind}: "
            + " ".join(f"{k}={e:.1e}" for k, e in errs.items())
            + f" greedy24 unrolled={same[True]} scanned={same[False]}"
        )
    print(f"gpu parity: {len(CONFIGS) - failures}/{len(CONFIGS)} configs within {RTOL:g}")
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) and 1)
