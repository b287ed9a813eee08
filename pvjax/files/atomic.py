"""Writes that never leave half a file: a temporary file in the same folder, then a rename.

Long runs write every finished piece this way, so a run killed at any moment either has a piece
whole or not at all, and resumes by skipping what exists.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence


def write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def csv_text(rows: Sequence[dict], columns: Iterable[str]) -> str:
    """The text `write_csv` writes (None as empty), for sending a file's content between
    processes."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def write_csv(path, rows: Sequence[dict], columns: Iterable[str]) -> Path:
    return write_text(path, csv_text(rows, columns))


def parse_csv(text: str) -> list[dict]:
    """Rows of CSV text, exactly as `read_csv` reads them from a file holding it."""
    return list(csv.DictReader(io.StringIO(text, newline="")))


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
