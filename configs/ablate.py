"""Layer-ablation study (`pvjax.studies.ablate`): project the trait's vector out, layer by layer.

    pvjax run   --config configs/ablate.py:runlocal --config.trait=evil --workdir runs/ablate-evil
    pvjax sweep --config configs/ablate.py:runlocal --config.trait=evil --workdir
    runs/ablate-windows

Variants: directional ablation at each of `layers`, at a window of `window` rows around each, and at
every layer (CAFT's ablation, at inference); controls: mean-ablation (the projection set to its
mean instead of zero) and a random direction of the same norm, per layer and at every layer. Per
variant the likelihood margin (judge-free), trait score and coherence when `judge.backend` is set,
and multiple-choice accuracy on `mc.path`, each against the unablated baseline; ablation.png plots
the effect against the layer. `vector` as in configs/steer.py (empty: extract first).

runlocal: the embedded SmolLM2, 6 eval questions, 5 layers, no judge, 16 multiple-choice items.
"""

from pvjax.settings import config_files


def get_config(arg: str = ""):
    # loaded by path, as ml_collections loads this file: a config runs from any working directory
    parts = config_files.beside(__file__, "study_parts")
    c = parts.study(
        "ablate", arg
    )  # model, trait, vector, generation, judge, mc, extract (study_parts.py)
    # hidden_states rows; empty: five layers between a quarter and three quarters of the depth
    c.layers = ()
    c.window = 5  # rows in each window variant, centred on the layer
    # answers are generated only when a judge scores them; `seed` also seeds the random-direction
    # control

    if parts.runlocal(arg):
        c.layers = (5, 10, 15, 20, 25)
    return c


def sweep(add):
    """Windows of 3, 5 and 9 rows."""
    for window in (3, 5, 9):
        add(window=window)
