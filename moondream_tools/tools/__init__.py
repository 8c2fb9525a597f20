"""The four agent tools: describe_image, count_objects, locate_objects, segment_object.

:class:`VisionTools` runs them on any :class:`~moondream_tools.VisionBackend` (Moondream
natively or hosted elsewhere; segmentation may go to another backend) and returns results
whose ``.text`` is what an agent reads: short, exact, in pixels of the upright image. ``TOOL_SPECS`` holds each tool's name, description and argument model;
the LangChain and LlamaIndex adapters publish exactly these, so every framework shows a
model the same tools.

Agents name images with strings, resolved under an :class:`ImagePolicy`: a handle the
application registered (``tools.add_image(img) -> "img_1"``), a path inside an allowed
directory, or (when enabled) an http(s) URL. The default policy allows registered
handles only, so a model that read a hostile page cannot make the tools open
``/etc/passwd``.

Example::

    from moondream_tools import AsyncMoondream, ImagePolicy, VisionTools

    async with AsyncMoondream() as md:
        tools = VisionTools(md, image_policy=ImagePolicy(allowed_dirs=["./photos"]))
        handle = tools.add_image("street.jpg")            # -> "img_1"
        result = await tools.count(handle, "person")
        print(result.text)   # Counted 3 "person" in img_1 (1280x853 px): #1 at (212, 440) left, ...

Submodules:

- :mod:`.specs`: the argument models, :class:`ToolSpec` and :data:`TOOL_SPECS`;
- :mod:`.texts`: the result models, the texts an agent reads and :func:`tool_error_text`;
- :mod:`.vision`: :class:`VisionTools`, :data:`VISION_OPTIONS` and :data:`DEFAULT_MAX_OBJECTS`;
- :mod:`.videos`: registered videos, asked about at a moment (``time``) or over their whole
  length (:class:`VideoTimeline`).
"""

from __future__ import annotations

from .specs import (
    TOOL_SPECS,
    CountObjectsArgs,
    DescribeImageArgs,
    LocateObjectsArgs,
    SegmentObjectArgs,
    ToolSpec,
)
from .texts import (
    CountResult,
    DescribeResult,
    LocateResult,
    SegmentResult,
    TimeSpan,
    ToolResult,
    VideoTimeline,
    tool_error_text,
)
from .attach import AttachedImage
from .vision import DEFAULT_MAX_OBJECTS, VISION_OPTIONS, VisionTools

__all__ = [
    "DEFAULT_MAX_OBJECTS",
    "VisionTools",
    "ToolSpec",
    "TOOL_SPECS",
    "ToolResult",
    "DescribeResult",
    "CountResult",
    "LocateResult",
    "SegmentResult",
    "VideoTimeline",
    "TimeSpan",
    "DescribeImageArgs",
    "CountObjectsArgs",
    "LocateObjectsArgs",
    "SegmentObjectArgs",
    "tool_error_text",
    "VISION_OPTIONS",
    "AttachedImage",
]
