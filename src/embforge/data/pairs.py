"""Contrastive training data: sources of records (in memory or streamed) and batch samplers.

Records are :class:`~embforge.data.records.TrainingRecord` objects, read and validated by
:mod:`embforge.data.records` (a bad line is an error naming file:line, or, with
``on_bad_record: skip``, skipped and counted by reason in the :class:`DataReport`).
Well-formed records a stage cannot use (too few negatives) are skipped and counted too.

Sources hand out (record, positive) forever (epoch after epoch) and have a small resumable
state: :class:`MemorySource` (a seeded permutation per epoch) and :class:`StreamSource`
(sequential read over sorted shards, state = shard index + byte offset, so memory does
not depend on the dataset size). A record with several positives trains with one of them
per epoch, drawn from (seed, epoch, record position) alone, so a resumed run draws the
same. :class:`BatchSampler` combines sources into batches:
``mixed`` (every example drawn by weight: NV-Embed's well-blended batches),
``proportional`` (fixed per-dataset counts in every batch) or ``single_source`` (every
batch from one dataset chosen by weight: Nomic). ``no_duplicates`` defers an example
whose texts already occur in the batch to a later batch.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embforge.data.io import load_beir
from embforge.data.records import DataReport, OnBadRecord, TrainingRecord, parse_line, read_records
from embforge.errors import DataError


def text_key(text: str) -> int:
    """A stable 63-bit id of a text (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def usable(record: TrainingRecord, dataset: str, num_negatives: int, report: DataReport) -> TrainingRecord | None:
    """The record as a stage uses it (``num_negatives`` negatives, source defaulting to the
    dataset), or None (counted) if it has too few negatives."""
    if len(record.negatives) < num_negatives:
        report.skip(dataset, f"fewer than {num_negatives} negatives")
        return None
    record.negatives = record.negatives[:num_negatives]
    record.source = record.source or dataset
    return record


def draw_positive(record: TrainingRecord, seed: int, epoch: int, position: tuple[int, ...]) -> str:
    """The positive ``record`` trains with in ``epoch``: a function of (seed, epoch, position) only."""
    if len(record.positives) == 1:
        return record.positives[0]
    return record.positives[int(np.random.default_rng([seed, epoch, *position]).integers(len(record.positives)))]


# ---------------------------------------------------------------------------- sources


class MemorySource:
    """Records held in memory; a new seeded permutation every epoch."""

    def __init__(self, records: list[TrainingRecord], seed: int, name: str):
        if not records:
            raise DataError(f"dataset {name!r} has no usable records")
        self.records, self.seed, self.name = records, seed, name
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next(self) -> tuple[TrainingRecord, str]:
        if self.cursor >= len(self.records):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        index = int(self._order[self.cursor])
        self.cursor += 1
        return self.records[index], draw_positive(self.records[index], self.seed, self.epoch, (index,))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


class StreamSource:
    """JSONL shards read in order, one line at a time; resumable at (shard, byte offset).

    Shuffle the shards when you write them: a stream is read in file order.
    """

    def __init__(
        self,
        pattern: str,
        name: str,
        num_negatives: int,
        report: DataReport,
        seed: int = 0,
        on_bad_record: OnBadRecord = "error",
    ):
        self.shards = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
        if not self.shards:
            raise DataError(f"dataset {name!r}: no files match {pattern}")
        self.name, self.num_negatives, self.report = name, num_negatives, report
        self.seed, self.on_bad_record = seed, on_bad_record
        self.epoch, self.shard, self.offset, self.lineno = 0, 0, 0, 0
        self._file = None

    def _open(self):
        self._file = open(self.shards[self.shard], "rb")  # noqa: SIM115 (kept open across calls)
        self._file.seek(self.offset)

    def next(self) -> tuple[TrainingRecord, str]:
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
            parsed = parse_line(line, where, self.report, self.name, self.on_bad_record)
            record = parsed and usable(parsed[1], self.name, self.num_negatives, self.report)
            if record is not None:
                return record, draw_positive(record, self.seed, self.epoch, (self.shard, self.lineno))
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
    path: Path,
    name: str,
    num_negatives: int,
    report: DataReport,
    fields: dict[str, str] | None = None,
    on_bad_record: OnBadRecord = "error",
) -> list[TrainingRecord]:
    """The usable records of a JSONL file (``fields``: see :func:`~embforge.data.records.parse_line`)."""
    records = (
        usable(r, name, num_negatives, report) for _, _, r in read_records(path, report, name, on_bad_record, fields)
    )
    return [r for r in records if r is not None]


def load_beir_pairs(folder: Path, split: str, name: str, report: DataReport) -> list[TrainingRecord]:
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
            records.append(TrainingRecord(queries[qid], [corpus[did]], [], name))
    return records


# ---------------------------------------------------------------------------- sampling


@dataclass
class Example:
    dataset: int  # index into the stage's datasets
    record: TrainingRecord
    positive: str  # the record's positive drawn for this epoch


class BatchSampler:
    """Draws batches of :class:`Example` from several sources; resumable."""

    def __init__(self, sources: list, weights: list[float], batch_size: int, mode: str, no_duplicates: bool, seed: int):
        self.sources, self.batch_size, self.mode, self.no_duplicates = sources, batch_size, mode, no_duplicates
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.rng = np.random.default_rng(seed)
        self.pending: list[list[tuple[TrainingRecord, str]]] = [[] for _ in sources]  # deferred: duplicates

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

    def _take(self, i: int) -> tuple[TrainingRecord, str]:
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
                record, positive = self._take(i)
                texts = {record.query, *record.positives, *record.negatives}  # other positives are no negatives
                if self.no_duplicates and texts & seen:
                    deferred.append((record, positive))
                    continue
                seen |= texts
                batch.append(Example(i, record, positive))
                taken += 1
            self.pending[i].extend(deferred)
        return batch

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "sources": [s.state_dict() for s in self.sources],
            "pending": [[[r.__dict__, positive] for r, positive in p] for p in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for source, s in zip(self.sources, state["sources"]):
            source.load_state_dict(s)
        self.pending = [[(TrainingRecord(**r), positive) for r, positive in p] for p in state["pending"]]
