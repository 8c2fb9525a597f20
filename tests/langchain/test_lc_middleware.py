"""MoondreamImageMiddleware: photos users send reach the vision tools, never a text-only model.

Real ``create_agent`` loops on the emulator, driven by a scripted chat model that records every
input it gets and fails the run if any message holds an image block in any format. Ground
truth: the scene's shapes, the sha256 of the photo's bytes (its handle), the agent's state in
a checkpointer, and the requests the emulator recorded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage, messages_to_dict
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.message import add_messages
from moondream_tools import AsyncMoondream, CountResult, ImagePolicy, ImageStore, LocateResult
from moondream_tools.testing import FakeMoondream
from PIL import Image
from pydantic import Field

from langchain_moondream import MoondreamImageMiddleware, MoondreamToolkit
from langchain_moondream.testing import ScriptedChatModel
from lc_support import SCENE, H, W, centers, close

JPEG = SCENE.encode()
B64 = base64.b64encode(JPEG).decode()
DATA_URL = "data:image/jpeg;base64," + B64
#: The handle a photo gets: "img_" and 8 hex digits of the sha256 of its bytes.
HANDLE = "img_" + hashlib.sha256(JPEG).hexdigest()[:8]
PLACEHOLDER = re.compile(r"\[image (img_[0-9a-f]{8}): (\d+)x(\d+) px\]")
UNUSABLE = re.compile(r"\[image could not be used: (.+?)\]$")
#: How encoded images start in base64: JPEG, PNG.
BASE64_MARKERS = ("/9j/4", "iVBORw0KGgo", B64[:48])
MIDDLEWARE_NODE = "MoondreamImageMiddleware.before_model"


# ------------------------------------------------------------------ a text-only chat model


class ImageBlockSeen(AssertionError):
    """The text-only model was given an image."""


def assert_text_only(messages: list[BaseMessage]) -> None:
    """Fail unless every message is text only: no image block in any format, no base64."""
    for message in messages:
        if isinstance(message.content, list):
            for block in message.content:
                if not (isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text")):
                    raise ImageBlockSeen(f"{type(message).__name__} {message.id} holds a non-text block: {str(block)[:200]}")
        kinds = {block.get("type") for block in message.content_blocks}
        if kinds & {"image", "file", "non_standard"}:
            raise ImageBlockSeen(f"{type(message).__name__} {message.id} holds blocks of type {kinds}")
        dumped = repr(message)
        if "base64," in dumped or any(marker in dumped for marker in BASE64_MARKERS):
            raise ImageBlockSeen(f"{type(message).__name__} {message.id} holds base64 image data")


class TextOnlyModel(ScriptedChatModel):
    """A scripted tool-calling model that reads text only: it records each conversation it is
    given (``seen``) and raises :class:`ImageBlockSeen` at the first image."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    def _next(self, messages: list[BaseMessage]) -> AIMessage:
        assert_text_only(list(messages))
        self.seen.append(list(messages))
        return super()._next(messages)


def user_handle(messages: list[BaseMessage]) -> str:
    """The handle of the latest image in the user's messages, read from its placeholder."""
    found = [m.group(1) for msg in messages if isinstance(msg, HumanMessage) for m in PLACEHOLDER.finditer(msg.text)]
    assert found, "no image placeholder in the user's messages"
    return found[-1]


def question(messages: list[BaseMessage]) -> str:
    return next(m for m in reversed(messages) if isinstance(m, HumanMessage)).text


def count_step(messages: list[BaseMessage]) -> list[dict[str, Any]] | str:
    """Count what the latest question asks for ("how many red circles?") in the user's image;
    or, when the image could not be used, say why."""
    why = re.search(r"\[image could not be used: (.+?)\]", question(messages))
    if why:
        return f"I could not use your image: {why.group(1)}"
    wanted = re.search(r"how many (.+?)s\?", question(messages).lower())
    assert wanted, question(messages)
    return [{"name": "count_objects", "args": {"image": user_handle(messages), "object": wanted.group(1)}}]


def answer_step(messages: list[BaseMessage]) -> str:
    counted = re.search(r'Counted (\d+) "(.+?)"', messages[-1].text)
    assert counted, messages[-1].text
    return f"{counted.group(2)}: {counted.group(1)}"


def counting_model() -> TextOnlyModel:
    return TextOnlyModel(steps=[count_step, answer_step])


def photo_message(text: str, block: dict[str, Any] | None = None, id: str = "photo-1") -> HumanMessage:
    return HumanMessage([{"type": "text", "text": text}, block or standard_base64()], id=id)


def standard_base64() -> dict[str, Any]:
    return {"type": "image", "base64": B64, "mime_type": "image/jpeg"}


def no_base64(thing: Any) -> bool:
    text = thing if isinstance(thing, str) else json.dumps(thing, default=str)
    return "base64," not in text and not any(marker in text for marker in BASE64_MARKERS)


def state_json(messages: list[BaseMessage]) -> str:
    return json.dumps(messages_to_dict(messages), default=str)


def tool_messages(messages: list[BaseMessage], name: str) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage) and m.name == name]


def artifact_field(message: ToolMessage, name: str) -> Any:
    """A field of a tool's artifact: a ``ToolResult`` in a run, a plain dict once restored
    from a checkpoint (LangGraph's serializer does not rebuild it)."""
    artifact = message.artifact
    if isinstance(artifact, dict):
        return artifact[name]
    assert isinstance(artifact, (CountResult, LocateResult)), type(artifact)
    return getattr(artifact, name)


def check_red_circle_count(messages: list[BaseMessage], handle: str = HANDLE) -> None:
    """The agent counted the scene's red circles in ``handle``, exactly."""
    [counted] = tool_messages(messages, "count_objects")
    assert counted.status == "success", counted.text
    assert counted.text.startswith(f'Counted 3 "red circle" in {handle} ({W}x{H} px)')
    assert artifact_field(counted, "count") == SCENE.count("red circle") == 3
    truths = sorted(SCENE.matching("red circle"), key=lambda t: t.center[0])
    for (x, y), truth in zip(centers(counted.text), truths, strict=True):
        assert close(x, truth.center[0] * W, W) and close(y, truth.center[1] * H, H)
    assert messages[-1].text == "red circle: 3"


# ------------------------------------------------------------------ fixtures


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    """A loopback web server serving the photo at /photo.jpg."""
    from aiohttp import web

    async def photo(_: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/photo.jpg", photo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def agent_for(model: TextOnlyModel, toolkit: MoondreamToolkit, **kwargs: Any) -> Any:
    return create_agent(model, tools=[], middleware=[MoondreamImageMiddleware(toolkit)], **kwargs)


def config(thread: str = "chat") -> Any:
    return {"configurable": {"thread_id": thread}}


# ------------------------------------------------------------------ 1. every block format

#: Each way a chat framework or provider puts the photo in a message.
FORMATS: dict[str, Callable[[str], dict[str, Any]]] = {
    "standard-base64": lambda host: standard_base64(),
    "standard-data-url": lambda host: {"type": "image", "url": DATA_URL},
    "standard-http-url": lambda host: {"type": "image", "url": f"{host}/photo.jpg"},
    "openai-data-url": lambda host: {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "high"}},
    "openai-http-url": lambda host: {"type": "image_url", "image_url": {"url": f"{host}/photo.jpg"}},
    "openai-url-string": lambda host: {"type": "image_url", "image_url": DATA_URL},
    "v0-base64": lambda host: {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/jpeg"},
    "v0-url": lambda host: {"type": "image", "source_type": "url", "url": f"{host}/photo.jpg"},
    "anthropic-base64": lambda host: {
        "type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": B64}
    },
    "bedrock-bytes": lambda host: {"image": {"format": "jpeg", "source": {"bytes": JPEG}}},
    "file-with-image-mime": lambda host: {"type": "file", "base64": B64, "mime_type": "image/jpeg"},
    "base64-over-lines": lambda host: {
        "type": "image", "base64": "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)), "mime_type": "image/jpeg"
    },
}


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_attached_photo_in_each_format_is_counted_by_handle(
    fmt: str, fake: FakeMoondream, client: AsyncMoondream, image_host: str
) -> None:
    # URLs are downloaded under the policy; this host is named, so loopback is allowed.
    toolkit = MoondreamToolkit(backend=client, image_policy=ImagePolicy(allow_urls=True, allowed_hosts={"127.0.0.1"}))
    model = counting_model()
    state = await agent_for(model, toolkit).ainvoke(
        {"messages": [photo_message("How many red circles?", FORMATS[fmt](image_host))]}
    )

    # The model's first input: the placeholder with the content handle and the upright size.
    [human] = model.seen[0]
    assert human.id == "photo-1"
    assert human.content == [
        {"type": "text", "text": "How many red circles?"},
        {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"},
    ]
    # It called the tool with the handle it read there; the answer it got back is the truth.
    call = state["messages"][1].tool_calls[0]
    assert call["name"] == "count_objects" and call["args"] == {"image": HANDLE, "object": "red circle"}
    check_red_circle_count(state["messages"])
    assert model.seen[1][-1].text == tool_messages(state["messages"], "count_objects")[0].text
    assert len(model.seen) == 2
    # The store holds the photo's own bytes under that handle.
    assert toolkit.vision.images.get(HANDLE) == JPEG
    assert fake.requests[-1].path == "/v1/point"


async def test_the_handle_and_size_are_those_of_the_upright_photo(client: AsyncMoondream) -> None:
    """A phone photo stored sideways with an EXIF rotation: the model is told its upright
    size, the one the tools report and measure in."""
    stored = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    SCENE.render().transpose(Image.Transpose.ROTATE_90).save(stored, "JPEG", quality=95, exif=exif.tobytes())
    raw = stored.getvalue()
    handle = "img_" + hashlib.sha256(raw).hexdigest()[:8]
    model = counting_model()
    state = await agent_for(model, MoondreamToolkit(backend=client)).ainvoke(
        {"messages": [photo_message("How many red circles?", {"type": "image", "base64": base64.b64encode(raw).decode()})]}
    )
    assert model.seen[0][0].content[1] == {"type": "text", "text": f"[image {handle}: {W}x{H} px]"}
    check_red_circle_count(state["messages"], handle)


# ------------------------------------------------------------------ 2. the state holds handles


async def test_the_state_holds_the_rewritten_message_with_its_id_and_no_base64(client: AsyncMoondream) -> None:
    saver = InMemorySaver()
    agent = agent_for(counting_model(), MoondreamToolkit(backend=client), checkpointer=saver)
    await agent.ainvoke({"messages": [photo_message("How many red circles?")]}, config())

    messages = agent.get_state(config()).values["messages"]
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    rewritten = messages[0]
    assert rewritten.id == "photo-1"
    assert rewritten.content == [
        {"type": "text", "text": "How many red circles?"},
        {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"},
    ]
    assert no_base64(state_json(messages)) and no_base64(str(agent.get_state(config()).values))
    check_red_circle_count(messages)

    # Run with durability="exit" and no checkpoint at all ever holds the photo (by default the
    # checkpoint of the turn's input, in the thread's history, still does).
    exit_saver = InMemorySaver()
    agent = agent_for(counting_model(), MoondreamToolkit(backend=client), checkpointer=exit_saver)
    await agent.ainvoke({"messages": [photo_message("How many red circles?")]}, config(), durability="exit")
    assert no_base64(repr(exit_saver.storage) + repr(exit_saver.blobs) + repr(exit_saver.writes))
    check_red_circle_count(agent.get_state(config()).values["messages"])


# ------------------------------------------------------------------ 3. turns and a restart


async def test_a_later_turn_and_a_restart_resolve_the_handle_from_the_disk_store(
    fake: FakeMoondream, tmp_path: Path
) -> None:
    saver = InMemorySaver()
    store = tmp_path / "images"
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        toolkit = MoondreamToolkit(backend=md, image_store=ImageStore(store))
        model = counting_model()
        agent = agent_for(model, toolkit, checkpointer=saver)
        first = await agent.ainvoke({"messages": [photo_message("How many red circles?")]}, config())
        check_red_circle_count(first["messages"])

        # Turn 2: no new image; the model finds the handle in the conversation.
        second = await agent.ainvoke({"messages": [("user", "And how many blue squares?")]}, config())
        [_, squares] = tool_messages(second["messages"], "count_objects")
        assert squares.tool_call_id and squares.status == "success"
        assert squares.text.startswith(f'Counted 1 "blue square" in {HANDLE} ({W}x{H} px)')
        assert artifact_field(squares, "count") == SCENE.count("blue square") == 1
        assert second["messages"][-1].text == "blue square: 1"
        toolkit.vision.images.close()

    # A restart: a new client, toolkit, store object and agent; the same checkpointer and thread.
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        toolkit = MoondreamToolkit(backend=md, image_store=ImageStore(store))
        assert toolkit.vision.images.names == [HANDLE]
        model = counting_model()
        agent = agent_for(model, toolkit, checkpointer=saver)
        third = await agent.ainvoke({"messages": [("user", "How many yellow triangles?")]}, config())
        toolkit.vision.images.close()

    assert model.seen[0][0].id == "photo-1" and f"[image {HANDLE}: {W}x{H} px]" in model.seen[0][0].text
    triangles = tool_messages(third["messages"], "count_objects")[-1]
    assert triangles.status == "success", triangles.text
    assert triangles.text.startswith(f'Counted 1 "yellow triangle" in {HANDLE} ({W}x{H} px)')
    assert artifact_field(triangles, "count") == SCENE.count("yellow triangle") == 1
    assert third["messages"][-1].text == "yellow triangle: 1"
    assert no_base64(state_json(third["messages"]))


# ------------------------------------------------------------------ 4. every entry point


def check_streamed_rewrite(updates: list[dict[str, Any]]) -> list[BaseMessage]:
    """The middleware updated the state once (the photo's message, by id) and then no more;
    returns the messages the stream produced."""
    rewrites = [update[MIDDLEWARE_NODE] for update in updates if MIDDLEWARE_NODE in update]
    assert len(rewrites) == 2  # before each of the two model calls
    first, second = rewrites
    [message] = first["messages"]
    assert message.id == "photo-1" and f"[image {HANDLE}: {W}x{H} px]" in message.text
    assert second is None
    return [message] + [m for update in updates for node in update.values() for m in (node or {}).get("messages", [])
                        if not isinstance(m, HumanMessage)]


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_async_entry_points_rewrite(entry: str, client: AsyncMoondream) -> None:
    model = counting_model()
    agent = agent_for(model, MoondreamToolkit(backend=client))
    request = {"messages": [photo_message("How many red circles?")]}
    if entry == "ainvoke":
        messages = (await agent.ainvoke(request))["messages"]
    else:
        messages = check_streamed_rewrite([u async for u in agent.astream(request, stream_mode="updates")])
    assert model.seen[0][0].text == f"How many red circles?[image {HANDLE}: {W}x{H} px]"
    check_red_circle_count(messages)


@pytest.mark.parametrize("entry", ["invoke", "stream"])
def test_sync_entry_points_rewrite(entry: str, threaded_toolkit: MoondreamToolkit) -> None:
    model = counting_model()
    agent = agent_for(model, threaded_toolkit)
    request = {"messages": [photo_message("How many red circles?")]}
    if entry == "invoke":
        messages = agent.invoke(request)["messages"]
    else:
        messages = check_streamed_rewrite(list(agent.stream(request, stream_mode="updates")))
    assert model.seen[0][0].text == f"How many red circles?[image {HANDLE}: {W}x{H} px]"
    check_red_circle_count(messages)


# ------------------------------------------------------------------ 5. old turns and tool results


@pytest.mark.parametrize("restored", ["seeded-in-the-checkpointer", "passed-in-messages"])
async def test_a_restored_conversation_never_shows_the_model_its_images(restored: str, client: AsyncMoondream) -> None:
    saver = InMemorySaver()
    earlier: list[BaseMessage] = [
        photo_message("Look at this.", {"type": "image_url", "image_url": {"url": DATA_URL}}, id="old-photo"),
        AIMessage([{"type": "text", "text": "Here it is again:"}, standard_base64()], id="old-answer"),
    ]
    if restored == "seeded-in-the-checkpointer":
        # A thread saved before the middleware was added: its checkpoint holds the raw image.
        plain = create_agent(ScriptedChatModel(steps=["Nice photo."]), tools=[], checkpointer=saver)
        await plain.ainvoke({"messages": earlier[:1]}, config())
        await plain.aupdate_state(config(), {"messages": earlier[1:]})
        assert not no_base64(str(plain.get_state(config()).values))
        request = {"messages": [("user", "How many red circles?")]}
    else:
        request = {"messages": [*earlier, HumanMessage("How many red circles?", id="now")]}

    model = counting_model()
    agent = agent_for(model, MoondreamToolkit(backend=client), checkpointer=saver)
    state = await agent.ainvoke(request, config())

    first = {m.id: m for m in model.seen[0]}
    assert first["old-photo"].content[1] == {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"}
    assert first["old-answer"].content == [
        {"type": "text", "text": "Here it is again:"},
        {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"},
    ]
    check_red_circle_count(state["messages"])
    saved = agent.get_state(config()).values["messages"]
    assert {"old-photo", "old-answer"} <= {m.id for m in saved}
    assert no_base64(state_json(saved))


async def test_images_in_tool_results_are_attached_before_the_model_reads_them(client: AsyncMoondream) -> None:
    """``return_images=True`` answers with an annotated PNG block; the text-only model gets a
    handle to it instead (which the tools can use)."""
    toolkit = MoondreamToolkit(backend=client, return_images=True)

    def locate(messages: list[BaseMessage]) -> list[dict[str, Any]]:
        return [{"name": "locate_objects", "args": {"image": user_handle(messages), "object": "red circle"}}]

    def describe_annotated(messages: list[BaseMessage]) -> list[dict[str, Any]]:
        (annotated,) = PLACEHOLDER.findall(messages[-1].text)
        return [{"name": "describe_image", "args": {"image": annotated[0], "length": "short"}}]

    model = TextOnlyModel(steps=[locate, describe_annotated, "done"])
    state = await agent_for(model, toolkit).ainvoke({"messages": [photo_message("Where are the red circles?")]})

    [located] = tool_messages(state["messages"], "locate_objects")
    assert isinstance(located.artifact, LocateResult) and len(located.artifact.detections.objects) == 3
    png = located.artifact.annotated_png
    assert png is not None and png.startswith(b"\x89PNG")
    annotated = "img_" + hashlib.sha256(png).hexdigest()[:8]
    # What the model read: the tool's text, then the annotated image as a handle.
    seen = model.seen[1][-1]
    assert isinstance(seen, ToolMessage) and seen.id == located.id and seen.tool_call_id == located.tool_call_id
    # (The annotated PNG is drawn on the upload the backend got, at its size, not the photo's.)
    width, height = Image.open(io.BytesIO(png)).size
    text, image = seen.content
    assert isinstance(text, dict) and text["type"] == "text" and text["text"] == located.artifact.text
    assert image == {"type": "text", "text": f"[image {annotated}: {width}x{height} px]"}
    assert located.content == seen.content  # and the state holds the same
    assert toolkit.vision.images.get(annotated) == png
    [described] = tool_messages(state["messages"], "describe_image")
    assert described.status == "success" and described.text.startswith(f"{annotated} ({width}x{height} px): ")
    assert no_base64(state_json(state["messages"]))


# ------------------------------------------------------------------ 6. bad input


BAD = {
    "not-an-image": (
        {"type": "image", "base64": base64.b64encode(b"this is a text file, not a photo").decode(), "mime_type": "image/jpeg"},
        None,
        "not an image",
    ),
    "invalid-base64": ({"type": "image", "base64": "%%% not base64 %%%", "mime_type": "image/png"}, None, "valid base64"),
    "url-refused-by-default": (
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/photo.jpg"}},
        None,
        "image URLs are not allowed",
    ),
    "over-max-pixels": (standard_base64(), ImagePolicy(max_pixels=500_000), "over the limit of 500000"),
    "provider-file-id": ({"type": "image", "file_id": "file-abc123"}, None, "stored with the model provider"),
    "malformed-v0-block": ({"type": "image", "source_type": "base64", "mime_type": "image/png"}, None, "malformed"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_an_unusable_image_says_why_and_the_turn_goes_on(
    case: str, fake: FakeMoondream, client: AsyncMoondream, caplog: pytest.LogCaptureFixture
) -> None:
    block, policy, why = BAD[case]
    saver = InMemorySaver()
    model = counting_model()
    agent = agent_for(model, MoondreamToolkit(backend=client, image_policy=policy), checkpointer=saver)
    with caplog.at_level(logging.WARNING, logger="langchain_moondream"):
        state = await agent.ainvoke({"messages": [photo_message("How many red circles?", block)]}, config())

    [human] = model.seen[0]
    placeholder = human.content[1]["text"]
    reason = UNUSABLE.match(placeholder)
    assert reason and why in reason.group(1), placeholder
    assert state["messages"][-1].text == f"I could not use your image: {reason.group(1)}"
    assert fake.requests == []  # nothing was sent to the vision service
    assert any("could not be used" in r.getMessage() for r in caplog.records)
    saved = agent.get_state(config()).values["messages"]
    everything = state_json(saved) + repr(model.seen) + repr(saver.storage) + caplog.text
    assert fake.api_key and fake.api_key not in everything
    assert no_base64(state_json(saved))


# ------------------------------------------------------------------ the rewrite itself


async def test_blocks_keep_their_order_and_the_same_photo_is_one_handle(client: AsyncMoondream) -> None:
    middleware = MoondreamImageMiddleware(MoondreamToolkit(backend=client))
    text_only = HumanMessage("no images here", id="t")
    mixed = HumanMessage(
        [
            {"type": "text", "text": "before"},
            standard_base64(),
            "a plain string",
            {"type": "image", "base64": "bm90IGFuIGltYWdl", "mime_type": "image/png"},
            {"type": "image_url", "image_url": {"url": DATA_URL}},
            {"type": "text", "text": "after"},
        ],
        id="m",
    )
    same, rewritten = await middleware.arewrite_messages([text_only, mixed])
    assert same is text_only
    assert rewritten.id == "m" and isinstance(rewritten, HumanMessage)
    assert rewritten.content[:3] == [
        {"type": "text", "text": "before"},
        {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"},
        "a plain string",
    ]
    assert rewritten.content[3]["text"].startswith("[image could not be used: not an image")
    assert rewritten.content[4:] == [
        {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"},
        {"type": "text", "text": "after"},
    ]
    assert mixed.content[1] == standard_base64()  # the original message is left as it was
    assert middleware.vision.images.names == [HANDLE]
    assert await middleware.abefore_model({"messages": [text_only, rewritten]}, None) is None  # type: ignore[arg-type]


def test_messages_without_ids_are_still_replaced() -> None:
    backend = AsyncMoondream(api_key="unused", base_url="http://127.0.0.1:9/v1")
    middleware = MoondreamImageMiddleware(MoondreamToolkit(backend=backend))
    state = [HumanMessage("hello"), photo_message("How many red circles?")]
    state[1].id = None
    update = middleware.before_model({"messages": state}, None)  # type: ignore[arg-type]
    assert update is not None
    merged = add_messages(state, update["messages"])
    assert len(merged) == 2 and all(m.id for m in merged)
    assert merged[0].text == "hello"
    assert merged[1].content[1] == {"type": "text", "text": f"[image {HANDLE}: {W}x{H} px]"}
    assert no_base64(state_json(merged))


def test_the_middleware_brings_the_toolkits_tools(threaded_toolkit: MoondreamToolkit) -> None:
    middleware = MoondreamImageMiddleware(threaded_toolkit)
    assert [tool.name for tool in middleware.tools] == ["describe_image", "count_objects", "locate_objects", "segment_object"]
    assert all(tool.vision is threaded_toolkit.vision for tool in middleware.tools)
    assert middleware.vision is threaded_toolkit.vision
    with pytest.raises(TypeError, match="MoondreamToolkit"):
        MoondreamImageMiddleware(threaded_toolkit.vision)  # type: ignore[arg-type]
