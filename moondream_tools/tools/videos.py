"""Videos for agents: a registered video asked about at a moment (``time``), and when an
object appears in it (a sampled pass with tracks).

The four tools take an optional ``time`` in seconds. On a video handle, ``describe_image``
and ``segment_object`` need it (one frame, the one shown at that time, goes to the
backend); ``count_objects`` and ``locate_objects`` with it look at that frame, and without
it sample the whole video and answer when the object appears (:class:`VideoTimeline`),
with the moment it was most numerous as their points or boxes. No fifth tool: a model
already knows these four, and "how many cars, and when" is a count.

PyAV (the ``video`` extra) is imported when a video is registered or first read, never by
importing the tools.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from PIL import Image

from ..errors import ImageError, MoondreamError, ToolArgumentsError
from ..results import Detections, Points
from .texts import TimeSpan, VideoTimeline

if TYPE_CHECKING:
    from ..backend import VisionBackend
    from ..video import FrameResult, VideoInfo

__all__ = ["RegisteredVideo", "SAMPLED_FRAMES", "sample_step", "timeline_of"]

#: About how many frames a pass over a whole video samples (:func:`sample_step`).
SAMPLED_FRAMES = 40
_STEPS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)

VideoFile = str | os.PathLike[str] | bytes


def _video_module() -> ModuleType:
    """:mod:`moondream_tools.video`, imported on first use (it imports PyAV lazily itself)."""
    return importlib.import_module("..video", __package__)


def sample_step(duration: float) -> float:
    """Seconds between the frames a pass over a ``duration``-second video samples: the
    first of 0.5, 1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10 min that gives at most
    :data:`SAMPLED_FRAMES` frames.

    >>> sample_step(12.0), sample_step(60.0), sample_step(3600.0)
    (0.5, 2.0, 120.0)
    """
    for step in _STEPS:
        if duration / step <= SAMPLED_FRAMES:
            return step
    return math.ceil(duration / SAMPLED_FRAMES)


@dataclass
class RegisteredVideo:
    """A video the application registered (trusted: not under the image policy)."""

    source: VideoFile
    _info: VideoInfo | None = None

    async def info(self) -> VideoInfo:
        """Its duration, frame rate and upright size (probed once)."""
        if self._info is None:
            self._info = await _video_module().probe_video(self.source)
        return self._info

    async def frame(self, name: str, time: float) -> Image.Image:
        """The upright frame shown at ``time`` seconds; a time outside the video is a
        :class:`ToolArgumentsError` saying how long it is."""
        info = await self.info()
        if not math.isfinite(time) or time < 0:
            raise ToolArgumentsError(f"time must be a number of seconds >= 0, got {time!r}")
        end = info.duration + (1.0 / info.fps if info.fps > 0 else 0.0)
        if info.duration > 0 and time > end:
            raise ToolArgumentsError(
                f"{name} is {info.duration:.2f} s long: time {time:g} s is past its end (use 0-{info.duration:.2f})"
            )
        return await _video_module().frame_at(self.source, time)


def check_video(source: object) -> VideoFile:
    """``source`` if it is a video file (path or bytes) PyAV can read, else an error."""
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    if not isinstance(source, (str, os.PathLike, bytes)):
        raise TypeError(f"a video is a path or the bytes of a video file, got {type(source).__name__}")
    if not _video_module().is_video(source):
        what = repr(os.fspath(source)) if not isinstance(source, bytes) else f"{len(source)} bytes"
        raise ImageError(f"{what} is not a video this library can read (a video file such as .mp4, .mov, .mkv, .webm)")
    return source


async def timeline_of(
    backend: VisionBackend, video: RegisteredVideo, skill: Literal["point", "detect"], phrase: str, max_objects: int,
) -> tuple[VideoTimeline, FrameResult]:
    """A pass over the whole video: every :func:`sample_step` seconds, ``skill`` for
    ``phrase``, tracked. Returns the timeline and the frame where the phrase was most
    numerous (the first answered frame when it was never seen).

    Raises:
        MoondreamError: every sampled frame failed (the first failure's message).
    """
    info = await video.info()
    step = sample_step(info.duration)
    frames = [
        frame
        async for frame in _video_module().process_video(
            backend, video.source, skill, object=phrase, every=step, settings={"max_objects": max_objects},
            max_concurrency=getattr(backend, "max_concurrency", None) or 8,
            max_frames=2 * SAMPLED_FRAMES,  # a video whose container gives no duration: its start only
        )
    ]
    answered = [f for f in frames if f.result is not None]
    if not answered:
        first = next((f.error for f in frames if f.error), "the video has no frames")
        raise MoondreamError(f"no sampled frame of the video could be read: {first}")
    spans: list[TimeSpan] = []
    start = end = None
    most = 0
    for frame in answered:
        count = len(_objects(frame))
        if count:
            if start is None:
                start, most = frame.time, 0
            end, most = frame.time, max(most, count)
        elif start is not None:
            spans.append(TimeSpan(start=start, end=end, most=most))
            start = None
    if start is not None:
        spans.append(TimeSpan(start=start, end=end, most=most))
    peak = max(answered, key=lambda f: len(_objects(f)))  # the first of the most numerous
    tracks = {t for f in answered for t in f.track_ids if t is not None}
    timeline = VideoTimeline(
        duration=info.duration, every=step, frames=len(answered), failed=len(frames) - len(answered),
        spans=spans, tracks=len(tracks),
    )
    return timeline, peak


def _objects(frame: FrameResult) -> list[object]:
    result = frame.result
    if isinstance(result, Points):
        return list(result.points)
    if isinstance(result, Detections):
        return list(result.objects)
    return []
