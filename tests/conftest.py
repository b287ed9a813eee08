"""Shared fixtures. The embedded model and its transformers twin load once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    import pvjax

    return pvjax.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF loader on the same file: the numerical reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from pvjax.embedded import embedded_gguf_path
    from tiny_models import DTYPE_KW

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 **{DTYPE_KW: torch.float32})
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer, to save beside tiny random checkpoints."""
    from pvjax.embedded import embedded_gguf_path
    from pvjax.loading.tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(embedded_gguf_path())
