"""A model's own answers to many prompts, generated in one batched call and kept on disk.

Screening compares each training answer with the base model's own answer to the same prompt, and
the finetuning shift compares two models' answers to the eval questions; both ask for the same
answers again on every rerun and across datasets. `own_answers` generates only the prompts the
cache lacks, in one `generate_ids` call, and rewrites the cache file atomically with the union.

A cache file is keyed by what fixes the answers: the model's weights (`weights_fingerprint`: its
config fingerprint, dtype, and a strided sample of every parameter, so a finetune of the same
shape gets its own file), the sampling settings and the seed. Inside, answers are keyed by a hash
of the rendered prompt text. Greedy answers are a function of the prompt; sampled ones also depend
on which other prompts shared the call (the engine folds the prompt's index in the call into its
PRNG key), so a sampled cache holds the draw that was made, reproducible only with the same call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from pvjax.files import atomic

FORMAT = "pvjax.answer_cache/1"
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_fingerprint(model) -> str:
    """A short hash of the model's config fingerprint, dtype and a strided sample of every
    parameter (up to 16 indices per axis): cheap even for a 7B model, and it tells a finetune
    from its base, which the config fingerprint (shapes only) cannot."""
    if model not in _FINGERPRINTS:
        _FINGERPRINTS[model] = _fingerprint(model)
    return _FINGERPRINTS[model]


def _fingerprint(model) -> str:
    h = hashlib.sha256(model.config.fingerprint().encode())
    h.update(str(model.dtype).encode())
    for path, x in sorted(
        jax.tree_util.tree_leaves_with_path(model.params), key=lambda t: str(t[0])
    ):
        shape = getattr(x, "shape", None)
        if shape is None:  # packed kernel weights and other non-arrays carry no new information
            continue
        index = tuple(slice(None, None, max(1, n // 16)) for n in shape)
        h.update(str(path).encode())
        h.update(np.asarray(jax.device_get(x[index]), np.float32).tobytes())
    return h.hexdigest()[:16]


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(cache_dir, weights: str, sampling, seed: int) -> Path:
    """The file for (weights fingerprint, sampling settings, seed) under `cache_dir`."""
    blob = json.dumps(
        {"weights": weights, "sampling": dataclasses.asdict(sampling), "seed": int(seed)},
        sort_keys=True,
    )
    return Path(cache_dir) / f"answers_{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


@dataclasses.dataclass(frozen=True)
class OwnAnswers:
    """`texts[i]` and `n_tokens[i]` answer `prompts[i]`; `generated` counts the prompts generated
    by this call (0 when the cache held them all); `path` is the cache file."""

    texts: list[str]
    n_tokens: list[int]
    finish_reasons: list[str]
    generated: int
    path: Path


def own_answers(
    model,
    prompt_texts: Sequence[str],
    sampling,
    *,
    cache_dir,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> OwnAnswers:
    """The model's answers to already rendered prompt texts (chat template included), from the
    cache where present, the rest generated in one batched call (duplicates once). The caller
    keeps prompts that do not fit the context out (generation refuses them)."""
    from pvjax.engine.generate import generate_ids

    weights = weights_fingerprint(model)
    path = cache_path(cache_dir, weights, sampling, seed)
    cache = (
        json.loads(path.read_text())
        if path.is_file()
        else {
            "format": FORMAT,
            "model": model.model_id,
            "weights": weights,
            "sampling": dataclasses.asdict(sampling),
            "seed": int(seed),
            "answers": {},
        }
    )
    keys = [prompt_key(t) for t in prompt_texts]
    todo = list(dict.fromkeys(k for k in keys if k not in cache["answers"]))
    if todo:
        first = {k: t for k, t in zip(reversed(keys), reversed(list(prompt_texts)))}
        ids = [model.tokenizer(first[k], add_special_tokens=False)["input_ids"] for k in todo]
        g = generate_ids(
            model, ids, sampling=sampling, seed=seed, batch_size=batch_size, progress=progress
        )
        for k, text, toks, why in zip(todo, g.texts, g.tokens, g.finish_reasons):
            cache["answers"][k] = {"answer": text, "n_tokens": len(toks), "finish": why}
        atomic.write_json(path, cache)
    got = [cache["answers"][k] for k in keys]
    return OwnAnswers(
        [a["answer"] for a in got],
        [a["n_tokens"] for a in got],
        [a["finish"] for a in got],
        len(todo),
        path,
    )
