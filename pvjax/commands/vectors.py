"""`pvjax vectors`: look into vector files, and move vectors to and from llama.cpp.

    pvjax vectors show runs/quickstart/humorous/vectors.safetensors
    pvjax vectors export runs/quickstart/humorous/vectors.safetensors --out humorous.gguf \
        --layers 20 --coef 4
    pvjax vectors import humorous.gguf --model smollm2-135m-instruct --out humorous.safetensors

`export` writes llama.cpp's control-vector GGUF (`--control-vector F.gguf`): pvjax row r becomes
`direction.{r-1}`, the same residual llama.cpp edits (`pvjax.files.control_vectors` gives the
mapping and the llama.cpp lines it rests on). `import` reads one (pvjax's, llama.cpp's
cvector-generator's or repeng's) back into a pvjax vector file for `--model`, checked against the
model's width and depth from its metadata alone, without loading weights.
"""

from __future__ import annotations

from pathlib import Path

from pvjax.errors import UsageError


def add_parser(sub):
    p = sub.add_parser(
        "vectors",
        help="show vector files; export to / import from llama.cpp",
        description="Show vector files; export persona vectors as llama.cpp control "
        "vectors and import control vectors as pvjax vector files.",
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    vsub = p.add_subparsers(dest="vectors_command")

    show = vsub.add_parser("show", help="keys, shapes and model of a vector file or control vector")
    show.add_argument(
        "file", type=Path, help="a .safetensors or .pt vector file, or a .gguf control vector"
    )
    show.set_defaults(func=cmd_show)

    ex = vsub.add_parser(
        "export",
        help="write a llama.cpp control vector (GGUF) from a pvjax vector",
        description="pvjax row r (hidden_states[r], the output of block r) becomes "
        "direction.{r-1}, which llama.cpp adds to the output of its block r-1 (counted from 0): "
        "the same residual. Rows 0 and 1 have no llama.cpp slot.",
    )
    ex.add_argument("vector", help="FILE[:KEY] (KEY defaults to response_avg_diff)")
    ex.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    ex.add_argument(
        "--format",
        default="gguf",
        choices=("gguf",),
        help="gguf: llama.cpp's control vector (the only format)",
    )
    ex.add_argument(
        "--coef",
        type=float,
        default=1.0,
        help="scale the rows (default 1; llama.cpp's --control-vector-scaled multiplies again)",
    )
    ex.add_argument(
        "--layers",
        default=None,
        metavar="A-B",
        help="pvjax rows to export, inclusive (default 2 to n_layers-1; the last row, "
        "measured after the final norm, only when named); other rows are omitted",
    )
    ex.add_argument(
        "--model",
        default=None,
        help="the model (folder, .gguf or embedded name): checks the vector fits it and "
        "names its architecture as model_hint (default: the vector's model id)",
    )
    ex.set_defaults(func=cmd_export)

    im = vsub.add_parser(
        "import",
        help="read a llama.cpp / repeng control vector into a pvjax vector file",
        description="direction.N goes to pvjax row N+1; rows without a direction are zero.",
    )
    im.add_argument("gguf", type=Path, help="a control-vector .gguf")
    im.add_argument(
        "--model",
        required=True,
        help="the model it is for (folder, .gguf or embedded name); read from metadata",
    )
    im.add_argument("--out", required=True, type=Path, help="the .safetensors vector file to write")
    im.add_argument(
        "--key",
        default="response_avg_diff",
        help="the key to store the rows under (default response_avg_diff)",
    )
    im.set_defaults(func=cmd_import)
    return p


def _shim(source: str):
    """A model with config and no weights: what the vector checks need, in milliseconds."""
    from pvjax.loading import read_model_config
    from pvjax.model import Model

    return Model(config=read_model_config(source), params=None, tokenizer=None, source=str(source))


def cmd_show(args) -> int:
    if args.file.suffix == ".gguf":
        from pvjax.files.control_vectors import read_control_vector

        cv = read_control_vector(args.file)
        for k, v in cv.meta.items():
            print(f"{k}: {v}")
        ns = sorted(cv.directions)
        print(
            f"{len(ns)} directions of width {cv.width}: direction.{ns[0]}..direction.{ns[-1]} "
            f"= pvjax rows {ns[0] + 1}..{ns[-1] + 1}"
        )
        return 0
    from pvjax.files.vectors import load_vectors

    tensors, meta = load_vectors(args.file)
    for k, v in tensors.items():
        print(f"{k}: {list(v.shape)} {v.dtype}")
    for k, v in meta.items():
        print(f"{k}: {v}")
    return 0


def cmd_export(args) -> int:
    import warnings

    from pvjax.files.control_vectors import default_rows, export_gguf, parse_rows
    from pvjax.files.vectors import load_vectors, read_vector, split_spec

    model = _shim(args.model) if args.model else None
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # another model id of the same shape: say so, go on
        v = read_vector(args.vector, model)
    path, key = split_spec(args.vector)
    _, meta = load_vectors(path)
    n_layers = v.shape[0] - 1 if v.ndim == 2 else 0
    if n_layers < 2:
        raise UsageError(
            f"{args.vector} has shape {list(v.shape)}; a control vector needs one row "
            f"per layer ([n_layers+1, D] with n_layers >= 2)"
        )
    rows = parse_rows(args.layers, n_layers) if args.layers else default_rows(n_layers)
    hint = model.config.architecture if model else meta.get("model_id", "") or path.stem
    extra = {
        "pvjax.source": f"{path}:{key or 'response_avg_diff'}",
        "pvjax.model_id": model.model_id if model else meta.get("model_id", ""),
        "pvjax.model_fingerprint": (
            model.config.fingerprint() if model else meta.get("model_fingerprint", "")
        ),
    }
    extra = {k: x for k, x in extra.items() if x}
    out = export_gguf(v, args.out, rows=rows, coef=args.coef, model_hint=hint, extra=extra)
    first, last = rows.start, rows.stop - 1
    note = (
        ""
        if last == n_layers
        else f"; row {n_layers} (after the final norm) left out, "
        f"--layers {first}-{n_layers} includes it"
    )
    print(
        f"wrote {out}: pvjax rows {first}..{last} x {args.coef:g} as direction.{first - 1}.."
        f"direction.{last - 1}{note}"
    )
    print(
        f"llama.cpp: --control-vector {out}  (one pvjax row r alone: "
        f"--control-vector-layer-range r-1 r-1)"
    )
    return 0


def cmd_import(args) -> int:
    from pvjax.files.control_vectors import read_control_vector, to_rows
    from pvjax.files.vectors import KEYS, save_vectors

    if args.key not in KEYS:
        raise UsageError(f"--key {args.key!r}: one of {list(KEYS)}")
    model = _shim(args.model)
    cv = read_control_vector(args.gguf)
    rows = to_rows(
        cv,
        n_layers=model.n_layers,
        hidden_size=model.hidden_size,
        model_id=model.model_id,
        fingerprint=model.config.fingerprint(),
        name=str(args.gguf),
    )
    ns = sorted(cv.directions)
    extra = {
        "imported_from": str(args.gguf),
        "control_vector_model_hint": str(cv.meta.get("controlvector.model_hint", "")),
        "control_vector_rows": f"direction.N -> row N+1 for N in {ns}",
    }
    if "pvjax.coef" in cv.meta:  # the rows are coef * the exported vector, as llama.cpp adds them
        extra["control_vector_coef"] = str(cv.meta["pvjax.coef"])
    out = save_vectors(args.out, {args.key: rows}, model=model, extra=extra)
    print(
        f"wrote {out}:{args.key}: direction.{ns[0]}..direction.{ns[-1]} as pvjax rows "
        f"{ns[0] + 1}..{ns[-1] + 1} ({len(ns)} rows; the others zero)"
    )
    return 0
