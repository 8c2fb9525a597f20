"""Large synthetic scenes for the tiling tests (imported by test modules; not a test file)."""

from __future__ import annotations

import random
from functools import cache

from moondream_tools.testing import COLORS, Scene, Shape
from moondream_tools.tiling import TilePlan, plan_tiles

W, H = 6000, 4000


def borders(plan: TilePlan) -> tuple[list[int], list[int]]:
    """Every interior tile edge and core border, on each axis."""
    xs = {t.box[0] for t in plan.tiles} | {t.box[2] for t in plan.tiles} | {t.core[0] for t in plan.tiles}
    ys = {t.box[1] for t in plan.tiles} | {t.box[3] for t in plan.tiles} | {t.core[1] for t in plan.tiles}
    return sorted(x for x in xs if 0 < x < plan.width), sorted(y for y in ys if 0 < y < plan.height)


@cache
def small_scene() -> Scene:
    """50 shapes of 26-34 px, at least 12 px apart; first on borders, edges and corners."""
    plan = plan_tiles(W, H)
    xs, ys = borders(plan)
    rng = random.Random(11)
    wanted = [(x, rng.randint(80, H - 80)) for x in xs] + [(rng.randint(80, W - 80), y) for y in ys]
    wanted += [(x, y) for x in xs[::2] for y in ys[::2]]  # where four tiles meet
    shapes: list[Shape] = []

    def fits(cx: int, cy: int, size: int) -> bool:
        if not (size < cx < W - size and size < cy < H - size):
            return False
        return all(
            abs(s.center[0] - cx) >= (s.size + size) / 2 + 12 or abs(s.center[1] - cy) >= (s.size + size) / 2 + 12
            for s in shapes
        )

    def add(cx: int, cy: int) -> None:
        size = rng.randint(26, 34)
        if len(shapes) < 50 and fits(cx, cy, size):
            kind = rng.choice(["circle", "square"])
            shapes.append(Shape(kind, rng.choice(COLORS), (float(cx), float(cy)), float(size)))

    for cx, cy in wanted:
        add(cx, cy)
    while len(shapes) < 50:
        add(rng.randint(40, W - 40), rng.randint(40, H - 40))
    return Scene(W, H, shapes)
