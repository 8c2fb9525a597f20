"""Benchmarks `tiling`: tiled detect and point against one request, on 24 MP photos.

recall: 5 scenes of 6000x4000 with 50 small shapes each (26-34 px; random, a third of them
  triangles), saved as camera-like JPEGs. On the same backend (``AsyncMoondream`` on the
  emulator), ``tiled_point`` / ``tiled_detect`` with ``tiling="auto"`` (15 tiles) against
  ``tiling="never"`` (the one request the untiled skills send): recall (a point on the shape,
  a box with IoU >= 0.5, each truth matched once), extra answers, and how many scenes were
  counted exactly.
wall time: ``tiled_detect`` on one scene against an emulator with 200 ms latency,
  ``max_concurrency=8``: the median of 5 runs against the ideal (tiles x latency /
  concurrency, plus one decode of the source, measured on its own), and how many times the
  source was decoded (``moondream_tools.tiling.decode_image`` wrapped with a counter).

Run from the repo root: ``.venv/bin/python benchmarks/bench_tiling.py``
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emulator_process, table  # noqa: E402
from moondream_tools import AsyncMoondream, ImageSettings  # noqa: E402
from moondream_tools.tiling import run as tiling_module  # noqa: E402  (where the decode is looked up)
from moondream_tools.testing import Scene  # noqa: E402
from moondream_tools.tiling import plan_tiles, tiled_detect, tiled_point  # noqa: E402

W, H = 6000, 4000
SCENES = 5
OBJECTS = 50
LATENCY = 0.2
CONCURRENCY = 8
RUNS = 5


def photo(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    scene.render().save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def score_points(points: list[tuple[float, float]], scene: Scene) -> tuple[int, int]:
    """(truths hit by exactly one point, points hitting no truth or a truth already hit)."""
    hits = [0] * len(scene.truth())
    extra = 0
    for x, y in points:
        owners = [
            i for i, t in enumerate(scene.truth())
            if t.bbox_px[0] - 1 <= x <= t.bbox_px[2] + 1 and t.bbox_px[1] - 1 <= y <= t.bbox_px[3] + 1
        ]
        if len(owners) == 1 and hits[owners[0]] == 0:
            hits[owners[0]] = 1
        else:
            extra += 1
    return sum(hits), extra


def score_boxes(boxes: list[tuple[float, float, float, float]], scene: Scene) -> tuple[int, int]:
    hits = [0] * len(scene.truth())
    extra = 0
    for box in boxes:
        best = max(range(len(hits)), key=lambda i: iou(box, scene.truth()[i].bbox_px), default=None)
        if best is not None and hits[best] == 0 and iou(box, scene.truth()[best].bbox_px) >= 0.5:
            hits[best] = 1
        else:
            extra += 1
    return sum(hits), extra


async def recall(md: AsyncMoondream, scenes: list[tuple[Scene, bytes]]) -> None:
    rows = []
    for skill in ("point", "detect"):
        for mode in ("auto", "never"):
            found = extra = exact = truths = requests = 0
            for scene, data in scenes:
                if skill == "point":
                    points = await tiled_point(md, data, "shapes", tiling=mode)
                    hit, wrong = score_points([(p.x, p.y) for p in points.to_pixels()], scene)
                    requests = len(points.tiles)
                else:
                    boxes = await tiled_detect(md, data, "shapes", tiling=mode)
                    pixels = [(b.x_min, b.y_min, b.x_max, b.y_max) for b in boxes.to_pixels()]
                    hit, wrong = score_boxes(pixels, scene)
                    requests = len(boxes.tiles)
                truths += len(scene.truth())
                found += hit
                extra += wrong
                exact += hit == len(scene.truth()) and wrong == 0
            label = f"tiled_{skill}(tiling={mode!r})" + ("" if mode == "auto" else ": one request")
            rows.append((label, requests, f"{found / truths:.1%}", extra, f"{exact}/{len(scenes)}"))
    table(
        f"recall: {len(scenes)} scenes of {W}x{H}, {OBJECTS} shapes of 26-34 px each, 'shapes'",
        ("path", "requests", "recall", "extra", "exact counts"),
        rows,
    )
    tiled = [r for r in rows if "one request" not in r[0]]
    single = [r for r in rows if "one request" in r[0]]
    recall.summary = (  # type: ignore[attr-defined]
        f"recall {', '.join(r[2] for r in tiled)} (point, detect) tiled vs"
        f" {', '.join(r[2] for r in single)} in one request;"
        f" exact counts {', '.join(r[4] for r in tiled)} vs {', '.join(r[4] for r in single)}"
    )


async def wall_time(md: AsyncMoondream, data: bytes) -> None:
    settings = ImageSettings()
    decodes = []
    for _ in range(3):
        start = time.perf_counter()
        tiling_module.decode_image(data, settings)
        decodes.append(time.perf_counter() - start)
    decode = statistics.median(decodes)

    calls: list[int] = []
    original = tiling_module.decode_image

    def counting(source: Any, image_settings: ImageSettings) -> Any:
        calls.append(1)
        return original(source, image_settings)

    tiling_module.decode_image = counting  # type: ignore[assignment]
    try:
        await tiled_detect(md, data, "shapes")  # warm the connections and the emulator's cache
        calls.clear()
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            result = await tiled_detect(md, data, "shapes")
            times.append(time.perf_counter() - start)
    finally:
        tiling_module.decode_image = original  # type: ignore[assignment]
    tiles = plan_tiles(W, H).requests
    assert len(result.tiles) == tiles
    wall = statistics.median(times)
    requests_ideal = tiles * LATENCY / CONCURRENCY
    ideal = requests_ideal + decode
    waves = math.ceil(tiles / CONCURRENCY) * LATENCY + decode
    table(
        f"wall time: tiled_detect on a {W}x{H} JPEG, {tiles} tiles, emulator latency"
        f" {LATENCY * 1000:.0f} ms, concurrency {CONCURRENCY}, {os.cpu_count()} CPUs; median of {RUNS}",
        ("part", "s", "vs ideal"),
        [
            (f"requests: {tiles} x {LATENCY:.1f} s / {CONCURRENCY}", f"{requests_ideal:.3f}", ""),
            ("one decode of the source (measured alone)", f"{decode:.3f}", ""),
            ("ideal", f"{ideal:.3f}", "1.00"),
            (f"  ideal in whole waves ({math.ceil(tiles / CONCURRENCY)} x {LATENCY:.1f} s + decode)",
             f"{waves:.3f}", f"{waves / ideal:.2f}"),
            ("tiled_detect", f"{wall:.3f}", f"{wall / ideal:.2f}"),
        ],
    )
    print(
        f"tiling: {recall.summary};"  # type: ignore[attr-defined]
        f" wall time {wall / ideal:.2f}x the ideal (target <= 1.3x), {wall / waves:.2f}x in whole waves;"
        f" source decoded {len(calls) / RUNS:.0f} time(s) per call (target 1)"
    )


async def main() -> None:
    scenes = []
    for seed in range(SCENES):
        scene = Scene.random(
            seed, width=W, height=H, count=OBJECTS, min_size=26, max_size=34, margin=12
        )
        assert len(scene.truth()) == OBJECTS
        scenes.append((scene, photo(scene)))
    with emulator_process(latency=LATENCY) as server:
        async with AsyncMoondream(
            api_key=server["api_key"], base_url=server["base_url"], max_concurrency=CONCURRENCY
        ) as md:
            await recall(md, scenes)
            await wall_time(md, scenes[0][1])


if __name__ == "__main__":
    asyncio.run(main())
