"""The training data path at scale: sampled hard negatives, the streams' shuffle buffer, prefetch."""

import json
import threading
import time
from pathlib import Path

import pytest

import embforge.train.batches as batches
import embforge.train.contrastive as contrastive
from embforge.errors import DataError
from embforge.train.prefetch import Prefetcher

from .helpers import stage_config, tiny_embedder


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sampler(tmp_path, data, seed=0):
    return batches.build_sampler(stage_config(data=data).data, tmp_path, seed=seed, world=1)[0]


def _batches(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def _after(sampler, n):
    _batches(sampler, n)
    return json.loads(json.dumps(sampler.state_dict()))  # what a checkpoint holds


# ---------------------------------------------------------------------------- hard negatives
@pytest.mark.parametrize("stream", [False, True])
def test_hard_negatives_are_a_seeded_sample_of_the_list_in_its_order(tmp_path, stream):
    negatives = {f"q{i}": [f"n{i}-{j}" for j in range(6)] for i in range(4)}
    _write(tmp_path / "d.jsonl", [{"query": q, "positive": f"p{q}", "negatives": n} for q, n in negatives.items()])
    data = {"batch_size": 4, "num_negatives": 2, "datasets": [{"name": "d", "path": "d.jsonl", "stream": stream}]}

    def drawn(sampler, n):  # per epoch: query -> the negatives it trained with
        return [{e.record.query: e.negatives for e in batch} for batch in _batches(sampler, n)]

    seen = drawn(_sampler(tmp_path, data), 12)
    for epoch in seen:
        for q, negs in epoch.items():
            assert len(negs) == 2 and negs == sorted(negs, key=negatives[q].index)  # a subset, in the list's order
    for q in negatives:
        assert len({tuple(epoch[q]) for epoch in seen}) > 3  # not always the first two
        assert {n for epoch in seen for n in epoch[q]} == set(negatives[q])  # every negative gets its turn
    assert drawn(_sampler(tmp_path, data), 12) == seen  # seeded
    assert drawn(_sampler(tmp_path, data, seed=1), 12) != seen
    resumed = _sampler(tmp_path, data)
    resumed.load_state_dict(_after(_sampler(tmp_path, data), 5))
    assert drawn(resumed, 7) == seen[5:]  # a resumed run draws the same negatives

    first = drawn(_sampler(tmp_path, {**data, "negative_sampling": "first"}), 3)
    assert all(negs == negatives[q][:2] for epoch in first for q, negs in epoch.items())


def test_a_batch_holds_the_drawn_negatives_after_the_positives(tmp_path):
    _write(tmp_path / "d.jsonl", [{"query": "q", "positive": "p", "negatives": [f"n{j}" for j in range(5)]}])
    data = {"batch_size": 1, "num_negatives": 3, "datasets": [{"name": "d", "path": "d.jsonl"}]}
    (example,) = _sampler(tmp_path, data).next_batch()
    texts = []
    contrastive.collate([example], stage_config(data=data).data, lambda t, p: texts.extend(t) or {}, "cpu")
    assert texts == ["q", "p", *example.negatives] and example.negatives != ["n0", "n1", "n2"]


def test_no_duplicates_looks_at_the_drawn_negatives_not_the_whole_list(tmp_path):
    shared = [f"popular document {j}" for j in range(9)]  # wide mined lists share popular documents
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"own{i}", *shared]} for i in range(8)]
    _write(tmp_path / "d.jsonl", rows)
    data = {"batch_size": 4, "num_negatives": 1, "negative_sampling": "first", "no_duplicates": True}
    sampler = _sampler(tmp_path, {**data, "datasets": [{"name": "d", "path": "d.jsonl"}]})
    for batch in _batches(sampler, 6):  # fills: only the drawn negative (own{i}) is in the batch
        texts = [t for e in batch for t in (e.record.query, e.positive, *e.negatives)]
        assert len(batch) == 4 and len(texts) == len(set(texts))


def test_no_duplicates_keeps_apart_only_the_datasets_scored_against_each_other(tmp_path):
    # a binary "classification" set whose rows share their two label documents, scored without in-batch
    # negatives, blended with a retrieval set scored with them (NV-Embed's one-stage blend)
    _write(
        tmp_path / "cls.jsonl", [{"query": f"review {i}", "positive": "yes", "negatives": ["no"]} for i in range(20)]
    )
    _write(
        tmp_path / "ret.jsonl", [{"query": f"q{i}", "positive": f"p{i % 6}", "negatives": [f"n{i}"]} for i in range(20)]
    )
    data = {
        "batch_size": 8,
        "num_negatives": 1,
        "sampler": "proportional",
        "no_duplicates": True,
        "datasets": [
            {"name": "cls", "path": "cls.jsonl", "in_batch_negatives": False},
            {"name": "ret", "path": "ret.jsonl"},
        ],
    }
    for batch in _batches(_sampler(tmp_path, data), 4):
        assert sum(e.dataset == 0 for e in batch) == 4  # label texts repeat: no DataError, no deferral
        ret = [t for e in batch if e.dataset == 1 for t in (e.record.query, e.positive, *e.negatives)]
        assert len(ret) == len(set(ret)) == 12  # the in-batch set still never repeats a text (p0..p5 shared)


# ---------------------------------------------------------------------------- shuffle buffer
def _stream(tmp_path, shuffle_buffer, batch_size=5):
    for shard in range(2):  # 20 records in two shards, one bad-for-the-stage line (no negative) in each
        rows = [
            {"query": f"q{shard}-{i}", "positive": f"p{shard}-{i}", "negatives": [f"n{shard}-{i}"]} for i in range(10)
        ]
        rows.insert(4, {"query": f"short{shard}", "positive": "x"})
        _write(tmp_path / f"s-{shard}.jsonl", rows)
    return {
        "batch_size": batch_size,
        "num_negatives": 1,
        "on_bad_record": "skip",
        "datasets": [{"name": "s", "path": "s-*.jsonl", "stream": True, "shuffle_buffer": shuffle_buffer}],
    }


def _queries(sampler, n):
    return [[e.record.query for e in batch] for batch in _batches(sampler, n)]


FILE_ORDER = [f"q{s}-{i}" for s in range(2) for i in range(10)]


@pytest.mark.parametrize("shuffle_buffer", [4, 7, 20, 100])
def test_a_stream_is_shuffled_through_a_seeded_buffer_one_record_once_per_epoch(tmp_path, shuffle_buffer):
    data = _stream(tmp_path, shuffle_buffer)
    epochs = [sum(_queries(_sampler(tmp_path, data), 4 * 3)[4 * e : 4 * e + 4], []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(FILE_ORDER)  # every usable record once per epoch
    assert all(order != FILE_ORDER for order in epochs) and epochs[0] != epochs[1]
    if shuffle_buffer < 20:  # a record leaves the buffer at most shuffle_buffer - 1 places early
        assert all(order.index(q) >= FILE_ORDER.index(q) - (shuffle_buffer - 1) for order in epochs for q in order)
    assert _queries(_sampler(tmp_path, data), 12) == _queries(_sampler(tmp_path, data), 12)
    assert _queries(_sampler(tmp_path, data, seed=5), 12) != _queries(_sampler(tmp_path, data), 12)


def test_shuffle_buffer_0_reads_a_stream_in_file_order(tmp_path):
    data = _stream(tmp_path, 0)
    assert sum(_queries(_sampler(tmp_path, data), 8), []) == FILE_ORDER * 2


@pytest.mark.parametrize("cut", [1, 3, 4, 6])  # mid-epoch, at an epoch's end, while the buffer drains
def test_a_shuffled_stream_resumes_exactly_and_its_state_holds_no_text(tmp_path, cut):
    data = _stream(tmp_path, 7, batch_size=3)
    straight = _queries(_sampler(tmp_path, data), 14)
    state = _after(_sampler(tmp_path, data), cut)
    assert "q0-" not in json.dumps(state["sources"])  # positions of the buffered lines, not their text
    resumed = _sampler(tmp_path, data)
    resumed.load_state_dict(state)
    assert _queries(resumed, 14 - cut) == straight[cut:]


def test_a_line_changed_under_a_buffered_position_is_an_error_on_resume(tmp_path):
    data = _stream(tmp_path, 7)
    state = _after(_sampler(tmp_path, data), 1)
    _, shard, offset, lineno, _ = state["sources"][0]["buffer"][0]  # a line waiting in the buffer
    path = tmp_path / f"s-{shard}.jsonl"
    raw = path.read_bytes()
    end = raw.index(b"\n", offset)
    line = raw[offset:end]
    changed = line.replace(b'"query": "q', b'"query": "Q')  # same length: every offset stays valid
    assert changed != line and len(changed) == len(line)
    path.write_bytes(raw[:offset] + changed + raw[end:])
    with pytest.raises(DataError, match=f"s-{shard}.jsonl:{lineno} changed since the checkpoint"):
        _sampler(tmp_path, data).load_state_dict(state)


# ---------------------------------------------------------------------------- prefetch
def test_prefetcher_keeps_order_and_raises_at_the_failing_item():
    calls = []

    def produce():
        calls.append(len(calls))
        if len(calls) == 4:
            raise KeyboardInterrupt("at item 4")
        return len(calls)

    batches = Prefetcher(produce, count=6, depth=2)
    assert [batches.next() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(KeyboardInterrupt, match="at item 4"):
        batches.next()
    batches.close()
    assert len(calls) == 4  # nothing produced after the failure


def test_prefetcher_reads_ahead_at_most_depth_and_pauses():
    produced = []
    batches = Prefetcher(lambda: produced.append(1) or len(produced), count=100, depth=2)
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:  # two ready, no third
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(produced) == 2
    with batches.paused():
        assert batches.next() == 1
        time.sleep(0.1)
        assert len(produced) == 2  # room for one more, but paused
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(produced) == 3
    batches.close()
    assert not any(t.name == "embforge-prefetch" and t.is_alive() for t in threading.enumerate())


def test_training_tokenises_in_the_prefetch_thread_and_evaluation_pauses_it(data_dir, tmp_path, monkeypatch):
    model = tiny_embedder()
    threads, overlaps, evaluating = [], [], threading.Event()
    real = model.tokenize

    def tokenize(*a, **k):
        threads.append(threading.current_thread().name)
        if threading.current_thread().name == "embforge-prefetch":
            overlaps.append(evaluating.is_set())
            time.sleep(0.3)  # slower than a step: the thread is mid-batch whenever an evaluation starts
        return real(*a, **k)

    monkeypatch.setattr(model, "tokenize", tokenize)

    def evaluator(embedder):
        evaluating.set()
        time.sleep(0.5)  # the prefetch thread has room in its queue: only the pause keeps it from tokenising
        evaluating.clear()
        return {"t": 1.0}

    contrastive.train_stage(
        model,
        stage_config(steps=6, eval_every=3, eval_tasks="x"),
        data_root=data_dir,
        stage_dir=tmp_path / "s",
        recipe_dict={},
        info=contrastive.DistInfo(),
        seed=0,
        resume=False,
        evaluator=evaluator,
    )
    assert threads.count("embforge-prefetch") == 2 * 6  # queries and documents of every step, in the thread
    assert not any(overlaps)


# ---------------------------------------------------------------------------- each rank its own share
def _own_share_data(folder):
    _write(folder / "m.jsonl", [{"query": f"m{i}", "positive": f"mp{i}", "negatives": [f"mn{i}"]} for i in range(16)])
    for shard in range(2):
        rows = [
            {"query": f"s{shard}-{i}", "positive": f"sp{shard}-{i}", "negatives": [f"sn{shard}-{i}"]} for i in range(8)
        ]
        _write(folder / f"s-{shard}.jsonl", rows)


OWN_SHARE = {
    "batch_size": 2,
    "num_negatives": 1,
    "no_duplicates": False,
    "sampler": "single_source",
    "rank_reading": "own_share",
    "datasets": [
        {"name": "memory", "path": "m.jsonl"},
        {"name": "stream", "path": "s-*.jsonl", "stream": True, "shuffle_buffer": 3},
    ],
}


def _own_share_worker(rank, world, port, data_dir, run_dir, crash_at, out_file):
    import contextlib

    import torch

    from embforge.train.parallel import distributed_session

    from .helpers import crash_in_step, rank_env

    rank_env(rank, world, port)
    seen, real = [], contrastive.collate

    def spy(examples, *a, **k):
        seen.append([[e.dataset, e.record.query] for e in examples])
        return real(examples, *a, **k)

    contrastive.collate = spy
    with distributed_session() as info:
        model = tiny_embedder()
        stage = stage_config(steps=6, save_every=3, log_every=3, data=OWN_SHARE)
        crashed = False
        try:
            with crash_in_step(crash_at) if crash_at else contextlib.nullcontext():
                contrastive.train_stage(
                    model, stage, data_root=Path(data_dir), stage_dir=Path(run_dir), recipe_dict={}, info=info, seed=3
                )
        except KeyboardInterrupt:
            crashed = True
    torch.save({"seen": seen, "crashed": crashed, "weights": model.state_dict()}, f"{out_file}.{rank}")


def _spawn(tmp_path, run, crash_at=0):
    import torch
    import torch.multiprocessing as mp

    from .helpers import free_port

    out = tmp_path / f"{run}-{crash_at}"
    mp.spawn(_own_share_worker, args=(2, free_port(), str(tmp_path), str(tmp_path / run), crash_at, str(out)), nprocs=2)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


def test_each_rank_reads_only_its_share_and_resumes_its_own_position(tmp_path):
    import torch

    _own_share_data(tmp_path)
    straight = _spawn(tmp_path, "straight")
    for rank, got in enumerate(straight):
        queries = [q for batch in got["seen"] for _, q in batch]
        assert len(got["seen"]) == 6 and all(len(batch) == 2 for batch in got["seen"])  # its own batch_size
        assert all(int(q.split("-")[-1].lstrip("m")) % 2 == rank for q in queries)  # only lines rank+1, rank+3, ...
    datasets = [[[d for d, _ in batch] for batch in got["seen"]] for got in straight]
    assert datasets[0] == datasets[1] and {d for b in datasets[0] for d in b} == {0, 1}  # same dataset per batch
    assert {q for _, q in straight[0]["seen"][0]}.isdisjoint(q for _, q in straight[1]["seen"][0])

    crashed = _spawn(tmp_path, "resumed", crash_at=5)
    assert all(got["crashed"] for got in crashed)
    resumed = _spawn(tmp_path, "resumed")
    for rank in range(2):
        assert resumed[rank]["seen"] == straight[rank]["seen"][3:]  # each rank continues from its own position
    for name, w in straight[0]["weights"].items():
        torch.testing.assert_close(resumed[0]["weights"][name], w, atol=1e-6, rtol=0)


def test_a_data_position_of_another_reading_or_world_size_is_refused(tmp_path):
    from embforge.errors import CheckpointError

    two = contrastive.DistInfo(rank=1, world=2)
    assert contrastive._rank_sampler_state([{"a": 0}, {"b": 1}], True, two, tmp_path) == {"b": 1}
    assert contrastive._rank_sampler_state({"rng": 1}, False, two, tmp_path) == {"rng": 1}
    with pytest.raises(CheckpointError, match="own_share with 3 ranks; this run reads own_share with 2"):
        contrastive._rank_sampler_state([{}, {}, {}], True, two, tmp_path)
    with pytest.raises(CheckpointError, match="written with rank_reading global"):
        contrastive._rank_sampler_state({"rng": 1}, True, two, tmp_path)


def test_own_share_deals_out_a_task_file_and_counts_it_once_over_the_ranks(tmp_path):
    from embforge.data.records import DataReport

    _write(tmp_path / "sts.jsonl", [{"sentence1": f"a{i}", "sentence2": f"b{i}", "score": 5.0} for i in range(10)])
    data = {
        "batch_size": 1,
        "rank_reading": "own_share",
        "datasets": [{"name": "sts", "path": "sts.jsonl", "format": "sts"}],
    }
    stage = stage_config(data=data)
    one, one_report = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    ranks = [batches.build_sampler(stage.data, tmp_path, seed=0, world=2, rank=r) for r in (0, 1)]
    total = DataReport()
    for _, report in ranks:
        total.merge(report)
    assert total.summary() == one_report.summary()  # summed over ranks = one process's counts
    records = [{(r.query, r.positive) for r in sampler.sources[0].records} for sampler, _ in ranks]
    assert records[0].isdisjoint(records[1])
    assert records[0] | records[1] == {(r.query, r.positive) for r in one.sources[0].records}


def test_shuffle_buffer_is_for_streams_only_and_not_negative(tmp_path):
    from embforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"datasets.0.shuffle_buffer: applies to streamed datasets"):
        stage_config(data={"datasets": [{"name": "d", "path": "d.jsonl", "shuffle_buffer": 100}]})
    with pytest.raises(ConfigError, match=r"datasets.0.shuffle_buffer"):
        stage_config(data={"datasets": [{"name": "d", "path": "d-*.jsonl", "stream": True, "shuffle_buffer": -1}]})
