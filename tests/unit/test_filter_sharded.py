"""Sharded filtering: 2 ranks (shard i written by rank i % 2) write the same files and report as 1 process.

The consistency filter's chunks span a source's shards, so its ranks split the chunks, not the shards.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from embforge.cli import main
from embforge.data.filtering import consistency_filter_shards
from embforge.train.parallel import distributed_session

from .test_filtering import HashTeacher, _interleaved_rows, _naive_consistency, write_shards
from .train.helpers import free_port, rank_env, run_ok

WORDS = ["cat", "dog", "list", "file", "path", "key", "data", "text", "model", "query", "sort", "map"]


def _torchrun():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not found")
    return torchrun


def _write_shards(folder, num_shards=3):
    """Shards of two interleaved sources, with repeats (for clean) and one bad line in shard 1; returns the good rows."""
    (folder / "in").mkdir()
    shards = []
    for shard in range(num_shards):
        pairs = [(a, b) for a in WORDS[shard * 4 : shard * 4 + 4] for b in WORDS[:5]]
        rows = [
            {"query": f"find {a} {b}", "positive": f"the {a} and the {b} here", "source": f"s{i % 2}"}
            for i, (a, b) in enumerate(pairs)
        ]
        rows += rows[:3]  # exact duplicates
        lines = [json.dumps(r) for r in rows]
        if shard == 1:
            lines.insert(4, '{"query": "broken"')
        (folder / "in" / f"part-{shard}.jsonl").write_text("\n".join(lines) + "\n")
        shards.append(rows)
    return shards


def _one_process(tmp_path, args):
    """The summary of ``embforge ARGS --output one`` in one process (OMP_NUM_THREADS=1 as on each rank)."""
    (tmp_path / "one").mkdir()
    return json.loads(run_ok([sys.executable, "-m", "embforge", *args, "--output", "one"], tmp_path).stdout)


def _two_ranks(tmp_path, args):
    """The summary of ``embforge ARGS --output two`` on 2 torchrun ranks (rank 0 prints it)."""
    torchrun = _torchrun()
    (tmp_path / "two").mkdir()
    port = str(free_port())
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "embforge", *args, "--output", "two"]
    return json.loads(run_ok(cmd, tmp_path).stdout)


def _same_files(tmp_path, num_shards=3):
    for shard in range(num_shards):
        name = f"part-{shard}.jsonl"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]  # no temporaries or spills


def test_torchrun_sharded_consistency_filter_matches_one_process(tiny_model_dir, tmp_path):
    _write_shards(tmp_path)
    args = ["filter", "consistency", str(tiny_model_dir), "--input", "in/part-*.jsonl", "--chunk-pairs", "7"]
    args += ["--on-bad-record", "skip"]
    one, two = _one_process(tmp_path, args), _two_ranks(tmp_path, args)
    assert one == two
    assert one["shards"] == 3 and one["total"] == 3 * 23 and one["skipped"] == {"invalid JSON": 1}
    assert set(one["per_source"]) == {"s0", "s1"} and 0 < one["kept"] < one["total"]
    _same_files(tmp_path)


def test_torchrun_sharded_clean_matches_one_process(tmp_path, capsys, monkeypatch):
    shards = _write_shards(tmp_path)
    args = ["filter", "clean", "--input", "in/part-*.jsonl", "--max-chars", "25"]
    two = _two_ranks(tmp_path, args)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one").mkdir()
    assert main([*args, "--output", "one"]) == 0  # no teacher, no floats: in this process
    one = json.loads(capsys.readouterr().out)
    assert one == two
    expected = {"shards": 3, "read": 3 * 23 + 1, "kept": 0, "exact duplicate (normalised text)": 0}
    expected |= {"longer than 25 characters": 0, "invalid JSON": 1}
    for rows in shards:  # naive: lengths first, then duplicates within the shard
        seen = set()
        for r in rows:
            reason = "longer than 25 characters" if len(r["positive"]) > 25 else None
            if reason is None and (r["query"], r["positive"]) in seen:
                reason = "exact duplicate (normalised text)"
            seen.add((r["query"], r["positive"]))
            expected[reason or "kept"] += 1
    assert 0 < expected["longer than 25 characters"] and 0 < expected["exact duplicate (normalised text)"]
    assert one == expected
    _same_files(tmp_path)


def _consistency_worker(rank, world, port, folder):
    rank_env(rank, world, port)
    folder = Path(folder)
    inputs = sorted((folder / "in").glob("part-*.jsonl"))
    with distributed_session() as info:  # the command's own init and teardown
        summary = consistency_filter_shards(
            HashTeacher(),
            inputs,
            [folder / "two" / p.name for p in inputs],
            chunk_pairs=5,
            on_bad_record="skip",
            rank=info.rank,
            world=info.world,
        )
    (folder / f"summary-{rank}.json").write_text(json.dumps(summary))


def test_two_ranks_split_chunks_spanning_shards_and_write_what_one_process_writes(tmp_path):
    rows = _interleaved_rows()
    inputs = write_shards(tmp_path / "in", rows, num_shards=5)  # 12 lines each: chunks of 5 cross shards
    with inputs[3].open("a") as f:
        f.write('{"query": "broken"\n')
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = consistency_filter_shards(
        HashTeacher(), inputs, [tmp_path / "one" / p.name for p in inputs], chunk_pairs=5, on_bad_record="skip"
    )
    mp.spawn(_consistency_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # every rank returns the whole report, each pair counted once
        assert json.loads((tmp_path / f"summary-{rank}.json").read_text()) == one
    assert one["shards"] == 5 and one["total"] == len(rows) and one["skipped"] == {"invalid JSON": 1}
    _same_files(tmp_path, num_shards=5)
    keep, expected = _naive_consistency(rows, HashTeacher(), top_k=2, chunk_pairs=5)  # one file, same lines
    assert one["per_source"] == expected
    kept = [json.loads(x) for p in inputs for x in (tmp_path / "one" / p.name).read_text().splitlines()]
    assert kept == [rows[i] for i in sorted(keep)]
