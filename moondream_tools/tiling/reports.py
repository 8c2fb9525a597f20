"""What a tiled call reports: per-tile reports and the tiled result types."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..results import Detections, Points
from .plan import PixelRect

__all__ = ["TileReport", "TiledDetections", "TiledPoints"]



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
