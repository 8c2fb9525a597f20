"""Segmentation results against the emulator's ground truth: masks, areas, RLE, SVG, GeoJSON."""

from __future__ import annotations

import base64
import io
import json
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pycocotools.mask as coco
import pytest
from PIL import Image

from moondream_tools import (
    AsyncMoondream,
    Box,
    ImageSize,
    PreparedImage,
    SegmentFinalEvent,
    Segmentation,
    SegmentPathDeltaEvent,
)
from moondream_tools.testing import Scene, Shape


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def downscaled_upload(scene_image: Image.Image, factor: float) -> PreparedImage:
    """What a client sends when it uploads fewer pixels than the original has."""
    small = scene_image.resize(
        (round(scene_image.width * factor), round(scene_image.height * factor)), Image.Resampling.LANCZOS
    )
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=90)
    return PreparedImage(
        data_url="data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(),
        width=scene_image.width,
        height=scene_image.height,
        upload_width=small.width,
        upload_height=small.height,
    )


def exif_rotated(image: Image.Image, orientation: int) -> bytes:
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.transpose(inverse[orientation]).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("seed", range(8))
async def test_segment_masks_match_ground_truth(client: AsyncMoondream, seed: int) -> None:
    scene = Scene.random(seed=100 + seed, width=640, height=480)
    prepared = await client.prepare(scene.render())
    for truth in scene.truth():
        result = await client.segment(prepared, truth.label, spatial_refs=[truth.center])
        assert result.found and result.object == truth.label
        mask = result.to_numpy()
        assert mask.shape == (480, 640)
        assert iou(mask, scene.mask(truth.index)) >= 0.95, truth.label
        assert abs(result.area_px - truth.area_px) <= 0.05 * truth.area_px
        assert result.area_fraction == pytest.approx(result.area_px / (640 * 480))


@pytest.mark.parametrize("orientation", [3, 6, 8])
async def test_segment_through_exif_rotated_upload(client: AsyncMoondream, orientation: int) -> None:
    scene = Scene.random(seed=7 + orientation, width=640, height=480)
    data = exif_rotated(scene.render(), orientation)
    for truth in scene.truth():
        result = await client.segment(data, truth.label, spatial_refs=[truth.center])
        assert result.image_size == ImageSize(width=640, height=480)
        assert iou(result.to_numpy(), scene.mask(truth.index)) >= 0.95


@pytest.mark.parametrize("factor", [0.5, 0.3])
async def test_segment_through_downscaled_upload(client: AsyncMoondream, factor: float) -> None:
    scene = Scene.random(seed=21, width=1600, height=1200, min_size=200, max_size=400)
    prepared = downscaled_upload(scene.render(), factor)
    for truth in scene.truth():
        result = await client.segment(prepared, truth.label, spatial_refs=[truth.center])
        assert result.to_numpy().shape == (1200, 1600)
        assert iou(result.to_numpy(), scene.mask(truth.index)) >= 0.95, (factor, truth.label)


async def test_mask_with_a_hole(client: AsyncMoondream) -> None:
    scene = Scene(400, 300, [Shape("ring", "green", (200, 150), 200)])
    result = await client.segment(scene.render(), "green ring")
    truth = scene.truth()[0]
    assert len(result.polygons) == 2  # outer boundary and the hole
    mask = result.to_numpy()
    assert not mask[150, 200], "the hole is empty"
    assert iou(mask, scene.mask(0)) >= 0.95
    geo = result.to_geojson()
    assert geo["type"] == "MultiPolygon" and len(geo["coordinates"]) == 1
    outer, hole = geo["coordinates"][0]
    assert outer[0] == outer[-1] and hole[0] == hole[-1]
    assert abs(result.area_px - truth.area_px) <= 0.05 * truth.area_px


# pycocotools' decode trips a numpy 2 DeprecationWarning inside its own Cython code.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
async def test_rle_matches_pycocotools(client: AsyncMoondream) -> None:
    scene = Scene(320, 240, [Shape("circle", "red", (100, 90), 80), Shape("square", "blue", (250, 160), 60)])
    result = await client.segment(scene.render(), "red circle")
    mask = result.to_numpy()
    expected = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = result.to_rle(compressed=True)
    assert compressed["size"] == [240, 320]
    assert compressed["counts"] == expected["counts"].decode()
    plain = result.to_rle()
    assert sum(plain["counts"]) == 240 * 320
    decoded = coco.decode({"size": plain["size"], "counts": compressed["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)
    assert json.dumps(plain)  # plain JSON types only


async def test_svg_overlays_the_image(client: AsyncMoondream) -> None:
    scene = Scene(320, 240, [Shape("square", "blue", (160, 120), 100)])
    result = await client.segment(scene.render(), "blue square")
    root = ET.fromstring(result.to_svg())
    assert root.attrib["width"] == "320" and root.attrib["viewBox"] == "0 0 320 240"
    path = root.find("{http://www.w3.org/2000/svg}path")
    assert path is not None and path.attrib["fill-rule"] == "evenodd"
    xs = [float(v.split(",")[0]) for v in path.attrib["d"].replace("M", "L").replace("Z", "").split("L") if v]
    truth = scene.truth()[0]
    assert min(xs) == pytest.approx(truth.bbox_px[0], abs=2) and max(xs) == pytest.approx(truth.bbox_px[2], abs=2)


async def test_stream_segment_partial_masks_are_drawable(client: AsyncMoondream) -> None:
    scene = Scene(400, 300, [Shape("circle", "red", (200, 150), 160)])
    partials: list[Segmentation] = []
    final: Segmentation | None = None
    async for event in client.stream_segment(scene.render(), "red circle"):
        if isinstance(event, SegmentPathDeltaEvent):
            partials.append(event.segmentation)
        elif isinstance(event, SegmentFinalEvent):
            final = event.segmentation
    assert partials and final is not None
    assert all(p.partial for p in partials) and not final.partial
    coarse = partials[-1].to_numpy()
    assert iou(coarse, scene.mask(0)) >= 0.85, "the whole coarse path is already a usable mask"
    assert iou(final.to_numpy(), scene.mask(0)) >= 0.95
    for partial in partials:  # every prefix decodes, even when cut mid-number
        partial.mask()


async def test_detections_and_masks_to_supervision(client: AsyncMoondream) -> None:
    import supervision as sv

    scene = Scene(640, 480, [Shape("square", "blue", (100 + 150 * i, 240), 80) for i in range(3)])
    detections = await client.detect(scene.render(), "blue squares")
    converted = detections.to_supervision()
    reference = sv.Detections.from_vlm(sv.VLM.MOONDREAM, detections.model_dump(), resolution_wh=(640, 480))
    assert np.allclose(np.sort(converted.xyxy, axis=0), np.sort(reference.xyxy, axis=0))
    assert list(converted.data["class_name"]) == ["blue squares"] * 3

    mask = await client.segment(scene.render(), "blue square", spatial_refs=[[100 / 640, 0.5]])
    svd = mask.to_supervision()
    assert svd.mask is not None and svd.mask.shape == (1, 480, 640)
    assert np.array_equal(svd.mask[0], mask.to_numpy())


def test_missing_optional_dependency_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)  # as if it were not installed
    segmentation = Segmentation(path="M0,0L1,0L1,1z", bbox=Box(x_min=0, y_min=0, x_max=1, y_max=1),
                                image_size=ImageSize(width=10, height=10))
    with pytest.raises(ImportError, match="pip install supervision"):
        segmentation.to_supervision()


def test_not_found_segmentation_is_empty() -> None:
    empty = Segmentation(path="", bbox=None, image_size=ImageSize(width=20, height=10))
    assert not empty.found and empty.polygons == [] and empty.area_px == 0
    assert empty.mask().size == (20, 10) and empty.bbox_px is None
    assert empty.to_rle() == {"size": [10, 20], "counts": [200]}


def test_results_stay_frozen_and_comparable() -> None:
    a = Segmentation(path="M0,0L1,0L1,1z", bbox=Box(x_min=0, y_min=0, x_max=1, y_max=1),
                     image_size=ImageSize(width=10, height=10))
    b = Segmentation(path="M0,0L1,0L1,1z", bbox=Box(x_min=0, y_min=0, x_max=1, y_max=1),
                     image_size=ImageSize(width=10, height=10))
    assert 45 <= a.area_px <= 55  # the lower-right half of 10x10, diagonal pixels either way
    assert a == b
    assert "polygons" not in a.model_dump() and "_full_mask" not in a.model_dump()
    with pytest.raises(Exception):
        a.path = "M0,0z"  # type: ignore[misc]
