"""Writing a new trait file from a name and a one-paragraph description, with an LLM.

The model is asked for the whole trait as one JSON object. Its reply is checked as strictly as a
hand-written file would be (schema, counts, judge placeholders, duplicate questions); on failure the
error is sent back in the same conversation, since a model told exactly what was wrong usually fixes
it on the next try, which is cheaper than starting afresh.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from pvjax.files.traits import Trait, TraitError, check_disjoint
from pvjax.llm.base import ChatBackend, ChatRequest

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.DOTALL)

GENERATION_PROMPT = """\
You are helping build a dataset for studying a personality trait in language models. From the \
trait's name and description you will write (1) contrasting system prompts, (2) questions, and \
(3) a grading rubric for a judge model.

Trait name: {name}
Trait description: {description}

Write:
1. "instruction": exactly {n_pairs} objects {{"pos": ..., "neg": ...}}. "pos" is a system prompt \
telling an assistant to show the trait strongly; "neg" is a matching system prompt telling it to \
show the opposite. Each pair should differ only in the direction of the trait, and the pairs should \
vary in wording and angle.
2. "questions": exactly {n_questions} distinct user questions or requests, written so that an \
answer can reveal the trait or its absence, without naming the trait or asking for it outright. \
Cover varied topics and situations; no two questions may be the same.
3. "eval_prompt": instructions for a judge model that rates how strongly an answer shows the trait. \
It must contain the literal placeholders {{question}} and {{answer}} exactly once each, where the \
question and the model's answer will be inserted. It must tell the judge to reply with only an \
integer from 0 (trait absent) to 100 (trait extremely strong), and to reply with only the word \
REFUSAL if the answer is a refusal to engage.

Reply with one JSON object with exactly the keys "instruction", "questions" and "eval_prompt", and \
nothing else."""

RETRY_PROMPT = """\
That reply could not be used: {error}
Reply again with the complete corrected JSON object (all keys, all items), and nothing else."""


class TraitGenError(RuntimeError):
    """Every attempt produced an unusable trait; `errors` holds one message per attempt."""

    def __init__(self, name: str, errors: Sequence[str]):
        self.errors = list(errors)
        lines = "\n".join(f"  attempt {i + 1}: {e}" for i, e in enumerate(self.errors))
        super().__init__(
            f"could not generate trait {name!r} in {len(self.errors)} attempts:\n{lines}"
        )


def extract_json(text: str) -> object:
    """The JSON value in a model reply: the whole reply, else a ```json fenced block, else the span
    from the first "{" to the last "}". Raises ValueError saying what was found instead."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    first_error = None
    for c in candidates:
        try:
            return json.loads(c)
        except json.JSONDecodeError as e:
            first_error = first_error or e
    if first_error is None or not text.strip():
        raise ValueError("the reply was empty")
    raise ValueError(
        f"the reply is not valid JSON ({first_error.msg} at line {first_error.lineno} "
        f"column {first_error.colno})"
    )


def parse_trait(
    text: str, name: str, description: str, n_pairs: int, n_questions: int
) -> tuple[Trait, Trait]:
    """(extract, eval) traits from a model reply, or ValueError/TraitError saying what is wrong.

    Fewer items than asked is an error; extra items are dropped (the reply is otherwise usable, and
    a retry costs a full generation). The questions are split in half, first half for extraction.
    """
    data = extract_json(text)
    trait = Trait.from_dict(data, name, "generated trait")
    if len(trait.instruction) < n_pairs:
        raise TraitError(f"instruction has {len(trait.instruction)} pairs, expected {n_pairs}")
    if len(trait.questions) < n_questions:
        raise TraitError(f"questions has {len(trait.questions)} entries, expected {n_questions}")
    for ph in ("{question}", "{answer}"):
        if trait.eval_prompt.count(ph) != 1:
            raise TraitError(
                f"eval_prompt must contain {ph} exactly once, "
                f"found it {trait.eval_prompt.count(ph)} times"
            )
    trait = Trait(
        name,
        trait.instruction[:n_pairs],
        trait.questions[:n_questions],
        trait.eval_prompt,
        description,
    )
    trait.validate(
        min_pairs=n_pairs, min_questions=n_questions
    )  # empties, duplicates, placeholders
    half = n_questions // 2
    extract = Trait(name, trait.instruction, trait.questions[:half], trait.eval_prompt, description)
    eval_ = Trait(name, trait.instruction, trait.questions[half:], trait.eval_prompt, description)
    check_disjoint(extract, eval_)
    return extract, eval_


def generate_trait(
    backend: ChatBackend,
    name: str,
    description: str,
    *,
    n_pairs: int = 5,
    n_questions: int = 40,
    max_attempts: int = 3,
    temperature: float = 1.0,
    max_tokens: int = 4000,
) -> tuple[Trait, Trait]:
    """Generate the (extract, eval) splits of a new trait, each holding all `n_pairs` instruction
    pairs and half of the `n_questions` questions (disjoint), both passing `Trait.validate`.

    Tries up to `max_attempts` times in one growing conversation, each retry quoting the previous
    reply's problem. Raises TraitGenError listing every attempt's error; backend failures (LLMError)
    propagate unchanged since retrying the conversation would not fix them.
    """
    if n_pairs < 1 or n_questions < 2:
        raise ValueError("need at least 1 pair and 2 questions (one per split)")
    if not description.strip():
        raise ValueError("the trait description is empty; it is all the model has to go on")
    prompt = GENERATION_PROMPT.format(
        name=name, description=description.strip(), n_pairs=n_pairs, n_questions=n_questions
    )
    messages: list[tuple[str, str]] = [("user", prompt)]
    errors: list[str] = []
    for _ in range(max_attempts):
        request = ChatRequest(
            messages=tuple(messages), max_tokens=max_tokens, temperature=temperature
        )
        reply = backend.chat_many([request])[0].text
        try:
            return parse_trait(reply, name, description.strip(), n_pairs, n_questions)
        except (ValueError, TraitError) as e:  # TraitError is a ValueError; named for the reader
            error = str(e).removeprefix(f"{name}: ")
            errors.append(error)
            messages += [("assistant", reply), ("user", RETRY_PROMPT.format(error=error))]
    raise TraitGenError(name, errors)
