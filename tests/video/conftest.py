"""Synthetic videos (PyAV, drawn from the emulator's scenes) and a client on the emulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from video_support import MOVING

from moondream_tools.testing import MovingShape, VideoScene

@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``moving``: :data:`MOVING` (keyframe every 10 frames); ``rotated``: the same stored
    turned, with a 90 degree rotation flag; ``offset``: MOVING in Matroska whose first
    timestamp is 2 s; ``ts``: MOVING in MPEG-TS (no seek index) starting at 1.4 s, as
    broadcast and camera files do."""
    folder = tmp_path_factory.mktemp("videos")
    paths = {"moving": folder / "moving.mp4", "rotated": folder / "rotated.mp4", "rotated270": folder / "r270.mov",
             "offset": folder / "offset.mkv", "ts": folder / "moving.ts"}
    MOVING.write(paths["moving"], gop=10)
    MOVING.write(paths["rotated"], rotation=90, gop=10)
    MOVING.write(paths["rotated270"], rotation=270, gop=10)
    MOVING.write(paths["offset"], gop=10, start=2.0)
    MOVING.write(paths["ts"], gop=10, start=1.4)
    return paths


@pytest.fixture(scope="session")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VideoScene]:
    clip = VideoScene(64, 48, [MovingShape("square", "green", (10, 20), 12, velocity=(1, 0))], fps=50, frames=2000)
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    clip.write(path, gop=50)
    return path, clip
