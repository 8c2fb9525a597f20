"""MoondreamBatchUDF as a Ray Data job on a local cluster (one per session, see conftest.py)
against the emulator over loopback.

Ground truth: the single-process indexing of the same images (``ImageIndexer``), the scenes'
shapes, and the requests the emulator recorded with the time each arrived.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from moondream_tools import AsyncMoondream
from moondream_tools.indexing import ImageIndexer, ImageRecord
from moondream_tools.ray import MoondreamBatchUDF
from moondream_tools.testing import FakeMoondream, Scene

from .ray_support import KEY, KEY_ENV

pytestmark = pytest.mark.ray

SCENES = [Scene.random(seed, width=640, height=480, count=4) for seed in range(1, 6)]
OPTIONS: dict[str, Any] = dict(questions=["How many shapes?"], detect=["circle", "red square"])
PACER_PREFIX = "moondream_tools.pacer:"


def photos(tmp_path: Path) -> tuple[Path, dict[str, Scene]]:
    root = tmp_path / "photos"
    root.mkdir()
    scenes = {}
    for i, scene in enumerate(SCENES):
        path = root / f"scene{i}.jpg"
        path.write_bytes(scene.encode("JPEG", 92))
        scenes[str(path)] = scene
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root, scenes


def single_process(fake: FakeMoondream, paths: list[str], **options: Any) -> dict[str, ImageRecord]:
    async def run() -> list[ImageRecord]:
        async with AsyncMoondream(api_key=KEY, base_url=fake.base_url) as md:
            return await ImageIndexer(md, **options).index(paths)

    return {r.source: r for r in asyncio.run(run())}


def as_row(record: ImageRecord) -> dict[str, Any]:
    meta = record.metadata()
    return {"path": meta.pop("source"), **meta, "text": record.text() or None}


def pacers(ray: Any) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(PACER_PREFIX)]


def test_the_readme_job_writes_what_single_process_indexing_finds(
    ray_cluster: Any, fake: FakeMoondream, tmp_path: Path
) -> None:
    ray = ray_cluster
    root, scenes = photos(tmp_path)
    ds = ray.data.read_binary_files(str(root), include_paths=True)  # bytes + path, as on S3
    out = ds.map_batches(
        MoondreamBatchUDF,
        fn_constructor_kwargs=MoondreamBatchUDF.constructor_kwargs(
            "index", **OPTIONS, base_url=fake.base_url, api_key_env=KEY_ENV),
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,  # two actors and the read tasks fit on the two CPUs
        batch_size=2,
    )
    out.write_parquet(str(tmp_path / "labels"))
    table = pq.read_table(tmp_path / "labels")  # every block's file, one schema
    rows = {row["path"]: row for row in table.to_pylist()}
    sent = len([r for r in fake.requests if r.path.startswith("/v1/")])

    assert len(table) == len(scenes) + 1 and len(rows) == len(table)  # one row per image
    assert table.schema.names == ["path", *MoondreamBatchUDF("index", **OPTIONS).schema.names]
    fake.reset()
    truth = single_process(fake, sorted(rows), **OPTIONS)
    # caption, a question, two phrases: 4 requests an image, the same in both runs
    assert sent == len([r for r in fake.requests if r.path.startswith("/v1/")]) == 4 * len(scenes)
    for path, row in rows.items():  # order-independent equality with the single-process records
        record = truth[path]
        error = row.pop("error")
        if path.endswith("broken.jpg"):
            assert error is not None and error.startswith("image: not an image") and row["caption"] is None
            assert row["errors"] == as_row(record)["errors"]
            continue
        assert error is None and row == as_row(record)
        scene = scenes[path]
        assert row["count_circle"] == scene.count("circle") and row["count_red_square"] == scene.count("red square")


def test_error_rows_and_pandas_batches_on_a_cluster(ray_cluster: Any, fake: FakeMoondream, tmp_path: Path) -> None:
    ray = ray_cluster
    root, scenes = photos(tmp_path)
    good = sorted(scenes)
    items = [
        {"bytes": Path(good[0]).read_bytes(), "path": good[0]},
        {"bytes": None, "path": good[1]},
        {"bytes": b"GIF89a truncated", "path": "broken.gif"},
        {"bytes": None, "path": str(root / "missing.jpg")},
        {"bytes": None, "path": str(root)},
        {"bytes": None, "path": None},
    ]
    out = ray.data.from_items(items).map_batches(
        MoondreamBatchUDF,
        fn_constructor_kwargs=MoondreamBatchUDF.constructor_kwargs(
            "detect", object="circle", base_url=fake.base_url, api_key_env=KEY_ENV),
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
        batch_size=2,
        batch_format="pandas",
    )
    rows = out.take_all()
    assert sorted(map(str, (r["path"] for r in rows))) == sorted(map(str, (i["path"] for i in items)))
    by_path = {r["path"]: r for r in rows}
    for path in good[:2]:
        row, truth = by_path[path], sorted(t.bbox_px for t in scenes[path].matching("circle"))
        assert row["error"] is None and row["count"] == len(truth)
        assert all(abs(a - b) <= 2 for got, want in zip(sorted(row["boxes_px"]), truth) for a, b in zip(got, want))
    assert "not an image" in by_path["broken.gif"]["error"]
    assert "missing.jpg" in by_path[str(root / "missing.jpg")]["error"]
    assert by_path[str(root)]["error"].endswith("is a directory, not an image")
    assert by_path[None]["error"] == "the row has no bytes, path or url"
    assert len([r for r in fake.requests if r.path == "/v1/detect"]) == 2


def test_four_actors_keep_one_budget_even_when_the_pacer_is_lost(ray_cluster: Any, fake: FakeMoondream) -> None:
    """4 actors, each able to send 1 / latency = 3.3 requests/s (13 together), under a budget
    of 10/s for the job: no second of the run holds more than 10 requests, the emulator's own
    10/s limit never answers 429, and several actors were sending at once. Half way through,
    the pacer actor is killed (as when an autoscaler removes the worker that owns it): the
    workers start another one and the budget still holds. After the job no pacer is left."""
    ray = ray_cluster
    fake.latency, fake.rate_limit = 0.3, 10
    images = 36
    items = [{"bytes": Scene.random(seed, width=96, height=64, count=1).encode("JPEG", 90), "path": f"s{seed}.jpg"}
             for seed in range(images)]
    kwargs = MoondreamBatchUDF.constructor_kwargs(
        "caption", base_url=fake.base_url, api_key_env=KEY_ENV, requests_per_second=10, max_concurrency=1)
    name = MoondreamBatchUDF(**kwargs).pacer_name
    killed: list[float] = []

    def kill_the_pacer_half_way() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(fake.requests) < images // 2:
            time.sleep(0.02)
        ray.kill(ray.get_actor(name))  # in the job's namespace, by its name
        killed.append(time.time())

    killer = threading.Thread(target=kill_the_pacer_half_way, daemon=True)
    killer.start()
    rows = ray.data.from_items(items).map_batches(
        MoondreamBatchUDF, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=4),
        num_cpus=0.25, batch_size=3,
    ).take_all()
    killer.join(5)

    assert len(rows) == images and all(r["error"] is None and r["caption"] for r in rows)
    times = sorted(r.received_at for r in fake.requests if r.path == "/v1/caption")
    assert len(times) == images  # each sent once: nothing was refused and retried
    assert killed and times[0] < killed[0] < times[-1]
    # No window of one second holds more than 10 requests (5% for delivery on a loaded machine).
    closest = min(times[i + 10] - times[i] for i in range(len(times) - 10))
    assert closest >= 0.95, closest
    assert fake.rate_limited == 0
    assert (len(times) - 1) / (times[-1] - times[0]) <= 10.0
    assert fake.max_in_flight >= 3  # each actor has at most one request in flight: several actors sent
    deadline = time.monotonic() + 15
    while pacers(ray) and time.monotonic() < deadline:  # it ends with the pool that owns it
        time.sleep(0.2)
    assert pacers(ray) == []


def test_the_batch_api_option_gives_the_same_rows(ray_cluster: Any, fake: FakeMoondream, tmp_path: Path) -> None:
    ray = ray_cluster
    root, scenes = photos(tmp_path)
    paths = sorted(scenes)
    fake.batch_polls_to_complete = 1
    kwargs = MoondreamBatchUDF.constructor_kwargs(
        "index", **OPTIONS, base_url=fake.base_url, api_key_env=KEY_ENV, batch_api=True,
        job_dir=str(tmp_path / "jobs"), poll_interval=0.05)
    ds = ray.data.from_items([{"bytes": Path(p).read_bytes(), "path": p} for p in paths]).repartition(2)
    rows = ds.map_batches(
        MoondreamBatchUDF, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5, batch_size=None,  # one Batch API job per block
    ).take_all()
    assert [r.path for r in fake.requests if r.path in ("/v1/caption", "/v1/query", "/v1/detect")] == []
    jobs = sorted(p.name for p in (tmp_path / "jobs").iterdir())
    assert len(jobs) == 2 == len(fake.batches)  # one job per block, each in its own directory
    fake.reset()
    truth = single_process(fake, paths, **OPTIONS)
    assert len(rows) == len(paths)
    for row in rows:
        assert row.pop("error") is None and row == as_row(truth[row["path"]])


def test_a_typo_in_a_plain_dict_fails_the_job_when_the_first_actor_starts(ray_cluster: Any, fake: FakeMoondream) -> None:
    """Without constructor_kwargs the options are checked in the actors: the job fails at once
    with the TypeError (never a hang, never a request)."""
    ray = ray_cluster
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayError, match="unexpected keyword argument 'objekt'"):
        ray.data.from_items([{"path": "a.jpg"}]).map_batches(
            MoondreamBatchUDF, fn_constructor_kwargs={"skill": "detect", "objekt": "car", "base_url": fake.base_url},
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        ).take_all()
    assert time.monotonic() - started < 30 and fake.requests == []
