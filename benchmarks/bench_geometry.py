"""Benchmark: decode and rasterize a refined Moondream segment path on a 12 MP image.

Builds a wobbly closed outline of 2,000 points (1,500 ``C`` and 500 ``L`` commands) in
Moondream's compact bbox-relative format (``M.439,.996C.372,.988,...z``), with a bbox
covering about half of a 4000x3000 image, then times:

- parse:      ``parse_path``
- flatten:    ``segment_rings`` (parse + flatten curves to 0.25 px)
- rasterize:  ``rasterize`` of the rings into a full-size mode "1" mask
- decode+rasterize: both, as ``Segmentation.mask()`` does
- rle:        ``mask_to_rle`` + ``rle_to_string`` of the mask

and, for masks that arrive as images (SAM 3, AIgateway) and for tiling:

- binary_mask:   an RGBA 2000x1500 mask image -> a binary mask
- mask_to_rings: exact pixel-edge outlines of a 2000x1500 mask of drawn shapes
- merge_boxes:   6,000 boxes (a crowd of 3,000 seen by two tiles) merged by intersection

Run from the repo root::

    .venv/bin/python benchmarks/bench_geometry.py
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moondream_tools.testing.engine import format_refined_number  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from moondream_tools.geometry import (  # noqa: E402
    binary_mask,
    mask_to_rings,
    merge_boxes,
    mask_to_rle,
    parse_path,
    rasterize,
    rle_to_string,
    segment_rings,
)

WIDTH, HEIGHT = 4000, 3000
BBOX = (0.15, 0.1, 0.85, 0.9)  # ~56% of the image
POINTS = 2000
TARGET_MS = 50.0
RUNS = 20


def wobbly_path(points: int = POINTS) -> str:
    """A closed, star-ish outline normalized to [0, 1]: 3 of 4 points are C, 1 is L."""

    def at(theta: float) -> tuple[float, float]:
        r = 0.42 * (1 + 0.12 * math.sin(7 * theta) + 0.04 * math.sin(31 * theta))
        return 0.5 + r * math.cos(theta), 0.5 + r * math.sin(theta)

    step = 2 * math.pi / points
    x0, y0 = at(0.0)
    parts = [f"M{format_refined_number(x0)},{format_refined_number(y0)}"]
    for i in range(1, points + 1):
        x, y = at(i * step)
        if i % 4 == 0:
            parts.append(f"L{format_refined_number(x)},{format_refined_number(y)}")
        else:
            c1 = at((i - 2 / 3) * step)
            c2 = at((i - 1 / 3) * step)
            parts.append("C" + ",".join(format_refined_number(v) for v in (*c1, *c2, x, y)))
    return "".join(parts) + "z"


def drawn_mask(width: int = 2000, height: int = 1500) -> Image.Image:
    """Shapes with a hole, an island in it, a polygon, a border strip and 60 random ellipses."""
    rng = random.Random(3)
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    draw.ellipse((100, 100, 900, 800), fill=255)
    draw.ellipse((300, 300, 600, 600), fill=0)
    draw.ellipse((400, 400, 500, 500), fill=255)
    draw.polygon([(1000, 100), (1900, 300), (1200, 1400), (1500, 600)], fill=255)
    draw.regular_polygon((500, 1100, 300), 7, rotation=13, fill=255)
    draw.rectangle((0, 1400, 2000, 1500), fill=255)
    for _ in range(60):
        x, y = rng.randint(0, 1900), rng.randint(0, 1400)
        draw.ellipse((x, y, x + rng.randint(5, 300), y + rng.randint(5, 300)), fill=rng.choice([0, 255]))
    return mask


def crowd_boxes() -> tuple[list[tuple[float, float, float, float]], list[int]]:
    """3,000 boxes of 20-30 px, 40 px apart, and the same seen by a second tile, shifted 1 px."""
    rng = random.Random(1)
    boxes = []
    for i in range(3000):
        x, y, s = 40 * (i % 75) + rng.uniform(0, 5), 40 * (i // 75) + rng.uniform(0, 5), rng.uniform(20, 30)
        boxes.append((x, y, x + s, y + s))
    shifted = [(x0 + 1, y0 - 1, x1 + 1, y1 - 1) for x0, y0, x1, y1 in boxes]
    return boxes + shifted, [0] * 3000 + [1] * 3000


def timeit(fn: Callable[[], Any], runs: int = RUNS) -> tuple[float, float]:
    fn()  # warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times), statistics.median(times)


def main() -> None:
    path = wobbly_path()
    rings = segment_rings(path, BBOX, WIDTH, HEIGHT)
    mask = rasterize(rings, WIDTH, HEIGHT)
    area = mask.histogram()[255]
    try:
        import numpy  # noqa: F401

        rle_note = "numpy"
    except ImportError:
        rle_note = "pure Python"
    print(
        f"path: {len(path):,} chars, {POINTS:,} points; flattened to {sum(map(len, rings)):,} "
        f"points; mask {WIDTH}x{HEIGHT}, {area:,} px inside ({area / (WIDTH * HEIGHT):.0%})"
    )
    rows = [
        ("parse", lambda: parse_path(path)),
        ("parse+flatten", lambda: segment_rings(path, BBOX, WIDTH, HEIGHT)),
        ("rasterize", lambda: rasterize(rings, WIDTH, HEIGHT)),
        ("decode+rasterize", lambda: rasterize(segment_rings(path, BBOX, WIDTH, HEIGHT), WIDTH, HEIGHT)),
        (f"rle ({rle_note})", lambda: rle_to_string(mask_to_rle(mask)["counts"])),
    ]
    drawn = drawn_mask()
    rgba = Image.merge("RGBA", [drawn, drawn, drawn, Image.new("L", drawn.size, 255)])
    boxes, keys = crowd_boxes()
    masks_and_merges = [
        ("binary_mask 2000x1500", lambda: binary_mask(rgba)),
        ("mask_to_rings 2000x1500", lambda: mask_to_rings(drawn)),
        ("merge_boxes 6,000", lambda: merge_boxes(boxes, keys=keys)),
    ]
    print(f"{'step':<26}{'best ms':>10}{'median ms':>12}")
    results = {}
    for name, fn in rows:
        best, median = timeit(fn)
        results[name] = median
        print(f"{name:<26}{best:>10.1f}{median:>12.1f}")
    for name, fn in masks_and_merges:
        best, median = timeit(fn, runs=5)
        results[name] = median
        print(f"{name:<26}{best:>10.1f}{median:>12.1f}")
    median = results["decode+rasterize"]
    verdict = "OK" if median < TARGET_MS else "SLOW"
    print(
        f"decode+rasterize {POINTS:,}-point path on {WIDTH}x{HEIGHT}: median {median:.1f} ms "
        f"(target < {TARGET_MS:.0f} ms) {verdict}"
    )


if __name__ == "__main__":
    main()
