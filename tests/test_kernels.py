"""The native CPU decode kernel (`pvjax.kernels`): exact products, and generation that gives the
same answers with packed weights as with XLA's dots, on tiny random Llama/Qwen2 checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import save_tiny

import pvjax
from pvjax import kernels
from pvjax.capture import Capture
from pvjax.engine.generate import SamplingParams, decode_params, generate_ids
from pvjax.kernels import PackedWeight
from pvjax.model import default_positions, left_pad
from pvjax.models.decoder import forward
from pvjax.models.layout import PerLayer, unstack_layers

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler to build the kernel",
)


def test_kernel_builds_here():
    assert kernels.available()


@pytest.mark.parametrize("M", [1, 3, 8, 16, 300])
@pytest.mark.parametrize("K, N", [(576, 960), (1536, 576), (7, 5), (100, 97), (64, 49152 + 13)])
def test_packed_products_equal_float64(M, K, N):
    rng = np.random.default_rng(M * 1000 + K)
    x = rng.standard_normal((M, K), np.float32)
    w = rng.standard_normal((K, N), np.float32)
    y = np.asarray(jax.jit(lambda x, w: x @ w)(jnp.asarray(x), PackedWeight.pack(w)))
    want = x.astype(np.float64) @ w
    assert y.shape == (M, N) and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_packing_round_trips_and_keeps_leading_axes():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((40, 100), np.float32))
    p = PackedWeight.pack(w)
    assert p.panels.shape == (3, 40, 48) and p.shape == (40, 100)
    np.testing.assert_array_equal(np.asarray(p.unpack()), np.asarray(w))
    x = jnp.ones((2, 3, 40))
    assert (x @ p).shape == (2, 3, 100)
    with pytest.raises(ValueError, match="K=40, input has 41"):
        jnp.ones((2, 41)) @ p


@pytest.mark.parametrize("kind", ["llama31_gqa_llama3rope", "qwen2_untied", "llama_mha_tied"])
def test_packed_decoder_equals_xla_dots(kind, tmp_path):
    save_tiny(kind, tmp_path, vocab_size=300)
    model = pvjax.load(tmp_path)
    cfg = model.config
    ids = [[5, 17, 2, 99, 42, 7, 8], [3, 250, 11]]
    tokens, mask = left_pad(ids, 8)
    pos = default_positions(mask)
    run = lambda p, layout: forward(
        p, cfg, layout, jnp.asarray(tokens), pos, jnp.asarray(mask), capture=Capture(logits="all")
    )
    plain = run(unstack_layers(model.params, cfg), PerLayer())
    packed = run(unstack_layers(model.params, cfg, pack=True), PerLayer(packed=True))
    scale = np.abs(np.asarray(plain.logits)).max()
    np.testing.assert_allclose(
        np.asarray(packed.logits), np.asarray(plain.logits), atol=1e-5 * scale
    )
    np.testing.assert_allclose(
        np.asarray(packed.hidden_states),
        np.asarray(plain.hidden_states),
        atol=1e-5 * np.abs(np.asarray(plain.hidden_states)).max(),
    )
    # Generation: the default (unrolled, packed here) against the scanned layout on XLA's dots.
    assert isinstance(decode_params(model)["layers"][0]["wqkv"], PackedWeight)
    sp = SamplingParams(max_new_tokens=12, min_new_tokens=12)
    a = generate_ids(model, ids, sampling=sp, batch_size=2)
    b = generate_ids(model, ids, sampling=sp, batch_size=2, unroll=False)
    assert a.tokens == b.tokens


# SmolLM2's decode shapes (q/k/v fused, o, gate/up fused, down, a slice of the output head) and
# odd ones: K odd (the kernel's pairs padded), N past a panel's edge.
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize(
    "K, N", [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 4813), (7, 5), (101, 97)]
)
def test_bf16_products_equal_xla_float32_of_the_rounded_weights(M, K, N):
    """bfloat16 panels: x @ w equals XLA's float32 product of the bf16 weights widened, within
    float32 accumulation order. x is bf16-valued, as in a bfloat16 model's decode (and what
    AVX-512-BF16's vdpbf16ps, which rounds x to bf16, takes exactly)."""
    rng = np.random.default_rng(M * 1000 + K + N)
    x = jnp.asarray(rng.standard_normal((M, K), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32)).astype(jnp.bfloat16)
    p = PackedWeight.pack(w)
    assert p.panels.dtype == jnp.bfloat16 and p.shape == (K, N)
    assert p.panels.nbytes == -(-N // 48) * (K + K % 2) * 48 * 2  # half a float32 panel's bytes
    np.testing.assert_array_equal(np.asarray(p.unpack()), np.asarray(w))
    y = np.asarray(jax.jit(lambda x, w: x @ w)(x, p))
    want = np.asarray(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest"))
    assert y.shape == (M, N) and y.dtype == np.float32
    # Two float32 sums of K terms in different orders: measured apart by up to 2.2e-6 of the
    # largest output at K = 1536 (a wrong weight or pair would be ~1e-2 off).
    np.testing.assert_allclose(y, want, rtol=0, atol=4e-6 * np.abs(want).max())
    # float32 activations (not bf16-valued) take the same weights
    xf = jnp.asarray(rng.standard_normal((2, K), np.float32))
    want = np.asarray(jnp.dot(xf, w.astype(jnp.float32), precision="highest"))
    np.testing.assert_allclose(
        np.asarray(xf @ p), want, rtol=0, atol=(1e-2 if _DOT_BF16 else 4e-6) * np.abs(want).max()
    )


_DOT_BF16 = "avx512_bf16" in kernels._cpu_flags()  # vdpbf16ps rounds x to bf16


@pytest.mark.parametrize("kind", ["llama31_gqa_llama3rope", "qwen2_tied"])
def test_bf16_generation_on_the_kernel_equals_xla_dots(kind, tmp_path):
    """A bfloat16 model decodes on bf16 panels (half the bytes) and gives the greedy tokens of
    XLA's bf16 dots (the scanned layout) up to bf16 ties. Not exact by construction: the kernel
    accumulates in float32 and rounds once, and its attention keeps float32 scores and
    probabilities over a float32 cache where XLA's bf16 path rounds them (as transformers' bf16
    does). So a row may part from XLA's at one step where XLA's own logits for the two tokens
    lie within two bf16 steps of each other (these tiny models produce exact bf16 ties)."""
    from pvjax.model import forward

    save_tiny(kind, tmp_path, vocab_size=300)
    m16 = pvjax.load(tmp_path, dtype="bfloat16")
    w = decode_params(m16)["layers"][0]["wqkv"]
    assert isinstance(w, PackedWeight) and w.dtype == jnp.bfloat16
    ids = [[5, 17, 2, 99, 42, 7, 8], [3, 250, 11]]
    sp = SamplingParams(max_new_tokens=16, min_new_tokens=16)
    a = generate_ids(m16, ids, sampling=sp, batch_size=2)
    b = generate_ids(m16, ids, sampling=sp, batch_size=2, unroll=False)
    for prompt, ours, xla in zip(ids, a.tokens, b.tokens):
        j = next((j for j, (x, y) in enumerate(zip(ours, xla)) if x != y), None)
        if j is None:
            continue
        out = forward(m16, [prompt + xla[:j]], capture=Capture(logits="last", hidden=False))
        logits = np.asarray(out.logits[0, -1], np.float32)
        gap = abs(logits[ours[j]] - logits[xla[j]])
        assert gap <= 2**-6 * max(1.0, np.abs(logits).max()), (j, ours[j], xla[j], gap)


def test_disabled_kernels_keep_xla_dots(tmp_path):
    save_tiny("qwen2_tied", tmp_path, vocab_size=300)
    code = (
        "import pvjax, sys; from pvjax.engine.generate import decode_params, generate_ids; "
        "from pvjax.kernels import PackedWeight, available; m = pvjax.load(sys.argv[1]); "
        "assert not available(); assert not isinstance(decode_params(m)['layers'][0]['wqkv'], "
        "PackedWeight); "
        "print(generate_ids(m, [[1, 2, 3]]).tokens)"
    )
    env = {**os.environ, "PVJAX_CPU_KERNELS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("[[")


@pytest.mark.parametrize(
    "B, K, G, E, S, upto", [(1, 3, 3, 64, 40, 40), (4, 2, 4, 16, 37, 20), (2, 1, 2, 8, 5, 1)]
)
def test_decode_attention_equals_xla(B, K, G, E, S, upto):
    """The kernel reads only the `upto` filled slots; XLA's path masks the rest instead."""
    from pvjax.models.block import one_token_attention

    rng = np.random.default_rng(B * 100 + S)
    q = jnp.asarray(rng.standard_normal((B, 1, K * G, E), np.float32))
    k = jnp.asarray(rng.standard_normal((B * K, E, S), np.float32))
    v = jnp.asarray(rng.standard_normal((B * K, S, E), np.float32))
    valid = rng.random((B, S)) < 0.7
    valid[:, 0] = True
    valid[:, upto:] = False  # unfilled slots, as in a cache
    got = jax.jit(kernels.decode_attention)(q, k, v, jnp.asarray(valid), upto)
    want = one_token_attention(q, k, v, jnp.asarray(valid)[:, None, :])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    # Gemma's scores: a query scale of its own, then soft-capping (2.0 bites on these scores)
    got = kernels.decode_attention(q, k, v, jnp.asarray(valid), upto, scale=0.3, softcap=2.0)
    want = one_token_attention(q, k, v, jnp.asarray(valid)[:, None, :], 0.3, 2.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    if upto > 1:  # one slot: its weight is 1 whatever the score
        uncapped = one_token_attention(q, k, v, jnp.asarray(valid)[:, None, :], 0.3)
        assert np.abs(np.asarray(got) - np.asarray(uncapped)).max() > 1e-3, "the cap did nothing"
    with pytest.raises(ValueError, match="one token"):
        kernels.decode_attention(jnp.concatenate([q, q], 1), k, v, jnp.asarray(valid), upto)
