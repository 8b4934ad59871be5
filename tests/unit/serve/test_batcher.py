"""Token-budget batching, ordering, draining, and model-backed backends against Embedder.encode."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from embforge.precision import resolve_precision
from embforge.serve.backend import Encoded, TorchBackend
from embforge.serve.batcher import MicroBatcher


def _item(n: int, tag: int) -> Encoded:
    ids = np.full(n, tag, dtype=np.int64)
    return Encoded({"input_ids": ids, "attention_mask": np.ones_like(ids)}, n, n)


def _recording_embed(log: list):
    def embed(batch):
        log.append([len(f["input_ids"]) for f in batch])
        return np.stack([[f["input_ids"][0], len(f["input_ids"])] for f in batch]).astype(np.float32)

    return embed


def test_batches_respect_the_token_budget_longest_first_and_results_keep_input_order():
    log: list = []
    batcher = MicroBatcher(_recording_embed(log), max_batch_tokens=20, max_batch_size=3)
    lengths = [2, 9, 5, 5, 1, 3, 4, 2]
    items = [_item(n, tag) for tag, n in enumerate(lengths)]

    async def main():
        batcher.start()
        try:
            return await batcher.submit(items)
        finally:
            batcher.stop()

    out = asyncio.run(main())
    np.testing.assert_array_equal(out, [[tag, n] for tag, n in enumerate(lengths)])
    assert log == [[9, 5], [5, 4, 3], [2, 2, 1]]  # sorted, len x longest <= 20, <= 3 items
    assert all(len(b) * max(b) <= 20 for b in log)
    assert batcher.queued == 0


def test_long_items_do_not_pad_short_ones():
    log: list = []
    batcher = MicroBatcher(_recording_embed(log), max_batch_tokens=1000)

    async def main():
        batcher.start()
        try:
            return await batcher.submit([_item(n, i) for i, n in enumerate([100, 12, 60, 10, 9, 50, 11])])
        finally:
            batcher.stop()

    asyncio.run(main())
    assert log == [[100, 60, 50], [12, 11, 10, 9]]  # no batch holds an item under half its longest


def test_stop_finishes_every_accepted_item():
    gate = threading.Event()
    log: list = []

    def slow(batch):
        gate.wait(10)
        return _recording_embed(log)(batch)

    batcher = MicroBatcher(slow, max_batch_tokens=4)

    async def main():
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit([_item(2, i), _item(3, i)])) for i in range(5)]
        await asyncio.sleep(0.05)
        stopper = asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks)
        await stopper
        return results

    results = asyncio.run(main())
    assert [r[:, 0].tolist() for r in results] == [[i, i] for i in range(5)]
    assert sum(len(b) for b in log) == 10


def test_torch_backend_matches_embedder_encode(tiny_embedder):
    backend = TorchBackend(tiny_embedder, "tiny")
    texts = ["sort a list", "the cat runs fast", "read " * 80]  # the last one is truncated
    for prompt in (None, "query"):
        items = backend.tokenize(texts, prompt)
        assert (
            items[2].num_tokens == tiny_embedder.head.max_seq_len < items[2].input_tokens
            and items[2].features.truncated
        )
        got = backend.embed([i.features for i in items])
        np.testing.assert_allclose(got, tiny_embedder.encode(texts, prompt_name=prompt), atol=1e-5)
    info = backend.describe()
    assert info["prompts"] == tiny_embedder.head.prompts and info["query_prompt_name"] == "query"
    assert info["precision"] == resolve_precision("auto", "cpu")  # the model's default, as served
