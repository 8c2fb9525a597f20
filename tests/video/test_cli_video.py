"""The command line on video inputs: a record per frame (boxes against the scene's truth at
the frame's time, track ids), a record per video (tracks), the annotated video, resume,
per-frame and per-video errors, usage errors and the progress bar in frames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import pytest
from click.testing import CliRunner, Result
from video_support import MOVING

from moondream_tools import AsyncMoondream
from moondream_tools.cli.app import cli
from moondream_tools.cli.runner import Job, execute
from moondream_tools.indexing.skills import Asked
from moondream_tools.cli.video import VideoOptions
from moondream_tools.testing import FakeMoondream

TOL = 0.02


def run(fake: FakeMoondream, *args: str) -> Result:
    env = {"MOONDREAM_BASE_URL": fake.base_url, "MOONDREAM_API_KEY": fake.api_key, "FAL_KEY": None}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def clips(videos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """clips/street.mp4 (the rotated clip: 90 degree flag) and clips/still.png, cwd tmp_path."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "street.mp4").write_bytes(videos["rotated"].read_bytes())
    MOVING.frame(0).render().save(folder / "still.png")
    return folder


def test_detect_on_a_video_writes_frame_records_tracks_and_an_annotated_video(
    threaded_fake: FakeMoondream, clips: Path
) -> None:
    result = run(threaded_fake, "detect", "shape", "clips/street.mp4", "--every", "0.5", "--annotate", "out",
                 "--jsonl", "out/records.jsonl")
    assert result.exit_code == 0, result.output
    lines = records(Path("out/records.jsonl"))
    frames, (video,) = lines[:-1], lines[-1:]
    assert [r["frame"] for r in frames] == [0, 5, 10, 15, 20, 25]
    assert [r["time"] for r in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    arguments = {"object": "shape", "tiles": "auto", "max_tiles": 16, "max_objects": 250, "every": 0.5,
                 "keyframes": False, "max_frames": None}
    for record in frames:
        assert record["source"] == "clips/street.mp4" and record["arguments"] == arguments
        assert (record["width"], record["height"]) == (160, 120) and record["error"] is None
        truth = MOVING.at(record["time"]).truth()
        assert record["count"] == len(truth) == len(record["track_ids"])
        for got in record["objects"]:
            assert any(
                all(abs(a - b) <= TOL for a, b in zip((got["x_min"], got["y_min"], got["x_max"], got["y_max"]), t.bbox))
                and all(abs(a - b) <= 2 for a, b in zip(got["box_px"], t.bbox_px))
                for t in truth
            )
    assert len([r for r in threaded_fake.requests if r.path == "/v1/detect"]) == 6
    assert video["video"] == {"frames": 6, "failed_frames": 0, "duration": 3.0, "fps": 10.0, "rotation": 90,
                              "codec": "h264"}
    assert video["error"] is None and video["annotated"] == "out/street.annotated.mp4"
    ids = [t["track_id"] for t in video["tracks"]]
    assert len(ids) == 2 and all(r["track_ids"][0] in (None, ids[0]) for r in frames)
    square = video["tracks"][0]
    assert (square["first_frame"], square["last_frame"], square["frames"]) == (5, 25, 5)
    with av.open("out/street.annotated.mp4") as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == 6 and {(f.width, f.height) for f in decoded} == {(160, 120)}

    before = len(threaded_fake.requests)
    again = run(threaded_fake, "detect", "shape", "clips/street.mp4", "--every", "0.5", "--jsonl", "out/records.jsonl")
    assert again.exit_code == 0 and "0 done, 1 skipped" in again.output
    assert len(threaded_fake.requests) == before and len(records(Path("out/records.jsonl"))) == 7


def test_a_folder_of_images_and_videos_in_order_with_records_on_stdout(
    threaded_fake: FakeMoondream, clips: Path
) -> None:
    result = run(threaded_fake, "point", "red square", "clips", "--max-frames", "3")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["source"], r.get("frame")) for r in lines] == [
        ("clips/still.png", None), ("clips/street.mp4", 0), ("clips/street.mp4", 1), ("clips/street.mp4", 2),
        ("clips/street.mp4", None),
    ]
    for record in lines[1:4]:
        (truth,) = MOVING.at(record["time"]).matching("red square")
        (point,) = record["points"]
        assert abs(point["x"] - truth.center[0]) <= TOL and abs(point["y"] - truth.center[1]) <= TOL
    assert "arguments" in lines[0] and "every" not in lines[0]["arguments"]  # image records unchanged


def test_a_failed_frame_and_a_bad_video_are_recorded_and_the_run_goes_on(
    threaded_fake: FakeMoondream, clips: Path
) -> None:
    Path("clips/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    threaded_fake.fail_next(status=400, route="/v1/detect")
    result = run(threaded_fake, "detect", "red square", "clips/broken.mp4", "clips/street.mp4", "--max-frames", "4",
                 "--jsonl", "r.jsonl", "--concurrency", "1")
    assert result.exit_code == 1
    lines = records(Path("r.jsonl"))
    assert lines[0]["source"] == "clips/broken.mp4" and "not a video" in lines[0]["error"]
    frames = [r for r in lines if r.get("frame") is not None]
    assert [r["frame"] for r in frames] == [0, 1, 2, 3]
    assert "BadRequestError" in frames[0]["error"] and frames[0]["track_ids"] == []
    assert all(r["error"] is None and r["count"] == 1 for r in frames[1:])
    assert lines[-1]["error"].startswith("1 of 4 frames failed") and lines[-1]["video"]["failed_frames"] == 1
    assert "clips/broken.mp4" in result.output and "1 of 4 frames failed" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--every", "1", "--keyframes"), "two ways of sampling"),
        (("--coco", "c.json"), "--coco and --yolo export images"),
        (("--batch-api", "--jsonl", "r.jsonl"), "--batch-api sends images, not videos"),
    ],
)
def test_what_videos_cannot_do_is_a_usage_error(
    threaded_fake: FakeMoondream, clips: Path, args: tuple[str, ...], message: str
) -> None:
    result = run(threaded_fake, "detect", "shape", "clips/street.mp4", *args)
    assert result.exit_code == 2 and message in result.output
    assert threaded_fake.requests == []


async def test_the_progress_bar_counts_frames(fake: FakeMoondream, clips: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url)
    job = Job(
        command="detect", arguments={"object": "shape"}, sources=["clips/still.png", "clips/street.mp4"],
        backend=backend, concurrency=4, asked=Asked("detect", object="shape"), progress=True,
        video=VideoOptions(every=0.5), videos=frozenset({"clips/street.mp4"}),
    )
    import rich.console

    original = rich.console.Console.__init__

    def wide(self: Any, *args: Any, **kwargs: Any) -> None:  # a terminal-like console, 120 columns
        original(self, *args, **{**kwargs, "force_terminal": True, "width": 120})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rich.console.Console, "__init__", wide)
        status = await execute(job)
    assert status == 0
    err = capsys.readouterr().err
    assert "7/7" in err and "frames/s" in err  # the image and 6 sampled frames


@pytest.fixture
def no_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the ``video`` extra were not installed: loading PyAV fails as it would."""
    from moondream_tools.video import _decode

    def missing() -> Any:
        raise ImportError('moondream_tools.video needs PyAV: pip install "moondream-tools[video]"')

    monkeypatch.setattr(_decode, "load_av", missing)


def test_without_pyav_a_named_video_is_a_usage_error(threaded_fake: FakeMoondream, clips: Path, no_pyav: None) -> None:
    result = run(threaded_fake, "detect", "shape", "clips/still.png", "clips/street.mp4")
    assert result.exit_code == 2
    assert "clips/street.mp4" in result.stderr and 'pip install "moondream-tools[video]"' in result.stderr
    assert "Traceback" not in result.output and threaded_fake.requests == []


def test_without_pyav_videos_in_a_folder_are_skipped_with_a_warning(
    threaded_fake: FakeMoondream, clips: Path, no_pyav: None
) -> None:
    result = run(threaded_fake, "point", "red square", "clips")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.stderr.splitlines() if "warning" in line]
    assert "skipping 1 video" in warning and "clips/street.mp4" in warning
    assert 'pip install "moondream-tools[video]"' in warning
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert record["source"] == "clips/still.png" and record["error"] is None
    (truth,) = MOVING.frame(0).matching("red square")
    (point,) = record["points"]
    assert abs(point["x"] - truth.center[0]) <= TOL and abs(point["y"] - truth.center[1]) <= TOL
    assert [r.path for r in threaded_fake.requests] == ["/v1/point"]


def test_videos_sharing_a_name_get_annotated_videos_of_their_own(
    threaded_fake: FakeMoondream, clips: Path, videos: dict[str, Path]
) -> None:
    from moondream_tools.testing import MovingShape, VideoScene

    small = VideoScene(64, 48, [MovingShape("square", "green", (20, 24), 12, velocity=(10, 0))], fps=10, frames=3)
    for folder in ("a", "b"):
        Path(folder).mkdir()
    Path("a/clip.mp4").write_bytes(videos["moving"].read_bytes())
    small.write("b/clip.mp4")
    result = run(threaded_fake, "detect", "shape", "a/clip.mp4", "b/clip.mp4", "--max-frames", "2",
                 "--annotate", "out", "--jsonl", "r.jsonl")
    assert result.exit_code == 0, result.output
    found = {r["source"]: r for r in records(Path("r.jsonl")) if "video" in r}
    assert set(found) == {"a/clip.mp4", "b/clip.mp4"}
    written = {found[s]["annotated"] for s in found}
    assert len(written) == 2 and all(p.startswith("out/clip-") and p.endswith(".annotated.mp4") for p in written)
    assert sorted(str(p) for p in Path("out").iterdir()) == sorted(written)
    for source, size in (("a/clip.mp4", (160, 120)), ("b/clip.mp4", (64, 48))):  # each file is its own video's
        with av.open(found[source]["annotated"]) as container:
            decoded = list(container.decode(video=0))
        assert len(decoded) == found[source]["video"]["frames"] == 2
        assert {(f.width, f.height) for f in decoded} == {size} == {(found[source]["width"], found[source]["height"])}
