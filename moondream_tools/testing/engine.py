"""A toy but honest vision engine for the offline Moondream emulator.

It finds flat, saturated shapes (the ones :mod:`moondream_tools.testing.scene`
draws) in whatever image the server actually received, so answers follow the
pixels, not a side channel: JPEG compression, downscaling or cropping by a
client changes the answers exactly as much as it changes the image.

Pipeline (numpy only):

1. every pixel gets the palette colour nearest in hue when its chroma is at
   least half the chroma of that palette colour (the 50 % point of a blend with
   any grey background, so edges split where they should), else background;
2. connected components (4-connectivity) per colour, computed on row runs;
3. components without a 5x5 "core" of pure colour (thin seams between two
   touching shapes, JPEG ringing) or tinier than ``min_area`` are dropped;
4. the kind comes from the fill ratio of the component (holes filled) in its
   bounding box: square ~1, circle ~0.785, triangle ~0.5; a circle with a
   hole is a ``ring``.

Also here: phrase matching (``"the red circles"``), boundary tracing into
rings, Douglas-Peucker simplification and the two SVG path styles the
Moondream segment skill speaks (refined potrace-style and coarse streaming).

Self-contained on purpose (stdlib, numpy, PIL): it must never share code with
the client it is used to test, which is why it keeps its own tracing and path writing
(about 780 lines) instead of using ``moondream_tools.geometry``.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "PALETTE",
    "KINDS",
    "COLORS",
    "Found",
    "Phrase",
    "analyze",
    "background_name",
    "parse_phrase",
    "phrase_matches",
    "matches",
    "label_components",
    "trace_rings",
    "simplify_ring",
    "refined_path",
    "coarse_path",
    "split_path_chunks",
    "classify_pixels",
    "Components",
    "format_refined_number",
    "position_name",
]

#: Saturated colours far apart in hue (red 0, orange 31, yellow 57, green 129,
#: cyan 186, blue 225, purple 274, magenta 305 degrees), robust to JPEG and
#: resampling.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (240, 225, 0),
    "green": (30, 170, 50),
    "cyan": (20, 200, 220),
    "blue": (30, 70, 225),
    "purple": (130, 30, 200),
    "magenta": (220, 30, 200),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
#: Shape kinds. ``ring`` is a circle with a background-coloured hole.
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "ring")

_GENERIC = {"shape", "object", "thing", "item", "figure"}
_ARTICLES = {"the", "a", "an", "all", "any", "every", "each", "some"}


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of an (..., 3) array."""
    rgb = rgb.astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    c = (mx - mn).astype(np.float32)
    safe = np.where(c == 0, 1.0, c)
    rf, gf, bf = r.astype(np.float32), g.astype(np.float32), b.astype(np.float32)
    h = np.where(
        mx == r,
        ((gf - bf) / safe) % 6.0,
        np.where(mx == g, (bf - rf) / safe + 2.0, (rf - gf) / safe + 4.0),
    )
    return (h * 60.0) % 360.0, c


_PAL_RGB = np.array(list(PALETTE.values()), dtype=np.uint8)
_PAL_HUE, _PAL_CHROMA = _hue_chroma(_PAL_RGB)


def _hue_table() -> tuple[np.ndarray, np.ndarray]:
    """For each integer-ish hue bin (0.5 degree), nearest palette index and its chroma/2."""
    bins = (np.arange(720, dtype=np.float32) + 0.5) / 2.0
    d = np.abs(bins[:, None] - _PAL_HUE[None, :])
    d = np.minimum(d, 360.0 - d)
    idx = np.argmin(d, axis=1)
    return (idx + 1).astype(np.uint8), (_PAL_CHROMA[idx] * 0.5).astype(np.float32)


_HUE_CLASS, _HUE_MIN_CHROMA = _hue_table()


def _classify_exact(arr: np.ndarray) -> np.ndarray:
    hue, chroma = _hue_chroma(arr)
    b = np.minimum((hue * 2.0).astype(np.int32), 719)
    cls = _HUE_CLASS[b]
    ok = chroma >= _HUE_MIN_CHROMA[b]
    return np.where(ok, cls, 0).astype(np.uint8)


def _build_lut() -> np.ndarray:
    # 6 bits per channel, evaluated at the centre of each cell (error <= 2 levels)
    v = (np.arange(64, dtype=np.int16) << 2) + 2
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    rgb = np.stack([r, g, b], axis=-1).reshape(-1, 3)
    return _classify_exact(rgb)


_LUT = _build_lut()


def classify_pixels(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 class map: 0 background, i+1 = COLORS[i].

    A pixel takes the palette colour nearest in hue when its chroma is at least
    half that colour's chroma (a 50 % blend with any grey), else background.
    """
    q = arr >> 2
    idx = q[..., 0].astype(np.int32) << 12
    idx |= q[..., 1].astype(np.int32) << 6
    idx |= q[..., 2]
    return _LUT[idx]


# --------------------------------------------------------------------------
# connected components on row runs


@dataclass
class Components:
    """Result of :func:`label_components`."""

    labels: np.ndarray  # (H, W) int32, 0 = none, k = component k (1-based)
    count: int
    cls: np.ndarray  # (count,) class of each component
    area: np.ndarray  # (count,)
    bbox: np.ndarray  # (count, 4) x0, y0, x1, y1 (x1, y1 exclusive)
    sum_x: np.ndarray  # (count,) sum of column indices
    sum_y: np.ndarray


def label_components(classes: np.ndarray) -> Components:
    """4-connected components of equal non-zero values of a 2-D integer map."""
    h, w = classes.shape
    pad = np.zeros((h, w + 2), dtype=classes.dtype)
    pad[:, 1:-1] = classes
    change = pad[:, 1:] != pad[:, :-1]  # (h, w+1): boundary before column p
    rows, pos = np.nonzero(change)
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Components(
            np.zeros((h, w), np.int32), 0, empty, empty, np.zeros((0, 4), np.int64), empty, empty
        )
    # value of the segment starting at each change point
    val = np.zeros(rows.size, dtype=classes.dtype)
    inside = pos < w
    val[inside] = classes[rows[inside], pos[inside]]
    is_start = val != 0
    start_idx = np.nonzero(is_start)[0]
    r = rows[start_idx].astype(np.int64)
    s = pos[start_idx].astype(np.int64)
    e = pos[start_idx + 1].astype(np.int64)  # next change in the same row ends the run
    k = val[start_idx]
    n = r.size
    stride = w + 1
    start_key = r * stride + s
    end_key = r * stride + e
    # candidates in the next row: end > s and start < e
    lo = np.searchsorted(end_key, (r + 1) * stride + s, side="right")
    hi = np.searchsorted(start_key, (r + 1) * stride + e, side="left")
    cnt = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(n), cnt)
    offs = np.arange(a.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    b = np.repeat(lo, cnt) + offs
    same = k[a] == k[b]
    a, b = a[same], b[same]
    # union-find over run pairs, vectorised min-label propagation + pointer jumping
    parent = np.arange(n)
    if a.size:
        while True:
            pa, pb = parent[a], parent[b]
            m = np.minimum(pa, pb)
            new = parent.copy()
            np.minimum.at(new, pa, m)
            np.minimum.at(new, pb, m)
            while True:
                nxt = new[new]
                if np.array_equal(nxt, new):
                    break
                new = nxt
            if np.array_equal(new, parent):
                break
            parent = new
    roots, comp = np.unique(parent, return_inverse=True)
    count = roots.size
    length = e - s
    area = np.bincount(comp, weights=length, minlength=count).astype(np.int64)
    sum_x = np.bincount(comp, weights=(s + e - 1) * length / 2.0, minlength=count)
    sum_y = np.bincount(comp, weights=r * length, minlength=count)
    bbox = np.zeros((count, 4), dtype=np.int64)
    bbox[:, 0] = w
    bbox[:, 1] = h
    np.minimum.at(bbox[:, 0], comp, s)
    np.minimum.at(bbox[:, 1], comp, r)
    np.maximum.at(bbox[:, 2], comp, e)
    np.maximum.at(bbox[:, 3], comp, r + 1)
    cls = np.zeros(count, dtype=classes.dtype)
    cls[comp] = k
    # paint the label image
    labels = np.zeros(h * w, dtype=np.int32)
    flat_start = r * w + s
    run_of_px = np.repeat(np.arange(n), length)
    px = np.arange(run_of_px.size) - np.repeat(np.cumsum(length) - length, length)
    labels[flat_start[run_of_px] + px] = comp[run_of_px] + 1
    return Components(labels.reshape(h, w), count, cls, area, bbox, sum_x, sum_y)


def _core(classes: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has their own non-zero class."""
    h, w = classes.shape
    hor = classes != 0
    for d in range(1, radius + 1):
        eq = np.zeros((h, w), bool)
        eq[:, d:] = classes[:, d:] == classes[:, :-d]
        hor &= eq
        eq = np.zeros((h, w), bool)
        eq[:, :-d] = classes[:, :-d] == classes[:, d:]
        hor &= eq
    core = hor.copy()
    for d in range(1, radius + 1):
        eq = np.zeros((h, w), bool)
        eq[d:] = hor[:-d] & (classes[d:] == classes[:-d])
        core &= eq
        eq = np.zeros((h, w), bool)
        eq[:-d] = hor[d:] & (classes[:-d] == classes[d:])
        core &= eq
    return core


# --------------------------------------------------------------------------
# found shapes


@dataclass(frozen=True)
class Found:
    """One shape found in an image. Coordinates normalized to the image."""

    kind: str
    color: str
    label: str
    bbox: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max
    center: tuple[float, float]  # centroid of the component pixels
    area_px: int
    bbox_px: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    image_size: tuple[int, int]  # (W, H)
    holes: int = 0
    fill_ratio: float = 0.0
    mask_crop: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def mask(self) -> np.ndarray:
        """Full-image (H, W) bool mask of this component."""
        w, h = self.image_size
        out = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = self.bbox_px
        out[y0:y1, x0:x1] = self.mask_crop
        return out

    def contains(self, x: float, y: float) -> bool:
        """Whether the normalized point (x, y) falls on a pixel of the shape."""
        w, h = self.image_size
        px, py = int(x * w), int(y * h)
        x0, y0, x1, y1 = self.bbox_px
        if not (x0 <= px < x1 and y0 <= py < y1):
            return False
        return bool(self.mask_crop[py - y0, px - x0])

    def refined_path(self) -> str:
        return refined_path(self.mask_crop)

    def coarse_path(self) -> str:
        return coarse_path(self.mask_crop)


def _holes(crop: np.ndarray, min_area: int) -> tuple[int, int]:
    """(number of holes, total hole area) of a bool crop."""
    inv = np.zeros((crop.shape[0] + 2, crop.shape[1] + 2), dtype=np.uint8)
    inv[1:-1, 1:-1] = ~crop
    inv[0, :] = inv[-1, :] = 1
    inv[:, 0] = inv[:, -1] = 1
    comps = label_components(inv)
    outside = comps.labels[0, 0]
    n = 0
    total = 0
    for i in range(comps.count):
        if i + 1 == outside:
            continue
        if comps.area[i] >= min_area:
            n += 1
        total += int(comps.area[i])
    return n, total


def _kind(fill: float, holes: int) -> str:
    if holes and 0.68 < fill < 0.9:
        return "ring"
    if fill >= 0.9:
        return "square"
    if fill >= 0.66:
        return "circle"
    return "triangle"


_CACHE: OrderedDict[bytes, tuple[Found, ...]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def analyze(image: Image.Image, *, min_area: int = 12) -> list[Found]:
    """Find the palette shapes in ``image``, sorted top-to-bottom, left-to-right."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(rgb)
    key = hashlib.blake2b(arr.tobytes(), digest_size=20)
    key.update(f"{arr.shape}:{min_area}".encode())
    digest = key.digest()
    with _CACHE_LOCK:
        hit = _CACHE.get(digest)
        if hit is not None:
            _CACHE.move_to_end(digest)
            return list(hit)
    found = tuple(_analyze(arr, min_area))
    with _CACHE_LOCK:
        _CACHE[digest] = found
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return list(found)


def _analyze(arr: np.ndarray, min_area: int) -> list[Found]:
    h, w = arr.shape[:2]
    classes = classify_pixels(arr)
    comps = label_components(classes)
    if comps.count == 0:
        return []
    core = _core(classes)
    core_count = np.bincount(comps.labels[core], minlength=comps.count + 1)[1:]
    keep = np.nonzero((core_count > 0) & (comps.area >= min_area))[0]
    out: list[Found] = []
    for i in keep:
        x0, y0, x1, y1 = (int(v) for v in comps.bbox[i])
        crop = comps.labels[y0:y1, x0:x1] == i + 1
        area = int(comps.area[i])
        n_holes, hole_area = _holes(crop, max(min_area, area // 50))
        fill = (area + hole_area) / float((x1 - x0) * (y1 - y0))
        kind = _kind(fill, n_holes)
        color = COLORS[int(comps.cls[i]) - 1]
        cx = (comps.sum_x[i] / area + 0.5) / w
        cy = (comps.sum_y[i] / area + 0.5) / h
        out.append(
            Found(
                kind=kind,
                color=color,
                label=f"{color} {kind}",
                bbox=(x0 / w, y0 / h, x1 / w, y1 / h),
                center=(float(cx), float(cy)),
                area_px=area,
                bbox_px=(x0, y0, x1, y1),
                image_size=(w, h),
                holes=n_holes,
                fill_ratio=fill,
                mask_crop=crop,
            )
        )
    out.sort(key=lambda f: (f.bbox_px[1], f.bbox_px[0]))
    return out


def background_name(image: Image.Image, found: Sequence[Found] = ()) -> str:
    """Name of the dominant non-shape colour: white, black, gray or a palette name."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(rgb)
    step = max(1, int(math.sqrt(arr.shape[0] * arr.shape[1] / 40000)))
    sample = arr[::step, ::step]
    cls = classify_pixels(sample)
    bg = sample[cls == 0]
    if bg.size == 0:
        return "colorful"
    med = np.median(bg.reshape(-1, 3), axis=0)
    hue, chroma = _hue_chroma(med.astype(np.uint8)[None, :])
    if float(chroma[0]) > 60:
        d = np.abs(_PAL_HUE - hue[0])
        d = np.minimum(d, 360 - d)
        return COLORS[int(np.argmin(d))]
    v = float(med.mean())
    if v >= 200:
        return "white"
    if v <= 60:
        return "black"
    return "gray"


def position_name(x: float, y: float) -> str:
    """Coarse position of a normalized point: 'top-left', 'center', 'bottom', ..."""
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    if row and col:
        return f"{row}-{col}"
    return row or col or "center"


# --------------------------------------------------------------------------
# phrases


@dataclass(frozen=True)
class Phrase:
    """A parsed object phrase. ``valid`` False means it names nothing we know."""

    color: str | None
    kind: str | None
    valid: bool

    @property
    def everything(self) -> bool:
        return self.valid and self.color is None and self.kind is None


def _singular(word: str, vocab: Iterable[str]) -> str | None:
    vocab = set(vocab)
    if word in vocab:
        return word
    if word.endswith("es") and word[:-2] in vocab:
        return word[:-2]
    if word.endswith("s") and word[:-1] in vocab:
        return word[:-1]
    return None


def parse_phrase(phrase: str) -> Phrase:
    """Parse "the red circles" -> Phrase(color="red", kind="circle", valid=True).

    Lowercase, drop articles ("the", "a", "an", "all", "any", ...), singularize,
    then each remaining word must be a colour, a kind or a generic noun
    ("shape", "object", "thing", "item"). Anything else makes the phrase invalid.
    """
    words = re.findall(r"[a-z]+", phrase.lower())
    words = [w for w in words if w not in _ARTICLES]
    color = kind = None
    generic = False
    if not words:
        return Phrase(None, None, False)
    for word in words:
        c = _singular(word, COLORS)
        k = _singular(word, KINDS)
        g = _singular(word, _GENERIC)
        if c is not None:
            if color is not None and color != c:
                return Phrase(None, None, False)
            color = c
        elif k is not None:
            if kind is not None and kind != k:
                return Phrase(None, None, False)
            kind = k
        elif g is not None:
            generic = True
        else:
            return Phrase(None, None, False)
    return Phrase(color, kind, bool(color or kind or generic))


def phrase_matches(phrase: str | Phrase, kind: str, color: str) -> bool:
    """Whether a phrase names a shape of this kind and colour."""
    p = parse_phrase(phrase) if isinstance(phrase, str) else phrase
    if not p.valid:
        return False
    if p.color is not None and p.color != color:
        return False
    if p.kind is not None and p.kind != kind:
        return False
    return True


def matches(phrase: str | Phrase, found: Found) -> bool:
    """Whether ``phrase`` names ``found`` (anything with ``kind`` and ``color``)."""
    return phrase_matches(phrase, found.kind, found.color)


# --------------------------------------------------------------------------
# boundary tracing and paths

# direction index: 0 = +x (right), 1 = +y (down), 2 = -x, 3 = -y
_DX = (1, 0, -1, 0)
_DY = (0, 1, 0, -1)


def trace_rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed boundary rings of a bool mask, vertices in pixel-corner coordinates.

    Every inside/outside pixel edge ("crack") belongs to exactly one ring, so
    filling all rings with the even-odd rule gives back the mask exactly.
    Outer boundaries and holes come out as separate rings; only corner
    vertices (direction changes) are kept.
    """
    m = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)
    m[1:-1, 1:-1] = mask
    # in padded coordinates pixel (r, c) spans x in [c, c+1], y in [r, r+1];
    # we shift by -1 at the end to return to mask coordinates.
    out_edges: dict[tuple[int, int], list[int]] = {}

    def add(xs: np.ndarray, ys: np.ndarray, d: int) -> None:
        for x, y in zip(xs.tolist(), ys.tolist()):
            out_edges.setdefault((x, y), []).append(d)

    inside = m[1:, :]
    above = m[:-1, :]
    # top edge of an inside pixel: (c+1, r) -> (c, r), direction 2
    r, c = np.nonzero(inside & ~above)
    add(c + 1, r + 1, 2)
    # bottom edge: (c, r+1) -> (c+1, r+1), direction 0  (pixel row r = r'+0 of above)
    r, c = np.nonzero(above & ~inside)
    add(c, r + 1, 0)
    left = m[:, :-1]
    here = m[:, 1:]
    # left edge of an inside pixel at column c+1: (c+1, r) -> (c+1, r+1), direction 1
    r, c = np.nonzero(here & ~left)
    add(c + 1, r, 1)
    # right edge of an inside pixel at column c: (c+1, r+1) -> (c+1, r), direction 3
    r, c = np.nonzero(left & ~here)
    add(c + 1, r + 1, 3)

    rings: list[list[tuple[int, int]]] = []
    while out_edges:
        start, dirs = next(iter(out_edges.items()))
        d = dirs.pop()
        if not dirs:
            del out_edges[start]
        x, y = start
        ring: list[tuple[int, int]] = [(x - 1, y - 1)]
        d0 = d
        while True:
            x, y = x + _DX[d], y + _DY[d]
            if (x, y) == start:
                break
            options = out_edges.get((x, y))
            if not options:
                break  # cannot happen for a valid crack set
            if len(options) == 1:
                nd = options.pop()
            else:
                # saddle: turn left (keeps diagonal inside pixels apart)
                left_turn = (d + 3) % 4
                nd = left_turn if left_turn in options else options[0]
                options.remove(nd)
            if not options:
                del out_edges[(x, y)]
            if nd != d:
                ring.append((x - 1, y - 1))
            d = nd
        # drop the start vertex if it is not a corner
        if len(ring) > 2 and d == d0:
            ring.pop(0)
        rings.append(ring)
    return rings


def _dp(points: np.ndarray, tol: float) -> list[int]:
    """Douglas-Peucker on an open polyline; returns kept indices."""
    n = len(points)
    if n < 3:
        return list(range(n))
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, b = points[i], points[j]
        seg = points[i + 1 : j]
        ab = b - a
        L = math.hypot(ab[0], ab[1])
        if L == 0:
            d = np.hypot(seg[:, 0] - a[0], seg[:, 1] - a[1])
        else:
            d = np.abs(ab[0] * (seg[:, 1] - a[1]) - ab[1] * (seg[:, 0] - a[0])) / L
        k = int(np.argmax(d))
        if d[k] > tol:
            m = i + 1 + k
            keep[m] = True
            stack.append((i, m))
            stack.append((m, j))
    return list(np.nonzero(keep)[0])


def simplify_ring(ring: Sequence[tuple[float, float]], tol: float) -> list[tuple[float, float]]:
    """Douglas-Peucker on a closed ring, through edge midpoints of the pixel staircase.

    The staircase corners are first replaced by the midpoints of the crack
    segments between them (a marching-squares-like outline that runs through
    the middle of each pixel step), then simplified with tolerance ``tol``.
    """
    pts = np.asarray(ring, dtype=np.float64)
    n = len(pts)
    if n < 3:
        return [tuple(p) for p in pts]
    nxt = np.roll(pts, -1, axis=0)
    seg_len = np.abs(nxt - pts).sum(axis=1)
    # long straight crack segments keep their corners (square corners stay
    # sharp); short steps are replaced by their midpoint.
    long = seg_len > 2.0
    mids = []
    for i in range(n):
        a, b = pts[i], nxt[i]
        if long[i]:
            corner_a = long[i - 1]  # two long runs meet: a true corner, keep it
            corner_b = long[(i + 1) % n]
            if corner_a:
                mids.append(a)
            else:
                mids.append(a + (b - a) * (0.5 / seg_len[i]))
            if not corner_b:
                mids.append(b - (b - a) * (0.5 / seg_len[i]))
        else:
            mids.append((a + b) / 2.0)
    mp = np.asarray(mids)
    if len(mp) < 3:
        return [tuple(p) for p in mp]
    # split the closed ring at its two mutually farthest-ish points
    i0 = 0
    d = np.hypot(mp[:, 0] - mp[i0, 0], mp[:, 1] - mp[i0, 1])
    i1 = int(np.argmax(d))
    first = mp[i0 : i1 + 1]
    second = np.concatenate([mp[i1:], mp[:1]])
    k1 = _dp(first, tol)
    k2 = _dp(second, tol)
    out = [tuple(first[k]) for k in k1] + [tuple(second[k]) for k in k2[1:-1]]
    return out


def format_refined_number(v: float) -> str:
    """3 decimals, trailing zeros and the leading zero dropped: .439, -.05, 1, 0."""
    s = f"{v:.3f}".rstrip("0").rstrip(".")
    neg = s.startswith("-")
    if neg:
        s = s[1:]
    if s in ("", "0"):
        return "0"
    if s.startswith("0."):
        s = s[1:]
    return "-" + s if neg else s


def _turn(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> float:
    a = p1 - p0
    b = p2 - p1
    na, nb = math.hypot(*a), math.hypot(*b)
    if na == 0 or nb == 0:
        return 0.0
    cosv = max(-1.0, min(1.0, float(a @ b) / (na * nb)))
    return math.degrees(math.acos(cosv))


def _unit(v: np.ndarray) -> np.ndarray:
    n = math.hypot(v[0], v[1])
    return v / n if n else v


def _ring_to_refined(pts: list[tuple[float, float]], fmt) -> str:
    p = np.asarray(pts, dtype=np.float64)
    n = len(p)
    if n < 3:
        return ""
    smooth = [_turn(p[i - 1], p[i], p[(i + 1) % n]) < 40.0 for i in range(n)]
    parts = ["M" + fmt(p[0])]
    for i in range(n):
        j = (i + 1) % n
        a, b = p[i], p[j]
        if smooth[i] and smooth[j]:
            # Catmull-Rom tangents, scaled to this segment's length so short
            # segments next to long ones do not overshoot
            third = math.hypot(*(b - a)) / 3.0
            c1 = a + _unit(b - p[i - 1]) * third
            c2 = b - _unit(p[(j + 1) % n] - a) * third
            parts.append("C" + fmt(c1) + "," + fmt(c2) + "," + fmt(b))
        elif j != 0:
            parts.append("L" + fmt(b))
        else:
            pass  # closing straight segment is implied by z
    parts.append("z")
    return "".join(parts)


def _normalizer(mask: np.ndarray):
    h, w = mask.shape

    def norm(pt) -> tuple[float, float]:
        return (pt[0] / w, pt[1] / h)

    return norm


def refined_path(mask: np.ndarray, tol: float = 0.6) -> str:
    """Potrace-style SVG path of a bbox-cropped mask, coordinates relative to the crop.

    Only M/L/C/z, commas between numbers, no spaces, leading zeros dropped,
    one ``M...z`` subpath per ring (outer boundaries and holes).
    """
    norm = _normalizer(mask)

    def fmt(pt) -> str:
        x, y = norm(pt)
        return format_refined_number(x) + "," + format_refined_number(y)

    out = []
    for ring in sorted(trace_rings(mask), key=lambda r: (min(p[1] for p in r), min(p[0] for p in r))):
        simple = simplify_ring(ring, tol)
        out.append(_ring_to_refined(simple, fmt))
    return "".join(out)


def coarse_path(mask: np.ndarray, tol: float | None = None) -> str:
    """Coarse streaming-style path: ``M 0.123 0.456 L 0.2 0.5 ... Z`` (space separated)."""
    norm = _normalizer(mask)
    if tol is None:
        tol = max(1.5, 0.02 * max(mask.shape))
    subpaths = []
    for ring in trace_rings(mask):
        simple = simplify_ring(ring, tol)
        if len(simple) < 3:
            continue
        coords = [norm(p) for p in simple]
        cmds = [f"M {coords[0][0]:.3f} {coords[0][1]:.3f}"]
        cmds += [f"L {x:.3f} {y:.3f}" for x, y in coords[1:]]
        cmds.append("Z")
        subpaths.append(" ".join(cmds))
    return " ".join(subpaths)


def split_path_chunks(path: str, parts: int = 4) -> list[str]:
    """Split a coarse path into about ``parts`` pieces at command boundaries; join gives back ``path``."""
    if not path:
        return []
    cuts = [m.start() for m in re.finditer(r" (?=[MLZ])", path)]
    if not cuts:
        return [path]
    step = max(1, math.ceil(len(cuts) / parts))
    chosen = cuts[step - 1 :: step][: parts - 1]
    pieces = []
    prev = 0
    for c in chosen:
        pieces.append(path[prev:c])
        prev = c
    pieces.append(path[prev:])
    return [p for p in pieces if p]
