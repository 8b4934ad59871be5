"""Sharded mining: 2 torchrun processes (each encodes half the corpus and mines its shards) = 1 process."""

import json
import os
import sys

import pytest

from .train.helpers import free_port, run_ok

WORDS = ["cat", "dog", "list", "file", "path", "key", "data", "text", "model", "query", "sort", "map"]


def test_torchrun_sharded_mining_matches_one_process(tiny_model_dir, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not found")
    (tmp_path / "in").mkdir()
    for shard in range(3):
        rows = [
            {"query": f"find {a} {b}", "positive": f"the {a} and the {b} here"}
            for a in WORDS[shard * 4 : shard * 4 + 4]
            for b in WORDS[:5]
        ]
        (tmp_path / "in" / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "mine",
        str(tiny_model_dir),
        "--input",
        "in/part-*.jsonl",
        "--num-negatives",
        "3",
        "--max-score-ratio",
        "0.99",
    ]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = json.loads(run_ok([sys.executable, "-m", "embforge", *common, "--output", "one"], tmp_path).stdout)
    port = str(free_port())
    two = json.loads(
        run_ok(
            [torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "embforge", *common, "--output", "two"],
            tmp_path,
        ).stdout
    )
    assert one["records"] == two["records"] and one["candidates_dropped"] == two["candidates_dropped"]
    assert one["shards"] == 3 and one["records"]["records read"] == 60
    for shard in range(3):
        a = [json.loads(x) for x in (tmp_path / "one" / f"part-{shard}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (tmp_path / "two" / f"part-{shard}.jsonl").read_text().splitlines()]
        assert [r["negatives"] for r in a] == [r["negatives"] for r in b]
        assert all(
            abs(x - y) < 1e-5 for ra, rb in zip(a, b) for x, y in zip(ra["negative_scores"], rb["negative_scores"])
        )
