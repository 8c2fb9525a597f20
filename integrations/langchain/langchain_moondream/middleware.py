"""``MoondreamImageMiddleware``: images users send to a text-only agent become handles.

A user attaches a photo to a chat message; the agent's model reads text only. Before every
model call, this middleware for :func:`langchain.agents.create_agent` stores each image
content block it finds in the conversation (user messages of this turn and of earlier ones,
tool results, AI messages) with :meth:`moondream_tools.VisionTools.attach` and puts a short
text in its place, ``[image img_3fa2c1d0: 1280x853 px]``, naming the handle the model
passes to the vision tools. The rewrite is saved in the agent's state, so a checkpointer
holds handles, not base64; with an on-disk :class:`moondream_tools.ImageStore` the handles
still resolve after a restart.

Needs ``langchain>=1.0`` (``create_agent`` and its middleware).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from langchain.agents.middleware import AgentMiddleware, AgentState
from langchain_core.messages import BaseMessage, HumanMessage, RemoveMessage
from langchain_core.tools import BaseTool
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.runtime import Runtime
from moondream_tools import AttachedImage, VisionTools, run_sync

from .toolkit import MoondreamToolkit

__all__ = ["MoondreamImageMiddleware"]

logger = logging.getLogger("langchain_moondream")

#: What an image block asks for: the source to attach (a ``data:`` URL or an ``http(s)``
#: URL), or the :class:`AttachedImage` saying why it cannot be used at all.
_Found = str | AttachedImage

#: Block types that may hold an image in some provider's format (``content_blocks``
#: normalizes them); anything else is left alone without a closer look.
_MAYBE_IMAGE = frozenset({"image", "image_url", "input_image", "file", "file_data", "non_standard"})


def _unusable(why: str) -> AttachedImage:
    return AttachedImage(None, None, None, why)


def _classify(block: dict[str, Any]) -> _Found | None:
    """What the content block ``block`` holds: None when it is no image; else the source to
    attach, or why the image cannot be used.

    Every format :attr:`BaseMessage.content_blocks` normalizes is understood: standard
    ``{"type": "image", "base64" | "url": ...}``, OpenAI ``image_url``, the older
    ``source_type`` blocks, Anthropic ``source`` blocks, Bedrock ``{"image": {...}}``, and
    ``file`` blocks with an ``image/*`` MIME type; plus OpenAI's ``image_url`` given as a
    plain string and the Responses API's ``input_image``.
    """
    kind = block.get("type")
    bedrock = kind is None and isinstance(block.get("image"), dict)
    if kind not in _MAYBE_IMAGE and not bedrock:
        return None
    surely_image = bedrock or kind in ("image", "image_url", "input_image")
    try:
        blocks = HumanMessage(content=[block]).content_blocks
    except Exception as exc:  # a malformed block, e.g. a v0 one missing its "data"
        if surely_image:
            return _unusable(f"the image block is malformed ({type(exc).__name__}: {str(exc)[:80]})")
        return None
    if len(blocks) == 1:
        found: dict[str, Any] = dict(blocks[0])
        mime = found.get("mime_type")
        is_image = found.get("type") == "image" or (
            found.get("type") == "file" and isinstance(mime, str) and mime.lower().startswith("image/")
        )
        if is_image:
            data, url, file_id = found.get("base64"), found.get("url"), found.get("file_id")
            if isinstance(data, str):
                payload = "".join(data.split())  # base64 wrapped over lines
                return f"data:{mime or 'application/octet-stream'};base64,{payload}"
            if isinstance(url, str) and url.strip():
                return url.strip()
            if file_id is not None:
                return _unusable(
                    f"it is a file stored with the model provider (file id {str(file_id)[:64]!r}), which"
                    " the vision tools cannot read; send the image itself"
                )
            return _unusable("the image block holds neither image data nor a URL")
    if kind in ("image_url", "input_image"):  # OpenAI's forms content_blocks leaves as they are
        image_url = block.get("image_url")
        if isinstance(image_url, dict):
            image_url = image_url.get("url")
        if isinstance(image_url, str) and image_url.strip():
            return image_url.strip()
        if block.get("file_id") is not None:
            return _unusable("it is a file stored with the model provider, which the vision tools cannot read")
        return _unusable("the image block holds neither image data nor a URL")
    if bedrock:
        return _unusable("the image block holds neither image data nor a URL")
    return None


def _collect(content: Any, found: dict[int, _Found]) -> None:
    """Record every image block in ``content`` (a message's content, or a block's nested
    ``content``, e.g. Anthropic's ``tool_result``) by ``id()``."""
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        what = _classify(block)
        if what is not None:
            found[id(block)] = what
        elif isinstance(block.get("content"), list):
            _collect(block["content"], found)


def _replace(content: list[Any], found: dict[int, _Found], attached: dict[str, AttachedImage]) -> list[Any]:
    """``content`` with each image block found by :func:`_collect` replaced by a text block
    holding its placeholder; every other block kept, in order."""
    out: list[Any] = []
    for block in content:
        if isinstance(block, dict) and id(block) in found:
            what = found[id(block)]
            image = what if isinstance(what, AttachedImage) else attached[what]
            out.append({"type": "text", "text": image.placeholder})
        elif isinstance(block, dict) and isinstance(block.get("content"), list):
            out.append({**block, "content": _replace(block["content"], found, attached)})
        else:
            out.append(block)
    return out


class _Rewrite:
    """The image blocks of a conversation, before they are attached."""

    def __init__(self, messages: Sequence[BaseMessage]) -> None:
        self.messages = list(messages)
        self.found: dict[int, _Found] = {}
        self.changed: list[int] = []  # indexes of the messages holding image blocks
        for index, message in enumerate(self.messages):
            before = len(self.found)
            _collect(message.content, self.found)
            if len(self.found) > before:
                self.changed.append(index)

    @property
    def sources(self) -> list[str]:
        """Each distinct image to attach, once."""
        return list(dict.fromkeys(what for what in self.found.values() if isinstance(what, str)))

    def apply(self, attached: dict[str, AttachedImage]) -> list[BaseMessage]:
        for what in self.found.values():
            image = what if isinstance(what, AttachedImage) else attached[what]
            if not image.ok:
                logger.warning("an image in the conversation could not be used: %s", image.error)
        messages = list(self.messages)
        for index in self.changed:
            message = messages[index]
            content = _replace(message.content, self.found, attached)  # type: ignore[arg-type]
            messages[index] = message.model_copy(update={"content": content})
        return messages

    def update(self, attached: dict[str, AttachedImage]) -> dict[str, Any]:
        """The state update: the rewritten messages under their ids, for ``add_messages``."""
        messages = self.apply(attached)
        if all(message.id is not None for message in self.messages):
            return {"messages": [messages[index] for index in self.changed]}
        # A message without an id cannot be replaced by id: rebuild the whole list.
        for message in messages:
            if message.id is None:
                message.id = str(uuid.uuid4())
        return {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), *messages]}


class MoondreamImageMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Let a text-only agent take the images users send: each becomes a handle for the tools.

    Before every model call (``before_model`` / ``abefore_model``, so ``invoke``,
    ``ainvoke``, ``stream`` and ``astream`` alike), every image content block anywhere in
    the conversation (user messages of this turn and earlier ones, tool results such as the
    toolkit's ``return_images=True`` output, AI messages) is stored with
    :meth:`moondream_tools.VisionTools.attach` and replaced by a text block with its
    placeholder, ``[image img_3fa2c1d0: 1280x853 px]``; the other blocks stay, in order. The
    model calls the vision tools with ``image="img_3fa2c1d0"``.

    The rewritten messages go back into the agent's state under their ids, so a checkpointer
    holds handles, not base64 (only when something changed). The handle comes from the
    image's content: the same photo sent twice is one handle. Give the toolkit an on-disk
    ``ImageStore(path)`` and the handles in a checkpoint still resolve in a new process.

    An image that cannot be used (not an image, over the :class:`~moondream_tools.ImagePolicy`'s
    limits, an http(s) URL while ``ImagePolicy(allow_urls=True)`` is off, a provider file id)
    becomes ``[image could not be used: <why>]``, logged at WARNING on the
    ``langchain_moondream`` logger; the turn goes on.

    Args:
        toolkit: the :class:`MoondreamToolkit` whose image store receives the images; its
            tools (:meth:`MoondreamToolkit.get_tools`) are the middleware's :attr:`tools`, so
            ``create_agent(model, tools=[], middleware=[MoondreamImageMiddleware(toolkit)])``
            is a complete vision agent (do not pass the same tools in ``tools=`` too).

    Example:
        >>> import base64, io
        >>> from langchain_core.messages import HumanMessage
        >>> from moondream_tools import AsyncMoondream
        >>> from PIL import Image
        >>> toolkit = MoondreamToolkit(backend=AsyncMoondream(base_url="http://localhost:2020/v1"))
        >>> middleware = MoondreamImageMiddleware(toolkit)
        >>> [tool.name for tool in middleware.tools]
        ['describe_image', 'count_objects', 'locate_objects', 'segment_object']
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (64, 48), "red").save(buffer, "PNG")
        >>> photo = base64.b64encode(buffer.getvalue()).decode()
        >>> message = HumanMessage(
        ...     [{"type": "text", "text": "What is this?"},
        ...      {"type": "image", "base64": photo, "mime_type": "image/png"}],
        ...     id="m1",
        ... )
        >>> [rewritten] = middleware.rewrite_messages([message])
        >>> rewritten.id, rewritten.content[1]["text"]  # doctest: +ELLIPSIS
        ('m1', '[image img_...: 64x48 px]')

    With an agent and a checkpointer (the conversation, and its images, survive restarts)::

        from langchain.agents import create_agent
        from langgraph.checkpoint.memory import InMemorySaver   # or a persistent saver
        from moondream_tools import ImageStore

        toolkit = MoondreamToolkit(image_store=ImageStore(".moondream-images"))
        agent = create_agent(
            "openai:gpt-4o-mini",
            tools=[],
            middleware=[MoondreamImageMiddleware(toolkit)],
            checkpointer=InMemorySaver(),
        )
        config = {"configurable": {"thread_id": "chat-1"}}
        photo = {"type": "image", "base64": jpeg_base64, "mime_type": "image/jpeg"}
        await agent.ainvoke(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "How many dogs?"}, photo]}]},
            config,
        )
        await agent.ainvoke({"messages": [("user", "And how many cats?")]}, config)
    """

    tools: Sequence[BaseTool]
    """The toolkit's tools, registered with the agent by ``create_agent``."""

    def __init__(self, toolkit: MoondreamToolkit) -> None:
        if not isinstance(toolkit, MoondreamToolkit):
            raise TypeError(f"toolkit must be a MoondreamToolkit, got {type(toolkit).__name__}")
        self.toolkit = toolkit
        self.tools = toolkit.get_tools()

    @property
    def vision(self) -> VisionTools:
        """The toolkit's :class:`~moondream_tools.VisionTools`: its image store receives the images."""
        return self.toolkit.vision

    def __repr__(self) -> str:
        return f"MoondreamImageMiddleware(vision={self.vision!r})"

    # ------------------------------------------------------------ attaching

    async def _attach(self, sources: Iterable[str]) -> dict[str, AttachedImage]:
        sources = list(sources)
        images = await asyncio.gather(*(self.vision.attach(source) for source in sources))
        return dict(zip(sources, images, strict=True))

    def _attach_sync(self, sources: list[str]) -> dict[str, AttachedImage]:
        if not sources:
            return {}
        return run_sync(lambda: self._attach(sources))

    async def arewrite_messages(self, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
        """``messages`` with every image block attached and replaced by its placeholder.

        Messages without images are returned as they are; the others as copies with the same
        ``id``. Use it to rewrite a conversation outside an agent, e.g. before storing it.
        """
        rewrite = _Rewrite(messages)
        if not rewrite.changed:
            return list(messages)
        return rewrite.apply(await self._attach(rewrite.sources))

    def rewrite_messages(self, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
        """:meth:`arewrite_messages` for synchronous code (a script, or inside a running loop)."""
        rewrite = _Rewrite(messages)
        if not rewrite.changed:
            return list(messages)
        return rewrite.apply(self._attach_sync(rewrite.sources))

    # ------------------------------------------------------------ the agent hooks

    def before_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Attach the conversation's images; the update replaces their messages by id."""
        rewrite = _Rewrite(state["messages"])
        if not rewrite.changed:
            return None
        return rewrite.update(self._attach_sync(rewrite.sources))

    async def abefore_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """:meth:`before_model` for ``ainvoke`` / ``astream``."""
        rewrite = _Rewrite(state["messages"])
        if not rewrite.changed:
            return None
        return rewrite.update(await self._attach(rewrite.sources))
