"""Synthetic videos shared by the video tests (tests/video) and the command line tests."""

from __future__ import annotations

from moondream_tools.testing import MovingShape, VideoScene

#: A red square crossing left to right all along; a blue circle appearing at 1 s, moving left.
MOVING = VideoScene(
    160,
    120,
    [
        MovingShape("square", "red", (30, 40), 24, velocity=(20, 0)),
        MovingShape("circle", "blue", (125, 90), 26, velocity=(-10, 0), appear=1.0),
    ],
    fps=10,
    frames=30,
)
