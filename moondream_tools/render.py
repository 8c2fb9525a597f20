"""Annotated images: Moondream results drawn on the user's image, for people and models.

:func:`annotate` draws any number of :class:`~moondream_tools.results.Detections`
(boxes), :class:`~moondream_tools.results.Points` (dots) and
:class:`~moondream_tools.results.Segmentation` (translucent masks with an outline) on a
copy of the image, each with a label tag. Pillow is the only dependency.

- Coordinates: results are normalized to the upright (EXIF-oriented) image, and are
  converted to pixels of the image actually drawn on, through
  :mod:`moondream_tools.geometry`. So a resized copy of the original is annotated
  correctly too.
- Colors: one per label, stable across runs and processes (:func:`color_for`); every
  instance of a label shares it. Within one :func:`annotate` call, two different labels
  never share a color (the second takes the next free palette color).
- Labels: each result's ``object`` (the phrase asked for), or ``labels=[...]``. When a
  result has several boxes or points they are numbered ``#1``, ``#2``, ... in reading
  order (top-to-bottom rows, then left-to-right).
- Line width, dot size and font size scale with the image, so a 4000x3000 photo and a
  320x240 thumbnail both read well.

Example::

    from moondream_tools import AsyncMoondream
    from moondream_tools.render import annotate, annotate_png

    async with AsyncMoondream() as md:
        cars = await md.detect("street.jpg", "car")
        people = await md.point("street.jpg", "person")
        road = await md.segment("street.jpg", "road")

    annotate("street.jpg", road, cars, people).save("street-annotated.png")
    png = annotate_png("street.jpg", cars, labels=["vehicle"])   # bytes, e.g. for a model

The building blocks draw in place on an RGB image and take normalized coordinates
(masks and rings are in pixels of that image)::

    from PIL import Image
    from moondream_tools.render import draw_boxes, draw_points

    img = Image.open("street.jpg").convert("RGB")
    draw_boxes(img, [(0.1, 0.2, 0.4, 0.6)], "car")
    draw_points(img, [(0.7, 0.5)], "person")
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from PIL import Image, ImageChops, ImageColor, ImageDraw, ImageFilter, ImageFont

from .geometry import box_to_pixels, point_to_pixels, points_reading_order, reading_order
from .images import ImageSettings, decode_image, read_image_file
from .results import Detections, Points, Segmentation

__all__ = [
    "PALETTE",
    "RenderImage",
    "Color",
    "color_for",
    "annotate",
    "annotate_png",
    "draw_boxes",
    "draw_points",
    "draw_mask",
]

#: What :func:`annotate` accepts as the image: a PIL image, a path, or encoded bytes.
RenderImage = Union[Image.Image, str, "os.PathLike[str]", bytes, bytearray, memoryview]

RGB = tuple[int, int, int]

#: A color: an ``(r, g, b)`` tuple or any name Pillow knows (``"red"``, ``"#ff3b30"``).
Color = Union[RGB, str]

#: Saturated colors that read on light and dark photos alike.
PALETTE: tuple[RGB, ...] = (
    (230, 25, 75),  # crimson
    (60, 180, 75),  # green
    (255, 225, 25),  # yellow
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (255, 105, 180),  # pink
    (0, 190, 160),  # teal
    (120, 90, 255),  # violet
)

_BLACK: RGB = (0, 0, 0)
_WHITE: RGB = (255, 255, 255)


# ---------------------------------------------------------------- colors


def _palette_index(label: str) -> int:
    key = label.strip().casefold().encode("utf-8")
    return zlib.crc32(key) % len(PALETTE)


def color_for(label: str) -> RGB:
    """The color of ``label``: the same in every run and process (CRC-32 of the label).

    Case and surrounding spaces are ignored, so ``"Car"`` and ``"car "`` match.

    >>> color_for("car") == color_for(" Car")
    True
    """
    return PALETTE[_palette_index(label)]


def _rgb(color: Color | None, label: str) -> RGB:
    if color is None:
        return color_for(label)
    if isinstance(color, str):
        r, g, b = ImageColor.getrgb(color)[:3]
        return (r, g, b)
    r, g, b = (int(c) for c in tuple(color)[:3])
    return (r, g, b)


def _luminance(color: RGB) -> float:
    def channel(c: int) -> float:
        v = c / 255.0
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in color[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(color: RGB) -> RGB:
    """Black or white, whichever has the higher WCAG contrast with ``color``."""
    lum = _luminance(color)
    return _BLACK if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else _WHITE


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class _Style:
    line_width: int
    dot_radius: int
    ring_width: int
    font_size: int
    padding: int


def _style(width: int, height: int) -> _Style:
    """Stroke, dot and font sizes proportional to the image, with readable minimums."""
    base = max(width, height)
    line_width = max(2, round(base / 320))
    dot_radius = max(5, round(base / 100))
    font_size = max(12, round(base / 45))
    # A very long, thin image: keep the text within its short side.
    font_size = min(font_size, max(12, min(width, height) // 3))
    return _Style(
        line_width=line_width,
        dot_radius=dot_radius,
        ring_width=max(1, round(dot_radius / 4)),
        font_size=font_size,
        padding=max(2, round(font_size / 5)),
    )


_Font = Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]


@lru_cache(maxsize=32)
def _font(size: int) -> _Font:
    # Pillow's bundled scalable font: no font files needed. Without FreeType Pillow
    # falls back to its fixed bitmap font.
    return ImageFont.load_default(size=size)


# ---------------------------------------------------------------- label tags


@dataclass(frozen=True)
class _Tag:
    """A label to draw last, on top of every shape."""

    text: str
    color: RGB
    kind: str  # "box": top-left of a region; "point": beside a dot
    x0: int
    y0: int
    x1: int
    y1: int


def _text_size(font: _Font, text: str) -> tuple[int, int, int]:
    """(width, height, top offset) of ``text`` with a line height that ignores the glyphs."""
    left, _, right, _ = font.getbbox(text)
    _, top, _, bottom = font.getbbox("Hg")
    return int(right - left), int(bottom - top), int(top)


def _draw_tags(image: Image.Image, tags: Sequence[_Tag]) -> None:
    if not tags:
        return
    width, height = image.size
    style = _style(width, height)
    font = _font(style.font_size)
    draw = ImageDraw.Draw(image)
    pad = style.padding
    for tag in tags:
        if not tag.text:
            continue
        text_w, text_h, top = _text_size(font, tag.text)
        left_bearing = int(font.getbbox(tag.text)[0])
        tag_w, tag_h = text_w + 2 * pad, text_h + 2 * pad
        if tag.kind == "point":
            # Right of the dot, vertically centred on it; left of it if there is no room.
            gap = pad
            x = tag.x1 + gap
            if x + tag_w > width:
                x = tag.x0 - gap - tag_w
            y = (tag.y0 + tag.y1) // 2 - tag_h // 2
        else:
            # Above the region's top-left corner, or inside it when it touches the top.
            x = tag.x0
            y = tag.y0 - tag_h
            if y < 0:
                y = tag.y0
        x = max(0, min(x, width - tag_w))
        y = max(0, min(y, height - tag_h))
        draw.rectangle([x, y, x + tag_w - 1, y + tag_h - 1], fill=tag.color)
        draw.text(
            (x + pad - left_bearing, y + pad - top), tag.text, fill=_contrast(tag.color), font=font
        )


def _numbered(label: str, count: int) -> list[str]:
    if count <= 1:
        return [label]
    prefix = f"{label} " if label else ""
    return [f"{prefix}#{i}" for i in range(1, count + 1)]


# ---------------------------------------------------------------- shapes


def _check_image(image: Image.Image) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(
            f"draw on an RGB or RGBA image, got mode {image.mode!r} (use .convert('RGB'))"
        )


def _boxes(
    image: Image.Image,
    boxes: Sequence[tuple[float, float, float, float]],
    label: str,
    color: RGB,
    tags: list[_Tag],
) -> None:
    width, height = image.size
    style = _style(width, height)
    draw = ImageDraw.Draw(image)
    pixels = [box_to_pixels((box[0], box[1], box[2], box[3]), width, height) for box in boxes]
    order = reading_order(pixels)
    texts = _numbered(label, len(pixels))
    for text, index in zip(texts, order):
        x0f, y0f, x1f, y1f = pixels[index]
        x0, y0 = min(round(x0f), width - 1), min(round(y0f), height - 1)
        x1, y1 = max(x0, round(x1f) - 1), max(y0, round(y1f) - 1)
        # The stroke lies inside the box, so boxes on the image border stay whole.
        draw.rectangle([x0, y0, x1, y1], outline=color, width=style.line_width)
        tags.append(_Tag(text, color, "box", x0, y0, x1, y1))


def _points(
    image: Image.Image,
    points: Sequence[tuple[float, float]],
    label: str,
    color: RGB,
    tags: list[_Tag],
) -> None:
    width, height = image.size
    style = _style(width, height)
    draw = ImageDraw.Draw(image)
    pixels = [point_to_pixels((point[0], point[1]), width, height) for point in points]
    order = points_reading_order(pixels, width, height)
    texts = _numbered(label, len(pixels))
    r = style.dot_radius
    for text, index in zip(texts, order):
        x, y = pixels[index]
        cx, cy = min(int(x), width - 1), min(int(y), height - 1)
        draw.ellipse(
            [cx - r, cy - r, cx + r, cy + r],
            fill=color,
            outline=_contrast(color),
            width=style.ring_width,
        )
        tags.append(_Tag(text, color, "point", cx - r, cy - r, cx + r, cy + r))


def _grow(mask: Image.Image, steps: int, *, shrink: bool = False) -> Image.Image:
    """Dilate (or erode) a 0/255 mask by ``steps`` pixels (square neighbourhood).

    A box blur of radius ``steps`` is nonzero wherever the window touches the mask and
    255 only where the window lies inside it; unlike rank filters it costs the same at
    any radius.
    """
    if steps <= 0:
        return mask
    blurred = mask.filter(ImageFilter.BoxBlur(steps))
    if shrink:
        return blurred.point(lambda v: 255 if v >= 255 else 0)
    return blurred.point(lambda v: 255 if v > 0 else 0)


def _mask(
    image: Image.Image,
    mask: Image.Image,
    label: str,
    rings: Sequence[Sequence[tuple[float, float]]],
    color: RGB,
    opacity: float,
    tags: list[_Tag],
) -> None:
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask must be a PIL image, got {type(mask).__name__}")
    if mask.size != image.size:
        raise ValueError(
            f"mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}:"
            " they must be the same size"
        )
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0..1, got {opacity}")
    alpha = mask if mask.mode == "L" else mask.convert("L")
    bbox = alpha.getbbox()
    if bbox is None:
        return  # an empty mask: nothing to draw
    style = _style(*image.size)
    # Translucent fill, only over the mask's bounding box.
    region = image.crop(bbox)
    tinted = Image.blend(region, Image.new(image.mode, region.size, color), opacity)
    region.paste(tinted, (0, 0), alpha.crop(bbox))
    image.paste(region, bbox[:2])
    # Solid outline: the rings as closed lines, or else the mask's own border.
    drawn = [ring for ring in rings if len(ring) >= 2]
    if drawn:
        draw = ImageDraw.Draw(image)
        for ring in drawn:
            xy = [(float(x), float(y)) for x, y in ring]
            if xy[0] != xy[-1]:
                xy.append(xy[0])
            draw.line(xy, fill=color, width=style.line_width, joint="curve")
    else:
        grow = (style.line_width + 1) // 2
        margin = grow + 1
        box = (
            max(0, bbox[0] - margin),
            max(0, bbox[1] - margin),
            min(image.width, bbox[2] + margin),
            min(image.height, bbox[3] + margin),
        )
        local = alpha.crop(box).point(lambda v: 255 if v >= 128 else 0)
        outer = _grow(local, grow)
        inner = _grow(local, style.line_width - grow, shrink=True)
        border = ImageChops.subtract(outer, inner)
        image.paste(Image.new(image.mode, border.size, color), box[:2], border)
    tags.append(_Tag(label, color, "box", bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1))


# ---------------------------------------------------------------- public building blocks


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[tuple[float, float, float, float]],
    label: str,
    *,
    color: Color | None = None,
) -> None:
    """Draw normalized ``(x_min, y_min, x_max, y_max)`` boxes on ``image``, in place.

    Each box gets an outline and a filled tag with ``label`` at its top-left corner
    (above the box, or inside it when the box touches the top of the image); several
    boxes are numbered ``#1``, ``#2``, ... in reading order. ``color`` defaults to
    :func:`color_for(label) <color_for>`. ``image`` must be RGB or RGBA.
    """
    _check_image(image)
    tags: list[_Tag] = []
    _boxes(image, boxes, label, _rgb(color, label), tags)
    _draw_tags(image, tags)


def draw_points(
    image: Image.Image,
    points: Sequence[tuple[float, float]],
    label: str,
    *,
    color: Color | None = None,
) -> None:
    """Draw normalized ``(x, y)`` points on ``image`` as filled dots, in place.

    Each dot has a black or white ring (whichever contrasts with ``color``) and a tag
    beside it; several points are numbered in reading order. ``color`` defaults to
    :func:`color_for(label) <color_for>`. ``image`` must be RGB or RGBA.
    """
    _check_image(image)
    tags: list[_Tag] = []
    _points(image, points, label, _rgb(color, label), tags)
    _draw_tags(image, tags)


def draw_mask(
    image: Image.Image,
    mask: Image.Image,
    label: str,
    *,
    rings: Sequence[Sequence[tuple[float, float]]] = (),
    color: Color | None = None,
    opacity: float = 0.4,
) -> None:
    """Draw a mask on ``image`` in place: a translucent fill, a solid outline and a tag.

    ``mask`` is a ``"1"`` or ``"L"`` image the size of ``image`` (nonzero = inside;
    ``"L"`` values act as partial coverage). Inside pixels become
    ``(1 - opacity) * pixel + opacity * color``. ``rings`` are outline polygons in pixels
    of ``image`` (e.g. ``Segmentation.rings(size)``), drawn as closed lines; without
    rings the mask's own border is outlined. The tag sits at the mask's top-left.
    """
    _check_image(image)
    tags: list[_Tag] = []
    _mask(image, mask, label, rings, _rgb(color, label), opacity, tags)
    _draw_tags(image, tags)


# ---------------------------------------------------------------- annotate


def _load(image: RenderImage) -> Image.Image:
    """A new, upright RGB copy of ``image`` (EXIF orientation applied)."""
    settings = ImageSettings()
    source: bytes | Image.Image
    if isinstance(image, Image.Image):
        source = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        source = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        source = read_image_file(os.fspath(image), settings)
    else:
        raise TypeError(
            f"annotate() takes a PIL image, a path or encoded bytes, got {type(image).__name__}"
        )
    result, _ = decode_image(source, settings)
    if result is image:  # already upright RGB: never draw on the caller's image
        result = result.copy()
    return result


def _assign_colors(labels: Sequence[str]) -> dict[str, RGB]:
    """``color_for`` each label, moving a later label to the next free color on a clash."""
    colors: dict[str, RGB] = {}
    used: set[int] = set()
    for label in labels:
        key = label.strip().casefold()
        if key in colors:
            continue
        index = _palette_index(label)
        if len(used) < len(PALETTE):
            while index in used:
                index = (index + 1) % len(PALETTE)
        used.add(index)
        colors[key] = PALETTE[index]
    return colors


_Result = Union[Detections, Points, Segmentation]


def annotate(
    image: RenderImage,
    *results: _Result,
    labels: Sequence[str | None] | None = None,
    mask_opacity: float = 0.4,
) -> Image.Image:
    """Draw ``results`` on a new RGB copy of ``image`` and return it.

    Args:
        image: a PIL image, a path or encoded bytes. Its EXIF orientation is applied,
            so the result is upright and the size of the oriented image. The input is
            never modified. It may be a resized copy of the image the results came from.
        results: any number of :class:`~moondream_tools.results.Detections`,
            :class:`~moondream_tools.results.Points` and
            :class:`~moondream_tools.results.Segmentation` (one without a mask is skipped).
        labels: one label per result, overriding its ``object``; ``None`` entries keep
            the default (the result's ``object``, or ``"object"``).
        mask_opacity: opacity of mask fills, 0..1.

    Masks are drawn first, then boxes, then points, then every label on top.

    Raises:
        ImageError: the image cannot be read.
        TypeError: a result is not one of the types above.
        ValueError: ``labels`` does not have one entry per result.
    """
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"got {len(labels)} labels for {len(results)} results")
    if not 0.0 <= mask_opacity <= 1.0:
        raise ValueError(f"mask_opacity must be within 0..1, got {mask_opacity}")
    for result in results:
        if not isinstance(result, (Detections, Points, Segmentation)):
            raise TypeError(
                f"annotate() draws Detections, Points and Segmentation, got {type(result).__name__}"
            )
    names: list[str] = []
    for i, result in enumerate(results):
        name = labels[i] if labels is not None else None
        if name is None:
            name = getattr(result, "object", None) or "object"
        names.append(name)

    canvas = _load(image)
    size = canvas.size
    palette = _assign_colors(names)
    colors = [palette[name.strip().casefold()] for name in names]
    drawn = list(zip(results, names, colors))
    tags: list[_Tag] = []
    for result, name, color in drawn:
        if isinstance(result, Segmentation) and result.found:
            mask = result.mask("L", size=size)
            _mask(canvas, mask, name, result.rings(size), color, mask_opacity, tags)
    for result, name, color in drawn:
        if isinstance(result, Detections):
            boxes = [(b.x_min, b.y_min, b.x_max, b.y_max) for b in result.objects]
            _boxes(canvas, boxes, name, color, tags)
    for result, name, color in drawn:
        if isinstance(result, Points):
            _points(canvas, [(p.x, p.y) for p in result.points], name, color, tags)
    _draw_tags(canvas, tags)
    return canvas


def annotate_png(
    image: RenderImage,
    *results: _Result,
    labels: Sequence[str | None] | None = None,
    mask_opacity: float = 0.4,
) -> bytes:
    """:func:`annotate` encoded as PNG bytes (e.g. to hand to a multimodal model)."""
    canvas = annotate(image, *results, labels=labels, mask_opacity=mask_opacity)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
