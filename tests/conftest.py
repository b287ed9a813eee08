"""Shared fixtures. The embedded model and its transformers twin load once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's LLVM backend at optimisation level 0, for this process and the subprocesses it starts: the
# suite's cost is mostly compiling small programs, which this makes cheaper (CPU time, measured on
# this 2-core machine: finetune tests 10-37% less, the 8-device training script 38% less, the
# embedded model's parity test unchanged). The operations stay the same IEEE ones (no fast math),
# so every tolerance stands as it is. Read when jax first picks its backend, after this import.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import pytest


@pytest.fixture(scope="session")
def smollm2():
    import pvjax

    return pvjax.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF loader on the same file: the numerical reference."""
    import torch
    from tiny_models import DTYPE_KW
    from transformers import AutoModelForCausalLM

    from pvjax.loading.embedded import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, **{DTYPE_KW: torch.float32}
    )
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer, to save beside tiny random checkpoints."""
    from pvjax.loading.embedded import embedded_gguf_path
    from pvjax.loading.tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(embedded_gguf_path())
