"""`pvjax traits`: list and show trait files, and write new ones with an LLM.

pvjax traits list
pvjax traits show evil --split eval
pvjax traits new sycophancy --description "..." --out my_traits [--model gpt-4.1-mini]
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from pvjax.errors import UsageError

DEFAULT_MODEL = "gpt-4.1-mini"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_cache_path() -> Path:
    """$PVJAX_CACHE/llm.sqlite when PVJAX_CACHE (a directory) is set, else
    ~/.cache/pvjax/llm.sqlite."""
    root = os.environ.get("PVJAX_CACHE")
    return (
        Path(root).expanduser() / "llm.sqlite"
        if root
        else Path.home() / ".cache" / "pvjax" / "llm.sqlite"
    )


def add_parser(sub):
    p = sub.add_parser(
        "traits",
        help="list, show and generate trait files",
        description="List and show trait files; generate new ones with an LLM.",
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    tsub = p.add_subparsers(dest="traits_command")

    ls = tsub.add_parser("list", help="names of the shipped traits")
    ls.set_defaults(func=cmd_list)

    show = tsub.add_parser("show", help="print a trait file as JSON")
    show.add_argument("name", help="a shipped trait name or a path to a .json trait file")
    show.add_argument("--split", default="extract", choices=("extract", "eval"))
    show.set_defaults(func=cmd_show)

    new = tsub.add_parser(
        "new",
        help="generate a trait with an OpenAI-compatible chat model",
        description="Writes OUT/NAME/extract.json and OUT/NAME/eval.json (disjoint "
        "question halves). Calls are cached, so a rerun costs nothing.",
    )
    new.add_argument(
        "name", help="trait name (letters, digits, '_', '-', '.'); also the folder name"
    )
    new.add_argument("--description", required=True, help="what the trait is, in a sentence or two")
    new.add_argument("--out", required=True, type=Path, help="folder to write NAME/ into")
    new.add_argument("--model", default=DEFAULT_MODEL, help=f"chat model (default {DEFAULT_MODEL})")
    new.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 "
        "(default $OPENAI_BASE_URL or the OpenAI API)",
    )
    new.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default OPENAI_API_KEY); "
        "unset means no key, fine for local servers",
    )
    new.add_argument("--pairs", type=int, default=5, help="instruction pairs (default 5)")
    new.add_argument(
        "--questions",
        type=int,
        default=40,
        help="questions in all, split half/half into extract/eval (default 40)",
    )
    new.add_argument("--max-attempts", type=int, default=3)
    new.add_argument("--temperature", type=float, default=1.0)
    new.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="sqlite cache of LLM calls (default $PVJAX_CACHE/llm.sqlite or "
        "~/.cache/pvjax/llm.sqlite)",
    )
    new.add_argument("--force", action="store_true", help="overwrite existing files")
    new.set_defaults(func=cmd_new)
    return p


def cmd_list(args) -> int:
    from pvjax.files.traits import shipped_traits

    for name in shipped_traits():
        print(name)
    return 0


def cmd_show(args) -> int:
    from pvjax.files.traits import load_trait

    trait = load_trait(args.name, args.split)  # a TraitError is a user error: one line, status 2
    print(json.dumps(trait.to_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_new(args) -> int:
    from pvjax.llm import CachedBackend, ChatCache, LLMError, OpenAIChat
    from pvjax.methods.trait_gen import TraitGenError, generate_trait

    if not _NAME.fullmatch(args.name):
        raise UsageError(f"trait name {args.name!r} must be letters, digits, '_', '-' or '.'")
    folder = args.out / args.name
    targets = [folder / "extract.json", folder / "eval.json"]
    existing = [str(t) for t in targets if t.exists()]
    # Checked before any API call, so a mistyped name does not cost a generation.
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    api_key = os.environ.get(args.api_key_env) or None
    backend = OpenAIChat(args.model, base_url=args.base_url, api_key=api_key)
    cache_path = args.cache or default_cache_path()
    with ChatCache(cache_path) as cache:
        try:
            extract, eval_ = generate_trait(
                CachedBackend(backend, cache),
                args.name,
                args.description,
                n_pairs=args.pairs,
                n_questions=args.questions,
                max_attempts=args.max_attempts,
                temperature=args.temperature,
            )
        except (
            LLMError,
            TraitGenError,
            ValueError,
        ) as e:  # the server or the model failed, not the user
            print(f"pvjax traits: error: {e}", file=sys.stderr)
            return 1
    folder.mkdir(parents=True, exist_ok=True)
    extract.save(targets[0])
    eval_.save(targets[1])
    print(
        f"wrote {targets[0]} ({len(extract.questions)} questions) and {targets[1]} "
        f"({len(eval_.questions)} questions), {len(extract.instruction)} instruction pairs"
    )
    return 0
