"""End to end: a LlamaIndex FunctionAgent with a scripted function-calling LLM uses the four
tools on a registered scene, over real HTTP to the emulator."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.llms import MockFunctionCallingLLM

from llama_index.tools.moondream import MoondreamToolSpec
from moondream_tools import TOOL_SPECS, CountResult, DescribeResult, LocateResult, SegmentResult
from backends_support import sent_spatial_refs
from moondream_tools.testing import FakeMoondream, Scene

W, H = 960, 640
SCENE = Scene.demo()
# llama-index workflows find an agent's steps with inspect.getmembers(agent), which reads
# pydantic's deprecated instance attributes (__fields__, model_computed_fields, ...): a
# warning between the two frameworks, raised from the inspect module, that the suite's
# filterwarnings=error would turn into a failure. Only warnings raised there are ignored.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning:inspect")

BOX = re.compile(r"#1 box \((\d+), (\d+)\)-\((\d+), (\d+)\)")


def scripted_llm() -> MockFunctionCallingLLM:
    """A function-calling LLM that plays a fixed plan, reading the tool results it gets.

    Turn 1: describe, count, locate, and one call with a wrong image name.
    Turn 2: segment the blue square with the box that locate_objects returned.
    Turn 3: a final answer quoting the tool texts.
    """

    def respond(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        offered = sorted(tool.metadata.name for tool in kwargs.get("tools", []))
        assert offered == sorted(TOOL_SPECS), offered
        results = [m.content or "" for m in messages if m.role == MessageRole.TOOL]
        turns = sum(1 for m in messages if any(isinstance(b, ToolCallBlock) for b in m.blocks))
        calls: list[tuple[str, dict[str, Any]]]
        if turns == 0:
            calls = [
                ("describe_image", {"image": "scene", "question": "How many red circles are there?"}),
                ("count_objects", {"image": "scene", "object": "red circle"}),
                ("locate_objects", {"image": "scene", "object": "blue square"}),
                ("count_objects", {"image": "img_7", "object": "red circle"}),
            ]
        elif turns == 1:
            located = next(BOX.search(r) for r in results if r.startswith("Found"))
            assert located is not None
            box = [int(v) for v in located.groups()]
            calls = [("segment_object", {"image": "scene", "object": "blue square", "box": box})]
        else:
            return ChatMessage(role=MessageRole.ASSISTANT, content="Here is what I saw:\n" + "\n".join(results))
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(tool_call_id=f"call_{len(results)}_{i}", tool_name=name, tool_kwargs=args)
                for i, (name, args) in enumerate(calls)
            ],
        )

    return MockFunctionCallingLLM(response_generator=respond)


async def run_agent(agent: FunctionAgent | AgentWorkflow) -> tuple[list[ToolCall], list[ToolCallResult], str]:
    handler = agent.run(user_msg="How many red circles are in 'scene', and how big is the blue square?")
    calls: list[ToolCall] = []
    results: list[ToolCallResult] = []
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            results.append(event)
        elif isinstance(event, ToolCall):
            calls.append(event)
    response = await handler
    return calls, results, str(response)


@pytest.mark.parametrize("return_images", [False, True])
async def test_function_agent_uses_all_four_tools(
    fake: FakeMoondream, backends: tuple[Any, Any], return_images: bool
) -> None:
    backend, segmenter = backends
    spec = MoondreamToolSpec(backend, segment_backend=segmenter, return_images=return_images)
    spec.add_image(SCENE.render(), name="scene")
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=scripted_llm(), system_prompt="Images: 'scene'.")
    calls, results, answer = await run_agent(agent)

    assert [c.tool_name for c in calls] == ["describe_image", "count_objects", "locate_objects", "count_objects", "segment_object"]
    by_call = {r.tool_id: r for r in results}
    assert len(by_call) == 5
    outputs = {r.tool_name: r.tool_output for r in results if not r.tool_output.is_error}
    assert set(outputs) == set(TOOL_SPECS)

    describe = outputs["describe_image"]
    assert isinstance(describe.raw_output, DescribeResult)
    assert describe.content == f"scene ({W}x{H} px): 2"

    count = outputs["count_objects"]
    assert isinstance(count.raw_output, CountResult) and count.raw_output.count == 2
    truths = sorted(SCENE.matching("red circle"), key=lambda t: (t.center[1], t.center[0]))
    positions = [(int(x), int(y)) for x, y in re.findall(r"#\d at \((\d+), (\d+)\)", count.content)]
    assert len(positions) == 2
    for (x, y), truth in zip(positions, truths, strict=True):
        assert abs(x - truth.center[0] * W) <= 0.02 * W and abs(y - truth.center[1] * H) <= 0.02 * H

    square = SCENE.matching("blue square")[0]
    locate = outputs["locate_objects"]
    assert isinstance(locate.raw_output, LocateResult)
    located = BOX.search(locate.content)
    assert located is not None
    for got, want, scale in zip(map(int, located.groups()), square.bbox_px, (W, H, W, H), strict=True):
        assert abs(got - want) <= 0.02 * scale

    segment = outputs["segment_object"]
    assert isinstance(segment.raw_output, SegmentResult)
    assert segment.raw_input["kwargs"]["box"] == [int(v) for v in located.groups()], "the agent chained locate -> segment"
    assert fake.requests[-1].path.endswith(("/segment", "/sam-3/image"))
    assert len(sent_spatial_refs(fake.requests[-1], (W, H))) == 1
    assert abs(segment.raw_output.segmentation.area_px - square.area_px) <= 0.02 * square.area_px
    area = re.search(r"area ([\d,]+) px", segment.content)
    assert area is not None and abs(int(area.group(1).replace(",", "")) - square.area_px) <= 0.02 * square.area_px

    (error,) = [r.tool_output for r in results if r.tool_output.is_error]
    assert error.content.startswith("Error: image 'img_7' is not registered; registered: scene")
    assert "Traceback" not in error.content

    for output in outputs.values():
        kinds = [type(b) for b in output.blocks]
        drawn = return_images and output.raw_output.annotated_png is not None
        assert kinds == ([TextBlock, ImageBlock] if drawn else [TextBlock])
    if return_images:
        assert all(isinstance(outputs[n].blocks[1], ImageBlock) for n in ("count_objects", "locate_objects", "segment_object"))

    # The final answer is built from what the tools told the model.
    assert answer.startswith("Here is what I saw:")
    for output in [*outputs.values(), error]:
        assert output.content in answer


async def test_agent_workflow_with_the_tool_spec(backends: tuple[Any, Any]) -> None:
    backend, segmenter = backends
    spec = MoondreamToolSpec(backend, segment_backend=segmenter)
    spec.add_image(SCENE.render(), name="scene")
    workflow = AgentWorkflow.from_tools_or_functions(spec.to_tool_list(), llm=scripted_llm())
    calls, results, answer = await run_agent(workflow)
    assert len(calls) == len(results) == 5
    counts = [r.tool_output.raw_output.count for r in results if r.tool_name == "count_objects" and not r.tool_output.is_error]
    assert counts == [SCENE.count("red circle")] == [2]
    assert f'Counted 2 "red circle" in scene ({W}x{H} px)' in answer
