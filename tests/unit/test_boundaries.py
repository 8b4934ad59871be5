"""The import boundaries of ../shared/STYLE.md, checked on the source."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "embforge"

# module path prefix -> imports it must never make
FORBIDDEN = {
    "config.py": ("torch", "transformers", "numpy", "embforge.models", "embforge.train", "embforge.eval"),
    "errors.py": ("torch", "yaml", "numpy", "embforge."),
    "atomic.py": ("torch", "numpy", "yaml", "embforge.models", "embforge.data", "embforge.train", "embforge.eval"),
    "models/": ("embforge.train", "embforge.serve", "embforge.eval", "torch.distributed", "embforge.cli"),
    "losses.py": ("embforge.models", "transformers"),
    "eval/": ("embforge.train", "embforge.serve", "embforge.cli", "embforge.models"),
    "serve/": ("embforge.train", "embforge.cli"),
    "data/": ("embforge.cli", "embforge.serve"),
    "train/": ("embforge.cli", "embforge.serve"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(SRC)) for p in FILES])
def test_import_boundaries(path):
    rel = str(path.relative_to(SRC))
    imports = _imports(path)
    if rel != "cli.py" and rel != "__main__.py":
        assert "embforge.cli" not in imports, f"{rel} imports the CLI"
    for prefix, forbidden in FORBIDDEN.items():
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            bad = sorted(
                i
                for i in imports
                if any(
                    i == f.rstrip(".") or i.startswith(f if f.endswith(".") else f + ".") or i == f for f in forbidden
                )
            )
            assert not bad, f"{rel} must not import {bad}"


def test_every_package_file_is_checked():
    assert len(FILES) >= 15
