"""Tracks: the objects of successive frames linked by Roboflow's ``trackers`` (ByteTrack),
and a per-track summary.

Each frame's boxes (detect), points (point) or masks' boxes (segment) are given to a
:class:`trackers.ByteTrackTracker` in pixels of the upright frame with the frame's
timestamp, so sampled frames (``every=0.5``) are predicted over the right time gap. A
track is confirmed after 2 consecutive frames; until then its id is None. Ids start at 1
and are never reused within a video.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union

from ..geometry import box_to_pixels, point_to_pixels
from ..results import Box, Caption, Answer, Detections, ImageSize, PixelBox, Points, Segmentation

if TYPE_CHECKING:  # pragma: no cover
    from .process import FrameResult

__all__ = ["TrackSummary", "Tracker", "summarize_tracks"]

FrameSkillResult = Union[Detections, Points, Segmentation, Caption, Answer]

#: A point is tracked as a square this fraction of the frame's short side.
POINT_BOX_FRACTION = 0.25
#: Consecutive frames before a track gets an id (ByteTrack's ``minimum_consecutive_frames``).
MINIMUM_CONSECUTIVE_FRAMES = 2


class Tracker(Protocol):
    """What :func:`process_video` needs of a tracker: Roboflow ``trackers``' interface
    (``ByteTrackTracker``, ``SORTTracker``, ``OCSORTTracker``, ... all have it).

    Example::

        import trackers
        frames = process_video(md, "clip.mp4", "detect", object="car", track=trackers.SORTTracker())
    """

    def update(self, detections: Any, frame: Any = None, timestamp: float | None = None) -> Any:
        """Detections (``supervision.Detections``) of one frame -> the same with ``tracker_id``."""
        ...

    def reset(self) -> None:
        """Forget every track."""
        ...


def default_tracker(step_seconds: float) -> Tracker:
    """ByteTrack for frames ``step_seconds`` apart: a lost track is kept for 1 s, or for
    2.5 sampling steps when frames are sparser than that."""
    with warnings.catch_warnings():  # their imports may warn about optional packages
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from trackers import ByteTrackTracker
        except ImportError:  # pragma: no cover - the extra is not installed
            raise ImportError(
                'tracking needs Roboflow\'s trackers: pip install "moondream-tools[video]" (or track=False)'
            ) from None
    keep = max(1.0, 2.5 * step_seconds)
    return ByteTrackTracker(  # type: ignore[no-any-return]
        lost_track_buffer=max(1, round(30 * keep)),  # in 30 fps frames, whatever the rate
        frame_rate=30.0,
        minimum_consecutive_frames=MINIMUM_CONSECUTIVE_FRAMES,
        minimum_iou_threshold=0.1,
    )


def objects_of(result: FrameSkillResult | None) -> list[tuple[float, float, float, float]]:
    """The normalized boxes of a result's objects, in the result's order (a point is the
    zero-size box at it): detect's boxes, point's points, a segmentation's instances (or
    the mask itself). Caption and query have none."""
    if isinstance(result, Detections):
        return [(b.x_min, b.y_min, b.x_max, b.y_max) for b in result.objects]
    if isinstance(result, Points):
        return [(p.x, p.y, p.x, p.y) for p in result.points]
    if isinstance(result, Segmentation):
        parts = result.instances or ([result] if result.found else [])
        return [(s.bbox.x_min, s.bbox.y_min, s.bbox.x_max, s.bbox.y_max) for s in parts if s.bbox is not None]
    return []


def _pixel_boxes(result: FrameSkillResult, size: ImageSize) -> list[tuple[float, float, float, float]]:
    width, height = size.as_tuple()
    if isinstance(result, Points):
        half = POINT_BOX_FRACTION * min(width, height) / 2
        boxes = []
        for point in result.points:
            x, y = point_to_pixels((point.x, point.y), width, height)
            boxes.append((x - half, y - half, x + half, y + half))
        return boxes
    return [box_to_pixels(box, width, height) for box in objects_of(result)]


def assign_ids(tracker: Tracker, result: FrameSkillResult, size: ImageSize, time: float) -> list[int | None]:
    """Update ``tracker`` with one frame's objects; their ids, aligned with the objects
    (None while a track is not confirmed)."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import supervision as sv

    boxes = _pixel_boxes(result, size)
    detections = sv.Detections(
        xyxy=np.array(boxes, dtype=float).reshape(-1, 4), data={"order": np.arange(len(boxes))}
    )
    tracked = tracker.update(detections, timestamp=time)
    ids: list[int | None] = [None] * len(boxes)
    orders = tracked.data.get("order", []) if len(tracked) else []
    for order, tracker_id in zip(orders, tracked.tracker_id if tracked.tracker_id is not None else []):
        ids[int(order)] = int(tracker_id) + 1 if int(tracker_id) >= 0 else None
    return ids


@dataclass(frozen=True)
class TrackSummary:
    """One tracked object over a video.

    Attributes:
        track_id: the id frames carry in ``FrameResult.track_ids`` (from 1).
        label: the object phrase asked for.
        first_index, last_index: frame indexes (in the stream) it was first and last seen in.
        first_time, last_time: the same in seconds.
        frames: sampled frames it was seen in.
        mean_box: its mean box, normalized (for points: the zero-size box at the mean point).
        mean_box_px: the same in pixels of the upright frame.

    Example::

        results = [r async for r in process_video(md, "clip.mp4", "detect", object="car")]
        for track in summarize_tracks(results):
            print(track.track_id, f"{track.first_time:.1f}-{track.last_time:.1f} s", track.frames)
    """

    track_id: int
    label: str
    first_index: int
    last_index: int
    first_time: float
    last_time: float
    frames: int
    mean_box: Box
    mean_box_px: PixelBox

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the command line's ``tracks`` records)."""
        px = self.mean_box_px
        return {
            "track_id": self.track_id, "label": self.label, "first_frame": self.first_index,
            "last_frame": self.last_index, "first_time": round(self.first_time, 6), "last_time": round(self.last_time, 6),
            "frames": self.frames, "mean_box": self.mean_box.model_dump(),
            "mean_box_px": [round(v, 2) for v in (px.x_min, px.y_min, px.x_max, px.y_max)],
        }


@dataclass
class _Seen:
    label: str
    first: tuple[int, float]
    last: tuple[int, float]
    size: ImageSize
    frames: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])


def summarize_tracks(results: Iterable[FrameResult]) -> list[TrackSummary]:
    """Every confirmed track of ``results`` (frames of one video, in order), by id.

    >>> summarize_tracks([])
    []
    """
    seen: dict[int, _Seen] = {}
    for frame in results:
        boxes: Sequence[tuple[float, float, float, float]] = objects_of(frame.result)
        label = getattr(frame.result, "object", None) or "object"
        for box, track_id in zip(boxes, frame.track_ids):
            if track_id is None:
                continue
            entry = seen.get(track_id)
            if entry is None:
                entry = seen[track_id] = _Seen(label, (frame.index, frame.time), (frame.index, frame.time), frame.image_size)
            entry.last = (frame.index, frame.time)
            entry.frames += 1
            for i, value in enumerate(box):
                entry.sums[i] += value
    out = []
    for track_id in sorted(seen):
        entry = seen[track_id]
        x0, y0, x1, y1 = (v / entry.frames for v in entry.sums)
        box = Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1)
        out.append(TrackSummary(
            track_id=track_id, label=entry.label, first_index=entry.first[0], last_index=entry.last[0],
            first_time=entry.first[1], last_time=entry.last[1], frames=entry.frames, mean_box=box,
            mean_box_px=box.to_pixels(entry.size),
        ))
    return out
