"""What the notebooks share: the short-mode extraction and saving a figure. Not a notebook itself
(tests/test_notebooks.py runs every `notebooks/*.py` not starting with `_`)."""

import importlib.util
from pathlib import Path


def repo_root() -> Path:
    """The checkout holding configs/: above this file, or above the working directory."""
    for p in [Path(__file__).resolve().parent, Path.cwd(), *Path.cwd().parents]:
        for q in (p, p.parent):
            if (q / "configs" / "extract.py").exists():
                return q
    raise FileNotFoundError(
        "configs/extract.py not found above notebooks/ or the working directory"
    )


def load_config(name: str, arg: str = ""):
    """`configs/<name>.py:get_config(arg)`, loaded by path like the CLI does."""
    spec = importlib.util.spec_from_file_location(
        f"_nb_{name}", repo_root() / "configs" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def extract_vector(workdir: Path, trait: str, *, short: bool, layer: int = 20) -> dict:
    """The quickstart's extraction (`configs/extract.py:runlocal`) into `workdir`, reused when it
    is finished there. Short mode answers 3 questions under one instruction pair with 16 greedy
    tokens on the scanned layer layout, skips the plot and keeps every non-empty pair: a vector
    of the right shape for a demo run in CI, not a good one."""
    from pvjax.methods.extraction import run

    cfg = load_config("extract", "runlocal")
    cfg.trait, cfg.workdir = trait, str(workdir)
    if short:
        cfg.n_questions, cfg.n_pairs, cfg.n_per_question = 3, 1, 1
        cfg.max_new_tokens, cfg.temperature, cfg.batch_size, cfg.plot = 16, 0.0, 4, False
        cfg.unroll = False  # the scanned layout compiles in about a fifth of the unrolled time
        cfg.filter.mode, cfg.filter.min_pairs = "none", 2
        cfg.causality.layers, cfg.causality.coefs, cfg.causality.max_pairs = (layer,), (0.0, 1.0), 2
    return run(cfg, progress=False)


def save(fig, path: Path) -> Path:
    """Write the figure (directories made as needed) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path
