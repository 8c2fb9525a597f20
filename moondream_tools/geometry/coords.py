"""Normalized <-> pixel coordinates, position words and reading order.

Moondream reports coordinates normalized to [0, 1] of the image it saw, origin top-left;
these functions clamp them and turn them into pixels of the oriented image (and back),
name the ninth of the image a point falls in, and order boxes or points as a person
reads them (rows top to bottom, each row left to right).
"""

from __future__ import annotations

from collections.abc import Sequence


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
