"""Packing many short sequences into a few fixed-width rows, for activation statistics.

Shape legend: R rows, W row width, S segments per row, N sequences, L hidden-state rows, D hidden.

Extraction pools thousands of (prompt, answer) sequences of very different lengths. Left-padding
them into rectangles wastes most of the compute on padding; packing them end to end into rows of
width W, with attention kept inside each segment (`segment_ids`) and positions restarting per
segment, wastes almost none. Each segment gets its own three pooling weights (response mean, prompt
mean, last prompt token), so the pooled output is exact per sequence, as if it ran alone.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from pvjax import inputs
from pvjax.capture import POOLINGS
from pvjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    tokens: np.ndarray  # [R, W] int32
    segment_ids: np.ndarray  # [R, W] int32, 0 = padding, 1..S
    positions: np.ndarray  # [R, W] int32, restarting at 0 in every segment
    pool_weights: np.ndarray  # [R, 3 S, W] float32
    members: list[tuple[int, int, int]]  # (sequence index, row, segment slot)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's total length <= width."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def _batch_rows(n_rows: int, rows_per_batch: int) -> list[int]:
    """Rows per batch: full batches, then the power of two that holds what is left."""
    full, rest = divmod(n_rows, rows_per_batch)
    return [rows_per_batch] * full + ([1 << (rest - 1).bit_length()] if rest else [])


def choose_width(
    lengths: Sequence[int], rows_per_batch: int, *, step: int = 32, widest: int = 512
) -> int:
    """The row width that wastes least: fewest computed slots, each weighted by its attention
    cost, which grows with the width (about a seventh of a slot's work at 256 on CPU). Candidates
    are multiples of `step` from the longest sequence up to `widest` (or twice the longest)."""
    return _least_waste(lengths, rows_per_batch, step, widest)[0]


def _least_waste(lengths, rows_per_batch, step=32, widest=512):
    """`choose_width`'s width with its row plan, so `pack` does not plan that width again."""
    start = _round_up(max(lengths), step)
    best = None
    for w in range(start, max(start, min(widest, 2 * start)) + 1, step):
        rows = plan_rows(lengths, w)
        cost = w * sum(_batch_rows(len(rows), rows_per_batch)) * (1 + w / 1800)
        if best is None or cost < best[0]:
            best = (cost, w, rows)
    return best[1:]


def pack(
    seqs: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    *,
    width: int | None = None,
    rows_per_batch: int = 8,
    max_segments: int | None = None,
) -> list[PackedBatch]:
    """Pack token sequences (prompt then response) into batches of `rows_per_batch` rows.

    `width` None picks the least wasteful one (`choose_width`); a given width grows to the longest
    sequence (rounded up to 64) if needed. Every batch but the last has the same shapes; the last
    has the power of two of rows that holds what is left, so a short tail costs at most
    log2(rows_per_batch) more programs instead of computing empty rows on every run.
    """
    lengths = [len(s) for s in seqs]
    if not lengths:
        raise InputError("nothing to pack: the list of sequences is empty")
    if len(prompt_lens) != len(lengths):
        raise InputError(f"{len(lengths)} sequences but {len(prompt_lens)} prompt lengths")
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 < p <= n:
            raise InputError(f"sequence {i}: prompt length {p!r} is not within 1..{n}")
    if width is None:
        width, rows = _least_waste(lengths, rows_per_batch)
    else:
        width = max(width, _round_up(max(lengths), 64))
        rows = plan_rows(lengths, width)
    S = max_segments or max(len(r) for r in rows)
    S = 1 << (S - 1).bit_length()  # powers of two: few distinct compiled shapes across runs
    batches = []
    for b, R in zip(range(0, len(rows), rows_per_batch), _batch_rows(len(rows), rows_per_batch)):
        tokens = np.zeros((R, width), np.int32)
        seg = np.zeros((R, width), np.int32)
        pos = np.zeros((R, width), np.int32)
        w = np.zeros((R, 3 * S, width), np.float32)
        members = []
        for r, row in enumerate(rows[b : b + rows_per_batch]):
            start = 0
            for slot, i in enumerate(row):
                n, p = lengths[i], prompt_lens[i]
                sl = slice(start, start + n)
                tokens[r, sl], seg[r, sl], pos[r, sl] = seqs[i], slot + 1, np.arange(n)
                if n > p:
                    w[r, 3 * slot, start + p : start + n] = 1.0 / (n - p)
                w[r, 3 * slot + 1, start : start + p] = 1.0 / p
                w[r, 3 * slot + 2, start + p - 1] = 1.0
                members.append((i, r, slot))
                start += n
        batches.append(PackedBatch(tokens, seg, pos, w, members))
    return batches


def pooled_activations(
    model,
    seqs,
    prompt_lens,
    *,
    width: int | None = None,
    rows_per_batch: int = 8,
    progress=None,
    mesh=None,
) -> np.ndarray:
    """Per-sequence pooled activations `[N, L, 3, D]` (poolings in `POOLINGS` order), float32.

    A sequence with no response tokens gets a zero response mean. `progress(n_done)` is called after
    each batch, for progress bars. On a `mesh` (`pvjax.parallel.sharding.make_mesh`) the packed rows
    of each batch are split over "data" (padded with empty rows to a multiple of it) and the
    parameters laid out by `pvjax.parallel.sharding`'s rule table; the pooling stays inside the
    sharded program, so only
    `[L, R, 3S, D]` comes back. The numbers equal one device's up to float summation order.
    """
    from pvjax.model import activations
    from pvjax.parallel import sharding

    seqs = inputs.token_lists(seqs, model.config.vocab_size)
    longest = max(map(len, seqs), default=0)
    if longest > model.config.max_position_embeddings:
        raise InputError(
            f"sequence {max(range(len(seqs)), key=lambda i: len(seqs[i]))} has {longest} "
            f"tokens, past the context window of {model.model_id} "
            f"({model.config.max_position_embeddings})"
        )
    if mesh is not None:
        model = sharding.on_mesh(model, mesh)
    out = None
    for batch in pack(seqs, prompt_lens, width=width, rows_per_batch=rows_per_batch):
        rows = [
            _pad_rows(x, sharding.pad_batch(len(x), mesh))
            for x in (batch.tokens, batch.positions, batch.segment_ids, batch.pool_weights)
        ]
        tokens, positions, segment_ids, weights = (sharding.put_rows(x, mesh) for x in rows)
        pooled = activations(
            model,
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            pool_weights=weights,
            hidden=False,
        ).pooled  # [L, R, 3S, D]
        pooled = np.asarray(jax.device_get(pooled))
        if out is None:
            out = np.zeros(
                (len(seqs), pooled.shape[0], len(POOLINGS), pooled.shape[-1]), np.float32
            )
        for i, r, slot in batch.members:
            out[i] = pooled[:, r, 3 * slot : 3 * slot + 3]
        if progress is not None:
            progress(len(batch.members))
    return out


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with empty rows appended up to `rows`: segment 0 (padding) and zero pool weights, so they
    add nothing to any sequence's statistics."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])
