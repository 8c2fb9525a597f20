"""Shared fixtures: the offline emulator, a client talking to it, and the shared test images."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from moondream_tools import AsyncMoondream, FalMoondream, FalSam3
from moondream_tools import _transport as transport_module
from moondream_tools.testing import FakeMoondream

from emulator_support import emulator_in_thread

#: ../shared beside the checkout (CI puts it there).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}; ../shared must sit beside the checkout")
    return SHARED_DATA


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record retry backoff delays instead of sleeping them."""
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(transport_module, "_sleep", fake_sleep)
    return recorded


@pytest.fixture
async def fake() -> AsyncIterator[FakeMoondream]:
    async with FakeMoondream() as server:
        yield server


@pytest.fixture(params=["moondream", "fal", "fal+sam3"])
async def backends(request: pytest.FixtureRequest, fake: FakeMoondream) -> AsyncIterator[tuple[Any, Any]]:
    """``(backend, segment_backend)`` on the emulator: Moondream's own API, Moondream 3 on
    fal.ai, or Moondream 3 on fal.ai with SAM 3 for segmentation. Tests taking it run the
    tools on all three."""
    if request.param == "moondream":
        async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
            yield md, None
        return
    async with FalMoondream(api_key=fake.fal_key, base_url=fake.fal_base_url) as fal, FalSam3(
        api_key=fake.fal_key, base_url=fake.fal_base_url
    ) as sam:
        yield fal, (sam if request.param == "fal+sam3" else None)


@pytest.fixture
async def client(fake: FakeMoondream) -> AsyncIterator[AsyncMoondream]:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        yield md


@pytest.fixture
def threaded_fake() -> Iterator[FakeMoondream]:
    """An emulator on its own event loop in a background thread.

    For tests of synchronous calls: a sync call blocks the calling thread's loop, so the
    server must not live on that loop.
    """
    with emulator_in_thread() as server:
        yield server
