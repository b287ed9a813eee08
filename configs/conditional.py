"""Conditional steering's condition, fitted from two prompt sets and tested on held-out prompts
(`experiments/conditional.py`, CAST arXiv 2409.05907).

    python experiments/conditional.py --config configs/conditional.py:runlocal \
        --workdir runs/conditional
    python experiments/conditional.py --config configs/conditional.py:runlocal \
        --config.steer.vector=runs/steer-modes/vector/vectors.safetensors --workdir runs/conditional

`positives` are the prompts the condition should steer, `negatives` those it should leave alone
(one prompt a line; the shipped pair: cooking questions against computer and software questions,
written for the project). Each of `splits` random splits keeps `train_share` of each set for
fitting: the condition direction at each of `layers` is the difference of the two training sets'
mean last-prompt-token residuals, its threshold `pvjax.methods.conditions`' rule (`rule`: best F1,
or `fpr`: the best true-positive rate at a false-positive rate at most `target_fpr`); the rest of
each set is held out, and the table gives each layer's held-out hit rate on both sets, the mean
over splits with the 2.5-97.5 percentile range of the splits.

With `steer.vector` (`FILE[:KEY]`), the first split's condition at `steer.when_layer` gates
`steer.coef * vector` at `steer.layer`: `steer.n_prompts` held-out prompts of each set are answered
greedily, conditionally, unconditionally and unsteered, as rows of one batch, and the experiment
counts the rows whose conditional answer equals the unconditional one (condition true) or the
unsteered one (false).

runlocal: the embedded SmolLM2, layers 4..24, 20 splits of half the prompts: well under a minute on
a 2-core CPU without `steer.vector`, about a minute more with it.
"""

from pathlib import Path

import ml_collections

TOPICS = Path(__file__).resolve().parent.parent / "experiments" / "prompts" / "topics"


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m-instruct"  # the embedded model, a folder or a .gguf
    c.dtype = ""
    c.workdir = ""
    c.positives = str(TOPICS / "cooking.txt")  # prompts the condition should steer
    c.negatives = str(TOPICS / "software.txt")  # prompts it should leave alone
    c.layers = (4, 8, 12, 16, 20, 24)  # hidden_states rows the condition may read
    c.on = "projection"  # or cosine
    c.rule = "f1"  # f1 or fpr
    c.target_fpr = 0.05
    c.train_share = 0.5
    c.splits = 100
    c.seed = 0
    c.steer = ml_collections.ConfigDict()
    c.steer.vector = ""  # FILE[:KEY]; empty: no generation check
    c.steer.layer = 20
    c.steer.coef = 4.0
    c.steer.when_layer = 16  # at or before steer.layer: a condition gates layers from its own
    c.steer.n_prompts = 8
    c.steer.max_new_tokens = 32
    if "runlocal" in arg.split(","):
        c.splits = 20
    return c
