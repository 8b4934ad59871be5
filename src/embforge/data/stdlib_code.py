"""A real retrieval dataset present on every machine: Python's own standard library.

Each documented function becomes a (query, positive) pair: the query is the docstring's
summary (its first paragraph), the positive is the function's source with the docstring
removed. Whole modules are held out for evaluation (a stable hash of the module name
decides), so evaluation never sees a module that training saw.

Every skipped candidate is counted by reason (no docstring, short summary, duplicate
summary, unparsable file, ...) and returned in :class:`StdlibStats`.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from embforge.atomic import atomic_write

# folders of the standard library that are tests, demos or vendored copies
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "__pycache__",
}
_MIN_SUMMARY_WORDS = 4
_MIN_BODY_LINES = 3
_MAX_DOC_CHARS = 2000


@dataclass
class CodePair:
    query: str  # docstring summary
    positive: str  # function source without its docstring
    module: str  # dotted module name (the "source" of the pair)
    name: str  # qualified function name


@dataclass
class StdlibStats:
    files: int = 0
    functions: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _summary(doc: str) -> str:
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def _without_docstring(source_lines: list[str], node: ast.AST) -> str:
    """The function's source lines minus the docstring statement, dedented."""
    doc = node.body[0]
    lines = source_lines[node.lineno - 1 : doc.lineno - 1] + source_lines[doc.end_lineno : node.end_lineno]
    if hasattr(node, "decorator_list") and node.decorator_list:
        lines = source_lines[node.decorator_list[0].lineno - 1 : node.lineno - 1] + lines
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines).strip()[:_MAX_DOC_CHARS]


def _walk_functions(tree: ast.Module):
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        parent, prefix = stack.pop()
        for node in ast.iter_child_nodes(parent):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{node.name}", node
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((node, f"{prefix}{node.name}."))


def collect_pairs(root: Path | None = None) -> tuple[list[CodePair], StdlibStats]:
    """Walk the standard library and return its (docstring summary, code) pairs."""
    root = root or stdlib_root()
    stats = StdlibStats()
    pairs: list[CodePair] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        stats.files += 1
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            stats.skipped["unparsable file"] += 1
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        lines = text.splitlines()
        for name, node in _walk_functions(tree):
            stats.functions += 1
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                stats.skipped["no docstring"] += 1
                continue
            summary = _summary(doc)
            if len(summary.split()) < _MIN_SUMMARY_WORDS:
                stats.skipped["summary under 4 words"] += 1
                continue
            if node.end_lineno - node.body[0].end_lineno < _MIN_BODY_LINES:
                stats.skipped["body under 3 lines"] += 1
                continue
            pairs.append(CodePair(summary, _without_docstring(lines, node), module, name))
    return pairs, stats


def is_held_out(module: str, eval_fraction: float) -> bool:
    """Stable module-level split: the same module is always on the same side."""
    top = module.split(".")[0]  # a package and its submodules stay together
    return zlib.crc32(top.encode()) % 1000 < eval_fraction * 1000


def split_pairs(
    pairs: list[CodePair], stats: StdlibStats, eval_fraction: float = 0.25
) -> tuple[list[CodePair], list[CodePair]]:
    """(train, eval) by held-out module, each without duplicate summaries or documents."""
    train, held = [], []
    for side, keep in ((False, train), (True, held)):
        seen_q, seen_d = set(), set()
        for p in pairs:
            if is_held_out(p.module, eval_fraction) != side:
                continue
            if p.query in seen_q or p.positive in seen_d:
                stats.skipped["duplicate summary or code"] += 1
                continue
            seen_q.add(p.query)
            seen_d.add(p.positive)
            keep.append(p)
    stats.kept = len(train) + len(held)
    return train, held


def write_pairs_jsonl(pairs: list[CodePair], path: Path) -> Path:
    """Training pairs as JSONL records ``{query, positive, source}``."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps({"query": p.query, "positive": p.positive, "source": p.module}) + "\n")

    return atomic_write(path, write)


def write_beir(
    pairs: list[CodePair], folder: Path, split: str = "test", max_queries: int | None = None, seed: int = 0
) -> Path:
    """Evaluation pairs as a BEIR folder: every pair's code is in the corpus, and
    ``max_queries`` of them (a seeded sample) are queries with their code as the one relevant document."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen = list(range(len(pairs)))
    if max_queries is not None and max_queries < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, max_queries))

    def corpus(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for i, p in enumerate(pairs):
                f.write(json.dumps({"_id": f"d{i}", "title": "", "text": p.positive}) + "\n")

    def queries(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for i in chosen:
                f.write(json.dumps({"_id": f"q{i}", "text": pairs[i].query}) + "\n")

    def qrels(tmp: Path) -> None:
        tmp.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in chosen), encoding="utf-8")

    atomic_write(folder / "corpus.jsonl", corpus)
    atomic_write(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir(exist_ok=True)
    atomic_write(folder / "qrels" / f"{split}.tsv", qrels)
    return folder
