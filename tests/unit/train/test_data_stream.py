"""The training data path at scale: sampled hard negatives, the streams' shuffle buffer, prefetch."""

import json
import threading
import time

import pytest

import embforge.train.loop as loop
from embforge.train.prefetch import Prefetcher

from .helpers import stage_config, tiny_embedder


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sampler(tmp_path, data, seed=0):
    return loop.build_sampler(stage_config(data=data).data, tmp_path, seed=seed, world=1)[0]


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
    loop.collate([example], stage_config(data=data).data, lambda t, p: texts.extend(t) or {}, "cpu")
    assert texts == ["q", "p", *example.negatives] and example.negatives != ["n0", "n1", "n2"]


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
    (tmp_path / "s-0.jsonl").write_text((tmp_path / "s-0.jsonl").read_text().replace('"q0-', '{"x": "q0-', 1))
    with pytest.raises(Exception, match="s-0.jsonl"):
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
    while len(produced) < 3 and time.monotonic() < deadline:  # two queued, a third held at the put
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(produced) == 3
    with batches.paused():
        assert batches.next() == 1
        time.sleep(0.1)
        assert len(produced) == 3  # room in the queue, but paused
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) == 4
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

    loop.train_stage(
        model,
        stage_config(steps=6, eval_every=3, eval_tasks="x"),
        data_root=data_dir,
        stage_dir=tmp_path / "s",
        recipe_dict={},
        info=loop.DistInfo(),
        seed=0,
        resume=False,
        evaluator=evaluator,
    )
    assert threads.count("embforge-prefetch") == 2 * 6  # queries and documents of every step, in the thread
    assert not any(overlaps)
