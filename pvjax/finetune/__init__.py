"""Finetuning: supervised training on chat data with LoRA or full weights, preventative steering,
CAFT and a projection penalty in the training forward only, orbax checkpoints, and exports.

    from pvjax.finetune import train, load_finetuned
    summary = train(configs.finetune.get_config("runlocal"), "runs/ft")   # resumable
    model = pvjax.load(summary["export"]["merged"])                       # or
    load_finetuned("runs/ft")

Modules, each for one step: `data` (chat JSONL / CSV -> ids and loss masks -> packed rows),
`lora` (adapters as a tree rewrite over the frozen base), `step` (the jitted, sharded train step),
`checkpoint` (orbax), `export` (Hugging Face folder, peft adapters), `settings` (config checks),
`train` (the run).
"""

from pvjax.finetune.trainer import TrainingDiverged, load_finetuned, train

__all__ = ["train", "load_finetuned", "TrainingDiverged"]
