"""Fixtures for the LangChain adapter: a scene with ground truth and tools on the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from langchain_moondream import MoondreamToolkit
from lc_support import SCENE

from moondream_tools import AsyncMoondream, VisionTools
from moondream_tools.testing import FakeMoondream, Scene


@pytest.fixture
def scene() -> Scene:
    return SCENE


@pytest.fixture
async def toolkit(fake: FakeMoondream) -> AsyncIterator[MoondreamToolkit]:
    """The four tools on the emulator (same event loop), with the scene as ``img_1``."""
    client = AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url)
    async with MoondreamToolkit(backend=client) as kit:
        assert kit.add_image(SCENE.render()) == "img_1"
        yield kit
    await client.aclose()


@pytest.fixture
async def threaded_toolkit(threaded_fake: FakeMoondream) -> AsyncIterator[MoondreamToolkit]:
    """The four tools on an emulator in its own thread: sync calls cannot block it."""
    vision = VisionTools(AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url))
    vision.add_image(SCENE.render())
    kit = MoondreamToolkit(vision=vision)
    yield kit
    await vision.backend.aclose()
