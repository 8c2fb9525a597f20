"""Coordinate arithmetic: the one place that turns normalized coordinates into pixels.

Moondream reports every coordinate normalized to [0, 1] of the image it saw, origin
top-left. This project reports pixels in the *oriented* frame of the user's image
(EXIF orientation applied), whatever size was actually uploaded. Nothing else in
the project multiplies a normalized coordinate by a width.

Example::

    >>> from moondream_tools.geometry import box_to_pixels, point_to_pixels
    >>> box_to_pixels((0.75, 0.5, 0.25, 0.1), 640, 480)   # unordered corners get ordered
    (160.0, 48.0, 480.0, 240.0)
    >>> point_to_pixels((1.2, -0.1), 640, 480)            # clamped to the image
    (640.0, 0.0)

It also decodes Moondream's segment masks: SVG path data (normalized to the mask's
bbox) -> absolute commands (:func:`parse_path`) -> rings in pixels with curves
flattened to a tolerance (:func:`flatten_path`, :func:`segment_rings`) -> a full-size
even-odd mask (:func:`rasterize`) -> COCO RLE (:func:`mask_to_rle`,
:func:`rle_to_string`); and groups rings into polygons with holes (:func:`nest_rings`).
numpy is used when importable (RLE) and never required: results are identical.

    >>> rings = segment_rings("M0,0L1,0L1,1L0,1z", (0.0, 0.0, 0.5, 0.5), 20, 10)
    >>> rings
    [[(0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0)]]
    >>> rasterize(rings, 20, 10).histogram()[255]
    50
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from .errors import ResponseError

__all__ = [
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
]


def clamp_unit(value: float) -> float:
    """Clamp a normalized coordinate to [0, 1]."""
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def box_to_pixels(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    """Normalized ``(x_min, y_min, x_max, y_max)`` -> pixels, clamped to the image, ordered.

    >>> box_to_pixels((0.1, 0.2, 0.3, 0.4), 1000, 500)
    (100.0, 100.0, 300.0, 200.0)
    """
    _check_size(width, height)
    x0, y0, x1, y1 = (clamp_unit(v) for v in box)
    if x0 > x1:
        x0, x1 = x1, x0
    if y0 > y1:
        y0, y1 = y1, y0
    return (x0 * width, y0 * height, x1 * width, y1 * height)


def point_to_pixels(point: tuple[float, float], width: int, height: int) -> tuple[float, float]:
    """Normalized ``(x, y)`` -> pixels, clamped to the image.

    >>> point_to_pixels((0.5, 0.25), 640, 480)
    (320.0, 120.0)
    """
    _check_size(width, height)
    return (clamp_unit(point[0]) * width, clamp_unit(point[1]) * height)


def pixels_to_box(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    """Pixel ``(x_min, y_min, x_max, y_max)`` -> normalized, clamped to [0, 1], ordered.

    >>> pixels_to_box((480, 240, 160, 48), 640, 480)
    (0.25, 0.1, 0.75, 0.5)
    """
    _check_size(width, height)
    x0, y0, x1, y1 = box
    return box_to_pixels((x0 / width, y0 / height, x1 / width, y1 / height), 1, 1)


def pixels_to_point(point: tuple[float, float], width: int, height: int) -> tuple[float, float]:
    """Pixel ``(x, y)`` -> normalized, clamped to [0, 1].

    >>> pixels_to_point((320, 120), 640, 480)
    (0.5, 0.25)
    """
    _check_size(width, height)
    return (clamp_unit(point[0] / width), clamp_unit(point[1] / height))


# ---------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------


def position_word(x: float, y: float) -> str:
    """Name the ninth of the image a normalized point falls in (image split in thirds).

    A point exactly on a dividing line (1/3 or 2/3) belongs to the middle band, so the
    nine regions are symmetric.

    >>> position_word(0.1, 0.1), position_word(0.5, 0.5), position_word(0.9, 0.5)
    ('top-left', 'center', 'right')
    """
    row = "top" if y < _THIRD else "bottom" if y > _TWO_THIRDS else ""
    col = "left" if x < _THIRD else "right" if x > _TWO_THIRDS else ""
    if row and col:
        return f"{row}-{col}"
    return row or col or "center"


_THIRD = 1.0 / 3.0
_TWO_THIRDS = 2.0 / 3.0


# ---------------------------------------------------------------------------
# SVG path data
# ---------------------------------------------------------------------------
#
# Grammar (SVG 1.1 path data, without arcs): a path is whitespace, then commands.
# A command is a letter followed by numbers; numbers are separated by whitespace, at
# most one comma, or nothing at all when the next number starts with a sign or a dot
# ("M.1.2" is 0.1 0.2, "M1-2" is 1 -2, "1..2" is "1." then ".2"). Number forms:
# "1", "-1", "+1", "1.", ".5", "-.5", "1.5", "1e-3", "1E+2", ".5e2". Tokens are read
# greedily (longest number first), as the SVG grammar says.

Command = tuple[str, tuple[float, ...]]
"""One absolute command: ("M", (x, y)), ("L", (x, y)), ("C", (x1, y1, x2, y2, x, y)),
("Q", (x1, y1, x, y)) or ("Z", ())."""

Ring = list[tuple[float, float]]
"""A closed polyline, closure implied (the last point is not a repeat of the first)."""


def reading_order(boxes: Sequence[tuple[float, float, float, float]]) -> list[int]:
    """Indices of pixel ``boxes`` in reading order: rows top to bottom, each row left to right.

    A box joins the current row when its vertical center lies above the bottom of the
    row's first box. The agent-facing texts and the annotated images number objects in
    this order, so "#2" means the same object in both.

    >>> reading_order([(300, 10, 340, 50), (10, 12, 50, 52), (10, 200, 50, 240)])
    [1, 0, 2]
    """

    def center_y(i: int) -> float:
        return (boxes[i][1] + boxes[i][3]) / 2

    by_center = sorted(range(len(boxes)), key=lambda i: (center_y(i), boxes[i][0]))
    rows: list[list[int]] = []
    row_bottom = 0.0
    for i in by_center:
        center = center_y(i)
        if rows and center <= row_bottom:
            rows[-1].append(i)
        else:
            rows.append([i])
            row_bottom = max(boxes[i][3], center)
    order: list[int] = []
    for row in rows:
        order.extend(sorted(row, key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2, boxes[i][1])))
    return order


def points_reading_order(points: Sequence[tuple[float, float]], width: int, height: int) -> list[int]:
    """Indices of pixel ``points`` in reading order; points within 5% of the image height
    of a row's first point share that row.

    >>> points_reading_order([(640, 420), (212, 440), (1050, 460), (300, 700)], 1280, 853)
    [1, 0, 2, 3]
    """
    reach = height / 20
    return reading_order([(x - reach, y - reach, x + reach, y + reach) for x, y in points])


_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(_NUM)
# A command letter: any ASCII letter but e/E, which belong to numbers.
_CMD_RE = re.compile(r"([A-DF-Za-df-z])([^A-DF-Za-df-z]*)")
# The arguments of one command when they are well formed (atomic groups: linear time).
_ARGS = rf"[ \t\r\n\f]*(?:(?>{_NUM})(?:(?>[ \t\r\n\f]*,?[ \t\r\n\f]*)(?>{_NUM}))*)?[ \t\r\n\f]*"
_ARGS_RE = re.compile(_ARGS)
# A whole well-formed path after its leading blanks: checked in one call, then split.
_PATH_RE = re.compile(rf"(?:[A-DF-Za-df-z](?>{_ARGS}))*")
_SPLIT_RE = re.compile(r"([A-DF-Za-df-z])")
_WSP = " \t\r\n\f"
# What a cut stream may end with: the prefix of a number (possibly empty).
_LAST_ARGS_RE = re.compile(r"[A-DF-Za-df-z]([^A-DF-Za-df-z]*)\Z")
_EXPONENT_START_RE = re.compile(r"[eE][+-]?")
_NUMBER_START_RE = re.compile(r"[+-]?\.?")
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}
_ARITY.update({k.lower(): v for k, v in _ARITY.items()})
_MAX_SEGMENTS = 1000


def _fail(pos: int, message: str) -> ResponseError:
    return ResponseError(f"malformed SVG path at position {pos}: {message}")


def _describe(d: str, pos: int) -> str:
    return "end of path" if pos >= len(d) else repr(d[pos])


def _diagnose_args(d: str, cmd: str, start: int, end: int) -> ResponseError:
    """Find where the arguments ``d[start:end]`` of command ``cmd`` go wrong."""
    pos = start
    need_number = False  # True right after a comma
    seen_number = False
    while pos < end:
        ch = d[pos]
        if ch in _WSP:
            pos += 1
            continue
        if ch == ",":
            if not seen_number:
                return _fail(pos, f"expected a number after {cmd!r}, got ','")
            if need_number:
                return _fail(pos, "expected a number after ',', got ','")
            need_number = True
            pos += 1
            continue
        match = _NUM_RE.match(d, pos)
        if match is None or match.end() > end:
            after = "','" if need_number else repr(cmd)
            return _fail(pos, f"expected a number after {after}, got {_describe(d, pos)}")
        pos = match.end()
        need_number = False
        seen_number = True
    # Only reachable for a trailing comma.
    return _fail(end, f"expected a number after ',', got {_describe(d, end)}")


def _check_letter(letter: str, pos: int) -> None:
    if letter in "Aa":
        raise _fail(pos, "arcs ('A'/'a') are not supported")
    raise _fail(pos, f"unknown command {letter!r}")


def _check_finite(d: str, start: int, end: int) -> None:
    for m in _NUM_RE.finditer(d, start, end):
        if not math.isfinite(float(m.group())):
            raise _fail(m.start(), f"number {m.group()[:24]!r} is out of range")


def _commands(d: str, partial: bool) -> list[tuple[str, list[float], int, int]]:
    """Split ``d`` into (letter, numbers, letter position, end of arguments)."""
    out: list[tuple[str, list[float], int, int]] = []
    stripped = d.lstrip(_WSP)
    first = len(d) - len(stripped)
    if not stripped:
        return out
    d_eff = d
    if partial:
        # A stream may be cut anywhere: drop a trailing number (with nothing after it,
        # it may still grow: "0.1" of "0.125"), then trailing blanks and a dangling comma.
        d_eff = _drop_growing_tail(d).rstrip(_WSP)
        if d_eff.endswith(","):
            d_eff = d_eff[:-1]
    if _PATH_RE.fullmatch(d_eff, first) is not None:
        # Fast path: the grammar holds, so split at the letters and read the numbers.
        parts = _SPLIT_RE.split(d_eff)
        pos = len(parts[0])
        findall = _NUM_RE.findall
        for k in range(1, len(parts), 2):
            letter = parts[k]
            args = parts[k + 1]
            at = pos
            pos += 1 + len(args)
            if letter not in _ARITY:
                _check_letter(letter, at)
            nums = list(map(float, findall(args)))
            total = sum(nums)
            if total - total != 0.0:  # inf or nan somewhere (or a huge sum): look closer
                _check_finite(d_eff, at + 1, pos)
            out.append((letter, nums, at, pos))
        return out
    # Slow path: find and name the first error.
    pos = first
    length = len(d_eff)
    for match in _CMD_RE.finditer(d_eff, first):
        if match.start() != pos:  # only possible for the first command
            break
        letter = match.group(1)
        if letter not in _ARITY:
            _check_letter(letter, match.start())
        a_start, a_end = match.span(2)
        if _ARGS_RE.fullmatch(d_eff, a_start, a_end) is None:
            raise _diagnose_args(d, letter, a_start, a_end)
        nums = [float(v) for v in _NUM_RE.findall(d_eff, a_start, a_end)]
        _check_finite(d_eff, a_start, a_end)
        out.append((letter, nums, match.start(), a_end))
        pos = a_end
    if pos != length:
        if pos == first:
            raise _fail(first, f"expected a command letter, got {_describe(d, first)}")
        raise _fail(pos, f"expected a command letter, got {_describe(d, pos)}")
    return out


def _drop_growing_tail(d: str) -> str:
    """``d`` without a number at its very end that more streamed characters could extend.

    The last command's arguments are tokenized left to right, as the grammar reads them
    (so ``M.5.5`` ends with the token ``.5``, not ``5.5``); a token running to the end, an
    exponent just begun (``1e-``) or a number just begun (``-``, ``.``) is dropped.
    """
    match = _LAST_ARGS_RE.search(d)
    if match is None:
        return d
    last = None
    for last in _NUM_RE.finditer(d, match.start(1)):
        pass
    rest_start = last.end() if last is not None else match.start(1)
    rest = d[rest_start:]
    if last is not None and (rest == "" or _EXPONENT_START_RE.fullmatch(rest)):
        return d[: last.start()]
    started = rest.lstrip(_WSP + ",")
    if _NUMBER_START_RE.fullmatch(started):
        return d[: len(d) - len(started)]
    return d


def _parse(d: str, partial: bool) -> list[list[Command]]:
    commands = _commands(d, partial)
    subpaths: list[list[Command]] = []
    current: list[Command] | None = None
    cx = cy = 0.0  # current point
    sx = sy = 0.0  # start of the current subpath
    # Control point to reflect for S (after C/S) and T (after Q/T), else None.
    last_c: tuple[float, float] | None = None
    last_q: tuple[float, float] | None = None
    closed = False
    n_commands = len(commands)
    for index, (letter, nums, at, end) in enumerate(commands):
        upper = letter.upper()
        arity = _ARITY[letter]
        count = len(nums)
        if arity == 0:
            if count:
                args = d[at + 1 : end]
                raise _fail(end - len(args.lstrip(_WSP)), f"{letter!r} takes no numbers")
        else:
            if count % arity or not count:
                if partial and index == n_commands - 1:
                    # The tail of a cut stream: keep the complete groups only.
                    del nums[count - count % arity :]
                    count = len(nums)
                    if not count:
                        break
                else:
                    got = _describe(d, end)
                    raise _fail(end, f"expected a number after {letter!r}, got {got}")
        rel = letter != upper
        if current is None and upper == "Z" and closed:
            continue  # a repeated Z changes nothing
        if current is None and upper != "M":
            if not subpaths or not closed:
                raise _fail(at, f"a path must start with 'M' or 'm', got {letter!r}")
            # A drawing command right after Z starts a new subpath at the old start.
            current = [("M", (sx, sy))]
            subpaths.append(current)
        if upper == "M":
            for i in range(0, count, 2):
                x, y = nums[i], nums[i + 1]
                if rel:
                    x += cx
                    y += cy
                if i == 0:
                    current = [("M", (x, y))]
                    subpaths.append(current)
                    sx, sy = x, y
                else:
                    assert current is not None
                    current.append(("L", (x, y)))
                cx, cy = x, y
            last_c = last_q = None
        elif upper == "Z":
            assert current is not None
            current.append(("Z", ()))
            cx, cy = sx, sy
            current = None
            closed = True
            last_c = last_q = None
            continue
        else:
            assert current is not None
            append = current.append
            if upper == "L":
                for i in range(0, count, 2):
                    x, y = nums[i], nums[i + 1]
                    if rel:
                        x += cx
                        y += cy
                    append(("L", (x, y)))
                    cx, cy = x, y
                last_c = last_q = None
            elif upper == "H":
                for x in nums:
                    if rel:
                        x += cx
                    append(("L", (x, cy)))
                    cx = x
                last_c = last_q = None
            elif upper == "V":
                for y in nums:
                    if rel:
                        y += cy
                    append(("L", (cx, y)))
                    cy = y
                last_c = last_q = None
            elif upper == "C" or upper == "S":
                step = 6 if upper == "C" else 4
                for i in range(0, count, step):
                    if step == 6:
                        x1, y1, x2, y2, x, y = nums[i : i + 6]
                        if rel:
                            x1 += cx
                            y1 += cy
                    else:
                        x2, y2, x, y = nums[i : i + 4]
                        if last_c is None:
                            x1, y1 = cx, cy
                        else:
                            x1, y1 = 2 * cx - last_c[0], 2 * cy - last_c[1]
                    if rel:
                        x2 += cx
                        y2 += cy
                        x += cx
                        y += cy
                    append(("C", (x1, y1, x2, y2, x, y)))
                    last_c = (x2, y2)
                    cx, cy = x, y
                last_q = None
            else:  # Q or T
                step = 4 if upper == "Q" else 2
                for i in range(0, count, step):
                    if step == 4:
                        x1, y1, x, y = nums[i : i + 4]
                        if rel:
                            x1 += cx
                            y1 += cy
                    else:
                        x, y = nums[i : i + 2]
                        if last_q is None:
                            x1, y1 = cx, cy
                        else:
                            x1, y1 = 2 * cx - last_q[0], 2 * cy - last_q[1]
                    if rel:
                        x += cx
                        y += cy
                    append(("Q", (x1, y1, x, y)))
                    last_q = (x1, y1)
                    cx, cy = x, y
                last_c = None
        closed = False
    return subpaths


def parse_path(d: str) -> list[list[Command]]:
    """Parse SVG path data into subpaths of absolute commands in the path's own units.

    Supports M/L/H/V/C/S/Q/T/Z, absolute and relative, with implicit repeats (numbers
    after M are L). H and V become L, S becomes C and T becomes Q with the reflected
    control point. Numbers may be written ``1``, ``-1``, ``+1``, ``1.``, ``.5``, ``-.5``,
    ``1e-3``, ``1E+2``, separated by whitespace, one comma, or nothing when the next
    number starts with a sign or a dot (``"M.1.2"`` is 0.1, 0.2; ``"M1-2"`` is 1, -2;
    ``"1..2"`` is 1.0, 0.2), as in the SVG grammar. Arcs, out-of-range numbers and
    anything malformed raise :class:`~moondream_tools.errors.ResponseError` naming the
    position, e.g. ``malformed SVG path at position 10: expected a number after 'C',
    got end of path``.

    >>> parse_path("M.1.2l.3,0Q1,1,.5,.5z")
    [[('M', (0.1, 0.2)), ('L', (0.4, 0.2)), ('Q', (1.0, 1.0, 0.5, 0.5)), ('Z', ())]]
    >>> parse_path("   ")
    []
    """
    return _parse(d, False)


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


# ---------------------------------------------------------------------------
# Polygons and masks
# ---------------------------------------------------------------------------


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


def ring_area(ring: Ring) -> float:
    """Signed shoelace area of a ring, ``sum(x_i * y_(i+1) - x_(i+1) * y_i) / 2``.

    In image coordinates (y down) it is positive when the ring turns clockwise on
    screen (right, then down) and negative when it turns counter-clockwise (which is
    the mathematical positive orientation once y points up). Use ``abs()`` for the area.

    >>> ring_area([(0, 0), (10, 0), (10, 10), (0, 10)])   # right, down, left: clockwise on screen
    100.0
    >>> ring_area([(0, 0), (0, 10), (10, 10), (10, 0)])
    -100.0
    """
    n = len(ring)
    if n < 3:
        return 0.0
    total = 0.0
    px, py = ring[-1]
    for x, y in ring:
        total += px * y - x * py
        px, py = x, y
    return total / 2.0


def _contains(ring: Ring, x: float, y: float) -> int:
    """1 inside, 0 outside, -1 on the boundary (even-odd ray casting)."""
    inside = False
    px, py = ring[-1]
    for qx, qy in ring:
        # On the segment?
        if min(px, qx) <= x <= max(px, qx) and min(py, qy) <= y <= max(py, qy):
            cross = (qx - px) * (y - py) - (qy - py) * (x - px)
            if abs(cross) <= 1e-9 * (abs(qx - px) + abs(qy - py) + 1.0):
                return -1
        if (py > y) != (qy > y):
            xi = px + (y - py) * (qx - px) / (qy - py)
            if x < xi:
                inside = not inside
        px, py = qx, qy
    return 1 if inside else 0


def _ring_inside(inner: Ring, outer: Ring, outer_box: tuple[float, float, float, float]) -> bool:
    x0, y0, x1, y1 = outer_box
    verdict = 0
    for x, y in inner:
        if x < x0 or x > x1 or y < y0 or y > y1:
            return False
        side = _contains(outer, x, y)
        if side >= 0:
            return side == 1
        verdict += 1
        if verdict > 16:  # the rings share a long stretch of boundary: try midpoints
            break
    for (ax, ay), (bx, by) in zip(inner, inner[1:] + inner[:1]):
        side = _contains(outer, (ax + bx) / 2, (ay + by) / 2)
        if side >= 0:
            return side == 1
    return False


def nest_rings(rings: Sequence[Ring]) -> list[tuple[Ring, list[Ring]]]:
    """Group rings into polygons ``(outer, holes)`` by even-odd nesting depth.

    A ring inside no other ring is an outer boundary (depth 0); a ring directly inside an
    outer one is its hole (depth 1); a ring inside a hole is a new outer boundary (an
    island, depth 2), and so on. Containment is tested with a vertex of the inner ring
    (the next one when a vertex lies on the other ring). Orientation is left as given;
    see :func:`ring_area` to orient rings, e.g. for GeoJSON. Rings with fewer than 3
    points are ignored. Outer rings keep their input order, as do holes.

    >>> square = lambda a, b: [(a, a), (b, a), (b, b), (a, b)]
    >>> [(outer[0], [h[0] for h in holes]) for outer, holes in nest_rings([square(0, 9), square(3, 6)])]
    [((0, 0), [(3, 3)])]
    """
    items = [ring for ring in rings if len(ring) >= 3]
    boxes = []
    for ring in items:
        xs = [p[0] for p in ring]
        ys = [p[1] for p in ring]
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    areas = [abs(ring_area(ring)) for ring in items]
    n = len(items)
    parents: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        bi = boxes[i]
        for k in range(n):
            if k == i:
                continue
            bk = boxes[k]
            if bk[0] > bi[0] or bk[1] > bi[1] or bk[2] < bi[2] or bk[3] < bi[3]:
                continue
            if areas[k] < areas[i] or (areas[k] == areas[i] and k > i):
                continue
            if _ring_inside(items[i], items[k], bk):
                parents[i].append(k)
    depth = [len(p) for p in parents]
    result: list[tuple[Ring, list[Ring]]] = []
    slot: dict[int, int] = {}
    for i in range(n):
        if depth[i] % 2 == 0:
            slot[i] = len(result)
            result.append((items[i], []))
    for i in range(n):
        if depth[i] % 2 == 1:
            # The direct parent: the containing ring one level up (the smallest one).
            candidates = [k for k in parents[i] if depth[k] == depth[i] - 1]
            if not candidates:  # inconsistent nesting (crossing rings): treat as outer
                slot[i] = len(result)
                result.append((items[i], []))
                continue
            parent = min(candidates, key=lambda k: areas[k])
            result[slot[parent]][1].append(items[i])
    return result


# ---------------------------------------------------------------------------
# COCO run-length encoding
# ---------------------------------------------------------------------------


def _numpy() -> Any:
    """numpy when importable, else None (the core never requires it)."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return numpy


_RUNS_RE = re.compile(rb"\x00+|\xff+")


def _mask_bytes(mask: Image.Image) -> Image.Image:
    if mask.mode == "1":
        return mask.convert("L")  # exact: "1" pixels are 0 or 255
    if mask.mode == "L":
        return mask.point(lambda v: 255 if v else 0)
    raise ValueError(f"mask mode must be '1' or 'L', got {mask.mode!r}")


def mask_to_rle(mask: Image.Image) -> dict[str, Any]:
    """COCO uncompressed RLE of a full-size mask (mode "1" or "L", nonzero = inside).

    Returns ``{"size": [height, width], "counts": [...]}``: run lengths in column-major
    (Fortran) order, starting with a run of outside pixels (0 when the first pixel is
    inside), exactly as pycocotools. Uses numpy when importable.

    >>> from PIL import Image
    >>> mask = Image.new("1", (3, 2)); mask.putpixel((1, 0), 1)
    >>> mask_to_rle(mask)
    {'size': [2, 3], 'counts': [2, 1, 3]}
    """
    width, height = mask.size
    data = _mask_bytes(mask)
    np = _numpy()
    if np is not None:
        flat = np.asarray(data).T.ravel() != 0  # column-major
        if flat.size == 0:
            return {"size": [height, width], "counts": [0]}
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], change, [flat.size]))
        counts = np.diff(edges).tolist()
        if flat[0]:
            counts.insert(0, 0)
        return {"size": [height, width], "counts": counts}
    raw = data.transpose(Image.Transpose.TRANSPOSE).tobytes()
    if not raw:
        return {"size": [height, width], "counts": [0]}
    counts = [m.end() - m.start() for m in _RUNS_RE.finditer(raw)]
    if raw[0]:
        counts.insert(0, 0)
    return {"size": [height, width], "counts": counts}


def rle_to_string(counts: Sequence[int]) -> str:
    """Compress RLE counts into COCO's string form, as pycocotools' ``rleToString``.

    Each count (minus the count two places earlier, from the fourth on) is written in
    5-bit groups, low first, as characters ``48 + group`` with bit 0x20 meaning "more".

    >>> rle_to_string([2, 1, 3])
    '213'
    >>> rle_from_string(rle_to_string([0, 400, 7, 380]))
    [0, 400, 7, 380]
    """
    out: list[str] = []
    add = out.append
    for i, count in enumerate(counts):
        x = int(count)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            add(chr(c + 48))
    return "".join(out)


def rle_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed counts string (str or bytes) into run lengths.

    >>> rle_from_string("213")
    [2, 1, 3]
    """
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("ascii")
    counts: list[int] = []
    x = k = 0
    for pos, ch in enumerate(s):
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"invalid RLE string at position {pos}: {ch!r}")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"invalid RLE string at position {pos}: negative run length")
        counts.append(x)
        x = k = 0
    if k:
        raise ValueError(f"invalid RLE string: truncated at position {len(s)}")
    return counts


def rle_to_mask(rle: Mapping[str, Any]) -> Image.Image:
    """Decode a COCO RLE (counts as a list or a compressed string) into a mode "1" mask.

    >>> rle_to_mask({"size": [2, 3], "counts": [2, 1, 3]}).getbbox()
    (1, 0, 2, 1)
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray)):
        counts = rle_from_string(counts)
    total = 0
    parts: list[bytes] = []
    value = 0
    for count in counts:
        count = int(count)
        if count < 0:
            raise ValueError("RLE counts must not be negative")
        parts.append((b"\xff" if value else b"\x00") * count)
        total += count
        value ^= 1
    if total != width * height:
        raise ValueError(f"RLE counts sum to {total}, expected {height} x {width} = {width * height}")
    if not total:
        return Image.new("1", (width, height))
    # Column-major data of an h x w mask is row-major data of its w x h transpose.
    transposed = Image.frombytes("1", (height, width), b"".join(parts), "raw", "1;8")
    return transposed.transpose(Image.Transpose.TRANSPOSE)
