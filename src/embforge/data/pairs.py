"""Contrastive training data: sources of records (in memory or streamed) and batch samplers.

Records are :class:`~embforge.data.records.TrainingRecord` objects, read and validated by
:mod:`embforge.data.records` (a bad line is an error naming file:line, or, with
``on_bad_record: skip``, skipped and counted by reason in the :class:`DataReport`).
Well-formed records a stage cannot use (too few negatives) are skipped and counted too.

Sources hand out :class:`Draw` s (a record with this epoch's positive and negatives)
forever, epoch after epoch, and have a small resumable state: :class:`MemorySource` (a
seeded permutation per epoch) and :class:`StreamSource` (sorted shards read in order
through a seeded shuffle buffer; state = reader position + the buffered lines' positions,
so memory depends on the buffer, not on the dataset size). A record with several
positives trains with one of them per epoch, and a record with more negatives than the
stage uses trains with a sample of them (``negative_sampling: sample``, in the list's
order) or its first ones (``first``); both are drawn from (seed, epoch, record position)
alone, so a resumed run draws the same. :class:`BatchSampler` combines sources into batches:
``mixed`` (every example drawn by weight: NV-Embed's well-blended batches),
``proportional`` (fixed per-dataset counts in every batch) or ``single_source`` (every
batch from one dataset chosen by weight: Nomic). ``no_duplicates`` (per source) defers an
example whose texts already occur among the batch's checked examples to a later batch.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from embforge.data.io import load_beir
from embforge.data.records import DataReport, OnBadRecord, TrainingRecord, parse_line, read_records
from embforge.errors import DataError


def text_key(text: str | bytes) -> int:
    """A stable 63-bit id of a text or raw line (the same in every process, unlike ``hash``)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


NegativeSampling = Literal["sample", "first"]


def usable(record: TrainingRecord, dataset: str, num_negatives: int, report: DataReport) -> TrainingRecord | None:
    """The record as a stage uses it (source defaulting to the dataset), or None (counted) if
    it has fewer than ``num_negatives`` negatives. All its negatives are kept: :func:`draw`
    picks each epoch's."""
    if len(record.negatives) < num_negatives:
        report.skip(dataset, f"fewer than {num_negatives} negatives")
        return None
    record.source = record.source or dataset
    return record


@dataclass
class Draw:
    """A record as it trains this time: one of its positives and ``num_negatives`` of its negatives."""

    record: TrainingRecord
    positive: str
    negatives: list[str]

    def to_state(self) -> list:
        return [self.record.__dict__, self.positive, self.negatives]

    @classmethod
    def from_state(cls, state: list) -> Draw:
        record = TrainingRecord(**state[0])
        return cls(record, state[1], state[2] if len(state) > 2 else record.negatives)  # older: [record, positive]


_NEGATIVES_STREAM = 1  # a second random stream per (seed, epoch, position), apart from the positive's


def draw(
    record: TrainingRecord,
    seed: int,
    epoch: int,
    position: tuple[int, ...],
    num_negatives: int,
    negative_sampling: NegativeSampling = "sample",
) -> Draw:
    """What ``record`` trains with in ``epoch``: a function of (seed, epoch, position) only.

    The positive is drawn uniformly from its positives. The negatives are its first
    ``num_negatives`` (``"first"``, or when it has exactly that many), or that many drawn
    without replacement and kept in the list's order (``"sample"``; mined lists are
    hardest first).
    """
    positive = record.positives[0]
    if len(record.positives) > 1:
        positive = record.positives[
            int(np.random.default_rng([seed, epoch, *position]).integers(len(record.positives)))
        ]
    negatives = record.negatives[:num_negatives]
    if negative_sampling == "sample" and len(record.negatives) > num_negatives:
        rng = np.random.default_rng([seed, epoch, *position, _NEGATIVES_STREAM])
        chosen = np.sort(rng.choice(len(record.negatives), size=num_negatives, replace=False))
        negatives = [record.negatives[int(i)] for i in chosen]
    return Draw(record, positive, negatives)


# ---------------------------------------------------------------------------- sources


class MemorySource:
    """Records held in memory; a new seeded permutation every epoch."""

    def __init__(
        self,
        records: list[TrainingRecord],
        seed: int,
        name: str,
        num_negatives: int = 0,
        negative_sampling: NegativeSampling = "sample",
    ):
        if not records:
            raise DataError(f"dataset {name!r} has no usable records")
        self.records, self.seed, self.name = records, seed, name
        self.num_negatives, self.negative_sampling = num_negatives, negative_sampling
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next(self) -> Draw:
        if self.cursor >= len(self.records):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        index = int(self._order[self.cursor])
        self.cursor += 1
        record = self.records[index]
        return draw(record, self.seed, self.epoch, (index,), self.num_negatives, self.negative_sampling)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


@dataclass
class _Line:
    """A usable record read from a stream, where: (epoch, shard, byte offset, line number), and a
    digest of the line (a resume re-reads it there and checks it is the same line)."""

    record: TrainingRecord
    where: tuple[int, int, int, int]
    digest: int


class StreamSource:
    """JSONL shards read in order, one line at a time, through a seeded shuffle buffer.

    With ``share=(rank, world)`` the reader parses only its share of each shard's lines
    (line ``rank + 1``, then every ``world``-th), skipping the others unparsed.

    The buffer holds up to ``shuffle_buffer`` records of the current epoch and hands out
    a random one (seeded), refilled from the stream; at the end of an epoch it drains
    before the next epoch begins, so every epoch yields each usable record once (a buffer
    as large as the dataset shuffles it fully; 0 reads in file order). Resumable: the
    state is the reader's (epoch, shard, byte offset, line), the buffered lines'
    positions (re-read on resume, never their text) and the generator's state.
    """

    def __init__(
        self,
        pattern: str,
        name: str,
        num_negatives: int,
        report: DataReport,
        seed: int = 0,
        on_bad_record: OnBadRecord = "error",
        *,
        shuffle_buffer: int = 0,
        negative_sampling: NegativeSampling = "sample",
        share: tuple[int, int] = (0, 1),
    ):
        self.shards = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
        if not self.shards:
            raise DataError(f"dataset {name!r}: no files match {pattern}")
        self.name, self.num_negatives, self.report = name, num_negatives, report
        self.seed, self.on_bad_record = seed, on_bad_record
        self.shuffle_buffer, self.negative_sampling = shuffle_buffer, negative_sampling
        self.rank, self.world = share  # this reader parses lines rank + 1, rank + 1 + world, ... of each shard
        self.epoch, self.shard, self.offset, self.lineno = 0, 0, 0, 0
        self.epoch_read = False  # the reader reached the end of the current epoch (the buffer drains)
        self.buffer: list[_Line] = []
        self.rng = np.random.default_rng([seed, 0x5EED])
        self._file = None

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _parse(self, line: bytes, shard: int, lineno: int, report: DataReport) -> TrainingRecord | None:
        parsed = parse_line(line, f"{self.shards[shard]}:{lineno}", report, self.name, self.on_bad_record)
        return parsed and usable(parsed[1], self.name, self.num_negatives, report)

    def _read(self) -> _Line | None:
        """The next usable line of this epoch, or None at its end (the reader then stands at the next epoch)."""
        while self.shard < len(self.shards):
            if self._file is None:
                self._file = open(self.shards[self.shard], "rb")  # noqa: SIM115 (kept open across calls)
                self._file.seek(self.offset)
            start = self.offset
            line = self._file.readline()
            if not line:
                self._close()
                self.shard, self.offset, self.lineno = self.shard + 1, 0, 0
                continue
            self.offset += len(line)
            self.lineno += 1
            if not line.strip() or (self.lineno - 1) % self.world != self.rank:
                continue
            record = self._parse(line, self.shard, self.lineno, self.report)
            if record is not None:
                return _Line(record, (self.epoch, self.shard, start, self.lineno), text_key(line))
        self.epoch, self.shard, self.offset, self.lineno = self.epoch + 1, 0, 0, 0
        return None

    def _draw(self, item: _Line) -> Draw:
        epoch, shard, _, lineno = item.where
        return draw(item.record, self.seed, epoch, (shard, lineno), self.num_negatives, self.negative_sampling)

    def next(self) -> Draw:
        if not self.shuffle_buffer:
            item = self._read() or self._read()  # None: the epoch ended; the next one starts
            if item is None:
                raise DataError(f"dataset {self.name!r}: no usable record found in its shards")
            return self._draw(item)
        if not self.buffer and self.epoch_read:  # the epoch is drained: fill from the next one
            self.epoch_read = False
        while len(self.buffer) < self.shuffle_buffer and not self.epoch_read:
            item = self._read()
            if item is None:
                self.epoch_read = True
            else:
                self.buffer.append(item)
        if not self.buffer:  # a whole epoch read, nothing usable in it
            raise DataError(f"dataset {self.name!r}: no usable record found in its shards")
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self._draw(self.buffer.pop())

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "offset": self.offset,
            "lineno": self.lineno,
            "epoch_read": self.epoch_read,
            "buffer": [[*item.where, item.digest] for item in self.buffer],
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self._close()
        self.epoch, self.shard, self.offset, self.lineno = (state[k] for k in ("epoch", "shard", "offset", "lineno"))
        self.epoch_read = state.get("epoch_read", False)
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self.buffer = []
        for entry in state.get("buffer", []):  # re-read each buffered line where it was; counted once already
            where, digest = tuple(entry[:4]), entry[4]
            _, shard, offset, lineno = where
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                line = f.readline()
            if text_key(line) != digest:
                raise DataError(f"{self.shards[shard]}:{lineno} changed since the checkpoint was written")
            self.buffer.append(_Line(self._parse(line, shard, lineno, DataReport()), where, digest))


def load_jsonl_records(
    path: Path,
    name: str,
    num_negatives: int,
    report: DataReport,
    fields: dict[str, str] | None = None,
    on_bad_record: OnBadRecord = "error",
    share: tuple[int, int] | None = None,
) -> list[TrainingRecord]:
    """The usable records of a JSONL file (``fields``: see :func:`~embforge.data.records.parse_line`;
    ``share``: ``(rank, world)``, only every world-th line from the rank-th is read)."""
    lines = read_records(path, report, name, on_bad_record, fields, share)
    records = (usable(r, name, num_negatives, report) for _, _, r in lines)
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
    negatives: list[str]  # the stage's num_negatives of its negatives, drawn for this epoch


class BatchSampler:
    """Draws batches of :class:`Example` from several sources; resumable."""

    def __init__(
        self,
        sources: list,
        weights: list[float],
        batch_size: int,
        mode: str,
        no_duplicates: bool | list[bool],
        seed: int,
    ):
        """``no_duplicates``: for all sources or one flag each; a source's examples are kept apart from
        each other's texts only where its flag is set (the sources whose queries see other examples'
        documents: a batch may repeat the label texts of classification rows scored without them)."""
        self.sources, self.batch_size, self.mode = sources, batch_size, mode
        flags = [no_duplicates] * len(sources) if isinstance(no_duplicates, bool) else list(no_duplicates)
        if len(flags) != len(sources):
            raise ValueError(f"{len(flags)} no_duplicates flags for {len(sources)} sources")
        self.no_duplicates = flags
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.rng = np.random.default_rng(seed)
        self.pending: list[list[Draw]] = [[] for _ in sources]  # deferred: duplicates

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

    def _take(self, i: int) -> Draw:
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
                        f"dataset {self.sources[i].name!r} cannot fill a batch of {count} "
                        "without duplicate texts; "
                        "set no_duplicates: false or use a larger dataset"
                    )
                drawn = self._take(i)
                record = drawn.record
                # the texts this example brings: its query, every positive (the others are no negatives
                # either) and the negatives drawn for it, not the rest of a wide mined list
                texts = {record.query, *record.positives, *drawn.negatives}
                if self.no_duplicates[i]:
                    if texts & seen:
                        deferred.append(drawn)
                        continue
                    seen |= texts
                batch.append(Example(i, record, drawn.positive, drawn.negatives))
                taken += 1
            self.pending[i].extend(deferred)
        return batch

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "sources": [s.state_dict() for s in self.sources],
            "pending": [[d.to_state() for d in p] for p in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for source, s in zip(self.sources, state["sources"]):
            source.load_state_dict(s)
        self.pending = [[Draw.from_state(d) for d in p] for p in state["pending"]]
