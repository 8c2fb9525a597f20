"""Printed text for the offline emulator: a 5x7 dot-matrix font and a reader for it.

Scenes print :class:`~moondream_tools.testing.scene.Text` in :data:`FONT`; the
emulator's answers to transcription questions and to ``detect("text")`` come from
:func:`read_text`, which looks only at the pixels the server received (numpy and
PIL, no OCR library).

How it reads: ink is every pixel whose brightest channel is below 100 (black text
stays black through JPEG; every palette colour has a channel of 170 or more, so
shapes are never ink), cleaned by a 2x2 opening. Blank rows and wide blank gaps
cut the ink into lines (recursive XY cut). A line's dot size is its height over 7
(letters and digits are full height); glyphs are split at blank columns, sampled
at their 5x7 cell centres (mean darkness) and matched to the nearest glyph of the
same inked width; the distance between two glyph cells gives the spaces.

Readability rule, with the dot size in pixels of the image the server received
(after any downscale):

* dots of **3 px or more**: the line is read exactly (after JPEG q90 and
  downscales of 3x and more);
* dots of **1.8 px or less**: the line is never read (lines whose dot, estimated
  from their height to about 0.1 px, is under 2 px are skipped);
* in between: best effort, characters may be missing or misread, or the line
  skipped.

Also: nothing is read on a dark background (median brightest channel under 150);
texts sharing rows are separate lines when at least 18 dots (three glyph cells)
of blank lie between them, closer ones may be read as one line; lines come in
reading order (top to bottom, then left to right).

>>> from moondream_tools.testing import Scene, Text
>>> scene = Scene(300, 120, [], texts=[Text("Exit 12", (10, 10), 21), Text("50%", (10, 60), 28)])
>>> [(line.text, line.bbox_px) for line in read_text(scene.render())]
[('EXIT 12', (10, 10, 133, 31)), ('50%', (10, 60, 78, 88))]
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["FONT", "TextLine", "glyph", "line_bitmap", "read_text", "is_text_phrase"]

_ROWS = (  # 7 rows per glyph, 5 columns each, "#" = ink
    ("A", ".###. #...# #...# ##### #...# #...# #...#"),
    ("B", "####. #...# #...# ####. #...# #...# ####."),
    ("C", ".###. #...# #.... #.... #.... #...# .###."),
    ("D", "####. #...# #...# #...# #...# #...# ####."),
    ("E", "##### #.... #.... ####. #.... #.... #####"),
    ("F", "##### #.... #.... ####. #.... #.... #...."),
    ("G", ".###. #...# #.... #.### #...# #...# .####"),
    ("H", "#...# #...# #...# ##### #...# #...# #...#"),
    ("I", ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),
    ("J", "..### ...#. ...#. ...#. ...#. #..#. .##.."),
    ("K", "#...# #..#. #.#.. ##... #.#.. #..#. #...#"),
    ("L", "#.... #.... #.... #.... #.... #.... #####"),
    ("M", "#...# ##.## #.#.# #.#.# #...# #...# #...#"),
    ("N", "#...# #...# ##..# #.#.# #..## #...# #...#"),
    ("O", ".###. #...# #...# #...# #...# #...# .###."),
    ("P", "####. #...# #...# ####. #.... #.... #...."),
    ("Q", ".###. #...# #...# #...# #.#.# #..#. .##.#"),
    ("R", "####. #...# #...# ####. #.#.. #..#. #...#"),
    ("S", ".#### #.... #.... .###. ....# ....# ####."),
    ("T", "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."),
    ("U", "#...# #...# #...# #...# #...# #...# .###."),
    ("V", "#...# #...# #...# #...# #...# .#.#. ..#.."),
    ("W", "#...# #...# #...# #.#.# #.#.# #.#.# .#.#."),
    ("X", "#...# #...# .#.#. ..#.. .#.#. #...# #...#"),
    ("Y", "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#.."),
    ("Z", "##### ....# ...#. ..#.. .#... #.... #####"),
    ("0", ".###. #...# #..## #.#.# ##..# #...# .###."),
    ("1", "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###."),
    ("2", ".###. #...# ....# ...#. ..#.. .#... #####"),
    ("3", "##### ...#. ..#.. ...#. ....# #...# .###."),
    ("4", "...#. ..##. .#.#. #..#. ##### ...#. ...#."),
    ("5", "##### #.... ####. ....# ....# #...# .###."),
    ("6", "..##. .#... #.... ####. #...# #...# .###."),
    ("7", "##### ....# ...#. ..#.. .#... .#... .#..."),
    ("8", ".###. #...# #...# .###. #...# #...# .###."),
    ("9", ".###. #...# #...# .#### ....# ...#. .##.."),
    (" ", "..... ..... ..... ..... ..... ..... ....."),
    ("-", "..... ..... ..... ##### ..... ..... ....."),
    (".", "..... ..... ..... ..... ..... .##.. .##.."),
    (":", "..... .##.. .##.. ..... .##.. .##.. ....."),
    ("!", "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#.."),
    ("?", ".###. #...# ....# ...#. ..#.. ..... ..#.."),
    ("/", "..... ....# ...#. ..#.. .#... #.... ....."),
    ("#", ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#."),
    ("%", "##... ##..# ...#. ..#.. .#... #..## ...##"),
)
#: The font: character -> 7 rows of 5 columns ("#" ink, "." blank). Every glyph but the
#: space is one run of inked columns (no blank column inside), so glyphs split at blank
#: columns; letters and digits span all 7 rows.
FONT: dict[str, tuple[str, ...]] = {ch: tuple(rows.split()) for ch, rows in _ROWS}

_INK = 100  # a pixel is ink when its brightest channel is below this
_MIN_BACKGROUND = 150  # no text is read on a darker background
_MIN_DOT = 2.0  # lines with smaller dots are ignored
_LINE_GAP = 15  # dots: a wider blank gap separates lines (a single space leaves 11 at most)
_MAX_ERROR = 0.3  # mean per-cell darkness error above which a glyph is not recognised


def glyph(ch: str) -> np.ndarray:
    """(7, 5) bool bitmap of one character (upper-cased); ValueError for characters
    outside the font.

    >>> glyph("t").astype(int)[:2].tolist()
    [[1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    """
    rows = FONT.get(ch.upper()) if len(ch) == 1 else None
    if rows is None:
        raise ValueError(f"character {ch!r} is not in the font (A-Z, 0-9, space and -.:!?/#%)")
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def line_bitmap(text: str) -> np.ndarray:
    """(7, 6n - 1) bool bitmap of a line of ``n`` characters: glyphs 5 dots wide, one blank
    dot between them.

    >>> line_bitmap("-.").astype(int)[3].tolist()
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    """
    if not text:
        return np.zeros((7, 0), dtype=bool)
    gap = np.zeros((7, 1), dtype=bool)
    parts: list[np.ndarray] = []
    for i, ch in enumerate(text):
        parts += [gap, glyph(ch)] if i else [glyph(ch)]
    return np.concatenate(parts, axis=1)


def _templates() -> dict[int, tuple[list[str], np.ndarray, np.ndarray]]:
    """Glyphs trimmed to their inked columns, by width: (chars, (n, 7*w) float, first column)."""
    by_width: dict[int, tuple[list[str], list[np.ndarray], list[int]]] = {}
    for ch in FONT:
        g = glyph(ch)
        cols = np.nonzero(g.any(axis=0))[0]
        if cols.size == 0:
            continue
        assert cols.size == cols[-1] - cols[0] + 1, f"glyph {ch!r} has a blank column inside"
        trimmed = g[:, cols[0] : cols[-1] + 1]
        chars, bitmaps, first = by_width.setdefault(trimmed.shape[1], ([], [], []))
        assert not any(np.array_equal(trimmed, b) for b in bitmaps), f"glyph {ch!r} is ambiguous"
        chars.append(ch)
        bitmaps.append(trimmed)
        first.append(int(cols[0]))
    return {
        w: (chars, np.array([b.ravel() for b in bitmaps], dtype=np.float32), np.array(first))
        for w, (chars, bitmaps, first) in by_width.items()
    }


_TEMPLATES = _templates()


@dataclass(frozen=True)
class TextLine:
    """One line :func:`read_text` read: upper-case ``text``, the pixel box of its ink
    (x0, y0, x1, y1, x1 and y1 exclusive) and the estimated ``dot`` size in pixels."""

    text: str
    bbox_px: tuple[int, int, int, int]
    dot: float


def is_text_phrase(phrase: str) -> bool:
    """Whether a detect/point phrase asks for text lines: "text", "word(s)", "text line(s)".

    >>> is_text_phrase("the text"), is_text_phrase("Words"), is_text_phrase("red circle")
    (True, True, False)
    """
    words = [w for w in re.findall(r"[a-z]+", phrase.lower()) if w not in ("the", "a", "an", "all", "any")]
    words = [w[:-1] if w in ("texts", "words", "lines") else w for w in words]
    return words in (["text"], ["word"], ["text", "line"])


_CACHE: OrderedDict[bytes, tuple[TextLine, ...]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def read_text(image: Image.Image) -> list[TextLine]:
    """The lines of dot-matrix text in ``image``, in reading order (see the module's
    readability rule). Deterministic; results are cached per image content."""
    arr = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    key = hashlib.blake2b(arr.tobytes(), digest_size=20)
    key.update(repr(arr.shape).encode())
    digest = key.digest()
    with _CACHE_LOCK:
        if digest in _CACHE:
            _CACHE.move_to_end(digest)
            return list(_CACHE[digest])
    lines = tuple(_read(arr))
    with _CACHE_LOCK:
        _CACHE[digest] = lines
        while len(_CACHE) > 32:
            _CACHE.popitem(last=False)
    return list(lines)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


def _read(arr: np.ndarray) -> list[TextLine]:
    bright = arr.max(axis=2)
    step = max(1, int((bright.size / 250_000) ** 0.5))
    background = float(np.median(bright[::step, ::step]))
    if background < _MIN_BACKGROUND:
        return []
    ink = bright < _INK
    core = ink[:-1, :-1] & ink[1:, :-1] & ink[:-1, 1:] & ink[1:, 1:]  # 2x2 opening drops specks
    ink = _spread(np.pad(core, ((0, 1), (0, 1))), (0, 1))
    if not ink.any():
        return []
    darkness = np.clip((background - bright.astype(np.float32)) / background, 0.0, 1.0)
    # half-covered pixels next to ink join it: where two dots of neighbouring columns (rows)
    # sit on different rows (columns), the pixel column (row) between them is only partly dark
    ink |= (darkness > 0.35) & _spread(ink, (-1, 0, 1))
    lines = [_read_line(darkness, ink, box) for box in _blocks(ink)]
    return sorted((line for line in lines if line is not None), key=lambda l: (l.bbox_px[1], l.bbox_px[0]))


def _spread(mask: np.ndarray, shifts: tuple[int, ...]) -> np.ndarray:
    """Dilation: ``out[y, x]`` is set when ``mask[y - dy, x - dx]`` is, for dy, dx in ``shifts``."""
    h, w = mask.shape
    pad = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in shifts:
        for dx in shifts:
            out |= pad[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
    return out


def _blocks(ink: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Recursive XY cut of the ink into line boxes: blank rows split, then blank gaps
    wider than ``_LINE_GAP`` dots (dot = height / 7) split, until nothing splits."""
    out: list[tuple[int, int, int, int]] = []
    todo = [(0, 0, ink.shape[1], ink.shape[0])]
    while todo:
        x0, y0, x1, y1 = todo.pop()
        rows = _runs(ink[y0:y1, x0:x1].any(axis=1))
        if not rows:
            continue
        if len(rows) > 1:
            todo += [(x0, y0 + a, x1, y0 + b) for a, b in rows]
            continue
        y0, y1 = y0 + rows[0][0], y0 + rows[0][1]
        cols = _runs(ink[y0:y1, x0:x1].any(axis=0))
        gap = _LINE_GAP * (y1 - y0) / 7.0
        groups = [list(cols[0])]
        for a, b in cols[1:]:
            if a - groups[-1][1] > gap:
                groups.append([a, b])
            else:
                groups[-1][1] = b
        if len(groups) > 1:
            todo += [(x0 + a, y0, x0 + b, y1) for a, b in groups]
        else:
            out.append((x0 + groups[0][0], y0, x0 + groups[0][1], y1))
    return out


def _profile_extent(profile: np.ndarray, start: int, end: int) -> tuple[float, float]:
    """Sub-pixel [start, end) of an ink run from the darkness profile around it: the
    pixels just outside count with their partial darkness, the run's edge pixels too."""
    lo = start - (profile[start - 1] if start > 0 else 0.0) + (1.0 - profile[start])
    hi = end + (profile[end] if end < profile.size else 0.0) - (1.0 - profile[end - 1])
    return float(lo), float(hi)


def _read_line(darkness: np.ndarray, ink: np.ndarray, box: tuple[int, int, int, int]) -> TextLine | None:
    x0, y0, x1, y1 = box
    h, w = darkness.shape
    r0, c0 = max(0, y0 - 1), max(0, x0 - 1)
    top, bottom = _profile_extent(darkness[r0 : y1 + 1, x0:x1].max(axis=1), y0 - r0, y1 - r0)
    top, bottom = top + r0, bottom + r0
    dot = (bottom - top) / 7.0
    if dot < _MIN_DOT:
        return None
    col_profile = darkness[y0:y1, c0 : x1 + 1].max(axis=0)
    offsets = np.array([-0.25, 0.25], dtype=np.float32) * dot
    chars: list[str] = []
    starts: list[float] = []
    left_edge = right_edge = 0.0
    for a, b in _runs(ink[y0:y1, x0:x1].any(axis=0)):
        left, right = _profile_extent(col_profile, x0 + a - c0, x0 + b - c0)
        left, right = left + c0, right + c0
        width = int(round((right - left) / dot))
        if width not in _TEMPLATES:
            return None
        cx = left + (np.arange(width, dtype=np.float32) + 0.5) * dot
        cy = top + (np.arange(7, dtype=np.float32) + 0.5) * dot
        xs = np.clip(np.floor(cx[:, None] + offsets), 0, w - 1).astype(int)  # (width, 2)
        ys = np.clip(np.floor(cy[:, None] + offsets), 0, h - 1).astype(int)  # (7, 2)
        cells = darkness[ys[:, :, None, None], xs[None, None, :, :]].mean(axis=(1, 3))  # (7, width)
        names, bitmaps, first = _TEMPLATES[width]
        errors = np.abs(bitmaps - cells.ravel()[None, :]).mean(axis=1)
        best = int(np.argmin(errors))
        if errors[best] > _MAX_ERROR:
            return None
        start = left - first[best] * dot
        if starts:
            chars.append(" " * max(0, int(round((start - starts[-1]) / (6 * dot))) - 1))
        else:
            left_edge = left
        chars.append(names[best])
        starts.append(start)
        right_edge = right
    text = "".join(chars)
    if not re.search(r"[A-Z0-9]", text):
        return None
    bbox = (int(round(left_edge)), int(round(top)), int(round(right_edge)), int(round(bottom)))
    return TextLine(text, bbox, round(dot, 2))
