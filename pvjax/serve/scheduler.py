"""Continuous batching: one engine thread admits waiting requests into free slots between steps,
runs a step for every occupied slot, and turns each new token into text, stop decisions and
events for the request's HTTP handler.

A request is a `Job`; its handler gives it an `emit` callback (thread safe) and receives:
`("delta", text, [(token, logprob), ...])` while it streams, then one of `("done", Result)`,
`("error", ApiError)`. A job whose handler sets `cancelled` (client gone, timeout) leaves its slot
at the next step boundary, or the queue without running.

Text and stops follow `pvjax.engine.generate`: an EOS token ends the answer (kept in the tokens,
not in the text), a stop string cuts the text at its first occurrence and ends the answer at the
token that completed it, `max_tokens` ends it with reason "length". A streamed delta never holds
back more than an unfinished UTF-8 character or a possible start of a stop string.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np

from pvjax.engine.slots import Row, SlotEngine, compile_count
from pvjax.serve.metrics import Metrics
from pvjax.serve.schemas import ApiError, Request

log = logging.getLogger("pvjax.serve")


@dataclasses.dataclass
class Result:
    text: str
    finish_reason: str  # "stop" or "length"
    tokens: list[int]
    logprobs: list[float]
    prompt_projections: np.ndarray | None  # [L, K] at the last prompt token
    projections: list[np.ndarray] | None  # [L, K] per new token
    ttft: float | None
    latency: float


@dataclasses.dataclass(eq=False)
class Job:
    id: str
    ids: list[int]
    row: Row
    request: Request
    emit: Callable[[tuple], None] = lambda event: None
    created: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    slot: int | None = None
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    projections: list = dataclasses.field(default_factory=list)
    prompt_projections: np.ndarray | None = None
    gate: float = 1.0  # the condition's verdict on the prompt (1 when the request has none)
    sent: str = ""
    unsent: int = 0  # tokens not yet covered by a delta
    first_token_at: float | None = None

    @property
    def budget(self) -> int:
        return len(self.ids) + self.request.max_tokens


class Scheduler:
    """See the module docstring. `max_queue` waiting jobs and `max_tokens_in_flight` (prompt +
    max_tokens over waiting and running jobs) bound what is accepted; beyond them `submit`
    refuses with 429."""

    def __init__(
        self,
        engine: SlotEngine,
        tokenizer,
        eos_ids,
        metrics: Metrics,
        *,
        max_queue: int = 64,
        max_tokens_in_flight: int = 1 << 20,
        max_admit: int = 4,
    ):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.eos = set(int(i) for i in eos_ids)
        self.max_queue, self.max_tokens_in_flight = max_queue, max_tokens_in_flight
        # Prompts admitted per step boundary: the rows already running decode between them, so
        # a burst of newcomers does not hold every first token until the last prompt has run.
        self.max_admit = max_admit
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self.cv = threading.Condition()
        self.ready = False
        self.failed: BaseException | None = None
        self.warmup: dict[str, float] = {}
        self.compiles_at_ready: int | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the HTTP side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="pvjax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cv:
            self._stopping = True
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.cv:
            if not self.ready:
                raise ApiError(503, "the server is warming up; retry shortly", code="warming_up")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(
                    429,
                    f"the queue is full ({self.max_queue} waiting); retry later",
                    code="queue_full",
                )
            in_flight = sum(j.budget for j in self.waiting) + sum(
                j.budget for j in list(self.running.values())
            )
            if in_flight + job.budget > self.max_tokens_in_flight:
                raise ApiError(
                    429,
                    f"too many tokens in flight ({in_flight} + {job.budget} > "
                    f"{self.max_tokens_in_flight}); retry later",
                    code="tokens_in_flight",
                )
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cv:
            self.cv.notify()

    def queue_length(self) -> int:
        return len(self.waiting)

    def compiles_since_ready(self) -> int:
        return 0 if self.compiles_at_ready is None else compile_count() - self.compiles_at_ready

    # -- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            t = time.perf_counter()
            self.warmup = self.engine.warm_up()
            self.compiles_at_ready = compile_count()
            log.info(
                "compiled %d programs in %.1f s: %s",
                len(self.warmup),
                time.perf_counter() - t,
                ", ".join(f"{k} {v:.1f}s" for k, v in self.warmup.items()),
            )
            self.ready = True
        except BaseException as e:  # reported by /health; the HTTP side answers 503
            self.failed = e
            log.exception("warm-up failed")
            return
        while True:
            with self.cv:
                while not self._stopping and not self.waiting and not self.running:
                    self.cv.wait()
                if self._stopping:
                    break
                admits = []
                free = self.engine.free_slots()
                while free and self.waiting and len(admits) < self.max_admit:
                    job = self.waiting.popleft()
                    if job.cancelled:
                        self.metrics.add("cancelled")
                        continue
                    admits.append((free.pop(0), job))
            for slot, job in admits:
                self._admit(slot, job)
            for slot, job in list(self.running.items()):
                if job.cancelled:
                    self._leave(job)
                    self.metrics.add("cancelled")
            if self.running:
                self._step()

    def _admit(self, slot: int, job: Job) -> None:
        try:
            proj = self.engine.admit(slot, job.ids, job.row, job.request.max_tokens)
        except Exception as e:  # checked before submission: this is a bug, not a bad request
            log.exception("admission of %s failed", job.id)
            job.emit(("error", ApiError(500, f"admission failed: {type(e).__name__}: {e}")))
            return
        job.slot, job.prompt_projections = slot, proj
        job.gate = float(self.engine.gate[slot])
        self.running[slot] = job

    def _leave(self, job: Job) -> None:
        self.engine.release(job.slot)
        self.running.pop(job.slot, None)
        job.done = True

    def _step(self) -> None:
        try:
            out = self.engine.step()
        except Exception as e:
            log.exception("decode step failed")
            for job in list(self.running.values()):
                self._leave(job)
                job.emit(("error", ApiError(500, f"decode step failed: {type(e).__name__}: {e}")))
            return
        now = time.monotonic()
        for i, slot in enumerate(out.slots):
            job = self.running.get(slot)
            if job is None:
                continue
            proj = None if out.projections is None else out.projections[i]
            self._advance(job, out.tokens[i], out.logprobs[i], proj, now)

    def _advance(self, job: Job, tok: int, logprob: float, proj, now: float) -> None:
        if job.first_token_at is None:
            job.first_token_at = now
        job.tokens.append(tok)
        job.logprobs.append(logprob)
        if proj is not None and job.request.steering.projections:
            job.projections.append(proj)
        req = job.request
        reason = "stop" if tok in self.eos else None
        last = len(job.tokens) >= req.max_tokens
        if reason is None and not (last or req.stream or req.stop):
            return  # nothing to decide or send: the text is decoded once, at the end
        body = job.tokens[:-1] if reason else job.tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in req.stop if s in text]
        if hits:
            reason, text = "stop", text[: min(hits)[0]]
        if reason is None and last:
            reason = "length"
        if reason is not None:
            self._finish(job, text, reason, now)
        elif req.stream:
            safe = _streamable(text, req.stop)
            if len(safe) > len(job.sent) and safe.startswith(job.sent):
                self._delta(job, safe[len(job.sent) :])

    def _delta(self, job: Job, piece: str) -> None:
        covered = list(zip(job.tokens[job.unsent :], job.logprobs[job.unsent :]))
        job.unsent = len(job.tokens)
        job.sent += piece
        job.emit(("delta", piece, covered))

    def _finish(self, job: Job, text: str, reason: str, now: float) -> None:
        self._leave(job)
        if job.request.stream and text.startswith(job.sent) and len(text) > len(job.sent):
            self._delta(job, text[len(job.sent) :])
        ttft = job.first_token_at - job.created
        latency = now - job.created
        self.metrics.finished(len(job.ids), len(job.tokens), latency, ttft)
        job.emit(
            (
                "done",
                Result(
                    text=text,
                    finish_reason=reason,
                    tokens=list(job.tokens),
                    logprobs=list(job.logprobs),
                    prompt_projections=job.prompt_projections,
                    projections=job.projections if job.request.steering.projections else None,
                    ttft=ttft,
                    latency=latency,
                ),
            )
        )


def _streamable(text: str, stops) -> str:
    """The part of `text` safe to send: without an unfinished UTF-8 character at its end, nor an
    ending that may grow into a stop string."""
    t = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(t)), 0, -1):
            if t.endswith(s[:k]):
                hold = max(hold, k)
                break
    return t[: len(t) - hold]
