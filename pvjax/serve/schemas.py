"""Requests as the OpenAI API defines them, checked whole before admission, and the error object
every refusal carries.

A request body becomes a frozen `Request` (its steering as `pvjax.serve.terms.Steering`, each
`steer` item read by `pvjax.engine.terms.from_dict`) or an `ApiError` with the status, the
message, and the parameter at fault (`steer[1].vector`), in the OpenAI error shape:
`{"error": {"message", "type", "param", "code"}}`. The checks need no model: the model's depth,
the names of the server's vectors and monitors and its limits come in `Limits`; the checks
against the model's shape (`check_terms`) run when the request becomes a job.
"""

from __future__ import annotations

import dataclasses
import math

from pvjax.engine.terms import SteerTerm, TermError, from_dict, request_positions
from pvjax.serve.terms import AblateTerm, Steering


class ApiError(Exception):
    """A refusal: HTTP `status` and the OpenAI error object (`body()`)."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        408: "timeout_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server can take, for the checks."""

    model: str
    n_rows: int  # L = n_layers + 1: valid layers are 0..L-1
    max_new: int
    vectors: tuple[str, ...] = ()
    monitors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion request, checked. `messages` for chat, `prompt` for plain completions."""

    kind: str  # "chat" or "completion"
    messages: tuple | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_tokens: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    steering: Steering


# Fields accepted and ignored at their neutral value (the official client may send them).
_NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "user": ...,
    "metadata": ...,
    "store": ...,
    "service_tier": ...,
    "parallel_tool_calls": ...,
    "echo": False,
    "best_of": 1,
    "suffix": None,
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_tokens",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "top_logprobs",
    "steer",
    "ablate",
    "monitor",
    "projections",
}
_KINDS = {
    "chat": _COMMON | {"messages", "max_completion_tokens"},
    "completion": _COMMON | {"prompt"},
}


def _number(x, param: str, *, lo=None, hi=None, lo_open=False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ApiError(400, f"{param} must be a number, got {type(x).__name__}", param=param)
    if not math.isfinite(x):
        raise ApiError(400, f"{param} must be finite, got {x}", param=param)
    if (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and x > hi):
        span = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ApiError(400, f"{param} must be in {span}, got {x}", param=param)
    return float(x)


def _integer(x, param: str, *, lo=None, hi=None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ApiError(400, f"{param} must be an integer, got {x!r}", param=param)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ApiError(400, f"{param} must be in {lo}..{hi}, got {x}", param=param)
    return x


def _object(x, param: str, allowed: set) -> dict:
    if not isinstance(x, dict):
        raise ApiError(400, f"{param} must be an object", param=param)
    extra = sorted(set(x) - allowed)
    if extra:
        raise ApiError(
            400, f"{param} has unknown fields {extra}; allowed: {sorted(allowed)}", param=param
        )
    return x


def _content(x, param: str) -> str:
    """A message's content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        parts = []
        for i, p in enumerate(x):
            if not (
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            ):
                raise ApiError(400, f"{param}[{i}] must be a text part", param=f"{param}[{i}]")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"{param} must be a string or a list of text parts", param=param)


def _messages(x) -> tuple:
    if not isinstance(x, list) or not x:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(x):
        p = f"messages[{i}]"
        m = _object(m, p, {"role", "content", "name"})
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400, f"{p}.role must be system, user or assistant, got {m.get('role')!r}", param=p
            )
        out.append({"role": role, "content": _content(m.get("content"), f"{p}.content")})
    return tuple(out)


def _steer(x, limits: Limits) -> tuple[tuple[SteerTerm, ...], str]:
    """The terms (`pvjax.engine.terms.from_dict`, vectors by startup name) and the request's one
    position mode. A `TermError` becomes a 400 with its one-line message."""
    if not isinstance(x, list):
        raise ApiError(400, "steer must be a list of terms", param="steer")
    terms = []
    for i, item in enumerate(x):
        p = f"steer[{i}]"
        try:
            t = from_dict(item, label=p)
        except TermError as e:
            raise ApiError(400, str(e), param=p) from None
        _vector(t.vector, f"{p}.vector", limits)
        if t.without is not None:
            _vector(t.without, f"{p}.without", limits)
        if t.when is not None:
            _vector(t.when.vector, f"{p}.when.vector", limits)
        terms.append(t)
    try:
        positions = request_positions([terms]) or "response"
    except TermError as e:
        raise ApiError(400, str(e), param="steer") from None
    return tuple(terms), positions


def _ablate(x, limits: Limits) -> tuple[AblateTerm, ...]:
    if not isinstance(x, list):
        raise ApiError(400, "ablate must be a list of terms", param="ablate")
    terms = []
    for i, t in enumerate(x):
        p = f"ablate[{i}]"
        t = _object(t, p, {"vector", "layers", "strength"})
        name = _vector(t.get("vector"), f"{p}.vector", limits)
        layers = t.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ApiError(400, f"{p}.layers must be a non-empty list", param=f"{p}.layers")
        layers = tuple(
            _integer(l, f"{p}.layers[{j}]", lo=0, hi=limits.n_rows - 1)
            for j, l in enumerate(layers)
        )
        strength = _number(t.get("strength", 1.0), f"{p}.strength")
        terms.append(AblateTerm(name, layers, strength))
    return tuple(terms)


def _vector(name, param: str, limits: Limits) -> str:
    if not isinstance(name, str) or name not in limits.vectors:
        known = ", ".join(limits.vectors) or "none"
        raise ApiError(
            400, f"{param}: unknown vector {name!r} (this server has: {known})", param=param
        )
    return name


def _monitors(x, limits: Limits) -> tuple[str, ...]:
    if x is None or x is False:
        return ()
    if not limits.monitors:
        raise ApiError(400, "this server was started without --monitor", param="monitor")
    if x is True:
        return limits.monitors
    names = [x] if isinstance(x, str) else x
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ApiError(
            400, "monitor must be true, a monitor name or a list of names", param="monitor"
        )
    bad = [n for n in names if n not in limits.monitors]
    if bad:
        raise ApiError(
            400,
            f"unknown monitors {bad} (this server has: {list(limits.monitors)})",
            param="monitor",
        )
    return tuple(names)


def parse(body, kind: str, limits: Limits) -> Request:
    """Check a decoded JSON body of `kind` ("chat" or "completion"); raises `ApiError`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for k, neutral in _NEUTRAL.items():
        if k in body and neutral is not ... and body[k] not in (neutral, None, {}):
            raise ApiError(400, f"{k} is not supported (only {neutral!r})", param=k)
    unknown = sorted(set(body) - _KINDS[kind] - set(_NEUTRAL))
    if unknown:
        raise ApiError(400, f"unrecognized request arguments: {unknown}", param=unknown[0])
    if body.get("model") != limits.model:
        raise ApiError(
            404,
            f"the model {body.get('model')!r} does not exist; this server serves {limits.model!r}",
            param="model",
            code="model_not_found",
        )
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n = 1 is supported", param="n")
    messages = prompt = None
    if kind == "chat":
        messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be one non-empty string", param="prompt")
    max_key = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = body.get(max_key)
    if max_tokens is None:
        max_tokens = limits.max_new if kind == "chat" else min(16, limits.max_new)
    max_tokens = _integer(max_tokens, max_key, lo=1)
    if max_tokens > limits.max_new:
        raise ApiError(
            400, f"{max_key} is {max_tokens}; this server's cap is {limits.max_new}", param=max_key
        )
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else _number(temperature, "temperature", lo=0, hi=2)
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else _number(top_p, "top_p", lo=0, hi=1, lo_open=True)
    top_k = body.get("top_k")
    top_k = 0 if top_k is None else _integer(top_k, "top_k", lo=0)
    min_tokens = body.get("min_tokens")
    min_tokens = (
        0 if min_tokens is None else _integer(min_tokens, "min_tokens", lo=0, hi=max_tokens)
    )
    seed = body.get("seed")
    seed = None if seed is None else _integer(seed, "seed", lo=0, hi=2**32 - 1)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not (isinstance(stop, (list, tuple)) and len(stop) <= 4) or not all(
        isinstance(s, str) and s for s in stop
    ):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4", param="stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = _object(body.get("stream_options") or {}, "stream_options", {"include_usage"})
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if kind == "completion" and logprobs not in (None, 0):
        raise ApiError(400, "only logprobs = 0 (the chosen tokens) is supported", param="logprobs")
    if top not in (None, 0):
        raise ApiError(400, "top_logprobs is not supported", param="top_logprobs")
    if not isinstance(logprobs, (bool, int, type(None))):
        raise ApiError(400, "logprobs must be a boolean", param="logprobs")
    projections = body.get("projections", False)
    if not isinstance(projections, bool):
        raise ApiError(400, "projections must be a boolean", param="projections")
    steer, positions = _steer(body.get("steer") or [], limits)
    steering = Steering(
        steer=steer,
        ablate=_ablate(body.get("ablate") or [], limits),
        monitors=_monitors(body.get("monitor"), limits),
        projections=projections,
        positions=positions,
    )
    return Request(
        kind=kind,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_tokens=min_tokens,
        seed=seed,
        stop=tuple(stop),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        logprobs=logprobs is not None and logprobs is not False,
        steering=steering,
    )
