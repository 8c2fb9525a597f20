"""moondream_tools.geometry: SVG path decoding, rasterizing, polygons and COCO RLE.

Ground truth:

- the parser against hand-written paths with their exact commands;
- decoding against real tracer output: masks drawn with Pillow are traced with
  ``potracer`` (the pure-Python port of potrace; kestrel is not used), written in
  Moondream's compact bbox-relative format (``M.439,.996C...z``, 3 decimals) and decoded
  back with ``segment_rings`` + ``rasterize``; the result must match the drawn mask with
  IoU >= 0.98 at 640x480 and at 4000x3000 (shapes drawn at 4000x3000 and traced there:
  potracer takes ~0.1-0.8 s per shape at that size, so tracing is cached per module);
- RLE against pycocotools, with and without numpy.

potracer quirks (checked in ``test_potracer_conventions``): ``potrace.Bitmap(data)``
*inverts* its input (it traces dark pixels of an image), so a boolean mask is passed as
``~mask``; coordinates are ``(x, y)`` = (column, row), y down, on pixel corners, so the
pixel (i, j) is the square [i, i+1) x [j, j+1), the same convention as ours; a
``CornerSegment`` is two straight lines, through its corner ``c`` to ``end_point``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
from PIL import Image, ImageDraw

from moondream_tools.testing.engine import format_refined_number
from moondream_tools import geometry
from moondream_tools.errors import ResponseError
from moondream_tools.geometry import rle as geometry_rle
from moondream_tools.geometry import (
    flatten_path,
    mask_to_rle,
    nest_rings,
    parse_path,
    position_word,
    rasterize,
    ring_area,
    rle_from_string,
    rle_to_mask,
    rle_to_string,
    segment_rings,
)
from moondream_tools.geometry.paths import _parse

potrace = pytest.importorskip("potrace")
coco_mask = pytest.importorskip("pycocotools.mask")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def as_array(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.convert("L")) > 0


def flat(ring: list[tuple[float, float]]) -> list[float]:
    return [v for point in ring for v in point]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def to_moondream(mask: np.ndarray, *, alphamax: float = 1.0) -> tuple[str, tuple[float, float, float, float]]:
    """Trace ``mask`` with potracer into Moondream's compact path and normalized bbox."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    bw, bh = x1 - x0, y1 - y0

    def pt(p: object) -> str:
        return f"{format_refined_number((p.x - x0) / bw)},{format_refined_number((p.y - y0) / bh)}"  # type: ignore[attr-defined]

    parts = []
    for curve in potrace.Bitmap(~mask).trace(turdsize=0, alphamax=alphamax, opticurve=True):
        parts.append("M" + pt(curve.start_point))
        for seg in curve.segments:
            if seg.is_corner:
                parts.append(f"L{pt(seg.c)}L{pt(seg.end_point)}")
            else:
                parts.append(f"C{pt(seg.c1)},{pt(seg.c2)},{pt(seg.end_point)}")
        parts.append("z")
    return "".join(parts), (x0 / w, y0 / h, x1 / w, y1 / h)


def decode(path: str, bbox: tuple[float, float, float, float], w: int, h: int) -> np.ndarray:
    return as_array(rasterize(segment_rings(path, bbox, w, h), w, h))


# Shapes in a 640x480 design space, drawn at any size by scaling (k = width / 640).
Drawer = Callable[[ImageDraw.ImageDraw, float], None]


def _star(cx: float, cy: float, r1: float, r2: float, n: int = 5) -> list[tuple[float, float]]:
    return [
        (cx + (r1 if i % 2 == 0 else r2) * math.sin(math.pi * i / n), cy - (r1 if i % 2 == 0 else r2) * math.cos(math.pi * i / n))
        for i in range(2 * n)
    ]


def _scaled(points: list[tuple[float, float]], k: float) -> list[tuple[float, float]]:
    return [(x * k, y * k) for x, y in points]


SHAPES: dict[str, Drawer] = {
    "ellipse": lambda d, k: d.ellipse(_box(120, 90, 470, 380, k), fill=1),
    "star": lambda d, k: d.polygon(_scaled(_star(320, 250, 200, 80), k), fill=1),
    "l-shape": lambda d, k: d.polygon(
        _scaled([(100, 60), (220, 60), (220, 300), (480, 300), (480, 420), (100, 420)], k), fill=1
    ),
    "ring": lambda d, k: (d.ellipse(_box(150, 80, 490, 420, k), fill=1), d.ellipse(_box(250, 180, 390, 320, k), fill=0)),
    "two-holes": lambda d, k: (
        d.rectangle(_box(100, 80, 540, 400, k), fill=1),
        d.rectangle(_box(160, 140, 280, 340, k), fill=0),
        d.ellipse(_box(340, 160, 480, 300, k), fill=0),
    ),
    "islands": lambda d, k: (
        d.ellipse(_box(40, 40, 200, 180, k), fill=1),
        d.polygon(_scaled([(300, 60), (600, 120), (420, 300)], k), fill=1),
        d.rectangle(_box(100, 300, 260, 440, k), fill=1),
        # an island inside a hole
        d.ellipse(_box(360, 320, 600, 460, k), fill=1),
        d.ellipse(_box(420, 350, 540, 430, k), fill=0),
        d.ellipse(_box(460, 375, 500, 405, k), fill=1),
    ),
    "diagonal-bar": lambda d, k: d.line(_box(160, 120, 460, 400, k), fill=1, width=round(6 * k)),
    "thin-ring": lambda d, k: d.ellipse(_box(170, 90, 470, 390, k), outline=1, width=round(6 * k)),
    "border": lambda d, k: d.ellipse(_box(380, -150, 820, 260, k), fill=1),
    "full-frame": lambda d, k: d.rectangle(_box(0, 0, 640, 480, k), fill=1),
}


def _box(x0: float, y0: float, x1: float, y1: float, k: float) -> tuple[float, float, float, float]:
    return (x0 * k, y0 * k, x1 * k - 1, y1 * k - 1)


def draw(name: str, w: int, h: int) -> np.ndarray:
    img = Image.new("1", (w, h), 0)
    SHAPES[name](ImageDraw.Draw(img), w / 640)
    return as_array(img)


@cache
def traced(name: str, w: int, h: int, alphamax: float = 1.0) -> tuple[np.ndarray, str, tuple[float, float, float, float]]:
    mask = draw(name, w, h)
    path, bbox = to_moondream(mask, alphamax=alphamax)
    return mask, path, bbox


# ---------------------------------------------------------------------------
# parser: golden tests
# ---------------------------------------------------------------------------

M, L, C, Q, Z = "M", "L", "C", "Q", "Z"

GOLDEN: list[tuple[str, list[list[tuple[str, tuple[float, ...]]]]]] = [
    # absolute commands, explicit
    ("M1,2L3,4Z", [[(M, (1, 2)), (L, (3, 4)), (Z, ())]]),
    ("M 1 2 H 5 V 7 z", [[(M, (1, 2)), (L, (5, 2)), (L, (5, 7)), (Z, ())]]),
    ("M0,0C1,2,3,4,5,6", [[(M, (0, 0)), (C, (1, 2, 3, 4, 5, 6))]]),
    ("M0,0Q1,2,3,4", [[(M, (0, 0)), (Q, (1, 2, 3, 4))]]),
    # S reflects the previous C's second control point; without a C before, it is the current point
    ("M0,0C1,1,2,1,3,0S5,-1,6,0", [[(M, (0, 0)), (C, (1, 1, 2, 1, 3, 0)), (C, (4, -1, 5, -1, 6, 0))]]),
    ("M1,1S2,2,3,3", [[(M, (1, 1)), (C, (1, 1, 2, 2, 3, 3))]]),
    ("M0,0L1,1S2,2,3,3", [[(M, (0, 0)), (L, (1, 1)), (C, (1, 1, 2, 2, 3, 3))]]),
    # T reflects the previous Q/T control point; T after T chains the reflection
    ("M0,0Q1,1,2,0T4,0T6,0", [[(M, (0, 0)), (Q, (1, 1, 2, 0)), (Q, (3, -1, 4, 0)), (Q, (5, 1, 6, 0))]]),
    ("M1,1T3,3", [[(M, (1, 1)), (Q, (1, 1, 3, 3))]]),
    ("M0,0C1,1,2,1,3,0T5,0", [[(M, (0, 0)), (C, (1, 1, 2, 1, 3, 0)), (Q, (3, 0, 5, 0))]]),
    # relative commands
    ("m1,2l3,4h1v-2z", [[(M, (1, 2)), (L, (4, 6)), (L, (5, 6)), (L, (5, 4)), (Z, ())]]),
    ("M1,1c1,1,2,1,3,0s2,-1,3,0", [[(M, (1, 1)), (C, (2, 2, 3, 2, 4, 1)), (C, (5, 0, 6, 0, 7, 1))]]),
    ("M1,1q1,1,2,0t2,0", [[(M, (1, 1)), (Q, (2, 2, 3, 1)), (Q, (4, 0, 5, 1))]]),
    # implicit repeats: after M they are L (after m, relative l); others repeat themselves
    ("M0,0 1,0 1,1", [[(M, (0, 0)), (L, (1, 0)), (L, (1, 1))]]),
    ("m1,1 1,0 0,1", [[(M, (1, 1)), (L, (2, 1)), (L, (2, 2))]]),
    ("M0,0L1,0,1,1,0,1", [[(M, (0, 0)), (L, (1, 0)), (L, (1, 1)), (L, (0, 1))]]),
    ("M0,0H1 2 3V4 5", [[(M, (0, 0)), (L, (1, 0)), (L, (2, 0)), (L, (3, 0)), (L, (3, 4)), (L, (3, 5))]]),
    ("M0,0C1,1,2,2,3,3,4,4,5,5,6,6", [[(M, (0, 0)), (C, (1, 1, 2, 2, 3, 3)), (C, (4, 4, 5, 5, 6, 6))]]),
    # number forms
    ("M.5,-.5", [[(M, (0.5, -0.5))]]),
    ("M1e-3,1E+2", [[(M, (0.001, 100.0))]]),
    ("M-0.049,5.", [[(M, (-0.049, 5.0))]]),
    ("M+1,2.5e1", [[(M, (1.0, 25.0))]]),
    # separators: commas, whitespace (any kind), both, or none
    ("M.1.2", [[(M, (0.1, 0.2))]]),
    ("M1-2", [[(M, (1, -2))]]),
    ("M1..2.3,4", [[(M, (1, 0.2)), (L, (0.3, 4))]]),  # SVG: "1." then ".2" then ".3"
    ("M1e2-3", [[(M, (100, -3))]]),
    ("\t M 1 , 2\nL\r3\f4 ", [[(M, (1, 2)), (L, (3, 4))]]),
    ("M1 ,2", [[(M, (1, 2))]]),
    # several subpaths; a drawing command after Z starts at the closed subpath's start
    ("M0,0L1,0L1,1zM5,5L6,5L6,6Z", [[(M, (0, 0)), (L, (1, 0)), (L, (1, 1)), (Z, ())], [(M, (5, 5)), (L, (6, 5)), (L, (6, 6)), (Z, ())]]),
    ("M1,1L2,1Zl0,1", [[(M, (1, 1)), (L, (2, 1)), (Z, ())], [(M, (1, 1)), (L, (1, 2))]]),
    ("M1,1L2,1zm1,1l1,0", [[(M, (1, 1)), (L, (2, 1)), (Z, ())], [(M, (2, 2)), (L, (3, 2))]]),
    ("M0,0L1,0ZZ", [[(M, (0, 0)), (L, (1, 0)), (Z, ())]]),
    # Moondream's two styles: the compact refined path and the spaced coarse stream
    (
        "M.439,.996C.372,.988,.3,.9,.25,.8L.1,.5z",
        [[(M, (0.439, 0.996)), (C, (0.372, 0.988, 0.3, 0.9, 0.25, 0.8)), (L, (0.1, 0.5)), (Z, ())]],
    ),
    (
        "M 0.123 0.456 L 0.2 0.5 L 0.1 0.6 Z",
        [[(M, (0.123, 0.456)), (L, (0.2, 0.5)), (L, (0.1, 0.6)), (Z, ())]],
    ),
    # empty
    ("", []),
    ("  \n\t", []),
]


@pytest.mark.parametrize(("d", "expected"), GOLDEN, ids=[g[0][:40] for g in GOLDEN])
def test_parse_golden(d: str, expected: list[list[tuple[str, tuple[float, ...]]]]) -> None:
    got = parse_path(d)
    assert [[cmd for cmd, _ in sub] for sub in got] == [[cmd for cmd, _ in sub] for sub in expected]
    for sub_got, sub_expected in zip(got, expected):
        for (_, args_got), (_, args_expected) in zip(sub_got, sub_expected):
            assert args_got == pytest.approx(args_expected, abs=1e-12)
            assert all(type(v) is float for v in args_got)


MALFORMED = [
    ("M.1", 3, "expected a number after 'M', got end of path"),
    ("M1,2L", 5, "expected a number after 'L', got end of path"),
    ("M1,2LZ", 5, "expected a number after 'L', got 'Z'"),
    ("X1,2", 0, "unknown command 'X'"),
    ("M1,2C1,2,3", 10, "expected a number after 'C', got end of path"),
    ("M1..2.3", 7, "expected a number after 'M', got end of path"),  # three numbers: an odd pair
    ("M1,2A1,1,0,0,1,3,4", 4, "arcs"),
    ("M1,2a1,1,0,0,1,3,4", 4, "arcs"),
    ("M,1,2", 1, "expected a number after 'M', got ','"),
    ("M1,,2", 3, "expected a number after ',', got ','"),
    ("M1,2,", 5, "expected a number after ',', got end of path"),
    ("M1,2Cx", 5, "unknown command 'x'"),
    ("M1,2C1,2,3,4,5,6,7,8", 20, "expected a number after 'C', got end of path"),
    ("M1e,2", 2, "expected a number after 'M', got 'e'"),
    ("M1,2#", 4, "expected a number after 'M', got '#'"),
    ("M1,2L3,4Z5", 9, "'Z' takes no numbers"),
    ("1,2", 0, "expected a command letter, got '1'"),
    ("L1,2", 0, "a path must start with 'M'"),
    ("M1,2L3,1e999", 7, "out of range"),
    ("M1,2L3,4L5-", 10, "expected a number after 'L', got '-'"),
]


@pytest.mark.parametrize(("d", "pos", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_parse_malformed(d: str, pos: int, message: str) -> None:
    with pytest.raises(ResponseError) as info:
        parse_path(d)
    text = str(info.value)
    assert f"malformed SVG path at position {pos}: " in text
    assert message in text
    # flatten_path and segment_rings report the same error
    with pytest.raises(ResponseError, match="position"):
        segment_rings(d, (0, 0, 1, 1), 10, 10)


def test_error_position_after_a_long_valid_prefix() -> None:
    good = "M.1,.1" + "L.2,.3" * 500
    with pytest.raises(ResponseError, match=f"at position {len(good)}: unknown command 'x'"):
        parse_path(good + "x.1,.2")


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        # cut mid-number: the complete commands survive, the cut one is dropped
        ("M 0.1 0.1 L 0.5 0.1 L 0.5 0.5 L 0.1 0.", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M 0.1 0.1 L 0.5 0.1 L 0.5 0.", []),  # only 2 points complete: no ring yet
        # a number at the very end may still grow ("0.5" of "0.55"): dropped too
        ("M 0.1 0.1 L 0.5 0.1 L 0.5 0.5 L 0.1 0.5", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        # cut right after a separator, a command letter, an exponent, a sign
        ("M 0.1 0.1 L 0.5 0.1 L 0.5 0.5 ", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M.1,.1L.5,.1L.5,.5,", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M.1,.1L.5,.1L.5,.5L", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M.1,.1L.5,.1L.5,.5L1e", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M.1,.1L.5,.1L.5,.5L1e-", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M.1,.1L.5,.1L.5,.5C.1,.2,-", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        # a complete path is decoded whole, then the next subpath's complete part
        ("M.1,.1L.5,.1L.5,.5z", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]),
        ("M.1,.1L.5,.1L.5,.5zM.6,.6L.9,.6L.9,.9L.6,.9", [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)], [(0.6, 0.6), (0.9, 0.6), (0.9, 0.9)]]),
        # nothing complete yet
        ("M 0.1", []),
        ("M", []),
        ("", []),
    ],
)
def test_partial_streams(d: str, expected: list[list[tuple[float, float]]]) -> None:
    got = flatten_path(d, partial=True)
    assert len(got) == len(expected)
    for ring_got, ring_expected in zip(got, expected):
        assert flat(ring_got) == pytest.approx(flat(ring_expected))


def test_partial_keeps_incomplete_commands_out_of_parse() -> None:
    # flatten drops 2-point rings, so check the commands themselves
    assert _parse("M 0.1 0.1 L 0.5 0.1 L 0.5 0.", True) == [[(M, (0.1, 0.1)), (L, (0.5, 0.1))]]
    assert _parse("M1,2L3,4C1,2,3", True) == [[(M, (1.0, 2.0)), (L, (3.0, 4.0))]]


def test_partial_still_raises_on_earlier_errors() -> None:
    with pytest.raises(ResponseError, match="position 12: unknown command 'X'"):
        flatten_path("M.1,.1L.5,.1X.5,.5L.1,.", partial=True)
    with pytest.raises(ResponseError, match="position 7: expected a number after 'L', got '.'"):
        flatten_path("M.1,.1L.,.1L.5,.5L.1,.", partial=True)
    with pytest.raises(ResponseError, match="position 7: expected a number after 'L', got 'L'"):
        flatten_path("M.1,.1LL.5,.5L.1,.", partial=True)
    with pytest.raises(ResponseError, match="arcs"):
        flatten_path("M.1,.1A.5,.5,0,0,1,.1,.", partial=True)


def test_parse_is_fast() -> None:
    import time

    d = "M.5,.5" + "".join(f"C{i % 97 / 100:.3f},.1,.2,.3,.4,{i % 89 / 100:.3f}" for i in range(2000)) + "z"
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        parse_path(d)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05  # typically ~5 ms; generous for slow CI machines


# ---------------------------------------------------------------------------
# flattening
# ---------------------------------------------------------------------------


CIRCLE = (
    "M1,.5C1,.776,.776,1,.5,1C.224,1,0,.776,0,.5C0,.224,.224,0,.5,0C.776,0,1,.224,1,.5z"
)


def test_flatten_maps_scale_and_offset() -> None:
    rings = flatten_path("M0,0L1,0L1,2Z", scale=(10, -3), offset=(5, 7))
    assert rings == [[(5.0, 7.0), (15.0, 7.0), (15.0, 1.0)]]


def test_flatten_drops_degenerate_subpaths_and_closing_point() -> None:
    rings = flatten_path("M0,0L1,0L0,0ZM0,0L1,0L1,1L0,0ZM2,2Z")
    assert rings == [[(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]]


def test_big_circle_gets_more_points_than_small_circle() -> None:
    small = flatten_path(CIRCLE, scale=(20, 20))
    big = flatten_path(CIRCLE, scale=(2000, 2000))
    assert len(small[0]) < len(big[0])
    # and both stay circles: every vertex within the Bezier approximation error of the radius
    for ring, r in ((small[0], 10), (big[0], 1000)):
        for x, y in ring:
            assert math.hypot(x - r, y - r) == pytest.approx(r, rel=1e-3)


@pytest.mark.parametrize("tolerance", [0.05, 0.25, 1.0])
@pytest.mark.parametrize("scale", [5.0, 300.0, 4000.0])
def test_flattened_cubic_within_tolerance(tolerance: float, scale: float) -> None:
    p = [(0.0, 0.0), (0.1, 1.0), (1.0, -0.6), (0.8, 0.7)]
    d = "M0,0C" + ",".join(f"{x},{y}" for x, y in p[1:]) + "L0,0.7"
    ring = flatten_path(d, scale=(scale, scale), tolerance=tolerance)[0]
    pts = np.array(p) * scale
    t = np.linspace(0, 1, 20001)[:, None]
    curve = (1 - t) ** 3 * pts[0] + 3 * (1 - t) ** 2 * t * pts[1] + 3 * (1 - t) * t**2 * pts[2] + t**3 * pts[3]
    poly = np.array(ring[: ring.index((pts[3][0], pts[3][1])) + 1])
    # every point of the polyline (vertices and densely sampled chords) is near the curve ...
    chords = np.concatenate([poly[i] + np.linspace(0, 1, 50)[:, None] * (poly[i + 1] - poly[i]) for i in range(len(poly) - 1)])
    step = np.max(np.hypot(*np.diff(curve, axis=0).T))  # curve sampling resolution
    for q in chords[::7]:
        assert np.min(np.hypot(*(curve - q).T)) <= tolerance + step
    # ... and every point of the curve is near the polyline
    for q in curve[::97]:
        a, b = poly[:-1], poly[1:]
        ab = b - a
        s = np.clip(np.einsum("ij,ij->i", q - a, ab) / np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300), 0, 1)
        assert np.min(np.hypot(*(a + s[:, None] * ab - q).T)) <= tolerance + 1e-9


def test_flattened_quadratic_within_tolerance() -> None:
    ring = flatten_path("M0,0Q500,1000,1000,0Z", tolerance=0.25)[0]
    for x, y in ring[1:-1]:  # chord vertices lie on the curve y = 2x(1 - x/1000) * 1000/1000
        t = x / 1000
        assert y == pytest.approx(2 * t * (1 - t) * 1000)
    n_chords = len(ring) - 1
    # chord sagitta: |B''| / (8 n^2) with |B''| = 2 * |P0 - 2 P1 + P2| = 4000
    assert 4000 / (8 * n_chords**2) <= 0.25


def test_tolerance_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        flatten_path(CIRCLE, tolerance=0)


# ---------------------------------------------------------------------------
# segment_rings
# ---------------------------------------------------------------------------


def test_segment_rings_bbox_relative_pixel_corners() -> None:
    rings = segment_rings("M0,0L1,0L1,1L0,1z", (0, 0, 1, 1), 640, 480)
    assert rings == [[(0.0, 0.0), (640.0, 0.0), (640.0, 480.0), (0.0, 480.0)]]
    assert ring_area(rings[0]) == 640 * 480
    rings = segment_rings("M.5,-.1L1.1,.5L.5,1z", (0.25, 0.5, 0.75, 1.0), 400, 200)
    assert flat(rings[0]) == pytest.approx(flat([(200.0, 90.0), (320.0, 150.0), (200.0, 200.0)]))
    with pytest.raises(ValueError):
        segment_rings("M0,0L1,0L1,1z", (0, 0, 1, 1), 0, 10)


def test_segment_rings_partial() -> None:
    rings = segment_rings("M 0 0 L 1 0 L 1 1 L 0 1 L 0.", (0, 0, 0.5, 0.5), 100, 100, partial=True)
    assert rings == [[(0.0, 0.0), (50.0, 0.0), (50.0, 50.0), (0.0, 50.0)]]


# ---------------------------------------------------------------------------
# rasterize
# ---------------------------------------------------------------------------


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


@pytest.mark.parametrize("mode", ["1", "L"])
def test_rasterize_square_exact_pixels(mode: str) -> None:
    mask = rasterize([square(0, 0, 10, 10)], 20, 15, mode=mode)
    assert mask.mode == mode and mask.size == (20, 15)
    arr = np.asarray(mask.convert("L"))
    expected = np.zeros((15, 20), np.uint8)
    expected[0:10, 0:10] = 255
    assert np.array_equal(arr, expected)
    if mode == "L":
        assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}


def test_rasterize_pixel_center_rule() -> None:
    # (2.4, 3.6)-(7.5, 8.5): centers x+0.5 in [2.4, 7.5) -> columns 2..6; y+0.5 in [3.6, 8.5) -> rows 4..7
    arr = as_array(rasterize([square(2.4, 3.6, 7.5, 8.5)], 12, 12))
    expected = np.zeros((12, 12), bool)
    expected[4:8, 2:7] = True
    assert np.array_equal(arr, expected)
    # abutting squares share no pixel and leave no gap; orientation does not matter
    left = as_array(rasterize([square(0, 0, 5.3, 4)], 12, 12))
    right = as_array(rasterize([square(5.3, 0, 12, 4)[::-1]], 12, 12))
    assert not (left & right).any() and (left | right)[:4].all()
    # a triangle: pixel centers strictly above the diagonal x = y are inside, on it too (left edge)
    tri = as_array(rasterize([[(0, 0), (8, 0), (8, 8)]], 8, 8))
    jj, ii = np.mgrid[0:8, 0:8]
    assert np.array_equal(tri, ii >= jj)


def test_rasterize_even_odd_holes_and_overlaps() -> None:
    # a hole
    arr = as_array(rasterize([square(0, 0, 10, 10), square(3, 3, 7, 7)], 10, 10))
    assert arr.sum() == 100 - 16 and not arr[3:7, 3:7].any() and arr[0].all()
    # overlapping islands: the overlap has parity 2, so it is outside
    arr = as_array(rasterize([square(0, 0, 6, 6), square(4, 4, 10, 10)], 10, 10))
    assert arr.sum() == 36 + 36 - 2 * 4 and not arr[4:6, 4:6].any()
    # an island inside a hole inside an outer ring
    arr = as_array(rasterize([square(0, 0, 10, 10), square(2, 2, 8, 8), square(4, 4, 6, 6)], 10, 10))
    assert arr.sum() == 100 - 36 + 4 and arr[4:6, 4:6].all()


def test_rasterize_clips_to_the_image_and_handles_empty_input() -> None:
    arr = as_array(rasterize([square(-5, -5, 3, 4), square(8, 8, 50, 50)], 10, 10))
    assert arr.sum() == 12 + 4 and arr[:4, :3].all() and arr[8:, 8:].all()
    assert as_array(rasterize([], 5, 5)).sum() == 0
    assert as_array(rasterize([square(20, 20, 30, 30)], 5, 5)).sum() == 0
    assert as_array(rasterize([[(1, 1), (3, 3)]], 5, 5)).sum() == 0
    with pytest.raises(ValueError):
        rasterize([], 5, 5, mode="RGB")


def test_rasterize_area_matches_shoelace_for_random_polygons() -> None:
    rng = random.Random(7)
    for _ in range(5):
        cx, cy = rng.uniform(200, 300), rng.uniform(150, 250)
        ring = []
        for i in range(40):
            a = 2 * math.pi * i / 40
            r = rng.uniform(60, 140)
            ring.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        area = as_array(rasterize([ring], 500, 400)).sum()
        assert area == pytest.approx(abs(ring_area(ring)), rel=0.01)


def test_rasterize_matches_pillow_on_integer_polygons() -> None:
    # For a polygon with integer vertices on pixel corners, Pillow's filled polygon drawn
    # with vertices shifted by -0.5 (Pillow's pixel centers are integers) and without the
    # outline's extra pixels is the pixel-center rule: compare on an axis-aligned staircase.
    ring = [(2, 2), (20, 2), (20, 9), (13, 9), (13, 16), (6, 16), (6, 25), (2, 25)]
    ours = as_array(rasterize([ring], 30, 30))
    expected = np.zeros((30, 30), bool)
    expected[2:9, 2:20] = expected[9:16, 2:13] = expected[16:25, 2:6] = True
    assert np.array_equal(ours, expected)
    assert ours.sum() == ring_area(ring)


# ---------------------------------------------------------------------------
# round trips through potracer
# ---------------------------------------------------------------------------


def test_potracer_conventions() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    curves = list(potrace.Bitmap(~mask).trace(turdsize=0, alphamax=0.0, opticurve=False))
    assert len(curves) == 1
    corners = {(seg.c.x, seg.c.y) for seg in curves[0].segments}
    assert corners == {(3, 2), (9, 2), (9, 5), (3, 5)}  # (x, y) on pixel corners
    # without the inversion potracer traces the background (plus the frame)
    assert len(list(potrace.Bitmap(mask).trace(turdsize=0))) == 2
    path, bbox = to_moondream(mask, alphamax=0.0)
    assert bbox == (3 / 12, 2 / 10, 9 / 12, 5 / 10)
    assert np.array_equal(decode(path, bbox, 12, 10), mask)


def reference_raster(rings: list[list[tuple[float, float]]], w: int, h: int) -> np.ndarray:
    """An independent even-odd, pixel-center rasterizer (numpy crossing parity per edge)."""
    inside = np.zeros((h, w), bool)
    centers = np.arange(w) + 0.5
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]):
            if y0 == y1:
                continue
            if y0 > y1:
                x0, y0, x1, y1 = x1, y1, x0, y0
            rows = np.arange(max(0, math.ceil(y0 - 0.5)), min(h, math.ceil(y1 - 0.5)))
            if rows.size:
                xc = x0 + (rows + 0.5 - y0) * ((x1 - x0) / (y1 - y0))
                inside[rows] ^= centers[None, :] >= xc[:, None]
    return inside


# (alphamax, minimum IoU) per shape at 640x480; default (1.0, 0.98).
ROUND_TRIP_640: dict[str, tuple[float, float]] = {
    # A 6 px bar: potrace's curve fitting rounds its 6 px ends and wobbles along the
    # staircase (IoU 0.952 at alphamax=1, even with exact coordinates 0.957). With
    # alphamax=0 (potrace's polygon, still a real potrace output) it reaches 0.986.
    "diagonal-bar": (0.0, 0.98),
    # A 6 px ring cannot reach 0.98 with potrace at all: every traced outline (curves or
    # polygon) departs from the pixel staircase by ~0.25-0.3 px on average, and a 6 px
    # ring has ~1/3 px of boundary per pixel of area, so ~8-10 % of its pixels flip
    # (measured: 0.892 at alphamax=1, 0.955 at alphamax=0, same with 6 decimals). The
    # decoder itself is exact (test below against an independent rasterizer); the ring
    # is checked at 0.98 at 4000x3000, where it is 37 px wide.
    "thin-ring": (0.0, 0.94),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_640x480(name: str) -> None:
    alphamax, min_iou = ROUND_TRIP_640.get(name, (1.0, 0.98))
    mask, path, bbox = traced(name, 640, 480, alphamax)
    assert mask.sum() > 100
    assert path.startswith("M") and path.endswith("z")
    if name not in ("l-shape", "full-frame") and alphamax > 0:
        assert "C" in path
    decoded = decode(path, bbox, 640, 480)
    assert iou(decoded, mask) >= min_iou
    # the decoder adds no error of its own: same pixels as an independent rasterizer
    assert np.array_equal(decoded, reference_raster(segment_rings(path, bbox, 640, 480), 640, 480))


# Decoded at 4000x3000 and compared with the shape drawn at 4000x3000. potracer is pure
# Python and slow on long diagonal staircases (star 2.3 s, islands 3.6 s, bar 7.3 s at
# 12 MP), so those are traced at 1600x1200 (the path is resolution independent: it is
# normalized to its bbox); the others are traced at 4000x3000 (0.2-0.9 s each), and the
# full-frame rectangle at 640x480.
LARGE: dict[str, tuple[int, int]] = {
    "ellipse": (4000, 3000),
    "l-shape": (4000, 3000),
    "ring": (4000, 3000),
    "two-holes": (4000, 3000),
    "thin-ring": (4000, 3000),
    "border": (4000, 3000),
    "full-frame": (640, 480),
    "star": (1600, 1200),
    "islands": (1600, 1200),
    # 0.981 here: Moondream's 3 decimals on a ~1900 px bbox quantize the 37 px bar's edges
    # by up to ~1 px (0.9985 with 6 decimals); a trace at 4000x3000 would take 7 s.
    "diagonal-bar": (1600, 1200),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_round_trip_4000x3000(name: str) -> None:
    _, path, bbox = traced(name, *LARGE[name])
    assert iou(decode(path, bbox, 4000, 3000), draw(name, 4000, 3000)) >= 0.98


def test_round_trip_same_path_scales_with_the_image() -> None:
    # One path, decoded at two sizes: the large mask is the small one scaled (same fraction)
    mask, path, bbox = traced("ring", 640, 480)
    small = decode(path, bbox, 640, 480)
    large = decode(path, bbox, 4000, 3000)
    assert large.sum() / large.size == pytest.approx(small.sum() / small.size, rel=0.01)
    assert iou(large, np.asarray(Image.fromarray(mask).resize((4000, 3000), Image.Resampling.NEAREST))) >= 0.97


def test_round_trip_tiny_shape() -> None:
    # An 8x8 px disc. With potrace's default smoothing (alphamax=1) its few corners become
    # round curves that cut the corner pixels (IoU ~0.9): a smooth outline and an 8-pixel
    # staircase cannot agree to 2%. alphamax=0 keeps the polygon, which is exact here.
    mask = np.zeros((480, 640), bool)
    img = Image.new("1", (640, 480))
    ImageDraw.Draw(img).ellipse((300, 200, 307, 207), fill=1)
    mask = as_array(img)
    assert 40 <= mask.sum() <= 64
    path, bbox = to_moondream(mask, alphamax=0.0)
    assert iou(decode(path, bbox, 640, 480), mask) >= 0.98
    smooth_path, smooth_bbox = to_moondream(mask)
    assert iou(decode(smooth_path, smooth_bbox, 640, 480), mask) >= 0.75


def test_round_trip_rings_nest_like_the_drawing() -> None:
    _, path, bbox = traced("islands", 640, 480)
    polygons = nest_rings(segment_rings(path, bbox, 640, 480))
    # ellipse, triangle, rectangle, the outer ellipse with its hole, the island in the hole
    assert sorted(len(holes) for _, holes in polygons) == [0, 0, 0, 0, 1]
    _, path, bbox = traced("two-holes", 640, 480)
    polygons = nest_rings(segment_rings(path, bbox, 640, 480))
    assert [len(holes) for _, holes in polygons] == [2]


# ---------------------------------------------------------------------------
# ring_area and nest_rings
# ---------------------------------------------------------------------------


def test_ring_area_sign() -> None:
    assert ring_area(square(0, 0, 4, 3)) == 12.0  # right, down, left, up: clockwise on screen
    assert ring_area(square(0, 0, 4, 3)[::-1]) == -12.0
    assert ring_area([(0, 0), (1, 1)]) == 0.0


def test_nest_rings_depths() -> None:
    outer = square(0, 0, 100, 100)
    hole = square(10, 10, 90, 90)
    island = square(20, 20, 50, 50)
    island_hole = square(30, 30, 40, 40)
    other_hole = square(60, 60, 80, 80)
    separate = square(200, 0, 220, 20)
    got = nest_rings([island_hole, separate, outer, island, hole, other_hole])
    # other_hole is inside hole (depth 2): an island of its own
    assert got == [(separate, []), (outer, [hole]), (island, [island_hole]), (other_hole, [])]


def test_nest_rings_touching_rings_and_degenerate_input() -> None:
    outer = square(0, 0, 10, 10)
    hole = [(0, 0), (5, 5), (0, 10)]  # touches the outer ring at two vertices and along nothing else
    assert nest_rings([hole, outer]) == [(outer, [hole])]
    assert nest_rings([]) == []
    assert nest_rings([[(0, 0), (1, 1)]]) == []


# ---------------------------------------------------------------------------
# RLE
# ---------------------------------------------------------------------------


def _coco(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


def _rle_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    masks = [
        rng.random((37, 53)) < 0.5,
        rng.random((20, 31)) < 0.05,
        np.ones((9, 7), bool),
        np.zeros((9, 7), bool),
        draw("ring", 640, 480),
        draw("islands", 320, 240),
    ]
    first_on = np.zeros((5, 6), bool)
    first_on[0, 0] = True
    big_runs = np.zeros((300, 400), bool)
    big_runs[:, 100:] = True  # long runs need multi-character counts with deltas
    return [*masks, first_on, big_runs]


@pytest.fixture(params=["numpy", "pure-python"])
def numpy_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pure-python":
        monkeypatch.setattr(geometry_rle, "_numpy", lambda: None)
    return str(request.param)


# pycocotools' decode trips numpy 2's __array__(copy=...) DeprecationWarning (its problem, not ours)
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("mode", ["1", "L"])
def test_mask_to_rle_matches_pycocotools(numpy_mode: str, mode: str) -> None:
    for mask in _rle_masks():
        h, w = mask.shape
        img = Image.fromarray(mask).convert(mode) if mode == "1" else Image.fromarray(mask.astype(np.uint8) * 7)
        rle = mask_to_rle(img)
        expected = _coco(mask)
        assert rle["size"] == [h, w] == list(expected["size"])
        assert rle_to_string(rle["counts"]) == expected["counts"].decode("ascii")
        # the uncompressed counts decode to the mask in pycocotools, and back from its string
        frs = coco_mask.frPyObjects(rle, h, w)
        assert np.array_equal(coco_mask.decode(frs).astype(bool), mask)
        assert rle_from_string(expected["counts"]) == rle["counts"]
        assert all(type(c) is int for c in rle["counts"])
        assert sum(rle["counts"]) == h * w


def test_mask_to_rle_both_paths_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    masks = [Image.fromarray(m) for m in _rle_masks()]
    with_numpy = [mask_to_rle(m) for m in masks]
    monkeypatch.setattr(geometry_rle, "_numpy", lambda: None)
    assert [mask_to_rle(m) for m in masks] == with_numpy


def test_mask_to_rle_small_example_and_bad_mode() -> None:
    mask = Image.new("1", (3, 2))
    mask.putpixel((1, 0), 1)
    assert mask_to_rle(mask) == {"size": [2, 3], "counts": [2, 1, 3]}
    full = Image.new("L", (2, 2), 9)
    assert mask_to_rle(full) == {"size": [2, 2], "counts": [0, 4]}
    with pytest.raises(ValueError, match="mode"):
        mask_to_rle(Image.new("RGB", (2, 2)))


def test_rle_string_round_trip_random_counts() -> None:
    rng = random.Random(11)
    for _ in range(200):
        counts = [rng.choice([0, 1, 15, 16, 17, 31, 32, 1000, 70000, rng.randrange(1 << 24)]) for _ in range(rng.randrange(1, 12))]
        s = rle_to_string(counts)
        assert rle_from_string(s) == counts
        assert rle_from_string(s.encode("ascii")) == counts
    assert rle_to_string([]) == "" and rle_from_string("") == []


def test_rle_to_string_matches_pycocotools_for_awkward_deltas() -> None:
    # counts whose deltas against counts[i-2] are negative, zero and large
    for counts in ([5, 100000, 3, 2, 900000, 1], [0, 1, 0, 1, 0, 1], [12, 12, 12, 12]):
        h, w = 1, sum(counts)
        rle = {"size": [h, w], "counts": counts}
        expected = coco_mask.frPyObjects(rle, h, w)["counts"].decode("ascii")
        assert rle_to_string(counts) == expected


def test_rle_from_string_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="position"):
        rle_from_string("12 3")
    with pytest.raises(ValueError, match="truncated"):
        rle_from_string("1o")  # "o" = 48 + 0x3F has the "more" bit and nothing follows


def test_rle_to_mask_inverts(numpy_mode: str) -> None:
    for mask in _rle_masks():
        rle = mask_to_rle(Image.fromarray(mask))
        for form in (rle, {"size": rle["size"], "counts": rle_to_string(rle["counts"])}, _coco(mask)):
            img = rle_to_mask(form)
            assert img.mode == "1" and img.size == (mask.shape[1], mask.shape[0])
            assert np.array_equal(as_array(img), mask)
    with pytest.raises(ValueError, match="sum"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_rle_of_a_decoded_segment_matches_pycocotools() -> None:
    mask, path, bbox = traced("two-holes", 640, 480)
    decoded = rasterize(segment_rings(path, bbox, 640, 480), 640, 480)
    rle = mask_to_rle(decoded)
    assert rle_to_string(rle["counts"]) == _coco(as_array(decoded))["counts"].decode("ascii")
    assert coco_mask.area(_coco(as_array(decoded))) == as_array(decoded).sum()


# ---------------------------------------------------------------------------
# position_word
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "word"),
    [
        (0.1, 0.1, "top-left"),
        (0.5, 0.1, "top"),
        (0.9, 0.1, "top-right"),
        (0.1, 0.5, "left"),
        (0.5, 0.5, "center"),
        (0.9, 0.5, "right"),
        (0.1, 0.9, "bottom-left"),
        (0.5, 0.9, "bottom"),
        (0.9, 0.9, "bottom-right"),
        # the dividing lines belong to the middle band
        (1 / 3, 1 / 3, "center"),
        (2 / 3, 2 / 3, "center"),
        (0.3333, 0.5, "left"),
        (0.6667, 0.5, "right"),
        (0.5, 0.3333, "top"),
        (0.5, 0.6667, "bottom"),
        # edges and slightly outside
        (0.0, 0.0, "top-left"),
        (1.0, 1.0, "bottom-right"),
        (-0.1, 1.2, "bottom-left"),
    ],
)
def test_position_word(x: float, y: float, word: str) -> None:
    assert position_word(x, y) == word


def test_new_public_names_are_exported() -> None:
    for name in (
        "Ring",
        "position_word",
        "parse_path",
        "flatten_path",
        "segment_rings",
        "rasterize",
        "ring_area",
        "nest_rings",
        "mask_to_rle",
        "rle_to_string",
        "rle_from_string",
        "rle_to_mask",
    ):
        assert name in geometry.__all__
        assert getattr(geometry, name) is not None


def test_all_is_exactly_the_public_api() -> None:
    expected = {
        "reading_order",
        "points_reading_order",
        "clamp_unit",
        "box_to_pixels",
        "point_to_pixels",
        "pixels_to_box",
        "pixels_to_point",
        "position_word",
        "Command",
        "Ring",
        "parse_path",
        "flatten_path",
        "segment_rings",
        "rasterize",
        "ring_area",
        "nest_rings",
        "mask_to_rle",
        "rle_to_string",
        "rle_from_string",
        "rle_to_mask",
        "binary_mask",
        "mask_union",
        "mask_area",
        "mask_bbox",
        "mask_to_rings",
        "scale_rings",
        "rings_to_path",
        "tile_box_to_pixels",
        "tile_point_to_pixels",
        "intersection_over_smaller",
        "union_box",
        "merge_boxes",
        "merge_points",
    }
    assert set(geometry.__all__) == expected
    assert len(geometry.__all__) == len(expected)  # no duplicates
    namespace: dict[str, object] = {}
    exec(f"from moondream_tools.geometry import {', '.join(geometry.__all__)}", namespace)
    for name in geometry.__all__:
        assert namespace[name] is getattr(geometry, name)
