"""A real HTTP server on loopback speaking the OpenAI chat-completions protocol, for tests.

Behaviour is scripted per test: `responder(request_json)` returns the reply text and the first
token's top logprobs (or raises, which makes that call a 500); attributes inject failures (the
first N calls fail with 500/429 and an optional Retry-After, slow answers, malformed bodies, 401
with an OpenAI-style error). Every request is recorded, calls are counted, and the peak number of
requests in flight is tracked.

    with OpenAIServer(responder) as srv:
        OpenAIChat("m", base_url=srv.base_url).chat_many([...])
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[dict], "tuple[str, list[tuple[str, float]]] | str"]


def echo_responder(request: dict) -> tuple[str, list[tuple[str, float]]]:
    """Replies with the last message's content and a certain "50" as the first token."""
    return request["messages"][-1]["content"], [("50", 0.0)]


class OpenAIServer:
    def __init__(self, responder: Responder = echo_responder):
        self.responder = responder
        # Failure injection, settable at any time by the test.
        self.fail_first = 0  # the first N calls fail with `fail_status`
        self.fail_status = 500
        self.retry_after: str | None = None  # Retry-After header value on those failures
        self.slow = 0.0  # seconds to wait before answering every call
        self.malformed = False  # answer 200 with a body that is not JSON
        self.unauthorized = False  # answer 401 with an OpenAI-style error body
        self.requests: list[dict] = []  # {"path", "headers", "json"} per call, in arrival order
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def bodies(self) -> list[dict]:
        with self._lock:
            return [r["json"] for r in self.requests]

    def __enter__(self) -> "OpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown (and so every test) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()  # wakes handlers sleeping in slow mode
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # --- request handling -------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            self.calls += 1
            n = self.calls
            self.requests.append({"path": h.path, "headers": dict(h.headers), "json": body})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        h.counted_in_flight = True
        try:
            if self.slow:
                self._closing.wait(self.slow)
            if h.path != "/v1/chat/completions":
                return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            if self.unauthorized:
                return self._send(
                    h,
                    401,
                    {
                        "error": {
                            "message": "Incorrect API key provided: sk-test. You can find your API "
                            "key at "
                            "https://platform.openai.com/account/api-keys.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
            if n <= self.fail_first:
                headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
                return self._send(
                    h,
                    self.fail_status,
                    {"error": {"message": f"injected failure {n}", "type": "server_error"}},
                    headers,
                )
            if self.malformed:
                return self._send_raw(h, 200, b'{"choices": [{"message": ', {})
            if body is None:
                return self._send(h, 400, {"error": {"message": "request body is not JSON"}})
            try:
                completion = self._completion(body)
            except Exception as e:  # a responder may raise to script a server-side error
                return self._send(h, 500, {"error": {"message": f"responder failed: {e}"}})
            return self._send(h, 200, completion)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test); nothing to answer
        finally:
            self._answered(h)

    def _answered(self, h) -> None:
        # A call leaves flight before its bytes go out: the client may send its next request the
        # moment it reads them, and counting both at once would overstate the client's concurrency.
        with self._lock:
            if getattr(h, "counted_in_flight", False):
                h.counted_in_flight = False
                self.in_flight -= 1

    def _completion(self, body: dict) -> dict:
        out = self.responder(body)
        content, top = (out, []) if isinstance(out, str) else out
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": None,
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            top = list(top)[:k]
            first = top[0] if top else (content[:1], 0.0)
            choice["logprobs"] = {
                "content": [
                    {
                        "token": first[0],
                        "logprob": first[1],
                        "bytes": list(first[0].encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top
                        ],
                    }
                ]
            }
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def _send(self, h, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send_raw(h, status, json.dumps(obj).encode(), headers or {})

    def _send_raw(self, h, status: int, data: bytes, headers: dict) -> None:
        self._answered(h)
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
