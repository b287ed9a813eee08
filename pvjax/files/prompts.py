"""Prompts as generation takes them, checked without a model: a non-blank string (a user message,
or raw text) or a conversation, a non-empty list of `{"role", "content"}` dicts with string values.
Light on purpose (no jax), so the command line checks a prompts file before importing the engine.
"""

from __future__ import annotations

from pvjax.errors import InputError

CHAT_ROLES = ("system", "user", "assistant", "tool")


def prompt_problem(p) -> str | None:
    """What is wrong with one prompt, as the end of a sentence ("is empty"), or None: a prompt is
    a non-blank string or a non-empty list of `{"role", "content"}` dicts with string values."""
    if isinstance(p, str):
        return None if p.strip() else "is empty"
    if not isinstance(p, (list, tuple)):
        return (
            f"is a {type(p).__name__}; expected a string or a list of "
            "{'role', 'content'} messages"
        )
    if not p:
        return "is an empty conversation"
    for j, m in enumerate(p):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in CHAT_ROLES
        ):
            return (
                f"has a malformed message {j} ({str(m)[:60]}); each message is "
                f"{{'role': one of {CHAT_ROLES}, 'content': a string}}"
            )
    return None


def check_prompts(prompts) -> list:
    """The prompts as a list, each passing `prompt_problem`. A bare string is refused: iterated, it
    would be one prompt per character."""
    if isinstance(prompts, (str, dict)):
        raise InputError(
            f"prompts must be a list of prompts, got a {type(prompts).__name__}; "
            f"wrap a single prompt in a list"
        )
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts to generate from")
    for i, p in enumerate(prompts):
        problem = prompt_problem(p)
        if problem:
            raise InputError(f"prompt {i} {problem}")
    return prompts
