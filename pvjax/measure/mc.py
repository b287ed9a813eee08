"""Multiple-choice capability checks in the MMLU CSV layout, scored by next-token letter logprobs.

A file holds one item per line and no header (MMLU's own files have none): `question, A, B, C, D,
answer`, the answer a letter A-D. A first line that reads `question,A,B,C,D,answer` is taken as a
header and skipped. Any other malformed line is refused with the file and line named, before a
model runs.

Scoring (the usual zero-shot MMLU protocol, adapted to chat models): the question and its four
choices go in a user message that asks for the letter; the assistant turn opens with `Answer:`, and
the log-probabilities of the four next tokens ` A` ... ` D` are read from one forward pass. The
prediction is the most likely letter; accuracy is the share of items where it is the answer.

Every setting of a study (a steering coefficient at a layer, an ablation) is a row of the same
batched forward: `score` takes an intervention with one row per setting (batch S) and scores S x N
(setting, item) rows with per-row interventions, so a whole grid costs the compiles of one forward.

Shape legend: S settings, N items, B rows of a forward, T positions, V vocabulary, L hidden-state
rows, D width.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pvjax import interventions as ivs
from pvjax.errors import InputError
from pvjax.measure.causality import logits_at
from pvjax.model import default_positions, left_pad

LETTERS = ("A", "B", "C", "D")
INSTRUCTION = "Answer the following multiple-choice question with the letter of the correct choice."
ANSWER_PREFIX = "Answer:"
SHIPPED = "general"


class MCError(InputError):
    """A multiple-choice file that cannot be read; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS
    line: int = 0


def shipped_path(name: str = SHIPPED) -> Path:
    """A set shipped with pvjax (`pvjax/data/mc/<name>.csv`): general knowledge written for the
    project, for tests and the embedded-model demo."""
    return Path(str(resources.files("pvjax").joinpath("data", "mc", f"{name}.csv")))


def resolve(path: str) -> Path:
    """`path`, or a shipped set when it is a bare name such as "general"."""
    p = Path(path).expanduser()
    if not p.exists() and "/" not in str(path) and not str(path).endswith(".csv"):
        shipped = shipped_path(str(path))
        if shipped.is_file():
            return shipped
    return p


def read_items(path, limit: int = 0) -> list[Item]:
    """The items of an MMLU-layout CSV file (see the module docstring); `limit` > 0 keeps the first
    `limit`. Raises `MCError` naming the file and line of the first malformed row."""
    p = resolve(str(path))
    if not p.is_file():
        raise MCError(
            f"multiple-choice file {str(path)!r} does not exist"
            if not p.exists()
            else f"multiple-choice file {str(path)!r} is not a file"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MCError(f"{p}: not UTF-8 text ({e})") from None
    items = []
    reader = csv.reader(text.splitlines())
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if line == 1 and [c.strip().lower() for c in row] == [
            "question",
            "a",
            "b",
            "c",
            "d",
            "answer",
        ]:
            continue
        if len(row) != 6:
            raise MCError(
                f"{p} line {line}: expected 6 columns (question, A, B, C, D, answer letter), "
                f"got {len(row)}"
            )
        q, *choices, ans = (c.strip() for c in row)
        if not q:
            raise MCError(f"{p} line {line}: the question is empty")
        for letter, c in zip(LETTERS, choices):
            if not c:
                raise MCError(f"{p} line {line}: choice {letter} is empty")
        if ans.upper() not in LETTERS:
            raise MCError(f"{p} line {line}: the answer must be one of A, B, C, D, got {ans!r}")
        items.append(Item(q, tuple(choices), LETTERS.index(ans.upper()), line))
    if not items:
        raise MCError(f"{p}: no items")
    return items[:limit] if limit > 0 else items


def prompt_text(model, item: Item) -> str:
    """The chat-templated prompt, ending where the answer letter comes."""
    body = "\n".join(
        [INSTRUCTION, "", item.question]
        + [f"{letter}. {c}" for letter, c in zip(LETTERS, item.choices)]
    )
    return model.chat_text([{"role": "user", "content": body}]) + ANSWER_PREFIX


def letter_ids(model) -> np.ndarray:
    """The token ids of ` A` ... ` D` after `Answer:`; refused when a letter is not one token there
    (the score would then read only part of it)."""
    tok = model.tokenizer
    head = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    out = []
    for letter in LETTERS:
        ids = tok(f"{ANSWER_PREFIX} {letter}", add_special_tokens=False)["input_ids"]
        if ids[: len(head)] != head or len(ids) != len(head) + 1:
            raise MCError(
                f"{model.model_id}'s tokenizer does not write ' {letter}' after "
                f"{ANSWER_PREFIX!r} as one token; it cannot be scored by next-token logprobs"
            )
        out.append(ids[-1])
    return np.asarray(out, np.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _letter_logprobs(params, cfg, tokens_BT, mask_BT, positions_BT, iv, letters_4):
    logits = logits_at(params, cfg, tokens_BT, mask_BT, positions_BT, iv, "last")
    return jax.nn.log_softmax(logits[:, -1], axis=-1)[:, letters_4]


def score(
    model,
    items,
    *,
    intervention: ivs.Intervention | None = None,
    positions: str = "all",
    batch_size: int = 16,
) -> np.ndarray:
    """Letter log-probabilities `[S, N, 4]` of every item under every setting: `intervention` has
    batch S (one row per setting) or is None (S = 1, unsteered). Steering applies on `positions`
    (`all`, `prompt`: every prompt token, `response`: the last prompt token only, where the letter
    is read); ablation on every position."""
    from pvjax.engine.rows import take

    L, D = model.n_layers + 1, model.hidden_size
    iv = ivs.empty(L, D) if intervention is None else intervention
    S = iv.steer_vectors.shape[1]
    letters = jnp.asarray(letter_ids(model))
    seqs = [
        model.tokenizer(prompt_text(model, it), add_special_tokens=False)["input_ids"]
        for it in items
    ]
    ctx = model.config.max_position_embeddings
    for it, s in zip(items, seqs):
        if len(s) > ctx:
            raise MCError(
                f"item on line {it.line} holds {len(s)} tokens, past the context of "
                f"{model.model_id} ({ctx})"
            )
    # Rows (setting, item), longest items first so that each batch pads to its own longest prompt.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows = [(s, i) for i in order for s in range(S)]
    out = np.zeros((S, len(seqs), len(LETTERS)), np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        T = -(-max(len(seqs[i]) for _, i in chunk) // 32) * 32
        tokens, mask = left_pad([seqs[i] for _, i in chunk], T, batch_size)
        setting = np.array([s for s, _ in chunk] + [0] * (batch_size - len(chunk)))
        row_iv = take(iv, setting).with_masks(
            ivs.position_mask(positions, mask, T), jnp.asarray(mask, jnp.float32)
        )
        lp = np.asarray(
            _letter_logprobs(
                model.params,
                model.config,
                jnp.asarray(tokens),
                jnp.asarray(mask),
                default_positions(mask),
                row_iv,
                letters,
            )
        )
        for b, (s, i) in enumerate(chunk):
            out[s, i] = lp[b]
    return out


def accuracy(logprobs_SN4: np.ndarray, items) -> np.ndarray:
    """Share of items whose most likely letter is the answer, per setting `[S]`."""
    answers = np.asarray([it.answer for it in items])
    return (np.argmax(logprobs_SN4, axis=-1) == answers[None]).mean(axis=-1)


def p_correct(logprobs_SN4: np.ndarray, items) -> np.ndarray:
    """Mean probability of the right letter, renormalised over the four letters, per setting
    `[S]`."""
    answers = np.asarray([it.answer for it in items])
    p = np.exp(logprobs_SN4 - logprobs_SN4.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.take_along_axis(p, answers[None, :, None], axis=-1)[..., 0].mean(axis=-1)
