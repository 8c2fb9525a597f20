"""How a service's HTTP errors become typed errors, and keys stay out of them.

- :class:`ServiceProfile`: what the transport needs to know about one service's errors
  (its advice per status, how its error bodies read, an error inside a 200, a retry verdict
  header, service-specific error classes).
- :func:`status_error`: HTTP status + body -> the typed :class:`~moondream_tools.APIStatusError`.
- :class:`Redactor`: every API key replaced by ``[redacted]`` in texts, bodies and headers.
- :func:`decode_json`, :func:`body_text`, :func:`error_message`: reading error bodies.

Example::

    profile = ServiceProfile("Demo", auth_hint="Set DEMO_KEY.")
    error = status_error(profile, "/detect", 401, {"error": "bad key"})
    assert type(error).__name__ == "AuthenticationError"
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from .errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    MoondreamError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)

__all__ = [
    "ERROR_BODY_CHARS",
    "INVALID",
    "Redactor",
    "ServiceProfile",
    "body_text",
    "decode_json",
    "error_message",
    "status_error",
]

ERROR_BODY_CHARS = 500


class Redactor:
    """Replaces every secret (API keys) with ``[redacted]`` in texts, bodies and headers.

    >>> Redactor("sk-123")("bad key sk-123")
    'bad key [redacted]'
    """

    def __init__(self, *secrets: str | None) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    def body(self, body: Any) -> Any:
        """A JSON body or text with every secret replaced."""
        if isinstance(body, str):
            return self(body)
        if isinstance(body, (dict, list)) and self._secrets:
            return json.loads(self(json.dumps(body)))
        return body

    def headers(self, headers: Mapping[str, str]) -> CIMultiDict[str]:
        """Response headers (case-insensitive, repeats kept) with every secret in their values replaced."""
        return CIMultiDict((name, self(value)) for name, value in headers.items())


class _Invalid:
    pass


#: What :func:`decode_json` returns for a body that is not JSON.
INVALID: Any = _Invalid()


def decode_json(raw: bytes) -> Any:
    """The JSON value of ``raw``, or :data:`INVALID` when it is empty or not JSON."""
    if not raw:
        return INVALID
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return INVALID


def body_text(raw: bytes, content_type: str) -> str:
    """A non-JSON error body as text (cut to length only after redaction, by the caller)."""
    if "html" in content_type:
        return f"(an HTML page of {len(raw)} bytes, probably from a proxy)"
    return raw[:65536].decode("utf-8", "replace")


def error_message(body: Any) -> str:
    """The server's own words in an error body: ``error`` / ``detail`` / ``message``, cut short."""
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or json.dumps(value)[:ERROR_BODY_CHARS]
            if value:
                return str(value)[:ERROR_BODY_CHARS]
        return ""
    if isinstance(body, str):
        return body.strip()[:ERROR_BODY_CHARS]
    return ""


AnswerErrorMapper = Callable[[str, dict[str, Any], str | None], MoondreamError | None]


@dataclass(frozen=True)
class ServiceProfile:
    """What the transport needs to know about one HTTP service's errors.

    Attributes:
        name: the service, e.g. ``"Moondream"``.
        auth_hint / permission_hint / not_found_hint / bad_request_hint / tls_hint: the
            advice appended to a 401 / 403 / 404 / 400-422 error and a failed TLS handshake;
            ``{base_url}`` in one is replaced by the transport's base URL.
        error_message: extracts the server's words from an error body.
        answer_error: maps an error reported inside a successful JSON answer (Moondream
            Station's HTTP 200 ``{"error": ...}``) to a typed error, or None when the
            answer is not an error. Gets the route, the redacted body and the request id.
        request_id_header: the response header that carries the request id.
        retryable: the service's own verdict on whether an error status may be retried
            (e.g. fal's ``X-Fal-Retryable`` header), or None to decide by status.
        error_class: a service-specific error class for a status and the body's error
            type (e.g. AIgateway's 402 ``insufficient_credits``), or None for the default.
    """

    name: str
    auth_hint: str = "Check the API key."
    permission_hint: str = "The API key may not do this: check its plan and permissions."
    not_found_hint: str = "Check base_url and the model name."
    bad_request_hint: str = "The server rejected the request: check the arguments."
    tls_hint: str = "Check that base_url uses the right scheme and that the server's certificate is valid."
    error_message: Callable[[Any], str] = error_message
    answer_error: AnswerErrorMapper | None = None
    request_id_header: str = "X-Request-Id"
    retryable: Callable[[APIStatusError], bool | None] | None = None
    error_class: Callable[[int, Any], tuple[type[APIStatusError], str] | None] | None = None


def status_error(
    profile: ServiceProfile,
    route: str,
    status: int,
    body: Any,
    *,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    retry_after: float | None = None,
    base_url: str = "",
) -> APIStatusError:
    """The typed error for an HTTP error status (``body`` already redacted).

    >>> error = status_error(ServiceProfile("Demo"), "/detect", 429, {"error": "slow down"}, retry_after=1.0)
    >>> type(error).__name__, error.retry_after, str(error)
    ('RateLimitError', 1.0, 'HTTP 429 from /detect: slow down. Too many requests: slow down or retry later.')
    """
    if isinstance(body, str):
        body = body[:ERROR_BODY_CHARS]
    server_message = profile.error_message(body)
    detail = f": {server_message}" if server_message else ""
    cls: type[APIStatusError]
    special = profile.error_class(status, body) if profile.error_class is not None else None
    if special is not None:
        cls, hint = special
    elif status in (400, 422):
        cls, hint = BadRequestError, profile.bad_request_hint
    elif status == 401:
        cls, hint = AuthenticationError, profile.auth_hint
    elif status == 403:
        cls, hint = PermissionDeniedError, profile.permission_hint
    elif status == 404:
        cls, hint = NotFoundError, profile.not_found_hint
    elif status == 429:
        cls, hint = RateLimitError, "Too many requests: slow down or retry later."
    elif status >= 500:
        cls, hint = InternalServerError, "The server failed; retry later."
    else:
        cls, hint = APIStatusError, ""
    message = f"HTTP {status} from {route}{detail}. {hint.replace('{base_url}', base_url)}".strip()
    return cls(
        message, status_code=status, body=body, request_id=request_id, headers=headers, retry_after=retry_after
    )
