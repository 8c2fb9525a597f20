"""Exports built from records (new ones and those read back from the JSON Lines file, so a
resumed run exports every input): annotated images, COCO detection JSON, a YOLO dataset.

- ``--annotate DIR``: each image with its boxes, points or mask drawn by
  :func:`moondream_tools.render.annotate`, upright, at the image's size (JPEG for JPEG
  inputs, PNG otherwise). Images annotated by an earlier run are kept unless redone.
- ``--coco FILE``: ``images`` (``file_name`` relative to the deepest folder holding every
  input, recorded as ``info.images_root``; upright ``width``/``height``), ``categories``
  from the phrases (ids from 1), ``annotations`` with ``bbox`` ``[x, y, w, h]`` in pixels;
  for ``segment`` the mask as polygons, or as RLE when it has holes (polygons cannot).
- ``--yolo DIR``: ``images/`` (hard links to the inputs, copies across file systems),
  ``labels/<name>.txt`` with ``class cx cy w h`` normalized to the upright image, and
  ``data.yaml`` with the class names.

Only records without an error are exported.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MoondreamError
from ..geometry import nest_rings, pixels_to_box
from ..images import sniff_image
from ..render import annotate
from ..results import Box, Detections, ImageSize, Point, Points, Segmentation
from .inputs import images_root, is_url
from .records import Record, record_key

__all__ = ["ExportSpec", "annotatable", "coco_document", "export_names", "run_exports", "yolo_labels"]

#: Skills each export can be made from (``index``: its ``--detect`` phrases).
EXPORTS = {
    "annotate": frozenset({"detect", "point", "count", "segment", "index"}),
    "coco": frozenset({"detect", "segment", "index"}),
    "yolo": frozenset({"detect", "segment", "index"}),
}
_YOLO_IMAGE_EXTENSIONS = {".bmp", ".dng", ".jpg", ".jpeg", ".mpo", ".png", ".tif", ".tiff", ".webp"}

Loader = Callable[[str], Awaitable[bytes]]


@dataclass(frozen=True)
class ExportSpec:
    annotate: Path | None = None
    coco: Path | None = None
    yolo: Path | None = None

    @property
    def any(self) -> bool:
        return any((self.annotate, self.coco, self.yolo))


# ---------------------------------------------------------------- what a record holds


@dataclass(frozen=True)
class _Found:
    """The boxes, points or mask one phrase gave on one image."""

    phrase: str
    boxes_px: list[list[float]]  # [x_min, y_min, x_max, y_max]
    boxes: list[dict[str, float]]  # normalized
    points: list[dict[str, float]]
    mask: dict[str, Any] | None  # the segment fields of a record


def _found(record: Record) -> list[_Found]:
    skill = record.get("skill")
    arguments = record.get("arguments") or {}
    if skill == "detect":
        objects = record.get("objects") or []
        return [_Found(arguments["object"], [o["box_px"] for o in objects], objects, [], None)]
    if skill in ("point", "count"):
        return [_Found(arguments["object"], [], [], record.get("points") or [], None)]
    if skill == "segment":
        return [_Found(arguments["object"], [], [], [], record if record.get("found") else None)]
    if skill == "index":
        return [
            _Found(phrase, [o["box_px"] for o in found["objects"]], found["objects"], [], None)
            for phrase, found in (record.get("objects") or {}).items()
        ]
    return []


def _segmentation(record: Record, phrase: str) -> Segmentation:
    size = ImageSize(width=record["width"], height=record["height"])
    return Segmentation(
        path=record.get("path") or "", bbox=Box(**record["bbox"]), mask_rle=record.get("mask_rle"),
        object=phrase, image_size=size,
    )


def annotatable(record: Record) -> list[Detections | Points | Segmentation]:
    """The results a record holds, as the library's result types (to draw them)."""
    size = ImageSize(width=record["width"], height=record["height"])
    results: list[Detections | Points | Segmentation] = []
    for found in _found(record):
        if found.mask is not None:
            results.append(_segmentation(record, found.phrase))
        elif found.points:
            points = [Point(x=p["x"], y=p["y"]) for p in found.points]
            results.append(Points(points=points, image_size=size, object=found.phrase))
        elif found.boxes:
            boxes = [Box(x_min=b["x_min"], y_min=b["y_min"], x_max=b["x_max"], y_max=b["y_max"]) for b in found.boxes]
            results.append(Detections(objects=boxes, image_size=size, object=found.phrase))
    return results


# ---------------------------------------------------------------- names


def _stem(source: str) -> str:
    tail = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] if is_url(source) else Path(source).name
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def export_names(records: Sequence[Record]) -> dict[str, str]:
    """A file name stem per record (by key), unique within ``records``: the input's own stem,
    with 8 hex digits of its image id when two inputs share a stem."""
    stems = [_stem(r["source"]) for r in records]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    names: dict[str, str] = {}
    taken: set[str] = set()
    for record, stem in zip(records, stems):
        name = stem if counts[stem.lower()] == 1 else f"{stem}-{(record.get('image_id') or '0' * 8)[:8]}"
        base, n = name, 2
        while name.lower() in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name.lower())
        names[_key(record)] = name
    return names


def _key(record: Record) -> str:
    return record_key(record["source"], record["skill"], record["arguments"])


def _extension(source: str, data: bytes | None = None) -> str:
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if suffix in _YOLO_IMAGE_EXTENSIONS:
        return suffix
    kind = sniff_image(data) if data is not None else None
    return {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}.get(kind or "", ".png")


# ---------------------------------------------------------------- COCO


def _polygons(segmentation: Segmentation) -> list[list[float]] | None:
    """The mask as COCO polygons, or None when it has holes (COCO polygons are filled)."""
    nested = nest_rings(segmentation.polygons)
    if any(holes for _, holes in nested):
        return None
    polygons = [[round(v, 2) for x, y in outer for v in (x, y)] for outer, _ in nested if len(outer) >= 3]
    return polygons or None


def coco_document(records: Sequence[Record], categories: Sequence[str], *, description: str) -> dict[str, Any]:
    """A COCO detection document of ``records`` (those without an error)."""
    ok = [r for r in records if r.get("error") is None and r.get("width")]
    root = images_root(r["source"] for r in ok)
    names = export_names(ok)
    category_ids = {name: index + 1 for index, name in enumerate(categories)}
    images, annotations = [], []
    for image_id, record in enumerate(ok, start=1):
        source = record["source"]
        if is_url(source):
            file_name = names[_key(record)] + _extension(source)
        else:
            assert root is not None
            file_name = Path(os.path.relpath(os.path.abspath(source), root)).as_posix()
        image: dict[str, Any] = {
            "id": image_id, "file_name": file_name, "width": record["width"], "height": record["height"],
            "source": source, "image_sha256": record["image_id"],
        }
        if is_url(source):
            image["coco_url"] = source
        images.append(image)
        for found in _found(record):
            category = category_ids.setdefault(found.phrase, len(category_ids) + 1)
            for box in found.boxes_px:
                x0, y0, x1, y1 = box
                w, h = round(x1 - x0, 2), round(y1 - y0, 2)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                    "bbox": [x0, y0, w, h], "area": round(w * h, 2), "iscrowd": 0,
                })
            if found.mask is not None:
                segmentation = _segmentation(record, found.phrase)
                x0, y0, x1, y1 = found.mask["bbox_px"]
                polygons = _polygons(segmentation)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "area": found.mask["area_px"],
                    "iscrowd": 0,
                    "segmentation": polygons if polygons is not None else segmentation.to_rle(),
                })
    return {
        "info": {
            "description": description, "version": "1.0",
            "images_root": str(root) if root is not None else None,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "object"} for name, i in category_ids.items()],
    }


# ---------------------------------------------------------------- YOLO


def yolo_labels(record: Record, classes: dict[str, int]) -> str:
    """The YOLO label file of a record: ``class cx cy w h`` per box, normalized."""
    width, height = record["width"], record["height"]
    lines = []
    for found in _found(record):
        boxes = list(found.boxes_px)
        if found.mask is not None:
            boxes.append(found.mask["bbox_px"])
        for box in boxes:
            x0, y0, x1, y1 = pixels_to_box(tuple(box), width, height)  # type: ignore[arg-type]
            lines.append(
                f"{classes[found.phrase]} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"
            )
    return "".join(line + "\n" for line in lines)


def _place(source: str, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems)."""
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


async def _write_yolo(records: Sequence[Record], categories: Sequence[str], folder: Path, load: Loader) -> None:
    ok = [r for r in records if r.get("error") is None and r.get("width")]
    names = export_names(ok)
    classes = {name: index for index, name in enumerate(categories)}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for record in ok:
        for found in _found(record):
            classes.setdefault(found.phrase, len(classes))
    for record in ok:
        name = names[_key(record)]
        source = record["source"]
        (folder / "labels" / f"{name}.txt").write_text(yolo_labels(record, classes), encoding="utf-8")
        if is_url(source):
            existing = [p for p in (folder / "images").glob(f"{glob_escape(name)}.*")]
            if not existing:
                data = await load(source)
                (folder / "images" / f"{name}{_extension(source, data)}").write_bytes(data)
        else:
            await asyncio.to_thread(_place, source, folder / "images" / f"{name}{_extension(source)}")
    names_yaml = "\n".join(f"  {i}: {json.dumps(n, ensure_ascii=False)}" for n, i in classes.items())
    (folder / "data.yaml").write_text(
        f"# written by moondream-tools\npath: {json.dumps(str(folder.resolve()))}\ntrain: images\nval: images\n"
        f"nc: {len(classes)}\nnames:\n{names_yaml}\n",
        encoding="utf-8",
    )


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# ---------------------------------------------------------------- annotated images


def _render(source: str | bytes, results: list[Any], target: Path) -> None:
    image = annotate(source, *results)
    if target.suffix == ".jpg":
        image.save(target, "JPEG", quality=90)
    else:
        image.save(target, "PNG")


async def _write_annotated(
    records: Sequence[Record], fresh: set[str], folder: Path, load: Loader
) -> tuple[int, list[str]]:
    """``(images written, failures)``; an image that cannot be drawn does not stop the others."""
    ok = [r for r in records if r.get("error") is None and r.get("width")]
    names = export_names(ok)
    folder.mkdir(parents=True, exist_ok=True)
    slots = asyncio.Semaphore(max(1, min(8, os.cpu_count() or 1)))
    written = 0
    failures: list[str] = []

    async def one(record: Record) -> None:
        nonlocal written
        source = record["source"]
        jpeg = Path(source.split("?", 1)[0]).suffix.lower() in (".jpg", ".jpeg")
        target = folder / f"{names[_key(record)]}{'.jpg' if jpeg else '.png'}"
        if target.exists() and _key(record) not in fresh:
            return
        async with slots:
            try:
                image: str | bytes = await load(source) if is_url(source) else source
                await asyncio.to_thread(_render, image, annotatable(record), target)
            except (MoondreamError, OSError, ValueError) as exc:
                failures.append(f"{source}: {exc}")
                return
            written += 1

    await asyncio.gather(*(one(r) for r in ok))
    return written, failures


async def run_exports(
    spec: ExportSpec, records: Sequence[Record], categories: Sequence[str], *, fresh: set[str],
    description: str, load: Loader,
) -> tuple[list[str], bool]:
    """Write every export asked for: ``(one line per export for the summary, all written)``."""
    done: list[str] = []
    complete = True
    ok = sum(1 for r in records if r.get("error") is None and r.get("width"))
    if spec.coco is not None:
        try:
            document = coco_document(records, categories, description=description)
            spec.coco.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(document, ensure_ascii=False)
            await asyncio.to_thread(spec.coco.write_text, text, "utf-8")
            done.append(
                f"COCO: {spec.coco} ({len(document['images'])} images, {len(document['annotations'])} annotations)"
            )
        except (OSError, ValueError) as exc:
            done.append(f"COCO export failed: {exc}")
            complete = False
    if spec.yolo is not None:
        try:
            await _write_yolo(records, categories, spec.yolo, load)
            done.append(f"YOLO: {spec.yolo} ({ok} images)")
        except (MoondreamError, OSError, ValueError) as exc:
            done.append(f"YOLO export failed: {exc}")
            complete = False
    if spec.annotate is not None:
        try:
            written, failures = await _write_annotated(records, fresh, spec.annotate, load)
        except OSError as exc:
            done.append(f"annotated images failed: {exc}")
            complete = False
        else:
            kept = ok - written - len(failures)
            done.append(f"annotated: {spec.annotate} ({written} written, {kept} kept from an earlier run)")
            if failures:
                complete = False
                done.append(f"{len(failures)} images could not be annotated: " + "; ".join(failures[:3]))
    return done, complete
