"""MoondreamBatch: the Batch API job over real HTTP against the emulator, and its pure parts.

Ground truth: the scenes' shapes, what the emulator recorded (``fake.batches``: parts uploaded
per part number, completions, downloads per output file; ``fake.uploads``; ``fake.requests``)
and the files in the job directory. A "kill" is a ``Killed`` (BaseException) raised right after
the job recorded a chosen step, which is where a killed process leaves its directory; the
resumed job is a new ``MoondreamBatch`` on the same directory.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import moondream_tools
from moondream_tools import (
    Answer,
    BatchError,
    BatchExpiredError,
    BatchFailedError,
    BatchItemError,
    BatchProgress,
    BatchResult,
    Caption,
    ConfigurationError,
    Detections,
    MoondreamBatch,
    Points,
    UnsupportedSkillError,
    Usage,
)
from moondream_tools.batch import _job, estimate_cost
from moondream_tools.batch._state import JobState
from moondream_tools.batch._wire import parse_result_line, request_fields, requests_digest
from moondream_tools.results import ImageSize
from moondream_tools.testing import FakeMoondream, Scene

from batch_support import Killed, kill_after


# ---------------------------------------------------------------- helpers


def make_scenes(root: Path, count: int = 4) -> dict[str, Scene]:
    """``photos/img<i>.(png|jpg)``, large enough (1600x1200) to be downscaled for upload."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    scenes = {}
    for i in range(count):
        scene = Scene.random(300 + i, width=1600, height=1200, count=(2, 5), min_size=120, max_size=400)
        path = photos / f"img{i}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(scene.encode("PNG") if i % 2 else scene.encode("JPEG", 95))
        scenes[str(path)] = scene
    return scenes


def small_images(count: int) -> list[bytes]:
    return [Scene.random(50 + i, width=320, height=240, count=2).encode("PNG") for i in range(count)]


def new_job(fake: FakeMoondream, job_dir: Path, **options: Any) -> MoondreamBatch:
    options.setdefault("poll_interval", 0.01)
    options.setdefault("max_poll_interval", 0.02)
    return MoondreamBatch(job_dir, api_key=fake.api_key, base_url=fake.base_url, **options)


def add_detections(job: MoondreamBatch, images: list[bytes]) -> None:
    for image in images:
        job.add(image, "detect", object="circle")


async def collect(job: MoondreamBatch, **options: Any) -> list[BatchResult]:
    return [item async for item in job.run(**options)]


def the_batch(fake: FakeMoondream) -> Any:
    assert len(fake.batches) == 1, "submitted exactly once"
    return next(iter(fake.batches.values()))


def batch_requests(fake: FakeMoondream, action: str) -> list[Any]:
    return [r for r in fake.requests if r.path.startswith("/v1/batch") and r.query.get("action") == action]


# ---------------------------------------------------------------- round trip


async def test_round_trip_on_a_folder_matches_scene_truth_by_id(fake: FakeMoondream, tmp_path: Path) -> None:
    scenes = make_scenes(tmp_path)
    async with new_job(fake, tmp_path / "job") as job:
        ids = {
            "caption": job.add_many(tmp_path / "photos", "caption", length="long"),
            "query": job.add_many(tmp_path / "photos", "query", question="How many circles?"),
            "detect": job.add_many(tmp_path / "photos", "detect", object="circle"),
            "point": job.add_many(tmp_path / "photos", "point", object="square"),
        }
        results = await collect(job)
    assert sorted(int(r.id) for r in results) == list(range(4 * len(scenes))), "each request exactly once"
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    by_id = {r.id: r for r in results}
    sources = list(scenes)  # add_many lists a directory sorted
    for skill, skill_ids in ids.items():
        for rid, source in zip(skill_ids, sources):
            item, scene = by_id[rid], scenes[source]
            assert item.skill == skill and item.source == source and item.batch_id == job.batch_ids[0]
            result = item.unwrap()
            assert result.image_size == ImageSize(width=1600, height=1200)  # the source's frame, not the upload's
            if skill == "caption":
                assert isinstance(result, Caption)
                assert all(f"{t.color} {t.kind}" in result.caption for t in scene.truth())
            elif skill == "query":
                assert isinstance(result, Answer)
                assert result.answer == str(scene.count("circle")) and result.reasoning is None
            elif skill == "detect":
                assert isinstance(result, Detections) and result.object == "circle"
                truth = sorted(t.bbox_px for t in scene.matching("circle"))
                boxes = sorted((b.x_min, b.y_min, b.x_max, b.y_max) for b in result.to_pixels())
                assert len(boxes) == len(truth)
                for box, want in zip(boxes, truth):
                    assert all(abs(a - b) <= 8 for a, b in zip(box, want)), (box, want)
            else:
                assert isinstance(result, Points)
                assert len(result.points) == scene.count("square")
                for p in result.to_pixels():
                    assert any(x0 <= p.x <= x1 and y0 <= p.y <= y1 for x0, y0, x1, y1 in
                               (t.bbox_px for t in scene.matching("square")))
            assert result.usage is not None and result.usage.input_tokens

    # What went out: bare base64 of the model-sized JPEG, our ids, reasoning off unless asked.
    lines = [json.loads(line) for line in (tmp_path / "job" / "requests-0000.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [str(i) for i in range(16)]
    upload = Image.open(io.BytesIO(base64.b64decode(lines[0]["image"], validate=True)))
    assert upload.format == "JPEG" and max(upload.size) < 1600
    assert [line.get("reasoning") for line in lines if line["skill"] == "query"] == [False] * 4
    assert {line.get("length") for line in lines if line["skill"] == "caption"} == {"long"}
    # What came back was shuffled across files: matching by id was needed.
    record = the_batch(fake)
    assert len(record.outputs) == 2 and record.downloads == {0: 1, 1: 1}
    order = [json.loads(line)["line_index"] for out in record.outputs for line in out.decode().splitlines()]
    assert order != sorted(order)
    # Every batch call carried the key; the presigned downloads carried nothing.
    assert all(r.headers.get("X-Moondream-Auth") == fake.api_key for r in fake.requests if r.path.startswith("/v1/"))
    assert all("X-Moondream-Auth" not in r.headers for r in fake.requests if r.path.startswith("/batch-outputs"))


async def test_progress_callback_and_poll_backoff(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(_job, "_sleep", no_wait)
    fake.batch_polls_to_complete = 5
    seen: list[BatchProgress] = []

    async def on_progress(progress: BatchProgress) -> None:  # a coroutine function works too
        seen.append(progress)

    async with new_job(fake, tmp_path / "job", poll_interval=1.0, max_poll_interval=2.0) as job:
        add_detections(job, small_images(4))
        results = await collect(job, on_progress=on_progress)
    assert len(results) == 4
    assert waits == [1.0, 1.5, 2.0, 2.0, 2.0], "x1.5 from poll_interval, capped at max_poll_interval"
    assert [p.status for p in seen] == ["chunking", *["processing"] * 4, "completed"]
    assert seen[-1].done and seen[-1].total == 4 and seen[-1].completed == 4 and seen[-1].failed == 0
    assert [p.completed for p in seen] == sorted(p.completed for p in seen)
    assert seen[-1].batches[0].batch_id == job.batch_ids[0] and seen[-1].batches[0].usage is not None


async def test_usage_and_cost(fake: FakeMoondream, tmp_path: Path) -> None:
    async with new_job(fake, tmp_path / "job") as job:
        assert job.usage is None and job.cost() == (0.0, 0.0)
        add_detections(job, small_images(3))
        results = await collect(job)
    record = the_batch(fake)
    assert job.usage == Usage(**record.usage)
    assert sum(r.unwrap().usage.input_tokens for r in results) == record.usage["input_tokens"]  # per line
    batch_usd, standard_usd = job.cost()
    expected = (record.usage["input_tokens"] * 0.30 + record.usage["output_tokens"] * 2.50) / 1e6
    assert standard_usd == pytest.approx(expected) and batch_usd == pytest.approx(expected / 2)
    # the usage survives in the job directory
    assert MoondreamBatch(tmp_path / "job", api_key=fake.api_key, base_url=fake.base_url).usage == job.usage


async def test_model_is_sent_with_the_completion(fake: FakeMoondream, tmp_path: Path) -> None:
    model = "moondream3-preview/ft1@100"
    async with new_job(fake, tmp_path / "job", model=model) as job:
        add_detections(job, small_images(1))
        await collect(job)
    assert the_batch(fake).model == model
    assert batch_requests(fake, "mpu-complete")[0].json["model"] == model
    with pytest.raises(ConfigurationError, match="one model"):
        new_job(fake, tmp_path / "job", model="moondream3-preview")


async def test_an_async_moondream_clients_transport_can_be_shared(
    fake: FakeMoondream, client: moondream_tools.AsyncMoondream, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="either client="):
        MoondreamBatch(tmp_path / "job", client=client, api_key="other")
    async with MoondreamBatch(tmp_path / "job", client=client, poll_interval=0.01) as job:
        add_detections(job, small_images(2))
        assert len(await collect(job)) == 2
    assert client._transport.sessions.pooled is not None, "the client's session was used"
    caption = await client.caption(small_images(1)[0])  # and is still open: the job did not close it
    assert caption.caption


# ---------------------------------------------------------------- upload


async def test_multipart_upload_in_small_parts(fake: FakeMoondream, tmp_path: Path) -> None:
    async with new_job(fake, tmp_path / "job", part_size=10_000) as job:
        add_detections(job, small_images(6))
        results = await collect(job)
    assert len(results) == 6 and all(r.ok for r in results)
    size = (tmp_path / "job" / "requests-0000.jsonl").stat().st_size
    parts = math.ceil(size / 10_000)
    assert parts >= 3
    record = the_batch(fake)
    assert record.part_uploads == {n: 1 for n in range(1, parts + 1)} and record.size == size
    puts = batch_requests(fake, "mpu-uploadpart")
    assert all(r.headers["Content-Type"] == "application/octet-stream" for r in puts)
    assert [len(r.body) for r in puts] == [10_000] * (parts - 1) + [size - 10_000 * (parts - 1)]
    listed = batch_requests(fake, "mpu-complete")[0].json["parts"]
    assert [p["partNumber"] for p in listed] == list(range(1, parts + 1))
    assert all(p["etag"].startswith('"') and p["etag"].endswith('"') for p in listed), "etags passed back unchanged"


async def test_a_failed_part_is_retried_without_restarting_the_upload(
    fake: FakeMoondream, tmp_path: Path, delays: list[float]
) -> None:
    fake.batch_part_fail_next(count=1, status=500)
    async with new_job(fake, tmp_path / "job", part_size=10_000) as job:
        add_detections(job, small_images(4))
        results = await collect(job)
    assert len(results) == 4 and all(r.ok for r in results)
    record = the_batch(fake)
    assert record.part_uploads[1] == 2 and all(n == 1 for p, n in record.part_uploads.items() if p != 1)
    assert len(fake.uploads) == 1 and len(batch_requests(fake, "mpu-create")) == 1
    assert len(delays) == 1


async def test_parts_over_the_published_limit_are_refused() -> None:
    with pytest.raises(ValueError, match="under 100 MB"):
        MoondreamBatch("unused", api_key="k", base_url="http://127.0.0.1:9/v1", part_size=100_000_000)
    with pytest.raises(ValueError, match="100000"):
        MoondreamBatch("unused", api_key="k", base_url="http://127.0.0.1:9/v1", max_lines=100_001)


# ---------------------------------------------------------------- several batches


async def test_a_job_over_the_limits_is_split_into_batches(fake: FakeMoondream, tmp_path: Path) -> None:
    images = small_images(7)
    async with new_job(fake, tmp_path / "lines", max_lines=3) as job:
        add_detections(job, images)
        results = await collect(job)
    assert sorted(int(r.id) for r in results) == list(range(7)) and all(r.ok for r in results)
    assert sorted(b.lines for b in fake.batches.values()) == [1, 3, 3] and len(job.batch_ids) == 3
    assert {r.batch_id for r in results} == set(job.batch_ids)

    line = (tmp_path / "lines" / "requests-0000.jsonl").read_bytes().split(b"\n")[0]
    max_bytes = 2 * len(line) + len(line) // 2
    async with new_job(fake, tmp_path / "bytes", max_bytes=max_bytes) as job:
        add_detections(job, images)
        results = await collect(job)
    assert sorted(int(r.id) for r in results) == list(range(7))
    sizes = [fake.batches[b].size for b in job.batch_ids]
    assert len(sizes) >= 3 and max(sizes) <= max_bytes


async def test_a_failed_batch_is_a_typed_error_after_the_other_batches_results(
    fake: FakeMoondream, tmp_path: Path
) -> None:
    fake.batch_fail_next(code="processing_failed", message="the workers crashed")
    got: list[BatchResult] = []
    async with new_job(fake, tmp_path / "job", max_lines=2) as job:
        add_detections(job, small_images(5))
        with pytest.raises(BatchFailedError) as info:
            async for item in job.run():
                got.append(item)
        progress = await job.status()
    failed = job.batch_ids[0]
    assert info.value.code == "processing_failed" and info.value.batch_id == failed
    assert "the workers crashed" in str(info.value)
    assert sorted(int(r.id) for r in got) == [2, 3, 4], "the other batches' results came first"
    assert progress.status == "failed" and progress.batches[0].status == "failed"
    assert progress.batches[0].error == {"code": "processing_failed", "message": "the workers crashed"}


# ---------------------------------------------------------------- per-item errors


async def test_a_line_that_errors_becomes_a_per_item_error(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_line = _job.request_line

    def line(id: str, skill: str, image: str, fields: Any) -> bytes:  # the service cannot decode "bad"'s image
        return real_line(id, skill, "not base64!" if id == "bad" else image, fields)

    monkeypatch.setattr(_job, "request_line", line)
    images = small_images(2)
    async with new_job(fake, tmp_path / "job") as job:
        job.add(images[0], "caption", id="good")
        job.add(images[1], "caption", id="bad")
        job.add(b"these bytes are not an image", "caption", id="unreadable")
        job.add(tmp_path / "missing.png", "caption", id="missing")
        results = {r.id: r for r in await collect(job)}
    assert results["good"].ok and isinstance(results["good"].result, Caption)
    bad = results["bad"]
    assert not bad.ok and bad.result is None and isinstance(bad.error, BatchItemError)
    assert bad.error.code == "image_decode_failed" and bad.error.line_index == 1 and bad.error.batch_id == bad.batch_id
    with pytest.raises(BatchItemError, match="image_decode_failed"):
        bad.unwrap()
    for rid in ("unreadable", "missing"):  # never sent: the rest of the job went on
        assert results[rid].error is not None and results[rid].error.code == "image_error"
        assert results[rid].batch_id is None and results[rid].line_index is None
    assert the_batch(fake).lines == 2


def test_result_lines_become_results_or_item_errors() -> None:
    common = dict(id="a", image_size=ImageSize(width=100, height=50), object="car", batch_id="b1", line_index=3)
    ok = {"line_index": 3, "id": "a", "status": "ok", "usage": {"input_tokens": 5, "output_tokens": 2},
          "result": {"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]}}
    result, error = parse_result_line(ok, skill="detect", **common)
    assert error is None and isinstance(result, Detections)
    assert result.to_pixels()[0].x_max == pytest.approx(30) and result.usage == Usage(input_tokens=5, output_tokens=2)
    answer, _ = parse_result_line(
        {"status": "ok", "result": {"answer": "2", "reasoning": {"text": "two", "grounding": []}}},
        skill="query", **common,
    )
    assert isinstance(answer, Answer) and answer.reasoning is not None and answer.reasoning.text == "two"
    _, error = parse_result_line(
        {"status": "error", "error": {"code": "processing_error", "message": "boom"}}, skill="caption", **common
    )
    assert error is not None and error.code == "processing_error" and error.id == "a" and "boom" in str(error)
    _, error = parse_result_line({"status": "ok", "result": {"objects": "nope"}}, skill="detect", **common)
    assert error is not None and error.code == "invalid_result"


# ---------------------------------------------------------------- adding requests


def test_requests_are_checked_when_added(tmp_path: Path) -> None:
    job = MoondreamBatch(tmp_path / "job", api_key="k", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(UnsupportedSkillError, match="AsyncMoondream.segment") as info:
        job.add(b"img", "segment", object="car")  # type: ignore[arg-type]
    assert info.value.skill == "segment" and info.value.supported == {"caption", "query", "detect", "point"}
    with pytest.raises(ValueError, match="settings does not apply to detect"):
        job.add(b"img", "detect", object="car", settings={"max_objects": 5})
    with pytest.raises(ValueError, match="object must be"):
        job.add(b"img", "point")
    with pytest.raises(ValueError, match="question"):
        job.add(b"img", "query")
    with pytest.raises(ValueError, match="skill must be one of"):
        job.add(b"img", "chat")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        job.add(Image.new("RGB", (4, 4)), "caption")  # type: ignore[arg-type]
    assert job.add(b"img", "caption") == "0"
    assert job.add(b"img", "caption", id="mine") == "mine"
    with pytest.raises(ValueError, match="already used"):
        job.add(b"img", "caption", id="0")
    assert request_fields("caption") == {"length": "normal"}
    assert request_fields("query", question="q?", reasoning=True, settings={"max_tokens": 5}) == {
        "question": "q?", "reasoning": True, "settings": {"max_tokens": 5}
    }
    assert estimate_cost(Usage(input_tokens=1_000_000, output_tokens=1_000_000)) == (1.4, 2.8)


async def test_requests_wait_on_disk_not_in_memory(tmp_path: Path) -> None:
    """Added requests leave no Python objects behind (as objects, 50,000 of them took ~30 MB,
    and images given as bytes stayed in memory until built), and the list's identity is the
    digest ``requests_digest`` gives the same list (job directories built before still resume)."""
    job = MoondreamBatch(tmp_path / "job", api_key="k", base_url="http://127.0.0.1:9/v1")
    payload = bytes(range(256)) * 400  # 100 KB of "image" per request
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            job.add(f"/photos/IMG_{i:06d}.jpg", "query", question="How many people?")
        for i in range(200):
            job.add(payload + i.to_bytes(2, "big"), "caption", id=f"bytes-{i}")  # 20 MB in all
        job.add(tmp_path / "photo.jpg", "detect", object="car")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    try:
        assert held < 1_000_000, f"{held} bytes held in memory for 20,201 requests"
        requests = list(job._requests)
        assert [r.index for r in requests] == list(range(20_201))
        assert requests[5].source == "/photos/IMG_000005.jpg" and requests[5].fields == {"question": "How many people?", "reasoning": False}
        assert requests[20_000 + 7].source == payload + (7).to_bytes(2, "big") and requests[20_000 + 7].id == "bytes-7"
        assert requests[-1].source == tmp_path / "photo.jpg" and isinstance(requests[-1].source, Path)
        assert job._requests.digest() == requests_digest([(r.id, r.skill, r.description, r.fields) for r in requests])
        with pytest.raises(ValueError, match="already used"):
            job.add(b"img", "caption", id="bytes-3")
    finally:
        await job.aclose()
    with pytest.raises(ConfigurationError, match="closed"):
        job.add(b"img", "caption")


async def test_a_job_directory_keeps_its_requests_and_server(fake: FakeMoondream, tmp_path: Path) -> None:
    images = small_images(2)
    async with new_job(fake, tmp_path / "job") as job:
        add_detections(job, images)
        await job.build()
    with pytest.raises(ConfigurationError, match="other requests"):
        async with new_job(fake, tmp_path / "job") as other:
            other.add(images[0], "caption")
            await other.submit()
    with pytest.raises(ConfigurationError, match="built for http"):
        MoondreamBatch(tmp_path / "job", api_key="k", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigurationError, match="add\\(\\) requests"):
        async with new_job(fake, tmp_path / "empty") as empty:
            await empty.submit()
    assert not fake.batches


async def test_one_job_object_at_a_time_per_directory(fake: FakeMoondream, tmp_path: Path) -> None:
    async with new_job(fake, tmp_path / "job") as first:
        add_detections(first, small_images(1))
        await first.build()
        async with new_job(fake, tmp_path / "job") as second:
            with pytest.raises(BatchError) as info:
                await second.submit()
            assert info.value.code == "job_busy"
    async with new_job(fake, tmp_path / "job") as later:  # free once the first is closed
        assert len(await collect(later)) == 1
    assert the_batch(fake).completes == 1


# ---------------------------------------------------------------- resume


def _all_parts_uploaded(state: JobState) -> bool:
    return all(b.part_size and len(b.parts) == math.ceil(b.bytes / b.part_size) for b in state.batches)


KILL_POINTS: dict[str, Callable[[JobState], bool]] = {
    "after the upload": lambda s: _all_parts_uploaded(s) and not any(b.submitting for b in s.batches),
    "before the completion is sent": lambda s: any(b.submitting for b in s.batches),
    "after the submit": lambda s: all(b.batch_id for b in s.batches),
    "after one output downloaded": lambda s: any(len(b.downloaded) == 1 for b in s.batches),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("add_again", [True, False], ids=["same-script", "bare-resume"])
async def test_killed_at_any_step_resumes_without_repeating_it(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, add_again: bool
) -> None:
    images = small_images(4)
    fired = kill_after(monkeypatch, KILL_POINTS[point])
    with pytest.raises(Killed):
        async with new_job(fake, tmp_path / "job", part_size=8_000) as job:
            add_detections(job, images)
            await collect(job)
    assert fired

    async with new_job(fake, tmp_path / "job") as resumed:  # a new process; its own part_size is ignored
        if add_again:
            add_detections(resumed, images)
        results = await collect(resumed)
    assert sorted(int(r.id) for r in results) == [0, 1, 2, 3] and all(r.ok for r in results), "each once"
    record = the_batch(fake)
    assert record.completes == 1, "submitted once"
    assert len(fake.uploads) == 1 and set(record.part_uploads.values()) == {1}, "no part uploaded twice"
    assert record.downloads == {0: 1, 1: 1}, "no result file downloaded twice"

    async with new_job(fake, tmp_path / "job") as again:  # a finished job replays from disk
        assert sorted(int(r.id) for r in await collect(again)) == [0, 1, 2, 3]
    assert record.downloads == {0: 1, 1: 1} and record.completes == 1


async def test_cancelled_while_polling_resumes_without_resubmitting(fake: FakeMoondream, tmp_path: Path) -> None:
    images = small_images(3)
    job = new_job(fake, tmp_path / "job", poll_interval=30.0, max_poll_interval=30.0)
    add_detections(job, images)
    task = asyncio.ensure_future(collect(job))
    while not fake.batches or the_batch(fake).polls < 1:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await job.aclose()

    async with new_job(fake, tmp_path / "job") as resumed:
        results = await collect(resumed)
    assert sorted(int(r.id) for r in results) == [0, 1, 2] and the_batch(fake).completes == 1


async def test_submit_now_fetch_later_from_another_process(fake: FakeMoondream, tmp_path: Path) -> None:
    async with new_job(fake, tmp_path / "job") as job:
        add_detections(job, small_images(3))
        ids = await job.submit()
    assert ids == list(fake.batches) and the_batch(fake).polls == 0

    async with new_job(fake, tmp_path / "job") as later:
        with pytest.raises(BatchError) as info:
            [item async for item in later.results()]
        assert info.value.code == "not_ready"
        progress = await later.status()
        while not progress.done:
            progress = await later.status()
        assert progress.status == "completed" and progress.completed == 3
        results = [item async for item in later.results()]
    assert sorted(int(r.id) for r in results) == [0, 1, 2] and the_batch(fake).completes == 1


async def test_a_lost_completion_answer_is_reported_not_resubmitted(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MoondreamBatch._call
    fired: list[bool] = []

    async def call(self: MoondreamBatch, method: str, route: str, body: Any = None, **options: Any) -> Any:
        data = await original(self, method, route, body, **options)
        if "mpu-complete" in route and not fired:
            fired.append(True)
            raise Killed  # the service accepted the batch; the answer never got recorded
        return data

    monkeypatch.setattr(MoondreamBatch, "_call", call)
    images = small_images(2)
    with pytest.raises(Killed):
        async with new_job(fake, tmp_path / "job") as job:
            add_detections(job, images)
            await collect(job)
    batch_id = the_batch(fake).id

    async with new_job(fake, tmp_path / "job") as resumed:
        with pytest.raises(BatchError) as info:
            await collect(resumed)
        assert info.value.code == "submit_unknown" and "attach_batch" in str(info.value)
        assert len(fake.batches) == 1 and the_batch(fake).completes == 2  # the second was refused
        resumed.attach_batch(0, batch_id)
        results = await collect(resumed)
    assert sorted(int(r.id) for r in results) == [0, 1]


# ---------------------------------------------------------------- expiry


async def test_an_expired_batch_is_a_typed_error(fake: FakeMoondream, tmp_path: Path) -> None:
    async with new_job(fake, tmp_path / "job") as job:
        add_detections(job, small_images(2))
        [batch_id] = await job.submit()
        fake.expire_batch(batch_id)
        with pytest.raises(BatchExpiredError) as info:
            await collect(job)
        progress = await job.status()
    error = info.value
    assert error.code == "expired" and error.batch_id == batch_id and error.expires_at
    assert "7 days" in str(error) and "submit those requests again" in str(error)
    assert progress.batches[0].status == "expired" and progress.status == "failed"


async def test_results_downloaded_before_expiry_are_kept(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kill_after(monkeypatch, KILL_POINTS["after one output downloaded"])
    images = small_images(5)
    with pytest.raises(Killed):
        async with new_job(fake, tmp_path / "job") as job:
            add_detections(job, images)
            await collect(job)
    record = the_batch(fake)
    fake.expire_batch(record.id)
    [kept] = (tmp_path / "job").glob("results-*.jsonl")
    kept_ids = sorted(json.loads(line)["id"] for line in kept.read_text().splitlines())

    got: list[BatchResult] = []
    async with new_job(fake, tmp_path / "job") as resumed:
        with pytest.raises(BatchExpiredError, match="1 of its 2 result files were downloaded"):
            async for item in resumed.run():
                got.append(item)
    assert sorted(r.id for r in got) == kept_ids and all(r.ok for r in got)
    assert sum(record.downloads.values()) == 1


# ---------------------------------------------------------------- secrets


async def test_the_key_never_reaches_the_job_directory_logs_or_reprs(
    fake: FakeMoondream, tmp_path: Path, caplog: pytest.LogCaptureFixture, delays: list[float]
) -> None:
    caplog.set_level(logging.DEBUG, logger="moondream_tools")
    fake.batch_part_fail_next(count=1, status=503)
    async with new_job(fake, tmp_path / "job", part_size=8_000) as job:
        add_detections(job, small_images(3))
        results = await collect(job)
        shown = repr(job)
    assert len(results) == 3
    state = (tmp_path / "job" / "job.json").read_text()
    assert json.loads(state)["batches"][0]["batch_id"] == job.batch_ids[0]
    assert "X-Amz-Signature" not in state, "presigned URLs are credentials too: not kept"
    texts = [state, caplog.text, shown, *(str(r) for r in results)]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "job").iterdir()]
    assert fake.api_key and not any(fake.api_key in text for text in texts)
    assert "api_key=set" in shown
    assert any("retrying PUT /batch/" in r.getMessage() for r in caplog.records)
    assert any("submitted as" in r.getMessage() for r in caplog.records)


def test_public_names() -> None:
    for name in ("MoondreamBatch", "BatchResult", "BatchProgress", "BatchInfo", "BatchError", "BatchFailedError",
                 "BatchExpiredError", "BatchItemError"):
        assert name in moondream_tools.__all__ and hasattr(moondream_tools, name)
    assert issubclass(BatchExpiredError, BatchError) and issubclass(BatchFailedError, BatchError)
    assert issubclass(BatchItemError, moondream_tools.MoondreamError)
    assert Counter(moondream_tools.__all__).most_common(1)[0][1] == 1
