""":func:`annotate_video`: the frames of :func:`process_video` drawn on and encoded as a video."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from PIL import Image

from ..render import Color, color_for, draw_boxes, draw_mask, draw_points
from ..results import Detections, Points, Segmentation
from ._decode import VideoSource, _describe, load_av, _open, _reason, _rotation, _stream_facts, _upright
from ..errors import ImageError
from .process import FrameResult

__all__ = ["AnnotatedVideo", "VIDEO_CODECS", "annotate_video", "video_codec"]

#: Encoders tried in order: H.264 (libx264, then OpenH264), then MPEG-4 Part 2.
VIDEO_CODECS = ("libx264", "libopenh264", "mpeg4")
#: Timestamps of the output, in milliseconds.
_TIME_BASE = Fraction(1, 1000)


@dataclass(frozen=True)
class AnnotatedVideo:
    """What :func:`annotate_video` wrote: the file, its frames, size and codec.

    Example::

        written = await annotate_video("clip.mp4", frames, "clip-annotated.mp4")
        print(f"{written.frames} frames, {written.width}x{written.height}, {written.codec}")
    """

    path: str
    frames: int
    width: int
    height: int
    codec: str


def video_codec() -> str:
    """The best video encoder this PyAV build has (:data:`VIDEO_CODECS` in order).

    >>> video_codec() in VIDEO_CODECS
    True
    """
    av = load_av()
    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # not in this build
            continue
        return name
    raise RuntimeError("this PyAV build has no H.264 or MPEG-4 encoder")  # pragma: no cover


def _label(phrase: str, track_id: int | None) -> str:
    return phrase if track_id is None else f"{phrase} {track_id}"


def _color(phrase: str, track_id: int | None) -> Color:
    return color_for(phrase if track_id is None else f"{phrase} #{track_id}")


def draw_frame(image: Image.Image, frame: FrameResult, *, mask_opacity: float = 0.4) -> None:
    """Draw one frame's result on ``image`` (upright RGB, any size), in place: each object
    with its own label, ``"<object> <track id>"`` (the object alone while untracked), in
    the track's color (:func:`~moondream_tools.render.color_for` of ``"<object> #<id>"``).

    Example::

        image = await frame_at("clip.mp4", frame.time)
        draw_frame(image, frame)
        image.save(f"frame-{frame.index}.png")
    """
    result = frame.result
    if result is None:
        return
    phrase = getattr(result, "object", None) or "object"
    ids = list(frame.track_ids)
    if isinstance(result, Segmentation):
        parts = result.instances or ([result] if result.found else [])
        ids += [None] * (len(parts) - len(ids))
        for part, track_id in zip(parts, ids):
            mask = part.mask("L", size=image.size)
            draw_mask(image, mask, _label(phrase, track_id), rings=part.rings(image.size),
                      color=_color(phrase, track_id), opacity=mask_opacity)
    elif isinstance(result, Detections):
        ids += [None] * (len(result.objects) - len(ids))
        for box, track_id in zip(result.objects, ids):
            draw_boxes(image, [(box.x_min, box.y_min, box.x_max, box.y_max)], _label(phrase, track_id),
                       color=_color(phrase, track_id))
    elif isinstance(result, Points):
        ids += [None] * (len(result.points) - len(ids))
        for point, track_id in zip(result.points, ids):
            draw_points(image, [(point.x, point.y)], _label(phrase, track_id), color=_color(phrase, track_id))


class _Writer:
    """Decodes the source forward and encodes annotated frames (blocking; one thread)."""

    def __init__(self, source: VideoSource, output: str, codec: str | None, mask_opacity: float) -> None:
        av = load_av()
        self.name = _describe(source)
        self.output = output
        self.mask_opacity = mask_opacity
        self.codec = codec or video_codec()
        self._input = _open(source)
        self._stream, self.fps, self.start, self._time_base = _stream_facts(self._input)
        self._stream.thread_type = "AUTO"
        self._frames = self._input.decode(self._stream)
        self._output: Any = None
        self._out_stream: Any = None
        self._av = av
        self.written = 0
        self.size = (0, 0)
        self._last_pts = -1
        self._closed = False

    def _next_source_frame(self, time: float) -> Any:
        while True:
            try:
                frame = next(self._frames, None)
            except Exception as exc:
                raise ImageError(f"{self.name}: cannot decode the video ({_reason(exc)})") from None
            if frame is None:
                raise ValueError(f"no frame at {time:.3f} s in {self.name}: are these results of this video?")
            # seconds from the first frame, as FrameResult.time
            frame_time = float(frame.pts * self._time_base) - self.start if frame.pts is not None else time
            if frame_time + 1e-9 >= time:
                return frame

    def _open_output(self, width: int, height: int) -> None:
        av = self._av
        self.size = (width - width % 2, height - height % 2)  # 4:2:0 needs even sizes
        self._output = av.open(self.output, "w")
        rate = Fraction(self.fps).limit_denominator(1001) if self.fps else Fraction(30)
        stream = self._output.add_stream(self.codec, rate=rate)
        stream.width, stream.height = self.size
        stream.pix_fmt = "yuv420p"
        stream.time_base = _TIME_BASE
        stream.codec_context.time_base = _TIME_BASE
        if self.codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        self._out_stream = stream

    def add(self, frame: FrameResult) -> None:
        source = self._next_source_frame(frame.time)
        image = _upright(source.to_image(), _rotation(source))
        if self._output is None:
            self._open_output(*image.size)
        if image.size != self.size:
            image = image.crop((0, 0, *self.size))
        draw_frame(image, frame, mask_opacity=self.mask_opacity)
        out = self._av.VideoFrame.from_image(image)
        pts = max(self._last_pts + 1, round(frame.time / _TIME_BASE))  # the output starts at 0
        out.pts, out.time_base = pts, _TIME_BASE
        self._last_pts = pts
        for packet in self._out_stream.encode(out):
            self._output.mux(packet)
        self.written += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._output is not None:
                for packet in self._out_stream.encode():
                    self._output.mux(packet)
        finally:
            if self._output is not None:
                self._output.close()
            self._input.close()


async def annotate_video(
    source: VideoSource,
    results: Iterable[FrameResult] | AsyncIterable[FrameResult],
    output: str | os.PathLike[str],
    *,
    codec: str | None = None,
    mask_opacity: float = 0.4,
) -> AnnotatedVideo:
    """Write ``output``: one frame per result (the source frame at the result's time, upright
    and full size, with the result drawn by :mod:`moondream_tools.render`, each object
    labelled ``"<object> <track id>"``), at the results' times (seconds from the first
    frame: the output starts at 0 whatever the source's first timestamp).

    ``results`` are those of :func:`process_video` on ``source``, in order: a list, or the
    iterator itself (frames are written as results arrive, so one pass processes and
    annotates). The container follows ``output``'s extension (``.mp4``, ``.mkv``, ...);
    ``codec`` defaults to :func:`video_codec` (H.264 when the PyAV wheel has it). Sizes are
    cut to even numbers of pixels (4:2:0). Decoding, drawing and encoding run in a
    worker thread.

    Example::

        results = process_video(md, "clip.mp4", "detect", object="car", every=0.5)
        written = await annotate_video("clip.mp4", results, "clip-cars.mp4")
        print(written.frames, written.codec)
    """
    if not 0.0 <= mask_opacity <= 1.0:
        raise ValueError(f"mask_opacity must be within 0..1, got {mask_opacity}")
    path = os.fspath(output)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moondream-video-annotate")

    async def run(func: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(executor.submit(func, *args))

    writer: _Writer | None = None
    try:
        writer = await run(_Writer, source, path, codec, mask_opacity)
        if isinstance(results, AsyncIterable):
            async for frame in results:
                await run(writer.add, frame)
        else:
            for frame in results:
                await run(writer.add, frame)
        await run(writer.close)
        return AnnotatedVideo(path=path, frames=writer.written, width=writer.size[0], height=writer.size[1],
                              codec=writer.codec)
    except BaseException:
        closer = getattr(results, "aclose", None)
        if closer is not None:  # e.g. process_video's iterator: cancel its requests now
            await closer()
        if writer is not None:
            executor.submit(writer.close)
        raise
    finally:  # the close queued above runs first; the thread ends with it
        await asyncio.shield(asyncio.to_thread(executor.shutdown, True))
