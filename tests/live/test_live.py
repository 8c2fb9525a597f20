"""Against the real services. Marked ``live``; each test is skipped unless its key is set
(``MOONDREAM_API_KEY``, ``FAL_KEY``, ``AIGATEWAY_API_KEY``), so CI never runs them and they
never count as coverage. Run: ``FAL_KEY=... .venv/bin/python -m pytest tests/live -m live``.
"""

from __future__ import annotations

import os

import pytest

from moondream_tools import AIGatewaySegmenter, AsyncMoondream, FalMoondream, FalSam3, VisionTools
from moondream_tools.testing import Scene, Shape

pytestmark = pytest.mark.live

SCENE = Scene(640, 480, [Shape("circle", "red", (160, 240), 140), Shape("square", "blue", (470, 240), 150)])


def needs(variable: str) -> None:
    if not os.environ.get(variable):
        pytest.skip(f"{variable} is not set")


async def test_moondream_cloud_counts_and_segments() -> None:
    needs("MOONDREAM_API_KEY")
    async with AsyncMoondream() as md:
        tools = VisionTools(md)
        tools.add_image(SCENE.render())
        assert (await tools.count("img_1", "red circle")).count == 1
        assert (await tools.segment("img_1", "blue square")).segmentation.found


async def test_fal_moondream_and_sam3() -> None:
    needs("FAL_KEY")
    async with FalMoondream() as fal, FalSam3() as sam:
        tools = VisionTools(fal, segment_backend=sam)
        tools.add_image(SCENE.render())
        count = await tools.count("img_1", "red circle")
        assert count.count == 1 and count.points.usage is not None
        segment = await tools.segment("img_1", "blue square")
        truth = SCENE.matching("blue square")[0]
        assert abs(segment.segmentation.area_px - truth.area_px) <= 0.1 * truth.area_px


async def test_fal_queue() -> None:
    needs("FAL_KEY")
    async with FalMoondream(queue=True) as fal:
        assert "circle" in (await fal.caption(SCENE.render(), "short")).caption.lower()


@pytest.mark.parametrize("model", ["moondream/moondream3-preview-segment", "meta/sam-3-image"])
async def test_aigateway_segments(model: str) -> None:
    needs("AIGATEWAY_API_KEY")
    async with AIGatewaySegmenter(model=model) as gateway:
        assert (await gateway.segment(SCENE.render(), "blue square")).found
