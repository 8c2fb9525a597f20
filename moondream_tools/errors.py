"""Errors raised by moondream_tools.

Every error this package raises on purpose derives from :class:`MoondreamError`,
so ``except MoondreamError`` catches "Moondream could not answer this" and lets
real bugs propagate. No message, repr or attribute ever contains the API key.

::

    MoondreamError
    ├── ConfigurationError        the client cannot be set up (e.g. no API key for the cloud)
    ├── APIConnectionError        the server could not be reached or the connection broke
    │   └── APITimeoutError       the server did not answer in time
    ├── APIStatusError            the server answered with an error (HTTP status, body, request_id)
    │   ├── BadRequestError       400, 422: the request was rejected as invalid
    │   ├── AuthenticationError   401: missing or wrong API key
    │   ├── InsufficientCreditsError 402: the prepaid balance is empty (AIgateway)
    │   ├── PermissionDeniedError 403: the key may not do this
    │   ├── NotFoundError         404: unknown route, model or skill
    │   ├── RateLimitError        429: too many requests (retried)
    │   └── InternalServerError   5xx: the server failed (retried)
    ├── ImageError                an input image cannot be used (missing, broken, too large, ...)
    │   └── ImageAccessError      an image reference the ImagePolicy does not allow, or an unknown handle
    ├── ResponseError             the server's answer is malformed or unexpected
    ├── UnsupportedSkillError     the backend has no such skill (e.g. captioning on a SAM 3 backend)
    └── ToolArgumentsError        a model wrote invalid arguments for a vision tool

Example::

    from moondream_tools import AsyncMoondream, MoondreamError, RateLimitError

    try:
        result = await md.detect("photo.jpg", "car")
    except RateLimitError as exc:   # retries were exhausted
        print("slow down:", exc.status_code, exc.request_id)
    except MoondreamError as exc:
        print("vision failed:", exc)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
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
]


class MoondreamError(Exception):
    """Root of every error raised by moondream_tools on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigurationError(MoondreamError):
    """The client cannot be configured as asked, e.g. no API key for Moondream Cloud."""


class APIConnectionError(MoondreamError):
    """The request did not get an HTTP answer: refused, reset, DNS or TLS failure.

    Attributes:
        retryable: whether retrying can help. False for a failed TLS handshake (a wrong
            scheme or a bad certificate does not fix itself); True otherwise.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class APITimeoutError(APIConnectionError):
    """The server did not answer within the configured timeout."""


class APIStatusError(MoondreamError):
    """The server answered with an error.

    Attributes:
        status_code: the HTTP status (200 for a Moondream Station ``{"error": ...}`` answer).
        body: the parsed JSON body, or the text of a non-JSON body (truncated), or None;
            any API key in it is replaced by ``[redacted]``.
        request_id: the server's request id when it sent one.
        headers: the response headers, read-only and case-insensitive (keys redacted from
            their values); empty for an error the server reported inside a successful answer.
        retry_after: the server's ``Retry-After`` in seconds (a number or an HTTP date,
            capped by the client's ``max_retry_after``), or None when it sent none.

    Example::

        try:
            await md.detect("photo.jpg", "car")
        except RateLimitError as exc:
            print(exc.status_code, exc.retry_after, exc.headers.get("X-Request-Id"))
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        self.headers: Mapping[str, str] = CIMultiDictProxy(CIMultiDict(headers or {}))
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """HTTP 400/422: the server rejected the request as invalid."""


class AuthenticationError(APIStatusError):
    """HTTP 401: the API key is missing or wrong."""


class InsufficientCreditsError(APIStatusError):
    """HTTP 402: the account's prepaid balance is empty. Not retried: top up first."""


class PermissionDeniedError(APIStatusError):
    """HTTP 403: the API key is not allowed to do this."""


class NotFoundError(APIStatusError):
    """HTTP 404, or a skill or model the server does not offer."""


class RateLimitError(APIStatusError):
    """HTTP 429, or Moondream Station's "queue full": too many requests. Retried."""


class InternalServerError(APIStatusError):
    """HTTP 5xx: the server failed. Retried."""


class ImageError(MoondreamError):
    """An input image cannot be used: missing, unreadable, not an image, truncated, too large."""


class ImageAccessError(ImageError):
    """An image reference the :class:`~moondream_tools.ImagePolicy` refuses, or an unknown handle.

    The message says what is allowed (registered handles, allowed directories, URLs)
    without revealing anything about the filesystem outside the allowed directories.
    """


class ResponseError(MoondreamError):
    """The server's answer is malformed or not what the API promises.

    Attributes:
        request_id: the server's request id when it sent one.
    """

    #: Appended to every message: what a caller can do about a malformed answer.
    ADVICE = (
        "The server did not answer as its API promises: retry, and if it persists check"
        " that base_url points to the right service."
    )

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(f"{message.rstrip('.')}. {self.ADVICE}")
        self.request_id = request_id


class UnsupportedSkillError(MoondreamError):
    """The backend has no such skill, e.g. captioning on a segmentation-only backend.

    Attributes:
        skill: the skill asked for (``"caption"``, ``"query"``, ``"detect"``, ``"point"``
            or ``"segment"``).
        backend: the name of the backend that lacks it.
        supported: the skills that backend has.

    Example::

        try:
            await backend.caption("photo.jpg")
        except UnsupportedSkillError as exc:
            print(exc.skill, exc.backend, sorted(exc.supported))
    """

    def __init__(self, skill: str, backend: str, supported: Iterable[str], *, hint: str = "") -> None:
        self.skill = skill
        self.backend = backend
        self.supported = frozenset(supported)
        have = ", ".join(sorted(self.supported)) or "none"
        advice = hint or "Use a backend that has it (e.g. VisionTools(..., segment_backend=...) for segment)."
        super().__init__(f"{backend} has no {skill!r} skill (it has: {have}). {advice}")


class ToolArgumentsError(MoondreamError):
    """The arguments a model wrote for a vision tool are invalid; the message says which."""

    @classmethod
    def from_validation(cls, tool: str, error: Any) -> ToolArgumentsError:
        """From a pydantic ``ValidationError`` of ``tool``'s arguments (adapters use it too)."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
            for err in error.errors(include_url=False)[:5]
        )
        return cls(f"invalid arguments for {tool}: {problems}")
