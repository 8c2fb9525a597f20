"""Videos for agents: the four tools on a registered video, at a moment (``time``) or over
its whole length (the timeline), against the synthetic clip's truth at each time."""

from __future__ import annotations

from pathlib import Path

import pytest
from video_support import MOVING

from moondream_tools import (
    AsyncMoondream,
    ImageError,
    ImageSize,
    TimeSpan,
    ToolArgumentsError,
    VisionTools,
)
from moondream_tools.mcp_server import structured_output
from moondream_tools.testing import FakeMoondream, Scene

TOL = 0.02  # the emulator's native tolerance, normalized


def truth(time: float, label: str) -> tuple[float, float, float, float]:
    (shape,) = [t for t in MOVING.at(time).truth() if t.label == label]
    return shape.bbox


def close_to(box: object, expected: tuple[float, float, float, float]) -> bool:
    got = (box.x_min, box.y_min, box.x_max, box.y_max)  # type: ignore[attr-defined]
    return all(abs(a - b) <= TOL for a, b in zip(got, expected))


async def test_locate_at_a_moment_sees_the_frame_shown_then(client: AsyncMoondream, videos: dict[str, Path]) -> None:
    tools = VisionTools(client)
    clip = tools.add_video(videos["moving"])
    assert clip == "vid_1" and tools.video_names == ["vid_1"] and tools.image_names == []
    result = await tools.locate(clip, "blue circle", more_objects=["red square"], time=1.5)
    assert result.time == 1.5 and result.timeline is None and result.image_size == ImageSize(width=160, height=120)
    (circle,) = result.detections.objects
    (square,) = result.more[0].detections.objects
    assert close_to(circle, truth(1.5, "blue circle")) and close_to(square, truth(1.5, "red square"))
    assert result.text.startswith('Found 1 "blue circle" in vid_1 at 1.5 s (160x120 px)')
    before = await tools.count(clip, "blue circle", time=0.5)  # the circle appears at 1 s
    assert before.count == 0 and before.time == 0.5 and "vid_1 at 0.5 s" in before.text


async def test_without_time_count_and_locate_say_when_the_object_appears(
    client: AsyncMoondream, fake: FakeMoondream, videos: dict[str, Path]
) -> None:
    tools = VisionTools(client)
    clip = tools.add_video(videos["moving"], name="street")
    result = await tools.run("count_objects", {"image": "street", "object": "blue circle", "more_objects": ["red square"]})
    # 3.0 s sampled every 0.5 s: frames at 0, 0.5, ..., 2.5; one point request each per phrase.
    assert len([r for r in fake.requests if r.path == "/v1/point"]) == 12
    circle, square = result, result.more[0]
    assert circle.timeline is not None and square.timeline is not None
    assert (circle.timeline.duration, circle.timeline.every, circle.timeline.frames) == (pytest.approx(3.0), 0.5, 6)
    assert circle.timeline.spans == [TimeSpan(start=1.0, end=2.5, most=1)]  # truth: appears at 1.0 s
    assert square.timeline.spans == [TimeSpan(start=0.0, end=2.5, most=1)]
    assert circle.timeline.tracks == square.timeline.tracks == 1  # one object each, followed throughout
    assert circle.count == 1 and circle.time == 1.0  # its busiest moment: the first it was seen at
    (point,) = circle.points.points
    x0, y0, x1, y1 = truth(1.0, "blue circle")
    assert x0 <= point.x <= x1 and y0 <= point.y <= y1
    assert result.text.splitlines()[0].startswith(
        '"blue circle" seen in street (3.0 s video, 160x120 px; 6 frames sampled every 0.5 s) during 1-2.5 s'
    )
    assert "Busiest moment: Counted 1 \"blue circle\" in street at 1 s" in result.text
    absent = await tools.locate(clip, "green triangle")
    assert absent.timeline is not None and absent.timeline.spans == [] and absent.detections.objects == []
    assert absent.text == 'No "green triangle" seen in street (3.0 s video, 160x120 px; 6 frames sampled every 0.5 s).'
    out = structured_output(result, max_objects=tools.max_objects)  # what an MCP client reads
    assert out["time"] == 1.0 and out["timeline"]["spans"] == [{"start": 1.0, "end": 2.5, "most": 1}]
    assert out["more"][0]["timeline"]["spans"] == [{"start": 0.0, "end": 2.5, "most": 1}]


async def test_describe_and_segment_need_a_time_on_a_video(
    client: AsyncMoondream, fake: FakeMoondream, videos: dict[str, Path]
) -> None:
    tools = VisionTools(client)
    clip = tools.add_video(videos["rotated"])  # stored turned, with a rotation flag
    handle = tools.add_image(Scene(64, 48, []).render())
    assert handle == "img_1"  # images and videos number on their own
    with pytest.raises(ToolArgumentsError, match=r"vid_1 is a video \(3.0 s\): give time="):
        await tools.describe(clip, "What is there?")
    with pytest.raises(ToolArgumentsError, match="past its end"):
        await tools.segment(clip, "red square", time=9.0)
    with pytest.raises(ToolArgumentsError, match="time is for videos; 'img_1' is an image"):
        await tools.count(handle, "square", time=1.0)
    with pytest.raises(ToolArgumentsError, match="time"):
        await tools.run("describe_image", {"image": clip, "time": -1})
    assert not [r for r in fake.requests if r.path != "/v1/caption" and r.path.startswith("/v1/")]
    segmented = await tools.segment(clip, "red square", time=2.0)
    assert segmented.time == 2.0 and segmented.image_size == ImageSize(width=160, height=120)  # upright
    assert close_to(segmented.segmentation.bbox, truth(2.0, "red square"))
    described = await tools.describe(clip, time=2.0)
    assert described.text.startswith("vid_1 at 2 s (160x120 px): ") and described.time == 2.0


def test_registering_videos_checks_them(tmp_path: Path, videos: dict[str, Path]) -> None:
    tools = VisionTools(AsyncMoondream(api_key="k", base_url="http://127.0.0.1:9/v1"))
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    with pytest.raises(ImageError, match="notes.mp4' is not a video"):
        tools.add_video(not_video)
    with pytest.raises(TypeError, match="a video is a path or the bytes"):
        tools.add_video(42)  # type: ignore[arg-type]
    assert tools.add_video(videos["moving"].read_bytes(), name="clip") == "clip"
    with pytest.raises(ValueError, match="names a registered video"):
        tools.add_image(b"...", name="clip")
    tools.add_image(Scene(8, 8, []).render(), name="pic")
    with pytest.raises(ValueError, match="names a registered image"):
        tools.add_video(videos["moving"], name="pic")
    tools.remove_video("clip")
    assert tools.video_names == []
    with pytest.raises(KeyError, match="no video is registered as 'clip'"):
        tools.remove_video("clip")


async def test_both_frameworks_pass_time_through_their_tools(client: AsyncMoondream, videos: dict[str, Path]) -> None:
    """A model's tool call with ``time`` (LangChain's tool call, LlamaIndex's FunctionTool)
    reaches the frame shown then; without it, the timeline."""
    from langchain_core.messages import ToolMessage
    from langchain_moondream import MoondreamToolkit
    from llama_index.tools.moondream import MoondreamToolSpec

    async with MoondreamToolkit(backend=client) as toolkit:
        assert toolkit.add_video(videos["moving"]) == "vid_1"
        (locate,) = [t for t in toolkit.get_tools() if t.name == "locate_objects"]
        call = {"name": "locate_objects", "args": {"image": "vid_1", "object": "red square", "time": 2.0},
                "id": "call_1", "type": "tool_call"}
        message = await locate.ainvoke(call)
        assert isinstance(message, ToolMessage) and message.artifact.time == 2.0
        (box,) = message.artifact.detections.objects
        assert close_to(box, truth(2.0, "red square")) and 'in vid_1 at 2 s (160x120 px)' in message.content
    async with MoondreamToolSpec(client) as spec:
        assert spec.add_video(videos["moving"], name="clip") == "clip"
        tools = {tool.metadata.name: tool for tool in spec.to_tool_list()}
        output = await tools["count_objects"].acall(image="clip", object="blue circle")
        assert output.raw_output.timeline.spans == [TimeSpan(start=1.0, end=2.5, most=1)]
        assert output.content.startswith('"blue circle" seen in clip (3.0 s video')
        schema = tools["segment_object"].metadata.fn_schema.model_json_schema()
        assert "time" in schema["properties"] and "time" not in schema.get("required", [])


def test_a_video_of_unknown_length_is_sampled_from_its_start_only() -> None:
    from moondream_tools.tools.texts import VideoTimeline, _timeline_text

    timeline = VideoTimeline(duration=0.0, every=0.5, frames=80, failed=0, spans=[], tracks=0)
    text = _timeline_text("vid_1", "car", timeline, ImageSize(width=64, height=48), "")
    assert text == 'No "car" seen in vid_1 (video of unknown length, 64x48 px; 80 frames sampled every 0.5 s, from its start only).'
