"""The arguments of the commands that load a local model (`generate`, `serve`): `--model` (a
Hugging Face folder, a .gguf file or the embedded model's name), `--dtype` and `--thinking` (which
the config-driven commands share), and the check of `--model` that needs no load."""

from __future__ import annotations

from pathlib import Path

from pvjax.errors import UsageError
from pvjax.loading.embedded import EMBEDDED_NAME as EMBEDDED


def add_model_arguments(p) -> None:
    p.add_argument(
        "--model",
        default=EMBEDDED,
        help=f"HF folder, .gguf file, or {EMBEDDED} (default)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    add_thinking_argument(p)


def add_thinking_argument(p) -> None:
    """`--thinking`: the chat template's thinking switch on (Qwen3's `enable_thinking`; off by
    default, and nothing for templates without one). Every command that renders a chat has it."""
    p.add_argument(
        "--thinking",
        action="store_true",
        help="render chats with the template's thinking switch on (Qwen3's enable_thinking; "
        "default off: answers without a reasoning block)",
    )


def check_model(source: str) -> None:
    """A `--model` that is neither the embedded model's name, a folder nor a .gguf file."""
    if source == EMBEDDED:
        return
    path = Path(source)
    if not path.exists():
        raise UsageError(
            f"--model {source}: no such folder or .gguf file (nor the embedded "
            f"model name {EMBEDDED!r})"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise UsageError(
            f"--model {source}: a file must be a .gguf; otherwise pass a "
            f"Hugging Face folder (config.json and *.safetensors)"
        )
