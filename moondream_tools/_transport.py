"""The one HTTP transport under every backend.

It owns, once for every service this project speaks:

- the session scope (:class:`~moondream_tools._sessions.SessionScope`, in its own module):
  one lazy ``aiohttp.ClientSession`` per transport, a private session for a call from another
  event loop or from :func:`run_sync`, an application's own session (``http_session=``,
  never closed here), proxies from the environment (``trust_env=``), and closing;
- the limits: requests in flight, requests per second, and the pause a 429 imposes on
  every request of the client (:class:`Limiter`);
- **one** request loop, used by JSON calls and streams alike (:meth:`Transport.request_json`,
  :meth:`Transport.stream`): a failure before the first byte of the answer was handed on is
  retried with backoff;
- the retry decision, a pure function of the error (its status and headers) and the attempt
  (:func:`retry_delay`);
- the mapping from HTTP status and body to a typed error (:func:`status_error`) and key
  redaction (:class:`Redactor`), both in :mod:`moondream_tools._http_errors`.

A backend brings only what is its own: routes, auth headers, body mapping and a
:class:`ServiceProfile` (how its error bodies read, what its errors advise).

Example::

    transport = Transport(base_url="http://localhost:2020/v1", profile=ServiceProfile("Moondream"))
    data, request_id = await transport.request_json("POST", "/caption", {"image_url": ...},
                                                    headers={}, options=transport.options())
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import logging
import random
import secrets
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import aiohttp

from ._http_errors import (
    INVALID,
    Redactor,
    ServiceProfile,
    body_text,
    decode_json,
    error_message,
    status_error,
)
from ._sessions import SessionScope, abandon_session, iterate_sync, run_sync
from ._streaming import Stream, decode_sse
from ._version import __version__
from .images import ReferenceKind, read_response_capped, reference_kind
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ImageError,
    MoondreamError,
    RateLimitError,
    ResponseError,
)

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "RETRY_STATUSES",
    "CallOptions",
    "Limiter",
    "Pacer",
    "Redactor",
    "ServiceProfile",
    "SessionScope",
    "Timeout",
    "Transport",
    "abandon_session",
    "as_timeout",
    "decode_json",
    "encode_multipart",
    "origin_of",
    "error_message",
    "parse_retry_after",
    "retry_delay",
    "iterate_sync",
    "run_sync",
    "status_error",
]

logger = logging.getLogger("moondream_tools")

#: HTTP statuses retried with backoff (plus connection errors and timeouts).
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
DEFAULT_MAX_CONCURRENCY = 8
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
USER_AGENT = f"moondream-tools/{__version__}"
#: Indirection so tests can record backoff delays instead of waiting them out.
_sleep = asyncio.sleep

_T = TypeVar("_T")


# ---------------------------------------------------------------------- options


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


def as_timeout(value: float | Timeout | None, default: Timeout) -> Timeout:
    """``value`` as a :class:`Timeout` (a number is the total), or ``default`` for None."""
    if value is None:
        return default
    if isinstance(value, Timeout):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return Timeout(total=float(value), connect=default.connect)
    raise ValueError(f"timeout must be a positive number of seconds or a Timeout, got {value!r}")


@dataclass(frozen=True)
class CallOptions:
    """The transport options of one call: its timeout and how often it may be retried."""

    timeout: Timeout
    max_retries: int


# ---------------------------------------------------------------------- limits


@runtime_checkable
class Pacer(Protocol):
    """A pace kept outside one process: every request of a :class:`Limiter` with a pacer
    also waits for :meth:`wait_turn` (after its own concurrency and pacing), and a 429 that
    pauses the limiter pauses the pacer too. The core defines the protocol and never knows
    who implements it; ``moondream_tools.ray`` does, with one named actor pacing every
    worker of a job, so ``requests_per_second`` is the budget of the whole cluster.

    Example::

        class Shared:                       # e.g. backed by a server every process asks
            async def wait_turn(self) -> None: ...   # return when this request may start
            def pause(self, seconds: float) -> None: ...  # hold everyone back (a 429)

        md = BackendConfig(backend="moondream").build(pacer=Shared())
    """

    async def wait_turn(self) -> None:
        """Return when the next request may be sent."""

    def pause(self, seconds: float) -> None:
        """Hold every request back for ``seconds`` from now (must not block)."""


class Limiter:
    """Concurrency limit (per event loop) plus request pacing shared across loops.

    Pacing is a token bucket of capacity one (virtual scheduling): each request takes
    the next free slot ``1 / requests_per_second`` after the previous one. ``pause``
    pushes every future slot back, which is how a 429 slows down the whole client.
    ``pacer`` (settable): a :class:`Pacer` each request also waits for, after the two
    limits above (a pace shared with other processes); a pause is passed on to it.
    """

    def __init__(
        self, max_concurrency: int | None, requests_per_second: float | None, *, pacer: Pacer | None = None
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1, or None for no limit")
        if requests_per_second is not None and not requests_per_second > 0:
            raise ValueError("requests_per_second must be positive, or None for no pacing")
        self.max_concurrency = max_concurrency
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.pacer = pacer
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
        """Hold every request back for ``seconds`` from now (the pacer's too, if any)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        if self.pacer is not None:
            self.pacer.pause(seconds)

    async def _wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._paused_until, self._next_slot)
            if self.interval:
                self._next_slot = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)
        if self.pacer is not None:
            await self.pacer.wait_turn()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot (concurrency and pacing), hold it while the block runs."""
        semaphore = self._semaphore()
        if semaphore is None:
            await self._wait_turn()
            yield
            return
        async with semaphore:
            await self._wait_turn()
            yield


# ---------------------------------------------------------------------- retries


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-cased."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def encode_multipart(fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body, encoded once so a retry can send it again.

    ``files`` maps a field to ``(file name, bytes, content type)``. Returns the body and
    its ``Content-Type`` (with the boundary).

    >>> body, kind = encode_multipart({"prompt": "car"}, {"image": ("a.jpg", b"...", "image/jpeg")})
    >>> kind.startswith("multipart/form-data; boundary="), b'name="prompt"' in body
    (True, True)
    """
    boundary = f"moondream-tools-{secrets.token_hex(12)}"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, (filename, data, content_type) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """``Retry-After`` as seconds (number or HTTP date), capped; None when absent/invalid.

    >>> parse_retry_after("2.5", 60), parse_retry_after("600", 60), parse_retry_after("soon", 60)
    (2.5, 60, None)
    """
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


def retry_delay(
    error: MoondreamError,
    attempt: int,
    max_retries: int,
    *,
    retryable: bool | None = None,
    jitter: Callable[[float, float], float] = random.uniform,
) -> float | None:
    """Seconds to wait before retrying after ``error`` on attempt ``attempt`` (from 0), or None.

    Retried: connection errors and timeouts (not a failed TLS handshake), the statuses in
    :data:`RETRY_STATUSES`, and any :class:`RateLimitError` (such as Station's "queue full").
    The server's ``Retry-After`` (:attr:`APIStatusError.retry_after`) is the delay when it
    sent one; otherwise exponential backoff with full jitter (0.5 s doubling, capped at 8 s).
    ``retryable`` is the service's own verdict on an error status when it gives one (fal's
    ``X-Fal-Retryable`` header): True retries any status, False none.

    >>> from moondream_tools.errors import InternalServerError
    >>> error = InternalServerError("HTTP 503", status_code=503, retry_after=2.0)
    >>> retry_delay(error, 0, 2), retry_delay(error, 2, 2)
    (2.0, None)
    """
    if attempt >= max_retries or retryable is False:
        return None
    if isinstance(error, APIStatusError):
        if not (retryable or error.status_code in RETRY_STATUSES or isinstance(error, RateLimitError)):
            return None
        if error.retry_after is not None:
            return error.retry_after
    elif not isinstance(error, APIConnectionError) or not error.retryable:
        return None
    return jitter(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


# ---------------------------------------------------------------------- the transport


ResponseReader = Callable[[aiohttp.ClientResponse], AsyncIterator[_T]]


@dataclass
class Transport:
    """Sends a service's requests: limits, one retry loop, typed errors, redaction.

    Args:
        base_url: the service's root URL; routes are appended to it.
        profile: the service's error conventions (:class:`ServiceProfile`).
        redactor: the secrets to keep out of errors and logs.
        timeout / max_retries / max_retry_after: the defaults of every call.
        limiter: concurrency and pacing (:class:`Limiter`).
        sessions: the session scope (:class:`SessionScope`).
        other_origins: further ``scheme://host[:port]`` origins a request may go to by
            absolute URL (fal's queue answers with the URLs to poll); auth headers are never
            sent anywhere else.
    """

    base_url: str
    profile: ServiceProfile
    redactor: Redactor = field(default_factory=Redactor)
    timeout: Timeout = field(default_factory=Timeout)
    max_retries: int = 2
    max_retry_after: float = 60.0
    limiter: Limiter = field(default_factory=lambda: Limiter(DEFAULT_MAX_CONCURRENCY, None))
    sessions: SessionScope = field(default_factory=SessionScope)
    other_origins: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def options(self, timeout: float | Timeout | None = None, max_retries: int | None = None) -> CallOptions:
        """The options of one call: its own timeout / retries, or the transport's."""
        retries = self.max_retries if max_retries is None else max_retries
        if retries < 0:
            raise ValueError("max_retries must be >= 0")
        return CallOptions(timeout=as_timeout(timeout, self.timeout), max_retries=retries)

    async def aclose(self) -> None:
        """Close the pooled session."""
        await self.sessions.aclose()

    def url(self, route: str) -> str:
        """The URL of ``route``: a path (``/...``) appended to ``base_url``, or an absolute URL
        on one of the transport's origins. Anything else, or a URL whose origin (scheme, host,
        port, no user info) is not allowed, is a :class:`ResponseError`: auth headers only go
        to the service's own hosts."""
        if reference_kind(route) is ReferenceKind.URL:
            url = route
        elif route.startswith("/"):
            url = self.base_url + route
        else:
            raise ResponseError(f"not a route or an absolute URL: {route[:60]!r}")
        allowed = {origin_of(self.base_url), *self.other_origins}
        parts = urllib.parse.urlsplit(url)
        if parts.username is not None or parts.password is not None or origin_of(url) not in allowed:
            raise ResponseError(
                f"the server sent a URL on another host ({origin_of(url)}); only"
                f" {', '.join(sorted(allowed))} get this client's requests"
            )
        return url

    async def download(self, url: str, *, max_bytes: int, options: CallOptions) -> bytes:
        """GET ``url`` without auth headers (a presigned or file URL), capped at ``max_bytes``.

        Only http(s) URLs; a failed or oversized download is a :class:`ResponseError`.
        """
        if reference_kind(url) is not ReferenceKind.URL:
            raise ResponseError(f"the server sent a file URL that is not http(s): {url[:60]!r}")
        shown = self.redactor(url.split("?")[0])  # a presigned URL's query is a credential
        try:
            async with self.sessions.session() as session:
                async with session.get(url, timeout=options.timeout._aiohttp()) as resp:
                    try:  # the one capped reader, naming the URL without its query
                        return await read_response_capped(resp, max_bytes, shown)
                    except ImageError as exc:
                        raise ResponseError(f"the file the server pointed to cannot be used: {exc}") from None
        except TimeoutError:
            raise APITimeoutError(f"downloading the file at {shown!r} timed out; retry, or raise timeout=") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise APIConnectionError(
                f"downloading the file at {shown!r} failed ({type(exc).__name__}); retry later"
            ) from None

    # ------------------------------------------------------------ public requests

    async def request_json(
        self,
        method: str,
        route: str,
        body: Any = None,
        *,
        headers: Mapping[str, str],
        options: CallOptions,
        content: tuple[bytes, str] | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        """Send a request (with retries); return the JSON object answered and the request id.

        ``route`` is appended to ``base_url``, or is an absolute URL on one of the
        transport's origins. The body is ``body`` as JSON, or ``content`` as
        ``(bytes, content type)`` (e.g. from :func:`encode_multipart`).
        """
        if content is not None:
            payload, content_type = content
        else:
            payload = json.dumps(body).encode() if body is not None else None
            content_type = "application/json"
        sent = {"Content-Type": content_type, "User-Agent": USER_AGENT, **headers}
        async with aclosing(self._requests(method, route, payload, sent, options, self._read_json(route))) as answers:
            async for answer in answers:
                return answer
        raise AssertionError("unreachable: a JSON reader yields exactly one answer")  # pragma: no cover

    def stream(
        self,
        route: str,
        body: Any,
        *,
        headers: Mapping[str, str],
        options: CallOptions,
        stream: Stream[Any],
    ) -> AsyncIterator[dict[str, Any]]:
        """POST and iterate the server-sent events of the answer (retried before the first).

        The request id goes on ``stream`` as soon as the server sends it.
        """
        payload = json.dumps(body).encode()
        sent = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Accept": "text/event-stream",
                **headers}
        return self._requests("POST", route, payload, sent, options, self._read_sse(route, stream), stream)

    # ------------------------------------------------------------ the request loop

    async def _requests(
        self,
        method: str,
        route: str,
        payload: bytes | None,
        headers: dict[str, str],
        options: CallOptions,
        read: ResponseReader[_T],
        stream: Stream[Any] | None = None,
    ) -> AsyncIterator[_T]:
        """The one request loop: send, read the answer with ``read``, and retry a failure
        that happened before the first item was handed on."""
        attempt = 0
        while True:
            started = False
            try:
                async with aclosing(self._attempt(method, route, payload, headers, options, read, stream)) as items:
                    async for item in items:
                        started = True
                        yield item
                return
            except MoondreamError as error:
                verdict = None
                if self.profile.retryable is not None and isinstance(error, APIStatusError):
                    verdict = self.profile.retryable(error)
                delay = None if started else retry_delay(error, attempt, options.max_retries, retryable=verdict)
                if delay is None:
                    raise
                if isinstance(error, RateLimitError):
                    # Back off for everyone: every request of this client waits, not just this one.
                    retry_after = error.retry_after
                    self.limiter.pause(retry_after if retry_after is not None else BACKOFF_BASE * 2**attempt)
                logger.info("retrying %s %s in %.2f s after: %s", method, route, delay, error)
                attempt += 1
                await _sleep(delay)

    async def _attempt(
        self,
        method: str,
        route: str,
        payload: bytes | None,
        headers: dict[str, str],
        options: CallOptions,
        read: ResponseReader[_T],
        stream: Stream[Any] | None,
    ) -> AsyncIterator[_T]:
        logger.debug("%s %s (%d bytes)", method, route, len(payload or b""))
        try:
            async with self.limiter.slot(), self.sessions.session() as session:
                async with session.request(
                    method, self.url(route), data=payload, headers=headers, timeout=options.timeout._aiohttp()
                ) as resp:
                    if stream is not None:  # known to the caller even when this answer is an error
                        stream.request_id = resp.headers.get(self.profile.request_id_header) or stream.request_id
                    if resp.status >= 400:
                        raise self._status_error(route, resp, await resp.read())
                    async with aclosing(read(resp)) as items:
                        async for item in items:
                            yield item
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._connection_error(route, exc, options) from None

    # ------------------------------------------------------------ readers

    def _request_id(self, resp: aiohttp.ClientResponse, data: Any) -> str | None:
        rid = data.get("request_id") if isinstance(data, dict) else None
        return rid if isinstance(rid, str) else resp.headers.get(self.profile.request_id_header)

    def _answer_error(self, route: str, data: Any, request_id: str | None) -> MoondreamError | None:
        if self.profile.answer_error is None or not isinstance(data, dict) or not data.get("error"):
            return None
        return self.profile.answer_error(route, self.redactor.body(data), request_id)

    def _read_json(self, route: str) -> ResponseReader[tuple[dict[str, Any], str | None]]:
        async def read(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[dict[str, Any], str | None]]:
            raw = await resp.read()
            data = decode_json(raw)
            request_id = self._request_id(resp, data)
            if data is INVALID:
                raise ResponseError(
                    f"{route}: the server's answer is not valid JSON"
                    f" (HTTP {resp.status}, {len(raw)} bytes, content type {resp.content_type!r})",
                    request_id=request_id,
                )
            if not isinstance(data, dict):
                raise ResponseError(f"{route}: expected a JSON object, got {type(data).__name__}", request_id=request_id)
            error = self._answer_error(route, data, request_id)
            if error is not None:
                raise error
            yield data, request_id

        return read

    def _read_sse(self, route: str, stream: Stream[Any]) -> ResponseReader[dict[str, Any]]:
        async def read(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
            try:
                if resp.content_type != "text/event-stream":
                    data = decode_json(await resp.read())
                    request_id = self._request_id(resp, data) or stream.request_id
                    error = self._answer_error(route, data, request_id)
                    raise error or ResponseError(
                        f"{route}: expected a server-sent-events stream, got {resp.content_type!r}",
                        request_id=request_id,
                    )
                async with aclosing(decode_sse(resp.content, route, self.redactor, stream)) as events:
                    async for event in events:
                        error = self._answer_error(route, event, stream.request_id)
                        if error is not None:
                            raise error
                        yield event
            finally:
                resp.close()  # a stream left early must not wait for the rest of the body

        return read

    # ------------------------------------------------------------ errors

    def _status_error(self, route: str, resp: aiohttp.ClientResponse, raw: bytes) -> APIStatusError:
        data = decode_json(raw)
        body = data if data is not INVALID else body_text(raw, resp.content_type)
        # Redact before anything is cut short, so no fragment of the key survives a cut.
        return status_error(
            self.profile,
            route,
            resp.status,
            self.redactor.body(body),
            request_id=self._request_id(resp, data),
            headers=self.redactor.headers(resp.headers),
            retry_after=parse_retry_after(resp.headers.get("Retry-After"), self.max_retry_after),
            base_url=self.base_url,
        )

    def _connection_error(self, route: str, exc: BaseException, options: CallOptions) -> APIConnectionError:
        if isinstance(exc, TimeoutError):
            return APITimeoutError(
                f"{route}: no answer from {self.base_url} within the timeout"
                f" ({options.timeout.total} s total, {options.timeout.connect} s connect)."
                " Raise timeout= or check that the server is up."
            )
        reason = self.redactor(str(exc) or type(exc).__name__)
        if isinstance(exc, aiohttp.ClientSSLError):
            return APIConnectionError(
                f"{route}: the TLS handshake with {self.base_url} failed ({type(exc).__name__}: {reason})."
                f" {self.profile.tls_hint.replace('{base_url}', self.base_url)} Not retried.",
                retryable=False,
            )
        return APIConnectionError(
            f"{route}: could not talk to {self.base_url} ({type(exc).__name__}: {reason})."
            " Check base_url and that the server is running."
        )
