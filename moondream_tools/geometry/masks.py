"""Mask images: a service's mask PNG -> a clean binary mask -> exact outline rings.

Some backends answer with mask *images* instead of SVG paths. :func:`binary_mask`
turns whatever arrived (mode "1", "L", "P", "LA", "RGB", "RGBA", "I", "I;16") into a
mode "L" image with only 0 and 255, refusing pictures that are not masks;
:func:`mask_union`, :func:`mask_area` and :func:`mask_bbox` combine and measure masks;
:func:`mask_to_rings` traces the exact outline along pixel edges, so that
:func:`~moondream_tools.geometry.rasterize` gives the mask back pixel for pixel;
:func:`scale_rings` and :func:`rings_to_path` carry the rings to another image size
or to Moondream's path form (normalized to a box).

Example::

    >>> from PIL import Image
    >>> from moondream_tools.geometry import rasterize, ring_area
    >>> cutout = Image.new("RGBA", (6, 4), (255, 0, 0, 0))          # transparent red
    >>> cutout.paste((255, 0, 0, 255), (1, 1, 5, 4))                 # opaque where inside
    >>> cutout.paste((255, 0, 0, 0), (2, 2, 4, 3))                   # with a hole
    >>> mask = binary_mask(cutout)
    >>> mask.mode, mask_area(mask), mask_bbox(mask)
    ('L', 10, (1, 1, 5, 4))
    >>> rings = mask_to_rings(mask)
    >>> rings
    [[(1.0, 1.0), (5.0, 1.0), (5.0, 4.0), (1.0, 4.0)], [(2.0, 2.0), (2.0, 3.0), (4.0, 3.0), (4.0, 2.0)]]
    >>> [ring_area(r) for r in rings]                                # outer > 0, hole < 0
    [12.0, -2.0]
    >>> rasterize(rings, 6, 4, mode="L").tobytes() == mask.tobytes()
    True

Ring orientation (image coordinates, y down): outer boundaries run clockwise on screen
(right along their top edge), so :func:`~moondream_tools.geometry.ring_area` is
positive; holes run the other way (negative area). The mask is always on the right
of the direction of travel. This is the GeoJSON convention (exterior positive) once
the coordinates are read as plain (x, y).

Pure Python + Pillow: the edges are found with Pillow operations and a bytes regex,
then linked in Python; no numpy needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image, ImageChops

from .rings import Ring
from .rle import _mask_bytes

_RUN_RE = re.compile(rb"\xff+")
_THRESHOLD_LUT = [0] * 128 + [255] * 128
# What "near-binary" tolerates: at most 1% of the pixels strictly between these values
# (anti-aliased edges, compression noise), and at most 1% colour pixels.
_LOW, _HIGH = 32, 223
_COLOUR_SPREAD = 16
_MAX_FRACTION = 0.01
_CONVERT = {
    "P": None,  # RGBA when it has transparency, else RGB
    "PA": "RGBA",
    "La": "LA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
}


def _describe(mode: str) -> str:
    article = "an" if mode[:1] in tuple("AEFHILMNORSX") else "a"
    return f"{article} {mode} image"


def _percent(count: int, total: int) -> str:
    pct = 100.0 * count / total
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"


def _not_a_mask(mode: str, size: tuple[int, int], count: int, total: int, what: str) -> ValueError:
    return ValueError(
        f"not a mask: {_describe(mode)} with {_percent(count, total)} {what} "
        f"({size[0]}x{size[1]})"
    )


def _constant(image: Image.Image, where: Image.Image) -> bool:
    """Whether every band of ``image`` has a single value over the pixels where ``where`` != 0."""
    hist = image.histogram(mask=where)
    return all(sum(1 for n in hist[k : k + 256] if n) <= 1 for k in range(0, len(hist), 256))


def binary_mask(image: Image.Image) -> Image.Image:
    """A mask image as a service sends it -> mode "L", 0 outside and 255 inside, same size.

    Accepts modes "1", "L", "P", "LA", "RGB", "RGBA", "I" and "I;16" (and the close
    relatives "PA", "La", "RGBa", "RGBX", "I;16B", "I;16L"). A pixel is inside when its
    gray value is >= 128. 16-bit images ("I;16", and "I" whose values exceed 255) are
    read as 0..65535, i.e. inside from 32768 on; an "I" image with values in 0..255 is
    read as 8-bit. When an image has an alpha channel that is not fully opaque and its
    colour is the same wherever it is not transparent (a cut-out or overlay), the alpha
    channel is the mask instead.

    A mask must be near-binary: ``ValueError`` when more than 1% of the pixels are
    strictly between 32 and 223 (after conversion to gray, or in the alpha channel
    when that is used), or when more than 1% of the pixels of a colour image have
    R, G, B values more than 16 apart (a colour picture). Refused images are named
    with their mode and size; unsupported modes (e.g. "CMYK", "F") are refused too.

    >>> from PIL import Image
    >>> gray = Image.new("L", (4, 1)); gray.putdata([0, 20, 230, 255])
    >>> list(binary_mask(gray).tobytes())
    [0, 0, 255, 255]
    >>> binary_mask(Image.new("RGB", (64, 48), (200, 40, 40)))
    Traceback (most recent call last):
    ...
    ValueError: not a mask: an RGB image with 100% colour pixels (64x48)
    >>> binary_mask(Image.linear_gradient("L"))
    Traceback (most recent call last):
    ...
    ValueError: not a mask: an L image with 74% gray pixels (256x256)
    """
    mode = image.mode
    size = image.size
    total = size[0] * size[1]
    if mode == "1":
        return image.convert("L")
    if mode == "L":  # the usual answer: already 0/255, nothing to convert or check
        histogram = image.histogram()
        if histogram[0] + histogram[255] == total:
            return image
    work = image
    if mode in _CONVERT:
        target = _CONVERT[mode]
        if target is None:
            target = "RGBA" if image.has_transparency_data else "RGB"
        work = image.convert(target)
    elif mode.startswith("I;16"):
        work = image.convert("I")
    if work.mode == "I":
        high = work.getextrema()[1] if total else 0
        if isinstance(high, (int, float)) and high > 255:
            # 16-bit values: gray = round(v / 257), so inside is v >= 32768.
            work = work.point(lambda v: v / 257 + 0.5)
        gray = work.convert("L")  # clips to 0..255
        what = "gray pixels"
    elif work.mode in ("L", "LA", "RGB", "RGBA"):
        color = work
        gray = None
        what = "gray pixels"
        if work.mode in ("LA", "RGBA"):
            alpha = work.getchannel("A")
            color = work.convert(work.mode[:-1])
            low = alpha.getextrema()[0] if total else 255
            if isinstance(low, int) and low < 255 and _constant(color, alpha):
                gray = alpha
                what = "partly transparent pixels"
        if gray is None:
            if color.mode == "RGB":
                r, g, b = color.split()
                spread = ImageChops.lighter(
                    ImageChops.lighter(ImageChops.difference(r, g), ImageChops.difference(g, b)),
                    ImageChops.difference(r, b),
                )
                coloured = sum(spread.histogram()[_COLOUR_SPREAD + 1 :])
                if coloured > _MAX_FRACTION * total:
                    raise _not_a_mask(mode, size, coloured, total, "colour pixels")
                gray = color.convert("L")
            else:
                gray = color
    else:
        raise ValueError(
            f"not a mask: {_describe(mode)} (unsupported mode {mode!r}) ({size[0]}x{size[1]})"
        )
    between = sum(gray.histogram()[_LOW + 1 : _HIGH])
    if between > _MAX_FRACTION * total:
        raise _not_a_mask(mode, size, between, total, what)
    return gray.point(_THRESHOLD_LUT)


def mask_union(masks: Sequence[Image.Image]) -> Image.Image:
    """The union of binary masks (modes "1" or "L", nonzero = inside) as a 0/255 mode "L" mask.

    All masks must have the same size; ``ValueError`` otherwise, or when there are none.

    >>> from PIL import Image
    >>> a = Image.new("1", (4, 1)); a.putpixel((0, 0), 1)
    >>> b = Image.new("L", (4, 1)); b.putpixel((2, 0), 7)
    >>> list(mask_union([a, b]).tobytes())
    [255, 0, 255, 0]
    """
    if not masks:
        raise ValueError("mask_union needs at least one mask")
    size = masks[0].size
    result: Image.Image | None = None
    for mask in masks:
        if mask.size != size:
            raise ValueError(
                f"masks must have the same size: {mask.size[0]}x{mask.size[1]} "
                f"!= {size[0]}x{size[1]}"
            )
        data = _mask_bytes(mask)
        result = data if result is None else ImageChops.lighter(result, data)
    assert result is not None
    return result


def mask_area(mask: Image.Image) -> int:
    """Pixels set in a binary mask (mode "1" or "L", nonzero = inside).

    >>> from PIL import Image
    >>> mask = Image.new("L", (10, 10)); mask.paste(255, (2, 2, 5, 4))
    >>> mask_area(mask)
    6
    """
    if mask.mode not in ("1", "L"):
        raise ValueError(f"mask mode must be '1' or 'L', got {mask.mode!r}")
    return mask.size[0] * mask.size[1] - mask.histogram()[0]


def mask_bbox(mask: Image.Image) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the set pixels (``x1``, ``y1`` exclusive), None when empty.

    >>> from PIL import Image
    >>> mask = Image.new("L", (10, 10)); mask.paste(255, (2, 2, 5, 4))
    >>> mask_bbox(mask), mask_bbox(Image.new("1", (3, 3)))
    ((2, 2, 5, 4), None)
    """
    if mask.mode not in ("1", "L"):
        raise ValueError(f"mask mode must be '1' or 'L', got {mask.mode!r}")
    box = mask.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return (int(x0), int(y0), int(x1), int(y1))


def mask_to_rings(mask: Image.Image) -> list[Ring]:
    """Exact outline rings of a binary mask (mode "1" or "L", nonzero = inside).

    Rings run along pixel edges (integer corners, as floats) and hold only their
    corners. ``rasterize(mask_to_rings(m), w, h)`` gives ``m`` back pixel for pixel,
    whatever its shape: holes, islands in holes, pixels touching diagonally, the image
    border. Outer boundaries have positive :func:`~moondream_tools.geometry.ring_area`
    (clockwise on screen), holes negative, so
    :func:`~moondream_tools.geometry.nest_rings` groups them into polygons.

    Every ring is simple: no ring passes through a point twice. Where two pixels touch
    only at a corner, their outlines meet at that corner but belong to different rings
    (two diagonal pixels are two squares; two diagonal holes are two holes). Each ring
    starts at its top-left corner (the first point in reading order); rings are sorted
    by that point.

    >>> from PIL import Image
    >>> mask = Image.new("L", (3, 2)); mask.putdata([255, 0, 0, 0, 255, 255])
    >>> mask_to_rings(mask)
    [[(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)], [(1.0, 1.0), (3.0, 1.0), (3.0, 2.0), (1.0, 2.0)]]
    >>> mask_to_rings(Image.new("1", (5, 5)))
    []
    """
    data = _mask_bytes(mask)
    box = data.getbbox()
    if box is None:
        return []
    ox, oy, x1, y1 = box
    w, h = x1 - ox, y1 - oy
    stride = w + 2  # vertex (x, y) of the cropped mask is the key y * stride + x
    height2 = h + 2
    # The cropped mask with a 1-pixel empty border: runs never span two rows, and
    # offset() wraps around only empty pixels.
    padded = Image.new("L", (stride, height2), 0)
    padded.paste(data.crop(box), (1, 1))
    subtract = ImageChops.subtract
    offset = ImageChops.offset
    transpose = Image.Transpose.TRANSPOSE
    # Boundary pixels of each kind, as maximal runs: a run has no vertex inside it.
    top = subtract(padded, offset(padded, 0, 1)).tobytes()  # outside above
    bottom = subtract(padded, offset(padded, 0, -1)).tobytes()  # outside below
    left = subtract(padded, offset(padded, 1, 0)).transpose(transpose).tobytes()
    right = subtract(padded, offset(padded, -1, 0)).transpose(transpose).tobytes()

    # Directed edges, inside on the right: top edges go right, bottom edges left, left
    # edges up, right edges down. A vertex has one out-edge, or two at a saddle (two
    # pixels touching at a corner): the second one waits in `extra`.
    out: dict[int, int] = {}
    extra: dict[int, int] = {}

    def add(a: int, b: int) -> None:
        if a in out:
            extra[a] = b
        else:
            out[a] = b

    shift = stride + 1
    for m in _RUN_RE.finditer(top):
        add(m.start() - shift, m.end() - shift)
    for m in _RUN_RE.finditer(bottom):
        add(m.end() - 1, m.start() - 1)
    for m in _RUN_RE.finditer(left):
        i, s = divmod(m.start(), height2)
        e = m.end() - i * height2
        add((e - 1) * stride + i - 1, (s - 1) * stride + i - 1)
    for m in _RUN_RE.finditer(right):
        i, s = divmod(m.start(), height2)
        e = m.end() - i * height2
        add((s - 1) * stride + i, (e - 1) * stride + i)

    found: list[list[int]] = []
    for start in sorted(out):
        while start in out:
            # Follow edges until back at the start. At a saddle, turn right (keep to the
            # pixel on the right); arriving again at a saddle already on the path closes
            # the loop since then, which keeps every ring simple.
            path = [start]
            marks = {start: 0}  # index in path of the start and of saddles on it
            nxt = out[start]
            alt = extra.pop(start, None)
            if alt is None:
                del out[start]
            else:
                if alt < nxt:
                    nxt, alt = alt, nxt
                out[start] = alt
            prev, cur = start, nxt
            while True:
                i = marks.get(cur)
                if i is not None:
                    found.append(path[i:])
                    if i == 0:
                        break
                    for key in path[i + 1 :]:
                        marks.pop(key, None)
                    del path[i + 1 :]
                else:
                    if cur in extra:
                        marks[cur] = len(path)
                    path.append(cur)
                nxt = out[cur]
                alt = extra.pop(cur, None)
                if alt is None:
                    del out[cur]
                else:
                    d = cur - prev
                    # Right turn: after going right, down (larger key); left: up;
                    # down: left (smaller key); up: right.
                    want_larger = (d > 0) == (-stride < d < stride)
                    if (alt > nxt) == want_larger:
                        nxt, alt = alt, nxt
                    out[cur] = alt
                prev, cur = cur, nxt

    keyed = []
    for keys in found:
        k = keys.index(min(keys))
        if k:
            keys = keys[k:] + keys[:k]
        keyed.append((keys[0], keys[1], keys))
    keyed.sort()
    rings: list[Ring] = []
    for _, _, keys in keyed:
        ring: Ring = []
        add_point = ring.append
        for key in keys:
            y, x = divmod(key, stride)
            add_point((float(x + ox), float(y + oy)))
        rings.append(ring)
    return rings


def scale_rings(rings: Sequence[Ring], sx: float, sy: float) -> list[Ring]:
    """Rings with every point scaled: ``(x * sx, y * sy)``, e.g. from a mask's size to the image's.

    Use ``sx = image_width / mask_width`` (``sy`` likewise). Positive factors keep the
    orientation; a negative one mirrors the rings and reverses their orientation.

    >>> scale_rings([[(0.0, 0.0), (2.0, 0.0), (2.0, 1.0)]], 1.5, 10)
    [[(0.0, 0.0), (3.0, 0.0), (3.0, 10.0)]]
    """
    fx, fy = float(sx), float(sy)
    return [[(x * fx, y * fy) for x, y in ring] for ring in rings]


def _number(v: float) -> str:
    text = f"{v:.7g}"
    return "0" if text == "-0" else text


def rings_to_path(rings: Sequence[Ring], box: tuple[float, float, float, float]) -> str:
    """SVG path data for rings, with coordinates normalized to the pixel ``box``.

    ``box = (x_min, y_min, x_max, y_max)`` in the rings' pixels (e.g. :func:`mask_bbox`);
    this is Moondream's segment form: with the box normalized to the image
    (:func:`~moondream_tools.geometry.pixels_to_box`),
    :func:`~moondream_tools.geometry.segment_rings` maps the path back to these rings
    (to about 1e-6 of the box size, 7 significant digits). One ``M ... Z`` subpath per
    ring; rings with fewer than 3 points are skipped. ``ValueError`` for an empty box.

    >>> rings_to_path([[(10.0, 20.0), (30.0, 20.0), (30.0, 60.0), (10.0, 60.0)]], (10, 20, 30, 60))
    'M0,0L1,0L1,1L0,1Z'
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    if not bw > 0 or not bh > 0:
        raise ValueError(f"box must have a positive width and height, got {tuple(box)!r}")
    parts: list[str] = []
    for ring in rings:
        if len(ring) < 3:
            continue
        points = "L".join(f"{_number((x - x0) / bw)},{_number((y - y0) / bh)}" for x, y in ring)
        parts.append(f"M{points}Z")
    return "".join(parts)
