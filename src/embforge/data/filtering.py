"""Data hygiene: Nomic's consistency filter, deduplication, length limits; streamed and sharded.

Every removal is counted by reason (and by source for the consistency filter) and
returned as a report; nothing is dropped silently. Outputs are written atomically.

Consistency filtering (Nomic Embed, arXiv 2402.01613 §4.2): per source, in chunks of at
most ``chunk_pairs`` pairs, embed queries and documents with a teacher and keep a pair
only if its own document is among the query's ``top_k`` nearest documents of that chunk.

Both filters stream their input and take several input shards, each written to its own
output shard; shard i is done by rank ``i % world`` under torchrun
(:mod:`embforge.data.sharding`, as ``embforge mine`` does), so one process writes the same
files as N ranks, and the reports are summed over shards and ranks. Sources, chunks and
duplicates are per shard: a source split over two shards is chunked within each, and a
pair repeated in another shard is not an exact or near duplicate of it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import json
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from embforge.atomic import atomic_write
from embforge.data.embedding_cache import encode_normalised
from embforge.data.io import iter_lines, parse_json_line
from embforge.data.records import DataReport, OnBadRecord, TrainingRecord, read_records
from embforge.data.sharding import chunked, rank_shards, sum_over_ranks
from embforge.errors import DataError
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


def consistency_filter_shards(
    teacher: Any,
    inputs: list[Path],
    outputs: list[Path],
    *,
    top_k: int = 2,
    chunk_pairs: int = 1_000_000,
    source_field: str = "source",
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    batch_size: int = 64,
    on_bad_record: OnBadRecord = "error",
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Keep the pairs of each input shard that pass the consistency check; write them to its output shard.

    Training records (:mod:`embforge.data.records`); a record with several positives is
    checked on its first. The source is ``source_field`` (default ``"source"``, missing ->
    ``"default"``). Within a shard, pairs are grouped by source, chunked in file order,
    and the kept ones written in file order. Shard i is filtered by rank ``i % world``.

    Memory is one chunk of one source (its texts, their embeddings and a FAISS index over
    ``chunk_pairs`` documents) plus an open file per source (so the open-files limit,
    ``ulimit -n``, bounds the number of sources of a shard); nothing grows with the file.
    Three passes over disk make that possible, in a hidden ``.<output>.tmp-spill-*``
    folder beside the output (removed on success and on failure):

    1. stream the input once; append each good line's (line number, query, first positive)
       to its source's spill file;
    2. per source, read its spill file ``chunk_pairs`` at a time, embed, check, and append
       the kept line numbers to the source's kept file (ascending: spill files are in file order);
    3. stream the input again beside a merge of the sorted kept files and write the kept
       lines, in file order, to the output (atomically: no partial output ever).

    Returns:
        ``{"shards", "per_source": {source: {"kept", "dropped"}}, "kept", "total", "skipped":
        {reason: n}}`` summed over shards and ranks (every rank gets the total); ``total``
        counts the good pairs, ``skipped`` the bad lines skipped with ``on_bad_record="skip"``.

    Raises:
        BadRecordError: a bad line with ``on_bad_record="error"``, naming file:line.
        DataError: an input changed between the passes, or input and output counts differ.
    """
    counts: Counter = Counter()  # (source, "kept" | "dropped") -> pairs
    bad = DataReport()
    for input_path, output_path in rank_shards(inputs, outputs, rank, world):
        before = _identity(input_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output_path.name}.tmp-spill-", dir=output_path.parent) as spill:
            spills = _spill_by_source(input_path, Path(spill), source_field, bad, on_bad_record)
            kept_files = []
            for source, spill_path in sorted(spills.items()):
                kept_path = spill_path.with_suffix(".kept")
                kept, dropped = _check_source(
                    teacher,
                    spill_path,
                    kept_path,
                    top_k=top_k,
                    chunk_pairs=chunk_pairs,
                    prompt_names=(query_prompt_name, document_prompt_name),
                    batch_size=batch_size,
                )
                counts[source, "kept"] += kept
                counts[source, "dropped"] += dropped
                kept_files.append(kept_path)
            if _identity(input_path) != before:
                raise DataError(f"{input_path} changed while it was being filtered; nothing was written")
            atomic_write(output_path, functools.partial(_write_lines, input_path, kept_files))
    counts, skipped = sum_over_ranks(counts, bad.skipped.get("input", Counter()), world=world)
    per_source = {
        s: {"kept": counts[s, "kept"], "dropped": counts[s, "dropped"]} for s in sorted({s for s, _ in counts})
    }
    kept = sum(r["kept"] for r in per_source.values())
    total = kept + sum(r["dropped"] for r in per_source.values())
    return {"shards": len(inputs), "per_source": per_source, "kept": kept, "total": total, "skipped": dict(skipped)}


def consistency_filter(teacher: Any, input_path: Path, output_path: Path, **options: Any) -> dict[str, dict[str, int]]:
    """:func:`consistency_filter_shards` of one file; returns ``{source: {"kept", "dropped"}}``."""
    return consistency_filter_shards(teacher, [Path(input_path)], [Path(output_path)], **options)["per_source"]


def _identity(path: Path) -> tuple[int, int]:
    """(size, modification time): changes when a file is rewritten between two passes over it."""
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def _spill_by_source(
    path: Path, folder: Path, source_field: str, bad: DataReport, on_bad_record: OnBadRecord
) -> dict[str, Path]:
    """Pass 1: each good line's ``[line number, query, first positive]`` appended to its source's file."""
    files: dict[str, TextIO] = {}
    with contextlib.ExitStack() as stack:
        for lineno, obj, record in read_records(path, bad, "input", on_bad_record):
            source = str(obj.get(source_field, "default"))
            if source not in files:  # numbered files: a source name may be no valid file name
                files[source] = stack.enter_context((folder / f"{len(files)}.jsonl").open("w", encoding="utf-8"))
            files[source].write(json.dumps([lineno, record.query, record.positive], ensure_ascii=False) + "\n")
    return {source: Path(f.name) for source, f in files.items()}


def _check_source(
    teacher: Any,
    spill: Path,
    kept_path: Path,
    *,
    top_k: int,
    chunk_pairs: int,
    prompt_names: tuple[str | None, str | None],
    batch_size: int,
) -> tuple[int, int]:
    """Pass 2: one source's spill file, ``chunk_pairs`` at a time; the kept line numbers to ``kept_path``.

    Returns:
        (kept, dropped) pairs.
    """
    kept = dropped = 0
    with spill.open(encoding="utf-8") as f, kept_path.open("w", encoding="utf-8") as out:
        for chunk in chunked(map(json.loads, f), chunk_pairs):
            docs = [doc for _, _, doc in chunk]
            q = encode_normalised(teacher, [query for _, query, _ in chunk], prompt_names[0], batch_size)  # (n, D)
            d = encode_normalised(teacher, docs, prompt_names[1], batch_size)  # (n, D)
            ok = consistent(q, d, docs, top_k)
            out.writelines(f"{lineno}\n" for (lineno, _, _), k in zip(chunk, ok) if k)
            kept += int(ok.sum())
            dropped += len(chunk) - int(ok.sum())
    return kept, dropped


def _write_lines(path: Path, numbers_files: list[Path], out: Path) -> None:
    """Pass 3: the lines of ``path`` whose numbers are in the (each ascending) ``numbers_files``, in file order."""
    with contextlib.ExitStack() as stack:
        numbers = heapq.merge(*(map(int, stack.enter_context(p.open(encoding="utf-8"))) for p in numbers_files))
        wanted = next(numbers, None)
        with out.open("w", encoding="utf-8") as f:
            for lineno, line in iter_lines(path):
                if wanted is None:
                    break
                if lineno == wanted:
                    f.write(json.dumps(parse_json_line(line, f"{path}:{lineno}"), ensure_ascii=False) + "\n")
                    wanted = next(numbers, None)


# ---------------------------------------------------------------------------- dedup and hygiene
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
