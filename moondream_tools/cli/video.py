"""Video inputs of the skill commands: frames through :func:`moondream_tools.video.process_video`,
one record per frame, a record per video with its tracks, an annotated video.

A video is one input of the command: its frame records come first (``frame``, ``time``,
``track_ids`` and the skill's fields, in the shape image records have), then the video's
own record (``video``: frames, failed frames, duration, fps, rotation, codec; ``tracks``:
the per-track summary; ``annotated``: the annotated video written, or None). The video's
record is what a rerun checks: a video whose record has no error is skipped; frame records
are never resumed one by one (a rerun redoes the whole video). A failed frame has its error
in its record and the video goes on; the video's record then says how many failed.

``moondream_tools.video`` (PyAV, trackers) is imported only when a video is run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError, MoondreamError
from .records import Record
from ..indexing.skills import (
    CONSECUTIVE_BACKEND_FAILURES,
    Asked,
    RunState,
    base_record,
    detections_fields,
    message,
    points_fields,
    segmentation_fields,
)

__all__ = ["VIDEO_EXTRA", "VIDEO_SUFFIXES", "VideoOptions", "annotated_names", "looks_like_video", "run_video",
           "video_arguments", "videos_supported"]

logger = logging.getLogger("moondream_tools")

#: Endings taken for videos without opening the file (moondream_tools.video.VIDEO_EXTENSIONS;
#: not imported from there so that listing inputs never loads the video package).
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv", ".flv",
     ".3gp", ".ogv"}
)


@dataclass(frozen=True)
class VideoOptions:
    """How videos are sampled: ``every`` seconds, keyframes only, at most ``max_frames``."""

    every: float | None = None
    keyframes: bool = False
    max_frames: int | None = None


#: How to install what videos need (PyAV, trackers).
VIDEO_EXTRA = 'pip install "moondream-tools[video]"'


def looks_like_video(source: str) -> bool:
    """Whether an input is taken as a video: a local path named like one (a video ending,
    :data:`VIDEO_SUFFIXES`; the file is not opened).

    >>> looks_like_video("clips/a.MP4"), looks_like_video("a.png"), looks_like_video("https://x/a.mp4")
    (True, False, False)
    """
    if "://" in source or source.startswith("data:"):
        return False
    return Path(source).suffix.lower() in VIDEO_SUFFIXES


def videos_supported() -> bool:
    """Whether PyAV (the ``video`` extra) can be imported: imports it."""
    from ..video import _decode

    try:
        _decode.load_av()
    except ImportError:
        return False
    return True


def video_arguments(arguments: dict[str, Any], options: VideoOptions) -> dict[str, Any]:
    """The arguments recorded for a video: the command's and the sampling."""
    return {**arguments, "every": options.every, "keyframes": options.keyframes, "max_frames": options.max_frames}


def annotated_names(videos: Iterable[str]) -> dict[str, str]:
    """The annotated video's file name per video: ``STEM.annotated.mp4``, with 8 hex digits
    of the source (as given) after the stem when two videos share it (``a/clip.mp4`` and
    ``b/clip.mp4``, ``clip.mp4`` and ``clip.mov``), as exported images are named.

    >>> annotated_names(["a/clip.mp4", "b/clip.mov", "street.mp4"])["street.mp4"]
    'street.annotated.mp4'
    """
    ordered = sorted(videos)
    counts = Counter(Path(source).stem.lower() for source in ordered)
    names: dict[str, str] = {}
    taken: set[str] = set()
    for source in ordered:
        stem = Path(source).stem
        if counts[stem.lower()] > 1:
            stem = f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        name, n = stem, 2
        while name.lower() in taken:
            name, n = f"{stem}-{n}", n + 1
        taken.add(name.lower())
        names[source] = name + ".annotated.mp4"
    return names


async def _fields(asked: Asked, result: Any) -> dict[str, Any]:
    if asked.skill == "caption":
        return {"caption": result.caption}
    if asked.skill == "query":
        return {"answer": result.answer}
    if asked.skill == "segment":
        return await asyncio.to_thread(segmentation_fields, result)
    if asked.skill == "detect":
        return detections_fields(result)
    return points_fields(result)


async def run_video(
    state: RunState,
    asked: Asked,
    source: str,
    arguments: dict[str, Any],
    options: VideoOptions,
    *,
    concurrency: int,
    annotate: Path | None,
    emit_frame: Callable[[Record], None],
    stop: Callable[[], bool],
) -> Record:
    """Every sampled frame of ``source`` through ``asked``: frame records go to ``emit_frame``
    as they come (in frame order); returns the video's record. ``annotate``: the annotated
    video to write (named by :func:`annotated_names`), or None. Never raises for a bad video
    or a failed request (the message goes in ``error``)."""
    from ..video import annotate_video, probe_video, process_video, summarize_tracks

    record = base_record(source, asked.skill, arguments)
    try:
        info = await probe_video(source)
    except ImageError as exc:
        record["error"] = message(exc)
        return record
    record["width"], record["height"] = info.width, info.height
    skill = "point" if asked.skill == "count" else asked.skill
    settings = {"max_objects": asked.max_objects} if asked.max_objects is not None and skill in ("detect", "point") else None
    frames = process_video(
        state.backend, source, skill, object=asked.object, question=asked.question,  # type: ignore[arg-type]
        length=asked.length, settings=settings,  # type: ignore[arg-type]
        every=options.every, keyframes=options.keyframes, max_frames=options.max_frames, max_concurrency=concurrency,
    )
    seen: list[Any] = []
    failed: list[str] = []
    stopped: list[str] = []
    streak = [0]

    async def recorded() -> AsyncIterator[Any]:
        async for frame in frames:
            state.requests += 1
            line = base_record(source, asked.skill, arguments)
            line["width"], line["height"] = frame.image_size.as_tuple()
            line["frame"], line["time"] = frame.index, round(frame.time, 6)
            if frame.result is not None:
                line.update(await _fields(asked, frame.result))
                line["track_ids"] = list(frame.track_ids)
                state.failure_streak = streak[0] = 0
            else:
                line["track_ids"] = []
                failed.append(frame.error or "failed")
                streak[0] += 1
            line["error"] = frame.error
            emit_frame(line)
            seen.append(frame)
            yield frame
            if streak[0] >= CONSECUTIVE_BACKEND_FAILURES:
                state.failure_streak, state.last_failure = streak[0], failed[-1]
                stopped.append(f"stopped after {streak[0]} frames in a row failed ({failed[-1]})")
                break
            if stop():
                stopped.append(f"interrupted after {len(seen)} frames (a rerun redoes this video)")
                break

    written = None
    try:
        if annotate is not None:
            annotate.parent.mkdir(parents=True, exist_ok=True)
            written = await annotate_video(source, recorded(), annotate)
        else:
            async for _ in recorded():
                pass
    except ImageError as exc:
        record["error"] = message(exc)
    except MoondreamError as exc:  # pragma: no cover - process_video records failed frames itself
        record["error"] = message(exc)
    except OSError as exc:  # the annotated video cannot be written (PyAV's errors are OSErrors too)
        record["error"] = f"writing the annotated video failed: {exc.strerror or exc}"
    finally:
        await frames.aclose()
    record["video"] = {
        "frames": len(seen), "failed_frames": len(failed), "duration": round(info.duration, 6), "fps": info.fps,
        "rotation": info.rotation, "codec": info.codec,
    }
    record["tracks"] = [track.as_dict() for track in summarize_tracks(f for f in seen if f.result is not None)]
    record["annotated"] = written.path if written is not None else None
    if record.get("error") is None:
        if stopped:
            record["error"] = stopped[0]
        elif failed:
            record["error"] = f"{len(failed)} of {len(seen)} frames failed; first: {failed[0]}"
        else:
            record["error"] = None
    return record
