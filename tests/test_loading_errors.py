"""Loaders: a hand-written GGUF round trip, and bad checkpoints rejected with errors that name the
tensor, file or field."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny_models import save_tiny

import pvjax
from pvjax.loading.layout import CheckpointError
from pvjax.loading.safetensors_folder import read_safetensors
from pvjax.models.config import ConfigError


@pytest.fixture
def tiny_llama(tmp_path, tokenizer):
    hf = save_tiny("llama31_gqa_llama3rope", tmp_path / "m", tokenizer=tokenizer)
    return tmp_path / "m", hf


def _permute(w, n_head):  # llama.cpp's converter layout for q and k rows
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path, hf_model, q_type=gguf.GGMLQuantizationType.F32):
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {
        "rope_theta": cfg.rope_theta
    }  # transformers 4.x
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    sub = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in hf_model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name in names:
            out = names[name]
        else:
            _, _, i, *rest = name.split(".")
            out = f"blk.{i}.{sub['.'.join(rest[:-1])]}.weight"
            if "q_proj" in name:
                a = _permute(a, cfg.num_attention_heads)
            elif "k_proj" in name:
                a = _permute(a, cfg.num_key_value_heads)
        if q_type != gguf.GGMLQuantizationType.F32 and a.ndim == 2:
            block, nbytes = gguf.GGML_QUANT_SIZES[q_type]
            raw = np.zeros((a.shape[0], a.shape[1] // block * nbytes), np.uint8)
            w.add_tensor(out, raw, raw_shape=raw.shape, raw_dtype=q_type)
        else:
            w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_written_like_llama_cpp_loads_to_transformers_numbers(tiny_llama, tmp_path):
    folder, hf = tiny_llama
    plain = save_tiny("llama_gqa_untied", tmp_path / "plain")  # GGUF here carries no rope scaling
    write_gguf(tmp_path / "tiny.gguf", plain)
    cfg, params, _ = __import__("pvjax.loading.gguf_file", fromlist=["x"]).load_gguf(
        tmp_path / "tiny.gguf", np.float32
    )
    model = pvjax.Model(cfg, params, tokenizer=None)
    ids = np.arange(3, 40)[None]
    ref = plain(torch.tensor(ids, dtype=torch.long)).logits.detach().numpy()
    ours = np.asarray(pvjax.forward(model, ids).logits)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_gguf_with_unsupported_quantisation_names_tensor_and_type(tiny_llama, tmp_path):
    write_gguf(tmp_path / "q.gguf", tiny_llama[1], q_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(
        CheckpointError, match=r"tensor 'token_embd\.weight' uses quantisation Q8_1"
    ):
        pvjax.load(tmp_path / "q.gguf")


def test_unknown_architecture_is_named(tiny_llama):
    folder, _ = tiny_llama
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gpt_neox"):
        pvjax.load(folder)


def _rewrite_safetensors(folder, edit):
    from safetensors.numpy import save_file

    path = folder / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tiny_llama):
    folder, _ = tiny_llama
    _rewrite_safetensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"
    ):
        pvjax.load(folder)


def test_misnamed_tensor_is_reported_as_unused(tiny_llama):
    folder, _ = tiny_llama

    def rename(t):
        t["model.layers.1.mlp.upproj.weight"] = t.pop("model.layers.1.mlp.up_proj.weight")

    _rewrite_safetensors(folder, rename)
    with pytest.raises(CheckpointError, match="missing"):
        pvjax.load(folder)


def test_extra_layer_is_reported_as_unused(tiny_llama):
    folder, _ = tiny_llama
    _rewrite_safetensors(
        folder,
        lambda t: t.update({"model.layers.9.input_layernorm.weight": np.ones(64, np.float32)}),
    )
    with pytest.raises(CheckpointError, match=r"not used .*model\.layers\.9\.input_layernorm"):
        pvjax.load(folder)


def test_shape_mismatch_names_tensor_and_shapes(tiny_llama):
    folder, _ = tiny_llama
    _rewrite_safetensors(
        folder,
        lambda t: t.update(
            {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
        ),
    )
    with pytest.raises(
        CheckpointError, match=r"k_proj\.weight' has shape \(64, 64\), expected \(64, 32\)"
    ):
        pvjax.load(folder)


def test_sharded_checkpoint_with_index_and_missing_shard(tiny_llama, tmp_path):
    from safetensors.numpy import save_file

    folder, _ = tiny_llama
    tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    (folder / "model.safetensors").unlink()
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / f))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}})
    )
    assert pvjax.load(folder).config.num_layers == 3
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        pvjax.load(folder)


def test_missing_checkpoint_and_missing_template(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        pvjax.load(tmp_path / "nope")
    folder, _ = tiny_llama
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    model = pvjax.load(folder)
    with pytest.raises(ValueError, match="no chat template"):
        model.chat_text([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    """A small whole GGUF (metadata and two tensors): the embedded file takes the reader seconds."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.ones((100, 64), np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    assert len(gguf.GGUFReader(str(path)).tensors) == 2
    return data


@pytest.mark.parametrize(
    "cut, message",
    [
        (lambda b: b[:10], "truncated or corrupt"),  # inside the header
        (lambda b: b[:600], "truncated or corrupt"),  # inside the metadata
        (lambda b: b[: len(b) // 2], "truncated or corrupt"),  # inside the tensor data
        (lambda b: b[:-100], "truncated or corrupt"),  # the last tensor cut short
        (lambda b: b"", "not a GGUF file"),
        (lambda b: b"PK\x03\x04 a zip, say", "not a GGUF file"),
        (lambda b: b[:4] + bytes(1000), "truncated or corrupt"),  # the magic, then garbage
    ],
)
def test_cut_or_foreign_gguf_is_named(tmp_path, gguf_bytes, cut, message):
    """The gguf reader raises reshape, dtype-view and index errors on such files; the user sees
    one CheckpointError naming the file."""
    path = tmp_path / "model.gguf"
    path.write_bytes(cut(gguf_bytes))
    with pytest.raises(CheckpointError, match=message) as e:
        pvjax.load(path)
    assert str(path) in str(e.value)


def test_gguf_whose_tensor_data_overruns_the_file_is_truncated(tmp_path, monkeypatch):
    """A reader that parses (lazily mapped data, as newer gguf versions may do) still gets the
    size check: every tensor must end inside the file."""
    from pvjax.loading import gguf_file

    class Tensor:
        name, data_offset, n_bytes = "token_embd.weight", 90, 20

    class Reader:
        def __init__(self, path):
            self.tensors = [Tensor()]

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(96))
    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with pytest.raises(
        CheckpointError,
        match=r"truncated: tensor 'token_embd.weight' ends at byte 110, the file has 100",
    ):
        gguf_file.open_gguf(str(path))


def test_folder_mistakes_are_named(tmp_path):
    (tmp_path / "a.gguf").mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a .gguf file"):
        pvjax.load(tmp_path / "a.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is empty"):
        pvjax.load(empty)
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no config.json"):
        pvjax.load(empty)
    (empty / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        pvjax.load(empty)


def test_config_without_weights_and_broken_safetensors(tiny_llama):
    folder, _ = tiny_llama
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"config.json but no \*.safetensors weights"):
        pvjax.load(folder)
    weights.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"is truncated: tensor .* ends at byte"):
        pvjax.load(folder)
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        pvjax.load(folder)
    weights.write_bytes((7).to_bytes(8, "little") + b"garbage" + data[8:])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        pvjax.load(folder)
    weights.write_bytes(data)
    (folder / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        pvjax.load(folder)
