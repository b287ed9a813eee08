"""The prompts of the monitoring study, built from a trait file alone (no per-trait text to write).

(a) System prompts: eight rungs from trait-encouraging to trait-discouraging, the ends being the
    extraction's own system prompts for the first instruction pair ("You are a(n) <trait> assistant.
    <pos>" and "You are a helpful assistant. <neg>"); between them the bare instructions and
    generic sentences that grade how often the assistant shows the trait. `strength` runs from 1
    (encouraging) to -1 (discouraging) in equal steps, for colouring plots; it is not a measurement.
(b) Many-shot: k trait-expressing (question, answer) exchanges as earlier turns of the
    conversation, then the question; no system prompt, so the examples alone shift the persona.

A condition is `(name, strength, messages(question))`; every prompt is a list of chat messages.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pvjax.methods.extraction import system_prompt

Messages = list[dict]


def system_ladder(trait, pos_name: str = "", neg_name: str = "helpful") -> list[tuple[str, str]]:
    """The eight `(name, system prompt)` rungs of experiment (a), most encouraging first."""
    name = pos_name or trait.name
    pair = trait.instruction[0]
    return [
        ("pos_persona", system_prompt(name, pair.pos)),
        ("pos_instruction", pair.pos),
        ("often", f"You are an assistant who is often {name}."),
        ("sometimes", f"You are an assistant who is sometimes {name}, though mostly helpful."),
        ("neutral", "You are a helpful assistant."),
        ("rarely", f"You are a helpful assistant who is rarely {name}."),
        ("neg_instruction", pair.neg),
        ("neg_persona", system_prompt(neg_name or "helpful", pair.neg)),
    ]


def system_conditions(trait, pos_name: str = "", neg_name: str = "helpful"):
    ladder = system_ladder(trait, pos_name, neg_name)
    n = len(ladder)
    return [
        (
            name,
            1 - 2 * i / (n - 1),
            (lambda q, s=text: [{"role": "system", "content": s}, {"role": "user", "content": q}]),
        )
        for i, (name, text) in enumerate(ladder)
    ]


def exchanges(shots: Sequence[dict], k: int) -> Messages:
    """The first k shots as alternating user / assistant turns."""
    out = []
    for s in shots[:k]:
        out += [
            {"role": "user", "content": s["question"]},
            {"role": "assistant", "content": s["answer"]},
        ]
    return out


def many_shot_conditions(shots: Sequence[dict], counts: Sequence[int]):
    top = max(max(counts), 1)
    return [
        (
            f"shots_{k}",
            k / top,
            (lambda q, k=k: exchanges(shots, k) + [{"role": "user", "content": q}]),
        )
        for k in counts
    ]


def conditions(
    experiment: str, trait, cfg, shots: Sequence[dict]
) -> list[tuple[str, float, Callable]]:
    if experiment == "system_prompts":
        return system_conditions(trait, cfg.pos_name, cfg.neg_name)
    return many_shot_conditions(shots, list(cfg.shots))
