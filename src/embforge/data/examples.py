"""Non-retrieval data as contrastive examples (NV-Embed-v2's example-based approach, arXiv 2405.17428 §4.2).

- **multi-class classification and clustering**: the query is an example's text, the
  positive another example with the same label, the negatives examples with other labels;
- **binary classification** (``label_texts`` given): the label's text is the document,
  the other label's text the negative;
- **STS**: pairs scored at least ``min_score`` (4 of 5) are positives in both directions;
  negatives are sentences of other pairs.

Sampling is seeded, so a recipe builds the same records every run. Rows that cannot
give a record (a label with a single example, an empty text) are skipped and counted.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from embforge.data.io import iter_jsonl
from embforge.data.records import DataReport, TrainingRecord
from embforge.errors import DataError


def _field(obj: dict, key: str, where: str, kind=str):
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}; the line has {sorted(obj)}")
    value = obj[key]
    if kind is str and not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise DataError(f"{where}: field {key!r} must be a number, got {type(value).__name__}")
    return value


def classification_records(
    path: Path,
    name: str,
    *,
    num_negatives: int,
    seed: int,
    report: DataReport,
    text_field: str = "text",
    label_field: str = "label",
    label_texts: dict[str, str] | None = None,
) -> list[TrainingRecord]:
    """Classification or clustering rows -> (text, same-label text | label text, other-label texts)."""
    rows = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        text = _field(obj, text_field, where).strip()
        if label_field not in obj:
            raise DataError(f"{where}: missing field {label_field!r}; the line has {sorted(obj)}")
        label = str(obj[label_field])
        report.read[name] += 1
        if not text:
            report.skip(name, "empty text")
            continue
        if label_texts is not None and label not in label_texts:
            raise DataError(f"{where}: label {label!r} has no entry in label_texts {sorted(label_texts)}")
        rows.append((text, label))
    rng = random.Random(seed)
    if label_texts is not None:  # binary: the label's text is the document
        labels = sorted(label_texts)
        if num_negatives > len(labels) - 1:
            raise DataError(f"dataset {name!r}: label_texts give {len(labels) - 1} negatives, {num_negatives} asked")
        out = []
        for text, label in rows:
            others = [label_texts[x] for x in labels if x != label]
            out.append(TrainingRecord(text, [label_texts[label]], rng.sample(others, num_negatives), name))
        return out
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in rows:
        by_label[label].append(text)
    if len(by_label) < 2 and num_negatives:
        raise DataError(f"dataset {name!r}: negatives need at least two labels, found {sorted(by_label)}")
    labels = sorted(by_label)
    out = []
    for text, label in rows:
        same = by_label[label]
        if len(same) < 2:
            report.skip(name, "the only example of its label")
            continue
        positive = text
        while positive == text and len(set(same)) > 1:
            positive = rng.choice(same)
        if positive == text:
            report.skip(name, "every example of its label has the same text")
            continue
        others = [x for x in labels if x != label]
        negatives = [rng.choice(by_label[rng.choice(others)]) for _ in range(num_negatives)]
        out.append(TrainingRecord(text, [positive], negatives, name))
    return out


def sts_records(
    path: Path,
    name: str,
    *,
    num_negatives: int,
    seed: int,
    report: DataReport,
    min_score: float = 4.0,
    fields: tuple[str, str, str] = ("sentence1", "sentence2", "score"),
) -> list[TrainingRecord]:
    """STS rows -> a record per direction for every pair scored >= ``min_score``."""
    s1_key, s2_key, score_key = fields
    pairs, pool = [], []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        a, b = _field(obj, s1_key, where).strip(), _field(obj, s2_key, where).strip()
        score = float(_field(obj, score_key, where, float))
        report.read[name] += 1
        pool += [x for x in (a, b) if x]
        if not a or not b:
            report.skip(name, "empty sentence")
        elif score < min_score:
            report.skip(name, f"score below {min_score} (not a positive pair)")
        else:
            pairs.append((a, b))
    if num_negatives and len(set(pool)) < 3:
        raise DataError(f"dataset {name!r}: too few distinct sentences to draw negatives from")
    rng = random.Random(seed)
    out = []
    for a, b in pairs:
        for query, positive in ((a, b), (b, a)):
            negatives = []
            while len(negatives) < num_negatives:
                candidate = rng.choice(pool)
                if candidate not in (a, b):
                    negatives.append(candidate)
            out.append(TrainingRecord(query, [positive], negatives, name))
    return out
