"""The HTTP layer: an OpenAI-compatible API over a `Service` (Starlette, served by uvicorn).

    GET  /health                 200 {"status": "ok"} once compiled, 503 while warming up
    GET  /metrics                Prometheus text
    GET  /v1/models              the one served model
    POST /v1/chat/completions    messages -> answer (stream: server-sent events)
    POST /v1/completions         prompt -> answer

Every refusal is an OpenAI error object with its status: 400 (a malformed or unsupported
request), 401 (missing or wrong key), 404 (another model), 408 (the request timeout), 413 (a body
over the limit), 429 (queue or tokens in flight full), 503 (warming up). The key is compared in
constant time and never logged; one log line per request says its id, tokens, latency, steering
and flags, never its text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pvjax.serve import schemas
from pvjax.serve.scheduler import Job, Result
from pvjax.serve.schemas import ApiError
from pvjax.serve.service import Service

log = logging.getLogger("pvjax.serve")
_POLL = 0.25  # seconds between checks for a client that left, while a request waits


def build_app(service: Service, *, ui: bool = True) -> Starlette:
    """The API's routes, and the page at `GET /` unless `ui` is False (`pvjax.serve.page`)."""
    created = int(time.time())

    def authorize(request: HttpRequest) -> None:
        key = service.settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key", code="invalid_api_key")

    async def health(request: HttpRequest) -> Response:
        sch = service.scheduler
        if sch.failed is not None:
            return JSONResponse({"status": "failed", "error": str(sch.failed)}, status_code=503)
        if not sch.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return JSONResponse({"status": "ok", "compile_seconds": sch.warmup})

    async def metrics(request: HttpRequest) -> Response:
        authorize(request)
        sch, eng = service.scheduler, service.engine
        gauges = {
            "queue_length": ("Requests waiting for a slot.", sch.queue_length()),
            "running_requests": ("Requests holding a slot.", len(sch.running)),
            "batch_slots": ("Rows of the running batch.", eng.B),
            "batch_occupancy": ("Share of the batch's rows in use.", len(sch.running) / eng.B),
            "decode_steps_total": ("Decode steps run.", eng.steps),
            "compiles_after_warmup": (
                "Programs compiled after warm-up.",
                sch.compiles_since_ready(),
            ),
            "ready": ("1 once every program is compiled.", int(sch.ready)),
            "prefix_tokens_reused_total": (
                "Prompt tokens not run again: shared prefixes found in the prefix cache.",
                eng.prefix_tokens_reused,
            ),
            "prefix_cache_hits_total": ("Admissions that reused a cached prefix.", eng.prefix_hits),
            "prefix_cache_misses_total": (
                "Admissions that ran a shared prefix and cached it.",
                eng.prefix_misses,
            ),
            "prefix_cache_entries": ("Shared prefixes held.", len(eng.prefixes)),
        }
        return PlainTextResponse(
            service.metrics.render(gauges), media_type="text/plain; version=0.0.4"
        )

    async def models(request: HttpRequest) -> Response:
        authorize(request)
        cat = service.catalog
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": service.settings.model_name,
                        "object": "model",
                        "created": created,
                        "owned_by": "pvjax",
                        "pvjax": {
                            "vectors": list(cat.vectors),
                            "monitors": {
                                n: {"layer": m.layer, "threshold": m.threshold}
                                for n, m in cat.monitors.items()
                            },
                            "layers": service.model.n_layers + 1,
                            "max_tokens": service.settings.max_new,
                            "max_prompt_tokens": service.settings.max_prompt,
                            # how prompts are rendered: thinking switch, system prompt folded
                            "chat": service.model.chat_conventions(),
                        },
                    }
                ],
            }
        )

    async def chat(request: HttpRequest) -> Response:
        return await complete(request, "chat")

    async def completions(request: HttpRequest) -> Response:
        return await complete(request, "completion")

    async def complete(request: HttpRequest, kind: str) -> Response:
        authorize(request)
        if not service.scheduler.ready:
            raise ApiError(503, "the server is warming up; retry shortly", code="warming_up")
        body = await _read_json(request, service.settings.max_body)
        req = schemas.parse(body, kind, service.limits)
        job = service.job(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: nobody is listening
                pass

        job.emit = emit
        service.scheduler.submit(job)
        if req.stream:
            return StreamingResponse(_stream(service, job, events), media_type="text/event-stream")
        deadline = job.created + service.settings.request_timeout
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    service.scheduler.cancel(job)
                    _log(service, job, None, "client left")
                    return Response(status_code=499)
                if time.monotonic() > deadline:
                    service.scheduler.cancel(job)
                    service.metrics.add("timeouts")
                    raise ApiError(408, "the request timed out", code="timeout") from None
                continue
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                result = event[1]
                _log(service, job, result, "ok")
                return JSONResponse(_body(service, job, result))

    async def on_api_error(request: HttpRequest, e: ApiError) -> Response:
        service.metrics.request(request.url.path, e.status)
        if e.status >= 500:
            log.error("request failed: %s", e.message)
        else:  # the parameter at fault, never the message (it may quote the request)
            log.info("refused %s %d param=%s code=%s", request.url.path, e.status, e.param, e.code)
        return JSONResponse(e.body(), status_code=e.status)

    async def on_http_error(request: HttpRequest, e: HTTPException) -> Response:
        return await on_api_error(request, ApiError(e.status_code, str(e.detail)))

    routes = [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    if ui:
        from pvjax.serve import page

        routes += page.routes(service, authorize, _read_json)
    return Starlette(
        routes=routes,
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
    )


async def _read_json(request: HttpRequest, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def _usage(job: Job, result: Result) -> dict:
    n = len(result.tokens)
    return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}


def _logprobs(service: Service, job: Job, pairs) -> dict:
    """Log-probabilities of the chosen tokens, in the shape of the request's endpoint."""
    tok = service.model.tokenizer
    words = [tok.decode([t]) for t, _ in pairs]
    if job.request.kind == "chat":
        return {
            "content": [
                {"token": w, "logprob": lp, "bytes": list(w.encode()), "top_logprobs": []}
                for w, (_, lp) in zip(words, pairs)
            ]
        }
    offsets, at = [], 0
    for w in words:
        offsets.append(at)
        at += len(w)
    return {
        "tokens": words,
        "token_logprobs": [lp for _, lp in pairs],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def _body(service: Service, job: Job, result: Result) -> dict:
    req = job.request
    lp = None
    if req.logprobs:
        lp = _logprobs(service, job, list(zip(result.tokens, result.logprobs)))
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": lp,
            "finish_reason": result.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": result.text,
            "logprobs": lp,
            "finish_reason": result.finish_reason,
        }
        obj = "text_completion"
    return {
        "id": job.id,
        "object": obj,
        "created": int(time.time()),
        "model": service.settings.model_name,
        "choices": [choice],
        "usage": _usage(job, result),
        "pvjax": service.extra(job, result),
    }


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _stream(service: Service, job: Job, events: asyncio.Queue):
    """Server-sent events: chunks as the text grows, the last with `finish_reason`, the usage
    and the `pvjax` object, a usage-only chunk when `stream_options.include_usage`, `[DONE]`. A
    client that leaves (the task is cancelled) or a timeout frees the row."""
    req = job.request
    chat = req.kind == "chat"
    head = {
        "id": job.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": service.settings.model_name,
    }

    def chunk(text, *, finish=None, role=False, lp=None, **extra):
        if chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **extra})

    deadline = job.created + service.settings.request_timeout
    status = "client left"
    result = None
    try:
        if chat:
            yield chunk("", role=True)
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                status = "timeout"
                service.metrics.add("timeouts")
                err = ApiError(408, "the request timed out", code="timeout")
                yield _sse(err.body())
                return
            if event[0] == "delta":
                lp = _logprobs(service, job, event[2]) if req.logprobs else None
                yield chunk(event[1], lp=lp)
            elif event[0] == "error":
                status = "error"
                yield _sse(event[1].body())
                return
            else:
                result = event[1]
                status = "ok"
                yield chunk(
                    "",
                    finish=result.finish_reason,
                    usage=_usage(job, result),
                    pvjax=service.extra(job, result),
                )
                if req.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(job, result)})
                yield b"data: [DONE]\n\n"
                return
    finally:
        if not job.done:
            service.scheduler.cancel(job)
        _log(service, job, result, status)


def _log(service: Service, job: Job, result: Result | None, status: str) -> None:
    """One line per request: id, tokens, latency, steering and flags; never the text."""
    latency = time.monotonic() - job.created
    n_new = len(result.tokens) if result else len(job.tokens)
    endpoint = "/v1/chat/completions" if job.request.kind == "chat" else "/v1/completions"
    service.metrics.request(
        endpoint, {"ok": 200, "client left": 499, "timeout": 408}.get(status, 500)
    )
    flags = ""
    if result is not None and job.request.steering.monitors:
        cat, pp = service.catalog, result.prompt_projections
        names = [
            n
            for n in job.request.steering.monitors
            if cat.monitors[n].flag(pp[cat.monitors[n].layer, cat.monitor_column(n)])
        ]
        flags = f" flagged={','.join(names) or '-'}"
    log.info(
        "%s %s prompt=%d new=%d latency=%.3fs steer=%s%s",
        job.id,
        status,
        len(job.ids),
        n_new,
        latency,
        job.request.steering.summary(),
        flags,
    )
