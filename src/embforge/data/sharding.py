"""What every sharded data tool (``mine``, ``filter consistency``, ``filter clean``) does alike.

Input shards map one-to-one onto output shards; shard ``i`` is written by rank
``i % world`` (:func:`rank_shards`), so one process and N torchrun ranks write the same
files. A shard is streamed in chunks (:func:`chunked`), and each rank's counts are summed
over all ranks at the end (:func:`sum_over_ranks`), so every rank returns the total.
``filter consistency`` also splits the work inside shards: its chunks span a source's
shards, so every rank reads every shard, checks every world-th chunk and gets all ranks'
decisions (:func:`gather_over_ranks`) before writing its shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TypeVar

from embforge.errors import DataError

T = TypeVar("T")
U = TypeVar("U")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter); holds one list at a time."""
    if size < 1:
        raise DataError(f"chunk size must be at least 1, got {size}")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def rank_shards(inputs: list[T], outputs: list[U], rank: int, world: int) -> list[tuple[T, U]]:
    """The (input, output) pairs that ``rank`` of ``world`` processes: shard i goes to rank ``i % world``.

    Raises:
        DataError: the numbers of input and output shards differ.
    """
    if len(inputs) != len(outputs):
        raise DataError(f"{len(inputs)} input shards but {len(outputs)} output paths")
    return [pair for i, pair in enumerate(zip(inputs, outputs)) if i % world == rank]


def sum_over_ranks(*counts: Counter, world: int) -> tuple[Counter, ...]:
    """Each of ``counts`` summed over the ``world`` ranks (a collective: every rank must call it)."""
    totals = tuple(Counter() for _ in counts)
    for per_rank in gather_over_ranks([dict(c) for c in counts], world=world):
        for total, part in zip(totals, per_rank):
            total.update(part)  # update, not +: a count of 0 stays in the total
    return totals


def gather_over_ranks(obj: T, *, world: int) -> list[T]:
    """Every rank's ``obj``, in rank order (a collective: every rank must call it); ``[obj]`` in one process."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
