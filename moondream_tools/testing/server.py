"""``FakeMoondream``: an offline emulator of the Moondream HTTP API.

A real aiohttp server on 127.0.0.1 (free port) that speaks the Moondream wire
format (``/v1/caption``, ``/query``, ``/detect``, ``/point``, ``/segment``,
``/chat/completions``, ``/models``), answers from what a toy vision engine
actually sees in the received image, records every request and can inject
faults (HTTP errors, Moondream Station style 200 errors, malformed JSON,
hangs, dropped connections). The same server also speaks fal.ai (sync and queue)
and AIgateway over the same engine: see :mod:`moondream_tools.testing.providers`, and
Moondream Cloud's Batch API (``/v1/batch``): see :mod:`moondream_tools.testing.batch`.

>>> async with FakeMoondream() as fake:                     # doctest: +SKIP
...     # point any client at fake.base_url with fake.api_key
...     fake.fail_next(status=429, retry_after="1")
...     ...
...     assert fake.requests[-1].path == "/v1/detect"

Self-contained on purpose (stdlib, aiohttp, numpy, PIL): it never imports the
client it is used to test. That is also why it is one module of about 900 lines: the
whole wire format the client must match (routes, auth, JSON and SSE shapes, request ids,
faults) is read in one place, independent of the client's own modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import base64
import binascii
import io
import json
import re
import secrets
import time
import warnings
from contextvars import ContextVar
from http import HTTPStatus
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

from . import batch, engine, providers
from . import text as text_reader
from .engine import Found

__all__ = ["FakeMoondream", "RecordedRequest", "answer_question", "make_caption"]

SKILL_ROUTES = ("caption", "query", "detect", "point", "segment")
DEFAULT_MODELS = ("moondream3-preview", "moondream2")

# per-request "drop the connection after N events" (set by the middleware in
# the handler's own task; a ContextVar keeps aiohttp's request storage clean)
_DROP_AFTER: ContextVar[int | None] = ContextVar("fake_moondream_drop_after", default=None)

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve".split()
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it.

    ``headers`` is a case-insensitive multidict copy (``headers["x-moondream-auth"]``
    works), ``json`` the parsed body or None when the body was empty or not JSON.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    json: Any
    body: bytes = field(repr=False)
    received_at: float
    query: Mapping[str, str] = field(default_factory=dict)
    #: multipart/form-data requests only: field name -> str, or a providers.FormFile for file parts
    form: Mapping[str, Any] | None = None


@dataclass
class _Fault:
    kind: str
    remaining: int
    status: int = 503
    retry_after: str | None = None
    body: str | None = None
    content_type: str = "application/json"
    message: str = ""
    seconds: float = 0.0
    after_events: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    route: str | None = None  # only requests at or under this path prefix consume it


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _request_id() -> str:
    return "req_" + secrets.token_hex(8)


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def _words(text: str, per: int = 2) -> list[str]:
    """Split text into pieces of ``per`` words (keeping spaces); join gives the text back."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    return ["".join(tokens[i : i + per]) for i in range(0, len(tokens), per)] or ([text] if text else [])


def _number(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _plural(label: str) -> str:
    return label + "s"


def _with_article(label: str) -> str:
    return ("an " if label[:1] in "aeiou" else "a ") + label


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _groups(found: Sequence[Found]) -> list[tuple[str, list[Found]]]:
    groups: dict[str, list[Found]] = {}
    for f in found:
        groups.setdefault(f.label, []).append(f)
    return list(groups.items())


def _box(f: Found) -> dict[str, float]:
    return {
        "x_min": round(f.bbox[0], 6),
        "y_min": round(f.bbox[1], 6),
        "x_max": round(f.bbox[2], 6),
        "y_max": round(f.bbox[3], 6),
    }


def make_caption(found: Sequence[Found], background: str, length: str = "normal") -> str:
    """The emulator's caption for a list of found shapes."""
    bg = f"{_with_article(background)} background"
    if length == "short":
        if not found:
            return f"An empty {background} background."
        n = len(found)
        noun = "shape" if n == 1 else "shapes"
        return f"{_number(n).capitalize()} {noun} on {bg}."
    if not found:
        text = f"A plain {background} background with no shapes."
        return text
    parts = []
    groups = _groups(found)
    for label, items in groups:
        parts.append(_with_article(label) if len(items) == 1 else f"{_number(len(items))} {_plural(label)}")
    text = _join(parts)
    text = text[0].upper() + text[1:] + f" on {bg}."
    if length == "long":
        sentences = []
        for label, items in groups:
            where = _join([f"the {engine.position_name(*f.center)}" for f in items])
            if len(items) == 1:
                sentences.append(f"The {label} is at {where}.")
            else:
                sentences.append(f"The {_number(len(items))} {_plural(label)} are at {where}.")
        text += " " + " ".join(sentences)
    return text


_STOP = re.compile(
    r"\b(?:are|is|do|does|can|could|in|on|inside|there|visible|present|here|you|see|shown|within|of)\b"
)


def _cut_phrase(rest: str) -> str:
    rest = re.split(r"[?.!,;]", rest, maxsplit=1)[0]
    return _STOP.split(rest, maxsplit=1)[0].strip()


class _Reasoning:
    def __init__(self) -> None:
        self.text = ""
        self.grounding: list[dict[str, Any]] = []

    def add(self, text: str) -> None:
        self.text += text

    def ground(self, text: str, shapes: Sequence[Found]) -> None:
        start = len(self.text)
        self.text += text
        self.grounding.append(
            {
                "start_idx": start,
                "end_idx": len(self.text),
                "points": [[round(f.center[0], 6), round(f.center[1], 6)] for f in shapes],
            }
        )

    def mention(self, shapes: Sequence[Found]) -> None:
        for i, f in enumerate(shapes):
            if i:
                self.add(", " if i < len(shapes) - 1 else " and ")
            self.add("the ")
            self.ground(f.label, [f])
            self.add(f" at the {engine.position_name(*f.center)}")

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "grounding": self.grounding}


CANNOT_ANSWER = (
    "I can't answer that from this image; I can count shapes, say whether a shape "
    "is present, or name a shape's color."
)
NO_IMAGE = "No image was provided, so I can't see anything to answer that about."
#: The answer to a transcription request when no text is read in the image.
NO_TEXT = "There is no text in this image."


def answer_question(
    question: str, found: Sequence[Found] | None, image: Image.Image | None = None
) -> tuple[str, dict[str, Any]]:
    """Answer a question about the found shapes; returns (answer, reasoning dict).

    ``found`` None means no image was given. A transcription question is answered with the
    lines :func:`~moondream_tools.testing.text.read_text` reads in ``image``, one per line,
    or ``NO_TEXT`` (also when ``image`` is None).
    """
    r = _Reasoning()
    if found is None:
        r.add("The question comes without an image, so there is nothing to look at.")
        return NO_IMAGE, r.as_dict()
    q = " ".join(question.lower().split())

    if re.search(r"\b(?:transcribe|read (?:out )?(?:all |the )?text|what (?:text|does (?:it|the \w+) say))", q):
        lines = [line.text for line in text_reader.read_text(image)] if image is not None else []
        if not lines:
            r.add("I find no letters or words in the image.")
            return NO_TEXT, r.as_dict()
        r.add(f"I read {_number(len(lines))} line{'s' if len(lines) > 1 else ''} of text, top to bottom.")
        return "\n".join(lines), r.as_dict()

    m = re.search(r"\bhow many\s+(.*)", q)
    if m:
        phrase = _cut_phrase(m.group(1))
        hits = [f for f in found if engine.matches(phrase, f)]
        r.add(f"Looking for {phrase or 'that'}. ")
        if hits:
            r.add("I see ")
            r.mention(hits)
            r.add(". ")
        else:
            r.add("I see none. ")
        r.add(f"So the count is {len(hits)}.")
        return str(len(hits)), r.as_dict()

    m = re.search(r"\bwhat colou?rs?\s+(?:is|are)\s+(.*)", q)
    if m:
        phrase = _cut_phrase(m.group(1))
        hits = [f for f in found if engine.matches(phrase, f)]
        if not hits:
            r.add(f"I looked for {phrase or 'that'} and found nothing.")
            return f"I don't see any {phrase or 'such shape'} in this image.", r.as_dict()
        colors: list[str] = []
        for f in hits:
            if f.color not in colors:
                colors.append(f.color)
        r.add("I see ")
        r.mention(hits)
        r.add(".")
        return _join(colors), r.as_dict()

    m = re.search(
        r"\b(?:is there|are there|is there any|are there any|do you see|can you see|"
        r"does (?:the|this) image (?:contain|have|show)|is an?)\s+(.*)",
        q,
    )
    if m:
        phrase = _cut_phrase(m.group(1))
        hits = [f for f in found if engine.matches(phrase, f)]
        r.add(f"Looking for {phrase or 'that'}. ")
        if hits:
            r.add("I see ")
            r.mention(hits)
            r.add(". So yes.")
            return "Yes", r.as_dict()
        r.add("I don't see any. So no.")
        return "No", r.as_dict()

    if found:
        r.add("The image shows ")
        r.mention(found)
        r.add(", but the question is not about counting, presence or color.")
    else:
        r.add("The image shows no shapes, and the question is not about counting, presence or color.")
    return CANNOT_ANSWER, r.as_dict()


def _decode_image(url: Any) -> Image.Image:
    if not isinstance(url, str) or not url:
        raise _BadRequest("image_url is required")
    if not url.startswith("data:"):
        raise _BadRequest("image_url must be a base64 data URL (data:image/...;base64,...)")
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _BadRequest("image_url must be a base64 data URL (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest("image_url is not valid base64") from None
    return _image_from_bytes(raw)


def _image_from_bytes(raw: bytes) -> Image.Image:
    """Decode an encoded image (any format PIL reads) to RGB; _BadRequest when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(raw))
            img.load()
            return img.convert("RGB")
    except Exception:
        raise _BadRequest("could not decode the image") from None


#: Uploads seen lately (by a hash of the data URL): the calls of one image send the same
#: upload, decoded and analysed once.
_SEEN: OrderedDict[bytes, tuple[Image.Image, tuple[Found, ...]]] = OrderedDict()
_SEEN_LOCK = threading.Lock()
_SEEN_SIZE = 16


def _see(url: Any) -> tuple[Image.Image, list[Found]]:
    key = hashlib.blake2b(url.encode("ascii", "surrogateescape"), digest_size=20).digest() if isinstance(url, str) else None
    if key is not None:
        with _SEEN_LOCK:
            hit = _SEEN.get(key)
            if hit is not None:
                _SEEN.move_to_end(key)
                return hit[0].copy(), list(hit[1])
    img = _decode_image(url)
    found = engine.analyze(img)
    if key is not None:
        with _SEEN_LOCK:
            _SEEN[key] = (img.copy(), tuple(found))
            while len(_SEEN) > _SEEN_SIZE:
                _SEEN.popitem(last=False)
    return img, found


class FakeMoondream(providers.ProvidersMixin, batch.BatchMixin):
    """Offline Moondream API on ``http://127.0.0.1:<port>/v1``.

    ``api_key`` None accepts any caller (like Moondream Station). ``latency``
    (settable) is slept before each answer; ``stream_interval`` (settable) is
    slept between SSE events. Faults are FIFO: each injector applies to the
    next ``count`` requests once the faults injected before it are used up.
    ``in_flight`` / ``max_in_flight`` count requests being answered now / at most.
    ``rate_limit`` (settable) answers HTTP 429 with ``Retry-After: 1`` above that many
    requests per second (a token bucket of that size, like a rate-limited cloud);
    ``rate_limited`` counts those answers. Every injector takes ``route`` (a path prefix
    such as ``"/fal-queue"`` or ``"/v1/detect"``): only requests under it consume that fault.
    fal.ai / AIgateway attributes (``fal_key``, ``fal_base_url``, ...): see ``ProvidersMixin``;
    the Batch API's (``batches``, ``batch_polls_to_complete``, ...): see ``BatchMixin``.
    """

    def __init__(
        self,
        api_key: str | None = "test-key",
        *,
        latency: float = 0.0,
        stream_text_key: str = "chunk",
        max_objects_default: int = 50,
        models: list[str] | None = None,
        rate_limit: float | None = None,
        fal_key: str | None | EllipsisType = ...,
        aigateway_key: str | None | EllipsisType = ...,
    ) -> None:
        self.api_key = api_key
        self._init_providers(fal_key, aigateway_key)  # ``...`` = a random key
        self._init_batch()
        self.rate_limit = rate_limit
        self.rate_limited = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._tokens = 0.0
        self._bucket_at: float | None = None
        self.latency = latency
        self.stream_text_key = stream_text_key
        self.max_objects_default = max_objects_default
        self.models = list(models) if models is not None else list(DEFAULT_MODELS)
        self.stream_interval = 0.0
        self.requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._port: int | None = None

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeMoondream is not started")
        return self._port

    @property
    def url(self) -> str:
        """Server root, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """API base, ``http://127.0.0.1:<port>/v1``."""
        return f"{self.url}/v1"

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._closing = asyncio.Event()
        app = web.Application(middlewares=[self._make_middleware()], client_max_size=64 * 1024 * 1024)
        for name in SKILL_ROUTES:
            app.router.add_post(f"/v1/{name}", getattr(self, f"_h_{name}"))
        app.router.add_post("/v1/chat/completions", self._h_chat)
        app.router.add_get("/v1/models", self._h_models)
        providers.install(self, app)
        batch.install(self, app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()  # wakes hanging / slow handlers
        await runner.cleanup()
        self._port = None

    async def __aenter__(self) -> FakeMoondream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- fault injection --------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 503,
        retry_after: str | None = None,
        body: str | None = None,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        route: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests with HTTP ``status`` and extra ``headers``.

        body None -> the route family's error shape: ``{"error": reason}`` (native),
        ``{"detail": reason}`` (fal), ``{"error": {message, type, code, param}}`` (AIgateway).
        """
        self._add(
            _Fault(
                "fail", count, status=status, retry_after=retry_after, body=body,
                content_type=content_type, headers=dict(headers or {}), route=route,
            )
        )

    def station_error_next(self, count: int = 1, message: str = "queue full", *, route: str | None = None) -> None:
        """Answer with HTTP 200 and ``{"error": message}``, as Moondream Station does."""
        self._add(_Fault("station", count, message=message, route=route))

    def malformed_next(self, count: int = 1, *, route: str | None = None) -> None:
        """Answer with HTTP 200, JSON content type and a truncated, invalid JSON body."""
        self._add(_Fault("malformed", count, route=route))

    def hang_next(self, count: int = 1, seconds: float = 30.0, *, route: str | None = None) -> None:
        """Sleep ``seconds`` before sending headers (cut short when the server closes)."""
        self._add(_Fault("hang", count, seconds=seconds, route=route))

    def drop_stream_next(self, count: int = 1, *, after_events: int = 1, route: str | None = None) -> None:
        """Cut the connection: SSE after ``after_events`` events (never the final one);
        plain JSON mid-body, after headers that promise a longer Content-Length."""
        self._add(_Fault("drop", count, after_events=after_events, route=route))

    def reset(self) -> None:
        """Clear pending faults (fal queue and batch faults too), recorded requests and
        ``fal_cancelled``; restore the batch knobs (batches and uploads are kept)."""
        self._faults.clear()
        self.requests.clear()
        self._reset_providers()
        self._reset_batch()

    @property
    def pending_faults(self) -> int:
        return sum(f.remaining for f in self._faults) + self._pending_provider_faults() + self._pending_batch_faults()

    def _add(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be at least 1")
        self._faults.append(fault)

    def _take_fault(self, path: str = "/") -> _Fault | None:
        """The first pending fault (in injection order) that applies to ``path``, used once."""
        for i, fault in enumerate(self._faults):
            if fault.route is None or providers.under(path, fault.route):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.pop(i)
                return fault
        return None

    # -- plumbing ---------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _make_middleware(self):
        @web.middleware
        async def middleware(request: web.Request, handler):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await answer(request, handler)
            finally:
                self.in_flight -= 1

        async def answer(request: web.Request, handler):
            raw_upload = batch.is_part_upload(request)  # raw bytes, maybe large: never parsed
            if raw_upload:
                request = request.clone(client_max_size=batch.read_limit(self))
            body = await request.read()
            parsed: Any = None
            if body and not raw_upload:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
            self.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    headers=request.headers.copy(),
                    json=parsed,
                    body=body,
                    received_at=time.time(),
                    query=dict(request.query),
                    form=providers.parse_form(request.headers.get("Content-Type", ""), body),
                )
            )
            if self.rate_limit is not None and self._over_rate():
                self.rate_limited += 1
                return self._error(429, "Rate limit exceeded", request.path, headers={"Retry-After": "1"})
            await self._sleep(self.latency)
            fault = self._take_fault(request.path)
            if fault is not None:
                if fault.kind == "hang":
                    await self._sleep(fault.seconds)
                elif fault.kind == "fail":
                    headers = dict(fault.headers)
                    if fault.retry_after is not None:
                        headers["Retry-After"] = fault.retry_after
                    text = fault.body
                    if text is None:
                        try:
                            reason = HTTPStatus(fault.status).phrase
                        except ValueError:
                            reason = "error"
                        text = json.dumps(providers.error_body(request.path, fault.status, reason))
                    return web.Response(
                        status=fault.status, text=text, headers=headers, content_type=fault.content_type
                    )
                elif fault.kind == "station":
                    return web.json_response({"error": fault.message})
                elif fault.kind == "malformed":
                    return web.Response(
                        status=200, body=b'{"result": {"answer": "tru', content_type="application/json"
                    )
                elif fault.kind == "drop":
                    _DROP_AFTER.set(max(0, fault.after_events))
            try:
                return await handler(request)
            except _BadRequest as exc:
                return self._error(exc.status, exc.message, request.path)
            except web.HTTPException as exc:
                if exc.status >= 400:
                    return self._error(exc.status, exc.reason, request.path)
                raise

        return middleware

    def _over_rate(self) -> bool:
        """A token bucket holding ``rate_limit`` tokens, refilled at ``rate_limit`` per second:
        True (answer 429) when this request finds it empty."""
        rate = float(self.rate_limit or 0)
        now = time.monotonic()
        if self._bucket_at is None:
            self._tokens, self._bucket_at = rate, now
        self._tokens = min(rate, self._tokens + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._tokens < 1.0:
            return True
        self._tokens -= 1.0
        return False

    @staticmethod
    def _error(
        status: int, message: str, path: str = "/v1", headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """An error in the shape of the route family of ``path`` (native: ``{"error": message}``)."""
        return web.json_response(providers.error_body(path, status, message), status=status, headers=headers)

    def _check_auth(self, request: web.Request, *, bearer: bool) -> None:
        if self.api_key is None:
            return
        if bearer:
            ok = request.headers.get("Authorization", "") == f"Bearer {self.api_key}"
        else:
            ok = request.headers.get("X-Moondream-Auth", "") == self.api_key
        if not ok:
            raise _BadRequest("Invalid or missing API key", status=401)

    async def _body(self, request: web.Request, *, bearer: bool = False) -> dict[str, Any]:
        self._check_auth(request, bearer=bearer)
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise _BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        settings = body.get("settings")
        if settings is not None and not isinstance(settings, dict):
            raise _BadRequest("settings must be an object")
        return body

    @staticmethod
    def _text_field(body: Mapping[str, Any], name: str) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise _BadRequest(f"{name} is required")
        return value

    def _max_objects(self, body: Mapping[str, Any]) -> int:
        settings = body.get("settings") or {}
        value = settings.get("max_objects", self.max_objects_default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest("settings.max_objects must be a positive integer")
        return value

    @staticmethod
    def _spatial_refs(body: Mapping[str, Any]) -> list[tuple[float, float]]:
        refs = body.get("spatial_refs")
        if refs is None:
            return []
        if not isinstance(refs, list):
            raise _BadRequest("spatial_refs must be a list of [x, y] points or [x1, y1, x2, y2] boxes")
        out = []
        for ref in refs:
            if (
                not isinstance(ref, list)
                or len(ref) not in (2, 4)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in ref)
            ):
                raise _BadRequest("spatial_refs must be a list of [x, y] points or [x1, y1, x2, y2] boxes")
            if len(ref) == 2:
                out.append((float(ref[0]), float(ref[1])))
            else:
                out.append(((ref[0] + ref[2]) / 2.0, (ref[1] + ref[3]) / 2.0))
        return out

    async def _json(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        rid = _request_id()
        payload = {**payload, "request_id": rid}
        return await self._send(request, json.dumps(payload).encode(), headers={"X-Request-Id": rid})

    async def _send(
        self,
        request: web.Request,
        data: bytes,
        *,
        status: int = 200,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send ``data``, or (under ``drop_stream_next``) half of it and cut the connection."""
        headers = dict(headers or {})
        drop = _DROP_AFTER.get()
        if drop is None:
            return web.Response(body=data, status=status, content_type=content_type, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = content_type
        resp.content_length = len(data) + 64
        try:
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
        except ConnectionError:
            pass
        self._cut(request)
        return resp

    async def _stream(self, request: web.Request, events: list[str], rid: str) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"Cache-Control": "no-cache", "X-Request-Id": rid}
        )
        resp.content_type = "text/event-stream"
        drop = _DROP_AFTER.get()
        limit = len(events) if drop is None else min(drop, len(events) - 1)
        try:
            await resp.prepare(request)
            for i, event in enumerate(events[:limit]):
                if i and self.stream_interval > 0:
                    await self._sleep(self.stream_interval)
                await resp.write(event.encode())
            if drop is not None:
                self._cut(request)
                return resp
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away mid-stream: nothing to report
        return resp

    @staticmethod
    def _cut(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.close()

    def _text_events(self, text: str, rid: str, extra: Mapping[str, Any] | None = None) -> list[str]:
        events = [_sse({self.stream_text_key: piece}) for piece in _words(text)]
        final: dict[str, Any] = {"completed": True, "request_id": rid}
        if extra:
            final.update(extra)
        events.append(_sse(final))
        return events

    # -- skills -------------------------------------------------------------------

    async def _h_caption(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        length = body.get("length", "normal")
        if length not in ("short", "normal", "long"):
            raise _BadRequest("length must be one of 'short', 'normal', 'long'")
        img, found = await asyncio.to_thread(_see, body.get("image_url"))
        caption = await asyncio.to_thread(_caption, img, found, length)
        if body.get("stream"):
            rid = _request_id()
            return await self._stream(request, self._text_events(caption, rid), rid)
        return await self._json(request, {"caption": caption})

    async def _h_query(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        question = self._text_field(body, "question")
        self._spatial_refs(body)
        found = img = None
        if body.get("image_url") is not None:
            img, found = await asyncio.to_thread(_see, body.get("image_url"))
        answer, reasoning = await asyncio.to_thread(answer_question, question, found, img)
        want_reasoning = bool(body.get("reasoning"))
        if body.get("stream"):
            rid = _request_id()
            extra = {"reasoning": reasoning} if want_reasoning else None
            return await self._stream(request, self._text_events(answer, rid, extra), rid)
        payload: dict[str, Any] = {"answer": answer}
        if want_reasoning:
            payload["reasoning"] = reasoning
        return await self._json(request, payload)

    async def _located(self, request: web.Request) -> tuple[dict[str, Any], list[Found], int]:
        body = await self._body(request)
        phrase = self._text_field(body, "object")
        cap = self._max_objects(body)
        refs = self._spatial_refs(body)
        img, found = await asyncio.to_thread(_see, body.get("image_url"))
        if text_reader.is_text_phrase(phrase):
            return body, await asyncio.to_thread(_text_lines, img, refs), cap
        return body, _matching(found, phrase, refs), cap

    async def _h_detect(self, request: web.Request) -> web.StreamResponse:
        _, hits, cap = await self._located(request)
        return await self._json(request, {"objects": [_box(f) for f in hits[:cap]]})

    async def _h_point(self, request: web.Request) -> web.StreamResponse:
        _, hits, cap = await self._located(request)
        points = [{"x": round(f.center[0], 6), "y": round(f.center[1], 6)} for f in hits[:cap]]
        return await self._json(request, {"points": points})

    async def _h_segment(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        phrase = self._text_field(body, "object")
        refs = self._spatial_refs(body)
        _, found = await asyncio.to_thread(_see, body.get("image_url"))
        _, path, coarse, bbox = await asyncio.to_thread(_segmented, found, phrase, refs)
        if body.get("stream"):
            rid = _request_id()
            events = []
            if bbox is not None:
                events.append(_sse({"type": "bbox", "bbox": bbox}))
                for piece in engine.split_path_chunks(coarse):
                    events.append(_sse({"type": "path_delta", "chunk": piece, "completed": False}))
            events.append(
                _sse({"type": "final", "path": path, "bbox": bbox, "completed": True, "request_id": rid})
            )
            return await self._stream(request, events, rid)
        return await self._json(request, {"path": path, "bbox": bbox})

    # -- OpenAI-compatible ----------------------------------------------------------

    async def _h_models(self, request: web.Request) -> web.StreamResponse:
        self._check_auth(request, bearer=True)
        data = [{"id": m, "object": "model", "owned_by": "moondream"} for m in self.models]
        return await self._json(request, {"object": "list", "data": data})

    async def _h_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, bearer=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list")
        question, image_url = _chat_inputs(messages)
        if not question:
            raise _BadRequest("the last user message has no text")
        found = img = None
        if image_url is not None:
            img, found = await asyncio.to_thread(_see, image_url)
        answer, reasoning = await asyncio.to_thread(answer_question, question, found, img)
        want_reasoning = bool(body.get("reasoning"))
        model = body.get("model") if isinstance(body.get("model"), str) else self.models[0]
        cid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        completion_tokens = len(answer.split()) + (len(reasoning["text"].split()) if want_reasoning else 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if body.get("stream"):
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

            def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
                return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

            events = [chunk({"role": "assistant", "content": ""})]
            if want_reasoning:
                events += [chunk({"reasoning": piece}) for piece in _words(reasoning["text"], 4)]
            events += [chunk({"content": piece}) for piece in _words(answer)]
            events.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}))
            events.append("data: [DONE]\n\n")
            return await self._stream(request, events, cid)
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        if want_reasoning:
            message["reasoning"] = reasoning["text"]
        payload = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }
        return await self._json(request, payload)


# -- engine calls shared by the native routes and the fal / AIgateway ones (providers.py)


def _caption(img: Image.Image, found: Sequence[Found], length: str) -> str:
    return make_caption(found, engine.background_name(img, found), length)


def _matching(found: Sequence[Found], phrase: str, refs: Sequence[tuple[float, float]] = ()) -> list[Found]:
    """Shapes ``phrase`` names, in reading order; with ``refs`` only those under a ref point."""
    hits = [f for f in found if engine.matches(phrase, f)]
    if refs:
        hits = [f for f in hits if any(f.contains(x, y) for x, y in refs)]
    return hits


def _text_lines(img: Image.Image, refs: Sequence[tuple[float, float]] = ()) -> list[Found]:
    """The text lines read in ``img`` as box-shaped ``Found`` (kind "text"), for detect and
    point of "text"; with ``refs`` only the lines under a ref point."""
    w, h = img.size
    hits = []
    for line in text_reader.read_text(img):
        x0, y0, x1, y1 = (max(0, min(v, lim)) for v, lim in zip(line.bbox_px, (w, h, w, h)))
        hits.append(
            Found(
                kind="text",
                color="black",
                label=f"text {line.text!r}",
                bbox=(x0 / w, y0 / h, x1 / w, y1 / h),
                center=((x0 + x1) / 2 / w, (y0 + y1) / 2 / h),
                area_px=(x1 - x0) * (y1 - y0),
                bbox_px=(x0, y0, x1, y1),
                image_size=(w, h),
                fill_ratio=1.0,
                mask_crop=np.ones((y1 - y0, x1 - x0), dtype=bool),
            )
        )
    return [f for f in hits if any(f.contains(x, y) for x, y in refs)] if refs else hits


def _segmented(
    found: Sequence[Found], phrase: str, refs: list[tuple[float, float]]
) -> tuple[Found | None, str, str, dict[str, float] | None]:
    """(target, refined path, coarse path, bbox) of the segment skill; ("", "", None) when none."""
    target = _pick([f for f in found if engine.matches(phrase, f)], refs)
    if target is None:
        return None, "", "", None
    return target, target.refined_path(), target.coarse_path(), _box(target)


def _pick(hits: list[Found], refs: list[tuple[float, float]]) -> Found | None:
    if not hits:
        return None
    if not refs:
        return hits[0]
    x, y = refs[0]
    for f in hits:
        if f.contains(x, y):
            return f
    for f in hits:
        if f.bbox[0] <= x <= f.bbox[2] and f.bbox[1] <= y <= f.bbox[3]:
            return f
    return min(hits, key=lambda f: (f.center[0] - x) ** 2 + (f.center[1] - y) ** 2)


def _chat_inputs(messages: list[Any]) -> tuple[str, str | None]:
    """(text of the last user message, URL of the last image in the conversation)."""
    question = ""
    image_url: str | None = None
    for msg in messages:
        if not isinstance(msg, dict):
            raise _BadRequest("each message must be an object with role and content")
        content = msg.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise _BadRequest("content parts must be objects")
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str):
                        raise _BadRequest("image_url parts need a url")
                    image_url = url
        elif content is not None:
            raise _BadRequest("message content must be a string or a list of parts")
        if msg.get("role") == "user" and texts:
            question = " ".join(texts)
    return question, image_url
