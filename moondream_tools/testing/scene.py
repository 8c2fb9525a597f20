"""Synthetic scenes with ground truth for the offline Moondream emulator.

A :class:`Scene` is a plain background with flat, saturated shapes on it and,
optionally, lines of black dot-matrix :class:`Text`. It renders to a PIL image,
gives the visible mask of every shape (later shapes occlude earlier ones) and the
ground truth the emulator's engine should find: labels, normalized boxes,
centroids and areas, and the text with its pixel boxes.

>>> scene = Scene.random(seed=7)
>>> image = scene.render()
>>> [t.label for t in scene.truth()]          # doctest: +SKIP
['red circle', 'blue square', ...]
"""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .engine import COLORS, KINDS, PALETTE, phrase_matches
from .text import line_bitmap

__all__ = ["Shape", "ShapeTruth", "Text", "TextTruth", "Scene", "PALETTE", "COLORS", "KINDS"]


@dataclass(frozen=True)
class Shape:
    """A flat shape. ``center`` and ``size`` (diameter or side) are in pixels.

    ``kind`` is one of ``circle``, ``square``, ``triangle`` (isosceles, apex
    up, base = height = size) or ``ring`` (a circle with a background-coloured
    hole of half its diameter).
    """

    kind: str
    color: str
    center: tuple[float, float]
    size: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLORS}")
        if self.size < 2:
            raise ValueError("size must be at least 2 pixels")

    @property
    def label(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.color]

    def box(self) -> tuple[int, int, int, int]:
        """Inclusive integer pixel box (x0, y0, x1, y1) the shape is drawn in."""
        s = max(2, int(round(self.size)))
        x0 = int(round(self.center[0] - s / 2))
        y0 = int(round(self.center[1] - s / 2))
        return x0, y0, x0 + s - 1, y0 + s - 1

    def draw(self, draw: ImageDraw.ImageDraw, fill, hole_fill) -> None:
        x0, y0, x1, y1 = self.box()
        if self.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif self.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif self.kind == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2.0, y0)], fill=fill)
        else:  # ring
            draw.ellipse((x0, y0, x1, y1), fill=fill)
            s = x1 - x0 + 1
            q = s // 4
            if s - 2 * q >= 2:
                draw.ellipse((x0 + q, y0 + q, x1 - q, y1 - q), fill=hole_fill)


@dataclass(frozen=True)
class ShapeTruth:
    """Ground truth of one visible shape, normalized to the image size.

    ``bbox`` = (x_min, y_min, x_max, y_max) of the visible mask with
    x_max = (last column + 1) / W; ``center`` = centroid of the visible mask,
    ((mean column + 0.5) / W, (mean row + 0.5) / H); ``index`` points into
    ``Scene.shapes``.
    """

    kind: str
    color: str
    label: str
    bbox: tuple[float, float, float, float]
    center: tuple[float, float]
    area_px: int
    index: int
    bbox_px: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass(frozen=True)
class Text:
    """A line of black (0, 0, 0) text in the emulator's 5x7 dot-matrix font.

    ``origin`` is the top-left pixel (x, y) of the first glyph cell; ``height`` is the
    glyph height in pixels and must be a positive multiple of 7: each font dot is a
    square of ``height // 7`` pixels (``dot``), glyphs are 5 dots wide with one blank dot
    between them. Characters: A-Z (lower case is printed upper case), 0-9, space and
    ``-.:!?/#%`` (see :data:`moondream_tools.testing.text.FONT`); single spaces between
    words, none at either end, and at least one letter or digit (the emulator takes the
    dot size from their full height). Anything else raises ValueError. The emulator reads
    the line exactly when its dots are at least 3 px in the image it receives.

    >>> t = Text("Exit 12", (10, 20), 21)
    >>> t.dot, t.box()
    (3, (10, 20, 133, 41))
    """

    text: str
    origin: tuple[int, int]
    height: int

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise ValueError("text must be a non-empty string")
        line_bitmap(self.text)  # ValueError for characters outside the font
        if self.text != self.text.strip() or "  " in self.text:
            raise ValueError(f"{self.text!r}: single spaces between words only, none at the ends")
        if not any(ch.isalnum() for ch in self.text):
            raise ValueError(f"{self.text!r}: a text needs at least one letter or digit")
        if isinstance(self.height, bool) or not isinstance(self.height, int) or self.height < 7 or self.height % 7:
            raise ValueError(f"height must be a positive multiple of 7 (7, 14, 21, ...), got {self.height!r}")
        if (
            not isinstance(self.origin, tuple)
            or len(self.origin) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.origin)
        ):
            raise ValueError(f"origin must be a tuple of two integer pixels (x, y), got {self.origin!r}")

    @property
    def dot(self) -> int:
        """Side of one font dot in pixels."""
        return self.height // 7

    def bitmap(self) -> np.ndarray:
        """(height, width) bool ink of the whole line, starting at ``origin``."""
        d = self.dot
        return np.kron(line_bitmap(self.text), np.ones((d, d), dtype=bool)).astype(bool)

    def box(self) -> tuple[int, int, int, int]:
        """Exact pixel box of the ink (x0, y0, x1, y1; x1, y1 exclusive)."""
        ink = self.bitmap()
        cols = np.nonzero(ink.any(axis=0))[0]
        x, y = self.origin
        return x + int(cols[0]), y, x + int(cols[-1]) + 1, y + self.height


@dataclass(frozen=True)
class TextTruth:
    """Ground truth of one :class:`Text`: its upper-cased ``text`` and the exact pixel box
    of its ink, ``bbox_px`` = (x0, y0, x1, y1) with x1, y1 exclusive.

    >>> Scene(200, 60, [], texts=[Text("No 7", (4, 4), 14)]).text_truth()
    [TextTruth(text='NO 7', bbox_px=(4, 4, 50, 18))]
    """

    text: str
    bbox_px: tuple[int, int, int, int]


def _intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two exclusive boxes share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class Scene:
    """Shapes and text on a plain background, with exact ground truth.

    ``texts`` must lie inside the image and must not overlap each other nor any
    shape's box (ValueError); they do not change the shapes' truth.
    """

    def __init__(
        self,
        width: int,
        height: int,
        shapes: Iterable[Shape],
        background: tuple[int, int, int] = (255, 255, 255),
        texts: Iterable[Text] = (),
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError("width and height must be positive")
        self.width = int(width)
        self.height = int(height)
        self.shapes: tuple[Shape, ...] = tuple(shapes)
        self.background = tuple(int(v) for v in background)
        self.texts: tuple[Text, ...] = tuple(texts)
        boxes: list[tuple[int, int, int, int]] = []
        for text in self.texts:
            if not isinstance(text, Text):
                raise ValueError(f"texts must be Text objects, got {text!r}")
            box = text.box()
            if box[0] < 0 or box[1] < 0 or box[2] > self.width or box[3] > self.height:
                raise ValueError(f"{text!r} does not fit in the {self.width}x{self.height} image")
            for shape in self.shapes:
                x0, y0, x1, y1 = shape.box()
                if _intersect(box, (x0, y0, x1 + 1, y1 + 1)):
                    raise ValueError(f"{text!r} overlaps the {shape.label} at {shape.center}")
            if any(_intersect(box, other) for other in boxes):
                raise ValueError(f"{text!r} overlaps another text")
            boxes.append(box)
        self._labels: np.ndarray | None = None
        self._truth: list[ShapeTruth] | None = None

    def __repr__(self) -> str:
        texts = f", texts={[t.text for t in self.texts]}" if self.texts else ""
        return f"Scene({self.width}x{self.height}, {[s.label for s in self.shapes]}{texts})"

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    # -- rendering ----------------------------------------------------------

    def render(self) -> Image.Image:
        """The scene as an RGB image (no anti-aliasing); texts are printed black."""
        img = Image.new("RGB", (self.width, self.height), self.background)
        draw = ImageDraw.Draw(img)
        for shape in self.shapes:
            shape.draw(draw, shape.rgb, self.background)
        if not self.texts:
            return img
        arr = np.array(img)
        for text in self.texts:
            ink = text.bitmap()
            x, y = text.origin
            arr[y : y + ink.shape[0], x : x + ink.shape[1]][ink] = 0
        return Image.fromarray(arr)

    def encode(self, format: str = "JPEG", quality: int = 95) -> bytes:
        """Rendered image as encoded bytes (JPEG by default, like the official client)."""
        buf = io.BytesIO()
        kwargs = {"quality": quality} if format.upper() in ("JPEG", "JPG", "WEBP") else {}
        self.render().save(buf, format=format, **kwargs)
        return buf.getvalue()

    def data_url(self, format: str = "JPEG", quality: int = 95) -> str:
        """``data:image/...;base64,...`` URL of the rendered image."""
        mime = "jpeg" if format.upper() in ("JPEG", "JPG") else format.lower()
        return f"data:image/{mime};base64," + base64.b64encode(self.encode(format, quality)).decode()

    def labels(self) -> np.ndarray:
        """(H, W) int array: 0 background, i + 1 where shape i is visible."""
        if self._labels is None:
            n = len(self.shapes)
            mode = "L" if n < 255 else "I"
            img = Image.new(mode, (self.width, self.height), 0)
            draw = ImageDraw.Draw(img)
            for i, shape in enumerate(self.shapes):
                shape.draw(draw, i + 1, 0)
            self._labels = np.asarray(img)
        return self._labels

    def mask(self, i: int) -> np.ndarray:
        """(H, W) bool mask of shape ``i`` as visible in the rendered image."""
        if not -len(self.shapes) <= i < len(self.shapes):
            raise IndexError(i)
        i %= len(self.shapes)
        return self.labels() == i + 1

    # -- ground truth -------------------------------------------------------

    def truth(self) -> list[ShapeTruth]:
        """Ground truth of every visible shape, in drawing order (hidden shapes are left out)."""
        if self._truth is None:
            labels = self.labels()
            w, h = self.width, self.height
            out: list[ShapeTruth] = []
            for i, shape in enumerate(self.shapes):
                x0, y0, x1, y1 = shape.box()
                cx0, cy0 = max(0, x0), max(0, y0)
                cx1, cy1 = min(w, x1 + 1), min(h, y1 + 1)
                if cx0 >= cx1 or cy0 >= cy1:
                    continue
                crop = labels[cy0:cy1, cx0:cx1] == i + 1
                area = int(crop.sum())
                if area == 0:
                    continue
                rows = np.nonzero(crop.any(axis=1))[0]
                cols = np.nonzero(crop.any(axis=0))[0]
                ys, xs = np.nonzero(crop)
                bx0, by0 = cx0 + int(cols[0]), cy0 + int(rows[0])
                bx1, by1 = cx0 + int(cols[-1]) + 1, cy0 + int(rows[-1]) + 1
                out.append(
                    ShapeTruth(
                        kind=shape.kind,
                        color=shape.color,
                        label=shape.label,
                        bbox=(bx0 / w, by0 / h, bx1 / w, by1 / h),
                        center=(
                            float((xs.mean() + cx0 + 0.5) / w),
                            float((ys.mean() + cy0 + 0.5) / h),
                        ),
                        area_px=area,
                        index=i,
                        bbox_px=(bx0, by0, bx1, by1),
                    )
                )
            self._truth = out
        return list(self._truth)

    def text_truth(self) -> list[TextTruth]:
        """Ground truth of every text, in reading order (top to bottom, then left to right).

        >>> scene = Scene(320, 120, [Shape("circle", "red", (260, 60), 60)],
        ...               texts=[Text("Total: 42", (10, 70), 14), Text("Exit", (10, 10), 21)])
        >>> [(t.text, t.bbox_px) for t in scene.text_truth()]
        [('EXIT', (10, 10, 79, 31)), ('TOTAL: 42', (10, 70, 116, 84))]
        """
        truth = [TextTruth(t.text.upper(), t.box()) for t in self.texts]
        return sorted(truth, key=lambda t: (t.bbox_px[1], t.bbox_px[0]))

    def matching(self, phrase: str) -> list[ShapeTruth]:
        """Visible shapes the phrase names, with the engine's phrase rules."""
        return [t for t in self.truth() if phrase_matches(phrase, t.kind, t.color)]

    def count(self, phrase: str) -> int:
        return len(self.matching(phrase))

    @classmethod
    def demo(cls) -> Scene:
        """The 960x640 scene the examples look at: two red circles, a blue square and a
        yellow triangle on white.

        >>> sorted(t.label for t in Scene.demo().truth())
        ['blue square', 'red circle', 'red circle', 'yellow triangle']
        """
        return cls(
            960,
            640,
            [
                Shape("circle", "red", (200, 180), 150),
                Shape("circle", "red", (480, 470), 110),
                Shape("square", "blue", (760, 200), 170),
                Shape("triangle", "yellow", (200, 480), 180),
            ],
        )

    # -- random scenes ------------------------------------------------------

    @classmethod
    def random(
        cls,
        seed: int,
        width: int = 640,
        height: int = 480,
        count: tuple[int, int] | int = (2, 6),
        kinds: Sequence[str] = ("circle", "square", "triangle"),
        colors: Sequence[str] = COLORS,
        min_size: int = 40,
        max_size: int = 160,
        allow_overlap: bool = False,
        background: tuple[int, int, int] = (255, 255, 255),
        margin: int = 6,
    ) -> Scene:
        """A deterministic random scene: same seed, same scene.

        Shapes lie fully inside the image; unless ``allow_overlap`` their boxes
        keep ``margin`` pixels apart. When a shape cannot be placed after many
        tries the scene simply has fewer shapes. With ``allow_overlap`` the
        truth keeps each shape's drawn kind, while the engine names what it
        sees: a square occluded down to a sliver may read as a triangle, and
        touching shapes of one colour merge into one.
        """
        rng = random.Random(seed)
        lo, hi = (count, count) if isinstance(count, int) else count
        n = rng.randint(lo, hi)
        limit = min(width, height) - 2 * margin
        if limit < 2:
            raise ValueError("image too small for shapes")
        smin = max(2, min(min_size, limit))
        smax = max(smin, min(max_size, limit))
        placed: list[Shape] = []
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            kind = rng.choice(list(kinds))
            color = rng.choice(list(colors))
            for attempt in range(400):
                size = rng.randint(smin, smax if attempt < 200 else max(smin, (smin + smax) // 2))
                half = size / 2
                cx = rng.randint(int(margin + half) + 1, max(int(margin + half) + 1, int(width - margin - half) - 1))
                cy = rng.randint(int(margin + half) + 1, max(int(margin + half) + 1, int(height - margin - half) - 1))
                shape = Shape(kind, color, (float(cx), float(cy)), float(size))
                x0, y0, x1, y1 = shape.box()
                if x0 < 0 or y0 < 0 or x1 >= width or y1 >= height:
                    continue
                if not allow_overlap and any(
                    x0 <= bx1 + margin and bx0 <= x1 + margin and y0 <= by1 + margin and by0 <= y1 + margin
                    for bx0, by0, bx1, by1 in boxes
                ):
                    continue
                placed.append(shape)
                boxes.append((x0, y0, x1, y1))
                break
        return cls(width, height, placed, background)

    def scaled(self, factor: float) -> Scene:
        """The same scene drawn at another resolution (shapes scaled with it; texts keep
        their origin scaled and a dot of ``round(dot * factor)``, at least 1 pixel)."""
        w = max(1, int(round(self.width * factor)))
        h = max(1, int(round(self.height * factor)))
        shapes = [
            Shape(s.kind, s.color, (s.center[0] * factor, s.center[1] * factor), max(2.0, s.size * factor))
            for s in self.shapes
        ]
        texts = [
            Text(t.text, (int(round(t.origin[0] * factor)), int(round(t.origin[1] * factor))), 7 * max(1, round(t.dot * factor)))
            for t in self.texts
        ]
        return Scene(w, h, shapes, self.background, texts)
