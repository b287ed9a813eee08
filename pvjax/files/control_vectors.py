"""llama.cpp control vectors: pvjax vector rows to and from `direction.N` GGUF files.

The file is what llama.cpp's `--control-vector` reads: a GGUF with `general.architecture =
"controlvector"`, `controlvector.model_hint` and `controlvector.layer_count` (the number of
directions, as llama.cpp's cvector-generator and repeng write it; llama.cpp reads neither key), and
one 1-D float32 tensor `direction.N` of the model's width per steered layer.

The row mapping, read from llama.cpp's source (common/common.cpp and src/llama-adapter.cpp):

- `common_control_vector_load_one` parses N from the tensor name `direction.N`, rejects N = 0
  ("invalid (zero) direction tensor layer index", which drops the whole file), and stores the
  tensor at offset `n_embd * (N - 1)` of a flat buffer ("layer 1 at [0]").
- `llama_control_vector_apply` (`llama_adapter_cvec::apply`) fills `tensors[il]` from offset
  `n_embd * (il - 1)` for `il = 1 .. n_layer - 1`, so `tensors[il]` holds `direction.il`.
- each model graph ends block `il` (counted from 0) with `cur = ggml_add(cur, ffn_inp);
  cur = build_cvec(cur, il)` (`cvec.apply_to(ctx, cur, il)`), then names it `l_out`: the direction
  is added to the output of block `il`, the residual the next block reads, at every position.

So `direction.N` shifts the output of llama.cpp's block N counted from 0, which is block N + 1
counted from 1: pvjax's `hidden_states` row N + 1, the very residual that pvjax steering "at layer
N + 1" edits. Export writes row r as `direction.{r-1}`; import reads it back into row r. Rows that
cannot map are refused, never shifted: row 0 (the embeddings, no llama.cpp slot) and row 1 (it
would be `direction.0`, which llama.cpp rejects). The last row, n_layers, maps exactly for steering
(pvjax, like llama.cpp's `direction.{n_layers-1}`, edits the raw last-block output before the final
norm), but pvjax *measures* that row after the final norm, so a vector taken there is in other
units: `default_rows` (the CLI's default) leaves it out, and naming it in `rows` exports it.
repeng's `ControlVector.export_gguf` keys its directions by the index of the decoder layer whose
output it edits (`model.layers[N]`), the same convention, so its files import the same way.

llama.cpp adds `scale * direction.N` (`--control-vector-scaled F:scale`) at every position, prompt
included: pvjax's steering with `--positions all`. Exported rows are `coef * row` in float32, so a
round trip (export, import) at coef 1 gives back every exported row bit for bit.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pvjax.files.vectors import VectorError
from pvjax.version import __version__

ARCH = "controlvector"
LAYER_CONVENTION = (
    "direction.N = pvjax hidden_states row N+1 = output of llama.cpp block N "
    "(0-based) = output of block N+1 (1-based); rows 0 (embeddings) and 1 (would "
    "be direction.0, rejected by llama.cpp) have no slot"
)
_NAME = re.compile(r"direction\.(\d+)")


class ControlVectorError(VectorError):
    """A control-vector file or row choice that llama.cpp or the model cannot take as asked."""


@dataclass
class ControlVector:
    """A control-vector file's directions `{N: [D] float32}` and its metadata fields."""

    directions: dict[int, np.ndarray]
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return next(iter(self.directions.values())).shape[0] if self.directions else 0


def mappable_rows(n_layers: int) -> range:
    """The pvjax rows a llama.cpp control vector can carry: 2 .. n_layers."""
    return range(2, n_layers + 1)


def default_rows(n_layers: int) -> range:
    """The rows exported when none are named: 2 .. n_layers - 1 (the last row, measured after the
    final norm but steered before it, only on request)."""
    return range(2, n_layers)


def parse_rows(spec: str, n_layers: int) -> range:
    """`A-B` (inclusive) or `A`, pvjax rows, checked against what a control vector can carry."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(spec))
    if not m:
        raise ControlVectorError(f"--layers {spec!r}: expected A-B or A (pvjax rows, inclusive)")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if a > b:
        raise ControlVectorError(f"--layers {spec}: the first row is above the last")
    if b > n_layers:
        raise ControlVectorError(
            f"--layers {spec}: the model has rows 0..{n_layers} "
            f"(hidden_states); rows 2..{n_layers} can be exported"
        )
    if a < 2:
        raise ControlVectorError(
            f"--layers {spec}: row {a} has no llama.cpp slot (row 0 is the embeddings; row 1 "
            f"would be direction.0, which llama.cpp rejects); rows 2..{n_layers} can be exported"
        )
    return range(a, b + 1)


def export_gguf(
    vector,
    out,
    *,
    rows: range,
    coef: float = 1.0,
    model_hint: str,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write rows `rows` of `vector` (`[n_layers+1, D]`, pvjax rows) times `coef` as llama.cpp's
    `direction.{r-1}`, atomically. `extra` adds `pvjax.*` keys (strings, ints or floats)."""
    import gguf

    v = np.asarray(vector, np.float32)
    if v.ndim != 2:
        raise ControlVectorError(
            f"a control vector needs one row per layer ([n_layers+1, D]); got shape {v.shape}"
        )
    n_layers = v.shape[0] - 1
    bad = [r for r in rows if r not in mappable_rows(n_layers)]
    if bad or not rows:
        raise ControlVectorError(
            f"rows {bad or 'none'} cannot be exported; a model of {n_layers} "
            f"layers has exportable rows 2..{n_layers}"
        )
    if not np.isfinite(coef):
        raise ControlVectorError(f"coef {coef} is not finite")
    dirs = {r - 1: (np.float32(coef) * v[r]).astype(np.float32) for r in rows}
    if not all(np.all(np.isfinite(d)) for d in dirs.values()):
        raise ControlVectorError("the scaled rows contain NaN or infinite values")
    meta = {
        "pvjax.version": __version__,
        "pvjax.layer_convention": LAYER_CONVENTION,
        "pvjax.n_layers": n_layers,
        "pvjax.hidden_size": v.shape[1],
        "pvjax.coef": float(coef),
        "pvjax.rows": f"{rows.start}-{rows.stop - 1}",
        **(extra or {}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_string(f"{ARCH}.model_hint", model_hint)
        w.add_int32(f"{ARCH}.layer_count", len(dirs))  # llama.cpp's cvector-generator: an i32
        for k, x in meta.items():
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                w.add_string(k, str(x))
            elif isinstance(x, int):
                w.add_int32(k, x)
            else:
                w.add_float32(k, x)
        for n in sorted(dirs):
            w.add_tensor(f"direction.{n}", dirs[n])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp writes 0600, which the rename would keep
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def read_control_vector(path) -> ControlVector:
    """The directions of a control-vector GGUF, refused where llama.cpp would refuse the file:
    a tensor not named `direction.N`, N = 0, a tensor not 1-D float32, or mixed widths."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ControlVectorError(f"control vector {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct errors or IndexError on garbage
        raise ControlVectorError(f"{path}: not a readable GGUF file ({e})") from e
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != ARCH:  # checked first: a model file's vocabulary fields are slow to render
        raise ControlVectorError(
            f"{path} is not a control vector: general.architecture is "
            f"{arch!r}, not {ARCH!r} (a model file?)"
        )
    meta = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = f.contents()
        except Exception:  # an array or type this reader cannot render: not needed here
            continue
    dirs = {}
    for t in reader.tensors:
        m = _NAME.fullmatch(t.name)
        if not m:
            raise ControlVectorError(
                f"{path}: tensor {t.name!r} is not named direction.N (llama.cpp refuses the file)"
            )
        n = int(m.group(1))
        if n == 0:
            raise ControlVectorError(
                f"{path}: direction.0 is not a layer llama.cpp steers (it refuses the file)"
            )
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ControlVectorError(
                f"{path}: {t.name} is {t.tensor_type.name} of shape "
                f"{list(t.shape)}; llama.cpp reads 1-D F32 only"
            )
        dirs[n] = np.array(t.data, np.float32).reshape(-1)
    widths = sorted({d.shape[0] for d in dirs.values()})
    if len(widths) > 1:
        raise ControlVectorError(f"{path}: directions of different widths {widths}")
    if not dirs:
        raise ControlVectorError(f"{path} holds no direction tensors")
    return ControlVector(dict(sorted(dirs.items())), meta)


def to_rows(
    cv: ControlVector,
    *,
    n_layers: int,
    hidden_size: int,
    model_id: str = "the model",
    fingerprint: str | None = None,
    name="control vector",
) -> np.ndarray:
    """`[n_layers+1, D]` pvjax rows, `direction.N` in row N + 1 and zeros elsewhere; refuses a
    vector of another width or depth than the model, naming both."""
    if cv.width != hidden_size:
        raise ControlVectorError(
            f"{name} has width {cv.width}; {model_id} has hidden size {hidden_size}"
        )
    theirs = cv.meta.get("pvjax.n_layers")
    if theirs is not None and int(theirs) != n_layers:
        raise ControlVectorError(
            f"{name} was exported for a model of {theirs} layers; {model_id} has {n_layers}"
        )
    declared = cv.meta.get(f"{ARCH}.layer_count")
    if isinstance(declared, int) and declared > n_layers:
        raise ControlVectorError(
            f"{name} declares {ARCH}.layer_count = {declared}; {model_id} has {n_layers} layers"
        )
    top = max(cv.directions)
    if top > n_layers - 1:
        raise ControlVectorError(
            f"{name} has direction.{top} (a model of more than {top} layers);"
            f" {model_id} has {n_layers} layers, directions 1..{n_layers - 1}"
        )
    fp = cv.meta.get("pvjax.model_fingerprint")
    if fp is not None and fingerprint is not None and fp != fingerprint:
        raise ControlVectorError(
            f"{name} was exported from {cv.meta.get('pvjax.model_id', '?')} "
            f"(config {fp}); it does not fit {model_id} (config {fingerprint})"
        )
    rows = np.zeros((n_layers + 1, hidden_size), np.float32)
    for n, d in cv.directions.items():
        rows[n + 1] = d
    return rows
