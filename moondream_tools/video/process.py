""":func:`process_video`: a skill over the frames of a video, concurrently, in frame order,
with track ids."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from .._concurrency import stream_in_order
from ..backend import (
    CaptionLength,
    SamplingSettings,
    SpatialRef,
    VisionBackend,
    check_length,
    check_object,
    check_question,
    check_settings,
    check_spatial_refs,
    require_skill,
)
from ..errors import MoondreamError
from ..images import ImageSettings, PreparedImage, upload_sizes
from ..images.decode import _jpeg_data_url
from ..results import Detections, ImageSize, Points, Segmentation
from ._decode import DecodedFrame, FrameReader, VideoInfo, VideoSource, probe, read_frame_at
from .tracks import FrameSkillResult, Tracker, assign_ids, default_tracker, objects_of

__all__ = ["FrameResult", "VideoSkill", "frame_at", "probe_video", "process_video"]

VideoSkill = Literal["caption", "query", "detect", "point", "segment"]
_SKILLS = ("caption", "query", "detect", "point", "segment")


@dataclass(frozen=True)
class FrameResult:
    """One sampled frame's answer.

    Attributes:
        index: the frame's index in the video stream (0 for the first frame).
        time: seconds from the first frame (its timestamp, pts x the stream's time base,
            less the stream's start, ``VideoInfo.start_time``): 0.0 for the first frame,
            the time :func:`frame_at` takes.
        image_size: the upright size of the frame (rotation metadata applied): every
            pixel coordinate of ``result`` is in it.
        result: the skill's result (``Detections``, ``Points``, ``Segmentation``,
            ``Caption`` or ``Answer``), or None when the request failed.
        track_ids: one per object of ``result`` (detect's boxes, point's points, a
            segmentation's instances or its one mask), in the same order: the object's
            track, or None while its track is not confirmed (or without tracking).
            Empty for caption and query.
        error: why the request failed (``result`` is None), else None.

    Example::

        async for frame in process_video(md, "clip.mp4", "detect", object="car", every=0.5):
            for box, track in zip(frame.result.to_pixels(), frame.track_ids):
                print(f"{frame.time:6.2f} s  car {track}: {box.x_min:.0f},{box.y_min:.0f}")
    """

    index: int
    time: float
    image_size: ImageSize
    result: FrameSkillResult | None
    track_ids: list[int | None] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the frame's request succeeded."""
        return self.error is None


async def probe_video(source: VideoSource) -> VideoInfo:
    """Duration, frame count, frame rate, upright size, rotation and codec of a video (in a
    worker thread: reads the header and decodes the first frame).

    Raises:
        ImageError: not a video, corrupt, truncated or unreadable.

    Example::

        info = await probe_video("clip.mp4")
        print(info.duration, info.frames, info.fps, (info.width, info.height), info.rotation)
    """
    return await asyncio.to_thread(probe, source)


async def frame_at(source: VideoSource, time: float) -> Image.Image:
    """The upright RGB frame shown at ``time`` seconds from the first frame (as
    ``FrameResult.time``): the last frame at or before it (the last one past the end).
    Seeks to the keyframe before ``time`` and decodes forward, in a worker thread; where
    the seek lands late (containers without an index, such as MPEG-TS), it seeks again
    earlier.

    Raises:
        ImageError: not a video, corrupt, truncated or unreadable.
        ValueError: ``time`` is negative or not finite.

    Example::

        image = await frame_at("clip.mp4", 12.5)
        boxes = await md.detect(image, "car")
    """
    if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time) or time < 0:
        raise ValueError(f"time must be a finite number of seconds >= 0, got {time!r}")
    return await asyncio.to_thread(read_frame_at, source, float(time))


class _Frames:
    """The reader on its own thread: one frame decoded per :meth:`next`, in order."""

    def __init__(self, reader_args: dict[str, Any]) -> None:
        self._args = reader_args
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moondream-video")
        self._reader: FrameReader | None = None
        self._lock = asyncio.Lock()
        self._ended = False

    async def start(self) -> FrameReader:
        def open_reader() -> FrameReader:
            self._reader = FrameReader(**self._args)
            return self._reader

        return await asyncio.wrap_future(self._executor.submit(open_reader))

    async def next(self) -> DecodedFrame | None:
        async with self._lock:  # FIFO: callers get frames in the order they asked
            if self._ended:
                return None
            assert self._reader is not None
            frame = await asyncio.wrap_future(self._executor.submit(self._reader.read))
            if frame is None:
                self._ended = True
            return frame

    async def aclose(self) -> None:
        def close() -> None:
            if self._reader is not None:
                self._reader.close()

        # Queued after a read still running (after a cancellation), so the container is
        # never closed under the decoder; the thread ends once it is done.
        self._executor.submit(close)
        # Waits for the close (and the thread's end) without blocking the event loop.
        await asyncio.shield(asyncio.to_thread(self._executor.shutdown, True))


def _encode(frame: DecodedFrame, settings: ImageSettings) -> PreparedImage:
    """Convert (upright, upload size) and JPEG-encode one frame (blocking)."""
    image = frame.image()
    url = _jpeg_data_url(image, settings)
    width, height = image.size
    return PreparedImage(
        data_url=url, width=frame.source_size[0], height=frame.source_size[1], upload_width=width,
        upload_height=height,
    )


def process_video(
    backend: VisionBackend,
    source: VideoSource,
    skill: VideoSkill,
    *,
    object: str | None = None,
    question: str | None = None,
    length: CaptionLength = "normal",
    spatial_refs: Sequence[SpatialRef] | None = None,
    settings: SamplingSettings | None = None,
    every: float | None = None,
    keyframes: bool = False,
    max_frames: int | None = None,
    max_concurrency: int = 8,
    track: bool | Tracker = True,
    follow: bool = False,
) -> AsyncGenerator[FrameResult, None]:
    """Run ``skill`` on the frames of a video; an async generator of :class:`FrameResult`,
    **in frame order**, while up to ``max_concurrency`` frames are in flight.

    Args:
        backend: any :class:`~moondream_tools.VisionBackend`.
        source: a local video file (path), its bytes or a binary file object.
        skill: ``"detect"``, ``"point"``, ``"segment"`` (with ``object``), ``"query"``
            (with ``question``) or ``"caption"`` (with ``length``).
        spatial_refs: points or boxes (normalized) sent with every frame (point, segment,
            query), as the segmentation guide suggests for video.
        settings: sampling settings sent with every request (e.g. ``{"max_objects": 20}``).
        every: sample one frame every ``every`` seconds (the first frame at or after each
            multiple of ``every`` from the first frame); default: every frame.
        keyframes: only the keyframes (the decoder skips every other frame: fast).
        max_frames: stop after this many sampled frames.
        max_concurrency: frames decoded, encoded or waiting for an answer at once.
        track: link objects across frames with ByteTrack (Roboflow's ``trackers``) into
            ``track_ids``; False: no tracking (ids None); or any tracker with
            ``trackers``' interface (e.g. ``trackers.SORTTracker()``), used as given.
        follow: segment only: send each frame the box of the object in the last frame
            where it was found as the spatial hint (the first frame gets ``spatial_refs``).
            Each request then waits for the previous frame's answer (decoding and
            encoding still run ahead).

    How it runs: one worker thread decodes the video with PyAV (FFmpeg's own decoding
    threads) and drops the frames not sampled; each sampled frame is then, on a worker
    thread of its own, scaled and converted to RGB once, straight to the skill's upload
    size (``backend.image_settings``: the size from which the model loses nothing;
    segmentation's larger one for segment), turned upright (rotation metadata, like EXIF
    for photos), JPEG-encoded and sent. A frame is decoded only when a slot is free, so at
    most ``max_concurrency`` decoded frames are alive, and at most ``2 x max_concurrency``
    finished results (no pixels) wait for a slower one before them.

    Errors: a bad source (not a video, corrupt, truncated, unreadable) raises
    :class:`~moondream_tools.ImageError` on the first iteration. A failed request (a
    :class:`~moondream_tools.MoondreamError` after the backend's retries) does not stop
    the stream: that frame comes with ``result`` None and its message in ``error`` (as
    the indexer and the command line record a failed image), and the tracks carry on.
    Anything else is a bug and propagates. Closing the iterator early (``break``)
    cancels the requests in flight and closes the video.

    Example::

        async with AsyncMoondream() as md:
            async for frame in process_video(md, "street.mp4", "detect", object="car", every=0.5):
                print(frame.index, f"{frame.time:.2f}", frame.result.to_pixels(), frame.track_ids)
    """
    if skill not in _SKILLS:
        raise ValueError(f"skill must be one of {', '.join(_SKILLS)}, got {skill!r}")
    require_skill(backend, skill)
    if skill in ("detect", "point", "segment"):
        if object is None:
            raise ValueError(f"{skill} needs object=, the phrase to find (e.g. 'car')")
        check_object(object)
    elif object is not None:
        raise ValueError(f"object= is for detect, point and segment, not {skill}")
    if skill == "query":
        if question is None:
            raise ValueError("query needs question=")
        check_question(question)
    elif question is not None:
        raise ValueError(f"question= is for query, not {skill}")
    check_length(length)
    refs = check_spatial_refs(spatial_refs)
    if refs is not None and skill not in ("point", "segment", "query"):
        raise ValueError(f"spatial_refs is for point, segment and query, not {skill}")
    sampling = check_settings(settings)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every) or every <= 0:
            raise ValueError(f"every must be a positive number of seconds, got {every!r}")
        if keyframes:
            raise ValueError("every= and keyframes=True are two ways of sampling: give one")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    if follow and skill != "segment":
        raise ValueError("follow=True passes the previous frame's mask box to segment: it is for segment only")
    if not isinstance(track, bool) and not (hasattr(track, "update") and hasattr(track, "reset")):
        raise TypeError(f"track must be True, False or a tracker with update() and reset(), got {type(track).__name__}")
    if not isinstance(source, (str, bytes, bytearray, memoryview)) and not hasattr(source, "read") and not hasattr(
        source, "__fspath__"
    ):
        raise TypeError(f"a video source is a path, bytes or a binary file object, got {type(source).__name__}")

    image_settings = backend.image_settings
    if skill != "segment":  # nothing is segmented: one upload size
        image_settings = dataclasses.replace(image_settings, segment_upload=False)

    def size_for(width: int, height: int) -> tuple[int, int]:
        skill_size, segment_size = upload_sizes(width, height, image_settings)
        return segment_size if skill == "segment" else skill_size

    reader_args = {
        "source": source, "every": every, "keyframes": keyframes, "max_frames": max_frames, "size_for": size_for,
        "max_pixels": image_settings.max_pixels,
    }
    call = _Caller(backend, skill, object, question, length, refs, sampling, follow)
    return _run(reader_args, call, image_settings, max_concurrency, track, every)


class _Caller:
    """One request per frame; with ``follow``, each waits for the previous frame's box."""

    def __init__(
        self, backend: VisionBackend, skill: str, obj: str | None, question: str | None, length: CaptionLength,
        refs: list[list[float]] | None, settings: dict[str, Any] | None, follow: bool,
    ) -> None:
        self.backend, self.skill, self.object, self.question = backend, skill, obj, question
        self.length, self.refs, self.settings, self.follow = length, refs, settings, follow
        self._hints: dict[int, asyncio.Future[list[list[float]] | None]] = {}

    def _hint(self, ordinal: int) -> asyncio.Future[list[list[float]] | None]:
        future = self._hints.get(ordinal)
        if future is None:
            future = self._hints[ordinal] = asyncio.get_running_loop().create_future()
            if ordinal < 0:
                future.set_result(self.refs)
        return future

    async def __call__(self, ordinal: int, image: PreparedImage) -> FrameSkillResult:
        backend, settings = self.backend, self.settings
        if self.skill == "caption":
            return await backend.caption(image, self.length, settings=settings)  # type: ignore[arg-type]
        if self.skill == "query":
            assert self.question is not None
            return await backend.query(image, self.question, spatial_refs=self.refs, settings=settings)  # type: ignore[arg-type]
        assert self.object is not None
        if self.skill == "detect":
            return await backend.detect(image, self.object, settings=settings)  # type: ignore[arg-type]
        if self.skill == "point":
            return await backend.point(image, self.object, spatial_refs=self.refs, settings=settings)  # type: ignore[arg-type]
        if not self.follow:
            return await backend.segment(image, self.object, spatial_refs=self.refs, settings=settings)  # type: ignore[arg-type]
        refs = await self._hint(ordinal - 1)
        self._hints.pop(ordinal - 1, None)
        mine = self._hint(ordinal)
        try:
            result = await backend.segment(image, self.object, spatial_refs=refs, settings=settings)  # type: ignore[arg-type]
        except BaseException:
            if not mine.done():
                mine.set_result(refs)  # a failed frame: the next one gets the same hint
            raise
        box = result.bbox
        mine.set_result([[box.x_min, box.y_min, box.x_max, box.y_max]] if result.found and box is not None else refs)
        return result


async def _run(
    reader_args: dict[str, Any], call: _Caller, settings: ImageSettings, concurrency: int, track: bool | Tracker,
    every: float | None,
) -> AsyncGenerator[FrameResult, None]:
    frames = _Frames(reader_args)
    try:
        reader = await frames.start()
        tracker: Tracker | None
        if track is True:
            tracker = default_tracker(every if every is not None else 1.0 / (reader.fps or 30.0))
        elif track is False:
            tracker = None
        else:
            tracker = track
            tracker.reset()

        async def one(_: int) -> FrameResult | None:
            frame = await frames.next()
            if frame is None:
                return None
            try:
                prepared = await asyncio.to_thread(_encode, frame, settings)
            finally:
                frame.raw = None  # the JPEG is all that is kept
            size = ImageSize(width=frame.source_size[0], height=frame.source_size[1])
            try:
                result = await call(frame.ordinal, prepared)
            except MoondreamError as exc:
                return FrameResult(frame.index, frame.time, size, None, [], f"{type(exc).__name__}: {exc}")
            return FrameResult(frame.index, frame.time, size, result)

        results = stream_in_order(one, itertools.count(), concurrency=concurrency, window=2 * concurrency)
        async with contextlib.aclosing(results):
            async for item in results:
                if item is None:
                    break
                if item.result is not None and isinstance(item.result, (Detections, Points, Segmentation)):
                    if tracker is not None:
                        ids = assign_ids(tracker, item.result, item.image_size, item.time)
                    else:
                        ids = [None] * len(objects_of(item.result))
                    item = dataclasses.replace(item, track_ids=ids)
                yield item
    finally:
        await frames.aclose()

