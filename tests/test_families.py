"""The families past Llama and Qwen2 against transformers (PyTorch, CPU, fp32), on tiny random
checkpoints (`tiny_models.FAMILY_CONFIGS`): Qwen3 tied and with a window, Mistral with a window,
Gemma 2 with soft-capping and a window, Gemma 3 with local and global blocks. Every sequence is
longer than the window.

- every row of `hidden_states` and the logits, left-padded, within 1e-4 of the largest magnitude;
- an expert model's routing (`Capture(router=True)`) against `output_router_logits`, including
  a model with dense blocks among its expert blocks;
- greedy generation of 24 tokens, unsteered and steered at a layer (`response`, one batch), equal
  to transformers' `generate` without and with a forward hook on that block (or a near-tie where
  they part, as tests/test_generate.py allows);
- the configs this port does not implement are refused, naming the field.

Each family's checkpoint, load and compiles are shared by its tests (module-scope fixtures).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import (
    FAMILY_CONFIGS,
    GEMMA2_LIKE,
    QWEN3_LIKE,
    assert_close,
    hf_left_padded,
    left_pad,
    save_tiny,
)

import pvjax
from pvjax import interventions as ivs
from pvjax.capture import Capture
from pvjax.engine.generate import SamplingParams, generate_ids
from pvjax.loading.tokenizer import chat_conventions, render_chat
from pvjax.models.config import ConfigError, ModelConfig

VOCAB = 512
LAYER = 2  # steered: hidden_states[2], the output of block 2
TIE = 2e-3  # logit gap under which two tokens count as tied
N_NEW = 24
# The forward runs unrolled for these (per-layer weights: each block's window and rope picked while
# tracing), scanned for the others (a select per block on device). Generation runs scanned; a
# generation program compiles in seconds, so only two families also generate unrolled (packed
# for the CPU decode kernel, the window a mask), with a shared prefix.
FORWARD_UNROLLED = {"mistral_window", "gemma3", "qwen3_window"}
# The mixed Qwen3-MoE too: unrolled, each block holds only its own MLP's weights. Gemma 2: the
# attention kernel with its query scale and soft-capping.
SHARED_PREFIX_UNROLLED = ("qwen3_window", "qwen3_moe_mixed", "gemma2")
# Generation runs for the families with a window (Qwen3 without one is Qwen3 with one, minus it).
GENERATE = sorted(set(FAMILY_CONFIGS) - {"qwen3_tied"})


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    hf = save_tiny(kind, folder, vocab_size=VOCAB)
    return kind, hf, pvjax.load(folder)


def test_forward_matches_transformers_left_padded(family):
    kind, hf, model = family
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, VOCAB, n).tolist() for n in (21, 13, 5)]
    ids, mask = left_pad(seqs, dtype=np.int64)
    ref = hf_left_padded(hf, ids, mask, output_hidden_states=True)
    ref_hidden = np.stack([h.numpy() for h in ref.hidden_states])
    moe = model.config.num_experts > 0
    out = pvjax.forward(
        model,
        ids,
        attention_mask=mask,
        scan=kind not in FORWARD_UNROLLED,
        capture=Capture(router=moe),
    )
    assert out.hidden_states.shape == ref_hidden.shape
    for l in range(ref_hidden.shape[0]):
        assert_close(out.hidden_states[l], ref_hidden[l], mask, f"{kind} hidden_states[{l}]")
    assert_close(out.logits, ref.logits.numpy(), mask, f"{kind} logits")
    if moe:
        _assert_router_matches(hf, ids, mask, out.router, kind)
    else:
        assert out.router is None


def _assert_router_matches(hf, ids, mask, router, kind):
    """The captured routing against transformers' `output_router_logits` (one `[B*T, X]` per
    routed block): the logits within 1e-4, and the top-k experts and their weights as
    transformers' router derives them from its logits."""
    ref = hf_left_padded(hf, ids, mask, output_router_logits=True).router_logits
    cfg = hf.config
    routed = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    assert len(ref) == len(routed) == router.logits.shape[0], (len(ref), routed)
    B, T = ids.shape
    logits = torch.stack(ref).reshape(len(ref), B, T, -1)
    assert_close(router.logits, logits.numpy(), mask, f"{kind} router logits")
    top_p, top_i = torch.topk(torch.softmax(logits, -1), cfg.num_experts_per_tok, dim=-1)
    if cfg.norm_topk_prob:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    sel = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(router.experts)[:, sel], top_i.numpy()[:, sel])
    np.testing.assert_allclose(np.asarray(router.weights)[:, sel], top_p.numpy()[:, sel], atol=1e-5)


def _hf_generate(hf, seqs, hook):
    ids, mask = left_pad(seqs, dtype=np.int64)
    handle = hf.model.layers[LAYER - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                max_new_tokens=N_NEW,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
    finally:
        handle.remove()
    return out.sequences[:, ids.shape[1] :].numpy(), torch.stack(out.scores, 1).numpy()


def _response_hook(coefs, v):
    """The reference implementation's `response` steering, one coefficient per row: the last
    position of every pass."""
    cv = torch.tensor(np.asarray(coefs, np.float32)[:, None] * v)

    def hook(module, inputs, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, -1] += cv
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return hook


def _assert_greedy_match(ours, ref_tokens, ref_scores, what):
    """Same tokens, or transformers' scores put ours within a near-tie at the first difference
    (fp32 summation order can flip a tie); at most one row may part so."""
    parted = 0
    for r, toks in enumerate(ours):
        ref = [int(t) for t in ref_tokens[r]]
        assert len(toks) == len(ref) == N_NEW, f"{what} row {r}: {len(toks)} tokens"
        for j, (a, b) in enumerate(zip(toks, ref)):
            if a != b:
                gap = ref_scores[r, j, b] - ref_scores[r, j, a]
                assert gap < TIE, f"{what} row {r} step {j}: {a} vs {b}, gap {gap}"
                parted += 1
                break
    assert parted <= 1, f"{what}: {parted} rows parted from transformers"


def test_greedy_and_steered_generation_match_transformers(family):
    kind, hf, model = family
    if kind not in GENERATE:
        pytest.skip("covered by the same family with a window")
    """Two prompts sharing their first 16 tokens (longer than every window), each unsteered and
    steered at `LAYER` in one batch: one program, and one transformers `generate` with a hook
    that steers the last two rows."""
    rng = np.random.default_rng(1)
    shared = rng.integers(1, VOCAB, 16).tolist()
    seqs = [shared + rng.integers(1, VOCAB, n).tolist() for n in (3, 9)]
    v = rng.standard_normal(model.hidden_size).astype(np.float32)
    v *= 10.0 / np.linalg.norm(v)  # large beside the tiny models' residuals
    coefs = [0.0, 0.0, 1.0, 1.0]
    iv = ivs.build(model.n_layers + 1, model.hidden_size, steer=[(v, LAYER, coefs)], batch=4)
    g = generate_ids(
        model,
        seqs * 2,
        intervention=iv,
        positions="response",
        sampling=SamplingParams(max_new_tokens=N_NEW),
        unroll=False,
    )
    ref, scores = _hf_generate(hf, seqs * 2, _response_hook(coefs, v))
    assert not np.array_equal(ref[:2], ref[2:]), "the steering vector changed nothing"
    _assert_greedy_match(g.tokens[:2], ref[:2], scores[:2], f"{kind} unsteered")
    _assert_greedy_match(g.tokens[2:], ref[2:], scores[2:], f"{kind} steered")
    if kind in SHARED_PREFIX_UNROLLED:  # no intervention: the 16 shared tokens run once, then
        # each row's tail after its padding, blocks unrolled and packed for the CPU kernel
        g = generate_ids(model, seqs, sampling=SamplingParams(max_new_tokens=N_NEW), unroll=True)
        _assert_greedy_match(g.tokens, ref[:2], scores[:2], f"{kind} shared prefix")


def test_family_flags_read_from_config(family):
    kind, _, model = family
    cfg, spec = model.config, FAMILY_CONFIGS[kind]
    assert cfg.architecture == spec["model_type"]
    assert cfg.head_dim == spec["head_dim"]
    assert cfg.tie_embeddings == spec["tie_word_embeddings"]
    assert cfg.qk_norm == (kind.startswith("qwen3") or kind == "gemma3")
    assert cfg.norm_plus_one == cfg.sandwich_norms == kind.startswith("gemma")
    assert any(cfg.sliding) == (kind != "qwen3_tied")
    assert all(cfg.sliding) == (kind in ("mistral_window", "qwen3_moe", "qwen3_moe_mixed"))
    assert cfg.num_experts == spec.get("num_experts", 0)


# ---- refused configs: each names the field ----


def _base_config(**kw):
    return {
        "model_type": "qwen3",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **kw,
    }


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_type": "gpt_neox"}, r"gpt_neox.*'llama', 'qwen2', 'qwen3', 'mistral'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        (
            {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["chunked"] * 2},
            r"layer_types holds \['chunked'\]",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        (
            {"model_type": "gemma2", "hidden_activation": "gelu"},
            "hidden_activation='gelu'",
        ),
        (
            {"model_type": "gemma3_text", "use_bidirectional_attention": True},
            "use_bidirectional_attention",
        ),
        (
            {
                "model_type": "gemma3_text",
                "rope_parameters": {
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                },
            },
            "rope_parameters.sliding_attention.rope_type='linear'",
        ),
    ],
)
def test_unsupported_configs_are_refused_by_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(_base_config(**fields))


def test_unknown_model_type_in_a_folder_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base_config(model_type="phi3")))
    with pytest.raises(ConfigError, match=r"phi3.*gemma2.*gemma3_text"):
        pvjax.load(tmp_path)


# ---- GGUF: written as llama.cpp's converter writes these architectures ----

_GGUF_ARCH = {
    "qwen3_moe": "qwen3moe",
    "qwen3_moe_mixed": "qwen3moe",
    "qwen3_tied": "qwen3",
    "qwen3_window": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}
_GGUF_SUB = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp",
}


def write_gguf(path, hf, arch):
    """A float32 GGUF of `hf` with llama.cpp's names and conventions: no q/k row permutation
    outside the llama architecture, Gemma's norm weights stored as 1 + w, Gemma's window,
    soft-caps and layer pattern in the metadata."""
    import gguf

    cfg = hf.config
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    rope = cfg.rope_parameters
    if arch == "gemma3":
        rope = rope["full_attention"]
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if gemma:
        w.add_sliding_window(cfg.sliding_window)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    sub = dict(_GGUF_SUB)
    sub["post_attention_layernorm"] = "post_attention_norm" if gemma else "ffn_norm"
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if name.endswith("mlp.experts.gate_up_proj"):  # transformers 5: [X, 2I, D]
            blk = "blk." + name.split(".")[2]
            half = a.shape[1] // 2
            w.add_tensor(f"{blk}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, :half]))
            w.add_tensor(f"{blk}.ffn_up_exps.weight", np.ascontiguousarray(a[:, half:]))
            continue
        if name.endswith("mlp.experts.down_proj"):  # [X, D, I]
            w.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", a)
            continue
        if name in top:
            out = top[name]
        else:
            _, _, i, *rest = name.split(".")
            out = f"blk.{i}.{sub['.'.join(rest[:-1])]}.weight"
        if gemma and name.endswith("norm.weight"):
            a = a + np.float32(1)
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loads_to_the_folders_parameters(family, tmp_path):
    """The GGUF's config (but what GGUF does not carry: Gemma's query_pre_attn_scalar, a Qwen3
    window, the eps rounded to float32, token ids) and parameters equal the folder's."""
    import dataclasses

    from pvjax.loading import read_model_config

    kind, hf, model = family
    if kind not in _GGUF_ARCH:
        pytest.skip("Mistral GGUFs are llama files: llama.cpp reads them without a window")
    write_gguf(tmp_path / "m.gguf", hf, _GGUF_ARCH[kind])
    from pvjax.loading.gguf_file import load_gguf

    cfg, params, _ = load_gguf(tmp_path / "m.gguf", np.float32)
    assert read_model_config(tmp_path / "m.gguf") == cfg  # the header-only reader agrees
    same = dict(
        rms_norm_eps=model.config.rms_norm_eps,
        query_scale=model.config.query_scale,
        max_position_embeddings=model.config.max_position_embeddings,
        bos_token_id=model.config.bos_token_id,
        eos_token_ids=model.config.eos_token_ids,
        pad_token_id=model.config.pad_token_id,
    )
    if kind.startswith("qwen3"):  # llama.cpp keeps no window for Qwen3
        same.update(
            sliding_window=model.config.sliding_window, layer_types=model.config.layer_types
        )
    assert dataclasses.replace(cfg, **same) == model.config
    flat = lambda p: dict(jax_flatten(p))  # noqa: E731
    ours, ref = flat(params), flat(model.params)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k], np.asarray(ref[k]), rtol=0, atol=1e-6, err_msg=k)


def jax_flatten(params):
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        yield jax.tree_util.keystr(path), np.asarray(leaf)


# ---- chat templates: Qwen3's thinking switch, Gemma 2's missing system role ----


def _with_template(template):
    """A two-token tokenizer carrying `template` (the templates are what is tested)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")
    out.chat_template = template
    return out


def test_qwen3_thinking_is_off_unless_asked():
    tok = _with_template(QWEN3_LIKE)
    chat = [{"role": "user", "content": "Hi"}]
    assert render_chat(tok, chat).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(tok, chat, enable_thinking=True).endswith("<|im_start|>assistant\n")
    assert chat_conventions(tok) == {"system_folded": False, "enable_thinking": False}


def test_gemma2_system_prompt_is_folded_into_the_first_user_turn():
    tok = _with_template(GEMMA2_LIKE)
    chat = [{"role": "system", "content": "Be evil."}, {"role": "user", "content": "Hi"}]
    folded = [{"role": "user", "content": "Be evil.\n\nHi"}]
    assert render_chat(tok, chat) == render_chat(tok, folded)
    assert "<start_of_turn>user\nBe evil.\n\nHi<end_of_turn>" in render_chat(tok, chat)
    assert chat_conventions(tok) == {"system_folded": True, "enable_thinking": None}


def test_multimodal_gemma3_folder_loads_its_text_tower(tmp_path):
    """A `Gemma3ForConditionalGeneration` folder (model_type gemma3): the text tower alone, the
    vision tower's tensors left unread, numbers as transformers' on text."""
    from tiny_models import DTYPE_KW
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = {k: v for k, v in FAMILY_CONFIGS["gemma3"].items() if k != "model_type"}
    cfg = AutoConfig.for_model(
        "gemma3",
        text_config=dict(text, vocab_size=VOCAB, initializer_range=0.1),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
    )
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(cfg, **{DTYPE_KW: torch.float32}).eval()
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    model = pvjax.load(tmp_path)
    assert model.config.architecture == "gemma3_text" and model.config.num_layers == 4
    ids = np.random.default_rng(2).integers(1, VOCAB, (1, 20))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    out = pvjax.forward(model, ids)
    mask = np.ones(ids.shape, np.int64)
    assert_close(out.logits, ref, mask, "gemma3 text tower logits")


def test_family_defaults_and_patterns_as_transformers_derives_them():
    """Fields a config.json may leave out take the config class's default; Ministral's window
    follows `layer_types`, Qwen3-MoE's covers every block (and `mlp_only_layers` keeps a block
    dense), Gemma 3's pattern is every 6th global."""
    ministral = ModelConfig.from_hf(
        _base_config(
            model_type="ministral",
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )
    )
    assert ministral.sliding == (True, False) and ministral.sliding_window == 4
    gemma2 = ModelConfig.from_hf(_base_config(model_type="gemma2"))
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.head_dim) == (50.0, 30.0, 256)
    assert gemma2.sliding == (True, False) and gemma2.tie_embeddings
    moe = ModelConfig.from_hf(
        _base_config(
            model_type="qwen3_moe", use_sliding_window=True, num_experts=4, num_experts_per_tok=2
        )
    )
    assert moe.sliding == (True, True) and moe.sliding_window == 4096
    assert (moe.num_experts, moe.experts_per_token, moe.norm_topk_prob) == (4, 2, False)
    gemma3 = ModelConfig.from_hf(
        _base_config(model_type="gemma3_text", num_hidden_layers=7, num_key_value_heads=1)
    )
    assert gemma3.sliding == (True,) * 5 + (False, True)
    assert gemma3.local_rope == gemma3.sliding and gemma3.local_rope_theta == 10_000.0
    mixed = ModelConfig.from_hf(_base_config(model_type="qwen3_moe", mlp_only_layers=[0]))
    assert mixed.dense_blocks == (0,) and mixed.routed == (False, True)


@pytest.mark.parametrize(
    "fields, dense",
    [
        ({}, ()),
        ({"mlp_only_layers": [0, 3]}, (0, 3)),
        ({"decoder_sparse_step": 2}, (0, 2)),  # transformers: (i + 1) % step == 0 routes
        ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, (0, 1, 2)),
    ],
)
def test_expert_blocks_follow_transformers_rule(fields, dense):
    cfg = ModelConfig.from_hf(
        _base_config(
            model_type="qwen3_moe",
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=2,
            **fields,
        )
    )
    assert cfg.dense_blocks == dense
    assert cfg.routed == tuple(i not in dense for i in range(4))


def test_expert_model_without_expert_blocks_is_refused():
    with pytest.raises(ConfigError, match=r"mlp_only_layers=\[0, 1\].*no block routes"):
        ModelConfig.from_hf(
            _base_config(model_type="qwen3_moe", num_experts=4, mlp_only_layers=[0, 1])
        )


def test_mixed_expert_model_stacks_each_mlp_over_its_blocks_only():
    """Random parameters of a config with dense blocks 0 and 2 of 4: each MLP stacked over the
    blocks that run it, the memory planner counting the same elements, and LoRA refusing the MLP
    targets (not in every block) by name."""
    import jax
    import jax.numpy as jnp

    from pvjax.finetune import lora
    from pvjax.models.random_init import random_params
    from pvjax.parallel.memory import n_params

    cfg = ModelConfig.from_hf(
        _base_config(
            model_type="qwen3_moe",
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            decoder_sparse_step=2,
        )
    )
    params = random_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    layers = params["layers"]
    assert layers["wq"].shape[0] == 4
    assert layers["w_gate"].shape == (2, 16, 32) and layers["w_gate_e"].shape == (2, 4, 16, 8)
    assert n_params(cfg) == sum(x.size for x in jax.tree_util.tree_leaves(params))
    with pytest.raises(lora.LoraError, match=r"\['gate'.*route their MLP to experts"):
        lora.init(lora.LoraSpec(targets=("q", "gate")), params, jax.random.PRNGKey(1))
    assert set(lora.init(lora.LoraSpec(targets=("q",)), params, jax.random.PRNGKey(1))) == {"wq"}


def test_expert_paths_agree_and_cpu_picks_tiles_for_many_tokens():
    """The four ways `moe_mlp` runs routed experts give the same sums and input gradients, with
    experts that no token picks and experts spread over several tiles (tiles of 4 pairs here);
    on CPU float32 a decode step scans its pairs and a prompt scans tiles."""
    import jax
    import jax.numpy as jnp

    from pvjax.models import moe

    X, D, I, k, M = 5, 16, 8, 2, 23
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    lp = {
        "w_gate_e": jax.random.normal(ks[0], (X, D, I)),
        "w_up_e": jax.random.normal(ks[1], (X, D, I)),
        "w_down_e": jax.random.normal(ks[2], (X, I, D)),
    }
    x = jax.random.normal(ks[3], (M, D))
    logits = jax.random.normal(ks[4], (M, X)).at[:, 4].set(-1e9)  # expert 4: never picked
    w, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
    assert np.bincount(np.asarray(idx).ravel(), minlength=X).tolist()[4] == 0
    paths = {
        "paired": moe.experts_paired,
        "blocked": lambda lp, x, w, i: moe.experts_blocked(lp, x, w, i, X, block=4),
        "gathered": moe.experts_gathered,
        "grouped": lambda lp, x, w, i: moe.experts_grouped(lp, x, w, i, X),
    }
    ref = np.asarray(paths["gathered"](lp, x, w, idx))
    ref_grad = np.asarray(jax.grad(lambda x: jnp.sum(moe.experts_gathered(lp, x, w, idx) ** 2))(x))
    for name, f in paths.items():
        out = np.asarray(f(lp, x, w, idx))
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), name
        g = np.asarray(jax.grad(lambda x, f=f: jnp.sum(f(lp, x, w, idx) ** 2))(x))
        assert np.abs(g - ref_grad).max() <= 1e-5 * np.abs(ref_grad).max(), f"{name} gradient"
    cfg = ModelConfig.from_hf(
        _base_config(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2)
    )
    if jax.default_backend() == "cpu":
        assert moe.expert_path(cfg, 4, jnp.float32) == "paired"
        assert moe.expert_path(cfg, 64, jnp.float32) == "blocked"
        assert moe.expert_path(cfg, 512, jnp.bfloat16) == "grouped"
