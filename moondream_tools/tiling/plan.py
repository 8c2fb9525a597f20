"""Tile plans: how a large upright image is cut into overlapping tiles the model sees without loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..images import model_working_size
from ..images.sizing import MODEL_CROP_MARGIN

__all__ = [
    "AUTO_TILE_FACTOR",
    "BOX_MERGE_THRESHOLD",
    "DEFAULT_MAX_TILES",
    "MIN_OVERLAP",
    "OVERLAP_FRACTION",
    "PixelRect",
    "Tile",
    "TilePlan",
    "TilingMode",
    "plan_tiles",
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
