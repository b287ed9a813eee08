"""Layer-ablation study (`pvjax.studies.ablate`): project the trait's vector out, layer by layer.

    pvjax run   --config configs/ablate.py:runlocal --config.trait=evil --workdir runs/ablate-evil
    pvjax sweep --config configs/ablate.py:runlocal --config.trait=evil --workdir runs/ablate-windows

Variants: directional ablation at each of `layers`, at a window of `window` rows around each, and at
every layer (CAFT's ablation, at inference); controls: mean-ablation (the projection set to its
mean instead of zero) and a random direction of the same norm, per layer and at every layer. Per
variant the likelihood margin (judge-free), trait score and coherence when `judge.backend` is set,
and multiple-choice accuracy on `mc.path`, each against the unablated baseline; ablation.png plots
the effect against the layer. `vector` as in configs/steer.py (empty: extract first).

runlocal: the embedded SmolLM2, 6 eval questions, 5 layers, no judge, 16 multiple-choice items.
"""

import importlib.util
import os

import ml_collections


def _extract_config(arg: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extract.py")
    spec = importlib.util.spec_from_file_location("pvjax_configs_extract", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.study = "ablate"
    c.model = "Qwen/Qwen2.5-7B-Instruct"
    c.dtype = ""
    c.trait = "evil"
    c.vector = ""
    c.workdir = ""
    c.layers = ()  # hidden_states rows; empty: five layers between a quarter and three quarters of the depth
    c.window = 5  # rows in each window variant, centred on the layer
    c.n_questions = 0
    c.max_new_tokens = 512  # answers are generated only when a judge scores them
    c.temperature = 0.0
    c.seed = 0  # also seeds the random-direction control
    c.batch_size = 64
    c.forward_batch_size = 8
    c.plot = True

    c.judge = ml_collections.ConfigDict()
    c.judge.backend = "openai"
    c.judge.model = "gpt-4.1-mini"
    c.judge.base_url = ""
    c.judge.concurrency = 8
    c.judge.batch_size = 8
    c.judge.numeric_only = False

    c.mc = ml_collections.ConfigDict()
    c.mc.path = "general"
    c.mc.n_items = 0

    c.extract = _extract_config(arg)

    if "runlocal" in arg.split(","):
        c.model = "smollm2-135m-instruct"
        c.layers = (5, 10, 15, 20, 25)
        c.n_questions = 6
        c.max_new_tokens = 48
        c.batch_size = 32
        c.judge.backend = "none"
        c.judge.model = "same"
        c.judge.numeric_only = True
        c.mc.n_items = 16
    return c


def sweep(add):
    """Windows of 3, 5 and 9 rows."""
    for window in (3, 5, 9):
        add(window=window)
