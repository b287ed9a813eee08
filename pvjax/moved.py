"""Old import paths of modules that moved into packages, kept working for users' scripts.

`import pvjax.generate` (or `from pvjax import vectors`) gives the very module object now at
`pvjax.engine.generate` (`pvjax.files.vectors`): one module under two names, so a monkeypatch or
an `isinstance` check through either name sees the same thing. New code imports the new paths;
`docs/layout.md` lists them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

MOVED = {
    "answer_cache": "engine.answer_cache",
    "atomic": "files.atomic",
    "causality": "measure.causality",
    "config": "models.config",
    "datasets": "files.datasets",
    "decode_loop": "engine.decode_loop",
    "embedded": "loading.embedded",
    "extract": "methods.extraction",
    "extract_config": "settings.extraction",
    "generate": "engine.generate",
    "generate_mesh": "engine.mesh",
    "judges": "measure.judges",
    "mc": "measure.mc",
    "memory": "parallel.memory",
    "monitor": "methods.monitoring",
    "multihost": "parallel.multihost",
    "packing": "measure.packing",
    "pair_filter": "methods.pair_filter",
    "plots": "files.plots",
    "prompt_split": "engine.prompt_split",
    "prompts": "files.prompts",
    "run_provenance": "files.run_provenance",
    "screen": "methods.screening",
    "sharding": "parallel.sharding",
    "shift": "methods.finetune_shift",
    "trait_gen": "methods.trait_gen",
    "traits": "files.traits",
    "vectors": "files.vectors",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `pvjax.<old>` and hands back the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "pvjax" or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(f"pvjax.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())


def attribute(name: str):
    """`pvjax.<old>` read as an attribute (after `import pvjax` alone)."""
    if name in MOVED:
        return importlib.import_module(f"pvjax.{name}")
    raise AttributeError(f"module 'pvjax' has no attribute {name!r}")


install()
