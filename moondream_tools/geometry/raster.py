"""Rasterizing: rings -> a full-size even-odd mask (a Pillow image)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from .coords import _check_size
from .rings import Ring


def rasterize(rings: Sequence[Ring], width: int, height: int, *, mode: str = "1") -> Image.Image:
    """Fill rings into a full-size mask with the even-odd rule (holes and islands by parity).

    Pixel ``(i, j)`` is inside when its center ``(i + 0.5, j + 0.5)`` is inside; a center
    exactly on a left/top edge is inside, on a right/bottom edge outside, so abutting
    shapes never share a pixel. ``mode`` is ``"1"`` or ``"L"`` (values 0 and 255).

    >>> mask = rasterize([[(0, 0), (10, 0), (10, 10), (0, 10)]], 20, 20)
    >>> mask.getbbox(), mask.histogram()[255]
    ((0, 0, 10, 10), 100)
    """
    _check_size(width, height)
    if mode not in ("1", "L"):
        raise ValueError(f"mode must be '1' or 'L', got {mode!r}")
    # Scanline fill: every edge crosses the row centers y = j + 0.5 with
    # y_low <= y < y_high (half-open, so a vertex is counted once per ring).
    x_min = y_min = math.inf
    x_max = y_max = -math.inf
    for ring in rings:
        if ring:
            xs = [p[0] for p in ring]
            ys = [p[1] for p in ring]
            x_min = min(x_min, min(xs))
            x_max = max(x_max, max(xs))
            y_min = min(y_min, min(ys))
            y_max = max(y_max, max(ys))
    image = Image.new(mode, (width, height), 0)
    if x_min == math.inf:
        return image
    # Only the band of rows and columns the rings can reach is filled, then pasted.
    j_lo = max(0, math.ceil(y_min - 0.5))
    j_hi = min(height, math.ceil(y_max - 0.5))
    i_lo = max(0, math.ceil(x_min - 0.5))
    i_hi = min(width, math.ceil(x_max - 0.5))
    if j_lo >= j_hi or i_lo >= i_hi:
        return image
    rows: list[list[float]] = [[] for _ in range(j_hi - j_lo)]
    ceil = math.ceil
    for ring in rings:
        if len(ring) < 2:
            continue
        px, py = ring[-1]
        for x, y in ring:
            if y != py:
                if py < y:
                    xa, ya, xb, yb = px, py, x, y
                else:
                    xa, ya, xb, yb = x, y, px, py
                ja = ceil(ya - 0.5)
                jb = ceil(yb - 0.5)
                if ja < j_lo:
                    ja = j_lo
                if jb > j_hi:
                    jb = j_hi
                if ja < jb:
                    slope = (xb - xa) / (yb - ya)
                    for j in range(ja, jb):
                        rows[j - j_lo].append(xa + (j + 0.5 - ya) * slope)
            px, py = x, y
    band_w = i_hi - i_lo
    buf = bytearray(band_w * (j_hi - j_lo))
    ones = memoryview(b"\xff" * band_w)
    offset = -i_lo  # buffer index of column 0 in the current row
    for xs in rows:
        if xs:
            xs.sort()
            for k in range(0, len(xs) - 1, 2):
                a = ceil(xs[k] - 0.5)
                b = ceil(xs[k + 1] - 0.5)
                if a < i_lo:
                    a = i_lo
                if b > i_hi:
                    b = i_hi
                if a < b:
                    buf[offset + a : offset + b] = ones[: b - a]
        offset += band_w
    rawmode = "1;8" if mode == "1" else "L"
    image.paste(Image.frombytes(mode, (band_w, j_hi - j_lo), buf, "raw", rawmode), (i_lo, j_lo))
    return image
