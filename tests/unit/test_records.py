"""The training record: one parser for every tool; every bad line an error naming file:line, or counted."""

import re
from collections import Counter

import numpy as np
import pytest

from embforge.config import from_dict
from embforge.data.cleaning import clean_pairs
from embforge.data.filtering import consistency_filter
from embforge.data.mining import MiningConfig, mine_file
from embforge.errors import DataError
from embforge.train.batches import build_sampler
from embforge.train.recipe import DataConfig

GOOD = [
    b'{"query": "good one", "positive": "doc one", "negatives": ["other one"]}',
    b'{"query": "good two", "positives": ["doc two", "doc deux"], "negatives": ["other two"]}',
]
# (reason counted under on_bad_record: skip, the bad line, what the error says after "file:line: ")
BAD = [
    ("invalid JSON", b'{"query": "q", "positive": ', "invalid JSON"),
    ("invalid JSON", b'["q", "p"]', "expected a JSON object"),
    ("undecodable bytes", b'{"query": "caf\xe9", "positive": "p"}', "undecodable bytes"),
    ("missing field", b'{"query": "q"}', "needs 'positive'"),
    ("missing field", b'{"positive": "p"}', "missing field 'query'"),
    ("wrong type", b'{"query": "q", "positive": 3}', "'positive' must be a string"),
    ("wrong type", b'{"query": "q", "positive": "p", "negatives": "n"}', "'negatives' must be a list of strings"),
    ("wrong type", b'{"query": "q", "positives": []}', "'positives' must be a non-empty list of strings"),
    ("wrong type", b'{"query": "q", "positive": "p", "instruction": 7}', "'instruction' must be a string"),
    ("empty text", b'{"query": "  ", "positive": "p"}', "empty query"),
    ("empty text", b'{"query": "q", "positive": "p", "negatives": ["n", ""]}', "empty negative"),
    ("positive among negatives", b'{"query": "q", "positives": ["p", "p2"], "negatives": ["p2"]}', "'p2'"),
]


class RandomTeacher:
    def encode(self, texts, batch_size=32, prompt_name=None):
        return np.random.default_rng(len(texts)).normal(size=(len(texts), 8)).astype(np.float32)


def _data(on_bad_record="error", stream=False, num_negatives=1):
    raw = {
        "batch_size": 1,
        "num_negatives": num_negatives,
        "on_bad_record": on_bad_record,
        "datasets": [{"name": "d", "path": "d.jsonl", "stream": stream}],
    }
    return from_dict(DataConfig, raw)


def _tools(path, tmp_path):
    """Every tool that reads training records, reading ``path`` with the default policy."""
    return {
        "train": lambda: build_sampler(_data(), tmp_path, seed=0, world=1),
        "train (stream)": lambda: [s.next_batch() for s in [build_sampler(_data(stream=True), tmp_path, 0, 1)[0]] * 3],
        "mine": lambda: mine_file(RandomTeacher(), path, tmp_path / "mined.jsonl", MiningConfig(num_negatives=1)),
        "filter clean": lambda: clean_pairs(path, tmp_path / "clean.jsonl", on_bad_record="error"),
        "filter consistency": lambda: consistency_filter(RandomTeacher(), path, tmp_path / "kept.jsonl"),
    }


@pytest.mark.parametrize("reason,line,message", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_a_bad_line_is_the_same_error_naming_file_and_line_in_every_tool(tmp_path, reason, line, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([GOOD[0], line, GOOD[1]]) + b"\n")
    errors = {}
    for tool, run in _tools(path, tmp_path).items():
        with pytest.raises(DataError) as exc:
            run()
        errors[tool] = str(exc.value)
    assert all(re.match(rf"{re.escape(str(path))}:2: .*{re.escape(message)}", e) for e in errors.values()), errors
    assert len(set(errors.values())) == 1, errors  # one parser: one message
    assert not (tmp_path / "mined.jsonl").exists() and not (tmp_path / "clean.jsonl").exists()


def _fixture(path):
    """GOOD lines around every BAD line; returns the expected per-reason counts."""
    lines = [GOOD[0]] + [b for _, b, _ in BAD] + [GOOD[1]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return Counter(reason for reason, _, _ in BAD)


@pytest.mark.parametrize("stream", [False, True])
def test_skip_counts_every_bad_line_by_reason_in_the_run_summary(tmp_path, stream):
    expected = _fixture(tmp_path / "d.jsonl")
    sampler, report = build_sampler(_data("skip", stream=stream), tmp_path, seed=0, world=1)
    kept = {sampler.next_batch()[0].record.query for _ in range(2)}  # one epoch (a stream counts as it reads)
    assert kept == {"good one", "good two"}
    assert report.read["d"] == len(BAD) + 2
    assert report.skipped["d"] == expected
    summary = report.summary()
    assert summary.startswith(f"d: read {len(BAD) + 2}, skipped {len(BAD)} (")
    assert all(f"{reason}: {n}" in summary for reason, n in expected.items())


def test_skip_in_the_data_tools_counts_the_same_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    expected = _fixture(path)
    counts = clean_pairs(path, tmp_path / "clean.jsonl")  # cleaning skips (and counts) by default
    assert counts["read"] == len(BAD) + 2 and counts["kept"] == 2
    assert {k: counts[k] for k in expected} == expected
    summary = mine_file(
        RandomTeacher(),
        path,
        tmp_path / "mined.jsonl",
        MiningConfig(num_negatives=1, max_score_ratio=None, on_bad_record="skip"),
    )
    assert summary["records"]["records read"] == len(BAD) + 2 and summary["records"]["records written"] == 2
    assert {k: summary["records"][f"records skipped: {k}"] for k in expected} == expected
