"""Merging boxes and points found in overlapping tiles of one image (pure Python).

The tiled detect and point of :mod:`moondream_tools.tiling` cut a big image into
overlapping tiles, ask the model about each, and put the answers back together here:

- :func:`tile_box_to_pixels` / :func:`tile_point_to_pixels`: a coordinate normalized to a
  tile -> pixels of the whole image (the tile is a pixel box of the image);
- :func:`intersection_over_smaller`: how much of the smaller of two boxes the other
  covers. Unlike IoU it is 1 for a piece of an object cut by a tile edge against the
  whole object, which is why non-maximum merging (NMM) of tiles uses it;
- :func:`merge_boxes`: NMM with single linkage: boxes whose intersection covers at least
  ``threshold`` of the smaller one join one group, whose merged box is their union;
- :func:`merge_points`: points closer than ``radius`` join one group, merged into their mean.

Both merges take ``keys`` (e.g. the tile each box came from): two items with one key never
join a group, since a model that answered twice for one tile meant two objects. Both are
exact and deterministic (no scores, no randomness) and run in about O(n) on spread-out
items (a grid of buckets finds the candidates).

Pure Python on purpose, no numpy and no supervision: the core package cannot depend on
supervision (an optional extra), and these are a few dozen lines of arithmetic.

>>> intersection_over_smaller((0, 0, 10, 10), (5, 0, 10, 10))     # a cut piece of a box
1.0
>>> merge_boxes([(0, 0, 60, 40), (40, 0, 70, 40), (300, 0, 340, 40)], threshold=0.5)
([(0, 0, 70, 40), (300, 0, 340, 40)], [[0, 1], [2]])
>>> merge_points([(10.0, 10.0), (13.0, 14.0), (100.0, 10.0)], radius=8)
([(11.5, 12.0), (100.0, 10.0)], [[0, 1], [2]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

from .coords import box_to_pixels, point_to_pixels

__all__ = [
    "tile_box_to_pixels",
    "tile_point_to_pixels",
    "intersection_over_smaller",
    "union_box",
    "merge_boxes",
    "merge_points",
]

BoxT = tuple[float, float, float, float]
PointT = tuple[float, float]


def _tile_origin(tile: Sequence[float]) -> tuple[float, float, int, int]:
    x0, y0, x1, y1 = tile
    return x0, y0, int(x1 - x0), int(y1 - y0)


def tile_box_to_pixels(box: Sequence[float], tile: Sequence[float]) -> BoxT:
    """A box normalized to ``tile`` (a pixel box ``(x0, y0, x1, y1)`` of the image) -> pixels
    of the whole image, clamped to the tile and ordered.

    >>> tile_box_to_pixels((0.5, 0.25, 1.0, 0.5), (1000, 400, 1200, 800))
    (1100.0, 500.0, 1200.0, 600.0)
    """
    x0, y0, width, height = _tile_origin(tile)
    bx0, by0, bx1, by1 = box_to_pixels((box[0], box[1], box[2], box[3]), width, height)
    return (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)


def tile_point_to_pixels(point: Sequence[float], tile: Sequence[float]) -> PointT:
    """A point normalized to ``tile`` (a pixel box of the image) -> pixels of the whole image.

    >>> tile_point_to_pixels((0.5, 0.5), (1000, 400, 1200, 800))
    (1100.0, 600.0)
    """
    x0, y0, width, height = _tile_origin(tile)
    px, py = point_to_pixels((point[0], point[1]), width, height)
    return (x0 + px, y0 + py)


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection_over_smaller(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of ``a`` ∩ ``b`` over the area of the smaller box (0.0 when either is empty).

    >>> intersection_over_smaller((0, 0, 10, 10), (5, 5, 25, 25))
    0.25
    >>> intersection_over_smaller((0, 0, 10, 10), (10, 0, 20, 10))   # touching: no overlap
    0.0
    """
    smaller = min(_area(a), _area(b))
    if smaller <= 0.0:
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / smaller


def union_box(boxes: Sequence[Sequence[float]]) -> BoxT:
    """The smallest box holding every one of ``boxes`` (at least one).

    >>> union_box([(0, 5, 10, 10), (4, 0, 20, 8)])
    (0, 0, 20, 10)
    """
    if not boxes:
        raise ValueError("union_box needs at least one box")
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _check_keys(keys: Sequence[Hashable] | None, count: int) -> Sequence[Hashable]:
    if keys is None:
        return range(count)  # every item its own key: any two may merge
    if len(keys) != count:
        raise ValueError(f"keys must have one key per item: {len(keys)} keys for {count} items")
    return keys


def _grow(
    count: int,
    order: list[int],
    keys: Sequence[Hashable],
    neighbours: Callable[[int], list[int]],
    joins: Callable[[int, int], bool],
) -> list[list[int]]:
    """Single-linkage groups: from each unassigned item (in ``order``), every unassigned item
    linked to a member joins, unless its key is already in the group."""
    group_of = [-1] * count
    groups: list[list[int]] = []
    for seed in order:
        if group_of[seed] != -1:
            continue
        members = [seed]
        group_of[seed] = len(groups)
        taken = {keys[seed]}
        frontier = [seed]
        while frontier:
            i = frontier.pop()
            for j in neighbours(i):
                if group_of[j] == -1 and keys[j] not in taken and joins(i, j):
                    group_of[j] = len(groups)
                    taken.add(keys[j])
                    members.append(j)
                    frontier.append(j)
        groups.append(sorted(members))
    groups.sort(key=lambda g: g[0])
    return groups


def _box_neighbours(boxes: Sequence[Sequence[float]]) -> Callable[[int], list[int]]:
    """Candidates that may intersect box i, from a grid of buckets."""
    sides = sorted(max(b[2] - b[0], b[3] - b[1]) for b in boxes)
    cell = max(1.0, sides[len(sides) // 2], sides[-1] / 16)
    buckets: dict[tuple[int, int], list[int]] = {}

    def cells(box: Sequence[float]) -> list[tuple[int, int]]:
        cx0, cy0 = math.floor(box[0] / cell), math.floor(box[1] / cell)
        cx1, cy1 = math.floor(box[2] / cell), math.floor(box[3] / cell)
        return [(cx, cy) for cx in range(cx0, cx1 + 1) for cy in range(cy0, cy1 + 1)]

    for index, box in enumerate(boxes):
        for key in cells(box):
            buckets.setdefault(key, []).append(index)

    def neighbours(i: int) -> list[int]:
        found: set[int] = set()
        for key in cells(boxes[i]):
            found.update(buckets.get(key, ()))
        found.discard(i)
        return sorted(found)

    return neighbours


def merge_boxes(
    boxes: Sequence[Sequence[float]],
    *,
    threshold: float = 0.5,
    keys: Sequence[Hashable] | None = None,
    linkable: Callable[[int, int], bool] | None = None,
    overlap: Callable[[int, int], float] | None = None,
) -> tuple[list[BoxT], list[list[int]]]:
    """Non-maximum merging by intersection over the smaller box, with single linkage.

    Two boxes are linked when :func:`intersection_over_smaller` is at least ``threshold``,
    their ``keys`` differ (default: every box its own key) and ``linkable(i, j)`` (if given)
    allows it; ``overlap(i, j)`` (if given) replaces :func:`intersection_over_smaller` as the
    measure compared with ``threshold`` (a caller that knows where each box was cut can
    compare the parts both views saw). Groups grow from the largest box not yet grouped; a box joins a group when it
    is linked to any member and its key is not in the group yet. Returns the union of each
    group and the groups (indices into ``boxes``, ascending), ordered by their first index.

    Boxes are ``(x_min, y_min, x_max, y_max)`` in any one frame (pixels, normalized).

    >>> merged, groups = merge_boxes([(0, 0, 50, 40), (35, 0, 60, 40), (0, 0, 50, 40)],
    ...                              keys=["tile 0", "tile 1", "tile 0"])
    >>> merged, groups        # the second box of tile 0 stays apart: one tile, two objects
    ([(0, 0, 60, 40), (0, 0, 50, 40)], [[0, 1], [2]])
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    count = len(boxes)
    if count == 0:
        return [], []
    key_of = _check_keys(keys, count)
    order = sorted(range(count), key=lambda i: (-_area(boxes[i]), i))

    def joins(i: int, j: int) -> bool:
        measure = overlap(i, j) if overlap is not None else intersection_over_smaller(boxes[i], boxes[j])
        if measure < threshold:
            return False
        return linkable is None or linkable(i, j)

    groups = _grow(count, order, key_of, _box_neighbours(boxes), joins)
    return [union_box([boxes[i] for i in group]) for group in groups], groups


def merge_points(
    points: Sequence[Sequence[float]],
    *,
    radius: float,
    keys: Sequence[Hashable] | None = None,
) -> tuple[list[PointT], list[list[int]]]:
    """Points closer than ``radius`` (with different ``keys``) joined by single linkage.

    Returns the mean of each group and the groups (indices, ascending), ordered by their
    first index. ``radius`` 0 merges nothing.

    >>> merge_points([(0, 0), (3, 4), (6, 8)], radius=5.5)    # a chain: 5 apart, 10 end to end
    ([(3.0, 4.0)], [[0, 1, 2]])
    """
    if radius < 0 or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    count = len(points)
    if count == 0:
        return [], []
    key_of = _check_keys(keys, count)
    cell = max(radius, 1e-9)
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, p in enumerate(points):
        buckets.setdefault((math.floor(p[0] / cell), math.floor(p[1] / cell)), []).append(index)

    def neighbours(i: int) -> list[int]:
        cx, cy = math.floor(points[i][0] / cell), math.floor(points[i][1] / cell)
        found = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in buckets.get((cx + dx, cy + dy), ())]
        return sorted(j for j in found if j != i)

    def joins(i: int, j: int) -> bool:
        return math.dist(points[i][:2], points[j][:2]) < radius

    groups = _grow(count, list(range(count)), key_of, neighbours, joins)
    merged = [
        (
            sum(points[i][0] for i in group) / len(group),
            sum(points[i][1] for i in group) / len(group),
        )
        for group in groups
    ]
    return merged, groups
