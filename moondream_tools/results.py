"""Result models: what every client call returns.

Every result type lives here (about 650 lines): they share one base, one parser
(:func:`parse_result`) and one set of conventions, and ``Segmentation`` alone (paths and
raster masks with the same surface) is a third of it.

All results are frozen pydantic models. They keep Moondream's normalized coordinates
exactly as the server returned them, the oriented size of the image they describe
(``image_size``: EXIF orientation applied, before any downscaling for upload) and the
server's ``request_id``. Pixel coordinates come from :mod:`moondream_tools.geometry`
through ``to_pixels()``.

``Detections.model_dump()`` keeps the API's ``{"objects": [{"x_min": ...}]}`` shape, so
supervision reads it unchanged::

    import supervision as sv
    result = await md.detect("street.jpg", "car")
    dets = sv.Detections.from_vlm(
        sv.VLM.MOONDREAM, result.model_dump(), resolution_wh=result.image_size.as_tuple()
    )
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from xml.sax.saxutils import escape as xml_escape

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ResponseError
from .geometry import (
    Ring,
    box_to_pixels,
    mask_bbox,
    mask_to_rings,
    mask_to_rle,
    mask_union,
    nest_rings,
    point_to_pixels,
    rasterize,
    reading_order,
    ring_area,
    rle_to_mask,
    rle_to_string,
    scale_rings,
    segment_rings,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import supervision

__all__ = [
    "ImageSize",
    "Box",
    "Point",
    "PixelBox",
    "PixelPoint",
    "GroundingSpan",
    "Reasoning",
    "Caption",
    "Answer",
    "Detections",
    "Points",
    "Segmentation",
    "SegmentBBoxEvent",
    "SegmentPathDeltaEvent",
    "SegmentFinalEvent",
    "SegmentEvent",
    "ChatResult",
    "ModelInfo",
    "Usage",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class ImageSize(_Frozen):
    """Width and height in pixels of the oriented image (EXIF orientation applied)."""

    width: int = Field(gt=0)
    height: int = Field(gt=0)

    def as_tuple(self) -> tuple[int, int]:
        """``(width, height)``, e.g. for supervision's ``resolution_wh``."""
        return (self.width, self.height)


class PixelBox(_Frozen):
    """A box in pixels of the oriented image, clamped to it, with ``x_min <= x_max``."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


class PixelPoint(_Frozen):
    """A point in pixels of the oriented image, clamped to it."""

    x: float
    y: float


def _require_size(size: ImageSize | None) -> ImageSize:
    if size is None:
        raise ValueError("this result has no image_size, so it cannot be converted to pixels")
    return size


class Box(_Frozen):
    """A box as Moondream returns it: normalized to [0, 1], origin top-left."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def to_pixels(self, size: ImageSize) -> PixelBox:
        """This box in pixels of an image of ``size`` (clamped, ordered)."""
        x0, y0, x1, y1 = box_to_pixels(
            (self.x_min, self.y_min, self.x_max, self.y_max), size.width, size.height
        )
        return PixelBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


class Point(_Frozen):
    """A point as Moondream returns it: normalized to [0, 1], origin top-left.

    Also accepts the ``[x, y]`` list form the API uses in reasoning grounding.
    """

    x: float
    y: float

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            if len(data) != 2:
                raise ValueError(f"a point needs 2 coordinates, got {len(data)}")
            return {"x": data[0], "y": data[1]}
        return data

    def to_pixels(self, size: ImageSize) -> PixelPoint:
        """This point in pixels of an image of ``size`` (clamped)."""
        x, y = point_to_pixels((self.x, self.y), size.width, size.height)
        return PixelPoint(x=x, y=y)


class Usage(_Frozen):
    """What a call cost and how long the model took, when the service says.

    fal.ai reports ``usage_info`` on every answer (tokens, time to first token, prefill and
    decode time); the OpenAI-shaped chat endpoint reports ``usage`` with ``prompt_tokens``
    and ``completion_tokens``, read here as ``input_tokens`` and ``output_tokens``.

    Example::

        result = await fal.detect("street.jpg", "car")
        if result.usage is not None:
            print(result.usage.input_tokens, result.usage.ttft_ms)
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    ttft_ms: float | None = None
    prefill_time_ms: float | None = None
    decode_time_ms: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _openai_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            data.setdefault("input_tokens", data.get("prompt_tokens"))
            data.setdefault("output_tokens", data.get("completion_tokens"))
            data = {k: v for k, v in data.items() if v is not None}
        return data


class _Result(_Frozen):
    request_id: str | None = None
    image_size: ImageSize | None = None
    usage: Usage | None = None


class GroundingSpan(_Frozen):
    """A span ``text[start_idx:end_idx]`` of the reasoning text and the points it refers to."""

    start_idx: int
    end_idx: int
    points: list[Point] = Field(default_factory=list)


class Reasoning(_Frozen):
    """Moondream's reasoning trace for a query, with grounded spans."""

    text: str
    grounding: list[GroundingSpan] = Field(default_factory=list)

    @field_validator("grounding", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class Caption(_Result):
    """A caption. ``caption`` is the text.

    Example::

        result = await md.caption("photo.jpg", length="short")
        print(result.caption, result.request_id)
    """

    caption: str


class Answer(_Result):
    """The answer to a question, and the reasoning trace when it was asked for.

    Example::

        result = await md.query("photo.jpg", "How many dogs?", reasoning=True)
        print(result.answer)
        if result.reasoning:
            for span in result.reasoning.grounding:
                print(result.reasoning.text[span.start_idx:span.end_idx], span.points)
    """

    answer: str
    reasoning: Reasoning | None = None

    def grounding_pixels(self) -> list[tuple[str, list[PixelPoint]]]:
        """Each grounded span's text with its points in pixels of the oriented image."""
        if self.reasoning is None:
            return []
        size = _require_size(self.image_size)
        text = self.reasoning.text
        return [
            (text[s.start_idx : s.end_idx], [p.to_pixels(size) for p in s.points])
            for s in self.reasoning.grounding
        ]


def _import_optional(module: str, extra: str) -> Any:
    """Import an optional dependency or say exactly how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this needs the optional package {extra!r}: pip install {extra}"
        ) from None


class Detections(_Result):
    """Boxes found by ``detect``, normalized as returned.

    ``model_dump()`` keeps the API shape ``{"objects": [{"x_min", "y_min", "x_max", "y_max"}]}``.

    Example::

        result = await md.detect("street.jpg", "car")
        for box in result.to_pixels():
            print(round(box.x_min), round(box.y_min), round(box.x_max), round(box.y_max))
    """

    objects: list[Box]
    object: str | None = None

    def to_pixels(self) -> list[PixelBox]:
        """Every box in pixels of the oriented image."""
        size = _require_size(self.image_size)
        return [box.to_pixels(size) for box in self.objects]

    def to_supervision(self) -> supervision.Detections:
        """These boxes as ``supervision.Detections`` (pixels; ``data["class_name"]`` = object).

        supervision is optional: ``pip install supervision``.
        """
        sv = _import_optional("supervision", "supervision")
        import numpy as np

        boxes = [(b.x_min, b.y_min, b.x_max, b.y_max) for b in self.to_pixels()]
        xyxy = np.array(boxes, dtype=float).reshape(-1, 4)
        return sv.Detections(
            xyxy=xyxy, data={"class_name": np.array([self.object or "object"] * len(boxes))}
        )


class Points(_Result):
    """Points found by ``point``, normalized as returned.

    Example::

        result = await md.point("crowd.jpg", "face")
        print(len(result.points), [(round(p.x), round(p.y)) for p in result.to_pixels()])
    """

    points: list[Point]
    object: str | None = None

    def to_pixels(self) -> list[PixelPoint]:
        """Every point in pixels of the oriented image."""
        size = _require_size(self.image_size)
        return [point.to_pixels(size) for point in self.points]


class Segmentation(_Result):
    """A segmentation mask: Moondream's path, or a raster mask, plus everything code needs.

    From Moondream, ``path`` is SVG path data whose coordinates are normalized to ``bbox``
    (not to the image); ``bbox`` is normalized to the image. From a model that answers with
    mask images (SAM 3), ``mask_rle`` holds the mask exactly (COCO RLE at the mask's own
    size, ``mask_size``), ``path`` is empty, and ``instances`` holds each mask the model
    returned, with its ``score``, in reading order (this segmentation is their union);
    ``capped`` says the model hit its mask limit, so there may be more. Both
    kinds have the same surface below. An empty result (``found`` False) means nothing
    matching was found. Pixel values are in the oriented image (``image_size``); holes and
    islands follow the even-odd rule.

    ``partial`` marks the coarse mask of a stream in progress: its path may end
    mid-command, and only its complete commands are drawn.

    Example::

        result = await md.segment("street.jpg", "car")
        if result.found:
            print(result.bbox_px, result.area_px, f"{result.area_fraction:.1%}")
            result.mask().save("car-mask.png")
            coco = result.to_rle(compressed=True)
    """

    path: str
    bbox: Box | None = None
    object: str | None = None
    partial: bool = False
    mask_rle: dict[str, Any] | None = None
    score: float | None = None
    instances: list[Segmentation] = Field(default_factory=list)
    capped: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @property
    def found(self) -> bool:
        """Whether the server returned a mask."""
        return (bool(self.path) or self.mask_rle is not None) and self.bbox is not None

    @property
    def mask_size(self) -> tuple[int, int] | None:
        """``(width, height)`` of a raster mask as the model returned it (None for a path).

        ``mask(size=result.mask_size)`` is the decoded mask image, pixel for pixel.
        """
        if self.mask_rle is None:
            return None
        height, width = self.mask_rle["size"]
        return (int(width), int(height))

    @cached_property
    def _raster(self) -> Image.Image:
        assert self.mask_rle is not None
        return rle_to_mask(self.mask_rle)

    @classmethod
    def from_masks(
        cls,
        masks: list[Image.Image],
        *,
        image_size: ImageSize,
        object: str | None = None,
        scores: list[Any] | None = None,
        request_id: str | None = None,
        usage: Usage | None = None,
    ) -> Segmentation:
        """A segmentation from binary mask images (mode "L", 0/255, all one size): their
        union, with each non-empty mask in ``instances`` (and its score) in reading order.

        Example::

            result = Segmentation.from_masks([mask_a, mask_b], image_size=ImageSize(width=640, height=480),
                                             scores=[0.9, 0.8], object="dog")
            result.area_px, [i.score for i in result.instances]
        """
        if not masks:
            return cls(path="", object=object, image_size=image_size, request_id=request_id, usage=usage)
        size = masks[0].size
        if any(m.size != size for m in masks):
            raise ResponseError(
                f"masks of different sizes for one image: {sorted({m.size for m in masks})}", request_id=request_id
            )
        instances: list[Segmentation] = []
        for index, mask in enumerate(masks):
            score = scores[index] if scores is not None and index < len(scores) else None
            finite = isinstance(score, (int, float)) and math.isfinite(score)
            single = cls._from_raster(mask, image_size, object, request_id, None, float(score) if finite else None)
            if single.found:
                instances.append(single)
        boxes = [(i.bbox.x_min, i.bbox.y_min, i.bbox.x_max, i.bbox.y_max) for i in instances if i.bbox]
        instances = [instances[k] for k in reading_order(boxes)]
        if len(masks) == 1:  # the union is the one mask: encode it once
            whole = instances[0] if instances else cls._from_raster(masks[0], image_size, object, request_id, usage, None)
            return whole.model_copy(update={"instances": instances, "usage": usage})
        whole = cls._from_raster(mask_union(masks), image_size, object, request_id, usage, None)
        return whole.model_copy(update={"instances": instances})

    @classmethod
    def _from_raster(
        cls, mask: Image.Image, image_size: ImageSize, object: str | None, request_id: str | None,
        usage: Usage | None, score: float | None,
    ) -> Segmentation:
        box = mask_bbox(mask)
        if box is None:
            return cls(path="", object=object, image_size=image_size, request_id=request_id, usage=usage)
        width, height = mask.size
        rle = mask_to_rle(mask)
        return cls(
            path="",
            bbox=Box(x_min=box[0] / width, y_min=box[1] / height, x_max=box[2] / width, y_max=box[3] / height),
            mask_rle={"size": rle["size"], "counts": rle_to_string(rle["counts"])},
            score=score,
            object=object,
            image_size=image_size,
            request_id=request_id,
            usage=usage,
        )

    def _size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        return size if size is not None else _require_size(self.image_size).as_tuple()

    def rings(self, size: tuple[int, int] | None = None, *, tolerance: float = 0.25) -> list[Ring]:
        """Outline rings (outer boundaries and holes) in pixels of ``size`` (default: image_size).

        Curves are flattened to within ``tolerance`` pixels.
        """
        if not self.found:
            return []
        assert self.bbox is not None
        width, height = self._size(size)
        if self.mask_rle is not None:  # exact pixel-edge outlines of the raster, scaled
            mask_width, mask_height = self._raster.size
            rings = mask_to_rings(self._raster)
            if (width, height) == (mask_width, mask_height):
                return rings
            return scale_rings(rings, width / mask_width, height / mask_height)
        box = (self.bbox.x_min, self.bbox.y_min, self.bbox.x_max, self.bbox.y_max)
        return segment_rings(self.path, box, width, height, tolerance=tolerance, partial=self.partial)

    @cached_property
    def polygons(self) -> list[Ring]:
        """Outline rings in pixels of the oriented image: outer boundaries and holes."""
        return self.rings()

    @property
    def bbox_px(self) -> PixelBox | None:
        """The mask's bbox in pixels of the oriented image (None when nothing was found)."""
        if self.bbox is None:
            return None
        return self.bbox.to_pixels(_require_size(self.image_size))

    def mask(self, mode: Literal["1", "L"] = "1", size: tuple[int, int] | None = None) -> Image.Image:
        """The filled mask at ``size`` (default: the oriented image size): 255 inside, 0 outside.

        A raster mask (``mask_rle``) is returned exactly at its own size, and scaled with
        nearest-neighbour sampling to any other.
        """
        width, height = self._size(size)
        if self.mask_rle is not None:
            raster = self._raster
            if raster.size != (width, height):
                raster = raster.resize((width, height), Image.Resampling.NEAREST)
            return raster.convert(mode) if raster.mode != mode else raster.copy()
        if size is None:
            return rasterize(self.polygons, width, height, mode=mode)
        return rasterize(self.rings(size), width, height, mode=mode)

    @cached_property
    def _full_mask(self) -> Image.Image:
        return self.mask()

    @cached_property
    def area_px(self) -> int:
        """Pixels inside the mask (holes subtracted), in the oriented image."""
        return self._full_mask.convert("L").histogram()[255]

    @property
    def area_fraction(self) -> float:
        """``area_px`` as a fraction of the image (0..1)."""
        width, height = _require_size(self.image_size).as_tuple()
        return self.area_px / (width * height)

    def to_numpy(self, size: tuple[int, int] | None = None) -> numpy.ndarray:
        """The mask as a bool array shaped (height, width). Needs numpy."""
        np = _import_optional("numpy", "numpy")
        mask = self._full_mask if size is None else self.mask(size=size)
        return np.asarray(mask.convert("L"), dtype=np.uint8) > 0

    def to_rle(self, compressed: bool = False) -> dict[str, Any]:
        """COCO run-length encoding of the full mask, as pycocotools writes it.

        ``{"size": [height, width], "counts": [...]}`` with column-major counts, or with
        ``compressed=True`` the compact ``counts`` string pycocotools produces.
        """
        rle = mask_to_rle(self._full_mask)
        if compressed:
            return {"size": rle["size"], "counts": rle_to_string(rle["counts"])}
        return rle

    def to_svg(self, *, color: str = "#ff3b30", opacity: float = 0.5) -> str:
        """An SVG document in image pixel space that overlays the image (even-odd fill)."""
        width, height = _require_size(self.image_size).as_tuple()
        d = " ".join(
            "M" + "L".join(f"{x:.2f},{y:.2f}" for x, y in ring) + "Z" for ring in self.polygons
        )
        title = f"<title>{_xml_escape(self.object)}</title>" if self.object else ""
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
            f' viewBox="0 0 {width} {height}">{title}'
            f'<path d="{d}" fill="{_xml_escape(color)}" fill-opacity="{opacity}"'
            f' fill-rule="evenodd" stroke="{_xml_escape(color)}" stroke-width="1"/></svg>'
        )

    def to_geojson(self) -> dict[str, Any]:
        """A GeoJSON-style ``MultiPolygon`` in image pixels (x right, y down).

        Each polygon is an outer ring followed by its holes; rings are closed (first
        point repeated), outer rings wound opposite to holes.
        """
        polygons = []
        for outer, holes in nest_rings(self.polygons):
            rings = [_closed(outer, positive=True)] + [_closed(h, positive=False) for h in holes]
            polygons.append(rings)
        return {"type": "MultiPolygon", "coordinates": polygons}

    def to_supervision(self) -> supervision.Detections:
        """This mask as ``supervision.Detections`` with one box and its mask.

        supervision is optional: ``pip install supervision``.
        """
        sv = _import_optional("supervision", "supervision")
        import numpy as np

        if not self.found or self.bbox_px is None:
            return sv.Detections.empty()
        box = self.bbox_px
        return sv.Detections(
            xyxy=np.array([[box.x_min, box.y_min, box.x_max, box.y_max]], dtype=float),
            mask=self.to_numpy()[None, ...],
            data={"class_name": np.array([self.object or "object"])},
        )


def _closed(ring: Ring, *, positive: bool) -> list[list[float]]:
    points = list(ring) if (ring_area(ring) >= 0) == positive else list(reversed(ring))
    return [[x, y] for x, y in points + points[:1]]


def _xml_escape(text: str) -> str:
    return xml_escape(text, {'"': "&quot;"})


class SegmentBBoxEvent(_Frozen):
    """First event of a streamed segmentation: the object's box, before any path."""

    type: Literal["bbox"] = "bbox"
    bbox: Box
    image_size: ImageSize | None = None


class SegmentPathDeltaEvent(_Frozen):
    """A chunk of the coarse path (space-separated, relative to the first bbox).

    ``segmentation`` is the coarse mask so far (``partial=True``), drawable before the
    refined one arrives::

        async for event in md.stream_segment(img, "car"):
            if event.type == "path_delta":
                preview = event.segmentation.mask()
    """

    type: Literal["path_delta"] = "path_delta"
    chunk: str
    segmentation: Segmentation


class SegmentFinalEvent(_Frozen):
    """Last event of a streamed segmentation: the refined path and its bbox."""

    type: Literal["final"] = "final"
    segmentation: Segmentation


SegmentEvent = SegmentBBoxEvent | SegmentPathDeltaEvent | SegmentFinalEvent
Segmentation.model_rebuild()


class ChatResult(_Frozen):
    """The answer of ``/chat/completions``.

    Example::

        result = await md.chat([{"role": "user", "content": "Hello"}])
        print(result.content)
    """

    content: str
    reasoning: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    usage: Usage | None = None
    request_id: str | None = None


class ModelInfo(_Frozen):
    """A model the server offers (``id`` is what ``model=`` takes)."""

    id: str
    owned_by: str | None = None


_R = TypeVar("_R", bound=BaseModel)


def parse_result(
    cls: type[_R],
    data: Any,
    *,
    what: str,
    request_id: str | None = None,
    **context: Any,
) -> _R:
    """Validate a server answer into ``cls``; a malformed answer becomes :class:`ResponseError`.

    ``request_id`` and the ``context`` values (e.g. ``image_size``, ``object``) are set on
    the result when ``cls`` has those fields.
    """
    if not isinstance(data, dict):
        raise ResponseError(
            f"{what}: expected a JSON object from the server, got {type(data).__name__}",
            request_id=request_id,
        )
    payload = dict(data)
    for name, value in {"request_id": request_id, **context}.items():
        if name in cls.model_fields:
            payload[name] = value
    try:
        return cls.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:5]
        )
        raise ResponseError(
            f"{what}: the server's answer does not match the Moondream API ({problems})",
            request_id=request_id,
        ) from None
