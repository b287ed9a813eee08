"""Load a `.gguf` file (llama.cpp format), dequantizing every tensor to the requested dtype.

llama.cpp's converter reorders the rows of Llama's q and k projections for its own rotary layout;
`_unpermute` undoes that so the weights match transformers' "rotate half" convention. Qwen2 files
are written without that reordering.
"""

from __future__ import annotations

import os

import numpy as np

from pvjax.loading.layout import CheckpointError, assemble
from pvjax.models.config import ConfigError, ModelConfig

_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "attn_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "wo": "attn_output.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}


def _field(reader, key, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ConfigError(f"GGUF metadata field {key!r} is missing")
        return default
    return f.contents()


def gguf_config(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ConfigError(
            f"unknown architecture general.architecture={arch!r} in GGUF; "
            "pvjax supports llama and qwen2"
        )
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(
            "this GGUF carries rope_freqs (Llama 3.1 rope scaling), which the GGUF "
            "loader does not read; load the safetensors folder instead"
        )
    vocab = _field(reader, f"{arch}.vocab_size", required=False)
    if vocab is None:
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise ConfigError(
                f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens"
            )
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", required=False)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
        qkv_bias=arch == "qwen2",
        tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", required=False),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", required=False),
        name=name,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows go back from interleaved pairs to rotate-half
    halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str):
    """A `gguf.GGUFReader` over a file known to be whole: it starts with the GGUF magic bytes, the
    reader parses it, and every tensor's data lies inside the file. The reader raises assorted
    errors (reshape, dtype views, struct) on a cut or foreign file; they become one
    `CheckpointError` that says "not a GGUF file" or "truncated"."""
    import gguf

    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a .gguf file")
    if not os.path.exists(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file ({size} bytes, starting {magic!r} rather than b'GGUF')"
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader has no error type of its own for a malformed file
        raise CheckpointError(
            f"{path} is truncated or corrupt: the GGUF reader cannot parse its {size} bytes"
        ) from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name!r} ends at byte {end}, the file has {size}"
            )
    return reader


def load_gguf(path: str | os.PathLike, dtype) -> tuple[ModelConfig, dict, object]:
    from gguf import quants

    path = str(path)
    reader = open_gguf(path)
    cfg = gguf_config(reader, os.path.basename(path))
    by_name = {t.name: t for t in reader.tensors}

    def fetch(name):
        t = by_name[name]
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"{path}: tensor {name!r} uses quantisation {t.tensor_type.name}, "
                "which this gguf package cannot dequantize"
            ) from e
        # GGUF lists dims innermost first; numpy wants them outermost first.
        return np.asarray(arr, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))

    def name_of(key, layer):
        return _GGUF_NAMES[key] if layer is None else f"blk.{layer}.{_GGUF_NAMES[key]}"

    def transform(key, arr):
        if cfg.architecture == "llama" and key in ("wq", "wk"):
            arr = _unpermute(arr, cfg.num_heads if key == "wq" else cfg.num_kv_heads)
        return arr.T if arr.ndim == 2 and key != "embed" else arr

    params = assemble(cfg, by_name, fetch, name_of, transform, lambda n: False, path, dtype)
    return cfg, params, reader
