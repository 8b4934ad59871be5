"""Contrastive training data: records, sources (in memory or streamed), and batch samplers.

A record is one JSONL object ``{"query", "positive", "negatives"?, "source"?}``.
Malformed lines (bad JSON, missing or non-string fields) raise :class:`DataError` naming
file and line. Records that are well-formed but unusable are *skipped and counted*, never
dropped silently: empty query or positive, too few negatives; a negative equal to the
positive is removed and counted. :class:`DataReport` carries the counts.

Sources hand out records forever (epoch after epoch) and have a small resumable state:
:class:`MemorySource` (a seeded permutation per epoch) and :class:`StreamSource`
(sequential read over sorted shards, state = shard index + byte offset, so memory does
not depend on the dataset size). :class:`BatchSampler` combines sources into batches:
``mixed`` (every example drawn by weight: NV-Embed's well-blended batches),
``proportional`` (fixed per-dataset counts in every batch) or ``single_source`` (every
batch from one dataset chosen by weight: Nomic). ``no_duplicates`` defers an example
whose texts already occur in the batch to a later batch.
"""

from __future__ import annotations

import glob
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embforge.data.io import iter_jsonl, load_beir, parse_json_line
from embforge.errors import DataError


@dataclass
class PairRecord:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    source: str = ""


@dataclass
class DataReport:
    """What was read, kept and skipped (by reason), per dataset."""

    read: Counter = field(default_factory=Counter)
    skipped: dict[str, Counter] = field(default_factory=dict)
    fixed: dict[str, Counter] = field(default_factory=dict)

    def skip(self, dataset: str, reason: str) -> None:
        self.skipped.setdefault(dataset, Counter())[reason] += 1

    def fix(self, dataset: str, reason: str) -> None:
        self.fixed.setdefault(dataset, Counter())[reason] += 1

    def summary(self) -> str:
        parts = []
        for name in sorted(self.read):
            skipped = dict(self.skipped.get(name, {}))
            fixed = dict(self.fixed.get(name, {}))
            parts.append(f"{name}: read {self.read[name]}, skipped {skipped or 0}, fixed {fixed or 0}")
        return "; ".join(parts)


def text_key(text: str) -> int:
    """A stable 63-bit id of a text (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def parse_record(obj: dict, where: str, dataset: str, num_negatives: int, report: DataReport) -> PairRecord | None:
    """Validate one JSON object. Raises DataError if malformed; returns None (counted) if unusable."""
    for key in ("query", "positive"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}; the line has {sorted(obj)}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    negatives = obj.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise DataError(f"{where}: field 'negatives' must be a list of strings")
    report.read[dataset] += 1
    if not obj["query"].strip() or not obj["positive"].strip():
        report.skip(dataset, "empty query or positive")
        return None
    kept = [n for n in negatives if n.strip() and n != obj["positive"]]
    if len(kept) != len(negatives):
        report.fix(dataset, "negative equal to the positive, or empty, removed")
    if len(kept) < num_negatives:
        report.skip(dataset, f"fewer than {num_negatives} negatives")
        return None
    return PairRecord(
        obj["query"], obj["positive"], kept[:num_negatives] if num_negatives else [], str(obj.get("source", dataset))
    )


# ---------------------------------------------------------------------------- sources


class MemorySource:
    """Records held in memory; a new seeded permutation every epoch."""

    def __init__(self, records: list[PairRecord], seed: int, name: str):
        if not records:
            raise DataError(f"dataset {name!r} has no usable records")
        self.records, self.seed, self.name = records, seed, name
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next(self) -> PairRecord:
        if self.cursor >= len(self.records):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        record = self.records[self._order[self.cursor]]
        self.cursor += 1
        return record

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


class StreamSource:
    """JSONL shards read in order, one line at a time; resumable at (shard, byte offset).

    Shuffle the shards when you write them: a stream is read in file order.
    """

    def __init__(self, pattern: str, name: str, num_negatives: int, report: DataReport):
        self.shards = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
        if not self.shards:
            raise DataError(f"dataset {name!r}: no files match {pattern}")
        self.name, self.num_negatives, self.report = name, num_negatives, report
        self.epoch, self.shard, self.offset, self.lineno = 0, 0, 0, 0
        self._file = None

    def _open(self):
        self._file = open(self.shards[self.shard], "rb")  # noqa: SIM115 (kept open across calls)
        self._file.seek(self.offset)

    def next(self) -> PairRecord:
        for _ in range(1_000_000):  # bounded: a stream with no usable line at all is an error
            if self._file is None:
                self._open()
            line = self._file.readline()
            if not line:
                self._file.close()
                self._file = None
                self.shard, self.offset, self.lineno = self.shard + 1, 0, 0
                if self.shard == len(self.shards):
                    self.shard, self.epoch = 0, self.epoch + 1
                continue
            self.offset += len(line)
            self.lineno += 1
            if not line.strip():
                continue
            where = f"{self.shards[self.shard]}:{self.lineno}"
            record = parse_record(parse_json_line(line, where), where, self.name, self.num_negatives, self.report)
            if record is not None:
                return record
        raise DataError(f"dataset {self.name!r}: no usable record found in its shards")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "lineno": self.lineno}

    def load_state_dict(self, state: dict) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.epoch, self.shard, self.offset, self.lineno = (
            state["epoch"],
            state["shard"],
            state["offset"],
            state["lineno"],
        )


def load_jsonl_records(
    path: Path, name: str, num_negatives: int, report: DataReport, fields: dict[str, str] | None = None
) -> list[PairRecord]:
    """Records of a JSONL file; ``fields`` maps our names to the file's (e.g. ``{"query": "anchor"}``),
    and a single-string ``negatives`` field (a triplet's negative) counts as a list of one."""
    rename = {theirs: ours for ours, theirs in (fields or {}).items()}
    records = []
    for lineno, obj in iter_jsonl(path):
        if rename:
            obj = {rename.get(k, k): v for k, v in obj.items()}
            if isinstance(obj.get("negatives"), str):
                obj["negatives"] = [obj["negatives"]]
        record = parse_record(obj, f"{path}:{lineno}", name, num_negatives, report)
        if record is not None:
            records.append(record)
    return records


def load_beir_pairs(folder: Path, split: str, name: str, report: DataReport) -> list[PairRecord]:
    """(query, positive) for every qrel with relevance > 0 of a BEIR split."""
    corpus, queries, qrels = load_beir(folder, split)
    records = []
    for qid, docs in qrels.items():
        for did, grade in docs.items():
            if grade <= 0:
                continue
            report.read[name] += 1
            if did not in corpus:
                report.skip(name, "qrel names a document missing from the corpus")
                continue
            records.append(PairRecord(queries[qid], corpus[did], [], name))
    return records


# ---------------------------------------------------------------------------- sampling


@dataclass
class Example:
    dataset: int  # index into the stage's datasets
    record: PairRecord


class BatchSampler:
    """Draws batches of :class:`Example` from several sources; resumable."""

    def __init__(self, sources: list, weights: list[float], batch_size: int, mode: str, no_duplicates: bool, seed: int):
        self.sources, self.batch_size, self.mode, self.no_duplicates = sources, batch_size, mode, no_duplicates
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.rng = np.random.default_rng(seed)
        self.pending: list[list[PairRecord]] = [[] for _ in sources]  # deferred because of duplicates

    def _counts(self) -> list[int]:
        if self.mode == "single_source":
            counts = [0] * len(self.sources)
            counts[int(self.rng.choice(len(self.sources), p=self.p))] = self.batch_size
            return counts
        if self.mode == "proportional":
            exact = self.p * self.batch_size
            counts = np.floor(exact).astype(int)
            for i in np.argsort(-(exact - counts), kind="stable")[: self.batch_size - counts.sum()]:
                counts[i] += 1
            return counts.tolist()
        picks = self.rng.choice(len(self.sources), size=self.batch_size, p=self.p)
        return np.bincount(picks, minlength=len(self.sources)).tolist()

    def _take(self, i: int) -> PairRecord:
        return self.pending[i].pop(0) if self.pending[i] else self.sources[i].next()

    def next_batch(self) -> list[Example]:
        batch: list[Example] = []
        seen: set[str] = set()
        for i, count in enumerate(self._counts()):
            deferred, taken, attempts = [], 0, 0
            while taken < count:
                attempts += 1
                if attempts > count * 50 + 50:
                    raise DataError(
                        f"dataset #{i} cannot fill a batch of {count} without duplicate texts; "
                        "set no_duplicates: false or use a larger dataset"
                    )
                record = self._take(i)
                texts = {record.query, record.positive, *record.negatives}
                if self.no_duplicates and texts & seen:
                    deferred.append(record)
                    continue
                seen |= texts
                batch.append(Example(i, record))
                taken += 1
            self.pending[i].extend(deferred)
        return batch

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "sources": [s.state_dict() for s in self.sources],
            "pending": [[r.__dict__ for r in p] for p in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for source, s in zip(self.sources, state["sources"]):
            source.load_state_dict(s)
        self.pending = [[PairRecord(**r) for r in p] for p in state["pending"]]
