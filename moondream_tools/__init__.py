"""moondream_tools: async vision tools that let text-only agents see, powered by Moondream.

Example::

    from moondream_tools import AsyncMoondream

    async with AsyncMoondream() as md:          # MOONDREAM_API_KEY, MOONDREAM_BASE_URL
        caption = await md.caption("photo.jpg", length="short")
        boxes = await md.detect("photo.jpg", "car")
        print(caption.caption, [b for b in boxes.to_pixels()])
"""

import logging as _logging

from ._streaming import Stream
from ._transport import Timeout, iterate_sync, run_sync
from ._version import __version__
from .backend import SKILLS, CaptionLength, SamplingSettings, SpatialRef, VisionBackend
from .client import DEFAULT_BASE_URL, AsyncMoondream
from .batch import BatchInfo, BatchProgress, BatchResult, MoondreamBatch
from .providers import AIGatewaySegmenter, FalMoondream, FalSam3
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ImageError,
    InternalServerError,
    MoondreamError,
    NotFoundError,
    PermissionDeniedError,
    InsufficientCreditsError,
    RateLimitError,
    ResponseError,
    ToolArgumentsError,
    ImageAccessError,
    UnsupportedSkillError,
    BatchError,
    BatchExpiredError,
    BatchFailedError,
    BatchItemError,
)
from .images import ImageInput, ImageSettings, PreparedImage
from .render import annotate, annotate_png
from .policy import ImagePolicy
from .result_cache import CachedBackend, ResultCache
from .image_store import ImageStore
from .backend_config import BackendConfig
from .tools import (
    AttachedImage,
    DEFAULT_MAX_OBJECTS,
    TOOL_SPECS,
    CountResult,
    DescribeResult,
    LocateResult,
    SegmentResult,
    TimeSpan,
    ToolResult,
    ToolSpec,
    VideoTimeline,
    VisionTools,
    tool_error_text,
)
from .results import (
    Answer,
    Box,
    Caption,
    ChatResult,
    Detections,
    GroundingSpan,
    ImageSize,
    ModelInfo,
    PixelBox,
    PixelPoint,
    Point,
    Points,
    Reasoning,
    SegmentBBoxEvent,
    SegmentEvent,
    SegmentFinalEvent,
    Segmentation,
    SegmentPathDeltaEvent,
    Usage,
)

__all__ = [
    "__version__",
    # backends
    "VisionBackend",
    "SKILLS",
    "CaptionLength",
    "SamplingSettings",
    "SpatialRef",
    "AsyncMoondream",
    "DEFAULT_BASE_URL",
    "FalMoondream",
    "FalSam3",
    "AIGatewaySegmenter",
    "Stream",
    "Timeout",
    "iterate_sync",
    "run_sync",
    # the Batch API
    "MoondreamBatch",
    "BatchResult",
    "BatchProgress",
    "BatchInfo",
    # images
    "ImageInput",
    "ImageSettings",
    "PreparedImage",
    # agent tools
    "VisionTools",
    "ResultCache",
    "ImageStore",
    "BackendConfig",
    "AttachedImage",
    "CachedBackend",
    "ImagePolicy",
    "TOOL_SPECS",
    "DEFAULT_MAX_OBJECTS",
    "ToolSpec",
    "ToolResult",
    "DescribeResult",
    "CountResult",
    "LocateResult",
    "SegmentResult",
    "VideoTimeline",
    "TimeSpan",
    "tool_error_text",
    # rendering
    "annotate",
    "annotate_png",
    # results
    "Answer",
    "Box",
    "Caption",
    "ChatResult",
    "Detections",
    "GroundingSpan",
    "ImageSize",
    "ModelInfo",
    "PixelBox",
    "PixelPoint",
    "Point",
    "Points",
    "Reasoning",
    "SegmentBBoxEvent",
    "SegmentEvent",
    "SegmentFinalEvent",
    "Segmentation",
    "SegmentPathDeltaEvent",
    "Usage",
    # errors
    "MoondreamError",
    "ConfigurationError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "InsufficientCreditsError",
    "NotFoundError",
    "RateLimitError",
    "InternalServerError",
    "ImageError",
    "ImageAccessError",
    "ResponseError",
    "UnsupportedSkillError",
    "ToolArgumentsError",
    "BatchError",
    "BatchFailedError",
    "BatchExpiredError",
    "BatchItemError",
]

# A library logs, the application decides where it goes (nothing on stderr by default).
_logging.getLogger("moondream_tools").addHandler(_logging.NullHandler())
