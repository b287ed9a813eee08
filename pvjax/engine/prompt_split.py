"""How a batch of prompts is split into prefixes, run once each, and per-row tails: the plan the
generation engine (`pvjax.engine.generate`) follows, and the shape buckets that bound its compiles.

Two ways to share, picked per batch by the token positions they run:
- **common**: the tokens every prompt opens with (chat template, system prompt: the usual case
  in persona work, hundreds of questions under one instruction), rounded down to a bucket, run as
  one row; each prompt's rest runs per row.
- **distinct**: each distinct prompt minus its last token runs once, and every row runs its last
  token alone. This is the case of a study grid, where S settings ask the same N questions:
  N prefixes instead of S x N prompts.

Either is exact only when the rows' interventions cannot tell a shared prefix apart: one
intervention for every row, or none that acts before the last prompt token (`response`
steering, with ablation off or on `response` too). The caller decides (`shareable`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


def _buckets(upto: int):
    b = 16
    while True:
        yield b
        if b > upto:
            return
        yield b * 3 // 2
        b *= 2


def prompt_bucket(n: int) -> int:
    """The padded prompt width for `n` tokens: a third wasted at worst, a sixth on average."""
    return next(b for b in _buckets(n) if b >= n)


def prefix_bucket(n: int) -> int:
    """The length of a shared prefix of `n` tokens that is run once: 0 under 16 tokens."""
    return max([b for b in _buckets(n) if b <= n], default=0)


def rows_bucket(n: int, cap: int) -> int:
    """Rows padded to a power of two, at most `cap`."""
    return min(cap, 1 << (max(n, 1) - 1).bit_length())


def common_prefix(seqs) -> int:
    """Tokens every prompt opens with, leaving each at least its last token (which must run per
    row: its logits start the answer, and `response` steering acts on it)."""
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for j in range(n):
        if any(x[j] != first[j] for x in seqs):
            return j
    return max(n, 0)


@dataclasses.dataclass(frozen=True)
class Split:
    """`prefixes[u]` runs once, left-padded to `width` columns (0: nothing is shared); prompt i
    continues `prefixes[prefix_of[i]]` with `tails[i]`; prefix u runs with the intervention of
    prompt `first[u]`. `n_prefix_rows` pads the prefixes to a bucket."""

    width: int
    prefixes: list
    prefix_of: list
    first: list
    tails: list
    tail_width: int
    n_prefix_rows: int


def split(seqs: Sequence[Sequence[int]], *, shareable: bool, max_rows: int) -> Split:
    """The cheapest of no sharing, a common prefix and distinct prefixes for these prompts, by the
    token positions each runs (padding included)."""
    seqs = [list(x) for x in seqs]
    n = len(seqs)
    longest = max(len(x) for x in seqs)
    plans = [
        (n * prompt_bucket(longest), Split(0, [[]], [0] * n, [0], seqs, prompt_bucket(longest), 1))
    ]
    if shareable and n > 1:
        c = prefix_bucket(common_prefix(seqs))
        if c:
            rest = prompt_bucket(longest - c)
            plans.append(
                (
                    c + n * rest,
                    Split(c, [seqs[0][:c]], [0] * n, [0], [x[c:] for x in seqs], rest, 1),
                )
            )
        if min(len(x) for x in seqs) > 1:
            index: dict[tuple, int] = {}
            for i, x in enumerate(seqs):
                index.setdefault(tuple(x[:-1]), i)
            if len(index) < n:
                keys = list(index)
                where = {k: u for u, k in enumerate(keys)}
                width = prompt_bucket(longest - 1)
                rows = rows_bucket(len(keys), max_rows)
                plans.append(
                    (
                        rows * width + n,
                        Split(
                            width,
                            [list(k) for k in keys],
                            [where[tuple(x[:-1])] for x in seqs],
                            [index[k] for k in keys],
                            [x[-1:] for x in seqs],
                            1,
                            rows,
                        ),
                    )
                )
    return min(plans, key=lambda p: p[0])[1]
