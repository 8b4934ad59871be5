"""The synthetic-data pipeline against a fake endpoint: failures, retries, resume."""

import json
import subprocess
import sys
import time

import pytest

from embforge.data.records import DataReport, read_records
from embforge.data.synthetic import SynthConfig, SynthError, generate

from .fake_llm import FakeLLM


@pytest.fixture()
def fake():
    servers = []

    def make(**kw):
        servers.append(FakeLLM(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_survives_malformed_answers_timeouts_and_429s(fake, tmp_path):
    server = fake(
        script=["429", "ok", "bad_json", "500", "timeout", "not_json", "bad_schema", "ok", "duplicate", "429"]
    )
    cfg = SynthConfig(
        endpoint=server.url,
        model="fake",
        output=str(tmp_path / "syn.jsonl"),
        num_tasks=3,
        examples_per_task=4,
        timeout_s=0.3,
        backoff_s=0.001,
    )
    stats = generate(cfg, sleep=lambda s: None)
    rows = _lines(tmp_path / "syn.jsonl")
    assert [r["id"] for r in rows] == [f"t{t}-e{e}" for t in range(3) for e in range(4)]
    assert len({r["query"] for r in rows}) == 12
    assert all(r["negatives"] and r["instruction"].startswith("Retrieve documents") for r in rows)
    assert stats["retried: HTTP 429"] == 2 and stats["retried: HTTP 500"] == 1 and stats["retried: timeout"] == 1
    assert stats["retried: invalid answer"] == 3  # bad_json, not_json, bad_schema
    assert stats["regenerated: duplicate query"] == 1 and stats["written"] == 12
    report = DataReport()  # the output is training records, instruction included
    parsed = [record for _, _, record in read_records(tmp_path / "syn.jsonl", report, "syn")]
    assert [r.instruction for r in parsed] == [r["instruction"] for r in rows] and not report.skipped


def test_gives_up_with_a_clear_error(fake, tmp_path):
    server = fake(script=["500"] * 10)
    cfg = SynthConfig(
        endpoint=server.url, model="fake", output=str(tmp_path / "s.jsonl"), max_retries=2, backoff_s=0.001
    )
    with pytest.raises(SynthError, match="no valid answer after 3 attempts"):
        generate(cfg, sleep=lambda s: None)


def test_resumes_after_a_kill_without_duplicates(fake, tmp_path):
    server = fake(delay=0.05)
    out = tmp_path / "syn.jsonl"
    cfg = dict(endpoint=server.url, model="fake", output=str(out), num_tasks=4, examples_per_task=5, backoff_s=0.001)
    code = f"from embforge.data.synthetic import SynthConfig, generate; generate(SynthConfig(**{cfg!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    written = len(out.read_text().splitlines())
    assert 6 <= written < 20
    with out.open("a") as f:
        f.write('{"id": "t3-e4", "query": "torn')  # a crash in the middle of a line
    stats = generate(SynthConfig(**cfg), sleep=lambda s: None)
    rows = _lines(out)
    assert stats["repaired: torn last line removed"] == 1 and stats["already done"] == written
    assert sorted(r["id"] for r in rows) == sorted(f"t{t}-e{e}" for t in range(4) for e in range(5))
    assert len({r["query"] for r in rows}) == 20
    assert json.loads((tmp_path / "syn.jsonl.tasks.json").read_text())[0] == "Retrieve documents about topic 0"


def test_http_4xx_is_not_retried(fake, tmp_path):
    server = fake()
    cfg = SynthConfig(endpoint=server.url + "/missing", model="fake", output=str(tmp_path / "s.jsonl"), backoff_s=0.001)
    with pytest.raises(SynthError, match="HTTP 404 .*not retried"):
        generate(cfg, sleep=lambda s: None)
    assert server.requests == 0  # the 404 is answered before the scripted handler counts requests


def _sleeps_after(fake, tmp_path, mode, retry_after, now=None):
    """Run one generation whose first request gets ``mode`` with ``retry_after``; the sleeps made."""
    server = fake(script=[mode], retry_after=retry_after)
    cfg = SynthConfig(
        endpoint=server.url, model="fake", output=str(tmp_path / "s.jsonl"), num_tasks=1, examples_per_task=1
    )
    sleeps = []
    stats = generate(cfg, sleep=sleeps.append)
    assert stats["written"] == 1 and stats[f"retried: HTTP {mode}"] == 1
    return sleeps


def test_retry_after_in_seconds_is_honoured(fake, tmp_path):
    # backoff alone would wait 0.5-1.5 s; the server asks for 7
    assert _sleeps_after(fake, tmp_path, "429", "7") == [7.0]


def test_retry_after_as_http_date_is_honoured(fake, tmp_path):
    from email.utils import formatdate

    sleeps = _sleeps_after(fake, tmp_path, "503", formatdate(time.time() + 30, usegmt=True))
    assert len(sleeps) == 1 and 27 <= sleeps[0] <= 30


@pytest.mark.parametrize("header", ["Wed, 21 Oct 2015 07:28:00 GMT", "soon", "-3", "nan"])
def test_retry_after_past_or_invalid_falls_back_to_backoff(fake, tmp_path, header):
    sleeps = _sleeps_after(fake, tmp_path, "429", header)
    assert len(sleeps) == 1 and 0.5 <= sleeps[0] <= 1.5  # backoff_s=1.0 jittered x0.5-1.5


def test_retry_after_seconds_parser():
    from embforge.data.synthetic import retry_after_seconds

    assert retry_after_seconds("120", now=0.0) == 120.0
    assert retry_after_seconds(" 1.5 ", now=0.0) == 1.5
    assert retry_after_seconds("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0) == 60.0
    assert retry_after_seconds(None, now=0.0) == 0.0
    assert retry_after_seconds("inf", now=0.0) == 0.0
