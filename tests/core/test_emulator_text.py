"""Printed text in scenes and the emulator reading it back from the pixels, against ground truth.

The emulator sees only the uploaded JPEG: these tests go through the real HTTP path with
the project's client (which downscales to about 1176 px and encodes JPEG q90) where the
answer depends on it, and call the reader directly for the resolution rule.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from moondream_tools import AsyncMoondream
from moondream_tools.testing import PALETTE, FakeMoondream, Scene, Shape, Text, TextTruth, analyze, read_text
from moondream_tools.testing.server import NO_TEXT
from moondream_tools.testing.text import FONT

OCR = "Transcribe all text in the image. Answer with the text only."


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def received(image: Image.Image, factor: float, resample: Image.Resampling) -> Image.Image:
    """What a server gets after a client's downscale by ``factor`` and JPEG q90."""
    if factor != 1:
        image = image.resize((round(image.width / factor), round(image.height / factor)), resample)
    return Image.open(io.BytesIO(jpeg(image))).convert("RGB")


def signs() -> Scene:
    """900x600: two text lines (dots of 4 and 3 px) between four shapes."""
    return Scene(
        900,
        600,
        [
            Shape("circle", "red", (120, 120), 140),
            Shape("square", "blue", (760, 130), 150),
            Shape("triangle", "green", (150, 480), 160),
            Shape("ring", "purple", (740, 470), 150),
        ],
        texts=[Text("Exit 12", (260, 90), 28), Text("Open 9:30-17:00!", (260, 330), 21)],
    )


def uploaded_size(fake: FakeMoondream) -> tuple[int, int]:
    """Size of the image in the last request the emulator received."""
    url = fake.requests[-1].json["image_url"]
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).size


def near_box(got: tuple[float, ...], want: tuple[int, ...], tol: float) -> bool:
    return all(abs(g - w) <= tol for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------- scenes and ground truth


def test_text_truth_is_the_rendered_ink() -> None:
    scene = signs()
    truth = scene.text_truth()
    assert truth == [
        TextTruth("EXIT 12", (260, 90, 424, 118)),
        TextTruth("OPEN 9:30-17:00!", (260, 330, 539, 351)),  # "!" inks its middle column only
    ]
    arr = np.asarray(scene.render())
    black = np.all(arr == 0, axis=2)
    for t in truth:
        x0, y0, x1, y1 = t.bbox_px
        ys, xs = np.nonzero(black[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2])
        assert (xs.min() + x0 - 2, ys.min() + y0 - 2, xs.max() + x0 - 1, ys.max() + y0 - 1) == t.bbox_px
    assert black.sum() == sum(Text(t.text, t.origin, t.height).bitmap().sum() for t in scene.texts)


def test_text_leaves_the_shapes_alone() -> None:
    """Same shape truth, same shapes found, same caption background; black is no shape."""
    scene = signs()
    bare = Scene(scene.width, scene.height, scene.shapes)
    assert scene.truth() == bare.truth()
    with_text, without = analyze(received(scene.render(), 1, Image.Resampling.BOX)), analyze(
        received(bare.render(), 1, Image.Resampling.BOX)
    )
    assert [(f.label, f.bbox_px) for f in with_text] == [(f.label, f.bbox_px) for f in without]
    assert all(max(rgb) >= 170 for rgb in PALETTE.values())  # no dark palette colour
    only_text = Scene(400, 100, [], texts=[Text("BLACK 0", (10, 10), 35)])
    assert analyze(only_text.render()) == []
    assert read_text(bare.render()) == []


async def test_caption_and_shape_answers_unchanged_by_text(client: AsyncMoondream) -> None:
    scene = signs()
    bare = Scene(scene.width, scene.height, scene.shapes)
    for phrase in ("circle", "blue square", "shape"):
        got = (await client.detect(scene.render(), phrase)).to_pixels()
        want = (await client.detect(bare.render(), phrase)).to_pixels()
        assert got == want and len(got) == scene.count(phrase)
    caption = (await client.caption(scene.render())).caption
    assert caption == (await client.caption(bare.render())).caption
    assert "white background" in caption


# ---------------------------------------------------------------- over HTTP


async def test_transcription_reads_the_two_lines(client: AsyncMoondream) -> None:
    scene = signs()
    answer = await client.query(jpeg(scene.render()), OCR)
    assert answer.answer == "EXIT 12\nOPEN 9:30-17:00!"
    assert answer.answer.split("\n") == [t.text for t in scene.text_truth()]
    reasoned = await client.query(jpeg(scene.render()), "What does the sign say?", reasoning=True)
    assert reasoned.answer == answer.answer and reasoned.reasoning is not None


async def test_detect_and_point_text_lines_match_truth(client: AsyncMoondream) -> None:
    scene = signs()
    image = jpeg(scene.render())
    truth = scene.text_truth()
    boxes = (await client.detect(image, "text")).to_pixels()
    assert len(boxes) == len(truth)
    for box, want in zip(boxes, truth, strict=True):
        assert near_box((box.x_min, box.y_min, box.x_max, box.y_max), want.bbox_px, 2), (box, want)
    for phrase in ("words", "the text lines", "word"):
        assert len((await client.detect(image, phrase)).objects) == len(truth)
    points = (await client.point(image, "text")).to_pixels()
    for point, want in zip(points, truth, strict=True):
        x0, y0, x1, y1 = want.bbox_px
        assert abs(point.x - (x0 + x1) / 2) <= 2 and abs(point.y - (y0 + y1) / 2) <= 2
    assert len((await client.detect(image, "text", settings={"max_objects": 1})).objects) == 1


async def test_big_scene_is_read_after_the_clients_downscale(fake: FakeMoondream, client: AsyncMoondream) -> None:
    """4000x3000 goes up at 1176x882 (3.4x smaller): dots of 12 px arrive as 3.5 px (>= 3: exact)."""
    scene = Scene(
        4000,
        3000,
        [Shape("circle", "orange", (3200, 2200), 900), Shape("square", "cyan", (700, 2300), 800)],
        texts=[Text("Platform 9", (300, 300), 84), Text("Gate B/42 #7", (300, 900), 84)],
    )
    answer = await client.query(jpeg(scene.render()), OCR)
    assert uploaded_size(fake) == (1176, 882)
    assert answer.answer.split("\n") == ["PLATFORM 9", "GATE B/42 #7"] == [t.text for t in scene.text_truth()]
    boxes = (await client.detect(jpeg(scene.render()), "text")).to_pixels()
    for box, want in zip(boxes, scene.text_truth(), strict=True):
        # one uploaded pixel is 3.4 image pixels
        assert near_box((box.x_min, box.y_min, box.x_max, box.y_max), want.bbox_px, 8), (box, want)


async def test_text_too_small_after_the_downscale_is_not_read(fake: FakeMoondream, client: AsyncMoondream) -> None:
    """Dots of 6 px arrive as 1.76 px (<= 1.8 px: never read): no text at all."""
    scene = Scene(4000, 3000, [Shape("circle", "red", (3000, 2000), 600)], texts=[Text("Small print", (300, 300), 42)])
    assert (await client.query(jpeg(scene.render()), OCR)).answer == NO_TEXT
    assert uploaded_size(fake) == (1176, 882)
    assert (await client.detect(jpeg(scene.render()), "text")).objects == []


async def test_no_text_answers_no_text(client: AsyncMoondream) -> None:
    demo = Scene.demo()
    assert (await client.query(demo.render(), OCR)).answer == NO_TEXT
    assert (await client.detect(demo.render(), "text")).objects == []
    assert (await client.point(demo.render(), "words")).points == []
    dark = Scene(640, 480, [Shape("square", "yellow", (320, 240), 120)], background=(10, 10, 10))
    assert (await client.query(dark.render(), OCR)).answer == NO_TEXT
    assert read_text(dark.render()) == []


# ---------------------------------------------------------------- the reader's rule


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize(
    "resample", [Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS], ids=["box", "bilinear", "lanczos"]
)
def test_every_glyph_is_read_exactly_at_3_px_dots(factor: int, resample: Image.Resampling) -> None:
    chars = "".join(ch for ch in FONT if ch != " ")
    words = [chars[i : i + 9] + "A" for i in range(0, len(chars), 9)]
    lines = [" ".join(words[:3]), " ".join(words[3:])]
    dot = 3 * factor + factor // 2  # 3.0 to 3.5 px once received
    texts = [Text(line, (5 * factor + 1, (8 + 30 * i) * factor), 7 * dot) for i, line in enumerate(lines)]
    shapes = [Shape("circle", "magenta", (700 * factor, 40 * factor), 30 * factor)]
    scene = Scene(720 * factor, 80 * factor, shapes, texts=texts)
    got = read_text(received(scene.render(), factor, resample))
    assert [line.text for line in got] == [t.text for t in scene.text_truth()]
    for line in got:
        assert 3.0 <= line.dot <= 3.6


def test_side_by_side_texts_are_separate_lines_in_reading_order() -> None:
    scene = Scene(
        700,
        200,
        [],
        texts=[
            Text("B2", (400, 100), 21),
            Text("Left", (10, 100), 21),
            Text("Right", (10 + 6 * 3 * 4 + 18 * 3, 100), 21),  # 18 dots after "LEFT"
            Text("Top", (300, 10), 21),
        ],
    )
    got = read_text(received(scene.render(), 1, Image.Resampling.BOX))
    assert [line.text for line in got] == ["TOP", "LEFT", "RIGHT", "B2"] == [t.text for t in scene.text_truth()]


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "args",
    [
        ("naïve", (0, 0), 14),  # not in the font
        ("a_b", (0, 0), 14),
        ("", (0, 0), 14),
        (" lead", (0, 0), 14),
        ("trail ", (0, 0), 14),
        ("two  spaces", (0, 0), 14),
        ("...", (0, 0), 14),  # no letter or digit
        ("ok", (0, 0), 10),  # not a multiple of 7
        ("ok", (0, 0), 0),
        ("ok", (0, 0), 14.0),
        ("ok", (0.5, 0), 14),
        ("ok", (0,), 14),
    ],
)
def test_bad_text_arguments_raise(args: tuple) -> None:
    with pytest.raises(ValueError):
        Text(*args)


def test_texts_must_fit_and_keep_clear() -> None:
    circle = Shape("circle", "red", (100, 100), 80)  # box 60..139
    with pytest.raises(ValueError, match="overlaps the red circle"):
        Scene(400, 300, [circle], texts=[Text("HI", (130, 50), 21)])
    with pytest.raises(ValueError, match="overlaps another text"):
        Scene(400, 300, [], texts=[Text("HI", (10, 10), 21), Text("HO", (20, 20), 21)])
    with pytest.raises(ValueError, match="does not fit"):
        Scene(100, 100, [], texts=[Text("TOO WIDE", (10, 10), 21)])
    Scene(400, 300, [circle], texts=[Text("HI", (140, 50), 21)])  # just clear of the box


async def test_fal_routes_read_text_too(fake: FakeMoondream) -> None:
    from moondream_tools import FalMoondream

    scene = Scene(640, 480, [], texts=[Text("EXIT 12", (100, 100), 35)])
    buffer = io.BytesIO()
    scene.render().save(buffer, "JPEG", quality=90)
    async with FalMoondream(api_key=fake.fal_key, base_url=fake.fal_base_url) as fal:
        answer = await fal.query(buffer.getvalue(), "Transcribe all text in the image.")
        boxes = await fal.detect(buffer.getvalue(), "text")
    assert answer.answer == "EXIT 12"
    (truth,) = scene.text_truth()
    (box,) = boxes.to_pixels()
    assert all(abs(a - b) <= 2 for a, b in zip((box.x_min, box.y_min, box.x_max, box.y_max), truth.bbox_px))
