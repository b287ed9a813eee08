"""Batched generation with interventions and per-token monitoring, all inside one jitted program.

Shape legend: B batch, P prompt columns, S cache slots, N new-token budget, L = n_layers + 1
hidden-state rows, K probe vectors, V vocabulary, D hidden size.

Prompts are left-padded into a preallocated KV cache; the prefill and the decode loop
(`lax.while_loop`, stopping once every row is finished) run in a single compiled program. The
steering position mode is data, not a flag: it becomes a prefill mask `[B, P]` and a decode mask,
so changing a coefficient or a vector never recompiles, nor does the mode, but for one case: rows
with different interventions share their prompts under `response` steering alone (below), which
is another shape.

Shared prefixes: prompts of one batch that open with the same tokens (the chat template and a
system prompt: the usual case in persona work, where hundreds of questions share one instruction)
have that prefix run once, as a single row, and its keys and values copied into every row of the
cache; the rest of each prompt then attends to it. A study grid, where many settings ask the same
questions with `response` steering, runs each distinct question once instead
(`pvjax.engine.prompt_split` picks per batch). Exact (only the summation order of the attention
differs), and done only when the rows' interventions cannot tell the shared tokens apart.

Compiles are bounded by buckets (plus one program per sampling mode: greedy, plain sampling,
filtered sampling): prompt lengths are rounded up to the next of 16, 24, 32, 48, 64, 96, 128,
192, ... (powers of two and one and a half times them, `prompt_bucket`); a shared prefix is
rounded down to the same list (`prefix_bucket`, prefixes under 16 tokens are not shared); the
batch and the count of distinct prefixes to a power of two (at most `batch_size`), and
`max_new_tokens` to a multiple of 32. One program serves every request that falls in the same
buckets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pvjax import inputs
from pvjax.engine import mesh as generate_mesh
from pvjax.engine import prompt_split
from pvjax.engine.decode_loop import (
    PromptBatch,
    Sampler,
    Steering,
    compile_count,
    decode_params,
    decode_weights,
    run,
)
from pvjax.engine.prompt_split import prefix_bucket, prompt_bucket
from pvjax.engine.prompt_split import rows_bucket as _batch_bucket
from pvjax.errors import InputError
from pvjax.files.prompts import check_prompts
from pvjax.interventions import POSITION_MODES, Intervention, InterventionError, empty
from pvjax.model import default_positions, left_pad
from pvjax.models.layout import Scanned

__all__ = [
    "Generation",
    "GenerationError",
    "SamplingParams",
    "compile_count",
    "decode_params",
    "generate",
    "generate_ids",
    "prefix_bucket",
    "prefixes_shareable",
    "prompt_bucket",
    "render_prompts",
    "stop_token_ids",
]


class GenerationError(InputError):
    """A generation request that cannot run, found before any compute starts."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """`temperature == 0` is greedy; `top_k == 0` and `top_p == 1` switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return "filter" if self.top_k > 0 or self.top_p < 1 else "sample"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot run, at construction: before any model is loaded."""
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if (
                not isinstance(v, (int, float, np.integer, np.floating))
                or isinstance(v, bool)
                or not np.isfinite(v)
            ):
                raise GenerationError(f"{name} must be a finite number, got {v!r}")
        for name in ("top_k", "max_new_tokens", "min_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise GenerationError(f"{name} must be an integer, got {v!r}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise GenerationError(
                f"min_new_tokens must be in 0..max_new_tokens, got {self.min_new_tokens}"
            )
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise GenerationError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


@dataclasses.dataclass
class Generation:
    """Results in the order of the prompts. `tokens` holds the new ids, including the EOS token
    when one ended the answer (as transformers' `generate` does); `texts` are decoded without it
    and cut before any stop string. With probes, `projections[i]` is `[L, len(tokens[i]), K]` (the
    residual at each new token onto each probe) and `prompt_projections[i]` is `[L, P_i, K]`."""

    prompts: list[str]
    prompt_tokens: list[list[int]]
    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    projections: list[np.ndarray] | None = None
    prompt_projections: list[np.ndarray] | None = None


def _new_bucket(n: int) -> int:
    return -(-n // 32) * 32


def stop_token_ids(model) -> tuple[int, ...]:
    """EOS ids from the config, the tokenizer and a folder's `generation_config.json` (Llama 3.1
    ends turns with `<|eot_id|>`, which only the generation config names)."""
    ids = set(model.config.eos_token_ids)
    tok_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen_cfg = Path(model.source) / "generation_config.json"
    if model.source and gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(int(i) for i in ids))


def render_prompts(model, prompts, *, system: str | None = None, chat: bool = True) -> list[str]:
    """Prompt texts: a string is a user message (or raw text when `chat=False`), a list of
    `{"role", "content"}` dicts is a whole conversation; both go through the chat template."""
    out = []
    if system is not None and not isinstance(system, str):
        raise GenerationError(f"system must be a string, got a {type(system).__name__}")
    for p in check_prompts(prompts):
        if isinstance(p, str):
            if not chat:
                out.append(p)
                continue
            p = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": p}
            ]
        out.append(model.chat_text(p, add_generation_prompt=True))
    return out


def _masks(mode: str, mask_BP: np.ndarray):
    """(prefill mask [B, P], decode mask [1, 1]) for one position mode; see module docstring."""
    if mode not in POSITION_MODES:
        raise InterventionError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
    m = mask_BP.astype(np.float32)
    if mode == "response":
        m = np.zeros_like(m)
        m[:, -1] = 1.0
    return m, np.full((1, 1), 0.0 if mode == "prompt" else 1.0, np.float32)


def generate(
    model, prompts: Sequence, *, system: str | None = None, chat: bool = True, **kw
) -> Generation:
    """Answer every prompt: a string is a user message (raw text with `chat=False`), a list of
    `{"role", "content"}` dicts a conversation; `system` adds a system message to string prompts.
    The keywords are those of `generate_ids`, which runs the engine."""
    texts = render_prompts(model, prompts, system=system, chat=chat)
    ids = [model.tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    g = generate_ids(model, ids, **kw)
    g.prompts = texts
    return g


def generate_ids(
    model,
    ids: Sequence[Sequence[int]],
    *,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    intervention: Intervention | None = None,
    positions: str = "all",
    ablate_positions: str = "all",
    probes=None,
    batch_size: int = 16,
    unroll: bool = True,
    share_prefix: bool = True,
    progress: bool = False,
    mesh=None,
) -> Generation:
    """The engine, on token ids (see the module docstring; `Generation` for results).

    `intervention` has batch 1 (applies to every prompt) or one row per prompt (a coefficient
    sweep, or steered and unsteered twins, in one call). Steering applies on `positions`: `all`,
    `prompt` (prompt tokens, during the prefill), or `response` (the last prompt token and every
    new token, the reference implementation's semantics); ablation on `ablate_positions`.
    `probes` `[K, D]` or `[L, K, D]` asks for per-token projections of every row of
    `hidden_states`. The same `seed` gives the same texts. `unroll` picks the layer layout (see
    `decode_params`; default: unrolled). `share_prefix` runs a prefix common to a batch's prompts
    once (see the module docstring). A model without a tokenizer (random weights for benchmarks)
    returns empty texts.

    `mesh` (a `("data", "model")` `jax.sharding.Mesh`, `pvjax.parallel.sharding.make_mesh`) runs the
    batch over "data" and the weights and kv heads over "model" (see `pvjax.engine.mesh`); each
    batch is padded to a multiple of the data axis. Without it, one device, as before.
    """
    ids, intervention, probes = _check_request(
        model, ids, sampling, seed, intervention, positions, ablate_positions, probes, batch_size
    )
    if mesh is not None:
        generate_mesh.check_mesh(mesh)
    cfg = model.config

    stops = stop_token_ids(model)
    single = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in sampling.stop]
    stop_ids = jnp.asarray(sorted(set(stops) | {s[0] for s in single if len(s) == 1}), jnp.int32)
    pad_id = stops[0] if stops else 0
    base_key = jax.random.PRNGKey(seed)
    sampler = Sampler(
        keys_B2=None,
        temperature=jnp.float32(sampling.temperature),
        top_p=jnp.float32(sampling.top_p),
        top_k=jnp.int32(sampling.top_k),
        min_new=jnp.int32(sampling.min_new_tokens),
        max_new=jnp.int32(sampling.max_new_tokens),
        stop_ids=stop_ids,
        pad_id=jnp.int32(pad_id),
        mode=sampling.mode,
        n_new=_new_bucket(sampling.max_new_tokens),
    )

    if mesh is not None:
        params, prefill_params = generate_mesh.place_params(model, mesh, unroll)
        layout, prefill_layout = generate_mesh.layouts(unroll)
        generate_mesh.note_cache_layout(cfg, mesh, model.model_id)
    else:
        params, layout = decode_weights(model, unroll)
        # The prompt pass is compute bound (M = B*P rows). Off the CPU kernels, XLA's dots on the
        # stacked weights serve it as well as unrolled ones and compile faster; the packed kernel
        # is a little faster than XLA's dots there too (measured: 16 x 24 rows, 0.52-0.67 s
        # against 0.61-0.72 s).
        prefill_params, prefill_layout = (
            (params, layout) if layout.packed else (model.params, Scanned())
        )
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: dict[int, tuple] = {}
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc="generate", unit="prompt")
    # Fixed and closed-loop requests share one program (see pvjax.interventions).
    intervention = intervention.with_closed_loop()
    shareable = share_prefix and prefixes_shareable(intervention, positions, ablate_positions)
    for chunk in chunks:
        B = _batch_bucket(len(chunk), batch_size)
        if mesh is not None:
            B = generate_mesh.pad_batch(B, mesh)
        plan = prompt_split.split([ids[i] for i in chunk], shareable=shareable, max_rows=B)
        C, P = plan.width, plan.tail_width
        prefix, prefix_mask = (
            left_pad(plan.prefixes, C, plan.n_prefix_rows, pad_id)
            if C
            else (np.zeros((1, 0), np.int32), np.zeros((1, 0), np.int32))
        )
        head_len = [len(plan.prefixes[u]) if C else 0 for u in plan.prefix_of] + [0] * (
            B - len(chunk)
        )
        prefix_of = plan.prefix_of + [0] * (B - len(chunk))
        tokens, mask = left_pad(plan.tails, P, B, pad_id)
        pos = default_positions(mask) + np.asarray(head_len)[:, None]
        full_mask = np.concatenate([prefix_mask[prefix_of], mask], axis=1)
        steer_pre, steer_dec = _masks(positions, full_mask)
        abl_pre, abl_dec = _masks(ablate_positions, full_mask)
        keys = jnp.stack(
            [jax.random.fold_in(base_key, i) for i in chunk] + [base_key] * (B - len(chunk))
        )
        first = plan.first + [0] * (plan.n_prefix_rows - len(plan.first))
        batch = PromptBatch(
            prefix_UC=jnp.asarray(prefix),
            prefix_mask_UC=jnp.asarray(prefix_mask),
            prefix_of_B=jnp.asarray(prefix_of, jnp.int32),
            prefix_first_U=jnp.asarray(first, jnp.int32),
            tokens_BP=jnp.asarray(tokens),
            mask_BP=jnp.asarray(mask),
            positions_BP=pos,
        )
        sampler = dataclasses.replace(sampler, keys_B2=keys)
        steering = Steering(
            iv=intervention.take_rows(chunk, len(ids), B),
            prefill_masks=(jnp.asarray(steer_pre), jnp.asarray(abl_pre)),
            decode_masks=(jnp.asarray(steer_dec), jnp.asarray(abl_dec)),
        )
        if mesh is not None:
            batch, sampler, steering = generate_mesh.place_inputs(mesh, batch, sampler, steering)
        toks, p_proj, r_proj = run(
            params,
            layout,
            prefill_params,
            prefill_layout,
            cfg,
            batch,
            sampler,
            steering,
            probes,
            mesh,
        )
        toks = np.asarray(toks)
        p_proj = None if probes is None else np.asarray(p_proj)
        r_proj = None if probes is None else np.asarray(r_proj)
        for r, i in enumerate(chunk):
            new, reason = _trim(toks[r, : sampling.max_new_tokens].tolist(), set(stops), stop_ids)
            text = ""
            if model.tokenizer:
                text, new, reason = _cut_stop_strings(
                    model.tokenizer, new, reason, sampling.stop, set(stops)
                )
            pp = (
                None
                if p_proj is None
                else np.concatenate(
                    [p_proj[:, r, C - head_len[r] : C], p_proj[:, r, C + P - len(plan.tails[r]) :]],
                    axis=1,
                )
            )
            rp = None if r_proj is None else r_proj[:, r, : len(new)]
            results[i] = (text, new, reason, rp, pp)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    get = lambda k: [results[i][k] for i in range(len(ids))]
    return Generation(
        prompts=[""] * len(ids),
        prompt_tokens=ids,
        texts=get(0),
        tokens=get(1),
        finish_reasons=get(2),
        projections=None if probes is None else get(3),
        prompt_projections=None if probes is None else get(4),
    )


def prefixes_shareable(intervention: Intervention, positions: str, ablate_positions: str) -> bool:
    """Whether rows with the same prompt tokens before the last may share them (see
    `pvjax.engine.prompt_split`): true when one intervention serves every row, or when none acts
    before a prompt's last token (`response` steering, and ablation zero or on `response` too).
    A condition is read at each prompt's own last token, so under another position mode it tells
    every row's prompt apart."""
    if intervention.condition is not None and positions != "response":
        return False
    rows = dataclasses.replace(intervention, steer_mask=None, ablate_mask=None)
    if all(x.shape[1] == 1 for x in jax.tree_util.tree_leaves(rows)):
        return True
    ablation = bool(np.any(np.asarray(intervention.ablate_coefs)))
    return positions == "response" and (ablate_positions == "response" or not ablation)


def _check_request(
    model, ids, sampling, seed, intervention, positions, ablate_positions, probes, batch_size
):
    """Everything `generate_ids` is asked, checked before any compute: `(ids as lists of ints,
    the intervention (the identity if None), probes as a device array or None)`."""
    if not isinstance(sampling, SamplingParams):
        raise GenerationError(f"sampling must be a SamplingParams, got a {type(sampling).__name__}")
    sampling.validate()
    # PRNG keys hold 32 bits of seed: larger or negative seeds would alias others silently.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise GenerationError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise GenerationError(f"batch_size must be a positive integer, got {batch_size!r}")
    if sampling.stop and not model.tokenizer:
        raise GenerationError("stop strings need a tokenizer")
    cfg, L, D = model.config, model.n_layers + 1, model.hidden_size
    try:
        n = len(ids)
    except TypeError:
        raise GenerationError(
            f"ids must be a list of token-id lists, got a {type(ids).__name__}"
        ) from None
    if n == 0:
        raise GenerationError("no prompts to generate from")
    ids = inputs.token_lists(ids, cfg.vocab_size, "prompt")
    for i, seq in enumerate(ids):
        if len(seq) + sampling.max_new_tokens > cfg.max_position_embeddings:
            raise GenerationError(
                f"prompt {i} has {len(seq)} tokens; with max_new_tokens={sampling.max_new_tokens} "
                "it "
                f"exceeds the context window of {model.model_id} ({cfg.max_position_embeddings})"
            )
    if intervention is None:
        intervention = empty(L, D)
    elif not isinstance(intervention, Intervention):
        raise InterventionError(
            f"intervention must be an Intervention (see interventions.build), "
            f"got a {type(intervention).__name__}"
        )
    else:
        try:
            inputs.check_intervention_batch(intervention, len(ids), D, L, model.model_id)
        except InputError as e:
            raise InterventionError(str(e)) from None
    _masks(positions, np.ones((1, 1))), _masks(ablate_positions, np.ones((1, 1)))
    if probes is not None:
        probes = np.asarray(probes, np.float32)
        if (
            probes.shape[-1] != D
            or probes.ndim not in (2, 3)
            or (probes.ndim == 3 and probes.shape[0] != L)
        ):
            raise GenerationError(f"probes must be [K, {D}] or [{L}, K, {D}], got {probes.shape}")
        if not np.all(np.isfinite(probes)):
            raise GenerationError("probes contain NaN or infinite values")
        probes = jnp.asarray(probes)
    return ids, intervention, probes


def _trim(toks: list[int], eos: set[int], stop_ids) -> tuple[list[int], str]:
    stop_set = set(np.asarray(stop_ids).tolist())
    for j, t in enumerate(toks):
        if t in stop_set:
            return toks[: j + 1], "eos" if t in eos else "stop"
    return toks, "length"


def _cut_stop_strings(tokenizer, toks, reason, stop: Sequence[str], eos: set[int]):
    """Decode, then cut the text at the first stop string; the tokens are cut to the shortest
    prefix whose text already contains it."""
    body = toks[:-1] if toks and toks[-1] in eos else toks
    text = tokenizer.decode(body, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return text, toks, reason
    at, s = min(hits)
    for j in range(1, len(body) + 1):
        if s in tokenizer.decode(body[:j], skip_special_tokens=True):
            return text[:at], body[:j], "stop"
    return text[:at], toks, "stop"
