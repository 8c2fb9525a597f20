"""The four Moondream vision tools as LangChain ``BaseTool`` s.

Each tool is a thin wrapper over :class:`moondream_tools.VisionTools`: its name,
description and argument schema come from :data:`moondream_tools.TOOL_SPECS` (so LangChain
and LlamaIndex agents see exactly the same tools), it runs natively async (``ainvoke``)
and also from synchronous code (``invoke``, in a plain script or inside a running event
loop), and it answers with ``response_format="content_and_artifact"``:

* content: the result's short, exact ``.text`` (or, when the ``VisionTools`` was made with
  ``return_images=True``, a list of standard content blocks: that text and the annotated
  PNG as an ``{"type": "image", "base64": ..., "mime_type": "image/png"}`` block);
* artifact: the :class:`moondream_tools.ToolResult` (``CountResult``, ``LocateResult``, ...)
  with the structured result, for code.

A :class:`moondream_tools.MoondreamError` (unknown image, refused path, rate limit,
invalid arguments, ...) becomes a ``ToolMessage`` with ``status="error"`` whose content is
:func:`moondream_tools.tool_error_text`, so the agent can read it and recover; anything else
is a bug and propagates.

Example::

    from langchain_moondream import MoondreamCountTool
    from moondream_tools import AsyncMoondream, VisionTools

    vision = VisionTools(AsyncMoondream())          # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
    vision.add_image("crowd.jpg")                   # -> "img_1"
    count = MoondreamCountTool(vision=vision)
    message = await count.ainvoke(
        {"type": "tool_call", "id": "1", "name": "count_objects",
         "args": {"image": "img_1", "object": "person"}}
    )
    message.content     # 'Counted 3 "person" in img_1 (1280x853 px): #1 at (212, 440) left, ...'
    message.artifact    # CountResult(count=3, points=..., ...)
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.messages.content import create_image_block, create_text_block
from langchain_core.tools import ArgsSchema, BaseTool, ToolException
from moondream_tools import (
    TOOL_SPECS,
    MoondreamError,
    ToolArgumentsError,
    ToolResult,
    ToolSpec,
    VisionTools,
    tool_error_text,
)
from moondream_tools.tools import VISION_OPTIONS
from pydantic import BaseModel, ValidationError, model_validator

__all__ = [
    "MoondreamBaseTool",
    "MoondreamDescribeTool",
    "MoondreamCountTool",
    "MoondreamLocateTool",
    "MoondreamSegmentTool",
    "TOOL_CLASSES",
]

def build_vision(model: type[BaseModel], data: Any) -> Any:
    """Fill ``data["vision"]`` of a tool or toolkit from its keywords, refusing unknown ones.

    ``vision`` (a shared :class:`VisionTools`), or the options of
    :meth:`VisionTools.from_options` (``backend``, ``segment_backend``, ``image_policy``,
    ``return_images``, ``max_objects``), not both. A keyword that is neither one of these nor
    a field of ``model`` is a ``TypeError`` naming the accepted ones (pydantic would
    silently drop it, and with it, say, a misspelt image policy).
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    unknown = [key for key in data if key not in model.model_fields and key not in VISION_OPTIONS]
    if unknown:
        accepted = sorted(set(model.model_fields) | set(VISION_OPTIONS))
        raise TypeError(
            f"{model.__name__} got unknown argument(s) {', '.join(map(repr, unknown))};"
            f" accepted: {', '.join(accepted)}"
        )
    options = {key: data.pop(key) for key in VISION_OPTIONS if key in data}
    data["vision"] = VisionTools.from_options(vision=data.get("vision"), owner=model.__name__, **options)
    return data


def _invalid_arguments_text(tool: str, exc: ValidationError) -> str:
    """What the agent reads when LangChain rejects its arguments (same wording as the core)."""
    return tool_error_text(ToolArgumentsError.from_validation(tool, exc))


class MoondreamBaseTool(BaseTool):
    """Common base of the Moondream tools: runs ``spec`` on a shared :class:`VisionTools`.

    Construct with ``vision=VisionTools(...)`` to share a backend and image registry between
    tools (as :class:`~langchain_moondream.MoondreamToolkit` does), or with the keywords of
    :class:`~moondream_tools.VisionTools`: ``backend=``, ``segment_backend=``,
    ``image_policy=``, ``return_images=``, ``max_objects=``; with neither, a Moondream
    client is made from ``MOONDREAM_API_KEY`` / ``MOONDREAM_BASE_URL`` (close it with
    ``await tool.vision.aclose()`` when done with async calls). Unknown keywords are a
    ``TypeError``.
    """

    spec: ClassVar[ToolSpec]

    vision: VisionTools
    """The core tools: vision backend(s), image registry and :class:`ImagePolicy`."""

    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True
    """Turn the :class:`ToolException` raised for a ``MoondreamError`` into an error ``ToolMessage``."""

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        if not hasattr(cls, "spec"):
            raise TypeError("MoondreamBaseTool is abstract; use one of the four tool classes")
        data = build_vision(cls, data)
        if isinstance(data, dict) and "handle_validation_error" not in data:
            data["handle_validation_error"] = functools.partial(_invalid_arguments_text, cls.spec.name)
        return data

    def _output(self, result: ToolResult) -> tuple[str | list[str | dict[str, Any]], ToolResult]:
        if not self.vision.return_images:
            return result.text, result
        blocks: list[str | dict[str, Any]] = [dict(create_text_block(result.text))]
        if result.annotated_png is not None:
            data = base64.b64encode(result.annotated_png).decode("ascii")
            blocks.append(dict(create_image_block(base64=data, mime_type="image/png")))
        return blocks, result

    def _run(
        self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> tuple[str | list[str | dict[str, Any]], ToolResult]:
        try:
            result = self.vision.run_sync(self.spec.name, kwargs)
        except MoondreamError as exc:
            raise ToolException(tool_error_text(exc)) from exc
        return self._output(result)

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> tuple[str | list[str | dict[str, Any]], ToolResult]:
        try:
            result = await self.vision.run(self.spec.name, kwargs)
        except MoondreamError as exc:
            raise ToolException(tool_error_text(exc)) from exc
        return self._output(result)


class MoondreamDescribeTool(MoondreamBaseTool):
    """``describe_image``: describe an image or answer a question about it.

    Arguments: ``image``, ``question?``, ``length?`` (short/normal/long), ``reasoning?``.
    The artifact is a :class:`moondream_tools.DescribeResult`.

    Example::

        tool = MoondreamDescribeTool(vision=vision)
        tool.invoke({"image": "img_1", "question": "What color is the car?"})
        # 'img_1 (1280x853 px): Red.'
    """

    spec: ClassVar[ToolSpec] = TOOL_SPECS["describe_image"]
    name: str = spec.name
    description: str = spec.description
    args_schema: ArgsSchema | None = spec.args_schema


class MoondreamCountTool(MoondreamBaseTool):
    """``count_objects``: count every instance of an object, with pixel centers.

    Arguments: ``image``, ``object``. The artifact is a :class:`moondream_tools.CountResult`
    (``count``, ``capped``, ``points``).

    Example::

        tool = MoondreamCountTool(vision=vision)
        tool.invoke({"image": "img_1", "object": "person"})
        # 'Counted 3 "person" in img_1 (1280x853 px): #1 at (212, 440) left, ...'
    """

    spec: ClassVar[ToolSpec] = TOOL_SPECS["count_objects"]
    name: str = spec.name
    description: str = spec.description
    args_schema: ArgsSchema | None = spec.args_schema


class MoondreamLocateTool(MoondreamBaseTool):
    """``locate_objects``: a pixel bounding box for every instance, in reading order.

    Arguments: ``image``, ``object``. The artifact is a :class:`moondream_tools.LocateResult`
    (``detections``).

    Example::

        tool = MoondreamLocateTool(vision=vision)
        tool.invoke({"image": "img_1", "object": "car"})
        # 'Found 2 "car" in img_1 (1280x853 px) (boxes are x_min, y_min - x_max, y_max ...'
    """

    spec: ClassVar[ToolSpec] = TOOL_SPECS["locate_objects"]
    name: str = spec.name
    description: str = spec.description
    args_schema: ArgsSchema | None = spec.args_schema


class MoondreamSegmentTool(MoondreamBaseTool):
    """``segment_object``: the exact mask of one object; area, bbox and regions.

    Arguments: ``image``, ``object``, ``point?`` ([x, y] px) / ``box?`` ([x0, y0, x1, y1] px)
    to pick one of several instances. The artifact is a
    :class:`moondream_tools.SegmentResult` (``segmentation``: mask, polygons, RLE, ...).

    Example::

        tool = MoondreamSegmentTool(vision=vision)
        tool.invoke({"image": "img_1", "object": "dog", "point": [420, 310]})
        # 'Segmented "dog" in img_1 (1280x853 px): area 52,113 px (4.8% of the image), ...'
    """

    spec: ClassVar[ToolSpec] = TOOL_SPECS["segment_object"]
    name: str = spec.name
    description: str = spec.description
    args_schema: ArgsSchema | None = spec.args_schema


#: The tool class for each tool name of :data:`moondream_tools.TOOL_SPECS`.
TOOL_CLASSES: dict[str, type[MoondreamBaseTool]] = {
    cls.spec.name: cls
    for cls in (MoondreamDescribeTool, MoondreamCountTool, MoondreamLocateTool, MoondreamSegmentTool)
}
