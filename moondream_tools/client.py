"""AsyncMoondream: the native backend for Moondream Cloud, Moondream Station or any server
speaking the same API.

It speaks exactly the wire format of the official ``moondream`` Python client (same
routes, headers and JSON keys) and adds what an async application needs, through the
shared transport (:mod:`moondream_tools._transport`): one pooled session, timeouts,
retries with backoff, limits, typed errors and async streaming. It implements
:class:`~moondream_tools.VisionBackend` with all five skills, plus streams, chat and
``models()``.

This module is the Moondream backend's public surface and nothing else: eleven methods,
each with a typed, keyword-only, documented signature, which is why it is about 800 lines.
Sending, retrying, streaming, argument checks and image preparation live in
``_transport``, ``_sessions``, ``_streaming``, ``backend`` and ``images``.

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

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Literal, TypeVar

import aiohttp

from ._concurrency import map_concurrently
from ._http_backend import HttpBackend
from ._streaming import EventConverter, SegmentStreamState, Stream, chat_events, text_events
from ._transport import DEFAULT_MAX_CONCURRENCY, CallOptions, ServiceProfile, Timeout
from .backend import (
    SKILLS,
    CaptionLength,
    SamplingSettings,
    SpatialRef,
    check_length,
    check_object,
    check_question,
    check_settings,
    check_spatial_refs,
)
from .errors import (
    APIStatusError,
    APITimeoutError,
    MoondreamError,
    NotFoundError,
    RateLimitError,
    ResponseError,
)
from .images import ImageInput, ImageSettings, PreparedImage
from .results import (
    Answer,
    Caption,
    ChatResult,
    Detections,
    ModelInfo,
    Points,
    SegmentEvent,
    Segmentation,
    parse_result,
)

__all__ = [
    "AsyncMoondream",
    "DEFAULT_BASE_URL",
    "DEFAULT_CHAT_MODEL",
    "MOONDREAM_PROFILE",
]

DEFAULT_BASE_URL = "https://api.moondream.ai/v1"
#: Hosts that are Moondream Cloud and therefore need an API key.
_CLOUD_HOSTS = frozenset({"api.moondream.ai"})
DEFAULT_CHAT_MODEL = "moondream3-preview"
_AuthStyle = Literal["skill", "bearer"]
_T = TypeVar("_T")
_I = TypeVar("_I")

# Moondream Station answers some failures with HTTP 200 and {"error": "..."}. Its known
# phrasings, matched on word boundaries ("rate" must not match "generate" or "separate").
# A word may go on ("timeouts", "TimeoutError", "rate-limited"); it may not start mid-word.
_STATION_BUSY = re.compile(r"\b(queue\b|busy\b|rate[- ]?limit|too many requests\b|overloaded\b)", re.I)
_STATION_TIMEOUT = re.compile(r"\btime(d)?[- ]?out", re.I)
_STATION_MISSING = re.compile(
    r"\b(not available|not found|not supported|unsupported|unknown (function|model|skill|capability|route))\b",
    re.I,
)


def station_error(route: str, body: dict[str, Any], request_id: str | None) -> MoondreamError:
    """The typed error for Moondream Station's HTTP-200 ``{"error": ...}`` answer (body redacted).

    Queue full / busy is a :class:`RateLimitError` (retried, pauses the client), timed out an
    :class:`APITimeoutError`, a function or model that is not available a
    :class:`NotFoundError`; anything else is a non-retryable :class:`APIStatusError`
    carrying the server's text.

    >>> type(station_error("/caption", {"error": "Failed to generate caption"}, None)).__name__
    'APIStatusError'
    >>> type(station_error("/detect", {"error": "Request queue is full"}, None)).__name__
    'RateLimitError'
    """
    text = MOONDREAM_PROFILE.error_message(body) or "unknown error"
    message = f"{route} failed on the server (HTTP 200 with an error): {text}."
    if _STATION_BUSY.search(text):
        return RateLimitError(
            message + " The server is busy: slow down (max_concurrency=, requests_per_second=) or retry later.",
            status_code=200, body=body, request_id=request_id,
        )
    if _STATION_TIMEOUT.search(text):
        return APITimeoutError(message + " The server gave up on this request: retry, or raise the server's timeout.")
    if _STATION_MISSING.search(text):
        return NotFoundError(
            message + " This server does not offer that skill or model: check model= and the server's skills.",
            status_code=200, body=body, request_id=request_id,
        )
    return APIStatusError(
        message + " Retry later, or check the server's logs.", status_code=200, body=body, request_id=request_id
    )


#: How Moondream Cloud and Station report errors.
MOONDREAM_PROFILE = ServiceProfile(
    name="Moondream",
    auth_hint="Check the API key: set MOONDREAM_API_KEY or pass AsyncMoondream(api_key=...).",
    permission_hint="The API key may not do this: check its plan and permissions in the Moondream console.",
    not_found_hint="Check base_url ({base_url}) and the model name.",
    bad_request_hint="The server rejected the request: check the arguments (image, object, settings, model).",
    tls_hint=(
        "Check that base_url uses the right scheme (http:// for a local Moondream Station)"
        " and that the server's certificate is valid."
    ),
    answer_error=station_error,
)


class AsyncMoondream(HttpBackend):
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
        max_concurrency: requests of this client in flight at once (per event loop);
            None for no limit. Further calls wait their turn.
        requests_per_second: pace requests to at most this rate (a token bucket shared by
            every call of the client), so a burst of tool calls does not collect 429s.
            None for no pacing. Either way, a 429 pauses every request of the client
            for the server's ``Retry-After``.
        image_settings: how images are read and encoded (:class:`ImageSettings`).
        image_cache_bytes: size of the LRU cache of prepared images shared by every call
            on this client (0 disables it): calling several skills on one image decodes
            and encodes it once.
        trust_env: honour the ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` environment
            variables (and ``~/.netrc``), as aiohttp's ``trust_env`` does. Off by default.
        http_session: an ``aiohttp.ClientSession`` of the application's to send every
            request with (its connector, proxy and TLS settings). The client never closes
            it; a call from another event loop uses a private session instead.

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

        # behind a corporate proxy (HTTPS_PROXY=http://proxy:3128):
        md = AsyncMoondream(trust_env=True)
    """

    #: Moondream has every skill.
    skills: frozenset[str] = SKILLS

    KEY_ENV = "MOONDREAM_API_KEY"
    BASE_URL_ENV = "MOONDREAM_BASE_URL"
    DEFAULT_BASE_URL = DEFAULT_BASE_URL
    PROFILE = MOONDREAM_PROFILE

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
        trust_env: bool = False,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(
            api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_after=max_retry_after,
            max_concurrency=max_concurrency,
            requests_per_second=requests_per_second,
            image_settings=image_settings,
            image_cache_bytes=image_cache_bytes,
            trust_env=trust_env,
            http_session=http_session,
        )
        self.model = model

    def _key_required(self, host: str) -> bool:
        return host in _CLOUD_HOSTS

    def _missing_key_message(self) -> str:
        return (
            "No Moondream API key. Set the MOONDREAM_API_KEY environment variable or pass"
            " AsyncMoondream(api_key=...); keys are at https://moondream.ai/c/cloud/api-keys."
            " For a local Moondream Station, set MOONDREAM_BASE_URL=http://localhost:2020/v1"
            " (no key needed)."
        )

    def __repr__(self) -> str:
        return (
            f"AsyncMoondream(base_url={self.base_url!r}, model={self.model!r},"
            f" api_key={'set' if self._api_key else 'not set'})"
        )

    async def __aenter__(self) -> AsyncMoondream:
        return self

    # ------------------------------------------------------------------ plumbing

    def _options(self, model: str | None, timeout: float | Timeout | None, max_retries: int | None) -> tuple[str | None, CallOptions]:
        return (model if model is not None else self.model), self._transport.options(timeout, max_retries)

    def _auth(self, auth: _AuthStyle) -> dict[str, str]:
        if not self._api_key:
            return {}
        if auth == "skill":
            return {"X-Moondream-Auth": self._api_key}
        return {"Authorization": f"Bearer {self._api_key}"}

    @staticmethod
    def _body(model: str | None, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        if model is not None:
            body["model"] = model
        return body

    async def _post(self, route: str, body: dict[str, Any], options: CallOptions) -> tuple[dict[str, Any], str | None]:
        return await self._transport.request_json("POST", route, body, headers=self._auth("skill"), options=options)

    def _stream(
        self,
        route: str,
        build_body: Callable[[], Awaitable[dict[str, Any]]],
        auth: _AuthStyle,
        options: CallOptions,
        convert: EventConverter[_T],
    ) -> Stream[_T]:
        """A :class:`Stream` over a server-sent-events answer.

        ``build_body`` (async) runs when iteration starts, e.g. to encode the image;
        ``convert(stream, event)`` maps each JSON event to ``(items to yield, done)``.
        """

        async def events(stream: Stream[_T]) -> AsyncIterator[_T]:
            body = await build_body()
            sse = self._transport.stream(route, body, headers=self._auth(auth), options=options, stream=stream)
            async with aclosing(sse):  # closing this stream closes the response now
                async for event in sse:
                    items, done = convert(stream, event)
                    for item in items:
                        yield item
                    if done:
                        stream.completed = True
                        return
            raise ResponseError(f"{route}: the stream ended before its final event", request_id=stream.request_id)

        return Stream(events)

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
        return await map_concurrently(func, items, concurrency=concurrency or self.max_concurrency)

    # ------------------------------------------------------------------ skills

    async def caption(
        self,
        image: ImageInput,
        length: CaptionLength = "normal",
        *,
        settings: SamplingSettings | None = None,
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
        check_length(length)
        model, options = self._options(model, timeout, max_retries)
        prepared = await self.prepare(image)
        body = self._body(
            model, image_url=prepared.data_url, length=length, stream=False, settings=check_settings(settings)
        )
        data, rid = await self._post("/caption", body, options)
        return parse_result(Caption, data, what="/caption", request_id=rid, image_size=prepared.size)

    async def query(
        self,
        image: ImageInput | None,
        question: str,
        *,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
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
        check_question(question)
        model, options = self._options(model, timeout, max_retries)
        refs = check_spatial_refs(spatial_refs)
        prepared = await self.prepare(image) if image is not None else None
        body = self._query_body(model, prepared, question, reasoning, refs, settings, stream=False)
        data, rid = await self._post("/query", body, options)
        return parse_result(
            Answer, data, what="/query", request_id=rid, image_size=prepared.size if prepared else None
        )

    def _query_body(
        self,
        model: str | None,
        prepared: PreparedImage | None,
        question: str,
        reasoning: bool,
        refs: list[list[float]] | None,
        settings: SamplingSettings | None,
        *,
        stream: bool,
    ) -> dict[str, Any]:
        return self._body(
            model,
            question=question,
            stream=stream,
            image_url=prepared.data_url if prepared else None,
            settings=check_settings(settings),
            reasoning=True if reasoning else None,
            spatial_refs=refs,
        )

    async def detect(
        self,
        image: ImageInput,
        object: str,
        *,
        settings: SamplingSettings | None = None,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Detections:
        """Find every instance of ``object`` and return its bounding boxes.

        Example::

            result = await md.detect("street.jpg", "car", settings={"max_objects": 100})
            print(len(result.objects), result.to_pixels()[:1])
        """
        return await self._grounding("/detect", Detections, image, object, None, settings, model, timeout, max_retries)

    async def point(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
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
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
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
            "/segment", Segmentation, image, object, spatial_refs, settings, model, timeout, max_retries,
            stream=False,
        )

    async def _grounding(
        self,
        route: str,
        cls: type[_T],
        image: ImageInput,
        object: str,
        spatial_refs: Sequence[SpatialRef] | None,
        settings: SamplingSettings | None,
        model: str | None,
        timeout: float | Timeout | None,
        max_retries: int | None,
        **extra_fields: Any,
    ) -> _T:
        check_object(object)
        model, options = self._options(model, timeout, max_retries)
        refs = check_spatial_refs(spatial_refs)
        prepared = await self.prepare(image)
        body = self._body(
            model,
            image_url=await prepared.segment_payload() if route == "/segment" else prepared.data_url,
            object=object,
            **extra_fields,
            spatial_refs=refs,
            settings=check_settings(settings),
        )
        data, rid = await self._post(route, body, options)
        return parse_result(  # type: ignore[type-var]
            cls, data, what=route, request_id=rid, image_size=prepared.size, object=object
        )

    # ------------------------------------------------------------------ streams

    def stream_caption(
        self,
        image: ImageInput,
        length: CaptionLength = "normal",
        *,
        settings: SamplingSettings | None = None,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[str]:
        """Stream a caption as text chunks.

        Example::

            async for piece in md.stream_caption("photo.jpg"):
                print(piece, end="", flush=True)
        """
        check_length(length)
        model, options = self._options(model, timeout, max_retries)

        async def body() -> dict[str, Any]:
            prepared = await self.prepare(image)
            return self._body(
                model, image_url=prepared.data_url, length=length, stream=True, settings=check_settings(settings)
            )

        return self._stream("/caption", body, "skill", options, text_events)

    def stream_query(
        self,
        image: ImageInput | None,
        question: str,
        *,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[str]:
        """Stream the answer to a question as text chunks.

        Example::

            async for piece in md.stream_query("photo.jpg", "What is happening?"):
                print(piece, end="", flush=True)
        """
        check_question(question)
        model, options = self._options(model, timeout, max_retries)
        refs = check_spatial_refs(spatial_refs)

        async def body() -> dict[str, Any]:
            prepared = await self.prepare(image) if image is not None else None
            return self._query_body(model, prepared, question, reasoning, refs, settings, stream=True)

        return self._stream("/query", body, "skill", options, text_events)

    def stream_segment(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
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
        check_object(object)
        model, options = self._options(model, timeout, max_retries)
        refs = check_spatial_refs(spatial_refs)
        state = SegmentStreamState(object)

        async def body() -> dict[str, Any]:
            prepared = await self.prepare(image)
            state.image_size = prepared.size
            return self._body(
                model, image_url=await prepared.segment_payload(), object=object, stream=True,
                spatial_refs=refs, settings=check_settings(settings),
            )

        return self._stream("/segment", body, "skill", options, state.convert)

    # ------------------------------------------------------------------ chat & models

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        reasoning: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
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
        model, options = self._options(model, timeout, max_retries)
        body = await self._chat_body(messages, reasoning, temperature, top_p, max_tokens, model, False)
        data, rid = await self._transport.request_json(
            "POST", "/chat/completions", body, headers=self._auth("bearer"), options=options
        )
        return parse_chat(data, rid)

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        reasoning: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Stream[str]:
        """Stream a chat completion as content chunks (see :meth:`chat` for ``messages``).

        Example::

            async for piece in md.stream_chat([{"role": "user", "content": "Hi"}]):
                print(piece, end="")
        """
        model, options = self._options(model, timeout, max_retries)

        async def body() -> dict[str, Any]:
            return await self._chat_body(messages, reasoning, temperature, top_p, max_tokens, model, True)

        return self._stream("/chat/completions", body, "bearer", options, chat_events)

    async def _chat_body(
        self,
        messages: Sequence[Mapping[str, Any]],
        reasoning: bool | None,
        temperature: float | None,
        top_p: float | None,
        max_tokens: int | None,
        model: str | None,
        stream: bool,
    ) -> dict[str, Any]:
        if isinstance(messages, (str, bytes)) or not messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        prepared_messages = [await self._chat_message(m) for m in messages]
        body: dict[str, Any] = {
            "model": model or DEFAULT_CHAT_MODEL,
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
        options = self._transport.options(timeout, max_retries)
        data, rid = await self._transport.request_json("GET", "/models", headers=self._auth("bearer"), options=options)
        items = data.get("data", data.get("models"))
        if not isinstance(items, list):
            raise ResponseError("/models: expected a 'data' list of models", request_id=rid)
        result: list[ModelInfo] = []
        for item in items:
            entry = {"id": item} if isinstance(item, str) else item
            result.append(parse_result(ModelInfo, entry, what="/models", request_id=rid))
        return result


def parse_chat(data: dict[str, Any], request_id: str | None) -> ChatResult:
    """A ``/chat/completions`` answer as a :class:`ChatResult`."""
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
