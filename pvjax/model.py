"""`pvjax.load` and `pvjax.forward`: the public entry points to the models.

Shape legend: B batch, T positions, L = n_layers + 1 hidden-state rows, D hidden size, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pvjax import inputs
from pvjax.capture import Capture, ForwardOutput, activations_only
from pvjax.errors import InputError
from pvjax.interventions import Intervention
from pvjax.models import decoder
from pvjax.models.config import ModelConfig
from pvjax.models.layout import Scanned, Sliced


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """An immutable bundle: config, parameter pytree (numpy or jax arrays) and tokenizer, and how
    its chat template is rendered: `enable_thinking`, the value given to a template with a
    thinking switch (Qwen3's; off by default: persona work reads answers, not reasoning)."""

    config: ModelConfig
    params: Any
    tokenizer: Any
    source: str = ""
    enable_thinking: bool = False

    @property
    def n_layers(self) -> int:
        return self.config.num_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def model_id(self) -> str:
        return self.config.name or Path(self.source).name

    def chat_text(
        self,
        messages,
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> str:
        """The chat-templated prompt (`pvjax.loading.tokenizer.render_chat`): Qwen3's thinking
        as `enable_thinking` says (None: the model's own setting, off unless loaded with it on),
        a system prompt folded into the first user turn where the template has no system role
        (Gemma 2); `chat_conventions()` says which applied."""
        from pvjax.loading.tokenizer import render_chat

        return render_chat(
            self.tokenizer,
            messages,
            add_generation_prompt=add_generation_prompt,
            model_name=self.model_id,
            enable_thinking=self.enable_thinking if enable_thinking is None else enable_thinking,
        )

    def chat_conventions(self, *, enable_thinking: bool | None = None) -> dict:
        """What the chat rendering changes for this model's template, for provenance:
        `{"system_folded": bool, "enable_thinking": bool or None}` (None: no thinking switch)."""
        from pvjax.loading.tokenizer import chat_conventions

        think = self.enable_thinking if enable_thinking is None else enable_thinking
        return chat_conventions(self.tokenizer, enable_thinking=think)

    def replace(self, **kw) -> "Model":
        return dataclasses.replace(self, **kw)


def default_dtype():
    """float32 on CPU (exact parity, and CPUs gain nothing from bf16); bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load(
    source: str | os.PathLike,
    *,
    dtype=None,
    tokenizer=None,
    mesh=None,
    enable_thinking: bool = False,
) -> Model:
    """Load a model from a local Hugging Face folder (config.json + safetensors, sharded or not), a
    `.gguf` file (dequantized), or the name `smollm2-135m-instruct` (the embedded model).

    With `mesh` (a ("data", "model") `jax.sharding.Mesh`, `pvjax.parallel.sharding.make_mesh`), each
    weight goes from host memory straight to its devices, laid out by
    `pvjax.parallel.sharding.spec_for` (each device receives only its shard): a model too big for
    one device loads without a whole copy on the first device.

    The tokenizer comes with the source (a folder's tokenizer files, a GGUF's metadata) unless
    `tokenizer` names another source (folder, `.gguf`, embedded name) or is a tokenizer object. A
    folder of weights without tokenizer files loads with a `MissingTokenizer`: token ids work,
    the first call that needs text says what to pass. `enable_thinking` is what the model's
    chat template gets for a thinking switch (Qwen3's), wherever pvjax renders a chat."""
    from pvjax.loading import resolve_source
    from pvjax.loading import tokenizer as toks
    from pvjax.loading.embedded import EMBEDDED_NAME

    dtype = jnp.dtype(dtype or default_dtype())
    kind, path = resolve_source(source)
    if kind == "gguf":
        from pvjax.loading.gguf_file import load_gguf

        cfg, params, reader = load_gguf(path, dtype)
        if str(source) == EMBEDDED_NAME:
            cfg = dataclasses.replace(cfg, name=EMBEDDED_NAME)
    else:
        from pvjax.loading.safetensors_folder import load_folder

        cfg, params = load_folder(path, dtype)
    if tokenizer is None:
        tok = (
            toks.load_gguf_tokenizer(reader) if kind == "gguf" else toks.load_folder_tokenizer(path)
        )
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = toks.load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    toks.check_fits(tok, cfg.vocab_size, cfg.name or str(source), tokenizer or path)
    if mesh is None:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        from pvjax.parallel import sharding

        mesh = sharding.check_mesh(mesh)
        params = jax.tree_util.tree_map_with_path(
            lambda keys, x: jax.device_put(
                x,
                jax.sharding.NamedSharding(
                    mesh, sharding.spec_for(sharding._path(keys), np.shape(x), mesh.shape)
                ),
            ),
            params,
        )
    return Model(
        config=cfg,
        params=params,
        tokenizer=tok,
        source=str(path),
        enable_thinking=bool(enable_thinking),
    )


def default_positions(attention_mask_BT) -> jax.Array:
    """Positions counted over real tokens only, so left padding does not shift a prompt's rotary
    phases (what transformers' `generate` does; its plain forward uses arange unless told)."""
    m = jnp.asarray(attention_mask_BT, jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def left_pad(seqs, width: int, batch: int | None = None, pad_id: int = 0):
    """Token lists into `(tokens, mask)` `[batch, width]` int32, right-aligned. Rows past
    `len(seqs)` are fillers that hold one token, so no row is fully masked (fixed batch shapes
    mean one compiled program; a fully masked row would attend to nothing)."""
    batch = len(seqs) if batch is None else batch
    tokens = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for r, seq in enumerate(seqs):
        if len(seq):
            tokens[r, width - len(seq) :], mask[r, width - len(seq) :] = seq, 1
    mask[len(seqs) :, -1] = 1
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("cfg", "scan"))
def _forward(
    params, cfg, tokens, attention_mask, positions, intervention, capture, segment_ids, scan
):
    layout = Scanned() if scan else Sliced()
    return decoder.forward(
        params,
        cfg,
        layout,
        tokens,
        positions,
        attention_mask,
        intervention=intervention,
        capture=capture,
        segment_ids_BT=segment_ids,
    )


def forward(
    model: Model,
    tokens,
    *,
    attention_mask=None,
    positions=None,
    intervention: Intervention | None = None,
    capture: Capture = Capture(),
    segment_ids=None,
    scan: bool = True,
) -> ForwardOutput:
    """Run the model on token ids `[B, T]` (left padding marked by `attention_mask` zeros).

    Returns `ForwardOutput(logits [B, T, V] float32, hidden_states [L, B, T, D], pooled,
    projections)`; which fields are filled is set by `capture`. `hidden_states` follows
    transformers'
    `output_hidden_states`: row 0 the embeddings, row l the output of block l, the last row after
    the final norm. Positions default to `default_positions(attention_mask)`. `segment_ids`
    `[B, T]` (0 = padding) packs several sequences in a row; see `pvjax.measure.packing`.
    """
    tokens = _check_tokens(model, tokens)
    B, T = tokens.shape
    if segment_ids is not None:
        segment_ids = inputs.per_token(segment_ids, (B, T), "segment_ids", integer=True)
        if positions is None:
            raise InputError(
                "packed rows (segment_ids) need explicit positions; see pvjax.measure.packing"
            )
    if attention_mask is not None:
        attention_mask = inputs.per_token(attention_mask, (B, T), "attention_mask", integer=False)
        inputs.check_mask_values(attention_mask)
    elif segment_ids is not None:
        attention_mask = (jnp.asarray(segment_ids) > 0).astype(jnp.int32)
    if positions is not None:
        positions = inputs.per_token(positions, (B, T), "positions", integer=True, batch_one=True)
    if intervention is not None:
        inputs.check_intervention_batch(
            intervention, B, model.hidden_size, model.n_layers + 1, model.model_id, length=T
        )
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if positions is None:
        positions = default_positions(attention_mask)
    return _forward(
        model.params,
        model.config,
        tokens,
        attention_mask,
        jnp.asarray(positions),
        intervention,
        capture,
        segment_ids,
        scan,
    )


def activations(
    model: Model,
    tokens,
    *,
    attention_mask=None,
    positions=None,
    intervention=None,
    pool_weights=None,
    probes=None,
    hidden=True,
    segment_ids=None,
    scan=True,
) -> ForwardOutput:
    """`forward` without the LM head: only hidden states, pooled statistics or projections."""
    return forward(
        model,
        tokens,
        attention_mask=attention_mask,
        positions=positions,
        intervention=intervention,
        capture=activations_only(pool_weights, probes, hidden),
        segment_ids=segment_ids,
        scan=scan,
    )


def _check_tokens(model: Model, tokens):
    """`tokens` as a checked `[B, T]` array (see `pvjax.inputs.token_batch`) that fits the context
    window. Host inputs stay on the host: their checks cost no device round trip."""
    tokens = inputs.token_batch(tokens, model.config.vocab_size)
    T = tokens.shape[-1]
    if T > model.config.max_position_embeddings:
        raise InputError(
            f"input of {T} tokens is longer than the context window of "
            f"{model.model_id} ({model.config.max_position_embeddings})"
        )
    return tokens
