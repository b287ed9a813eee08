"""Finetuning shift (`pvjax.studies.shift`): how far a finetune moved the model along the vector.

    pvjax shift --config configs/shift.py --config.finetuned=runs/ft/merged \
        --config.vector=runs/evil/vectors.safetensors --config.workdir=runs/shift
    pvjax shift --config configs/shift.py:runlocal --config.workdir=/tmp/shift

`model` is the base, `finetuned` any model source of the same architecture and shape (a folder of
safetensors, with or without tokenizer files, a `.gguf`, the embedded name). On the trait's eval
questions it writes the shift per layer (`shift.csv`: last prompt token, the paper's measure, and
response mean, over each model's own answers with `response_source="own"`), the judge-free
likelihood margin and contrast before and after (`margin`), and the judged trait score when
`judge.backend` is not `none`.

`runlocal` compares the embedded model with itself (no finetuned model ships with pvjax): every
shift and every delta comes out zero, which checks the pipeline; pass `--config.finetuned=DIR`
for a real comparison.
"""

import ml_collections

from pvjax.settings import config_files

# loaded by path, so this file runs from any working directory (pvjax.settings.config_files)
parts = config_files.beside(__file__, "study_parts")


def get_config(arg: str = ""):
    runlocal = "runlocal" in arg.split(",")
    c = parts.header("shift", arg)  # model and vector: the base model's
    c.finetuned = ""  # a model source of the same shape
    c.layer = 20  # the layer reported in the summary; shift.csv has every layer
    c.n_questions = 0  # 0: every eval question
    c.response_source = "own"  # own | base | finetuned: whose answers the response mean runs over
    c.margin = True  # likelihood margin and contrast (reference answers from the base model)
    c.n_pairs = 1  # instruction pairs for the reference answers and the contrast
    c.max_new_tokens = 256
    c.temperature = 0.0
    c.top_p = 1.0
    c.seed = 0
    c.batch_size = 16
    c.cache_dir = ""
    c.plot = True
    c.judge = ml_collections.ConfigDict()
    c.judge.backend = "none"  # "openai" (any compatible server) or "local" (a pvjax model)
    c.judge.model = "gpt-4.1-mini"  # for local: "same" (the base model) or a model source
    c.judge.base_url = ""
    c.judge.concurrency = 8
    c.judge.batch_size = 8
    c.judge.numeric_only = False
    if runlocal:
        c.finetuned = c.model
        c.n_questions = 6
        c.max_new_tokens = 48
    return c
