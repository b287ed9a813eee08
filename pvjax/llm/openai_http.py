"""A ChatBackend for any OpenAI-compatible `/v1/chat/completions` server (hosted APIs, vLLM,
ollama), using only the standard library.

Requests run concurrently on a bounded thread pool; transient failures (connection errors, timeouts,
HTTP 429 and 5xx, unparseable bodies) are retried with exponential backoff and jitter, honouring
`Retry-After`. Other 4xx responses are the caller's mistake (bad key, bad model name) and fail at
once, since retrying them only burns time.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from pvjax.errors import UserError
from pvjax.llm.base import ChatRequest, ChatResult, LLMError, OnResult, Requests

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class Unreachable(UserError, LLMError):
    """Nothing answers at the configured server address: a setting (or a server not started) to
    fix."""


def base_url_of(base_url: str | None) -> str:
    """The server a client of `base_url` talks to: it, else $OPENAI_BASE_URL, else OpenAI's."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def probe(base_url: str | None, what: str = "base_url", timeout: float = 5.0) -> str:
    """Refuse, in one line, a server address nothing listens on (a TCP connect, no request): a job
    that needs the server later fails before its expensive part, not after it with a traceback of
    retries. Returns the resolved base URL (`base_url`, else $OPENAI_BASE_URL, else OpenAI's)."""
    url = base_url_of(base_url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unreachable(f"{what} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise Unreachable(
            f"{what} {url}: cannot connect ({reason}); start the server there or fix {what}"
        ) from None
    return url


class _Retryable(Exception):
    """A failure worth another try; `retry_after` is the server's requested wait in seconds, if
    any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _server_message(body: bytes) -> str:
    """The human-readable part of an error body: OpenAI's {"error": {"message": ...}} when
    present."""
    text = body.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text.strip()[:500]


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date; rare enough to fall back to our own backoff
        return None


class OpenAIChat:
    """Chat completions over HTTP.

    base_url defaults to $OPENAI_BASE_URL, else the OpenAI API; api_key to $OPENAI_API_KEY. Without
    a key no Authorization header is sent (local servers need none). `max_retries` counts retries
    after the first try. `chat_many` returns results in request order and raises LLMError on the
    first request that fails for good (requests not yet started are cancelled).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.base_url = base_url_of(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.url = f"{self.base_url}/chat/completions"
        self.backend_id = f"openai:{self.base_url}:{model}"

    def payload(self, request: ChatRequest) -> dict:
        """The JSON body sent for `request`."""
        body = {
            "model": self.model,
            "messages": [{"role": role, "content": content} for role, content in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.top_logprobs > 0:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        return body

    def _post_once(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            message = _server_message(e.read() or b"")
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {message}", _retry_after(e.headers)) from e
            raise LLMError(f"HTTP {e.code} from {self.url}: {message}") from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # URLError wraps connect failures and connect timeouts; OSError covers read timeouts and
            # resets; HTTPException covers truncated or garbled responses.
            reason = getattr(e, "reason", None) or e
            raise _Retryable(f"{type(e).__name__}: {reason}") from e
        try:
            return json.loads(raw)
        except ValueError as e:
            # A truncated body from a proxy or an overloaded server; usually fine on the next try.
            raise _Retryable(f"unparseable response body: {raw[:200]!r}") from e

    def _parse(self, data: dict, request: ChatRequest) -> ChatResult:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise LLMError(f"unexpected response from {self.url}: {json.dumps(data)[:500]}") from e
        if request.top_logprobs <= 0:
            return ChatResult(text=text)
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict):
            # Silently returning None would turn every judge score into "missing"; say why instead.
            raise LLMError(
                f"{self.url} returned no logprobs for model {self.model!r}; "
                "the server or model may not support them"
            )
        content = logprobs.get("content") or []
        if not content:  # nothing generated (e.g. immediate end of sequence)
            return ChatResult(text=text, top_logprobs=None)
        top: dict[str, float] = {}
        for entry in content[0].get("top_logprobs") or []:
            token, lp = entry["token"], float(entry["logprob"])
            # Two entries can decode to the same string (different byte sequences); keep the larger.
            top[token] = max(lp, top.get(token, float("-inf")))
        return ChatResult(text=text, top_logprobs=top)

    def chat(self, request: ChatRequest) -> ChatResult:
        """One request, with retries. Raises LLMError when it fails for good."""
        body = json.dumps(self.payload(request)).encode("utf-8")
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                return self._parse(self._post_once(body), request)
            except _Retryable as e:
                last = e
                if attempt == self.max_retries:
                    break
                if e.retry_after is not None:
                    delay = e.retry_after
                else:
                    # Full exponential with jitter in [0.5, 1] of it: spreads out a burst of 429s.
                    delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(
                        0.5, 1.0
                    )
                time.sleep(delay)
        raise LLMError(
            f"{self.url} failed after {self.max_retries + 1} attempts; last error: {last}"
        )

    def chat_many(
        self, requests: Requests, *, progress: bool = False, on_result: OnResult = None
    ) -> list[ChatResult]:
        """All `requests`, at most `concurrency` in flight; results in request order. `on_result(i,
        result)` is called (from the calling thread) as each one finishes, e.g. to cache it at
        once."""
        results: list[ChatResult | None] = [None] * len(requests)
        if not requests:
            return []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc=f"{self.model}", unit="req")
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(requests)), thread_name_prefix="openai-chat"
        )
        futures = {pool.submit(self.chat, r): i for i, r in enumerate(requests)}
        delivered: set = set()

        def deliver(done) -> BaseException | None:
            failed = None
            for f in done:
                if f in delivered or f.cancelled():
                    continue
                delivered.add(f)
                if f.exception() is not None:
                    failed = failed or f.exception()
                    continue
                i = futures[f]
                results[i] = f.result()
                if on_result is not None:
                    on_result(i, results[i])
                if bar is not None:
                    bar.update(1)
            return failed

        failed = None
        try:
            not_done = set(futures)
            while not_done and failed is None:
                done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
                failed = deliver(done)
        except BaseException:  # Ctrl-C: do not sit through in-flight retries
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        else:
            # On failure drop queued requests but let in-flight ones finish and hand them over too:
            # they are paid for, and a cache should keep them.
            pool.shutdown(wait=True, cancel_futures=True)
            deliver([f for f in futures if f.done()])
        finally:
            if bar is not None:
                bar.close()
        if failed is not None:
            raise failed
        return results  # type: ignore[return-value]
