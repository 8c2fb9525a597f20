"""Video: the skills frame by frame, with tracks (optional extra ``video``: PyAV, trackers).

Moondream's skills work on still images and "can be applied frame-by-frame to video".
This package does that once, well:

- :func:`process_video` runs a skill (detect, point, segment, query, caption) on every
  frame, every N seconds or the keyframes of a video; frames are decoded by PyAV in a worker
  thread straight to the skill's upload size (one resize per frame), turned upright
  (rotation metadata, as EXIF for photos), sent concurrently and yielded in frame order as
  :class:`FrameResult` s, with bounded memory.
- Tracks: detections, points and masks are linked across frames by ByteTrack (Roboflow's
  ``trackers``), so each object keeps an id (``FrameResult.track_ids``);
  :func:`summarize_tracks` gives each track's first/last frame, frame count and mean box.
- :func:`annotate_video` writes the frames with their results drawn (track ids as
  labels), in H.264 when the PyAV wheel has it.
- Seeking for agents and tools: :func:`probe_video` (duration, frames, fps, upright size,
  rotation, codec), :func:`frame_at` (the upright frame shown at a time) and
  :func:`is_video`.

Install with ``pip install "moondream-tools[video]"``. Importing this package is cheap: PyAV
and trackers are imported when a video is first opened (an ``ImportError`` naming the extra
when they are missing).

Example::

    from moondream_tools import AsyncMoondream
    from moondream_tools.video import annotate_video, process_video, summarize_tracks

    async with AsyncMoondream() as md:
        frames = [f async for f in process_video(md, "street.mp4", "detect", object="car", every=0.5)]
        for track in summarize_tracks(frames):
            print(f"car {track.track_id}: {track.first_time:.1f}-{track.last_time:.1f} s")
        await annotate_video("street.mp4", frames, "street-cars.mp4")
"""

from __future__ import annotations

from ._decode import VIDEO_EXTENSIONS, VideoInfo, VideoSource, is_video
from .annotate import VIDEO_CODECS, AnnotatedVideo, annotate_video, draw_frame, video_codec
from .process import FrameResult, VideoSkill, frame_at, probe_video, process_video
from .tracks import TrackSummary, Tracker, summarize_tracks

__all__ = [
    "VIDEO_CODECS",
    "VIDEO_EXTENSIONS",
    "AnnotatedVideo",
    "FrameResult",
    "TrackSummary",
    "Tracker",
    "VideoInfo",
    "VideoSkill",
    "VideoSource",
    "annotate_video",
    "draw_frame",
    "frame_at",
    "is_video",
    "probe_video",
    "process_video",
    "summarize_tracks",
    "video_codec",
]
