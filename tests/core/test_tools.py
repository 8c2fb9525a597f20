"""VisionTools: the agent-facing texts against scene ground truth, the image policy, specs."""

from __future__ import annotations

import asyncio
import io
import os
import re
from typing import Any
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moondream_tools import (
    TOOL_SPECS,
    AsyncMoondream,
    FalMoondream,
    ImageAccessError,
    ImageError,
    ImagePolicy,
    MoondreamError,
    RateLimitError,
    ToolArgumentsError,
    UnsupportedSkillError,
    VisionTools,
    tool_error_text,
)
from moondream_tools.render import color_for
from backends_support import sent_spatial_refs
from moondream_tools.testing import FakeMoondream, Scene, Shape

CROWD = Scene(
    1280,
    853,
    [
        Shape("circle", "red", (212, 440), 90),
        Shape("circle", "red", (640, 420), 90),
        Shape("circle", "red", (1050, 460), 90),
        Shape("square", "blue", (640, 150), 160),
        Shape("triangle", "yellow", (300, 700), 200),
    ],
)


@pytest.fixture
async def tools(backends: tuple[Any, Any]) -> VisionTools:
    backend, segmenter = backends
    vision = VisionTools(backend, segment_backend=segmenter)
    assert vision.add_image(CROWD.render()) == "img_1"
    return vision


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))]


async def test_count_text_matches_ground_truth(tools: VisionTools) -> None:
    result = await tools.count("img_1", "red circle")
    truths = sorted(CROWD.matching("red circle"), key=lambda t: t.center[0])
    assert result.count == 3 and not result.capped
    assert result.text.startswith('Counted 3 "red circle" in img_1 (1280x853 px): #1 at (')
    positions = re.findall(r"#(\d) at \((\d+), (\d+)\) (\S+?)[,.]", result.text)
    assert [p[0] for p in positions] == ["1", "2", "3"]
    assert [p[3] for p in positions] == ["left", "center", "right"]
    for (_, x, y, _), truth in zip(positions, truths, strict=True):
        assert abs(int(x) - truth.center[0] * 1280) <= 0.02 * 1280
        assert abs(int(y) - truth.center[1] * 853) <= 0.02 * 853


async def test_count_says_at_least_when_capped(fake: FakeMoondream, client: AsyncMoondream) -> None:
    tools = VisionTools(client, max_objects=2)
    tools.add_image(CROWD.render(), name="crowd")
    result = await tools.count("crowd", "red circles")
    assert result.capped and result.count == 2
    assert result.text.startswith('Counted at least 2 "red circles" in crowd (1280x853 px)')
    assert "limit of 2" in result.text
    assert fake.requests[-1].json["settings"] == {"max_objects": 2}


async def test_count_zero(tools: VisionTools) -> None:
    result = await tools.count("img_1", "green triangle")
    assert result.count == 0 and result.text == 'Counted 0 "green triangle" in img_1 (1280x853 px).'


async def test_locate_boxes_in_pixels_and_reading_order(tools: VisionTools) -> None:
    result = await tools.locate("img_1", "shapes")
    boxes = re.findall(r"#(\d+) box \((\d+), (\d+)\)-\((\d+), (\d+)\) (\S+) \[normalized ([^\]]+)\]", result.text)
    assert len(boxes) == len(CROWD.truth()) == 5
    # Reading order: the blue square (top row) first, the yellow triangle (bottom row) last.
    truth_by_box = {t.bbox_px: t for t in CROWD.truth()}
    matched = []
    for _, x0, y0, x1, y1, _, normalized in boxes:
        got = (int(x0), int(y0), int(x1), int(y1))
        truth = min(truth_by_box.values(), key=lambda t: sum(abs(a - b) for a, b in zip(got, t.bbox_px)))
        for a, b, scale in zip(got, truth.bbox_px, (1280, 853, 1280, 853), strict=True):
            assert abs(a - b) <= 0.02 * scale
        n = [float(v) for v in normalized.split(",")]
        assert n == pytest.approx([got[0] / 1280, got[1] / 853, got[2] / 1280, got[3] / 853], abs=0.002)
        matched.append(truth.label)
    assert matched[0] == "blue square" and matched[-1] == "yellow triangle"
    assert matched[1:4] == ["red circle"] * 3


async def test_segment_area_and_bbox_match_ground_truth(fake: FakeMoondream, tools: VisionTools) -> None:
    truth = CROWD.matching("blue square")[0]
    result = await tools.segment("img_1", "blue square")
    values = numbers(result.text)
    area = int(re.search(r"area ([\d,]+) px", result.text).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert abs(area - truth.area_px) <= 0.02 * truth.area_px
    percent = float(re.search(r"\(([\d.]+)% of the image\)", result.text).group(1))  # type: ignore[union-attr]
    assert percent == pytest.approx(100 * area / (1280 * 853), abs=0.06)
    bbox = re.search(r"bbox \((\d+), (\d+)\)-\((\d+), (\d+)\) px", result.text)
    assert bbox is not None
    for got, want, scale in zip(map(int, bbox.groups()), truth.bbox_px, (1280, 853, 1280, 853), strict=True):
        assert abs(got - want) <= 0.02 * scale
    assert result.text.endswith("1 region.") and values


async def test_segment_hints_become_normalized_spatial_refs(fake: FakeMoondream, tools: VisionTools) -> None:
    result = await tools.segment("img_1", "red circle", point=[1050, 460])
    sent = sent_spatial_refs(fake.requests[-1], (1280, 853))
    assert sent == [[pytest.approx(1050 / 1280), pytest.approx(460 / 853)]]
    right = max(CROWD.matching("red circle"), key=lambda t: t.center[0])
    assert result.segmentation.bbox is not None
    assert abs(result.segmentation.bbox.x_min - right.bbox[0]) <= 0.02
    await tools.segment("img_1", "red circle", box=[100, 350, 320, 530])
    assert sent_spatial_refs(fake.requests[-1], (1280, 853)) == [
        [pytest.approx(100 / 1280), pytest.approx(350 / 853), pytest.approx(320 / 1280), pytest.approx(530 / 853)]
    ]


async def test_segment_ring_reports_its_hole(client: AsyncMoondream) -> None:
    tools = VisionTools(client)
    tools.add_image(Scene(400, 300, [Shape("ring", "green", (200, 150), 180)]).render())
    result = await tools.segment("img_1", "green ring")
    assert "1 region with 1 hole" in result.text
    missing = await tools.segment("img_1", "purple square")
    assert missing.text == 'No "purple square" found to segment in img_1 (400x300 px).'


async def test_describe_caption_question_and_reasoning(tools: VisionTools) -> None:
    caption = await tools.describe("img_1")
    assert caption.text.startswith("img_1 (1280x853 px): ") and "three red circles" in caption.text.lower()
    answer = await tools.describe("img_1", question="How many red circles are there?")
    assert answer.text == "img_1 (1280x853 px): 3"
    reasoned = await tools.describe("img_1", question="How many squares?", reasoning=True)
    assert "\nReasoning: " in reasoned.text
    if not isinstance(tools.backend, AsyncMoondream):  # fal's reasoning is plain text, no grounding
        assert "Grounded in pixels" not in reasoned.text and reasoned.answer.reasoning.grounding == []
        return
    assert "Grounded in pixels: " in reasoned.text
    square = CROWD.matching("blue square")[0]
    xy = re.search(r'"[^"]*blue square[^"]*" at \((\d+), (\d+)\)', reasoned.text)
    assert xy is not None
    assert abs(int(xy.group(1)) - square.center[0] * 1280) <= 0.02 * 1280


async def test_return_images_draws_the_result(client: AsyncMoondream) -> None:
    tools = VisionTools(client, return_images=True)
    tools.add_image(CROWD.render())
    result = await tools.locate("img_1", "blue square")
    assert result.annotated_png is not None
    picture = Image.open(io.BytesIO(result.annotated_png)).convert("RGB")
    # drawn on the uploaded image: the model's working resolution, same aspect ratio
    prepared = await client.prepare(CROWD.render())
    assert picture.size == (prepared.upload_width, prepared.upload_height)
    scale = picture.width / 1280
    x0, y0, x1, y1 = (round(v * scale) for v in CROWD.matching("blue square")[0].bbox_px)
    edge = np.asarray(picture)[y0 + 30 : y1 - 30, x0 - 3 : x0 + 4].reshape(-1, 3)
    color = np.array(color_for("blue square"))
    assert (np.abs(edge - color).sum(axis=1) < 60).any(), "the box outline is drawn in the label color"


async def test_no_images_by_default(tools: VisionTools) -> None:
    assert (await tools.count("img_1", "circle")).annotated_png is None


# ------------------------------------------------------------------ image policy


async def test_unregistered_handle_gets_the_helpful_error(tools: VisionTools) -> None:
    tools.add_image(CROWD.render())
    with pytest.raises(ImageAccessError) as info:
        await tools.count("img_9", "cat")
    assert str(info.value) == "image 'img_9' is not registered; registered: img_1, img_2"
    assert tool_error_text(info.value).startswith("Error: image 'img_9' is not registered; registered: img_1, img_2")


@pytest.fixture
def photo_dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    secret = tmp_path / "secret"
    (allowed / "sub").mkdir(parents=True)
    secret.mkdir()
    CROWD.render().save(allowed / "sub" / "crowd.png")
    CROWD.render().save(secret / "private.png")
    os.symlink(secret / "private.png", allowed / "link.png")
    os.symlink(secret, allowed / "dirlink")
    return allowed, secret


@pytest.mark.parametrize(
    "reference",
    [
        "../secret/private.png",
        "sub/../../secret/private.png",
        "{secret}/private.png",
        "link.png",
        "dirlink/private.png",
        "/etc/passwd",
        "/dev/zero",
        "file:///etc/passwd",
    ],
)
async def test_paths_outside_allowed_dirs_are_refused(
    fake: FakeMoondream, client: AsyncMoondream, photo_dirs: tuple[Path, Path], reference: str
) -> None:
    allowed, secret = photo_dirs
    tools = VisionTools(client, image_policy=ImagePolicy(allowed_dirs=[allowed]))
    with pytest.raises(ImageAccessError) as info:
        await tools.count(reference.format(secret=secret), "circle")
    message = str(info.value)
    assert "is not allowed: images must be under" in message and str(allowed.resolve()) in message
    assert str(secret) not in message.replace(reference.format(secret=secret), "")
    assert fake.requests == []


async def test_paths_inside_allowed_dirs_work(
    fake: FakeMoondream, client: AsyncMoondream, photo_dirs: tuple[Path, Path]
) -> None:
    allowed, _ = photo_dirs
    tools = VisionTools(client, image_policy=ImagePolicy(allowed_dirs=[allowed]))
    relative = await tools.count("sub/crowd.png", "red circle")
    absolute = await tools.count(str(allowed / "sub" / "crowd.png"), "red circle")
    assert relative.count == absolute.count == 3
    with pytest.raises(ImageError, match="not found"):
        await tools.count("sub/missing.png", "circle")


async def test_no_local_files_and_no_urls_by_default(fake: FakeMoondream, tools: VisionTools, tmp_path: Path) -> None:
    path = tmp_path / "crowd.png"
    CROWD.render().save(path)
    with pytest.raises(ImageAccessError, match="reads no local files; registered images: img_1"):
        await tools.count(str(path), "circle")
    with pytest.raises(ImageAccessError, match="does not fetch URLs"):
        await tools.count("http://127.0.0.1:9/crowd.png", "circle")
    assert fake.requests == []


async def test_url_host_allow_list(client: AsyncMoondream) -> None:
    tools = VisionTools(client, image_policy=ImagePolicy(allow_urls=True, allowed_hosts={"images.example.com"}))
    with pytest.raises(ImageAccessError, match="host '127.0.0.1' is not allowed; allowed hosts: images.example.com"):
        await tools.count("http://127.0.0.1:9/x.png", "circle")


async def test_policy_limits_apply_to_model_named_images(client: AsyncMoondream, tmp_path: Path) -> None:
    CROWD.render().save(tmp_path / "big.png")
    tools = VisionTools(client, image_policy=ImagePolicy(allowed_dirs=[tmp_path], max_pixels=100_000))
    with pytest.raises(ImageError, match="over the limit of 100000"):
        await tools.count("big.png", "circle")
    tools.add_image(tmp_path / "big.png", name="trusted")  # the application's own image
    assert (await tools.count("trusted", "red circle")).count == 3


# ------------------------------------------------------------------ run by name, sync, errors


async def test_run_validates_model_written_arguments(tools: VisionTools) -> None:
    result = await tools.run("count_objects", {"image": "img_1", "object": "red circle"})
    assert result.text.startswith('Counted 3 "red circle"')
    with pytest.raises(ToolArgumentsError, match="invalid arguments for count_objects: object: Field required"):
        await tools.run("count_objects", {"image": "img_1"})
    with pytest.raises(ToolArgumentsError, match="point"):
        await tools.run("segment_object", {"image": "img_1", "object": "x", "point": [1]})
    with pytest.raises(ToolArgumentsError, match="Extra inputs"):
        await tools.run("locate_objects", {"image": "img_1", "object": "x", "color": "red"})
    with pytest.raises(ValueError, match="unknown tool"):
        await tools.run("draw_image", {})


async def test_run_sync_inside_a_running_loop(threaded_fake: FakeMoondream) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    async with VisionTools(md) as tools:
        tools.add_image(CROWD.render())
        assert (await tools.count("img_1", "blue square")).count == 1  # pools a session on this loop
        pooled = md._transport.sessions.pooled
        result = tools.run_sync("count_objects", {"image": "img_1", "object": "red circle"})
        assert result.count == 3
        assert md._transport.sessions.pooled is pooled and pooled is not None and not pooled.closed
        assert (await tools.count("img_1", "blue square")).count == 1
    await md.aclose()


def test_run_sync_in_a_plain_script(threaded_fake: FakeMoondream) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    tools = VisionTools(md)
    tools.add_image(CROWD.render())
    counts = [tools.run_sync("count_objects", {"image": "img_1", "object": "red circle"}).count for _ in range(3)]
    assert counts == [3, 3, 3]
    assert md._transport.sessions.pooled is None, "sync calls never tie the shared client to a loop that ends"
    asyncio.run(md.aclose())


async def test_tool_error_texts_say_what_to_do(fake: FakeMoondream, tools: VisionTools) -> None:
    fake.fail_next(10, status=429)
    with pytest.raises(RateLimitError) as info:
        await tools.backend.point(CROWD.render(), "x", max_retries=0)
    text = tool_error_text(info.value)
    assert text.startswith("Error: HTTP 429") and "try again in a moment" in text
    assert "Traceback" not in text


def test_specs_are_what_models_need() -> None:
    assert list(TOOL_SPECS) == ["describe_image", "count_objects", "locate_objects", "segment_object"]
    for spec in TOOL_SPECS.values():
        assert len(spec.description) < 1024 and "img_1" in spec.description
        schema = spec.args_schema.model_json_schema()
        assert "image" in schema["required"]
        assert all(prop.get("description") for prop in schema["properties"].values())
    assert set(TOOL_SPECS["describe_image"].args_schema.model_fields) == {
        "image", "question", "length", "reasoning", "more_images", "time"
    }
    assert set(TOOL_SPECS["segment_object"].args_schema.model_fields) == {"image", "object", "point", "box", "time"}
    assert set(TOOL_SPECS["count_objects"].args_schema.model_fields) == {"image", "object", "more_objects", "time"}
    assert set(TOOL_SPECS["locate_objects"].args_schema.model_fields) == {"image", "object", "more_objects", "time"}
    for spec in TOOL_SPECS.values():  # one optional field for videos, never required, never negative
        schema = spec.args_schema.model_json_schema()
        assert "time" not in schema["required"] and "vid_1" in spec.description
        assert {"type": "number", "minimum": 0} in schema["properties"]["time"]["anyOf"]


# ------------------------------------------------------------------ several images in one question


async def test_one_question_about_several_images_goes_through_chat(fake: FakeMoondream, client: AsyncMoondream) -> None:
    tools = VisionTools(client)
    first = tools.add_image(Scene(320, 240, [Shape("circle", "red", (100, 100), 60)]).render())
    second = tools.add_image(Scene(400, 300, [Shape("square", "blue", (200, 150), 80)]).render())
    result = await tools.run(
        "describe_image", {"image": first, "question": "What is in these images?", "more_images": [second]}
    )
    request = fake.requests[-1]
    assert request.path == "/v1/chat/completions"
    parts = request.json["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert result.text.startswith("img_1 (320x240 px), img_2 (400x300 px): ")
    assert result.more_images == ["img_2"] and result.more_image_sizes[0].width == 400
    assert result.answer is not None and result.answer.usage is not None and result.answer.usage.input_tokens


async def test_several_images_need_a_question_and_a_chat_backend(fake: FakeMoondream) -> None:
    async with FalMoondream(api_key=fake.fal_key, base_url=fake.fal_base_url) as fal:
        tools = VisionTools(fal)
        tools.add_image(CROWD.render())
        tools.add_image(CROWD.render())
        with pytest.raises(UnsupportedSkillError, match="FalMoondream has no 'chat' skill"):
            await tools.describe("img_1", "Which differs?", more_images=["img_2"])
        with pytest.raises(ToolArgumentsError, match="more_images needs a question"):
            await tools.describe("img_1", more_images=["img_2"])
        with pytest.raises(ToolArgumentsError, match="more_images"):
            await tools.run("describe_image", {"image": "img_1", "question": "?", "more_images": ["a", "b", "c", "d"]})
    assert fake.requests == []


# ------------------------------------------------------------------ several phrases in one call


async def test_count_and_locate_several_phrases_at_once(fake: FakeMoondream, tools: VisionTools) -> None:
    before = len(fake.requests)
    result = await tools.run("count_objects", {"image": "img_1", "object": "red circle", "more_objects": ["blue square"]})
    assert len(fake.requests) - before == 2, "one request per phrase"
    assert result.count == 3 and [m.count for m in result.more] == [1] and result.more[0].object == "blue square"
    lines = result.text.splitlines()
    assert lines[0].startswith('Counted 3 "red circle" in img_1') and lines[1].startswith('Counted 1 "blue square"')
    located = await tools.locate("img_1", "blue square", more_objects=["red circle", "blue square"])
    assert [r.object for r in [located, *located.more]] == ["blue square", "red circle"], "each phrase once"
    square = CROWD.matching("blue square")[0]
    assert abs(located.detections.objects[0].x_min - square.bbox[0]) <= 0.02
    single = await tools.count("img_1", "red circle")
    assert single.more == [] and "\n" not in single.text


async def test_one_failing_phrase_fails_the_call_with_a_typed_error(fake: FakeMoondream, client: AsyncMoondream) -> None:
    tools = VisionTools(client)
    tools.add_image(CROWD.render())
    fake.fail_next(1, status=400)
    with pytest.raises(MoondreamError):
        await tools.count("img_1", "red circle", more_objects=["blue square"])
    with pytest.raises(ToolArgumentsError, match="at most 7"):
        await tools.count("img_1", "a", more_objects=list("bcdefghi"))
