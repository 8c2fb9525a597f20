"""Quickstart: caption, query, detect, point and segment one image.

With MOONDREAM_API_KEY (Moondream Cloud) or MOONDREAM_BASE_URL (e.g. Moondream Station
at http://localhost:2020/v1) set, it asks that server about examples/data/waterfall.jpg.
With neither, it starts the offline emulator on a synthetic scene, so it runs anywhere.

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moondream_tools import AsyncMoondream, MoondreamError

PHOTO = Path(__file__).resolve().parent / "data" / "waterfall.jpg"


@asynccontextmanager
async def open_client() -> AsyncIterator[tuple[AsyncMoondream, object, dict[str, str]]]:
    """A client, the image to look at, and the phrases to ask about."""
    if os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL"):
        async with AsyncMoondream() as md:
            print(f"Using the Moondream server at {md.base_url} on {PHOTO.name}.")
            yield md, PHOTO, {"question": "Is there a waterfall in this photo?", "object": "waterfall",
                              "points": "word"}
        return
    from moondream_tools.testing import FakeMoondream, Scene

    print("No MOONDREAM_API_KEY or MOONDREAM_BASE_URL set: using the offline emulator on a synthetic scene.")
    scene = Scene.demo()
    async with FakeMoondream() as server:
        async with AsyncMoondream(api_key=server.api_key, base_url=server.base_url) as md:
            yield md, scene.render(), {"question": "How many red circles are there?",
                                       "object": "blue square", "points": "red circle"}


async def main() -> None:
    async with open_client() as (md, image, ask):
        prepared = await md.prepare(image)  # decode and encode once, reuse for every call
        width, height = prepared.width, prepared.height
        print(f"Image: {width}x{height} px (upright)\n")

        caption = await md.caption(prepared, length="normal")
        print(f"caption   {caption.caption}")

        answer = await md.query(prepared, ask["question"])
        print(f"query     {ask['question']} -> {answer.answer}")

        boxes = await md.detect(prepared, ask["object"])
        print(f"detect    {len(boxes.objects)} x {ask['object']!r}")
        for box in boxes.to_pixels():
            print(f"          box ({box.x_min:.0f}, {box.y_min:.0f}) - ({box.x_max:.0f}, {box.y_max:.0f}) px")

        points = await md.point(prepared, ask["points"])
        print(f"point     {len(points.points)} x {ask['points']!r}")
        for point in points.to_pixels():
            print(f"          at ({point.x:.0f}, {point.y:.0f}) px")

        mask = await md.segment(prepared, ask["object"])
        if mask.found and mask.bbox is not None:
            box = mask.bbox.to_pixels(prepared.size)
            print(
                f"segment   {ask['object']!r}: bbox ({box.x_min:.0f}, {box.y_min:.0f}) - "
                f"({box.x_max:.0f}, {box.y_max:.0f}) px, SVG path of {len(mask.path)} chars: {mask.path[:48]}..."
            )
        else:
            print(f"segment   no {ask['object']!r} found")

        print("stream    ", end="")
        async for piece in md.stream_caption(prepared, length="short"):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MoondreamError as exc:
        raise SystemExit(f"Moondream error: {exc}") from None
