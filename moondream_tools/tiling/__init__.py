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

from .plan import (
    AUTO_TILE_FACTOR,
    BOX_MERGE_THRESHOLD,
    DEFAULT_MAX_TILES,
    MIN_OVERLAP,
    OVERLAP_FRACTION,
    Tile,
    TilePlan,
    TilingMode,
    plan_tiles,
)
from .reports import TiledDetections, TiledPoints, TileReport
from .run import TiledImage, tiled_detect, tiled_point

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
