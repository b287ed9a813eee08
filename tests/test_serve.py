"""`pvjax serve` with the official `openai` client against a server on a free loopback port (uvicorn
in a thread of this process, one server for the module), on the embedded model with short answers:
served greedy answers equal `generate`'s, requests batched together equal their solo answers, a
stream joins to the plain answer, monitor readings equal the library's, bad requests get their
status while the server goes on, a bounded load test loses nothing and compiles nothing."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from loopback import monitor_on, random_unit_rows, serving  # noqa: E402

from pvjax import interventions as ivs  # noqa: E402
from pvjax.engine import rows  # noqa: E402
from pvjax.engine import terms as T  # noqa: E402
from pvjax.engine.generate import SamplingParams, generate  # noqa: E402
from pvjax.methods import monitoring as mon  # noqa: E402
from pvjax.serve.app import build_app  # noqa: E402
from pvjax.serve.service import ServeSettings, Service  # noqa: E402
from pvjax.serve.terms import Catalog  # noqa: E402

pytestmark = pytest.mark.slow

N_LOAD = 32  # requests in the load test
NEW = 16  # new tokens per answer: short, so the module stays fast
LAYER = 20
COEF = 8.0
KEY = "test-key"
MODEL = "smollm2"
QUESTION = "What should I do on a rainy afternoon?"
QUESTIONS = [QUESTION, "Why is the sky blue?", "Give me advice on asking for a raise."]


@dataclasses.dataclass
class Served:
    model: object
    service: Service
    url: str
    vectors: dict
    monitor: object

    def client(self, **kw):
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=900, **kw
        )


@pytest.fixture(scope="module")
def served(smollm2):
    model = smollm2
    L, D = model.n_layers + 1, model.hidden_size
    rng = np.random.default_rng(0)
    vectors = {"a": random_unit_rows(rng, L, D), "b": random_unit_rows(rng, L, D)}
    monitor = monitor_on(model, vectors["a"], LAYER)
    settings = ServeSettings(
        model_name=MODEL,
        max_batch=8,
        max_prompt=48,
        prompt_widths=(16, 48),  # the prompts here: two compiles instead of four
        prefix_widths=(24,),  # the chat template's 24 tokens, shared by every question here
        max_new=NEW,
        max_queue=64,
        request_timeout=900.0,
        api_key=KEY,
    )
    service = Service(model, Catalog(vectors, {"evil": monitor}), settings)
    with serving(service, build_app(service)) as url:
        print("warm-up:", {k: round(v, 1) for k, v in service.scheduler.warmup.items()})
        yield Served(model, service, url, vectors, monitor)


def ask(client, content=QUESTION, **kw):
    kw.setdefault("max_tokens", NEW)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


def steer(vector, coef, layer=LAYER, positions="response"):
    return {"steer": [{"vector": vector, "layer": layer, "coef": coef, "positions": positions}]}


def extra(resp) -> dict:
    return resp.model_extra["pvjax"]


SOLO: dict = {}  # (question, vector, coef) -> served text, run alone


def solo(client, question, vector, coef):
    key = (question, vector, coef)
    if key not in SOLO:
        SOLO[key] = ask(client, question, extra_body=steer(vector, coef)).choices[0].message.content
    return SOLO[key]


def test_greedy_answers_equal_generate(served):
    model, client = served.model, served.client()
    L, D = model.n_layers + 1, model.hidden_size
    texts = {}
    for coef in (0.0, COEF, -COEF):
        resp = ask(client, extra_body=steer("a", coef))
        iv = ivs.build(L, D, steer=[(served.vectors["a"], LAYER, coef)])
        want = generate(
            model,
            [QUESTION],
            intervention=iv,
            positions="response",
            sampling=SamplingParams(max_new_tokens=NEW),
        )
        assert resp.choices[0].message.content == want.texts[0], coef
        reason = {"eos": "stop", "stop": "stop", "length": "length"}[want.finish_reasons[0]]
        assert resp.choices[0].finish_reason == reason
        assert resp.usage.completion_tokens == len(want.tokens[0])
        assert resp.usage.prompt_tokens == len(want.prompt_tokens[0])
        applied = dict(extra(resp)["steer"][0])
        assert math.isfinite(applied.pop("prompt_last_projection"))
        assert applied == {"vector": "a", "layer": LAYER, "coef": coef, "positions": "response"}
        texts[coef] = resp.choices[0].message.content
        SOLO[QUESTION, "a", coef] = texts[coef]
    assert texts[COEF] != texts[0.0] or texts[-COEF] != texts[0.0], "steering changed nothing"
    unsteered = ask(client)  # no steer field at all: the identity row
    assert unsteered.choices[0].message.content == texts[0.0]


def test_engine_terms_composed_equal_generate(served):
    """A request's terms are `pvjax.engine.terms` terms: several layers, two terms meeting at a
    layer (summed) and `without` (a startup vector's name) give `generate`'s greedy answer."""
    model, client = served.model, served.client()
    items = [
        {"vector": "a", "layers": [LAYER - 1, LAYER], "coef": COEF / 2, "without": "b"},
        {"vector": "b", "layer": LAYER, "coef": -COEF / 2, "mode": "add"},
    ]
    resp = ask(client, extra_body={"steer": items})
    arrays = {"a": served.vectors["a"], "b": served.vectors["b"]}
    rows = [[T.from_dict({**x, "vector": arrays[x["vector"]]}) for x in items]]
    rows[0][0] = dataclasses.replace(rows[0][0], without=arrays["b"])
    want = generate(
        model,
        [QUESTION],
        intervention=T.build_intervention(rows, model),
        positions="response",
        sampling=SamplingParams(max_new_tokens=NEW),
    )
    assert resp.choices[0].message.content == want.texts[0]
    first, second = extra(resp)["steer"]
    assert first["layers"] == [LAYER - 1, LAYER] and first["without"] == "b"
    assert len(first["prompt_last_projection"]) == 2
    assert second["layer"] == LAYER and math.isfinite(second["prompt_last_projection"])


COND_LAYER = 10


def test_rescale_rotate_and_conditions_batched_equal_generate(served):
    """Rescale, rotate and conditional terms (`when`) are data of a row: sent together (one
    batch, beside a plain addition), each served greedy answer equals `generate`'s with the same
    terms, the condition holds on one prompt and not on the other, and nothing compiles."""
    model, client, sch = served.model, served.client(), served.service.scheduler
    compiles = sch.compiles_since_ready()
    # The condition reads vector b at COND_LAYER on the last prompt token: the served reading
    # there (a coefficient-0 term) sets a threshold between two of the questions.
    reading = {
        q: extra(ask(client, q, max_tokens=1, extra_body=steer("b", 0.0, COND_LAYER)))["steer"][0][
            "prompt_last_projection"
        ]
        for q in QUESTIONS
    }
    hi, lo = max(reading, key=reading.get), min(reading, key=reading.get)
    assert reading[hi] - reading[lo] > 0.01, reading  # far above float error (1e-5)
    when = {"vector": "b", "layer": COND_LAYER, "threshold": (reading[hi] + reading[lo]) / 2}
    conditional = {"vector": "a", "layers": [LAYER - 4, LAYER - 2, LAYER], "coef": 2 * COEF}
    conditional["when"] = when
    cases = [  # (question, terms)
        (QUESTION, [{"vector": "a", "layer": LAYER, "coef": COEF, "mode": "rescale"}]),
        (QUESTION, [{"vector": "a", "layers": [LAYER - 2, LAYER], "angle": 1.2}]),
        (hi, [conditional]),
        (lo, [conditional]),
        (QUESTION, [{"vector": "b", "layer": LAYER, "coef": -4.0}]),
    ]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: ask(client, c[0], extra_body={"steer": c[1]}), cases))
    arrays = {"a": served.vectors["a"], "b": served.vectors["b"]}

    def arrayed(t):
        t = T.from_dict({**t, "vector": arrays[t["vector"]]})
        if t.when is None:
            return t
        return dataclasses.replace(t, when=dataclasses.replace(t.when, vector=arrays["b"]))

    iv = T.build_intervention([[arrayed(t) for t in terms] for _, terms in cases], model)
    for i, (question, terms) in enumerate(cases):
        want = generate(
            model,
            [question],
            intervention=rows.take(iv, [i]),
            positions="response",
            sampling=SamplingParams(max_new_tokens=NEW),
        )
        assert got[i].choices[0].message.content == want.texts[0], (i, terms)
    applied = [extra(r)["steer"][0] for r in got]
    assert applied[0]["mode"] == "rescale" and applied[1]["angle"] == 1.2
    assert applied[2]["when"]["held"] is True and applied[3]["when"]["held"] is False
    # the shut gate is bit for bit unsteered; the open one steers
    assert got[3].choices[0].message.content == ask(client, lo).choices[0].message.content
    assert got[2].choices[0].message.content != ask(client, hi).choices[0].message.content
    assert sch.compiles_since_ready() == compiles


def _metric(served, name) -> float:
    r = httpx.get(f"{served.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    line = next(x for x in r.text.splitlines() if x.startswith(f"pvjax_{name} "))
    return float(line.split()[1])


def test_shared_prefixes_change_no_answer_and_show_in_metrics(served):
    """The chat template's first 24 tokens (the server's `prefix_widths`) run once and are reused
    by every later question: the same texts as with sharing off, for unsteered, `response`-
    steered, rescaled and conditional requests sent together (an `all`-steered one runs whole),
    and /metrics counts the prefix tokens reused."""
    client, engine = served.client(), served.service.engine
    when = {"vector": "b", "layer": COND_LAYER, "threshold": -100.0}
    cases = [
        (QUESTIONS[0], {}),
        (QUESTIONS[1], steer("a", COEF)),
        (
            QUESTIONS[2],
            {"steer": [{"vector": "a", "layer": LAYER, "coef": 4.0, "mode": "rescale"}]},
        ),
        (QUESTIONS[0], {"steer": [{"vector": "b", "layer": LAYER, "coef": COEF, "when": when}]}),
        (QUESTIONS[1], steer("b", 4.0, positions="all")),
    ]

    def answers():
        with cf.ThreadPoolExecutor(len(cases)) as pool:
            return list(
                pool.map(
                    lambda c: ask(client, c[0], extra_body=c[1]).choices[0].message.content, cases
                )
            )

    reused, hits = _metric(served, "prefix_tokens_reused_total"), engine.prefix_hits
    shared = answers()
    assert engine.prefix_hits - hits >= 3  # at most the first of the four shareable ones misses
    assert _metric(served, "prefix_tokens_reused_total") - reused == 24 * (
        engine.prefix_hits - hits
    )
    assert _metric(served, "prefix_cache_entries") >= 1
    widths, engine.prefix_widths = engine.prefix_widths, ()
    try:
        whole = answers()
    finally:
        engine.prefix_widths = widths
    assert shared == whole
    assert len(set(shared)) > 2


def test_eight_settings_batched_equal_their_solo_answers(served):
    client = served.client()
    settings = [("a", c) for c in (-8.0, -4.0, 4.0, 8.0)] + [
        ("b", c) for c in (-8.0, -4.0, 4.0, 8.0)
    ]
    want = [solo(client, QUESTION, v, c) for v, c in settings]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda s: ask(client, extra_body=steer(*s)).choices[0].message.content, settings
            )
        )
    assert got == want
    assert len(set(want)) > 2
    # a sampled request with a seed gives the same text alone and beside others
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    alone = ask(client, **kw).choices[0].message.content
    with cf.ThreadPoolExecutor(4) as pool:
        crowd = [pool.submit(ask, client, q, **kw) for q in QUESTIONS[1:]]
        mine = ask(client, **kw).choices[0].message.content
        [f.result() for f in crowd]
    assert mine == alone


def test_a_stream_joins_to_the_plain_answer(served):
    client = served.client()
    plain = ask(client, extra_body=steer("b", 4.0))
    chunks = list(
        ask(client, extra_body=steer("b", 4.0), stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finals[0].model_extra["pvjax"]["steer"][0]["coef"] == 4.0
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # plain completions stream too
    raw = served.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    parts = served.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == raw.choices[0].text


def test_completions_equal_generate_on_raw_text(served):
    model = served.model
    resp = served.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=0
    )
    want = generate(
        model, ["The capital of France is"], chat=False, sampling=SamplingParams(max_new_tokens=8)
    )
    assert resp.choices[0].text == want.texts[0]
    assert len(resp.choices[0].logprobs.token_logprobs) == resp.usage.completion_tokens
    assert all(lp <= 0 for lp in resp.choices[0].logprobs.token_logprobs)


def test_monitor_readings_equal_the_librarys(served):
    model, m = served.model, served.monitor
    resp = ask(
        served.client(), extra_body={"monitor": True, "projections": True, **steer("a", 0.0)}
    )
    reading = extra(resp)["monitor"]
    ids = mon.prompt_ids(model, [QUESTION])
    want = float(m.projections(model, ids)[0])
    assert reading["name"] == "evil" and reading["layer"] == LAYER
    assert reading["projection"] == pytest.approx(want, abs=1e-5, rel=1e-5)
    assert reading["flagged"] == (reading["projection"] >= m.threshold)
    series = {(s.get("vector") or s.get("monitor")): s for s in extra(resp)["projections"]}
    assert len(series["a"]["values"]) == resp.usage.completion_tokens
    # the monitor's direction is vector a's unit row at its layer: the same per-token series
    np.testing.assert_allclose(series["evil"]["values"], series["a"]["values"], atol=1e-4)
    assert extra(resp)["steer"][0]["prompt_last_projection"] == pytest.approx(want, abs=1e-4)


WHEN = {"vector": "a", "layer": 1, "threshold": 0.0}
BAD = [
    ({"steer": [{"vector": "nope", "layer": LAYER, "coef": 1}]}, 400, "unknown vector"),
    ({"steer": [{"vector": "a", "layer": 99, "coef": 1}]}, 400, "steer[0]: layer 99"),
    ({"steer": [{"vector": "a", "layer": LAYER, "coef": math.nan}]}, 400, "finite"),
    ({"steer": [{"vector": "a", "layer": LAYER, "coef": math.inf}]}, 400, "finite"),
    ({"steer": [{"vector": "a", "layer": LAYER, "coef": 1, "positions": "x"}]}, 400, "positions"),
    ({"steer": [{"vector": "a", "layer": LAYER}]}, 400, "no strength"),
    ({"steer": [{"vector": "a", "layer": LAYER, "coef": 1, "mode": "spin"}]}, 400, "mode"),
    ({"steer": [{"vector": "a", "layer": LAYER, "angle": 4.0}]}, 400, "outside [-pi, pi]"),
    ({"steer": [{"vector": "a", "layer": LAYER, "coef": 1, "mode": "rotate"}]}, 400, "angle="),
    (
        {"steer": [{"vector": "a", "layer": LAYER, "coef": 1, "when": {**WHEN, "vector": "x"}}]},
        400,
        "steer[0].when.vector: unknown vector",
    ),
    (
        {"steer": [{"vector": "a", "layer": 0, "coef": 1, "when": WHEN}]},
        400,
        "before its condition",
    ),
    ({"ablate": [{"vector": "a", "layers": [-1]}]}, 400, "layers[0]"),
    ({"max_tokens": NEW + 1}, 400, "cap"),
    ({"n": 2}, 400, "n = 1"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "tokens"),
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"temperature": -1}, 400, "temperature"),
    ({"monitor": "nobody"}, 400, "unknown monitors"),
    ({"stream": "yes"}, 400, "stream"),
    ({"frobnicate": 1}, 400, "unrecognized"),
]


def test_bad_requests_get_their_status_and_the_server_goes_on(served):
    url = f"{served.url}/v1/chat/completions"
    good = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    auth = {"Authorization": f"Bearer {KEY}"}
    for change, status, words in BAD:
        body = json.dumps({**good, **change})  # allow_nan: NaN and Infinity literals go out
        r = httpx.post(
            url, content=body, headers={**auth, "content-type": "application/json"}, timeout=120
        )
        assert r.status_code == status, (change, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"], (change, err)
    r = httpx.post(url, content=b"{not json", headers=auth, timeout=120)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    old = served.service.settings
    served.service.settings = dataclasses.replace(old, max_body=1000)
    try:
        r = httpx.post(url, content=b"x" * 5000, headers=auth, timeout=120)
        assert r.status_code == 413
    finally:
        served.service.settings = old
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, json=good, headers=headers, timeout=120)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(url, json=good, headers=auth, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_queue_full_timeout_and_disconnect(served):
    sch, client = served.service.scheduler, served.client()
    sch.max_queue = 0
    try:
        with pytest.raises(openai.RateLimitError):
            ask(client, max_tokens=4)
    finally:
        sch.max_queue = 64
    old = served.service.settings
    served.service.settings = dataclasses.replace(old, request_timeout=0.05)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            ask(client)
        assert e.value.status_code == 408
    finally:
        served.service.settings = old
    cancelled = served.service.metrics.cancelled
    stream = ask(client, stream=True)
    next(iter(stream))  # the role chunk: the request is queued or running
    stream.close()
    deadline = time.monotonic() + 30
    while (sch.running or sch.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sch.running and not sch.waiting
    assert served.service.metrics.cancelled > cancelled


def test_load_loses_nothing_and_compiles_nothing(served):
    """N_LOAD requests from 16 concurrent clients (the issue's 200 are cut to 32 to keep the
    module short on a 2-core CPU): mixed steering, a third streamed, every sixth cancelled early."""
    client, sch = served.client(), served.service.scheduler
    compiles = sch.compiles_since_ready()
    shifts = served.service.engine.shifts
    settings = [("a", 0.0), ("a", COEF), ("b", -4.0), ("a", -COEF)]

    def one(i):
        question = QUESTIONS[i % len(QUESTIONS)]
        vector, coef = settings[i % len(settings)]
        body = steer(vector, coef, positions=("response", "all", "prompt")[i % 3])
        body["monitor"] = i % 2 == 0
        t = time.monotonic()
        if i % 6 == 5:  # cancelled: a stream dropped after its first chunk
            s = ask(client, question, extra_body=body, stream=True)
            next(iter(s))
            s.close()
            return i, "cancelled", None, time.monotonic() - t
        if i % 3 == 1:
            chunks = list(ask(client, question, extra_body=body, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            ids = {c.id for c in chunks}
            assert len(ids) == 1 and chunks[-1].choices[0].finish_reason
            return i, text, ids.pop(), time.monotonic() - t
        r = ask(client, question, extra_body=body)
        assert ("monitor" in extra(r)) == body["monitor"]
        return i, r.choices[0].message.content, r.id, time.monotonic() - t

    rss0 = _rss_mb()
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(N_LOAD)))
    wall = time.monotonic() - t0
    done = [r for r in results if r[1] != "cancelled"]
    n_cancel = len([i for i in range(N_LOAD) if i % 6 == 5])
    assert len(results) == N_LOAD and len(done) == N_LOAD - n_cancel
    assert len({r[2] for r in done}) == len(done)  # none lost, none duplicated
    by_request = {}
    for i, text, _, _ in done:  # the same request (question, setting, positions) -> the same text
        key = (i % len(QUESTIONS), i % len(settings), i % 3)
        by_request.setdefault(key, set()).add(text)
    assert all(len(t) == 1 for t in by_request.values())
    lat = sorted(r[3] for r in done)
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    deadline = time.monotonic() + 30
    while (sch.running or sch.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sch.running and not sch.waiting
    assert sch.compiles_since_ready() == compiles == 0
    print(
        f"load: {len(done)} answers + {n_cancel} cancelled in {wall:.1f} s, p50 {p50:.2f} s, "
        f"p99 {p99:.2f} s, cache shifts {served.service.engine.shifts - shifts}, "
        f"resident memory {rss0:.0f} -> {_rss_mb():.0f} MB"
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_metrics_page(served):
    r = httpx.get(f"{served.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "pvjax_requests_total{",
        "pvjax_generation_tokens_total ",
        "pvjax_queue_length ",
        "pvjax_batch_occupancy ",
        'pvjax_monitored_total{monitor="evil"}',
        "pvjax_compiles_after_warmup 0",
    ):
        assert name in text, name
    assert httpx.get(f"{served.url}/metrics", timeout=120).status_code == 401


def test_warming_up_answers_503(smollm2):
    from starlette.testclient import TestClient

    settings = ServeSettings(model_name=MODEL, max_batch=1, max_prompt=16, max_new=4)
    service = Service(smollm2, Catalog({}, {}), settings)
    with TestClient(build_app(service)) as c:  # never started: still warming up
        assert c.get("/health").status_code == 503
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 503 and r.json()["error"]["code"] == "warming_up"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--prompt-buckets", "16,32", "--max-prompt-tokens", "64"], "reach --max-prompt-tokens"),
        (["--prompt-buckets", "16,x"], "integers"),
        (["--vector", "=v.safetensors"], "NAME=FILE"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--mesh", "data=x"], "expected data=D,model=M"),
        (["--share-prefix", "2048"], "--share-prefix widths must be in"),
        (["--prefix-cache", "0"], "--prefix-cache must be >= 1"),
    ],
)
def test_cli_refuses_bad_flags_before_loading(argv, words, capsys):
    from pvjax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_server_on_a_mesh_answers_as_one_device(tmp_path, tokenizer):
    """`pvjax serve` on data=2 x model=4 (8 fake host devices, in a subprocess, a tiny model):
    an addition, a rescale, a rotation, a condition that holds and one that does not, and an
    unsteered request, sent together, give the single-device library's greedy texts; weights
    and the cache are laid over the mesh, and nothing compiles after warm-up."""
    import subprocess
    import sys
    from pathlib import Path

    from loopback import env
    from tiny_models import save_tiny

    save_tiny("llama_heads8", tmp_path, tokenizer=tokenizer)
    script = Path(__file__).with_name("sharded_serve.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["same"] == [True] * 6, res
    assert res["held"] == [True, False], res
    assert res["compiles_after_warmup"] == 0, res
    assert res["wq_devices"] == 8 and "model" in res["wq_spec"], res
    assert "data" in res["cache_spec"] and "model" in res["cache_spec"], res
