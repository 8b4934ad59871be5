"""Readers that name the file and line of every problem.

Malformed lines are never skipped silently: they raise :class:`DataError` with
``file:line`` and what is wrong.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from embforge.atomic import atomic_write
from embforge.errors import BadRecordError, DataError


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path or raise DataError if it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def parse_json_line(line: str | bytes, where: str) -> dict:
    """One JSONL line -> dict, or :class:`BadRecordError` naming ``where`` (``file:line``)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecordError(
                where, "undecodable bytes", f"undecodable bytes (not UTF-8) at byte {exc.start}"
            ) from exc
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecordError(where, "invalid JSON", f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise BadRecordError(where, "invalid JSON", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line) for each non-blank line; decoding is the parser's job, so
    undecodable bytes are reported with their ``file:line`` too."""
    path = require_file(path, "JSONL file")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSONL file.

    Raises:
        DataError: the file is missing, a line is not UTF-8, not valid JSON, or not a JSON object.
    """
    for lineno, line in iter_lines(path):
        yield lineno, parse_json_line(line, f"{path}:{lineno}")


def read_jsonl(path: str | Path, fields: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file, checking that every row has ``fields`` (naming file:line if not)."""
    rows = []
    for lineno, obj in iter_jsonl(path):
        missing = [f for f in fields if f not in obj]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field(s) {missing}; the line has {sorted(obj)}")
        rows.append(obj)
    return rows


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts to encode: one per line of a .txt file, or ``field`` of each JSONL object.

    Raises:
        DataError: unknown extension, an empty text (named by line), or a non-string field.
    """
    path = require_file(path, "input file")
    texts: list[str] = []
    if path.suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                text = line.rstrip("\n").rstrip("\r")
                if not text.strip():
                    raise DataError(f"{path}:{lineno}: empty line (every line of a .txt input is one text)")
                texts.append(text)
    elif path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            if field not in obj:
                raise DataError(f"{path}:{lineno}: missing field {field!r}; the line has {sorted(obj)}")
            text = obj[field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{lineno}: field {field!r} must be a non-empty string, got {text!r}")
            texts.append(text)
    else:
        raise DataError(f"{path}: unsupported input type {path.suffix!r}; use .txt (one text per line) or .jsonl")
    return texts


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (header ``query-id corpus-id score``) -> {query: {doc: relevance}}."""
    path = require_file(path, "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns, got {row}")
            try:
                score = int(float(row[2]))
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: score {row[2]!r} is not a number") from exc
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def load_beir(folder: Path, split: str) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """BEIR folder -> (corpus id -> text, query id -> text, qrels) for the judged queries."""
    if not folder.is_dir():
        raise DataError(f"BEIR folder not found: {folder}")
    corpus = {}
    for lineno, row in iter_jsonl(folder / "corpus.jsonl"):
        if "_id" not in row or "text" not in row:
            raise DataError(f"{folder / 'corpus.jsonl'}:{lineno}: needs fields '_id' and 'text'")
        corpus[str(row["_id"])] = (str(row.get("title") or "") + " " + str(row["text"])).strip()
    queries = {}
    for lineno, row in iter_jsonl(folder / "queries.jsonl"):
        if "_id" not in row or "text" not in row:
            raise DataError(f"{folder / 'queries.jsonl'}:{lineno}: needs fields '_id' and 'text'")
        queries[str(row["_id"])] = str(row["text"])
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise DataError(f"{folder}: {len(missing)} judged queries are missing from queries.jsonl, e.g. {missing[:3]}")
    queries = {q: queries[q] for q in qrels}
    return corpus, queries, qrels


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as .npy atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def save_json(path: str | Path, obj: object) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))
