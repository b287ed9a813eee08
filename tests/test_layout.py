"""The package map of docs/layout.md, enforced: every import inside `pvjax/` (deferred ones too)
goes to the same layer or one below, never up. The table here is the map's "may import" column
as ranks; a new package has to be placed in it (the test names a module it cannot place)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pvjax"

# Higher imports lower. Peers at one rank may import each other only where PEERS allows.
RANKS = {
    "pvjax.cli": 9,
    "pvjax.commands": 9,
    "pvjax.studies": 8,
    "pvjax.serve": 8,
    "pvjax.methods": 7,
    "pvjax.finetune": 7,
    "pvjax.measure": 6,
    "pvjax.llm": 5.5,
    "pvjax.engine": 5,
    "pvjax.settings": 4,
    "pvjax": 3,
    "pvjax.model": 3,  # the package's own __init__ re-exports the model entry points
    "pvjax.models": 2,
    "pvjax.loading": 2,
    "pvjax.kernels": 2,
    "pvjax.parallel": 1,
    "pvjax.files": 1,
    "pvjax.interventions": 0.5,
    "pvjax.capture": 0.5,
    "pvjax.inputs": 0.5,
    "pvjax.errors": 0,
    "pvjax.moved": 0,
    "pvjax.version": 0,
}
# Peers of one rank that must not know each other (the map's "not finetune", "not methods").
APART = {
    ("pvjax.methods", "pvjax.finetune"),
    ("pvjax.finetune", "pvjax.methods"),
    ("pvjax.serve", "pvjax.studies"),
    ("pvjax.studies", "pvjax.serve"),
}
# The map's stated exceptions: memory per device is computed from a model's config.
ALLOWED_UP = {
    ("pvjax.parallel.memory", "pvjax.models.config"),
    ("pvjax.parallel.memory", "pvjax.models.known"),
    ("pvjax.parallel.memory", "pvjax.loading.layout"),
    ("pvjax.parallel.memory", "pvjax.models.moe"),
}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def group(name: str) -> str:
    """The map's row of a module: its package below pvjax, or the top-level module itself."""
    parts = name.split(".")
    return ".".join(parts[:2])


def rank(name: str) -> float:
    g = group(name)
    if g not in RANKS:
        raise AssertionError(
            f"{name} is in no layer of docs/layout.md (add {g!r} to RANKS here and to the map)"
        )
    return RANKS[g]


def imports(mods: dict[str, Path]):
    def target(n):
        while n and n not in mods:
            n = n.rpartition(".")[0]
        return n

    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for full in names:
                if full.split(".")[0] == "pvjax" and (t := target(full)) and t != m:
                    yield m, t


def upward(mods) -> list[str]:
    bad = []
    for m, t in imports(mods):
        gm, gt = group(m), group(t)
        if gm == gt or (m, t) in ALLOWED_UP:
            continue
        if rank(t) > rank(m) or (gm, gt) in APART:
            bad.append(f"{m} imports {t} ({gm} is below {gt} in docs/layout.md)")
    return sorted(set(bad))


def test_every_import_goes_down_the_map():
    assert upward(modules()) == []


def test_every_module_has_a_layer():
    for m in modules():
        rank(m)


def test_an_upward_import_is_caught(tmp_path):
    mods = modules()
    fake = tmp_path / "sneaky.py"
    fake.write_text("def f():\n    from pvjax.studies.runner import load\n")
    mods["pvjax.files.sneaky"] = fake
    assert upward(mods) == [
        "pvjax.files.sneaky imports pvjax.studies.runner "
        "(pvjax.files is below pvjax.studies in docs/layout.md)"
    ]
    with pytest.raises(AssertionError, match="in no layer"):
        rank("pvjax.newthing.x")


def test_the_map_names_every_layer():
    text = (ROOT.parent / "docs" / "layout.md").read_text()
    for g in RANKS:
        if g != "pvjax":
            name = g.split(".", 1)[1]
            assert f"`{name}/`" in text or f"`{name}.py`" in text, g
