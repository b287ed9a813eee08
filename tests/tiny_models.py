"""Tiny random transformers checkpoints saved to disk, for parity tests of the loaders and
decoder."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# transformers 5 renamed `torch_dtype`; the suite runs on the 4.x floor too.
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

LLAMA31 = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    ),
)
LLAMA_MHA_TIED = dict(
    model_type="llama",
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)
LLAMA_GQA_UNTIED = dict(LLAMA31, rope_scaling=None, rope_theta=10000.0)
QWEN2_TIED = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
QWEN2_UNTIED = dict(QWEN2_TIED, tie_word_embeddings=False, num_key_value_heads=1)

# Heads and kv heads that 8 devices divide: tensor-parallel generation on 8 host devices.
LLAMA_HEADS8 = dict(
    model_type="llama",
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)

CONFIGS = {
    "llama_heads8": LLAMA_HEADS8,
    "llama31_gqa_llama3rope": LLAMA31,
    "llama_mha_tied": LLAMA_MHA_TIED,
    "llama_gqa_untied": LLAMA_GQA_UNTIED,
    "qwen2_tied": QWEN2_TIED,
    "qwen2_untied": QWEN2_UNTIED,
}


def save_tiny(kind, folder, tokenizer=None, vocab_size: int = 49152, seed: int = 0, **fields):
    """Write a random model of config `kind` (a name, or a config dict; with `fields` changed) as
    safetensors (+ tokenizer) into `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {**CONFIGS, **FAMILY_CONFIGS}[kind] if isinstance(kind, str) else kind
    spec = dict(base, **fields)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, initializer_range=0.1, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, **{DTYPE_KW: torch.float32})
    with torch.no_grad():  # norms and biases start at 1 and 0: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return model


# The families past Llama and Qwen2 (tests/test_families.py): tiny, with windows shorter than the
# test sequences, explicit head_dims unlike hidden / heads, and caps small enough to matter.
# No EOS, so that greedy generation runs its whole budget in both implementations.
_FAMILY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)
QWEN3_TIED = dict(
    _FAMILY, model_type="qwen3", num_hidden_layers=3, head_dim=32, tie_word_embeddings=True
)
QWEN3_WINDOW = dict(
    QWEN3_TIED,
    tie_word_embeddings=False,
    use_sliding_window=True,
    sliding_window=6,
    max_window_layers=1,
)
MISTRAL_WINDOW = dict(
    _FAMILY,
    model_type="mistral",
    num_hidden_layers=2,
    num_key_value_heads=1,
    head_dim=24,
    sliding_window=8,
    tie_word_embeddings=False,
)
GEMMA2 = dict(
    _FAMILY,
    model_type="gemma2",
    num_hidden_layers=3,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=8,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0,
    tie_word_embeddings=True,
)
GEMMA3 = dict(
    _FAMILY,
    model_type="gemma3_text",
    num_hidden_layers=4,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
    tie_word_embeddings=False,
)
QWEN3_MOE = dict(
    QWEN3_WINDOW,
    model_type="qwen3_moe",
    num_hidden_layers=2,
    head_dim=16,
    num_experts=16,  # decoding 4 rows x 2 experts gathers; a prompt groups by expert
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
)
# Dense MLP blocks (of `intermediate_size`) among the expert blocks: 0 and 3 dense, 1, 2, 4 routed,
# so that a scan meets both kinds in either order.
QWEN3_MOE_MIXED = dict(QWEN3_MOE, num_hidden_layers=5, mlp_only_layers=[0, 3])
FAMILY_CONFIGS = {
    "qwen3_moe": QWEN3_MOE,
    "qwen3_moe_mixed": QWEN3_MOE_MIXED,
    "qwen3_tied": QWEN3_TIED,
    "qwen3_window": QWEN3_WINDOW,
    "mistral_window": MISTRAL_WINDOW,
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
}


# The parts of Qwen3's and Gemma 2's templates that matter here.
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
GEMMA2_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def save_tiny_chat(kind: str, folder, tokenizer, template: str | None = None, **kw):
    """`save_tiny` with `tokenizer` (the embedded model's, whose vocabulary the model gets) and,
    when given, `template` as its chat template (`QWEN3_LIKE`, `GEMMA2_LIKE`)."""
    from pathlib import Path

    model = save_tiny(kind, folder, tokenizer=tokenizer, vocab_size=len(tokenizer), **kw)
    if template is not None:
        Path(folder, "chat_template.jinja").write_text(template)
    return model


def left_pad(seqs, pad_id=0, dtype=np.int32):
    """Token rows left-padded to the longest, and their attention mask, as the parity tests feed
    both sides."""
    T = max(map(len, seqs))
    ids = np.full((len(seqs), T), pad_id, dtype)
    mask = np.zeros((len(seqs), T), dtype)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    return ids, mask


def hf_left_padded(hf, ids, mask, **outputs):
    """transformers' forward of left-padded rows, positions counted from each row's first real
    token as pvjax counts them; `outputs` are its `output_*` switches."""
    import torch

    with torch.no_grad():
        return hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0), dtype=torch.long),
            **outputs,
        )


def assert_close(ours, ref, mask, what, rtol=1e-4):
    """`ours` within `rtol` of `ref`'s largest magnitude, over the real (unpadded) positions."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    sel = mask.astype(bool)
    diff = np.abs(ours[..., sel, :] - ref[..., sel, :]).max()
    scale = np.abs(ref[..., sel, :]).max()
    assert diff <= rtol * scale, f"{what}: max diff {diff:.3g} vs scale {scale:.3g}"


# The families as llama.cpp's converter can carry them (tests/test_llamacpp_convert.py): a GGUF
# holds no window for Mistral (a "llama" file) nor Qwen3, no query_pre_attn_scalar (llama.cpp
# scales queries by 1/sqrt(head_dim) below 27B) and no Gemma 3 layer pattern (every 6th block
# global), so these folders keep within what the file says: no windows there, the scalar equal to
# head_dim, Gemma 3 with six blocks on its default pattern and its own local rope base.
LLAMACPP_CONFIGS = {
    "llama": LLAMA_GQA_UNTIED,
    "llama31": LLAMA31,  # llama3 rope scaling: the converter writes per-pair divisors (rope_freqs)
    "llama_tied": LLAMA_MHA_TIED,
    "mistral": dict(MISTRAL_WINDOW, sliding_window=None),
    "qwen2": QWEN2_TIED,
    "qwen3": dict(QWEN3_WINDOW, use_sliding_window=False),
    "qwen3_moe": dict(QWEN3_MOE, use_sliding_window=False),
    "gemma2": dict(GEMMA2, query_pre_attn_scalar=16),
    "gemma3": {
        **{k: v for k, v in GEMMA3.items() if k != "layer_types"},
        "num_hidden_layers": 6,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 2e4},
        },
    },
}
