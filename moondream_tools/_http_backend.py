"""``HttpBackend``: what every backend over HTTP shares, whatever service it speaks.

Configuration (the key from an argument or an environment variable, the base URL), the
transport (session scope, limits, retries, typed errors, redaction), the prepared-image
cache, ``prepare``, closing, and the default for a skill the service lacks
(:class:`~moondream_tools.UnsupportedSkillError`). A backend subclass brings its routes,
auth headers, body mapping and :class:`~moondream_tools._transport.ServiceProfile`.

Example::

    class MyBackend(HttpBackend):
        skills = frozenset({"caption"})
        KEY_ENV = "MY_KEY"
        DEFAULT_BASE_URL = "https://api.example.com/v1"
        PROFILE = ServiceProfile("Example", auth_hint="Set MY_KEY.")

        async def caption(self, image, length="normal", **options): ...
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from typing import Any, ClassVar

import aiohttp

from ._transport import DEFAULT_MAX_CONCURRENCY, Limiter, Redactor, ServiceProfile, SessionScope, Timeout, Transport, as_timeout
from .backend import CaptionLength, SamplingSettings, SpatialRef, backend_name
from .errors import ConfigurationError, UnsupportedSkillError
from .images import ImageCache, ImageInput, ImageSettings, PreparedImage, ReferenceKind, prepare_image, reference_kind
from .results import Answer, Caption, Detections, Points, Segmentation

__all__ = ["HttpBackend"]


class HttpBackend:
    """The shared base of the HTTP backends (see the module docstring).

    Subclasses set :attr:`skills`, :attr:`KEY_ENV`, :attr:`DEFAULT_BASE_URL` and
    :attr:`PROFILE`, and may set :attr:`BASE_URL_ENV` and override :meth:`_key_required`.
    """

    #: The skills this backend has.
    skills: frozenset[str] = frozenset()
    #: The environment variable the key comes from when ``api_key`` is not given.
    KEY_ENV: ClassVar[str]
    #: The environment variable the base URL comes from, if any.
    BASE_URL_ENV: ClassVar[str | None] = None
    DEFAULT_BASE_URL: ClassVar[str]
    PROFILE: ClassVar[ServiceProfile]
    #: Further origins requests may go to by absolute URL (e.g. a queue host).
    _other_origins: Sequence[str] = ()

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int = 2,
        max_retry_after: float = 60.0,
        max_concurrency: int | None = DEFAULT_MAX_CONCURRENCY,
        requests_per_second: float | None = None,
        image_settings: ImageSettings | None = None,
        image_cache_bytes: int = 64 * 1024 * 1024,
        trust_env: bool = False,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(self.KEY_ENV)
        url = base_url
        if url is None and self.BASE_URL_ENV is not None:
            url = os.environ.get(self.BASE_URL_ENV)
        url = (url or self.DEFAULT_BASE_URL).strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigurationError(
                f"base_url must be an http(s) URL such as {self.DEFAULT_BASE_URL}, got {url!r}"
            )
        self._api_key: str | None = key.strip() if key and key.strip() else None
        if self._api_key is None and self._key_required(parsed.hostname):
            raise ConfigurationError(self._missing_key_message())
        self.image_settings = image_settings or ImageSettings()
        self.image_cache = ImageCache(image_cache_bytes)
        self._transport = Transport(
            base_url=url,
            profile=self.PROFILE,
            redactor=Redactor(self._api_key),
            timeout=as_timeout(timeout, Timeout()),
            max_retries=max_retries,
            max_retry_after=max_retry_after,
            limiter=Limiter(max_concurrency, requests_per_second),
            sessions=SessionScope(trust_env=trust_env, http_session=http_session),
            other_origins=frozenset(self._other_origins),
        )

    # ------------------------------------------------------------------ configuration

    def _key_required(self, host: str) -> bool:
        """Whether a server at ``host`` needs a key (default: always)."""
        return True

    def _missing_key_message(self) -> str:
        return (
            f"No {self.PROFILE.name} API key. Set the {self.KEY_ENV} environment variable or pass"
            f" {type(self).__name__}(api_key=...)."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={'set' if self._api_key else 'not set'})"

    @property
    def base_url(self) -> str:
        """The API root every route is appended to (settable)."""
        return self._transport.base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        self._transport.base_url = value.strip().rstrip("/")

    @property
    def timeout(self) -> Timeout:
        """The default timeout of every call (settable: seconds or a :class:`Timeout`)."""
        return self._transport.timeout

    @timeout.setter
    def timeout(self, value: float | Timeout) -> None:
        self._transport.timeout = as_timeout(value, self._transport.timeout)

    @property
    def max_retries(self) -> int:
        """The default number of retries of every call (settable)."""
        return self._transport.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        if value < 0:
            raise ValueError("max_retries must be >= 0")
        self._transport.max_retries = value

    @property
    def max_retry_after(self) -> float:
        """The longest ``Retry-After`` the client waits, in seconds (settable)."""
        return self._transport.max_retry_after

    @max_retry_after.setter
    def max_retry_after(self, value: float) -> None:
        self._transport.max_retry_after = value

    @property
    def max_concurrency(self) -> int | None:
        """Requests in flight at once per event loop (None: no limit)."""
        return self._transport.limiter.max_concurrency

    @property
    def has_api_key(self) -> bool:
        """Whether requests carry an API key."""
        return self._api_key is not None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled session and its connections (never a borrowed ``http_session``).

        The backend cannot be used after.
        """
        await self._transport.aclose()

    async def prepare(self, image: ImageInput, *, settings: ImageSettings | None = None) -> PreparedImage:
        """Decode, orient and encode an image once, to send it in several calls.

        ``settings`` overrides the backend's :class:`ImageSettings` for this image (e.g.
        tighter limits for images named by an agent).

        Example::

            prepared = await backend.prepare("photo.jpg")
            cars = await backend.detect(prepared, "car")
            people = await backend.point(prepared, "person")
        """
        settings = settings or self.image_settings
        if isinstance(image, str) and reference_kind(image) is ReferenceKind.URL:
            async with self._transport.sessions.session() as session:
                return await prepare_image(image, settings=settings, session=session, cache=self.image_cache)
        return await prepare_image(image, settings=settings, cache=self.image_cache)

    # ------------------------------------------------------------------ skills it may lack

    def _lacks(self, skill: str) -> UnsupportedSkillError:
        return UnsupportedSkillError(skill, backend_name(self), self.skills)

    async def caption(
        self, image: ImageInput, length: CaptionLength = "normal", *, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Caption:
        """Describe an image (raises :class:`UnsupportedSkillError` on a backend without it)."""
        raise self._lacks("caption")

    async def query(
        self, image: ImageInput | None, question: str, *, reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Answer:
        """Answer a question (raises :class:`UnsupportedSkillError` on a backend without it)."""
        raise self._lacks("query")

    async def detect(
        self, image: ImageInput, object: str, *, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Detections:
        """Boxes of ``object`` (raises :class:`UnsupportedSkillError` on a backend without it)."""
        raise self._lacks("detect")

    async def point(
        self, image: ImageInput, object: str, *, spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None, timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Points:
        """Points of ``object`` (raises :class:`UnsupportedSkillError` on a backend without it)."""
        raise self._lacks("point")

    async def segment(
        self, image: ImageInput, object: str, *, spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None, timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Segmentation:
        """The mask of ``object`` (raises :class:`UnsupportedSkillError` on a backend without it)."""
        raise self._lacks("segment")
