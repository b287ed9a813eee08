"""The paper's methods, models and arrays in, results out: extraction (`extraction`, with the pair
filter in `pair_filter`), monitoring (`monitoring`), data screening (`screening`), finetuning shift
(`finetune_shift`), and writing trait files with an LLM (`trait_gen`).

May import: `measure`, the engine, `settings`, `llm`, the model contract and everything below it.
Never `studies` or the CLI."""
