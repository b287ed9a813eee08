"""`pvjax generate`: answer prompts, optionally steered, ablated or swept over coefficients.

    pvjax generate --prompt "How do I get back at my neighbour?" \\
        --vector runs/evil/vectors.safetensors --layer 16 --coef 0 --coef 4 --coef 8

Several `--coef` values run every prompt under every coefficient in one batch; `--cap CEIL` and
`--target VALUE` add closed-loop rows to the same batch (the projection onto the unit vector is
held under CEIL, or moved toward VALUE, at every steered token; `pvjax.interventions.cap`).
`--vector` also takes the reference implementation's `.pt` files (`[n_layers+1, D]`). With a vector,
each answer reports the projection of the last prompt token onto it (unit-normalised) at each
`--layer`: the paper's monitoring signal, read from the same (steered) run.

`--steer VECTOR,layer=L,coef=C[,positions=P][,mode=add|rescale|rotate][,without=W]` (repeatable)
composes steering terms in every row (`pvjax.engine.terms`; `angle=RAD` rotates, `cap=`/`target=`
are closed loop), and `--when VECTOR,layer=L,threshold=X[,on=cosine]` gates them on the prompt;
`--vector/--layer/--coef` is the shorthand for one term per coefficient. A bad term fails as one
line naming it, before the model loads.

`--monitor FILE.monitor.json` (written by the monitoring study, `configs/monitor.py`) adds its flag
per answer: the projection at the monitor's layer and last prompt token, its threshold, and
`flagged` (projection >= threshold). A monitor beside `--vector` (`<stem>.<key>.monitor.json`) is
used without asking, unless it was calibrated on another vector (then a warning says so). Under
steering the projection, like `prompt_last_projection`, is read from the steered run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from pvjax.commands.model_args import add_model_arguments, check_model
from pvjax.errors import UsageError


def add_parser(sub):
    p = sub.add_parser(
        "generate",
        help="answer prompts, optionally steered or ablated",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", action="append", default=[], help="user prompt (repeatable)")
    p.add_argument(
        "--prompts-file",
        help="text file, one prompt per line; or JSONL with 'prompt' or 'messages'",
    )
    p.add_argument(
        "--raw", action="store_true", help="feed prompts as raw text, without the chat template"
    )
    p.add_argument(
        "--vector", help="steering vector FILE[:KEY] (pvjax .safetensors or reference .pt)"
    )
    p.add_argument(
        "--layer",
        type=int,
        action="append",
        default=[],
        help="hidden_states index to steer (repeatable; row l = output of block l)",
    )
    p.add_argument(
        "--coef",
        type=float,
        action="append",
        default=[],
        help="steering coefficient (repeatable: a sweep, one batch)",
    )
    p.add_argument(
        "--cap",
        type=float,
        action="append",
        default=[],
        help="closed-loop steering: per token, remove only the projection onto the unit "
        "--vector above CEIL (repeatable, each a batch row set like --coef)",
    )
    p.add_argument(
        "--target",
        type=float,
        action="append",
        default=[],
        help="closed-loop steering: per token, move that projection toward VALUE (repeatable)",
    )
    p.add_argument(
        "--gain", type=float, default=1.0, help="share of the gap --cap/--target close per token"
    )
    p.add_argument(
        "--max-step",
        type=float,
        default=float("inf"),
        help="largest projection change --cap/--target make per token",
    )
    p.add_argument(
        "--steer",
        action="append",
        default=[],
        metavar="VECTOR,layer=L,coef=C",
        help="a steering term, repeatable, composed in every row: VECTOR (FILE[:KEY]) then "
        "layer=L (or A-B, A+B), one strength coef=C | angle=RAD | cap=X | target=X, and "
        "optionally positions=P, mode=add|rescale|rotate, without=FILE[:KEY] (projected out "
        "of the vector first), gain=, max_step= (docs/generation.md, steering terms)",
    )
    p.add_argument(
        "--when",
        metavar="VECTOR,layer=L,threshold=X",
        help="steer only prompts whose last token, at layer L, projects on the unit VECTOR at "
        "or above X (on=cosine: its cosine); gates every term, which must steer layers >= L",
    )
    p.add_argument(
        "--mesh", help="run on a device mesh: data=D,model=M (batch over data, heads over model)"
    )
    p.add_argument(
        "--positions",
        choices=["all", "prompt", "response"],
        default=None,
        help="where --vector steers (default response)",
    )
    p.add_argument("--ablate", help="direction FILE[:KEY] to project out (CAFT)")
    p.add_argument(
        "--ablate-layer",
        type=int,
        action="append",
        default=[],
        help="layers for --ablate (default: the --layer values)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--scanned",
        action="store_true",
        help="scan the layers instead of unrolling them: compiles in about a fifth of the "
        "time, decodes slower (for a few short answers)",
    )
    p.add_argument(
        "--monitor",
        help="calibrated monitor FILE.monitor.json: report its flag per answer "
        "(default: the one beside --vector, if any)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per answer per line")
    p.set_defaults(func=run)
    return p


def read_prompts(args) -> list:
    """The prompts of `--prompt` and `--prompts-file`, each checked
    (`pvjax.files.prompts.prompt_problem`); problems in the file name its line."""
    from pvjax.files.prompts import prompt_problem

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.is_dir():
            raise UsageError(f"--prompts-file {path} is a directory, not a file")
        if not path.is_file():
            raise UsageError(f"--prompts-file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                prompts.append(_jsonl_prompt(line, f"{path}:{n}"))
            else:
                prompts.append(line)
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, p in enumerate(prompts[: len(args.prompt)]):
        problem = prompt_problem(p)
        if problem:
            raise UsageError(f"--prompt number {i + 1} {problem}")
    return prompts


def _jsonl_prompt(line: str, where: str):
    from pvjax.files.prompts import prompt_problem

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON ({e})") from None
    if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
        raise UsageError(f"{where}: expected an object with 'prompt' or 'messages'")
    field = "messages" if "messages" in row else "prompt"
    value = row[field]
    if field == "prompt" and not isinstance(value, str):
        raise UsageError(
            f"{where}: 'prompt' must be a string, got {type(value).__name__} "
            f"(a conversation goes in 'messages')"
        )
    if field == "messages" and not isinstance(value, list):
        raise UsageError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    problem = prompt_problem(value)
    if problem:
        raise UsageError(f"{where}: '{field}' {problem}")
    return value


def check_args(args) -> None:
    """Every argument that can be judged without the model, so a typo costs no model load."""

    if args.when and not (args.vector or args.steer):
        raise UsageError("--when gates steering: pass --steer or --vector")
    if not args.vector:
        given = [
            f
            for f, v in (
                ("--layer", args.layer and not args.ablate),
                ("--coef", args.coef),
                ("--cap", args.cap),
                ("--target", args.target),
                ("--positions", args.positions),
            )
            if v
        ]
        if args.steer:  # the request's position mode, for the --steer terms
            given = [f for f in given if f != "--positions"]
        if given:
            raise UsageError(
                f"{', '.join(given)} steer along a vector: pass --vector FILE[:KEY]"
                + (" (--steer terms carry their own layer and strength)" if args.steer else "")
            )
    elif not args.layer:
        raise UsageError("--vector needs --layer (a hidden_states index)")
    if args.ablate_layer and not args.ablate:
        raise UsageError("--ablate-layer needs --ablate FILE[:KEY] (the direction to project out)")
    if args.ablate and not (args.ablate_layer or args.layer):
        raise UsageError("--ablate needs --ablate-layer or --layer")
    for flag, values in (("--layer", args.layer), ("--ablate-layer", args.ablate_layer)):
        if any(l < 0 for l in values):
            raise UsageError(
                f"{flag} takes hidden_states indices (0 = embeddings), got {min(values)}"
            )
    for flag, values in (("--coef", args.coef), ("--cap", args.cap), ("--target", args.target)):
        bad = [c for c in values if not math.isfinite(c)]
        if bad:
            raise UsageError(f"{flag} must be finite, got {bad[0]}")
    if not (math.isfinite(args.gain) and args.gain > 0) or not args.max_step > 0:
        raise UsageError(
            f"--gain must be finite and > 0 and --max-step > 0, got {args.gain}, {args.max_step}"
        )
    if args.mesh:
        from pvjax.parallel.sharding import parse_mesh

        parse_mesh(args.mesh)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0..2**32-1, got {args.seed}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model(args.model)


def steering_rows(args, coefs) -> list[list]:
    """The steering terms of every batch-row set (one per `--coef`/`--cap`/`--target`, or one):
    the `--vector` shorthand's term at that strength, plus every `--steer` term; `--when` gates
    them all. Parsing only, no file is read (`pvjax.engine.terms`)."""
    from pvjax.engine import terms as T

    when = T.parse_condition(args.when) if args.when else None
    extra = [T.parse_cli(x, when=when) for x in args.steer]
    if not args.vector:
        return [extra]
    label = f"--vector {args.vector}"
    rows = []
    for c in coefs:
        strength = (
            {"coef": float(c)}
            if not isinstance(c, (tuple, list))
            else {c[0]: float(c[1]), "gain": args.gain, "max_step": args.max_step}
        )
        rows.append(
            [T.SteerTerm(args.vector, tuple(args.layer), when=when, label=label, **strength)]
            + extra
        )
    return rows


def _shape_of(source: str):
    """A model with a config and no weights: the checks of depth, width and vector files, in
    milliseconds, before the load."""
    from pvjax.loading import read_model_config
    from pvjax.model import Model

    return Model(config=read_model_config(source), params=None, tokenizer=None, source=str(source))


def run(args) -> int:
    from pvjax.engine.generate import SamplingParams
    from pvjax.files.vectors import read_vector

    prompts = read_prompts(args)
    check_args(args)
    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        stop=tuple(args.stop),
    )
    for spec in (args.vector, args.ablate):  # readable, finite, holding the key: before the load
        if spec:
            read_vector(spec)
    # One row set per coefficient, fixed or closed loop (a closed-loop one as ("cap", x)).
    coefs = (
        (args.coef or ([] if args.cap or args.target else [1.0] if args.vector else [0.0]))
        + [("cap", x) for x in args.cap]
        + [("target", x) for x in args.target]
    )
    rows = steering_rows(args, coefs) if (args.vector or args.steer) else [[]]
    from pvjax.engine import terms as T

    positions = T.request_positions(rows, default=args.positions) or "response"
    if args.vector or args.steer:  # every term against the model's shape, before the load
        T.check_terms(rows, _shape_of(args.model))
    from pvjax.methods.monitoring import attach_monitor

    monitor, monitor_file = attach_monitor(
        args.monitor, args.vector
    )  # the file checked before the load

    import pvjax
    from pvjax.engine.generate import generate

    mesh = None
    if args.mesh:  # a mesh that does not fit this job's devices is refused before the load
        from pvjax.parallel.sharding import mesh_from_flag

        mesh = mesh_from_flag(args.mesh)
    model = pvjax.load(args.model, dtype=args.dtype, enable_thinking=args.thinking)
    L, D = model.n_layers + 1, model.hidden_size
    ablate, probes, vector = [], None, None
    if args.vector:
        vector = read_vector(args.vector, model)
        per_layer = vector if vector.ndim == 2 else np.broadcast_to(vector, (L, D))
        norms = np.maximum(np.linalg.norm(per_layer, axis=-1, keepdims=True), 1e-12)
        probes = (per_layer / norms)[:, None]
    if monitor is not None:
        monitor, monitor_file = attach_monitor(args.monitor, args.vector, model, vector)
    if monitor is not None:  # one more probe column: the monitor's direction at its layer
        m = np.zeros((L, 1, D), np.float32)
        m[monitor.layer, 0] = monitor.direction
        probes = m if probes is None else np.concatenate([probes, m], axis=1)
    if args.ablate:
        ablate = [(read_vector(args.ablate, model), args.ablate_layer or args.layer)]
    iv = None
    if args.vector or args.steer or ablate:
        iv = T.build_intervention([r for r in rows for _ in prompts], model, ablate=ablate)
    g = generate(
        model,
        prompts * len(coefs),
        sampling=sampling,
        seed=args.seed,
        system=args.system,
        chat=not args.raw,
        intervention=iv,
        positions=positions,
        probes=probes,
        batch_size=args.batch_size,
        progress=len(prompts) * len(coefs) > args.batch_size,
        mesh=mesh,
        unroll=not args.scanned,
    )
    # How the chat template rendered the prompts (thinking switch, system prompt folded), on each
    # --json row: what a run's record needs to be read later.
    chat = None if args.raw else model.chat_conventions()
    for i, text in enumerate(g.texts):
        p, c = prompts[i % len(prompts)], coefs[i // len(prompts)]
        row = {
            "prompt": p,
            "text": text,
            "tokens": g.tokens[i],
            "finish_reason": g.finish_reasons[i],
        }
        if chat is not None:
            row["chat"] = chat
        setting = {"coef": c} if not isinstance(c, tuple) else {c[0]: c[1], "gain": args.gain}
        terms = rows[i // len(prompts)]
        if args.steer or args.when:
            row["terms"] = [T.to_dict(t) for t in terms]
            row["positions"] = positions
        if args.vector:
            row.update(
                **setting,
                layers=args.layer,
                positions=positions,
                vector=args.vector,
                prompt_last_projection={
                    l: round(float(g.prompt_projections[i][l, -1, 0]), 4) for l in args.layer
                },
            )
        if monitor is not None:
            x = float(g.prompt_projections[i][monitor.layer, -1, -1])
            row["monitor"] = {
                "layer": monitor.layer,
                "projection": round(x, 4),
                "threshold": monitor.threshold,
                "flagged": bool(monitor.flag(x)),
                "file": monitor_file,
            }
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            head = p if isinstance(p, str) else p[-1]["content"]
            what = " ".join(f"{k} {v:g}" for k, v in setting.items() if k != "gain")
            tag = (
                f"  [{what} at layer {','.join(map(str, args.layer))}, {positions}]"
                if args.vector
                else ""
            )
            if args.steer or args.when:
                tag = f"  [{T.describe(terms)}, {positions}]"
            if monitor is not None:
                verdict = "FLAGGED" if row["monitor"]["flagged"] else "ok"
                tag += f"  [monitor: {verdict}, {x:.2f} vs {monitor.threshold:.2f}]"
            print(f"### {head}{tag}\n{text}\n")
    sys.stdout.flush()
    return 0
