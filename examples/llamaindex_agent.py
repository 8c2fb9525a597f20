"""A LlamaIndex FunctionAgent that looks at an image with the Moondream tools.

LLM: with OPENAI_API_KEY set (optionally OPENAI_BASE_URL for any OpenAI-compatible server
and OPENAI_MODEL) and llama-index-llms-openai-like or llama-index-llms-openai installed, a
real model drives the agent. Otherwise a scripted function-calling LLM plays a fixed plan:
describe, count, locate, then segment with the box locate returned, and answer from the
tool texts.

Vision: with MOONDREAM_API_KEY (Moondream Cloud) or MOONDREAM_BASE_URL (e.g. Moondream
Station at http://localhost:2020/v1) set, examples/data/waterfall.jpg is registered as
"photo". Otherwise the offline emulator serves a synthetic scene registered as "photo".
With neither LLM nor Moondream configured it runs offline:

    PYTHONPATH=integrations/llama-index python examples/llamaindex_agent.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from pydantic.warnings import PydanticDeprecationWarning

from llama_index.tools.moondream import MoondreamToolSpec
from moondream_tools import AsyncMoondream, MoondreamError

# llama-index workflows find an agent's steps with inspect.getmembers(agent), which reads
# pydantic's deprecated instance attributes; harmless, and noisy under -W error.
warnings.filterwarnings("ignore", category=PydanticDeprecationWarning, module="inspect")

PHOTO = Path(__file__).resolve().parent / "data" / "waterfall.jpg"
BOX = re.compile(r"#1 box \((\d+), (\d+)\)-\((\d+), (\d+)\)")


def openai_llm() -> tuple[FunctionCallingLLM, str] | None:
    """An OpenAI-compatible LLM from the environment, if one is configured and installed."""
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        return None
    base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    model = os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
    if importlib.util.find_spec("llama_index.llms.openai_like") is not None:
        from llama_index.llms.openai_like import OpenAILike

        llm = OpenAILike(model=model, api_base=base_url, api_key=api_key, is_chat_model=True,
                         is_function_calling_model=True, context_window=128_000)
        return llm, f"OpenAI-compatible LLM {model} at {base_url}"
    if importlib.util.find_spec("llama_index.llms.openai") is not None:
        from llama_index.llms.openai import OpenAI

        return OpenAI(model=model, api_base=base_url, api_key=api_key), f"OpenAI LLM {model} at {base_url}"
    return None


def scripted_llm(ask: dict[str, str]) -> MockFunctionCallingLLM:
    """A function-calling LLM that plays a fixed plan and reads the tool results it gets."""

    def respond(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        results = [m.content or "" for m in messages if m.role == MessageRole.TOOL]
        turns = sum(1 for m in messages if any(isinstance(b, ToolCallBlock) for b in m.blocks))
        if turns == 0:
            calls = [
                ("describe_image", {"image": "photo", "length": "short"}),
                ("count_objects", {"image": "photo", "object": ask["count"]}),
                ("locate_objects", {"image": "photo", "object": ask["locate"]}),
            ]
        elif turns == 1:
            segment: dict[str, Any] = {"image": "photo", "object": ask["locate"]}
            found = next((m for r in results if (m := BOX.search(r))), None)
            if found is not None:  # chain: segment the first box locate_objects found
                segment["box"] = [int(v) for v in found.groups()]
            calls = [("segment_object", segment)]
        else:
            answer = "From the vision tools:\n" + "\n".join(f"- {r}" for r in results)
            return ChatMessage(role=MessageRole.ASSISTANT, content=answer)
        blocks = [
            ToolCallBlock(tool_call_id=f"call_{len(results)}_{i}", tool_name=name, tool_kwargs=args)
            for i, (name, args) in enumerate(calls)
        ]
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)

    return MockFunctionCallingLLM(response_generator=respond)


@asynccontextmanager
async def vision_backend() -> AsyncIterator[tuple[MoondreamToolSpec, dict[str, str], str]]:
    """The tool spec with "photo" registered, what to ask about, and a line saying which backend."""
    if os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL"):
        async with AsyncMoondream() as md:
            spec = MoondreamToolSpec(md)
            spec.add_image(PHOTO, name="photo")
            ask = {"count": "word", "locate": "waterfall",
                   "question": "Describe the image 'photo', count the words written on it, and tell me "
                               "where the waterfall is and how much of the image it covers."}
            yield spec, ask, f"Vision: the Moondream server at {md.base_url}, on {PHOTO.name} as 'photo'."
        return
    from moondream_tools.testing import FakeMoondream, Scene

    scene = Scene.demo()
    async with FakeMoondream() as server:
        async with AsyncMoondream(api_key=server.api_key, base_url=server.base_url) as md:
            spec = MoondreamToolSpec(md)
            spec.add_image(scene.render(), name="photo")
            ask = {"count": "red circle", "locate": "blue square",
                   "question": "Describe the image 'photo', count its red circles, and tell me where the "
                               "blue square is and how much of the image it covers."}
            yield spec, ask, ("Vision: no MOONDREAM_API_KEY or MOONDREAM_BASE_URL set, using the offline "
                              "emulator on a synthetic scene registered as 'photo'.")


async def main() -> None:
    configured = openai_llm()
    if configured is None:
        print("LLM: no OpenAI-compatible LLM configured (OPENAI_API_KEY + llama-index-llms-openai[-like]),"
              " using a scripted function-calling LLM.")
    else:
        print(f"LLM: {configured[1]}.")
    async with vision_backend() as (spec, ask, backend):
        print(backend)
        llm = configured[0] if configured is not None else scripted_llm(ask)
        agent = FunctionAgent(
            tools=spec.to_tool_list(),
            llm=llm,
            system_prompt=(
                "You answer questions about images with the vision tools. The images you can look "
                "at: 'photo'. Quote the numbers the tools give you."
            ),
        )
        print(f"\nUser: {ask['question']}\n")
        handler = agent.run(user_msg=ask["question"])
        async for event in handler.stream_events():
            if isinstance(event, ToolCall):
                print(f"-> {event.tool_name}({', '.join(f'{k}={v!r}' for k, v in event.tool_kwargs.items())})")
            elif isinstance(event, ToolCallResult):
                flag = " [error]" if event.tool_output.is_error else ""
                print(f"<- {event.tool_name}{flag}: {event.tool_output.content}\n")
        response = await handler
        print(f"Agent: {response}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MoondreamError as exc:
        raise SystemExit(f"Moondream error: {exc}") from None
