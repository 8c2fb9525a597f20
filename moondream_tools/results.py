"""Result models: what every client call returns.

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

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ResponseError
from .geometry import box_to_pixels, point_to_pixels

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


class _Result(_Frozen):
    request_id: str | None = None
    image_size: ImageSize | None = None


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


class Detections(_Result):
    """Boxes found by ``detect``, normalized as returned.

    ``model_dump()`` keeps the API shape ``{"objects": [{"x_min", "y_min", "x_max", "y_max"}]}``.

    Example::

        result = await md.detect("street.jpg", "car")
        for box in result.to_pixels():
            print(round(box.x_min), round(box.y_min), round(box.x_max), round(box.y_max))
    """

    objects: list[Box]

    def to_pixels(self) -> list[PixelBox]:
        """Every box in pixels of the oriented image."""
        size = _require_size(self.image_size)
        return [box.to_pixels(size) for box in self.objects]


class Points(_Result):
    """Points found by ``point``, normalized as returned.

    Example::

        result = await md.point("crowd.jpg", "face")
        print(len(result.points), [(round(p.x), round(p.y)) for p in result.to_pixels()])
    """

    points: list[Point]

    def to_pixels(self) -> list[PixelPoint]:
        """Every point in pixels of the oriented image."""
        size = _require_size(self.image_size)
        return [point.to_pixels(size) for point in self.points]


class Segmentation(_Result):
    """A segmentation mask as Moondream returns it.

    ``path`` is SVG path data whose coordinates are normalized to ``bbox`` (not to the
    image); ``bbox`` is normalized to the image. An empty ``path`` with ``bbox=None``
    means nothing matching was found.

    Example::

        result = await md.segment("street.jpg", "car")
        if result.bbox is not None:
            print(result.bbox.to_pixels(result.image_size), len(result.path))
    """

    path: str
    bbox: Box | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @property
    def found(self) -> bool:
        """Whether the server returned a mask."""
        return bool(self.path) and self.bbox is not None


class SegmentBBoxEvent(_Frozen):
    """First event of a streamed segmentation: the object's box, before any path."""

    type: Literal["bbox"] = "bbox"
    bbox: Box
    image_size: ImageSize | None = None


class SegmentPathDeltaEvent(_Frozen):
    """A chunk of the coarse path (space-separated, relative to the first bbox)."""

    type: Literal["path_delta"] = "path_delta"
    chunk: str


class SegmentFinalEvent(_Frozen):
    """Last event of a streamed segmentation: the refined path and its bbox."""

    type: Literal["final"] = "final"
    segmentation: Segmentation


SegmentEvent = SegmentBBoxEvent | SegmentPathDeltaEvent | SegmentFinalEvent


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
    usage: dict[str, Any] | None = None
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
    image_size: ImageSize | None = None,
) -> _R:
    """Validate a server answer into ``cls``; a malformed answer becomes :class:`ResponseError`.

    ``request_id`` and ``image_size`` are set on the result when ``cls`` has those fields.
    """
    if not isinstance(data, dict):
        raise ResponseError(
            f"{what}: expected a JSON object from the server, got {type(data).__name__}",
            request_id=request_id,
        )
    payload = dict(data)
    if "request_id" in cls.model_fields:
        payload["request_id"] = request_id
    if "image_size" in cls.model_fields:
        payload["image_size"] = image_size
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
