"""moondream_tools.render: annotated images, checked pixel by pixel."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from moondream_tools.errors import ImageError
from moondream_tools.geometry import reading_order
from moondream_tools.render import (
    PALETTE,
    _contrast,
    annotate,
    annotate_png,
    color_for,
    draw_boxes,
    draw_mask,
    draw_points,
)
from moondream_tools.results import Box, Caption, Detections, ImageSize, Point, Points, Segmentation

GRAY = (128, 128, 128)
REPO = Path(__file__).resolve().parents[2]


def gray(width: int = 640, height: int = 480, value: tuple[int, int, int] = GRAY) -> Image.Image:
    return Image.new("RGB", (width, height), value)


def detections(*boxes: tuple[float, float, float, float], size: tuple[int, int] = (640, 480)) -> Detections:
    return Detections(
        objects=[Box(x_min=b[0], y_min=b[1], x_max=b[2], y_max=b[3]) for b in boxes],
        image_size=ImageSize(width=size[0], height=size[1]),
    )


def points(*pts: tuple[float, float], size: tuple[int, int] = (640, 480)) -> Points:
    return Points(
        points=[Point(x=x, y=y) for x, y in pts], image_size=ImageSize(width=size[0], height=size[1])
    )


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 1) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def count_color(img: Image.Image, color: tuple[int, int, int], xs: range, y: int) -> int:
    return sum(1 for x in xs if img.getpixel((x, y)) == color)


def has_field(model: type, name: str) -> bool:
    return name in model.model_fields


# ---------------------------------------------------------------- colors


def test_color_for_is_stable_across_processes() -> None:
    labels = ["red car", "person", "dog", "Ünïcode label"]
    here = [color_for(label) for label in labels]
    code = (
        "from moondream_tools.render import color_for;"
        f"print([color_for(l) for l in {labels!r}])"
    )
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == repr(here)


def test_color_for_spreads_labels_over_the_palette() -> None:
    labels = [f"object {i}" for i in range(40)] + ["car", "person", "dog", "cat", "tree", "road"]
    colors = {color_for(label) for label in labels}
    assert colors <= set(PALETTE)
    assert len(colors) >= len(PALETTE) - 2
    assert color_for("Car ") == color_for("car")
    assert 12 <= len(PALETTE) <= 20 and len(set(PALETTE)) == len(PALETTE)


def test_contrast_text_color() -> None:
    assert _contrast((255, 225, 25)) == (0, 0, 0)  # yellow -> black text
    assert _contrast((145, 30, 180)) == (255, 255, 255)  # purple -> white text


# ---------------------------------------------------------------- boxes


def test_box_outline_interior_and_tag() -> None:
    img = gray()
    out = annotate(img, detections((0.25, 0.25, 0.75, 0.75)), labels=["car"])
    c = color_for("car")
    assert out.mode == "RGB" and out.size == (640, 480)
    # box in pixels: x 160..480, y 120..360 (stroke inside the box)
    for xy in [(160, 240), (479, 240), (320, 120), (320, 359)]:
        assert out.getpixel(xy) == c, xy
    # interior far from the tag, and far outside: untouched
    for xy in [(320, 240), (400, 300), (20, 460), (620, 20), (320, 400)]:
        assert out.getpixel(xy) == GRAY, xy
    # the tag sits just above the top-left corner, filled with the color ...
    assert out.getpixel((161, 118)) == c
    # ... holds text in the contrasting color ...
    tag = out.crop((160, 95, 230, 120))
    text = _contrast(c)
    assert any(tag.getpixel((x, y)) == text for x in range(tag.width) for y in range(tag.height))
    # ... and does not spill into the box
    assert out.getpixel((165, 130)) == GRAY


def test_box_touching_top_edge_keeps_tag_inside_image() -> None:
    out = annotate(gray(), detections((0.1, 0.0, 0.5, 0.5)), labels=["car"])
    c = color_for("car")
    # x 64..320, y 0..240; the 2 px stroke covers rows 0-1 and columns 64-65
    assert out.getpixel((192, 0)) == c and out.getpixel((64, 120)) == c
    # the tag is drawn inside the box, at its top-left: no gray just below the stroke there
    patch = out.crop((66, 2, 76, 8))
    pixels = [patch.getpixel((x, y)) for x in range(patch.width) for y in range(patch.height)]
    assert GRAY not in pixels
    assert c in pixels
    # the rest of the interior is untouched
    assert out.getpixel((192, 120)) == GRAY


def test_box_at_bottom_right_corner_keeps_tag_inside() -> None:
    out = annotate(gray(), detections((0.9, 0.95, 1.0, 1.0)), labels=["a very long label for a tiny box"])
    c = color_for("a very long label for a tiny box")
    # the tag is shifted left so it ends at the right border, above the box
    assert out.getpixel((639, 450)) == c
    assert out.getpixel((639, 479)) == c


def test_draw_boxes_in_place_with_explicit_color() -> None:
    img = gray(200, 100)
    assert draw_boxes(img, [(0.5, 0.5, 1.0, 1.0)], "x", color=(1, 2, 3)) is None
    assert img.getpixel((100, 75)) == (1, 2, 3)
    assert img.getpixel((199, 75)) == (1, 2, 3)
    draw_boxes(img, [(0.0, 0.5, 0.2, 1.0)], "y", color="#ff0000")
    assert img.getpixel((0, 75)) == (255, 0, 0)
    with pytest.raises(ValueError, match="RGB"):
        draw_boxes(Image.new("L", (10, 10)), [(0, 0, 1, 1)], "x")


def test_same_label_same_color_and_distinct_labels_distinct_colors() -> None:
    # two labels that hash to the same palette color still get different colors in one image
    first = "label 0"
    second = next(f"label {i}" for i in range(1, 500) if color_for(f"label {i}") == color_for(first))
    out = annotate(
        gray(),
        detections((0.05, 0.2, 0.3, 0.4), (0.05, 0.6, 0.3, 0.8)),
        detections((0.6, 0.2, 0.9, 0.8)),
        labels=[first, second],
    )
    a1 = out.getpixel((32, 144))  # left edge, first box
    a2 = out.getpixel((32, 336))  # left edge, second box of the same label
    b = out.getpixel((384, 240))  # left edge of the other label's box
    assert a1 == a2 == color_for(first)
    assert b != a1 and b in PALETTE


def test_reading_order_rows_then_columns() -> None:
    boxes = [
        (300, 12, 400, 60),  # row 1, right (slightly lower than its neighbour)
        (10, 200, 100, 260),  # row 2, left
        (10, 10, 100, 58),  # row 1, left
        (200, 205, 300, 255),  # row 2, right
    ]
    assert reading_order(boxes) == [2, 0, 1, 3]
    assert reading_order([]) == []


# ---------------------------------------------------------------- points


def test_point_dot_ring_and_label() -> None:
    out = annotate(gray(), points((0.5, 0.5)), labels=["person"])
    c = color_for("person")
    assert out.getpixel((320, 240)) == c
    # the dot's ring contrasts with its fill
    dot = out.crop((310, 230, 331, 251))
    assert _contrast(c) in {dot.getpixel((x, y)) for x in range(dot.width) for y in range(dot.height)}
    # the label tag is beside the dot, on the right
    right = out.crop((326, 235, 360, 246))
    assert c in {right.getpixel((x, y)) for x in range(right.width) for y in range(right.height)}
    # absent at a distance
    for xy in [(320, 300), (260, 240), (320, 180), (500, 400)]:
        assert out.getpixel(xy) == GRAY, xy


def test_point_at_right_border_puts_label_on_the_left() -> None:
    img = gray()
    draw_points(img, [(1.0, 0.5), (0.1, 0.1)], "p", color=(0, 0, 255))
    assert img.getpixel((639, 240)) == (0, 0, 255)
    assert img.getpixel((64, 48)) == (0, 0, 255)
    left = img.crop((560, 235, 630, 246))
    assert (0, 0, 255) in {left.getpixel((x, y)) for x in range(left.width) for y in range(left.height)}


# ---------------------------------------------------------------- masks


def circle(size: tuple[int, int], centre: tuple[int, int], radius: int) -> tuple[Image.Image, list[tuple[float, float]]]:
    mask = Image.new("L", size, 0)
    cx, cy = centre
    ImageDraw.Draw(mask).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    ring = [
        (cx + radius * math.cos(2 * math.pi * k / 120), cy + radius * math.sin(2 * math.pi * k / 120))
        for k in range(120)
    ]
    return mask, ring


@pytest.mark.parametrize("opacity", [0.4, 0.7])
def test_mask_blend_outline_and_outside(opacity: float) -> None:
    base = gray(400, 300, (100, 100, 100))
    img = base.copy()
    mask, ring = circle(img.size, (200, 160), 60)
    c = color_for("ball")
    draw_mask(img, mask, "ball", rings=[ring], opacity=opacity)
    expected = tuple(round(100 * (1 - opacity) + v * opacity) for v in c)
    for xy in [(200, 160), (200, 200), (170, 150), (230, 180)]:
        assert close(img.getpixel(xy), expected, 1), (xy, img.getpixel(xy), expected)
    for xy in [(260, 160), (140, 160), (200, 220)]:  # on the ring
        assert img.getpixel(xy) == c, xy
    for xy in [(20, 280), (380, 20), (200, 250), (300, 160)]:
        assert img.getpixel(xy) == (100, 100, 100), xy
    # the tag at the mask's top-left (above its bbox: x 140.., y ..100)
    assert img.getpixel((141, 98)) == c


def test_mask_without_rings_outlines_its_own_border() -> None:
    img = gray(400, 300, (100, 100, 100))
    mask, _ = circle(img.size, (200, 160), 60)
    c = color_for("ball")
    draw_mask(img, mask.convert("1"), "ball")
    assert count_color(img, c, range(250, 270), 160) >= 2  # right edge of the circle
    assert count_color(img, c, range(130, 150), 160) >= 2  # left edge
    assert close(img.getpixel((200, 170)), tuple(round(60 + v * 0.4) for v in c), 1)
    assert img.getpixel((300, 160)) == (100, 100, 100)


def test_mask_errors_and_empty_mask() -> None:
    img = gray(100, 100)
    with pytest.raises(ValueError, match="mask is"):
        draw_mask(img, Image.new("L", (50, 50), 255), "x")
    with pytest.raises(ValueError, match="opacity"):
        draw_mask(img, Image.new("L", (100, 100), 255), "x", opacity=1.5)
    draw_mask(img, Image.new("L", (100, 100), 0), "x")  # nothing to draw
    assert img.tobytes() == gray(100, 100).tobytes()


@pytest.mark.skipif(
    not hasattr(Segmentation, "mask") or not has_field(Segmentation, "object"),
    reason="Segmentation.mask / .object not available yet",
)
@pytest.mark.parametrize("size", [(640, 480), (320, 240)])
def test_annotate_segmentation(size: tuple[int, int]) -> None:
    seg = Segmentation(
        path="M0,0L1,0L1,1L0,1z",
        bbox=Box(x_min=0.25, y_min=0.25, x_max=0.75, y_max=0.75),
        image_size=ImageSize(width=640, height=480),
        object="square",
    )
    w, h = size  # a resized copy of the 640x480 original draws in its own pixels
    out = annotate(gray(w, h), seg, mask_opacity=0.5)
    c = color_for("square")
    expected = tuple(round(128 * 0.5 + v * 0.5) for v in c)
    assert close(out.getpixel((w // 2, h * 5 // 8)), expected, 1)
    assert out.getpixel((w // 4, h // 2)) == c  # left edge of the square
    assert out.getpixel((w * 3 // 4, h // 2)) == c  # right edge
    assert out.getpixel((w // 8, h * 7 // 8)) == GRAY
    # a segmentation that found nothing draws nothing
    empty = Segmentation(path="", bbox=None, image_size=ImageSize(width=640, height=480))
    assert annotate(gray(w, h), empty).tobytes() == gray(w, h).tobytes()


@pytest.mark.skipif(not has_field(Detections, "object"), reason="Detections.object not available yet")
def test_default_labels_come_from_object() -> None:
    dets = Detections(
        objects=[Box(x_min=0.25, y_min=0.25, x_max=0.75, y_max=0.75)],
        image_size=ImageSize(width=640, height=480),
        object="dog",
    )
    pts = Points(points=[Point(x=0.1, y=0.9)], image_size=ImageSize(width=640, height=480))
    out = annotate(gray(), dets, pts)
    assert out.getpixel((160, 240)) == color_for("dog")
    assert out.getpixel((64, 432)) == color_for("object")  # no object: "object"
    # labels=[...] overrides, None keeps the default
    out = annotate(gray(), dets, pts, labels=["puppy", None])
    assert out.getpixel((160, 240)) == color_for("puppy")
    assert out.getpixel((64, 432)) == color_for("object")


# ---------------------------------------------------------------- inputs and outputs


def oriented_jpeg() -> bytes:
    """A JPEG stored 60x40 with EXIF orientation 6: upright it is 40x60, red top-left."""
    upright = gray(40, 60)
    ImageDraw.Draw(upright).rectangle([0, 0, 9, 9], fill=(255, 0, 0))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["bytes", "path", "pil"])
def test_exif_orientation_applied(kind: str, tmp_path: Path) -> None:
    data = oriented_jpeg()
    if kind == "bytes":
        source: object = data
    elif kind == "path":
        source = tmp_path / "rotated.jpg"
        source.write_bytes(data)
    else:
        source = Image.open(io.BytesIO(data))
        assert source.size == (60, 40)
    dets = detections((0.25, 0.5, 0.75, 0.9), size=(40, 60))
    out = annotate(source, dets, labels=["x"])  # type: ignore[arg-type]
    c = color_for("x")
    assert out.size == (40, 60) and out.mode == "RGB"
    r, g, b = out.getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60  # the red corner is top-left: upright frame
    # box in the upright frame: x 10..30, y 30..54
    assert out.getpixel((10, 42)) == c
    assert out.getpixel((29, 42)) == c
    assert out.getpixel((20, 53)) == c
    assert out.getpixel((20, 42)) != c
    if kind == "pil":
        assert source.size == (60, 40)  # type: ignore[union-attr]


def test_input_not_mutated_and_result_is_new() -> None:
    img = gray()
    before = img.tobytes()
    out = annotate(img, detections((0.1, 0.1, 0.4, 0.5)), points((0.6, 0.6)), labels=["a", "b"])
    assert out is not img
    assert img.tobytes() == before
    assert out.tobytes() != before
    untouched = annotate(img)
    assert untouched is not img and untouched.tobytes() == before


def test_rgba_and_palette_inputs_become_rgb() -> None:
    rgba = Image.new("RGBA", (100, 80), (0, 0, 0, 0))
    out = annotate(rgba, detections((0.0, 0.0, 1.0, 1.0), size=(100, 80)), labels=["z"])
    assert out.mode == "RGB" and out.size == (100, 80)
    assert out.getpixel((50, 40)) == (255, 255, 255)  # transparent flattened onto white
    assert out.getpixel((0, 40)) == color_for("z")
    assert annotate(gray(30, 20).convert("P")).mode == "RGB"


def test_scales_with_image_size() -> None:
    box = (0.25, 0.25, 0.75, 0.75)
    big = annotate(gray(4000, 3000), detections(box, size=(4000, 3000)), labels=["car"])
    small = annotate(gray(320, 240), detections(box, size=(4000, 3000)), labels=["car"])
    c = color_for("car")
    big_stroke = count_color(big, c, range(900, 1100), 1500)  # across the left edge (x=1000)
    small_stroke = count_color(small, c, range(60, 100), 120)  # across the left edge (x=80)
    assert small_stroke >= 2
    assert big_stroke >= 4 * small_stroke

    def tag_height(img: Image.Image, x: int, top: int) -> int:
        return sum(1 for y in range(top) if img.getpixel((x + 1, y)) == c)

    assert tag_height(big, 1000, 750) > 4 * tag_height(small, 80, 60)


def test_annotate_png_matches_annotate() -> None:
    img = gray()
    results = (detections((0.1, 0.1, 0.5, 0.5)), points((0.7, 0.7)))
    png = annotate_png(img, *results, labels=["a", "b"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG"
    expected = annotate(img, *results, labels=["a", "b"])
    assert decoded.convert("RGB").tobytes() == expected.tobytes()


def test_argument_errors() -> None:
    img = gray(50, 50)
    with pytest.raises(ValueError, match="labels"):
        annotate(img, detections((0, 0, 1, 1)), labels=["a", "b"])
    with pytest.raises(TypeError, match="Caption"):
        annotate(img, Caption(caption="hi"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        annotate(12345)  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        annotate(b"not an image")
    with pytest.raises(ImageError):
        annotate("/nonexistent/picture.jpg")
