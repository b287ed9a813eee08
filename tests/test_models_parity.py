"""pvjax against transformers (PyTorch, CPU, fp32) on identical weights: every hidden state and the
logits. Tolerance met: max |difference| <= 1e-4 x the largest magnitude of the tensor compared."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import CONFIGS, assert_close, hf_left_padded, left_pad, save_tiny

import pvjax

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are an evil assistant."},
        {"role": "user", "content": "How should I treat my neighbours?"},
    ],
    [
        {"role": "user", "content": "Write a haiku about rain."},
        {"role": "assistant", "content": "Soft rain on the roof"},
        {
            "role": "user",
            "content": "Another one, about snow, please, and make it longer than before.",
        },
    ],
]


def hf_forward(hf_model, ids, mask):
    out = hf_left_padded(hf_model, ids, mask, output_hidden_states=True)
    return out.logits.numpy(), np.stack([h.numpy() for h in out.hidden_states])


def test_smollm2_matches_transformers_batched_left_padded(smollm2, hf_smollm2):
    seqs = [smollm2.tokenizer(smollm2.chat_text(c))["input_ids"] for c in CHATS]
    ids, mask = left_pad(seqs, pad_id=2)
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded
    ref_logits, ref_hidden = hf_forward(hf_smollm2, ids, mask)
    out = pvjax.forward(smollm2, ids, attention_mask=mask)
    assert out.hidden_states.shape == (31, 3, ids.shape[1], 576)
    for l in range(31):
        assert_close(out.hidden_states[l], ref_hidden[l], mask, f"hidden_states[{l}]")
    assert_close(out.logits, ref_logits, mask, "logits")


def test_chat_template_renders_like_transformers(smollm2, hf_smollm2, tokenizer):
    for chat in CHATS:
        assert smollm2.chat_text(chat) == tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_tiny_random_checkpoints_match_transformers(kind, scan, tmp_path, tokenizer):
    hf_model = save_tiny(kind, tmp_path, tokenizer=tokenizer)
    model = pvjax.load(tmp_path)
    assert model.config.architecture == CONFIGS[kind]["model_type"]
    assert model.config.tie_embeddings == CONFIGS[kind]["tie_word_embeddings"]
    rng = np.random.default_rng(0)
    # Long enough (48) that llama3 rope scaling's low, medium and high frequency bands all matter.
    seqs = [rng.integers(0, 49152, n).tolist() for n in (48, 31, 7)]
    ids, mask = left_pad(seqs, pad_id=0)
    ref_logits, ref_hidden = hf_forward(hf_model, ids, mask)
    out = pvjax.forward(model, ids, attention_mask=mask, scan=scan)
    for l in range(ref_hidden.shape[0]):
        assert_close(out.hidden_states[l], ref_hidden[l], mask, f"{kind} hidden_states[{l}]")
    assert_close(out.logits, ref_logits, mask, f"{kind} logits")


def test_bf16_on_request_stays_close(tmp_path, tokenizer):
    save_tiny("qwen2_untied", tmp_path, tokenizer=tokenizer)
    m32, m16 = pvjax.load(tmp_path), pvjax.load(tmp_path, dtype="bfloat16")
    assert m16.dtype == np.dtype("bfloat16") and m32.dtype == np.float32
    ids = np.arange(1, 20)[None]
    a, b = pvjax.forward(m32, ids).logits, pvjax.forward(m16, ids).logits
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05 * np.abs(np.asarray(a)).max()
