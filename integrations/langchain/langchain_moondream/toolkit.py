"""``MoondreamToolkit``: the four vision tools sharing one backend and one image registry."""

from __future__ import annotations

import os

from typing import Any

from langchain_core.tools import BaseTool, BaseToolkit
from moondream_tools import TOOL_SPECS, ImageInput, VisionTools
from pydantic import ConfigDict, Field, field_validator, model_validator

from .tools import TOOL_CLASSES, build_vision

__all__ = ["MoondreamToolkit"]


class MoondreamToolkit(BaseToolkit):
    """The Moondream vision tools for a LangChain agent, over one shared :class:`VisionTools`.

    Args:
        backend: the :class:`moondream_tools.VisionBackend` to use (e.g.
            :class:`moondream_tools.AsyncMoondream`); None creates an ``AsyncMoondream``
            from ``MOONDREAM_API_KEY`` / ``MOONDREAM_BASE_URL``, closed by :meth:`aclose`.
        segment_backend: another backend for ``segment_object`` (e.g. SAM 3); never closed here.
        image_policy: the :class:`moondream_tools.ImagePolicy` for image references written
            by the model (default: registered handles only).
        return_images: also return an annotated PNG of each result as an image content block,
            for multimodal models (several providers reject images in tool results).
        max_objects: the limit sent to the backend when counting and locating.
        image_store: the :class:`moondream_tools.ImageStore` the handles live in (default: a
            new one in memory); an on-disk store keeps them across restarts.
        tools: the names of the tools to offer (default: all four, in ``TOOL_SPECS`` order).
        vision: an existing :class:`VisionTools` instead of the five options above.

    Every tool from :meth:`get_tools` shares ``vision``: one backend, one image registry,
    one policy. Register the application's images with :meth:`add_image` and tell the model
    their names. Unknown keywords are a ``TypeError`` naming the accepted ones.

    Example:
        >>> from moondream_tools import AsyncMoondream, ImagePolicy
        >>> toolkit = MoondreamToolkit(
        ...     backend=AsyncMoondream(base_url="http://localhost:2020/v1"),
        ...     image_policy=ImagePolicy(allowed_dirs=["."]),
        ... )
        >>> toolkit.add_image(b"...jpeg bytes...", name="photo")
        'photo'
        >>> [tool.name for tool in toolkit.get_tools()]
        ['describe_image', 'count_objects', 'locate_objects', 'segment_object']
        >>> MoondreamToolkit(vision=toolkit.vision, tools=["count_objects"]).get_tools()[0].vision is toolkit.vision
        True

    With an agent::

        from langchain.agents import create_agent

        async with MoondreamToolkit() as toolkit:
            toolkit.add_image("street.jpg", name="street")
            agent = create_agent("openai:gpt-4o-mini", toolkit.get_tools())
            state = await agent.ainvoke({"messages": [("user", "How many cars are in 'street'?")]})
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    vision: VisionTools
    """The shared core tools: vision backend(s), image registry and policy."""

    tools: list[str] = Field(default_factory=lambda: list(TOOL_SPECS))
    """The names of the tools :meth:`get_tools` returns."""

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        return build_vision(cls, data)

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in TOOL_CLASSES]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; tools: {', '.join(TOOL_CLASSES)}")
        return names

    def get_tools(self) -> list[BaseTool]:
        """The selected tools, all sharing :attr:`vision`."""
        return [TOOL_CLASSES[name](vision=self.vision) for name in self.tools]

    def add_image(self, image: ImageInput, name: str | None = None) -> str:
        """Register an application image (path, bytes, PIL image, array, ...); return its handle.

        Default handles are ``img_1``, ``img_2``, ...; see :meth:`VisionTools.add_image`.
        """
        return self.vision.add_image(image, name=name)

    def add_video(self, video: str | os.PathLike[str] | bytes, name: str | None = None) -> str:
        """Register an application video (a file or its bytes); return its handle (``vid_1``,
        ...). The tools take ``time`` for it; see :meth:`VisionTools.add_video`."""
        return self.vision.add_video(video, name=name)

    def remove_image(self, name: str) -> None:
        """Forget a registered image."""
        self.vision.remove_image(name)

    @property
    def image_names(self) -> list[str]:
        """The registered handles, in registration order (tell the model about them)."""
        return self.vision.image_names

    async def aclose(self) -> None:
        """Close the backend if the toolkit created it."""
        await self.vision.aclose()

    async def __aenter__(self) -> MoondreamToolkit:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
