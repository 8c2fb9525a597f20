"""Running one async function over many items with bounded concurrency, errors per item."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

from .errors import MoondreamError

__all__ = ["map_concurrently", "stream_in_order", "usable_cpus"]

def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or ``taskset``'s share,
    not the host's count), at least 1.

    >>> usable_cpus() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


_T = TypeVar("_T")
_I = TypeVar("_I")


async def map_concurrently(
    func: Callable[[_I], Awaitable[_T]],
    items: Iterable[_I],
    *,
    concurrency: int | None = None,
) -> list[_T | MoondreamError]:
    """Run ``func`` on every item, at most ``concurrency`` at once; results in input order.

    A :class:`MoondreamError` for one item becomes that item's result; any other exception
    is a bug: the rest are cancelled and it propagates. None means no limit.

    >>> async def double(n: int) -> int:
    ...     return 2 * n
    >>> asyncio.run(map_concurrently(double, [1, 2, 3], concurrency=2))
    [2, 4, 6]
    """
    todo = list(items)
    limit = concurrency or max(1, len(todo))
    if limit < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(limit)

    async def one(item: _I) -> _T | MoondreamError:
        async with gate:
            try:
                return await func(item)
            except MoondreamError as error:
                return error

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(item)) for item in todo]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [task.result() for task in tasks]


async def stream_in_order(
    func: Callable[[_I], Awaitable[_T]], items: Iterable[_I], *, concurrency: int, window: int
) -> AsyncIterator[_T]:
    """``func`` of each item, yielded in input order, while at most ``concurrency`` calls run
    and at most ``window`` results wait for a slower one before them; ``items`` is read no
    further ahead than that. Closing the iterator early cancels the calls in flight; an
    exception from ``func`` ends the iteration when its turn comes.

    >>> async def double(n: int) -> int:
    ...     return 2 * n
    >>> async def collect() -> list[int]:
    ...     return [v async for v in stream_in_order(double, iter([1, 2, 3]), concurrency=2, window=4)]
    >>> asyncio.run(collect())
    [2, 4, 6]
    """
    slots = asyncio.Semaphore(concurrency)
    pending: deque[asyncio.Task[_T]] = deque()

    async def run(item: _I) -> _T:
        try:
            return await func(item)
        finally:
            slots.release()

    try:
        for item in items:
            while pending and (len(pending) >= window or pending[0].done()):
                yield await pending.popleft()
            await slots.acquire()
            pending.append(asyncio.create_task(run(item)))
        while pending:
            yield await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
