"""An MCP server for the four vision tools: any MCP client (Claude Desktop, Cursor, an agent
framework) can look at images through :class:`~moondream_tools.VisionTools`.

The server publishes exactly the tools of :data:`~moondream_tools.TOOL_SPECS` (same names,
descriptions and argument schemas as the LangChain and LlamaIndex adapters), each with an
output schema. A call returns the text an agent reads (``result.text``) as text content,
the result as JSON (``structuredContent``), and with ``return_images=True`` the annotated
PNG as image content. A refused image reference or any :class:`~moondream_tools.MoondreamError`
is a tool error (``isError``) carrying :func:`~moondream_tools.tool_error_text`; the server
keeps serving.

Images are named the way the :class:`~moondream_tools.ImagePolicy` of the tools allows:
paths inside ``allowed_dirs`` (or ``file://`` URIs), http(s) URLs when ``allow_urls``,
handles registered in ``vision.images`` and small ``data:`` URIs.

Needs the optional extra ``mcp`` (``pip install "moondream-tools[mcp]"``); the core
package never imports this module.

Example::

    from moondream_tools import ImagePolicy, VisionTools
    from moondream_tools.mcp_server import run_server

    run_server(VisionTools(image_policy=ImagePolicy(allowed_dirs=["/home/me/Pictures"])))   # stdio
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Literal

import anyio
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from pydantic import BaseModel, ConfigDict, Field

from ._version import __version__
from .errors import MoondreamError
from .geometry import nest_rings, points_reading_order, position_word, reading_order
from .results import Box, ImageSize, Point
from .tools import (
    TOOL_SPECS,
    CountResult,
    DescribeResult,
    LocateResult,
    SegmentResult,
    ToolResult,
    ToolSpec,
    VideoTimeline,
    VisionTools,
    tool_error_text,
)

__all__ = ["create_server", "run_server"]

logger = logging.getLogger(__name__)

#: Appended to a tool's description when it does not already warn against base64: a model
#: that has to write an image's base64 into the arguments fails on all but tiny images.
_REFERENCE_HINT = (
    " Never write base64 image data into the image argument: pass a file path, a URL or an image name."
)


def tool_description(spec: ToolSpec) -> str:
    """The description the MCP server publishes for ``spec``: the spec's own, plus a
    sentence steering the model to paths, URLs and names unless it already says so.

    >>> tool_description(TOOL_SPECS["count_objects"]).startswith(TOOL_SPECS["count_objects"].description)
    True
    """
    if "base64" in spec.description.lower():
        return spec.description
    return spec.description + _REFERENCE_HINT


# ---------------------------------------------------------------------- output shapes


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SizeOut(_Out):
    """Width and height in pixels of the image (EXIF orientation applied)."""

    width: int
    height: int


class PointOut(_Out):
    """A point: normalized to [0, 1] (``x``, ``y``) and in pixels (``x_px``, ``y_px``)."""

    x: float = Field(description="Normalized [0-1] x, origin top-left.")
    y: float = Field(description="Normalized [0-1] y, origin top-left.")
    x_px: float = Field(description="x in pixels of the image.")
    y_px: float = Field(description="y in pixels of the image.")
    position: str = Field(description="Where in the image: 'top-left', 'center', 'bottom-right', ...")


class BoxOut(_Out):
    """A box: normalized to [0, 1] and in pixels, origin top-left."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    x_min_px: float
    y_min_px: float
    x_max_px: float
    y_max_px: float
    position: str = Field(description="Where the box's center is: 'top-left', 'center', 'bottom-right', ...")


_AT_LEAST = (
    "True when count is a lower bound: the result hit the object limit or part of the image could not be read."
)


class TimeSpanOut(_Out):
    """A stretch of a video in which the object was seen in every sampled frame."""

    start: float = Field(description="Seconds: the first sampled frame it was seen in.")
    end: float = Field(description="Seconds: the last one.")
    most: int = Field(description="The most instances in one sampled frame of the stretch.")


class TimelineOut(_Out):
    """When the object appears in a video (count_objects / locate_objects without time)."""

    duration: float = Field(description="The video's length in seconds.")
    every: float = Field(description="Seconds between the sampled frames.")
    frames: int = Field(description="Sampled frames answered.")
    failed: int = Field(description="Sampled frames that could not be read.")
    spans: list[TimeSpanOut]
    tracks: int = Field(description="Distinct instances followed across frames.")


_TIME = "For a video: the moment (seconds from its start) the result is of; null for an image."
_TIMELINE = "For a video asked without time: when the object appears (the rest is its busiest moment); else null."


class CountPhraseOut(_Out):
    """The count of one further phrase (``more_objects``)."""

    object: str
    count: int
    at_least: bool = Field(description=_AT_LEAST)
    points: list[PointOut] = Field(description="Each instance's center, in reading order (#1 first).")
    timeline: TimelineOut | None = Field(default=None, description=_TIMELINE)


class CountOut(_Out):
    """``count_objects``: the count of ``object``, and of each further phrase in ``more``."""

    image: str
    image_size: SizeOut
    object: str
    count: int
    at_least: bool = Field(description=_AT_LEAST)
    points: list[PointOut] = Field(description="Each instance's center, in reading order (#1 first).")
    timeline: TimelineOut | None = Field(default=None, description=_TIMELINE)
    time: float | None = Field(default=None, description=_TIME)
    more: list[CountPhraseOut] = Field(description="One entry per further phrase, in the order asked.")


class LocatePhraseOut(_Out):
    """The boxes of one further phrase (``more_objects``)."""

    object: str
    count: int
    at_least: bool = Field(description=_AT_LEAST)
    boxes: list[BoxOut] = Field(description="Each instance's box, in reading order (#1 first).")
    timeline: TimelineOut | None = Field(default=None, description=_TIMELINE)


class LocateOut(_Out):
    """``locate_objects``: the boxes of ``object``, and of each further phrase in ``more``."""

    image: str
    image_size: SizeOut
    object: str
    count: int
    at_least: bool = Field(description=_AT_LEAST)
    boxes: list[BoxOut] = Field(description="Each instance's box, in reading order (#1 first).")
    timeline: TimelineOut | None = Field(default=None, description=_TIMELINE)
    time: float | None = Field(default=None, description=_TIME)
    more: list[LocatePhraseOut] = Field(description="One entry per further phrase, in the order asked.")


class MaskRleOut(_Out):
    """COCO run-length encoding of the full-size mask, as pycocotools' ``mask.encode`` writes it."""

    size: list[int] = Field(description="[height, width] of the image.")
    counts: str = Field(description="Compressed column-major run lengths (pycocotools' string form).")


class InstanceOut(_Out):
    """One of several masks a model returned (the segmentation is their union)."""

    score: float | None
    bbox: BoxOut | None


class SegmentOut(_Out):
    """``segment_object``: the object's mask, summarized, and exactly as COCO RLE."""

    image: str
    image_size: SizeOut
    time: float | None = Field(default=None, description=_TIME)
    object: str
    found: bool
    bbox: BoxOut | None = Field(description="The mask's bounding box (null when nothing was found).")
    area_px: int = Field(description="Pixels inside the mask (holes subtracted).")
    area_fraction: float = Field(description="area_px as a fraction of the image (0-1).")
    regions: int = Field(description="Separate regions of the mask.")
    holes: int = Field(description="Holes inside the regions.")
    mask_rle: MaskRleOut | None = Field(description="The full-size mask (null when nothing was found).")
    instances: list[InstanceOut] = Field(
        description="The separate masks when the model returned several (e.g. SAM 3), in reading order; else empty."
    )
    at_least: bool = Field(description="True when the model hit its mask limit: there may be more instances.")


class GroundingOut(_Out):
    """A span of the reasoning text and the points it refers to."""

    text: str
    points: list[PointOut]


class OtherImageOut(_Out):
    """A further image of a question about several images."""

    image: str
    image_size: SizeOut


class DescribeOut(_Out):
    """``describe_image``: ``caption`` when no question was asked, else ``answer``."""

    image: str
    image_size: SizeOut
    time: float | None = Field(default=None, description=_TIME)
    caption: str | None
    answer: str | None
    reasoning: str | None = Field(description="The reasoning trace, when reasoning was asked for.")
    grounding: list[GroundingOut] = Field(description="Reasoning spans grounded in the image.")
    more_images: list[OtherImageOut] = Field(description="The further images of a question about several.")


#: The output model of each tool; its JSON schema is the tool's ``outputSchema``.
OUTPUT_MODELS: Mapping[str, type[BaseModel]] = {
    "describe_image": DescribeOut,
    "count_objects": CountOut,
    "locate_objects": LocateOut,
    "segment_object": SegmentOut,
}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every ``$ref`` to ``#/$defs/...`` replaced by its definition (the
    output models are not recursive), so clients with simple validators read it too."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {key: walk(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(schema)


def _size(size: ImageSize) -> SizeOut:
    return SizeOut(width=size.width, height=size.height)


def _px(value: float) -> float:
    return round(value, 2)


def _norm(value: float) -> float:
    return round(value, 6)


def _point(point: Point, size: ImageSize) -> PointOut:
    pixel = point.to_pixels(size)
    return PointOut(
        x=_norm(point.x), y=_norm(point.y), x_px=_px(pixel.x), y_px=_px(pixel.y),
        position=position_word(point.x, point.y),
    )


def _box(box: Box, size: ImageSize) -> BoxOut:
    pixel = box.to_pixels(size)
    x0, y0 = pixel.x_min / size.width, pixel.y_min / size.height  # ordered and clamped
    x1, y1 = pixel.x_max / size.width, pixel.y_max / size.height
    return BoxOut(
        x_min=_norm(x0), y_min=_norm(y0), x_max=_norm(x1), y_max=_norm(y1),
        x_min_px=_px(pixel.x_min), y_min_px=_px(pixel.y_min), x_max_px=_px(pixel.x_max), y_max_px=_px(pixel.y_max),
        position=position_word((x0 + x1) / 2, (y0 + y1) / 2),
    )


def _count_phrase(result: CountResult) -> CountPhraseOut:
    size = result.image_size
    pixels = [(p.x, p.y) for p in result.points.to_pixels()]
    order = points_reading_order(pixels, size.width, size.height)
    unread = bool(getattr(result.points, "failed", None))  # tiles that could not be read
    return CountPhraseOut(
        object=result.object,
        count=result.count,
        at_least=result.capped or unread,
        points=[_point(result.points.points[i], size) for i in order],
        timeline=_timeline(result.timeline),
    )


def _locate_phrase(result: LocateResult, max_objects: int) -> LocatePhraseOut:
    size = result.image_size
    detections = result.detections
    pixels = detections.to_pixels()
    order = reading_order([(b.x_min, b.y_min, b.x_max, b.y_max) for b in pixels])
    if hasattr(detections, "tiles"):  # tiled: the tiles say whether one hit the limit or failed
        at_least = bool(getattr(detections, "capped", False) or getattr(detections, "failed", None))
    else:  # one request: as count_objects judges it
        at_least = len(detections.objects) >= max_objects
    return LocatePhraseOut(
        object=result.object,
        count=len(detections.objects),
        at_least=at_least,
        boxes=[_box(detections.objects[i], size) for i in order],
        timeline=_timeline(result.timeline),
    )


def _timeline(timeline: VideoTimeline | None) -> TimelineOut | None:
    return None if timeline is None else TimelineOut.model_validate(timeline.model_dump())


def _count_out(result: CountResult) -> CountOut:
    first = _count_phrase(result)
    return CountOut(
        image=result.image, image_size=_size(result.image_size), time=result.time, **first.model_dump(),
        more=[_count_phrase(r) for r in result.more],
    )


def _locate_out(result: LocateResult, max_objects: int) -> LocateOut:
    first = _locate_phrase(result, max_objects)
    return LocateOut(
        image=result.image, image_size=_size(result.image_size), time=result.time, **first.model_dump(),
        more=[_locate_phrase(r, max_objects) for r in result.more],
    )


def _segment_out(result: SegmentResult) -> SegmentOut:
    seg = result.segmentation
    size = result.image_size
    found = seg.found and seg.bbox is not None
    polygons = nest_rings(seg.polygons) if found else []
    rle = seg.to_rle(compressed=True) if found else None
    return SegmentOut(
        image=result.image,
        image_size=_size(size),
        time=result.time,
        object=result.object,
        found=found,
        bbox=_box(seg.bbox, size) if found and seg.bbox is not None else None,
        area_px=seg.area_px if found else 0,
        area_fraction=round(seg.area_fraction, 6) if found else 0.0,
        regions=len(polygons),
        holes=sum(len(holes) for _, holes in polygons),
        mask_rle=MaskRleOut(size=list(rle["size"]), counts=rle["counts"]) if rle is not None else None,
        instances=[
            InstanceOut(score=i.score, bbox=_box(i.bbox, size) if i.bbox is not None else None)
            for i in seg.instances
        ]
        if len(seg.instances) > 1 or seg.capped
        else [],
        at_least=seg.capped,
    )


def _describe_out(result: DescribeResult) -> DescribeOut:
    answer = result.answer
    reasoning = answer.reasoning if answer is not None else None
    grounding: list[GroundingOut] = []
    if reasoning is not None:
        for span in reasoning.grounding:
            grounding.append(
                GroundingOut(
                    text=reasoning.text[span.start_idx : span.end_idx],
                    points=[_point(p, result.image_size) for p in span.points],
                )
            )
    return DescribeOut(
        image=result.image,
        image_size=_size(result.image_size),
        time=result.time,
        caption=result.caption.caption.strip() if result.caption is not None else None,
        answer=answer.answer.strip() if answer is not None else None,
        reasoning=reasoning.text.strip() if reasoning is not None and reasoning.text.strip() else None,
        grounding=grounding,
        more_images=[
            OtherImageOut(image=name, image_size=_size(size))
            for name, size in zip(result.more_images, result.more_image_sizes, strict=False)
        ],
    )


def structured_output(result: ToolResult, *, max_objects: int) -> dict[str, Any]:
    """The JSON ``structuredContent`` of a tool result (its tool's :data:`OUTPUT_MODELS` shape);
    ``max_objects`` is the limit the tools asked with (``VisionTools.max_objects``)."""
    out: BaseModel
    if isinstance(result, CountResult):
        out = _count_out(result)
    elif isinstance(result, LocateResult):
        out = _locate_out(result, max_objects)
    elif isinstance(result, SegmentResult):
        out = _segment_out(result)
    elif isinstance(result, DescribeResult):
        out = _describe_out(result)
    else:  # pragma: no cover - VisionTools returns only the four
        raise TypeError(f"unknown result type {type(result).__name__}")
    return out.model_dump(mode="json")


# ---------------------------------------------------------------------- the server


def _instructions(vision: VisionTools) -> str:
    policy = vision.policy
    ways = ["the name of an image registered with the server"]
    if policy.allowed_dirs:
        ways.append("a local file path (or file:// URI) under " + ", ".join(map(str, policy.allowed_dirs)))
    if policy.allow_urls:
        ways.append("an http(s) URL")
    return (
        "Vision tools: describe an image or answer questions about it, count objects, locate them "
        "with boxes, outline one with a mask. Name the image as "
        + ", or ".join(ways)
        + ". Never paste base64 image data; results give pixel coordinates of the image, origin top-left."
    )


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


def create_server(vision: VisionTools, *, return_images: bool = False, name: str = "moondream-tools") -> Server[Any]:
    """An MCP server (the SDK's low-level :class:`mcp.server.Server`) exposing the four tools
    of ``vision``.

    Args:
        vision: the tools to serve; their :class:`~moondream_tools.ImagePolicy` decides which
            image references a client may use. The server does not close them
            (:func:`run_server` does).
        return_images: add the annotated PNG of each result as image content. Turns on
            ``vision.return_images`` (the tools draw the PNG); with False, no image content
            is sent even when ``vision.return_images`` is on.
        name: the server name clients show.

    Example::

        from mcp import Client

        async with Client(create_server(vision)) as client:
            result = await client.call_tool("count_objects", {"image": "photo.jpg", "object": "cat"})
            print(result.structured_content["count"])
    """
    if not isinstance(vision, VisionTools):
        raise TypeError(f"vision must be a VisionTools, got {type(vision).__name__}")
    if return_images:
        vision.return_images = True
    tools = [
        types.Tool(
            name=spec.name,
            description=tool_description(spec),
            input_schema=spec.args_schema.model_json_schema(),
            output_schema=_inline_refs(OUTPUT_MODELS[spec.name].model_json_schema()),
            annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=True),
        )
        for spec in TOOL_SPECS.values()
    ]
    input_schemas = {tool.name: tool.input_schema for tool in tools}

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool.model_copy(deep=True) for tool in tools])

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = params.name
        if tool not in TOOL_SPECS:
            return _error(f"Error: unknown tool {tool!r}; tools: {', '.join(TOOL_SPECS)}.")
        try:
            result = await vision.run(tool, params.arguments or {})
            structured = structured_output(result, max_objects=vision.max_objects)
        except MoondreamError as exc:
            logger.info("%s refused or failed: %r", tool, str(exc))
            return _error(tool_error_text(exc))
        except Exception as exc:  # a bug, not a bad image: keep serving, say little
            logger.exception("%s raised an unexpected exception", tool)
            return _error(
                f"Error: {tool} failed unexpectedly ({type(exc).__name__}); the server logged the details."
                " Try again or go on without it."
            )
        content: list[types.ContentBlock] = [types.TextContent(text=result.text)]
        if return_images and result.annotated_png is not None:
            content.append(
                types.ImageContent(data=base64.b64encode(result.annotated_png).decode("ascii"), mime_type="image/png")
            )
        return types.CallToolResult(content=content, structured_content=structured)

    return Server(
        name,
        version=__version__,
        instructions=_instructions(vision),
        get_tool_input_schema=input_schemas.get,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


class _StdinLines:
    """The lines of the process's stdin, read by a daemon thread.

    The SDK's own stdio reader blocks a non-daemon worker thread on stdin, so at a
    terminal Ctrl-C does not end the server until a line or EOF arrives
    (modelcontextprotocol/python-sdk#3551). This reader's thread never delays exit: it
    reads a private duplicate of fd 0 with ``os.read`` (no buffered-reader lock held at
    interpreter shutdown) and hands lines to the loop, so cancelling the server ends it.
    """

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        fd = os.dup(0)  # never closed: the thread may still be blocked reading it at exit

        def put(item: bytes | None) -> None:
            with suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            pending = b""
            try:
                while chunk := os.read(fd, 65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        put(line)
            except OSError:
                pass
            if pending:
                put(pending)
            put(None)

        threading.Thread(target=read, name="moondream-tools-mcp-stdin", daemon=True).start()
        while (line := await queue.get()) is not None:
            if line.strip():
                yield line.decode("utf-8", errors="replace")


async def _serve(server: Server[Any], vision: VisionTools, transport: str, host: str, port: int) -> None:
    closed = False

    async def close_vision() -> None:
        nonlocal closed
        if not closed:
            closed = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await vision.aclose()

    try:
        if transport == "stdio":
            stdin: Any = _StdinLines()  # an async iterable of lines is all stdio_server reads
            async with stdio_server(stdin=stdin) as (read_stream, write_stream):
                await server.run(read_stream, write_stream, server.create_initialization_options())
        else:
            import uvicorn  # a dependency of mcp

            app = server.streamable_http_app(host=host)
            sessions = app.router.lifespan_context

            @asynccontextmanager
            async def lifespan(asgi_app: Any) -> AsyncIterator[None]:
                async with sessions(asgi_app):
                    yield
                # Close here, in the app's shutdown: uvicorn still holds Ctrl-C, which it
                # raises again once serve() returns (cancelling this task).
                await close_vision()

            app.router.lifespan_context = lifespan
            config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
            try:
                await uvicorn.Server(config).serve()
            except SystemExit:  # uvicorn exits when it cannot start, e.g. the port is taken
                raise OSError(
                    f"the MCP server could not start on http://{host}:{port}/mcp; the log above says why"
                ) from None
    finally:
        await close_vision()


def run_server(
    vision: VisionTools,
    *,
    transport: Literal["stdio", "http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = 8000,
    return_images: bool = False,
) -> None:
    """Serve the four tools of ``vision`` over MCP until the client disconnects (stdio) or
    Ctrl-C; then close ``vision``.

    Args:
        vision: the tools to serve (closed at the end, see :meth:`VisionTools.aclose`).
        transport: ``"stdio"`` (a client starts this process) or ``"http"`` (streamable
            HTTP at ``http://{host}:{port}/mcp``).
        host: the address to listen on for ``"http"``. On loopback (the default) the
            server refuses requests whose Host or Origin header is not local (DNS rebinding).
        port: the port to listen on for ``"http"``.
        return_images: add the annotated PNG of each result as image content.

    Raises:
        OSError: the HTTP server could not start (e.g. the port is taken).

    Example::

        run_server(VisionTools(image_policy=ImagePolicy(allowed_dirs=["./photos"])), transport="http")
    """
    if transport not in ("stdio", "http"):
        raise ValueError(f"transport must be 'stdio' or 'http', got {transport!r}")
    server = create_server(vision, return_images=return_images)
    try:
        anyio.run(_serve, server, vision, transport, host, port, backend="asyncio")
    except KeyboardInterrupt:
        pass
