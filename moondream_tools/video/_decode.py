"""Opening and decoding videos with PyAV: probing, sampled frames resized once, seeking.

Everything here blocks: callers run it in a worker thread. PyAV is imported here (and in
the other modules of this package) only: the rest of the library never imports it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Union

from PIL import Image

from ..errors import ImageError

__all__ = ["VIDEO_EXTENSIONS", "VideoInfo", "VideoSource", "is_video"]

#: What :func:`process_video`, :func:`probe_video` and :func:`frame_at` read: a local path
#: (str or ``os.PathLike``), the bytes of a video file, or a binary file object.
VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]

#: File name endings the command line and :func:`is_video` take for videos.
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv", ".flv",
     ".3gp", ".ogv"}
)
#: Demuxers that read still images (FFmpeg opens a JPEG as ``jpeg_pipe``): not videos.
_IMAGE_DEMUXERS = ("image2", "gif", "apng", "webp")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` reads of a video.

    Attributes:
        duration: the stream's length in seconds, from its first frame to its end
            (end - ``start_time``, as the header says; 0.0 when it does not).
        frames: the stream's frame count, or an estimate from duration x fps when the
            container does not say (``frames_exact`` False).
        frames_exact: whether ``frames`` was read from the container.
        fps: the average frame rate (frames per second).
        width, height: the upright size (rotation applied), as frames are reported.
        rotation: degrees the stored frames are turned counterclockwise to be upright
            (0, 90, 180 or 270; phone videos shot in portrait say 270 or 90).
        codec: the decoder's name (``h264``, ``hevc``, ``vp9``, ...).
        start_time: the stream's first timestamp in the file, in seconds (usually 0.0;
            MPEG-TS files often start near 1.4). Every time this package reports or takes
            (``FrameResult.time``, :func:`frame_at`, ``every=``) is in seconds from the first
            frame, i.e. the file's timestamp minus ``start_time``.

    Example::

        info = probe_video("clip.mp4")
        print(f"{info.width}x{info.height}, {info.duration:.1f} s at {info.fps:g} fps ({info.codec})")
    """

    duration: float
    frames: int
    frames_exact: bool
    fps: float
    width: int
    height: int
    rotation: int
    codec: str
    start_time: float = 0.0


def _describe(source: VideoSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"video bytes ({len(source)} bytes)"
    return "video file object"


def load_av() -> Any:
    """The ``av`` module (PyAV), or an ImportError saying how to install it."""
    try:
        import av
    except ImportError:  # pragma: no cover - the extra is not installed
        raise ImportError('moondream_tools.video needs PyAV: pip install "moondream-tools[video]"') from None
    return av


def _open(source: VideoSource) -> Any:
    """An input container with a video stream (blocking); :class:`ImageError` otherwise."""
    av = load_av()

    name = _describe(source)
    target: Any
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such video file")
        target = os.fspath(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageError(f"{name}: the video is empty (0 bytes)")
        target = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        target = source
    else:
        raise TypeError(f"a video source is a path, bytes or a binary file object, got {type(source).__name__}")
    try:
        container = av.open(target, "r")
    except av.FFmpegError as exc:
        raise ImageError(f"{name}: not a video, or a corrupt or truncated one ({_reason(exc)})") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read the video: {exc.strerror or exc}") from None
    kind = container.format.name
    if not container.streams.video or kind.endswith("_pipe") or kind.split(",")[0] in _IMAGE_DEMUXERS:
        container.close()
        raise ImageError(f"{name}: not a video (no video stream; FFmpeg reads it as {kind!r})")
    return container


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(": '")[0]


def _rotation(frame: Any) -> int:
    """Degrees (0, 90, 180, 270) to turn a decoded frame counterclockwise to be upright."""
    try:
        degrees = float(frame.rotation)
    except Exception:  # pragma: no cover - no display matrix readable
        return 0
    if not math.isfinite(degrees):  # pragma: no cover
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def _upright(image: Image.Image, rotation: int) -> Image.Image:
    return image if rotation == 0 else image.transpose(_TRANSPOSE[rotation])


def _upright_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    return (height, width) if rotation in (90, 270) else (width, height)


def _stream_facts(container: Any) -> tuple[Any, float, float, Fraction]:
    """(video stream, fps, start seconds, time base) of a container."""
    stream = container.streams.video[0]
    time_base = stream.time_base or Fraction(1, 90000)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    start = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    return stream, fps, start, time_base


def _first_frame(container: Any, stream: Any, name: str) -> Any:
    try:
        for frame in container.decode(stream):
            return frame
    except Exception as exc:  # FFmpeg's errors on corrupt data
        raise ImageError(f"{name}: cannot decode the video ({_reason(exc)})") from None
    raise ImageError(f"{name}: the video has no frames")


def probe(source: VideoSource) -> VideoInfo:
    """:func:`probe_video`, blocking."""
    name = _describe(source)
    container = _open(source)
    try:
        stream, fps, start, time_base = _stream_facts(container)
        frame = _first_frame(container, stream, name)
        rotation = _rotation(frame)
        duration = _length(container, stream, start, time_base)
        exact = bool(stream.frames)
        frames = int(stream.frames) if exact else max(1, round(duration * fps))
        width, height = _upright_size(frame.width, frame.height, rotation)
        return VideoInfo(
            duration=duration, frames=frames, frames_exact=exact, fps=fps, width=width, height=height,
            rotation=rotation, codec=stream.codec_context.name, start_time=start,
        )
    finally:
        container.close()


def _length(container: Any, stream: Any, start: float, time_base: Fraction) -> float:
    """Seconds from the stream's first frame to its end, from the header (0.0 if unknown)."""
    if stream.duration is not None:  # FFmpeg's stream duration: end - start already
        return float(stream.duration * time_base)
    if container.duration is None:
        return 0.0
    duration = container.duration / 1_000_000
    if container.format.name.startswith("matroska"):  # Matroska's Duration is the end timestamp
        duration -= start
    return max(0.0, duration)


def is_video(source: str | os.PathLike[str] | bytes) -> bool:
    """Whether ``source`` is a video this package can read: a path with a video file name
    ending (:data:`VIDEO_EXTENSIONS`) whose container opens with a video stream, or bytes
    that do. Still images (JPEG, PNG, GIF, ...) are not videos. Cheap: reads the container
    header, decodes nothing, never raises for an unreadable file (False).

    >>> is_video("notes.txt"), is_video(b"plain text")
    (False, False)
    """
    if isinstance(source, (str, os.PathLike)):
        if Path(source).suffix.lower() not in VIDEO_EXTENSIONS:
            return False
    elif not isinstance(source, (bytes, bytearray, memoryview)):
        return False
    try:
        _open(source).close()
    except (ImageError, TypeError):
        return False
    return True


@dataclass
class DecodedFrame:
    """One sampled frame as decoded (``raw``, FFmpeg's frame) and where it sits in the stream;
    :meth:`image` converts it (upright RGB at ``size``) once, on any thread, and lets the
    decoded frame go."""

    ordinal: int  # 0, 1, 2, ... among the sampled frames
    index: int  # the frame's index in the stream
    time: float  # seconds from the first frame (pts x time base - the stream's start)
    source_size: tuple[int, int]  # upright size of the stored frame
    size: tuple[int, int]  # upright size to convert to
    rotation: int
    raw: Any = None

    def image(self) -> Image.Image:
        """The frame upright, RGB, at ``size``: one scale and conversion by swscale (area
        averaging), then a lossless quarter turn when the video says so (blocking)."""
        raw, self.raw = self.raw, None
        if raw is None:
            raise RuntimeError("the frame was converted already")
        stored = _upright_size(self.size[0], self.size[1], self.rotation)  # the target, stored orientation
        try:
            rgb = raw.reformat(width=stored[0], height=stored[1], format="rgb24", interpolation="AREA")
            return _upright(rgb.to_image(), self.rotation)
        except Exception as exc:  # pragma: no cover - swscale refusing a frame
            raise ImageError(f"cannot convert frame {self.index} ({_reason(exc)})") from None


class FrameReader:
    """Decodes sampled frames of a video in order (blocking: run :meth:`read` in one worker
    thread at a time); each :class:`DecodedFrame` is converted by whoever holds it.

    ``size_for(upright_width, upright_height)`` gives the upright size frames are converted
    to; ``None`` keeps the stored size. FFmpeg decodes with its own threads
    (``thread_type="AUTO"``); frames not sampled are dropped at once.
    """

    def __init__(
        self,
        source: VideoSource,
        *,
        every: float | None = None,
        keyframes: bool = False,
        max_frames: int | None = None,
        size_for: Callable[[int, int], tuple[int, int]] | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.name = _describe(source)
        self._container = _open(source)
        try:
            self._stream, self.fps, self.start, self._time_base = _stream_facts(self._container)
            self._stream.thread_type = "AUTO"
            if keyframes:
                self._stream.codec_context.skip_frame = "NONKEY"
        except BaseException:
            self._container.close()
            raise
        self._keyframes = keyframes
        self._every = every
        self._max_frames = max_frames
        self._size_for = size_for
        self._max_pixels = max_pixels
        self._frames: Iterator[Any] = self._container.decode(self._stream)
        self._decoded = 0  # frames out of the decoder
        self._sampled = 0
        self._next_time: float | None = None
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._closed = False

    def _index(self, time: float) -> int:
        if not self._keyframes:
            return self._decoded - 1
        return max(0, round(time * self.fps)) if self.fps else self._decoded - 1

    def read(self) -> DecodedFrame | None:
        """The next sampled frame, or None at the end (or after ``max_frames``)."""
        if self._closed or (self._max_frames is not None and self._sampled >= self._max_frames):
            return None
        while True:
            try:
                frame = next(self._frames, None)
            except Exception as exc:  # FFmpeg's errors on corrupt data
                raise ImageError(
                    f"{self.name}: cannot decode the video after frame {self._decoded} ({_reason(exc)})"
                ) from None
            if frame is None:
                return None
            self._decoded += 1
            if frame.pts is not None:
                time = float(frame.pts * self._time_base) - self.start
            else:
                time = (self._decoded - 1) / (self.fps or 1)
            if self._every is not None:
                if self._next_time is None:
                    self._next_time = time
                if time + 1e-9 < self._next_time:
                    continue
                while self._next_time <= time + 1e-9:
                    self._next_time += self._every
            return self._sample(frame, time)

    def _sample(self, frame: Any, time: float) -> DecodedFrame:
        rotation = _rotation(frame)
        upright = _upright_size(frame.width, frame.height, rotation)
        if self._max_pixels is not None and upright[0] * upright[1] > self._max_pixels:
            raise ImageError(
                f"{self.name}: frames are {upright[0]}x{upright[1]} = {upright[0] * upright[1]} pixels, over the"
                f" limit of {self._max_pixels} (raise ImageSettings.max_pixels to allow it)"
            )
        target = self._sizes.get(upright)
        if target is None:
            target = self._sizes[upright] = self._size_for(*upright) if self._size_for is not None else upright
        sampled = DecodedFrame(self._sampled, self._index(time), time, upright, target, rotation, frame)
        self._sampled += 1
        return sampled

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()


def _frame_time(frame: Any, time_base: Fraction) -> float | None:
    return float(frame.pts * time_base) if frame.pts is not None else None


def _decode_to(container: Any, stream: Any, target: float, time_base: Fraction, name: str) -> tuple[Any, bool]:
    """From wherever the container is: (the last frame at or before ``target``, else the
    first one decoded, or None; whether the first frame decoded is at or before it)."""
    chosen = None
    early = False
    try:
        for frame in container.decode(stream):
            frame_time = _frame_time(frame, time_base)
            late = frame_time is not None and frame_time > target + 1e-9
            if chosen is None:
                early = not late
            elif late:
                break
            chosen = frame
            if late:  # the first frame is later than the time asked for
                break
    except Exception as exc:
        if chosen is None:
            raise ImageError(f"{name}: cannot decode the video ({_reason(exc)})") from None
    return chosen, early


def _rewind(container: Any, stream: Any, start: float, time_base: Fraction, name: str) -> None:
    """Seek back to the first frame."""
    try:
        container.seek(0, backward=True, any_frame=False)
    except Exception:  # some demuxers refuse a time before the first timestamp
        try:
            container.seek(int(math.floor(start / time_base)), stream=stream, backward=True, any_frame=False)
        except Exception:
            raise ImageError(f"{name}: cannot seek back to the start of the video") from None


def read_frame_at(source: VideoSource, time: float) -> Image.Image:
    """:func:`frame_at`, blocking."""
    name = _describe(source)
    container = _open(source)
    try:
        stream, _, start, time_base = _stream_facts(container)
        stream.thread_type = "AUTO"
        target = start + time  # ``time`` is from the first frame; the file's timestamps are not
        # A container without an index (MPEG-TS, MPEG-PS) may seek past the keyframe before
        # the target, or past the last frame: then seek again earlier (2 s, 4 s, ... before),
        # and at last decode from the first frame.
        back = 0.0
        while True:
            point = target - back
            from_start = point <= start
            try:
                if not from_start:
                    container.seek(int(math.floor(point / time_base)), stream=stream, backward=True, any_frame=False)
                elif back:
                    _rewind(container, stream, start, time_base, name)
            except ImageError:
                raise
            except Exception:  # not seekable: decode from where the container is (its start)
                if back:
                    raise ImageError(f"{name}: cannot seek in the video") from None
                from_start = True
            chosen, early = _decode_to(container, stream, target, time_base, name)
            if from_start or (chosen is not None and early):
                break
            back = back * 2 if back else 2.0
        if chosen is None:
            raise ImageError(f"{name}: the video has no frames")
        rotation = _rotation(chosen)
        return _upright(chosen.to_image(), rotation)
    finally:
        container.close()
