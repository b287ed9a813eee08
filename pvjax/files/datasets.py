"""Training datasets as screening reads them: chat JSONL and prompt/answer CSV, raw text kept.

A chat JSONL file holds one `{"messages": [{"role", "content"}, ...]}` per line (the reference's
training format). A sample's prompt is every message before its last assistant turn (system and
earlier turns included: that is the context the answer was trained in), its answer the content of
that last assistant turn. A CSV file holds a header and one sample per record: a user-message
prompt column and an answer column (names configurable; defaults `prompt`, `answer`).

Every sample keeps the exact text it was read from (the JSON line, the CSV record with its own
line ends and quoting), so `write_filtered` writes the input minus the removed samples byte for
byte: nothing is re-serialised, so a dataset that went through screening trains exactly as before.

A malformed sample (not JSON, no messages, no assistant turn, nothing before it, a missing CSV
column) is an `InputError` naming the file and line, raised before any model is loaded. An empty
answer is not malformed: screening counts it (it has no response tokens to pool).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Iterator

from pvjax.errors import InputError
from pvjax.files import atomic
from pvjax.files.prompts import prompt_problem

FORMATS = ("jsonl", "csv")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sample: `prompt` (the messages before the trained answer), `answer` (its
    text), `line` (1-based line in the file where it starts)."""

    prompt: tuple[dict, ...]
    answer: str
    line: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset file read for screening. `chunks` is the file's text cut into pieces that join
    back to it exactly; `sample_chunk[i]` is the chunk that holds sample i (others are blank lines
    or the CSV header)."""

    path: Path
    format: str
    samples: tuple[Sample, ...]
    chunks: tuple[str, ...]
    sample_chunk: tuple[int, ...]


def dataset_format(path, fmt: str = "") -> str:
    """`jsonl` or `csv`, from `fmt` or the file's suffix (`.jsonl`/`.json` or `.csv`)."""
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"dataset format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise InputError(
        f"{path}: cannot tell the dataset format from the suffix {suffix!r}; name it "
        f".jsonl or .csv, or set the format ({' or '.join(FORMATS)})"
    )


def read_dataset(
    path, fmt: str = "", *, prompt_column: str = "prompt", answer_column: str = "answer"
) -> Dataset:
    """Read and check a dataset (see the module docstring). An empty dataset is an error."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"dataset {path} is a directory; pass a .jsonl or .csv file")
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    fmt = dataset_format(path, fmt)
    text = read_text(path)
    if fmt == "jsonl":
        samples, chunks, where = _read_jsonl(path, text)
    else:
        samples, chunks, where = _read_csv(path, text, prompt_column, answer_column)
    if not samples:
        raise InputError(f"dataset {path} holds no samples")
    return Dataset(path, fmt, tuple(samples), tuple(chunks), tuple(where))


def read_text(path, error=InputError) -> str:
    """A dataset file's text exactly as stored: no newline translation (filtered files keep their
    \r\n), UTF-8 or an `error` naming the file."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None


def _lines(text: str) -> list[str]:
    """Lines with their ends, split at "\n" only: `str.splitlines` also splits at U+2028 and other
    separators that JSON strings may hold unescaped."""
    return [line for line in re.split(r"(?<=\n)", text) if line]


def jsonl_lines(path, text: str, error=InputError) -> Iterator[tuple[int, str, list | None]]:
    """Chat JSONL, line by line: (1-based line number, the line's exact text, its `messages` list,
    or None for a blank line). A line that is not JSON, or not an object with a `messages` list, is
    an `error` naming the file and line; the messages themselves are the caller's to check (the
    screening and the training reader ask different things of them)."""
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            yield n, line, None
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list):
            raise error(f'{path}:{n}: expected an object with a "messages" list')
        yield n, line, msgs


def csv_records(path, text: str, error=InputError):
    """CSV with the exact source text of every record: (header or None when the text holds none,
    the header's text, an iterator of (1-based line where the record starts, its text, its fields;
    [] for a blank line)). The reader pulls lines through a generator that remembers them, so the
    lines one record consumed are that record's text; a malformed record is an `error` naming its
    line."""
    lines = iter(_lines(text))
    taken: list[str] = []

    def feed():
        for line in lines:
            taken.append(line)
            yield line

    reader = csv.reader(feed())
    try:
        header = next(reader)
    except StopIteration:
        return None, "", iter(())
    except csv.Error as e:
        raise error(f"{path}:1: malformed CSV header ({e})") from None
    head = "".join(taken)

    def records():
        line = len(taken) + 1
        while True:
            taken.clear()
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise error(f"{path}:{line}: malformed CSV record ({e})") from None
            yield line, "".join(taken), rec
            line += len(taken)

    return header, head, records()


def _read_jsonl(path, text):
    samples, chunks, where = [], [], []
    for n, line, msgs in jsonl_lines(path, text):
        chunks.append(line)
        if msgs is not None:
            samples.append(_chat_sample(path, n, msgs))
            where.append(len(chunks) - 1)
    return samples, chunks, where


def _chat_sample(path, n, msgs) -> Sample:
    problem = prompt_problem(msgs)
    if problem:
        raise InputError(f"{path}:{n}: the conversation {problem}")
    last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise InputError(
            f"{path}:{n}: the conversation has no assistant turn, so no answer to screen"
        )
    if not any(m["role"] == "user" for m in msgs[:last]):
        raise InputError(f"{path}:{n}: no user turn before the last assistant turn, so no prompt")
    prompt = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:last])
    return Sample(prompt, msgs[last]["content"], n)


def _read_csv(path, text, prompt_column, answer_column):
    header, head, records = csv_records(path, text)
    if header is None:
        raise InputError(f"dataset {path} is empty (no CSV header)")
    missing = [c for c in (prompt_column, answer_column) if c not in header]
    if missing:
        raise InputError(
            f"{path}: no column {' or '.join(map(repr, missing))} in the header "
            f"({', '.join(header)}); set the prompt and answer column names"
        )
    pi, ai = header.index(prompt_column), header.index(answer_column)
    chunks, samples, where = [head], [], []
    for line, chunk, rec in records:
        chunks.append(chunk)
        if rec:  # a blank line is no record; it stays in the file as it was
            if len(rec) != len(header):
                raise InputError(f"{path}:{line}: {len(rec)} fields, the header has {len(header)}")
            if not rec[pi].strip():
                raise InputError(f"{path}:{line}: the {prompt_column!r} field is empty")
            samples.append(Sample(({"role": "user", "content": rec[pi]},), rec[ai], line))
            where.append(len(chunks) - 1)
    return samples, chunks, where


def write_filtered(ds: Dataset, drop, path) -> Path:
    """The dataset's file without the samples whose indices are in `drop`, atomically; every
    other byte as it was read."""
    drop_chunks = {ds.sample_chunk[i] for i in drop}
    return atomic.write_text(
        path, "".join(c for j, c in enumerate(ds.chunks) if j not in drop_chunks)
    )


def write_dataset(path, prompts, answers, fmt: str = "") -> Path:
    """Write (prompt, answer) pairs as chat JSONL or prompt/answer CSV (tests and studies build
    datasets with it). A prompt is a user message or a list of messages."""
    fmt = dataset_format(path, fmt)
    if fmt == "jsonl":
        lines = []
        for p, a in zip(prompts, answers):
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            lines.append(
                json.dumps(
                    {"messages": msgs + [{"role": "assistant", "content": a}]}, ensure_ascii=False
                )
                + "\n"
            )
        return atomic.write_text(path, "".join(lines))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "answer"])
    for p, a in zip(prompts, answers):
        w.writerow([p, a])
    return atomic.write_text(path, buf.getvalue())
