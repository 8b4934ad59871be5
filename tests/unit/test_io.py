import numpy as np
import pytest

from embforge.data.io import read_jsonl, read_qrels, read_texts, save_npy
from embforge.errors import DataError


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        read_jsonl(p)
    p.write_text('{"text": "ok"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object"):
        read_jsonl(p)


def test_missing_field_and_missing_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field\(s\) \['text'\]"):
        read_jsonl(p, fields=("text",))
    with pytest.raises(DataError, match="JSONL file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_read_texts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first\nsecond\n")
    assert read_texts(txt) == ["first", "second"]
    txt.write_text("first\n\nthird\n")
    with pytest.raises(DataError, match=r"a\.txt:2: empty line"):
        read_texts(txt)
    js = tmp_path / "a.jsonl"
    js.write_text('{"body": "x"}\n{"body": ""}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'body' must be a non-empty string"):
        read_texts(js, field="body")
    with pytest.raises(DataError, match="unsupported input type '.csv'"):
        (tmp_path / "a.csv").write_text("x")
        read_texts(tmp_path / "a.csv")


def test_qrels(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n")
    assert read_qrels(p) == {"q1": {"d1": 1, "d2": 0}}
    p.write_text("q1\td1\t1\n")
    with pytest.raises(DataError, match=r"q\.tsv:1: expected the header"):
        read_qrels(p)
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(DataError, match=r"q\.tsv:2: score 'high'"):
        read_qrels(p)


def test_save_npy_is_atomic(tmp_path):
    save_npy(tmp_path / "x.npy", np.ones((2, 3), dtype=np.float32))
    assert np.load(tmp_path / "x.npy").shape == (2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
