"""Every model entry point refuses malformed input on the host, before anything is traced:
`forward`/`activations` (token dtype, range, raggedness, emptiness, mask/positions/segment shapes,
the intervention's batch), `packing.pooled_activations` and `causality.likelihood_margins`.
A tiny random model is enough: nothing here reaches the compiled program."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pvjax
from pvjax import interventions as ivs
from pvjax.errors import InputError, UserError
from pvjax.loading.layout import expected_shapes
from pvjax.measure import causality
from pvjax.measure.packing import pack, pooled_activations
from pvjax.model import _forward
from pvjax.models.config import ModelConfig

CFG = ModelConfig(
    architecture="llama",
    vocab_size=100,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    name="tiny",
)
L, D = 3, 16


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    shapes = expected_shapes(CFG)
    leaf = lambda shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
    params = {k: leaf(v) for k, v in shapes["top"].items()}
    params["layers"] = {k: leaf((CFG.num_layers,) + v) for k, v in shapes["layer"].items()}
    return pvjax.Model(CFG, params, tokenizer=None)


OK = [[1, 2, 3]]


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        ([[1, -2, 3]], {}, "token id -2, outside the vocabulary 0..99"),
        ([[1, 100]], {}, "token id 100, outside the vocabulary 0..99"),
        (jnp.array([[1, -1]]), {}, "token id -1"),
        ([[1.0, 2.0]], {}, "must be integer token ids, got dtype float64"),
        (jnp.array([[1.5, 2.0]]), {}, "must be integer token ids, got dtype float32"),
        ([[True, False]], {}, "must be integer token ids, got dtype bool"),
        ([[1, 2], [3]], {}, "ragged"),
        ([[]], {}, "empty"),
        ("Hello", {}, "got a str"),
        (np.zeros((1, 2, 3), int), {}, "must be \\[batch, length\\]"),
        (np.ones((1, 65), int), {}, "longer than the context window of tiny \\(64\\)"),
        (
            OK,
            dict(attention_mask=[[1, 1]]),
            "attention_mask has shape \\(1, 2\\), the tokens \\(1, 3\\)",
        ),
        (OK, dict(attention_mask=[[1, 2, 1]]), "attention_mask must hold only 0 and 1"),
        (OK, dict(positions=[[0.0, 1.0, 2.0]]), "positions must be integers"),
        (OK, dict(positions=[[0, 1]]), "positions has shape"),
        (OK, dict(segment_ids=[[1, 1, 1]]), "need explicit positions"),
        (OK, dict(segment_ids=[[1, 1]], positions=[[0, 1, 2]]), "segment_ids has shape"),
        (
            OK,
            dict(intervention=ivs.empty(L, D, batch=2)),
            "intervention has batch 2 .* the input has 1 rows",
        ),
        (
            OK,
            dict(intervention=ivs.empty(L + 1, D)),
            "intervention has 4 rows but tiny has n_layers\\+1 = 3",
        ),
        (OK, dict(intervention=ivs.empty(L, D + 1)), "intervention width 17"),
        (
            OK,
            dict(intervention=ivs.empty(L, D).with_masks(jnp.ones((1, 5)))),
            "steer_mask has shape \\(1, 5\\)",
        ),
    ],
)
def test_forward_refuses_malformed_input_before_tracing(tiny, tokens, kwargs, message):
    before = _forward._cache_size()
    with pytest.raises(InputError, match=message):
        pvjax.forward(tiny, tokens, **kwargs)
    with pytest.raises(InputError, match=message):
        pvjax.activations(tiny, tokens, **kwargs)
    assert _forward._cache_size() == before


def test_well_formed_input_still_runs(tiny):
    """Numpy and device arrays of any integer dtype; a batch-1 intervention
    broadcasts over two rows; a 0/1 float mask and [1, T] positions are accepted."""
    ids = np.array([[5, 6, 7], [8, 9, 10]], np.int64)
    base = pvjax.forward(tiny, ids).logits
    assert base.shape == (2, 3, 100)
    iv = ivs.build(L, D, steer=[(np.ones(D), 1, 0.0)])
    same = pvjax.forward(
        tiny,
        jnp.asarray(ids, jnp.int32),
        intervention=iv,
        attention_mask=np.ones((2, 3)),
        positions=[[0, 1, 2]],
    ).logits
    np.testing.assert_array_equal(np.asarray(same), np.asarray(base))


def test_intervention_coefficients_must_be_finite_and_fit_the_batch():
    """A NaN coefficient used to make every logit NaN; a wrong-length sequence is not broadcast."""
    v = np.ones(D)
    for bad, message in [
        (dict(steer=[(v, 1, float("nan"))]), "steering coefficient must be finite"),
        (dict(steer=[(v, 1, [0.0, np.inf])], batch=2), "steering coefficient must be finite"),
        (dict(steer=[(v, 1, 1e39)]), "must be finite"),
        (dict(ablate=[(v, 1, float("nan"))]), "ablation strength must be finite"),
        (
            dict(steer=[(v, 1, [1.0, 2.0])], batch=3),
            "shape \\(2,\\): give one number, or one per batch row",
        ),
        (dict(steer=[(v, 1, [[1.0]])]), "shape \\(1, 1\\)"),
        (dict(steer=[(v, 1.5, 1.0)]), "layer 1.5 is not an integer"),
        (dict(steer=[(v, 1)]), "each steer item is \\(vector, layer, coef\\)"),
        (dict(steer=[(v, 1, 1.0)], batch=0), "batch must be a positive integer"),
        (dict(steer=[(np.ones((2, L, D)), 1, 1.0)]), "must be \\[D\\] or \\[n_layers\\+1, D\\]"),
    ]:
        with pytest.raises(ivs.InterventionError, match=message):
            ivs.build(L, D, **bad)
    assert ivs.build(L, D, steer=[(v, 1, [1.0, 2.0, 3.0])], batch=3).steer_coefs.shape == (L, 3)


def test_pooled_activations_checks_sequences(tiny):
    with pytest.raises(InputError, match="sequence 1 holds token id -3"):
        pooled_activations(tiny, [[1, 2], [-3, 4]], [1, 1])
    with pytest.raises(InputError, match="sequence 0 must be integer token ids"):
        pooled_activations(tiny, [[1.0, 2.0]], [1])
    with pytest.raises(InputError, match="sequence 1 has no tokens"):
        pooled_activations(tiny, [[1, 2], []], [1, 1])
    with pytest.raises(InputError, match="2 sequences but 1 prompt lengths"):
        pack([[1, 2], [3, 4]], [1])
    with pytest.raises(InputError, match="prompt length 1.5"):
        pack([[1, 2]], [1.5])
    with pytest.raises(InputError, match="sequence 0 has 65 tokens, past the context window"):
        pooled_activations(tiny, [[1] * 65], [3])


def test_likelihood_margins_checks_its_lists(tiny):
    vec = np.ones((L, D), np.float32)
    q, a = ["Why?"], ["Because."]
    for args, kwargs, message in [
        ((vec, [1], [0.0], "Why?", a, a), {}, "questions must be a list of strings"),
        ((vec, [1], [0.0], q, a, a + a), {}, "1 questions, 1 pos answers and 2 neg answers"),
        ((vec, [1], [0.0], [], [], []), {}, "questions is empty"),
        (
            (vec, [1], [float("nan")], q, a, a),
            {},
            "coefs must be a non-empty list of finite numbers",
        ),
        ((vec, [-1], [0.0], q, a, a), {}, "layer -1 is not a hidden_states index in 0..2"),
        ((vec, [3], [0.0], q, a, a), {}, "layer 3 is not"),
        ((vec[0], [1], [0.0], q, a, a), {}, "vectors_LD has shape \\(16,\\)"),
    ]:
        with pytest.raises(InputError, match=message):
            causality.likelihood_margins(tiny, *args, **kwargs)
    with pytest.raises(InputError, match="2 prompts but 1 answers"):
        causality.answer_logprobs(tiny, ["a", "b"], ["c"])
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        causality.answer_logprobs(tiny, ["a"], ["c"], batch_size=0)


def test_every_input_error_is_a_user_error_and_a_value_error():
    """The CLI catches UserError; library callers that caught ValueError still do."""
    from pvjax.engine.generate import GenerationError
    from pvjax.files.traits import TraitError
    from pvjax.files.vectors import VectorError
    from pvjax.loading.layout import CheckpointError
    from pvjax.models.config import ConfigError

    for cls in (
        InputError,
        ConfigError,
        CheckpointError,
        ivs.InterventionError,
        GenerationError,
        VectorError,
        TraitError,
    ):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
