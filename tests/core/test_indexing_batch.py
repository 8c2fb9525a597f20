"""ImageIndexer through Moondream's Batch API (``stream_batch`` / ``index_batch``).

Ground truth: the standard path's records on the same images (``ImageIndexer.index``), the
scenes' shapes, the batches the emulator received (``fake.batches``), the uploads the
standard path sent, and the files in the job directory.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moondream_tools import (
    AsyncMoondream,
    BatchProgress,
    ConfigurationError,
    FalMoondream,
    ResultCache,
)
from moondream_tools.batch import _job
from moondream_tools.batch._state import JobState
from moondream_tools.indexing import ImageIndexer, ImageRecord, IndexProgress
from moondream_tools.testing import FakeMoondream, Scene, Shape

from batch_support import Killed, kill_after
from tiling_support import small_scene

OPTIONS: dict[str, Any] = dict(questions=["How many circles?"], ocr=True, detect=["yellow triangle", "shapes"])
CODES = ["caption", "q0", "ocr", "d0", "d1"]  # the line id of each call of OPTIONS
FAST: dict[str, Any] = dict(poll_interval=0.01, max_poll_interval=0.02)
YELLOW = Scene(640, 480, [Shape("triangle", "yellow", (200, 150), 90), Shape("circle", "red", (450, 320), 80)])


def folder(tmp_path: Path, count: int = 4) -> tuple[Path, list[Scene]]:
    """``count`` scenes (scene0.jpg .. ) and a corrupt ``broken.jpg`` (listed first)."""
    scenes = [YELLOW] + [Scene.random(seed, width=640, height=480, count=4) for seed in range(1, count)]
    root = tmp_path / "photos"
    root.mkdir()
    for i, scene in enumerate(scenes):
        (root / f"scene{i}.jpg").write_bytes(scene.encode("JPEG", 92))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root, scenes


def skill_requests(fake: FakeMoondream) -> list[Any]:
    return [r for r in fake.requests if r.path.rsplit("/", 1)[-1] in ("caption", "query", "detect", "point", "segment")]


def dumps(records: list[ImageRecord]) -> list[dict[str, Any]]:
    return [r.model_dump() for r in records]


def lines_sent(job_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(job_dir.glob("requests-*.jsonl")) for line in path.read_bytes().splitlines()]


# ---------------------------------------------------------------------------
# the same records as the standard path
# ---------------------------------------------------------------------------


async def test_batch_records_equal_the_standard_paths(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    root, scenes = folder(tmp_path)
    sources = [root, f"{fake.url}/no-such-image.jpg"]
    standard = await ImageIndexer(client, **OPTIONS).index(sources)
    uploads = {r.json["image_url"].partition(",")[2] for r in skill_requests(fake)}
    fake.requests.clear()

    progress: list[IndexProgress] = []
    polls: list[BatchProgress] = []
    indexer = ImageIndexer(client, **OPTIONS, on_progress=progress.append)
    job_dir = tmp_path / "job"
    records = await indexer.index_batch(sources, job_dir=job_dir, max_lines=7, on_batch_progress=polls.append, **FAST)

    assert dumps(records) == dumps(standard), "caption, answers, ocr, objects (counts, boxes), ids, sizes, errors"
    broken, *good, missing = records
    assert broken.source.endswith("broken.jpg") and set(broken.errors) == {"image"}
    assert broken.id == hashlib.sha256((root / "broken.jpg").read_bytes()).hexdigest()
    assert "404" in missing.errors["image"]
    for record, scene in zip(good, scenes):
        assert record.ok and (record.width, record.height) == (640, 480)
        assert record.objects["shapes"].count == len(scene.truth())
    assert "yellow triangle" in (good[0].caption or "").lower() and good[0].objects["yellow triangle"].count == 1

    assert skill_requests(fake) == [], "nothing went through the standard API"
    sent = lines_sent(job_dir)
    assert sorted(line["id"] for line in sent) == sorted(f"{i}:{c}" for i in range(1, 5) for c in CODES)
    assert {line["image"] for line in sent} == uploads, "each line carries exactly the standard path's upload"
    assert len(fake.batches) == 3 and all(b.completes == 1 for b in fake.batches.values()), "20 lines, 7 a batch"
    assert not (job_dir / "images").exists(), "the prepared images are deleted once the batch files are built"

    assert progress[-1] == IndexProgress(total=6, done=6, failed=2, requests=20, cached=0)
    assert [p.done for p in progress] == [1, 2, 3, 4, 5, 6]
    assert polls and polls[-1].status == "completed" and polls[-1].total == 20
    usage = indexer.batch_usage
    assert usage is not None
    assert usage.input_tokens == sum(b.usage["input_tokens"] for b in fake.batches.values())
    assert usage.output_tokens == sum(b.usage["output_tokens"] for b in fake.batches.values())
    batch_usd, standard_usd = indexer.batch_cost()
    assert 0 < batch_usd == pytest.approx(standard_usd / 2)


async def test_large_images_are_tiled_into_batch_lines(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    scene = small_scene()
    buffer = io.BytesIO()
    scene.render().save(buffer, "JPEG", quality=92)
    data = buffer.getvalue()
    options: dict[str, Any] = dict(caption=False, questions=["How many circles?"], detect=["shapes"])
    standard = await ImageIndexer(client, **options).index([data])
    indexer = ImageIndexer(client, **options)
    records = await indexer.index_batch([data], job_dir=tmp_path / "job", **FAST)
    assert dumps(records) == dumps(standard)
    found = records[0].objects["shapes"]
    assert found.tiles == 15 and found.count == len(scene.truth()), "each object once, as the tiled standard path"
    assert records[0].source == f"bytes:{records[0].id[:12]}"
    ids = [line["id"] for line in lines_sent(tmp_path / "job")]
    assert ids == ["0:q0"] + [f"0:d0.t{k}" for k in range(15)], "one whole-image line, one line per tile"


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------


async def test_the_cache_makes_a_second_batch_run_send_nothing(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    root, _ = folder(tmp_path)
    cache = ResultCache(tmp_path / "cache")
    first = await ImageIndexer(client, **OPTIONS, cache=cache).index_batch(root, job_dir=tmp_path / "job1", **FAST)
    assert len(fake.batches) == 1 and len(cache) == 4 * 5, "what succeeded is stored"

    progress: list[IndexProgress] = []
    indexer = ImageIndexer(client, **OPTIONS, cache=cache, on_progress=progress.append)
    second = await indexer.index_batch(root, job_dir=tmp_path / "job2", **FAST)
    assert len(fake.batches) == 1, "no new batch"
    assert dumps(second) == dumps(first)
    assert progress[-1] == IndexProgress(total=5, done=5, failed=1, requests=0, cached=20)
    assert indexer.batch_usage is None and indexer.batch_cost() == (0.0, 0.0)
    assert not list((tmp_path / "job2").glob("requests-*")), "no batch file either"

    await ImageIndexer(client, **OPTIONS, cache=cache).index(root)
    assert skill_requests(fake) == [], "the standard path reads what the batch stored (same keys)"

    (root / "scene2.jpg").write_bytes(Scene.random(99, width=640, height=480, count=3).encode("JPEG", 92))
    third = await ImageIndexer(client, **OPTIONS, cache=cache).index_batch(root, job_dir=tmp_path / "job3", **FAST)
    assert len(fake.batches) == 2
    assert sorted(line["id"] for line in lines_sent(tmp_path / "job3")) == sorted(f"3:{c}" for c in CODES)
    assert third[3].ok and third[3].id != first[3].id and dumps(third[:3]) == dumps(first[:3])
    cache.close()


async def test_line_errors_and_a_failed_batch_are_part_errors_never_cached(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, scenes = folder(tmp_path, count=2)
    cache = ResultCache(tmp_path / "cache")
    real_line = _job.request_line

    def line(id: str, skill: str, image: str, fields: Any) -> bytes:  # the service cannot decode this one
        return real_line(id, skill, "not base64!" if id == "1:d1" else image, fields)

    monkeypatch.setattr(_job, "request_line", line)
    first = await ImageIndexer(client, **OPTIONS, cache=cache).index_batch(root, job_dir=tmp_path / "job1", **FAST)
    assert set(first[1].errors) == {"detect: shapes"} and "image_decode_failed" in first[1].errors["detect: shapes"]
    assert first[1].caption and first[1].objects["yellow triangle"].count == 1, "the image's other parts are kept"
    assert first[2].ok and len(cache) == 2 * 5 - 1, "the failed line is not stored"
    monkeypatch.setattr(_job, "request_line", real_line)

    fake.batch_fail_next("processing_failed", "the batch could not be processed")
    second = await ImageIndexer(client, **OPTIONS, cache=cache).index_batch(root, job_dir=tmp_path / "job2", **FAST)
    assert [line["id"] for line in lines_sent(tmp_path / "job2")] == ["1:d1"], "only the part that failed is sent"
    assert "processing_failed" in second[1].errors["detect: shapes"], "a failed batch: its parts' error, no raise"
    assert second[1].caption == first[1].caption

    third = await ImageIndexer(client, **OPTIONS, cache=cache).index_batch(root, job_dir=tmp_path / "job3", **FAST)
    assert [line["id"] for line in lines_sent(tmp_path / "job3")] == ["1:d1"]
    assert third[1].ok and third[1].objects["shapes"].count == len(scenes[0].truth())
    cache.close()


async def test_bytes_from_a_generator_keep_input_order(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    scenes = [Scene.random(seed, width=320, height=240, count=2) for seed in range(8)]
    indexer = ImageIndexer(client, caption=False, detect=["shapes"], max_concurrency=2)
    records = await indexer.index_batch((s.encode("JPEG", 92) for s in scenes), job_dir=tmp_path / "job", **FAST)
    assert [r.objects["shapes"].count for r in records] == [len(s.truth()) for s in scenes]
    assert all(r.source == f"bytes:{r.id[:12]}" for r in records)
    again = await indexer.index_batch((s.encode("JPEG", 92) for s in scenes), job_dir=tmp_path / "job", **FAST)
    assert dumps(again) == dumps(records) and len(fake.batches) == 1, "the same bytes resume the same job"


# ---------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------

KILL_POINTS: dict[str, Callable[[JobState], bool]] = {
    "after the build": lambda s: not any(b.upload_id for b in s.batches),
    "after the submit": lambda s: all(b.batch_id for b in s.batches),
    "after one output downloaded": lambda s: any(len(b.downloaded) == 1 for b in s.batches),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
async def test_killed_at_any_step_resumes_the_same_job(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    root, _ = folder(tmp_path, count=3)
    standard = await ImageIndexer(client, **OPTIONS).index(root)
    job_dir = tmp_path / "job"
    fired = kill_after(monkeypatch, KILL_POINTS[point])
    with pytest.raises(Killed):
        await ImageIndexer(client, **OPTIONS).index_batch(root, job_dir=job_dir, **FAST)
    assert fired

    records = await ImageIndexer(client, **OPTIONS).index_batch(root, job_dir=job_dir, **FAST)  # a new process
    assert dumps(records) == dumps(standard)
    assert len(fake.batches) == 1 and len(fake.uploads) == 1
    batch = next(iter(fake.batches.values()))
    assert batch.completes == 1, "submitted once"
    assert set(batch.part_uploads.values()) == {1}, "no part uploaded twice"
    assert all(n == 1 for n in batch.downloads.values()), "no result file downloaded twice"


async def test_a_run_closed_early_resumes_and_a_finished_job_replays(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    root, _ = folder(tmp_path, count=3)
    cache = ResultCache(tmp_path / "cache")
    job_dir = tmp_path / "job"
    stream = ImageIndexer(client, **OPTIONS, cache=cache).stream_batch(root, job_dir=job_dir, **FAST)
    first = await anext(stream)
    await stream.aclose()
    assert set(first.errors) == {"image"}

    indexer = ImageIndexer(client, **OPTIONS, cache=cache)
    records = await indexer.index_batch(root, job_dir=job_dir, **FAST)
    assert all(r.ok for r in records[1:]) and len(fake.batches) == 1
    assert indexer.batch_usage is not None, "a resumed job still reports its usage"
    batch = next(iter(fake.batches.values()))
    downloads = dict(batch.downloads)
    replay = await ImageIndexer(client, **OPTIONS, cache=cache).index_batch(root, job_dir=job_dir, **FAST)
    assert dumps(replay) == dumps(records) and batch.downloads == downloads and batch.completes == 1
    cache.close()


async def test_a_job_directory_refuses_other_sources_or_options(client: AsyncMoondream, tmp_path: Path) -> None:
    root, _ = folder(tmp_path, count=2)
    job_dir = tmp_path / "job"
    await ImageIndexer(client, **OPTIONS).index_batch(root, job_dir=job_dir, **FAST)
    with pytest.raises(ConfigurationError, match="other images"):
        await ImageIndexer(client, **OPTIONS).index_batch([root / "scene1.jpg"], job_dir=job_dir, **FAST)
    with pytest.raises(ConfigurationError, match="for 3 images, not 4"):
        await ImageIndexer(client, **OPTIONS).index_batch([root, root / "scene1.jpg"], job_dir=job_dir, **FAST)
    with pytest.raises(ConfigurationError, match="other options"):
        await ImageIndexer(client, **{**OPTIONS, "questions": ["Is it red?"]}).index_batch(root, job_dir=job_dir, **FAST)


# ---------------------------------------------------------------------------
# what the Batch API cannot do
# ---------------------------------------------------------------------------


async def test_only_moondream_cloud_and_no_max_objects(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    async with FalMoondream(api_key=fake.fal_key, base_url=fake.fal_base_url) as fal:
        with pytest.raises(TypeError, match="needs an AsyncMoondream backend.*got FalMoondream"):
            await ImageIndexer(fal).index_batch([b"x"], job_dir=tmp_path / "job")
    with pytest.raises(ValueError, match="max_objects cannot be sent through the Batch API"):
        await ImageIndexer(client, detect=["car"], max_objects=5).index_batch([b"x"], job_dir=tmp_path / "job")
    with pytest.raises(ValueError, match="part_size"):
        await ImageIndexer(client).index_batch([b"x"], job_dir=tmp_path / "job", part_size=100_000_000)
    with pytest.raises(ValueError, match="max_lines"):
        await ImageIndexer(client).index_batch([b"x"], job_dir=tmp_path / "job", max_lines=0)
    assert not (tmp_path / "job").exists() and not fake.batches
