"""The tools' results and the texts an agent reads: short, exact, in pixels of the upright image.

Also :func:`tool_error_text`, the text an agent reads when a tool fails.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ImageError,
    InternalServerError,
    MoondreamError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseError,
    ToolArgumentsError,
    UnsupportedSkillError,
)
from ..geometry import nest_rings, pixels_to_box, points_reading_order, position_word, reading_order
from ..results import Answer, Caption, Detections, ImageSize, Points, Segmentation

_MAX_LISTED = 40  # positions listed in a text before "... and N more"


# ---------------------------------------------------------------------- results


class ToolResult(BaseModel):
    """What a tool returns: ``text`` for the agent, the structured result for code.

    ``annotated_png`` holds an annotated picture of the result when the tools were made
    with ``return_images=True``.
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64")

    tool: str
    image: str
    image_size: ImageSize
    text: str
    time: float | None = Field(
        default=None, description="For a video: the moment (seconds from its start) this result is of."
    )
    annotated_png: bytes | None = Field(default=None, repr=False)


class TimeSpan(BaseModel):
    """A stretch of a video in which an object was seen in every sampled frame."""

    model_config = ConfigDict(frozen=True)

    start: float = Field(description="Seconds: the first sampled frame of the stretch it was seen in.")
    end: float = Field(description="Seconds: the last one.")
    most: int = Field(description="The most instances seen in one sampled frame of the stretch.")


class VideoTimeline(BaseModel):
    """When an object appears in a video, from frames sampled every ``every`` seconds
    (``count_objects`` / ``locate_objects`` on a video handle without ``time``)."""

    model_config = ConfigDict(frozen=True)

    duration: float = Field(description="The video's length in seconds (0.0 when its file does not say).")
    every: float = Field(description="Seconds between the sampled frames.")
    frames: int = Field(description="Sampled frames answered.")
    failed: int = Field(description="Sampled frames whose request failed (not in the spans).")
    spans: list[TimeSpan] = Field(description="The stretches in which the object was seen, in order.")
    tracks: int = Field(description="Distinct instances followed across frames (track ids).")


class DescribeResult(ToolResult):
    """``describe_image``: ``caption`` when no question was asked, else ``answer``.

    A question about several images lists the others in ``more_images`` (and their sizes).
    """

    caption: Caption | None = None
    answer: Answer | None = None
    more_images: list[str] = Field(default_factory=list)
    more_image_sizes: list[ImageSize] = Field(default_factory=list)


class CountResult(ToolResult):
    """``count_objects``: the number found, whether it hit the limit, and the points.

    With further phrases (``more_objects``), ``more`` holds one ``CountResult`` per further
    phrase, in the order asked, and ``text`` is the texts of all, one line per phrase. On a
    video without ``time``, ``timeline`` says when the object appears and the count and
    points are those of the sampled moment (``time``) it was most numerous.
    """

    object: str
    count: int
    capped: bool
    points: Points
    timeline: VideoTimeline | None = None
    more: list[CountResult] = Field(default_factory=list)


class LocateResult(ToolResult):
    """``locate_objects``: the boxes found (``detections``), in reading order in ``text``.

    With further phrases (``more_objects``), ``more`` holds one ``LocateResult`` per further
    phrase, in the order asked, and ``text`` is the texts of all, one line per phrase. On a
    video without ``time``, ``timeline`` says when the object appears and the boxes are
    those of the sampled moment (``time``) it was most numerous.
    """

    object: str
    detections: Detections
    timeline: VideoTimeline | None = None
    more: list[LocateResult] = Field(default_factory=list)


class SegmentResult(ToolResult):
    """``segment_object``: the segmentation (mask, polygons, RLE, ...) and its summary."""

    object: str
    segmentation: Segmentation


# ---------------------------------------------------------------------- texts


def _size_text(name: str, size: ImageSize) -> str:
    return f"{name} ({size.width}x{size.height} px)"


def _xy(x: float, y: float) -> str:
    return f"({round(x)}, {round(y)})"


def _more(total: int) -> str:
    return f"; ... and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""


def _tiles_text(result: Detections | Points) -> tuple[str, str]:
    """(" over N tiles", notes on capped and unreadable tiles) for a tiled result, else ("", "")."""
    tiles = getattr(result, "tiles", None)
    if not tiles or len(tiles) < 2:
        return "", ""
    notes = ""
    failed = [t for t in tiles if t.error]
    if failed:
        parts = "; ".join(  # the region lost is the tile's core: neighbours cover its overlaps
            f"{_xy(t.core[0], t.core[1])}-{_xy(t.core[2], t.core[3])} ({t.error.rstrip('.')})" for t in failed
        )
        notes += f" Could not read {len(failed)} of {len(tiles)} parts of the image, so they are not counted: {parts}."
    return f" over {len(tiles)} tiles", notes


def _count_text(name: str, obj: str, points: Points, capped: bool, limit: int) -> str:
    size = points.image_size
    assert size is not None
    pixels = [(p.x, p.y) for p in points.to_pixels()]
    over, notes = _tiles_text(points)
    unread = bool(getattr(points, "failed", None))
    number = f"at least {len(pixels)}" if capped or unread else str(len(pixels))
    head = f'Counted {number} "{obj}" in {_size_text(name, size)}{over}'
    if not pixels:
        return head + "." + notes
    order = points_reading_order(pixels, size.width, size.height)
    items = []
    for rank, index in enumerate(order[:_MAX_LISTED], start=1):
        x, y = pixels[index]
        p = points.points[index]
        items.append(f"#{rank} at {_xy(x, y)} {position_word(p.x, p.y)}")
    text = f"{head}: " + ", ".join(items) + _more(len(pixels)) + "."
    if capped:
        where = " in at least one tile" if over else ""
        text += f" The result hit the limit of {limit} objects{where}; there may be more."
    return text + notes


def _locate_text(name: str, obj: str, detections: Detections) -> str:
    size = detections.image_size
    assert size is not None
    boxes = detections.to_pixels()
    over, notes = _tiles_text(detections)
    if getattr(detections, "capped", False):
        notes = " The result hit the limit of objects in at least one tile; there may be more." + notes
    head = f'Found {len(boxes)} "{obj}" in {_size_text(name, size)}{over}'
    if not boxes:
        return head + "." + notes
    order = reading_order([(b.x_min, b.y_min, b.x_max, b.y_max) for b in boxes])
    items = []
    for rank, index in enumerate(order[:_MAX_LISTED], start=1):
        b = boxes[index]
        n = pixels_to_box((b.x_min, b.y_min, b.x_max, b.y_max), size.width, size.height)
        center = position_word((n[0] + n[2]) / 2, (n[1] + n[3]) / 2)
        items.append(
            f"#{rank} box {_xy(b.x_min, b.y_min)}-{_xy(b.x_max, b.y_max)} {center}"
            f" [normalized {n[0]:.3f}, {n[1]:.3f}, {n[2]:.3f}, {n[3]:.3f}]"
        )
    listed = "; ".join(items) + _more(len(boxes))
    return f"{head} (boxes are x_min, y_min - x_max, y_max in pixels): {listed}.{notes}"


def _segment_text(name: str, obj: str, segmentation: Segmentation) -> str:
    size = segmentation.image_size
    assert size is not None
    if not segmentation.found or segmentation.bbox_px is None:
        return f'No "{obj}" found to segment in {_size_text(name, size)}.'
    box = segmentation.bbox_px
    polygons = nest_rings(segmentation.polygons)
    holes = sum(len(h) for _, h in polygons)
    regions = f"{len(polygons)} region" + ("s" if len(polygons) != 1 else "")
    if holes:
        regions += f" with {holes} hole" + ("s" if holes != 1 else "")
    where = position_word(
        (segmentation.bbox.x_min + segmentation.bbox.x_max) / 2,  # type: ignore[union-attr]
        (segmentation.bbox.y_min + segmentation.bbox.y_max) / 2,  # type: ignore[union-attr]
    )
    text = (
        f'Segmented "{obj}" in {_size_text(name, size)}: area {segmentation.area_px:,} px'
        f" ({segmentation.area_fraction:.1%} of the image), bbox {_xy(box.x_min, box.y_min)}-"
        f"{_xy(box.x_max, box.y_max)} px {where}, {regions}."
    )
    instances = segmentation.instances
    if len(instances) > 1 or segmentation.capped:  # a model that answers with several masks (SAM 3)
        scores = [f"{i.score:.2f}" for i in instances if i.score is not None]
        number = f"at least {len(instances)}" if segmentation.capped else str(len(instances))
        text += f" The model returned {number} masks (this is their union)"
        text += f", scores in reading order: {', '.join(scores)}." if len(scores) == len(instances) else "."
        if segmentation.capped:
            text += " It hit its mask limit; there may be more."
    return text


def _moment(name: str, time: float | None) -> str:
    """How a text names an image, or a video at a moment: ``img_1``, ``vid_1 at 3.5 s``."""
    return name if time is None else f"{name} at {time:g} s"


def _timeline_text(name: str, obj: str, timeline: VideoTimeline, size: ImageSize, peak_text: str) -> str:
    """When ``obj`` appears in the video ``name``, then the text of its busiest moment."""
    length = f"{timeline.duration:.1f} s video" if timeline.duration > 0 else "video of unknown length"
    head = (
        f"{name} ({length}, {size.width}x{size.height} px;"
        f" {timeline.frames} frames sampled every {timeline.every:g} s"
        + (", from its start only)" if timeline.duration <= 0 else ")")
    )
    failed = f" {timeline.failed} sampled frames could not be read." if timeline.failed else ""
    if not timeline.spans:
        return f'No "{obj}" seen in {head}.{failed}'
    spans = ", ".join(
        f"{s.start:g}-{s.end:g} s" if s.end > s.start else f"at {s.start:g} s" for s in timeline.spans
    )
    plural = "s" if timeline.tracks != 1 else ""
    tracks = f", {timeline.tracks} instance{plural} tracked across frames" if timeline.tracks else ""
    return (
        f'"{obj}" seen in {head} during {spans}{tracks}.{failed} Busiest moment: {peak_text}'
        " Give time= (seconds) to look at another moment."
    )


def _describe_several_text(names: list[str], sizes: list[ImageSize], answer: Answer) -> str:
    head = ", ".join(_size_text(name, size) for name, size in zip(names, sizes, strict=True))
    text = f"{head}: {answer.answer.strip()}"
    if answer.reasoning is not None and answer.reasoning.text.strip():
        text += f"\nReasoning: {answer.reasoning.text.strip()}"
    return text


def _describe_text(name: str, size: ImageSize, caption: Caption | None, answer: Answer | None) -> str:
    head = _size_text(name, size)
    if caption is not None:
        return f"{head}: {caption.caption.strip()}"
    assert answer is not None
    text = f"{head}: {answer.answer.strip()}"
    if answer.reasoning is not None and answer.reasoning.text.strip():
        text += f"\nReasoning: {answer.reasoning.text.strip()}"
        grounded = [
            f'"{span}" at ' + ", ".join(_xy(p.x, p.y) for p in points)
            for span, points in answer.grounding_pixels()
            if points
        ]
        if grounded:
            text += "\nGrounded in pixels: " + "; ".join(grounded)
    return text


def tool_error_text(error: MoondreamError) -> str:
    """The text an agent reads when a tool fails: what went wrong and what it can do.

    Example::

        try:
            result = await tools.count("img_9", "cat")
        except MoondreamError as exc:
            print(tool_error_text(exc))
    """
    if isinstance(error, ImageError):
        advice = "Use one of the available images."
    elif isinstance(error, (AuthenticationError, PermissionDeniedError, ConfigurationError)):
        advice = "The vision service is not set up correctly; tell the user. Retrying will not help."
    elif isinstance(error, (RateLimitError, APIConnectionError, InternalServerError)):
        advice = "The vision service is busy or unreachable; try again in a moment or go on without it."
    elif isinstance(error, (NotFoundError, UnsupportedSkillError)):
        advice = "The vision service does not offer this; try another tool."
    elif isinstance(error, ToolArgumentsError):
        advice = "Fix the arguments and call the tool again."
    elif isinstance(error, (ResponseError, BadRequestError)):
        advice = "Try again, perhaps with a simpler object phrase or question."
    else:
        advice = "Try again or go on without it."
    message = str(error).rstrip()
    if not message.endswith((".", "!", "?")):
        message += "."
    return f"Error: {message} {advice}"
