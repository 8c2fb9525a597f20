"""Synthetic videos with ground truth: shapes that move, appear and vanish.

A :class:`VideoScene` is a :class:`~moondream_tools.testing.Scene` over time: each
:class:`MovingShape` starts somewhere, moves at a constant velocity and is visible between
``appear`` and ``vanish`` seconds. :meth:`VideoScene.at` is the still scene (with its exact
truth) at any time, and :meth:`VideoScene.write` encodes the video with PyAV (optional:
``pip install av``), optionally stored rotated with a display-matrix rotation flag, as phones
do, so that a reader applying the flag sees :meth:`at`'s scene upright.

>>> clip = VideoScene(160, 120, [MovingShape("square", "red", (30, 40), 24, velocity=(20, 0))], fps=10, frames=20)
>>> clip.at(1.0).shapes[0].center
(50.0, 40.0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from .scene import Scene, Shape

__all__ = ["MovingShape", "VideoScene"]


@dataclass(frozen=True)
class MovingShape:
    """A shape at ``start`` (center, pixels) at time 0 moving at ``velocity`` (pixels per
    second), visible from ``appear`` (inclusive) to ``vanish`` (exclusive) seconds."""

    kind: str
    color: str
    start: tuple[float, float]
    size: float
    velocity: tuple[float, float] = (0.0, 0.0)
    appear: float = 0.0
    vanish: float = math.inf

    def at(self, time: float) -> Shape | None:
        """The shape at ``time``, or None when it is not visible then."""
        if not self.appear <= time < self.vanish:
            return None
        x = self.start[0] + self.velocity[0] * time
        y = self.start[1] + self.velocity[1] * time
        return Shape(self.kind, self.color, (float(x), float(y)), self.size)


class VideoScene:
    """Moving shapes on a plain background, ``frames`` frames at ``fps``.

    Frame ``i`` is shown at ``i / fps`` seconds from the first frame (the timestamps
    :meth:`write` gives it, plus its ``start``).
    """

    def __init__(
        self,
        width: int,
        height: int,
        shapes: Iterable[MovingShape],
        *,
        fps: float = 10.0,
        frames: int = 30,
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError("width and height must be even numbers of at least 2 (4:2:0 video)")
        if fps <= 0 or frames < 1:
            raise ValueError("fps must be positive and frames at least 1")
        self.width, self.height = int(width), int(height)
        self.shapes = tuple(shapes)
        self.fps = float(fps)
        self.frames = int(frames)
        self.background = background

    def time(self, index: int) -> float:
        """The timestamp of frame ``index`` in seconds."""
        return index / self.fps

    def at(self, time: float) -> Scene:
        """The scene shown at ``time`` seconds (shapes in drawing order; hidden ones left out)."""
        shapes = [s for s in (m.at(time) for m in self.shapes) if s is not None]
        return Scene(self.width, self.height, shapes, self.background)

    def frame(self, index: int) -> Scene:
        """The scene of frame ``index``."""
        return self.at(self.time(index))

    def write(
        self,
        path: str | os.PathLike[str],
        *,
        codec: str = "libx264",
        rotation: int = 0,
        gop: int | None = None,
        quality: int = 18,
        preset: str = "ultrafast",
        start: float = 0.0,
    ) -> None:
        """Encode the video to ``path`` (container from its extension) with PyAV.

        ``rotation`` (0, 90, 180, 270): the frames are stored turned clockwise by it and the
        stream carries a display matrix saying to turn them back counterclockwise, as a
        phone writes a portrait video; the upright frames are :meth:`at`'s scenes.
        ``gop``: frames between keyframes (default: the encoder's). ``quality``: x264's CRF;
        ``preset``: x264's preset (``"ultrafast"``: quick to write, no B-frames; a camera-like
        file: ``"veryfast"`` or slower). ``start``: the first frame's timestamp in the file,
        in seconds (rounded to a whole number of frames), as MPEG-TS files and cut recordings
        have; frame ``i`` is then stored at ``start + i / fps``.
        """
        import av

        if rotation not in (0, 90, 180, 270):
            raise ValueError("rotation must be 0, 90, 180 or 270")
        if not math.isfinite(start) or start < 0:
            raise ValueError("start must be a finite number of seconds >= 0")
        undo = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
        stored = (self.height, self.width) if rotation in (90, 270) else (self.width, self.height)
        from fractions import Fraction

        rate = Fraction(self.fps).limit_denominator(1001)
        offset = round(start * rate)
        with av.open(os.fspath(path), "w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height = stored
            stream.pix_fmt = "yuv420p"
            if gop is not None:
                stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {"preset": preset, "crf": str(quality)}
                if preset == "ultrafast":
                    stream.options = {**stream.options, "tune": "zerolatency"}
            if rotation:
                stream.set_display_rotation(rotation)
            for index in range(self.frames):
                image = self.frame(index).render()
                if rotation:
                    image = image.transpose(undo[rotation])
                frame = av.VideoFrame.from_image(image)
                frame.pts = offset + index
                frame.time_base = 1 / rate
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
