"""The model side of the server: the engine, its scheduler and counters, and what turns a checked
request into a job (its prompt tokens and its slot's settings) and a finished job into the
`pvjax` part of the response.

    service = Service(model, Catalog(vectors, monitors), ServeSettings(model_name="smollm2"))
    service.start()  # compiles in the engine thread; /health says 503 until it is done
"""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from typing import Any

from pvjax.engine.generate import stop_token_ids
from pvjax.engine.slots import Row, SlotEngine, SlotError
from pvjax.engine.terms import TermError
from pvjax.errors import UserError
from pvjax.serve.metrics import Metrics
from pvjax.serve.scheduler import Job, Result, Scheduler
from pvjax.serve.schemas import ApiError, Limits, Request
from pvjax.serve.terms import Catalog, applied, intervention_for


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the server takes and holds. `max_prompt` and `max_new` size the cache and the
    compiled prompt buckets; `max_batch` is the running batch."""

    model_name: str
    max_batch: int = 16
    max_prompt: int = 1024
    max_new: int = 256
    max_queue: int = 256
    max_body: int = 1 << 20  # bytes
    max_tokens_in_flight: int = 1 << 20
    request_timeout: float = 600.0  # seconds
    api_key: str | None = None
    unroll: bool = True
    prompt_widths: tuple[int, ...] | None = None  # compiled prompt widths (None: every bucket)
    mesh: Any = None  # a ("data", "model") jax Mesh (`--mesh`), or None: one device
    prefix_widths: tuple[int, ...] = ()  # shared prompt-prefix widths (`--share-prefix`)
    prefix_cache: int = 8  # shared prefixes kept (least recently used leaves first)


class Service:
    def __init__(self, model, catalog: Catalog, settings: ServeSettings):
        self.model, self.catalog, self.settings = model, catalog, settings
        L, D = model.n_layers + 1, model.hidden_size
        eos = stop_token_ids(model)
        self.engine = SlotEngine(
            model,
            max_batch=settings.max_batch,
            max_prompt=settings.max_prompt,
            max_new=settings.max_new,
            probes=catalog.probes(L, D),
            unroll=settings.unroll,
            pad_id=eos[0] if eos else 0,
            stop_ids=eos,
            widths=settings.prompt_widths,
            mesh=settings.mesh,
            prefix_widths=settings.prefix_widths,
            prefix_cache=settings.prefix_cache,
        )
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            self.engine,
            model.tokenizer,
            eos,
            self.metrics,
            max_queue=settings.max_queue,
            max_tokens_in_flight=settings.max_tokens_in_flight,
        )
        self.limits = Limits(
            model=settings.model_name,
            n_rows=L,
            max_new=settings.max_new,
            vectors=tuple(catalog.vectors),
            monitors=tuple(catalog.monitors),
        )

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def job(self, req: Request) -> Job:
        """The request's prompt tokens and slot settings, checked; raises `ApiError` (400)."""
        tok = self.model.tokenizer
        try:
            if req.kind == "chat":
                text = self.model.chat_text(list(req.messages))
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(req.prompt, add_special_tokens=True)["input_ids"]
        except Exception as e:  # a template that refuses the conversation
            raise ApiError(400, f"the prompt cannot be rendered: {e}", param="messages") from None
        if len(ids) > self.settings.max_prompt:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server takes at most "
                f"{self.settings.max_prompt}",
                param="messages" if req.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        seed = secrets.randbelow(2**32) if req.seed is None else req.seed
        try:
            row = Row(
                intervention=intervention_for(req.steering, self.catalog, self.model),
                positions=req.steering.positions,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=seed,
                min_new=req.min_tokens,
            )
            ids = self.engine.check(ids, row, req.max_tokens)
        except TermError as e:  # a term the model's shape refuses (check_terms)
            raise ApiError(400, str(e), param="steer") from None
        except (UserError, SlotError) as e:
            raise ApiError(400, str(e)) from None
        kind = "chatcmpl" if req.kind == "chat" else "cmpl"
        return Job(id=f"{kind}-{uuid.uuid4().hex[:24]}", ids=ids, row=row, request=req)

    def extra(self, job: Job, result: Result) -> dict:
        """The response's `pvjax` object: the terms as applied, the monitors' readings at the last
        prompt token, and per-token projections when asked."""
        s, cat = job.request.steering, self.catalog
        pp = result.prompt_projections
        steer = []
        for t in s.steer:
            d = applied(t, s.positions)
            if t.when is not None:  # whether the condition held on this prompt
                d["when"]["held"] = job.gate > 0
            if pp is not None:
                col = cat.vector_column(t.vector)
                last = [float(pp[layer, col]) for layer in t.layers]
                d["prompt_last_projection"] = last[0] if len(last) == 1 else last
            steer.append(d)
        out = {"seed": job.row.seed, "steer": steer, "ablate": [a.applied() for a in s.ablate]}
        readings = []
        for name in s.monitors:
            m = cat.monitors[name]
            x = float(pp[m.layer, cat.monitor_column(name)])
            readings.append(
                {
                    "name": name,
                    "layer": m.layer,
                    "projection": x,
                    "threshold": m.threshold,
                    "flagged": bool(m.flag(x)),
                }
            )
            self.metrics.monitor(name, bool(m.flag(x)))
        if readings:
            out["monitor"] = readings[0]
            out["monitors"] = readings
        if s.projections and result.projections is not None:
            series = [
                ("vector", t.vector, layer, cat.vector_column(t.vector))
                for t in s.steer
                for layer in t.layers
            ]
            series += [
                ("monitor", n, cat.monitors[n].layer, cat.monitor_column(n)) for n in s.monitors
            ]
            out["projections"] = [
                {
                    kind: name,
                    "layer": layer,
                    "values": [float(p[layer, col]) for p in result.projections],
                }
                for kind, name, layer, col in series
            ]
            out["token_ids"] = list(result.tokens)  # the page's /page/tokens reads them back
        return out
