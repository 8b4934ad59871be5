"""Nomic's consistency filter, streamed and sharded (deduplication and length limits: :mod:`embforge.data.cleaning`).

Every removal is counted by reason (and by source for the consistency filter) and
returned as a report; nothing is dropped silently. Outputs are written atomically.

Consistency filtering (Nomic Embed, arXiv 2402.01613 §4.2): per source, in chunks of at
most ``chunk_pairs`` pairs, embed queries and documents with a teacher and keep a pair
only if its own document is among the query's ``top_k`` nearest documents of that chunk.
A source's chunks span its shards: its pairs are taken in shard order, then file order,
so a source split over many shards keeps exactly the pairs that one file holding the same
lines would. Each distinct document text of a chunk is one candidate, and a pair's own
document is the candidate at the position of its text (see :func:`consistent`).

The filter streams its input and takes several input shards, each written to its own
output shard by rank ``i % world`` under torchrun (:mod:`embforge.data.sharding`, as
``embforge mine`` does), so one process writes the same files as N ranks. It splits its
chunks over the ranks (every rank reads every shard) and every rank returns the whole report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from embforge.atomic import atomic_write
from embforge.data.embedding_cache import encode_normalised
from embforge.data.io import iter_lines, parse_json_line
from embforge.data.records import DataReport, OnBadRecord, read_records
from embforge.data.sharding import gather_over_ranks, rank_shards
from embforge.errors import DataError
from embforge.vectors import l2_normalise


def consistent(query_emb: np.ndarray, doc_emb: np.ndarray, own: np.ndarray, top_k: int) -> np.ndarray:
    """(n,) bool: is pair i's own document, row ``own[i]`` of ``doc_emb``, among query i's ``top_k`` documents?

    A pair's document is identified by its position, never by comparing texts. The filter
    passes the distinct document texts of a chunk as ``doc_emb`` and maps every pair whose
    document has that text to the same row, so a document repeated in several pairs is one
    candidate: it takes one of a query's ``top_k`` places, not one per copy, and the pairs
    sharing it are kept or dropped alike whatever order FAISS gives equal scores. Distinct
    texts that the teacher embeds equally are distinct candidates (FAISS orders the tie).

    Args:
        query_emb: (n, D) the queries of one chunk.
        doc_emb: (m, D) its candidate documents.
        own: (n,) int, the row of ``doc_emb`` that is pair i's document.
        top_k: how many nearest documents a pair's own must be among.

    Returns:
        (n,) bool, True for the pairs to keep.
    """
    import faiss

    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(l2_normalise(doc_emb))
    _, ids = index.search(l2_normalise(query_emb), min(top_k, len(doc_emb)))  # (n, k)
    return (ids == np.asarray(own)[:, None]).any(axis=1)


@dataclasses.dataclass
class _Chunk:
    """One chunk of one source: its pairs are the source's next ``size`` in shard order, then file order."""

    source: str
    size: int = 0


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
    """Keep the pairs of every input shard that pass the consistency check; write each shard's to its output.

    Training records (:mod:`embforge.data.records`); a record with several positives is
    checked on its first. The source is ``source_field`` (default ``"source"``, missing ->
    ``"default"``). A source's pairs, across all shards in shard order and then file order,
    are cut into chunks of ``chunk_pairs``; a chunk may span shards. Within a chunk, pair
    i's own document is the position of its text among the chunk's distinct document texts
    (:func:`consistent`). Kept lines are written in file order, shard i by rank ``i % world``.

    Memory is one chunk of one source (its texts, their embeddings and a FAISS index over
    its distinct documents) plus an open file per source; nothing grows with the input but
    a few bytes per chunk. Three passes over disk make that possible, in a hidden
    ``.<first output>.tmp-spill-*`` folder per rank beside the first output (removed on
    success and on failure):

    1. every rank streams every shard, in order, and numbers the chunks in the order their
       first pair comes; it spills (query, first positive) of its own chunks (chunk g is
       rank ``g % world``'s) to one file per chunk, and (line number, chunk, position in
       chunk) of each good line of the shards it writes to one file per shard;
    2. in rounds of ``world`` chunks, each rank embeds and checks its chunk, and every rank
       gathers the round's kept flags and appends them in chunk order to one flag file (a
       byte per pair), counting kept and dropped per source;
    3. each rank streams its shards again beside their (line, chunk, position) files and
       writes the lines whose flag is set, in file order (atomically: no partial output).

    Returns:
        ``{"shards", "per_source": {source: {"kept", "dropped"}}, "kept", "total", "skipped":
        {reason: n}}`` over all shards; every rank sees every decision and every line, so
        every rank returns the same whole report, each pair counted once. ``total`` counts
        the good pairs, ``skipped`` the bad lines skipped with ``on_bad_record="skip"``.

    Raises:
        BadRecordError: a bad line with ``on_bad_record="error"``, naming file:line (on every rank).
        DataError: an input changed between the passes or ranks read different inputs, or
            input and output counts differ.
    """
    written = rank_shards(list(range(len(inputs))), outputs, rank, world)  # [(shard i, its output)]
    if not inputs:
        raise DataError("no input shards")
    before = [_identity(p) for p in inputs]
    for folder in {outputs[0].parent} | {o.parent for _, o in written}:
        folder.mkdir(parents=True, exist_ok=True)
    bad = DataReport()
    with tempfile.TemporaryDirectory(prefix=f".{outputs[0].name}.tmp-spill-", dir=outputs[0].parent) as spill:
        folder = Path(spill)
        chunks = _spill_chunks(
            inputs,
            folder,
            {i for i, _ in written},
            source_field=source_field,
            chunk_pairs=chunk_pairs,
            rank=rank,
            world=world,
            bad=bad,
            on_bad_record=on_bad_record,
        )
        _check_same_chunks_on_every_rank(chunks, world)
        counts = _check_chunks(
            teacher,
            chunks,
            folder,
            rank=rank,
            world=world,
            top_k=top_k,
            prompt_names=(query_prompt_name, document_prompt_name),
            batch_size=batch_size,
        )
        for path, identity in zip(inputs, before):
            if _identity(path) != identity:
                raise DataError(f"{path} changed while it was being filtered; nothing was written")
        offsets = np.cumsum([0] + [c.size for c in chunks])  # (chunks + 1,) where each chunk's flags start
        for i, output_path in written:
            kept_lines = _kept_lines(folder / f"{i}.members", folder / "kept.flags", offsets)
            atomic_write(output_path, functools.partial(_write_lines, inputs[i], kept_lines))
    per_source = {
        s: {"kept": counts[s, "kept"], "dropped": counts[s, "dropped"]} for s in sorted({c.source for c in chunks})
    }
    kept = sum(r["kept"] for r in per_source.values())
    total = kept + sum(r["dropped"] for r in per_source.values())
    skipped = dict(bad.skipped.get("input", {}))
    return {"shards": len(inputs), "per_source": per_source, "kept": kept, "total": total, "skipped": skipped}


def consistency_filter(teacher: Any, input_path: Path, output_path: Path, **options: Any) -> dict[str, dict[str, int]]:
    """:func:`consistency_filter_shards` of one file; returns ``{source: {"kept", "dropped"}}``."""
    return consistency_filter_shards(teacher, [Path(input_path)], [Path(output_path)], **options)["per_source"]


def _identity(path: Path) -> tuple[int, int]:
    """(size, modification time): changes when a file is rewritten between two passes over it."""
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def _spill_chunks(
    inputs: list[Path],
    folder: Path,
    written: set[int],
    *,
    source_field: str,
    chunk_pairs: int,
    rank: int,
    world: int,
    bad: DataReport,
    on_bad_record: OnBadRecord,
) -> list[_Chunk]:
    """Pass 1 (every rank, every shard in order): the chunks in the order of their first pair; this rank's spills.

    Chunk g's ``[query, first positive]`` lines go to ``folder/<g>.chunk`` on rank
    ``g % world`` only; each good line of a shard in ``written`` appends ``line chunk
    position`` to ``folder/<shard>.members``. Open at once: a chunk file per source, one members file.
    """
    if chunk_pairs < 1:
        raise DataError(f"chunk size must be at least 1, got {chunk_pairs}")
    chunks: list[_Chunk] = []
    filling: dict[str, int] = {}  # source -> its chunk being filled
    files: dict[int, TextIO] = {}  # this rank's chunks being filled -> their spill files
    try:
        for shard, path in enumerate(inputs):
            members_path = folder / f"{shard}.members"
            with members_path.open("w", encoding="utf-8") if shard in written else contextlib.nullcontext() as members:
                for lineno, obj, record in read_records(path, bad, "input", on_bad_record):
                    source = str(obj.get(source_field, "default"))
                    g = filling.get(source)
                    if g is None or chunks[g].size == chunk_pairs:
                        g = filling[source] = len(chunks)
                        chunks.append(_Chunk(source))
                        if g % world == rank:
                            files[g] = (folder / f"{g}.chunk").open("w", encoding="utf-8")
                    chunk = chunks[g]
                    if g in files:
                        files[g].write(json.dumps([record.query, record.positive], ensure_ascii=False) + "\n")
                        if chunk.size + 1 == chunk_pairs:
                            files.pop(g).close()
                    if members is not None:
                        members.write(f"{lineno} {g} {chunk.size}\n")
                    chunk.size += 1
    finally:
        for f in files.values():
            f.close()
    return chunks


def _check_same_chunks_on_every_rank(chunks: list[_Chunk], world: int) -> None:
    """Every rank must have cut the same chunks: pass 2 runs a collective per round of chunks, and
    ranks that disagreed on them (an input changed while they read it) would wait for ever.

    Raises:
        DataError: on every rank, when two ranks' chunks differ.
    """
    mine = [dataclasses.astuple(c) for c in chunks]
    if any(theirs != mine for theirs in gather_over_ranks(mine, world=world)):
        raise DataError("the ranks read different inputs (one changed while being read?); nothing was written")


def _check_chunks(
    teacher: Any,
    chunks: list[_Chunk],
    folder: Path,
    *,
    rank: int,
    world: int,
    top_k: int,
    prompt_names: tuple[str | None, str | None],
    batch_size: int,
) -> Counter:
    """Pass 2: this rank checks chunks ``rank``, ``rank + world``, ...; every rank writes all flags.

    After each round of ``world`` chunks the ranks gather the round's kept flags, and every
    rank appends them in chunk order to ``folder/kept.flags`` (one byte per pair).

    Returns:
        (source, "kept" | "dropped") -> pairs, over all chunks (the same on every rank).
    """
    counts: Counter = Counter()
    with (folder / "kept.flags").open("wb") as flags:
        for first in range(0, len(chunks), world):
            g = first + rank
            ok = None
            if g < len(chunks):
                ok = _check_chunk(teacher, folder / f"{g}.chunk", top_k, prompt_names, batch_size)
            for chunk, chunk_ok in zip(chunks[first : first + world], gather_over_ranks(ok, world=world)):
                flags.write(chunk_ok.astype(np.uint8).tobytes())
                counts[chunk.source, "kept"] += int(chunk_ok.sum())
                counts[chunk.source, "dropped"] += chunk.size - int(chunk_ok.sum())
    return counts


def _check_chunk(
    teacher: Any, spill: Path, top_k: int, prompt_names: tuple[str | None, str | None], batch_size: int
) -> np.ndarray:
    """(n,) bool, the kept flags of one chunk's spilled pairs; each distinct document text is embedded once."""
    with spill.open(encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    rows: dict[str, int] = {}  # distinct document text -> its row, in order of first occurrence
    own = np.array([rows.setdefault(doc, len(rows)) for _, doc in pairs])  # (n,)
    q = encode_normalised(teacher, [query for query, _ in pairs], prompt_names[0], batch_size)  # (n, D)
    d = encode_normalised(teacher, list(rows), prompt_names[1], batch_size)  # (m, D), m <= n
    return consistent(q, d, own, top_k)


def _kept_lines(members: Path, flags: Path, offsets: np.ndarray) -> Iterator[int]:
    """The line numbers, ascending, of one shard's kept pairs: from its ``line chunk position`` file and the flags."""
    if offsets[-1] == 0:  # no good pair anywhere (a memmap cannot map an empty file)
        return
    kept = np.memmap(flags, dtype=np.uint8, mode="r")  # (pairs,) read from disk as needed
    with members.open(encoding="utf-8") as f:
        for line in f:
            lineno, g, position = map(int, line.split())
            if kept[offsets[g] + position]:
                yield lineno


def _write_lines(path: Path, wanted: Iterator[int], out: Path) -> None:
    """Pass 3: the lines of ``path`` whose numbers ``wanted`` yields (ascending), in file order."""
    next_wanted = next(wanted, None)
    with out.open("w", encoding="utf-8") as f:
        for lineno, line in iter_lines(path):
            if next_wanted is None:
                break
            if lineno == next_wanted:
                f.write(json.dumps(parse_json_line(line, f"{path}:{lineno}"), ensure_ascii=False) + "\n")
                next_wanted = next(wanted, None)
