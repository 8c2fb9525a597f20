"""The ``moondream-tools`` command in process (click's CliRunner) against the emulator.

Ground truth: the scenes' shapes (pixel boxes, centroids, areas, counts), the bytes on disk
(sha256 ids), the upright sizes (one JPEG is stored turned, with EXIF orientation 6), the
requests the emulator recorded, and what pycocotools and supervision read back from the
exports. Resuming, kills and signals are in test_cli_resume.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from rich.console import Console

from moondream_tools.cli import main
from moondream_tools.cli.app import cli
from moondream_tools.cli.progress import Stats, render_table, summary_text
from moondream_tools.testing import FakeMoondream, Scene, Shape

from tiling_support import small_scene

SKILL_PATHS = ("caption", "query", "detect", "point", "segment")


# ---------------------------------------------------------------- helpers


def scene(k: int) -> Scene:
    """Two circles (red, green) and a blue square, placed by ``k``: 3 shapes, 2 circles."""
    return Scene(640, 480, [
        Shape("circle", "red", (100 + 30 * k, 100 + 20 * k), 90),
        Shape("square", "blue", (480 - 20 * k, 120 + 30 * k), 110),
        Shape("circle", "green", (250 + 30 * k, 380 - 20 * k), 70),
    ])


def rotated_jpeg(s: Scene) -> bytes:
    """``s`` stored turned a quarter (480x640) with EXIF orientation 6: upright it is 640x480."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    s.render().transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def make_photos(root: Path) -> dict[str, Scene]:
    """photos/a0.jpg, a1.jpg, rotated.jpg, sub/c.png: ``{source as the command reports it: scene}``
    in the order a directory is listed (sorted paths)."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    files = {
        "photos/a0.jpg": (scene(0), lambda s: s.encode("JPEG", 95)),
        "photos/a1.jpg": (scene(1), lambda s: s.encode("JPEG", 95)),
        "photos/rotated.jpg": (scene(2), rotated_jpeg),
        "photos/sub/c.png": (scene(3), lambda s: s.encode("PNG")),
    }
    for name, (s, encode) in files.items():
        (root / name).write_bytes(encode(s))
    return {name: s for name, (s, _) in files.items()}


def run(fake: FakeMoondream, *args: str, input: str | None = None, env: dict[str, Any] | None = None) -> Result:
    environment: dict[str, Any] = {
        "MOONDREAM_BASE_URL": fake.base_url, "MOONDREAM_API_KEY": fake.api_key, "FAL_KEY": None,
    }
    environment.update(env or {})
    return CliRunner().invoke(cli, list(args), input=input, env=environment, catch_exceptions=False)


def lines(result_or_path: Result | Path) -> list[dict[str, Any]]:
    text = result_or_path.read_text() if isinstance(result_or_path, Path) else result_or_path.stdout
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def skill_requests(fake: FakeMoondream) -> list[Any]:
    return [r for r in fake.requests if r.path.rsplit("/", 1)[-1] in SKILL_PATHS]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def near(a: Any, b: Any, tol: float = 2.0) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Scene]:
    monkeypatch.chdir(tmp_path)
    return make_photos(tmp_path)


def assert_image_fields(record: dict[str, Any], root: Path) -> None:
    assert record["image_id"] == sha256(root / record["source"])
    assert (record["width"], record["height"]) == (640, 480)  # upright, also for the EXIF-turned one
    assert record["error"] is None


# ---------------------------------------------------------------- every skill on a folder


def test_detect_folder_boxes_match_truth(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    result = run(threaded_fake, "detect", "shapes", "photos")
    assert result.exit_code == 0, result.stderr
    records = lines(result)
    assert [r["source"] for r in records] == list(photos)
    for record in records:
        assert_image_fields(record, tmp_path)
        assert record["skill"] == "detect"
        assert record["arguments"] == {"object": "shapes", "tiles": "auto", "max_tiles": 16, "max_objects": 250}
        truth = sorted(t.bbox_px for t in photos[record["source"]].truth())
        assert record["count"] == len(truth) == 3 and record["tiles"] == 1 and not record["capped"]
        found = sorted(o["box_px"] for o in record["objects"])
        assert all(near(box, want) for box, want in zip(found, truth)), (found, truth)
        for o in record["objects"]:  # normalized and pixels say the same
            scaled = [o["x_min"] * 640, o["y_min"] * 480, o["x_max"] * 640, o["y_max"] * 480]
            assert near(scaled, o["box_px"], 0.01)
    assert "moondream-tools detect: 4 done, 0 skipped, 0 failed, 4 requests" in result.stderr


def test_point_and_count_match_truth(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    points = lines(run(threaded_fake, "point", "circles", "photos"))
    counts = lines(run(threaded_fake, "count", "circles", "photos"))
    for record in points:
        assert_image_fields(record, tmp_path)
        centers = sorted((t.center[0] * 640, t.center[1] * 480) for t in photos[record["source"]].matching("circles"))
        found = sorted((p["x_px"], p["y_px"]) for p in record["points"])
        assert record["count"] == len(centers) == 2
        assert all(near(p, c) for p, c in zip(found, centers)), (found, centers)
        assert all(near((p["x"] * 640, p["y"] * 480), (p["x_px"], p["y_px"]), 0.01) for p in record["points"])
    assert [r["count"] for r in counts] == [photos[r["source"]].count("circles") for r in counts] == [2] * 4
    assert [r["skill"] for r in counts] == ["count"] * 4


def test_segment_caption_query(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    masks = lines(run(threaded_fake, "segment", "blue square", "photos"))
    for record in masks:
        assert_image_fields(record, tmp_path)
        (truth,) = photos[record["source"]].matching("blue square")
        assert record["found"] and near(record["bbox_px"], truth.bbox_px)
        assert near([record["bbox"]["x_min"] * 640, record["bbox"]["y_max"] * 480],
                    [record["bbox_px"][0], record["bbox_px"][3]], 0.01)
        assert record["path"].startswith("M") and record["mask_rle"] is None
        assert abs(record["area_px"] - truth.area_px) <= 0.03 * truth.area_px
    captions = lines(run(threaded_fake, "caption", "--length", "short", "photos"))
    assert all(r["caption"] and r["arguments"] == {"length": "short"} for r in captions)
    answers = lines(run(threaded_fake, "query", "How many circles?", "photos"))
    assert [r["answer"] for r in answers] == ["2"] * 4
    assert answers[0]["arguments"] == {"question": "How many circles?"}
    assert [r["source"] for r in captions] == [r["source"] for r in answers] == list(photos)


def test_glob_and_stdin_inputs(threaded_fake: FakeMoondream, photos: dict[str, Scene]) -> None:
    only_png = lines(run(threaded_fake, "count", "shapes", "photos", "--glob", "*.png"))
    assert [r["source"] for r in only_png] == ["photos/sub/c.png"]
    top_level = lines(run(threaded_fake, "count", "shapes", "photos", "--glob", "a*.jpg"))
    assert [r["source"] for r in top_level] == ["photos/a0.jpg", "photos/a1.jpg"]
    piped = lines(run(threaded_fake, "count", "shapes", "photos/rotated.jpg", "-", input="photos/sub\n\nphotos/a1.jpg\n"))
    assert [r["source"] for r in piped] == ["photos/rotated.jpg", "photos/sub/c.png", "photos/a1.jpg"]
    assert [r["count"] for r in piped] == [3, 3, 3]


def test_index_records_and_multi_phrase_coco(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    result = run(threaded_fake, "index", "photos", "--question", "How many circles?", "--detect", "red circle",
                 "--detect", "blue square", "--jsonl", "index.jsonl", "--coco", "index.json")
    assert result.exit_code == 0, result.stderr
    records = lines(tmp_path / "index.jsonl")
    assert [r["source"] for r in records] == list(photos)
    for record in records:
        assert_image_fields(record, tmp_path)
        assert record["skill"] == "index" and record["caption"] and record["answers"] == {"How many circles?": "2"}
        for phrase in ("red circle", "blue square"):
            (truth,) = photos[record["source"]].matching(phrase)
            (box,) = record["objects"][phrase]["objects"]
            assert record["objects"][phrase]["count"] == 1 and near(box["box_px"], truth.bbox_px)
    coco = COCO(str(tmp_path / "index.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["red circle", "blue square"]
    assert len(coco.getAnnIds()) == 8
    assert "16 requests" in result.stderr  # 4 images x (caption + question + 2 phrases)


# ---------------------------------------------------------------- bad inputs, dead servers, keys


def test_bad_inputs_are_per_item_errors(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    url = f"http://127.0.0.1:{closed_port()}/x.jpg"
    result = run(threaded_fake, "detect", "shapes", "photos/a0.jpg", "broken.jpg", "missing.jpg", url,
                 "photos/a1.jpg", "--jsonl", "out.jsonl")
    assert result.exit_code == 1
    records = lines(tmp_path / "out.jsonl")
    assert [r["source"] for r in records] == ["photos/a0.jpg", "broken.jpg", "missing.jpg", url, "photos/a1.jpg"]
    good, broken, missing, refused, other = records
    assert good["error"] is None and other["error"] is None and good["count"] == other["count"] == 3
    assert broken["image_id"] == sha256(tmp_path / "broken.jpg") and broken["width"] is None and broken["error"]
    assert missing["image_id"] is None and "not found" in missing["error"]
    assert refused["image_id"] is None and url in refused["error"]
    assert "Traceback" not in result.stderr
    assert "failed (3):" in result.stderr and "2 done" not in result.stderr
    for source in ("broken.jpg", "missing.jpg", url):
        assert f"  {source}: " in result.stderr
    assert len(skill_requests(threaded_fake)) == 2


def test_dead_server_and_missing_key(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    dead = {"MOONDREAM_BASE_URL": f"http://127.0.0.1:{closed_port()}/v1"}
    result = run(threaded_fake, "caption", "photos", "--max-retries", "0", "--jsonl", "dead.jsonl", env=dead)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    records = lines(tmp_path / "dead.jsonl")
    assert len(records) == 4 and all(r["error"].startswith("APIConnectionError") for r in records)
    assert all(r["image_id"] and r["width"] == 640 for r in records), "the image was read before the request"
    assert "0 done" not in result.stderr and "4 failed" in result.stderr

    no_key = run(threaded_fake, "caption", "photos", env={"MOONDREAM_BASE_URL": None, "MOONDREAM_API_KEY": None})
    assert no_key.exit_code == 2 and no_key.stdout == ""
    assert no_key.stderr.count("\n") == 1 and no_key.stderr.startswith("moondream-tools: error: No Moondream API key")
    named = run(threaded_fake, "caption", "photos", "--api-key-env", "MY_MOONDREAM_KEY")
    assert named.exit_code == 2 and "MY_MOONDREAM_KEY" in named.stderr and named.stderr.count("\n") == 1
    assert not skill_requests(threaded_fake)


def test_usage_errors_exit_2(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cases = {
        ("caption", "photos", "--coco", "x.json"): "--coco is for",
        ("point", "car", "photos", "--yolo", "y"): "--yolo is for",
        ("detect", "car", "photos", "--tiles", "0x3"): "not auto, always, never or a grid",
        ("detect", "car", "photos", "--retry-failed"): "--retry-failed needs --jsonl",
        ("detect", "car", "empty"): "no images found in empty",
        ("detect", "car", "-", "-"): "only once",
        ("detect", "car", "photos", "--api-key", "k"): "No such option",
        ("index", "photos", "--coco", "c.json"): "give at least one --detect",
    }
    for args, text in cases.items():
        result = run(threaded_fake, *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert text in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not skill_requests(threaded_fake)


# ---------------------------------------------------------------- exports


def test_coco_and_yolo_exports_load(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    import supervision as sv
    from pycocotools.coco import COCO

    result = run(threaded_fake, "detect", "shapes", "photos", "--jsonl", "d.jsonl", "--coco", "out/coco.json",
                 "--yolo", "yolo", "--annotate", "drawn")
    assert result.exit_code == 0, result.stderr
    coco = COCO(str(tmp_path / "out" / "coco.json"))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "shapes", "supercategory": "object"}]
    images = coco.loadImgs(coco.getImgIds())
    assert [i["file_name"] for i in images] == ["a0.jpg", "a1.jpg", "rotated.jpg", "sub/c.png"]
    assert all((i["width"], i["height"]) == (640, 480) for i in images)
    for image in images:
        truth = sorted(t.bbox_px for t in photos["photos/" + image["file_name"]].truth())
        boxes = sorted(a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])))
        assert len(boxes) == len(truth)
        for (x, y, w, h), want in zip(boxes, truth):
            assert near((x, y, x + w, y + h), want)

    dataset = sv.DetectionDataset.from_coco(
        images_directory_path=str(tmp_path / "photos"), annotations_path=str(tmp_path / "out" / "coco.json")
    )
    assert dataset.classes == ["shapes"] and len(dataset) == 4
    for path, detections in dataset.annotations.items():
        truth = sorted(t.bbox_px for t in photos["photos/" + Path(path).relative_to(tmp_path / "photos").as_posix()].truth())
        assert all(near(b, w) for b, w in zip(sorted(detections.xyxy.tolist()), truth))

    yolo = sv.DetectionDataset.from_yolo(
        images_directory_path=str(tmp_path / "yolo" / "images"),
        annotations_directory_path=str(tmp_path / "yolo" / "labels"),
        data_yaml_path=str(tmp_path / "yolo" / "data.yaml"),
    )
    assert yolo.classes == ["shapes"] and len(yolo) == 4
    by_stem = {Path(name).stem: s for name, s in photos.items()}
    for path, detections in yolo.annotations.items():
        truth = sorted(t.bbox_px for t in by_stem[Path(path).stem].truth())
        found = sorted(detections.xyxy.tolist())
        assert len(found) == 3 and all(near(b, w) for b, w in zip(found, truth)), (path, found, truth)
        assert set(detections.class_id.tolist()) == {0}

    drawn = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert drawn == ["a0.jpg", "a1.jpg", "c.png", "rotated.jpg"]
    for name in drawn:
        with Image.open(tmp_path / "drawn" / name) as img:
            assert img.size == (640, 480) and img.format == ("PNG" if name.endswith(".png") else "JPEG")


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_segment_coco_polygons_area(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    import supervision as sv
    from pycocotools.coco import COCO

    rings = Scene(640, 480, [Shape("ring", "red", (320, 240), 200)])  # a hole: RLE, not polygons
    (tmp_path / "photos" / "ring.png").write_bytes(rings.encode("PNG"))
    assert run(threaded_fake, "segment", "blue square", "photos", "--coco", "seg.json").exit_code == 0
    coco = COCO(str(tmp_path / "seg.json"))
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        (truth,) = photos["photos/" + image["file_name"]].matching("blue square")
        assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 8
        area = int(coco.annToMask(ann).sum())
        assert abs(area - truth.area_px) <= 0.03 * truth.area_px, (area, truth.area_px)
        assert abs(ann["area"] - truth.area_px) <= 0.03 * truth.area_px
    masks = sv.DetectionDataset.from_coco(str(tmp_path / "photos"), str(tmp_path / "seg.json"), force_masks=True)
    assert all(d.mask is not None and d.mask.shape == (1, 480, 640) for d in masks.annotations.values() if len(d))

    assert run(threaded_fake, "segment", "red ring", "photos/ring.png", "--coco", "ring.json").exit_code == 0
    ring = COCO(str(tmp_path / "ring.json"))
    (ann,) = ring.loadAnns(ring.getAnnIds())
    (truth,) = rings.truth()
    assert isinstance(ann["segmentation"], dict) and ann["segmentation"]["size"] == [480, 640]
    assert abs(int(ring.annToMask(ann).sum()) - truth.area_px) <= 0.03 * truth.area_px


def test_resumed_run_exports_every_input(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    first = run(threaded_fake, "detect", "shapes", "-", "--jsonl", "d.jsonl", input="photos/a0.jpg\nphotos/a1.jpg\n")
    assert first.exit_code == 0
    sent = len(skill_requests(threaded_fake))
    second = run(threaded_fake, "detect", "shapes", "photos", "--jsonl", "d.jsonl", "--coco", "c.json", "--annotate", "drawn")
    assert second.exit_code == 0 and "2 done, 2 skipped" in second.stderr
    assert len(skill_requests(threaded_fake)) == sent + 2
    coco = COCO(str(tmp_path / "c.json"))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == 12
    assert len(list((tmp_path / "drawn").iterdir())) == 4


# ---------------------------------------------------------------- tiles and the client's limits


def test_tiles_grid_counts_small_objects_exactly(threaded_fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    big = small_scene()
    big.render().save(tmp_path / "big.png", "PNG")
    result = run(threaded_fake, "count", "shapes", "big.png", "--tiles", "3x4")
    (record,) = lines(result)
    assert (record["width"], record["height"]) == (6000, 4000)
    assert record["tiles"] == 12 and record["arguments"]["tiles"] == "3x4" and record["arguments"]["max_tiles"] == 16
    assert record["count"] == len(big.truth()) == 50
    assert len(skill_requests(threaded_fake)) == 12 and "12 requests" in result.stderr
    untiled = lines(run(threaded_fake, "count", "shapes", "big.png", "--tiles", "never"))[0]
    assert untiled["tiles"] == 1 and untiled["count"] < 50


def test_concurrency_and_rps_reach_the_client(threaded_fake: FakeMoondream, photos: dict[str, Scene]) -> None:
    threaded_fake.latency = 0.15
    assert run(threaded_fake, "caption", "photos", "photos/a0.jpg", "--concurrency", "2").exit_code == 0
    assert threaded_fake.max_in_flight == 2
    threaded_fake.latency = 0.0
    threaded_fake.reset()
    assert run(threaded_fake, "caption", "photos", "--rps", "8", "--concurrency", "4").exit_code == 0
    times = sorted(r.received_at for r in skill_requests(threaded_fake))
    assert len(times) == 4 and all(b - a >= 0.1 for a, b in zip(times, times[1:])), times


# ---------------------------------------------------------------- what a person sees


def test_table_renderer_and_quiet(threaded_fake: FakeMoondream, photos: dict[str, Scene]) -> None:
    detected = lines(run(threaded_fake, "detect", "red circle", "photos", "missing.jpg"))
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render_table(detected, "detect"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "photos/a0.jpg" in text and "640x480" in text and "image file not found" in text
    box = detected[0]["objects"][0]["box_px"]
    assert f"1: {box[0]:.0f},{box[1]:.0f},{box[2]:.0f},{box[3]:.0f}" in text
    captions = lines(run(threaded_fake, "caption", "photos/a0.jpg"))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_table(captions, "caption"))
    assert captions[0]["caption"][:30] in console.file.getvalue()  # type: ignore[attr-defined]

    quiet = run(threaded_fake, "detect", "red circle", "photos", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and len(lines(quiet)) == 4
    assert summary_text("count", Stats(done=2, skipped=1, failed=0, requests=30, seconds=2.0)) == (
        "moondream-tools count: 2 done, 1 skipped, 0 failed, 30 requests, 2.0 s (1.0 images/s)"
    )


def test_main_entry_point(threaded_fake: FakeMoondream, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "moondream-tools, version" in capsys.readouterr().out


# ---------------------------------------------------------------- mcp


def test_mcp_builds_the_tools_and_calls_run_server(threaded_fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moondream_tools import ImageStore, VisionTools

    calls: list[tuple[Any, dict[str, Any]]] = []
    server = types.ModuleType("moondream_tools.mcp_server")
    server.run_server = lambda vision, **options: calls.append((vision, options))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "moondream_tools.mcp_server", server)
    result = run(threaded_fake, "mcp", "--allow-dir", str(tmp_path), "--allow-urls", "--return-images",
                 "--image-store", str(tmp_path / "store"), "--transport", "http", "--port", "9123", "--concurrency", "3")
    assert result.exit_code == 0, result.stderr
    ((vision, options),) = calls
    assert options == {"transport": "http", "host": "127.0.0.1", "port": 9123, "return_images": True}
    assert isinstance(vision, VisionTools) and isinstance(vision.images, ImageStore)
    assert vision.policy.allowed_dirs == (str(tmp_path.resolve()),) and vision.policy.allow_urls
    assert vision.backend.base_url == threaded_fake.base_url and vision.backend.max_concurrency == 3

    monkeypatch.setitem(sys.modules, "mcp", None)  # the extra is not installed
    missing = run(threaded_fake, "mcp")
    assert missing.exit_code == 2 and 'pip install "moondream-tools[mcp]"' in missing.stderr
    assert "Traceback" not in missing.stderr and len(calls) == 1
