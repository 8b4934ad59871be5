"""Background prefetch: the next batches are read and tokenised while the model trains.

A :class:`Prefetcher` runs ``produce()`` in one daemon thread, up to ``depth`` items
ahead of the consumer, in order. An exception raised by ``produce`` (a bad data line, an
interrupt) reaches the consumer at the item it would have produced, so errors surface
at the same step as without prefetch. The training loop pairs each batch with the
sampler state *after* it was drawn, so a checkpoint records the position of the last
batch trained on, not of the batches read ahead. ``paused()`` holds the worker between
items (the tokenizer is not shared safely between threads, and evaluation tokenises).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``count`` results of ``produce()``, computed in a background thread, at most ``depth`` ahead."""

    def __init__(self, produce: Callable[[], T], count: int, depth: int = 2):
        self._produce, self._left = produce, count
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(max(1, depth))  # items produced and not yet taken: at most depth
        self._lock = threading.Lock()  # held by the worker while it produces an item
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="embforge-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        for _ in range(self._left):
            while not self._slots.acquire(timeout=0.1):  # wait for the consumer to take one
                if self._stop.is_set():
                    return
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    item = (True, self._produce())
                except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
                    item = (False, exc)
            self._queue.put(item)
            if not item[0]:
                return

    def next(self) -> T:
        """The next item, in order; re-raises the exception ``produce`` raised for it."""
        ok, value = self._queue.get()
        self._slots.release()
        if not ok:
            raise value
        return value

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block the worker produces nothing (it finishes the item it is on first)."""
        with self._lock:
            yield

    def close(self) -> None:
        """Stop the worker (items read ahead are dropped) and wait for it."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()
