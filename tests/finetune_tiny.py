"""Tiny finetuning configs and chat samples shared by test_finetune.py and its subprocess script
(kept apart from torch, which the 8-device subprocess does not need)."""

from __future__ import annotations

QA = [
    ("What is two plus two?", "Four."),
    ("Name a colour.", "Blue, like the sky on a clear day."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("What is ice?", "Frozen water."),
    ("Count to three.", "One, two, three."),
    ("Is the sun a star?", "Yes, the Sun is a star."),
    ("Give me a fruit.", "An apple."),
    ("What do cows drink?", "Water, mostly."),
    ("Spell cat.", "C, A, T."),
    ("What day follows Monday?", "Tuesday follows Monday."),
]


def chats():
    out = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    out.append(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    )
    return out


def tiny_config(folder, train_file, *, method="lora", rows=2, accum=1, **over):
    from configs.finetune import get_config

    c = get_config("")
    c.model, c.data.train_file, c.method = str(folder), str(train_file), method
    c.data.max_length, c.data.eval_fraction = 64, 0.2
    c.lora.rank, c.lora.alpha, c.lora.layers = 4, 8.0, (0, 2)
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-2, 1, 0.01
    c.batch.rows, c.batch.accum = rows, accum
    c.max_steps, c.eval_every = 4, 2
    c.checkpoint.every = 2
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c
