"""The server: `pvjax serve`, an OpenAI-compatible HTTP API over the slot engine
(`pvjax.engine.slots`), steering and monitoring each request with continuous batching.

`schemas` (requests checked whole, OpenAI error objects; each `steer` item a
`pvjax.engine.terms` term), `terms` (ablation terms, the startup vectors and monitors, and the one
conversion of a request's terms to an intervention row), `scheduler` (the engine
thread: admission into free slots, stops, streaming), `service` (the model side: a request into a
job, a finished job into the response's `pvjax` object), `metrics` (Prometheus counters), `app`
(the Starlette routes, server-sent events, the API key).

May import: `engine`, the model contract and everything below; never `studies` or the CLI, and
nothing below imports it.
"""
