"""The chat interface every LLM backend implements (hosted APIs, local servers, the in-process
model).

Requests and results are small frozen values so that they can be hashed into cache keys, sent across
threads and compared in tests. Backends take a whole batch (`chat_many`) because every caller here
(judging thousands of answers, generating trait files) is batch-shaped and batching is where the
throughput comes from: concurrency for HTTP, packed rows for the in-process model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable


class LLMError(RuntimeError):
    """A backend could not produce a result (bad request, auth failure, retries exhausted...)."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request.

    messages: ((role, content), ...), roles as in the OpenAI protocol ("system", "user",
    "assistant"). top_logprobs: 0 when no logprobs are wanted; k > 0 asks for the top-k logprobs of
    the FIRST generated token only (which is all the judge needs).
    """

    messages: tuple[tuple[str, str], ...]
    max_tokens: int = 1
    temperature: float = 0.0
    top_logprobs: int = 0
    seed: int | None = None

    def __post_init__(self):
        # Accept lists from callers (e.g. JSON round trips) but store tuples so the value stays
        # hashable.
        object.__setattr__(self, "messages", tuple((str(r), str(c)) for r, c in self.messages))

    @classmethod
    def user(cls, text: str, system: str | None = None, **kw) -> "ChatRequest":
        """A single-turn request: optional system message, then `text` as the user message."""
        messages = ((("system", system),) if system is not None else ()) + (("user", text),)
        return cls(messages=messages, **kw)

    def cache_key(self, backend_id: str) -> str:
        """sha256 hex of a canonical JSON of every field plus `backend_id`: equal keys mean the same
        call to the same model, so a cached answer can stand in for it."""
        payload = {"backend": backend_id, **asdict(self)}
        payload["messages"] = [list(m) for m in self.messages]
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatResult:
    """The generated text, and for requests with top_logprobs > 0 the first generated token's top-k
    logprobs as {token string: logprob}."""

    text: str
    top_logprobs: dict[str, float] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"text": self.text, "top_logprobs": self.top_logprobs}, ensure_ascii=False
        )

    @classmethod
    def from_json(cls, blob: str) -> "ChatResult":
        d = json.loads(blob)
        return cls(text=d["text"], top_logprobs=d.get("top_logprobs"))


# `chat_many`'s parameter types: a batch of requests, and the optional `on_result(index, result)`
# a backend calls as each result arrives (e.g. to cache it at once).
Requests = Sequence[ChatRequest]
OnResult = Callable[[int, ChatResult], None] | None


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that answers batches of chat requests.

    backend_id identifies the model behind the backend for cache keys, e.g.
    "openai:http://host/v1:gpt-4.1-mini" or "pvjax:smollm2-135m-instruct". `chat_many` returns one
    result per request, in request order, or raises LLMError.
    """

    backend_id: str

    def chat_many(
        self, requests: Sequence[ChatRequest], *, progress: bool = False
    ) -> list[ChatResult]: ...
