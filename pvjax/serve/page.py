"""The page `pvjax serve` shows at `GET /` (off with `--no-ui`), and the one route of its own it
calls beside the OpenAI API.

    GET  /             static/index.html: chat, steering rows, tokens shaded by projection
    POST /page/tokens  {messages, steer, ablate, answer_ids} -> every token's projections

The page chats through `/v1/chat/completions` (streamed, with `logprobs`, `projections` and
`monitor`), so what it shows is what any client gets. The API reads projections only where a
request steers or monitors, and only at the last prompt token for the prompt; to shade every
token of the prompt and the answer by any vector at any layer, `/page/tokens` runs one plain
forward over `prompt + answer` with the request's own intervention and position mask (which
reproduces what generation did: `pvjax.interventions`) and returns the projections onto every
startup vector at every layer. The page prefers the API's own numbers where they exist.

Shape legend: L = n_layers + 1 hidden-state rows, T tokens, K probe columns (the startup vectors,
then the monitors, as `pvjax.serve.terms.Catalog.probes`).

The forward is padded on the left to a multiple of `_WIDTH` tokens, so each width compiles once,
on first use, whatever the request's terms (the server's own programs are untouched: its
no-compile guarantee is for `/v1`).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from pvjax.serve import schemas
from pvjax.serve.schemas import ApiError

_WIDTH = 64  # the forward's token widths are multiples of this
_FIELDS = {"messages", "steer", "ablate", "answer_ids"}


def index_html() -> str:
    return resources.files("pvjax.serve").joinpath("static/index.html").read_text("utf-8")


def routes(service, authorize, read_json) -> list[Route]:
    """The page's routes; `authorize(request)` and `read_json(request, limit)` are the API's own
    (`pvjax.serve.app`), so the page route takes the same key and body limit."""
    html = index_html()
    probes_LKD = service.catalog.probes(service.model.n_layers + 1, service.model.hidden_size)

    async def index(request: HttpRequest) -> Response:
        return HTMLResponse(html)

    async def tokens(request: HttpRequest) -> Response:
        authorize(request)
        body = await read_json(request, service.settings.max_body)
        if not isinstance(body, dict) or set(body) - _FIELDS:
            raise ApiError(400, f"/page/tokens takes an object with fields {sorted(_FIELDS)}")
        answer = body.get("answer_ids") or []
        if not isinstance(answer, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in answer
        ):
            raise ApiError(400, "answer_ids must be a list of token ids", param="answer_ids")
        if any(not 0 <= i < service.model.config.vocab_size for i in answer):
            raise ApiError(400, "answer_ids holds an id outside the vocabulary", param="answer_ids")
        chat = {k: body[k] for k in ("messages", "steer", "ablate") if k in body}
        chat.update(model=service.settings.model_name, max_tokens=1)
        # the API's own checks and prompt rendering: the same refusals, the same tokens
        job = service.job(schemas.parse(chat, "chat", service.limits))
        if len(answer) > service.settings.max_new:
            raise ApiError(400, f"answer_ids holds more than {service.settings.max_new} tokens")
        out = await run_in_threadpool(_read, service, probes_LKD, job, answer)
        return JSONResponse(out)

    return [Route("/", index), Route("/page/tokens", tokens, methods=["POST"])]


def _read(service, probes_LKD, job, answer: list[int]) -> dict:
    """Token strings and projections `[T][L][K]` of `job.ids + answer`, and the monitors'
    readings at the last prompt token."""
    import pvjax
    from pvjax import interventions as ivs

    model, cat = service.model, service.catalog
    L, D = model.n_layers + 1, model.hidden_size
    ids = list(job.ids) + list(answer)
    n, P = len(ids), len(job.ids)
    T = max(n, min(-(-n // _WIDTH) * _WIDTH, model.config.max_position_embeddings))
    pad = T - n
    tokens_1T = np.zeros((1, T), np.int32)
    mask_1T = np.zeros((1, T), np.int32)
    tokens_1T[0, pad:], mask_1T[0, pad:] = ids, 1
    iv = job.row.intervention
    if iv is None:
        iv = ivs.empty(L, D)
    steer_1T = ivs.position_mask(job.row.positions, mask_1T, pad + P)
    # with a closed-loop field in any case: steered, unsteered and capped share one program
    iv = iv.with_closed_loop().with_masks(steer_1T, mask_1T.astype(np.float32))
    names = list(cat.vectors) + [f"monitor:{m}" for m in cat.monitors]
    out = {
        "prompt_tokens": P,
        "ids": ids,
        "tokens": [model.tokenizer.decode([i]) for i in ids],
        "special": sorted(set(getattr(model.tokenizer, "all_special_ids", []) or []) & set(ids)),
        "columns": names,
        "values": [],
        "monitors": [],
    }
    if probes_LKD is None:
        return out
    got = pvjax.activations(
        model, tokens_1T, attention_mask=mask_1T, intervention=iv, probes=probes_LKD
    )
    proj_TLK = np.asarray(got.projections)[:, 0, pad:, :].transpose(1, 0, 2)
    out["values"] = np.round(proj_TLK.astype(np.float64), 6).tolist()
    for name, m in cat.monitors.items():
        x = float(proj_TLK[P - 1, m.layer, cat.monitor_column(name)])
        out["monitors"].append(
            {
                "name": name,
                "layer": m.layer,
                "projection": x,
                "threshold": m.threshold,
                "flagged": bool(m.flag(x)),
            }
        )
    return out
