"""Checkpoint readers. Each maps every source tensor explicitly and fails on a missing or unused
one."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """What a model source names, as `pvjax.load` and `read_model_config` read it: `("gguf", file)`
    for a `.gguf` path or the embedded model's name, `("folder", dir)` for a folder. A missing path
    raises `FileNotFoundError`, any other file `CheckpointError`."""
    from pvjax.loading.embedded import EMBEDDED_NAME, embedded_gguf_path
    from pvjax.loading.layout import CheckpointError

    name = str(source)
    path = embedded_gguf_path() if name == EMBEDDED_NAME else Path(source).expanduser()
    if path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        return "folder", path
    if not path.exists():
        raise FileNotFoundError(
            f"model source {name!r} is neither a local folder, a .gguf file, nor "
            f"the embedded model name {EMBEDDED_NAME!r}"
        )
    raise CheckpointError(f"cannot load {name!r}: expected a Hugging Face folder or a .gguf file")


def read_model_config(source: str | os.PathLike):
    """The `ModelConfig` of a model source (`pvjax.load`'s: a Hugging Face folder, a `.gguf` file or
    the embedded model's name) read from its metadata alone, without touching the weights, so that a
    run can check layer indices and identify the model before it pays for a load. Raises what
    `pvjax.load` would for a missing or unreadable source."""
    from pvjax.loading.embedded import EMBEDDED_NAME
    from pvjax.loading.layout import CheckpointError

    kind, path = resolve_source(source)
    if kind == "folder":
        from pvjax.loading.safetensors_folder import read_config

        return read_config(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    from pvjax.loading.gguf_file import gguf_config
    from pvjax.loading.gguf_header import read_header

    return gguf_config(
        read_header(path), EMBEDDED_NAME if str(source) == EMBEDDED_NAME else path.name
    )
