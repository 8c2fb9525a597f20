"""Images users send to a text-only LlamaIndex agent: MoondreamToolSpec.attach and friends.

A real FunctionAgent drives the tools over loopback HTTP to the emulator, with a scripted
function-calling LLM that fails if it is ever given an ImageBlock: it reads the handle from
the placeholder the attachment left in the conversation, as a text-only model would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import (
    ChatMessage,
    CitableBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.memory import Memory
from llama_index.core.schema import ImageDocument
from sqlalchemy.ext.asyncio import create_async_engine

import moondream_tools.images.prepare as prepare_module
from llama_index.tools.moondream import MoondreamToolSpec
from llama_index.tools.moondream.attachments import aattach_block, aattach_message
from moondream_tools import AsyncMoondream, CountResult, ImagePolicy, ImageStore, LocateResult
from moondream_tools.testing import FakeMoondream, Scene, Shape

# llama-index workflows find an agent's steps with inspect.getmembers(agent), which reads
# pydantic's deprecated instance attributes: harmless, raised from the inspect module.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning:inspect")

W, H = 640, 480
SCENE = Scene(
    W,
    H,
    [
        Shape("circle", "red", (150, 140), 90),
        Shape("circle", "red", (460, 340), 80),
        Shape("square", "blue", (480, 110), 70),
        Shape("triangle", "green", (170, 370), 90),
    ],
)
JPEG = SCENE.encode()
HANDLE = "img_" + hashlib.sha256(JPEG).hexdigest()[:8]
PLACEHOLDER = f"[image {HANDLE}: {W}x{H} px]"
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
FOUND = re.compile(r"\[image (img_[0-9a-f]{8}): (\d+)x(\d+) px\]")
BOX = re.compile(r"#1 box \((\d+), (\d+)\)-\((\d+), (\d+)\)")


# ---------------------------------------------------------------- a text-only LLM


def _blocks(message: ChatMessage) -> list[Any]:
    """Every block of a message, nested ones (citable content, citations) included."""
    found: list[Any] = []
    for block in message.blocks:
        found.append(block)
        if isinstance(block, CitableBlock):
            found.extend(block.content)
        cited = getattr(block, "cited_content", None)
        if cited is not None:
            found.append(cited)
    return found


def has_image(messages: Sequence[ChatMessage]) -> bool:
    return any(isinstance(b, ImageBlock) for m in messages for b in _blocks(m))


class Recorder:
    """What the LLM was given (every call), and the tool calls it made."""

    def __init__(self) -> None:
        self.inputs: list[list[ChatMessage]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []


def text_only_llm() -> tuple[MockFunctionCallingLLM, Recorder]:
    """A function-calling LLM that cannot take images (an ImageBlock fails the test) and
    plays a plan a text-only model would: find the image's handle in the placeholder of the
    latest user message (else the most recent one in the history) and call the tools the
    user's questions ask for; once the results are in, answer with them.

    "How many X?" -> count_objects, "Where is the X?" -> locate_objects, "What ...?" ->
    describe_image with that question.
    """
    record = Recorder()

    def respond(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        if has_image(messages):
            raise AssertionError(f"the text-only LLM was given an image: {messages!r}"[:500])
        record.inputs.append(list(messages))
        last_user = max(i for i, m in enumerate(messages) if m.role == MessageRole.USER)
        results = [m.content or "" for m in messages[last_user:] if m.role == MessageRole.TOOL]
        if results:
            return ChatMessage(role=MessageRole.ASSISTANT, content="From the tools:\n" + "\n".join(results))
        question = messages[last_user].content or ""
        handles = [h for m in messages[: last_user + 1] for h in FOUND.findall(m.content or "")]
        if not handles:
            return ChatMessage(role=MessageRole.ASSISTANT, content=f"I cannot see an image here: {question}")
        image = handles[-1][0]
        calls: list[tuple[str, dict[str, Any]]] = []
        for phrase in re.findall(r"How many (.+?)s? are", question):
            calls.append(("count_objects", {"image": image, "object": phrase}))
        for phrase in re.findall(r"Where is the (.+?)\?", question):
            calls.append(("locate_objects", {"image": image, "object": phrase}))
        for asked in re.findall(r"(What [^?]+\?)", question):
            calls.append(("describe_image", {"image": image, "question": asked}))
        assert calls, question
        record.calls.extend(calls)
        n = len(record.calls)
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(tool_call_id=f"call_{n}_{i}", tool_name=name, tool_kwargs=args)
                for i, (name, args) in enumerate(calls)
            ],
        )

    return MockFunctionCallingLLM(response_generator=respond), record


async def run_turn(agent: FunctionAgent, user_msg: str | ChatMessage, **run: Any) -> tuple[list[ToolCallResult], str]:
    handler = agent.run(user_msg=user_msg, **run)
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    return results, str(await handler)


def agent_for(spec: MoondreamToolSpec, llm: MockFunctionCallingLLM) -> FunctionAgent:
    return FunctionAgent(
        tools=spec.to_tool_list(),
        llm=llm,
        system_prompt="Images the user sent appear as [image <handle>: WxH px]; pass the handle to the tools.",
    )


def near(got: tuple[float, float], truth_center: tuple[float, float]) -> bool:
    return abs(got[0] - truth_center[0] * W) <= 0.02 * W and abs(got[1] - truth_center[1] * H) <= 0.02 * H


def assert_count(result: ToolCallResult, phrase: str) -> None:
    output = result.tool_output
    assert not output.is_error, output.content
    assert isinstance(output.raw_output, CountResult)
    assert output.raw_output.image == HANDLE and output.raw_output.image_size.as_tuple() == (W, H)
    assert output.raw_output.count == SCENE.count(phrase) > 0
    truths = sorted(SCENE.matching(phrase), key=lambda t: (t.center[1], t.center[0]))
    positions = [(int(x), int(y)) for x, y in re.findall(r"#\d+ at \((\d+), (\d+)\)", output.content)]
    assert len(positions) == len(truths)
    assert all(near(p, t.center) for p, t in zip(positions, truths, strict=True)), (positions, truths)


def assert_locate(result: ToolCallResult, phrase: str) -> None:
    output = result.tool_output
    assert not output.is_error, output.content
    assert isinstance(output.raw_output, LocateResult)
    (truth,) = SCENE.matching(phrase)
    located = BOX.search(output.content)
    assert located is not None, output.content
    for got, want, scale in zip(map(int, located.groups()), truth.bbox_px, (W, H, W, H), strict=True):
        assert abs(got - want) <= 0.02 * scale


# ---------------------------------------------------------------- 1. each kind of image block


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "uploads" / "photo.jpg"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(JPEG)
    return path


@pytest.fixture
async def photo_url() -> AsyncIterator[str]:
    """The photo served over loopback HTTP (a host the test's policy names as allowed)."""

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/photo.jpg", photo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/photo.jpg"
    finally:
        await runner.cleanup()


BLOCKS: dict[str, Callable[[Path, str], ImageBlock]] = {
    "raw bytes": lambda tmp, url: ImageBlock(image=JPEG),
    "base64 bytes": lambda tmp, url: ImageBlock(image=base64.b64encode(JPEG), image_mimetype="image/jpeg"),
    "raw bytes, unvalidated block": lambda tmp, url: ImageBlock.model_construct(image=JPEG),
    "binary file object": lambda tmp, url: ImageBlock(image=io.BytesIO(JPEG)),
    "data URL": lambda tmp, url: ImageBlock(url=DATA_URL),
    "http URL, host allowed by the policy": lambda tmp, url: ImageBlock(url=url),
    "path inside allowed_dirs": lambda tmp, url: ImageBlock(path=_photo(tmp)),
    "file URL inside allowed_dirs": lambda tmp, url: ImageBlock(url=_photo(tmp).as_uri()),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
async def test_an_attached_image_becomes_a_handle_the_text_only_agent_uses(
    client: AsyncMoondream, tmp_path: Path, photo_url: str, kind: str
) -> None:
    policy = ImagePolicy(allowed_dirs=[tmp_path / "uploads"], allow_urls=True, allowed_hosts={"127.0.0.1"})
    spec = MoondreamToolSpec(client, image_policy=policy)
    question = TextBlock(text="How many red circles are in this photo?")
    message = ChatMessage(role=MessageRole.USER, blocks=[question, BLOCKS[kind](tmp_path, photo_url)], additional_kwargs={"turn": 1})

    attached = await spec.aattach(message)

    assert not has_image([attached])
    assert attached.role == MessageRole.USER and attached.additional_kwargs == {"turn": 1}
    assert [type(b) for b in attached.blocks] == [TextBlock, TextBlock]
    assert attached.blocks[0] == question
    assert attached.blocks[1].text == PLACEHOLDER == f"[image img_{hashlib.sha256(JPEG).hexdigest()[:8]}: 640x480 px]"
    assert has_image([message]), "the original message is left as it was"
    assert spec.vision.images.names == [HANDLE]

    llm, record = text_only_llm()
    results, answer = await run_turn(agent_for(spec, llm), attached)

    assert record.calls == [("count_objects", {"image": HANDLE, "object": "red circle"})]
    assert record.inputs and not any(has_image(given) for given in record.inputs)
    (result,) = results
    assert_count(result, "red circle")
    assert result.tool_output.content in answer


async def test_the_text_only_llm_refuses_a_message_that_was_not_rewritten(client: AsyncMoondream) -> None:
    """The control: without attach, the image would reach the model (and this LLM fails)."""
    spec = MoondreamToolSpec(client)
    llm, record = text_only_llm()
    message = ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="How many red circles are in it?"), ImageBlock(image=JPEG)])
    with pytest.raises(AssertionError, match="the text-only LLM was given an image"):
        await run_turn(agent_for(spec, llm), message)
    assert record.inputs == [] and record.calls == []


def test_attach_and_attach_messages_from_sync_code(threaded_fake: FakeMoondream) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    spec = MoondreamToolSpec(md)
    history = [
        ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Look:"), ImageBlock(image=JPEG)]),
        ChatMessage(role=MessageRole.ASSISTANT, content="I see an image."),
    ]
    user_msg, chat_history = spec.attach_messages("How many red circles?", history)
    assert user_msg == "How many red circles?", "a str holds no image: returned as it is"
    assert chat_history[0].content == f"Look:\n{PLACEHOLDER}"
    assert chat_history[1] is history[1], "a message without images is returned as is"
    assert spec.attach(history[0]) == chat_history[0]
    none, empty = spec.attach_messages(None)
    assert none is None and empty == []

    found = FOUND.search(chat_history[0].content or "")
    assert found is not None
    output = spec.call_tool("count_objects", {"image": found.group(1), "object": "red circle"})
    assert output.raw_output.count == SCENE.count("red circle") == 2
    asyncio.run(md.aclose())


# ---------------------------------------------------------------- 2. memory, turns and a restart


async def test_two_turns_with_memory_then_a_restart_over_the_on_disk_store(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}"
    engines = [create_async_engine(database), create_async_engine(database)]
    try:
        spec = MoondreamToolSpec(client, image_store=ImageStore(tmp_path / "store"))
        memory = Memory.from_defaults(session_id="chat-1", async_engine=engines[0])
        llm, record = text_only_llm()
        agent = agent_for(spec, llm)

        # Turn 1: a photo with the question.
        photo = ChatMessage(
            role=MessageRole.USER,
            blocks=[TextBlock(text="How many red circles are in this photo?"), ImageBlock(image=JPEG)],
        )
        user_msg, _ = await spec.aattach_messages(photo)
        (result,), answer = await run_turn(agent, user_msg, memory=memory)
        assert_count(result, "red circle")
        assert result.tool_output.content in answer

        # Memory holds the handle, not the image.
        stored = await memory.aget_all()
        assert not has_image(stored)
        assert PLACEHOLDER in (stored[0].content or "")
        dumped = json.dumps([m.model_dump(mode="json") for m in stored])
        assert base64.b64encode(JPEG)[:64].decode() not in dumped

        # Turn 2: a follow-up about the same photo, no new image.
        (result,), answer = await run_turn(agent, "How many blue squares are there?", memory=memory)
        assert record.calls[-1] == ("count_objects", {"image": HANDLE, "object": "blue square"})
        assert_count(result, "blue square")
        assert any(PLACEHOLDER in (m.content or "") for m in record.inputs[-1]), "turn 2 saw turn 1's placeholder"
        assert not any(has_image(given) for given in record.inputs)

        # Restart: a new client, spec, store object and memory over the same directory and database.
        async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as fresh:
            spec2 = MoondreamToolSpec(fresh, image_store=ImageStore(tmp_path / "store"))
            assert HANDLE in spec2.vision.images
            memory2 = Memory.from_defaults(session_id="chat-1", async_engine=engines[1])
            history = await memory2.aget_all()
            assert len(history) >= 4 and not has_image(history)
            llm2, record2 = text_only_llm()
            (result,), answer = await run_turn(agent_for(spec2, llm2), "Where is the blue square?", memory=memory2)
        assert record2.calls == [("locate_objects", {"image": HANDLE, "object": "blue square"})]
        assert_locate(result, "blue square")
        assert result.tool_output.content in answer
        assert not any(has_image(given) for given in record2.inputs)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_restart_with_chat_history_instead_of_memory(client: AsyncMoondream, tmp_path: Path) -> None:
    spec = MoondreamToolSpec(client, image_store=ImageStore(tmp_path / "store"))
    photo = ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Here is my photo."), ImageBlock(url=DATA_URL)])
    saved = json.dumps([m.model_dump(mode="json") for m in (await spec.aattach_messages(None, [photo]))[1]])

    spec2 = MoondreamToolSpec(client, image_store=ImageStore(tmp_path / "store"))
    history = [ChatMessage.model_validate(m) for m in json.loads(saved)]
    user_msg, history = await spec2.aattach_messages("How many red circles are in it?", history)
    llm, record = text_only_llm()
    (result,), _ = await run_turn(agent_for(spec2, llm), user_msg, chat_history=history)
    assert record.calls == [("count_objects", {"image": HANDLE, "object": "red circle"})]
    assert_count(result, "red circle")


# ---------------------------------------------------------------- 3. bad input


def _bad_cases(
    tmp_path: Path, fake: FakeMoondream, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, ImagePolicy | None, ImageBlock, str]]:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "photo.jpg").write_bytes(JPEG)
    (outside / "secret.jpg").write_bytes(JPEG)
    (inside / "link.jpg").symlink_to(outside / "secret.jpg")
    allowed = ImagePolicy(allowed_dirs=[inside])
    monkeypatch.chdir(inside)  # a relative path in a block is relative to the working directory
    return [
        ("non-image data", None, ImageBlock(image=b"this is not an image"), "not an image"),
        ("path outside allowed_dirs", allowed, ImageBlock(path=outside / "secret.jpg"), "is not allowed: images must be under"),
        ("symlink out of allowed_dirs", allowed, ImageBlock(path=inside / "link.jpg"), "is not allowed: images must be under"),
        ("relative path out of allowed_dirs", allowed, ImageBlock(path=Path("../outside/secret.jpg")), "is not allowed"),
        ("path, default policy", None, ImageBlock(path=inside / "photo.jpg"), "this tool reads no local files"),
        ("file URL, default policy", None, ImageBlock(url=(inside / "photo.jpg").as_uri()), "this tool reads no local files"),
        ("URL, default policy", None, ImageBlock(url=f"{fake.base_url}/photo.jpg"), "image URLs are not allowed"),
        ("loopback URL, URLs allowed", ImagePolicy(allow_urls=True), ImageBlock(url=f"{fake.base_url}/photo.jpg"), "non-public address"),
        ("over max_pixels", ImagePolicy(max_pixels=100_000), ImageBlock(image=JPEG), "over the limit of 100000"),
        ("data URL over max_pixels", ImagePolicy(max_pixels=100_000), ImageBlock(url=DATA_URL), "over the limit of 100000"),
        ("over max_bytes", ImagePolicy(max_bytes=2_000), ImageBlock(image=io.BytesIO(JPEG)), "over the limit of 2000 bytes"),
        ("invalid data URL", None, ImageBlock(url="data:image/png;base64,!!!!"), "valid base64"),
        ("unsupported URL scheme", None, ImageBlock(url="ftp://example.com/a.jpg"), "must be http(s), data: or file:"),
        ("empty image block", None, ImageBlock(), "holds no image"),
    ]


async def test_bad_images_become_placeholders_saying_why(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, policy, block, why in _bad_cases(tmp_path, fake, monkeypatch):
        spec = MoondreamToolSpec(client, image_policy=policy)
        attached = await aattach_block(spec.vision, block)
        assert not attached.ok and attached.handle is None, name
        assert attached.placeholder.startswith("[image could not be used: ") and why in attached.placeholder, (name, attached)
        message = await spec.aattach(ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Look"), block]))
        assert [b.text for b in message.blocks] == ["Look", attached.placeholder], name
        assert len(spec.vision.images) == 0, name
        for text in (attached.placeholder, message.model_dump_json()):
            assert fake.api_key not in text, name
        assert "Traceback" not in attached.placeholder
    assert not any(r.path.endswith("/photo.jpg") for r in fake.requests), "refused URLs were never fetched"

    # The agent is told why, and asks for nothing.
    spec = MoondreamToolSpec(client)
    message = await spec.aattach(
        ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="How many red circles are in this?"), ImageBlock(image=b"junk")])
    )
    llm, record = text_only_llm()
    results, answer = await run_turn(agent_for(spec, llm), message)
    assert results == [] and record.calls == []
    assert "[image could not be used: not an image" in answer and fake.api_key not in answer


async def test_a_mixed_message_keeps_its_other_blocks_in_order(client: AsyncMoondream) -> None:
    spec = MoondreamToolSpec(client)
    citable = CitableBlock(title="a", source="doc", content=[TextBlock(text="cited"), ImageBlock(image=JPEG)])
    message = ChatMessage(
        role=MessageRole.USER,
        blocks=[TextBlock(text="one"), ImageBlock(image=JPEG), TextBlock(text="two"), ImageBlock(image=b"junk"), citable],
        additional_kwargs={"session": "s"},
    )
    rewritten, attached = await aattach_message(spec.vision, message)
    assert [a.handle for a in attached] == [HANDLE, None, HANDLE]
    assert [type(b) for b in rewritten.blocks] == [TextBlock, TextBlock, TextBlock, TextBlock, CitableBlock]
    assert [b.text for b in rewritten.blocks[:3]] == ["one", PLACEHOLDER, "two"]
    assert rewritten.blocks[3].text.startswith("[image could not be used: not an image")
    assert [b.text for b in rewritten.blocks[4].content] == ["cited", PLACEHOLDER]
    assert rewritten.additional_kwargs == {"session": "s"} and not has_image([rewritten])

    # The legacy additional_kwargs["images"] (ImageDocuments ChatMessage turns into image blocks
    # whenever it is validated) is dropped with its images: the rewritten message round-trips.
    legacy = ChatMessage(
        role=MessageRole.USER,
        content="legacy",
        additional_kwargs={"images": [ImageDocument(image=base64.b64encode(JPEG).decode())], "keep": 1},
    )
    rewritten = await spec.aattach(legacy)
    assert [b.text for b in rewritten.blocks] == ["legacy", PLACEHOLDER]
    assert rewritten.additional_kwargs == {"keep": 1}
    assert not has_image([ChatMessage.model_validate(rewritten.model_dump())])

    plain = ChatMessage(role=MessageRole.ASSISTANT, content="no images")
    assert (await spec.aattach(plain)) is plain
    with pytest.raises(TypeError, match="ChatMessage"):
        await spec.aattach("not a message")  # type: ignore[arg-type]


# ---------------------------------------------------------------- 4. the same image, prepared once


@pytest.mark.parametrize("store", ["memory", "disk"])
async def test_the_same_image_gets_one_handle_and_is_prepared_once(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    prepared: list[object] = []
    real = prepare_module._prepare_sync

    def counting(*args: Any, **kwargs: Any) -> Any:
        prepared.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_prepare_sync", counting)
    spec = MoondreamToolSpec(client, image_store=ImageStore(tmp_path / "store") if store == "disk" else None)
    llm, record = text_only_llm()
    agent = agent_for(spec, llm)
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    memory = Memory.from_defaults(session_id="s", async_engine=engine)
    try:
        first = await spec.aattach(
            ChatMessage(role=MessageRole.USER, blocks=[
                TextBlock(text="How many red circles are in it? Where is the blue square? What color is the triangle?"),
                ImageBlock(image=JPEG),
            ])
        )
        results, _ = await run_turn(agent, first, memory=memory)
        by_tool = {r.tool_name: r for r in results}  # the calls run at once: results come as they finish
        assert sorted(by_tool) == ["count_objects", "describe_image", "locate_objects"] and len(results) == 3
        assert_count(by_tool["count_objects"], "red circle")
        assert_locate(by_tool["locate_objects"], "blue square")
        assert by_tool["describe_image"].tool_output.content == f"{HANDLE} ({W}x{H} px): green"
        assert len(prepared) == 1, "three tools on one handle: one preparation"

        # The same photo again, as a data URL this time: the same handle, nothing prepared again.
        again = await spec.aattach(
            ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="How many green triangles are in this one?"), ImageBlock(url=DATA_URL)])
        )
        assert again.blocks[1].text == PLACEHOLDER
        results, _ = await run_turn(agent, again, memory=memory)
        assert_count(results[0], "green triangle")
        results, _ = await run_turn(agent, "How many red circles are there?", memory=memory)
        assert_count(results[0], "red circle")
    finally:
        await engine.dispose()

    assert spec.vision.images.names == [HANDLE]
    assert [call[1]["image"] for call in record.calls] == [HANDLE] * 5
    assert len(prepared) == 1, f"5 tool calls on one handle prepared the image {len(prepared)} times"
    assert len(client.image_cache) == 1
    uploads = [r for r in fake.requests if r.path.endswith(("/point", "/detect", "/query"))]
    assert len(uploads) == 5
