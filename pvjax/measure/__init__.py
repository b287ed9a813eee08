"""Measurements on a model: pooled activations over packed rows (`packing`), likelihood margins
and the causality check (`causality`), multiple-choice scoring (`mc`), LLM judges (`judges`).

May import: the engine, the model contract, `models`, `files`, `parallel`, `llm`."""
