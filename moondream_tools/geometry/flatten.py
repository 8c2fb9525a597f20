"""Flattening: SVG path data -> rings (closed polylines) in output units.

Points are mapped with a scale and an offset, then curves are split into chords within
a tolerance; :func:`segment_rings` maps a Moondream segment path (normalized to its
bbox) to image pixels.
"""

from __future__ import annotations

import math

from ..errors import ResponseError
from .coords import _check_size
from .paths import Command, _parse
from .rings import Ring

_MAX_SEGMENTS = 1000


def _segments(dd: float, tolerance: float, factor: float) -> int:
    # Uniform subdivision of a polynomial curve into n chords deviates from it by at most
    # max|B''| / (8 n^2). For a cubic max|B''| <= 6 * max|P0 - 2P1 + P2|, |P1 - 2P2 + P3|
    # (factor 0.75 = 6/8); for a quadratic |B''| = 2 |P0 - 2P1 + P2| (factor 0.25).
    if dd <= 0.0:
        return 1
    if not math.isfinite(dd):
        raise _out_of_range()
    n = math.ceil(math.sqrt(factor * dd / tolerance))
    return 1 if n < 1 else _MAX_SEGMENTS if n > _MAX_SEGMENTS else n


def _flatten(
    subpaths: list[list[Command]],
    scale: tuple[float, float],
    offset: tuple[float, float],
    tolerance: float,
) -> list[Ring]:
    if not tolerance > 0.0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    kx, ky = float(scale[0]), float(scale[1])
    ox, oy = float(offset[0]), float(offset[1])
    if not all(math.isfinite(v) for v in (kx, ky, ox, oy)):
        raise _out_of_range()
    rings: list[Ring] = []
    hypot = math.hypot
    for sub in subpaths:
        ring: Ring = []
        add = ring.append
        px = py = 0.0
        for cmd, args in sub:
            if cmd == "L" or cmd == "M":
                px, py = ox + kx * args[0], oy + ky * args[1]
                add((px, py))
            elif cmd == "C":
                x1, y1, x2, y2, x3, y3 = args
                x1 = ox + kx * x1
                y1 = oy + ky * y1
                x2 = ox + kx * x2
                y2 = oy + ky * y2
                x3 = ox + kx * x3
                y3 = oy + ky * y3
                dd = max(
                    hypot(px - 2 * x1 + x2, py - 2 * y1 + y2),
                    hypot(x1 - 2 * x2 + x3, y1 - 2 * y2 + y3),
                )
                n = _segments(dd, tolerance, 0.75)
                if n > 1:
                    # Power basis: B(t) = P0 + t (a + t (b + t c)).
                    ax, ay = 3 * (x1 - px), 3 * (y1 - py)
                    bx, by = 3 * (px - 2 * x1 + x2), 3 * (py - 2 * y1 + y2)
                    cx_, cy_ = x3 - px + 3 * (x1 - x2), y3 - py + 3 * (y1 - y2)
                    inv = 1.0 / n
                    for i in range(1, n):
                        t = i * inv
                        add((px + t * (ax + t * (bx + t * cx_)), py + t * (ay + t * (by + t * cy_))))
                add((x3, y3))
                px, py = x3, y3
            elif cmd == "Q":
                x1, y1, x2, y2 = args
                x1 = ox + kx * x1
                y1 = oy + ky * y1
                x2 = ox + kx * x2
                y2 = oy + ky * y2
                n = _segments(hypot(px - 2 * x1 + x2, py - 2 * y1 + y2), tolerance, 0.25)
                if n > 1:
                    ax, ay = 2 * (x1 - px), 2 * (y1 - py)
                    bx, by = px - 2 * x1 + x2, py - 2 * y1 + y2
                    inv = 1.0 / n
                    for i in range(1, n):
                        t = i * inv
                        add((px + t * (ax + t * bx), py + t * (ay + t * by)))
                add((x2, y2))
                px, py = x2, y2
            # "Z": closure is implied by the ring.
        total = sum(x + y for x, y in ring)
        if total - total != 0.0:  # a coordinate overflowed to inf (or nan) when mapped
            raise _out_of_range()
        while len(ring) > 1 and ring[-1] == ring[0]:
            ring.pop()
        if len(ring) >= 3 and len(set(ring)) >= 3:
            rings.append(ring)
    return rings


def _out_of_range() -> ResponseError:
    return ResponseError("segmentation path or bbox: coordinates too large to map to pixels")


def flatten_path(
    d: str,
    *,
    scale: tuple[float, float] = (1.0, 1.0),
    offset: tuple[float, float] = (0.0, 0.0),
    tolerance: float = 0.25,
    partial: bool = False,
) -> list[Ring]:
    """Parse SVG path data and flatten it to rings, one per subpath.

    Every point is mapped with ``x' = offset[0] + scale[0] * x`` (``y`` likewise), then
    curves are split into chords that stay within ``tolerance`` of the curve in those
    output units (a large mask gets more points than a small one). The repeated closing
    point is dropped; subpaths with fewer than 3 distinct points are dropped.

    With ``partial=True`` the path may be cut anywhere (a streamed coarse mask): the
    complete commands are decoded and an unfinished tail is ignored. A number at the
    very end counts as unfinished, since more digits may follow. Syntax errors before
    the tail still raise :class:`~moondream_tools.errors.ResponseError`.

    >>> flatten_path("M0,0L1,0L1,1z", scale=(10, 10), offset=(5, 0))
    [[(5.0, 0.0), (15.0, 0.0), (15.0, 10.0)]]
    >>> flatten_path("M 0.1 0.1 L 0.5 0.1 L 0.5 0.5 L 0.", partial=True)
    [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]
    """
    return _flatten(_parse(d, partial), scale, offset, tolerance)


def segment_rings(
    path: str,
    bbox: tuple[float, float, float, float],
    width: int,
    height: int,
    *,
    tolerance: float = 0.25,
    partial: bool = False,
) -> list[Ring]:
    """Decode a Moondream segment path into rings in image pixels.

    ``path`` is normalized to ``bbox = (x_min, y_min, x_max, y_max)``, itself normalized
    to the image: ``x_px = (x_min + x * (x_max - x_min)) * width``. Pixel ``(i, j)``
    covers ``[i, i+1) x [j, j+1)``, so the whole 640x480 image is the ring
    (0, 0)-(640, 480). Points are not clamped: a path slightly outside its bbox stays so.

    >>> segment_rings("M0,0L1,0L1,1L0,1z", (0.25, 0.5, 0.75, 1.0), 640, 480)
    [[(160.0, 240.0), (480.0, 240.0), (480.0, 480.0), (160.0, 480.0)]]
    """
    _check_size(width, height)
    x0, y0, x1, y1 = bbox
    return flatten_path(
        path,
        scale=((x1 - x0) * width, (y1 - y0) * height),
        offset=(x0 * width, y0 * height),
        tolerance=tolerance,
        partial=partial,
    )
