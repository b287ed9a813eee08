"""The vector a study works with: a file the config names, or one extracted on the spot.

A study config's `vector` is `FILE[:KEY]` (KEY defaults to `response_avg_diff`). When it is empty,
the trait's vector is extracted into `<workdir>/vector/` with the study's `extract` config, whose
`trait` and `model` follow the study's; extraction resumes and is reused on rerun, so a sweep over
coefficients extracts once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvjax.errors import InputError


class MissingVector(InputError):
    """A study that needs a vector was given neither a file nor a way to extract one."""


def extraction_config(cfg, work: Path):
    """The study's `extract` config pointed at `work/vector`, with the study's trait, model and
    `enable_thinking`."""
    if "extract" not in cfg or not cfg.extract:
        raise MissingVector(
            "the config sets no `vector` (FILE[:KEY]) and has no `extract` config to make one"
        )
    ext = (
        cfg.extract.copy_and_resolve_references()
        if hasattr(cfg.extract, "copy_and_resolve_references")
        else dict(cfg.extract)
    )
    if hasattr(ext, "unlock"):
        ext.unlock()
    ext["trait"], ext["model"], ext["workdir"] = cfg.trait, cfg.model, str(work / "vector")
    if "enable_thinking" in cfg or "enable_thinking" in ext:  # the study's chat rendering too
        from pvjax.settings.fields import enable_thinking

        ext["enable_thinking"] = enable_thinking(cfg)
    return ext


def check_vector(cfg, work: Path) -> None:
    """Before anything is written or loaded: a named vector file is readable (present, its key
    there, finite), or, with no file named, the `extract` config that will make one is valid
    whole."""
    if cfg.get("vector", ""):
        from pvjax.files.vectors import read_vector

        read_vector(cfg.vector)
        return
    from pvjax.settings.extraction import validate_config
    from pvjax.settings.fields import as_dict

    validate_config(as_dict(extraction_config(cfg, work)))


def vector_spec(cfg, work: Path, *, progress: bool = True) -> str:
    """`FILE[:KEY]` of the study's vector, extracting it first when the config names none."""
    if cfg.get("vector", ""):
        return str(cfg.vector)
    from pvjax.methods.extraction import run as extract
    from pvjax.settings.extraction import settings_for_run

    summary = extract(settings_for_run(extraction_config(cfg, work)), progress=progress)
    return str(Path(summary["workdir"]) / "vectors.safetensors")


def study_vector(cfg, model, work: Path, *, progress: bool = True) -> tuple[np.ndarray, str]:
    """The vector `[n_layers+1, D]` (checked against `model`: width, depth, model id) and its
    spec."""
    from pvjax.files.vectors import read_vector

    spec = vector_spec(cfg, work, progress=progress)
    return read_vector(spec, model), spec
