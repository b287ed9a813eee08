"""Persona-vector files: safetensors with the three poolings and metadata that names the model.

A pvjax vector file holds `response_avg_diff`, `prompt_avg_diff` and `prompt_last_diff`, each
float32 `[n_layers+1, D]`, rows indexed like transformers' `hidden_states` (row 0 the embeddings,
row l the output of block l: steering "at layer l" shifts exactly row l). The metadata says so in
words, and carries the model id, a fingerprint of its config, the trait, the kept counts and the
pvjax version, so a vector is never silently applied to another model.

Vectors saved by the reference PyTorch implementation (`<trait>_response_avg_diff.pt`, a bare
`[n_layers+1, D]` tensor) are read without torch: a `.pt` file is a zip of a pickle and raw
storages, which `_read_torch` unpickles into numpy.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from pvjax.capture import POOLINGS
from pvjax.errors import UserError
from pvjax.version import __version__

KEYS = tuple(f"{p}_diff" for p in POOLINGS)
FORMAT = "pvjax.persona_vectors/1"
LAYER_CONVENTION = (
    "row l = transformers hidden_states[l]: row 0 embeddings, row l output of "
    "block l (last row after the final norm); steering at layer l shifts row l"
)


class VectorError(UserError, ValueError):
    """A vector file that is malformed or does not fit the model it is used with."""


def save_vectors(
    path, vectors: dict[str, np.ndarray], *, model, trait: str = "", extra: dict | None = None
) -> Path:
    """Write vectors `{key: [n_layers+1, D]}` with metadata, atomically (temp file, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    L, D = model.n_layers + 1, model.hidden_size
    for k, v in vectors.items():
        if np.shape(v) != (L, D):
            raise VectorError(f"{k} has shape {np.shape(v)}, expected [n_layers+1, D] = [{L}, {D}]")
    meta = {
        "format": FORMAT,
        "model_id": model.model_id,
        "model_fingerprint": model.config.fingerprint(),
        "n_layers": str(model.n_layers),
        "hidden_size": str(D),
        "trait": trait,
        "layer_convention": LAYER_CONVENTION,
        "pvjax_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(extra or {}) & set(meta))
    if clash:
        raise VectorError(f"extra metadata may not replace the reserved fields {clash}")
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in vectors.items()}, tmp, metadata=meta
        )
        os.chmod(
            tmp, 0o666 & ~umask
        )  # mkstemp (and safetensors>=0.8) write 0600, kept by the rename
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_vectors(path, model=None, *, strict: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors and the metadata of a pvjax vector file (or `{"vector": ...}` for a `.pt`).

    With `model`, refuse a file from a model of another shape (config fingerprint or width) with
    an error naming both; a different model id of the same shape (a finetune of the same base)
    only warns, unless `strict`.
    """
    path = _existing_file(path)
    if path.suffix == ".pt":
        tensors, meta = {"vector": _read_torch(path)}, {}
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own types for corrupt headers
            raise VectorError(f"{path}: not a readable safetensors vector file ({e})") from e
    if model is not None:
        _check_fits(path, tensors, meta, model, strict)
    return tensors, meta


def vectors_from_bytes(
    data: bytes, model=None, *, strict: bool = False, name="vector bytes"
) -> tuple[dict[str, np.ndarray], dict]:
    """`load_vectors` of a safetensors file's bytes (sent between processes,
    `pvjax.parallel.multihost`);
    `name` stands for the file in messages."""
    from safetensors.numpy import load

    try:
        n = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})
        tensors = load(data)
    except Exception as e:  # a truncated or foreign blob: say which
        raise VectorError(f"{name}: not a readable safetensors vector file ({e})") from e
    if model is not None:
        _check_fits(name, tensors, meta, model, strict)
    return tensors, meta


def check_rows(vector_LD, model, what: str = "vector", error=VectorError) -> None:
    """`vector_LD` is `[n_layers+1, D]` for `model`, else `error` naming `what` and both shapes."""
    L, D = model.n_layers + 1, model.hidden_size
    if np.shape(vector_LD) != (L, D):
        raise error(
            f"{what} has shape {np.shape(vector_LD)}; {model.model_id} needs "
            f"[n_layers+1, D] = [{L}, {D}]"
        )


def _check_fits(path, tensors, meta, model, strict):
    L, D = model.n_layers + 1, model.hidden_size
    fp = meta.get("model_fingerprint")
    if fp is not None and fp != model.config.fingerprint():
        raise VectorError(
            f"{path} was extracted from {meta.get('model_id', '?')} ({meta.get('n_layers', '?')} "
            "layers, "
            f"width {meta.get('hidden_size', '?')}); it does not fit {model.model_id} "
            f"({model.n_layers} layers, width {D})"
        )
    if fp is not None and meta.get("model_id") != model.model_id:
        msg = (
            f"{path} was extracted from {meta.get('model_id')!r}, applied to "
            f"{model.model_id!r} (same shape)"
        )
        if strict:
            raise VectorError(msg)
        warnings.warn(msg, stacklevel=3)
    for k, v in tensors.items():
        if v.shape[-1] != D:
            raise VectorError(
                f"{path}:{k} has width {v.shape[-1]}, but {model.model_id} has hidden size {D}"
            )
        if v.ndim == 2 and v.shape[0] != L:
            raise VectorError(
                f"{path}:{k} has {v.shape[0]} rows; {model.model_id} has n_layers+1 = {L} "
                f"hidden states (row 0 = embeddings)"
            )


def _existing_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise VectorError(
            f"vector file {path} is a directory; pass the .safetensors or .pt file in it"
        )
    if not path.is_file():
        raise VectorError(f"vector file {path} does not exist")
    return path


def split_spec(spec: str) -> tuple[Path, str]:
    """`FILE[:KEY]` as `(an existing file, KEY or "")`; a path that itself contains ':' wins."""
    path, key = str(spec), ""
    if not Path(path).exists() and ":" in path:
        path, _, key = path.rpartition(":")
    return _existing_file(path), key


def read_vector(spec: str, model=None, *, strict: bool = False) -> np.ndarray:
    """One vector from `FILE[:KEY]` (KEY defaults to `response_avg_diff`; a `.pt` has one)."""
    path, key = split_spec(spec)
    tensors, _ = load_vectors(path, model, strict=strict)
    if not key:
        key = "vector" if "vector" in tensors else KEYS[0]
    if key not in tensors:
        raise VectorError(f"{path} has no tensor {key!r}; it holds {sorted(tensors)}")
    v = np.asarray(tensors[key], np.float32)
    if not np.all(np.isfinite(v)):
        raise VectorError(f"{path}:{key} contains NaN or infinite values")
    return v


def import_reference(trait_dir, trait: str, model, out) -> Path:
    """Convert the reference implementation's three `<trait>_<pooling>_diff.pt` files into one
    pvjax vector file for `model` (shapes checked)."""
    vectors = {}
    for key in KEYS:
        src = Path(trait_dir) / f"{trait}_{key}.pt"
        vectors[key] = load_vectors(src, model)[0]["vector"]
    return save_vectors(
        out, vectors, model=model, trait=trait, extra={"imported_from": str(trait_dir)}
    )


_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


def _read_torch(path) -> np.ndarray:
    """A tensor saved with `torch.save` (zip format), without importing torch."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise VectorError(
            f"{path}: not a torch.save zip file (legacy pickles are not supported)"
        ) from e
    with zf:
        pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise VectorError(f"{path}: no data.pkl inside; not a torch.save file")
        root = pkl[: -len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return _rebuild
                if module == "torch" and name in _DTYPES:
                    return name
                if module == "collections" and name == "OrderedDict":
                    import collections

                    return collections.OrderedDict
                raise VectorError(f"{path}: unsupported object {module}.{name} in a vector file")

            def persistent_load(self, pid):
                _, storage, key, _, numel = pid
                dtype = _DTYPES[storage]
                raw = zf.read(f"{root}data/{key}")
                if dtype == "bfloat16":
                    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
                return np.frombuffer(raw, dtype)[:numel]

        obj = Unpickler(zf.open(pkl)).load()
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, np.ndarray):
        raise VectorError(f"{path}: expected one tensor, found {type(obj).__name__}")
    return obj.astype(np.float32)


def _rebuild(storage, offset, size, stride, *_):
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    ).copy()
