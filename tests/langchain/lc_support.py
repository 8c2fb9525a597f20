"""Shared ground truth and parsing helpers for the LangChain adapter tests."""

from __future__ import annotations

import re

from moondream_tools.testing import Scene, Shape

#: 3 red circles in a row, a blue square above, a yellow triangle below left.
SCENE = Scene(
    1280,
    853,
    [
        Shape("circle", "red", (212, 440), 90),
        Shape("circle", "red", (640, 420), 90),
        Shape("circle", "red", (1050, 460), 90),
        Shape("square", "blue", (640, 150), 160),
        Shape("triangle", "yellow", (300, 700), 200),
    ],
)
W, H = SCENE.size


COUNT_ITEM = re.compile(r"#(\d+) at \((\d+), (\d+)\)")
BOX_ITEM = re.compile(r"#(\d+) box \((\d+), (\d+)\)-\((\d+), (\d+)\)")
SEGMENT = re.compile(r"area ([\d,]+) px \(([\d.]+)% of the image\), bbox \((\d+), (\d+)\)-\((\d+), (\d+)\) px")


def centers(text: str) -> list[tuple[int, int]]:
    """The (x, y) pixel centers a count_objects text lists, in its order."""
    return [(int(x), int(y)) for _, x, y in COUNT_ITEM.findall(text)]


def boxes(text: str) -> list[tuple[int, int, int, int]]:
    """The pixel boxes a locate_objects text lists, in its order."""
    return [(int(a), int(b), int(c), int(d)) for _, a, b, c, d in BOX_ITEM.findall(text)]


def segment_numbers(text: str) -> tuple[int, float, tuple[int, int, int, int]]:
    """Area in px, percentage and bbox of a segment_object text."""
    match = SEGMENT.search(text)
    assert match is not None, text
    area, percent, *box = match.groups()
    return int(area.replace(",", "")), float(percent), tuple(int(v) for v in box)  # type: ignore[return-value]


def close(got: float, want: float, scale: float, tolerance: float = 0.02) -> bool:
    """Whether ``got`` is within ``tolerance`` of ``scale`` (image side or area) of ``want``."""
    return abs(got - want) <= tolerance * scale


def assert_box(got: tuple[int, int, int, int], want: tuple[int, int, int, int]) -> None:
    for g, w, scale in zip(got, want, (W, H, W, H), strict=True):
        assert close(g, w, scale), (got, want)
