"""The emulator on its own event loop in a background thread (imported by conftests; not a
test file): for synchronous callers, whose calls block their own loop, and for Ray's actors,
which reach it over loopback while the driver blocks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from moondream_tools.testing import FakeMoondream


@contextlib.contextmanager
def emulator_in_thread(*, name: str = "fake-moondream", **options: Any) -> Iterator[FakeMoondream]:
    """``FakeMoondream(**options)`` served from a thread called ``name``; stopped on exit."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            async with FakeMoondream(**options) as server:
                state.update(server=server, stop=asyncio.Event(), loop=asyncio.get_running_loop())
                ready.set()
                await state["stop"].wait()

        asyncio.run(main())

    thread = threading.Thread(target=serve, name=name, daemon=True)
    thread.start()
    if not ready.wait(10):
        pytest.fail("the emulator did not start")
    try:
        yield state["server"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)
