"""moondream_tools.tiling and geometry.merge: tiled detect and point, exact across tile borders.

Ground truth is the emulator's: a 6000x4000 scene of 50 small shapes (26-34 px: about 6 px
at the 1176 px the model sees the whole image at, so a single request misses most), many of
them centred exactly on tile edges, on the borders between cores, in the overlaps and on
corners where four tiles meet (found with ``plan_tiles``). Tiled counts must be exact, every
box within 2 px of ``Scene.truth()`` in full-image pixels and every point within 2 px of the
shape's centroid, nothing counted twice. Circles and squares only: the emulator's triangles
lose their one-pixel apex to JPEG at any size, which says nothing about tiling.

Scenes and their JPEGs are built once per module (a 24 MP render and encode takes ~0.1 s).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from moondream_tools import (
    AsyncMoondream,
    BadRequestError,
    Detections,
    FalMoondream,
    ImagePolicy,
    ImageSettings,
    Points,
    VisionBackend,
    VisionTools,
)
from moondream_tools.tiling import run as tiling_module  # where the decode is looked up
from moondream_tools.geometry import (
    intersection_over_smaller,
    merge_boxes,
    merge_points,
    tile_box_to_pixels,
    tile_point_to_pixels,
    union_box,
)
from moondream_tools.images import model_working_size, upload_sizes
from moondream_tools.testing import FakeMoondream, Scene, Shape
from moondream_tools.tiling import (
    TiledDetections,
    TiledPoints,
    TilePlan,
    plan_tiles,
    tiled_detect,
    tiled_point,
)

from tiling_support import W, H, borders, small_scene

PX = 2.0  # tolerance in full-image pixels


# ---------------------------------------------------------------------------
# scenes, built once
# ---------------------------------------------------------------------------


@cache
def jpeg(scene_name: str, orientation: int = 1) -> bytes:
    """The scene as a JPEG; with EXIF ``orientation`` 6 or 8, stored rotated so that it is
    the scene once turned upright."""
    img = {"small": small_scene, "big": big_scene}[scene_name]().render()
    if orientation == 6:  # the viewer turns it 90 degrees clockwise
        img = img.transpose(Image.Transpose.ROTATE_90)
    elif orientation == 8:  # ... counter-clockwise
        img = img.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@cache
def big_scene() -> Scene:
    """Objects larger than the overlap, cut by tile edges: a square across a column border,
    a circle on a corner where four tiles meet, and a small square far from both."""
    plan = plan_tiles(W, H)
    tile = plan.tiles[0]
    return Scene(
        W,
        H,
        [
            Shape("square", "blue", (float(tile.core[2]), 700.0), 500.0),
            Shape("circle", "red", (float(tile.core[2]), float(tile.core[3])), 300.0),
            Shape("square", "green", (5000.0, 3000.0), 30.0),
        ],
    )


# ---------------------------------------------------------------------------
# matching against truth
# ---------------------------------------------------------------------------


def match_boxes(boxes: Sequence[tuple[float, float, float, float]], scene: Scene) -> list[int]:
    """For each truth, the one box within PX px on every side (fails on none or several)."""
    owners = []
    for truth in scene.truth():
        near = [
            i for i, box in enumerate(boxes) if all(abs(a - b) <= PX for a, b in zip(box, truth.bbox_px))
        ]
        assert len(near) <= 1, f"{truth.label} at {truth.bbox_px} counted {len(near)} times"
        owners.extend(near)
    return owners


def match_points(points: Sequence[tuple[float, float]], scene: Scene) -> list[int]:
    owners = []
    for truth in scene.truth():
        cx, cy = truth.center[0] * scene.width, truth.center[1] * scene.height
        near = [i for i, (x, y) in enumerate(points) if math.dist((x, y), (cx, cy)) <= PX]
        assert len(near) <= 1, f"{truth.label} at {(cx, cy)} counted {len(near)} times"
        owners.extend(near)
    return owners


def pixel_boxes(result: Detections) -> list[tuple[float, float, float, float]]:
    return [(b.x_min, b.y_min, b.x_max, b.y_max) for b in result.to_pixels()]


def pixel_points(result: Points) -> list[tuple[float, float]]:
    return [(p.x, p.y) for p in result.to_pixels()]


def assert_exact_boxes(result: Detections, scene: Scene) -> None:
    boxes = pixel_boxes(result)
    owners = match_boxes(boxes, scene)
    assert sorted(owners) == list(range(len(boxes))), "a box matches no truth, or two truths"
    assert len(boxes) == len(scene.truth())


def assert_exact_points(result: Points, scene: Scene) -> None:
    points = pixel_points(result)
    owners = match_points(points, scene)
    assert sorted(owners) == list(range(len(points))), "a point matches no truth, or two truths"
    assert len(points) == len(scene.truth())


# ---------------------------------------------------------------------------
# the tiled skills against the emulator
# ---------------------------------------------------------------------------


def test_the_scene_puts_shapes_on_borders_overlaps_and_corners() -> None:
    plan = plan_tiles(W, H)
    xs, ys = borders(plan)
    truth = small_scene().truth()
    assert len(truth) == 50
    on_x = sum(any(abs((t.bbox_px[0] + t.bbox_px[2]) / 2 - x) <= 1 for x in xs) for t in truth)
    on_y = sum(any(abs((t.bbox_px[1] + t.bbox_px[3]) / 2 - y) <= 1 for y in ys) for t in truth)
    in_two_tiles = sum(
        sum(t.bbox_px[0] < tile.box[2] and tile.box[0] < t.bbox_px[2]
            and t.bbox_px[1] < tile.box[3] and tile.box[1] < t.bbox_px[3] for tile in plan.tiles) > 1
        for t in truth
    )
    assert on_x >= len(xs) and on_y >= len(ys) and in_two_tiles >= 25


async def test_tiled_point_counts_exactly_where_one_request_misses_most(
    fake: FakeMoondream, client: AsyncMoondream
) -> None:
    scene, data = small_scene(), jpeg("small")
    result = await tiled_point(client, data, "shapes")
    plan = plan_tiles(W, H)
    assert isinstance(result, TiledPoints) and isinstance(result, Points)
    assert len(fake.requests) == plan.requests == len(result.tiles) == 15
    assert result.image_size is not None and result.image_size.as_tuple() == (W, H)
    assert result.object == "shapes" and not result.failed and not result.capped
    assert_exact_points(result, scene)
    single = await tiled_point(client, data, "shapes", tiling="never")
    assert len(single.points) < len(scene.truth()) / 2
    assert len(fake.requests) == plan.requests + 1


async def test_tiled_detect_counts_exactly_with_boxes_within_2_px(client: AsyncMoondream) -> None:
    scene, data = small_scene(), jpeg("small")
    result = await tiled_detect(client, data, "shapes")
    assert isinstance(result, TiledDetections) and isinstance(result, Detections)
    assert_exact_boxes(result, scene)
    single = await tiled_detect(client, data, "shapes", tiling="never")
    assert len(single.objects) < len(scene.truth()) / 2


async def test_reports_and_provenance_say_which_tile_answered(client: AsyncMoondream) -> None:
    plan = plan_tiles(W, H)
    result = await tiled_detect(client, jpeg("small"), "shapes")
    assert [r.index for r in result.tiles] == list(range(plan.requests))
    assert [r.box for r in result.tiles] == [t.box for t in plan.tiles]
    assert [r.core for r in result.tiles] == [t.core for t in plan.tiles]
    assert all(r.found >= r.kept and r.error is None for r in result.tiles)
    # the shapes on borders are seen by several tiles: more found than kept, more kept than counted
    assert sum(r.found for r in result.tiles) > sum(r.kept for r in result.tiles) >= len(result.objects)
    assert len(result.provenance) == len(result.objects)
    slack = plan.patch / 2
    for box, index in zip(result.to_pixels(), result.provenance):
        x0, y0, x1, y1 = plan.tiles[index].core
        cx, cy = (box.x_min + box.x_max) / 2, (box.y_min + box.y_max) / 2
        assert x0 - slack <= cx <= x1 + slack and y0 - slack <= cy <= y1 + slack


async def test_a_lossless_plan_is_exact_too(client: AsyncMoondream) -> None:
    scene, data = small_scene(), jpeg("small")
    result = await tiled_detect(client, data, "shapes", max_tiles=32, tiling="always")
    assert len(result.tiles) == 32
    assert_exact_boxes(result, scene)
    points = await tiled_point(client, data, "shapes", max_tiles=32)
    assert_exact_points(points, scene)


async def test_objects_larger_than_the_overlap_are_merged_across_tiles(client: AsyncMoondream) -> None:
    scene = big_scene()
    plan = plan_tiles(W, H)
    assert all(s.size > plan.overlap for s in scene.shapes[:2])
    result = await tiled_detect(client, jpeg("big"), "shapes")
    assert_exact_boxes(result, scene)
    # the square is cut in 2 tiles, the circle in 4: their pieces were kept and merged
    assert sum(r.kept for r in result.tiles) >= 1 + 2 + 4


@pytest.mark.parametrize("orientation", [6, 8])
async def test_an_exif_rotated_photo_is_tiled_upright(client: AsyncMoondream, orientation: int) -> None:
    scene, data = small_scene(), jpeg("small", orientation)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (H, W)  # stored sideways
    result = await tiled_detect(client, data, "shapes")
    assert result.image_size is not None and result.image_size.as_tuple() == (W, H)
    assert len(result.tiles) == plan_tiles(W, H).requests
    assert_exact_boxes(result, scene)


async def test_the_source_is_decoded_once(client: AsyncMoondream, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = tiling_module.decode_image

    def counting(source: Any, settings: ImageSettings) -> Any:
        calls.append(1)
        return original(source, settings)

    monkeypatch.setattr(tiling_module, "decode_image", counting)
    await tiled_point(client, jpeg("small"), "shapes")
    assert len(calls) == 1
    await tiled_point(client, Scene.demo().encode(), "shapes")  # one request: the backend decodes
    assert len(calls) == 1


async def test_a_small_image_is_one_ordinary_request(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = Scene.demo()
    data = scene.encode()
    plain = await client.detect(data, "shapes")
    fake.reset()
    result = await tiled_detect(client, data, "shapes")
    assert len(fake.requests) == 1
    assert result.objects == plain.objects and result.image_size == plain.image_size
    assert result.provenance == [0] * len(plain.objects) and len(result.tiles) == 1
    assert result.tiles[0].box == (0, 0, scene.width, scene.height)
    points = await tiled_point(client, data, "shapes", tiling="always")  # one lossless tile
    assert len(fake.requests) == 2 and len(points.points) == len(scene.truth())


async def test_never_sends_the_image_as_the_untiled_path_does(fake: FakeMoondream, client: AsyncMoondream) -> None:
    data = jpeg("small")
    plain = await client.point(data, "shapes")
    result = await tiled_point(client, data, "shapes", tiling="never")
    assert len(fake.requests) == 2
    assert fake.requests[0].json == fake.requests[1].json
    assert result.points == plain.points and result.request_id is not None


async def test_a_failing_tile_is_reported_and_the_others_kept(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene, plan = small_scene(), plan_tiles(W, H)
    fake.fail_next(1, status=400)
    result = await tiled_detect(client, jpeg("small"), "shapes", max_retries=0)
    assert len(fake.requests) == plan.requests
    assert len(result.failed) == 1
    failed = result.failed[0]
    assert failed.box == plan.tiles[failed.index].box and failed.found == 0
    assert failed.error is not None and failed.error.startswith("BadRequestError")
    boxes = pixel_boxes(result)
    owners = match_boxes(boxes, scene)
    assert sorted(owners) == list(range(len(boxes)))  # every box is a true object, once
    slack = plan.patch / 2
    x0, y0, x1, y1 = failed.core
    outside = [
        t for t in scene.truth()
        if not (x0 - slack <= (t.bbox_px[0] + t.bbox_px[2]) / 2 <= x1 + slack
                and y0 - slack <= (t.bbox_px[1] + t.bbox_px[3]) / 2 <= y1 + slack)
    ]
    assert len(outside) <= len(boxes) < len(scene.truth())


async def test_when_every_tile_fails_the_first_error_is_raised(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.fail_next(100, status=400)
    with pytest.raises(BadRequestError):
        await tiled_point(client, jpeg("small"), "shapes", max_retries=0)
    assert len(fake.requests) == plan_tiles(W, H).requests


async def test_max_objects_is_sent_and_capped_tiles_are_reported(fake: FakeMoondream, client: AsyncMoondream) -> None:
    result = await tiled_point(client, jpeg("small"), "shapes", max_objects=3)
    assert all(r.json["settings"] == {"max_objects": 3} for r in fake.requests)
    assert result.capped and any(r.capped for r in result.tiles)
    assert all(r.capped == (r.found >= 3) for r in result.tiles)


async def test_concurrency_bounds_requests_in_flight(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.latency = 0.02
    await tiled_point(client, jpeg("small"), "shapes", concurrency=2)
    assert fake.max_in_flight == 2


class Delegate:
    """A VisionBackend that is not one of ours: no max_concurrency, counts prepare calls."""

    def __init__(self, inner: AsyncMoondream) -> None:
        self.inner = inner
        self.skills = inner.skills
        self.image_settings = inner.image_settings
        self.prepared: list[tuple[int, int]] = []
        self.segment_uploads: list[tuple[int, int]] = []

    async def prepare(self, image: Any, *, settings: ImageSettings | None = None) -> Any:
        prepared = await self.inner.prepare(image, settings=settings)
        self.prepared.append(prepared.size.as_tuple())
        self.segment_uploads.append((prepared.segment_upload_width, prepared.segment_upload_height))
        return prepared

    # Explicit methods: since Python 3.12 a runtime-checkable Protocol looks members up
    # statically, so delegating through __getattr__ would not make this a VisionBackend.
    async def caption(self, image: Any, length: Any = "normal", **options: Any) -> Any:
        return await self.inner.caption(image, length, **options)

    async def query(self, image: Any, question: str, **options: Any) -> Any:
        return await self.inner.query(image, question, **options)

    async def detect(self, image: Any, object: str, **options: Any) -> Any:
        return await self.inner.detect(image, object, **options)

    async def point(self, image: Any, object: str, **options: Any) -> Any:
        return await self.inner.point(image, object, **options)

    async def segment(self, image: Any, object: str, **options: Any) -> Any:
        return await self.inner.segment(image, object, **options)

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Delegate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


async def test_any_vision_backend_works_each_tile_prepared_once(fake: FakeMoondream, client: AsyncMoondream) -> None:
    backend = Delegate(client)
    assert isinstance(backend, VisionBackend) and not hasattr(type(backend), "max_concurrency")
    result = await tiled_point(backend, jpeg("small"), "shapes")  # type: ignore[arg-type]
    plan = plan_tiles(W, H)
    # Each tile is cut and shrunk to its upload size in one step, and no segmentation
    # upload is encoded for it (tiles are only detected and pointed in).
    upload, _ = upload_sizes(*plan.tile_size, client.image_settings)
    assert upload != plan.tile_size, "the scene's tiles are shrunk by the model"
    assert backend.prepared == [upload] * plan.requests
    assert backend.segment_uploads == [upload] * plan.requests
    assert_exact_points(result, small_scene())


async def test_fal_backend_and_other_inputs(fake: FakeMoondream, tmp_path: Path) -> None:
    scene, data = small_scene(), jpeg("small")
    path = tmp_path / "scene.jpg"
    path.write_bytes(data)
    async with FalMoondream(api_key=fake.fal_key, base_url=fake.fal_base_url) as fal:
        assert_exact_points(await tiled_point(fal, path, "shapes"), scene)
        assert_exact_boxes(await tiled_detect(fal, str(path), "shapes"), scene)
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        with Image.open(io.BytesIO(data)) as img:
            assert_exact_points(await tiled_point(md, img, "shapes"), scene)
        with path.open("rb") as fh:
            assert_exact_points(await tiled_point(md, fh, "shapes"), scene)
        small = await md.prepare(Scene.demo().render())
        assert len((await tiled_point(md, small, "shapes")).tiles) == 1
        with pytest.raises(ValueError, match="PreparedImage"):
            await tiled_point(md, await md.prepare(data), "shapes")


async def test_bad_arguments_are_refused(client: AsyncMoondream) -> None:
    with pytest.raises(ValueError, match="object"):
        await tiled_point(client, jpeg("small"), " ")
    with pytest.raises(ValueError, match="max_objects"):
        await tiled_point(client, jpeg("small"), "shapes", max_objects=0)
    with pytest.raises(ValueError, match="concurrency"):
        await tiled_point(client, jpeg("small"), "shapes", concurrency=0)
    with pytest.raises(ValueError, match="tiling"):
        await tiled_point(client, jpeg("small"), "shapes", tiling="sometimes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# plan_tiles
# ---------------------------------------------------------------------------

SIZES = [(6000, 4000), (4000, 6000), (8000, 6000), (4000, 3000), (2000, 1500), (12000, 3000), (900, 5000), (640, 480)]
MODES: list[Any] = ["auto", "always", (2, 3), (5, 1)]


def all_plans() -> list[TilePlan]:
    plans = []
    for width, height in SIZES:
        for mode in MODES:
            for max_tiles in (1, 6, 16, 40):
                try:
                    plans.append(plan_tiles(width, height, tiling=mode, max_tiles=max_tiles))
                except ValueError:
                    assert isinstance(mode, tuple) and mode[0] * mode[1] > max_tiles
    return plans


def test_cores_partition_the_image_exactly() -> None:
    for plan in all_plans():
        assert len(plan.tiles) == plan.rows * plan.cols <= 40
        total = 0
        for tile in plan.tiles:
            x0, y0, x1, y1 = tile.core
            total += (x1 - x0) * (y1 - y0)
            row_neighbour = plan.tiles[tile.index + 1] if tile.col + 1 < plan.cols else None
            col_neighbour = plan.tiles[tile.index + plan.cols] if tile.row + 1 < plan.rows else None
            assert x1 == (row_neighbour.core[0] if row_neighbour else plan.width)
            assert y1 == (col_neighbour.core[1] if col_neighbour else plan.height)
            assert (x0 == 0) == (tile.col == 0) and (y0 == 0) == (tile.row == 0)
        assert total == plan.width * plan.height


def test_cores_partition_pixel_by_pixel() -> None:
    plan = plan_tiles(700, 500, tiling=(3, 4), max_tiles=12)
    cover = np.zeros((500, 700), dtype=np.int32)
    for tile in plan.tiles:
        x0, y0, x1, y1 = tile.core
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()


def test_tiles_overlap_and_cores_keep_half_the_overlap_from_inner_edges() -> None:
    for plan in all_plans():
        if plan.requests == 1:
            assert plan.overlap == 0 and plan.tiles[0].box == plan.tiles[0].core == (0, 0, plan.width, plan.height)
            continue
        short = min(side for side, n in zip(plan.tile_size, (plan.cols, plan.rows)) if n > 1)
        assert plan.overlap >= 64 and plan.overlap >= round(0.15 * short)
        half = plan.overlap // 2
        for tile in plan.tiles:
            (bx0, by0, bx1, by1), (cx0, cy0, cx1, cy1) = tile.box, tile.core
            assert (bx1 - bx0, by1 - by0) == plan.tile_size
            assert 0 <= bx0 and bx1 <= plan.width and 0 <= by0 and by1 <= plan.height
            assert cx0 - bx0 >= half if bx0 > 0 else cx0 == 0
            assert cy0 - by0 >= half if by0 > 0 else cy0 == 0
            assert bx1 - cx1 >= half if bx1 < plan.width else cx1 == plan.width
            assert by1 - cy1 >= half if by1 < plan.height else cy1 == plan.height
            if tile.col + 1 < plan.cols:
                assert bx1 - plan.tiles[tile.index + 1].box[0] >= plan.overlap
            if tile.row + 1 < plan.rows:
                assert by1 - plan.tiles[tile.index + plan.cols].box[1] >= plan.overlap


def test_an_object_up_to_half_the_overlap_is_whole_in_the_tile_owning_its_centre() -> None:
    rng = random.Random(5)
    for plan in all_plans():
        if plan.requests == 1:
            continue
        for _ in range(300):
            size = rng.uniform(2, plan.overlap / 2)
            x0 = rng.uniform(0, plan.width - size)
            y0 = rng.uniform(0, plan.height - size)
            cx, cy = x0 + size / 2, y0 + size / 2
            owners = [
                t for t in plan.tiles
                if t.core[0] <= cx < t.core[2] and t.core[1] <= cy < t.core[3]
            ]
            assert len(owners) == 1
            bx0, by0, bx1, by1 = owners[0].box
            assert bx0 <= x0 and x0 + size <= bx1 and by0 <= y0 and y0 + size <= by1


def test_tiles_are_lossless_unless_max_tiles_forbids_it() -> None:
    settings = ImageSettings()
    for width, height in [(6000, 4000), (4000, 3000), (8000, 6000), (3000, 9000), (2000, 1500)]:
        plan = plan_tiles(width, height, tiling="always", max_tiles=100)
        tw, th = plan.tile_size
        assert plan.lossless and upload_sizes(tw, th, settings)[0] == (tw, th)
        seen = model_working_size(tw, th)
        assert seen[0] >= tw and seen[1] >= th
        assert max(tw, th) <= 2 * min(tw, th)
        fewer = plan_tiles(width, height, tiling="always", max_tiles=plan.requests - 1)
        assert not fewer.lossless and fewer.requests <= plan.requests - 1
    # the largest lossless 4:3 tile is about 1176 px wide, as the model's 4 x 3 crops
    assert plan_tiles(4000, 3000, tiling="always", max_tiles=100).tile_size == (1102, 852)
    assert model_working_size(1176, 882) == (1176, 910)


def test_max_tiles_is_respected() -> None:
    for width, height in SIZES:
        for max_tiles in range(1, 21):
            plan = plan_tiles(width, height, tiling="always", max_tiles=max_tiles)
            assert 1 <= plan.requests <= max_tiles
            if max_tiles > 1:  # growing tiles never helps the model more than more tiles do
                assert plan.shrink <= plan_tiles(width, height, tiling="always", max_tiles=max_tiles - 1).shrink


def test_auto_tiles_only_what_the_model_would_shrink_more_than_4x() -> None:
    assert plan_tiles(4000, 3000).requests == 1  # 12 MP, seen 1176 wide: 3.4x
    assert 4000 / max(model_working_size(4000, 3000)) < 4
    plan = plan_tiles(6000, 4000)  # 24 MP: 5.1x
    assert (plan.rows, plan.cols, plan.requests) == (3, 5, 15)
    assert plan_tiles(8000, 6000).requests == 16
    assert plan_tiles(6000, 4000, tiling="never").requests == 1
    assert plan_tiles(640, 480, tiling="always").requests == 1
    assert plan_tiles(2000, 1500).requests == 1 and plan_tiles(2000, 1500, tiling="always").requests == 4


def test_plan_arguments_are_checked() -> None:
    assert plan_tiles(1000, 1000, tiling=(2, 2)).requests == 4
    for bad in [{"tiling": (0, 2)}, {"tiling": (3, 3), "max_tiles": 8}, {"tiling": "sometimes"}, {"max_tiles": 0}]:
        with pytest.raises(ValueError):
            plan_tiles(1000, 1000, **bad)
    with pytest.raises(ValueError, match="too small"):
        plan_tiles(100, 100, tiling=(1, 60), max_tiles=60)
    with pytest.raises(ValueError):
        plan_tiles(0, 10)


# ---------------------------------------------------------------------------
# geometry.merge
# ---------------------------------------------------------------------------


def test_intersection_over_smaller() -> None:
    assert intersection_over_smaller((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert intersection_over_smaller((0, 0, 100, 100), (40, 40, 50, 50)) == 1.0  # inside
    assert intersection_over_smaller((0, 0, 10, 10), (5, 0, 15, 10)) == 0.5
    assert intersection_over_smaller((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert intersection_over_smaller((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0  # empty box


def test_cut_pieces_merge_to_the_union() -> None:
    # a 200 px box [900, 1100] cut by two tiles whose overlap is [960, 1040]
    left, right = (900, 300, 1040, 400), (960, 300, 1100, 400)
    merged, groups = merge_boxes([left, right], threshold=0.5, keys=[0, 1])
    assert merged == [(900, 300, 1100, 400)] and groups == [[0, 1]]
    # a piece cut in four tiles around a corner
    pieces = [(900, 900, 1040, 1040), (960, 900, 1100, 1040), (900, 960, 1040, 1100), (960, 960, 1100, 1100)]
    merged, groups = merge_boxes(pieces, threshold=0.5, keys=[0, 1, 2, 3])
    assert merged == [(900, 900, 1100, 1100)] and groups == [[0, 1, 2, 3]]


def test_distinct_neighbours_do_not_merge() -> None:
    boxes = [(0, 0, 30, 30), (31, 0, 61, 30), (0, 31, 30, 61), (20, 20, 50, 50)]
    merged, groups = merge_boxes(boxes, threshold=0.5, keys=[0, 1, 2, 3])
    assert groups == [[0], [1], [2], [3]] and merged == boxes  # touching or overlapping < 50%
    same_tile = [(0, 0, 40, 40), (10, 10, 40, 40)]  # IoS 1, but one tile answered both
    assert merge_boxes(same_tile, keys=["t", "t"])[1] == [[0], [1]]
    assert merge_boxes(same_tile)[1] == [[0, 1]]
    assert merge_boxes(same_tile, linkable=lambda i, j: False)[1] == [[0], [1]]
    assert merge_boxes([]) == ([], [])
    with pytest.raises(ValueError):
        merge_boxes(boxes, threshold=0)
    with pytest.raises(ValueError):
        merge_boxes(boxes, keys=[1])


def test_merge_boxes_on_thousands() -> None:  # its speed: benchmarks/bench_geometry.py
    rng = random.Random(1)
    boxes = []
    for i in range(3000):  # a crowd: 3000 boxes of 20-30 px, 40 px apart, seen by two tiles
        x, y, s = 40 * (i % 75) + rng.uniform(0, 5), 40 * (i // 75) + rng.uniform(0, 5), rng.uniform(20, 30)
        boxes.append((x, y, x + s, y + s))
    shifted = [(x0 + 1, y0 - 1, x1 + 1, y1 - 1) for x0, y0, x1, y1 in boxes]
    merged, groups = merge_boxes(boxes + shifted, keys=[0] * 3000 + [1] * 3000)
    assert groups == sorted([i, i + 3000] for i in range(3000))


def test_merge_points() -> None:
    merged, groups = merge_points([(100.0, 100.0), (103.0, 104.0), (140.0, 100.0)], radius=14, keys=[0, 1, 1])
    assert merged == [(101.5, 102.0), (140.0, 100.0)] and groups == [[0, 1], [2]]
    assert merge_points([(0, 0), (1, 0)], radius=14, keys=[3, 3])[1] == [[0], [1]]
    assert merge_points([(0, 0), (1, 0)], radius=0)[1] == [[0], [1]]
    assert merge_points([], radius=5) == ([], [])
    with pytest.raises(ValueError):
        merge_points([(0, 0)], radius=-1)


def test_tile_coordinates_to_image_pixels() -> None:
    tile = (1156, 1260, 2532, 2740)
    assert tile_box_to_pixels((0.0, 0.0, 1.0, 1.0), tile) == (1156.0, 1260.0, 2532.0, 2740.0)
    assert tile_box_to_pixels((0.75, 0.5, 0.25, 0.0), tile) == (1500.0, 1260.0, 2188.0, 2000.0)
    assert tile_point_to_pixels((0.5, 1.5), tile) == (1844.0, 2740.0)  # clamped to the tile
    assert union_box([(1, 2, 3, 4), (0, 5, 2, 6)]) == (0, 2, 3, 6)
    with pytest.raises(ValueError):
        union_box([])


# ---------------------------------------------------------------------------
# through the tools and both adapters
# ---------------------------------------------------------------------------


async def test_the_tools_count_and_locate_exactly_over_tiles(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = small_scene()
    tools = VisionTools(client)
    tools.add_image(jpeg("small"), name="field")
    circles = scene.count("circle")
    result = await tools.count("field", "circle", more_objects=["square"])
    assert result.count == circles and result.more[0].count == scene.count("square")
    assert isinstance(result.points, TiledPoints) and len(result.points.tiles) == 15
    assert f'Counted {circles} "circle" in field (6000x4000 px) over 15 tiles' in result.text
    located = await tools.locate("field", "square")
    assert located.text.startswith(f'Found {scene.count("square")} "square" in field (6000x4000 px) over 15 tiles')
    truth = sorted(t.bbox_px for t in scene.matching("square"))
    got = sorted(tuple(round(v) for v in (b.x_min, b.y_min, b.x_max, b.y_max)) for b in located.detections.to_pixels())
    assert all(abs(g - t) <= PX for gb, tb in zip(got, truth, strict=True) for g, t in zip(gb, tb))


async def test_never_is_one_request_and_misses_small_objects(fake: FakeMoondream, client: AsyncMoondream) -> None:
    tools = VisionTools(client, tiling="never")
    tools.add_image(jpeg("small"), name="field")
    before = len(fake.requests)
    result = await tools.count("field", "circle")
    assert len(fake.requests) - before == 1 and "tiles" not in result.text
    assert result.count < small_scene().count("circle")


async def test_a_failing_tile_is_named_in_the_tool_text(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retries=0) as md:
        tools = VisionTools(md)
        tools.add_image(jpeg("small"), name="field")
        await md.prepare(jpeg("small"))  # the source is decoded before any tile is sent
        fake.fail_next(1, status=400)
        result = await tools.count("field", "circle")
    assert "Could not read 1 of 15 parts of the image, so they are not counted: (" in result.text
    failed = result.points.failed
    assert len(failed) == 1 and failed[0].error and "HTTP 400" in failed[0].error


async def test_both_adapters_pass_tiling_through(fake: FakeMoondream, client: AsyncMoondream) -> None:
    from langchain_moondream import MoondreamToolkit
    from llama_index.tools.moondream import MoondreamToolSpec

    circles = small_scene().count("circle")
    kit = MoondreamToolkit(backend=client, tiling="always", max_tiles=15)
    kit.add_image(jpeg("small"), name="field")
    count_tool = next(t for t in kit.get_tools() if t.name == "count_objects")
    message = await count_tool.ainvoke(
        {"type": "tool_call", "id": "1", "name": "count_objects", "args": {"image": "field", "object": "circle"}}
    )
    assert f'Counted {circles} "circle" in field (6000x4000 px) over 15 tiles' in message.content
    spec = MoondreamToolSpec(client, tiling="auto")
    spec.add_image(jpeg("small"), name="field")
    output = await spec.acall_tool("count_objects", {"image": "field", "object": "circle"})
    assert output.raw_output.count == circles and "over 15 tiles" in output.content
    with pytest.raises(ValueError, match="max_tiles"):
        MoondreamToolSpec(client, max_tiles=0)


async def test_several_phrases_read_and_decode_once_and_prepare_each_tile_once(
    fake: FakeMoondream, client: AsyncMoondream, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes: list[int] = []
    real_decode = tiling_module.decode_image

    def counting(*args: Any, **kwargs: Any) -> Any:
        decodes.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tiling_module, "decode_image", counting)
    backend = Delegate(client)
    tools = VisionTools(backend)  # type: ignore[arg-type]
    tools.add_image(jpeg("small"), name="field")
    result = await tools.count("field", "circle", more_objects=["square"])
    plan = plan_tiles(W, H)
    assert decodes == [1], "one decode for both phrases"
    assert len(backend.prepared) == 1 + plan.requests, "the whole image once, each tile once"
    assert len(fake.requests) == 2 * plan.requests, "one request per phrase per tile"
    assert result.count == small_scene().count("circle") and result.more[0].count == small_scene().count("square")


async def test_a_model_named_image_is_tiled_under_the_policys_limits(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "field.jpg").write_bytes(jpeg("small"))
    policy = ImagePolicy(allowed_dirs=[tmp_path], max_pixels=30_000_000, max_bytes=5_000_000)
    seen: list[ImageSettings] = []
    real_open = tiling_module.TiledImage.open.__func__  # type: ignore[attr-defined]

    async def recording(cls: Any, backend: Any, image: Any, **options: Any) -> Any:
        seen.append(options["image_settings"])
        return await real_open(cls, backend, image, **options)

    monkeypatch.setattr(tiling_module.TiledImage, "open", classmethod(recording))
    result = await VisionTools(client, image_policy=policy).count("field.jpg", "circle")
    assert result.count == small_scene().count("circle")
    assert (seen[0].max_pixels, seen[0].max_bytes) == (30_000_000, 5_000_000)


async def test_registered_file_objects_and_prepared_images_still_work(fake: FakeMoondream, client: AsyncMoondream) -> None:
    tools = VisionTools(client)
    tools.add_image(io.BytesIO(jpeg("small")), name="stream")
    first = await tools.count("stream", "circle")
    again = await tools.count("stream", "circle")
    assert first.count == again.count == small_scene().count("circle"), "a file object works in every call"
    tools.add_image(await client.prepare(jpeg("small")), name="prepared")
    untiled = await tools.count("prepared", "circle")  # only the upload: sent as is, not tiled
    assert "tiles" not in untiled.text and untiled.count < small_scene().count("circle")


async def test_a_failed_tile_makes_the_count_a_lower_bound(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retries=0) as md:
        tools = VisionTools(md)
        tools.add_image(jpeg("small"), name="field")
        await md.prepare(jpeg("small"))
        fake.fail_next(1, status=400)
        result = await tools.count("field", "circle")
    failed = result.points.failed[0]
    core = f"({failed.core[0]}, {failed.core[1]})-({failed.core[2]}, {failed.core[3]})"
    assert result.text.startswith('Counted at least ') and core in result.text


async def test_an_object_three_overlaps_wide_cut_by_a_border_counts_once(
    fake: FakeMoondream, client: AsyncMoondream
) -> None:
    plan = plan_tiles(W, H)
    left, right = plan.tiles[0], plan.tiles[1]
    middle = (right.box[0] + left.box[2]) / 2  # the middle of the strip both tiles see
    size = 4 * plan.overlap  # each tile sees a different part of it: cut in both
    scene = Scene(W, H, [Shape("square", "blue", (middle, H / 4), size), Shape("circle", "red", (4500, 3000), 30)])
    result = await tiled_detect(client, scene.render(), "blue square", tiling="always")
    (truth,) = scene.matching("blue square")
    assert len(result.objects) == 1, "the two cut views are one object"
    got = result.to_pixels()[0]
    assert all(abs(g - t) <= PX for g, t in zip((got.x_min, got.y_min, got.x_max, got.y_max), truth.bbox_px))
