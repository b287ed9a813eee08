"""`pvjax serve` under load: new tokens/s and time to first token of the server, against serving
steered generation the reference way (transformers `generate` with a forward hook, one request at
a time), and against the offline engine on the same requests, same run.

    python benchmarks/serve.py           # last lines: efficiency=<x>, then ratio=<y>
    python benchmarks/serve.py --quick   # 16 requests of 16 tokens, to try it out

64 requests of exactly 64 new tokens (`min_tokens` = `max_tokens`, greedy), from 16 concurrent
clients (the official `openai` client, streaming, against a server in this process on a loopback
port), SmolLM2-135M-Instruct (the embedded GGUF) on the CPU. Mixed steering: three random unit
vectors at layers 10, 15 and 20, coefficients -8..8, position modes `response`, `all` and
`prompt`, one request in eight unsteered.

- server: tokens/s = all new tokens / wall time from the first request sent to the last answer;
  time to first token (TTFT) per request, p50 and p99. Warm-up (the compiles) is reported apart;
  the server compiles prompt widths 32, 48 and 64 (the chat prompts here are 30-45 tokens).
- reference: for each request in turn, a hook on block `layer - 1` adds `coef * v` where its
  position mode says (the prompt pass: every position, or the last for `response`; each new
  token: unless `prompt`), `generate`, remove the hook.
- offline: `generate_ids` on the same 64 requests, batch 16, one call per position mode (the
  engine takes one mode per call), every row its own intervention; best of two runs after a
  compiling one.

`ratio` = server tokens/s / reference tokens/s (target >= 4); `efficiency` = server tokens/s /
offline tokens/s (target >= 0.8).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from common import QUESTIONS, Timer, hf_embedded

import pvjax
from pvjax import interventions
from pvjax.engine.generate import SamplingParams, generate_ids

LAYERS = (10, 15, 20)
COEFS = (-8.0, -4.0, 4.0, 8.0, 2.0, -2.0, 6.0)
MODES = ("response", "all", "prompt")


def requests(n: int):
    """(question, vector index or None, layer, coef, positions) per request."""
    out = []
    for i in range(n):
        k = i % 3
        if i % 8 == 7:
            out.append((QUESTIONS[i % 8], None, LAYERS[k], 0.0, "response"))
        else:
            out.append((QUESTIONS[i % 8], k, LAYERS[k], COEFS[i % 7], MODES[(i // 3) % 3]))
    return out


def start_server(model, vectors, new: int, batch: int):
    import httpx
    import uvicorn

    from pvjax.serve.app import build_app
    from pvjax.serve.service import ServeSettings, Service
    from pvjax.serve.terms import Catalog

    settings = ServeSettings(
        model_name="smollm2",
        max_batch=batch,
        max_prompt=64,
        max_new=new,
        prompt_widths=(32, 48, 64),
    )
    service = Service(model, Catalog({str(i): v for i, v in enumerate(vectors)}, {}), settings)
    with Timer() as warm:
        service.start()
        sock_port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(service), host="127.0.0.1", port=sock_port, log_level="warning"
            )
        )
        threading.Thread(target=server.run, daemon=True).start()
        url = f"http://127.0.0.1:{sock_port}"
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if service.scheduler.failed is not None:
                raise service.scheduler.failed
            time.sleep(0.2)
    return service, server, url, warm.seconds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(url, reqs, new: int, clients: int):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)

    def one(r):
        q, k, layer, coef, mode = r
        body = {}
        if k is not None:
            body["steer"] = [{"vector": str(k), "layer": layer, "coef": coef, "positions": mode}]
        t0 = time.perf_counter()
        ttft, n = None, 0
        stream = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": q}],
            max_tokens=new,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": new, **body},
        )
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return n, ttft

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, reqs))
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in out)
    ttfts = sorted(t for _, t in out if t is not None)
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]
    return tokens / wall, pick(0.5), pick(0.99), tokens, wall


def run_offline(model, vectors, reqs, new: int, batch: int):
    L, D = model.n_layers + 1, model.hidden_size
    sp = SamplingParams(max_new_tokens=new, min_new_tokens=new)
    groups = {}
    for r in reqs:
        groups.setdefault(r[4], []).append(r)

    def once():
        n = 0
        for mode, rows in groups.items():
            ids = [
                model.tokenizer(
                    model.chat_text([{"role": "user", "content": q}]), add_special_tokens=False
                )["input_ids"]
                for q, *_ in rows
            ]
            steer = []
            for j in range(len(LAYERS)):  # one term per vector; rows of other vectors get 0
                coefs = [c if k == j else 0.0 for _, k, _, c, _ in rows]
                steer.append((vectors[j], LAYERS[j], coefs))
            iv = interventions.build(L, D, steer=steer, batch=len(rows))
            g = generate_ids(
                model, ids, sampling=sp, intervention=iv, positions=mode, batch_size=batch
            )
            n += sum(len(t) for t in g.tokens)
        return n

    once()
    best = float("inf")
    for _ in range(2):
        with Timer() as t:
            n = once()
        best = min(best, t.seconds)
    return n / best


def run_reference(hf, tok, vectors, reqs, new: int):
    import torch

    tok.padding_side = "left"
    n = 0
    with torch.no_grad():
        enc = tok(["Hi"], return_tensors="pt", add_special_tokens=False)
        hf.generate(**enc, max_new_tokens=2, do_sample=False)  # warm-up
        with Timer() as t:
            for q, k, layer, coef, mode in reqs:
                text = tok.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                enc = tok([text], return_tensors="pt", add_special_tokens=False)
                handle = None
                if k is not None:
                    v = torch.tensor(coef * vectors[k][layer])

                    def hook(module, inputs, output, v=v, mode=mode):
                        h = output[0] if isinstance(output, tuple) else output
                        prompt_pass = h.shape[1] > 1
                        if mode == "response" and prompt_pass:
                            h[:, -1] += v
                        elif mode == "all" or (mode == "prompt") == prompt_pass:
                            h += v
                        return output

                    handle = hf.model.layers[layer - 1].register_forward_hook(hook)
                try:
                    g = hf.generate(
                        **enc,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=tok.eos_token_id,
                    )
                finally:
                    if handle is not None:
                        handle.remove()
                n += g.shape[1] - enc["input_ids"].shape[1]
    return n / t.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests of 16 tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    n_req, new, clients, batch = (16, 16, 16, 16) if args.quick else (64, 64, 16, 16)
    model = pvjax.load("smollm2-135m-instruct")
    L, D = model.n_layers + 1, model.hidden_size
    rng = np.random.default_rng(0)
    vectors = []
    for _ in LAYERS:
        v = rng.standard_normal((L, D)).astype(np.float32)
        vectors.append(v / np.linalg.norm(v, axis=-1, keepdims=True))
    reqs = requests(n_req)

    service, server, url, warm = start_server(model, vectors, new, batch)
    print(
        f"server: warm-up {warm:.1f} s ({len(service.scheduler.warmup)} programs: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in service.scheduler.warmup.items())
        + ")"
    )
    rate, p50, p99, tokens, wall = run_server(url, reqs, new, clients)
    compiles = service.scheduler.compiles_since_ready()
    print(
        f"server: {tokens} new tokens in {wall:.1f} s = {rate:.1f} new tokens/s, TTFT p50 "
        f"{p50:.2f} s p99 {p99:.2f} s, {clients} clients, batch {batch}, "
        f"compiles after warm-up {compiles}, cache shifts {service.engine.shifts}"
    )
    server.should_exit = True
    service.stop()
    offline = run_offline(model, vectors, reqs, new, batch)
    print(f"offline generate_ids (batch {batch}): {offline:.1f} new tokens/s")
    print(f"efficiency={rate / offline:.2f}")
    if args.skip_reference:
        return
    hf = hf_embedded(args.threads).eval()
    ref = run_reference(hf, model.tokenizer, vectors, reqs, new)
    print(
        f"reference (transformers generate + hook, one request at a time): {ref:.1f} new tokens/s"
    )
    print(f"ratio={rate / ref:.2f}")


if __name__ == "__main__":
    main()
