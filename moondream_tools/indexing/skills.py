"""One input through one skill: read it once, ask, and turn the answer into record fields.

The record format of the command line (``moondream-tools``) and of the Ray Data job
(:mod:`moondream_tools.ray`): both run each input through :func:`run_one` here.

Every coordinate is given twice: normalized to the upright image (as Moondream answers,
clamped and ordered) and in pixels of the upright image, both through
:mod:`moondream_tools.geometry`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from ..backend import VisionBackend
from ..errors import (
    APIConnectionError,
    AuthenticationError,
    ImageError,
    InsufficientCreditsError,
    MoondreamError,
    PermissionDeniedError,
)
from ..geometry import box_to_pixels, point_to_pixels
from ..images import ImageSettings
from ..images.sources import ReferenceKind, _load_source, reference_kind
from ..results import Detections, Points, Segmentation
from ..tiling import TiledImage, TilingMode
from .indexer import _inspect
from .records import ImageRecord

__all__ = [
    "Asked",
    "Record",
    "RunState",
    "SkillName",
    "base_record",
    "detections_fields",
    "index_fields",
    "points_fields",
    "run_one",
    "segmentation_fields",
]

logger = logging.getLogger("moondream_tools")

SkillName = Literal["caption", "query", "detect", "point", "count", "segment"]
#: A JSON record: its keys in the order they are written, ``error`` last.
Record = dict[str, Any]
#: After this many inputs in a row fail for a reason the server gives every request
#: (unreachable, the key refused, no credits), no new input is started.
CONSECUTIVE_BACKEND_FAILURES = 10
_FATAL = (APIConnectionError, AuthenticationError, PermissionDeniedError, InsufficientCreditsError)


@dataclass(frozen=True)
class Asked:
    """What is asked of every input: the skill and its options."""

    skill: SkillName
    object: str | None = None
    question: str | None = None
    length: Literal["short", "normal", "long"] = "normal"
    tiling: TilingMode | tuple[int, int] = "auto"
    max_tiles: int = 16
    max_objects: int | None = None


@dataclass
class RunState:
    """What every input of a run shares: the backend, the image limits, the download
    session, the request count and the streak of failures that mean the server is gone."""

    backend: VisionBackend
    settings: ImageSettings
    requests: int = 0
    failure_streak: int = 0
    last_failure: str | None = None
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def read(self, source: str) -> bytes:
        """The bytes of a path or URL (ImageError when it cannot be read)."""
        session = await self.session() if reference_kind(source) is ReferenceKind.URL else None
        data = await _load_source(source, session, self.settings)
        if not isinstance(data, bytes):  # pragma: no cover - paths and URLs give bytes
            raise ImageError(f"{source!r} is not an image file or URL")
        return data

    def backend_failed(self, exc: MoondreamError) -> None:
        if isinstance(exc, _FATAL):
            self.failure_streak += 1
            self.last_failure = message(exc)
        else:
            self.failure_streak = 0

    @property
    def server_gone(self) -> bool:
        return self.failure_streak >= CONSECUTIVE_BACKEND_FAILURES


def base_record(source: str, skill: str, arguments: dict[str, Any]) -> Record:
    """A record's leading fields, in the order every record shows them.

    >>> base_record("cat.jpg", "detect", {"object": "cat"})["skill"]
    'detect'
    """
    return {
        "source": source, "image_id": None, "width": None, "height": None,
        "skill": skill, "arguments": arguments,
    }


def message(exc: BaseException) -> str:
    """An error as a record shows it: image problems by their message (they name the
    input), anything else with its type."""
    if isinstance(exc, ImageError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _px(value: float) -> float:
    return round(value, 2)


# ---------------------------------------------------------------- result -> fields


def detections_fields(result: Detections) -> dict[str, Any]:
    """``count`` and ``objects``: each box normalized (``x_min`` ... ``y_max``, clamped and
    ordered) with ``box_px`` ``[x_min, y_min, x_max, y_max]`` in pixels of the upright image."""
    assert result.image_size is not None
    width, height = result.image_size.as_tuple()
    objects = []
    for box in result.objects:
        raw = (box.x_min, box.y_min, box.x_max, box.y_max)
        x0, y0, x1, y1 = box_to_pixels(raw, 1, 1)
        px = box_to_pixels(raw, width, height)
        objects.append({"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "box_px": [_px(v) for v in px]})
    return {"count": len(objects), "objects": objects}


def points_fields(result: Points) -> dict[str, Any]:
    """``count`` and ``points``: each ``{x, y}`` normalized with ``{x_px, y_px}``."""
    assert result.image_size is not None
    width, height = result.image_size.as_tuple()
    points = []
    for point in result.points:
        x, y = point_to_pixels((point.x, point.y), 1, 1)
        x_px, y_px = point_to_pixels((point.x, point.y), width, height)
        points.append({"x": x, "y": y, "x_px": _px(x_px), "y_px": _px(y_px)})
    return {"count": len(points), "points": points}


def segmentation_fields(result: Segmentation) -> dict[str, Any]:
    """``found``, ``bbox`` (normalized) and ``bbox_px``, ``path`` (SVG path data normalized
    to the bbox, as Moondream answers), ``area_px`` (pixels inside the mask, holes
    subtracted) and ``mask_rle`` (COCO RLE at the mask's own size, for raster masks)."""
    if not result.found or result.bbox is None:
        return {"found": False, "bbox": None, "bbox_px": None, "path": "", "area_px": 0, "mask_rle": None}
    raw = (result.bbox.x_min, result.bbox.y_min, result.bbox.x_max, result.bbox.y_max)
    x0, y0, x1, y1 = box_to_pixels(raw, 1, 1)
    assert result.image_size is not None and result.bbox_px is not None
    px = result.bbox_px
    return {
        "found": True,
        "bbox": {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1},
        "bbox_px": [_px(px.x_min), _px(px.y_min), _px(px.x_max), _px(px.y_max)],
        "path": result.path,
        "area_px": result.area_px,
        "mask_rle": result.mask_rle,
    }


def _tiles_fields(result: Any) -> dict[str, Any]:
    return {"capped": bool(result.capped), "tiles": len(result.tiles)}


def _partial_error(result: Any) -> str | None:
    failed = result.failed
    if not failed:
        return None
    regions = ", ".join(str(list(t.box)) for t in failed)
    return (
        f"{len(failed)} of {len(result.tiles)} tiles failed (regions {regions}); the result is"
        f" a lower bound. First error: {failed[0].error}"
    )


# ---------------------------------------------------------------- one input


async def _ask(state: RunState, asked: Asked, data: bytes) -> tuple[dict[str, Any], str | None]:
    md = state.backend  # --model is the backend's model: every call (and tile) uses it
    if asked.skill == "caption":
        state.requests += 1
        caption = await md.caption(data, asked.length)
        return {"caption": caption.caption}, None
    if asked.skill == "query":
        assert asked.question is not None
        state.requests += 1
        answer = await md.query(data, asked.question)
        return {"answer": answer.answer}, None
    assert asked.object is not None
    if asked.skill == "segment":
        state.requests += 1
        segmentation = await md.segment(data, asked.object)
        return await asyncio.to_thread(segmentation_fields, segmentation), None
    tiled = await TiledImage.open(
        md, data, tiling=asked.tiling, max_tiles=asked.max_tiles, image_settings=state.settings
    )
    state.requests += tiled.plan.requests
    if asked.skill == "detect":
        boxes = await tiled.detect(asked.object, max_objects=asked.max_objects)
        return {**detections_fields(boxes), **_tiles_fields(boxes)}, _partial_error(boxes)
    points = await tiled.point(asked.object, max_objects=asked.max_objects)
    return {**points_fields(points), **_tiles_fields(points)}, _partial_error(points)


async def run_one(state: RunState, asked: Asked, source: str, arguments: dict[str, Any]) -> Record:
    """The record of one input. Never raises for a bad input or a failed request: the
    message goes in ``error``."""
    record = base_record(source, asked.skill, arguments)
    try:
        data = await state.read(source)
    except ImageError as exc:
        record["error"] = message(exc)
        return record
    digest, size = await asyncio.to_thread(_inspect, data, state.settings)
    record["image_id"] = digest
    if isinstance(size, ImageError):
        record["error"] = message(size)
        return record
    record["width"], record["height"] = size
    try:
        fields, error = await _ask(state, asked, data)
    except ImageError as exc:
        record["error"] = message(exc)
        return record
    except MoondreamError as exc:
        state.backend_failed(exc)
        record["error"] = message(exc)
        return record
    except ValueError as exc:  # e.g. a --tiles grid too fine for this image
        record["error"] = message(exc)
        return record
    except Exception as exc:  # never lose the batch to one input; say what happened
        logger.warning("moondream-tools: %s failed unexpectedly", source, exc_info=True)
        record["error"] = f"unexpected {message(exc)}"
        return record
    state.failure_streak = 0
    record.update(fields)
    record["error"] = error
    return record


# ---------------------------------------------------------------- index records


def index_fields(record: ImageRecord) -> dict[str, Any]:
    """An :class:`ImageRecord` as the fields of a command record (``objects`` per phrase
    in the shape ``detect`` uses)."""
    objects: dict[str, Any] = {}
    for phrase, found in record.objects.items():
        boxes = []
        for normalized, pixels in zip(found.boxes, found.pixel_boxes):
            x0, y0, x1, y1 = box_to_pixels(normalized, 1, 1)
            boxes.append({"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "box_px": [float(v) for v in pixels]})
        objects[phrase] = {"count": found.count, "objects": boxes, "capped": found.capped, "tiles": found.tiles}
    return {
        "caption": record.caption,
        "answers": dict(record.answers),
        "ocr": record.ocr,
        "objects": objects,
        "text": record.text(),
        "errors": dict(record.errors),
    }


def index_record(image: ImageRecord, source: str, arguments: dict[str, Any]) -> Record:
    """The command record of an indexed image."""
    record = base_record(source, "index", arguments)
    unread = image.id == hashlib.sha256(image.source.encode("utf-8", "surrogateescape")).hexdigest()
    record["image_id"] = None if unread and image.width is None else image.id
    record["width"], record["height"] = image.width, image.height
    record.update(index_fields(image))
    record["error"] = "; ".join(f"{part}: {text}" for part, text in image.errors.items()) or None
    return record
