"""Non-retrieval data as contrastive examples (NV-Embed-v2): classification, clustering, STS, triplets."""

import json

import pytest

from embforge.data.examples import classification_records, sts_records
from embforge.data.pairs import DataReport, load_jsonl_records
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
