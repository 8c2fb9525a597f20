"""MoondreamToolSpec: metadata from TOOL_SPECS, outputs against scene ground truth, errors, sync calls."""

from __future__ import annotations

import asyncio
import io
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.tools import FunctionTool, ToolMetadata, ToolOutput
from PIL import Image

from llama_index.tools.moondream import MoondreamToolSpec
from moondream_tools.images import ImageSettings, upload_sizes
from moondream_tools import (
    TOOL_SPECS,
    AsyncMoondream,
    CountResult,
    DescribeResult,
    ImageAccessError,
    ImagePolicy,
    LocateResult,
    SegmentResult,
    ToolArgumentsError,
    VisionTools,
)
from backends_support import sent_spatial_refs
from moondream_tools.testing import FakeMoondream, Scene, Shape

W, H = 1280, 853
SCENE = Scene(
    W,
    H,
    [
        Shape("circle", "red", (212, 440), 90),
        Shape("circle", "red", (640, 420), 90),
        Shape("circle", "red", (1050, 460), 90),
        Shape("square", "blue", (640, 150), 160),
        Shape("triangle", "yellow", (300, 700), 200),
    ],
)


def tools_by_name(spec: MoondreamToolSpec) -> dict[str, FunctionTool]:
    return {tool.metadata.name or "": tool for tool in spec.to_tool_list()}


# ------------------------------------------------------------------ ground-truth checks


def check_describe(output: ToolOutput) -> None:
    assert isinstance(output.raw_output, DescribeResult)
    assert output.content == output.raw_output.text
    assert output.content == "img_1 (1280x853 px): 3"


def check_count(output: ToolOutput) -> None:
    result = output.raw_output
    assert isinstance(result, CountResult)
    assert output.content == result.text
    truths = sorted(SCENE.matching("red circle"), key=lambda t: t.center[0])
    assert result.count == len(truths) == 3 and not result.capped
    assert output.content.startswith('Counted 3 "red circle" in img_1 (1280x853 px): ')
    positions = re.findall(r"#\d at \((\d+), (\d+)\)", output.content)
    assert len(positions) == 3
    for (x, y), truth in zip(positions, truths, strict=True):
        assert abs(int(x) - truth.center[0] * W) <= 0.02 * W
        assert abs(int(y) - truth.center[1] * H) <= 0.02 * H


def check_locate(output: ToolOutput) -> None:
    result = output.raw_output
    assert isinstance(result, LocateResult)
    assert output.content == result.text
    boxes = re.findall(r"#\d+ box \((\d+), (\d+)\)-\((\d+), (\d+)\)", output.content)
    truths = SCENE.truth()
    assert len(boxes) == len(result.detections.objects) == len(truths) == 5
    for found in boxes:
        got = tuple(int(v) for v in found)
        truth = min(truths, key=lambda t: sum(abs(a - b) for a, b in zip(got, t.bbox_px)))
        for a, b, scale in zip(got, truth.bbox_px, (W, H, W, H), strict=True):
            assert abs(a - b) <= 0.02 * scale
    first = re.search(r"#1 box \((\d+), (\d+)\)-\((\d+), (\d+)\)", output.content)
    assert first is not None
    assert tuple(int(v) for v in first.groups()) == pytest.approx(SCENE.matching("blue square")[0].bbox_px, abs=0.02 * W)


def check_segment(output: ToolOutput) -> None:
    result = output.raw_output
    assert isinstance(result, SegmentResult)
    assert output.content == result.text
    truth = SCENE.matching("blue square")[0]
    area = re.search(r"area ([\d,]+) px", output.content)
    assert area is not None
    assert abs(int(area.group(1).replace(",", "")) - truth.area_px) <= 0.02 * truth.area_px
    assert abs(result.segmentation.area_px - truth.area_px) <= 0.02 * truth.area_px
    bbox = re.search(r"bbox \((\d+), (\d+)\)-\((\d+), (\d+)\) px", output.content)
    assert bbox is not None
    for got, want, scale in zip(map(int, bbox.groups()), truth.bbox_px, (W, H, W, H), strict=True):
        assert abs(got - want) <= 0.02 * scale
    assert output.content.endswith("1 region.")


CASES: dict[str, tuple[dict[str, Any], Callable[[ToolOutput], None]]] = {
    "describe_image": ({"image": "img_1", "question": "How many red circles are there?"}, check_describe),
    "count_objects": ({"image": "img_1", "object": "red circle"}, check_count),
    "locate_objects": ({"image": "img_1", "object": "shapes"}, check_locate),
    "segment_object": ({"image": "img_1", "object": "blue square"}, check_segment),
}


def check_output(name: str, output: ToolOutput) -> None:
    arguments, check = CASES[name]
    assert isinstance(output, ToolOutput) and not output.is_error
    assert output.tool_name == name
    assert output.raw_input == {"args": (), "kwargs": arguments}
    assert len(output.blocks) == 1 and isinstance(output.blocks[0], TextBlock)
    check(output)


@pytest.fixture
def spec(backends: tuple[Any, Any]) -> MoondreamToolSpec:
    backend, segmenter = backends
    spec = MoondreamToolSpec(backend, segment_backend=segmenter)
    assert spec.add_image(SCENE.render()) == "img_1"
    return spec


# ------------------------------------------------------------------ metadata


def test_metadata_is_exactly_tool_specs() -> None:
    spec = MoondreamToolSpec(AsyncMoondream(base_url="http://127.0.0.1:9/v1"))
    assert spec.spec_functions == list(TOOL_SPECS)
    tools = spec.to_tool_list()
    assert [tool.metadata.name for tool in tools] == list(TOOL_SPECS)
    for tool, ts in zip(tools, TOOL_SPECS.values(), strict=True):
        assert isinstance(tool, FunctionTool)
        assert tool.metadata.name == ts.name
        assert tool.metadata.description == ts.description
        assert tool.metadata.fn_schema is ts.args_schema
        assert not tool.metadata.return_direct
        openai = tool.metadata.to_openai_tool()["function"]
        assert openai["name"] == ts.name and openai["description"] == ts.description
        assert openai["parameters"]["properties"] == ts.args_schema.model_json_schema()["properties"]
        assert openai["parameters"]["required"] == ts.args_schema.model_json_schema()["required"]
    for name, ts in TOOL_SPECS.items():
        for fn_name in (name, "a" + name):
            assert spec.get_fn_schema_from_fn_name(fn_name) is ts.args_schema
            assert spec.get_metadata_from_fn_name(fn_name) == ToolMetadata(
                name=ts.name, description=ts.description, fn_schema=ts.args_schema
            )


def test_to_tool_list_subsets_overrides_and_unknown_names() -> None:
    spec = MoondreamToolSpec(AsyncMoondream(base_url="http://127.0.0.1:9/v1"))
    tools = spec.to_tool_list(["locate_objects", ("count_objects", "acount_objects")])
    assert [t.metadata.name for t in tools] == ["locate_objects", "count_objects"]
    custom = ToolMetadata(name="count_objects", description="Count things.", fn_schema=TOOL_SPECS["count_objects"].args_schema)
    (tool,) = spec.to_tool_list(["count_objects"], func_to_metadata_mapping={"count_objects": custom})
    assert tool.metadata is custom
    with pytest.raises(ValueError, match="unknown Moondream tool 'draw_image'"):
        spec.to_tool_list(["draw_image"])


def test_spec_shares_a_vision_tools(client: AsyncMoondream) -> None:
    vision = VisionTools(client, return_images=True)
    spec = MoondreamToolSpec(vision=vision)
    assert spec.vision is vision and spec.add_image(SCENE.render(), name="scene") == "scene"
    assert vision.image_names == ["scene"]
    with pytest.raises(ValueError, match="either vision= or"):
        MoondreamToolSpec(client, vision=vision)
    with pytest.raises(ValueError, match="either vision= or"):
        MoondreamToolSpec(vision=vision, image_policy=ImagePolicy())


# ------------------------------------------------------------------ async calls


@pytest.mark.parametrize("name", list(TOOL_SPECS))
async def test_acall_matches_ground_truth(fake: FakeMoondream, spec: MoondreamToolSpec, name: str) -> None:
    arguments, _ = CASES[name]
    output = await tools_by_name(spec)[name].acall(**arguments)
    check_output(name, output)
    assert fake.requests, "the tool went over HTTP to the emulator"


@pytest.mark.parametrize("name", list(TOOL_SPECS))
async def test_acall_tool_by_name(spec: MoondreamToolSpec, name: str) -> None:
    arguments, check = CASES[name]
    output = await spec.acall_tool(name, arguments)
    assert output.tool_name == name and not output.is_error
    check(output)


async def test_describe_caption_and_segment_hints(fake: FakeMoondream, spec: MoondreamToolSpec) -> None:
    tools = tools_by_name(spec)
    caption = await tools["describe_image"].acall(image="img_1", length="short")
    assert caption.content.startswith("img_1 (1280x853 px): ")
    assert fake.requests[-1].path.endswith("/caption")
    right = max(SCENE.matching("red circle"), key=lambda t: t.center[0])
    output = await tools["segment_object"].acall(image="img_1", object="red circle", point=[1050, 460])
    assert sent_spatial_refs(fake.requests[-1], (W, H)) == [[pytest.approx(1050 / W), pytest.approx(460 / H)]]
    bbox = output.raw_output.segmentation.bbox_px
    assert abs(bbox.x_min - right.bbox_px[0]) <= 0.02 * W and abs(bbox.x_max - right.bbox_px[2]) <= 0.02 * W


async def test_return_images_gives_text_and_png_blocks(client: AsyncMoondream) -> None:
    spec = MoondreamToolSpec(client, return_images=True)
    assert spec.vision.return_images
    spec.add_image(SCENE.render())
    tools = tools_by_name(spec)
    for name in ("count_objects", "locate_objects", "segment_object"):
        arguments, check = CASES[name]
        output = await tools[name].acall(**arguments)
        check(output)
        text, image = output.blocks
        assert isinstance(text, TextBlock) and text.text == output.raw_output.text
        assert isinstance(image, ImageBlock) and image.image_mimetype == "image/png"
        png = image.resolve_image().read()
        assert png == output.raw_output.annotated_png and png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as picture:
            assert picture.format == "PNG" and picture.size == upload_sizes(W, H, ImageSettings())[0]  # drawn on the upload
    caption = await tools["describe_image"].acall(image="img_1")
    assert [type(b) for b in caption.blocks] == [TextBlock], "a plain caption has nothing to draw"


# ------------------------------------------------------------------ errors


async def test_unregistered_handle_is_an_error_output(fake: FakeMoondream, spec: MoondreamToolSpec) -> None:
    output = await tools_by_name(spec)["count_objects"].acall(image="img_9", object="cat")
    assert output.is_error and output.tool_name == "count_objects"
    assert output.content.startswith("Error: image 'img_9' is not registered; registered: img_1")
    assert "Use one of the available images." in output.content
    assert "Traceback" not in output.content
    assert isinstance(output.exception, ImageAccessError)
    assert output.raw_output == output.content
    assert output.raw_input == {"args": (), "kwargs": {"image": "img_9", "object": "cat"}}
    assert fake.requests == []


async def test_path_outside_allowed_dirs_is_an_error_output(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    SCENE.render().save(allowed / "scene.png")
    SCENE.render().save(secret / "private.png")
    spec = MoondreamToolSpec(client, image_policy=ImagePolicy(allowed_dirs=[allowed]))
    tools = tools_by_name(spec)
    for reference in ("../secret/private.png", str(secret / "private.png"), "/etc/passwd"):
        output = await tools["locate_objects"].acall(image=reference, object="circle")
        assert output.is_error, reference
        assert output.content.startswith(f"Error: path {reference!r} is not allowed: images must be under {allowed.resolve()}")
        assert "Traceback" not in output.content
    assert fake.requests == []
    inside = await tools["count_objects"].acall(image="scene.png", object="red circle")
    assert not inside.is_error and inside.raw_output.count == 3


async def test_invalid_arguments_are_error_outputs(fake: FakeMoondream, spec: MoondreamToolSpec) -> None:
    tools = tools_by_name(spec)
    missing = await tools["count_objects"].acall(image="img_1")
    assert missing.is_error and isinstance(missing.exception, ToolArgumentsError)
    assert missing.content.startswith("Error: invalid arguments for count_objects: object: Field required")
    extra = await tools["locate_objects"].acall(image="img_1", object="x", color="red")
    assert extra.is_error and "Extra inputs are not permitted" in extra.content
    short = await tools["segment_object"].acall(image="img_1", object="x", point=[1])
    assert short.is_error and "point" in short.content
    assert fake.requests == []


async def test_service_errors_are_error_outputs(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retries=0) as md:
        spec = MoondreamToolSpec(md)
        spec.add_image(SCENE.render())
        fake.fail_next(1, status=429)
        output = await spec.acall_tool("count_objects", {"image": "img_1", "object": "red circle"})
        assert output.is_error and output.content.startswith("Error: HTTP 429")
        assert "try again in a moment" in output.content
        assert (await spec.acall_tool("count_objects", {"image": "img_1", "object": "red circle"})).raw_output.count == 3


async def test_other_exceptions_propagate(spec: MoondreamToolSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown tool"):
        await spec.acall_tool("draw_image", {})

    async def broken(tool: str, arguments: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(spec.vision, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        await tools_by_name(spec)["count_objects"].acall(image="img_1", object="x")


async def test_owned_client_from_the_environment(fake: FakeMoondream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_BASE_URL", fake.base_url)
    monkeypatch.setenv("MOONDREAM_API_KEY", fake.api_key or "")
    async with MoondreamToolSpec() as spec:
        assert spec.vision.backend.base_url == fake.base_url
        spec.add_image(SCENE.render())
        check_count(await spec.acall_tool("count_objects", {"image": "img_1", "object": "red circle"}))
        session = spec.vision.backend._transport.sessions.pooled
        assert session is not None and not session.closed
    assert session.closed


# ------------------------------------------------------------------ sync calls


@pytest.mark.parametrize("name", list(TOOL_SPECS))
def test_call_in_a_plain_script(threaded_fake: FakeMoondream, name: str) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    spec = MoondreamToolSpec(md)
    spec.add_image(SCENE.render())
    arguments, check = CASES[name]
    check_output(name, tools_by_name(spec)[name].call(**arguments))
    check(spec.call_tool(name, arguments))  # by name, synchronously
    assert md._transport.sessions.pooled is None, "sync calls never tie the shared client to a loop that ends"
    asyncio.run(md.aclose())


def test_call_in_worker_threads(threaded_fake: FakeMoondream) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    spec = MoondreamToolSpec(md)
    spec.add_image(SCENE.render())
    tools = tools_by_name(spec)
    outputs: dict[str, ToolOutput] = {}

    def work(name: str) -> None:
        outputs[name] = tools[name].call(**CASES[name][0])

    threads = [threading.Thread(target=work, args=(name,)) for name in TOOL_SPECS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(outputs) == set(TOOL_SPECS)
    for name, output in outputs.items():
        check_output(name, output)
    error = tools["count_objects"].call(image="img_9", object="cat")
    assert error.is_error and error.content.startswith("Error: image 'img_9' is not registered")
    asyncio.run(md.aclose())


async def test_call_inside_a_running_loop_keeps_the_shared_client(threaded_fake: FakeMoondream) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    async with MoondreamToolSpec(md) as spec:
        spec.add_image(SCENE.render())
        tools = tools_by_name(spec)
        check_count(await tools["count_objects"].acall(image="img_1", object="red circle"))  # pools a session here
        pooled = md._transport.sessions.pooled
        assert pooled is not None
        for name in TOOL_SPECS:
            check_output(name, tools[name].call(**CASES[name][0]))
        error = tools["segment_object"].call(image="nope", object="x")
        assert error.is_error and "is not registered" in error.content
        assert md._transport.sessions.pooled is pooled and not pooled.closed
        check_locate(await tools["locate_objects"].acall(image="img_1", object="shapes"))
    await md.aclose()
    assert pooled.closed


# ------------------------------------------------------------------ construction and surface


def test_unknown_keywords_are_refused_naming_the_accepted_ones() -> None:
    policy = ImagePolicy(allowed_dirs=["/photos"])
    with pytest.raises(TypeError) as info:
        MoondreamToolSpec(AsyncMoondream(base_url="http://127.0.0.1:9/v1"), imagez=policy, max_objectz=3)
    assert str(info.value) == (
        "MoondreamToolSpec got unknown argument(s) 'imagez', 'max_objectz'; accepted: vision, backend,"
        " segment_backend, image_policy, return_images, max_objects, tiling, max_tiles, image_store"
    )
    with pytest.raises(TypeError, match="'images'"):  # the old name is refused, not dropped
        MoondreamToolSpec(images=policy)


def test_options_pass_through_to_the_shared_vision_tools() -> None:
    md = AsyncMoondream(base_url="http://127.0.0.1:9/v1")
    segmenter = AsyncMoondream(base_url="http://127.0.0.1:8/v1")
    policy = ImagePolicy(allow_urls=True)
    spec = MoondreamToolSpec(md, segment_backend=segmenter, image_policy=policy, return_images=True, max_objects=9)
    vision = spec.vision
    assert (vision.backend, vision.segment_backend, vision.policy) == (md, segmenter, policy)
    assert vision.return_images is True and vision.max_objects == 9


def test_one_tool_surface() -> None:
    spec = MoondreamToolSpec(AsyncMoondream(base_url="http://127.0.0.1:9/v1"))
    for name in TOOL_SPECS:
        assert not hasattr(spec, name) and not hasattr(spec, "a" + name), f"a second surface: {name}"
    assert [t.metadata.name for t in spec.to_tool_list()] == list(TOOL_SPECS)


def test_public_surface() -> None:
    import llama_index.tools.moondream as package

    assert package.__all__ == ["MoondreamToolSpec"]
    assert package.MoondreamToolSpec is MoondreamToolSpec
