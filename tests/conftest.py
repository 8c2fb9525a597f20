"""Shared fixtures: the offline emulator, a client talking to it, and the shared test images."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moondream_tools import AsyncMoondream
from moondream_tools.testing import FakeMoondream

#: ../shared beside the checkout (CI puts it there).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}; ../shared must sit beside the checkout")
    return SHARED_DATA


@pytest.fixture
async def fake() -> AsyncIterator[FakeMoondream]:
    async with FakeMoondream() as server:
        yield server


@pytest.fixture
async def client(fake: FakeMoondream) -> AsyncIterator[AsyncMoondream]:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        yield md
