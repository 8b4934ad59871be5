"""Consistency filter (hand-computed top-2 decisions), cleaning (both streamed, bounded memory) and the mine CLI."""

import hashlib
import json
import re

import numpy as np
import pytest

from embforge.cli import main
from embforge.data.cleaning import clean_pairs, clean_shards, normalise_text
from embforge.data.filtering import consistency_filter, consistency_filter_shards, consistent
from embforge.errors import DataError


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
    own = np.arange(4)  # pair i's document is document i
    assert consistent(q, d, own, top_k=2).tolist() == [True, True, False, False]
    assert consistent(q, d, own, top_k=4).tolist() == [True, True, True, True]


# documents X (pairs 0, 1), Y (pair 2), Z (pair 3) in 2-D
TWIN_TABLE = {
    "q0": [1, 0.05],  # X 1.00, Y .64: own X first
    "q1": [1, -0.05],  # X 1.00: own X first
    "q2": [0.95, 0.3],  # X .95, Y .81, Z -.33: own Y second among the distinct documents
    "q3": [1, 0.2],  # X .98, Y .75, Z -.43: own Z last
    "X": [1, 0],
    "Y": [0.6, 0.8],
    "Z": [-0.6, 0.8],
}
TWIN_ROWS = [("q0", "X"), ("q1", "X"), ("q2", "Y"), ("q3", "Z")]


def test_own_document_is_the_position_of_its_distinct_text_so_a_twin_takes_one_place():
    q = np.array([TWIN_TABLE[query] for query, _ in TWIN_ROWS], dtype=np.float32)  # (4, 2)
    d = np.array([TWIN_TABLE[t] for t in "XYZ"], dtype=np.float32)  # (3, 2): the distinct documents
    own = np.array([0, 0, 1, 2])  # pairs 0 and 1 share document 0 (X)
    assert consistent(q, d, own, top_k=2).tolist() == [True, True, True, False]
    # by position among all four pair documents (X, X, Y, Z), q2's top 2 would be X twice and Y would lose
    # its place to the twin; matching by text would drop pair 2 the same way
    every = np.array([TWIN_TABLE[t] for _, t in TWIN_ROWS], dtype=np.float32)  # (4, 2)
    assert consistent(q, every, np.arange(4), top_k=2).tolist()[2] is False
    # top 1: both pairs of X find their one document, whatever order FAISS gives equal scores
    assert consistent(q, d, own, top_k=1).tolist() == [True, True, False, False]


def test_consistency_filter_counts_a_repeated_document_once(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in TWIN_ROWS))
    teacher = TableModel(TWIN_TABLE)
    assert consistency_filter(teacher, inp, tmp_path / "out.jsonl", top_k=2) == {"default": {"kept": 3, "dropped": 1}}
    assert [json.loads(x)["query"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["q0", "q1", "q2"]


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


# ---------------------------------------------------------------------------- streamed and bounded
class HashTeacher:
    """Fixed pseudo-random embeddings (the bytes of each text's hash); records the longest list it was asked to encode."""

    def __init__(self, dim=4, fail_on_call=None):
        self.dim, self.fail_on_call, self.calls, self.largest = dim, fail_on_call, 0, 0

    def vector(self, text):
        digest = np.frombuffer(hashlib.md5(text.encode()).digest(), dtype=np.uint8)[: self.dim]  # (dim,)
        return digest.astype(np.float32) - 127.5

    def encode(self, texts, batch_size=32, prompt_name=None):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("teacher died mid-run")
        self.largest = max(self.largest, len(texts))
        return np.stack([self.vector(t) for t in texts])


def _interleaved_rows(n=60):
    """Three sources interleaved irregularly (plus source-less rows), repeated documents, extra fields, non-ASCII."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        row = {"query": f"question {i} über", "positive": f"doc {int(rng.integers(0, 40))}", "id": i}
        if i % 11 == 5:
            row = {"query": f"question {i}", "positives": [f"doc {i}", "another"], "negatives": ["n"]}
        source = ["web", "qa", "code", None][int(rng.integers(0, 4))]
        if source is not None:
            row["source"] = source
        rows.append(row)
    return rows


def _naive_consistency(rows, teacher, top_k, chunk_pairs):
    """Kept row indices and the per-source report, computed directly: per source, chunks in file order.

    Within a chunk each distinct document text is one candidate; a pair is kept if its own is among the top_k.
    """
    by_source = {}
    for i, row in enumerate(rows):
        by_source.setdefault(row.get("source", "default"), []).append(i)
    keep, report = set(), {}
    for source, idx in sorted(by_source.items()):
        for start in range(0, len(idx), chunk_pairs):
            ids = idx[start : start + chunk_pairs]
            texts = [rows[i].get("positive") or rows[i]["positives"][0] for i in ids]
            docs = list(dict.fromkeys(texts))  # each distinct document once, in order of first occurrence
            q = np.stack([teacher.vector(rows[i]["query"]) for i in ids])
            d = np.stack([teacher.vector(t) for t in docs])
            sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
            for a, i in enumerate(ids):
                if docs.index(texts[a]) in np.argsort(-sims[a])[:top_k]:
                    keep.add(i)
        kept = len(keep & set(idx))
        report[source] = {"kept": kept, "dropped": len(idx) - kept}
    return keep, report


def test_streamed_consistency_equals_a_naive_per_source_computation(tmp_path):
    rows = _interleaved_rows()
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    teacher = HashTeacher()
    report = consistency_filter(teacher, inp, tmp_path / "out.jsonl", top_k=2, chunk_pairs=7)
    keep, expected = _naive_consistency(rows, teacher, top_k=2, chunk_pairs=7)
    assert report == expected
    assert 10 < len(keep) < len(rows) and all(r["kept"] + r["dropped"] > 7 for r in report.values())  # chunked
    kept_text = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in sorted(keep))  # file order
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == kept_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # spill folder removed


def write_shards(folder, rows, num_shards):
    """``rows`` split into ``num_shards`` consecutive files ``folder/part-<i>.jsonl``; returns their paths."""
    folder.mkdir()
    per = -(-len(rows) // num_shards)
    paths = [folder / f"part-{i}.jsonl" for i in range(num_shards)]
    for i, path in enumerate(paths):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[i * per : (i + 1) * per]), encoding="utf-8")
    return paths


def test_chunks_span_the_shards_of_a_source(tmp_path):
    rows = _interleaved_rows()
    inputs = write_shards(tmp_path / "in", rows, num_shards=5)  # 12 lines each: under 7 pairs per source
    (tmp_path / "out").mkdir()
    teacher = HashTeacher()
    sharded = consistency_filter_shards(teacher, inputs, [tmp_path / "out" / p.name for p in inputs], chunk_pairs=7)
    assert teacher.largest <= 7
    one = tmp_path / "one.jsonl"
    one.write_text("".join(p.read_text(encoding="utf-8") for p in inputs), encoding="utf-8")
    single = consistency_filter_shards(HashTeacher(), [one], [tmp_path / "one-kept.jsonl"], chunk_pairs=7)
    assert sharded == {**single, "shards": 5}
    keep, expected = _naive_consistency(rows, teacher, top_k=2, chunk_pairs=7)
    assert sharded["per_source"] == expected and all(r["kept"] + r["dropped"] > 7 for r in expected.values())
    kept = [json.loads(x) for p in inputs for x in (tmp_path / "out" / p.name).read_text().splitlines()]
    assert kept == [json.loads(x) for x in (tmp_path / "one-kept.jsonl").read_text().splitlines()]
    assert kept == [rows[i] for i in sorted(keep)]


def test_clean_near_duplicates_across_chunks_equal_a_naive_scan(tmp_path):
    # pairs repeat with small changes, so near duplicates fall inside a chunk and across chunks
    rows = [{"query": f"q{i % 9}", "positive": f"p{i % 9}", "n": i} for i in range(40)]
    rows += [{"query": f"q{i}", "positive": f"p{i}"} for i in range(9, 30)]
    teacher = HashTeacher(dim=2)  # in 2-D many pairs are close

    def pair(r):
        v = np.concatenate([teacher.vector(r["query"]), teacher.vector(r["positive"])]).reshape(2, -1)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).reshape(-1) / np.sqrt(2)

    seen, kept, exact, near = set(), [], 0, 0
    for r in rows:  # naive: exact duplicates of any earlier pair first, then the best cosine with a kept pair
        if (r["query"], r["positive"]) in seen:
            exact += 1
            continue
        seen.add((r["query"], r["positive"]))
        if kept and max(float(pair(k) @ pair(r)) for k in kept) >= 0.95:
            near += 1
        else:
            kept.append(r)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = clean_pairs(inp, tmp_path / "out.jsonl", teacher=teacher, near_duplicate_threshold=0.95, chunk_pairs=4)
    assert near > 0 and exact > 0 and teacher.largest <= 4
    assert counts == {
        "read": len(rows),
        "kept": len(kept),
        "exact duplicate (normalised text)": exact,
        "near duplicate (pair cosine >= 0.95)": near,
    }
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == kept


def _big_file(path, n=4000):
    """A file much larger than a chunk: ~1.2 KB lines in two sources."""
    with path.open("w") as f:
        for i in range(n):
            row = {"query": f"query {i}", "positive": f"document {i} " + "text " * 100, "source": f"s{i % 2}"}
            f.write(json.dumps({**row, "negatives": [f"negative {i} " + "word " * 120]}) + "\n")
    return path.stat().st_size


def _peak_bytes(run):
    import tracemalloc

    import faiss  # noqa: F401  (imported before tracing: its import is no part of the filter's memory)

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_filters_hold_one_chunk_not_the_file(tmp_path):
    size = _big_file(tmp_path / "big.jsonl")
    teacher = HashTeacher()
    peak = _peak_bytes(
        lambda: consistency_filter(teacher, tmp_path / "big.jsonl", tmp_path / "kept.jsonl", chunk_pairs=100)
    )
    assert teacher.largest <= 100  # the teacher never sees more than one chunk of one source
    # the in-memory version held every line (peak 1.7x the file); streamed: one chunk of 100 pairs
    assert peak < size / 10, (peak, size)
    teacher = HashTeacher()
    peak = _peak_bytes(
        lambda: clean_pairs(
            tmp_path / "big.jsonl",
            tmp_path / "clean.jsonl",
            teacher=teacher,
            near_duplicate_threshold=0.999,
            chunk_pairs=100,
        )
    )
    assert teacher.largest <= 100
    # what grows with the file is a 16-byte digest per distinct pair (~150 bytes with the set), not the lines
    assert peak < size / 4, (peak, size)


def _run_filter(kind, teacher, inp, out, **options):
    if kind == "consistency":
        return consistency_filter_shards(teacher, [inp], [out], chunk_pairs=3, **options)
    return clean_shards([inp], [out], teacher=teacher, near_duplicate_threshold=0.999, chunk_pairs=3, **options)


@pytest.mark.parametrize("kind", ["consistency", "clean"])
def test_a_teacher_failing_mid_run_leaves_no_partial_output_and_no_spill_files(tmp_path, kind):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "source": f"s{i % 2}"}) + "\n" for i in range(20))
    )
    (tmp_path / "out.jsonl").write_text("the previous output\n")
    with pytest.raises(RuntimeError, match="teacher died mid-run"):
        _run_filter(kind, HashTeacher(fail_on_call=4), inp, tmp_path / "out.jsonl")  # chunks 1 and 2 went through
    assert (tmp_path / "out.jsonl").read_text() == "the previous output\n"  # untouched, never half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporaries, no spills
    _run_filter(kind, HashTeacher(), inp, tmp_path / "out.jsonl")  # a rerun succeeds and replaces it
    assert (tmp_path / "out.jsonl").read_text().startswith('{"query": "q0"')


@pytest.mark.parametrize("kind", ["consistency", "clean"])
def test_a_bad_line_after_several_chunks_is_an_error_naming_file_and_line_or_counted(tmp_path, kind):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps({"query": f"q{i}", "positive": f"p{i}"}) for i in range(12)]
    lines[8] = '{"query": "q8", "positive": '  # line 9, after three chunks of 3 pairs
    inp.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(inp))}:9: invalid JSON"):
        _run_filter(kind, HashTeacher(), inp, tmp_path / "out.jsonl", on_bad_record="error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    summary = _run_filter(kind, HashTeacher(), inp, tmp_path / "out.jsonl", on_bad_record="skip")
    if kind == "consistency":
        assert summary["skipped"] == {"invalid JSON": 1} and summary["total"] == 11
    else:
        assert summary["invalid JSON"] == 1 and summary["read"] == 12 and summary["kept"] == 11
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == summary["kept"]


def test_filter_cli_single_file_and_shards(tmp_path, capsys):
    rows = [{"query": f"q{i % 5}", "positive": f"p{i % 5}"} for i in range(8)]  # 3 duplicates per shard
    for shard in range(2):
        (tmp_path / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(["filter", "clean", "--input", str(tmp_path / "part-0.jsonl"), "--output", str(tmp_path / "one.jsonl")])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {
        "shards": 1,
        "read": 8,
        "kept": 5,
        "exact duplicate (normalised text)": 3,
    }
    (tmp_path / "out").mkdir()
    args = ["filter", "clean", "--input", str(tmp_path / "part-*.jsonl"), "--output", str(tmp_path / "out")]
    assert main(args) == 0
    # duplicates are found within each shard: the second shard repeats the first and keeps its 5 pairs too
    assert json.loads(capsys.readouterr().out) == {
        "shards": 2,
        "read": 16,
        "kept": 10,
        "exact duplicate (normalised text)": 6,
    }
    assert [p.name for p in sorted((tmp_path / "out").iterdir())] == ["part-0.jsonl", "part-1.jsonl"]
    assert (tmp_path / "out" / "part-1.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
