"""The import boundaries of ../shared/STYLE.md ("Boundaries"), checked on the source.

Every sentence of that section is one rule below; an import anywhere in a file counts,
inside a function too (a lazy import is still a dependency).
"""

import ast
import sys
from pathlib import Path

import pytest

from embforge.optional import EXTRAS

SRC = Path(__file__).resolve().parents[2] / "src" / "embforge"
FILES = sorted(SRC.rglob("*.py"))
IDS = [str(p.relative_to(SRC)) for p in FILES]

# (the sentence of STYLE.md, files it governs (prefix; "x/" = the package), imports it forbids)
NEVER = [
    ("models never imports train, serve, eval or torch.distributed", "models/",
     ("embforge.train", "embforge.serve", "embforge.eval", "torch.distributed")),
    ("the modeling package saved folders carry imports nothing else of embforge", "modeling/",
     ("embforge.models", "embforge.train", "embforge.serve", "embforge.eval", "embforge.data", "embforge.onnx",
      "embforge.config", "embforge.errors", "torch.distributed")),
    ("Losses take tensors, never models", "losses.py", ("embforge.models", "transformers")),
    ("eval takes any object with .encode", "eval/", ("embforge.models", "embforge.train", "embforge.serve")),
    ("serve imports the embedder, not training code", "serve/", ("embforge.train", "losses", "embforge.losses")),
    # l2_normalise lives in embforge.vectors so that data/ and eval/ do not import each other
    ("data sits below eval (no cycle between them)", "data/", ("embforge.eval",)),
    ("the model never imports the parallelism code (torchtitan)", "models/", ("embforge.train.parallel",)),
    ("the atomic writer sits below everything that saves (stdlib only)", "atomic.py",
     ("torch", "numpy", "yaml", "embforge.models", "embforge.data", "embforge.train", "embforge.eval")),
]  # fmt: skip

# "config, errors: stdlib + yaml only" (config raises errors' exceptions)
STDLIB_ONLY = {"config.py": {"yaml", "embforge.errors"}, "errors.py": set()}

# "Optional dependencies (...) are imported lazily through one helper that names the extra"
OPTIONAL = set(EXTRAS) | {"flash_attn", "wandb"}


# the modeling package is copied into saved folders, where transformers' remote-code loader follows
# relative imports: it alone imports its own files relatively (tests/unit/modeling/test_package.py
# checks it imports nothing from embforge)
RELATIVE = "modeling/"


def _imports(path: Path) -> set[str]:
    rel = str(path.relative_to(SRC))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                assert rel.startswith(RELATIVE), f"{path}: relative import (embforge uses absolute imports)"
                names.add(f"embforge.{RELATIVE.rstrip('/')}.{node.module}")
            else:
                names.add(node.module)
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _governs(prefix: str, rel: str) -> bool:
    return rel.startswith(prefix) if prefix.endswith("/") else rel == prefix


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_never_arrows(path):
    rel = str(path.relative_to(SRC))
    imports = _imports(path)
    for rule, prefix, forbidden in NEVER:
        if _governs(prefix, rel):
            bad = sorted(i for i in imports if any(_under(i, f) for f in forbidden))
            assert not bad, f"{rel} imports {bad}; STYLE.md: {rule}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_nothing_imports_cli(path):
    rel = str(path.relative_to(SRC))
    if not rel.startswith("cli/") and rel != "__main__.py":  # `python -m embforge` is the CLI itself
        assert not any(_under(i, "embforge.cli") for i in _imports(path)), f"{rel} imports the CLI"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_only_the_cli_runs_the_demo_apps(path):
    """The demo pipelines (apps/) use the library; the library never imports them."""
    rel = str(path.relative_to(SRC))
    if not rel.startswith(("cli/", "apps/")):
        assert not any(_under(i, "embforge.apps") for i in _imports(path)), f"{rel} imports a demo app"


@pytest.mark.parametrize("rel", sorted(STDLIB_ONLY))
def test_config_and_errors_import_stdlib_and_yaml_only(rel):
    allowed = STDLIB_ONLY[rel]
    bad = sorted(
        i
        for i in _imports(SRC / rel)
        if i.split(".")[0] not in sys.stdlib_module_names and not any(_under(i, a) for a in allowed)
    )
    assert not bad, f"{rel} imports {bad}; STYLE.md: config, errors: stdlib + yaml only"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_optional_dependencies_only_through_require(path):
    rel = str(path.relative_to(SRC))
    bad = sorted(i for i in _imports(path) if i.split(".")[0] in OPTIONAL)
    assert not bad, f"{rel} imports {bad} directly; use embforge.optional.require (it names the extra)"


def test_package_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for path, rel in zip(FILES, IDS):
        unit = rel.split("/")[0].removesuffix(".py")
        deps = {i.split(".")[1] for i in _imports(path) if i.startswith("embforge.")}
        graph.setdefault(unit, set()).update(deps - {unit})

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*stack, node])

    for unit in sorted(graph):
        visit(unit, [])


def test_every_package_file_is_checked():
    assert len(FILES) >= 15
    for _, prefix, _ in NEVER:
        assert any(_governs(prefix, rel) for rel in IDS), f"rule for {prefix!r} governs no file (moved?)"
