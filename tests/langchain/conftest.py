"""Fixtures for the LangChain adapter: a scene with ground truth and tools on the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain_moondream import MoondreamToolkit
from lc_support import SCENE

from moondream_tools import AsyncMoondream, VisionTools
from moondream_tools.testing import FakeMoondream, Scene


@pytest.fixture
def scene() -> Scene:
    return SCENE


@pytest.fixture
async def toolkit(backends: tuple[Any, Any]) -> AsyncIterator[MoondreamToolkit]:
    """The four tools on the emulator (same event loop), with the scene as ``img_1``: on
    Moondream's own API, and on Moondream 3 on fal.ai with SAM 3 for segmentation."""
    backend, segmenter = backends
    async with MoondreamToolkit(backend=backend, segment_backend=segmenter) as kit:
        assert kit.add_image(SCENE.render()) == "img_1"
        yield kit


@pytest.fixture
async def threaded_toolkit(threaded_fake: FakeMoondream) -> AsyncIterator[MoondreamToolkit]:
    """The four tools on an emulator in its own thread: sync calls cannot block it."""
    vision = VisionTools(AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url))
    vision.add_image(SCENE.render())
    kit = MoondreamToolkit(vision=vision)
    yield kit
    await vision.backend.aclose()
