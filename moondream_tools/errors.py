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
    ├── ToolArgumentsError        a model wrote invalid arguments for a vision tool
    ├── BatchError                a Batch API job cannot go on (``code`` says why)
    │   ├── BatchFailedError      the service reports the batch failed (its error code)
    │   └── BatchExpiredError     the batch's results are past their 7-day retention
    └── BatchItemError            one line of a batch failed (carried by its BatchResult)

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
    "BatchError",
    "BatchFailedError",
    "BatchExpiredError",
    "BatchItemError",
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


class BatchError(MoondreamError):
    """A Batch API job (:class:`~moondream_tools.MoondreamBatch`) cannot go on.

    Attributes:
        code: why, as a short word: the service's batch-level code for a failed batch
            (``invalid_model``, ``validation_error``, ``limit_exceeded``, ``empty_batch``,
            ``processing_failed``, ``timeout``), ``expired``, or one of the job's own:
            ``not_ready`` (results asked for before the batch finished), ``not_submitted``,
            ``submit_unknown`` (a completion was sent but its answer was lost),
            ``download_failed``, ``job_busy`` (another job object holds the directory),
            ``spool_failed`` (the added requests could not be kept in the temporary directory).
        batch_id: the service's batch id, when there is one.
    """

    def __init__(self, message: str, *, code: str, batch_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.batch_id = batch_id


class BatchFailedError(BatchError):
    """The service reports the batch failed as a whole; ``code`` is its error code
    (``processing_failed``, ``validation_error``, ...) or ``failed`` when it gave none."""


class BatchExpiredError(BatchError):
    """The batch's results are gone: the Batch API keeps them 7 days after completion.

    Attributes:
        expires_at: when they expired (ISO 8601, as the service said), when known.

    Results downloaded before that are kept in the job directory; the rest can only be had
    by submitting the requests again (a new job directory).
    """

    def __init__(self, message: str, *, batch_id: str | None = None, expires_at: str | None = None) -> None:
        super().__init__(message, code="expired", batch_id=batch_id)
        self.expires_at = expires_at


class BatchItemError(MoondreamError):
    """One request of a batch failed; the rest of the batch is unaffected.

    It is carried by the item's :class:`~moondream_tools.BatchResult` (``error``), not raised
    by the job; ``BatchResult.unwrap()`` raises it.

    Attributes:
        code: the service's per-line code (``invalid_request``, ``image_decode_failed``,
            ``unknown_skill``, ``processing_error``) or the job's own: ``image_error`` (the
            image could not be read here, so it was never sent), ``line_too_large``,
            ``invalid_result`` (the service's result did not match the API), ``missing_result``
            (the batch finished without a result line for it).
        id: the request's id; line_index: its line in the uploaded file; batch_id: its batch.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        id: str | None = None,
        line_index: int | None = None,
        batch_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.id = id
        self.line_index = line_index
        self.batch_id = batch_id
