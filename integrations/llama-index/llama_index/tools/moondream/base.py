"""MoondreamToolSpec: the four moondream-tools vision tools as LlamaIndex FunctionTools.

The tools are ``describe_image``, ``count_objects``, ``locate_objects`` and
``segment_object``. Their names, descriptions and argument schemas come only from
:data:`moondream_tools.TOOL_SPECS`, so a model sees exactly what the LangChain adapter
shows it; the work is done by one shared :class:`moondream_tools.VisionTools`.

Each tool returns a :class:`~llama_index.core.tools.ToolOutput`: its content is the
result's short exact text, ``raw_output`` the :class:`moondream_tools.ToolResult` model.
With ``return_images=True`` the blocks are ``[TextBlock, ImageBlock]``, the image an
annotated PNG of the result. A :class:`moondream_tools.MoondreamError` (an unregistered
image, a refused path, invalid arguments, a rate limit, ...) becomes an output with
``is_error=True`` whose content tells the model what to do; any other exception is a bug
and propagates.

Images a user sends (``ImageBlock`` s in chat messages) are turned into handles by
:meth:`MoondreamToolSpec.attach` / :meth:`~MoondreamToolSpec.attach_messages` before the
agent runs, so a text-only model (and its memory) sees ``[image img_3fa2c1d0: 1280x853 px]``
instead of the image.

Example::

    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.tools.moondream import MoondreamToolSpec
    from moondream_tools import ImagePolicy

    spec = MoondreamToolSpec(image_policy=ImagePolicy(allowed_dirs=["./photos"]))
    spec.add_image("street.jpg", name="street")
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm)
    response = await agent.run("How many cars are parked in 'street'?")
"""

from __future__ import annotations

import os

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatMessage, ContentBlock, ImageBlock, TextBlock
from llama_index.core.tools import FunctionTool, ToolMetadata, ToolOutput
from llama_index.core.tools.tool_spec.base import SPEC_FUNCTION_TYPE, BaseToolSpec
from pydantic import BaseModel

from moondream_tools import (
    TOOL_SPECS,
    ImageInput,
    ImagePolicy,
    ImageStore,
    MoondreamError,
    ToolResult,
    VisionBackend,
    VisionTools,
    run_sync,
    tool_error_text,
)
from moondream_tools.tiling import TilingMode

from llama_index.tools.moondream.attachments import aattach_message

__all__ = ["MoondreamToolSpec"]

_UserMsg = TypeVar("_UserMsg", str, ChatMessage, None)


def _passthrough(output: ToolOutput) -> ToolOutput:
    # FunctionTool wraps whatever its function returns in a new ToolOutput; a callback
    # that returns a ToolOutput replaces it, so the tool keeps ours (is_error, blocks).
    return output


async def _apassthrough(output: ToolOutput) -> ToolOutput:
    return output


class MoondreamToolSpec(BaseToolSpec):
    """Moondream vision tools for LlamaIndex agents.

    Args:
        backend: the :class:`moondream_tools.VisionBackend` to use (e.g.
            :class:`moondream_tools.AsyncMoondream`); None creates an ``AsyncMoondream``
            from ``MOONDREAM_API_KEY`` / ``MOONDREAM_BASE_URL``, closed by :meth:`aclose`.
        segment_backend: another backend for ``segment_object`` (e.g. SAM 3); never closed here.
        image_policy: the :class:`moondream_tools.ImagePolicy` for image references a model
            writes. Default: registered handles only (see :meth:`add_image`).
        return_images: add an annotated PNG (an ``ImageBlock``) to each tool output, for
            multimodal models. Off by default: several providers reject images in tool
            results.
        max_objects: the limit sent to the backend when counting and locating (default 250).
        tiling: ``"auto"`` (default), ``"always"``, ``"never"`` or ``(rows, cols)``: count and
            locate over tiles on large images (see :class:`moondream_tools.VisionTools`).
        max_tiles: the most tiles one phrase may cost (default 16).
        image_store: the :class:`moondream_tools.ImageStore` the handles live in (default: a
            new one in memory); an on-disk store keeps them across restarts.
        vision: an existing :class:`moondream_tools.VisionTools` to share (its backends,
            image registry and policy), instead of the options above.

    ``spec_functions`` are the four tool names; :meth:`to_tool_list` makes them
    ``FunctionTool`` s (sync and async), and :meth:`call_tool` / :meth:`acall_tool` run one
    by name. Both work in a plain script and inside a running event loop. Unknown keyword
    arguments are a ``TypeError`` naming the accepted ones. Images users send in chat
    messages become handles with :meth:`attach` / :meth:`attach_messages` (and their async
    forms :meth:`aattach` / :meth:`aattach_messages`) before the agent sees them.

    Example::

        from moondream_tools import AsyncMoondream

        async with AsyncMoondream() as md:
            spec = MoondreamToolSpec(md)
            spec.add_image(pil_image)                       # -> "img_1"
            tools = spec.to_tool_list()                     # 4 FunctionTools
            output = await tools[1].acall(image="img_1", object="person")
            print(output.content)        # Counted 3 "person" in img_1 (1280x853 px): #1 at ...
            output.raw_output.count      # 3, from the CountResult
    """

    spec_functions: list[SPEC_FUNCTION_TYPE] = list(TOOL_SPECS)

    def __init__(
        self,
        backend: VisionBackend | None = None,
        *,
        segment_backend: VisionBackend | None = None,
        image_policy: ImagePolicy | None = None,
        return_images: bool | None = None,
        max_objects: int | None = None,
        tiling: TilingMode | tuple[int, int] | None = None,
        max_tiles: int | None = None,
        image_store: ImageStore | None = None,
        vision: VisionTools | None = None,
        **unknown: Any,
    ) -> None:
        self.vision = VisionTools.from_options(
            vision=vision,
            owner="MoondreamToolSpec",
            backend=backend,
            segment_backend=segment_backend,
            image_policy=image_policy,
            return_images=return_images,
            max_objects=max_objects,
            tiling=tiling,
            max_tiles=max_tiles,
            image_store=image_store,
            **unknown,
        )

    def __repr__(self) -> str:
        return f"MoondreamToolSpec(vision={self.vision!r})"

    # ------------------------------------------------------------ lifecycle and images

    async def __aenter__(self) -> MoondreamToolSpec:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the backend if this spec created it."""
        await self.vision.aclose()

    def add_image(self, image: ImageInput, name: str | None = None) -> str:
        """Register an image under a handle the agent can name; return the handle.

        The application's own images (path, bytes, PIL image, numpy array, ...) are
        trusted and bypass the image policy. Default names are ``img_1``, ``img_2``, ...

        Example::

            spec.add_image(pil_image)                       # "img_1"
            spec.add_image("scan.png", name="receipt")      # "receipt"
        """
        return self.vision.add_image(image, name=name)

    def add_video(self, video: str | os.PathLike[str] | bytes, name: str | None = None) -> str:
        """Register a video (a file or its bytes) under a handle; return it (``vid_1``, ...).
        The tools take ``time`` for it; see :meth:`VisionTools.add_video`.

        Example::

            spec.add_video("dashcam.mp4")                   # "vid_1"
        """
        return self.vision.add_video(video, name=name)

    # ------------------------------------------------------------ images users send

    async def aattach(self, message: ChatMessage) -> ChatMessage:
        """``message`` with each ``ImageBlock`` replaced, in place, by a ``TextBlock`` naming
        the image's handle: ``[image img_3fa2c1d0: 1280x853 px]``.

        Each image is stored in this spec's image store under a handle derived from its
        content (the same image -> the same handle), which the tools then resolve, in this
        process or, with an on-disk :class:`moondream_tools.ImageStore`, after a restart. The
        copy keeps the role, the other blocks (in order) and ``additional_kwargs`` (less the
        legacy ``"images"`` key, whose images are the blocks replaced); a message without
        images is returned as is.

        A user message is untrusted: an ``ImageBlock``'s ``image`` (raw or base64 bytes) and
        ``data:`` URL are held to the :class:`moondream_tools.ImagePolicy`'s size limits; an
        ``http(s)`` ``url`` is downloaded only under the policy (``allow_urls=True``, public
        addresses, capped); a ``path`` or ``file:`` URL is read only inside the policy's
        ``allowed_dirs`` (``spec.vision.policy.resolve``), never through
        ``ImageBlock.resolve_image()``. An image that cannot be used becomes
        ``[image could not be used: <why>]``: this never raises for a bad image.

        Example::

            message = ChatMessage(role="user", blocks=[
                TextBlock(text="How many cats are on the sofa?"),
                ImageBlock(image=jpeg_bytes),
            ])
            message = await spec.aattach(message)
            message.content   # 'How many cats are on the sofa?\n[image img_3fa2c1d0: 1280x853 px]'
            response = await agent.run(user_msg=message, memory=memory)
        """
        rewritten, _ = await aattach_message(self.vision, message)
        return rewritten

    def attach(self, message: ChatMessage) -> ChatMessage:
        """:meth:`aattach` from synchronous code (a plain script, or inside a running event
        loop, where it runs on a worker thread).

        Example::

            message = spec.attach(ChatMessage(role="user", blocks=[ImageBlock(path="cat.jpg")]))
        """
        return run_sync(lambda: self.aattach(message))

    async def aattach_messages(
        self, user_msg: _UserMsg, chat_history: Sequence[ChatMessage] | None = None
    ) -> tuple[_UserMsg, list[ChatMessage]]:
        """``agent.run``'s ``user_msg`` and ``chat_history`` with every image replaced by its
        handle (see :meth:`aattach`): ``(user_msg, chat_history)``.

        ``user_msg`` may be a ``ChatMessage``, a ``str`` (returned as it is: text holds no
        image) or None (returned as None); ``chat_history`` a sequence of messages or None
        (an empty list back). Messages without images come back as they are, so passing the
        whole history again each turn costs little.

        Example::

            user_msg, chat_history = await spec.aattach_messages(user_msg, chat_history)
            response = await agent.run(user_msg=user_msg, chat_history=chat_history)
        """
        if user_msg is not None and not isinstance(user_msg, (str, ChatMessage)):
            raise TypeError(f"user_msg must be a str or a ChatMessage, got {type(user_msg).__name__}")
        history = list(chat_history or [])
        rewritten = [await self.aattach(message) for message in history]
        if isinstance(user_msg, ChatMessage):
            return await self.aattach(user_msg), rewritten  # type: ignore[return-value]
        return user_msg, rewritten

    def attach_messages(
        self, user_msg: _UserMsg, chat_history: Sequence[ChatMessage] | None = None
    ) -> tuple[_UserMsg, list[ChatMessage]]:
        """:meth:`aattach_messages` from synchronous code.

        Example::

            user_msg, chat_history = spec.attach_messages(user_msg, chat_history)
        """
        return run_sync(lambda: self.aattach_messages(user_msg, chat_history))

    # ------------------------------------------------------------ running a tool

    def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolOutput:
        """Run tool ``name`` with model-written ``arguments`` from synchronous code.

        Works in a plain script and inside a running event loop (the call then runs on a
        worker thread). Returns an error output for a :class:`MoondreamError`.

        Example::

            output = spec.call_tool("count_objects", {"image": "img_1", "object": "cat"})
        """
        arguments = dict(arguments)
        try:
            result = self.vision.run_sync(name, arguments)
        except MoondreamError as exc:
            return _error_output(name, arguments, exc)
        return _result_output(name, arguments, result)

    async def acall_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolOutput:
        """Run tool ``name`` with model-written ``arguments``; see :meth:`call_tool`.

        Example::

            output = await spec.acall_tool("locate_objects", {"image": "img_1", "object": "car"})
        """
        arguments = dict(arguments)
        try:
            result = await self.vision.run(name, arguments)
        except MoondreamError as exc:
            return _error_output(name, arguments, exc)
        return _result_output(name, arguments, result)

    # ------------------------------------------------------------ LlamaIndex tool spec

    def get_fn_schema_from_fn_name(
        self, fn_name: str, spec_functions: list[SPEC_FUNCTION_TYPE] | None = None
    ) -> type[BaseModel]:
        """The argument model of a tool, from ``TOOL_SPECS``."""
        return TOOL_SPECS[_tool_name(fn_name)].args_schema

    def get_metadata_from_fn_name(
        self, fn_name: str, spec_functions: list[SPEC_FUNCTION_TYPE] | None = None
    ) -> ToolMetadata:
        """Name, description and argument model of a tool, exactly as in ``TOOL_SPECS``."""
        spec = TOOL_SPECS[_tool_name(fn_name)]
        return ToolMetadata(name=spec.name, description=spec.description, fn_schema=spec.args_schema)

    def to_tool_list(
        self,
        spec_functions: list[SPEC_FUNCTION_TYPE] | None = None,
        func_to_metadata_mapping: dict[str, ToolMetadata] | None = None,
    ) -> list[FunctionTool]:
        """The tools as ``FunctionTool``s (all four, or those named in ``spec_functions``).

        Each tool has a sync and an async function taking the model's arguments, which the
        tool's argument model validates (mistakes come back as error outputs), and metadata
        from ``TOOL_SPECS`` unless ``func_to_metadata_mapping`` overrides it.

        Example::

            tools = spec.to_tool_list(["count_objects", "locate_objects"])
            [t.metadata.name for t in tools]    # ['count_objects', 'locate_objects']
        """
        mapping = func_to_metadata_mapping or {}
        tools = []
        for entry in spec_functions or self.spec_functions:
            name = _tool_name(entry if isinstance(entry, str) else entry[0])
            metadata = mapping.get(name) or self.get_metadata_from_fn_name(name)
            sync_fn, async_fn = self._tool_functions(name)
            tools.append(
                FunctionTool.from_defaults(
                    fn=sync_fn,
                    async_fn=async_fn,
                    tool_metadata=metadata,
                    callback=_passthrough,
                    async_callback=_apassthrough,
                )
            )
        return tools

    def _tool_functions(
        self, name: str
    ) -> tuple[Callable[..., ToolOutput], Callable[..., Awaitable[ToolOutput]]]:
        def run(**arguments: Any) -> ToolOutput:
            return self.call_tool(name, arguments)

        async def arun(**arguments: Any) -> ToolOutput:
            return await self.acall_tool(name, arguments)

        for fn, prefix in ((run, ""), (arun, "a")):
            fn.__name__ = fn.__qualname__ = prefix + name
            fn.__doc__ = TOOL_SPECS[name].description
        return run, arun


def _tool_name(fn_name: str) -> str:
    if fn_name in TOOL_SPECS:
        return fn_name
    if fn_name.startswith("a") and fn_name[1:] in TOOL_SPECS:
        return fn_name[1:]
    raise ValueError(f"unknown Moondream tool {fn_name!r}; tools: {', '.join(TOOL_SPECS)}")


def _result_output(name: str, arguments: dict[str, Any], result: ToolResult) -> ToolOutput:
    blocks: list[ContentBlock] = [TextBlock(text=result.text)]
    if result.annotated_png is not None:
        blocks.append(ImageBlock(image=result.annotated_png, image_mimetype="image/png"))
    return ToolOutput(
        tool_name=name,
        blocks=blocks,
        raw_input={"args": (), "kwargs": arguments},
        raw_output=result,
    )


def _error_output(name: str, arguments: dict[str, Any], exc: MoondreamError) -> ToolOutput:
    text = tool_error_text(exc)
    return ToolOutput(
        tool_name=name,
        content=text,
        raw_input={"args": (), "kwargs": arguments},
        raw_output=text,
        is_error=True,
        exception=exc,
    )
