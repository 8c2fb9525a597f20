"""The offline Moondream emulator against ground truth, over real HTTP.

Talks to ``FakeMoondream`` with a plain aiohttp session (not the project's
client) so the emulator is checked on its own: scenes, engine, paths, routes,
streams, auth and every fault injector.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from moondream_tools.testing import FakeMoondream, RecordedRequest, Scene, Shape
from moondream_tools.testing import engine

KEY = "test-key"
SEEDS = range(12)


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def fake() -> AsyncIterator[FakeMoondream]:
    async with FakeMoondream() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def data_url(image: Image.Image, quality: int = 95) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def skill_headers(key: str | None = KEY) -> dict[str, str]:
    return {"X-Moondream-Auth": key} if key is not None else {}


async def post(
    http: aiohttp.ClientSession, fake: FakeMoondream, route: str, body: Any, *, key: str | None = KEY
) -> tuple[int, Any]:
    async with http.post(f"{fake.base_url}/{route}", json=body, headers=skill_headers(key)) as resp:
        return resp.status, await resp.json()


async def sse(http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]) -> list[str]:
    """Raw ``data:`` payloads of an SSE response."""
    out = []
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        async for line in resp.content:
            text = line.decode().strip()
            if text.startswith("data: "):
                out.append(text[6:])
    return out


def near(a: tuple[float, ...], b: tuple[float, ...], tol: float = 0.02) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def box_tuple(obj: dict[str, float]) -> tuple[float, float, float, float]:
    return (obj["x_min"], obj["y_min"], obj["x_max"], obj["y_max"])


def assert_same_set(got: list[tuple[float, ...]], want: list[tuple[float, ...]], what: str) -> None:
    """Every expected tuple has its own match within 2 % (greedy, both ways)."""
    assert len(got) == len(want), f"{what}: got {len(got)}, want {len(want)}"
    left = list(got)
    for w in want:
        match = next((g for g in left if near(g, w)), None)
        assert match is not None, f"{what}: nothing within 2% of {w} in {got}"
        left.remove(match)


# a tiny SVG rasterizer for the M/L/C/z subset (even-odd, pixel centres)

_TOKEN = re.compile(r"[MLCZz]|-?(?:\d+\.?\d*|\.\d+)")


def parse_path(path: str) -> list[list[tuple[float, float]]]:
    """Rings of a path, cubics flattened into 16 segments each."""
    tokens = _TOKEN.findall(path)
    assert "".join(tokens).replace(" ", "") == re.sub(r"[\s,]", "", path), "unexpected characters"
    rings: list[list[tuple[float, float]]] = []
    i = 0
    cmd = ""
    pos = (0.0, 0.0)

    def num() -> float:
        nonlocal i
        value = float(tokens[i])
        i += 1
        return value

    while i < len(tokens):
        if tokens[i] in "MLCZz":
            cmd = tokens[i]
            i += 1
            if cmd in "Zz":
                continue
        if cmd == "M":
            pos = (num(), num())
            rings.append([pos])
            cmd = "L"
        elif cmd == "L":
            pos = (num(), num())
            rings[-1].append(pos)
        elif cmd == "C":
            c1, c2, end = (num(), num()), (num(), num()), (num(), num())
            for t in np.linspace(0, 1, 17)[1:]:
                u = 1 - t
                rings[-1].append(
                    (
                        u**3 * pos[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t**3 * end[0],
                        u**3 * pos[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t**3 * end[1],
                    )
                )
            pos = end
        else:
            raise AssertionError(f"bad path near token {i}: {tokens[i]!r}")
    return rings


def rasterize(rings: list[list[tuple[float, float]]], width: int, height: int) -> np.ndarray:
    """Even-odd fill sampled at pixel centres; vertex coordinates in pixels (corner origin)."""
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    centres = np.arange(height) + 0.5
    for ring in rings:
        p = np.asarray(ring, dtype=np.float64)
        q = np.roll(p, -1, axis=0)
        for (x0, y0), (x1, y1) in zip(p, q):
            if y0 == y1:
                continue
            rows = np.nonzero((centres >= min(y0, y1)) & (centres < max(y0, y1)))[0]
            xs = x0 + (centres[rows] - y0) * (x1 - x0) / (y1 - y0)
            cols = np.clip(np.ceil(xs - 0.5), 0, width).astype(int)
            np.add.at(toggles, (rows, cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


def path_to_mask(path: str, bbox: dict[str, float], width: int, height: int) -> np.ndarray:
    x0, y0 = bbox["x_min"] * width, bbox["y_min"] * height
    bw, bh = (bbox["x_max"] - bbox["x_min"]) * width, (bbox["y_max"] - bbox["y_min"]) * height
    rings = [[(x0 + x * bw, y0 + y * bh) for x, y in ring] for ring in parse_path(path)]
    return rasterize(rings, width, height)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


REFINED = re.compile(r"^(M[-.\d,]+(?:[LC][-.\d,]+)*z)+$")
LEADING_ZERO = re.compile(r"(?<![\d])-?0\d*\.\d")


def assert_refined_format(path: str) -> None:
    assert re.fullmatch(r"[MLCz0-9.,-]+", path), path[:80]
    assert REFINED.match(path), path[:80]
    assert not LEADING_ZERO.search(path), f"leading zero in {path[:80]}"
    assert " " not in path


# ---------------------------------------------------------------- scenes


def test_scene_random_is_deterministic_and_non_overlapping() -> None:
    a, b = Scene.random(5), Scene.random(5)
    assert a.shapes == b.shapes and len(a.shapes) >= 2
    assert Scene.random(6).shapes != a.shapes
    for seed in range(30):
        scene = Scene.random(seed)
        assert 2 <= len(scene.shapes) <= 6
        boxes = [s.box() for s in scene.shapes]
        for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
            assert ax0 >= 0 and ay0 >= 0 and ax1 < scene.width and ay1 < scene.height
            for bx0, by0, bx1, by1 in boxes[i + 1 :]:
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
        # no occlusion: every shape is visible and whole
        assert len(scene.truth()) == len(scene.shapes)


def test_scene_truth_follows_the_visible_mask() -> None:
    scene = Scene(
        200,
        100,
        [Shape("square", "red", (50, 50), 60), Shape("circle", "blue", (80, 50), 40)],
    )
    red, blue = scene.mask(0), scene.mask(1)
    assert not (red & blue).any(), "the later shape occludes the earlier one"
    assert blue.sum() > 0 and red.sum() < 60 * 60
    img = np.asarray(scene.render())
    assert (img[blue] == engine.PALETTE["blue"]).all()
    assert (img[red] == engine.PALETTE["red"]).all()
    truth = scene.truth()
    assert [t.label for t in truth] == ["red square", "blue circle"]
    for t, mask in zip(truth, (red, blue)):
        rows, cols = np.nonzero(mask)
        assert t.area_px == mask.sum()
        assert t.bbox == (cols.min() / 200, rows.min() / 100, (cols.max() + 1) / 200, (rows.max() + 1) / 100)
        assert t.center == pytest.approx(((cols.mean() + 0.5) / 200, (rows.mean() + 0.5) / 100))
    assert scene.count("shapes") == 2 and scene.count("red") == 1 and scene.count("cars") == 0
    assert [t.label for t in scene.matching("the blue circles")] == ["blue circle"]


def test_scene_ring_has_a_hole() -> None:
    scene = Scene(120, 120, [Shape("ring", "green", (60, 60), 100)])
    mask = scene.mask(0)
    assert mask[10, 60] and not mask[60, 60]
    with pytest.raises(ValueError):
        Shape("hexagon", "red", (1, 1), 10)
    with pytest.raises(ValueError):
        Shape("circle", "teal", (1, 1), 10)


def test_scene_renders_large_images_fast() -> None:
    scene = Scene.random(3).scaled(6.25)
    assert scene.size == (4000, 3000)
    start = time.perf_counter()
    image = scene.render()
    truth = scene.truth()
    elapsed = time.perf_counter() - start
    assert image.size == (4000, 3000) and len(truth) == len(scene.shapes)
    assert elapsed < 1.0


# ---------------------------------------------------------------- engine


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("red circle", ("red", "circle")),
        ("circles", (None, "circle")),
        ("blue", ("blue", None)),
        ("the yellow triangle", ("yellow", "triangle")),
        ("Red Circles", ("red", "circle")),
        ("shapes", (None, None)),
        ("all shapes", (None, None)),
        ("objects", (None, None)),
        ("an orange square", ("orange", "square")),
    ],
)
def test_phrase_parsing(phrase: str, expected: tuple[str | None, str | None]) -> None:
    p = engine.parse_phrase(phrase)
    assert p.valid and (p.color, p.kind) == expected


@pytest.mark.parametrize("phrase", ["cars", "red car", "the", "", "red blue circle", "circle square"])
def test_unknown_phrases_match_nothing(phrase: str) -> None:
    assert not engine.phrase_matches(phrase, "circle", "red")


def test_phrase_matching() -> None:
    assert engine.phrase_matches("red", "square", "red")
    assert engine.phrase_matches("shapes", "triangle", "cyan")
    assert not engine.phrase_matches("red circle", "circle", "blue")
    assert not engine.phrase_matches("squares", "circle", "blue")


def _jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_analyze_timing() -> None:
    scene = Scene.random(3, count=6)
    for width, budget in ((640, 0.1), (1200, 0.3)):
        image = _jpeg(scene.scaled(width / 640).render())
        times = []
        for _ in range(3):
            engine._CACHE.clear()
            start = time.perf_counter()
            found = engine.analyze(image)
            times.append(time.perf_counter() - start)
        assert len(found) == len(scene.shapes)
        assert min(times) < budget, (width, times)
    start = time.perf_counter()
    engine.analyze(image)  # cached
    assert time.perf_counter() - start < 0.05


def test_tracer_rings_with_holes_and_saddles() -> None:
    yy, xx = np.mgrid[0:120, 0:160]
    disk = (xx - 60) ** 2 + (yy - 60) ** 2 <= 50**2
    hole = (xx - 60) ** 2 + (yy - 60) ** 2 <= 20**2
    mask = disk & ~hole
    mask[100:110, 130:150] = True  # an island
    mask[40:50, 130:140] = True  # two blocks touching only at a corner (a saddle)
    mask[50:60, 140:150] = True
    rings = engine.trace_rings(mask)
    assert len(rings) >= 4  # outer, hole, island, saddle blocks
    exact = rasterize([[(float(x), float(y)) for x, y in r] for r in rings], 160, 120)
    assert (exact == mask).all(), "the cracks give the mask back exactly"
    path = engine.refined_path(mask)
    assert_refined_format(path)
    assert path.count("M") == len(rings)
    assert "C" in path and "L" in path
    decoded = path_to_mask(path, {"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}, 160, 120)
    assert iou(decoded, mask) >= 0.95
    assert not decoded[60, 60], "the hole stays a hole"


def test_number_format() -> None:
    f = engine.format_refined_number
    assert [f(0.439), f(-0.05), f(1.0), f(0.0), f(-0.0001), f(1.2345), f(0.9996)] == [
        ".439",
        "-.05",
        "1",
        "0",
        "0",
        "1.234",
        "1",
    ]


# ---------------------------------------------------------------- detect / point


def _variant(scene: Scene, variant: str) -> tuple[Image.Image, int, int]:
    image = scene.render()
    if variant == "jpeg90":
        image = _jpeg(image, 90)
    elif variant == "half":
        image = _jpeg(image.resize((scene.width // 2, scene.height // 2), Image.LANCZOS), 90)
    return image, image.width, image.height


@pytest.mark.parametrize("variant", ["png-like", "jpeg90", "half"])
async def test_detect_and_point_match_ground_truth(
    fake: FakeMoondream, http: aiohttp.ClientSession, variant: str
) -> None:
    checked = 0
    for seed in SEEDS:
        scene = Scene.random(seed)
        image, _, _ = _variant(scene, variant)
        url = data_url(image, 95)
        truth = scene.truth()
        phrases = {"shapes"} | {t.label for t in truth} | {t.color for t in truth} | {t.kind + "s" for t in truth}
        for phrase in sorted(phrases):
            want = scene.matching(phrase)
            status, body = await post(http, fake, "detect", {"image_url": url, "object": phrase})
            assert status == 200, body
            assert body["request_id"].startswith("req_")
            got = [box_tuple(o) for o in body["objects"]]
            assert_same_set(got, [t.bbox for t in want], f"seed {seed} {variant} detect {phrase!r}")
            # sorted top-to-bottom, then left-to-right
            assert got == sorted(got, key=lambda b: (b[1], b[0]))
            status, body = await post(http, fake, "point", {"image_url": url, "object": phrase})
            assert status == 200, body
            got_pts = [(p["x"], p["y"]) for p in body["points"]]
            assert_same_set(got_pts, [t.center for t in want], f"seed {seed} {variant} point {phrase!r}")
            checked += 1
    assert checked > 50


async def test_detect_unknown_object_is_empty(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = Scene.random(1).data_url()
    assert (await post(http, fake, "detect", {"image_url": url, "object": "a car"}))[1]["objects"] == []
    assert (await post(http, fake, "point", {"image_url": url, "object": "a car"}))[1]["points"] == []


async def test_max_objects_caps(http: aiohttp.ClientSession) -> None:
    scene = Scene(400, 300, [Shape("square", "blue", (60 + 90 * i, 150), 50) for i in range(4)])
    async with FakeMoondream(max_objects_default=3) as fake:
        body = {"image_url": scene.data_url(), "object": "blue squares"}
        assert len((await post(http, fake, "detect", body))[1]["objects"]) == 3
        capped = {**body, "settings": {"max_objects": 2}}
        objects = (await post(http, fake, "detect", capped))[1]["objects"]
        assert [round(o["x_min"] * 400) for o in objects] == [35, 125]  # left to right
        assert len((await post(http, fake, "point", capped))[1]["points"]) == 2
        status, err = await post(http, fake, "detect", {**body, "settings": {"max_objects": 0}})
        assert status == 400 and "max_objects" in err["error"]


async def test_point_spatial_refs_restrict(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(400, 200, [Shape("circle", "red", (100, 100), 80), Shape("circle", "red", (300, 100), 80)])
    body = {"image_url": scene.data_url(), "object": "red circle", "spatial_refs": [[0.75, 0.5]]}
    points = (await post(http, fake, "point", body))[1]["points"]
    assert len(points) == 1 and near((points[0]["x"], points[0]["y"]), (0.75, 0.5))
    status, err = await post(http, fake, "point", {**body, "spatial_refs": [[2, 0.5]]})
    assert status == 400


# ---------------------------------------------------------------- query


async def test_query_counts_presence_and_color(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    for seed in SEEDS:
        scene = Scene.random(seed)
        url = _variant(scene, "jpeg90")[0]
        url = data_url(url)
        labels = {t.label for t in scene.truth()}
        for phrase in ["shapes", "circles", "red circles", "blue", "squares", "triangles", "green triangles"]:
            question = f"How many {phrase} are there?"
            _, body = await post(http, fake, "query", {"image_url": url, "question": question})
            assert body["answer"] == str(scene.count(phrase)), (seed, phrase)
        for label in ["red circle", "blue square", "yellow triangle"]:
            _, body = await post(http, fake, "query", {"image_url": url, "question": f"Is there a {label}?"})
            assert body["answer"] == ("Yes" if label in labels else "No")
        _, body = await post(http, fake, "query", {"image_url": url, "question": "Are there any cars?"})
        assert body["answer"] == "No"


async def test_query_color_reasoning_and_fallbacks(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(
        640,
        480,
        [
            Shape("circle", "red", (120, 110), 90),
            Shape("square", "blue", (480, 120), 100),
            Shape("triangle", "yellow", (320, 360), 120),
            Shape("circle", "green", (560, 400), 60),
        ],
    )
    url = scene.data_url()

    async def ask(question: str, **extra: Any) -> dict[str, Any]:
        status, body = await post(http, fake, "query", {"image_url": url, "question": question, **extra})
        assert status == 200, body
        return body

    assert (await ask("What color is the square?"))["answer"] == "blue"
    assert (await ask("what colour is the circle?"))["answer"] == "red and green"
    assert (await ask("What is the meaning of life?"))["answer"].startswith("I can't answer that")
    body = await ask("How many circles are in the image?", reasoning=True)
    assert body["answer"] == "2"
    reasoning = body["reasoning"]
    spans = reasoning["grounding"]
    assert len(spans) == 2
    truth = {t.label: t.center for t in scene.truth()}
    for span in spans:
        named = reasoning["text"][span["start_idx"] : span["end_idx"]]
        assert named in ("red circle", "green circle")
        assert near(tuple(span["points"][0]), truth[named])
    assert "reasoning" not in await ask("How many circles?")
    status, body = await post(http, fake, "query", {"question": "What is 2 + 2?"})
    assert status == 200 and body["answer"].startswith("No image was provided")


# ---------------------------------------------------------------- caption


def _expected_parts(scene: Scene) -> list[str]:
    words = "zero one two three four five six".split()
    counts: dict[str, int] = {}
    for t in scene.truth():
        counts[t.label] = counts.get(t.label, 0) + 1
    parts = []
    for label, n in counts.items():
        if n == 1:
            parts.append(("an " if label[0] in "aeiou" else "a ") + label)
        else:
            parts.append(f"{words[n]} {label}s")
    return parts


async def test_caption_lists_the_shapes(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    words = "zero one two three four five six".split()
    for seed in SEEDS:
        scene = Scene.random(seed)
        url = data_url(_jpeg(scene.render(), 90))
        _, body = await post(http, fake, "caption", {"image_url": url, "length": "normal", "stream": False})
        caption = body["caption"].lower()
        for part in _expected_parts(scene):
            assert part in caption, (caption, part)
        assert caption.endswith("on a white background.")
        _, short = await post(http, fake, "caption", {"image_url": url, "length": "short"})
        assert short["caption"] == f"{words[len(scene.shapes)].capitalize()} shapes on a white background."
        _, long = await post(http, fake, "caption", {"image_url": url, "length": "long"})
        assert long["caption"].lower().startswith(caption)
        assert re.search(r"\bat the (top|bottom|left|right|center)", long["caption"])
    dark = Scene(320, 240, [Shape("circle", "orange", (160, 120), 80)], background=(10, 10, 10))
    _, body = await post(http, fake, "caption", {"image_url": dark.data_url(), "length": "normal"})
    assert body["caption"] == "An orange circle on a black background."
    status, err = await post(http, fake, "caption", {"image_url": dark.data_url(), "length": "huge"})
    assert status == 400 and "length" in err["error"]


@pytest.mark.parametrize("key", ["chunk", "text"])
async def test_caption_and_query_streams_join_to_the_answer(http: aiohttp.ClientSession, key: str) -> None:
    scene = Scene.random(4)
    async with FakeMoondream(stream_text_key=key) as fake:
        for route, body, field in [
            ("caption", {"image_url": scene.data_url(), "length": "long"}, "caption"),
            ("query", {"image_url": scene.data_url(), "question": "How many shapes?"}, "answer"),
        ]:
            _, plain = await post(http, fake, route, {**body, "stream": False})
            events = [json.loads(e) for e in await sse(http, f"{fake.base_url}/{route}", {**body, "stream": True}, skill_headers())]
            pieces = [e[key] for e in events[:-1]]
            assert len(pieces) >= 2 or route == "query"
            assert "".join(pieces) == plain[field]
            assert events[-1]["completed"] is True and events[-1]["request_id"].startswith("req_")
            assert all(key in e for e in events[:-1])


# ---------------------------------------------------------------- segment


@pytest.mark.parametrize("variant", ["jpeg90", "half"])
async def test_segment_refined_path_reproduces_the_mask(
    fake: FakeMoondream, http: aiohttp.ClientSession, variant: str
) -> None:
    kinds = ("circle", "square", "triangle", "ring")
    ious = []
    for seed in range(8):
        scene = Scene.random(seed, kinds=kinds, min_size=60 if variant == "half" else 40)
        image, width, height = _variant(scene, variant)
        url = data_url(image)
        for t in scene.truth():
            want = scene.mask(t.index)
            if variant == "half":  # area-averaged downsample of the true mask
                small = Image.fromarray(want.astype(np.uint8) * 255).resize((width, height), Image.BOX)
                want = np.asarray(small) >= 128
            cx, cy = t.center
            status, body = await post(
                http, fake, "segment", {"image_url": url, "object": t.label, "spatial_refs": [[cx, cy]], "stream": False}
            )
            assert status == 200, body
            path, bbox = body["path"], body["bbox"]
            assert_refined_format(path)
            assert near(box_tuple(bbox), t.bbox)
            if t.kind == "ring":
                assert path.count("M") == 2, "outer boundary and hole"
            decoded = path_to_mask(path, bbox, width, height)
            seen = min(engine.analyze(image), key=lambda f: abs(f.center[0] - cx) + abs(f.center[1] - cy))
            assert iou(decoded, seen.mask()) >= 0.95, (seed, t.label, "vs the mask the engine found")
            score = iou(decoded, want)
            ious.append(score)
            # at half size the reference is itself an approximation (area-averaged
            # downsample) and JPEG + Lanczos blunt 30 px triangles' tips
            assert score >= (0.95 if variant == "jpeg90" else 0.9), (seed, variant, t.label, score)
    assert np.mean(ious) >= 0.96
    assert any(t.kind == "ring" for s in range(8) for t in Scene.random(s, kinds=kinds).truth())


async def test_segment_paths_use_curves_for_circles(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(400, 300, [Shape("circle", "cyan", (120, 150), 140), Shape("square", "purple", (300, 150), 100)])
    _, circle = await post(http, fake, "segment", {"image_url": scene.data_url(), "object": "circle"})
    _, square = await post(http, fake, "segment", {"image_url": scene.data_url(), "object": "square"})
    assert circle["path"].count("C") >= 8
    assert "C" not in square["path"] and square["path"].count("L") <= 8
    assert_refined_format(square["path"])


async def test_segment_no_match_and_spatial_refs(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(400, 200, [Shape("square", "red", (100, 100), 80), Shape("square", "red", (300, 100), 80)])
    url = scene.data_url()
    status, body = await post(http, fake, "segment", {"image_url": url, "object": "giraffe"})
    assert status == 200 and body["path"] == "" and body["bbox"] is None and body["request_id"]
    _, first = await post(http, fake, "segment", {"image_url": url, "object": "red square"})
    assert first["bbox"]["x_min"] < 0.5
    _, right = await post(http, fake, "segment", {"image_url": url, "object": "red square", "spatial_refs": [[0.6, 0.3, 0.9, 0.7]]})
    assert right["bbox"]["x_min"] > 0.5


async def test_segment_stream_event_order(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(320, 240, [Shape("ring", "magenta", (160, 120), 150)])
    body = {"image_url": scene.data_url(), "object": "ring"}
    _, plain = await post(http, fake, "segment", {**body, "stream": False})
    events = [json.loads(e) for e in await sse(http, f"{fake.base_url}/segment", {**body, "stream": True}, skill_headers())]
    types = [e["type"] for e in events]
    assert types[0] == "bbox" and types[-1] == "final"
    assert set(types[1:-1]) == {"path_delta"} and len(types) >= 4
    assert events[0]["bbox"] == plain["bbox"]
    assert all(e["completed"] is False for e in events[1:-1])
    final = events[-1]
    assert final["completed"] is True and final["path"] == plain["path"] and final["bbox"] == plain["bbox"]
    coarse = "".join(e["chunk"] for e in events[1:-1])
    number = r"-?\d+\.\d{3}"
    assert re.fullmatch(rf"(M {number} {number}(?: L {number} {number})+ Z)( M {number} {number}(?: L {number} {number})+ Z)*", coarse)
    assert coarse.count("M") == 2
    assert len(coarse.split()) < len(re.findall(r"-?[\d.]+", plain["path"]))  # coarser than refined
    score = iou(path_to_mask(coarse, plain["bbox"], 320, 240), scene.mask(0))
    assert score >= 0.85
    # no match: just a final event
    events = [json.loads(e) for e in await sse(http, f"{fake.base_url}/segment", {**body, "object": "dog", "stream": True}, skill_headers())]
    assert [e["type"] for e in events] == ["final"] and events[0]["path"] == ""


# ---------------------------------------------------------------- chat / models


def _chat_body(url: str, question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "moondream3-preview",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {
                "role": "user",
                "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
            },
        ],
        **extra,
    }


async def test_chat_completions(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene.random(7)
    bearer = {"Authorization": f"Bearer {KEY}"}
    body = _chat_body(scene.data_url(), "How many shapes are there?", temperature=0.2, max_completion_tokens=50)
    async with http.post(f"{fake.base_url}/chat/completions", json=body, headers=bearer) as resp:
        assert resp.status == 200
        out = await resp.json()
    assert out["object"] == "chat.completion" and out["model"] == "moondream3-preview"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": str(len(scene.shapes))}
    assert choice["finish_reason"] == "stop" and out["usage"]["total_tokens"] > 0
    async with http.post(
        f"{fake.base_url}/chat/completions", json={**body, "reasoning": True}, headers=bearer
    ) as resp:
        message = (await resp.json())["choices"][0]["message"]
    assert isinstance(message["reasoning"], str) and "count" in message["reasoning"]
    # streaming: OpenAI chunks, then [DONE]
    events = await sse(http, f"{fake.base_url}/chat/completions", {**body, "stream": True}, bearer)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == str(len(scene.shapes))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # plain string content, no image
    text_only = {"model": "moondream2", "messages": [{"role": "user", "content": "Hello?"}]}
    async with http.post(f"{fake.base_url}/chat/completions", json=text_only, headers=bearer) as resp:
        out = await resp.json()
    assert out["choices"][0]["message"]["content"].startswith("No image was provided")
    async with http.post(f"{fake.base_url}/chat/completions", json={"messages": []}, headers=bearer) as resp:
        assert resp.status == 400


async def test_models(http: aiohttp.ClientSession) -> None:
    async with FakeMoondream(models=["a", "b"]) as fake:
        async with http.get(f"{fake.base_url}/models", headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a", "b"]
    assert all(m["object"] == "model" and m["owned_by"] == "moondream" for m in body["data"])


# ---------------------------------------------------------------- auth / validation


async def test_auth(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = Scene.random(2).data_url()
    body = {"image_url": url, "object": "shapes"}
    for key in ("wrong", None):
        status, err = await post(http, fake, "detect", body, key=key)
        assert status == 401 and err == {"error": "Invalid or missing API key"}
    # skills want X-Moondream-Auth, chat and models want a bearer token
    async with http.post(f"{fake.base_url}/detect", json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 401
    async with http.get(f"{fake.base_url}/models", headers=skill_headers()) as resp:
        assert resp.status == 401
    async with http.post(
        f"{fake.base_url}/chat/completions", json=_chat_body(url, "hi"), headers={"Authorization": "Bearer nope"}
    ) as resp:
        assert resp.status == 401
    assert (await post(http, fake, "detect", body))[0] == 200


async def test_no_key_accepts_everyone(http: aiohttp.ClientSession) -> None:
    async with FakeMoondream(api_key=None) as fake:
        assert fake.api_key is None
        body = {"image_url": Scene.random(2).data_url(), "object": "shapes"}
        assert (await post(http, fake, "detect", body, key=None))[0] == 200
        assert (await post(http, fake, "detect", body, key="anything"))[0] == 200
        async with http.get(f"{fake.base_url}/models") as resp:
            assert resp.status == 200


async def test_bad_requests(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = Scene.random(2).data_url()
    cases = [
        ("detect", {"object": "shape"}, "image_url"),
        ("detect", {"image_url": url}, "object"),
        ("query", {"image_url": url}, "question"),
        ("detect", {"image_url": "https://example.com/a.jpg", "object": "x"}, "data URL"),
        ("detect", {"image_url": "data:image/jpeg;base64,@@@", "object": "x"}, "base64"),
        ("detect", {"image_url": "data:image/jpeg;base64," + base64.b64encode(b"nope").decode(), "object": "x"}, "decode"),
        ("caption", {"image_url": url, "length": 3}, "length"),
        ("detect", [1, 2], "object"),
    ]
    for route, body, word in cases:
        status, err = await post(http, fake, route, body)
        assert status == 400, (route, body)
        assert word in err["error"], err
    async with http.post(
        f"{fake.base_url}/detect", data=b"{not json", headers={**skill_headers(), "Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400 and "JSON" in (await resp.json())["error"]
    async with http.get(f"{fake.base_url}/nope") as resp:
        assert resp.status == 404 and "error" in await resp.json()


# ---------------------------------------------------------------- faults


async def test_fail_next(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    body = {"image_url": Scene.random(1).data_url(), "object": "shapes"}
    fake.fail_next(2, status=429, retry_after="3")
    for _ in range(2):
        async with http.post(f"{fake.base_url}/detect", json=body, headers=skill_headers()) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "3"
            assert await resp.json() == {"error": "Too Many Requests"}
    assert (await post(http, fake, "detect", body))[0] == 200
    fake.fail_next(status=502, body="<html>Bad gateway</html>", content_type="text/html")
    async with http.post(f"{fake.base_url}/detect", json=body, headers=skill_headers()) as resp:
        assert resp.status == 502 and resp.content_type == "text/html" and "Retry-After" not in resp.headers
        assert await resp.text() == "<html>Bad gateway</html>"


async def test_faults_are_fifo(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    body = {"image_url": Scene.random(1).data_url(), "object": "shapes"}
    fake.fail_next(1, status=500)
    fake.station_error_next(2, "Request queue is full")
    fake.fail_next(1, status=503)
    got = [await post(http, fake, "detect", body) for _ in range(5)]
    assert [s for s, _ in got] == [500, 200, 200, 503, 200]
    assert got[1][1] == got[2][1] == {"error": "Request queue is full"}
    assert "objects" in got[4][1]


async def test_station_error_next(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.station_error_next(message="Function 'detect' not available")
    status, body = await post(http, fake, "detect", {"image_url": Scene.random(1).data_url(), "object": "x"})
    assert status == 200 and body == {"error": "Function 'detect' not available"}


async def test_malformed_next(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.malformed_next()
    async with http.post(f"{fake.base_url}/query", json={"question": "hi"}, headers=skill_headers()) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        text = await resp.text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert (await post(http, fake, "query", {"question": "hi"}))[0] == 200


async def test_hang_next_times_out_and_never_blocks_close(http: aiohttp.ClientSession) -> None:
    fake = FakeMoondream()
    await fake.start()
    try:
        fake.hang_next(2, seconds=30)
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(
                f"{fake.base_url}/query",
                json={"question": "hi"},
                headers=skill_headers(),
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as resp:
                await resp.read()
        # a second request still hanging while the server closes
        pending = asyncio.ensure_future(http.post(f"{fake.base_url}/query", json={"question": "hi"}, headers=skill_headers()))
        await asyncio.sleep(0.2)
    finally:
        start = time.perf_counter()
        await fake.close()
        assert time.perf_counter() - start < 2.0
    try:
        resp = await pending
    except aiohttp.ClientError:
        pass
    else:
        resp.release()


async def test_hang_shorter_than_timeout_then_answers(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.hang_next(seconds=0.2)
    start = time.perf_counter()
    assert (await post(http, fake, "query", {"question": "hi"}))[0] == 200
    assert time.perf_counter() - start >= 0.2


async def test_drop_stream_cuts_sse_before_final(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene.random(3)
    for route, body, after in [
        ("caption", {"image_url": scene.data_url(), "length": "long", "stream": True}, 2),
        ("segment", {"image_url": scene.data_url(), "object": "shape", "stream": True}, 1),
        ("segment", {"image_url": scene.data_url(), "object": "shape", "stream": True}, 99),
    ]:
        fake.drop_stream_next(after_events=after)
        events: list[dict[str, Any]] = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(f"{fake.base_url}/{route}", json=body, headers=skill_headers()) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
        assert events, route
        assert len(events) == after or after == 99
        assert not any(e.get("completed") for e in events), "no final event"
    # the next request is fine again
    assert len(await sse(http, f"{fake.base_url}/caption", {"image_url": scene.data_url(), "stream": True}, skill_headers())) >= 2


async def test_drop_non_stream_closes_mid_body(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.drop_stream_next()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            f"{fake.base_url}/detect", json={"image_url": Scene.random(1).data_url(), "object": "shape"}, headers=skill_headers()
        ) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 0
            await resp.read()


async def test_chat_stream_drop(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.drop_stream_next(after_events=1)
    lines = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            f"{fake.base_url}/chat/completions",
            json=_chat_body(Scene.random(1).data_url(), "How many shapes?", stream=True),
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            async for line in resp.content:
                lines.append(line)
    assert not any(b"[DONE]" in line for line in lines)


# ---------------------------------------------------------------- recording


async def test_recorded_requests_latency_and_reset(http: aiohttp.ClientSession) -> None:
    async with FakeMoondream(latency=0.1) as fake:
        assert fake.base_url.startswith("http://127.0.0.1:") and fake.base_url.endswith("/v1")
        body = {"image_url": Scene.random(1).data_url(), "object": "circle", "model": "moondream3-preview/ft@1"}
        start = time.perf_counter()
        status, _ = await post(http, fake, "detect", body)
        assert status == 200 and time.perf_counter() - start >= 0.1
        fake.latency = 0
        await post(http, fake, "query", {"question": "hi"}, key="bad")
        assert len(fake.requests) == 2
        rec = fake.requests[0]
        assert isinstance(rec, RecordedRequest)
        assert (rec.method, rec.path) == ("POST", "/v1/detect")
        assert rec.json == body and rec.json["model"] == "moondream3-preview/ft@1"
        assert rec.headers["x-moondream-auth"] == KEY == rec.headers["X-Moondream-Auth"]
        assert rec.received_at <= time.time()
        assert fake.requests[1].headers["X-Moondream-Auth"] == "bad", "rejected requests are recorded too"
        fake.fail_next(3)
        fake.reset()
        assert fake.requests == [] and fake.pending_faults == 0
        assert (await post(http, fake, "query", {"question": "hi"}))[0] == 200
    with pytest.raises(RuntimeError):
        fake.base_url  # noqa: B018  (closed)
