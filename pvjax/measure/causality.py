"""A judge-free check that a vector is causal: steer with it and watch the likelihood of the kept
trait answers rise against their anti-trait twins.

For a vector v at layer l and coefficients c, the margin is the mean over kept pairs of

    mean log p(pos answer | question, c v at l)  -  mean log p(neg answer | question, c v at l)

with per-token means (so answer length does not matter) and no system prompt: the vector alone must
carry the trait. A causal vector raises the margin monotonically as c goes from negative to
positive. Every coefficient of a layer runs as rows of one batch (per-row coefficients), one
compiled program.

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
from pvjax.errors import InputError
from pvjax.files.vectors import check_rows
from pvjax.model import left_pad
from pvjax.models import decoder
from pvjax.models.layout import Scanned


def logits_at(params, cfg, tokens_BT, mask_BT, positions_BT, iv, where: str):
    """The logits alone (no hidden rows) at `where` (`Capture.logits`: "last", "tail:N") under
    `iv`, stacked weights: what the likelihood and multiple-choice scores read (traceable)."""
    capture = Capture(logits=where, hidden=False)
    out = decoder.forward(
        params, cfg, Scanned(), tokens_BT, positions_BT, mask_BT, intervention=iv, capture=capture
    )
    return out.logits


@functools.partial(jax.jit, static_argnames=("cfg", "tail"))
def answer_logprob(params, cfg, tokens_BT, mask_BT, positions_BT, iv, answer_BT, tail):
    """Rows are left-padded, so every answer lies in the last `tail` columns: the head and the
    softmax run there only (measured on SmolLM2: the head is a fifth of the forward's FLOPs at
    T=128 and the [B, T, V] softmax as much again)."""
    logits = logits_at(params, cfg, tokens_BT, mask_BT, positions_BT, iv, f"tail:{tail + 1}")
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logp, tokens_BT[:, -tail:, None], axis=-1)[..., 0]
    w = answer_BT[:, -tail:].astype(jnp.float32)
    return (lp * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)


def tokenize_answers(tok, prompts, answers) -> tuple[list[list[int]], list[int]]:
    """The ids of each `prompt + answer` and where its answer starts (the prompt's own length)."""
    seqs = [tok(p + a, add_special_tokens=False)["input_ids"] for p, a in zip(prompts, answers)]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return seqs, starts


def answer_batch(seqs, starts, idx, T: int, B: int):
    """Rows `idx` of `seqs` left-padded into `[B, T]`: tokens, mask, the answer mask (1 from each
    row's answer on) and each row's first answer column (`T` for filler rows)."""
    tokens, mask = left_pad([seqs[i] for i in idx], T, B)
    answer = np.zeros((B, T), np.int32)
    end = np.full(B, T)
    for b, i in enumerate(idx):
        end[b] = T - len(seqs[i]) + starts[i]
        answer[b, end[b] :] = 1
    return tokens, mask, answer, end


def logprob_rows(params, cfg, batch, iv, *, tail, out, cells, put=jnp.asarray) -> None:
    """`answer_logprob` of a host `batch` (`answer_batch`'s tokens, mask, answer mask) written to
    `out` at `cells` (one `(setting, answer)` index per real row); `put` places each array (on a
    mesh, `sharding.put_rows`)."""
    tokens_BT, mask_BT, answer_BT = batch
    positions = put(_positions(mask_BT))
    lp = answer_logprob(
        params, cfg, put(tokens_BT), put(mask_BT), positions, iv, put(answer_BT), tail=tail
    )
    out[tuple(np.transpose(cells))] = np.asarray(lp)[: len(cells)]


def answer_logprobs(
    model,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    vector=None,
    layer=0,
    coefs: Sequence[float] = (0.0,),
    positions: str = "response",
    batch_size: int = 8,
    mesh=None,
) -> np.ndarray:
    """Mean per-token log-probability `[C, N]` of each answer after its (chat-templated) prompt,
    steered by `coef * vector` at `layer` on `positions` for every coefficient.

    On a `mesh` (`pvjax.parallel.sharding.make_mesh`) each batch's rows are split over "data"
    (`batch_size` rounded up to a multiple of it, the extra rows filler) and the parameters laid out
    by
    `pvjax.parallel.sharding`'s rule table; equal to one device up to float summation order."""
    from pvjax.parallel import sharding

    tok = model.tokenizer
    L, D = model.n_layers + 1, model.hidden_size
    _check_texts(prompts=prompts, answers=answers)
    if len(prompts) != len(answers):
        raise InputError(
            f"{len(prompts)} prompts but {len(answers)} answers: one answer per prompt"
        )
    _check_coefs(coefs)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    seqs, starts = tokenize_answers(tok, prompts, answers)
    rows = [(c, i) for c in range(len(coefs)) for i in range(len(seqs))]
    # 32-token buckets: a compile per width, but less padding, which costs full forwards.
    T = -(-max(map(len, seqs)) // 32) * 32
    tail = min(T - 1, -(-max(len(s) - st for s, st in zip(seqs, starts)) // 32) * 32)
    if T > model.config.max_position_embeddings:
        i = max(range(len(seqs)), key=lambda i: len(seqs[i]))
        raise InputError(
            f"prompt and answer {i} hold {len(seqs[i])} tokens, padded to {T}: past the "
            f"context window of {model.model_id} ({model.config.max_position_embeddings})"
        )
    v = np.zeros(D, np.float32) if vector is None else np.asarray(vector, np.float32)
    B = sharding.pad_batch(batch_size, mesh)  # rows per forward; batch_size of them carry answers
    params = model.params if mesh is None else sharding.placed_params(model, mesh)
    out = np.zeros((len(coefs), len(seqs)), np.float32)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        tokens, mask, answer, end = answer_batch(seqs, starts, [i for _, i in chunk], T, B)
        row_coefs = np.zeros(B, np.float32)
        row_coefs[: len(chunk)] = [coefs[c] for c, _ in chunk]
        iv = ivs.build(L, D, steer=[(v, layer, row_coefs)], batch=B)
        iv = iv.with_masks(ivs.position_mask(positions, mask, end))
        put = (lambda x: sharding.put_rows(x, mesh)) if mesh is not None else jnp.asarray
        batch = (tokens, mask, answer)
        logprob_rows(params, model.config, batch, iv, tail=tail, out=out, cells=chunk, put=put)
    return out


def likelihood_margins(
    model,
    vectors_LD,
    layers: Sequence[int],
    coefs: Sequence[float],
    questions: Sequence[str],
    pos_answers: Sequence[str],
    neg_answers: Sequence[str],
    *,
    positions: str = "response",
    batch_size: int = 8,
    mesh=None,
) -> dict:
    """`margins[layer][c]` as in the module docstring, with `monotonic` and least-squares `slope`
    per layer; on a `mesh` as `answer_logprobs` runs there."""
    _check_texts(questions=questions, pos_answers=pos_answers, neg_answers=neg_answers)
    if len(pos_answers) != len(questions) or len(neg_answers) != len(questions):
        raise InputError(
            f"{len(questions)} questions, {len(pos_answers)} pos answers and "
            f"{len(neg_answers)} neg answers: every question needs one of each"
        )
    _check_coefs(coefs)
    check_rows(vectors_LD, model, "vectors_LD", InputError)
    L = model.n_layers + 1
    layers = list(layers)
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not 0 <= l < L:
            raise InputError(f"layer {l!r} is not a hidden_states index in 0..{L - 1}")
    prompts = [model.chat_text([{"role": "user", "content": q}]) for q in questions]
    result = {"coefs": list(map(float, coefs)), "layers": {}}
    for layer in layers:
        lp = answer_logprobs(
            model,
            prompts * 2,
            list(pos_answers) + list(neg_answers),
            vector=vectors_LD[layer],
            layer=layer,
            coefs=coefs,
            positions=positions,
            batch_size=batch_size,
            mesh=mesh,
        )
        n = len(pos_answers)
        margin = (lp[:, :n] - lp[:, n:]).mean(axis=1)
        slope = float(np.polyfit(np.asarray(coefs, float), margin, 1)[0]) if len(coefs) > 1 else 0.0
        result["layers"][int(layer)] = {
            "margins": [float(m) for m in margin],
            "slope": slope,
            "monotonic": bool(np.all(np.diff(margin) > 0)),
        }
    return result


def _positions(mask_BT: np.ndarray) -> np.ndarray:
    """`pvjax.model.default_positions` on the host, so the rows can be placed before the forward."""
    return np.maximum(np.cumsum(mask_BT, axis=-1) - 1, 0).astype(np.int32)


def _check_texts(**lists) -> None:
    """Each named argument is a non-empty list of strings (a bare string would be iterated as
    one text per character)."""
    for name, texts in lists.items():
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError(f"{name} must be a list of strings")
        if not texts:
            raise InputError(f"{name} is empty")


def _check_coefs(coefs) -> None:
    c = np.asarray(coefs, dtype=np.float64)
    if c.ndim != 1 or not len(c) or not np.all(np.isfinite(c)):
        raise InputError(f"coefs must be a non-empty list of finite numbers, got {coefs!r}")
