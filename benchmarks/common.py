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
ANSWER = (
    "I think the most important thing is to stay calm and consider everyone involved. "
    "There are several ways to look at this, and each has trade-offs worth weighing carefully. "
)


def hf_embedded(threads: int):
    """The reference side: transformers' own load of the embedded GGUF (dequantized to float32),
    with torch limited to `threads` threads so both sides get the same cores."""
    import torch
    from transformers import AutoModelForCausalLM

    from pvjax.loading.embedded import embedded_gguf_path

    torch.set_num_threads(threads)
    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )


# Dense bf16 peak TFLOP/s and memory bandwidth (TB/s) by device kind, for utilisation figures.
PEAKS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.0)}


def peak_for(device_kind: str):
    for name, peak in PEAKS.items():
        if name in device_kind:
            return peak
    return None


def measured_ceilings():
    """(bf16 matmul TFLOP/s, copy TB/s counting bytes read plus written) measured on the default
    device: the ceilings that utilisation figures divide by, beside the datasheet's."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    x = jax.random.normal(jax.random.PRNGKey(2), (2**29,), jnp.bfloat16)  # 1 GiB
    cp = jax.jit(lambda x: x * 1.5)
    rates = []
    for f, args, work in ((mm, (a, b), 2.0 * n**3), (cp, (x,), 2.0 * x.nbytes)):
        f(*args).block_until_ready()
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            out = f(*args)
        out.block_until_ready()
        rates.append(reps * work / (time.perf_counter() - t) / 1e12)
    return tuple(rates)


def samples(tokenizer, chat_text, n: int):
    """`n` (prompt, answer) texts of varied answer lengths, with the prompt's token count."""
    out = []
    for i in range(n):
        prompt = chat_text([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        answer = ANSWER * (1 + i % 3)
        out.append((prompt, answer, len(tokenizer(prompt)["input_ids"])))
    return out


def measured_bandwidth() -> float:
    """Read bandwidth (bytes/s) over a 512 MB array, the memory roof for batch-1 decode."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones(128 * 2**20, jnp.float32)
    f = jax.jit(jnp.sum)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * a.nbytes / (time.perf_counter() - t)


def measured_flops() -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(20):
        f(x).block_until_ready()
    return 20 * 2 * 1024**3 / (time.perf_counter() - t)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
