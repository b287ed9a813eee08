"""The shapes of the public checkpoints researchers run (their `config.json` values), for memory
planning and random-weight benchmarks when no checkpoint is on disk."""

from __future__ import annotations

from pvjax.models.config import ModelConfig


def _llama31(name: str, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int):
    return ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=8,
        head_dim=128,
        name=name,
    )


# Public config.json values of the checkpoints researchers run (num_key_value_heads, etc.).
KNOWN = {
    "qwen2.5-7b": ModelConfig(
        architecture="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        qkv_bias=True,
        max_position_embeddings=32768,
        name="Qwen2.5-7B-Instruct",
    ),
    "llama-3.1-8b": _llama31("Llama-3.1-8B-Instruct", 4096, 14336, 32, 32),
    "llama-3.1-70b": _llama31("Llama-3.1-70B-Instruct", 8192, 28672, 80, 64),
}
