"""Generation: greedy and steered parity with transformers' `generate`, sampling, stops, compiles.

Greedy tokens are compared one for one; where they part, the test checks that transformers' own
scores at that step put our token within a near-tie of its choice (fp32 summation order can flip a
tie), and stops comparing that row there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pvjax
from pvjax import interventions as ivs
from pvjax.engine.generate import (
    GenerationError,
    SamplingParams,
    compile_count,
    prefix_bucket,
    prompt_bucket,
)
from pvjax.engine.generate import generate as _generate
from pvjax.engine.generate import generate_ids as _generate_ids
from pvjax.errors import InputError

L, D = 31, 576
LAYER = 10
TIE = 2e-3  # logit gap under which two tokens count as tied

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Give me three tips for learning to cook.",
    "Why do cats purr?",
    "Explain photosynthesis to a child.",
    "What should I name my new puppy?",
    "How do I apologise to a friend?",
    "Describe the ocean in one sentence.",
]


def generate(*args, **kw):
    """The scanned layout compiles in a fifth of the time of the unrolled CPU default, which the
    first parity test covers."""
    kw.setdefault("unroll", False)
    return _generate(*args, **kw)


_UNSTEERED = {}


def unsteered(model, n_prompts, n_new):
    """Plain greedy answers to the first `n_prompts` prompts, generated once for the tests that
    compare steered runs with them."""
    if (n_prompts, n_new) not in _UNSTEERED:
        _UNSTEERED[n_prompts, n_new] = generate(
            model, PROMPTS[:n_prompts], sampling=SamplingParams(max_new_tokens=n_new), batch_size=4
        )
    return _UNSTEERED[n_prompts, n_new]


def vec(seed=0, scale=1.0):
    v = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return scale * v / np.linalg.norm(v)


def hf_generate(hf, tokenizer, texts, n_new, hook=None):
    """transformers' greedy generate on left-padded prompts, with an optional forward hook on the
    block whose output is `hidden_states[LAYER]` (the reference implementation's way)."""
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), 2, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s)
        mask[i, T - len(s) :] = 1
    handle = hf.model.layers[LAYER - 1].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=2,
            )
    finally:
        if handle:
            handle.remove()
    scores = torch.stack(out.scores, 1).numpy()  # [B, steps, V]
    return out.sequences[:, T:].numpy(), scores


def assert_greedy_match(ours: list[list[int]], ref_tokens, ref_scores, eos=2):
    """Same tokens, or a near-tie at the first difference. Returns how many rows parted."""
    parted = 0
    for r, toks in enumerate(ours):
        ref = [int(t) for t in ref_tokens[r]]
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        for j in range(max(len(toks), len(ref))):
            a = toks[j] if j < len(toks) else None
            b = ref[j] if j < len(ref) else None
            if a == b:
                continue
            assert a is not None and b is not None, (
                f"row {r}: lengths differ at {j} ({toks} vs {ref})"
            )
            s = ref_scores[r, j]
            assert s[b] - s[a] < TIE, f"row {r} step {j}: {a} vs {b}, gap {s[b] - s[a]}"
            parted += 1
            break
    return parted


def steer_hook(coef, v, mode):
    """The reference implementation's steering hook: `prompt` acts in the prefill pass only,
    `response` on the last position of every pass."""
    vt = torch.tensor(v)

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        if mode == "all":
            h += coef * vt
        elif mode == "prompt" and h.shape[1] > 1:
            h += coef * vt
        elif mode == "response":
            h[:, -1] += coef * vt
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return hook


def ablate_hook(u):
    ut = torch.tensor(u / np.linalg.norm(u))

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h - (h @ ut)[..., None] * ut
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return hook


def test_greedy_matches_transformers_on_4_prompts_of_24_tokens(smollm2, hf_smollm2):
    """The default (unrolled) layout, one batch of four left-padded prompts of different lengths
    under a shared template prefix."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[5]]  # 37, 39, 36 and 38 tokens
    g = _generate(smollm2, prompts, sampling=SamplingParams(max_new_tokens=24), batch_size=4)
    lengths = {len(smollm2.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in g.prompts}
    assert len(lengths) == 4, "the prompts should pad to different lengths"
    ref, scores = hf_generate(hf_smollm2, smollm2.tokenizer, g.prompts, 24)
    parted = assert_greedy_match(g.tokens, ref, scores)
    assert parted <= 1, f"{parted} rows parted at near-ties"
    assert all(len(t) <= 24 for t in g.tokens)
    assert g.texts[0].strip().startswith("The capital of France is Paris")


@pytest.mark.parametrize("mode", ["all", "prompt", "response"])
def test_steered_generation_matches_a_transformers_hook(smollm2, hf_smollm2, mode):
    v = vec(3, scale=8.0)
    prompts = PROMPTS[:4]
    iv = ivs.build(L, D, steer=[(v, LAYER, 1.0)])
    g = generate(
        smollm2,
        prompts,
        sampling=SamplingParams(max_new_tokens=16),
        intervention=iv,
        positions=mode,
        batch_size=4,
    )
    plain = unsteered(smollm2, 4, 16)
    assert g.tokens != plain.tokens, "the vector should change some answer"
    ref, scores = hf_generate(
        hf_smollm2, smollm2.tokenizer, g.prompts, 16, steer_hook(1.0, v, mode)
    )
    assert assert_greedy_match(g.tokens, ref, scores) == 0


def test_ablated_generation_matches_a_transformers_hook(smollm2, hf_smollm2):
    u = vec(4)
    iv = ivs.build(L, D, ablate=[(u, LAYER)])
    g = generate(smollm2, PROMPTS[:4], sampling=SamplingParams(max_new_tokens=16), intervention=iv)
    ref, scores = hf_generate(hf_smollm2, smollm2.tokenizer, g.prompts, 16, ablate_hook(u))
    assert assert_greedy_match(g.tokens, ref, scores) == 0


@pytest.mark.parametrize("mode", ["all", "prompt", "response"])
def test_steered_forward_logits_match_a_transformers_hook(smollm2, hf_smollm2, mode):
    prompt = smollm2.chat_text([{"role": "user", "content": "Tell me about your day."}])
    ids = smollm2.tokenizer(prompt + "It was quiet and good.", add_special_tokens=False)[
        "input_ids"
    ]
    end = len(smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    v = vec(5, scale=6.0)
    iv = ivs.build(L, D, steer=[(v, LAYER, 1.0)])
    mask = ivs.position_mask(mode, np.ones((1, len(ids))), end)
    ours = pvjax.forward(smollm2, np.array([ids]), intervention=iv.with_masks(mask)).logits[0]

    m = torch.tensor(np.asarray(mask))[0, :, None]

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + m * torch.tensor(v)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = hf_smollm2.model.layers[LAYER - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4 * np.abs(ref).max())
    plain = np.asarray(pvjax.forward(smollm2, np.array([ids])).logits[0])
    changed = np.abs(plain - ref).max(-1) > 1e-3
    assert changed[end:].all() if mode != "prompt" else changed[:end].any()


def test_every_row_carries_its_own_coefficient(smollm2):
    v = vec(3, scale=8.0)
    prompts = PROMPTS[:2] * 2
    iv = ivs.build(L, D, steer=[(v, LAYER, [0.0, 0.0, 1.0, 1.0])], batch=4)
    both = generate(smollm2, prompts, sampling=SamplingParams(max_new_tokens=12), intervention=iv)
    plain = generate(smollm2, PROMPTS[:2], sampling=SamplingParams(max_new_tokens=12))
    steered = generate(
        smollm2,
        PROMPTS[:2],
        sampling=SamplingParams(max_new_tokens=12),
        intervention=ivs.build(L, D, steer=[(v, LAYER, 1.0)]),
    )
    assert both.tokens[:2] == plain.tokens and both.tokens[2:] == steered.tokens


def test_sampling_is_reproducible_and_independent_of_batch_mates(smollm2):
    sp = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=8)
    a = generate(smollm2, PROMPTS[:3], sampling=sp, seed=7)
    b = generate(smollm2, PROMPTS[:3], sampling=sp, seed=7)
    c = generate(smollm2, PROMPTS[:3], sampling=sp, seed=8)
    assert a.texts == b.texts and a.texts != c.texts
    alone = generate(smollm2, PROMPTS[:1], sampling=sp, seed=7)
    assert alone.texts[0] == a.texts[0]
    top1 = generate(
        smollm2, PROMPTS[:3], sampling=SamplingParams(temperature=0.7, top_k=1, max_new_tokens=8)
    )
    greedy = generate(smollm2, PROMPTS[:3], sampling=SamplingParams(max_new_tokens=8))
    assert top1.tokens == greedy.tokens


def test_stops_min_and_max_new_tokens(smollm2):
    g = generate(smollm2, PROMPTS[:1], sampling=SamplingParams(max_new_tokens=40))
    assert g.finish_reasons == ["eos"] and g.tokens[0][-1] == 2 and "<|im_end|>" not in g.texts[0]
    n = len(g.tokens[0])
    forced = generate(
        smollm2, PROMPTS[:1], sampling=SamplingParams(max_new_tokens=n + 5, min_new_tokens=n + 5)
    )
    assert len(forced.tokens[0]) == n + 5 and 2 not in forced.tokens[0]
    assert forced.finish_reasons == ["length"]
    cut = generate(
        smollm2, PROMPTS[:1], sampling=SamplingParams(max_new_tokens=40, stop=("Paris",))
    )
    assert cut.finish_reasons == ["stop"] and "Paris" not in cut.texts[0]
    assert g.texts[0].startswith(cut.texts[0]) and len(cut.tokens[0]) < n


def test_per_token_projections_equal_a_plain_forward(smollm2):
    probes = np.stack([vec(1), vec(2)])
    g = generate(smollm2, PROMPTS[:2], sampling=SamplingParams(max_new_tokens=10), probes=probes)
    seqs = [g.prompt_tokens[i] + g.tokens[i] for i in range(2)]
    T = max(map(len, seqs))
    ids, mask = np.full((2, T), 2, np.int32), np.zeros((2, T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    hs = np.asarray(pvjax.forward(smollm2, ids, attention_mask=mask).hidden_states)  # [L, B, T, D]
    for i in range(2):
        want = hs[:, i, T - len(seqs[i]) :] @ probes.T
        P = len(g.prompt_tokens[i])
        assert g.projections[i].shape == (L, len(g.tokens[i]), 2)
        np.testing.assert_allclose(
            g.prompt_projections[i], want[:, :P], atol=2e-3 * np.abs(want).max()
        )
        np.testing.assert_allclose(g.projections[i], want[:, P:], atol=2e-3 * np.abs(want).max())


_FULL_ROWS = {}


@pytest.mark.parametrize("unroll", [False, True])
def test_shared_prefix_runs_once_and_changes_nothing(smollm2, unroll):
    """Prompts under one system prompt share their opening tokens; running them once as a single
    row gives the same answers and projections as running every row in full. The full rows run
    once, on the scanned layout, and both layouts' shared-prefix runs are held to them (the
    unrolled one thereby across layouts, within the same tolerance)."""
    system = "You are a pirate captain. Answer every question in the voice of an old sea dog."
    iv = ivs.build(L, D, steer=[(vec(4, scale=6.0), LAYER, 1.0)])
    probes = np.stack([vec(5), vec(6)])
    sp = SamplingParams(max_new_tokens=12)
    kw = dict(system=system, sampling=sp, intervention=iv, probes=probes, batch_size=4)
    for mode in ("all", "response"):
        a = _generate(smollm2, PROMPTS[:3], positions=mode, unroll=unroll, **kw)
        if mode not in _FULL_ROWS:
            _FULL_ROWS[mode] = _generate(
                smollm2, PROMPTS[:3], positions=mode, share_prefix=False, unroll=False, **kw
            )
        b = _FULL_ROWS[mode]
        assert a.tokens == b.tokens
        for x, y in zip(a.prompt_projections + a.projections, b.prompt_projections + b.projections):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, atol=1e-4 * np.abs(y).max())
    ids = [smollm2.tokenizer(t)["input_ids"] for t in a.prompts]
    assert len(ids[0]) == a.prompt_projections[0].shape[1]
    assert prefix_bucket(pvjax.engine.prompt_split.common_prefix(ids)) == 24  # template and system


def test_compiles_are_bounded_by_buckets(smollm2):
    v = vec(9)
    sp = SamplingParams(max_new_tokens=8)
    generate(smollm2, ["Hi."], sampling=sp, batch_size=2)  # warm: bucket for short prompts
    before = compile_count()
    assert [prompt_bucket(n) for n in (3, 16, 17, 25, 33, 49, 65, 97, 129)] == [
        16,
        16,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
    ]
    assert [prefix_bucket(n) for n in (0, 15, 16, 30, 47, 200)] == [0, 0, 16, 24, 32, 192]
    for prompt, coef, mode, seed in [
        ("Hello there, friend.", 1.0, "all", 0),
        ("Yo", -2.0, "prompt", 1),
        ("What time is it?", 3.0, "response", 2),
    ]:
        iv = ivs.build(L, D, steer=[(vec(seed), 5 + seed, coef)], ablate=[(v, 3)])
        generate(smollm2, [prompt], sampling=sp, intervention=iv, positions=mode, batch_size=2)
    assert compile_count() - before <= 1  # the identity intervention and a real one share shapes
    generate(smollm2, ["A much longer prompt " * 8], sampling=sp, batch_size=2)
    assert compile_count() - before <= 2  # a new prompt bucket is one more program


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[""]), "prompt 0 is empty"),
        (dict(prompts=["hi " * 9000]), "context window"),
        (dict(probes=np.ones((2, 100))), "probes must be"),
        (dict(positions="middle"), "positions must be one of"),
        (dict(prompts="Hello"), "got a str; wrap a single prompt in a list"),
        (dict(prompts=[[]]), "prompt 0 is an empty conversation"),
        (dict(prompts=[[{"role": "user"}]]), "prompt 0 has a malformed message 0"),
        (dict(prompts=["Hi", 3]), "prompt 1 is a int"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(intervention=ivs.empty(L, D, batch=2)), "batch 2 .* 1 rows"),
        (dict(intervention=ivs.empty(L, 100)), "width 100"),
    ],
)
def test_bad_requests_fail_before_compute(smollm2, kwargs, message):
    kwargs = {"prompts": ["Hello"], **kwargs}
    with pytest.raises((InputError, ivs.InterventionError), match=message):
        generate(smollm2, kwargs.pop("prompts"), **kwargs)


def test_bad_vectors_fail_before_compute():
    with pytest.raises(ivs.InterventionError, match="width 100"):
        ivs.build(L, D, steer=[(np.ones(100), 3, 1.0)])
    with pytest.raises(ivs.InterventionError, match="outside 0..30"):
        ivs.build(L, D, steer=[(np.ones(D), 31, 1.0)])
    with pytest.raises(ivs.InterventionError, match="NaN"):
        ivs.build(L, D, steer=[(np.full(D, np.nan), 3, 1.0)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0), "top_p"),
        (dict(temperature=float("nan")), "temperature must be a finite"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=float("inf")), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
        (dict(stop="END"), "stop must be a tuple"),
        (dict(stop=("",)), "non-empty strings"),
    ],
)
def test_sampling_params_are_checked_when_made(kwargs, message):
    """Before any model is loaded: the CLI builds its SamplingParams first."""
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[1, -5, 3]], "prompt 0 holds token id -5, outside the vocabulary 0..49151"),
        ([[1, 2], [3, 49152]], "prompt 1 holds token id 49152"),
        ([[1.0, 2.0]], "prompt 0 must be integer token ids, got dtype float64"),
        ([np.array([1.7, 2.2])], "must be integer token ids"),
        ([1, 2, 3], "prompt 0 is a single id; wrap one sequence in a list"),
        ([[1, 2], []], "prompt 1 has no tokens"),
        ([[[1, 2]]], r"prompt 0 must be a flat list of token ids, got shape \(1, 2\)"),
    ],
)
def test_malformed_ids_fail_before_compute(smollm2, ids, message):
    """Negative ids used to wrap to other tokens, float ids were truncated."""
    before = compile_count()
    with pytest.raises(InputError, match=message):
        _generate_ids(smollm2, ids)
    assert compile_count() == before
