"""Config files: `get_config(arg)` Python files loaded by path, with `--config.a.b=value` overrides.

One loader for every config-driven command and the study runner (`load_config`), one for a config
file as a module (its `sweep(add)`: `config_module`), and one for what a config loads from its own
folder (`beside`, `sibling`: `configs/*.py` nest each other and share `study_parts.py`). A config
file is loaded by path, never imported as a package, so it runs from any working directory and never
picks up another checkout's `configs`. Every mistake (a missing file, a folder, a file that fails to
run, an unknown field, a value of the wrong type) is a `UsageError` naming it; nothing here loads a
model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pvjax.errors import UsageError
from pvjax.settings.fields import flatten


def flat_keys(d: dict) -> list[str]:
    """Every leaf field of a nested config dict, dotted (`judge.backend`)."""
    return list(flatten(d))


def load_config(path: str, overrides: list[str]):
    """Load a `get_config(arg)` file (`FILE[:ARG]`) and apply `--config.a.b=value` overrides
    through absl flags, exactly as `ml_collections.config_flags` does for scripts."""
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UsageError(
            f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.trait=evil)"
        )
    file = Path(path.split(":", 1)[0])
    if not file.exists():
        raise UsageError(f"config file {str(file)!r} not found (e.g. configs/extract.py:runlocal)")
    if not file.is_file():
        raise UsageError(
            f"config {str(file)!r} is a directory, not a config file "
            "(e.g. configs/extract.py:runlocal)"
        )
    known = flat_keys(_parse(path, []).to_dict())
    for o in overrides:
        key = o[len("--config.") :].split("=", 1)[0]
        if key not in known:
            raise UsageError(f"unknown config field {key!r} (known: {', '.join(known)})")
    return _parse(path, overrides)


def _parse(path: str, overrides: list[str]):
    from absl import flags
    from ml_collections import config_flags

    argv = ["pvjax", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    # The override flags are found by scanning an argv at definition time; give it ours, not
    # sys.argv.
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=fv, lock_config=True, sys_argv=argv
    )
    try:
        fv(argv)
        return fv.config
    except flags.Error as e:
        raise UsageError(f"bad config override: {e}") from None
    except Exception as e:  # whatever the config file itself raised while it ran
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load config file {path!r}: {type(e).__name__}: {first}")


def config_module(path: str):
    """The config file (`FILE[:ARG]`) as a module, for what it declares beside `get_config`."""
    file = Path(path.split(":", 1)[0])
    try:
        return _module(file, f"pvjax_config_{file.stem}")
    except Exception as e:
        raise UsageError(
            f"cannot load config file {str(file)!r}: {type(e).__name__}: {e}"
        ) from None


def beside(here: str, name: str):
    """The module `<name>.py` in the folder of the file `here` (a config's `__file__`): how a
    config reaches the parts it shares with others (`configs/study_parts.py`)."""
    return _module(Path(here).resolve().parent / f"{name}.py", f"pvjax_configs_{name}")


def sibling(here: str, name: str, arg: str = ""):
    """`<name>.py`'s config for `arg`, from the folder of the file `here`: how one config nests
    another."""
    return beside(here, name).get_config(arg)


def _module(file: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
