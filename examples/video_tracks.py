"""Video: detect objects frame by frame, link them into tracks, write an annotated clip.

Offline: it makes a short synthetic clip (a portrait phone video: stored turned, with a
rotation flag), runs the offline Moondream emulator, detects the shapes every 0.2 s, prints
each track (when it was seen and where on average) and writes the annotated clip.

With MOONDREAM_API_KEY (Moondream Cloud) or MOONDREAM_BASE_URL (e.g. Moondream Station) set
and a video path as the first argument, it asks that server about that video instead:

    python examples/video_tracks.py                      # offline
    python examples/video_tracks.py street.mp4 car       # your video, your object

Needs the video extra: pip install "moondream-tools[video]".
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moondream_tools import AsyncMoondream
from moondream_tools.testing import MovingShape, VideoScene
from moondream_tools.video import FrameResult, annotate_video, probe_video, process_video, summarize_tracks


def synthetic_clip() -> VideoScene:
    """3 s at 10 fps, 240x320 upright: a red square crossing, a blue circle from 1 s on, a
    green triangle until 2 s (the emulator's shapes, with their truth at any time)."""
    return VideoScene(
        240, 320,
        [
            MovingShape("square", "red", (50, 60), 40, velocity=(40, 20)),
            MovingShape("circle", "blue", (190, 260), 44, velocity=(-30, -10), appear=1.0),
            MovingShape("triangle", "green", (60, 250), 40, vanish=2.0),
        ],
        fps=10, frames=30,
    )


@asynccontextmanager
async def open_client(folder: Path) -> AsyncIterator[tuple[AsyncMoondream, Path, str]]:
    """A client, the video and the object to track."""
    if len(sys.argv) > 2 and (os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL")):
        async with AsyncMoondream() as md:
            yield md, Path(sys.argv[1]), sys.argv[2]
        return
    from moondream_tools.testing import FakeMoondream

    print("No server and video given: the offline emulator on a synthetic portrait clip.")
    clip = synthetic_clip()
    video = folder / "portrait.mp4"
    clip.write(video, rotation=270)  # stored 320x240 with a rotation flag, like a phone
    async with FakeMoondream() as server:
        async with AsyncMoondream(api_key=server.api_key, base_url=server.base_url) as md:
            yield md, video, "shape"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with open_client(folder) as (md, video, phrase):
            info = await probe_video(video)
            print(f"Video: {info.width}x{info.height} upright (rotation {info.rotation}), {info.frames} frames,"
                  f" {info.duration:.1f} s at {info.fps:g} fps, {info.codec}")

            frames: list[FrameResult] = []

            async def detect_and_keep() -> AsyncIterator[FrameResult]:
                async for frame in process_video(md, video, "detect", object=phrase, every=0.2):
                    frames.append(frame)
                    yield frame

            out = Path(os.environ.get("VIDEO_TRACKS_OUT", folder)) / f"{video.stem}-tracks.mp4"
            written = await annotate_video(video, detect_and_keep(), out)

        failed = [f for f in frames if not f.ok]
        print(f"Detected {phrase!r} in {len(frames)} frames (every 0.2 s), {len(failed)} failed.")
        for frame in frames[:3]:
            boxes = ", ".join(f"({b.x_min:.0f},{b.y_min:.0f})-({b.x_max:.0f},{b.y_max:.0f})" for b in frame.result.to_pixels())  # type: ignore[union-attr]
            print(f"  frame {frame.index:3d} at {frame.time:4.1f} s: tracks {frame.track_ids}  boxes {boxes}")
        print("Tracks:")
        for track in summarize_tracks(frames):
            box = track.mean_box_px
            print(f"  #{track.track_id} {track.label}: {track.first_time:.1f}-{track.last_time:.1f} s,"
                  f" {track.frames} frames, mean box ({box.x_min:.0f}, {box.y_min:.0f}) - ({box.x_max:.0f}, {box.y_max:.0f}) px")
        print(f"Annotated clip: {written.frames} frames, {written.width}x{written.height}, {written.codec}"
              f" -> {written.path if 'VIDEO_TRACKS_OUT' in os.environ else out.name}")


if __name__ == "__main__":
    asyncio.run(main())
