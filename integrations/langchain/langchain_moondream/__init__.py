"""langchain_moondream: Moondream vision tools for LangChain agents.

Four tools (``describe_image``, ``count_objects``, ``locate_objects``, ``segment_object``)
that let a text-only agent see, as thin LangChain wrappers over
:class:`moondream_tools.VisionTools`, plus :class:`MoondreamToolkit` to build them around one
shared client and image registry; and, for retrieval (RAG) over images,
:class:`MoondreamImageLoader` (a document loader: one ``Document`` per image, with its
caption, answers, text and objects found) and :class:`MoondreamImageBlobParser` (the same for
one image blob, for ``GenericLoader`` or a PDF loader's ``images_parser``).

Example::

    from langchain.agents import create_agent
    from langchain_moondream import MoondreamToolkit

    toolkit = MoondreamToolkit()                  # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
    toolkit.add_image("street.jpg", name="street")
    agent = create_agent("openai:gpt-4o-mini", toolkit.get_tools())
    state = agent.invoke({"messages": [("user", "How many cars are in the image 'street'?")]})
"""

from importlib.metadata import PackageNotFoundError, version as _version

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
]
