"""Data hygiene: exact and near-duplicate removal and length limits (``embforge data clean``), streamed
shard by shard and counted by reason; the consistency filter is :mod:`embforge.data.filtering`.

Under torchrun each rank cleans its own shards (rank ``i % world``, as ``embforge mine`` does) and
the reports are summed over ranks. Duplicates are per shard: a pair repeated in another shard is
not an exact or near duplicate of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embforge.atomic import atomic_write
from embforge.data.embedding_cache import encode_normalised
from embforge.data.records import DataReport, OnBadRecord, TrainingRecord, read_records
from embforge.data.sharding import chunked, rank_shards, sum_over_ranks

_PUNCT = re.compile(r"[^\w\s]")


def normalise_text(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form used for exact dedup."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii") or text
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def text_hash(*parts: str) -> bytes:
    """16-byte digest of the normalised texts: what the exact-duplicate set holds per distinct pair."""
    return hashlib.blake2b("\x1f".join(normalise_text(p) for p in parts).encode(), digest_size=16).digest()


def clean_shards(
    inputs: list[Path],
    outputs: list[Path],
    *,
    min_chars: int = 1,
    max_chars: int | None = None,
    teacher: Any = None,
    near_duplicate_threshold: float | None = None,
    chunk_pairs: int = 4096,
    batch_size: int = 64,
    on_bad_record: OnBadRecord = "skip",
    rank: int = 0,
    world: int = 1,
) -> Counter:
    """Remove bad, too short/long, exact-duplicate and (with a teacher) near-duplicate records, shard by shard.

    Bad lines (:mod:`embforge.data.records`: empty texts, a positive among the negatives,
    malformed lines) are removed and counted by reason, this tool's job; with
    ``on_bad_record="error"`` the first one is an error naming file:line instead. Lengths
    apply to the query and every positive. Exact duplicates: same normalised (query,
    positives). Near duplicates: a pair whose teacher embedding (query and first positive
    concatenated, so the cosine is the mean of the two cosines) reaches
    ``near_duplicate_threshold`` with an already kept pair; the first occurrence is kept.

    Each shard is streamed: read, checked, embedded ``chunk_pairs`` at a time and written
    atomically to its output; shard i is cleaned by rank ``i % world``. Duplicates are
    found **within a shard** (a pair repeated in another shard is kept there too), so
    memory is one chunk plus, per shard, the set of 16-byte digests of its distinct pairs
    and (with a teacher) the FAISS index of its kept pairs (2 × D floats each).

    Returns:
        Counts summed over shards and ranks: read, kept, and each removal reason.
    """
    counts: Counter = Counter()
    bad = DataReport()
    for input_path, output_path in rank_shards(inputs, outputs, rank, world):
        near = (
            _NearDuplicates(teacher, near_duplicate_threshold, batch_size)
            if teacher is not None and near_duplicate_threshold is not None
            else None
        )
        rows = _distinct_rows(read_records(input_path, bad, "input", on_bad_record), min_chars, max_chars, counts)

        def write(tmp: Path, rows: Iterator[tuple[dict, TrainingRecord]] = rows, near=near) -> None:
            with tmp.open("w", encoding="utf-8") as f:
                for chunk in chunked(rows, chunk_pairs):
                    kept = near.keep(chunk, counts) if near is not None else chunk
                    f.writelines(json.dumps(obj, ensure_ascii=False) + "\n" for obj, _ in kept)
                    counts["kept"] += len(kept)

        atomic_write(output_path, write)
    counts["read"] = bad.read["input"]
    counts.update(bad.skipped.get("input", {}))
    (total,) = sum_over_ranks(counts, world=world)
    return total


def clean_pairs(input_path: Path, output_path: Path, **options: Any) -> Counter:
    """:func:`clean_shards` of one file."""
    return clean_shards([Path(input_path)], [Path(output_path)], **options)


def _distinct_rows(
    records: Iterator[tuple[int, dict, TrainingRecord]], min_chars: int, max_chars: int | None, counts: Counter
) -> Iterator[tuple[dict, TrainingRecord]]:
    """The records within the length limits and not an exact duplicate of an earlier one (removals counted)."""
    seen: set[bytes] = set()
    for _, obj, record in records:
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
        yield obj, record


class _NearDuplicates:
    """The kept pairs of one shard in a FAISS index; a pair too close to one of them is dropped."""

    def __init__(self, teacher: Any, threshold: float, batch_size: int):
        self.teacher, self.threshold, self.batch_size = teacher, threshold, batch_size
        self.index = None

    def keep(self, rows: list[tuple[dict, TrainingRecord]], counts: Counter) -> list[tuple[dict, TrainingRecord]]:
        """The rows of one chunk that are no near duplicate of a kept pair (earlier chunks and rows first).

        One search of the whole chunk against the pairs kept before it, and one chunk × chunk
        product for the pairs within it, instead of a search per pair.
        """
        import faiss

        q = encode_normalised(self.teacher, [r.query for _, r in rows], None, self.batch_size)  # (n, D)
        p = encode_normalised(self.teacher, [r.positive for _, r in rows], None, self.batch_size)  # (n, D)
        both = np.concatenate([q, p], axis=1) / np.sqrt(2)  # (n, 2D); cosine of the pair = mean of the two cosines
        if self.index is None:
            self.index = faiss.IndexFlatIP(both.shape[1])
        if self.index.ntotal:
            earlier = self.index.search(both, 1)[0][:, 0]  # (n,) best cosine with a pair kept before this chunk
        else:
            earlier = np.full(len(rows), -np.inf, dtype=np.float32)
        within = both @ both.T  # (n, n)
        kept = np.zeros(len(rows), dtype=bool)
        for i in range(len(rows)):
            best = max(earlier[i], np.max(within[i, :i], where=kept[:i], initial=-np.inf))
            if best >= self.threshold:
                counts[f"near duplicate (pair cosine >= {self.threshold})"] += 1
            else:
                kept[i] = True
        self.index.add(both[kept])
        return [row for row, k in zip(rows, kept) if k]
