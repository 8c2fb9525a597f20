"""moondream_tools.indexing and the result cache, against the emulator's scene truth.

Ground truth: the scenes' shapes (labels, pixel boxes), the bytes on disk (sha256 ids), the
requests the emulator recorded, the rows of the SQLite file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import multiprocessing
import pickle
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from moondream_tools import (
    AsyncMoondream,
    CachedBackend,
    Caption,
    ConfigurationError,
    Detections,
    FalSam3,
    ImageSettings,
    ResultCache,
    VisionBackend,
    VisionTools,
)
from moondream_tools.indexing import ImageIndexer, ImageRecord, IndexProgress, expand_sources, phrase_key
from moondream_tools.indexing.records import FoundObjects
from moondream_tools.testing import FakeMoondream, Scene, Shape

from tiling_support import H, W, small_scene

YELLOW = Scene(640, 480, [Shape("triangle", "yellow", (200, 150), 90), Shape("circle", "red", (450, 320), 80)])


def jpeg(scene: Scene, **save: Any) -> bytes:
    buffer = io.BytesIO()
    scene.render().save(buffer, "JPEG", quality=92, **save)
    return buffer.getvalue()


def folder(tmp_path: Path, count: int = 4) -> tuple[Path, list[Scene]]:
    scenes = [YELLOW] + [Scene.random(seed, width=640, height=480, count=4) for seed in range(1, count)]
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, scene in enumerate(scenes):
        (root / ("sub" if i % 2 else "") / f"scene{i}.jpg").write_bytes(jpeg(scene))
    return root, scenes


def skill_requests(fake: FakeMoondream) -> list[Any]:
    return [r for r in fake.requests if r.path.rsplit("/", 1)[-1] in ("caption", "query", "detect", "point", "segment")]


def assert_boxes_match(found: FoundObjects, scene: Scene, label: str) -> None:
    truth = sorted(t.bbox_px for t in scene.truth() if t.label == label)
    assert found.count == len(truth)
    for box, want in zip(sorted(found.pixel_boxes), truth):
        assert all(abs(a - b) <= 2 for a, b in zip(box, want)), (box, want)


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------


def test_record_metadata_is_flat_and_names_each_phrase() -> None:
    record = ImageRecord(
        id="f" * 64, source="a.jpg", width=10, height=8, caption="A cat.", answers={"Is it red?": "no"},
        objects={"Red Circle": FoundObjects(phrase="Red Circle", count=2, boxes=[(0, 0, 0.5, 0.5)] * 2,
                                            pixel_boxes=[(0, 0, 5, 4)] * 2)},
        errors={"ocr": "boom"},
    )
    meta = record.metadata()
    assert all(isinstance(v, (str, int, float, bool)) or v is None for v in meta.values())
    assert meta["count_red_circle"] == 2 and json.loads(meta["boxes_red_circle"]) == [[0, 0, 5, 4]] * 2
    assert json.loads(meta["answers"]) == {"Is it red?": "no"} and json.loads(meta["errors"]) == {"ocr": "boom"}
    assert record.text().splitlines() == ["A cat.", "Is it red? no", "Objects found: Red Circle: 2."]
    none = record.model_copy(update={"objects": {"car": FoundObjects(phrase="car", count=0)}})
    assert "car" not in none.text() and none.metadata()["count_car"] == 0, "nothing found: no words to match"
    assert not record.ok
    assert set(ImageRecord.bulky_metadata_keys(meta)) >= {"boxes_red_circle", "answers", "errors"}
    assert phrase_key("Stop sign / no-entry") == "stop_sign_no_entry"


def test_expand_sources_walks_directories_sorted(tmp_path: Path) -> None:
    root, _ = folder(tmp_path)
    (root / "notes.txt").write_text("x")
    (root / "upper.JPG").write_bytes(b"x")
    found = list(expand_sources([root, "https://example.com/a.png", b"raw"]))
    names = [Path(p).name for p in found[:-2]]
    assert names == ["scene0.jpg", "scene2.jpg", "scene1.jpg", "scene3.jpg", "upper.JPG"]
    assert found[-2:] == ["https://example.com/a.png", b"raw"]
    assert [Path(p).name for p in expand_sources(root, glob="sub/*.jpg")] == ["scene1.jpg", "scene3.jpg"]
    with pytest.raises(TypeError, match="path, a URL or bytes"):
        list(expand_sources([3.5]))  # type: ignore[list-item]


# ---------------------------------------------------------------------------
# the indexer
# ---------------------------------------------------------------------------


async def test_index_folder_against_scene_truth(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    root, scenes = folder(tmp_path)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    progress: list[IndexProgress] = []
    indexer = ImageIndexer(
        client, questions=["How many circles?"], ocr=True, detect=["yellow triangle", "shapes"],
        on_progress=progress.append,
    )
    records = await indexer.index(root)
    paths = [str(p) for p in expand_sources(root)]
    assert [r.source for r in records] == paths, "input order"
    broken = records[0]
    assert broken.source.endswith("broken.jpg") and set(broken.errors) == {"image"}
    assert broken.id == hashlib.sha256((root / "broken.jpg").read_bytes()).hexdigest(), "read: its bytes name it"
    assert "broken.jpg" not in json.dumps([r.model_dump() for r in records[1:]])
    by_name = {Path(r.source).name: r for r in records[1:]}
    for i, scene in enumerate(scenes):
        record = by_name[f"scene{i}.jpg"]
        data = Path(record.source).read_bytes()
        assert record.ok, record.errors
        assert record.id == hashlib.sha256(data).hexdigest()
        assert (record.width, record.height) == (640, 480)
        assert record.answers["How many circles?"] == str(sum(t.label.endswith("circle") for t in scene.truth()))
        assert record.ocr == "There is no text in this image."
        shapes = record.objects["shapes"]
        assert shapes.count == len(scene.truth())
        for box, want in zip(sorted(shapes.pixel_boxes), sorted(t.bbox_px for t in scene.truth())):
            assert all(abs(a - b) <= 2 for a, b in zip(box, want))
        assert_boxes_match(record.objects["yellow triangle"], scene, "yellow triangle")
        assert record.metadata()["count_yellow_triangle"] == (1 if i == 0 else record.objects["yellow triangle"].count)
    assert "yellow triangle" in by_name["scene0.jpg"].caption.lower()  # type: ignore[union-attr]
    # One prepared image per source, shared by its five calls: each image sent one payload.
    sent = skill_requests(fake)
    assert len(sent) == 5 * len(scenes)
    assert len({r.json["image_url"] for r in sent}) == len(scenes)
    assert [p.done for p in progress] == list(range(1, len(paths) + 1))
    assert progress[-1] == IndexProgress(total=len(paths), done=len(paths), failed=1, requests=5 * len(scenes), cached=0)


async def test_cache_makes_a_second_run_free_and_a_change_costs_one_image(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    root, _ = folder(tmp_path)
    cache = ResultCache(tmp_path / "cache")
    indexer = ImageIndexer(client, questions=["How many circles?"], detect=["shapes"], cache=cache)
    first = await indexer.index(root)
    assert len(skill_requests(fake)) == 3 * 4 and len(cache) == 3 * 4
    fake.requests.clear()
    second = await indexer.index(root)
    assert skill_requests(fake) == [], "nothing changed: zero requests"
    assert [r.model_dump() for r in second] == [r.model_dump() for r in first]
    # A copy under another name is the same image.
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((root / "scene0.jpg").read_bytes())
    assert (await indexer.index_one(copy)).id == first[0].id and skill_requests(fake) == []
    # One image changed: that image's three requests only.
    (root / "scene0.jpg").write_bytes(jpeg(Scene.random(99, width=640, height=480, count=3)))
    third = await indexer.index(root)
    assert len(skill_requests(fake)) == 3
    assert third[0].id != first[0].id and [r.id for r in third[1:]] == [r.id for r in first[1:]]
    # Another question or another backend model is another key.
    fake.requests.clear()
    await ImageIndexer(client, caption=False, questions=["Is there a circle?"], cache=cache).index_one(root / "scene0.jpg")
    assert len(skill_requests(fake)) == 1
    cache.close()


async def test_failed_calls_are_recorded_and_never_cached(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    root, scenes = folder(tmp_path, count=2)
    cache = ResultCache(tmp_path / "c.sqlite3")
    fake.fail_next(1, status=500, route="/v1/detect")
    indexer = ImageIndexer(
        AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retries=0, max_concurrency=1),
        detect=["shapes"], cache=cache, max_concurrency=1,
    )
    records = await indexer.index(root)
    assert "detect: shapes" in records[0].errors and "500" in records[0].errors["detect: shapes"]
    assert records[0].caption and records[1].ok, "the rest of the image and the batch are kept"
    assert len(cache) == 3, "the failed detect was not stored"
    fake.requests.clear()
    again = await indexer.index(root)
    assert [r.path for r in skill_requests(fake)] == ["/v1/detect"], "only the failed call is asked again"
    assert again[0].ok and again[0].objects["shapes"].count == len(scenes[0].truth())
    await indexer.backend.aclose()
    cache.close()


async def test_bad_sources_and_missing_skills_become_record_errors(fake: FakeMoondream, tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg(YELLOW))
    async with FalSam3(api_key=fake.fal_key, base_url=fake.fal_base_url) as sam:
        assert isinstance(sam, VisionBackend)
        indexer = ImageIndexer(sam, detect=["yellow triangle"])
        records = await indexer.index([
            good, tmp_path / "missing.jpg", f"{fake.url}/no-such-image.jpg", tmp_path,  # a dir: its one image again
        ])
    assert [Path(r.source).name for r in records] == ["good.jpg", "missing.jpg", "no-such-image.jpg", "good.jpg"]
    assert set(records[0].errors) == {"caption", "detect: yellow triangle"}
    assert records[0].errors["caption"].startswith("FalSam3 has no 'caption' skill (it has: segment)")
    assert (records[0].width, records[0].height) == (640, 480)
    assert "not found" in records[1].errors["image"]
    assert records[1].id == hashlib.sha256(str(tmp_path / "missing.jpg").encode()).hexdigest(), "unread: its name"
    assert "404" in records[2].errors["image"]
    assert skill_requests(fake) == [], "a backend without the skills is never asked"


async def test_bytes_sources_and_a_lazy_iterable_keep_input_order(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scenes = [Scene.random(seed, width=320, height=240, count=2) for seed in range(12)]
    made: list[int] = []

    def generate():  # consumed lazily: no more than the window is read ahead
        for i, scene in enumerate(scenes):
            made.append(i)
            yield jpeg(scene)

    seen: list[int] = []
    indexer = ImageIndexer(client, caption=False, detect=["shapes"], max_concurrency=2,
                           on_progress=lambda p: seen.append(p.done))
    counts = []
    async for record in indexer.stream(generate()):
        assert len(made) <= len(counts) + 1 + 4 * 2 + 1
        assert record.source == f"bytes:{record.id[:12]}"
        counts.append(record.objects["shapes"].count)
    assert counts == [len(s.truth()) for s in scenes]
    assert seen == list(range(1, 13))


async def test_closing_the_stream_early_cancels_the_images_in_flight(tmp_path: Path) -> None:
    root, _ = folder(tmp_path)
    async with FakeMoondream(latency=0.2) as fake, AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        stream = ImageIndexer(md, max_concurrency=4).stream(root)
        first = await anext(stream)
        await stream.aclose()
        assert first.caption
        await asyncio.sleep(0)
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and "run" in repr(t.get_coro())]


async def test_large_images_are_tiled_for_detect(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = small_scene()
    buffer = io.BytesIO()
    scene.render().save(buffer, "JPEG", quality=92)
    record = await ImageIndexer(client, caption=False, detect=["shapes"]).index_one(buffer.getvalue())
    assert (record.width, record.height) == (W, H)
    found = record.objects["shapes"]
    assert found.tiles > 1 and found.count == len(scene.truth())
    assert len(skill_requests(fake)) == found.tiles


def test_indexer_refuses_bad_options(client: AsyncMoondream) -> None:
    with pytest.raises(TypeError, match="lists of strings"):
        ImageIndexer(client, questions="What is it?")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hold strings, got int"):
        ImageIndexer(client, detect=["car", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_concurrency"):
        ImageIndexer(client, max_concurrency=0)
    with pytest.raises(ValueError, match="tiling"):
        ImageIndexer(client, tiling="sometimes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="VisionBackend"):
        ImageIndexer(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ImageIndexer(client, colour=True)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------
# the result cache
# ---------------------------------------------------------------------------


def _writer(path: str, start: int) -> None:
    cache = ResultCache(path)
    for i in range(start, start + 50):
        cache.put(f"k{i}", Caption(caption=f"caption {i}"))
    cache.close()


def test_cache_is_shared_by_processes_and_threads(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite3")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, 50 * i)) for i in range(3)]
    for worker in workers:
        worker.start()
    cache = ResultCache(path)
    import threading

    threads = [threading.Thread(target=lambda n=n: [cache.put(f"t{n}-{i}", Caption(caption="x")) for i in range(50)])
               for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert len(cache) == 300
    assert cache.get("k149") == Caption(caption="caption 149")
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get("k0") == Caption(caption="caption 0") and copy.path == cache.path
    copy.close()
    cache.close()


@pytest.mark.parametrize("content", [b"garbage" * 1000, b"", b"SQLite format 3\x00" + b"\x00" * 200])
def test_a_corrupt_cache_file_is_reported_and_rebuilt(tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "results.sqlite3"
    if content:
        path.write_bytes(content)
    else:  # another program's database
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE songs (title TEXT)")
        other.commit()
        other.close()
    with caplog.at_level(logging.WARNING, logger="moondream_tools"):
        cache = ResultCache(path)
    assert cache.recovered and "rebuilt" in cache.recovered
    assert any("moved aside" in r.getMessage() for r in caplog.records)
    assert [p.name.startswith("results.sqlite3.corrupt-") for p in tmp_path.iterdir() if p != path].count(True) >= 1
    assert len(cache) == 0
    cache.put("a", Caption(caption="ok"))
    assert cache.get("a") == Caption(caption="ok")
    cache.close()
    reopened = ResultCache(path)
    assert reopened.recovered is None and len(reopened) == 1
    reopened.close()


def test_an_entry_that_no_longer_parses_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ResultCache(tmp_path / "c.sqlite3")
    cache.put("a", Detections(objects=[]))
    raw = sqlite3.connect(cache.path)
    raw.execute("UPDATE results SET value = '{\"objects\": 3}' WHERE key = 'a'")
    raw.commit()
    raw.close()
    with caplog.at_level(logging.WARNING, logger="moondream_tools"):
        assert cache.get("a") is None
    assert "does not parse" in caplog.text and len(cache) == 0
    with pytest.raises(TypeError, match="cannot cache"):
        cache.put("b", ImageSettings())  # type: ignore[arg-type]
    cache.close()
    with pytest.raises(ValueError, match="closed"):
        cache.get("a")


def test_an_unwritable_cache_location_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigurationError, match="cache directory"):
        ResultCache(blocker / "sub" / "c.sqlite3")


async def test_cached_backend_serves_tools_and_copies(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    md = CachedBackend(client, cache)
    assert isinstance(md, VisionBackend) and "CachedBackend(AsyncMoondream(" in repr(md)
    photo = tmp_path / "a.jpg"
    photo.write_bytes(jpeg(YELLOW))
    first = await md.detect(photo, "yellow triangle")
    assert len(skill_requests(fake)) == 1
    (tmp_path / "b.jpg").write_bytes(photo.read_bytes())
    again = await md.detect(tmp_path / "b.jpg", "yellow triangle")
    with Image.open(photo) as img:
        await md.detect(img.convert("RGB"), "red circle")
        await md.detect(img.convert("RGB"), "red circle")
    assert again == first and len(skill_requests(fake)) == 2
    tools = VisionTools(md, image_policy=None)
    name = tools.add_image(photo.read_bytes())
    first_text = (await tools.count(name, "yellow triangle")).text
    second_text = (await tools.count(name, "yellow triangle")).text
    assert first_text == second_text and "1" in first_text
    assert len(skill_requests(fake)) == 3, "the tool's second count came from the cache"
    assert (await md.query(None, "What is 2 + 2?")).answer, "text-only questions pass through"
    cache.close()
