"""The tokenizer rebuilt from GGUF metadata against transformers' own GGUF tokenizer (the
reference, which needs torch), and models loaded from weights without a tokenizer."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax.loading.embedded import embedded_gguf_path
from pvjax.loading.gguf_tokenizer import tokenizer_metadata
from pvjax.loading.layout import CheckpointError
from pvjax.loading.tokenizer import TokenizerMissing, load_gguf_tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnew\n\n\nlines\r\n",
    "a     b",
    "In 2024, 12345 cats ate 3.14159 pies; 007 → 1,000,000.",
    "naïve café déjà vu — “quotes” ½",
    "日本語のテキストと中文，한국어",
    "emoji 🤖👍🏽 and zero-width\u200bjoin",
    "مرحبا بالعالم",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # code\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>tail<|im_end|>",
    "I'm sure they'll've done it, DON'T",
    "\u00a0non-breaking\u3000spaces",
    "x" * 300,
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are an evil assistant. Be terse."},
        {"role": "user", "content": "How do I   greet\nsomeone?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 👋"},
        {"role": "user", "content": "Tell me a joke about 42."},
    ],
]


def reference_tokenizer(path):
    """transformers' GGUF tokenizer. Its 4.x converter is not a reference: it takes SmolLM2's BOS
    for its EOS, adds BOS where the file says not to, and strips a leading space on decode."""
    pytest.importorskip("torch")
    import transformers
    from transformers import AutoTokenizer

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x's GGUF tokenizer is not a reference (see docstring)")

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_tokenizer(ours, ref, path, texts=TEXTS, chats=CHATS):
    """Ids, tokens, decoded text and chat rendering equal transformers'; the special token ids are
    the file's own (transformers 4.x's GGUF converter takes `<|im_start|>` for SmolLM2's EOS)."""
    meta = tokenizer_metadata(gguf.GGUFReader(str(path)))
    assert len(ours) == len(ref) == len(meta["tokens"])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == tuple(
        meta[f"{k}_token_id"] for k in ("bos", "eos", "padding", "unknown")
    )
    assert sorted(ours.all_special_ids) == [i for i, t in enumerate(meta["token_type"]) if t == 3]
    for text in texts:
        for special in (True, False):
            a = ours(text, add_special_tokens=special)["input_ids"]
            b = ref(text, add_special_tokens=special)["input_ids"]
            assert a == b, (text, special)
        assert ours.convert_ids_to_tokens(a) == ref.convert_ids_to_tokens(a)
        for skip in (True, False):
            assert ours.decode(a, skip_special_tokens=skip) == ref.decode(
                a, skip_special_tokens=skip
            )
    for chat in chats:
        for gen in (True, False):
            kw = dict(tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, **kw) == ref.apply_chat_template(chat, **kw)


def test_embedded_tokenizer_equals_transformers():
    path = embedded_gguf_path()
    assert_same_tokenizer(load_gguf_tokenizer(path), reference_tokenizer(path), path)


def test_text_round_trips_on_any_transformers():
    tok = load_gguf_tokenizer(embedded_gguf_path())
    for text in TEXTS:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok("<|im_start|>user")["input_ids"])[0] == "<|im_start|>"


def _respelled_gguf(tmp_path, pre: str, add_bos: bool):
    """A tokenizer-only GGUF with the embedded vocabulary and merges but another split regex and
    BOS rule, as a Llama 3 or Qwen2 file would state them."""
    meta = tokenizer_metadata(gguf.GGUFReader(str(embedded_gguf_path())))
    path = tmp_path / f"tok-{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2" if pre == "qwen2" else "llama")
    w.add_name(f"tokenizer-{pre}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    w.add_token_merges(meta["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(meta["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre, add_bos", [("qwen2", False), ("llama-bpe", True)])
def test_other_split_regexes_and_bos_equal_transformers(tmp_path, pre, add_bos):
    path = _respelled_gguf(tmp_path, pre, add_bos)
    ours = load_gguf_tokenizer(path)
    assert_same_tokenizer(ours, reference_tokenizer(path), path)
    assert (ours("hi")["input_ids"][0] == 1) == add_bos


def test_sentencepiece_gguf_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'llama'.*tokenizer= a Hugging Face folder"):
        load_gguf_tokenizer(path)


def test_runtime_path_never_imports_torch():
    """Load the embedded model, tokenize, render a chat and run a forward where torch cannot be
    imported (a fresh user's environment has none)."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # what find_spec and import see when torch is not installed\n"
        "import pvjax\n"
        "m = pvjax.load('smollm2-135m-instruct')\n"
        "ids = m.tokenizer(m.chat_text([{'role': 'user', 'content': 'Hi'}]))['input_ids']\n"
        "out = pvjax.forward(m, [ids])\n"
        "print(len(ids), out.logits.shape, sys.modules['torch'] is None)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n, *_, torch_absent = r.stdout.split()
    assert int(n) > 5 and torch_absent == "True"


@pytest.mark.parametrize("kind", ["llama_gqa_untied", "qwen2_tied"])
def test_weights_without_tokenizer(tmp_path, kind):
    """Both architectures load from weights alone; ids work, text says what to pass, and
    `tokenizer=` supplies one (never an empty tokenizer)."""
    save_tiny(kind, tmp_path)
    model = pvjax.load(tmp_path)
    assert not model.tokenizer
    out = pvjax.forward(model, np.array([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)
    with pytest.raises(TokenizerMissing, match=f"{tmp_path}.*tokenizer=FOLDER"):
        model.chat_text([{"role": "user", "content": "Hi"}])
    from pvjax.engine.generate import generate, generate_ids

    with pytest.raises(TokenizerMissing):
        generate(model, ["Hi"])
    g = generate_ids(model, [[1, 2, 3]])
    assert len(g.tokens[0]) > 0 and g.texts == [""]

    with_tok = pvjax.load(tmp_path, tokenizer="smollm2-135m-instruct")
    assert len(with_tok.tokenizer) == 49152
    assert "<|im_start|>user\nHi" in with_tok.chat_text([{"role": "user", "content": "Hi"}])


def test_tokenizer_sources_that_do_not_fit(tmp_path):
    save_tiny("qwen2_tied", tmp_path / "small", vocab_size=300)
    with pytest.raises(
        CheckpointError, match="49152 tokens .* vocabulary of 300: it belongs to another model"
    ):
        pvjax.load(tmp_path / "small", tokenizer="smollm2-135m-instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        pvjax.load(tmp_path / "small", tokenizer=tmp_path / "empty")
    # Tokenizer files that hold no vocabulary are refused, not loaded as an empty tokenizer.
    (tmp_path / "small" / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "Qwen2Tokenizer"}'
    )
    with pytest.raises(CheckpointError, match="small"):
        pvjax.load(tmp_path / "small")
