"""Performance features, proven by behaviour (never by timing): skill-aware resolution,
prepare-once caching, concurrency and rate limits, batches with per-item errors.

The figures live in benchmarks/ (`make bench`).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moondream_tools import (
    AsyncMoondream,
    ImageError,
    ImageSettings,
    MoondreamError,
    PreparedImage,
    VisionTools,
)
from moondream_tools.images import prepare as prepare_module  # where _decode_for_upload is looked up
from moondream_tools.testing import FakeMoondream, Scene


def sent_size(data_url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))).size


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every image decode+encode the pipeline performs."""
    calls: list[object] = []
    original = prepare_module._decode_for_upload

    def spy(source: object, settings: ImageSettings) -> object:
        calls.append(source)
        return original(source, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_module, "_decode_for_upload", spy)
    return calls


# ------------------------------------------------------------------ resolution


@pytest.mark.parametrize("seed", range(3))
async def test_downscaled_upload_keeps_results_exact(fake: FakeMoondream, client: AsyncMoondream, seed: int) -> None:
    """4000x3000 scenes go up at the model's resolution; results stay within 2% in original pixels."""
    scene = Scene.random(seed=seed, width=640, height=480).scaled(6.25)
    image = scene.render()
    for truth in scene.truth():
        boxes = await client.detect(image, truth.label)
        points = await client.point(image, truth.label)
        mask = await client.segment(image, truth.label, spatial_refs=[truth.center])
        box = min(boxes.to_pixels(), key=lambda b: abs(b.x_min - truth.bbox_px[0]) + abs(b.y_min - truth.bbox_px[1]))
        for got, want, scale in zip(
            (box.x_min, box.y_min, box.x_max, box.y_max), truth.bbox_px, (4000, 3000, 4000, 3000), strict=True
        ):
            assert abs(got - want) <= 0.02 * scale
        nearest = min(points.to_pixels(), key=lambda p: abs(p.x - truth.center[0] * 4000))
        assert abs(nearest.x - truth.center[0] * 4000) <= 80 and abs(nearest.y - truth.center[1] * 3000) <= 60
        truth_mask = scene.mask(truth.index)
        ours = mask.to_numpy()
        assert ours.shape == (3000, 4000)
        iou = np.logical_and(ours, truth_mask).sum() / np.logical_or(ours, truth_mask).sum()
        assert iou >= 0.95
    sizes = {r.path: sent_size(r.json["image_url"]) for r in fake.requests}
    assert sizes["/v1/detect"] == sizes["/v1/point"] == (1176, 882)
    assert sizes["/v1/segment"] == (2000, 1500)


async def test_small_images_are_never_upscaled(fake: FakeMoondream, client: AsyncMoondream) -> None:
    await client.detect(Scene.random(seed=1, width=320, height=240).render(), "shapes")
    assert sent_size(fake.requests[-1].json["image_url"]) == (320, 240)


async def test_resolution_caps_are_settings(fake: FakeMoondream) -> None:
    scene = Scene.random(seed=2, width=640, height=480).scaled(4)  # 2560 x 1920
    settings = ImageSettings(skill_max_crops=None, segment_max_side=1000)
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, image_settings=settings) as md:
        prepared = await md.prepare(scene.render())
        await md.detect(prepared, "shapes")
        await md.segment(prepared, "shapes")
    assert sent_size(fake.requests[0].json["image_url"]) == (2560, 1920)
    assert sent_size(fake.requests[1].json["image_url"]) == (2560, 1920)  # never less than the skills


# ------------------------------------------------------------------ prepare once


async def test_four_tools_on_one_image_decode_it_once(client: AsyncMoondream, decodes: list[object]) -> None:
    scene = Scene.random(seed=5, width=640, height=480).scaled(5)
    tools = VisionTools(client)
    tools.add_image(scene.render(), name="photo")
    label = scene.truth()[0].label
    await tools.describe("photo")
    await tools.count("photo", label)
    await tools.locate("photo", label)
    await tools.segment("photo", label)
    assert len(decodes) == 1


async def test_concurrent_calls_on_one_image_decode_it_once(client: AsyncMoondream, decodes: list[object]) -> None:
    image = Scene.random(seed=6).render()
    results = await asyncio.gather(*(client.point(image, "shapes") for _ in range(6)))
    assert len(decodes) == 1
    assert len({len(r.points) for r in results}) == 1


async def test_files_are_keyed_by_path_and_modification(client: AsyncMoondream, decodes: list[object], tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    Scene.random(seed=7).render().save(path)
    await client.prepare(path)
    await client.prepare(str(path))
    await client.prepare(path.as_uri())
    assert len(decodes) == 1
    Scene.random(seed=8).render().save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    await client.prepare(path)
    assert len(decodes) == 2


async def test_bytes_are_keyed_by_content(client: AsyncMoondream, decodes: list[object]) -> None:
    buffer = io.BytesIO()
    Scene.random(seed=9).render().save(buffer, "PNG")
    data = buffer.getvalue()
    await client.prepare(data)
    await client.prepare(bytes(bytearray(data)))  # an equal copy
    await client.prepare(io.BytesIO(data))  # a file object with the same bytes
    assert len(decodes) == 1


async def test_pil_entries_go_when_the_image_goes(client: AsyncMoondream) -> None:
    image = Scene.random(seed=10).render()
    await client.prepare(image)
    assert len(client.image_cache) == 1
    del image
    gc.collect()
    assert len(client.image_cache) == 0


async def test_settings_are_part_of_the_key(client: AsyncMoondream) -> None:
    image = Scene.random(seed=11).render()
    await client.prepare(image)  # default limits
    with pytest.raises(ImageError, match="over the limit"):
        await client.prepare(image, settings=ImageSettings(max_pixels=1000))


async def test_cache_is_bounded_by_bytes(fake: FakeMoondream) -> None:
    images = [Scene.random(seed=s).render() for s in range(8)]
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, image_cache_bytes=0) as md:
        one = (await md.prepare(images[0])).nbytes
    bound = int(3.5 * one)
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, image_cache_bytes=bound) as md:
        prepared = [await md.prepare(img) for img in images]
        assert md.image_cache.nbytes <= bound
        assert 0 < len(md.image_cache) < len(images)
        assert md.image_cache.get(next(iter(md.image_cache._entries))) is not None
        # the most recent is kept, the oldest evicted
        assert prepared[-1] in md.image_cache._entries.values()
        assert prepared[0] not in md.image_cache._entries.values()
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, image_cache_bytes=0) as md:
        await md.prepare(images[0])
        assert len(md.image_cache) == 0


# ------------------------------------------------------------------ overlap and limits


async def test_max_concurrency_bounds_requests_in_flight(fake: FakeMoondream) -> None:
    fake.latency = 0.1
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_concurrency=3) as md:
        prepared = await md.prepare(Scene.random(seed=12).render())
        await asyncio.gather(*(md.detect(prepared, "shapes") for _ in range(9)))
    assert fake.max_in_flight == 3
    assert len(fake.requests) == 9


async def test_requests_per_second_paces_requests(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, requests_per_second=20) as md:
        prepared = await md.prepare(Scene.random(seed=13).render())
        await asyncio.gather(*(md.detect(prepared, "shapes") for _ in range(8)))
    arrivals = sorted(r.received_at for r in fake.requests)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.045, gaps  # 1/20 s apart, give or take clock granularity


async def test_a_429_pauses_every_request_of_the_client(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_concurrency=1) as md:
        prepared = await md.prepare(Scene.random(seed=14).render())
        fake.fail_next(1, status=429, retry_after="0.4")
        results = await asyncio.gather(*(md.detect(prepared, "shapes") for _ in range(3)))
    assert all(r.objects for r in results)
    first, *rest = sorted(r.received_at for r in fake.requests)
    assert len(rest) == 3
    assert min(rest) - first >= 0.35, "nobody sent anything while the client was told to wait"


async def test_emulator_rate_limit_is_absorbed_without_errors(fake: FakeMoondream) -> None:
    fake.rate_limit = 10
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, requests_per_second=8) as md:
        prepared = await md.prepare(Scene.random(seed=15).render())
        results = await md.map(lambda _: md.point(prepared, "shapes"), range(12))
    assert not [r for r in results if isinstance(r, MoondreamError)]
    assert fake.rate_limited == 0


async def test_map_returns_per_item_errors_in_order(fake: FakeMoondream, client: AsyncMoondream) -> None:
    good = Scene.random(seed=16).render()
    items: list[object] = [good, b"not an image", good, "/no/such/file.png", good]
    results = await client.map(lambda image: client.point(image, "shapes"), items)
    assert [type(r).__name__ for r in results] == ["Points", "ImageError", "Points", "ImageError", "Points"]
    assert "no/such/file.png" in str(results[3])

    async def buggy(item: object) -> None:
        raise KeyError("a bug, not a Moondream failure")

    with pytest.raises(KeyError):
        await client.map(buggy, [1, 2, 3])


async def test_vision_tools_batch(fake: FakeMoondream, client: AsyncMoondream) -> None:
    tools = VisionTools(client)
    scenes = [Scene.random(seed=20 + i) for i in range(4)]
    handles = [tools.add_image(scene.render()) for scene in scenes]
    fake.fail_next(1, status=400)
    arguments = [{"image": h, "object": "shapes"} for h in handles] + [{"image": "img_99", "object": "x"}]
    results = await tools.batch("count_objects", arguments)
    failures = [r for r in results if isinstance(r, MoondreamError)]
    assert len(failures) == 2 and "img_99" in str(results[-1])
    for scene, result in zip(scenes, results[:4], strict=True):
        if not isinstance(result, MoondreamError):
            assert result.count == len(scene.truth())
