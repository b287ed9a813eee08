"""A pvjax model as a chat backend: judges and trait writers that run offline, on this machine.

Judge requests (one token with top logprobs) are one batched forward over left-padded prompts with
the LM head on the last position only; longer requests go through `pvjax.engine.generate`. Prompt
lengths are bucketed to multiples of 64 and batches padded to `batch_size`, so a judging run
compiles a handful of programs.

Number tokens. The paper's judge reads whole numbers 0..100 from one token's logprobs, which works
for tokenizers with multi-digit tokens (GPT-4o, Llama 3). SmolLM2 and Qwen2 split numbers into
digits, so the first token only says the leading digit. With `leading_digit_as_tens` (the default
for such tokenizers) a digit token d is reported as the number 10*d, a coarse but monotone reading
("8" is taken as the eighties); it is meant for the margin filter of weak local judges, not for the
paper's absolute thresholds.

On a `mesh` (`pvjax.parallel.sharding.make_mesh`) the judge's batch is split over "data" (rounded up
to a multiple of it) and its weights laid out by `pvjax.parallel.sharding`'s rule table; longer
requests are generated on the same mesh (`pvjax.engine.generate`).

`numeric_only` constrains the judge's token to numbers (structured output, done locally): small
models rarely keep to "reply with a number", and without it their numeric mass falls under the
quarter that makes a score count. The price is that a refusal can no longer be seen.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from pvjax.llm.base import ChatRequest, ChatResult, LLMError, OnResult, Requests


def _splits_numbers(tokenizer) -> bool:
    return len(tokenizer("100", add_special_tokens=False)["input_ids"]) > 1


class LocalChat:
    def __init__(
        self,
        model,
        *,
        batch_size: int = 8,
        leading_digit_as_tens: bool | None = None,
        numeric_only: bool = False,
        mesh=None,
    ):
        from pvjax.parallel import sharding

        self.model = model
        self.mesh = None if mesh is None else sharding.check_mesh(mesh)
        self.batch_size = batch_size
        self.numeric_only = numeric_only
        self._numeric_ids = None
        if leading_digit_as_tens is None:
            leading_digit_as_tens = _splits_numbers(model.tokenizer)
        self.tens = leading_digit_as_tens
        self.backend_id = (
            f"pvjax:{model.model_id}:{model.config.fingerprint()}"
            f"{':tens' if self.tens else ''}{':numeric' if numeric_only else ''}"
        )

    def numeric_ids(self) -> np.ndarray:
        """Token ids that decode to an integer 0..100 (whitespace aside)."""
        if self._numeric_ids is None:
            tok = self.model.tokenizer
            ids = [
                i
                for i in range(len(tok))
                if (s := tok.decode([i]).strip()).isascii()
                and s.isdigit()
                and int(s) <= 100
                and len(s) <= 3
            ]
            self._numeric_ids = np.asarray(ids, np.int64)
        return self._numeric_ids

    def _text(self, request: ChatRequest) -> str:
        return self.model.chat_text([{"role": r, "content": c} for r, c in request.messages])

    def chat_many(
        self, requests: Requests, *, progress: bool = False, on_result: OnResult = None
    ) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        judge = [i for i, r in enumerate(requests) if r.max_tokens == 1]
        other = [i for i, r in enumerate(requests) if r.max_tokens != 1]
        for start in range(0, len(judge), self.batch_size):
            chunk = judge[start : start + self.batch_size]
            for i, res in zip(chunk, self._next_token([requests[i] for i in chunk])):
                results[i] = res
                if on_result:
                    on_result(i, res)
        for i in other:
            res = self._generate(requests[i])
            results[i] = res
            if on_result:
                on_result(i, res)
        return results  # type: ignore[return-value]

    def _next_token(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        import pvjax
        from pvjax.capture import Capture
        from pvjax.model import left_pad
        from pvjax.parallel import sharding

        tok = self.model.tokenizer
        ids = [tok(self._text(r), add_special_tokens=False)["input_ids"] for r in requests]
        limit = self.model.config.max_position_embeddings
        for r, seq in zip(requests, ids):
            if len(seq) > limit:
                raise LLMError(
                    f"judge prompt of {len(seq)} tokens exceeds the context window of "
                    f"{self.model.model_id} ({limit})"
                )
        T = -(-max(map(len, ids)) // 64) * 64
        tokens, mask = left_pad(ids, T, sharding.pad_batch(self.batch_size, self.mesh))
        model = sharding.on_mesh(self.model, self.mesh)
        out = pvjax.forward(
            model,
            sharding.put_rows(tokens, self.mesh),
            attention_mask=sharding.put_rows(mask, self.mesh),
            capture=Capture(logits="last", hidden=False),
        )
        logits = np.asarray(out.logits[:, -1], np.float32)
        if self.numeric_only:  # constrained decoding: the judge can only answer with a number
            keep = np.full(logits.shape[-1], -np.inf, np.float32)
            keep[self.numeric_ids()] = 0.0
            logits = logits + keep
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        results = []
        for b, r in enumerate(requests):
            k = max(r.top_logprobs, 1)
            top = np.argsort(-logp[b])[:k]
            text = tok.decode([int(top[0])])
            lps = None
            if r.top_logprobs:
                lps = {}
                for t in top:
                    if not np.isfinite(logp[b, t]):
                        continue
                    s = tok.decode([int(t)])
                    if self.tens and len(s.strip()) == 1 and s.strip().isdigit():
                        s = str(10 * int(s.strip()))
                    lps[s] = (
                        float(np.logaddexp(lps[s], logp[b, t])) if s in lps else float(logp[b, t])
                    )
            results.append(ChatResult(text=text, top_logprobs=lps))
        return results

    def _generate(self, request: ChatRequest) -> ChatResult:
        from pvjax.engine.generate import SamplingParams, generate

        msgs = [{"role": r, "content": c} for r, c in request.messages]
        g = generate(
            self.model,
            [msgs],
            sampling=SamplingParams(
                temperature=request.temperature, max_new_tokens=request.max_tokens
            ),
            seed=request.seed or 0,
            mesh=self.mesh,
        )
        return ChatResult(text=g.texts[0])
