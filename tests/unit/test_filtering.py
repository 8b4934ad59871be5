"""Consistency filter (hand-computed top-2 decisions), cleaning and the mine CLI."""

import json

import numpy as np
import pytest

from embforge.cli import main
from embforge.data.filtering import clean_pairs, consistency_filter, consistent, normalise_text


class TableModel:
    def __init__(self, table):
        self.table = table

    def encode(self, texts, batch_size=32, prompt_name=None):
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_consistent_matches_hand_computed_top2():
    # 4 pairs in 2-D; query i is closest to the documents listed in the comments
    q = np.array([[1, 0], [0, 1], [1, 1], [-1, 0.1]], dtype=np.float32)
    d = np.array([[1, 0.1], [0.2, 1], [-1, -1], [0.9, 0.3]], dtype=np.float32)
    # cosines: q0 -> d0 .995, d3 .949 (top-2 {0,3}: own 0 kept)
    #          q1 -> d1 .981, d3 .316 (own 1 kept)
    #          q2 -> d3 .894, d1 .832 (own 2 is last: dropped)
    #          q3 -> d2 .636 ..., d1 -0.10, d0 -0.94 (top-2 {2,1}: own 3 dropped)
    texts = ["a", "b", "c", "d"]
    assert consistent(q, d, texts, top_k=2).tolist() == [True, True, False, False]
    assert consistent(q, d, texts, top_k=4).tolist() == [True, True, True, True]


def test_consistency_filter_per_source_counts_and_order(tmp_path):
    table = {
        "qa": [1, 0],
        "da": [1, 0.1],
        "qb": [0, 1],
        "db": [0.2, 1],
        "qc": [1, 1],
        "dc": [-1, -1],
        "qd": [-1, 0.1],
        "dd": [0.9, 0.3],
    }
    rows = [
        {"query": "qa", "positive": "da", "source": "s1"},
        {"query": "qc", "positive": "dc", "source": "s1"},  # in its own source only da, dc: top-2 includes dc -> kept
        {"query": "qb", "positive": "db", "source": "s2"},
        {"query": "qd", "positive": "dd", "source": "s2"},
        {"query": "qc", "positive": "dc", "source": "s2"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = consistency_filter(TableModel(table), inp, tmp_path / "out.jsonl", top_k=2)
    # s2 has docs db, dd, dc: qb -> db .981 (kept); qd -> dc .64, db -.10 (dropped); qc -> dd .894, db .832 (dropped)
    assert report == {"s1": {"kept": 2, "dropped": 0}, "s2": {"kept": 1, "dropped": 2}}
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["query"], r["source"]) for r in kept] == [("qa", "s1"), ("qc", "s1"), ("qb", "s2")]
    # chunks of 1 pair: every pair trivially finds its document
    report = consistency_filter(TableModel(table), inp, tmp_path / "out2.jsonl", top_k=1, chunk_pairs=1)
    assert sum(r["dropped"] for r in report.values()) == 0


def test_clean_counts_every_removal(tmp_path):
    rows = [
        {"query": "What is Python?", "positive": "A language."},
        {"query": "what is   python", "positive": "a language"},  # exact duplicate after normalisation
        {"query": "", "positive": "x"},
        {"query": "q", "positive": "y" * 50},
        {"query": "How to sort?", "positive": "Use sorted()."},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = clean_pairs(inp, tmp_path / "out.jsonl", max_chars=40)
    assert counts == {
        "read": 5,
        "kept": 2,
        "exact duplicate (normalised text)": 1,
        "empty text": 1,
        "longer than 40 characters": 1,
    }
    assert normalise_text("Héllo,  WORLD!") == "hello world"


def test_clean_near_duplicates_with_a_teacher(tmp_path):
    table = {"q1": [1, 0], "p1": [1, 0], "q2": [0.99, 0.05], "p2": [1, 0.02], "q3": [0, 1], "p3": [0, 1]}
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in (1, 2, 3)))
    counts = clean_pairs(inp, tmp_path / "out.jsonl", teacher=TableModel(table), near_duplicate_threshold=0.99)
    assert counts["kept"] == 2 and counts["near duplicate (pair cosine >= 0.99)"] == 1


def test_mine_cli_end_to_end_with_cache(tiny_model_dir, tmp_path, capsys):
    rows = [
        {"query": f"find the {w}", "positive": f"the {w} is here", "source": "s"}
        for w in ["cat", "dog", "list", "file", "path", "key", "data", "text"]
    ]
    inp = tmp_path / "pairs.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "mine",
        str(tiny_model_dir),
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "mined.jsonl"),
        "--num-negatives",
        "2",
        "--max-score-ratio",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["corpus_embeddings_from_cache"] is False and summary["records"]["records written"] == 8
    mined = [json.loads(x) for x in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert all(len(r["negatives"]) == 2 and r["positive"] not in r["negatives"] and r["source"] == "s" for r in mined)
    assert all(r["negative_scores"] == sorted(r["negative_scores"], reverse=True) for r in mined)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["corpus_embeddings_from_cache"] is True
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "q2"}\n')
    assert main(["mine", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:2: needs 'positive'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_obvious_neighbours(kind):
    from embforge.data.mining import build_index

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = build_index(emb, kind)
    _, ids = index.search(emb[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
