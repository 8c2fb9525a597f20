"""A user sends a photo to a text-only LlamaIndex agent, asks a follow-up, and comes back
after a restart.

The photo arrives as an ``ImageBlock`` in the user's ``ChatMessage``. Before the agent runs,
``spec.aattach(message)`` stores it in an on-disk ``ImageStore`` and puts a placeholder in
its place (``[image img_3fa2c1d0: 640x480 px]``): the model, which cannot take images, reads
the handle and passes it to the Moondream tools, and the chat memory (a ``Memory`` in a
SQLite file) keeps the handle, not megabytes of base64. The "restart" builds a new client,
tool spec, image store and memory over the same directory: the handle in the stored history
still resolves.

LLM: with OPENAI_API_KEY set (optionally OPENAI_BASE_URL and OPENAI_MODEL) and
llama-index-llms-openai-like or llama-index-llms-openai installed, a real model drives the
agent. Otherwise a scripted function-calling LLM that cannot take images (it fails on an
``ImageBlock``) finds the handle in the conversation and calls the tools the questions ask for.

Vision: MOONDREAM_API_KEY (Moondream Cloud) or MOONDREAM_BASE_URL (e.g. Moondream Station)
if set, else the offline emulator. The photo is a generated scene of coloured shapes either
way, so the answers can be checked. State lives in a temporary directory, or in the
directory given as the first argument (kept, so a second run continues the conversation):

    PYTHONPATH=integrations/llama-index python examples/llamaindex_chat_with_images.py [STATE_DIR]
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.llms import LLM, MockFunctionCallingLLM
from llama_index.core.memory import Memory
from pydantic.warnings import PydanticDeprecationWarning
from sqlalchemy.ext.asyncio import create_async_engine

from llama_index.tools.moondream import MoondreamToolSpec
from moondream_tools import DEFAULT_BASE_URL, AsyncMoondream, ImageStore, MoondreamError
from moondream_tools.testing import Scene, Shape

# llama-index workflows find an agent's steps with inspect.getmembers(agent), which reads
# pydantic's deprecated instance attributes; harmless, and noisy under -W error.
warnings.filterwarnings("ignore", category=PydanticDeprecationWarning, module="inspect")

#: The user's photo: red circles, a blue square and a green triangle on white.
SCENE = Scene(
    640,
    480,
    [
        Shape("circle", "red", (150, 140), 90),
        Shape("circle", "red", (460, 340), 80),
        Shape("square", "blue", (480, 110), 70),
        Shape("triangle", "green", (170, 370), 90),
    ],
)
SYSTEM_PROMPT = (
    "You answer questions about images with the vision tools. You cannot see images yourself: an "
    "image the user sent appears in the conversation as [image <handle>: <width>x<height> px]; pass "
    "that handle as the tools' `image` argument, also for images from earlier turns. Quote the "
    "numbers the tools give you."
)
SESSION_ID = "user-42"
PLACEHOLDER = re.compile(r"\[image (img_[0-9a-f]{8}): \d+x\d+ px\]")
COUNT = re.compile(r"how many (.+?)s? (?:are|is)\b", re.I)
WHERE = re.compile(r"where is the (.+?)(?: in .*)?\?", re.I)


def scripted_llm() -> MockFunctionCallingLLM:
    """A function-calling LLM that, like a text-only model, cannot take images.

    It finds the most recent image handle in the conversation and calls count_objects for
    "how many X are ..." and locate_objects for "where is the X (in ...)?"; once the tools
    answered, it replies with their texts.
    """
    calls_made = 0

    def respond(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        nonlocal calls_made
        if any(isinstance(block, ImageBlock) for m in messages for block in m.blocks):
            raise RuntimeError("this LLM is text-only: it was given an image")
        last_user = max(i for i, m in enumerate(messages) if m.role == MessageRole.USER)
        results = [m.content or "" for m in messages[last_user:] if m.role == MessageRole.TOOL]
        if results:
            return ChatMessage(role=MessageRole.ASSISTANT, content="From the vision tools: " + " ".join(results))
        question = messages[last_user].content or ""
        handles = [h for m in messages[: last_user + 1] for h in PLACEHOLDER.findall(m.content or "")]
        if not handles:
            return ChatMessage(role=MessageRole.ASSISTANT, content="Please send me the photo.")
        calls = [("count_objects", {"image": handles[-1], "object": p}) for p in COUNT.findall(question)]
        calls += [("locate_objects", {"image": handles[-1], "object": p}) for p in WHERE.findall(question)]
        blocks = []
        for name, args in calls:
            calls_made += 1
            blocks.append(ToolCallBlock(tool_call_id=f"call_{calls_made}", tool_name=name, tool_kwargs=args))
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)

    return MockFunctionCallingLLM(response_generator=respond)


def choose_llm() -> LLM:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamaindex_agent import openai_llm  # the same OpenAI-compatible setup as that example

    configured = openai_llm()
    if configured is None:
        print("LLM: no OpenAI-compatible LLM configured (OPENAI_API_KEY + llama-index-llms-openai[-like]),"
              " using a scripted text-only function-calling LLM.")
        return scripted_llm()
    print(f"LLM: {configured[1]}.")
    return configured[0]


@asynccontextmanager
async def vision_service() -> AsyncIterator[dict[str, Any]]:
    """How to reach Moondream: the real service from the environment, or the emulator."""
    if os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL"):
        print(f"Vision: the Moondream server at {os.environ.get('MOONDREAM_BASE_URL') or DEFAULT_BASE_URL}.")
        yield {}
        return
    from moondream_tools.testing import FakeMoondream

    async with FakeMoondream() as server:
        print("Vision: no MOONDREAM_API_KEY or MOONDREAM_BASE_URL set, using the offline emulator.")
        yield {"api_key": server.api_key, "base_url": server.base_url}


async def session(title: str, state: Path, service: dict[str, Any], llm: LLM, turns: Sequence[ChatMessage]) -> None:
    """One run of the application: a new client, tool spec, image store and chat memory, all
    over ``state``; each turn's message has its images attached before the agent sees it."""
    print(f"\n=== {title}")
    engine = create_async_engine(f"sqlite+aiosqlite:///{state / 'memory.db'}")
    try:
        async with AsyncMoondream(**service) as md:
            spec = MoondreamToolSpec(md, image_store=ImageStore(state / "images"))
            memory = Memory.from_defaults(session_id=SESSION_ID, async_engine=engine)
            print(f"Memory: {len(await memory.aget_all())} messages stored; images stored: {spec.vision.images.names}")
            agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm, system_prompt=SYSTEM_PROMPT)
            for message in turns:
                user_msg = await spec.aattach(message)  # ImageBlocks -> "[image img_...: WxH px]"
                print(f"\nUser: {user_msg.content}")
                handler = agent.run(user_msg=user_msg, memory=memory)
                async for event in handler.stream_events():
                    if isinstance(event, ToolCall):
                        print(f"-> {event.tool_name}({', '.join(f'{k}={v!r}' for k, v in event.tool_kwargs.items())})")
                    elif isinstance(event, ToolCallResult):
                        flag = " [error]" if event.tool_output.is_error else ""
                        print(f"<- {event.tool_name}{flag}: {event.tool_output.content}")
                print(f"Agent: {await handler}")
            stored = await memory.aget_all()
            images = sum(isinstance(b, ImageBlock) for m in stored for b in m.blocks)
            print(f"\nMemory: {len(stored)} messages stored, {images} of their blocks images.")
    finally:
        await engine.dispose()


async def main() -> None:
    llm = choose_llm()
    with tempfile.TemporaryDirectory(prefix="moondream-chat-") as scratch:
        state = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch)
        state.mkdir(parents=True, exist_ok=True)
        async with vision_service() as service:
            print(f"State: {state} (the image store and the chat memory)")
            photo = ChatMessage(
                role=MessageRole.USER,
                blocks=[
                    TextBlock(text="Here is a photo of my fridge magnets. How many red circles are in it?"),
                    ImageBlock(image=SCENE.encode(), image_mimetype="image/jpeg"),
                ],
            )
            follow_up = ChatMessage(role=MessageRole.USER, content="And how many blue squares are there?")
            await session("Session 1", state, service, llm, [photo, follow_up])
            later = ChatMessage(role=MessageRole.USER, content="Where is the blue square in the photo I sent?")
            await session("Session 2, after a restart (new client, spec, store and memory)", state, service, llm, [later])


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MoondreamError as exc:
        raise SystemExit(f"Moondream error: {exc}") from None
