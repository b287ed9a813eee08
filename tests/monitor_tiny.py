"""One tiny random Llama checkpoint with the embedded tokenizer, written once per test session and
shared by the monitoring tests (its programs compile once for both modules)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from tiny_models import save_tiny

_CACHE: dict = {}


def tiny_checkpoint(tokenizer):
    """`(folder, transformers model, pvjax model)` of `llama_gqa_untied` (3 layers, width 64)."""
    if not _CACHE:
        import pvjax

        root = Path(tempfile.mkdtemp(prefix="pvjax-monitor-"))
        atexit.register(shutil.rmtree, root, True)
        folder = root / "tiny"  # the model id
        hf = save_tiny("llama_gqa_untied", folder, tokenizer=tokenizer, seed=1)
        _CACHE.update(folder=folder, hf=hf, model=pvjax.load(folder))
    return _CACHE["folder"], _CACHE["hf"], _CACHE["model"]
