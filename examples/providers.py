"""The four agent tools on Moondream 3 hosted by fal.ai, with SAM 3 for segmentation.

With FAL_KEY set, it runs on fal.ai (sync endpoints) on examples/data/waterfall.jpg.
Without it, it starts the offline emulator (which also speaks fal's API) on a synthetic
scene, so it runs anywhere.

    python examples/providers.py
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moondream_tools import FalMoondream, FalSam3, MoondreamError, VisionTools

PHOTO = Path(__file__).resolve().parent / "data" / "waterfall.jpg"


@asynccontextmanager
async def open_tools() -> AsyncIterator[tuple[VisionTools, dict[str, str]]]:
    """Tools on fal (Moondream + SAM 3), the scene registered as img_1, and what to ask."""
    if os.environ.get("FAL_KEY"):
        async with FalMoondream() as fal, FalSam3() as sam:
            print(f"Using fal.ai on {PHOTO.name}.")
            tools = VisionTools(fal, segment_backend=sam)
            tools.add_image(PHOTO)
            yield tools, {"count": "tree", "locate": "waterfall", "segment": "waterfall"}
        return
    from moondream_tools.testing import FakeMoondream, Scene

    print("No FAL_KEY set: using the offline emulator's fal.ai routes on a synthetic scene.")
    async with FakeMoondream() as server:
        async with FalMoondream(api_key=server.fal_key, base_url=server.fal_base_url) as fal, FalSam3(
            api_key=server.fal_key, base_url=server.fal_base_url
        ) as sam:
            tools = VisionTools(fal, segment_backend=sam)
            tools.add_image(Scene.demo().render())
            yield tools, {"count": "red circle", "locate": "blue square", "segment": "red circle"}


async def main() -> None:
    async with open_tools() as (tools, ask):
        for result in (
            await tools.describe("img_1"),
            await tools.count("img_1", ask["count"]),
            await tools.locate("img_1", ask["locate"]),
            await tools.segment("img_1", ask["segment"]),
        ):
            print(f"\n{result.tool}\n  {result.text}")
        masks = (await tools.segment("img_1", ask["segment"])).segmentation
        print(f"\nSAM 3 returned {len(masks.instances)} mask(s); scores {[i.score for i in masks.instances]}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MoondreamError as exc:
        raise SystemExit(f"vision error: {exc}") from None
