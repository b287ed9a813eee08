"""OpenAIChat and CachedBackend against a real loopback HTTP server (tests/openai_server.py)."""

from __future__ import annotations

import threading
import time

import pytest
from openai_server import OpenAIServer

from pvjax.llm import CachedBackend, ChatCache, ChatRequest, ChatResult, LLMError, OpenAIChat


def client(srv, **kw):
    kw.setdefault("api_key", "")
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    kw.setdefault("timeout", 5.0)
    return OpenAIChat("test-model", base_url=srv.base_url, **kw)


def test_cache_key_covers_every_field_and_backend():
    r = ChatRequest.user("hi", system="sys", max_tokens=3)
    assert r.messages == (("system", "sys"), ("user", "hi"))
    keys = {
        r.cache_key("a"),
        r.cache_key("b"),
        ChatRequest.user("hi", max_tokens=3).cache_key("a"),
        ChatRequest.user("hi", system="sys", max_tokens=4).cache_key("a"),
        ChatRequest.user("hi", system="sys", max_tokens=3, seed=1).cache_key("a"),
        ChatRequest.user("hi", system="sys", max_tokens=3, top_logprobs=5).cache_key("a"),
    }
    assert len(keys) == 6
    assert r.cache_key("a") == ChatRequest(
        messages=[["system", "sys"], ["user", "hi"]], max_tokens=3
    ).cache_key("a")


def test_payload_logprobs_and_auth_header():
    with OpenAIServer(lambda req: ("7", [("7", -0.1), (" 8", -2.5)])) as srv:
        res = client(srv, api_key="sk-secret", concurrency=1).chat_many(
            [
                ChatRequest.user("q", system="s", top_logprobs=2, seed=3),
                ChatRequest.user("plain", max_tokens=9, temperature=0.7),
            ]
        )
        with_lp, plain = srv.bodies()
        first_headers = srv.requests[0]["headers"]
    assert srv.requests[0]["path"] == "/v1/chat/completions"
    assert with_lp == {
        "model": "test-model",
        "max_tokens": 1,
        "temperature": 0.0,
        "seed": 3,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert plain == {
        "model": "test-model",
        "max_tokens": 9,
        "temperature": 0.7,
        "messages": [{"role": "user", "content": "plain"}],
    }
    assert first_headers["Authorization"] == "Bearer sk-secret"
    assert res[0] == ChatResult("7", {"7": -0.1, " 8": -2.5})
    assert res[1] == ChatResult("7", None)


def test_no_key_means_no_authorization_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAIServer() as srv:
        OpenAIChat("m", base_url=srv.base_url).chat_many([ChatRequest.user("x")])
        assert "Authorization" not in srv.requests[0]["headers"]


def test_base_url_and_key_from_environment(monkeypatch):
    with OpenAIServer() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url + "/")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        chat = OpenAIChat("m")
        assert chat.backend_id == f"openai:{srv.base_url}:m"
        assert chat.chat_many([ChatRequest.user("x")])[0].text == "x"
        assert srv.requests[0]["headers"]["Authorization"] == "Bearer sk-env"


def test_order_preserved_and_concurrency_bounded():
    # Later requests answer faster, so completion order is the reverse of request order.
    def responder(req):
        i = int(req["messages"][0]["content"])
        time.sleep(0.002 * (24 - i))
        return str(i), []

    with OpenAIServer(responder) as srv:
        srv.slow = 0.05
        res = client(srv, concurrency=4).chat_many([ChatRequest.user(str(i)) for i in range(24)])
    assert [r.text for r in res] == [str(i) for i in range(24)]
    assert 1 < srv.max_in_flight <= 4
    assert srv.calls == 24


def test_on_result_called_for_each_request():
    seen = {}
    with OpenAIServer() as srv:
        client(srv).chat_many(
            [ChatRequest.user(f"m{i}") for i in range(5)],
            on_result=lambda i, r: seen.__setitem__(i, r.text),
        )
    assert seen == {i: f"m{i}" for i in range(5)}


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_transient_failures(status):
    with OpenAIServer() as srv:
        srv.fail_first, srv.fail_status = 3, status
        res = client(srv, concurrency=1).chat_many([ChatRequest.user("hello")])
    assert res[0].text == "hello"
    assert srv.calls == 4


def test_retry_after_is_honoured():
    with OpenAIServer() as srv:
        # A 10 s backoff would blow the time limit: only Retry-After: 0 keeps this fast.
        srv.fail_first, srv.fail_status, srv.retry_after = 2, 429, "0"
        t0 = time.monotonic()
        assert (
            client(srv, backoff=10.0, max_backoff=10.0).chat_many([ChatRequest.user("a")])[0].text
            == "a"
        )
        assert time.monotonic() - t0 < 2.0
        srv.calls, srv.fail_first, srv.retry_after = 0, 1, "1"
        t0 = time.monotonic()
        assert client(srv).chat_many([ChatRequest.user("b")])[0].text == "b"
        assert time.monotonic() - t0 >= 0.9


def test_gives_up_after_max_retries():
    with OpenAIServer() as srv:
        srv.fail_first = 100
        with pytest.raises(LLMError) as e:
            client(srv, max_retries=2).chat_many([ChatRequest.user("a")])
    assert srv.calls == 3
    assert (
        srv.base_url in str(e.value)
        and "HTTP 500" in str(e.value)
        and "injected failure 3" in str(e.value)
    )


def test_malformed_body_retried_then_error():
    with OpenAIServer() as srv:
        srv.malformed = True
        with pytest.raises(LLMError, match="unparseable"):
            client(srv, max_retries=1).chat_many([ChatRequest.user("a")])
    assert srv.calls == 2


def test_401_fails_at_once_with_server_message():
    with OpenAIServer() as srv:
        srv.unauthorized = True
        with pytest.raises(LLMError) as e:
            client(srv, max_retries=5).chat_many([ChatRequest.user(str(i)) for i in range(3)])
    assert "401" in str(e.value) and "Incorrect API key provided" in str(e.value)
    assert srv.calls <= 3  # no request retried; queued ones may be cancelled


def test_timeout_is_retried_then_error():
    with OpenAIServer() as srv:
        srv.slow = 1.0
        t0 = time.monotonic()
        with pytest.raises(LLMError, match="attempts"):
            client(srv, timeout=0.2, max_retries=1).chat_many([ChatRequest.user("a")])
        assert time.monotonic() - t0 < 1.5
        assert srv.calls == 2


def test_connection_refused_is_an_llm_error():
    with OpenAIServer() as srv:
        url = srv.base_url
    with pytest.raises(LLMError, match="after 2 attempts"):
        OpenAIChat("m", base_url=url, backoff=0.01, max_retries=1).chat_many(
            [ChatRequest.user("a")]
        )


def test_cached_backend_sends_only_misses(tmp_path):
    path = tmp_path / "sub" / "llm.sqlite"
    reqs = [ChatRequest.user(f"q{i}", top_logprobs=3) for i in range(6)]
    with OpenAIServer(lambda r: (r["messages"][0]["content"], [("1", -0.5)])) as srv:
        with ChatCache(path) as cache:
            backend = CachedBackend(client(srv), cache)
            first = backend.chat_many(reqs)
            assert srv.calls == 6 and len(cache) == 6
            assert backend.chat_many(reqs) == first
            assert srv.calls == 6
            more = reqs[:3] + [ChatRequest.user("new", top_logprobs=3)] * 2
            res = backend.chat_many(more)
            assert srv.calls == 7  # the duplicate new request is sent once
            assert [r.text for r in res] == ["q0", "q1", "q2", "new", "new"]
        with ChatCache(path) as reopened:
            again = CachedBackend(client(srv), reopened).chat_many(reqs)
        assert again == first and srv.calls == 7
        assert first[0].top_logprobs == {"1": -0.5}
        # The key includes the backend identity: another model is a miss.
        with ChatCache(path) as cache:
            CachedBackend(OpenAIChat("other", base_url=srv.base_url, api_key=""), cache).chat_many(
                reqs[:1]
            )
        assert srv.calls == 8


def test_cache_keeps_results_of_a_failed_batch(tmp_path):
    # The request for "boom" fails for good; the results that arrived before it must be cached.
    def responder(req):
        text = req["messages"][0]["content"]
        if text == "boom":
            raise RuntimeError("scripted failure")
        return text, []

    ok = [ChatRequest.user(f"ok{i}") for i in range(4)]
    with OpenAIServer(responder) as srv, ChatCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(LLMError, match="scripted failure"):
            CachedBackend(client(srv, concurrency=1, max_retries=0), cache).chat_many(
                ok + [ChatRequest.user("boom")]
            )
        assert len(cache) == 4
        assert [r.text for r in CachedBackend(client(srv), cache).chat_many(ok)] == [
            "ok0",
            "ok1",
            "ok2",
            "ok3",
        ]
        assert srv.calls == 5


def test_cache_from_many_threads(tmp_path):
    with ChatCache(tmp_path / "t.sqlite") as cache:

        def work(t):
            for i in range(50):
                cache.put(f"{t}-{i}", ChatResult(f"v{t}{i}", {"1": -0.1}))
                assert cache.get(f"{t}-{i}").text == f"v{t}{i}"

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(cache) == 200
        assert cache.get("missing") is None
