"""Tokenizers (transformers' fast tokenizers) with their chat templates.

A GGUF file carries its tokenizer; transformers rebuilds it from the GGUF vocabulary and merges, which
takes seconds, so the rebuilt tokenizer is saved once under the pvjax cache and reloaded from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("PVJAX_CACHE", Path.home() / ".cache" / "pvjax"))


def load_folder_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}: no usable tokenizer files ({e})") from e


def load_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    path = Path(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / key
    if (target / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:  # write to a temporary folder then rename, so a killed run never leaves half a tokenizer
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only home must not stop the load
        log.warning("could not cache the GGUF tokenizer under %s: %s", target, e)
    return tok


def render_chat(tokenizer, messages, *, add_generation_prompt=True, model_name="model") -> str:
    """The chat-templated text, exactly as transformers' `apply_chat_template` renders it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {model_name} has no chat template; pass raw text instead")
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
