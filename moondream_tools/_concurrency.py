"""Running one async function over many items with bounded concurrency, errors per item."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from .errors import MoondreamError

__all__ = ["map_concurrently"]

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
