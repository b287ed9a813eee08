"""Training data: chat JSONL or prompt/answer CSV -> token ids with a loss mask -> packed rows.

Shape legend: A micro-batches per step (gradient accumulation), R rows per micro-batch, W row width.

Formats (the reference implementation's, so its datasets load as they are):
- JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line. Every assistant turn
  is trained on; everything else (system, user, the template's markup) is context only.
- CSV with an `answer` column and a `question` column (the user message) or a `prompt` column:
  a user message, or, when it already ends with the chat template's generation prompt (the
  reference's answer files store the full templated text there), the templated prefix itself.

A sample is rendered with the model's own chat template. For each assistant turn i, the text of
`messages[:i]` with the generation prompt is a prefix of the text of `messages[:i+1]`; the
difference (the answer and the template's end-of-turn markup, which teaches the model to stop) is
what the loss sees. The pieces are tokenized one by one and concatenated, so the loss mask is
exact at token boundaries. A template for which that prefix property fails is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pvjax.errors import InputError
from pvjax.measure.packing import plan_rows


class DataError(InputError):
    """A training file or sample that cannot be trained on; names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] int8: 1 where the token is an assistant token the loss predicts


@dataclasses.dataclass
class DataReport:
    """What happened to every sample; printed and stored beside the run so nothing is skipped
    silently."""

    source: str = ""
    samples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    rows: int = 0
    fill: float = 0.0

    def line(self) -> str:
        return (
            f"{self.source}: {self.kept} of {self.samples} samples kept ({self.truncated} "
            "truncated, "
            f"{self.dropped_too_long} dropped as too long), {self.tokens} tokens, "
            f"{self.loss_tokens} "
            f"trained on, {self.rows} packed rows {self.fill:.0%} full"
        )


def read_samples(path) -> list[list[dict]]:
    """Every sample of a `.jsonl` or `.csv` file as a list of chat messages (checked). The files are
    parsed by the screening's reader (`pvjax.files.datasets.jsonl_lines` / `csv_records`), so one
    file reads the same for screening and for training; what each keeps of a sample differs."""
    from pvjax.files.datasets import jsonl_lines, read_text

    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"training file {path} does not exist"
            if not path.exists()
            else f"training file {path} is not a file"
        )
    if path.suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(
            f'{path}: expected a .jsonl file of {{"messages": [...]}} lines or a .csv '
            f"with question/prompt and answer columns"
        )
    text = read_text(path, DataError)
    if path.suffix == ".csv":
        return _read_csv(path, text)
    samples = [
        _check_messages(msgs, f"{path}:{n}")
        for n, _, msgs in jsonl_lines(path, text, DataError)
        if msgs is not None
    ]
    if not samples:
        raise DataError(f"{path} holds no samples")
    return samples


def _check_messages(messages, where: str) -> list[dict]:
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f'{where}: every message needs a string "role" and "content"')
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_csv(path: Path, text: str) -> list[list[dict]]:
    from pvjax.files.datasets import csv_records

    header, _, records = csv_records(path, text, DataError)
    rows = [(n, dict(zip(header, rec))) for n, _, rec in records if rec]
    if not rows:
        raise DataError(f"{path} holds no samples")
    ask = "question" if "question" in header else "prompt" if "prompt" in header else None
    if "answer" not in header or ask is None:
        raise DataError(
            f"{path}: needs an 'answer' column and a 'question' or 'prompt' column "
            f"(has {sorted(header)})"
        )
    out = []
    for n, r in rows:
        if not (r.get("answer") or "").strip():
            raise DataError(f"{path}:{n}: empty answer, so nothing to train on")
        # A templated prompt travels as a pseudo-message the tokenizer step recognises.
        role = "user" if ask == "question" else "prompt"
        out.append(
            [
                {"role": role, "content": r.get(ask) or ""},
                {"role": "assistant", "content": r["answer"]},
            ]
        )
    return out


def tokenize(tokenizer, messages: Sequence[dict], where: str = "sample") -> Example:
    """Token ids and loss mask of one chat sample, rendered with `tokenizer`'s chat template."""
    from pvjax.loading.tokenizer import render_chat

    def render(msgs, gen):
        return render_chat(tokenizer, msgs, add_generation_prompt=gen)

    pieces: list[tuple[str, int]] = []  # (text, trained on)
    if messages[0]["role"] == "prompt":  # a CSV prompt column: maybe already templated
        prompt = messages[0]["content"]
        q, a = [{"role": "user", "content": "PVJAX_Q"}], {"role": "assistant", "content": "PVJAX_A"}
        gen_prompt = render(q, True)[len(render(q, False)) :]
        if gen_prompt and prompt.endswith(gen_prompt):
            full = render(q + [a], False)
            pieces = [(prompt, 0), (messages[1]["content"] + full[full.rindex("PVJAX_A") + 7 :], 1)]
        else:
            messages = [{"role": "user", "content": prompt}] + list(messages[1:])
    if not pieces:
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True) if i else ""
            after = render(messages[: i + 1], False)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(
                    f"{where}: the chat template does not render turn {i} as an extension "
                    f"of the turns before it, so assistant tokens cannot be marked"
                )
            pieces += [(before[len(done) :], 0), (after[len(before) :], 1)]
            done = after
    ids, mask = [], []
    for text, train in pieces:
        if text:
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [train] * len(t)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int8))


def build_examples(
    tokenizer, samples, *, max_length: int, too_long: str = "truncate", source: str = ""
) -> tuple[list[Example], DataReport]:
    """Tokenize every sample. A sample past `max_length` tokens is cut to it (`truncate`: kept if
    an assistant token is left), left out (`drop`), or refused (`error`); both counted."""
    if too_long not in ("truncate", "drop", "error"):
        raise DataError(f"data.too_long must be truncate, drop or error, got {too_long!r}")
    rep = DataReport(source=source, samples=len(samples))
    out = []
    for n, msgs in enumerate(samples):
        ex = tokenize(tokenizer, msgs, f"{source} sample {n}")
        if len(ex.ids) > max_length:
            if too_long == "error":
                raise DataError(
                    f"{source} sample {n} has {len(ex.ids)} tokens, past data.max_length="
                    f"{max_length} (set data.too_long=truncate or drop)"
                )
            if too_long == "drop" or not ex.loss_mask[1:max_length].any():
                rep.dropped_too_long += 1
                continue
            ex = Example(ex.ids[:max_length], ex.loss_mask[:max_length])
            rep.truncated += 1
        out.append(ex)
    if not out:
        raise DataError(
            f"{source}: no sample is left to train on ({rep.samples} read, "
            f"{rep.dropped_too_long} longer than data.max_length={max_length})"
        )
    rep.kept = len(out)
    rep.tokens = sum(len(e.ids) for e in out)
    rep.loss_tokens = int(sum(e.loss_mask[1:].sum() for e in out))
    return out, rep


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Every example packed into fixed-width rows (first-fit decreasing,
    `pvjax.measure.packing.plan_rows`); attention stays within a segment and positions restart in
    each."""

    tokens: np.ndarray  # [rows, W] int32
    segment_ids: np.ndarray  # [rows, W] int32, 0 = padding
    positions: np.ndarray  # [rows, W] int32
    loss_mask: np.ndarray  # [rows, W] float32: token t is a target predicted at t - 1

    @property
    def n_rows(self) -> int:
        return self.tokens.shape[0]

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {
            k: getattr(self, k)[rows] for k in ("tokens", "segment_ids", "positions", "loss_mask")
        }


def pack_rows(
    examples: Sequence[Example], width: int, report: DataReport | None = None
) -> PackedRows:
    plan = plan_rows([len(e.ids) for e in examples], width)
    R = len(plan)
    tokens, seg, pos = (np.zeros((R, width), np.int32) for _ in range(3))
    loss = np.zeros((R, width), np.float32)
    for r, members in enumerate(plan):
        start = 0
        for slot, i in enumerate(members):
            e = examples[i]
            sl = slice(start, start + len(e.ids))
            tokens[r, sl], seg[r, sl], pos[r, sl] = e.ids, slot + 1, np.arange(len(e.ids))
            loss[r, sl] = e.loss_mask
            loss[r, start] = 0  # a segment's first token has nothing before it to predict it
            start += len(e.ids)
    if report is not None:
        report.rows, report.fill = R, float((seg > 0).sum() / max(seg.size, 1))
    return PackedRows(tokens, seg, pos, loss)


def step_rows(n_rows: int, step: int, rows_per_step: int, seed: int) -> np.ndarray:
    """The packed-row indices of training step `step`: the stream of epochs, each a fresh
    permutation of all rows (seeded by `(seed, epoch)`), cut into consecutive steps. A function of
    the step alone, so a resumed run reads exactly the rows the uninterrupted run would."""
    pos = np.arange(step * rows_per_step, (step + 1) * rows_per_step)
    epochs = pos // n_rows
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_rows)
        sel = epochs == e
        out[sel] = perm[pos[sel] % n_rows]
    return out


def stack_step(rows: PackedRows, idx: np.ndarray, accum: int) -> dict[str, np.ndarray]:
    """One step's batch `{name: [A, R, W]}` from row indices (A = `accum` micro-batches)."""
    return {k: v.reshape((accum, -1) + v.shape[1:]) for k, v in rows.take(idx).items()}


def write_jsonl(path, samples: Sequence[Sequence[dict]]) -> Path:
    """Write chat samples as JSONL (atomically): the format `read_samples` reads back."""
    from pvjax.files import atomic

    return atomic.write_text(
        path, "".join(json.dumps({"messages": list(m)}, ensure_ascii=False) + "\n" for m in samples)
    )
