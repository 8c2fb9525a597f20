"""Tiled detect and point: exact counts of small objects in big images, over any backend.

Moondream sees an image through at most 12 crops of 378 px (:func:`model_working_size`):
a 24 MP photo is looked at about 1176 px wide, so a 40 px object becomes 8 px and is
missed. :func:`tiled_detect` and :func:`tiled_point` decode the image once, cut it into
overlapping tiles the model sees (nearly) at full resolution, ask the backend about every
tile concurrently and put the answers back together in pixels of the whole upright image,
so that each object is counted exactly once.

Example::

    from moondream_tools import AsyncMoondream
    from moondream_tools.tiling import plan_tiles, tiled_detect, tiled_point

    async with AsyncMoondream() as md:
        people = await tiled_point(md, "crowd.jpg", "person", max_objects=200)
        print(len(people.points), "people;", len(people.tiles), "requests")
        if people.capped:
            print("a tile hit max_objects: there may be more")
        for tile in people.failed:
            print("tile", tile.index, tile.box, "failed:", tile.error)
        cars = await tiled_detect(md, "aerial.jpg", "car", tiling="always")
        boxes = cars.to_pixels()          # a Detections: every consumer of it works

The plan (:func:`plan_tiles`, pure arithmetic):

- Tile size: a tile is as large as the model sees without loss: its working size
  (:func:`model_working_size`) covers the tile on both axes, so the skill upload is the
  tile itself (``upload_sizes(tile) == tile``): about 1176 x 880 px for a 4:3 tile. The
  plan is the grid with the fewest such tiles (tiles no more elongated than 2:1); when it
  would need more than ``max_tiles``, tiles are grown to the grid of at most ``max_tiles``
  that the model shrinks least (:attr:`TilePlan.shrink`).
- Overlap: neighbouring tiles overlap by at least ``max(64, 16% of the tile's short
  side)`` px (:attr:`TilePlan.overlap`), so an object no larger than half the overlap lies
  wholly inside at least one tile.
- ``tiling="auto"`` tiles only when the image's long side is more than 4x the long side
  of the model's working size of the whole image (the model would shrink it more than 4x);
  ``"never"`` is one request; ``"always"`` uses the tiled plan whatever the size (an image
  that fits one lossless tile is still one request); ``(rows, cols)`` asks for that grid.

What ``"auto"`` costs with ``max_tiles=16`` (requests = tiles):

=============  ============  ========  =================  =======  ============  ===========
image          model sees    requests  grid, tile (px)    overlap  model shrink  lossless at
=============  ============  ========  =================  =======  ============  ===========
4000 x 3000    1176 x 644    1         1 x 1 (3.4x: no)   -        4.66x         16 tiles
6000 x 4000    1176 x 644    15        3 x 5, 1376x1480   220      1.63x         32 tiles
8000 x 6000    910 x 910     16        4 x 4, 2205x1705   273      1.88x         64 tiles
=============  ============  ========  =================  =======  ============  ===========

("lossless at": the requests of ``tiling="always", max_tiles=100``.)

Exactness (the ownership rule, then merging):

- Every tile has a *core*: the tile shrunk by half the overlap on every side that borders
  another tile (not on the image's borders). Cores partition the image exactly.
- A box (by its centre) or a point answered for tile T is kept only when it lies in T's
  core, grown by a slack of half a model patch (:attr:`TilePlan.patch`) on its inner
  sides. An object no larger than half the overlap is seen whole by the tile whose core
  holds its centre, and kept from that tile's answer; a piece of it cut by another tile's
  edge has its centre within half the object of that edge, outside that tile's core, and
  is dropped (for points, objects up to half the overlap less the slack: about 100 px
  for 6000 x 4000). So such objects are counted exactly once. The slack keeps an object
  centred on the border of two cores from being dropped by both tiles when their answers
  fall a pixel on the wrong sides; it is then kept twice and merged below.
- Merging across tiles (never two answers of one tile). Boxes merge by intersection over
  the smaller box (threshold 0.5, single linkage, merged box = union): kept boxes with
  each other, and any box with a box cut by its tile's edge, so the pieces of an object
  larger than the overlap (and a whole view of it that another tile dropped) join the kept
  piece. A group counts once: its box is an owner's whole view when an owner saw the object
  whole (not cut), else the union of the group. Points closer than one model patch (14 px
  of the model's working size, :attr:`TilePlan.patch` px of the image, 14 px for a lossless
  tile) merge into their mean: two answers for one object (from the two sides of a core
  border) land within a patch of each other, while two objects the model tells apart are at
  least a patch apart. Points carry no extent, so an object larger than the overlap may be
  counted once per tile holding a piece of it: count such objects with
  :func:`tiled_detect`.

One request (``"never"``, or ``"auto"`` on a normal photo) sends the image exactly as
``backend.detect`` / ``backend.point`` would, with the same result.

supervision's ``InferenceSlicer`` (and its NMS/NMM) is not used: supervision is an
optional extra the core cannot depend on; its callback is synchronous (threads over numpy
slices), not an async backend; its slices have a fixed size, not the model's lossless one;
it has no points; and its overlap filter is score-based (Moondream gives no scores) with no
idea which slice owns an object, so a cut piece overlapping the whole view less than the
threshold is counted twice, and two distinct objects one slice answered can be merged.
Ownership by core, and merging only answers of different tiles, is what makes counts exact.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ._transport import Timeout
from .backend import SamplingSettings, VisionBackend, check_object, check_settings, require_skill
from .errors import ImageError, MoondreamError
from .geometry import (
    intersection_over_smaller,
    merge_boxes,
    merge_points,
    pixels_to_box,
    pixels_to_point,
    tile_box_to_pixels,
    tile_point_to_pixels,
)
from .images import ImageInput, ImageSettings, PreparedImage, decode_image, model_working_size
from .images.decode import _check_pixels, _open_checked, _oriented_size
from .images.sizing import MODEL_CROP_MARGIN
from .images.sources import ReferenceKind, _describe, _load_source, reference_kind
from .results import Box, Detections, Point, Points

__all__ = [
    "TilingMode",
    "Tile",
    "TilePlan",
    "TileReport",
    "TiledDetections",
    "TiledPoints",
    "TiledImage",
    "plan_tiles",
    "tiled_detect",
    "tiled_point",
    "DEFAULT_MAX_TILES",
    "MIN_OVERLAP",
    "OVERLAP_FRACTION",
    "AUTO_TILE_FACTOR",
    "BOX_MERGE_THRESHOLD",
]

TilingMode = Literal["auto", "always", "never"]
"""``"auto"``: tile only images the model would shrink more than 4x; ``"always"``: the
tiled plan whatever the size; ``"never"``: one request. A ``(rows, cols)`` tuple asks for
that grid."""

#: Tiles at most, by default: the most requests one call costs.
DEFAULT_MAX_TILES = 16
#: Neighbouring tiles overlap by at least this many pixels ...
MIN_OVERLAP = 64
#: ... and by about this fraction of the tile's short side.
OVERLAP_FRACTION = 0.16
#: ``"auto"`` tiles when the image's long side is more than this times the long side of the
#: model's working size of the whole image.
AUTO_TILE_FACTOR = 4.0
#: Boxes from two tiles merge when their intersection covers this much of the smaller one.
BOX_MERGE_THRESHOLD = 0.5
#: Tiles are no more elongated than this (long side / short side).
_MAX_TILE_ASPECT = 2.0
#: Moondream's vision encoder patch, in pixels of its working size (sizing.py's margins are
#: 4 patches).
_MODEL_PATCH = MODEL_CROP_MARGIN // 4
_DEFAULT_CONCURRENCY = 8

PixelRect = tuple[int, int, int, int]


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TilePlan`, in pixels of the upright image.

    Attributes:
        index: position in :attr:`TilePlan.tiles` (row by row).
        row, col: its place in the grid.
        box: ``(x0, y0, x1, y1)``, x1 and y1 exclusive: the pixels sent for this tile.
        core: ``(x0, y0, x1, y1)``: the part of the image this tile answers for. The cores of
            a plan partition the image; an answer whose centre falls outside the core of its
            tile is dropped.
    """

    index: int
    row: int
    col: int
    box: PixelRect
    core: PixelRect

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class TilePlan:
    """How an image is cut into tiles (see :func:`plan_tiles`).

    Attributes:
        width, height: the upright image.
        rows, cols: the grid; ``tiles`` holds ``rows * cols`` tiles, row by row.
        overlap: the least overlap of two neighbouring tiles, in pixels (0 for one tile).
        tile_size: ``(width, height)`` of every tile.
        shrink: how much the model shrinks a tile on its most shrunk axis (1.0: it sees the
            tile at full resolution; for one tile, the whole image).
    """

    width: int
    height: int
    rows: int
    cols: int
    overlap: int
    tile_size: tuple[int, int]
    shrink: float
    tiles: list[Tile] = field(repr=False)

    @property
    def requests(self) -> int:
        """What the plan costs: one request per tile."""
        return len(self.tiles)

    @property
    def lossless(self) -> bool:
        """Whether the model sees every tile at full resolution."""
        return self.shrink <= 1.0

    @property
    def patch(self) -> float:
        """Pixels of the image one model patch (14 px of the model's working size) covers in a
        tile: points of two tiles closer than this are one object."""
        return _MODEL_PATCH * max(1.0, self.shrink)


def _model_shrink(width: int, height: int) -> float:
    """How much the model shrinks a ``width`` x ``height`` image on its most shrunk axis."""
    seen_w, seen_h = model_working_size(width, height)
    return max(width / seen_w, height / seen_h)


def _tile_side(length: int, count: int, overlap: int) -> int:
    return length if count == 1 else -(-(length + (count - 1) * overlap) // count)


def _layout(width: int, height: int, rows: int, cols: int) -> tuple[int, int, int] | None:
    """``(tile width, tile height, overlap)`` of a grid, or None when the image is too small
    for it (two tiles would start at the same pixel)."""
    overlap = MIN_OVERLAP
    for _ in range(4):  # the overlap is a fraction of the tile, which grows with the overlap
        tw, th = _tile_side(width, cols, overlap), _tile_side(height, rows, overlap)
        tiled = [side for side, count in ((tw, cols), (th, rows)) if count > 1]
        overlap = max(MIN_OVERLAP, round(OVERLAP_FRACTION * min(tiled))) if tiled else 0
    tw, th = _tile_side(width, cols, overlap), _tile_side(height, rows, overlap)
    if width - tw < cols - 1 or height - th < rows - 1:
        return None
    return tw, th, overlap


def _starts(length: int, side: int, count: int) -> list[int]:
    """Evenly spread tile starts, the first at 0 and the last ending at ``length``."""
    if count == 1:
        return [0]
    span = length - side
    return [(2 * i * span + count - 1) // (2 * (count - 1)) for i in range(count)]


def _bounds(length: int, side: int, starts: list[int]) -> list[int]:
    """Core borders: 0, the middle of every overlap, ``length``."""
    middles = [(starts[i + 1] + starts[i] + side) // 2 for i in range(len(starts) - 1)]
    return [0, *middles, length]


def _make_plan(width: int, height: int, rows: int, cols: int, tw: int, th: int, overlap: int) -> TilePlan:
    xs, ys = _starts(width, tw, cols), _starts(height, th, rows)
    bx, by = _bounds(width, tw, xs), _bounds(height, th, ys)
    tiles = [
        Tile(
            index=row * cols + col,
            row=row,
            col=col,
            box=(xs[col], ys[row], xs[col] + tw, ys[row] + th),
            core=(bx[col], by[row], bx[col + 1], by[row + 1]),
        )
        for row in range(rows)
        for col in range(cols)
    ]
    return TilePlan(
        width=width, height=height, rows=rows, cols=cols, overlap=overlap, tile_size=(tw, th),
        shrink=round(_model_shrink(tw, th), 4), tiles=tiles,
    )


def _best_grid(width: int, height: int, max_tiles: int) -> tuple[int, int, int, int, int]:
    """``(rows, cols, tile width, tile height, overlap)``: the fewest lossless tiles, else the
    grid of at most ``max_tiles`` the model shrinks least (then the fewest tiles)."""
    options: list[tuple[float, int, float, int, int, int, int, int]] = []
    for count in range(1, max_tiles + 1):
        for rows in range(1, count + 1):
            if count % rows:
                continue
            cols = count // rows
            layout = _layout(width, height, rows, cols)
            if layout is None:
                continue
            tw, th, overlap = layout
            aspect = max(tw / th, th / tw)
            if count > 1 and aspect > _MAX_TILE_ASPECT:
                continue
            shrink = _model_shrink(tw, th)
            options.append((round(max(shrink, 1.0), 2), count, aspect, rows, cols, tw, th, overlap))
        if any(option[0] <= 1.0 for option in options):
            break  # the fewest lossless tiles: nothing after them is better
    if not options:
        return 1, 1, width, height, 0
    _, _, _, rows, cols, tw, th, overlap = min(options)
    return rows, cols, tw, th, overlap


def _auto_tiles(width: int, height: int) -> bool:
    """The ``"auto"`` rule: the model would shrink the image's long side more than 4x."""
    seen = max(model_working_size(width, height))
    return max(width, height) > AUTO_TILE_FACTOR * seen


def plan_tiles(
    width: int,
    height: int,
    *,
    tiling: TilingMode | tuple[int, int] = "auto",
    max_tiles: int = DEFAULT_MAX_TILES,
) -> TilePlan:
    """The tiles for an upright ``width`` x ``height`` image (pure arithmetic).

    - The tile size is the largest the model sees without loss (its working size covers the
      tile on both axes, so ``upload_sizes(tile) == tile``): the plan is the grid with the
      fewest such tiles, no tile more elongated than 2:1. When that is more than
      ``max_tiles``, the tiles grow: the grid of at most ``max_tiles`` the model shrinks
      least is taken (:attr:`TilePlan.shrink` says by how much).
    - Neighbours overlap by at least ``max(64, 16% of the tile's short side)`` px; each
      tile's core is the tile shrunk by half the overlap on every side that borders another
      tile, so cores partition the image.
    - ``"auto"`` tiles only when the long side is more than 4x the long side of
      :func:`model_working_size` of the whole image: a 4000 x 3000 photo (seen at 1176 x 644:
      3.4x) is one request, a 6000 x 4000 one (5.1x) is 15. ``"never"``: one tile.
      ``"always"``: the tiled plan whatever the size. ``(rows, cols)``: that grid (at most
      ``max_tiles`` tiles).

    >>> plan = plan_tiles(6000, 4000)
    >>> plan.rows, plan.cols, plan.tile_size, plan.overlap, plan.requests
    (3, 5, (1376, 1480), 220, 15)
    >>> plan_tiles(4000, 3000).requests, plan_tiles(4000, 3000, tiling="always").requests
    (1, 16)
    >>> plan.tiles[0].box, plan.tiles[0].core
    ((0, 0, 1376, 1480), (0, 0, 1266, 1370))

    Raises:
        ValueError: a size or ``max_tiles`` below 1, an unknown mode, or a ``(rows, cols)``
            grid over ``max_tiles`` or too fine for the image.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    if isinstance(tiling, tuple):
        if len(tiling) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tiling):
            raise ValueError(f"a tiling grid must be (rows, cols) of positive integers, got {tiling!r}")
        rows, cols = tiling
        if rows * cols > max_tiles:
            raise ValueError(f"a {rows} x {cols} grid is {rows * cols} tiles, over max_tiles={max_tiles}")
        layout = _layout(width, height, rows, cols)
        if layout is None:
            raise ValueError(f"a {width}x{height} image is too small for a {rows} x {cols} grid of tiles")
        return _make_plan(width, height, rows, cols, *layout)
    if tiling not in ("auto", "always", "never"):
        raise ValueError(f"tiling must be 'auto', 'always', 'never' or (rows, cols), got {tiling!r}")
    if tiling == "never" or (tiling == "auto" and not _auto_tiles(width, height)):
        return _make_plan(width, height, 1, 1, width, height, 0)
    rows, cols, tw, th, overlap = _best_grid(width, height, max_tiles)
    return _make_plan(width, height, rows, cols, tw, th, overlap)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class TileReport(BaseModel):
    """What one tile's request gave.

    Attributes:
        index: the tile's index in the plan.
        box: the tile, ``(x0, y0, x1, y1)`` pixels of the upright image (x1, y1 exclusive).
        core: the part of the image the tile answers for.
        found: objects the backend answered for the tile.
        kept: those whose centre lies in the tile's core (before merging across tiles).
        capped: the tile's answer reached ``max_objects``: it may hold more.
        error: why the tile's request failed (its type and message), or None.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    index: int
    box: PixelRect
    core: PixelRect
    found: int = 0
    kept: int = 0
    capped: bool = False
    error: str | None = None


def _failed(tiles: list[TileReport]) -> list[TileReport]:
    return [tile for tile in tiles if tile.error is not None]


class _TileFacts(BaseModel):
    """How the tiles of one tiled call went (shared by :class:`TiledDetections` and
    :class:`TiledPoints`)."""

    tiles: list[TileReport] = Field(default_factory=list)
    capped: bool = False
    provenance: list[int] = Field(default_factory=list)

    @property
    def failed(self) -> list[TileReport]:
        """The tiles whose request failed: their regions were not looked at."""
        return _failed(self.tiles)


class TiledDetections(Detections, _TileFacts):
    """The boxes of :func:`tiled_detect`: a :class:`~moondream_tools.Detections` of the whole
    upright image (``objects`` normalized to it, ``image_size`` its size, ``to_pixels()``,
    ``to_supervision()``), plus how the tiles went.

    Attributes:
        tiles: a :class:`TileReport` per tile (one for a single request).
        capped: some tile reached ``max_objects``: there may be more objects.
        provenance: for each box of ``objects``, the index of the tile it came from.
        failed: the tiles whose request failed (property).
    """


class TiledPoints(Points, _TileFacts):
    """The points of :func:`tiled_point`: a :class:`~moondream_tools.Points` of the whole
    upright image, plus how the tiles went.

    Attributes:
        tiles: a :class:`TileReport` per tile (one for a single request).
        capped: some tile reached ``max_objects``: there may be more objects.
        provenance: for each point of ``points``, the index of the tile it came from.
        failed: the tiles whose request failed (property).
    """


# ---------------------------------------------------------------------------
# Running a plan
# ---------------------------------------------------------------------------


@dataclass
class _Source:
    """An image read once: what to decode, its upright size, and what to send untiled."""

    data: bytes | Image.Image | PreparedImage
    size: tuple[int, int]
    untiled: ImageInput


def _peek(data: bytes | Image.Image, settings: ImageSettings) -> tuple[int, int]:
    """The upright size of an image, from its header (blocking)."""
    img = _open_checked(data, settings) if isinstance(data, bytes) else data
    _check_pixels(img, settings)
    try:
        return _oriented_size(img)
    except Exception as exc:  # reading EXIF may read (and fail on) more of a corrupt file
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None


async def _read(image: ImageInput, settings: ImageSettings) -> _Source:
    if isinstance(image, PreparedImage):
        return _Source(image, (image.width, image.height), image)
    try:
        if isinstance(image, str) and reference_kind(image) is ReferenceKind.URL:
            async with aiohttp.ClientSession() as session:
                data = await _load_source(image, session, settings)
        else:
            data = await _load_source(image, None, settings)
        size = await asyncio.to_thread(_peek, data, settings)
    except ImageError as exc:
        raise ImageError(f"{_describe(image)}: {exc}") from None
    # Sent untiled as given, unless reading it again would download it again or find a file
    # object already read: then the bytes read here.
    reread = callable(getattr(image, "read", None)) or (
        isinstance(image, str) and reference_kind(image) is ReferenceKind.URL
    )
    return _Source(data, size, data if reread else image)


def _in_core(x: float, y: float, core: PixelRect, width: int, height: int, slack: float = 0.0) -> bool:
    """Whether ``(x, y)`` lies in ``core`` grown by ``slack`` px on its sides inside the image.

    Half-open (a border between two cores belongs to the second), except that the image's
    right and bottom edges belong to the last core.
    """
    x0, y0, x1, y1 = core
    inside_x = x >= x0 - slack and (x < x1 + slack or x1 == width)
    inside_y = y >= y0 - slack and (y < y1 + slack or y1 == height)
    return inside_x and inside_y


def _is_cut(box: Sequence[float], tile: Tile, width: int, height: int, reach: float) -> bool:
    """Whether ``box`` reaches (within ``reach`` px) a side of ``tile`` that borders another tile."""
    x0, y0, x1, y1 = tile.box
    return (
        (x0 > 0 and box[0] <= x0 + reach)
        or (y0 > 0 and box[1] <= y0 + reach)
        or (x1 < width and box[2] >= x1 - reach)
        or (y1 < height and box[3] >= y1 - reach)
    )


def _concurrency(backend: VisionBackend, concurrency: int | None, tiles: int) -> int:
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        return concurrency
    if hasattr(backend, "max_concurrency"):
        limit = backend.max_concurrency
        return max(1, tiles) if limit is None else int(limit)  # None: the backend sets no limit
    return _DEFAULT_CONCURRENCY


def _tile_settings(settings: SamplingSettings | None, max_objects: int | None) -> tuple[dict[str, Any] | None, int | None]:
    values = check_settings(settings)
    if max_objects is not None:
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise ValueError(f"max_objects must be a positive integer, got {max_objects!r}")
        values = {**(values or {}), "max_objects": max_objects}
    limit = values.get("max_objects") if values else None
    return values, limit if isinstance(limit, int) else None


def _failed_report(tile: Tile, error: MoondreamError) -> TileReport:
    return TileReport(index=tile.index, box=tile.box, core=tile.core, error=f"{type(error).__name__}: {error}")


class TiledImage:
    """An image ready to be asked about tile by tile: read and decoded once, each tile cropped
    and prepared once, then any number of phrases and skills (``detect``, ``point``), all
    sharing one bound on requests in flight.

    Open it with :meth:`open`; :func:`tiled_detect` and :func:`tiled_point` are one-phrase
    shortcuts. When the plan is one request the image is sent as is (no decode here).

    Example::

        tiled = await TiledImage.open(md, "field.jpg", max_tiles=16)
        cars, people = await asyncio.gather(tiled.point("car"), tiled.point("person"))
        print(tiled.plan.requests, len(cars.points), len(people.points))
    """

    def __init__(
        self, backend: VisionBackend, image: ImageInput, source: _Source, plan: TilePlan,
        rgb: Image.Image | None, concurrency: int,
    ) -> None:
        self.backend = backend
        self.plan = plan
        self._image = image
        self._source = source
        self._rgb = rgb
        self._sending = asyncio.Semaphore(concurrency)
        self._preparing = asyncio.Semaphore(max(1, min(concurrency, os.cpu_count() or 1)))
        self._locks = [asyncio.Lock() for _ in plan.tiles]
        self._prepared: list[PreparedImage | None] = [None] * len(plan.tiles)

    @classmethod
    async def open(
        cls,
        backend: VisionBackend,
        image: ImageInput,
        *,
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        concurrency: int | None = None,
        image_settings: ImageSettings | None = None,
    ) -> TiledImage:
        """Read ``image`` once (under ``image_settings``' limits, default the backend's), plan
        its tiles, and decode it once, upright, when more than one tile is planned.

        Raises:
            ImageError: the image cannot be read or is over the limits.
            ValueError: bad options, or a PreparedImage (downscaled already) that needs tiles.
        """
        settings = image_settings or backend.image_settings
        source = await _read(image, settings)
        plan = plan_tiles(*source.size, tiling=tiling, max_tiles=max_tiles)
        limit = _concurrency(backend, concurrency, plan.requests)
        if plan.requests == 1:
            return cls(backend, image, source, plan, None, limit)
        if isinstance(source.data, PreparedImage):
            raise ValueError(
                "a PreparedImage holds only the downscaled upload: pass the original image to tile it"
                f" (this {plan.width}x{plan.height} image plans {plan.requests} tiles), or tiling='never'"
            )
        try:
            rgb, upright = await asyncio.to_thread(decode_image, source.data, settings)
        except ImageError as exc:
            raise ImageError(f"{_describe(image)}: {exc}") from None
        if upright != source.size:  # pragma: no cover - the header and the decoder agree
            raise ImageError(f"{_describe(image)}: decoded as {upright}, its header said {source.size}")
        return cls(backend, image, source, plan, rgb, limit)

    async def detect(
        self, object: str, *, max_objects: int | None = None, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> TiledDetections:
        """Boxes of every ``object``, each once (see :func:`tiled_detect`)."""
        result = await self._ask("detect", object, max_objects, settings, timeout, max_retries)
        assert isinstance(result, TiledDetections)
        return result

    async def point(
        self, object: str, *, max_objects: int | None = None, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> TiledPoints:
        """A point on every ``object``, each once (see :func:`tiled_point`)."""
        result = await self._ask("point", object, max_objects, settings, timeout, max_retries)
        assert isinstance(result, TiledPoints)
        return result

    async def _tile(self, tile: Tile) -> PreparedImage:
        """The tile, cropped and prepared on first use (one CPU's worth at a time, so the
        first requests leave while later tiles are encoded)."""
        async with self._locks[tile.index]:
            prepared = self._prepared[tile.index]
            if prepared is None:
                assert self._rgb is not None
                async with self._preparing:
                    crop = await asyncio.to_thread(self._rgb.crop, tile.box)
                    prepared = self._prepared[tile.index] = await self.backend.prepare(crop)
            return prepared

    async def _ask(
        self, skill: Literal["detect", "point"], object: str, max_objects: int | None,
        settings: SamplingSettings | None, timeout: float | Timeout | None, max_retries: int | None,
    ) -> TiledDetections | TiledPoints:
        check_object(object)
        require_skill(self.backend, skill)
        values, limit = _tile_settings(settings, max_objects)
        method = self.backend.detect if skill == "detect" else self.backend.point

        async def ask(img: ImageInput) -> Any:
            return await method(img, object, settings=values, timeout=timeout, max_retries=max_retries)  # type: ignore[arg-type]

        if self.plan.requests == 1:
            async with self._sending:
                return _untiled(skill, await ask(self._source.untiled), self.plan, limit)

        async def one(tile: Tile) -> Any:
            try:
                prepared = await self._tile(tile)
                async with self._sending:
                    return await ask(prepared)
            except MoondreamError as error:
                return error

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(tile)) for tile in self.plan.tiles]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        answers = [task.result() for task in tasks]
        errors = [answer for answer in answers if isinstance(answer, MoondreamError)]
        if len(errors) == len(answers):
            raise errors[0]
        if skill == "detect":
            return _assemble_boxes(self.plan, answers, object, limit)
        return _assemble_points(self.plan, answers, object, limit)


async def _tiled(
    skill: Literal["detect", "point"],
    backend: VisionBackend,
    image: ImageInput,
    object: str,
    *,
    tiling: TilingMode | tuple[int, int],
    max_tiles: int,
    max_objects: int | None,
    concurrency: int | None,
    settings: SamplingSettings | None,
    timeout: float | Timeout | None,
    max_retries: int | None,
    image_settings: ImageSettings | None,
) -> TiledDetections | TiledPoints:
    check_object(object)
    require_skill(backend, skill)
    _tile_settings(settings, max_objects)  # refuse bad options before reading the image
    tiled = await TiledImage.open(
        backend, image, tiling=tiling, max_tiles=max_tiles, concurrency=concurrency, image_settings=image_settings
    )
    if skill == "detect":
        return await tiled.detect(object, max_objects=max_objects, settings=settings, timeout=timeout, max_retries=max_retries)
    return await tiled.point(object, max_objects=max_objects, settings=settings, timeout=timeout, max_retries=max_retries)


def _untiled(
    skill: str, result: Detections | Points, plan: TilePlan, limit: int | None
) -> TiledDetections | TiledPoints:
    found = len(result.objects) if isinstance(result, Detections) else len(result.points)
    tile = plan.tiles[0]
    report = TileReport(
        index=0, box=tile.box, core=tile.core, found=found, kept=found,
        capped=limit is not None and found >= limit,
    )
    cls: type[TiledDetections] | type[TiledPoints] = TiledDetections if skill == "detect" else TiledPoints
    return cls(**dict(result), tiles=[report], capped=report.capped, provenance=[0] * found)


def _assemble_boxes(
    plan: TilePlan, answers: list[Detections | MoondreamError], object: str, limit: int | None
) -> TiledDetections:
    width, height = plan.width, plan.height
    slack = plan.patch / 2
    boxes: list[tuple[float, float, float, float]] = []
    tile_of: list[int] = []
    kept: list[bool] = []  # centre in the tile's core (with the slack)
    central: list[bool] = []  # centre in the tile's core proper
    cut: list[bool] = []  # reaches a side of the tile that borders another tile
    reports: list[TileReport] = []
    for tile, answer in zip(plan.tiles, answers):
        if isinstance(answer, MoondreamError):
            reports.append(_failed_report(tile, answer))
            continue
        owned = 0
        for b in answer.objects:
            box = tile_box_to_pixels((b.x_min, b.y_min, b.x_max, b.y_max), tile.box)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            inside = _in_core(cx, cy, tile.core, width, height, slack)
            owned += inside
            boxes.append(box)
            tile_of.append(tile.index)
            kept.append(inside)
            central.append(_in_core(cx, cy, tile.core, width, height))
            cut.append(_is_cut(box, tile, width, height, plan.patch))
        found = len(answer.objects)
        reports.append(TileReport(
            index=tile.index, box=tile.box, core=tile.core, found=found, kept=owned,
            capped=limit is not None and found >= limit,
        ))

    def linkable(i: int, j: int) -> bool:  # kept with kept; anything with a cut piece
        return (kept[i] and kept[j]) or cut[i] or cut[j]

    def overlap(i: int, j: int) -> float:
        """Intersection over the smaller box; for two pieces each cut by its tile's edge,
        measured where both tiles saw the image: a big object cut across a border shows
        each tile a different part, and only the shared strip can show they are one."""
        whole = intersection_over_smaller(boxes[i], boxes[j])
        if whole >= BOX_MERGE_THRESHOLD or not (cut[i] and cut[j]):
            return whole
        a, b = plan.tiles[tile_of[i]].box, plan.tiles[tile_of[j]].box
        shared = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
        clipped = [
            (max(box[0], shared[0]), max(box[1], shared[1]), min(box[2], shared[2]), min(box[3], shared[3]))
            for box in (boxes[i], boxes[j])
        ]
        if any(c[0] >= c[2] or c[1] >= c[3] for c in clipped):
            return whole
        return max(whole, intersection_over_smaller(clipped[0], clipped[1]))

    merged, groups = merge_boxes(
        boxes, threshold=BOX_MERGE_THRESHOLD, keys=tile_of, linkable=linkable, overlap=overlap
    )
    chosen: list[tuple[int, tuple[float, float, float, float]]] = []
    for union, group in zip(merged, groups):
        owners = [i for i in group if kept[i]]
        if not owners:
            continue  # pieces and views of an object that another group counts
        whole = [i for i in owners if not cut[i]]
        if whole:  # an owner saw it whole: that view (the one in its core proper, if any)
            best = next((i for i in whole if central[i]), whole[0])
            chosen.append((best, boxes[best]))
        else:  # cut in every owner: the union of its pieces and of any whole view
            chosen.append((next((i for i in owners if central[i]), owners[0]), union))
    chosen.sort(key=lambda item: item[0])
    objects = []
    for _, box in chosen:
        x0, y0, x1, y1 = pixels_to_box(box, width, height)
        objects.append(Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1))
    return TiledDetections(
        objects=objects,
        object=object,
        image_size={"width": width, "height": height},
        tiles=reports,
        capped=any(r.capped for r in reports),
        provenance=[tile_of[i] for i, _ in chosen],
    )


def _assemble_points(
    plan: TilePlan, answers: list[Points | MoondreamError], object: str, limit: int | None
) -> TiledPoints:
    width, height = plan.width, plan.height
    slack = plan.patch / 2
    points: list[tuple[float, float]] = []
    tile_of: list[int] = []
    central: list[bool] = []
    reports: list[TileReport] = []
    for tile, answer in zip(plan.tiles, answers):
        if isinstance(answer, MoondreamError):
            reports.append(_failed_report(tile, answer))
            continue
        owned = 0
        for p in answer.points:
            x, y = tile_point_to_pixels((p.x, p.y), tile.box)
            if _in_core(x, y, tile.core, width, height, slack):
                owned += 1
                points.append((x, y))
                tile_of.append(tile.index)
                central.append(_in_core(x, y, tile.core, width, height))
        found = len(answer.points)
        reports.append(TileReport(
            index=tile.index, box=tile.box, core=tile.core, found=found, kept=owned,
            capped=limit is not None and found >= limit,
        ))
    merged, groups = merge_points(points, radius=plan.patch, keys=tile_of)
    result = []
    for point in merged:
        x, y = pixels_to_point(point, width, height)
        result.append(Point(x=x, y=y))
    return TiledPoints(
        points=result,
        object=object,
        image_size={"width": width, "height": height},
        tiles=reports,
        capped=any(r.capped for r in reports),
        provenance=[tile_of[next((i for i in group if central[i]), group[0])] for group in groups],
    )


async def tiled_detect(
    backend: VisionBackend,
    image: ImageInput,
    object: str,
    *,
    tiling: TilingMode | tuple[int, int] = "auto",
    max_tiles: int = DEFAULT_MAX_TILES,
    max_objects: int | None = None,
    concurrency: int | None = None,
    settings: SamplingSettings | None = None,
    timeout: float | Timeout | None = None,
    max_retries: int | None = None,
    image_settings: ImageSettings | None = None,
) -> TiledDetections:
    """Boxes of every ``object`` in a big image, tile by tile, each object once.

    The image (any :data:`~moondream_tools.images.ImageInput`) is read and decoded once,
    upright (EXIF applied) and under ``backend.image_settings``' limits; every tile of
    :func:`plan_tiles` is cropped from it, prepared once (``backend.prepare``) and sent as
    ``backend.detect(tile, object, settings={"max_objects": max_objects, ...})``, at most
    ``concurrency`` at a time (default: the backend's ``max_concurrency``, else 8). Boxes come
    back in pixels of the whole image; ownership by core and merging across tiles (module
    docstring) count every object no larger than half the overlap exactly once.

    Cost: :attr:`TilePlan.requests` requests; with ``"auto"`` and ``max_tiles=16``, 1 for a
    4000 x 3000 photo, 15 for 6000 x 4000, 16 for 8000 x 6000. When one request is planned
    the image is sent as is: the result equals ``backend.detect(image, object, ...)``'s.

    Args:
        tiling: ``"auto"`` (tile when the model would shrink the image more than 4x),
            ``"always"``, ``"never"`` or a ``(rows, cols)`` grid.
        max_tiles: the most tiles (requests) the plan may use; tiles grow to respect it.
        max_objects: sent to every tile; a tile answering that many is reported ``capped``.
        concurrency: tiles prepared and requests in flight at once.
        settings, timeout, max_retries: as for ``backend.detect``, for every tile.
        image_settings: the limits the image is read under (default the backend's), e.g.
            an :class:`~moondream_tools.ImagePolicy`'s for an image a model named.

    Returns:
        A :class:`TiledDetections` (a ``Detections``) with ``tiles``, ``capped``,
        ``provenance`` and ``failed``. A tile whose request fails with a
        :class:`~moondream_tools.MoondreamError` is reported in ``failed`` (its region and the
        error) and the other tiles' boxes are kept.

    Raises:
        MoondreamError: the first tile's error when every tile failed; ImageError for an
            image that cannot be read; UnsupportedSkillError without ``detect``.
        ValueError: bad options, or a PreparedImage (downscaled already) that needs tiles.
    """
    result = await _tiled(
        "detect", backend, image, object, tiling=tiling, max_tiles=max_tiles, max_objects=max_objects,
        concurrency=concurrency, settings=settings, timeout=timeout, max_retries=max_retries,
        image_settings=image_settings,
    )
    assert isinstance(result, TiledDetections)
    return result


async def tiled_point(
    backend: VisionBackend,
    image: ImageInput,
    object: str,
    *,
    tiling: TilingMode | tuple[int, int] = "auto",
    max_tiles: int = DEFAULT_MAX_TILES,
    max_objects: int | None = None,
    concurrency: int | None = None,
    settings: SamplingSettings | None = None,
    timeout: float | Timeout | None = None,
    max_retries: int | None = None,
    image_settings: ImageSettings | None = None,
) -> TiledPoints:
    """A point on every ``object`` in a big image, tile by tile, each object once.

    Works as :func:`tiled_detect` (same arguments, same cost, one decode of the image), with
    ``backend.point`` on each tile: points outside their tile's core are dropped, and points
    of two tiles closer than :attr:`TilePlan.patch` px (one model patch) are merged into
    their mean. Counting a crowd::

        people = await tiled_point(md, "crowd.jpg", "person", max_objects=200)
        print(len(people.points), "at least" if people.capped else "exactly")

    Returns:
        A :class:`TiledPoints` (a ``Points``) with ``tiles``, ``capped``, ``provenance``
        and ``failed``.
    """
    result = await _tiled(
        "point", backend, image, object, tiling=tiling, max_tiles=max_tiles, max_objects=max_objects,
        concurrency=concurrency, settings=settings, timeout=timeout, max_retries=max_retries,
        image_settings=image_settings,
    )
    assert isinstance(result, TiledPoints)
    return result
