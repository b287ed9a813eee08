"""Data screening (`pvjax.studies.screen`): the projection difference of every training sample.

    pvjax screen --config configs/screen.py --config.datasets=data/train.jsonl \
        --config.vector=runs/evil/vectors.safetensors --config.workdir=runs/screen
    pvjax screen --config configs/screen.py:runlocal --config.workdir=/tmp/screen

`datasets` is one file or several, comma-separated (chat JSONL `{"messages": [...]}` or CSV with
`prompt_column` / `answer_column`); several files are screened in one pass and compared, one row
each in `datasets.csv`. `vector` is `FILE[:KEY]`, or empty: the trait's vector is extracted first
into `<workdir>/vector` with the nested `extract` config. Samples are flagged by `flag.mode`:
`top_fraction` (the largest differences) or `threshold` (difference above it); the filtered
dataset drops the flagged ones. The base model's own answers are cached in `cache_dir` (default
`<workdir>/answer_cache`; point several runs at one folder to share them).

`runlocal` screens two small shipped datasets on the embedded model (8 prompts with evil answers as
chat JSONL, the same prompts with helpful answers as CSV), with the evil vector extracted on the
spot by `configs/extract.py:runlocal`; a few minutes on a 2-core CPU.
"""

from importlib import resources

import ml_collections

from pvjax.settings import config_files

# loaded by path, so this file runs from any working directory (pvjax.settings.config_files)
parts = config_files.beside(__file__, "study_parts")


def shipped_dataset(name: str) -> str:
    return str(resources.files("pvjax") / "data" / "datasets" / name)


def get_config(arg: str = ""):
    runlocal = "runlocal" in arg.split(",")
    c = parts.header("screen", arg)  # model: the base model, before finetuning
    c.datasets = ""  # FILE[,FILE...]
    c.format = ""  # jsonl | csv; empty: from the suffix
    c.prompt_column = "prompt"  # CSV only
    c.answer_column = "answer"
    c.layer = 20  # hidden_states index
    c.max_new_tokens = 256  # the model's own answers
    c.temperature = 0.0
    c.top_p = 1.0
    c.seed = 0
    c.batch_size = 16
    c.max_len = (
        0  # prompt + answer tokens; 0: the context window. Longer samples are counted, not scored
    )
    c.cache_dir = ""
    c.plot = True
    c.flag = ml_collections.ConfigDict()
    c.flag.mode = "top_fraction"  # or "threshold"
    c.flag.top_fraction = 0.1
    c.flag.threshold = 0.0
    if runlocal:
        c.datasets = ",".join(
            shipped_dataset(n) for n in ("evil_answers.jsonl", "helpful_answers.csv")
        )
        c.max_new_tokens = 48
        c.flag.top_fraction = 0.25
    return c
