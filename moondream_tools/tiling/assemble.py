"""Putting tile answers together: core ownership, merges across tiles, full-image coordinates."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MoondreamError
from ..geometry import (
    intersection_over_smaller,
    merge_boxes,
    merge_points,
    pixels_to_box,
    pixels_to_point,
    tile_box_to_pixels,
    tile_point_to_pixels,
)
from ..results import Box, Detections, Point, Points
from .plan import BOX_MERGE_THRESHOLD, PixelRect, Tile, TilePlan
from .reports import TiledDetections, TiledPoints, TileReport

__all__: list[str] = []


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


def _failed_report(tile: Tile, error: MoondreamError) -> TileReport:
    return TileReport(index=tile.index, box=tile.box, core=tile.core, error=f"{type(error).__name__}: {error}")


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
