"""GGUFs written by llama.cpp's own `convert_hf_to_gguf.py` load to the logits of their folder.

tests/test_families.py writes GGUFs itself, following llama.cpp's conventions as we read them; here
the real converter (from the llama-cpp-python sdist's `vendor/llama.cpp`, with its own `gguf-py`,
in one subprocess for every folder) converts tiny random folders of each family
(`tiny_models.LLAMACPP_CONFIGS`, Llama 3.1's rope scaling among them) to f32, and pvjax's
forward of each GGUF must match transformers' forward of its folder: every row of `hidden_states`
and the logits within 1e-4 of the largest magnitude, left-padded; the header-only config reader
must agree with the load. Where the two disagree, pvjax's reading of the file is wrong.

The converter needs a tokenizer: a tiny sentencepiece model (trained here, offline) for the families
that take one (Gemma 2 takes nothing else), and SmolLM2's byte-level BPE, rebuilt from the embedded
GGUF, for Qwen3-MoE, whose converter takes only a BPE vocabulary whose pre-tokenizer it recognises
(it hashes the ids of a test string; SmolLM2's is known as "smollm"). That file's tokenizer is
rebuilt by pvjax too, and must encode text as the folder's does.

Needs `PVJAX_LLAMA_CPP_SRC` (the sdist's extracted `vendor/llama.cpp`; `.ci/run` downloads it) and
the `sentencepiece` package; skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import LLAMACPP_CONFIGS, assert_close, hf_left_padded, left_pad, save_tiny

import pvjax
from pvjax.loading import read_model_config

SRC = os.environ.get("PVJAX_LLAMA_CPP_SRC")
BPE_FAMILIES = {"qwen3_moe"}  # converted with a BPE vocabulary, the others with sentencepiece
VOCAB = 512  # the sentencepiece folders' vocab_size; the BPE folder takes SmolLM2's 49152
# One interpreter for every conversion: torch and the converter import once.
DRIVER = """
import runpy, sys
script, *jobs = sys.argv[1:]
for folder, out in zip(jobs[::2], jobs[1::2]):
    sys.argv = [script, folder, "--outtype", "f32", "--outfile", out]
    runpy.run_path(script, run_name="__main__")
"""


def _skip_reason() -> str | None:
    if not SRC:
        return (
            "PVJAX_LLAMA_CPP_SRC is unset (the llama-cpp-python sdist's vendor/llama.cpp; "
            ".ci/run downloads it)"
        )
    if not (Path(SRC) / "convert_hf_to_gguf.py").is_file():
        return f"PVJAX_LLAMA_CPP_SRC={SRC} holds no convert_hf_to_gguf.py"
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return "the sentencepiece package is missing (llama.cpp's converter reads tokenizer.model)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _sentencepiece_model() -> bytes:
    """A ~300-piece BPE sentencepiece model with byte fallback, trained on a made-up corpus."""
    import sentencepiece as spm

    words = "the cat sat on a mat dog ran far away from home big red ball".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 8)) for _ in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    return out.getvalue()


def _smollm2_tokenizer():
    from pvjax.loading.embedded import embedded_gguf_path
    from pvjax.loading.gguf_file import open_gguf
    from pvjax.loading.gguf_tokenizer import gguf_tokenizer

    return gguf_tokenizer(open_gguf(str(embedded_gguf_path())))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (transformers model, folder, converted GGUF)}, all converted by one subprocess."""
    root = tmp_path_factory.mktemp("llamacpp")
    spm_model, bpe = _sentencepiece_model(), _smollm2_tokenizer()
    out, jobs = {}, []
    for kind, spec in LLAMACPP_CONFIGS.items():
        folder = root / kind
        if kind in BPE_FAMILIES:
            hf = save_tiny(spec, folder, tokenizer=bpe, vocab_size=len(bpe))
        else:
            hf = save_tiny(spec, folder, vocab_size=VOCAB)
            (folder / "tokenizer.model").write_bytes(spm_model)
        out[kind] = (hf, folder, root / f"{kind}.gguf")
        jobs += [str(folder), str(root / f"{kind}.gguf")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([f"{SRC}/gguf-py", SRC]))
    script = str(Path(SRC) / "convert_hf_to_gguf.py")
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, script, *jobs], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, f"convert_hf_to_gguf.py failed:\n{r.stderr[-4000:]}"
    return out


@pytest.mark.parametrize("kind", sorted(LLAMACPP_CONFIGS))
def test_converted_gguf_matches_its_folder(converted, kind):
    hf, folder, gguf_path = converted[kind]
    # pvjax rebuilds byte-level BPE tokenizers from a GGUF, not sentencepiece ones: those take the
    # folder's (the logits are what is tested)
    tok = None if kind in BPE_FAMILIES else folder
    model = pvjax.load(gguf_path, tokenizer=tok)
    assert model.config.num_layers == hf.config.num_hidden_layers
    assert read_model_config(gguf_path) == model.config  # the header-only reader agrees
    vocab = hf.config.vocab_size
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, vocab, n).tolist() for n in (21, 13, 5)]
    ids, mask = left_pad(seqs, dtype=np.int64)
    ref = hf_left_padded(hf, ids, mask, output_hidden_states=True)
    out = pvjax.forward(model, ids, attention_mask=mask)
    for l, h in enumerate(ref.hidden_states):
        assert_close(out.hidden_states[l], h.numpy(), mask, f"{kind} hidden_states[{l}]")
    assert_close(out.logits, ref.logits.numpy(), mask, f"{kind} logits")
    if kind in BPE_FAMILIES:  # the tokenizer rebuilt from the converter's metadata
        from transformers import AutoTokenizer

        text = "Hello world! 3.14159 isn't   spaced\n\tlike\u00e9 this 🦙"
        assert model.tokenizer.encode(text) == AutoTokenizer.from_pretrained(folder).encode(text)
