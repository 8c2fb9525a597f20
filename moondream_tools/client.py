"""AsyncMoondream: a typed async client for the Moondream API on aiohttp.

It speaks exactly the wire format of the official ``moondream`` Python client (same
routes, headers and JSON keys) against Moondream Cloud, Moondream Station or any server
speaking the same API, and adds what an async application needs: one pooled session,
timeouts, retries with backoff, typed errors and async streaming.

Example::

    from moondream_tools import AsyncMoondream

    async with AsyncMoondream() as md:          # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
        caption = await md.caption("photo.jpg", length="short")
        boxes = await md.detect("photo.jpg", "car")
        for box in boxes.to_pixels():
            print(box)
        async for piece in md.stream_caption("photo.jpg"):
            print(piece, end="")
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypedDict, TypeVar

import aiohttp

from . import __version__
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InternalServerError,
    MoondreamError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseError,
)
from .images import ImageCache, ImageInput, ImageSettings, PreparedImage, prepare_image
from .results import (
    Answer,
    Box,
    Caption,
    ChatResult,
    Detections,
    ImageSize,
    ModelInfo,
    Points,
    SegmentBBoxEvent,
    SegmentEvent,
    SegmentFinalEvent,
    Segmentation,
    SegmentPathDeltaEvent,
    parse_result,
)

__all__ = [
    "AsyncMoondream",
    "run_sync",
    "Timeout",
    "Settings",
    "SpatialRef",
    "Stream",
    "DEFAULT_BASE_URL",
    "RETRY_STATUSES",
]

logger = logging.getLogger("moondream_tools")

DEFAULT_BASE_URL = "https://api.moondream.ai/v1"
#: Hosts that are Moondream Cloud and therefore need an API key.
_CLOUD_HOSTS = frozenset({"api.moondream.ai"})
#: HTTP statuses retried with backoff (plus connection errors and timeouts).
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
DEFAULT_CHAT_MODEL = "moondream3-preview"
DEFAULT_MAX_CONCURRENCY = 8
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
_ERROR_BODY_CHARS = 500
#: Indirection so tests can record backoff delays instead of waiting them out.
_sleep = asyncio.sleep
#: Set by :func:`run_sync`: calls in this context use a session of their own.
_PRIVATE_SESSION: ContextVar[bool] = ContextVar("moondream_private_session", default=False)

SpatialRef = Sequence[float]
"""A normalized point ``[x, y]`` or box ``[x_min, y_min, x_max, y_max]``, each in [0, 1]."""

CaptionLength = Literal["short", "normal", "long"]
_AuthStyle = Literal["skill", "bearer"]
_T = TypeVar("_T")
_I = TypeVar("_I")


class Settings(TypedDict, total=False):
    """Sampling settings sent as the nested ``settings`` object of a skill request."""

    temperature: float
    top_p: float
    max_tokens: int
    max_objects: int


@dataclass(frozen=True)
class Timeout:
    """Timeouts in seconds; ``None`` disables one.

    Attributes:
        total: the whole request, from connecting to the last byte of the answer.
        connect: establishing the TCP (and TLS) connection.

    A plain float anywhere a timeout is accepted means ``Timeout(total=that)``::

        md = AsyncMoondream(timeout=Timeout(total=60, connect=5))
        await md.detect(img, "car", timeout=10)
    """

    total: float | None = 120.0
    connect: float | None = 10.0

    def _aiohttp(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.total, sock_connect=self.connect)


class Stream(Generic[_T]):
    """An async iterator over a streamed answer that closes its response when done.

    Iterate it with ``async for``; ``request_id`` is set as soon as the server sends it.
    Leaving the loop early does not read the rest: call :meth:`aclose` (or use
    ``async with``) to close the response at once.

    Example::

        async with md.stream_caption("photo.jpg") as stream:
            async for piece in stream:
                print(piece, end="")
        print(stream.request_id)
    """

    def __init__(self, open_events: Callable[[Stream[_T]], AsyncIterator[_T]]) -> None:
        self.request_id: str | None = None
        self.completed = False
        self._iterator = open_events(self)

    def __aiter__(self) -> Stream[_T]:
        return self

    async def __anext__(self) -> _T:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Stop streaming and close the HTTP response."""
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> Stream[_T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Limiter:
    """Concurrency limit (per event loop) plus request pacing shared across loops.

    Pacing is a token bucket of capacity one (virtual scheduling): each request takes
    the next free slot ``1 / requests_per_second`` after the previous one. ``pause``
    pushes every future slot back, which is how a 429 slows down the whole client.
    """

    def __init__(self, max_concurrency: int | None, requests_per_second: float | None) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1, or None for no limit")
        if requests_per_second is not None and not requests_per_second > 0:
            raise ValueError("requests_per_second must be positive, or None for no pacing")
        self.max_concurrency = max_concurrency
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _semaphore(self) -> asyncio.Semaphore | None:
        if self.max_concurrency is None:
            return None
        loop = asyncio.get_running_loop()
        with self._lock:
            semaphore = self._semaphores.get(loop)
            if semaphore is None:
                semaphore = self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return semaphore

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def _wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._paused_until, self._next_slot)
            if self.interval:
                self._next_slot = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        semaphore = self._semaphore()
        if semaphore is None:
            await self._wait_turn()
            yield
            return
        async with semaphore:
            await self._wait_turn()
            yield


@dataclass(frozen=True)
class _CallOptions:
    model: str | None
    timeout: Timeout
    max_retries: int


def _as_timeout(value: float | Timeout | None, default: Timeout) -> Timeout:
    if value is None:
        return default
    if isinstance(value, Timeout):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return Timeout(total=float(value), connect=default.connect)
    raise ValueError(f"timeout must be a positive number of seconds or a Timeout, got {value!r}")


def _check_length(length: str) -> None:
    if length not in ("short", "normal", "long"):
        raise ValueError(f"length must be 'short', 'normal' or 'long', got {length!r}")


def _spatial_refs(refs: Sequence[SpatialRef] | None) -> list[list[float]] | None:
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


def _settings(settings: Settings | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a mapping, got {type(settings).__name__}")
    return dict(settings)


def _parse_retry_after(value: str | None, cap: float) -> float | None:
    """``Retry-After`` as seconds (number or HTTP date), capped; None when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


class AsyncMoondream:
    """Async client for Moondream Cloud, Moondream Station or any server with the same API.

    Configuration is taken from the arguments, then the environment
    (``MOONDREAM_API_KEY``, ``MOONDREAM_BASE_URL``), then the default cloud URL
    ``https://api.moondream.ai/v1``. Moondream Cloud needs a key; a local server such as
    Moondream Station (``http://localhost:2020/v1``) does not.

    Args:
        api_key: the Moondream API key. Never shown in ``repr``, errors or logs.
        base_url: the API root, e.g. ``http://localhost:2020/v1``.
        model: sent as the ``model`` body field on every call unless a call overrides it
            (finetunes look like ``moondream3-preview/<id>@<step>``).
        timeout: seconds for a whole request, or a :class:`Timeout` (total and connect).
        max_retries: retries after a connection error (not a TLS failure), a timeout, a
            retryable status (408, 409, 425, 429, 500, 502, 503, 504, 520-524) or a
            Station "queue full", with exponential backoff and full jitter, honoring
            ``Retry-After``.
        max_retry_after: longest ``Retry-After`` the client will wait, in seconds.
        image_settings: how images are read and encoded (:class:`ImageSettings`).
        max_concurrency: requests of this client in flight at once (per event loop);
            None for no limit. Further calls wait their turn.
        requests_per_second: pace requests to at most this rate (a token bucket shared by
            every call of the client), so a burst of tool calls does not collect 429s.
            None for no pacing. Either way, a 429 pauses every request of the client
            for the server's ``Retry-After``.
        image_cache_bytes: size of the LRU cache of prepared images shared by every call
            on this client (0 disables it): calling several skills on one image decodes
            and encodes it once.

    Every skill method also takes ``model=``, ``timeout=`` and ``max_retries=`` for one call.
    Images may be given in any form of :data:`~moondream_tools.images.ImageInput`.

    The client opens one ``aiohttp.ClientSession`` lazily and reuses its connections;
    close it with ``await md.aclose()`` or ``async with``. Used from an event loop other
    than the one that opened its session (e.g. a framework's sync wrapper running a fresh
    loop in a worker thread), a call gets a private session closed at the end of that call.

    Example::

        async with AsyncMoondream(base_url="http://localhost:2020/v1") as md:
            answer = await md.query("photo.jpg", "How many people?")
            print(answer.answer)
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int = 2,
        max_retry_after: float = 60.0,
        max_concurrency: int | None = DEFAULT_MAX_CONCURRENCY,
        requests_per_second: float | None = None,
        image_settings: ImageSettings | None = None,
        image_cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("MOONDREAM_API_KEY")
        url = base_url if base_url is not None else os.environ.get("MOONDREAM_BASE_URL")
        url = (url or DEFAULT_BASE_URL).strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigurationError(
                f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL} or"
                f" http://localhost:2020/v1, got {url!r}"
            )
        self._api_key: str | None = key.strip() if key and key.strip() else None
        if self._api_key is None and parsed.hostname in _CLOUD_HOSTS:
            raise ConfigurationError(
                "No Moondream API key. Set the MOONDREAM_API_KEY environment variable or pass"
                " AsyncMoondream(api_key=...); keys are at https://moondream.ai/c/cloud/api-keys."
                " For a local Moondream Station, set MOONDREAM_BASE_URL=http://localhost:2020/v1"
                " (no key needed)."
            )
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = url
        self.model = model
        self.timeout = _as_timeout(timeout, Timeout())
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.image_settings = image_settings or ImageSettings()
        self.image_cache = ImageCache(image_cache_bytes)
        self._limiter = _Limiter(max_concurrency, requests_per_second)
        self._user_agent = f"moondream-tools/{__version__}"
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __repr__(self) -> str:
        return (
            f"AsyncMoondream(base_url={self.base_url!r}, model={self.model!r},"
            f" api_key={'set' if self._api_key else 'not set'})"
        )

    @property
    def max_concurrency(self) -> int | None:
        """Requests of this client in flight at once per event loop (None: no limit)."""
        return self._limiter.max_concurrency

    @property
    def has_api_key(self) -> bool:
        """Whether requests carry an API key."""
        return self._api_key is not None

    async def __aenter__(self) -> AsyncMoondream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled session and its connections. The client cannot be used after."""
        self._closed = True
        session, loop = self._session, self._session_loop
        self._session = self._session_loop = None
        if session is None or session.closed:
            return
        running = asyncio.get_running_loop()
        if loop is running:
            await session.close()
        elif loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(session.close(), loop)
            await asyncio.wrap_future(future)
        else:
            _abandon_session(session)

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300))

    @asynccontextmanager
    async def _session_scope(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The pooled session, or a private one when called from a foreign event loop."""
        if self._closed:
            raise RuntimeError("this AsyncMoondream client is closed; create a new one")
        if _PRIVATE_SESSION.get():
            # A sync wrapper runs this call on a loop of its own that dies with the call.
            async with self._new_session() as private:
                yield private
            return
        loop = asyncio.get_running_loop()
        owner = self._session_loop
        if self._session is not None and owner is loop and not self._session.closed:
            yield self._session
            return
        if self._session is None or owner is None or owner.is_closed() or self._session.closed:
            if self._session is not None:
                _abandon_session(self._session)
            self._session = self._new_session()
            self._session_loop = loop
            yield self._session
            return
        # The pool belongs to another event loop that is still alive (e.g. this call
        # comes from a sync wrapper's worker thread): use a private session for it.
        private = self._new_session()
        try:
            yield private
        finally:
            await private.close()

    # ------------------------------------------------------------------ plumbing

    def _options(
        self, model: str | None, timeout: float | Timeout | None, max_retries: int | None
    ) -> _CallOptions:
        retries = self.max_retries if max_retries is None else max_retries
        if retries < 0:
            raise ValueError("max_retries must be >= 0")
        return _CallOptions(
            model=model if model is not None else self.model,
            timeout=_as_timeout(timeout, self.timeout),
            max_retries=retries,
        )

    def _headers(self, auth: _AuthStyle, *, stream: bool = False) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": self._user_agent}
        if stream:
            headers["Accept"] = "text/event-stream"
        if self._api_key:
            if auth == "skill":
                headers["X-Moondream-Auth"] = self._api_key
            else:
                headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[redacted]")
        return text

    async def prepare(self, image: ImageInput, *, settings: ImageSettings | None = None) -> PreparedImage:
        """Decode, orient and encode an image once, to send it in several calls.

        ``settings`` overrides the client's :class:`ImageSettings` for this image (e.g.
        tighter limits for images named by an agent).

        Example::

            prepared = await md.prepare("photo.jpg")
            cars = await md.detect(prepared, "car")
            people = await md.point(prepared, "person")
        """
        settings = settings or self.image_settings
        cache = self.image_cache
        if isinstance(image, str) and image[:8].lower().startswith(("http://", "https://")):
            async with self._session_scope() as session:
                return await prepare_image(image, settings=settings, session=session, cache=cache)
        return await prepare_image(image, settings=settings, cache=cache)

    def _retry_delay(self, error: MoondreamError, attempt: int, options: _CallOptions) -> float | None:
        """Seconds to wait before retrying after ``error``, or None to give up."""
        if attempt >= options.max_retries or getattr(error, "_retryable", True) is False:
            return None
        if isinstance(error, APIStatusError):
            retryable = error.status_code in RETRY_STATUSES or isinstance(error, RateLimitError)
            if not retryable:
                return None
        elif not isinstance(error, APIConnectionError):
            return None
        retry_after = getattr(error, "_retry_after", None)
        delay = (
            retry_after
            if retry_after is not None
            else random.uniform(0.0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
        )
        if isinstance(error, RateLimitError):
            # Back off for everyone: every request of this client waits, not just this one.
            self._limiter.pause(delay if retry_after is not None else _BACKOFF_BASE * 2**attempt)
        return delay

    def _status_error(
        self, route: str, status: int, body: Any, request_id: str | None, retry_after: float | None
    ) -> APIStatusError:
        # Redact before anything is cut short, so no fragment of the key survives a cut.
        body = _redact_body(body, self._redact)
        if isinstance(body, str):
            body = body[:_ERROR_BODY_CHARS]
        server_message = _error_message(body)
        detail = f": {server_message}" if server_message else ""
        cls: type[APIStatusError]
        if status in (400, 422):
            cls, hint = (
                BadRequestError,
                "The server rejected the request: check the arguments (image, object, settings, model).",
            )
        elif status == 401:
            cls, hint = (
                AuthenticationError,
                "Check the API key: set MOONDREAM_API_KEY or pass AsyncMoondream(api_key=...).",
            )
        elif status == 403:
            cls, hint = (
                PermissionDeniedError,
                "The API key may not do this: check its plan and permissions in the Moondream console.",
            )
        elif status == 404:
            cls, hint = (
                NotFoundError,
                f"Check base_url ({self.base_url}) and the model name.",
            )
        elif status == 429:
            cls, hint = RateLimitError, "Too many requests: slow down or retry later."
        elif status >= 500:
            cls, hint = InternalServerError, "The server failed; retry later."
        else:
            cls, hint = APIStatusError, ""
        message = f"HTTP {status} from {route}{detail}. {hint}".strip()
        error = cls(message, status_code=status, body=body, request_id=request_id)
        error._retry_after = retry_after  # type: ignore[attr-defined]
        return error

    def _station_error(self, route: str, body: dict[str, Any], request_id: str | None) -> MoondreamError:
        """Map Moondream Station's HTTP-200 ``{"error": ...}`` answers to typed errors."""
        body = _redact_body(body, self._redact)
        text = _error_message(body) or "unknown error"
        lowered = text.lower()
        message = f"{route} failed on the server (HTTP 200 with an error): {text}."
        if "queue" in lowered or "busy" in lowered or "rate" in lowered:
            return RateLimitError(
                message + " The server is busy: slow down (max_concurrency=, requests_per_second=) or retry later.",
                status_code=200, body=body, request_id=request_id,
            )
        if "timed out" in lowered or "timeout" in lowered:
            return APITimeoutError(message + " The server gave up on this request: retry, or raise the server's timeout.")
        if "not available" in lowered or "not found" in lowered or "unknown" in lowered or "not supported" in lowered:
            return NotFoundError(
                message + " This server does not offer that skill or model: check model= and the server's skills.",
                status_code=200, body=body, request_id=request_id,
            )
        return APIStatusError(
            message + " Retry later, or check the server's logs.", status_code=200, body=body, request_id=request_id
        )

    async def _request_json(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None,
        auth: _AuthStyle,
        options: _CallOptions,
    ) -> tuple[dict[str, Any], str | None]:
        """Send a request with retries; return the JSON object and the request id."""
        url = self.base_url + route
        payload = json.dumps(body).encode() if body is not None else None
        headers = self._headers(auth)
        attempt = 0
        while True:
            try:
                return await self._attempt_json(method, route, url, payload, headers, options)
            except MoondreamError as error:
                delay = self._retry_delay(error, attempt, options)
                if delay is None:
                    raise
                logger.info("retrying %s %s in %.2f s after: %s", method, route, delay, error)
                attempt += 1
                await _sleep(delay)

    async def _attempt_json(
        self,
        method: str,
        route: str,
        url: str,
        payload: bytes | None,
        headers: dict[str, str],
        options: _CallOptions,
    ) -> tuple[dict[str, Any], str | None]:
        logger.debug("%s %s (%d bytes)", method, route, len(payload or b""))
        try:
            async with self._limiter.slot(), self._session_scope() as session:
                async with session.request(
                    method, url, data=payload, headers=headers, timeout=options.timeout._aiohttp()
                ) as resp:
                    raw = await resp.read()
                    request_id = resp.headers.get("X-Request-Id")
                    status = resp.status
                    retry_after = _parse_retry_after(resp.headers.get("Retry-After"), self.max_retry_after)
                    content_type = resp.content_type
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._connection_error(route, exc, options) from None
        data = _decode_json(raw)
        if isinstance(data, dict) and isinstance(data.get("request_id"), str):
            request_id = data["request_id"]
        if status >= 400:
            body = data if data is not _INVALID else _body_text(raw, content_type)
            raise self._status_error(route, status, body, request_id, retry_after)
        if data is _INVALID:
            raise ResponseError(
                f"{route}: the server's answer is not valid JSON"
                f" (HTTP {status}, {len(raw)} bytes, content type {content_type!r})",
                request_id=request_id,
            )
        if not isinstance(data, dict):
            raise ResponseError(
                f"{route}: expected a JSON object, got {type(data).__name__}", request_id=request_id
            )
        if data.get("error"):
            raise self._station_error(route, data, request_id)
        return data, request_id

    def _connection_error(self, route: str, exc: BaseException, options: _CallOptions) -> APIConnectionError:
        if isinstance(exc, TimeoutError):
            limit = options.timeout.total
            return APITimeoutError(
                f"{route}: no answer from {self.base_url} within the timeout"
                f" ({limit} s total, {options.timeout.connect} s connect)."
                " Raise timeout= or check that the server is up."
            )
        reason = self._redact(str(exc) or type(exc).__name__)
        if isinstance(exc, aiohttp.ClientSSLError):
            error = APIConnectionError(
                f"{route}: the TLS handshake with {self.base_url} failed ({type(exc).__name__}: {reason})."
                " Check that base_url uses the right scheme (http:// for a local Moondream Station)"
                " and that the server's certificate is valid. Not retried."
            )
            error._retryable = False  # type: ignore[attr-defined]
            return error
        return APIConnectionError(
            f"{route}: could not talk to {self.base_url} ({type(exc).__name__}: {reason})."
            " Check base_url and that the server is running."
        )

    def _stream(
        self,
        route: str,
        body: dict[str, Any],
        auth: _AuthStyle,
        options: _CallOptions,
        convert: Callable[[Stream[_T], dict[str, Any]], tuple[list[_T], bool]],
        prepare: Callable[[], Any] | None = None,
    ) -> Stream[_T]:
        """A :class:`Stream` over a server-sent-events answer.

        ``convert(stream, event)`` maps each JSON event to ``(items to yield, done)``.
        ``prepare`` (async) runs first, e.g. to encode the image.
        """

        async def events(stream: Stream[_T]) -> AsyncIterator[_T]:
            if prepare is not None:
                await prepare()
            url = self.base_url + route
            payload = json.dumps(body).encode()
            headers = self._headers(auth, stream=True)
            attempt = 0
            started = False
            while True:
                try:
                    sse = self._sse_events(route, url, payload, headers, options, stream)
                    async with aclosing(sse):  # closing this stream closes the response now
                        async for event in sse:
                            started = True
                            items, done = convert(stream, event)
                            for item in items:
                                yield item
                            if done:
                                stream.completed = True
                                return
                    raise ResponseError(
                        f"{route}: the stream ended before its final event", request_id=stream.request_id
                    )
                except MoondreamError as error:
                    delay = None if started else self._retry_delay(error, attempt, options)
                    if delay is None:
                        raise
                    logger.info("retrying POST %s (stream) in %.2f s after: %s", route, delay, error)
                    attempt += 1
                    await _sleep(delay)

        return Stream(events)

    async def _sse_events(
        self,
        route: str,
        url: str,
        payload: bytes,
        headers: dict[str, str],
        options: _CallOptions,
        stream: Stream[Any],
    ) -> AsyncIterator[dict[str, Any]]:
        logger.debug("POST %s (stream, %d bytes)", route, len(payload))
        try:
            async with self._limiter.slot(), self._session_scope() as session:
                async with session.post(
                    url, data=payload, headers=headers, timeout=options.timeout._aiohttp()
                ) as resp:
                    stream.request_id = resp.headers.get("X-Request-Id") or stream.request_id
                    if resp.status >= 400 or resp.content_type != "text/event-stream":
                        raw = await resp.read()
                        data = _decode_json(raw)
                        rid = data.get("request_id") if isinstance(data, dict) else None
                        rid = rid if isinstance(rid, str) else stream.request_id
                        if resp.status >= 400:
                            body = data if data is not _INVALID else _body_text(raw, resp.content_type)
                            retry_after = _parse_retry_after(
                                resp.headers.get("Retry-After"), self.max_retry_after
                            )
                            raise self._status_error(route, resp.status, body, rid, retry_after)
                        if isinstance(data, dict) and data.get("error"):
                            raise self._station_error(route, data, rid)
                        raise ResponseError(
                            f"{route}: expected a server-sent-events stream, got"
                            f" {resp.content_type!r}",
                            request_id=rid,
                        )
                    try:
                        async for line in resp.content:
                            text = line.decode("utf-8", "replace").strip()
                            if not text.startswith("data:"):
                                continue
                            data_text = text[5:].strip()
                            if data_text == "[DONE]":
                                yield {"__done__": True}
                                return
                            try:
                                event = json.loads(data_text)
                            except (ValueError, RecursionError):
                                raise ResponseError(
                                    f"{route}: malformed event in stream: {self._redact(data_text)[:80]!r}",
                                    request_id=stream.request_id,
                                ) from None
                            if not isinstance(event, dict):
                                raise ResponseError(
                                    f"{route}: stream event is not a JSON object",
                                    request_id=stream.request_id,
                                )
                            if isinstance(event.get("request_id"), str):
                                stream.request_id = event["request_id"]
                            if event.get("error"):
                                raise self._station_error(route, event, stream.request_id)
                            yield event
                    finally:
                        resp.close()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._connection_error(route, exc, options) from None

    def _body(self, options: _CallOptions, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        if options.model is not None:
            body["model"] = options.model
        return body

    async def map(
        self,
        func: Callable[[_I], Awaitable[_T]],
        items: Iterable[_I],
        *,
        concurrency: int | None = None,
    ) -> list[_T | MoondreamError]:
        """Run ``func`` on every item concurrently; results in input order.

        A :class:`MoondreamError` for one item becomes that item's result, so one bad
        image or one failed request never loses the rest of the batch; any other
        exception is a bug and propagates. At most ``concurrency`` items (default: the
        client's ``max_concurrency``) are in progress at once, which also bounds how many
        decoded images are in memory.

        Example::

            results = await md.map(lambda path: md.detect(path, "car"), paths)
            for path, result in zip(paths, results):
                if isinstance(result, MoondreamError):
                    print(path, "failed:", result)
                else:
                    print(path, len(result.objects))
        """
        todo = list(items)
        limit = concurrency or self.max_concurrency or max(1, len(todo))
        if limit < 1:
            raise ValueError("concurrency must be at least 1")
        gate = asyncio.Semaphore(limit)

        async def one(item: _I) -> _T | MoondreamError:
            async with gate:
                try:
                    return await func(item)
                except MoondreamError as error:
                    return error

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(item)) for item in todo]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return [task.result() for task in tasks]

    # ------------------------------------------------------------------ skills

    async def caption(
        self,
        image: ImageInput,
        length: CaptionLength = "normal",
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Caption:
        """Describe an image.

        Args:
            image: any :data:`~moondream_tools.images.ImageInput`.
            length: ``"short"``, ``"normal"`` or ``"long"``.
            settings: sampling settings (temperature, top_p, max_tokens).

        Example::

            result = await md.caption("photo.jpg", length="short")
            print(result.caption)
        """
        _check_length(length)
        options = self._options(model, timeout, max_retries)
        prepared = await self.prepare(image)
        body = self._body(
            options, image_url=prepared.data_url, length=length, stream=False, settings=_settings(settings)
        )
        data, rid = await self._request_json("POST", "/caption", body, "skill", options)
        return parse_result(Caption, data, what="/caption", request_id=rid, image_size=prepared.size)

    async def query(
        self,
        image: ImageInput | None,
        question: str,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Answer:
        """Ask a question about an image (or, with ``image=None``, a text-only question).

        Args:
            image: any :data:`~moondream_tools.images.ImageInput`, or None.
            question: the question.
            reasoning: ask Moondream for its grounded reasoning trace (``Answer.reasoning``).
            spatial_refs: normalized points ``[x, y]`` or boxes ``[x0, y0, x1, y1]`` the
                question refers to.
            settings: sampling settings.

        Example::

            result = await md.query("photo.jpg", "What color is the car?")
            print(result.answer)
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        options = self._options(model, timeout, max_retries)
        prepared = await self.prepare(image) if image is not None else None
        body = self._body(
            options,
            question=question,
            stream=False,
            image_url=prepared.data_url if prepared else None,
            settings=_settings(settings),
            reasoning=True if reasoning else None,
            spatial_refs=_spatial_refs(spatial_refs),
        )
        data, rid = await self._request_json("POST", "/query", body, "skill", options)
        return parse_result(
            Answer, data, what="/query", request_id=rid, image_size=prepared.size if prepared else None
        )

    async def detect(
        self,
        image: ImageInput,
        object: str,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Detections:
        """Find every instance of ``object`` and return its bounding boxes.

        Example::

            result = await md.detect("street.jpg", "car", settings={"max_objects": 100})
            print(len(result.objects), result.to_pixels()[:1])
        """
        return await self._grounding(
            "/detect", Detections, image, object, None, settings, model, timeout, max_retries
        )

    async def point(
        self,
        image: ImageInput,
        object: str,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Points:
        """Find every instance of ``object`` and return a center point for each.

        Example::

            result = await md.point("crowd.jpg", "person")
            print(len(result.points))
        """
        return await self._grounding(
            "/point", Points, image, object, spatial_refs, settings, model, timeout, max_retries
        )

    async def segment(
        self,
        image: ImageInput,
        object: str,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Segmentation:
        """Segment ``object``: an SVG path (normalized to its bbox) and the bbox.

        Example::

            result = await md.segment("street.jpg", "the red car")
            if result.found:
                print(result.bbox, result.path[:40])
        """
        return await self._grounding(
            "/segment", Segmentation, image, object, spatial_refs, settings, model, timeout,
            max_retries, stream=False,
        )

    async def _grounding(
        self,
        route: str,
        cls: type[_T],
        image: ImageInput,
        object: str,
        spatial_refs: Sequence[SpatialRef] | None,
        settings: Settings | None,
        model: str | None,
        timeout: float | Timeout | None,
        max_retries: int | None,
        **extra_fields: Any,
    ) -> _T:
        _check_object(object)
        options = self._options(model, timeout, max_retries)
        prepared = await self.prepare(image)
        body = self._body(
            options,
            image_url=await prepared.segment_payload() if route == "/segment" else prepared.data_url,
            object=object,
            **extra_fields,
            spatial_refs=_spatial_refs(spatial_refs),
            settings=_settings(settings),
        )
        data, rid = await self._request_json("POST", route, body, "skill", options)
        return parse_result(  # type: ignore[type-var]
            cls, data, what=route, request_id=rid, image_size=prepared.size, object=object
        )

    # ------------------------------------------------------------------ streams

    def stream_caption(
        self,
        image: ImageInput,
        length: CaptionLength = "normal",
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[str]:
        """Stream a caption as text chunks.

        Example::

            async for piece in md.stream_caption("photo.jpg"):
                print(piece, end="", flush=True)
        """
        _check_length(length)
        options = self._options(model, timeout, max_retries)
        body: dict[str, Any] = {}

        async def prepare() -> None:
            prepared = await self.prepare(image)
            body.update(
                self._body(options, image_url=prepared.data_url, length=length, stream=True,
                           settings=_settings(settings))
            )

        return self._stream("/caption", body, "skill", options, _text_events, prepare)

    def stream_query(
        self,
        image: ImageInput | None,
        question: str,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[str]:
        """Stream the answer to a question as text chunks.

        Example::

            async for piece in md.stream_query("photo.jpg", "What is happening?"):
                print(piece, end="", flush=True)
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        options = self._options(model, timeout, max_retries)
        refs = _spatial_refs(spatial_refs)
        body: dict[str, Any] = {}

        async def prepare() -> None:
            prepared = await self.prepare(image) if image is not None else None
            body.update(
                self._body(
                    options,
                    question=question,
                    stream=True,
                    image_url=prepared.data_url if prepared else None,
                    settings=_settings(settings),
                    reasoning=True if reasoning else None,
                    spatial_refs=refs,
                )
            )

        return self._stream("/query", body, "skill", options, _text_events, prepare)

    def stream_segment(
        self,
        image: ImageInput,
        object: str,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[SegmentEvent]:
        """Stream a segmentation: a :class:`SegmentBBoxEvent`, coarse
        :class:`SegmentPathDeltaEvent` chunks, then a :class:`SegmentFinalEvent`.

        Example::

            async for event in md.stream_segment("street.jpg", "car"):
                if event.type == "final":
                    mask = event.segmentation
        """
        _check_object(object)
        options = self._options(model, timeout, max_retries)
        refs = _spatial_refs(spatial_refs)
        body: dict[str, Any] = {}
        size: list[ImageSize] = []
        coarse: list[str] = []  # the coarse path so far
        first_bbox: list[Box] = []

        async def prepare() -> None:
            prepared = await self.prepare(image)
            size.append(prepared.size)
            body.update(
                self._body(options, image_url=await prepared.segment_payload(), object=object, stream=True,
                           spatial_refs=refs, settings=_settings(settings))
            )

        def convert(stream: Stream[SegmentEvent], event: dict[str, Any]) -> tuple[list[SegmentEvent], bool]:
            kind = event.get("type")
            rid = stream.request_id
            if kind == "bbox":
                bbox = parse_result(SegmentBBoxEvent, event, what="/segment stream", request_id=rid,
                                    image_size=size[0])
                first_bbox[:] = first_bbox or [bbox.bbox]
                return [bbox], False
            if kind == "path_delta":
                chunk = event.get("chunk")
                if not isinstance(chunk, str):
                    raise ResponseError("/segment stream: path_delta without a text chunk", request_id=rid)
                if not chunk:
                    return [], False
                coarse.append(chunk)
                partial = Segmentation(
                    path="".join(coarse), bbox=first_bbox[0] if first_bbox else None, object=object,
                    partial=True, image_size=size[0], request_id=rid,
                )
                return [SegmentPathDeltaEvent(chunk=chunk, segmentation=partial)], False
            if kind == "final":
                seg = parse_result(Segmentation, event, what="/segment stream", request_id=rid,
                                   image_size=size[0], object=object)
                return [SegmentFinalEvent(segmentation=seg)], True
            if event.get("__done__"):
                raise ResponseError("/segment stream: ended without a final event", request_id=rid)
            return [], False

        return self._stream("/segment", body, "skill", options, convert, prepare)

    # ------------------------------------------------------------------ chat & models

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        reasoning: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> ChatResult:
        """OpenAI-style chat against ``/chat/completions``.

        ``messages`` are OpenAI chat messages. Images go in as content parts: a standard
        ``{"type": "image_url", "image_url": {"url": "data:..."}}`` part is sent as is, and
        ``{"type": "image", "image": <any ImageInput>}`` is prepared and sent as a data URL.

        Example::

            result = await md.chat([
                {"role": "user", "content": [
                    {"type": "image", "image": "photo.jpg"},
                    {"type": "text", "text": "What is in this picture?"},
                ]},
            ])
            print(result.content)
        """
        options = self._options(model, timeout, max_retries)
        body = await self._chat_body(messages, reasoning, temperature, top_p, max_tokens, options, False)
        data, rid = await self._request_json("POST", "/chat/completions", body, "bearer", options)
        return _parse_chat(data, rid)

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        reasoning: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        *,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[str]:
        """Stream a chat completion as content chunks (see :meth:`chat` for ``messages``).

        Example::

            async for piece in md.stream_chat([{"role": "user", "content": "Hi"}]):
                print(piece, end="")
        """
        options = self._options(model, timeout, max_retries)
        body: dict[str, Any] = {}

        async def prepare() -> None:
            body.update(
                await self._chat_body(messages, reasoning, temperature, top_p, max_tokens, options, True)
            )

        return self._stream("/chat/completions", body, "bearer", options, _chat_events, prepare)

    async def _chat_body(
        self,
        messages: Sequence[Mapping[str, Any]],
        reasoning: bool | None,
        temperature: float | None,
        top_p: float | None,
        max_tokens: int | None,
        options: _CallOptions,
        stream: bool,
    ) -> dict[str, Any]:
        if isinstance(messages, (str, bytes)) or not messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        prepared_messages = [await self._chat_message(m) for m in messages]
        body: dict[str, Any] = {
            "model": options.model or DEFAULT_CHAT_MODEL,
            "messages": prepared_messages,
            "stream": stream,
        }
        if reasoning is not None:
            body["reasoning"] = reasoning
        if temperature is not None:
            body["temperature"] = temperature
        if top_p is not None:
            body["top_p"] = top_p
        if max_tokens is not None:
            body["max_completion_tokens"] = max_tokens
        return body

    async def _chat_message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError("each chat message must be a mapping with a 'role'")
        out = dict(message)
        content = out.get("content")
        if isinstance(content, list):
            parts: list[Any] = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image":
                    prepared = await self.prepare(part["image"])
                    parts.append({"type": "image_url", "image_url": {"url": prepared.data_url}})
                else:
                    parts.append(part)
            out["content"] = parts
        return out

    async def models(
        self, *, timeout: float | Timeout | None = None, max_retries: int | None = None
    ) -> list[ModelInfo]:
        """The models the server offers (``GET /models``, OpenAI list format).

        Example::

            for info in await md.models():
                print(info.id)
        """
        options = self._options(None, timeout, max_retries)
        data, rid = await self._request_json("GET", "/models", None, "bearer", options)
        items = data.get("data", data.get("models"))
        if not isinstance(items, list):
            raise ResponseError("/models: expected a 'data' list of models", request_id=rid)
        result: list[ModelInfo] = []
        for item in items:
            entry = {"id": item} if isinstance(item, str) else item
            result.append(parse_result(ModelInfo, entry, what="/models", request_id=rid))
        return result


def run_sync(call: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run an async client call from synchronous code and return its result.

    With no event loop running in this thread, the call runs here on a fresh loop;
    inside a running loop (a notebook, an async framework calling a sync tool), it runs
    on a fresh loop in a worker thread, so the running loop is never blocked re-entrantly.
    Either way the call uses an HTTP session of its own, closed before this returns, so a
    client shared with async code is never tied to a loop that is about to end.

    Example::

        md = AsyncMoondream()
        caption = run_sync(lambda: md.caption("photo.jpg"))
    """

    def run() -> _T:
        token = _PRIVATE_SESSION.set(True)
        try:
            return asyncio.run(call())
        finally:
            _PRIVATE_SESSION.reset(token)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moondream-sync") as pool:
        return pool.submit(run).result()


# ---------------------------------------------------------------------- helpers


class _Invalid:
    pass


_INVALID: Any = _Invalid()


def _decode_json(raw: bytes) -> Any:
    if not raw:
        return _INVALID
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return _INVALID


def _body_text(raw: bytes, content_type: str) -> str:
    """A non-JSON error body as text (cut to length only after redaction, by the caller)."""
    if "html" in content_type:
        return f"(an HTML page of {len(raw)} bytes, probably from a proxy)"
    return raw[:65536].decode("utf-8", "replace")


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or json.dumps(value)[:_ERROR_BODY_CHARS]
            if value:
                return str(value)[:_ERROR_BODY_CHARS]
        return ""
    if isinstance(body, str):
        return body.strip()[:_ERROR_BODY_CHARS]
    return ""


def _redact_body(body: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(body, str):
        return redact(body)
    if isinstance(body, dict):
        return json.loads(redact(json.dumps(body)))
    return body


def _check_object(obj: str) -> None:
    if not isinstance(obj, str) or not obj.strip():
        raise ValueError("object must be a non-empty string, e.g. 'car' or 'red circle'")


def _text_events(stream: Stream[str], event: dict[str, Any]) -> tuple[list[str], bool]:
    """Caption/query events: ``{"chunk": ...}`` (or ``"text"``) then ``{"completed": true}``."""
    piece = event.get("chunk", event.get("text"))
    items = [piece] if isinstance(piece, str) and piece else []
    return items, bool(event.get("__done__") or event.get("completed"))


def _chat_events(stream: Stream[str], event: dict[str, Any]) -> tuple[list[str], bool]:
    """OpenAI chat chunks: ``choices[0].delta.content`` pieces, then ``[DONE]``."""
    if event.get("__done__"):
        return [], True
    if isinstance(event.get("id"), str) and stream.request_id is None:
        stream.request_id = event["id"]
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return [], False
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return ([content] if isinstance(content, str) and content else []), False


def _parse_chat(data: dict[str, Any], request_id: str | None) -> ChatResult:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ResponseError("/chat/completions: the answer has no choices", request_id=request_id)
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ResponseError("/chat/completions: the first choice has no message", request_id=request_id)
    return parse_result(
        ChatResult,
        {
            "content": message.get("content") or "",
            "reasoning": message.get("reasoning"),
            "finish_reason": choices[0].get("finish_reason"),
            "model": data.get("model"),
            "usage": data.get("usage"),
        },
        what="/chat/completions",
        request_id=request_id or (data.get("id") if isinstance(data.get("id"), str) else None),
    )


def _abandon_session(session: aiohttp.ClientSession) -> None:
    """Drop a session whose event loop is gone, closing its sockets without that loop.

    A session's connections belong to the loop that opened them; once that loop is
    closed they cannot be closed the normal way. Close the sockets directly so nothing
    leaks (and no ResourceWarning fires when they are garbage-collected).
    """
    connector = session.connector
    session.detach()
    if connector is None:
        return
    protocols: list[Any] = []
    for entries in getattr(connector, "_conns", {}).values():
        protocols.extend(proto for proto, _ in entries)
    protocols.extend(getattr(connector, "_acquired", ()))
    for proto in protocols:
        transport = getattr(proto, "transport", None)
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            try:
                sock.close()
            finally:
                transport._sock = None
    try:
        connector._close()
    except RuntimeError:  # pragma: no cover - loop already gone
        pass
