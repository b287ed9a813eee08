"""An on-disk cache of chat results, and a backend wrapper that consults it.

Judging and trait generation are paid API calls; a crashed or rerun experiment must never pay for a
call twice. Results are therefore stored one by one as they arrive, not after the batch.
"""

from __future__ import annotations

import inspect
import os
import sqlite3
import threading
from pathlib import Path

from pvjax.llm.base import ChatBackend, ChatResult, OnResult, Requests


class ChatCache:
    """sqlite-backed map from cache key (see `ChatRequest.cache_key`) to ChatResult.

    Safe from several threads: one connection guarded by a lock (sqlite serialises writes anyway,
    and the calls are tiny next to an HTTP round trip). WAL mode and a busy timeout let several
    processes share the same file. Every `put` commits, so a killed run keeps what it already
    received.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=60.0, check_same_thread=False, isolation_level=None
        )
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )

    def get(self, key: str) -> ChatResult | None:
        """The stored result for `key`, or None."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        return None if row is None else ChatResult.from_json(row[0])

    def put(self, key: str, result: ChatResult) -> None:
        """Store (or overwrite) `result` under `key`, durably before returning."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)", (key, result.to_json())
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ChatCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _accepts_on_result(backend: ChatBackend) -> bool:
    try:
        return "on_result" in inspect.signature(backend.chat_many).parameters
    except (TypeError, ValueError):
        return False


class CachedBackend:
    """A ChatBackend answering from `cache` where it can and sending only the misses to `backend`,
    in one `chat_many` call (so the inner backend still sees a batch it can parallelise).

    Duplicate requests inside one batch are sent once. When the inner backend's `chat_many` takes an
    `on_result(index, result)` keyword (OpenAIChat does), each result is stored the moment it
    arrives; otherwise the batch is stored when it returns.
    """

    def __init__(self, backend: ChatBackend, cache: ChatCache):
        self.backend = backend
        self.cache = cache
        # Same identity as the inner backend: the cache is transparent, keys must not depend on it.
        self.backend_id = backend.backend_id
        self.hits = 0
        self.misses = 0

    def chat_many(
        self, requests: Requests, *, progress: bool = False, on_result: OnResult = None
    ) -> list[ChatResult]:
        """Results in request order; only cache misses reach the inner backend."""
        results: list[ChatResult | None] = [None] * len(requests)
        keys = [r.cache_key(self.backend_id) for r in requests]
        pending: dict[str, list[int]] = {}  # key -> positions in `requests` waiting for it
        for i, key in enumerate(keys):
            if key in pending:
                pending[key].append(i)
                continue
            hit = self.cache.get(key)
            if hit is None:
                pending[key] = [i]
            else:
                results[i] = hit
                if on_result is not None:
                    on_result(i, hit)
        self.hits += len(requests) - sum(len(v) for v in pending.values())
        self.misses += len(pending)
        if not pending:
            return results  # type: ignore[return-value]

        miss_keys = list(pending)
        miss_requests = [requests[pending[k][0]] for k in miss_keys]

        def store(j: int, result: ChatResult) -> None:
            self.cache.put(miss_keys[j], result)
            for i in pending[miss_keys[j]]:
                results[i] = result
                if on_result is not None:
                    on_result(i, result)

        if _accepts_on_result(self.backend):
            fresh = self.backend.chat_many(miss_requests, progress=progress, on_result=store)
            for j, result in enumerate(fresh):
                if results[pending[miss_keys[j]][0]] is None:  # inner backend skipped a callback
                    store(j, result)
        else:
            fresh = self.backend.chat_many(miss_requests, progress=progress)
            for j, result in enumerate(fresh):
                store(j, result)
        return results  # type: ignore[return-value]
