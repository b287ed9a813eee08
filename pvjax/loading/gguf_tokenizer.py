"""A GGUF file's tokenizer, rebuilt from the file's own metadata with `tokenizers` (no torch).

transformers can rebuild it too, but its GGUF reader imports torch (5.x), which pvjax never needs at
run time. The file stores llama.cpp's description of the tokenizer:

    tokenizer.ggml.model        "gpt2" (byte-level BPE: SmolLM2, Llama 3/3.1, Qwen2/2.5)
    tokenizer.ggml.pre          which split regex the merges were learned with ("smollm",
    "llama-bpe", "qwen2", ...) tokenizer.ggml.tokens       the vocabulary, in id order
    tokenizer.ggml.token_type   3 = control (special), 4 = user-defined (added, not special)
    tokenizer.ggml.merges       "a b" merge rules, best first tokenizer.ggml.*_token_id   bos / eos
    / unknown / padding tokenizer.ggml.add_bos_token, tokenizer.chat_template

The result matches transformers' GGUF tokenizer exactly (ids, decoded text, chat rendering;
`tests/test_gguf_tokenizer.py` holds it to that). Only byte-level vocabularies are rebuilt here:
every model pvjax targets uses one. A sentencepiece GGUF (Llama 2) gets a clear error that says to
pass `tokenizer=` a Hugging Face folder instead.
"""

from __future__ import annotations

import functools

from pvjax.loading.layout import CheckpointError

CONTROL, USER_DEFINED = 3, 4

# Split regexes by `tokenizer.ggml.pre`, as llama.cpp and transformers apply them before the
# byte-level mapping. A type missing here keeps GPT-2's own regex (ByteLevel with use_regex).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2),
}


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_metadata(reader) -> dict:
    """The tokenizer fields of an open `gguf.GGUFReader`, with llama.cpp's key names shortened."""
    meta = {
        k: _field(reader, f"tokenizer.ggml.{k}")
        for k in (
            "model",
            "pre",
            "tokens",
            "token_type",
            "merges",
            "bos_token_id",
            "eos_token_id",
            "unknown_token_id",
            "padding_token_id",
            "add_bos_token",
            "add_eos_token",
        )
    }
    meta["chat_template"] = _field(reader, "tokenizer.chat_template")
    if not meta["tokens"]:
        raise CheckpointError(
            "the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens); "
            "pass tokenizer= a Hugging Face folder with tokenizer files"
        )
    return meta


def build_backend(meta: dict):
    """The `tokenizers.Tokenizer` a byte-level GGUF describes."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    if meta["model"] != "gpt2":
        raise CheckpointError(
            f"the GGUF tokenizer is of type {meta['model']!r}; pvjax rebuilds byte-level ('gpt2') "
            "tokenizers only. Pass tokenizer= a Hugging Face folder with the model's tokenizer "
            "files"
        )
    if not meta["merges"]:
        raise CheckpointError("the GGUF byte-level tokenizer has no merges (tokenizer.ggml.merges)")
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # A vocabulary entry in plain text (some converters write added tokens that way) is respelled
    # in the byte alphabet so that merges, which are always spelled that way, find it.
    vocab = {
        t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(meta["tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    split = SPLITS.get(meta["pre"])
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = meta["token_type"] or []
    # A control token spelled outside the byte alphabet is a converter's mislabel; adding it would
    # grow the vocabulary past the embedding table, so it stays an ordinary entry.
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(meta["tokens"], types)
            if k == CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(meta["tokens"], types)
            if k == USER_DEFINED and t in vocab
        ]
    )
    bos = _token(meta, "bos_token_id")
    eos = _token(meta, "eos_token_id")
    single, specials = ["$A"], []
    if meta["add_bos_token"] and bos is not None:
        single, specials = [bos, "$A"], [(bos, meta["bos_token_id"])]
    if meta["add_eos_token"] and eos is not None:
        single, specials = single + [eos], specials + [(eos, meta["eos_token_id"])]
    tok.post_processor = processors.TemplateProcessing(
        single=single,
        pair=single + ["$B:1" if s == "$A" else s for s in single],
        special_tokens=sorted(set(specials)),
    )
    return tok


def _token(meta: dict, key: str) -> str | None:
    i = meta.get(key)
    return None if i is None or not 0 <= int(i) < len(meta["tokens"]) else meta["tokens"][int(i)]


def gguf_tokenizer(reader):
    """A transformers fast tokenizer (for its `__call__`, `decode` and `apply_chat_template`) around
    the rebuilt backend. `reader` is an open `gguf.GGUFReader`."""
    from transformers import PreTrainedTokenizerFast

    meta = tokenizer_metadata(reader)
    kw = {
        name: _token(meta, f"{key}_token_id")
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
    }
    backend = build_backend(meta)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta["chat_template"],
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(meta["add_bos_token"]),
        add_eos_token=bool(meta["add_eos_token"]),
        **{k: v for k, v in kw.items() if v is not None},
    )
    # Listed so that `all_special_ids` names every control token on transformers 4.x as on 5.x.
    named = set(kw.values())
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                t.content
                for t in backend.get_added_tokens_decoder().values()
                if t.special and t.content not in named
            ]
        }
    )
    return tok
