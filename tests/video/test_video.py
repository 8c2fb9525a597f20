"""process_video, tracks, annotate_video, probe_video, frame_at and is_video on synthetic
videos, with the emulator as the service and the scenes' truth at each frame's time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from video_support import MOVING

from moondream_tools import AsyncMoondream, Detections, ImageError, ImageSize, Segmentation
from moondream_tools.render import color_for
from moondream_tools.testing import FakeMoondream, VideoScene
from moondream_tools.video import (
    FrameResult,
    annotate_video,
    draw_frame,
    frame_at,
    is_video,
    probe_video,
    process_video,
    summarize_tracks,
    video_codec,
)
from moondream_tools.video import _decode as decode_module

TOL = 0.02  # the emulator's native tolerance, normalized


def stream_times(path: Path) -> list[float]:
    """The timestamps PyAV itself reads from the file, in presentation order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float(f.pts * stream.time_base) for f in container.decode(stream)]


def close_to(box: Any, truth: tuple[float, float, float, float]) -> bool:
    return all(abs(a - b) <= TOL for a, b in zip((box.x_min, box.y_min, box.x_max, box.y_max), truth))


def truth_box(scene: VideoScene, time: float, label: str) -> tuple[float, float, float, float]:
    (shape,) = [t for t in scene.at(time).truth() if t.label == label]
    return shape.bbox


def our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("moondream-video")]


async def test_detect_follows_the_truth_frame_by_frame_with_stable_track_ids(
    client: AsyncMoondream, fake: FakeMoondream, videos: dict[str, Path]
) -> None:
    frames = [f async for f in process_video(client, videos["moving"], "detect", object="shape")]
    assert [f.index for f in frames] == list(range(MOVING.frames))
    assert [f.time for f in frames] == pytest.approx(stream_times(videos["moving"]), abs=1e-9)
    assert [f.time for f in frames] == pytest.approx([i / 10 for i in range(30)], abs=1e-9)
    assert len([r for r in fake.requests if r.path == "/v1/detect"]) == 30
    square_ids, circle_ids = [], []
    for frame in frames:
        assert frame.ok and isinstance(frame.result, Detections)
        assert frame.image_size == ImageSize(width=160, height=120)
        truth = frame.result.object == "shape" and MOVING.at(frame.time).truth()
        assert len(frame.result.objects) == len(truth) == len(frame.track_ids)
        for box, track in zip(frame.result.objects, frame.track_ids):
            (match,) = [t for t in truth if close_to(box, t.bbox)]
            (square_ids if match.label == "red square" else circle_ids).append(track)
    # Confirmed on its second frame, then one id while it moves 58 px; the circle that
    # appears at 1 s gets a new id.
    assert square_ids[0] is None and len(set(square_ids[1:])) == 1 and square_ids[1] is not None
    assert circle_ids[0] is None and len(set(circle_ids[1:])) == 1 and circle_ids[1] not in (None, square_ids[1])
    assert len(circle_ids) == 20  # from frame 10 (1.0 s) on

    tracks = summarize_tracks(frames)
    assert [(t.track_id, t.first_index, t.last_index, t.frames) for t in tracks] == [
        (square_ids[1], 1, 29, 29), (circle_ids[1], 11, 29, 19)
    ]
    square = tracks[0]
    mean_truth = np.mean([truth_box(MOVING, i / 10, "red square") for i in range(1, 30)], axis=0)
    assert close_to(square.mean_box, tuple(mean_truth))
    assert square.first_time == pytest.approx(0.1) and square.last_time == pytest.approx(2.9)
    assert square.mean_box_px.x_min == pytest.approx(square.mean_box.x_min * 160)


async def test_rotation_flag_turns_frames_upright_like_exif(client: AsyncMoondream, videos: dict[str, Path]) -> None:
    for name, rotation in (("rotated", 90), ("rotated270", 270)):
        info = await probe_video(videos[name])
        assert (info.rotation, info.width, info.height, info.frames, info.fps) == (rotation, 160, 120, 30, 10.0)
        assert info.duration == pytest.approx(3.0) and info.codec == "h264" and info.frames_exact
        frames = [f async for f in process_video(client, videos[name], "detect", object="red square", max_frames=5)]
        assert len(frames) == 5
        for frame in frames:
            assert frame.image_size == ImageSize(width=160, height=120)
            (box,) = frame.result.objects  # type: ignore[union-attr]
            assert close_to(box, truth_box(MOVING, frame.time, "red square"))


def assert_shows(image: Any, shown: int, where: Any) -> None:
    """``image`` is MOVING's frame ``shown``, upright (the red square's left edge moves 2 px
    a frame: checked to the pixel)."""
    assert image.size == (160, 120) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    truth = {t.label: t for t in MOVING.frame(shown).truth()}
    x0, y0, x1, y1 = truth["red square"].bbox_px
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    assert np.abs(pixels[cy, cx] - (220, 30, 30)).max() < 40, where
    column = pixels[cy, :, 0] - pixels[cy, :, 1]
    assert abs(int(np.argmax(column > 100)) - x0) <= 1, where
    assert ("blue circle" in truth) == (shown >= 10)


async def test_frame_at_is_the_last_frame_at_or_before_the_time(videos: dict[str, Path]) -> None:
    for name in ("moving", "rotated"):
        for time, shown in ((0.0, 0), (1.05, 10), (1.1, 11), (1.99, 19), (2.34, 23), (99.0, 29)):
            assert_shows(await frame_at(videos[name], time), shown, (name, time))
    with pytest.raises(ValueError, match="time"):
        await frame_at(videos["moving"], -1)


async def test_frame_at_in_mpeg_ts_seeks_again_where_the_seek_lands_late(videos: dict[str, Path]) -> None:
    # MPEG-TS has no seek index: FFmpeg's seek lands past the keyframe before the time (or
    # past the last frame near the end); frame_at seeks again earlier.
    assert (await probe_video(videos["ts"])).start_time == pytest.approx(1.4)
    for time, shown in ((0.0, 0), (0.55, 5), (1.25, 12), (1.95, 19), (2.05, 20), (2.55, 25), (2.95, 29), (9.0, 29)):
        assert_shows(await frame_at(videos["ts"], time), shown, time)


async def test_times_are_seconds_from_the_first_frame_whatever_the_first_timestamp(
    client: AsyncMoondream, videos: dict[str, Path], tmp_path: Path
) -> None:
    path = videos["offset"]
    assert stream_times(path)[:2] == pytest.approx([2.0, 2.1])  # the file's own timestamps start at 2 s
    info = await probe_video(path)
    assert info.start_time == pytest.approx(2.0) and info.duration == pytest.approx(3.0) and info.frames == 30
    frames = [f async for f in process_video(client, path, "detect", object="red square", every=1)]
    assert [f.index for f in frames] == [0, 10, 20] and [f.time for f in frames] == pytest.approx([0.0, 1.0, 2.0])
    for frame in frames:
        (box,) = frame.result.objects  # type: ignore[union-attr]
        assert close_to(box, truth_box(MOVING, frame.time, "red square"))
        assert_shows(await frame_at(path, frame.time), frame.index, frame.time)
    assert_shows(await frame_at(path, 2.5), 25, 2.5)
    written = await annotate_video(path, frames, tmp_path / "offset.mp4")
    assert written.frames == 3
    assert stream_times(tmp_path / "offset.mp4") == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)
    ts = [f async for f in process_video(client, videos["ts"], "caption", every=0.5)]
    assert [f.time for f in ts] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert (await probe_video(videos["ts"])).duration == pytest.approx(3.0)


async def test_sampling_every_seconds_keyframes_and_max_frames(client: AsyncMoondream, videos: dict[str, Path]) -> None:
    every = [f async for f in process_video(client, videos["moving"], "point", object="red square", every=0.5)]
    assert [f.index for f in every] == [0, 5, 10, 15, 20, 25]
    assert [f.time for f in every] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    for frame in every:
        (point,) = frame.result.points  # type: ignore[union-attr]
        (truth,) = MOVING.at(frame.time).matching("red square")
        assert abs(point.x - truth.center[0]) <= TOL and abs(point.y - truth.center[1]) <= TOL
    # points are tracked too: one id from its second sample on
    assert every[0].track_ids == [None] and len({f.track_ids[0] for f in every[1:]}) == 1
    assert every[1].track_ids[0] is not None

    keys = [f async for f in process_video(client, videos["moving"], "detect", object="shape", keyframes=True)]
    assert [f.index for f in keys] == [0, 10, 20] and [f.time for f in keys] == pytest.approx([0.0, 1.0, 2.0])
    assert [len(f.result.objects) for f in keys] == [1, 2, 2]  # type: ignore[union-attr]

    few = [f async for f in process_video(client, videos["moving"], "caption", every=0.25, max_frames=3)]
    assert [f.index for f in few] == [0, 3, 5] and all(f.track_ids == [] for f in few)
    assert "square" in few[0].result.caption  # type: ignore[union-attr]


async def test_segment_follow_sends_the_previous_box_as_the_hint(
    client: AsyncMoondream, fake: FakeMoondream, videos: dict[str, Path]
) -> None:
    frames = [
        f async for f in process_video(
            client, videos["moving"], "segment", object="shape", follow=True, spatial_refs=[[0.2, 0.33]], every=0.2
        )
    ]
    sent = [r.json["spatial_refs"] for r in fake.requests if r.path == "/v1/segment"]
    assert sent[0] == [[0.2, 0.33]] and len(sent) == len(frames) == 15
    for frame, hint in zip(frames[:-1], sent[1:]):
        box = frame.result.bbox  # type: ignore[union-attr]
        assert hint == [[box.x_min, box.y_min, box.x_max, box.y_max]]
    for frame in frames:  # the hint keeps the red square even after the circle appears
        assert isinstance(frame.result, Segmentation) and frame.result.found
        assert close_to(frame.result.bbox, truth_box(MOVING, frame.time, "red square"))
        truth = MOVING.at(frame.time).matching("red square")[0]
        assert abs(frame.result.area_px - truth.area_px) <= 0.1 * truth.area_px
    assert frames[0].track_ids == [None] and len({f.track_ids[0] for f in frames[1:]}) == 1


async def test_track_false_and_another_tracker(client: AsyncMoondream, videos: dict[str, Path]) -> None:
    import trackers

    plain = [f async for f in process_video(client, videos["moving"], "detect", object="shape", track=False)]
    assert all(f.track_ids == [None] * len(f.result.objects) for f in plain)  # type: ignore[union-attr]
    sort = trackers.SORTTracker(minimum_consecutive_frames=1)
    tracked = [f async for f in process_video(client, videos["moving"], "detect", object="red square", track=sort)]
    assert {f.track_ids[0] for f in tracked[1:]} == {1}  # SORT names a track from its second frame


async def test_a_failed_request_is_that_frames_error_and_the_stream_goes_on(
    fake: FakeMoondream, videos: dict[str, Path]
) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retries=0) as md:
        fake.fail_next(status=400, route="/v1/detect")
        frames = [f async for f in process_video(md, videos["moving"], "detect", object="red square", max_frames=10)]
    assert [f.index for f in frames] == list(range(10))
    failed = [f for f in frames if not f.ok]
    assert len(failed) == 1 and failed[0].result is None and failed[0].track_ids == []
    assert "BadRequestError" in (failed[0].error or "") and "400" in (failed[0].error or "")
    for frame in frames:
        if frame.ok:
            assert close_to(frame.result.objects[0], truth_box(MOVING, frame.time, "red square"))  # type: ignore[union-attr]


async def test_closing_early_cancels_requests_and_closes_the_video(
    fake: FakeMoondream, videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Any] = []
    real_open = decode_module._open

    def spy(source: Any) -> Any:
        container = real_open(source)
        opened.append(container)
        return container

    monkeypatch.setattr(decode_module, "_open", spy)
    fake.latency = 0.2
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        stream = process_video(md, videos["moving"], "detect", object="shape", max_concurrency=4)
        got = []
        async for frame in stream:
            got.append(frame.index)
            if len(got) == 2:
                break
        await stream.aclose()
        assert got == [0, 1]
        await asyncio.sleep(0.05)
        assert our_threads() == []
        assert len(opened) == 1
        with pytest.raises(Exception):  # a closed container refuses to demux
            next(opened[0].demux())
        sent = len([r for r in fake.requests if r.path == "/v1/detect"])
        assert sent <= 2 + 4 + 1  # the two read, at most max_concurrency more, never the whole clip
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in leftovers if "stream_in_order" in repr(t) or "one" in repr(t.get_coro())]


async def test_decoded_frames_in_flight_are_bounded_on_a_long_clip(
    long_video: tuple[Path, VideoScene], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, clip = long_video
    alive = [0]
    peak = [0]
    real_read = decode_module.FrameReader.read

    def gone() -> None:
        alive[0] -= 1

    def counted(self: Any) -> Any:
        decoded = real_read(self)
        if decoded is not None:
            weakref.finalize(decoded, gone)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return decoded

    monkeypatch.setattr(decode_module.FrameReader, "read", counted)

    class Instant:
        """A backend answering at once from the image it gets (no HTTP: thousands of frames)."""

        skills = frozenset({"detect"})

        def __init__(self) -> None:
            from moondream_tools import ImageSettings

            self.image_settings = ImageSettings()
            self.calls = 0

        async def detect(self, image: Any, obj: str, **kwargs: Any) -> Detections:
            self.calls += 1
            await asyncio.sleep(0.001 * (self.calls % 3))  # answers out of order
            return Detections(objects=[], object=obj, image_size=ImageSize(width=image.width, height=image.height))

    backend = Instant()
    indexes = []
    async for frame in process_video(backend, path, "detect", object="square", max_concurrency=4):  # type: ignore[arg-type]
        indexes.append(frame.index)
    assert indexes == list(range(clip.frames)) and backend.calls == clip.frames
    assert peak[0] <= 4 + 1, peak  # at most one per slot, plus the one being decoded
    assert alive[0] == 0


async def test_annotated_video_has_the_frames_size_timestamps_and_track_colors(
    client: AsyncMoondream, videos: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "annotated.mp4"
    frames: list[FrameResult] = []

    async def keep() -> Any:
        async for frame in process_video(client, videos["rotated"], "detect", object="shape", every=0.2):
            frames.append(frame)
            yield frame

    written = await annotate_video(videos["rotated"], keep(), output)
    assert (written.frames, written.width, written.height, written.codec) == (15, 160, 120, video_codec())
    assert written.codec == "libx264"
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [(float(f.pts * stream.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    assert [t for t, _ in decoded] == pytest.approx([f.time for f in frames], abs=1e-3)
    assert all(pixels.shape == (120, 160, 3) for _, pixels in decoded)
    colors = set()
    for (_, pixels), frame in zip(decoded, frames):
        # the output frame is the upright source frame with draw_frame's drawing, up to H.264's loss
        reference = await frame_at(videos["rotated"], frame.time)
        draw_frame(reference, frame)
        difference = np.abs(pixels.astype(int) - np.asarray(reference).astype(int))
        assert difference.mean() < 4, (frame.index, difference.mean())
        plain = np.asarray(await frame_at(videos["rotated"], frame.time)).astype(int)
        assert np.abs(pixels.astype(int) - plain).mean() > 2 * difference.mean()  # something was drawn
        colors |= {color_for(f"shape #{t}") for t in frame.track_ids if t is not None}
    assert len(colors) == 2  # one color per track


async def test_bytes_sources_and_is_video(client: AsyncMoondream, videos: dict[str, Path], tmp_path: Path) -> None:
    data = videos["moving"].read_bytes()
    frames = [f async for f in process_video(client, data, "detect", object="red square", max_frames=3)]
    assert [f.index for f in frames] == [0, 1, 2]
    assert (await probe_video(data)).frames == 30
    assert is_video(videos["moving"]) and is_video(str(videos["rotated"])) and is_video(data)
    jpeg = tmp_path / "still.jpg"
    MOVING.frame(0).render().save(jpeg)
    renamed = tmp_path / "still.mp4"
    renamed.write_bytes(jpeg.read_bytes())
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    assert not is_video(jpeg) and not is_video(renamed) and not is_video(text) and not is_video(jpeg.read_bytes())
    assert not is_video(tmp_path / "missing.mp4")


@pytest.mark.parametrize("kind", ["text", "jpeg", "truncated", "missing", "empty"])
async def test_bad_sources_are_a_clear_image_error(
    client: AsyncMoondream, fake: FakeMoondream, videos: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "bad.mp4"
    if kind == "text":
        path.write_text("hello, not a video")
    elif kind == "jpeg":
        MOVING.frame(0).render().save(path, format="JPEG")
    elif kind == "truncated":
        path.write_bytes(videos["moving"].read_bytes()[:3000])
    elif kind == "empty":
        path.write_bytes(b"")
    expected = {"text": "not a video", "jpeg": "not a video", "truncated": "corrupt or truncated",
                "missing": "no such video file", "empty": "not a video"}[kind]
    with pytest.raises(ImageError, match=expected) as caught:
        async for _ in process_video(client, path, "detect", object="shape"):
            pass
    assert str(path) in str(caught.value)
    with pytest.raises(ImageError, match=expected):
        await probe_video(path)
    with pytest.raises(ImageError, match=expected):
        await frame_at(path, 0.5)
    assert fake.requests == [] and our_threads() == []


async def test_arguments_are_checked_before_anything_runs(client: AsyncMoondream, videos: dict[str, Path]) -> None:
    path = videos["moving"]
    with pytest.raises(TypeError):
        process_video(client, path, "detect", object="car", colour="red")  # type: ignore[call-arg]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"skill": "detect"}, "needs object"),
        ({"skill": "caption", "object": "car"}, "object= is for"),
        ({"skill": "query"}, "needs question"),
        ({"skill": "detect", "object": "car", "every": 0.5, "keyframes": True}, "two ways"),
        ({"skill": "detect", "object": "car", "every": 0}, "every must be"),
        ({"skill": "detect", "object": "car", "follow": True}, "segment only"),
        ({"skill": "detect", "object": "car", "max_frames": 0}, "max_frames"),
        ({"skill": "detect", "object": "car", "spatial_refs": [[0.5, 0.5]]}, "spatial_refs is for"),
        ({"skill": "chat"}, "skill must be"),
    ]
    for kwargs, message in cases:
        skill = kwargs.pop("skill")
        with pytest.raises(ValueError, match=message):
            process_video(client, path, skill, **kwargs)


def test_the_synthetic_clip_timestamps_are_the_scene_times(videos: dict[str, Path]) -> None:
    times = stream_times(videos["moving"])
    assert times == pytest.approx([MOVING.time(i) for i in range(MOVING.frames)])
    with av.open(str(videos["rotated"])) as container:
        first = next(container.decode(video=0))
        assert first.rotation == 90 and (first.width, first.height) == (120, 160)
        assert container.streams.video[0].time_base == Fraction(1, 10240) or container.streams.video[0].time_base


async def test_annotating_with_results_of_another_video_fails_cleanly(
    client: AsyncMoondream, fake: FakeMoondream, videos: dict[str, Path], tmp_path: Path
) -> None:
    fake.latency = 0.05
    late = FrameResult(index=99, time=9.9, image_size=ImageSize(width=160, height=120), result=None)
    with pytest.raises(ValueError, match="no frame at 9.900 s"):
        await annotate_video(videos["moving"], [late], tmp_path / "x.mp4")
    stream = process_video(client, videos["moving"], "detect", object="shape", max_concurrency=4)

    async def then_a_late_one() -> Any:
        async with contextlib.aclosing(stream):  # closing this one closes process_video's
            async for frame in stream:
                yield frame
                if frame.index == 2:
                    yield late

    with pytest.raises(ValueError, match="no frame at"):
        await annotate_video(videos["moving"], then_a_late_one(), tmp_path / "y.mp4")
    await asyncio.sleep(0.05)
    assert our_threads() == []
    sent = len([r for r in fake.requests if r.path == "/v1/detect"])
    assert sent < 30  # the requests in flight were cancelled, the clip was not processed to its end


def test_importing_the_library_and_the_command_loads_no_video_package() -> None:
    import subprocess
    import sys

    code = (
        "import sys, moondream_tools, moondream_tools.cli.app, moondream_tools.video;"
        "print(sorted(m for m in ('av', 'trackers', 'supervision', 'cv2') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
