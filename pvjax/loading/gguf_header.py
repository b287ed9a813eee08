"""A GGUF file's metadata and tensor names, read in milliseconds, for checks made before a load.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which for a 49k-
token vocabulary and its merges takes seconds; checking a config (layer count, fingerprint) needs
none of them. This reader walks the header (little-endian GGUF v2/v3), keeps scalar values, and
keeps only the length of arrays (but the values of short scalar arrays, such as a per-layer
sliding-window pattern, and Llama 3.1's rope factors, a 1-D float32 tensor).
It offers what `gguf_file.gguf_config` reads from a reader, `fields[key].contents()` (and `.data`
for an array's length) and `tensors[i].name` (and `.data` for Llama 3.1's rope factors), so the
config comes out of the same code as a real load.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvjax.loading.layout import CheckpointError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_SHORT = 1024  # scalar arrays up to this length keep their values (per-layer settings)


@dataclass(frozen=True)
class Field:
    value: Any  # a scalar or str; a list for a short scalar array, None for another array
    length: int = 0  # an array's element count

    def contents(self):
        return self.value

    @property
    def data(self) -> range:
        return range(self.length)


@dataclass(frozen=True)
class TensorName:
    name: str
    data: tuple | None = None  # the values of Llama 3.1's rope_freqs (not read for others)


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, Field]
    tensors: list[TensorName]


def read_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor names of a GGUF file. Raises `CheckpointError` naming the file when it is
    not a GGUF file or its header is cut short."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise CheckpointError(f"{path}: not a GGUF file (empty)") from None
    with buf:
        if buf[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
        try:
            return _parse(buf, path)
        except (struct.error, IndexError):
            raise CheckpointError(
                f"{path}: truncated GGUF file (its header runs past the end)"
            ) from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: corrupt GGUF header (a name is not UTF-8)") from None


def _parse(buf, path: Path) -> GGUFHeader:
    pos = 4

    def take(fmt: str):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise IndexError("string runs past the end of the file")
        s = bytes(buf[pos : pos + n]).decode("utf-8")
        pos += n
        return s

    def skip_array(kind: int, n: int) -> None:
        nonlocal pos
        if kind == _STRING:
            for _ in range(n):
                length = take("<Q")  # read before `pos +=` reads pos
                pos += length
        elif kind == _ARRAY:
            for _ in range(n):
                skip_array(take("<I"), take("<Q"))
        else:
            pos += struct.calcsize(_SCALARS[kind]) * n
        if pos > len(buf):
            raise IndexError("array runs past the end of the file")

    version = take("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key, kind = string(), take("<I")
        if kind == _STRING:
            fields[key] = Field(string())
        elif kind == _ARRAY:
            elem, n = take("<I"), take("<Q")
            if elem in _SCALARS and n <= _SHORT:  # per-layer settings (a sliding-window pattern)
                fields[key] = Field([take(_SCALARS[elem]) for _ in range(n)], n)
            else:
                skip_array(elem, n)
                fields[key] = Field(None, n)
        elif kind in _SCALARS:
            fields[key] = Field(take(_SCALARS[kind]))
        else:
            raise CheckpointError(f"{path}: corrupt GGUF header (metadata type {kind} for {key!r})")
    table = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        table.append((name, dims, take("<I"), take("<Q")))  # name, dims, type, offset
    if pos > len(buf):
        raise IndexError("tensor table runs past the end of the file")
    align = int(fields["general.alignment"].value) if "general.alignment" in fields else 32
    start = -(-pos // align) * align
    tensors = []
    for name, dims, kind, offset in table:
        data = None
        end = start + offset + 4 * (dims[0] if dims else 0)
        # F32, 1-D, whole: Llama 3.1's rope factors, which the config needs (others are not read)
        if name == "rope_freqs.weight" and kind == 0 and len(dims) == 1 and end <= len(buf):
            data = struct.unpack_from(f"<{dims[0]}f", buf, start + offset)
        tensors.append(TensorName(name, data))
    return GGUFHeader(fields, tensors)
