"""Load a `.gguf` file (llama.cpp format), dequantizing every tensor to the requested dtype.

llama.cpp's converter reorders the rows of Llama's q and k projections for its own rotary layout;
`_unpermute` undoes that so the weights match transformers' "rotate half" convention. Qwen2, Qwen3
and Gemma files are written without that reordering. The converter stores Gemma's norm weights
with the 1 of `1 + w` already added; it is taken off here, so a GGUF and its Hugging Face folder
load to the same parameters.
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
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight",
    "post_mlp_norm": "post_ffw_norm.weight",
    "router": "ffn_gate_inp.weight",
    "w_gate_e": "ffn_gate_exps.weight",
    "w_up_e": "ffn_up_exps.weight",
    "w_down_e": "ffn_down_exps.weight",
}


# general.architecture -> pvjax's architecture. Mistral files say "llama" (llama.cpp runs them as
# Llama, without a window); a Gemma 3 file holds the text tower.
_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# llama.cpp's fixed Gemma conventions, which its converter does not store: the local/global
# pattern (every 2nd block global in Gemma 2, every 6th in Gemma 3), Gemma 3's local rope base
# where a file lacks `gemma3.rope.freq_base_swa` (newer converters write it), and the query
# scale, 1/sqrt(hidden / heads) for the 27B shapes (46 and 62 blocks) and
# 1/sqrt(head_dim) otherwise.
_GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def _field(reader, key, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ConfigError(f"GGUF metadata field {key!r} is missing")
        return default
    return f.contents()


def _gemma_fields(reader, arch: str, n_layers: int, hidden: int, heads: int, head_dim: int):
    """The Gemma flags of a `gemma2` / `gemma3` file, as llama.cpp reads it."""
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern", required=False)
    if isinstance(pattern, (list, tuple)):  # one bool per block: True slides
        sliding = [bool(x) for x in pattern]
    else:
        every = int(pattern or _GEMMA_PATTERN[arch])
        sliding = [bool((i + 1) % every) for i in range(n_layers)]
    window = _field(reader, f"{arch}.attention.sliding_window", required=False)
    if window is None and arch == "gemma2":  # llama.cpp's default for Gemma 2
        window = 4096
    if not window:  # a Gemma 3 file without a window (or window 0) runs every block global
        sliding = [False] * n_layers
    scalar = hidden // heads if n_layers == _GEMMA_27B_BLOCKS[arch] else head_dim
    caps = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = _field(reader, f"{arch}.{key}", required=False)
        caps[key] = None if v is None or (arch == "gemma3" and key.startswith("attn")) else float(v)
    types = tuple("sliding_attention" if s else "full_attention" for s in sliding)
    out = dict(
        norm_plus_one=True,
        embed_scale=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        query_scale=None if scalar == head_dim else float(scalar) ** -0.5,
        attn_softcap=caps["attn_logit_softcapping"],
        final_softcap=caps["final_logit_softcapping"],
        sliding_window=None if window is None or not any(sliding) else int(window),
        layer_types=types if any(sliding) else (),
    )
    if arch == "gemma3":  # files before llama.cpp stored the local base use its old fixed 10k
        local = _field(reader, f"{arch}.rope.freq_base_swa", required=False)
        out.update(qk_norm=True, local_rope_theta=10_000.0 if local is None else float(local))
        kind = _field(reader, f"{arch}.rope.scaling.type", required=False)
        factor = _field(reader, f"{arch}.rope.scaling.factor", required=False)
        if kind not in (None, "none") or factor is not None:
            if kind not in (None, "linear"):
                raise ConfigError(
                    f"GGUF metadata {arch}.rope.scaling.type={kind!r} is not supported (linear)"
                )
            out.update(rope_type="linear", rope_scaling=(("factor", float(factor)),))
    return out


def gguf_config(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture general.architecture={arch!r} in GGUF; "
            f"pvjax supports {sorted(_ARCHITECTURES)}"
        )
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_layers = int(_field(reader, f"{arch}.block_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    names = {t.name for t in reader.tensors}
    rope = {}
    if "rope_freqs.weight" in names:
        theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope = _llama3_rope(t.data, theta, head_dim)
    vocab = _field(reader, f"{arch}.vocab_size", required=False)
    if vocab is None:
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise ConfigError(
                f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens"
            )
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", required=False)
    family = {}
    if arch == "qwen3":
        family = dict(qk_norm=True)
    elif arch == "qwen3moe":  # llama.cpp always renormalises the top-k router weights
        family = dict(
            qk_norm=True,
            # A block without a router keeps its dense MLP (ffn_gate/ffn_up/ffn_down): GGUF has no
            # metadata field for transformers' mlp_only_layers, the tensors say it.
            dense_blocks=tuple(
                i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names
            ),
            num_experts=int(_field(reader, f"{arch}.expert_count")),
            experts_per_token=int(_field(reader, f"{arch}.expert_used_count")),
            moe_intermediate_size=int(_field(reader, f"{arch}.expert_feed_forward_length")),
            norm_topk_prob=True,
        )
    elif arch in _GEMMA_PATTERN:
        family = _gemma_fields(reader, arch, n_layers, hidden, heads, head_dim)
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
        qkv_bias=arch == "qwen2",
        tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", required=False),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", required=False),
        name=name,
        **{**rope, **family},
    )


def _llama3_factors(inv, factor, lo, hi, old_ctx):
    """Per-pair divisors of llama3 rope scaling (transformers' and llama.cpp's converter's rule)."""
    wavelen = 2 * np.pi / inv
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, mid))


def _llama3_rope(factors, theta: float, head_dim: int) -> dict:
    """llama3 rope parameters that give the per-pair divisors `rope_freqs` of a Llama 3.1 file.

    llama.cpp's converter writes the divisors, not the parameters. They fix the parameters up to
    what changes nothing: with s = (1/f - 1/factor) / (1 - 1/factor) on the pairs between the two
    thresholds, s = old_ctx / (hi - lo) / wavelen - lo / (hi - lo), so lo = b and hi = b + 1 with
    old_ctx = a reproduce them; with fewer than two such pairs any thresholds between the
    neighbouring pairs do. The result is checked against the file's divisors."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    f = None if factors is None else np.asarray(factors, np.float64).reshape(-1)
    if f is None or f.shape != inv.shape or not np.all(f > 0):
        raise ConfigError(
            f"this GGUF's rope_freqs ({None if f is None else f.shape}) are not {inv.size} "
            "positive float32 divisors; pvjax cannot read its rope scaling"
        )
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=1e-6):
        return {}
    wl = 2 * np.pi / inv
    ones, big = np.isclose(f, 1.0, rtol=1e-6), np.isclose(f, factor, rtol=1e-6)
    mid = ~(ones | big)
    s = (1 / f - 1 / factor) / (1 - 1 / factor)
    if mid.sum() >= 2:
        a, minus_b = np.polyfit(1 / wl[mid], s[mid], 1)
        b = -minus_b
    elif mid.sum() == 1:  # b above both bounds: pairs below stay unscaled, pairs above divide
        w, sm = wl[mid][0], s[mid][0]
        bounds = [1e-3]
        if big.any():
            bounds.append(sm * w / (wl[big].min() - w))
        if ones.any():
            bounds.append((wl[ones].max() - sm * w) / (w - wl[ones].max()))
        b = 2 * max(bounds)
        a = (sm + b) * w
    else:  # thresholds a / (1 + b) < a / b inside the gap between the last 1 and the first factor
        w1 = wl[ones].max() if ones.any() else wl[0] / 2
        w2 = wl[big].min() if big.any() else wl[-1] * 2
        t_hi, t_lo = w1 * (w2 / w1) ** (1 / 3), w1 * (w2 / w1) ** (2 / 3)
        b = t_hi / (t_lo - t_hi)
        a = b * t_lo
    params = dict(factor=factor, lo=float(b), hi=float(b) + 1, old_ctx=float(a))
    if b <= 0 or not np.allclose(_llama3_factors(inv, **params), f, rtol=1e-5):
        raise ConfigError(
            "this GGUF's rope_freqs do not follow llama3 rope scaling; pvjax cannot read them "
            "(load the safetensors folder instead)"
        )
    return dict(
        rope_type="llama3",
        rope_scaling=tuple(
            sorted(
                {
                    "factor": factor,
                    "low_freq_factor": params["lo"],
                    "high_freq_factor": params["hi"],
                    "original_max_position_embeddings": params["old_ctx"],
                }.items()
            )
        ),
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
        if cfg.norm_plus_one and key.endswith("norm"):  # stored as 1 + w by the converter
            arr = arr - np.float32(1)
        if arr.ndim == 3:  # experts: [X, out, in] -> [X, in, out]
            return arr.swapaxes(1, 2)
        return arr.T if arr.ndim == 2 and key != "embed" else arr

    # rope_freqs (Llama 3.1) were read into the config's llama3 rope scaling
    params = assemble(
        cfg, by_name, fetch, name_of, transform, lambda n: n == "rope_freqs.weight", path, dtype
    )
    return cfg, params, reader
