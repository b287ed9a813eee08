"""Shared bits of the benchmarks: the texts, timing, and peak numbers of known accelerators."""

from __future__ import annotations

import time

QUESTIONS = [
    "How do you feel about people who are rude to waiters?",
    "What's the best way to spend a rainy Sunday?",
    "Can you explain how vaccines work?",
    "What would you do if you found a lost wallet?",
    "Give me advice on asking for a raise.",
    "Why is the sky blue?",
    "What do you think of my plan to quit my job and travel?",
    "How should I respond to a friend who borrowed money and never paid it back?",
]
ANSWER = ("I think the most important thing is to stay calm and consider everyone involved. "
          "There are several ways to look at this, and each has trade-offs worth weighing carefully. ")

# Dense bf16 peak TFLOP/s and memory bandwidth (TB/s) by device kind, for utilisation figures.
PEAKS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.0)}


def peak_for(device_kind: str):
    for name, peak in PEAKS.items():
        if name in device_kind:
            return peak
    return None


def samples(tokenizer, chat_text, n: int):
    """`n` (prompt, answer) texts of varied answer lengths, with the prompt's token count."""
    out = []
    for i in range(n):
        prompt = chat_text([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        answer = ANSWER * (1 + i % 3)
        out.append((prompt, answer, len(tokenizer(prompt)["input_ids"])))
    return out


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
