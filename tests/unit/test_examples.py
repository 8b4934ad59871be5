"""Non-retrieval data as contrastive examples (NV-Embed-v2): classification, clustering, STS, triplets."""

import json

import numpy as np
import pytest

from embforge.data.examples import classification_records, sts_records
from embforge.data.pairs import load_jsonl_records
from embforge.data.records import DataReport
from embforge.errors import DataError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"text": "i feel happy", "label": "joy"},
    {"text": "what a great day", "label": "joy"},
    {"text": "so glad", "label": "joy"},
    {"text": "i am furious", "label": "anger"},
    {"text": "this makes me mad", "label": "anger"},
    {"text": "i am scared", "label": "fear"},  # the only example of its label
]


def test_multiclass_positive_shares_the_label_negatives_do_not(tmp_path):
    path = _write(tmp_path / "c.jsonl", ROWS)
    label = {r["text"]: r["label"] for r in ROWS}
    report = DataReport()
    records = classification_records(path, "emo", num_negatives=3, seed=0, report=report)
    assert len(records) == 5 and report.skipped["emo"]["the only example of its label"] == 1
    for r in records:
        assert r.positive != r.query and label[r.positive] == label[r.query]
        assert len(r.negatives) == 3 and all(label[n] != label[r.query] for n in r.negatives)
    again = classification_records(path, "emo", num_negatives=3, seed=0, report=DataReport())
    assert again == records  # seeded


def test_binary_classification_uses_the_label_text_as_document(tmp_path):
    path = _write(
        tmp_path / "b.jsonl", [{"text": "if only it had worked", "label": 1}, {"text": "it works", "label": 0}]
    )
    texts = {"1": "a counterfactual statement", "0": "a factual statement"}
    records = classification_records(path, "cf", num_negatives=1, seed=0, report=DataReport(), label_texts=texts)
    assert [(r.query, r.positive, r.negatives) for r in records] == [
        ("if only it had worked", texts["1"], [texts["0"]]),
        ("it works", texts["0"], [texts["1"]]),
    ]
    with pytest.raises(DataError, match="label_texts give 1 negatives"):
        classification_records(path, "cf", num_negatives=2, seed=0, report=DataReport(), label_texts=texts)


def test_sts_pairs_at_or_above_4_are_positives_in_both_directions(tmp_path):
    rows = [
        {"sentence1": "a man plays guitar", "sentence2": "a person plays a guitar", "score": 4.6},
        {"sentence1": "a dog runs", "sentence2": "a cat sleeps", "score": 0.4},
        {"sentence1": "kids play soccer", "sentence2": "children are playing football", "score": 4.0},
        {"sentence1": "it rains", "sentence2": "the sun shines", "score": 3.9},
    ]
    report = DataReport()
    records = sts_records(_write(tmp_path / "s.jsonl", rows), "sts", num_negatives=2, seed=0, report=report)
    assert [(r.query, r.positive) for r in records] == [
        ("a man plays guitar", "a person plays a guitar"),
        ("a person plays a guitar", "a man plays guitar"),
        ("kids play soccer", "children are playing football"),
        ("children are playing football", "kids play soccer"),
    ]
    assert report.skipped["sts"]["score below 4.0 (not a positive pair)"] == 2
    assert all(n not in (r.query, r.positive) and len(r.negatives) == 2 for r in records for n in r.negatives)


def test_bad_rows_name_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"text": "ok", "label": "a"}, {"txt": "oops", "label": "b"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'text'"):
        classification_records(path, "x", num_negatives=1, seed=0, report=DataReport())
    path = _write(tmp_path / "bad_sts.jsonl", [{"sentence1": "a", "sentence2": "b", "score": "high"}])
    with pytest.raises(DataError, match=r"bad_sts.jsonl:1: field 'score' must be a number"):
        sts_records(path, "x", num_negatives=0, seed=0, report=DataReport())


def test_triplet_files_through_field_renaming(tmp_path):
    path = _write(
        tmp_path / "t.jsonl", [{"anchor": "two dogs run", "positive": "animals run", "negative": "a cat sits"}]
    )
    fields = {"query": "anchor", "negatives": "negative"}
    [record] = load_jsonl_records(path, "nli", 1, DataReport(), fields=fields)
    assert (record.query, record.positive, record.negatives) == ("two dogs run", "animals run", ["a cat sits"])


class AngleTeacher:
    """A fake teacher: every sentence is a unit vector at a known angle, so every score is cos(Δangle)."""

    def __init__(self, degrees: dict[str, float]):
        self.degrees, self.prompts = degrees, []

    def encode(self, texts, prompt=None, batch_size=64):
        self.prompts.append(prompt)
        rad = np.radians([self.degrees[t] for t in texts])
        return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)

    def score(self, a: str, b: str) -> float:
        return float(np.cos(np.radians(self.degrees[a] - self.degrees[b])))


DEGREES = {"a": 0, "b": 25, "c": 20, "d": 30, "e": 35, "f": 50, "g": 70, "h": 90}
STS_ROWS = [("a", "b", 5.0), ("c", "d", 4.5), ("e", "f", 1.0), ("g", "h", 2.0)]


def _naive_mined(teacher, query, positives, pool, k, ratio=0.95):
    """The top k of the other sentences scoring at most ratio x the (lowest) positive's score."""
    ceiling = ratio * min(teacher.score(query, p) for p in positives)
    cands = [t for t in dict.fromkeys(pool) if t != query and t not in positives]
    kept = sorted((t for t in cands if teacher.score(query, t) <= ceiling), key=lambda t: -teacher.score(query, t))
    return kept[:k]


def test_sts_negatives_mined_positive_aware_are_the_top_k_below_the_ceiling(tmp_path):
    from embforge.data.examples import mined_sts_records, read_sts

    rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_ROWS]
    report = DataReport()
    sts = read_sts(_write(tmp_path / "s.jsonl", rows), "sts", report=report)
    teacher = AngleTeacher(DEGREES)
    records = mined_sts_records(
        sts, "sts", teacher, num_negatives=2, report=report, query_prompt="Q: ", document_prompt="D: "
    )
    # a's positive b scores cos 25° = 0.906, the ceiling 0.95 x 0.906 = 0.861: c (0.940, above the positive
    # itself) and d (cos 30° = 0.866, just above the ceiling) are dropped; e (0.819) and f (0.643) are the top 2
    by_query = {r.query: r for r in records}
    assert by_query["a"].positive == "b" and by_query["a"].negatives == ["e", "f"]
    assert [(r.query, r.positive) for r in records] == [("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")]
    for r in records:
        assert r.query not in r.negatives and r.positive not in r.negatives  # never the positive or its twin
        assert r.negatives == _naive_mined(teacher, r.query, [r.positive], sts.pool, 2)
    assert set(teacher.prompts) == {"Q: ", "D: "}  # each side embedded with its training prompt
    again = mined_sts_records(sts, "sts", AngleTeacher(DEGREES), num_negatives=2, report=DataReport())
    assert again == records  # deterministic (exact search, no sampling)

    few = DataReport()
    assert mined_sts_records(sts, "sts", teacher, num_negatives=7, report=few) == []  # 8 sentences: never 7 left
    assert few.skipped["sts"]["fewer than 7 mined negatives"] == 4


def test_a_sentence_paired_twice_never_gets_either_positive_as_a_negative(tmp_path):
    from embforge.data.examples import mined_sts_records, read_sts

    rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in [*STS_ROWS, ("a", "g", 4.0)]]
    sts = read_sts(_write(tmp_path / "s.jsonl", rows), "sts", report=DataReport())
    teacher = AngleTeacher(DEGREES)
    records = mined_sts_records(sts, "sts", teacher, num_negatives=1, report=DataReport())
    for r in (r for r in records if r.query == "a"):  # a -> b and a -> g: the same negatives, neither b nor g
        assert r.negatives == _naive_mined(teacher, "a", ["b", "g"], sts.pool, 1) == ["h"]
