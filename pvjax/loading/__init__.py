"""Checkpoint readers. Each maps every source tensor explicitly and fails on a missing or unused one."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def read_model_config(source: str | os.PathLike):
    """The `ModelConfig` of a model source (`pvjax.load`'s: a Hugging Face folder, a `.gguf` file or
    the embedded model's name) read from its metadata alone, without touching the weights, so that a
    run can check layer indices and identify the model before it pays for a load. Raises what
    `pvjax.load` would for a missing or unreadable source."""
    from pvjax.embedded import EMBEDDED_NAME, embedded_gguf_path
    from pvjax.loading.layout import CheckpointError

    name = str(source)
    path = embedded_gguf_path() if name == EMBEDDED_NAME else Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file not found: {path}")
        st = path.stat()
        return _gguf_config(str(path.resolve()), st.st_size, st.st_mtime_ns,
                            EMBEDDED_NAME if name == EMBEDDED_NAME else path.name)
    if path.is_dir():
        from pvjax.loading.safetensors_folder import read_config

        return read_config(path)
    if not path.exists():
        raise FileNotFoundError(f"model source {name!r} is neither a local folder, a .gguf file, nor "
                                f"the embedded model name {EMBEDDED_NAME!r}")
    raise ValueError(f"cannot load {name!r}: expected a Hugging Face folder or a .gguf file")


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, size: int, mtime_ns: int, name: str):
    """Cached per file version: gguf's reader parses every metadata array (a 49k-token vocabulary
    takes seconds), and a run checks its model's config more than once."""
    import gguf

    from pvjax.loading.gguf_file import gguf_config

    return gguf_config(gguf.GGUFReader(path), name)
