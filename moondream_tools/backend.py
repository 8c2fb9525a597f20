"""The :class:`VisionBackend` protocol: what tools, adapters, loaders and the CLI need of a backend.

Every backend (:class:`~moondream_tools.AsyncMoondream` for Moondream Cloud and Station,
and the hosted providers) speaks the same result types, so the layers above never know
which service answered. A backend says which skills it has in :attr:`VisionBackend.skills`;
asking for one it lacks raises :class:`~moondream_tools.UnsupportedSkillError`.

This module also holds the argument types and checks every backend shares
(:class:`SamplingSettings`, :data:`SpatialRef`, :func:`check_spatial_refs`, ...), so each
backend validates a call the same way before it sends anything.

Example::

    from moondream_tools import AsyncMoondream, VisionBackend

    async def count_cars(backend: VisionBackend, image: str) -> int:
        points = await backend.point(image, "car", settings={"max_objects": 100})
        return len(points.points)

    async with AsyncMoondream() as md:
        assert isinstance(md, VisionBackend) and "point" in md.skills
        print(await count_cars(md, "street.jpg"))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

from ._transport import Timeout
from .errors import UnsupportedSkillError
from .images import ImageInput, ImageSettings, PreparedImage
from .results import Answer, Caption, Detections, Points, Segmentation

__all__ = [
    "SKILLS",
    "CaptionLength",
    "SamplingSettings",
    "Skill",
    "SpatialRef",
    "VisionBackend",
    "backend_name",
    "check_length",
    "check_object",
    "check_question",
    "check_settings",
    "check_spatial_refs",
    "require_skill",
]

Skill = Literal["caption", "query", "detect", "point", "segment", "chat"]
#: Every skill a backend may have. "chat" (several images in one question) is optional: a
#: backend that lists it has an OpenAI-shaped ``chat(messages, *, reasoning=None, ...)``.
SKILLS: frozenset[str] = frozenset({"caption", "query", "detect", "point", "segment", "chat"})

SpatialRef = Sequence[float]
"""A normalized point ``[x, y]`` or box ``[x_min, y_min, x_max, y_max]``, each in [0, 1]."""

CaptionLength = Literal["short", "normal", "long"]


class SamplingSettings(TypedDict, total=False):
    """Sampling settings of a skill call (Moondream sends them as the nested ``settings``).

    Example::

        await md.detect("street.jpg", "car", settings={"max_objects": 100, "temperature": 0})
    """

    temperature: float
    top_p: float
    max_tokens: int
    max_objects: int


@runtime_checkable
class VisionBackend(Protocol):
    """A vision service the tools can use: five skills over prepared images.

    Arguments after the primary ones (image, then question / object / length) are
    keyword-only. Every skill takes ``timeout=`` and ``max_retries=`` for one call, and an
    image as any :data:`~moondream_tools.images.ImageInput` or a
    :class:`~moondream_tools.PreparedImage` from :meth:`prepare` (sent without re-encoding).
    A skill not in :attr:`skills` raises :class:`~moondream_tools.UnsupportedSkillError`.

    Example::

        backend: VisionBackend = AsyncMoondream()
        prepared = await backend.prepare("street.jpg")
        if "segment" in backend.skills:
            mask = await backend.segment(prepared, "car", spatial_refs=[[0.4, 0.6]])
    """

    #: The skills this backend has, a subset of :data:`SKILLS`.
    skills: frozenset[str]
    #: How this backend reads and encodes images (an agent's ImagePolicy tightens the limits).
    image_settings: ImageSettings

    async def prepare(self, image: ImageInput, *, settings: ImageSettings | None = None) -> PreparedImage:
        """Decode, orient and encode an image once, to send it in several calls."""
        ...

    async def caption(
        self,
        image: ImageInput,
        length: CaptionLength = "normal",
        *,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Caption:
        """Describe an image."""
        ...

    async def query(
        self,
        image: ImageInput | None,
        question: str,
        *,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Answer:
        """Answer a question about an image."""
        ...

    async def detect(
        self,
        image: ImageInput,
        object: str,
        *,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Detections:
        """Bounding boxes of every instance of ``object``."""
        ...

    async def point(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Points:
        """A center point for every instance of ``object``."""
        ...

    async def segment(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Segmentation:
        """The mask of ``object`` (``spatial_refs`` pick one of several)."""
        ...

    async def aclose(self) -> None:
        """Release the backend's connections."""
        ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


def backend_name(backend: object) -> str:
    """The name errors use for a backend: its class name.

    >>> backend_name(object())
    'object'
    """
    return type(backend).__name__


def require_skill(backend: VisionBackend, skill: str) -> None:
    """Raise :class:`~moondream_tools.UnsupportedSkillError` unless ``backend`` has ``skill``."""
    if skill not in backend.skills:
        raise UnsupportedSkillError(skill, backend_name(backend), backend.skills)


def check_length(length: str) -> None:
    """Refuse a caption length other than short, normal or long."""
    if length not in ("short", "normal", "long"):
        raise ValueError(f"length must be 'short', 'normal' or 'long', got {length!r}")


def check_object(obj: str) -> None:
    """Refuse an empty object phrase."""
    if not isinstance(obj, str) or not obj.strip():
        raise ValueError("object must be a non-empty string, e.g. 'car' or 'red circle'")


def check_question(question: str) -> None:
    """Refuse an empty question."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")


def check_spatial_refs(refs: Sequence[SpatialRef] | None) -> list[list[float]] | None:
    """Spatial refs as lists of floats, each a normalized point or box; None stays None.

    >>> check_spatial_refs([(0.5, 0.5), [0.1, 0.2, 0.3, 0.4]])
    [[0.5, 0.5], [0.1, 0.2, 0.3, 0.4]]
    """
    if refs is None:
        return None
    out: list[list[float]] = []
    for ref in refs:
        values = [float(v) for v in ref]
        if len(values) not in (2, 4) or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(
                "each spatial ref must be a normalized point [x, y] or box"
                f" [x_min, y_min, x_max, y_max] with values in [0, 1], got {list(ref)!r}"
            )
        out.append(values)
    return out


def check_settings(settings: SamplingSettings | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Sampling settings as a plain dict; None stays None."""
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a mapping, got {type(settings).__name__}")
    return dict(settings)
