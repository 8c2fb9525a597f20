"""A LangChain agent that looks at an image with the four Moondream tools.

The chat model: set MOONDREAM_AGENT_MODEL to any ``init_chat_model`` spec (e.g.
``openai:gpt-4o-mini``, with ``langchain-openai`` installed and OPENAI_API_KEY set) to let a
real model drive the tools. Otherwise a scripted model plays a fixed plan (describe, count,
locate, then segment with the box it located), so the script runs offline.

The vision backend: Moondream Cloud with MOONDREAM_API_KEY, or the server at
MOONDREAM_BASE_URL (e.g. Moondream Station at http://localhost:2020/v1), looking at
examples/data/waterfall.jpg; with neither, the offline emulator on a synthetic scene.

    python examples/langchain_agent.py

The first line says which chat model is in use, the second which vision backend.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from moondream_tools import AsyncMoondream, MoondreamError

from langchain_moondream import MoondreamToolkit
from langchain_moondream.testing import ScriptedChatModel

PHOTO = Path(__file__).resolve().parent / "data" / "waterfall.jpg"


@asynccontextmanager
async def open_toolkit() -> AsyncIterator[tuple[MoondreamToolkit, dict[str, str]]]:
    """The toolkit with one image registered as "photo", and what to ask about it."""
    if os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL"):
        async with MoondreamToolkit() as toolkit:  # the client comes from the environment
            print(f"Vision: the Moondream server at {toolkit.vision.backend.base_url}, on {PHOTO.name}.")
            toolkit.add_image(PHOTO, name="photo")
            yield toolkit, {"count": "word", "object": "waterfall"}
        return
    from moondream_tools.testing import FakeMoondream, Scene

    print("Vision: no MOONDREAM_API_KEY or MOONDREAM_BASE_URL set, using the offline emulator on a synthetic scene.")
    scene = Scene.demo()
    async with FakeMoondream() as server:
        client = AsyncMoondream(api_key=server.api_key, base_url=server.base_url)
        async with MoondreamToolkit(backend=client) as toolkit:
            toolkit.add_image(scene.render(), name="photo")
            yield toolkit, {"count": "red circle", "object": "blue square"}
        await client.aclose()


def scripted_model(ask: dict[str, str]) -> ScriptedChatModel:
    """What a tool-calling model would do, as a fixed plan that reads the tool results."""

    def tool_text(messages: list[BaseMessage], name: str) -> str:
        return next(m.text for m in reversed(messages) if isinstance(m, ToolMessage) and m.name == name)

    def segment(messages: list[BaseMessage]) -> list[dict[str, Any]]:
        args: dict[str, Any] = {"image": "photo", "object": ask["object"]}
        box = re.search(r"#1 box \((\d+), (\d+)\)-\((\d+), (\d+)\)", tool_text(messages, "locate_objects"))
        if box:  # the first box found, as a hint for the one to segment
            args["box"] = [int(v) for v in box.groups()]
        return [{"name": "segment_object", "args": args}]

    def answer(messages: list[BaseMessage]) -> str:
        lines = [tool_text(messages, name) for name in ("describe_image", "count_objects", "segment_object")]
        return "Here is what the tools found:\n" + "\n".join(f"- {line}" for line in lines)

    return ScriptedChatModel(
        steps=[
            [{"name": "describe_image", "args": {"image": "photo", "length": "short"}}],
            [
                {"name": "count_objects", "args": {"image": "photo", "object": ask["count"]}},
                {"name": "locate_objects", "args": {"image": "photo", "object": ask["object"]}},
            ],
            segment,
            answer,
        ]
    )


def configured_model() -> BaseChatModel | None:
    """The chat model MOONDREAM_AGENT_MODEL names, or None (and why) to use the scripted one."""
    spec = os.environ.get("MOONDREAM_AGENT_MODEL", "").strip()
    reason = "MOONDREAM_AGENT_MODEL is not set"
    if spec:
        try:
            from langchain.chat_models import init_chat_model

            model = init_chat_model(spec)
            print(f"Model: {spec}.")
            return model
        except Exception as exc:  # missing provider package or API key
            reason = f"MOONDREAM_AGENT_MODEL={spec!r} is not usable ({type(exc).__name__}: {exc})"
    print(f"Model: {reason}; using a scripted model that plays a fixed plan (no LLM).")
    return None


def show(message: BaseMessage) -> None:
    if isinstance(message, AIMessage):
        print()
        if message.text:
            print(f"Agent: {message.text}")
        for call in message.tool_calls:
            args = ", ".join(f"{key}={value!r}" for key, value in call["args"].items())
            print(f"-> {call['name']}({args})")
    elif isinstance(message, ToolMessage):
        mark = "!!" if message.status == "error" else "<-"
        print(f"{mark} {message.name}: {message.text}")


async def main() -> None:
    model = configured_model()
    async with open_toolkit() as (toolkit, ask):
        agent = create_agent(
            model or scripted_model(ask),
            toolkit.get_tools(),
            system_prompt=(
                "You answer questions about images with your vision tools. Available images: "
                f"{', '.join(toolkit.image_names)}. Give exact numbers from the tools."
            ),
        )
        question = (
            f"Describe the image 'photo' briefly, count the {ask['count']}s in it, find the "
            f"{ask['object']} and tell me how much of the image it covers."
        )
        print(f"\nUser: {question}")
        async for update in agent.astream({"messages": [("user", question)]}, stream_mode="updates"):
            for node in update.values():
                for message in (node or {}).get("messages", []):
                    show(message)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MoondreamError as exc:
        raise SystemExit(f"Moondream error: {exc}") from None
