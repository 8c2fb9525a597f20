"""Benchmarks `moondream_tools.video`: detect on every frame of a 1080p clip, against the
decode floor and against what users write today.

The clip: 300 frames of 1920x1080 at 30 fps (H.264 by x264 ``veryfast``, B-frames, a
keyframe every 60 frames: a camera-like file), four shapes moving across it (never overlapping), made once
with PyAV from the emulator's scenes.

- decode floor: PyAV decoding the clip with nothing else (FFmpeg's threads), and the same
  plus one resize per frame to the detect upload size (what ``process_video`` decodes).
- ``process_video`` with an instant in-process backend (no service): its own work alone;
  then over HTTP (``AsyncMoondream``) to ``_common.STUB_SERVICE``, a service that answers at
  once without decoding, so it costs this machine no CPU (as a real service would not).
- ``process_video(md, clip, "detect", object="shape")`` on every frame against the emulator
  (in its own process) at zero latency and at ``LATENCY``, ``CONCURRENCY`` frames in flight
  on ``AsyncMoondream(max_concurrency=CONCURRENCY)``; every frame's boxes are checked
  against the truth.
- OpenCV + the official ``moondream`` client, as a user writes it: ``cv2.VideoCapture``
  reads every full frame, converts it to a PIL image and sends it with ``client.detect``,
  one by one; timed on the first ``OFFICIAL_FRAMES`` frames (its frames/s is compared).

Targets: >= 10x the OpenCV + official loop at ``LATENCY``; at zero latency within 1.5x of
the decode floor plus one resize per frame.

Run from the repo root: ``.venv/bin/python benchmarks/bench_video.py``
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emulator_process, official_client, stub_service_process, table  # noqa: E402
from moondream_tools import AsyncMoondream, Detections, ImageSettings, ImageSize  # noqa: E402
from moondream_tools.images import upload_sizes  # noqa: E402
from moondream_tools.testing import MovingShape, VideoScene  # noqa: E402
from moondream_tools.video import process_video  # noqa: E402

FRAMES = 300
FPS = 30
LATENCY = 0.3
CONCURRENCY = 16
OFFICIAL_FRAMES = 30
PHRASE = "shape"

CLIP = VideoScene(
    1920,
    1080,
    [
        MovingShape("square", "red", (200, 200), 180, velocity=(300, 0)),
        MovingShape("circle", "blue", (1700, 950), 200, velocity=(-250, 0)),
        MovingShape("triangle", "yellow", (900, 550), 200, velocity=(0, 40)),
        MovingShape("circle", "green", (-300, 740), 160, velocity=(150, -60), appear=4.0),
    ],
    fps=FPS,
    frames=FRAMES,
)


def decode_floor(path: Path, resize: tuple[int, int] | None) -> float:
    """Seconds to decode every frame (and resize each to ``resize``, as RGB), nothing else."""
    import av

    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if resize is not None:
                frame.reformat(width=resize[0], height=resize[1], format="rgb24", interpolation="AREA").to_image()
    return time.perf_counter() - start


def opencv_official_loop(path: Path, client: object, frames: int) -> float:
    """What users write: OpenCV reads every full frame, the official client sends it, one by one."""
    import cv2
    from PIL import Image

    start = time.perf_counter()
    capture = cv2.VideoCapture(str(path))
    try:
        for _ in range(frames):
            ok, bgr = capture.read()
            if not ok:
                break
            image = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            client.detect(image, PHRASE)  # type: ignore[attr-defined]
    finally:
        capture.release()
    return time.perf_counter() - start


def matches_truth(frame: Any) -> bool:
    """Every box is a shape's true box (within 0.02), and every shape of more than 1000 visible
    pixels is found (the engine, like a model, may miss a sliver leaving the frame)."""
    truth = CLIP.at(frame.time).truth()
    boxes = frame.result.objects if frame.result is not None else []

    def near(box: Any, t: Any) -> bool:
        return all(abs(a - b) <= 0.02 for a, b in zip((box.x_min, box.y_min, box.x_max, box.y_max), t.bbox))

    return all(any(near(b, t) for t in truth) for b in boxes) and all(
        any(near(b, t) for b in boxes) for t in truth if t.area_px > 1000
    )


class InstantBackend:
    """A backend that answers at once with no boxes: ``process_video``'s own work alone
    (decode, one resize, JPEG encode, ordering, tracking), no service."""

    skills = frozenset({"detect"})
    image_settings = ImageSettings()

    async def detect(self, image: Any, obj: str, **kwargs: Any) -> Detections:
        return Detections(objects=[], object=obj, image_size=ImageSize(width=image.width, height=image.height))


async def pipeline_only(path: Path) -> float:
    start = time.perf_counter()
    count = 0
    async for _ in process_video(InstantBackend(), path, "detect", object=PHRASE, max_concurrency=CONCURRENCY):  # type: ignore[arg-type]
        count += 1
    assert count == FRAMES, count
    return time.perf_counter() - start


async def ours(server: dict[str, str], path: Path, *, check: bool = True) -> tuple[float, int]:
    """Seconds for process_video over every frame; and the frames whose boxes miss the truth
    (``check``: the stub service finds nothing, by design)."""
    wrong = 0
    async with AsyncMoondream(api_key=server["api_key"], base_url=server["base_url"], max_concurrency=CONCURRENCY) as md:
        start = time.perf_counter()
        count = 0
        async for frame in process_video(md, path, "detect", object=PHRASE, max_concurrency=CONCURRENCY):
            count += 1
            wrong += check and not matches_truth(frame)
        elapsed = time.perf_counter() - start
    assert count == FRAMES, count
    return elapsed, wrong


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "clip.mp4")
        start = time.perf_counter()
        CLIP.write(path, gop=60, preset="veryfast", quality=20)
        made = time.perf_counter() - start
        upload, _ = upload_sizes(1920, 1080, ImageSettings(segment_upload=False))
        decode = min(decode_floor(path, None) for _ in range(2))
        resized = min(decode_floor(path, upload) for _ in range(2))
        alone = min(asyncio.run(pipeline_only(path)) for _ in range(2))

        with stub_service_process() as server:
            remote, _ = asyncio.run(ours(server, path, check=False))
        with emulator_process(latency=0.0) as server:
            zero, zero_wrong = asyncio.run(ours(server, path))
        with emulator_process(latency=LATENCY) as server:
            slow, slow_wrong = asyncio.run(ours(server, path))
            client = official_client(server["base_url"], server["api_key"])
            loop = opencv_official_loop(path, client, OFFICIAL_FRAMES)

    rate = {name: frames / seconds for name, frames, seconds in (
        ("decode", FRAMES, decode), ("resized", FRAMES, resized), ("alone", FRAMES, alone), ("remote", FRAMES, remote), ("zero", FRAMES, zero),
        ("slow", FRAMES, slow),
        ("loop", OFFICIAL_FRAMES, loop),
    )}
    print(f"clip: {FRAMES} frames 1920x1080 at {FPS} fps, H.264 (x264 veryfast), written in {made:.1f} s;"
          f" detect upload {upload[0]}x{upload[1]}; {os.cpu_count()} CPUs")
    table(
        f"detect on every frame; emulator in its own process; concurrency {CONCURRENCY}",
        ("path", "frames", "s", "frames/s", "vs OpenCV + official", "x decode+resize time", "wrong frames"),
        [
            ("decode floor (PyAV, nothing else)", FRAMES, f"{decode:.2f}", f"{rate['decode']:.1f}", "", "", ""),
            (f"decode floor + one resize per frame (to {upload[0]}x{upload[1]})", FRAMES, f"{resized:.2f}",
             f"{rate['resized']:.1f}", "", "1.00", ""),
            ("process_video, instant in-process backend (no service)", FRAMES, f"{alone:.2f}", f"{rate['alone']:.1f}",
             "", f"{alone / resized:.2f}", ""),
            ("process_video, over HTTP, a service costing this machine nothing", FRAMES, f"{remote:.2f}",
             f"{rate['remote']:.1f}", "", f"{remote / resized:.2f}", ""),
            ("process_video, emulator at zero latency", FRAMES, f"{zero:.2f}", f"{rate['zero']:.1f}",
             f"{rate['zero'] / rate['loop']:.1f}x", f"{zero / resized:.2f}", zero_wrong),
            (f"process_video, {LATENCY * 1000:.0f} ms latency", FRAMES, f"{slow:.2f}", f"{rate['slow']:.1f}",
             f"{rate['slow'] / rate['loop']:.1f}x", f"{slow / resized:.2f}", slow_wrong),
            (f"OpenCV + official client loop, {LATENCY * 1000:.0f} ms latency", OFFICIAL_FRAMES, f"{loop:.2f}",
             f"{rate['loop']:.2f}", "1.0x", "", ""),
        ],
    )
    print(f"\ntargets: >= 10x the OpenCV + official loop at {LATENCY * 1000:.0f} ms:"
          f" {rate['slow'] / rate['loop']:.1f}x; zero latency within 1.5x of decode + resize:"
          f" {alone / resized:.2f}x without a service, {remote / resized:.2f}x over HTTP to a service costing this"
          f" machine nothing, {zero / resized:.2f}x with the emulator (whose own image analysis shares the CPUs)")


if __name__ == "__main__":
    main()
