"""Finetuning on the families past Llama and Qwen2 (`tiny_models.FAMILY_CONFIGS`, float32, CPU):
LoRA's first step (the loss and the adapters' gradients) against transformers + peft, and the
merged export loading in transformers with pvjax's logits. Qwen2 stands for the Llama path.

Qwen3-MoE adapts its attention only: its experts are not LoRA targets in pvjax (nor in peft, for
transformers 5's fused expert tensors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import DTYPE_KW, save_tiny

import pvjax
from pvjax.finetune import lora
from pvjax.finetune import step as st
from pvjax.finetune.export import save_hf_folder, save_peft_adapter

VOCAB = 256
KINDS = ["qwen2_untied", "qwen3_window", "qwen3_moe", "mistral_window", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    save_tiny(kind, folder, vocab_size=VOCAB)
    return kind, folder, pvjax.load(folder)


def _spec(kind):
    targets = ("q", "k", "v", "o") if kind == "qwen3_moe" else tuple(lora.TARGETS)
    return lora.LoraSpec(rank=4, alpha=8.0, targets=targets, layers=(0, 1))


def _adapters(spec, model):
    """Adapters with B away from zero, so that the LoRA path itself is compared."""
    trainable, frozen = lora.split(spec, model.params, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 2 * len(trainable)))
    trainable = {
        k: {"a": ab["a"], "b": 0.3 * jax.random.normal(next(keys), ab["b"].shape)}
        for k, ab in trainable.items()
    }
    return trainable, frozen


def _batch(rng, rows=2, width=24):
    tokens = rng.integers(1, VOCAB, (rows, width)).astype(np.int32)
    mask = np.zeros((rows, width), np.float32)
    mask[:, width // 3 :] = 1  # the "assistant" part
    return {
        "tokens": tokens,
        "segment_ids": np.ones((rows, width), np.int32),
        "positions": np.tile(np.arange(width, dtype=np.int32), (rows, 1)),
        "loss_mask": mask,
    }


def test_lora_first_step_matches_peft(family, tmp_path):
    """The summed loss and d loss / d(A, B) of every adapter, pvjax's training step's
    (`micro_loss`) against peft's LoRA on transformers' model: the first optimiser step is a
    function of these alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, folder, model = family
    spec = _spec(kind)
    trainable, frozen = _adapters(spec, model)
    mb = _batch(np.random.default_rng(0))
    settings = st.StepSettings(model.config, spec, remat=False)
    grad = jax.jit(
        jax.value_and_grad(
            lambda t: st.micro_loss(settings, t, frozen, mb, st.TrainingForward())[0]
        )
    )
    loss, grads = grad(trainable)

    save_peft_adapter(tmp_path / "adapter", spec, trainable, model.config)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), **{DTYPE_KW: torch.float32})
    peft = PeftModel.from_pretrained(hf, str(tmp_path / "adapter"), is_trainable=True)
    peft.train()  # dropout is 0: train mode only makes the adapters trainable
    logits = peft(torch.tensor(mb["tokens"], dtype=torch.long)).logits[:, :-1]
    target = torch.tensor(mb["tokens"][:, 1:], dtype=torch.long)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    ref = (nll * torch.tensor(mb["loss_mask"][:, 1:]).reshape(-1)).sum()
    ref.backward()
    assert abs(float(loss) - float(ref)) <= 1e-4 * abs(float(ref)), (kind, float(loss), float(ref))
    named = dict(peft.named_parameters())
    for t in spec.targets:
        key, module = lora.TARGETS[t]
        for i in spec.selected_layers(model.n_layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            for ours, theirs in (("a", "lora_A"), ("b", "lora_B")):
                g_ref = named[f"{prefix}.{theirs}.default.weight"].grad.numpy().T
                g = np.asarray(grads[key][ours][i])
                scale = np.abs(g_ref).max()
                assert np.abs(g - g_ref).max() <= 1e-4 * scale, f"{kind} {key}.{ours}[{i}]"


def test_merged_export_loads_in_transformers(family, tmp_path):
    """A merged LoRA model written as a Hugging Face folder: transformers loads it (config, tensor
    names, Gemma's norms as it stores them) and its logits are pvjax's, within 1e-4."""
    from transformers import AutoModelForCausalLM

    kind, folder, model = family
    spec = _spec(kind)
    trainable, frozen = _adapters(spec, model)
    merged = lora.merge(spec, trainable, frozen, jnp.float32)
    out = save_hf_folder(tmp_path / "merged", model.config, merged)
    ids = np.random.default_rng(1).integers(1, VOCAB, (2, 20))
    ours = np.asarray(pvjax.forward(model.replace(params=merged), ids).logits)
    hf = AutoModelForCausalLM.from_pretrained(str(out), **{DTYPE_KW: torch.float32}).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale, kind
    base = np.asarray(pvjax.forward(model, ids).logits)
    assert np.abs(base - ours).max() > 1e-3 * scale  # the adapters moved the model
    again = pvjax.load(out)  # and pvjax reads its own export as the same model
    assert again.config == model.config
    np.testing.assert_allclose(
        np.asarray(pvjax.forward(again, ids).logits), ours, atol=1e-5 * scale
    )


def test_lora_on_experts_is_refused_by_name(tmp_path):
    save_tiny("qwen3_moe", tmp_path, vocab_size=VOCAB)
    model = pvjax.load(tmp_path)
    with pytest.raises(lora.LoraError, match=r"\['gate', 'up', 'down'\].*q, k, v, o"):
        lora.split(lora.LoraSpec(rank=2), model.params, jax.random.PRNGKey(0))
