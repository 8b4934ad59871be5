"""Data hygiene: Nomic's consistency filter, deduplication, length limits.

Every removal is counted by reason (and by source for the consistency filter) and
returned as a report; nothing is dropped silently. Outputs are written atomically.

Consistency filtering (Nomic Embed, arXiv 2402.01613 §4.2): per source, in chunks of at
most ``chunk_pairs`` pairs, embed queries and documents with a teacher and keep a pair
only if its own document is among the query's ``top_k`` nearest documents of that chunk.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from embforge.atomic import atomic_write
from embforge.data.records import DataReport, OnBadRecord, TrainingRecord, read_records
from embforge.vectors import l2_normalise


def consistent(query_emb: np.ndarray, doc_emb: np.ndarray, doc_texts: list[str], top_k: int) -> np.ndarray:
    """(n,) bool: is pair i's own document among query i's ``top_k`` documents of this chunk?

    A document text that occurs several times in the chunk counts as the pair's own at
    each of its positions (identical texts are the same document).
    """
    import faiss

    n = len(doc_texts)
    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(l2_normalise(doc_emb))
    _, ids = index.search(l2_normalise(query_emb), min(top_k, n))  # (n, k)
    return np.array([any(doc_texts[j] == doc_texts[i] for j in row if j >= 0) for i, row in enumerate(ids)])


def consistency_filter(
    teacher: Any,
    input_path: Path,
    output_path: Path,
    *,
    top_k: int = 2,
    chunk_pairs: int = 1_000_000,
    source_field: str = "source",
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    batch_size: int = 64,
    on_bad_record: OnBadRecord = "error",
    bad: DataReport | None = None,
) -> dict[str, dict[str, int]]:
    """Keep the pairs of ``input_path`` that pass the consistency check; write them to ``output_path``.

    Training records (:mod:`embforge.data.records`); a record with several positives is
    checked on its first. The source is ``source_field`` (default ``"source"``, missing ->
    ``"default"``). Pairs are grouped by source, chunked in file order, and written back in
    file order. Returns ``{source: {"kept", "dropped"}}``; bad lines skipped with
    ``on_bad_record="skip"`` are counted in ``bad`` (dataset ``"input"``).
    """
    by_source: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    lines: list[str] = []
    bad = bad if bad is not None else DataReport()
    for _, obj, record in read_records(input_path, bad, "input", on_bad_record):
        by_source[str(obj.get(source_field, "default"))].append((len(lines), record.query, record.positive))
        lines.append(json.dumps(obj, ensure_ascii=False))
    keep = np.zeros(len(lines), dtype=bool)
    report: dict[str, dict[str, int]] = {}
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    for source, pairs in sorted(by_source.items()):
        for start in range(0, len(pairs), chunk_pairs):
            chunk = pairs[start : start + chunk_pairs]
            q = np.asarray(teacher.encode([p[1] for p in chunk], prompt_name=query_prompt_name, **kwargs))
            d = np.asarray(teacher.encode([p[2] for p in chunk], prompt_name=document_prompt_name, **kwargs))
            ok = consistent(q, d, [p[2] for p in chunk], top_k)
            keep[[p[0] for p in chunk]] = ok
        kept = int(keep[[p[0] for p in pairs]].sum())
        report[source] = {"kept": kept, "dropped": len(pairs) - kept}

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for line, k in zip(lines, keep):
                if k:
                    f.write(line + "\n")

    atomic_write(output_path, write)
    return report


# ---------------------------------------------------------------------------- dedup and hygiene
_PUNCT = re.compile(r"[^\w\s]")


def normalise_text(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form used for exact dedup."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii") or text
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def text_hash(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(normalise_text(p) for p in parts).encode()).hexdigest()


def clean_pairs(
    input_path: Path,
    output_path: Path,
    *,
    min_chars: int = 1,
    max_chars: int | None = None,
    teacher: Any = None,
    near_duplicate_threshold: float | None = None,
    batch_size: int = 64,
    on_bad_record: OnBadRecord = "skip",
) -> Counter:
    """Remove bad, too short/long, exact-duplicate and (with a teacher) near-duplicate records.

    Bad lines (:mod:`embforge.data.records`: empty texts, a positive among the negatives,
    malformed lines) are removed and counted by reason, this tool's job; with
    ``on_bad_record="error"`` the first one is an error naming file:line instead. Lengths
    apply to the query and every positive. Exact duplicates: same normalised (query,
    positives). Near duplicates: a pair whose teacher embedding (query and first positive
    concatenated, so the cosine is the mean of the two cosines) reaches
    ``near_duplicate_threshold`` with an already kept pair; the first occurrence is kept.
    Returns counts: read, kept, and each removal reason.
    """
    counts: Counter = Counter()
    kept_rows: list[tuple[dict, TrainingRecord]] = []
    seen: set[str] = set()
    bad = DataReport()
    for _, obj, record in read_records(input_path, bad, "input", on_bad_record):
        lengths = [len(t) for t in (record.query, *record.positives)]
        if min(lengths) < min_chars:
            counts[f"shorter than {min_chars} characters"] += 1
            continue
        if max_chars is not None and max(lengths) > max_chars:
            counts[f"longer than {max_chars} characters"] += 1
            continue
        key = text_hash(record.query, *record.positives)
        if key in seen:
            counts["exact duplicate (normalised text)"] += 1
            continue
        seen.add(key)
        kept_rows.append((obj, record))
    if teacher is not None and near_duplicate_threshold is not None and kept_rows:
        kept_rows = _drop_near_duplicates(teacher, kept_rows, near_duplicate_threshold, batch_size, counts)
    counts["read"] = bad.read["input"]
    counts.update(bad.skipped.get("input", {}))
    counts["kept"] = len(kept_rows)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row, _ in kept_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(output_path, write)
    return counts


def _drop_near_duplicates(
    teacher: Any, rows: list[tuple[dict, TrainingRecord]], threshold: float, batch_size: int, counts: Counter
) -> list[tuple[dict, TrainingRecord]]:
    import faiss

    q = l2_normalise(np.asarray(teacher.encode([r.query for _, r in rows], batch_size=batch_size)))
    p = l2_normalise(np.asarray(teacher.encode([r.positive for _, r in rows], batch_size=batch_size)))
    both = np.concatenate([q, p], axis=1) / np.sqrt(2)  # cosine of the pair = mean of the two cosines
    index = faiss.IndexFlatIP(both.shape[1])
    kept: list[tuple[dict, TrainingRecord]] = []
    for i, row in enumerate(rows):
        if index.ntotal:
            score, _ = index.search(both[i : i + 1], 1)
            if score[0, 0] >= threshold:
                counts[f"near duplicate (pair cosine >= {threshold})"] += 1
                continue
        index.add(both[i : i + 1])
        kept.append(row)
    return kept
