"""Non-retrieval data as contrastive examples (NV-Embed-v2's example-based approach, arXiv 2405.17428 §4.2).

- **multi-class classification and clustering**: the query is an example's text, the
  positive another example with the same label, the negatives examples with other labels;
- **binary classification** (``label_texts`` given): the label's text is the document,
  the other label's text the negative;
- **STS**: pairs scored at least ``min_score`` (4 of 5) are positives in both directions;
  negatives are sentences of other pairs, drawn at random (:func:`sts_records`) or mined
  positive-aware by a teacher (:func:`mined_sts_records`, NV-Embed-v2's TopK-PercPos).

Sampling is seeded, so a recipe builds the same records every run. Rows that cannot
give a record (a label with a single example, an empty text) are skipped and counted.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embforge.data.io import iter_jsonl
from embforge.data.mining import Miner, MiningConfig, PromptedTeacher
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


@dataclass
class StsPairs:
    """An STS file as contrastive data: its positive pairs and every sentence (the negatives' pool)."""

    pairs: list[tuple[str, str]]  # pairs scored >= min_score, in file order
    pool: list[str]  # every non-empty sentence of the file, in file order (repeats kept)


def read_sts(
    path: Path,
    name: str,
    *,
    report: DataReport,
    min_score: float = 4.0,
    fields: tuple[str, str, str] = ("sentence1", "sentence2", "score"),
) -> StsPairs:
    """The positive pairs (scored >= ``min_score``) and sentences of an STS file; other rows counted as skipped."""
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
    return StsPairs(pairs, pool)


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
    """STS rows -> a record per direction for every pair scored >= ``min_score``; random negatives."""
    sts = read_sts(path, name, report=report, min_score=min_score, fields=fields)
    if num_negatives and len(set(sts.pool)) < 3:
        raise DataError(f"dataset {name!r}: too few distinct sentences to draw negatives from")
    rng = random.Random(seed)
    out = []
    for a, b in sts.pairs:
        for query, positive in ((a, b), (b, a)):
            negatives = []
            while len(negatives) < num_negatives:
                candidate = rng.choice(sts.pool)
                if candidate not in (a, b):
                    negatives.append(candidate)
            out.append(TrainingRecord(query, [positive], negatives, name))
    return out


def mined_sts_records(
    sts: StsPairs,
    name: str,
    teacher: Any,
    *,
    num_negatives: int,
    report: DataReport,
    max_score_ratio: float = 0.95,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    batch_size: int = 64,
) -> list[TrainingRecord]:
    """STS pairs -> a record per direction, with negatives mined positive-aware by ``teacher``.

    NV-Embed-v2's TopK-PercPos through :class:`~embforge.data.mining.Miner`: the candidates are
    the file's other sentences (embedded once, searched in chunks of queries), ranked by the
    teacher's score against the query; a sentence the query is paired with as a positive
    anywhere in the file, and the query itself, are never negatives; candidates scoring above
    ``max_score_ratio`` × the positive's score are dropped; the best ``num_negatives`` of the
    rest are kept, best first. A sentence with several positives is mined once, against the
    lowest-scored of them (the stricter ceiling). A query left with fewer is skipped and counted.
    Deterministic: exact (flat) search, no sampling.

    Args:
        teacher: anything with ``encode(texts, prompt=..., batch_size=...)`` (an Embedder).
        query_prompt: the prompt the teacher embeds queries with ("" none; None its default).
        document_prompt: the same for the candidates.
    """
    positives: dict[str, list[str]] = {}  # query text -> every sentence it is a positive pair with
    for a, b in sts.pairs:
        for query, positive in ((a, b), (b, a)):
            own = positives.setdefault(query, [])
            if positive not in own:
                own.append(positive)
    if not positives:
        return []
    cfg = MiningConfig(
        num_negatives=num_negatives,
        max_score_ratio=max_score_ratio,
        batch_size=batch_size,
        query_prompt_name="query",
        document_prompt_name="document",
    )
    prompted = PromptedTeacher(teacher, {"query": query_prompt, "document": document_prompt})
    corpus = list(dict.fromkeys(sts.pool))
    result = Miner(prompted, corpus, cfg).mine(list(positives), list(positives.values()))
    mined = dict(zip(positives, result.negatives))
    out = []
    for a, b in sts.pairs:
        for query, positive in ((a, b), (b, a)):
            if len(mined[query]) < num_negatives:
                report.skip(name, f"fewer than {num_negatives} mined negatives")
                continue
            out.append(TrainingRecord(query, [positive], mined[query], name))
    return out
