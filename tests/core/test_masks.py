"""Mask images -> binary masks -> exact outline rings (``moondream_tools.geometry.masks``)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageOps

from moondream_tools.geometry import (
    binary_mask,
    mask_area,
    mask_bbox,
    mask_to_rings,
    mask_union,
    nest_rings,
    pixels_to_box,
    rasterize,
    ring_area,
    rings_to_path,
    scale_rings,
    segment_rings,
)
from moondream_tools.geometry.rings import Ring

_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _mask(*rows: str) -> Image.Image:
    """A mode "L" mask from rows of '#' (inside) and '.' (outside)."""
    width, height = len(rows[0]), len(rows)
    assert all(len(row) == width for row in rows)
    data = bytes(255 if c == "#" else 0 for row in rows for c in row)
    return Image.frombytes("L", (width, height), data)


def _check_rings(mask: Image.Image, rings: list[Ring]) -> None:
    """The exactness, shape and orientation properties every result must have."""
    width, height = mask.size
    data = mask.convert("L").point(lambda v: 255 if v else 0).tobytes()
    assert rasterize(rings, width, height, mode="L").tobytes() == data
    for ring in rings:
        assert len(ring) >= 4
        assert len(set(ring)) == len(ring), f"ring passes a point twice: {ring}"
        for x, y in ring:
            assert isinstance(x, float) and isinstance(y, float)
            assert x.is_integer() and y.is_integer()
            assert 0 <= x <= width and 0 <= y <= height
        n = len(ring)
        for k in range(n):
            (ax, ay), (bx, by), (cx, cy) = ring[k - 1], ring[k], ring[(k + 1) % n]
            assert (ax == bx) != (ay == by), "edges are axis-aligned"
            assert (bx - ax) * (cy - by) - (by - ay) * (cx - bx) != 0, "only corners"
        assert ring[0] == min(ring, key=lambda p: (p[1], p[0])), "starts top-left"
    firsts = [(r[0][1], r[0][0], r[1][1], r[1][0]) for r in rings]
    assert firsts == sorted(firsts)
    polygons = nest_rings(rings)
    assert len(polygons) == sum(1 for r in rings if ring_area(r) > 0)
    for outer, holes in polygons:
        assert ring_area(outer) > 0
        assert all(ring_area(hole) < 0 for hole in holes)
    assert sum(len(holes) for _, holes in polygons) == sum(1 for r in rings if ring_area(r) < 0)
    assert sum(ring_area(r) for r in rings) == mask_area(mask)


TRICKY = {
    "checkerboard": _mask("#.#.#", ".#.#.", "#.#.#", ".#.#."),
    "ring_with_island": _mask(
        ".......",
        ".#####.",
        ".#...#.",
        ".#.#.#.",
        ".#...#.",
        ".#####.",
        ".......",
    ),
    "border_touching": _mask("##..#", "#....", "....#", "#.###"),
    "single_pixel": _mask("...", ".#.", "..."),
    "single_pixel_corner": _mask("..", ".#"),
    "one_by_one": _mask("#"),
    "full": _mask("####", "####", "####"),
    "empty": _mask("....", "...."),
    "diagonal_pair": _mask("#.", ".#"),
    "anti_diagonal_pair": _mask(".#", "#."),
    "diagonal_holes": _mask("####", "#.##", "##.#", "####"),
    "hole_open_at_corner": _mask(".....", ".##..", ".#.#.", ".###.", "....."),
    "staircase": _mask("#...", "##..", ".##.", "..##"),
    "spiral": _mask(
        "#######",
        "......#",
        "#####.#",
        "#...#.#",
        "#.###.#",
        "#.....#",
        "#######",
    ),
    "comb": _mask("#.#.#.#", "#######", "#.#.#.#"),
}


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_round_trip_tricky(name: str) -> None:
    mask = TRICKY[name]
    _check_rings(mask, mask_to_rings(mask))


def test_mode_1_gives_the_same_rings() -> None:
    for mask in TRICKY.values():
        assert mask_to_rings(mask.convert("1")) == mask_to_rings(mask)


def test_nonzero_l_values_are_inside() -> None:
    mask = Image.frombytes("L", (3, 1), bytes([0, 1, 200]))
    assert mask_to_rings(mask) == [[(1.0, 0.0), (3.0, 0.0), (3.0, 1.0), (1.0, 1.0)]]


def test_exact_rings_and_orientation() -> None:
    assert mask_to_rings(TRICKY["empty"]) == []
    assert mask_to_rings(TRICKY["full"]) == [[(0.0, 0.0), (4.0, 0.0), (4.0, 3.0), (0.0, 3.0)]]
    # Diagonal pixels are two squares meeting at a corner.
    assert mask_to_rings(TRICKY["diagonal_pair"]) == [
        [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
        [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0), (1.0, 2.0)],
    ]
    # Diagonal holes are two holes (counter-clockwise on screen: down first).
    rings = mask_to_rings(TRICKY["diagonal_holes"])
    assert rings == [
        [(0.0, 0.0), (4.0, 0.0), (4.0, 4.0), (0.0, 4.0)],
        [(1.0, 1.0), (1.0, 2.0), (2.0, 2.0), (2.0, 1.0)],
        [(2.0, 2.0), (2.0, 3.0), (3.0, 3.0), (3.0, 2.0)],
    ]
    assert [ring_area(r) for r in rings] == [16.0, -1.0, -1.0]


def test_nest_rings_groups_donut_with_island() -> None:
    rings = mask_to_rings(TRICKY["ring_with_island"])
    assert len(rings) == 3
    polygons = nest_rings(rings)
    assert [len(holes) for _, holes in polygons] == [1, 0]
    (outer, [hole]), (island, []) = polygons
    assert (ring_area(outer), ring_area(hole), ring_area(island)) == (25.0, -9.0, 1.0)
    # A hole reaching the outside only through a corner is still a hole.
    polygons = nest_rings(mask_to_rings(TRICKY["hole_open_at_corner"]))
    assert [len(holes) for _, holes in polygons] == [1]
    assert [len(holes) for _, holes in nest_rings(mask_to_rings(TRICKY["diagonal_holes"]))] == [2]


def test_mask_to_rings_rejects_other_modes() -> None:
    with pytest.raises(ValueError, match="mode"):
        mask_to_rings(Image.new("RGB", (2, 2)))


@_SETTINGS
@given(
    st.integers(1, 12).flatmap(
        lambda w: st.integers(1, 12).flatmap(
            lambda h: st.tuples(
                st.just(w),
                st.just(h),
                st.lists(st.booleans(), min_size=w * h, max_size=w * h),
            )
        )
    )
)
def test_round_trip_random(case: tuple[int, int, list[bool]]) -> None:
    width, height, bits = case
    mask = Image.frombytes("L", (width, height), bytes(255 if b else 0 for b in bits))
    _check_rings(mask, mask_to_rings(mask))


def test_round_trip_random_dense_noise() -> None:
    rng = random.Random(7)
    for density in (0.1, 0.5, 0.9):
        data = bytes(255 if rng.random() < density else 0 for _ in range(40 * 30))
        mask = Image.frombytes("L", (40, 30), data)
        _check_rings(mask, mask_to_rings(mask))


def _drawn_mask(width: int = 2000, height: int = 1500) -> Image.Image:
    rng = random.Random(3)
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    draw.ellipse((100, 100, 900, 800), fill=255)
    draw.ellipse((300, 300, 600, 600), fill=0)  # a hole
    draw.ellipse((400, 400, 500, 500), fill=255)  # an island in it
    draw.polygon([(1000, 100), (1900, 300), (1200, 1400), (1500, 600)], fill=255)
    draw.regular_polygon((500, 1100, 300), 7, rotation=13, fill=255)
    draw.rectangle((0, 1400, 2000, 1500), fill=255)  # along the border
    for _ in range(60):
        x, y = rng.randint(0, 1900), rng.randint(0, 1400)
        draw.ellipse((x, y, x + rng.randint(5, 300), y + rng.randint(5, 300)), fill=rng.choice([0, 255]))
    return mask


def test_large_mask_round_trip() -> None:  # its speed: benchmarks/bench_geometry.py
    mask = _drawn_mask()
    rings = mask_to_rings(mask)
    assert sum(len(r) for r in rings) > 10_000
    assert rasterize(rings, 2000, 1500, mode="L").tobytes() == mask.tobytes()
    assert sum(ring_area(r) for r in rings) == mask_area(mask)


# ---------------------------------------------------------------------------
# binary_mask
# ---------------------------------------------------------------------------

_PATTERN = _mask("..##..", ".####.", "##..##", ".####.", "..##..")
_INSIDE = np.asarray(_PATTERN) > 0


def _from_bool(inside: np.ndarray, on: object, off: object, mode: str) -> Image.Image:
    height, width = inside.shape
    image = Image.new(mode, (width, height), off)  # type: ignore[arg-type]
    for y in range(height):
        for x in range(width):
            if inside[y, x]:
                image.putpixel((x, y), on)  # type: ignore[arg-type]
    return image


def _palette_image(transparent_background: bool) -> Image.Image:
    image = Image.frombytes("P", _PATTERN.size, bytes(1 if v else 0 for v in _PATTERN.tobytes()))
    if transparent_background:
        image.putpalette([255, 255, 255, 255, 255, 255])
        image.info["transparency"] = 0
    else:
        image.putpalette([0, 0, 0, 250, 250, 250])
    return image


MODES = {
    "1": lambda: _PATTERN.convert("1"),
    "L": lambda: _from_bool(_INSIDE, 240, 12, "L"),
    "P": lambda: _palette_image(False),
    "P-transparency": lambda: _palette_image(True),
    "LA-gray": lambda: _from_bool(_INSIDE, (255, 255), (0, 255), "LA"),
    "LA-cutout": lambda: _from_bool(_INSIDE, (90, 255), (90, 0), "LA"),
    "RGB": lambda: _from_bool(_INSIDE, (250, 252, 248), (3, 0, 5), "RGB"),
    "RGBA-opaque": lambda: _from_bool(_INSIDE, (255, 255, 255, 255), (0, 0, 0, 255), "RGBA"),
    "RGBA-cutout": lambda: _from_bool(_INSIDE, (30, 144, 255, 255), (30, 144, 255, 0), "RGBA"),
    "RGBA-overlay": lambda: _from_bool(_INSIDE, (255, 0, 0, 230), (0, 0, 0, 0), "RGBA"),
    "I-8bit": lambda: _from_bool(_INSIDE, 255, 0, "I"),
    "I-16bit": lambda: _from_bool(_INSIDE, 65535, 0, "I"),
    "I;16": lambda: _from_bool(_INSIDE, 65535, 0, "I;16"),
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_binary_mask_accepts_mode(name: str) -> None:
    image = MODES[name]()
    result = binary_mask(image)
    assert result.mode == "L" and result.size == image.size
    assert result.tobytes() == _PATTERN.tobytes()


def test_binary_mask_threshold() -> None:
    gray = Image.new("L", (200, 1))
    gray.putpixel((0, 0), 127)
    gray.putpixel((1, 0), 128)
    assert list(binary_mask(gray).tobytes()[:3]) == [0, 255, 0]
    deep = Image.new("I;16", (200, 1))
    deep.putpixel((0, 0), 32767)
    deep.putpixel((1, 0), 32768)
    deep.putpixel((2, 0), 65535)
    assert list(binary_mask(deep).tobytes()[:4]) == [0, 255, 255, 0]


def test_binary_mask_tolerates_a_little_noise() -> None:
    image = Image.new("L", (100, 100))
    image.paste(255, (0, 0, 50, 100))
    for k in range(100):  # exactly 1%: anti-aliased edge pixels
        image.putpixel((50, k), 100)
    assert mask_area(binary_mask(image)) == 5000
    image.putpixel((60, 0), 100)  # one more: over 1%
    with pytest.raises(ValueError, match=r"^not a mask: an L image with 1\.0% gray pixels \(100x100\)$"):
        binary_mask(image)


def test_binary_mask_refuses_colour_photo() -> None:
    noise = Image.effect_noise((320, 240), 64)
    photo = ImageOps.colorize(noise, black="navy", white="orange")
    with pytest.raises(ValueError, match=r"^not a mask: an RGB image with \d+% colour pixels \(320x240\)$"):
        binary_mask(photo)
    with pytest.raises(ValueError, match=r"an RGBA image with \d+% colour pixels \(320x240\)"):
        binary_mask(photo.convert("RGBA"))
    with pytest.raises(ValueError, match=r"a P image with \d+% colour pixels \(320x240\)"):
        binary_mask(photo.convert("P"))


def test_binary_mask_refuses_soft_masks() -> None:
    gradient = Image.linear_gradient("L").resize((300, 200))
    with pytest.raises(ValueError, match=r"^not a mask: an L image with \d+% gray pixels \(300x200\)$"):
        binary_mask(gradient)
    with pytest.raises(ValueError, match=r"an RGB image with \d+% gray pixels \(300x200\)"):
        binary_mask(gradient.convert("RGB"))
    with pytest.raises(ValueError, match=r"an I;16 image with \d+% gray pixels"):
        binary_mask(gradient.convert("I").point(lambda v: v * 257).convert("I;16"))
    soft = Image.new("RGBA", (300, 200), (255, 255, 255, 0))
    soft.putalpha(gradient)
    with pytest.raises(ValueError, match=r"an RGBA image with \d+% partly transparent pixels"):
        binary_mask(soft)


def test_binary_mask_refuses_unsupported_mode() -> None:
    with pytest.raises(ValueError, match=r"^not a mask: a CMYK image \(unsupported mode 'CMYK'\) \(4x3\)$"):
        binary_mask(Image.new("CMYK", (4, 3)))


def test_binary_mask_alpha_rules() -> None:
    # Fully opaque: the colour decides (black is outside), not the alpha.
    assert mask_area(binary_mask(Image.new("RGBA", (5, 5), (0, 0, 0, 255)))) == 0
    # Fully transparent cut-out: empty.
    assert mask_area(binary_mask(Image.new("RGBA", (5, 5), (255, 255, 255, 0)))) == 0
    # Colour varies where visible: gray decides, alpha ignored.
    image = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 255))
    assert list(binary_mask(image).tobytes()) == [255, 0, 0, 0]


def test_binary_mask_on_large_images() -> None:  # its speed: benchmarks/bench_geometry.py
    mask = _drawn_mask()
    rgba = Image.merge("RGBA", [mask, mask, mask, Image.new("L", mask.size, 255)])
    result = binary_mask(rgba)
    photo = ImageOps.colorize(Image.effect_noise(mask.size, 64), black="navy", white="orange")
    with pytest.raises(ValueError):
        binary_mask(photo)
    assert result.tobytes() == mask.tobytes()


# ---------------------------------------------------------------------------
# mask_union, mask_area, mask_bbox, scale_rings, rings_to_path
# ---------------------------------------------------------------------------


def test_area_and_bbox_against_numpy() -> None:
    rng = np.random.default_rng(5)
    for width, height, density in [(1, 1, 0.5), (7, 3, 0.05), (40, 30, 0.01), (64, 48, 0.5), (9, 9, 0.0)]:
        array = rng.random((height, width)) < density
        for mode in ("L", "1"):
            mask = Image.fromarray(array.astype(np.uint8) * 255).convert(mode)
            assert mask_area(mask) == int(array.sum())
            if not array.any():
                assert mask_bbox(mask) is None
                continue
            ys, xs = np.nonzero(array)
            expected = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            assert mask_bbox(mask) == expected
    with pytest.raises(ValueError):
        mask_area(Image.new("RGB", (2, 2)))
    with pytest.raises(ValueError):
        mask_bbox(Image.new("RGB", (2, 2)))


def test_mask_union() -> None:
    a = _mask("#...", "....")
    b = _mask("....", "...#").convert("1")
    c = Image.frombytes("L", (4, 2), bytes([0, 3, 0, 0, 0, 0, 0, 0]))
    union = mask_union([a, b, c])
    assert union.mode == "L"
    assert union.tobytes() == _mask("##..", "...#").tobytes()
    assert mask_union([a]).tobytes() == a.tobytes()
    with pytest.raises(ValueError, match="same size"):
        mask_union([a, Image.new("L", (3, 2))])
    with pytest.raises(ValueError, match="at least one"):
        mask_union([])


def test_scale_rings_to_a_larger_image() -> None:
    mask = TRICKY["ring_with_island"]
    rings = scale_rings(mask_to_rings(mask), 3, 2)
    big = rasterize(rings, 21, 14, mode="L")
    assert big.tobytes() == mask.resize((21, 14), Image.Resampling.NEAREST).tobytes()
    assert all(ring_area(r) > 0 for r, _ in nest_rings(rings))


def test_rings_to_path_round_trips_through_segment_rings() -> None:
    mask = Image.new("L", (97, 61))
    mask.paste(TRICKY["ring_with_island"].resize((35, 35), Image.Resampling.NEAREST), (13, 9))
    mask.paste(TRICKY["diagonal_holes"].resize((20, 20), Image.Resampling.NEAREST), (60, 30))
    rings = mask_to_rings(mask)
    box = mask_bbox(mask)
    assert box is not None
    path = rings_to_path(rings, box)
    assert path.startswith("M0,0L") and path.count("M") == len(rings)
    decoded = segment_rings(path, pixels_to_box(box, 97, 61), 97, 61)
    assert rasterize(decoded, 97, 61, mode="L").tobytes() == mask.tobytes()
    for got, want in zip(decoded, rings):
        assert max(abs(a - b) for p, q in zip(got, want) for a, b in zip(p, q)) < 1e-4
    with pytest.raises(ValueError, match="positive"):
        rings_to_path(rings, (5, 5, 5, 9))
