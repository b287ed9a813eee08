"""What the study configs share: every study's header (`header`: the model, trait and vector
fields and the nested extraction config), and for the steering and ablation configs
(configs/steer.py, configs/ablate.py) also how answers are generated and scored, the judge and the
multiple-choice set (`study`); with what their `runlocal` variant changes in those.

A config file is loaded by path (`ml_collections`), not imported as a package, so the configs load
this file by path too (`pvjax.settings.config_files.beside`)."""

import ml_collections

from pvjax.settings import config_files


def runlocal(arg: str) -> bool:
    return "runlocal" in arg.split(",")


def header(name: str, arg: str):
    """The fields every study config opens with; with `runlocal` in `arg`, the embedded SmolLM2
    and extraction's `runlocal` variant."""
    c = ml_collections.ConfigDict()
    c.study = name
    c.model = "Qwen/Qwen2.5-7B-Instruct"  # a local folder of safetensors
    c.dtype = ""
    # Qwen3's chat-template switch: False renders answers without a reasoning block (persona
    # work reads the answer); other templates have no switch and ignore it. `--thinking` sets it.
    c.enable_thinking = False
    c.trait = "evil"
    c.vector = ""  # FILE[:KEY]; empty: extract the trait's vector first (c.extract)
    c.workdir = ""
    c.extract = config_files.sibling(__file__, "extract", "runlocal" if runlocal(arg) else "")
    if runlocal(arg):
        c.model = "smollm2-135m-instruct"
    return c


def study(name: str, arg: str):
    """A steering or ablation study's config: the header and the shared fields (the study adds its
    own after them); with `runlocal` in `arg`: the embedded SmolLM2, 6 eval questions, 48 new
    tokens, no judge, 16 multiple-choice items."""
    c = header(name, arg)
    c.n_questions = 0  # 0: every eval question
    c.max_new_tokens = 512
    c.temperature = 0.0
    c.seed = 0
    c.batch_size = 64  # rows per generation batch
    c.forward_batch_size = (
        8  # rows per scoring forward (margin, multiple choice): logits are [rows, T, V]
    )
    c.plot = True

    c.judge = ml_collections.ConfigDict()
    c.judge.backend = "openai"  # "local": a pvjax model judges; "none": judge-free (margin only)
    c.judge.model = "gpt-4.1-mini"
    c.judge.base_url = ""
    c.judge.concurrency = 8
    c.judge.batch_size = 8
    c.judge.numeric_only = False

    c.mc = ml_collections.ConfigDict()
    c.mc.path = "general"  # a shipped set's name or an MMLU-layout CSV; "" switches it off
    c.mc.n_items = 0  # 0: every item

    if runlocal(arg):
        c.n_questions = 6
        c.max_new_tokens = 48
        c.batch_size = 32
        c.judge.backend = "none"
        c.judge.model = "same"
        c.judge.numeric_only = True
        c.mc.n_items = 16
    return c
