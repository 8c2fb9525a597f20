"""End to end: a real LangChain agent (``langchain.agents.create_agent``) driven by a scripted
chat model calls all four tools on a synthetic scene served by the emulator."""

from __future__ import annotations

import re
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from moondream_tools import CountResult, LocateResult, SegmentResult

from langchain_moondream import MoondreamToolkit
from langchain_moondream.testing import ScriptedChatModel
from lc_support import SCENE, H, W, assert_box, boxes, centers, close, segment_numbers

QUESTION = "Look at img_1: what is in it, how many red circles are there, and how big is the blue square?"


def last_tool_text(messages: list[BaseMessage], name: str) -> str:
    return next(m for m in reversed(messages) if isinstance(m, ToolMessage) and m.name == name).text


def segment_the_located_square(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """Use the box locate_objects returned as the hint for segment_object."""
    (box,) = boxes(last_tool_text(messages, "locate_objects"))
    return [{"name": "segment_object", "args": {"image": "img_1", "object": "blue square", "box": list(box)}}]


def final_answer(messages: list[BaseMessage]) -> str:
    count = re.search(r"Counted (\d+)", last_tool_text(messages, "count_objects"))
    area = re.search(r"area ([\d,]+) px", last_tool_text(messages, "segment_object"))
    assert count and area
    return f"There are {count.group(1)} red circles; the blue square covers {area.group(1)} px."


def scripted_model() -> ScriptedChatModel:
    return ScriptedChatModel(
        steps=[
            # A wrong handle first: the agent reads the error and recovers.
            [{"name": "describe_image", "args": {"image": "photo", "length": "short"}}],
            lambda messages: [
                {"name": "describe_image", "args": {"image": re.search(r"registered: (\w+)", messages[-1].text).group(1)}}
            ],
            # Two tools in one turn: run concurrently by the agent's tool node.
            [
                {"name": "count_objects", "args": {"image": "img_1", "object": "red circle"}},
                {"name": "locate_objects", "args": {"image": "img_1", "object": "blue square"}},
            ],
            segment_the_located_square,
            final_answer,
        ]
    )


def check_conversation(messages: list[BaseMessage]) -> None:
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.name for m in tool_messages] == [
        "describe_image",
        "describe_image",
        "count_objects",
        "locate_objects",
        "segment_object",
    ]
    wrong, described, counted, located, segmented = tool_messages
    assert wrong.status == "error" and wrong.text.startswith("Error: image 'photo' is not registered; registered: img_1")
    assert described.status == "success" and described.text.startswith(f"img_1 ({W}x{H} px): ")
    assert "three red circles" in described.text.lower()

    truths = sorted(SCENE.matching("red circle"), key=lambda t: t.center[0])
    assert isinstance(counted.artifact, CountResult) and counted.artifact.count == len(truths) == 3
    for (x, y), truth in zip(centers(counted.text), truths, strict=True):
        assert close(x, truth.center[0] * W, W) and close(y, truth.center[1] * H, H)

    square = SCENE.matching("blue square")[0]
    assert isinstance(located.artifact, LocateResult)
    (box,) = boxes(located.text)
    assert_box(box, square.bbox_px)

    assert isinstance(segmented.artifact, SegmentResult)
    area, percent, seg_box = segment_numbers(segmented.text)
    assert close(area, square.area_px, square.area_px)
    assert percent == pytest.approx(100 * square.area_px / (W * H), abs=0.1)
    assert_box(seg_box, square.bbox_px)

    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.text == f"There are 3 red circles; the blue square covers {area:,} px."


async def test_agent_ainvoke_uses_all_four_tools(toolkit: MoondreamToolkit) -> None:
    agent = create_agent(scripted_model(), toolkit.get_tools(), system_prompt="Images: img_1.")
    state = await agent.ainvoke({"messages": [("user", QUESTION)]})
    check_conversation(state["messages"])
    # The same agent runs again (the scripted model keeps no state between runs).
    again = await agent.ainvoke({"messages": [("user", QUESTION)]})
    check_conversation(again["messages"])


def test_agent_invoke_uses_all_four_tools(threaded_toolkit: MoondreamToolkit) -> None:
    agent = create_agent(scripted_model(), threaded_toolkit.get_tools(), system_prompt="Images: img_1.")
    state = agent.invoke({"messages": [("user", QUESTION)]})
    check_conversation(state["messages"])


async def test_agent_streams_tool_messages(toolkit: MoondreamToolkit) -> None:
    agent = create_agent(scripted_model(), toolkit.get_tools())
    names: list[str] = []
    async for update in agent.astream({"messages": [("user", QUESTION)]}, stream_mode="updates"):
        for node in update.values():
            names += [m.name for m in (node or {}).get("messages", []) if isinstance(m, ToolMessage)]
    assert sorted(names) == sorted(["describe_image"] * 2 + ["count_objects", "locate_objects", "segment_object"])
