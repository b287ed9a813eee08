"""The paper's methods, models and arrays in, results out: extraction (`extraction`, with the pair
filter in `pair_filter`), monitoring (`monitoring`), data screening (`screening`), finetuning shift
(`finetune_shift`), writing trait files with an LLM (`trait_gen`), and conditional steering's
threshold fitted from two prompt sets (`conditions`).

May import: `measure`, the engine, `settings`, `llm`, the model contract and everything below it.
Never `studies` or the CLI."""
