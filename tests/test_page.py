"""The page of `pvjax serve` (`GET /`) in a real browser: headless Debian chromium driven by
selenium against a server on a free loopback port (uvicorn in a thread of this process), on the
embedded model with short answers. A prompt is typed, a steering term added, the answers (unsteered
beside steered) streamed; the page must show the API's own text, per-token projections and monitor
verdict for the same request, show the server's error for a bad term and stay usable after it.

`PVJAX_SCREENSHOT=1` saves the page to docs/img/serve_page.png (docs/serving.md shows it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from loopback import monitor_on, random_unit_rows, serving  # noqa: E402

from pvjax.serve.app import build_app  # noqa: E402
from pvjax.serve.service import ServeSettings, Service  # noqa: E402
from pvjax.serve.terms import Catalog  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NEW = 12  # new tokens per answer: short, so the browser test stays under a minute once warm
LAYER = 20
COEF = 8.0
MODEL = "smollm2"
QUESTION = "What should I do on a rainy afternoon?"
TOL = 1e-4


@pytest.fixture(scope="module")
def served(smollm2):
    """`(service, url)`: vectors `a` and `b`, and a monitor `evil` reading `a` at `LAYER` (so the
    API returns `a`'s projections at `LAYER` for unsteered requests too)."""
    model = smollm2
    L, D = model.n_layers + 1, model.hidden_size
    rng = np.random.default_rng(0)
    vectors = {"a": random_unit_rows(rng, L, D), "b": random_unit_rows(rng, L, D)}
    settings = ServeSettings(
        model_name=MODEL,
        max_batch=2,
        max_prompt=64,
        prompt_widths=(64,),  # one prefill program: a shorter warm-up
        max_new=NEW,
        request_timeout=300.0,
    )
    service = Service(
        model, Catalog(vectors, {"evil": monitor_on(model, vectors["a"], LAYER)}), settings
    )
    with serving(service, build_app(service)) as url:
        yield service, url


ANSWERS: dict = {}  # (question, layer of the term or None) -> the API's answer, asked once


def answer(url, question, layer=None):
    key = (question, layer)
    if key not in ANSWERS:
        ANSWERS[key] = api(url, question, [] if layer is None else [term(layer)]).json()
    return ANSWERS[key]


def api(url, question, steer, **kw):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": NEW,
        "temperature": 0,
        "seed": 0,
        "projections": True,
        "monitor": True,
        "steer": steer,
        **kw,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def term(layer=LAYER, coef=COEF):
    return {"vector": "a", "layer": layer, "coef": coef, "positions": "response"}


def test_page_is_served_and_no_ui_leaves_it_out(served):
    service, url = served
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "<title>pvjax serve</title>" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing from outside
    from starlette.testclient import TestClient

    with TestClient(build_app(service, ui=False)) as client:
        assert client.get("/").status_code == 404
        assert client.post("/page/tokens", json={}).status_code == 404


def test_page_tokens_agree_with_the_api(served):
    """The page's forward over prompt + answer reads what generation read: the API's per-token
    series and its last-prompt-token projection, within `TOL`."""
    _, url = served
    resp = answer(url, QUESTION, LAYER)
    px = resp["pvjax"]
    got = httpx.post(
        f"{url}/page/tokens",
        json={
            "messages": [{"role": "user", "content": QUESTION}],
            "steer": [term()],
            "answer_ids": px["token_ids"],
        },
        timeout=300,
    ).json()
    P, col = got["prompt_tokens"], got["columns"].index("a")
    assert P == resp["usage"]["prompt_tokens"]
    series = next(s for s in px["projections"] if s.get("vector") == "a")
    mine = [v[LAYER][col] for v in got["values"][P:]]
    np.testing.assert_allclose(mine, series["values"], atol=TOL, rtol=0)
    assert abs(got["values"][P - 1][LAYER][col] - px["steer"][0]["prompt_last_projection"]) < TOL
    assert abs(got["monitors"][0]["projection"] - px["monitor"]["projection"]) < TOL
    bad = httpx.post(
        f"{url}/page/tokens",
        json={"messages": [{"role": "user", "content": "hi"}], "steer": [term(layer=99)]},
        timeout=30,
    )
    assert bad.status_code == 400 and "steer[0]: layer 99" in bad.json()["error"]["message"]


def _browser():
    """A headless chromium through selenium, or a skip that says why there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ModuleNotFoundError:
        pytest.skip("no browser test: selenium is not installed (pip install '.[test]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip(
            "no browser test: chromium and chromedriver are not installed "
            "(apt-get install chromium chromium-driver; .ci/run does it where apt works)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.add_argument("--disable-dev-shm-usage")
    return webdriver.Chrome(service=DriverService(driver), options=opts)


def test_page_in_a_browser(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, url = served
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 240)
        browser.get(f"{url}/")
        wait.until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes"
        )
        find = browser.find_element

        def fill(el, value):
            el.clear()
            el.send_keys(str(value))

        fill(find(By.ID, "max-tokens"), NEW)
        fill(find(By.ID, "temperature"), 0)
        fill(find(By.ID, "seed"), 0)
        Select(find(By.ID, "shade-vector")).select_by_value("a")
        fill(find(By.ID, "shade-layer"), LAYER)
        find(By.ID, "add-term").click()
        row = find(By.CSS_SELECTOR, "#terms tr.term")
        Select(row.find_element(By.CSS_SELECTOR, ".t-vector")).select_by_value("a")
        fill(row.find_element(By.CSS_SELECTOR, ".t-layer"), LAYER)
        fill(row.find_element(By.CSS_SELECTOR, ".t-value"), COEF)
        fill(find(By.ID, "user"), QUESTION)
        find(By.ID, "send").click()

        def finished(b):
            boxes = b.find_elements(By.CSS_SELECTOR, ".turn:last-child .answer")
            states = [x.get_attribute("data-state") for x in boxes]
            assert "error" not in states, b.find_element(By.ID, "error").text
            return len(boxes) == 2 and all(s == "done" for s in states)

        wait.until(finished)
        steered, unsteered = answer(url, QUESTION, LAYER), answer(url, QUESTION)
        for label, resp in (("steered", steered), ("unsteered", unsteered)):
            box = find(By.CSS_SELECTOR, f'.turn:last-child .answer[data-label="{label}"]')
            spans = box.find_elements(By.CSS_SELECTOR, ".answer-text .tok")
            shown = "".join(
                s.get_attribute("textContent")
                for s in spans
                if "special" not in s.get_attribute("class")
            )
            assert shown == resp["choices"][0]["message"]["content"], label
            px = resp["pvjax"]
            # the API's numbers for `a` at LAYER: the steered series, or the monitor's (it reads a)
            series = next(
                s
                for s in px["projections"]
                if s.get("vector", s.get("monitor")) in ("a", "evil") and s["layer"] == LAYER
            )
            assert len(spans) == len(series["values"]) == resp["usage"]["completion_tokens"]
            values = [float(s.get_attribute("data-value")) for s in spans]
            np.testing.assert_allclose(values, series["values"], atol=TOL, rtol=0)
            assert all(s.get_attribute("title") for s in spans)
            verdict = box.find_element(By.CSS_SELECTOR, ".verdict")
            assert verdict.is_displayed()
            assert verdict.get_attribute("data-source") == "server"
            assert (
                abs(float(verdict.get_attribute("data-projection")) - px["monitor"]["projection"])
                < TOL
            )
            assert verdict.get_attribute("data-flagged") == str(px["monitor"]["flagged"]).lower()
            prompt = box.find_elements(By.CSS_SELECTOR, ".prompt-tokens .tok")
            assert len(prompt) == resp["usage"]["prompt_tokens"]
            assert all(p.get_attribute("data-value") for p in prompt)
            if label == "steered":
                last = float(prompt[-1].get_attribute("data-value"))
                assert abs(last - px["steer"][0]["prompt_last_projection"]) < TOL
                applied = box.find_element(By.CSS_SELECTOR, ".applied").get_attribute(
                    "data-applied"
                )
                assert '"coef":8' in applied and '"layer":20' in applied
        assert "-" in find(By.ID, "scale-lo").text and "+" in find(By.ID, "scale-hi").text

        if os.environ.get("PVJAX_SCREENSHOT"):
            browser.execute_script(
                "document.querySelectorAll('.answer details').forEach(d => d.open = true)"
            )
            out = ROOT / "docs" / "img" / "serve_page.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(out))

        browser.execute_script("document.getElementById('export').click()")
        exported = browser.execute_script("return S.lastExport")
        assert [t["user"] for t in exported["turns"]] == [QUESTION]
        variant = exported["turns"][0]["variants"][1]
        assert variant["label"] == "steered" and variant["request"]["steer"] == [term()]
        assert variant["response"]["pvjax"]["monitor"] == steered["pvjax"]["monitor"]
        assert variant["response"]["text"] == steered["choices"][0]["message"]["content"]
        assert len(variant["answer"]["tokens"]) == steered["usage"]["completion_tokens"]

        # a layer out of range: the server's own message, and the page goes on working
        find(By.ID, "clear").click()  # a new conversation: the next prompts stand alone
        question = "Why is the sky blue?"
        want = api(url, question, [term(layer=99)])
        assert want.status_code == 400
        message = want.json()["error"]["message"]
        assert "layer" in message
        fill(row.find_element(By.CSS_SELECTOR, ".t-layer"), 99)
        fill(find(By.ID, "user"), question)
        find(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "error").text)
        assert find(By.ID, "error").text == message
        assert find(By.ID, "send").is_enabled()
        fill(row.find_element(By.CSS_SELECTOR, ".t-layer"), LAYER)
        find(By.ID, "send").click()
        wait.until(finished)
        assert not find(By.ID, "error").text
        box = find(By.CSS_SELECTOR, '.turn:last-child .answer[data-label="steered"]')
        spans = box.find_elements(By.CSS_SELECTOR, ".answer-text .tok:not(.special)")
        want = answer(url, question, LAYER)["choices"][0]["message"]["content"]
        assert "".join(s.get_attribute("textContent") for s in spans) == want
    finally:
        browser.quit()
