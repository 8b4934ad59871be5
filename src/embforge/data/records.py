"""The training record: one type and one parser for every tool (train, mine, filter, synth).

A record is one JSONL object::

    {"query": str, "positive": str | "positives": [str, ...], "negatives"?: [str, ...],
     "source"?: str, "instruction"?: str, ...}

Other fields are allowed (tools that rewrite records keep them). A line is *bad* if it is
not UTF-8, not a JSON object, misses ``query`` or a positive, has a field of the wrong
type, an empty text, or a positive among its negatives. :func:`read_records` raises a
:class:`BadRecordError` naming ``file:line`` for the first bad line
(``on_bad_record="error"``, the default), or skips it and counts it under its reason
(``"skip"``) in a :class:`DataReport`: a bad line is never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embforge.data.io import iter_lines, parse_json_line
from embforge.errors import BadRecordError

OnBadRecord = Literal["error", "skip"]


@dataclass
class TrainingRecord:
    query: str
    positives: list[str]  # one or more; training samples one per epoch
    negatives: list[str] = field(default_factory=list)
    source: str = ""
    instruction: str | None = None  # overrides the dataset's instruction for this query

    def __post_init__(self):
        assert isinstance(self.positives, list) and self.positives, "positives is a non-empty list"

    @property
    def positive(self) -> str:
        """The first positive (the only one of a single-positive record)."""
        return self.positives[0]

    def to_dict(self) -> dict:
        """The JSONL form :func:`parse_record` reads back (``positive`` when there is one)."""
        out: dict = {"query": self.query}
        if len(self.positives) == 1:
            out["positive"] = self.positives[0]
        else:
            out["positives"] = self.positives
        if self.negatives:
            out["negatives"] = self.negatives
        if self.source:
            out["source"] = self.source
        if self.instruction is not None:
            out["instruction"] = self.instruction
        return out


@dataclass
class DataReport:
    """What was read and skipped (by reason), per dataset."""

    read: Counter = field(default_factory=Counter)
    skipped: dict[str, Counter] = field(default_factory=dict)

    def skip(self, dataset: str, reason: str) -> None:
        self.skipped.setdefault(dataset, Counter())[reason] += 1

    def merge(self, other: DataReport) -> None:
        """Add ``other``'s counts (e.g. another rank's) to these."""
        self.read.update(other.read)
        for name, reasons in other.skipped.items():
            self.skipped.setdefault(name, Counter()).update(reasons)

    def summary(self) -> str:
        """``name: read N, skipped M (reason: n, ...)`` per dataset."""
        parts = []
        for name in sorted(self.read):
            skipped = self.skipped.get(name, Counter())
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
            parts.append(
                f"{name}: read {self.read[name]}, skipped {skipped.total()}" + (f" ({reasons})" if reasons else "")
            )
        return "; ".join(parts)


def _text(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecordError(where, "wrong type", f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecordError(where, "empty text", f"empty {key}")
    return value


def _texts(obj: dict, key: str, where: str, what: str) -> list[str]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadRecordError(where, "wrong type", f"field {key!r} must be {what}, got {value!r:.80}")
    if any(not t.strip() for t in value):
        raise BadRecordError(where, "empty text", f"empty {key.rstrip('s')} in {key!r}")
    return value


def parse_record(obj: dict, where: str) -> TrainingRecord:
    """Validate one JSON object as a training record.

    Raises:
        BadRecordError: naming ``where`` and the reason (see the module docstring).
    """
    if "query" not in obj:
        raise BadRecordError(where, "missing field", f"missing field 'query'; the line has {sorted(obj)}")
    query = _text(obj, "query", where)
    if ("positive" in obj) == ("positives" in obj):
        raise BadRecordError(
            where,
            "missing field",
            f"needs 'positive' (string) or 'positives' (list of strings), exactly one; the line has {sorted(obj)}",
        )
    if "positive" in obj:
        positives = [_text(obj, "positive", where)]
    else:
        positives = _texts(obj, "positives", where, "a non-empty list of strings")
        if not positives:
            raise BadRecordError(where, "wrong type", "field 'positives' must be a non-empty list of strings, got []")
    negatives = _texts(obj, "negatives", where, "a list of strings") if "negatives" in obj else []
    own = set(positives)
    repeated = next((n for n in negatives if n in own), None)
    if repeated is not None:
        raise BadRecordError(where, "positive among negatives", f"negative {repeated!r:.80} is also a positive")
    optional = {k: _text(obj, k, where) for k in ("source", "instruction") if obj.get(k) is not None}
    return TrainingRecord(query, positives, negatives, optional.get("source", ""), optional.get("instruction"))


def parse_line(
    line: str | bytes,
    where: str,
    report: DataReport,
    dataset: str,
    on_bad_record: OnBadRecord = "error",
    fields: dict[str, str] | None = None,
) -> tuple[dict, TrainingRecord] | None:
    """One JSONL line -> (its object, its record), counted as read in ``report``.

    Args:
        fields: our field name -> the file's (e.g. ``{"query": "anchor"}``); a single-string
            ``negatives`` field (a triplet's negative) then counts as a list of one.

    Returns:
        None if the line is bad and ``on_bad_record`` is ``"skip"`` (counted under its reason).

    Raises:
        BadRecordError: the line is bad and ``on_bad_record`` is ``"error"``.
    """
    report.read[dataset] += 1
    try:
        obj = parse_json_line(line, where)
        if fields:
            rename = {theirs: ours for ours, theirs in fields.items()}
            obj = {rename.get(k, k): v for k, v in obj.items()}
            if isinstance(obj.get("negatives"), str):
                obj["negatives"] = [obj["negatives"]]
        return obj, parse_record(obj, where)
    except BadRecordError as exc:
        if on_bad_record == "error":
            raise
        report.skip(dataset, exc.reason)
        return None


def read_records(
    path: str | Path,
    report: DataReport,
    dataset: str,
    on_bad_record: OnBadRecord = "error",
    fields: dict[str, str] | None = None,
    share: tuple[int, int] | None = None,
) -> Iterator[tuple[int, dict, TrainingRecord]]:
    """(line number, object, record) of every good line of a JSONL file (see :func:`parse_line`).

    Args:
        share: ``(rank, world)``: only lines ``rank + 1, rank + 1 + world, ...`` are parsed (and counted).
    """
    for lineno, line in iter_lines(path):
        if share is not None and (lineno - 1) % share[1] != share[0]:
            continue
        parsed = parse_line(line, f"{path}:{lineno}", report, dataset, on_bad_record, fields)
        if parsed is not None:
            yield lineno, *parsed
