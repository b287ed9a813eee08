"""Steering study (`pvjax.studies.steer`): a layer x coefficient grid on the trait's eval questions.

    pvjax run   --config configs/steer.py:runlocal --config.trait=evil --workdir runs/steer-evil
    pvjax sweep --config configs/steer.py:runlocal --config.trait=evil --workdir runs/steer-modes
    pvjax run   --config configs/steer.py --config.trait=evil --config.vector=runs/evil/vectors.safetensors \
        --workdir runs/steer-evil-7b

`vector` is `FILE[:KEY]` (KEY defaults to response_avg_diff); empty, the trait's vector is extracted
first into the workdir with the `extract` config (configs/extract.py, same variant) and reused on
rerun. The whole grid (every layer x coefficient x question) runs as rows of one batched
generation, so widening the grid costs rows, not compiles. Per (layer, coefficient): the judge-free
likelihood margin, the judged trait score and coherence when `judge.backend` is set (as in
extraction: openai, local or none), multiple-choice accuracy on `mc.path` (the shipped "general"
set, or any MMLU-layout CSV; "" switches it off); the best layer by the rule in the study's
docstring; plots steer.png (metric vs coefficient per layer, coherence vs coefficient, layer x
coefficient heat map) and capability.png (metric vs accuracy).

runlocal: the embedded SmolLM2, 6 eval questions, layers 10/15/20 x coefficients -4..4, 48 new
tokens, no judge (the margin is the metric), 16 multiple-choice items: a few minutes on a 2-core
CPU after the extraction (about 3 minutes more when no vector is given).
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
    c.study = "steer"
    c.model = "Qwen/Qwen2.5-7B-Instruct"  # a local folder of safetensors
    c.dtype = ""
    c.trait = "evil"
    c.vector = ""  # FILE[:KEY]; empty: extract the trait's vector first (c.extract)
    c.workdir = ""
    c.layers = ()  # hidden_states rows; empty: five layers between a quarter and three quarters of the depth
    c.coefs = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    # Closed-loop rows, per layer (projection onto the unit vector, token by token): `interventions.cap`
    # for each ceiling in caps, `interventions.target` for each set point in targets; gain and
    # max_step as `pvjax generate --gain/--max-step` (share of the gap closed per token; largest step).
    c.caps = ()
    c.targets = ()
    c.gain = 1.0
    c.max_step = float("inf")
    c.positions = "response"  # response (the paper's), prompt or all
    c.n_questions = 0  # 0: every eval question
    c.max_new_tokens = 512
    c.temperature = 0.0
    c.seed = 0
    c.batch_size = 64  # rows per generation batch
    c.forward_batch_size = 8  # rows per scoring forward (margin, multiple choice): logits are [rows, T, V]
    c.plot = True

    c.judge = ml_collections.ConfigDict()
    c.judge.backend = "openai"  # "local": a pvjax model judges; "none": judge-free (margin only)
    c.judge.model = "gpt-4.1-mini"
    c.judge.base_url = ""
    c.judge.concurrency = 8
    c.judge.batch_size = 8
    c.judge.numeric_only = False

    c.best = ml_collections.ConfigDict()
    c.best.min_coherence = 50.0

    c.mc = ml_collections.ConfigDict()
    c.mc.path = "general"  # a shipped set's name or an MMLU-layout CSV; "" switches it off
    c.mc.n_items = 0  # 0: every item

    c.extract = _extract_config(arg)

    if "runlocal" in arg.split(","):
        c.model = "smollm2-135m-instruct"
        c.layers = (10, 15, 20)
        c.coefs = (-4.0, -2.0, 0.0, 2.0, 4.0)
        c.n_questions = 6
        c.max_new_tokens = 48
        c.batch_size = 32
        c.judge.backend = "none"
        c.judge.model = "same"
        c.judge.numeric_only = True
        c.mc.n_items = 16
    return c


def sweep(add):
    """The grid at each position mode: the paper's `response`, the prompt only, and every position."""
    for positions in ("response", "prompt", "all"):
        add(positions=positions)
