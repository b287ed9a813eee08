"""A judge-free check that a vector is causal: steer with it and watch the likelihood of the kept
trait answers rise against their anti-trait twins.

For a vector v at layer l and coefficients c, the margin is the mean over kept pairs of

    mean log p(pos answer | question, c v at l)  -  mean log p(neg answer | question, c v at l)

with per-token means (so answer length does not matter) and no system prompt: the vector alone must
carry the trait. A causal vector raises the margin monotonically as c goes from negative to positive.
Every coefficient of a layer runs as rows of one batch (per-row coefficients), one compiled program.

Shape legend: B rows, T positions, V vocabulary, L hidden-state rows, D width, C coefficients.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pvjax import interventions as ivs
from pvjax.capture import Capture
from pvjax.model import default_positions, left_pad
from pvjax.models.decoder import decode


@functools.partial(jax.jit, static_argnames=("cfg",))
def _answer_logprob(params, cfg, tokens_BT, mask_BT, positions_BT, iv, answer_BT):
    out = decode(params, cfg, tokens_BT, positions_BT, mask_BT, intervention=iv,
                 capture=Capture(logits="all", hidden=False))
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    w = answer_BT[:, 1:].astype(jnp.float32)
    return (lp * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)


def answer_logprobs(model, prompts: Sequence[str], answers: Sequence[str], *, vector=None, layer=0,
                    coefs: Sequence[float] = (0.0,), positions: str = "response",
                    batch_size: int = 8) -> np.ndarray:
    """Mean per-token log-probability `[C, N]` of each answer after its (chat-templated) prompt,
    steered by `coef * vector` at `layer` on `positions` for every coefficient."""
    tok = model.tokenizer
    L, D = model.n_layers + 1, model.hidden_size
    seqs, starts = [], []
    for p, a in zip(prompts, answers):
        head = tok(p, add_special_tokens=False)["input_ids"]
        seqs.append(tok(p + a, add_special_tokens=False)["input_ids"])
        starts.append(len(head))
    rows = [(c, i) for c in range(len(coefs)) for i in range(len(seqs))]
    T = -(-max(map(len, seqs)) // 64) * 64
    if T > model.config.max_position_embeddings:
        raise ValueError(f"an answer of {T} tokens exceeds the context window of {model.model_id}")
    v = np.zeros(D, np.float32) if vector is None else np.asarray(vector, np.float32)
    out = np.zeros((len(coefs), len(seqs)), np.float32)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        tokens, mask = left_pad([seqs[i] for _, i in chunk], T, batch_size)
        answer = np.zeros((batch_size, T), np.int32)
        row_coefs = np.zeros(batch_size, np.float32)
        for b, (c, i) in enumerate(chunk):
            answer[b, T - len(seqs[i]) + starts[i]:] = 1
            row_coefs[b] = coefs[c]
        iv = ivs.build(L, D, steer=[(v, layer, row_coefs)], batch=batch_size)
        end = np.array([T - len(seqs[i]) + starts[i] for _, i in chunk] + [T] * (batch_size - len(chunk)))
        iv = iv.with_masks(ivs.position_mask(positions, mask, end))
        lp = np.asarray(_answer_logprob(model.params, model.config, jnp.asarray(tokens), jnp.asarray(mask),
                                        default_positions(mask), iv, jnp.asarray(answer)))
        for b, (c, i) in enumerate(chunk):
            out[c, i] = lp[b]
    return out


def likelihood_margins(model, vectors_LD, layers: Sequence[int], coefs: Sequence[float],
                       questions: Sequence[str], pos_answers: Sequence[str], neg_answers: Sequence[str],
                       *, positions: str = "response", batch_size: int = 8) -> dict:
    """`margins[layer][c]` as in the module docstring, with `monotonic` and least-squares `slope`
    per layer."""
    prompts = [model.chat_text([{"role": "user", "content": q}]) for q in questions]
    result = {"coefs": list(map(float, coefs)), "layers": {}}
    for layer in layers:
        lp = answer_logprobs(model, prompts * 2, list(pos_answers) + list(neg_answers),
                             vector=vectors_LD[layer], layer=layer, coefs=coefs, positions=positions,
                             batch_size=batch_size)
        n = len(pos_answers)
        margin = (lp[:, :n] - lp[:, n:]).mean(axis=1)
        slope = float(np.polyfit(np.asarray(coefs, float), margin, 1)[0]) if len(coefs) > 1 else 0.0
        result["layers"][int(layer)] = {"margins": [float(m) for m in margin], "slope": slope,
                                        "monotonic": bool(np.all(np.diff(margin) > 0))}
    return result
