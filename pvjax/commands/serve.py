"""`pvjax serve`: an OpenAI-compatible server that steers and monitors each request.

    pvjax serve --vector humorous=runs/quickstart/humorous/vectors.safetensors \\
        --monitor evil=runs/monitor-evil/vector/vectors.response_avg_diff.monitor.json

Vectors and monitors are named at startup; a request names them in its body (`steer`, `ablate`,
`monitor`), never a path. Binds 127.0.0.1 unless `--host` says otherwise; `--api-key` (default
`$PVJAX_API_KEY`) makes every `/v1` call and `/metrics` need `Authorization: Bearer KEY`. The
programs compile in the background at startup (`/health` answers 503 until they are ready, and
the log says how long each took); nothing compiles after. See docs/serving.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pvjax.commands.model_args import add_model_arguments, check_model
from pvjax.errors import UsageError


def add_parser(sub):
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server that steers and monitors each request",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(p)
    p.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="NAME=FILE[:KEY]",
        help="a steering vector requests may name (repeatable; NAME defaults to the file's stem)",
    )
    p.add_argument(
        "--monitor",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="a calibrated monitor (.monitor.json) requests may read (repeatable; NAME defaults "
        "to its trait)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("PVJAX_API_KEY") or None,
        help="required bearer key (default: $PVJAX_API_KEY; none: no key asked)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send")
    p.add_argument("--max-batch", type=int, default=16, help="rows of the running batch")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt taken")
    p.add_argument(
        "--prompt-buckets",
        default=None,
        metavar="W,W,...",
        help="prompt widths to compile (default: every bucket up to --max-prompt-tokens; fewer "
        "compile faster, a prompt runs at the next wider)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot")
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body (bytes)"
    )
    p.add_argument(
        "--max-tokens-in-flight",
        type=int,
        default=1 << 20,
        help="prompt + max_tokens over waiting and running requests",
    )
    p.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is stopped"
    )
    p.add_argument(
        "--no-ui", action="store_true", help="serve the API only, without the page at GET /"
    )
    p.add_argument(
        "--scanned", action="store_true", help="scan the layers (faster startup, slower decode)"
    )
    p.add_argument(
        "--share-prefix",
        default=None,
        metavar="C[,C...]",
        help="run the first C tokens of prompts (a system prompt) once and reuse their keys and "
        "values across requests (the widest C that leaves a prompt a tail; compiles a prefix and "
        "its tails per C)",
    )
    p.add_argument(
        "--prefix-cache", type=int, default=8, help="shared prefixes kept (with --share-prefix)"
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="data=D,model=M",
        help="serve on a device mesh: the running batch over data (--max-batch rounded up to a "
        "multiple of D), weights and kv heads over model",
    )
    p.set_defaults(func=run)
    return p


def _named(spec: str, flag: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        return None, spec
    if not name or not path:
        raise UsageError(f"{flag} {spec!r}: expected NAME=FILE")
    return name, path


def check_args(args) -> None:
    """Everything that can be judged before the model loads."""
    check_model(args.model)
    for flag, v, lo in (
        ("--port", args.port, 0),
        ("--max-batch", args.max_batch, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--max-prompt-tokens", args.max_prompt_tokens, 1),
        ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-tokens-in-flight", args.max_tokens_in_flight, 1),
    ):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.prompt_buckets is not None:
        try:
            widths = [int(w) for w in args.prompt_buckets.split(",")]
        except ValueError:
            raise UsageError(
                f"--prompt-buckets takes W,W,... integers, got {args.prompt_buckets!r}"
            )
        if min(widths) < 1 or max(widths) < args.max_prompt_tokens:
            raise UsageError(
                f"--prompt-buckets must be positive and reach --max-prompt-tokens "
                f"({args.max_prompt_tokens}), got {args.prompt_buckets}"
            )
    if args.mesh:
        from pvjax.parallel.sharding import parse_mesh

        parse_mesh(args.mesh)
        if args.share_prefix:
            raise UsageError("--share-prefix does not run with --mesh yet")
    if args.share_prefix is not None:
        try:
            prefixes = [int(w) for w in args.share_prefix.split(",")]
        except ValueError:
            raise UsageError(f"--share-prefix takes C,C,... integers, got {args.share_prefix!r}")
        if min(prefixes) < 1 or max(prefixes) >= args.max_prompt_tokens:
            raise UsageError(
                f"--share-prefix widths must be in 1..{args.max_prompt_tokens - 1} (below "
                f"--max-prompt-tokens), got {args.share_prefix}"
            )
    if args.prefix_cache < 1:
        raise UsageError(f"--prefix-cache must be >= 1, got {args.prefix_cache}")
    if not args.request_timeout > 0:
        raise UsageError(f"--request-timeout must be > 0, got {args.request_timeout}")
    for spec in args.vector + args.monitor:
        _named(spec, "--vector" if spec in args.vector else "--monitor")


def run(args) -> int:
    check_args(args)
    from pvjax.files.vectors import read_vector, split_spec
    from pvjax.methods.monitoring import load_monitor

    for spec in args.vector:  # readable, finite, holding the key: before the load
        read_vector(_named(spec, "--vector")[1])
    for spec in args.monitor:
        load_monitor(_named(spec, "--monitor")[1])

    try:
        import starlette  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise UsageError(f"pvjax serve needs the serve extra ({e}): pip install 'pvjax[serve]'")

    import pvjax
    from pvjax.serve.app import build_app
    from pvjax.serve.service import ServeSettings, Service
    from pvjax.serve.terms import Catalog

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("pvjax.serve")
    mesh = None
    if args.mesh:  # a mesh that does not fit the devices here is refused before the load
        from pvjax.parallel.sharding import mesh_from_flag

        mesh = mesh_from_flag(args.mesh)
    model = pvjax.load(args.model, dtype=args.dtype, enable_thinking=args.thinking)
    vectors, monitors = {}, {}
    for spec in args.vector:
        name, file = _named(spec, "--vector")
        name = name or Path(split_spec(file)[0]).stem
        if name in vectors:
            raise UsageError(f"--vector: two vectors are named {name!r}; name them NAME=FILE")
        vectors[name] = read_vector(file, model)
    for spec in args.monitor:
        name, file = _named(spec, "--monitor")
        m = load_monitor(file, model)
        name = name or m.trait or Path(file).stem
        if name in monitors:
            raise UsageError(f"--monitor: two monitors are named {name!r}; name them NAME=FILE")
        monitors[name] = m
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding %s without an API key: anyone who reaches it can use it", args.host)
    settings = ServeSettings(
        model_name=args.served_model_name or model.model_id,
        max_batch=args.max_batch,
        max_prompt=args.max_prompt_tokens,
        max_new=args.max_new_tokens,
        max_queue=args.max_queue,
        max_body=args.max_body_bytes,
        max_tokens_in_flight=args.max_tokens_in_flight,
        request_timeout=args.request_timeout,
        api_key=args.api_key,
        unroll=not args.scanned,
        prompt_widths=(
            None
            if args.prompt_buckets is None
            else tuple(int(w) for w in args.prompt_buckets.split(","))
        ),
        mesh=mesh,
        prefix_widths=(
            () if args.share_prefix is None else tuple(int(w) for w in args.share_prefix.split(","))
        ),
        prefix_cache=args.prefix_cache,
    )
    service = Service(model, Catalog(vectors, monitors), settings)
    log.info(
        "serving %s as %r on http://%s:%d/v1 (vectors: %s; monitors: %s); compiling",
        model.model_id,
        settings.model_name,
        args.host,
        args.port,
        ", ".join(vectors) or "none",
        ", ".join(monitors) or "none",
    )
    service.start()
    try:
        uvicorn.run(
            build_app(service, ui=not args.no_ui),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
        )
    finally:
        service.stop()
    return 0
