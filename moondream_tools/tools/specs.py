"""The tools' specs: each tool's name, description and argument model (:data:`TOOL_SPECS`).

The LangChain and LlamaIndex adapters publish exactly these, so every framework shows a
model the same tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------- specs


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


_IMAGE_FIELD = (
    "The image to look at: the name of an image the application registered (e.g. 'img_1'), "
    "a local file path inside an allowed directory, or an http(s) URL if URLs are enabled."
)
_OBJECT_FIELD = "What to look for, as a short noun phrase, e.g. 'person', 'red car', 'the left dog'."
_TIME_FIELD = (
    "Only for a registered video (e.g. 'vid_1'): the moment to look at, in seconds from its start. "
    "Needed for a video; leave empty for images."
)
_TIME_TIMELINE_FIELD = (
    "Only for a registered video (e.g. 'vid_1'): the moment to look at, in seconds from its start. "
    "Leave empty for images, and on a video to find when the object appears (time ranges)."
)


class DescribeImageArgs(_Args):
    """Arguments of ``describe_image``."""

    image: str = Field(description=_IMAGE_FIELD)
    question: str | None = Field(
        default=None,
        description="A question about the image. Leave empty to get a description instead.",
    )
    length: Literal["short", "normal", "long"] = Field(
        default="normal", description="Length of the description when no question is asked."
    )
    reasoning: bool = Field(
        default=False,
        description="Think step by step before answering and return grounded points (slower).",
    )
    more_images: list[str] | None = Field(
        default=None,
        max_length=3,
        description=(
            "Up to 3 further images to look at together with `image`, for one question about all "
            "of them (compare them, find the difference, which one shows X). Needs a question."
        ),
    )
    time: float | None = Field(default=None, ge=0, description=_TIME_FIELD)


_MORE_OBJECTS_FIELD = (
    "Up to 7 further phrases to look for in the same call, e.g. ['person', 'bicycle'] with "
    "object 'car'; the answer is grouped per phrase."
)


class CountObjectsArgs(_Args):
    """Arguments of ``count_objects``."""

    image: str = Field(description=_IMAGE_FIELD)
    object: str = Field(description=_OBJECT_FIELD)
    more_objects: list[str] | None = Field(default=None, max_length=7, description=_MORE_OBJECTS_FIELD)
    time: float | None = Field(default=None, ge=0, description=_TIME_TIMELINE_FIELD)


class LocateObjectsArgs(_Args):
    """Arguments of ``locate_objects``."""

    image: str = Field(description=_IMAGE_FIELD)
    object: str = Field(description=_OBJECT_FIELD)
    more_objects: list[str] | None = Field(default=None, max_length=7, description=_MORE_OBJECTS_FIELD)
    time: float | None = Field(default=None, ge=0, description=_TIME_TIMELINE_FIELD)


class SegmentObjectArgs(_Args):
    """Arguments of ``segment_object``."""

    image: str = Field(description=_IMAGE_FIELD)
    object: str = Field(description=_OBJECT_FIELD)
    point: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="Optional [x, y] pixel position on the object, to pick one of several.",
    )
    box: list[float] | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description="Optional [x_min, y_min, x_max, y_max] pixel box around the object.",
    )
    time: float | None = Field(default=None, ge=0, description=_TIME_FIELD)


@dataclass(frozen=True)
class ToolSpec:
    """What a framework shows a model for one tool: name, description and arguments.

    Attributes:
        name: the tool name, e.g. ``"count_objects"``.
        description: when to use the tool and what the image argument may be (< 1,024 chars).
        args_schema: the pydantic model of the arguments (with field descriptions).
        method: the :class:`VisionTools` method that runs it.
    """

    name: str
    description: str
    args_schema: type[BaseModel]
    method: str


TOOL_SPECS: Mapping[str, ToolSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ToolSpec(
                name="describe_image",
                description=(
                    "Look at an image and describe it, or answer a question about it (what is in "
                    "it, what text it shows, what color something is, what is happening). Use it "
                    "whenever you need to know what an image contains. The image argument is a "
                    "registered image name such as 'img_1', an allowed local path, or an http(s) "
                    "URL if enabled. To compare 2-4 images, ask one question with more_images. "
                    "For exact counts use count_objects; for positions use locate_objects. For a "
                    "registered video (e.g. 'vid_1') give time in seconds."
                ),
                args_schema=DescribeImageArgs,
                method="describe",
            ),
            ToolSpec(
                name="count_objects",
                description=(
                    "Count every instance of an object in an image (people in a crowd, cars in a "
                    "lot, items on a shelf) and get the pixel position of each. More reliable than "
                    "describe_image for numbers. Returns the count, the image size and each "
                    "instance's center in pixels with a position word; says 'at least N' when the "
                    "result hit the limit. The image argument is a registered image name such as "
                    "'img_1', an allowed local path, or an http(s) URL if enabled. On a registered "
                    "video (e.g. 'vid_1') give time in seconds for one moment, or none to learn when "
                    "the object appears and how many at most."
                ),
                args_schema=CountObjectsArgs,
                method="count",
            ),
            ToolSpec(
                name="locate_objects",
                description=(
                    "Find where an object is in an image: returns a bounding box in pixels (x_min, "
                    "y_min, x_max, y_max, origin top-left) for every instance, in reading order, "
                    "with a position word and normalized [0-1] coordinates. Use it to answer "
                    "'where is', to compare positions or sizes, or to get a box for "
                    "segment_object. The image argument is a registered image name such as "
                    "'img_1', an allowed local path, or an http(s) URL if enabled. On a registered "
                    "video (e.g. 'vid_1') give time in seconds for one moment, or none to learn when "
                    "the object appears."
                ),
                args_schema=LocateObjectsArgs,
                method="locate",
            ),
            ToolSpec(
                name="segment_object",
                description=(
                    "Outline one object exactly (pixel mask): returns its area in pixels and as a "
                    "percentage of the image, its bounding box in pixels and how many separate "
                    "regions it has. Use it for sizes, coverage ('how much of the image is "
                    "sky') or shapes. Give point or box (pixels, e.g. from locate_objects) to "
                    "pick one of several instances. The image argument is a registered image "
                    "name such as 'img_1', an allowed local path, or an http(s) URL if enabled. "
                    "For a registered video (e.g. 'vid_1') give time in seconds."
                ),
                args_schema=SegmentObjectArgs,
                method="segment",
            ),
        )
    }
)
