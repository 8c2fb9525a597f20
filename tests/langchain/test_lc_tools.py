"""The LangChain tools against the emulator: texts vs ground truth, artifacts, images, errors,
sync and async calls, construction and the toolkit."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from moondream_tools.images import ImageSettings, upload_sizes
from moondream_tools import (
    TOOL_SPECS,
    AsyncMoondream,
    ConfigurationError,
    CountResult,
    DescribeResult,
    ImageAccessError,
    ImagePolicy,
    LocateResult,
    SegmentResult,
    VisionTools,
    tool_error_text,
)
from moondream_tools.testing import FakeMoondream
from PIL import Image

from langchain_moondream import (
    TOOL_CLASSES,
    MoondreamBaseTool,
    MoondreamCountTool,
    MoondreamDescribeTool,
    MoondreamLocateTool,
    MoondreamSegmentTool,
    MoondreamToolkit,
)
from lc_support import SCENE, H, W, assert_box, boxes, centers, close, segment_numbers


def call(name: str, **args: Any) -> dict[str, Any]:
    """A ToolCall dict, as an agent's model writes it."""
    return {"type": "tool_call", "id": f"call_{name}", "name": name, "args": args}


def tools_by_name(kit: MoondreamToolkit) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in kit.get_tools()}


# ------------------------------------------------------------------ results vs ground truth


async def test_count_message_matches_ground_truth(toolkit: MoondreamToolkit) -> None:
    message = await tools_by_name(toolkit)["count_objects"].ainvoke(call("count_objects", image="img_1", object="red circle"))
    assert isinstance(message, ToolMessage)
    assert message.status == "success" and message.tool_call_id == "call_count_objects"
    assert isinstance(message.content, str)
    assert message.content.startswith(f'Counted 3 "red circle" in img_1 ({W}x{H} px): #1 at (')
    truths = sorted(SCENE.matching("red circle"), key=lambda t: t.center[0])
    got = centers(message.content)
    assert len(got) == len(truths) == 3
    for (x, y), truth in zip(got, truths, strict=True):
        assert close(x, truth.center[0] * W, W) and close(y, truth.center[1] * H, H)
    assert isinstance(message.artifact, CountResult)
    assert message.artifact.count == 3 and message.artifact.text == message.content


async def test_locate_message_matches_ground_truth(toolkit: MoondreamToolkit) -> None:
    message = await tools_by_name(toolkit)["locate_objects"].ainvoke(call("locate_objects", image="img_1", object="shapes"))
    got = boxes(message.content)
    assert len(got) == len(SCENE.truth()) == 5
    for box in got:
        truth = min(SCENE.truth(), key=lambda t: sum(abs(a - b) for a, b in zip(box, t.bbox_px)))
        assert_box(box, truth.bbox_px)
    assert isinstance(message.artifact, LocateResult)
    assert len(message.artifact.detections.objects) == 5


async def test_segment_message_matches_ground_truth(toolkit: MoondreamToolkit) -> None:
    truth = SCENE.matching("blue square")[0]
    message = await tools_by_name(toolkit)["segment_object"].ainvoke(
        call("segment_object", image="img_1", object="blue square")
    )
    area, percent, box = segment_numbers(message.content)
    assert close(area, truth.area_px, truth.area_px)
    assert percent == pytest.approx(100 * truth.area_px / (W * H), abs=0.1)
    assert_box(box, truth.bbox_px)
    assert isinstance(message.artifact, SegmentResult)
    assert close(message.artifact.segmentation.area_px, truth.area_px, truth.area_px)


async def test_segment_point_picks_the_instance(toolkit: MoondreamToolkit) -> None:
    right = max(SCENE.matching("red circle"), key=lambda t: t.center[0])
    message = await tools_by_name(toolkit)["segment_object"].ainvoke(
        call("segment_object", image="img_1", object="red circle", point=[1050, 460])
    )
    _, _, box = segment_numbers(message.content)
    assert_box(box, right.bbox_px)


async def test_describe_answers_and_captions(toolkit: MoondreamToolkit) -> None:
    tool = tools_by_name(toolkit)["describe_image"]
    answer = await tool.ainvoke(call("describe_image", image="img_1", question="How many red circles are there?"))
    assert answer.content == f"img_1 ({W}x{H} px): 3"
    assert isinstance(answer.artifact, DescribeResult) and answer.artifact.answer is not None
    caption = await tool.ainvoke(call("describe_image", image="img_1"))
    assert caption.content.startswith(f"img_1 ({W}x{H} px): ") and "three red circles" in caption.content.lower()


async def test_plain_args_invoke_returns_the_text(toolkit: MoondreamToolkit) -> None:
    text = await tools_by_name(toolkit)["count_objects"].ainvoke({"image": "img_1", "object": "blue square"})
    assert text.startswith('Counted 1 "blue square" in img_1')


# ------------------------------------------------------------------ annotated images


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("count_objects", {"object": "red circle"}),
        ("locate_objects", {"object": "blue square"}),
        ("segment_object", {"object": "yellow triangle"}),
    ],
)
async def test_return_images_gives_text_and_png_blocks(
    client: AsyncMoondream, name: str, args: dict[str, Any]
) -> None:
    kit = MoondreamToolkit(backend=client, return_images=True)
    kit.add_image(SCENE.render())
    message = await tools_by_name(kit)[name].ainvoke(call(name, image="img_1", **args))
    assert isinstance(message.content, list) and len(message.content) == 2
    text, image = message.content
    assert isinstance(text, dict) and isinstance(image, dict)
    assert text["type"] == "text" and text["text"] == message.artifact.text
    assert image["type"] == "image" and image["mime_type"] == "image/png"
    png = base64.b64decode(image["base64"])
    assert png == message.artifact.annotated_png
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == upload_sizes(W, H, ImageSettings())[0]  # drawn on the upload


async def test_return_images_without_a_picture_is_a_text_block(client: AsyncMoondream) -> None:
    tool = MoondreamDescribeTool(backend=client, return_images=True)
    tool.vision.add_image(SCENE.render())
    message = await tool.ainvoke(call("describe_image", image="img_1", length="short"))
    assert [block["type"] for block in message.content] == ["text"]  # type: ignore[index]


async def test_no_images_by_default(toolkit: MoondreamToolkit) -> None:
    message = await tools_by_name(toolkit)["locate_objects"].ainvoke(
        call("locate_objects", image="img_1", object="blue square")
    )
    assert isinstance(message.content, str) and message.artifact.annotated_png is None


# ------------------------------------------------------------------ errors


async def test_unregistered_handle_is_a_readable_tool_error(fake: FakeMoondream, toolkit: MoondreamToolkit) -> None:
    message = await tools_by_name(toolkit)["count_objects"].ainvoke(call("count_objects", image="img_9", object="cat"))
    assert message.status == "error" and message.artifact is None
    expected = tool_error_text(ImageAccessError("image 'img_9' is not registered; registered: img_1"))
    assert message.content == expected
    assert "Traceback" not in message.content and "Use one of the available images" in message.content
    assert fake.requests == []


async def test_path_outside_allowed_dirs_is_a_readable_tool_error(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    SCENE.render().save(allowed / "scene.png")
    SCENE.render().save(tmp_path / "secret.png")
    kit = MoondreamToolkit(backend=client, image_policy=ImagePolicy(allowed_dirs=[allowed]))
    tool = tools_by_name(kit)["locate_objects"]
    for reference in ("../secret.png", str(tmp_path / "secret.png"), "/etc/passwd"):
        message = await tool.ainvoke(call("locate_objects", image=reference, object="circle"))
        assert message.status == "error"
        assert message.content.startswith(f"Error: path {reference!r} is not allowed: images must be under {allowed}")
    assert fake.requests == []
    ok = await tool.ainvoke(call("locate_objects", image="scene.png", object="blue square"))
    assert ok.status == "success" and len(boxes(ok.content)) == 1


async def test_invalid_arguments_are_a_readable_tool_error(toolkit: MoondreamToolkit) -> None:
    tools = tools_by_name(toolkit)
    missing = await tools["count_objects"].ainvoke(call("count_objects", image="img_1"))
    assert missing.status == "error"
    assert missing.content.startswith("Error: invalid arguments for count_objects: object: Field required")
    extra = await tools["locate_objects"].ainvoke(call("locate_objects", image="img_1", object="x", color="red"))
    assert extra.status == "error" and "color: Extra inputs are not permitted" in extra.content
    short = await tools["segment_object"].ainvoke(call("segment_object", image="img_1", object="x", point=[1]))
    assert short.status == "error" and "invalid arguments for segment_object: point" in short.content


async def test_service_failure_is_a_readable_tool_error(fake: FakeMoondream) -> None:
    client = AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retries=0)
    tool = MoondreamCountTool(backend=client)
    tool.vision.add_image(SCENE.render())
    fake.fail_next(status=429)
    message = await tool.ainvoke(call("count_objects", image="img_1", object="red circle"))
    assert message.status == "error"
    assert message.content.startswith("Error: HTTP 429") and "try again in a moment" in message.content
    retry = await tool.ainvoke(call("count_objects", image="img_1", object="red circle"))
    assert retry.status == "success" and retry.artifact.count == 3
    await client.aclose()


async def test_non_moondream_errors_propagate(toolkit: MoondreamToolkit, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(toolkit.vision.backend, "point", broken)
    tool = tools_by_name(toolkit)["count_objects"]
    with pytest.raises(ZeroDivisionError, match="a bug"):
        await tool.ainvoke(call("count_objects", image="img_1", object="red circle"))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        await asyncio.to_thread(tool.invoke, call("count_objects", image="img_1", object="red circle"))


# ------------------------------------------------------------------ sync calls


def test_sync_invoke_in_a_plain_thread(threaded_fake: FakeMoondream) -> None:
    client = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    kit = MoondreamToolkit(backend=client)
    kit.add_image(SCENE.render())
    tools = tools_by_name(kit)
    counts = [tools["count_objects"].invoke(call("count_objects", image="img_1", object="red circle")) for _ in range(2)]
    assert [m.artifact.count for m in counts] == [3, 3]
    located = tools["locate_objects"].invoke(call("locate_objects", image="img_1", object="blue square"))
    assert_box(boxes(located.content)[0], SCENE.matching("blue square")[0].bbox_px)
    error = tools["segment_object"].invoke(call("segment_object", image="nope", object="x"))
    assert error.status == "error" and "'nope' is not registered" in error.content
    # From several threads at once, on the one shared client.
    results: list[int] = []

    def worker() -> None:
        results.append(tools["count_objects"].invoke(call("count_objects", image="img_1", object="circle")).artifact.count)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [3, 3, 3, 3]
    assert client._transport.sessions.pooled is None, "sync calls never tie the shared client to a loop that ends"


async def test_sync_invoke_inside_a_running_loop_keeps_the_client_working(
    threaded_toolkit: MoondreamToolkit,
) -> None:
    tools = tools_by_name(threaded_toolkit)
    client = threaded_toolkit.vision.backend
    first = await tools["count_objects"].ainvoke(call("count_objects", image="img_1", object="blue square"))
    assert first.artifact.count == 1
    pooled = client._transport.sessions.pooled
    assert pooled is not None
    # A sync call from inside this running loop (as a sync framework callback would make).
    message = tools["count_objects"].invoke(call("count_objects", image="img_1", object="red circle"))
    assert message.artifact.count == 3
    segmented = tools["segment_object"].invoke(call("segment_object", image="img_1", object="yellow triangle"))
    assert segmented.status == "success"
    assert client._transport.sessions.pooled is pooled and not pooled.closed
    after = await tools["locate_objects"].ainvoke(call("locate_objects", image="img_1", object="red circle"))
    assert len(boxes(after.content)) == 3


# ------------------------------------------------------------------ construction


def test_tools_publish_the_core_specs() -> None:
    vision = VisionTools(AsyncMoondream(base_url="http://127.0.0.1:9/v1"))
    for name, spec in TOOL_SPECS.items():
        tool = TOOL_CLASSES[name](vision=vision)
        assert tool.name == spec.name and tool.description == spec.description
        assert tool.args_schema is spec.args_schema
        assert tool.tool_call_schema.model_json_schema()["properties"] == spec.args_schema.model_json_schema()["properties"]
        assert tool.response_format == "content_and_artifact"
    assert [cls.__name__ for cls in TOOL_CLASSES.values()] == [
        "MoondreamDescribeTool",
        "MoondreamCountTool",
        "MoondreamLocateTool",
        "MoondreamSegmentTool",
    ]
    with pytest.raises(TypeError, match="abstract"):
        MoondreamBaseTool(vision=vision)


def test_tool_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", "env-key")
    monkeypatch.setenv("MOONDREAM_BASE_URL", "http://127.0.0.1:2020/v1")
    tool = MoondreamLocateTool()
    assert tool.vision.backend.base_url == "http://127.0.0.1:2020/v1" and tool.vision.backend.has_api_key
    policy = ImagePolicy(allow_urls=True)
    tool = MoondreamSegmentTool(image_policy=policy, return_images=True, max_objects=5)
    assert tool.vision.policy is policy and tool.vision.return_images and tool.vision.max_objects == 5


def test_tool_without_configuration_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="MOONDREAM_API_KEY"):
        MoondreamCountTool()


def test_vision_and_convenience_keywords_exclude_each_other() -> None:
    vision = VisionTools(AsyncMoondream(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ValueError, match="either vision= or backend="):
        MoondreamCountTool(vision=vision, backend=vision.backend)
    with pytest.raises(ValueError, match="either vision= or return_images="):
        MoondreamToolkit(vision=vision, return_images=True)


def test_toolkit_shares_one_vision_and_selects_tools() -> None:
    client = AsyncMoondream(base_url="http://127.0.0.1:9/v1")
    kit = MoondreamToolkit(backend=client, image_policy=ImagePolicy(allow_urls=True))
    tools = kit.get_tools()
    assert [t.name for t in tools] == list(TOOL_SPECS)
    assert all(t.vision is kit.vision for t in tools) and kit.vision.backend is client  # type: ignore[attr-defined]
    assert kit.add_image(SCENE.render()) == "img_1" and kit.add_image(b"x", name="photo") == "photo"
    assert kit.image_names == ["img_1", "photo"]
    kit.remove_image("photo")
    assert kit.image_names == ["img_1"]
    picked = MoondreamToolkit(vision=kit.vision, tools=["segment_object", "count_objects"]).get_tools()
    assert [type(t) for t in picked] == [MoondreamSegmentTool, MoondreamCountTool]
    with pytest.raises(ValueError, match="unknown tools \\['draw_image'\\]"):
        MoondreamToolkit(vision=kit.vision, tools=["draw_image"])


async def test_toolkit_closes_the_client_it_created(fake: FakeMoondream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", fake.api_key or "")
    monkeypatch.setenv("MOONDREAM_BASE_URL", fake.base_url)
    async with MoondreamToolkit() as kit:
        kit.add_image(SCENE.render())
        message = await tools_by_name(kit)["count_objects"].ainvoke(call("count_objects", image="img_1", object="circle"))
        assert message.artifact.count == 3
        client = kit.vision.backend
    with pytest.raises(RuntimeError, match="closed"):
        await client.caption(SCENE.render())


# ------------------------------------------------------------------ construction: nothing silently dropped


@pytest.mark.parametrize("cls", [MoondreamToolkit, *TOOL_CLASSES.values()], ids=lambda c: c.__name__)
def test_unknown_keywords_are_refused_naming_the_accepted_ones(cls: type) -> None:
    policy = ImagePolicy(allowed_dirs=["/photos"])
    with pytest.raises(TypeError) as info:
        cls(backend=AsyncMoondream(base_url="http://127.0.0.1:9/v1"), imagez=policy, max_objectz=3)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__} got unknown argument(s) 'imagez', 'max_objectz'; accepted: ")
    for accepted in ("backend", "image_policy", "max_objects", "return_images", "segment_backend", "vision"):
        assert accepted in message
    with pytest.raises(TypeError, match="'images'"):  # the old name is refused, not dropped
        cls(backend=AsyncMoondream(base_url="http://127.0.0.1:9/v1"), images=policy)


def test_segment_backend_is_passed_through() -> None:
    md = AsyncMoondream(base_url="http://127.0.0.1:9/v1")
    segmenter = AsyncMoondream(base_url="http://127.0.0.1:8/v1")
    kit = MoondreamToolkit(backend=md, segment_backend=segmenter, max_objects=9)
    assert kit.vision.backend is md and kit.vision.segment_backend is segmenter and kit.vision.max_objects == 9
    tool = MoondreamSegmentTool(backend=md, segment_backend=segmenter)
    assert tool.vision.segment_backend is segmenter


def test_public_surface() -> None:
    import langchain_moondream

    assert set(langchain_moondream.__all__) == {
        "__version__",
        "MoondreamToolkit",
        "MoondreamBaseTool",
        "MoondreamDescribeTool",
        "MoondreamCountTool",
        "MoondreamLocateTool",
        "MoondreamSegmentTool",
        "TOOL_CLASSES",
        "MoondreamImageLoader",
        "MoondreamImageBlobParser",
        "MoondreamImageMiddleware",
    }
    assert all(hasattr(langchain_moondream, name) for name in langchain_moondream.__all__)
