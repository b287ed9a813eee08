"""Steering study (`pvjax.studies.steer`): a layer x coefficient grid on the trait's eval questions.

    pvjax run   --config configs/steer.py:runlocal --config.trait=evil --workdir runs/steer-evil
    pvjax sweep --config configs/steer.py:runlocal --config.trait=evil --workdir runs/steer-modes
    pvjax run   --config configs/steer.py --config.trait=evil
    --config.vector=runs/evil/vectors.safetensors \
        --workdir runs/steer-evil-7b

`vector` is `FILE[:KEY]` (KEY defaults to response_avg_diff); empty, the trait's vector is extracted
first into the workdir with the `extract` config (configs/extract.py, same variant) and reused on
rerun. The whole grid (every layer x coefficient x question) runs as rows of one batched
generation, so widening the grid costs rows, not compiles. Per (layer, coefficient): the judge-free
likelihood margin, the judged trait score and coherence when `judge.backend` is set (as in
extraction: openai, local or none), multiple-choice accuracy on `mc.path` (the shipped "general"
set, or any MMLU-layout CSV; "" switches it off); the best layer by the rule in the study's
docstring; plots steer.png (metric vs coefficient per layer, coherence vs coefficient, layer x
coefficient heat map) and capability.png (metric vs accuracy). Closed loop, beside the fixed
coefficients in the same grid: `caps` (per layer, a row whose projection onto the unit vector is
held under each ceiling, token by token) and `targets` (moved toward each set point), with `gain`
and `max_step`, e.g. `--config.caps='(-20.0,)' --config.targets='(20.0,)'`. Modes (`modes`: add,
rescale, rotate with `angles`), composed points (`terms`, lists of term dicts) and sampling seeds
(`seeds`, mean and 95% interval per point) join the same grid; the `modes` variant
(`configs/steer.py:runlocal,modes`) is the docs' mode comparison.

runlocal: the embedded SmolLM2, 6 eval questions, layers 10/15/20 x coefficients -4..4, 48 new
tokens, no judge (the margin is the metric), 16 multiple-choice items: a few minutes on a 2-core
CPU after the extraction (about 3 minutes more when no vector is given).
"""

import ml_collections

from pvjax.settings import config_files


def get_config(arg: str = ""):
    # loaded by path, as ml_collections loads this file: a config runs from any working directory
    parts = config_files.beside(__file__, "study_parts")
    c = parts.study(
        "steer", arg
    )  # model, trait, vector, generation, judge, mc, extract (study_parts.py)
    # hidden_states rows; empty: five layers between a quarter and three quarters of the depth
    c.layers = ()
    c.coefs = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    # Closed-loop rows, per layer (projection onto the unit vector, token by token):
    # `interventions.cap`
    # for each ceiling in caps, `interventions.target` for each set point in targets; gain and
    # max_step as `pvjax generate --gain/--max-step` (share of the gap closed per token; largest
    # step).
    c.caps = ()
    c.targets = ()
    c.gain = 1.0
    c.max_step = float("inf")
    c.positions = "response"  # response (the paper's), prompt or all
    # Steering modes of the layer grid (pvjax.engine.terms): add (the paper's), rescale (the
    # coefficients again, each steered position kept at its norm), rotate (by each angle in
    # `angles`, radians, toward the vector); all in one compiled program.
    c.modes = ("add",)
    c.angles = ()
    # Composed grid points: each a list of term dicts {vector (default: the study's), layer,
    # coef | angle | cap | target, mode, without, when: {vector, layer, threshold, on}}.
    c.terms = ()
    # Sampling seeds (temperature > 0): every question answered once per seed, distinct2 and
    # shift reported as the mean over seeds with a 95% interval.
    c.seeds = ()

    c.best = ml_collections.ConfigDict()
    c.best.min_coherence = 50.0

    if parts.runlocal(arg):
        c.layers = (10, 15, 20)
        c.coefs = (-4.0, -2.0, 0.0, 2.0, 4.0)
    if "modes" in arg.split(","):  # the docs' mode comparison: add, rescale, rotate, three seeds
        c.modes = ("add", "rescale", "rotate")
        c.angles = (0.0, 0.1, 0.2, 0.4, 0.8)
        c.seeds = (0, 1, 2)
        c.temperature = 0.7
    return c


def sweep(add):
    """The grid at each position mode: the paper's `response`, the prompt only, and every
    position."""
    for positions in ("response", "prompt", "all"):
        add(positions=positions)
