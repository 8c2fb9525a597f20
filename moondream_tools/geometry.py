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
"""

from __future__ import annotations

__all__ = [
    "clamp_unit",
    "box_to_pixels",
    "point_to_pixels",
    "pixels_to_box",
    "pixels_to_point",
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
