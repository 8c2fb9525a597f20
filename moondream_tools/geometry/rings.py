"""Rings (closed polylines): the :data:`Ring` type, signed area, containment and nesting.

:func:`nest_rings` groups rings into polygons with holes by even-odd nesting depth,
using a ray-casting containment test.
"""

from __future__ import annotations

from collections.abc import Sequence


Ring = list[tuple[float, float]]
"""A closed polyline, closure implied (the last point is not a repeat of the first)."""


def ring_area(ring: Ring) -> float:
    """Signed shoelace area of a ring, ``sum(x_i * y_(i+1) - x_(i+1) * y_i) / 2``.

    In image coordinates (y down) it is positive when the ring turns clockwise on
    screen (right, then down) and negative when it turns counter-clockwise (which is
    the mathematical positive orientation once y points up). Use ``abs()`` for the area.

    >>> ring_area([(0, 0), (10, 0), (10, 10), (0, 10)])   # right, down, left: clockwise on screen
    100.0
    >>> ring_area([(0, 0), (0, 10), (10, 10), (10, 0)])
    -100.0
    """
    n = len(ring)
    if n < 3:
        return 0.0
    total = 0.0
    px, py = ring[-1]
    for x, y in ring:
        total += px * y - x * py
        px, py = x, y
    return total / 2.0


def _contains(ring: Ring, x: float, y: float) -> int:
    """1 inside, 0 outside, -1 on the boundary (even-odd ray casting)."""
    inside = False
    px, py = ring[-1]
    for qx, qy in ring:
        # On the segment?
        if min(px, qx) <= x <= max(px, qx) and min(py, qy) <= y <= max(py, qy):
            cross = (qx - px) * (y - py) - (qy - py) * (x - px)
            if abs(cross) <= 1e-9 * (abs(qx - px) + abs(qy - py) + 1.0):
                return -1
        if (py > y) != (qy > y):
            xi = px + (y - py) * (qx - px) / (qy - py)
            if x < xi:
                inside = not inside
        px, py = qx, qy
    return 1 if inside else 0


def _ring_inside(inner: Ring, outer: Ring, outer_box: tuple[float, float, float, float]) -> bool:
    x0, y0, x1, y1 = outer_box
    verdict = 0
    for x, y in inner:
        if x < x0 or x > x1 or y < y0 or y > y1:
            return False
        side = _contains(outer, x, y)
        if side >= 0:
            return side == 1
        verdict += 1
        if verdict > 16:  # the rings share a long stretch of boundary: try midpoints
            break
    for (ax, ay), (bx, by) in zip(inner, inner[1:] + inner[:1]):
        side = _contains(outer, (ax + bx) / 2, (ay + by) / 2)
        if side >= 0:
            return side == 1
    return False


def nest_rings(rings: Sequence[Ring]) -> list[tuple[Ring, list[Ring]]]:
    """Group rings into polygons ``(outer, holes)`` by even-odd nesting depth.

    A ring inside no other ring is an outer boundary (depth 0); a ring directly inside an
    outer one is its hole (depth 1); a ring inside a hole is a new outer boundary (an
    island, depth 2), and so on. Containment is tested with a vertex of the inner ring
    (the next one when a vertex lies on the other ring). Orientation is left as given;
    see :func:`ring_area` to orient rings, e.g. for GeoJSON. Rings with fewer than 3
    points are ignored. Outer rings keep their input order, as do holes.

    >>> square = lambda a, b: [(a, a), (b, a), (b, b), (a, b)]
    >>> [(outer[0], [h[0] for h in holes]) for outer, holes in nest_rings([square(0, 9), square(3, 6)])]
    [((0, 0), [(3, 3)])]
    """
    items = [ring for ring in rings if len(ring) >= 3]
    boxes = []
    for ring in items:
        xs = [p[0] for p in ring]
        ys = [p[1] for p in ring]
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    areas = [abs(ring_area(ring)) for ring in items]
    n = len(items)
    parents: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        bi = boxes[i]
        for k in range(n):
            if k == i:
                continue
            bk = boxes[k]
            if bk[0] > bi[0] or bk[1] > bi[1] or bk[2] < bi[2] or bk[3] < bi[3]:
                continue
            if areas[k] < areas[i] or (areas[k] == areas[i] and k > i):
                continue
            if _ring_inside(items[i], items[k], bk):
                parents[i].append(k)
    depth = [len(p) for p in parents]
    result: list[tuple[Ring, list[Ring]]] = []
    slot: dict[int, int] = {}
    for i in range(n):
        if depth[i] % 2 == 0:
            slot[i] = len(result)
            result.append((items[i], []))
    for i in range(n):
        if depth[i] % 2 == 1:
            # The direct parent: the containing ring one level up (the smallest one).
            candidates = [k for k in parents[i] if depth[k] == depth[i] - 1]
            if not candidates:  # inconsistent nesting (crossing rings): treat as outer
                slot[i] = len(result)
                result.append((items[i], []))
                continue
            parent = min(candidates, key=lambda k: areas[k])
            result[slot[parent]][1].append(items[i])
    return result
