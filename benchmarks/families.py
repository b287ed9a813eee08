"""Random models of each family at SmolLM2-135M's size, for `--family F` of forward.py,
generate.py and train.py: the pvjax model (random weights from `pvjax.models.random_init`, the
embedded SmolLM2's tokenizer, so the same texts run) and transformers' model of the same config
with the same weights (the pvjax model exported as a Hugging Face folder and loaded back by
transformers). The MoE has 8 experts of width 768, 2 routed per token: the active MLP width of the
dense models (1536).

What a decode step reads and what a token costs count the routed experts only
(`active_bytes`, `active_params`), and not the input embedding table where it is not tied (a step
gathers one row of it).
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3moe", "mistral", "gemma2", "gemma3")

# SmolLM2-135M-Instruct's shapes; each family adds its own fields.
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
_GEMMA = dict(query_pre_attn_scalar=64, hidden_activation="gelu_pytorch_tanh")
_EXTRA = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", rope_theta=1e6),
    "qwen3moe": dict(
        model_type="qwen3_moe",
        rope_theta=1e6,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
    "mistral": dict(model_type="mistral", sliding_window=4096, rope_theta=1e6),
    "gemma2": dict(
        _GEMMA,
        model_type="gemma2",
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3": dict(
        _GEMMA,
        model_type="gemma3_text",
        sliding_window=512,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
}


def family_config(family: str, n_layers: int = 0):
    """The pvjax `ModelConfig` of `family` at SmolLM2's size (`n_layers` blocks, 0: its 30)."""
    from pvjax.models.config import ModelConfig

    if family not in FAMILIES:
        raise SystemExit(f"--family {family}: one of {', '.join(FAMILIES)}")
    hf = {**SMOLLM2, **_EXTRA[family]}
    if n_layers:
        hf["num_hidden_layers"] = n_layers
    return ModelConfig.from_hf(hf, name=f"random-{family}-smollm2-size")


def family_models(family: str, threads: int, n_layers: int = 0, reference: bool = True):
    """(pvjax model, transformers model or None): one random float32 model on both sides."""
    import pvjax
    from pvjax.loading.embedded import embedded_gguf_path
    from pvjax.loading.tokenizer import load_gguf_tokenizer
    from pvjax.models.random_init import random_params

    cfg = family_config(family, n_layers)
    params = random_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    tok = load_gguf_tokenizer(embedded_gguf_path())
    model = pvjax.Model(cfg, params, tokenizer=tok, source=cfg.name)
    if not reference:
        return model, None
    import torch
    from transformers import AutoModelForCausalLM

    from pvjax.finetune.export import save_hf_folder

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_folder(f"{tmp}/model", cfg, params)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model, hf.eval()


def _expert_share(cfg, key: str) -> float:
    return cfg.experts_per_token / cfg.num_experts if key.endswith("_e") else 1.0


def active_bytes(model) -> float:
    """Bytes of weights one decoded token reads: the routed experts only, no untied input table."""
    p, cfg = model.params, model.config
    total = sum(x.nbytes for k, x in p.items() if k != "layers")
    if not cfg.tie_embeddings:
        total -= p["embed"].nbytes
    return total + sum(x.nbytes * _expert_share(cfg, k) for k, x in p["layers"].items())


def active_params(model) -> float:
    """Parameters one token multiplies by (2 FLOP each): as `active_bytes`, in parameters."""
    p, cfg = model.params, model.config
    total = sum(x.size for k, x in p.items() if k != "layers")
    if not cfg.tie_embeddings:
        total -= p["embed"].size
    return total + sum(x.size * _expert_share(cfg, k) for k, x in p["layers"].items())


def add_family_argument(parser) -> None:
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="a random model of this family at SmolLM2-135M's size (default: SmolLM2 itself)",
    )
    parser.add_argument(
        "--layers", type=int, default=0, help="with --family: fewer blocks (a quick check)"
    )
