"""Chat with images: a user attaches a photo to a text-only agent, asks again later, and the
conversation goes on after a restart.

``MoondreamImageMiddleware`` stores each image a message holds (in an on-disk
``ImageStore``) and shows the model a placeholder naming its handle,
``[image img_3fa2c1d0: 960x640 px]``; the model passes the handle to the vision tools. The
checkpointer keeps the conversation with handles (not base64), so a later turn, and a new
process with a new toolkit over the same store directory, still see the photo.

With OPENAI_API_KEY set and a Moondream key (MOONDREAM_API_KEY, or a server at
MOONDREAM_BASE_URL), it uses a real chat model (MOONDREAM_AGENT_MODEL, default
``openai:gpt-4o-mini``; needs ``langchain-openai``) and Moondream. Otherwise it runs offline:
the Moondream emulator and a scripted model that reads the placeholders like a real one.

    python examples/chat_with_images.py

The photo is a generated scene (two red circles, a blue square, a yellow triangle), so the
answers can be checked.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from moondream_tools import AsyncMoondream, ImageStore, MoondreamError
from moondream_tools.testing import Scene

from langchain_moondream import MoondreamImageMiddleware, MoondreamToolkit
from langchain_moondream.testing import ScriptedChatModel

SYSTEM_PROMPT = (
    "You answer questions about the images the user sends. Each image appears in the"
    " conversation as [image <handle>: <width>x<height> px]; pass the handle as `image` to"
    " your vision tools. Give exact numbers from the tools."
)
PLACEHOLDER = re.compile(r"\[image (img_[0-9a-f]{8}): \d+x\d+ px\]")


# ------------------------------------------------------------------ the model


def scripted_model() -> ScriptedChatModel:
    """What a tool-calling model does here: count what the question names in the user's
    latest image (its handle read from the placeholder), then answer from the tool."""

    def question(messages: list[BaseMessage]) -> str:
        return next(m.text for m in reversed(messages) if isinstance(m, HumanMessage))

    def count(messages: list[BaseMessage]) -> list[dict[str, Any]] | str:
        handles = [h for m in messages if isinstance(m, HumanMessage) for h in PLACEHOLDER.findall(m.text)]
        wanted = re.search(r"how many (.+?)s\b", question(messages).lower())
        if not handles or not wanted:
            return "Please attach a photo and ask me how many of something it shows."
        return [{"name": "count_objects", "args": {"image": handles[-1], "object": wanted.group(1)}}]

    def answer(messages: list[BaseMessage]) -> str:
        counted = re.search(r'Counted (\d+) "(.+?)"', messages[-1].text)
        if not counted:
            return f"The tool said: {messages[-1].text}"
        n, thing = int(counted.group(1)), counted.group(2)
        return f"There {'is' if n == 1 else 'are'} {n} {thing}{'' if n == 1 else 's'}."

    return ScriptedChatModel(steps=[count, answer])


def live_model() -> BaseChatModel | None:
    """The real chat model, when OPENAI_API_KEY and a Moondream key are set; None (and why)
    to run offline."""
    if not os.environ.get("OPENAI_API_KEY") or not (
        os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL")
    ):
        print("Model: a scripted model (set OPENAI_API_KEY and MOONDREAM_API_KEY for real services).")
        return None
    spec = os.environ.get("MOONDREAM_AGENT_MODEL", "openai:gpt-4o-mini")
    try:
        from langchain.chat_models import init_chat_model

        model = init_chat_model(spec)
    except Exception as exc:  # the provider package is missing, or the key is refused
        print(f"Model: {spec} is not usable ({type(exc).__name__}: {exc}); using a scripted model.")
        return None
    print(f"Model: {spec}.")
    return model


# ------------------------------------------------------------------ the vision service


@asynccontextmanager
async def vision_service(live: bool) -> AsyncIterator[dict[str, Any]]:
    """How to reach Moondream: the real service from the environment, or the emulator."""
    if live:
        print("Vision: Moondream (MOONDREAM_API_KEY / MOONDREAM_BASE_URL).")
        yield {}
        return
    from moondream_tools.testing import FakeMoondream

    print("Vision: the offline Moondream emulator.")
    async with FakeMoondream() as server:
        yield {"api_key": server.api_key, "base_url": server.base_url}


@asynccontextmanager
async def session(connection: dict[str, Any], store: Path) -> AsyncIterator[MoondreamToolkit]:
    """One process's toolkit: its own client, and the image store in ``store``."""
    images = ImageStore(store)
    try:
        async with AsyncMoondream(**connection) as client:
            yield MoondreamToolkit(backend=client, image_store=images)
    finally:
        images.close()


# ------------------------------------------------------------------ the conversation


def show(message: BaseMessage) -> None:
    if isinstance(message, HumanMessage):  # the middleware's rewrite of a user message
        for handle in PLACEHOLDER.finditer(message.text):
            print(f"   (the photo is now {handle.group(0)})")
    elif isinstance(message, AIMessage):
        for call in message.tool_calls:
            args = ", ".join(f"{key}={value!r}" for key, value in call["args"].items())
            print(f"-> {call['name']}({args})")
        if message.text:
            print(f"Agent: {message.text}")
    elif isinstance(message, ToolMessage):
        print(f"{'!!' if message.status == 'error' else '<-'} {message.name}: {message.text}")


async def turn(agent: Any, thread: dict[str, Any], content: str | list[dict[str, Any]]) -> None:
    text = content if isinstance(content, str) else " ".join(b["text"] for b in content if b["type"] == "text")
    attached = "" if isinstance(content, str) else " [photo attached]"
    print(f"\nUser: {text}{attached}")
    async for update in agent.astream({"messages": [{"role": "user", "content": content}]}, thread, stream_mode="updates"):
        for node in update.values():
            for message in (node or {}).get("messages", []):
                show(message)


def new_agent(model: BaseChatModel | None, toolkit: MoondreamToolkit, checkpointer: InMemorySaver) -> Any:
    return create_agent(
        model or scripted_model(),
        tools=[],  # the middleware brings the toolkit's four tools
        middleware=[MoondreamImageMiddleware(toolkit)],
        system_prompt=SYSTEM_PROMPT,
        checkpointer=checkpointer,
    )


async def main() -> None:
    model = live_model()
    scene = Scene.demo()
    photo = {"type": "image", "base64": base64.b64encode(scene.encode()).decode(), "mime_type": "image/jpeg"}
    # A persistent checkpointer (e.g. langgraph-checkpoint-sqlite's) survives a real restart;
    # this one lives as long as the script, which plays both processes.
    checkpointer = InMemorySaver()
    thread = {"configurable": {"thread_id": "chat-1"}}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "images"
        async with vision_service(live=model is not None) as connection:
            async with session(connection, store) as toolkit:
                agent = new_agent(model, toolkit, checkpointer)
                await turn(agent, thread, [{"type": "text", "text": "How many red circles are in this photo?"}, photo])
                await turn(agent, thread, "And how many blue squares?")

            print("\n--- restart: a new toolkit over the same image store, the same checkpointed thread ---")
            async with session(connection, store) as toolkit:
                agent = new_agent(model, toolkit, checkpointer)
                await turn(agent, thread, "How many yellow triangles are there?")
                saved = agent.get_state(thread).values["messages"]
                print(f"\nThe thread holds {len(saved)} messages; the photo is kept as: {saved[0].content[1]['text']}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MoondreamError as exc:
        raise SystemExit(f"Moondream error: {exc}") from None
