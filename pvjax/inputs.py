"""Host-side checks of what callers hand the model entry points: token ids, masks, positions and
the batch of an intervention. Every check runs before anything is traced or compiled, on shapes and
dtypes (free) and, for host arrays, on values; a device array is read back only for the token range,
which the forward has always checked. Failures are `InputError`s that name the argument.

Shape legend: B batch, T positions.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from pvjax.errors import InputError


def _host_array(x, what: str) -> np.ndarray:
    if isinstance(x, (str, bytes, Mapping)):
        raise InputError(f"{what} must be an array of token ids, got a {type(x).__name__}")
    try:
        return np.asarray(x)
    except ValueError as e:  # numpy refuses ragged nested lists
        raise InputError(
            f"{what} is ragged: rows of different lengths need padding and an attention_mask"
        ) from e


def check_ids(a, vocab_size: int, what: str) -> None:
    """Integer dtype and every id in 0..vocab_size-1. A float array is refused, not truncated; a
    negative id would otherwise wrap to another token and a large one clamp to the last. Reads a
    device array back to the host; skips values it cannot read (a tracer, another process's
    shard)."""
    if a.dtype.kind not in "iu":
        raise InputError(f"{what} must be integer token ids, got dtype {a.dtype}")
    if a.size == 0 or isinstance(a, jax.core.Tracer):
        return
    if isinstance(a, jax.Array):
        if not a.is_fully_addressable:  # across processes each one checks what it feeds
            return
        a = np.asarray(a)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(
            f"{what} holds token id {lo if lo < 0 else hi}, outside the vocabulary "
            f"0..{vocab_size - 1}"
        )


def token_batch(tokens, vocab_size: int):
    """Token ids as a `[B, T]` array (a 1-D row gains the batch axis), checked by `check_ids`.
    Host inputs stay numpy, so their range check costs no device round trip."""
    if not isinstance(tokens, jax.Array):
        tokens = _host_array(tokens, "tokens")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, length] (or one row), got shape {tokens.shape}")
    if tokens.size == 0:
        raise InputError(f"tokens are empty (shape {tokens.shape})")
    check_ids(tokens, vocab_size, "tokens")
    return tokens


def token_lists(seqs, vocab_size: int, what: str = "sequence") -> list[list[int]]:
    """Token sequences (lists or 1-D arrays of ids, lengths free) as lists of ints, each non-empty
    and checked by `check_ids`; messages name the sequence by index."""
    if isinstance(seqs, (str, bytes, Mapping)):
        raise InputError(f"expected a list of token-id sequences, got a {type(seqs).__name__}")
    out = []
    for i, seq in enumerate(seqs):
        a = _host_array(seq, f"{what} {i}")
        if a.ndim == 0:
            raise InputError(
                f"expected a list of token-id sequences, but {what} {i} is a single "
                f"id; wrap one sequence in a list"
            )
        if a.ndim != 1:
            raise InputError(f"{what} {i} must be a flat list of token ids, got shape {a.shape}")
        if a.size == 0:
            raise InputError(f"{what} {i} has no tokens")
        check_ids(a, vocab_size, f"{what} {i}")
        out.append(a.tolist())
    return out


def per_token(x, shape: tuple[int, int], what: str, *, integer: bool, batch_one: bool = False):
    """A `[B, T]` companion of the tokens (attention mask, positions, segment ids): the same
    shape (or `[1, T]` where `batch_one`), a 1-D row gaining the batch axis like the tokens."""
    arr = x if isinstance(x, jax.Array) else _host_array(x, what)
    if arr.ndim == 1:
        arr = arr[None]
    B, T = shape
    if arr.shape != (B, T) and not (batch_one and arr.shape == (1, T)):
        raise InputError(f"{what} has shape {tuple(arr.shape)}, the tokens {shape}")
    if integer and arr.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} must be numeric, got dtype {arr.dtype}")
    return arr


def check_mask_values(mask, what: str = "attention_mask") -> None:
    """0 or 1 everywhere (host arrays only; a device mask is not read back for this)."""
    if not isinstance(mask, jax.Array) and not np.isin(mask, (0, 1)).all():
        raise InputError(f"{what} must hold only 0 and 1")


def check_intervention_batch(
    iv, batch: int, width: int, n_rows: int, model_id: str, length: int | None = None
) -> None:
    """An intervention fits a batch of `batch` rows: `n_rows` hidden-state rows of width `width`,
    and a batch of 1 (shared by every row) or exactly `batch`; position masks `[1|B, 1|T]`."""
    if iv.n_rows != n_rows:
        raise InputError(
            f"intervention has {iv.n_rows} rows but {model_id} has n_layers+1 = {n_rows}"
        )
    if iv.steer_vectors.shape[-1] != width or iv.ablate_dirs.shape[-1] != width:
        raise InputError(
            f"intervention width {iv.steer_vectors.shape[-1]} != hidden size {width} of {model_id}"
        )
    closed = (
        {}
        if iv.closed_loop is None
        else {
            f"closed_loop.{k}": getattr(iv.closed_loop, k)
            for k in ("mode", "value", "gain", "max_step")
        }
    )
    for part in ("modes", "condition"):
        tree = getattr(iv, part, None)
        if tree is not None:
            closed.update({f"{part}.{k}": x for k, x in vars(tree).items()})
    for name, x in [
        (n, getattr(iv, n)) for n in ("steer_vectors", "steer_coefs", "ablate_dirs", "ablate_coefs")
    ] + list(closed.items()):
        per_layer = name.startswith(("closed_loop", "modes")) or name == "condition.gated"
        if per_layer and x.shape[0] != n_rows:
            raise InputError(
                f"intervention {name} has {x.shape[0]} rows but {model_id} has "
                f"n_layers+1 = {n_rows}"
            )
        b = x.shape[1]
        if b not in (1, batch):
            raise InputError(
                f"intervention has batch {b} ({name}) but the input has {batch} rows; "
                f"use batch 1 to apply it to every row, or one row per input"
            )
    if length is not None:
        for name in ("steer_mask", "ablate_mask"):
            m = getattr(iv, name)
            if m.ndim != 2 or m.shape[0] not in (1, batch) or m.shape[1] not in (1, length):
                raise InputError(
                    f"intervention {name} has shape {tuple(m.shape)}; expected "
                    f"[1 or {batch}, 1 or {length}] for tokens of shape ({batch}, {length})"
                )
