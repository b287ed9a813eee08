"""The whole method on a laptop CPU in a few minutes, on the embedded SmolLM2-135M-Instruct.

    python experiments/quickstart.py [--trait humorous] [--workdir runs/quickstart]

1. Extract a persona vector: the model answers a few questions under trait and anti-trait system
   prompts, keeps the pairs whose trait answer it finds clearly likelier under the trait prompt than
   its anti-trait twin (the judge-free contrast filter: no judge), and the vector at every layer is
   the difference of mean activations (configs/extract.py:runlocal).
2. Check that it is causal without a judge: steering raises the likelihood of the trait answers.
3. Answer a new question unsteered, steered and over-steered, in one batch (a row per coefficient).

A killed run resumes where it stopped. Everything lands in the workdir (answers CSVs, vectors,
causality, plot).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs.extract import get_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trait", default="humorous")
    p.add_argument("--workdir", default="runs/quickstart")
    p.add_argument("--question", default="What should I do on a rainy afternoon?")
    p.add_argument("--coef", type=float, default=2.0)
    p.add_argument(
        "--short",
        action="store_true",
        help="shorter answers throughout (CI's check of the main command on a fresh machine)",
    )
    args = p.parse_args()

    import numpy as np

    import pvjax
    from pvjax import interventions as ivs
    from pvjax.engine.generate import SamplingParams, generate
    from pvjax.files.vectors import read_vector
    from pvjax.methods.extraction import run

    cfg = get_config("runlocal")
    cfg.trait, cfg.workdir = args.trait, os.path.join(args.workdir, args.trait)
    if args.short:
        cfg.max_new_tokens = 32
    print(f"[1/3] extracting a '{args.trait}' vector on {cfg.model} into {cfg.workdir}")
    summary = run(cfg)
    c = summary["counts"]
    print(
        f"      kept {c['kept']} of {c['pairs']} answer pairs "
        f"({c['failed_filter']} below the margin, {c['empty']} with an empty answer)"
    )

    layers = summary["causality"]["layers"]
    best = max(layers, key=lambda l: layers[l]["slope"])
    print(
        "[2/3] causality (log-likelihood margin of trait over anti-trait answers vs coefficient):"
    )
    for l, r in layers.items():
        print(
            f"      layer {l}: {' '.join('%+.3f' % m for m in r['margins'])} over coefs "
            f"{summary['causality']['coefs']}{'  monotonic' if r['monotonic'] else ''}"
        )

    model = pvjax.load(cfg.model)
    layer = int(best)
    vector = read_vector(os.path.join(cfg.workdir, "vectors.safetensors:response_avg_diff"), model)
    coefs = [0.0, args.coef, 2 * args.coef]  # unsteered, steered, over-steered: one batch
    iv = ivs.build(model.n_layers + 1, model.hidden_size, steer=[(vector, layer, coefs)], batch=3)
    g = generate(
        model,
        [args.question] * 3,
        intervention=iv,
        positions="response",
        sampling=SamplingParams(max_new_tokens=32 if args.short else 80),
    )
    print(
        f"[3/3] '{args.question}' at layer {layer} (row {layer} of hidden_states), "
        f"||v|| = {np.linalg.norm(vector[layer]):.1f}"
    )
    labels = ["unsteered", "steered", "over-steered: large coefficients cost coherence"]
    for coef, label, text in zip(coefs, labels, g.texts):
        print(f"\n--- coef {coef:g} ({label}) ---\n{text}")
    print(f"\nplot: {os.path.join(cfg.workdir, 'plot.png')}")


if __name__ == "__main__":
    main()
