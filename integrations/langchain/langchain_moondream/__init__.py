"""langchain_moondream: Moondream vision tools for LangChain agents.

Four tools (``describe_image``, ``count_objects``, ``locate_objects``, ``segment_object``)
that let a text-only agent see, as thin LangChain wrappers over
:class:`moondream_tools.VisionTools`, plus :class:`MoondreamToolkit` to build them around one
shared client and image registry; and, for retrieval (RAG) over images,
:class:`MoondreamImageLoader` (a document loader: one ``Document`` per image, with its
caption, answers, text and objects found) and :class:`MoondreamImageBlobParser` (the same for
one image blob, for ``GenericLoader`` or a PDF loader's ``images_parser``); and, for images
users send to the agent, :class:`MoondreamImageMiddleware` (``create_agent`` middleware that
turns each image in the conversation into a handle for the tools; needs ``langchain``).

Example::

    from langchain.agents import create_agent
    from langchain_moondream import MoondreamToolkit

    toolkit = MoondreamToolkit()                  # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
    toolkit.add_image("street.jpg", name="street")
    agent = create_agent("openai:gpt-4o-mini", toolkit.get_tools())
    state = agent.invoke({"messages": [("user", "How many cars are in the image 'street'?")]})
"""

from importlib.metadata import PackageNotFoundError, version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("langchain-moondream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from .loaders import MoondreamImageBlobParser, MoondreamImageLoader
from .toolkit import MoondreamToolkit
from .tools import (
    TOOL_CLASSES,
    MoondreamBaseTool,
    MoondreamCountTool,
    MoondreamDescribeTool,
    MoondreamLocateTool,
    MoondreamSegmentTool,
)

if TYPE_CHECKING:
    from .middleware import MoondreamImageMiddleware


def __getattr__(name: str) -> Any:
    # The middleware needs ``langchain`` (create_agent), not only langchain-core: imported
    # on first use, so the tools and loaders work without it.
    if name == "MoondreamImageMiddleware":
        from .middleware import MoondreamImageMiddleware

        globals()[name] = MoondreamImageMiddleware
        return MoondreamImageMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "MoondreamToolkit",
    "MoondreamBaseTool",
    "MoondreamDescribeTool",
    "MoondreamCountTool",
    "MoondreamLocateTool",
    "MoondreamSegmentTool",
    "TOOL_CLASSES",
    "MoondreamImageLoader",
    "MoondreamImageBlobParser",
    "MoondreamImageMiddleware",
]
