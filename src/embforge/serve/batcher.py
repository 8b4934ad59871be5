"""Dynamic micro-batching: items from many requests share forward passes under a token budget.

Requests are split into items (one per input) and queued. ONE worker thread owns the model:
it takes everything queued at that moment (a *round*), sorts it by length (least padding)
and cuts it into batches whose padded size ``items x longest`` stays within
``max_batch_tokens``; items that arrive meanwhile wait for the next round, so no request
waits more than one round. Items carry a *group* (the LoRA adapter they run with; None: the
base weights); a batch may mix groups, and ``embed(features, groups)`` gets each item's group
(``embed(features)`` when every item is of the base). The queue is bounded in items: a request that does not fit is
refused at once with :class:`OverloadedError` (HTTP 503 + ``Retry-After``) instead of
piling up latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from embforge.serve.backend import Encoded
from embforge.serve.schemas import OverloadedError


@dataclass
class _Job:
    """One request's items; its future resolves to the (N, D) embeddings in input order."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    total: int
    remaining: int
    out: np.ndarray | None = None
    failed: bool = False


@dataclass(order=True)
class _Entry:
    sort_key: int  # -num_tokens: longest first
    seq: int  # arrival order breaks ties, keeps sorting stable
    job: _Job = field(compare=False)
    index: int = field(compare=False)
    item: Encoded = field(compare=False)
    group: str | None = field(default=None, compare=False)


# a batch holds items at least 1/2 as long as its longest (at most half of it is padding)
_MAX_LENGTH_SPREAD = 2

BatchStats = Callable[..., None]  # (items, padded tokens, seconds, group) of one forward pass
MIXED = "(mixed)"  # the group a batch of several groups reports to ``on_batch`` (never an adapter's name)


class MicroBatcher:
    """Queue + one model thread.

    Args:
        embed: per-item features -> (B, D) embeddings; only ever called from the worker thread,
            as ``embed(features)`` when every item is of the base group, else as
            ``embed(features, groups)`` with each item's group.
        max_batch_tokens: budget for ``batch size x longest item`` of one forward pass.
        max_batch_size: items per forward pass at most.
        max_queued_items: items waiting or running at most; beyond it :meth:`submit` refuses.
        on_batch: called after every forward pass (for metrics) with its group: None (the base),
            an adapter, or :data:`MIXED`.
        lock: held around every forward pass (batchers of different models sharing the CPU take turns).
    """

    def __init__(
        self,
        embed: Callable[[list[dict[str, np.ndarray]]], np.ndarray],
        *,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 128,
        max_queued_items: int = 4096,
        on_batch: BatchStats | None = None,
        lock: threading.Lock | None = None,
    ):
        if max_batch_tokens < 1 or max_batch_size < 1 or max_queued_items < 1:
            raise ValueError("batch and queue limits must be >= 1")
        self._embed = embed
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queued_items = max_queued_items
        self._on_batch = on_batch
        self._lock = lock
        self._cond = threading.Condition()
        self._pending: list[_Entry] = []
        self._queued = 0  # items accepted and not yet embedded
        self._seq = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="embforge-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every accepted item, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, items: Sequence[Encoded], group: str | None = None) -> np.ndarray:
        """Queue ``items`` (run with ``group``); return their (N, D) embeddings in order.

        Raises:
            OverloadedError: the queue has no room for all of ``items`` (nothing is queued).
        """
        loop = asyncio.get_running_loop()
        job = _Job(future=loop.create_future(), loop=loop, total=len(items), remaining=len(items))
        with self._cond:
            if self._stopping:
                raise OverloadedError("the server is shutting down; retry on another instance")
            if self._queued + len(items) > self.max_queued_items:
                raise OverloadedError(
                    f"the server is busy ({self._queued} inputs queued, limit {self.max_queued_items}); retry later"
                )
            for i, item in enumerate(items):
                self._seq += 1
                self._pending.append(_Entry(-item.num_tokens, self._seq, job, i, item, group))
            self._queued += len(items)
            self._cond.notify()
        return await job.future

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:  # stopping and drained
                    return
                round_, self._pending = sorted(self._pending), []
            for batch in self._cut(round_):  # longest first, groups mixed
                self._run_batch(batch)

    def _cut(self, entries: list[_Entry]) -> list[list[_Entry]]:
        """Longest-first entries -> batches with ``len x longest <= max_batch_tokens``.

        A batch also ends where lengths drop below ``1 / _MAX_LENGTH_SPREAD`` of its longest
        item: padding is paid in full on CPU, and one long text padding dozens of short ones
        to its length made forward passes several times dearer in the serving benchmark.
        """
        batches, current = [], []
        for entry in entries:
            longest = -current[0].sort_key if current else entry.item.num_tokens
            if current and (
                len(current) >= self.max_batch_size
                or (len(current) + 1) * longest > self.max_batch_tokens
                or entry.item.num_tokens * _MAX_LENGTH_SPREAD < longest
            ):
                batches.append(current)
                current = []
            current.append(entry)
        if current:
            batches.append(current)
        return batches

    def _forward(self, features: list, groups: list[str | None]) -> np.ndarray:
        with self._lock or contextlib.nullcontext():
            return self._embed(features) if all(g is None for g in groups) else self._embed(features, groups)

    def _run_batch(self, batch: list[_Entry]) -> None:
        live = [e for e in batch if not e.job.failed and not e.job.future.done()]
        groups = [e.group for e in live]
        present = set(groups)
        group = next(iter(present)) if len(present) == 1 else MIXED
        start = time.perf_counter()
        try:
            emb = self._forward([e.item.features for e in live], groups) if live else None
        except Exception as exc:  # the request(s) get the error; the worker lives on
            for e in live:
                if not e.job.failed:
                    e.job.failed = True
                    e.job.loop.call_soon_threadsafe(_settle, e.job.future, None, exc)
            emb = None
        if emb is not None and self._on_batch is not None:
            padded = len(live) * max(e.item.num_tokens for e in live)
            self._on_batch(len(live), padded, time.perf_counter() - start, group)
        for row, e in enumerate(live):
            if emb is None:
                break
            job = e.job
            if job.out is None:
                job.out = np.empty((job.total, emb.shape[1]), dtype=np.float32)
            job.out[e.index] = emb[row]
        with self._cond:
            self._queued -= len(batch)
        for e in batch:
            job = e.job
            job.remaining -= 1
            if job.remaining == 0 and not job.failed:
                job.loop.call_soon_threadsafe(_settle, job.future, job.out, None)


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
