"""pvjax's control vectors run in llama.cpp (through llama-cpp-python) and steer it as pvjax steers.

The embedded SmolLM2-135M-Instruct GGUF (Q4_1) runs in llama.cpp as it is, and in pvjax
dequantized to float32. A direction `v` (a contrast of mean activations at pvjax row `ROW`) is
exported with `pvjax vectors export --layers ROW --coef C` and loaded the way llama.cpp's
`--control-vector` loads a file (`common_control_vector_load_one`: `direction.N` at offset
`n_embd * (N-1)` of one buffer, read here with the `gguf` package, since llama-cpp-python does not
bind llama.cpp's common library), then handed to `llama_set_adapter_cvec` for blocks
1..n_layer, as `llama-cli --control-vector-scaled F:s` does. Checked:

- the change of the next-token logits (steered minus unsteered, scale +1 and -1) in llama.cpp
  correlates with pvjax's change for `v` at row `ROW` (the documented mapping: `direction.N` is the
  output of llama.cpp block N, pvjax row N+1) far better than with pvjax steering a row off by one
  either way (a wrong mapping);
- greedy answers (`N_NEW` tokens, the same chat prompt as token ids) move the same way: unsteered,
  +C and -C, each llama.cpp answer starts as pvjax's does, and both steered answers leave the
  unsteered one in both implementations;
- the reverse: a llama.cpp-style file (two `direction.N` tensors, as repeng or llama.cpp's
  cvector-generator write them) imported with `pvjax vectors import` steers pvjax as the file
  steers llama.cpp.

CI does not build llama-cpp-python (51 minutes from source on two busy cores); the test skips
without it. To run it, build a CPU-only wheel without llama.cpp's tools and install it (with its
dependency `diskcache`):

    CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAVA_BUILD=OFF \
      -DLLAMA_OPENSSL=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF" \
      pip wheel --no-deps --no-binary :all: -w WHEELS llama-cpp-python==0.3.36
    pip install diskcache WHEELS/llama_cpp_python-0.3.36-*.whl

The figures measured are in docs/generation.md (llama.cpp control vectors).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (CI does not build it from source: too slow)",
)

import gguf  # noqa: E402

import pvjax  # noqa: E402
from pvjax import cli  # noqa: E402
from pvjax import interventions as ivs  # noqa: E402
from pvjax.engine.generate import SamplingParams, generate_ids  # noqa: E402
from pvjax.files.vectors import KEYS, load_vectors, save_vectors  # noqa: E402
from pvjax.loading.embedded import EMBEDDED_NAME, embedded_gguf_path  # noqa: E402

ROW = 15  # pvjax hidden_states row = llama.cpp direction.14
COEF = 1.0  # pvjax: +1 answers 'delighted ... wonderful', -1 'long and uneventful'
N_NEW = 12
PROMPT = "Tell me about your weekend."
POS = [
    "I am so happy and grateful, everything is wonderful and full of joy!",
    "What a delightful, sunny, cheerful day; I love it.",
]
NEG = [
    "I am so sad and miserable, everything is terrible and full of pain.",
    "What an awful, gloomy, depressing day; I hate it.",
]


def _rel(a, b) -> float:
    """|a - b| / |b|."""
    return float(np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(b))


def _corr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.corrcoef(a - a.mean(), b - b.mean())[0, 1])


@pytest.fixture(scope="module")
def model():
    return pvjax.load(EMBEDDED_NAME, dtype="float32")


@pytest.fixture(scope="module")
def llm():
    return llama_cpp.Llama(
        model_path=str(embedded_gguf_path()),
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        logits_all=True,
        seed=0,
        verbose=False,
    )


@pytest.fixture(scope="module")
def prompt_ids(model):
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def direction(model):
    """Mean activations at every row over cheerful texts minus gloomy ones: `[n_layers+1, D]`."""

    def mean_rows(texts):
        out = []
        for t in texts:
            ids = np.asarray([model.tokenizer(t)["input_ids"]])
            out.append(np.asarray(pvjax.activations(model, ids).hidden_states)[:, 0].mean(1))
        return np.mean(out, 0)

    return (mean_rows(POS) - mean_rows(NEG)).astype(np.float32)


def load_cvec(path, strength: float, n_layers: int, n_embd: int) -> np.ndarray:
    """llama.cpp's `common_control_vector_load_one`: `direction.N` times `strength` at offset
    `n_embd * (N-1)`, here padded to every steerable block so no stale data stays in the context."""
    buf = np.zeros((n_layers - 1) * n_embd, np.float32)
    for t in gguf.GGUFReader(str(path)).tensors:
        n = int(t.name.split(".")[1])
        assert n > 0 and t.tensor_type == gguf.GGMLQuantizationType.F32
        buf[n_embd * (n - 1) : n_embd * n] += strength * np.asarray(t.data, np.float32)
    return buf


def set_cvec(llm, buf, n_layers: int, n_embd: int):
    """`llama_set_adapter_cvec` over blocks 1..n_layer, as common_init_from_params applies a
    `--control-vector`; `buf=None` clears it."""
    ctx = llm._ctx.ctx
    if buf is None:
        rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)
    else:
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(ctx, ptr, buf.size, n_embd, 1, n_layers)
    assert rc == 0


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], np.float64)


def llama_greedy(llm, ids, n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def pvjax_last_logits(model, ids, steer) -> np.ndarray:
    """Next-token logits of `ids` per steering coefficient row (`steer`: (vector, row, coefs))."""
    batch = len(steer[0][2]) if steer else 1
    iv = ivs.build(model.n_layers + 1, model.hidden_size, steer=steer, batch=batch)
    out = pvjax.forward(model, np.asarray([ids] * batch), intervention=iv)
    return np.asarray(out.logits[:, -1], np.float64)


def _export(tmp_path, model, rows, row, coef):
    src = tmp_path / "v.safetensors"
    save_vectors(src, {k: rows for k in KEYS}, model=model, trait="cheerful")
    out = tmp_path / "v.gguf"
    argv = ["vectors", "export", f"{src}:response_avg_diff", "--format", "gguf"]
    argv += ["--out", str(out), "--layers", str(row), "--coef", str(coef)]
    assert cli.main(argv + ["--model", EMBEDDED_NAME]) in (0, None)
    return out


def test_exported_vector_steers_llamacpp_as_pvjax(model, llm, prompt_ids, direction, tmp_path):
    L, D = model.n_layers, model.hidden_size
    path = _export(tmp_path, model, direction, ROW, COEF)
    v = direction[ROW]
    # pvjax: unsteered, +C, -C at the documented row and at the rows a wrong mapping would use
    rows = {
        r: pvjax_last_logits(model, prompt_ids, [(v, r, [0.0, COEF, -COEF])])
        for r in (ROW - 1, ROW, ROW + 1)
    }
    ours = {r: (x[1] - x[0], x[2] - x[0]) for r, x in rows.items()}
    set_cvec(llm, None, L, D)
    base = llama_logits(llm, prompt_ids)
    theirs = []
    for s in (1.0, -1.0):
        set_cvec(llm, load_cvec(path, s, L, D), L, D)
        theirs.append(llama_logits(llm, prompt_ids) - base)
    set_cvec(llm, None, L, D)
    corr = {r: [_corr(t, o) for t, o in zip(theirs, ours[r])] for r in ours}
    rel = {r: [_rel(t, o) for t, o in zip(theirs, ours[r])] for r in ours}
    print(f"\nunsteered logits: max |llama.cpp - pvjax| = {np.abs(base - rows[ROW][0]).max():.3f}")
    for r in ours:
        print(f"pvjax row {r}: correlation {corr[r]}, relative difference {rel[r]} (+C, -C)")
    # measured: 0.99 at the documented row, 0.78-0.93 a row off (quantised activations in
    # llama.cpp keep the unsteered logits ~0.8 apart, so neither is exact)
    assert min(corr[ROW]) > 0.98, corr
    for wrong in (ROW - 1, ROW + 1):
        assert max(corr[wrong]) < min(corr[ROW]) - 0.03, corr
        assert all(a < 0.75 * b for a, b in zip(rel[ROW], rel[wrong])), rel

    # greedy answers, unsteered, +C and -C
    coefs = [0.0, COEF, -COEF]
    iv = ivs.build(L + 1, D, steer=[(v, ROW, coefs)], batch=3)
    g = generate_ids(
        model,
        [prompt_ids] * 3,
        intervention=iv,
        positions="all",
        sampling=SamplingParams(max_new_tokens=N_NEW),
    )
    ours_tok = [list(map(int, t))[:N_NEW] for t in g.tokens]
    theirs_tok = []
    for s in (0.0, 1.0, -1.0):
        set_cvec(llm, None if s == 0 else load_cvec(path, s, L, D), L, D)
        theirs_tok.append(llama_greedy(llm, prompt_ids, N_NEW))
    set_cvec(llm, None, L, D)
    dec = model.tokenizer.decode
    agree = []
    for c, a, b in zip(coefs, ours_tok, theirs_tok):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), N_NEW)
        agree.append(k)
        print(f"coef {c:+}: pvjax {dec(a)!r} | llama.cpp {dec(b)!r} | same first {k} tokens")
    assert min(agree) >= 3, agree
    for impl in (ours_tok, theirs_tok):
        assert impl[1] != impl[0] and impl[2] != impl[0] and impl[1] != impl[2]


def test_llamacpp_style_file_imports_and_steers_pvjax_the_same(
    model, llm, prompt_ids, direction, tmp_path
):
    L, D = model.n_layers, model.hidden_size
    # two directions, as repeng / llama.cpp's cvector-generator name them (direction.N: block N)
    dirs = {9: 0.5 * direction[10], 19: 0.5 * direction[20]}
    path = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", len(dirs))
    for n, d in dirs.items():
        w.add_tensor(f"direction.{n}", d.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "imported.safetensors"
    argv = ["vectors", "import", str(path), "--model", EMBEDDED_NAME, "--out", str(out)]
    assert cli.main(argv) in (0, None)
    rows = load_vectors(out)[0]["response_avg_diff"]
    steered = [r for r in range(L + 1) if np.any(rows[r])]
    assert steered == [10, 20]
    steer = [(rows, r, [0.0, 1.0]) for r in steered]
    x = pvjax_last_logits(model, prompt_ids, steer)
    ours = x[1] - x[0]
    shifted = pvjax_last_logits(model, prompt_ids, [(rows[r], r + 1, [0.0, 1.0]) for r in steered])
    set_cvec(llm, None, L, D)
    base = llama_logits(llm, prompt_ids)
    set_cvec(llm, load_cvec(path, 1.0, L, D), L, D)
    theirs = llama_logits(llm, prompt_ids) - base
    set_cvec(llm, None, L, D)
    off = shifted[1] - shifted[0]
    right, wrong = _corr(theirs, ours), _corr(theirs, off)
    print(
        f"\nimported file: correlation {right:.4f} (rows 10, 20), {wrong:.4f} (rows 11, 21); "
        f"relative difference {_rel(theirs, ours):.4f}, {_rel(theirs, off):.4f}"
    )
    assert right > 0.95 and wrong < right, (right, wrong)
    assert _rel(theirs, ours) < 0.6 * _rel(theirs, off)
