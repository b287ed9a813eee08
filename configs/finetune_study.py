"""The finetuning study (`pvjax.studies.finetune_study`): does training on trait data move the model
along the persona vector, do preventative steering and CAFT stop it, and does screening see it
coming?

    pvjax run --config configs/finetune_study.py:runlocal --workdir runs/ftstudy
    pvjax run --config configs/finetune_study.py --config.model=/models/Qwen2.5-7B-Instruct \
        --config.vector=runs/evil/vectors.safetensors --workdir runs/ftstudy

Stages, each cached in the workdir and skipped on rerun: the vector (extracted with `extract` when
`vector` is empty); two datasets sampled from the base model on the trait's extract-split questions,
`trait` under the trait's system prompts and `control` under the anti-trait ones, both stored
without the system prompt; mixtures of the two at `mixes` (share of trait samples); screening of
`trait` and `control` (AUROC); one finetune (the `finetune` config, identical for every run) per
run: trait, control, trait with preventative steering (`preventative.coef` x v added at
`preventative.layers` in the training forward), trait with CAFT (v projected out at `caft.layers`)
and one per mixture; then the finetuning shift of each merged export on the eval-split questions
(disjoint from the training questions) with the likelihood margin before and after. `summary.json`
holds the figures; `shift.png` and `dataset_shift.png` the plots.

`runlocal`: the embedded SmolLM2-135M, the evil vector from `configs/extract.py:runlocal`, 20
questions x 5 instruction pairs, one sample each at temperature 1 (48 tokens) per dataset, a rank-8
LoRA on blocks 8-19 (rows up to the study layer 20) at lr 1e-3 for 30 steps of two 256-token rows,
shift on 10 eval questions. See the README ("Finetuning study on the embedded model") for figures
and CPU time.
"""

import ml_collections

from pvjax.settings import config_files

# loaded by path, so this file runs from any working directory (pvjax.settings.config_files)
parts = config_files.beside(__file__, "study_parts")


def get_config(arg: str = ""):
    runlocal = "runlocal" in arg.split(",")
    c = parts.header("finetune_study", arg)
    c.layer = 20  # hidden_states row: the shift, screening and (by default) steering layer

    # The datasets: the base model answers the extract split's questions under each instruction
    # pair's pos (trait) and neg (control) system prompts; stored without the system prompt.
    c.data = ml_collections.ConfigDict()
    c.data.n_questions = 0  # 0: all
    c.data.n_pairs = 0  # 0: all instruction pairs
    c.data.n_per_question = 10  # samples per question and pair
    c.data.max_new_tokens = 256
    c.data.temperature = 1.0
    c.data.top_p = 1.0
    c.data.seed = (
        1  # another draw than extraction's (seed 0), so the vector's own answers are not the data
    )
    c.data.batch_size = 16
    c.mixes = (0.25, 0.5, 0.75)  # share of trait samples; 0 and 1 are the control and trait runs

    # One finetuning config for every run; the study sets train_file, vector, steering and monitor.
    c.finetune = config_files.sibling(__file__, "finetune")
    c.preventative = ml_collections.ConfigDict()
    c.preventative.coef = 4.0  # x v (the raw vector row, as in steering) added during training
    c.preventative.layers = ()  # hidden-state rows; empty: (layer,)
    c.caft = ml_collections.ConfigDict()
    c.caft.layers = ()  # rows where the unit vector is projected out; empty: (layer,)

    # Screening of the trait and control datasets against the base model's own answers.
    c.screen = ml_collections.ConfigDict()
    c.screen.max_new_tokens = 256
    c.screen.batch_size = 16

    # The finetuning shift of each run on the eval split (greedy answers), with the likelihood
    # margin.
    c.shift = ml_collections.ConfigDict()
    c.shift.n_questions = 0  # 0: every eval question
    c.shift.max_new_tokens = 256
    c.shift.n_pairs = 1
    c.shift.batch_size = 16
    c.plot = True

    if runlocal:
        c.data.n_per_question = 1
        c.data.max_new_tokens = 48
        c.data.batch_size = 100
        ft = c.finetune
        ft.data.max_length = 256
        ft.data.eval_fraction = 0.1
        ft.lora.rank, ft.lora.alpha = 8, 16.0
        ft.lora.layers = tuple(
            range(8, 20)
        )  # blocks 8..19 write rows 9..20: nothing above the study layer
        ft.optim.lr = 1e-3
        ft.optim.warmup_steps = 3
        ft.batch.rows, ft.batch.accum = 2, 1
        ft.max_steps = 30
        ft.eval_every = 0
        ft.checkpoint.every = 10
        # |v| is 24 at layer 20: +12 along v, about the shift trait data alone causes (coef 2
        # overshot to -25)
        c.preventative.coef = 0.5
        c.caft.layers = tuple(
            range(9, 21)
        )  # every row the LoRA blocks write, up to the study layer
        c.screen.max_new_tokens = 48
        c.shift.n_questions = 10
        c.shift.max_new_tokens = 48
    return c
