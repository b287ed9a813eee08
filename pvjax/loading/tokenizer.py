"""Tokenizers with their chat templates: from a Hugging Face folder's tokenizer files, or rebuilt
from a GGUF file's metadata (`gguf_tokenizer`, no torch and nothing cached on disk).

A model folder may hold weights and no tokenizer (a common way to ship finetunes). Its weights still
load; the model then carries a `MissingTokenizer`, which raises a clear error at the first call that
needs text, unless `pvjax.load(source, tokenizer=OTHER)` names where the tokenizer is.
"""

from __future__ import annotations

import os
from pathlib import Path

from pvjax.loading.layout import CheckpointError

# pvjax takes only tokenizers from transformers; its advice that PyTorch is missing is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Any of these makes a folder's tokenizer loadable by transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class TokenizerMissing(CheckpointError, AttributeError):
    """Text was needed from a model loaded without a tokenizer. An AttributeError too, so that
    `getattr(tokenizer, "eos_token_id", None)` still reads as "not there"."""


class MissingTokenizer:
    """Stands in for the tokenizer of a model loaded from weights alone: falsy, and any use raises
    `TokenizerMissing` naming the model and the fix."""

    def __init__(self, source: str):
        self._source = source

    def __bool__(self) -> bool:
        return False

    def _fail(self, *_a, **_k):
        raise TokenizerMissing(
            f"{self._source} was loaded without a tokenizer (no {', '.join(TOKENIZER_FILES)} "
            "there), "
            "so it takes token ids only; for text, load it with pvjax.load(source, "
            "tokenizer=FOLDER) "
            "naming a folder (or .gguf) with the same model's tokenizer"
        )

    __call__ = _fail

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()

    def __repr__(self) -> str:
        return f"MissingTokenizer({self._source!r})"


def has_tokenizer_files(folder) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_folder_tokenizer(folder):
    """The folder's tokenizer, or a `MissingTokenizer` when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder):
        return MissingTokenizer(str(folder))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (
        Exception
    ) as e:  # transformers raises anything from OSError to ImportError on broken files
        raise CheckpointError(
            f"{folder}: the tokenizer files there do not load "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from e
    return _check_vocab(tok, folder)


def load_gguf_tokenizer(path_or_reader):
    """The tokenizer a `.gguf` file describes (a path, or an open `gguf.GGUFReader`)."""
    from pvjax.loading.gguf_tokenizer import gguf_tokenizer

    if isinstance(path_or_reader, (str, os.PathLike)):
        from pvjax.loading.gguf_file import open_gguf

        path_or_reader = open_gguf(str(path_or_reader))
    return gguf_tokenizer(path_or_reader)


def load_tokenizer(source):
    """A tokenizer from a model source (HF folder, `.gguf`, or the embedded model's name): what
    `pvjax.load(..., tokenizer=source)` takes. A source without one is an error here."""
    from pvjax.loading import resolve_source

    kind, path = resolve_source(source)
    if kind == "gguf":
        return load_gguf_tokenizer(path)
    tok = load_folder_tokenizer(path)
    if not tok:
        raise CheckpointError(
            f"tokenizer source {source}: no tokenizer files there "
            f"(looked for {', '.join(TOKENIZER_FILES)})"
        )
    return tok


def check_fits(tokenizer, vocab_size: int, model_name: str, source) -> None:
    """A tokenizer with more ids than the model's embedding table belongs to another model."""
    if tokenizer and len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens but {model_name} "
            f"has a vocabulary of {vocab_size}: it belongs to another model"
        )


def _check_vocab(tok, source):
    """transformers builds a tokenizer from a bare `tokenizer_config.json` whose vocabulary is one
    special token, and which turns any text into no ids at all."""
    if len(tok) < 2 or not tok("hello world", add_special_tokens=False)["input_ids"]:
        raise CheckpointError(
            f"{source}: the tokenizer files there hold no vocabulary "
            f"({len(tok)} token(s)); pass tokenizer= a source with a full tokenizer"
        )
    return tok


def chat_conventions(tokenizer, *, enable_thinking: bool = False) -> dict:
    """What pvjax changes about a chat template's rendering, for a run's provenance:
    `system_folded` (the template has no system role, so a system prompt is folded into the
    first user turn, as Gemma 3's own template does) and `enable_thinking` (the value passed to a
    template with a thinking switch, Qwen3's; None when the template has none)."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    return {
        "system_folded": _no_system_role(template),
        "enable_thinking": enable_thinking if "enable_thinking" in template else None,
    }


def source_chat_conventions(source, *, enable_thinking: bool = False) -> dict:
    """`chat_conventions` of a model source's chat template, read from its files without building
    the tokenizer (`chat_template.jinja` or `tokenizer_config.json` in a folder, the metadata of a
    `.gguf`): what a run records before its model loads. A source without a template gives the
    conventions of none (nothing folded, no thinking switch)."""
    import json

    from pvjax.loading import resolve_source

    kind, path = resolve_source(source)
    template = ""
    if kind == "gguf":
        from pvjax.loading.gguf_header import read_header

        field = read_header(path).fields.get("tokenizer.chat_template")
        template = field.value if field is not None and isinstance(field.value, str) else ""
    elif (Path(path) / "chat_template.jinja").is_file():
        template = (Path(path) / "chat_template.jinja").read_text()
    elif (Path(path) / "tokenizer_config.json").is_file():
        try:
            conf = json.loads((Path(path) / "tokenizer_config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            conf = {}
        template = conf.get("chat_template") or "" if isinstance(conf, dict) else ""

    class _Template:  # what `chat_conventions` reads of a tokenizer
        chat_template = template

    return chat_conventions(_Template, enable_thinking=enable_thinking)


def _no_system_role(template: str) -> bool:
    """Gemma 2's template raises on a system message ("System role not supported")."""
    return "system role not supported" in template.lower()


def fold_system(messages) -> list:
    """A system message folded into the first user turn (`system + "\\n\\n" + user`), the
    rendering Gemma 3's template gives a system prompt, for templates without a system role."""
    messages = list(messages)
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0], messages[1:]
    if rest and rest[0].get("role") == "user":
        first = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
        return [first] + rest[1:]
    return [{"role": "user", "content": system["content"]}] + rest


def render_chat(
    tokenizer,
    messages,
    *,
    add_generation_prompt=True,
    model_name="model",
    enable_thinking: bool = False,
) -> str:
    """The chat-templated text, exactly as transformers' `apply_chat_template` renders it, with
    two conventions for persona work (`chat_conventions` says which apply): a template with a
    thinking switch (Qwen3) gets `enable_thinking` (off by default: answers without a reasoning
    block), and a template without a system role (Gemma 2) gets the system prompt folded into the
    first user turn (`fold_system`) instead of raising."""
    if isinstance(tokenizer, MissingTokenizer):
        tokenizer()
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"the tokenizer of {model_name} has no chat template; pass raw text instead"
        )
    extra = {}
    if "enable_thinking" in str(template):
        extra["enable_thinking"] = enable_thinking
    if _no_system_role(str(template)):
        messages = fold_system(messages)
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
