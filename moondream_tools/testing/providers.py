"""fal.ai and AIgateway on the ``FakeMoondream`` server, over the same toy vision engine.

It is one module of about 1,000 lines on purpose, like ``server.py``: two services' whole
wire formats (routes, validation, queue lifecycle, files, errors) read in one place, apart
from the client code they test.

Routes (all on ``fake.url``; requests are recorded in ``fake.requests``, ``latency``, the
rate limit and every fault injector apply as on the native routes):

==========================================================  =====================================
``POST /fal/fal-ai/moondream3-preview/{skill}``              fal sync: caption, query, detect,
                                                             point, segment
``POST /fal/fal-ai/sam-3/image``                             fal sync: SAM 3
``POST /fal-queue/fal-ai/moondream3-preview/{skill}``        fal queue submit (and ``sam-3/image``)
``GET  /fal-queue/fal-ai/{app}/requests/{id}/status``        queue status (``?logs=1``)
``GET  /fal-queue/fal-ai/{app}/requests/{id}``               queue result
``PUT  /fal-queue/fal-ai/{app}/requests/{id}/cancel``        queue cancel
``GET  /fal-files/{token}/{name}``                           files fal answers with (no auth)
``POST /aigateway/v1/images/edits``                          AIgateway, multipart or JSON
``GET  /aigateway-files/{token}/{name}``                     ``response_format: "url"`` files
==========================================================  =====================================

``{app}`` is ``moondream3-preview`` or ``sam-3``: as on fal, status / result / cancel URLs drop
the endpoint's sub-path; clients should use the URLs the submit answer gives.

Wire facts come from fal's published schemas (fal-js ``types.gen.ts`` / ``zod.gen.ts``), fal's
queue docs and AIgateway's OpenAPI document (see PROVIDERS.md). Where they are silent:

* fal request bodies are validated strictly: unknown fields, wrong types and out-of-range
  values answer 422 ``{"detail": [{"loc": ["body", ...], "msg", "type"}]}`` (pydantic style).
* ``image_url`` must be a data URI: the emulator never fetches, an http(s) URL is a 422.
* SAM 3 ``point_prompts`` / ``box_prompts`` are integer pixel coordinates of the received image
  (fal's schema types them ``int``, "X Coordinate of the prompt"); a fractional number (a
  normalized coordinate) is a 422 ``int_from_float``.
* SAM 3 answers one mask per shape instance the prompts select, in reading order of the
  shapes (top-to-bottom, then left-to-right, the engine's order) with scores
  ``0.95 - 0.01 * i``, so the order is also by descending score. ``max_masks`` (default 3)
  caps them only with ``return_multiple_masks``, as fal's schema says. fal's wording ("If
  True, upload and return multiple generated masks as defined by max_masks") can also be read
  as "one (primary) mask unless return_multiple_masks": set ``fake.fal_sam3_primary_only``
  to emulate that reading.
* The queue computes the answer at submit time and serves it once the status has been polled
  to COMPLETED (``fake.fal_queue_polls`` polls first: IN_QUEUE ..., then IN_PROGRESS). A
  validation error becomes the job's result (COMPLETED, then 422 on the response URL).
  A cancelled job turns COMPLETED with ``error`` / ``error_type: "request_cancelled"``.
* AIgateway answers, for both models, the binary mask (PNG, mode L, 0/255) of the union of
  every shape matching the prompt, at the received image's size (no page documents this).

Self-contained like the rest of the package (stdlib, aiohttp, numpy, PIL).
"""

from __future__ import annotations

import asyncio
import base64
import email.message
import email.utils
import io
import json
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web
from PIL import Image, ImageDraw

from . import engine
from . import text as text_reader
from . import server as _srv  # partially initialised while server imports us: used at call time only
from .engine import Found

if TYPE_CHECKING:
    from .server import FakeMoondream

__all__ = [
    "AIGATEWAY_MODELS",
    "FAL_MOONDREAM",
    "FAL_SAM3",
    "FormFile",
    "ProvidersMixin",
    "error_body",
    "parse_form",
]

FAL_MOONDREAM = "fal-ai/moondream3-preview"
FAL_SAM3 = "fal-ai/sam-3/image"
AIGATEWAY_MODELS = ("moondream/moondream3-preview-segment", "meta/sam-3-image")
FAL_MAX_SIDE = 7000  # each Moondream endpoint on fal: max 7000 x 7000 px
_FILES_KEPT = 512
_CANCELLED = "Request was cancelled"


def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it (segment-wise: "/fal" is not under "/fa")."""
    prefix = prefix.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


# ---------------------------------------------------------------------------------------
# error shapes per route family

_GATEWAY_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    402: ("insufficient_credits", "insufficient_credits"),
    403: ("permission_error", "forbidden"),
    404: ("not_found", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    503: ("service_unavailable", "service_unavailable"),
}


def _family(path: str) -> str:
    if under(path, "/fal") or under(path, "/fal-queue") or under(path, "/fal-files"):
        return "fal"
    if under(path, "/aigateway") or under(path, "/aigateway-files"):
        return "aigateway"
    return "native"


def _gateway_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind, default_code = _GATEWAY_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", "error")
    )
    return {"error": {"message": message, "type": kind, "code": code or default_code, "param": param}}


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """An error body in the shape of ``path``'s route family: native ``{"error": message}``,
    fal ``{"detail": message}``, AIgateway ``{"error": {message, type, code, param}}``."""
    family = _family(path)
    if family == "fal":
        return {"detail": message}
    if family == "aigateway":
        return _gateway_error(status, message)
    return {"error": message}


class _FalError(Exception):
    def __init__(self, status: int, detail: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


class _GatewayError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = _gateway_error(status, message, param=param, code=code)


# ---------------------------------------------------------------------------------------
# multipart/form-data


@dataclass(frozen=True)
class FormFile:
    """A file part of a multipart request (``RecordedRequest.form["image"]``)."""

    filename: str | None
    content_type: str
    size: int
    data: bytes = field(repr=False)


def _param(headers: email.message.Message, name: str) -> str | None:
    value = headers.get_param(name, header="content-disposition")
    if value is None:
        return None
    if isinstance(value, tuple):
        value = email.utils.collapse_rfc2231_value(value)
    return str(value)


def parse_form(content_type: str, body: bytes) -> dict[str, Any] | None:
    """Fields of a multipart/form-data body (None for any other content type).

    Text parts become ``str``; parts with a filename or a non-text content type become
    :class:`FormFile`. A repeated name keeps its last part.
    """
    ctype = email.message.Message()
    ctype["content-type"] = content_type or "text/plain"
    if ctype.get_content_type() != "multipart/form-data":
        return None
    boundary = ctype.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return None
    form: dict[str, Any] = {}
    for chunk in (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):
            break
        line_end = chunk.find(b"\r\n")
        if line_end < 0:
            continue
        head, sep, content = chunk[line_end + 2 :].partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = email.message.Message()
        for line in head.split(b"\r\n"):
            key, colon, value = line.decode("utf-8", "replace").partition(":")
            if colon:
                headers[key.strip()] = value.strip()
        name = _param(headers, "name")
        if name is None:
            continue
        filename = headers.get_filename()
        part_type = headers.get("content-type")
        if filename is None and (part_type is None or part_type.lower().startswith("text/")):
            charset = headers.get_content_charset() or "utf-8"
            form[name] = content.decode(charset, "replace")
        else:
            ctype_part = headers.get_content_type() if part_type else "application/octet-stream"
            form[name] = FormFile(filename, ctype_part, len(content), content)
    return form


# ---------------------------------------------------------------------------------------
# the FakeMoondream side: attributes, fault injectors, state


@dataclass
class _QueueFault:
    kind: str  # "stall" | "error"
    remaining: int
    message: str = ""
    error_type: str = ""
    status: int = 500


@dataclass
class _Job:
    id: str
    app: str  # "fal-ai/moondream3-preview" or "fal-ai/sam-3"
    endpoint: str
    polls: int
    status: int = 200
    data: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stalled: bool = False
    error: str | None = None
    error_type: str | None = None
    done: bool = False
    seen: int = 0

    def poll(self) -> tuple[str, int | None]:
        """Advance by one status poll: (status, queue_position)."""
        if self.done:
            return "COMPLETED", None
        if self.stalled:
            return "IN_QUEUE", 0
        left = self.polls - self.seen
        self.seen += 1
        if left <= 0:
            self.done = True
            return "COMPLETED", None
        if left == 1:
            return "IN_PROGRESS", None
        return "IN_QUEUE", left - 2


class ProvidersMixin:
    """fal.ai and AIgateway attributes of ``FakeMoondream``.

    ``fal_key`` / ``aigateway_key``: the keys expected in ``Authorization: Key <fal_key>`` /
    ``Authorization: Bearer <aigateway_key>`` (random unless given; None accepts anyone).
    ``fal_base_url`` (``{url}/fal``), ``fal_queue_base_url`` (``{url}/fal-queue``) and
    ``aigateway_base_url`` (``{url}/aigateway/v1``) stand in for ``https://fal.run``,
    ``https://queue.fal.run`` and ``https://api.aigateway.sh/v1``. ``fal_queue_polls``
    (settable, default 2): status polls a queue job answers before COMPLETED, read at submit.
    ``fal_cancelled``: request ids whose cancellation was requested, in order.
    ``fal_sam3_primary_only`` (settable, default False): SAM 3 without ``return_multiple_masks``
    answers only the first (primary) mask instead of one per instance.
    """

    fal_key: str | None
    aigateway_key: str | None
    fal_queue_polls: int
    fal_cancelled: list[str]
    fal_sam3_primary_only: bool

    if TYPE_CHECKING:

        @property
        def url(self) -> str: ...

    def _init_providers(self, fal_key: Any, aigateway_key: Any) -> None:
        self.fal_key = f"{uuid.uuid4()}:{secrets.token_hex(16)}" if fal_key is ... else fal_key
        self.aigateway_key = "aig-" + secrets.token_hex(20) if aigateway_key is ... else aigateway_key
        self.fal_queue_polls = 2
        self.fal_sam3_primary_only = False
        self.fal_cancelled = []
        self._fal_jobs: dict[str, _Job] = {}
        self._queue_faults: list[_QueueFault] = []
        self._files: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()
        self._files_lock = threading.Lock()  # files are stored from worker threads too

    @property
    def fal_base_url(self) -> str:
        """Stands in for ``https://fal.run``: ``{fal_base_url}/fal-ai/moondream3-preview/detect``."""
        return f"{self.url}/fal"

    @property
    def fal_queue_base_url(self) -> str:
        """Stands in for ``https://queue.fal.run``."""
        return f"{self.url}/fal-queue"

    @property
    def aigateway_base_url(self) -> str:
        """Stands in for ``https://api.aigateway.sh/v1``."""
        return f"{self.url}/aigateway/v1"

    def fal_queue_stall_next(self, count: int = 1) -> None:
        """The next ``count`` queue submissions stay IN_QUEUE forever (until cancelled)."""
        self._add_queue_fault(_QueueFault("stall", count))

    def fal_queue_error_next(
        self,
        count: int = 1,
        message: str = "Runner disconnected while processing the request",
        error_type: str = "runner_disconnected",
        *,
        status: int = 500,
    ) -> None:
        """The next ``count`` queue jobs turn COMPLETED with ``error`` / ``error_type``; their
        response URL answers ``status`` with ``{"detail": message, "error_type": ...}`` and an
        ``X-Fal-Error-Type`` header."""
        self._add_queue_fault(_QueueFault("error", count, message=message, error_type=error_type, status=status))

    def _add_queue_fault(self, fault: _QueueFault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be at least 1")
        self._queue_faults.append(fault)

    def _take_queue_fault(self) -> _QueueFault | None:
        if not self._queue_faults:
            return None
        fault = self._queue_faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._queue_faults.pop(0)
        return fault

    def _pending_provider_faults(self) -> int:
        return sum(f.remaining for f in self._queue_faults)

    def _reset_providers(self) -> None:
        self._queue_faults.clear()
        self.fal_cancelled.clear()

    def _store_file(self, prefix: str, name: str, data: bytes, content_type: str) -> str:
        token = secrets.token_hex(8)
        with self._files_lock:
            self._files[(token, name)] = (data, content_type)
            while len(self._files) > _FILES_KEPT:
                self._files.popitem(last=False)
        return f"{self.url}/{prefix}/{token}/{name}"


# ---------------------------------------------------------------------------------------
# fal request validation (pydantic-style 422 details)

_Check = Callable[[Any, tuple[Any, ...]], list[dict[str, Any]]]
_Spec = dict[str, tuple[bool, _Check]]  # name -> (required, check)


def _e(loc: Sequence[Any], kind: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _string(min_length: int = 0) -> _Check:
    def check(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        if not isinstance(v, str):
            return [_e(loc, "string_type", "Input should be a valid string")]
        if len(v) < min_length:
            return [_e(loc, "string_too_short", f"String should have at least {min_length} character")]
        return []

    return check


def _boolean(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [] if isinstance(v, bool) else [_e(loc, "bool_type", "Input should be a valid boolean")]


def _bounds(v: float, loc: tuple[Any, ...], lo: float | None, hi: float | None) -> list[dict[str, Any]]:
    if lo is not None and v < lo:
        return [_e(loc, "greater_than_equal", f"Input should be greater than or equal to {lo}")]
    if hi is not None and v > hi:
        return [_e(loc, "less_than_equal", f"Input should be less than or equal to {hi}")]
    return []


def _number(lo: float | None = None, hi: float | None = None) -> _Check:
    def check(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        if not _is_number(v):
            return [_e(loc, "float_type", "Input should be a valid number")]
        return _bounds(v, loc, lo, hi)

    return check


def _integer(lo: int | None = None, hi: int | None = None) -> _Check:
    def check(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        if isinstance(v, float) and _is_number(v) and not v.is_integer():
            return [_e(loc, "int_from_float", "Input should be a valid integer, got a number with a fractional part")]
        if not _is_number(v):
            return [_e(loc, "int_type", "Input should be a valid integer")]
        return _bounds(v, loc, lo, hi)

    return check


def _literal(*choices: Any) -> _Check:
    names = [repr(c) if isinstance(c, str) else str(c) for c in choices]
    text = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]

    def check(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        ok = any(v == c and type(v) is type(c) for c in choices)
        return [] if ok else [_e(loc, "literal_error", f"Input should be {text}")]

    return check


def _list_of(item: _Check) -> _Check:
    def check(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        if not isinstance(v, list):
            return [_e(loc, "list_type", "Input should be a valid list")]
        errors: list[dict[str, Any]] = []
        for i, x in enumerate(v):
            errors += item(x, (*loc, i))
        return errors

    return check


def _check_fields(body: Mapping[str, Any], spec: _Spec, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for name, (required, check) in spec.items():
        if name not in body:
            if required:
                errors.append(_e((*loc, name), "missing", "Field required"))
            continue
        errors += check(body[name], (*loc, name))
    for name in body:
        if name not in spec:
            errors.append(_e((*loc, name), "extra_forbidden", "Extra inputs are not permitted"))
    return errors


def _model(spec: _Spec) -> _Check:
    def check(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        if not isinstance(v, dict):
            return [_e(loc, "model_type", "Input should be a valid dictionary or object")]
        return _check_fields(v, spec, loc)

    return check


def _spatial_reference(v: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    if isinstance(v, dict):
        errors = _check_fields(v, {"x": (True, _number()), "y": (True, _number())}, loc)
        values = [v.get("x"), v.get("y")]
    elif isinstance(v, list) and len(v) in (2, 4) and all(_is_number(x) for x in v):
        errors, values = [], list(v)
    else:
        return [
            _e(loc, "value_error", "Value error, a spatial reference is {x, y}, [x, y] or [x1, y1, x2, y2]")
        ]
    if not errors and not all(0 <= x <= 1 for x in values):
        errors.append(_e(loc, "value_error", "Value error, spatial references are normalized to [0, 1]"))
    return errors


_UNIT = _number(0, 1)
_IMAGE = (True, _string())
_FAL_SPECS: dict[str, _Spec] = {
    "caption": {
        "image_url": _IMAGE,
        "length": (False, _literal("short", "normal", "long")),
        "temperature": (False, _UNIT),
        "top_p": (False, _UNIT),
    },
    "query": {
        "image_url": _IMAGE,
        "prompt": (True, _string(1)),
        "reasoning": (False, _boolean),
        "temperature": (False, _UNIT),
        "top_p": (False, _UNIT),
    },
    "detect": {"image_url": _IMAGE, "prompt": (True, _string(1)), "preview": (False, _boolean)},
    "point": {"image_url": _IMAGE, "prompt": (True, _string(1)), "preview": (False, _boolean)},
    "segment": {
        "image_url": _IMAGE,
        "object": (True, _string()),
        "spatial_references": (False, _list_of(_spatial_reference)),
        "settings": (
            False,
            _model({"temperature": (False, _UNIT), "top_p": (False, _UNIT), "max_tokens": (False, _integer(1))}),
        ),
        "preview": (False, _boolean),
    },
    FAL_SAM3: {
        "image_url": _IMAGE,
        "prompt": (False, _string()),
        "text_prompt": (False, _string()),
        "point_prompts": (
            False,
            _list_of(
                _model(
                    {
                        "x": (True, _integer()),
                        "y": (True, _integer()),
                        "label": (False, _literal(0, 1)),
                        "object_id": (False, _integer()),
                        "frame_index": (False, _integer()),
                    }
                )
            ),
        ),
        "box_prompts": (
            False,
            _list_of(
                _model(
                    {
                        "x_min": (True, _integer()),
                        "y_min": (True, _integer()),
                        "x_max": (True, _integer()),
                        "y_max": (True, _integer()),
                        "object_id": (False, _integer()),
                        "frame_index": (False, _integer()),
                    }
                )
            ),
        ),
        "apply_mask": (False, _boolean),
        "sync_mode": (False, _boolean),
        "output_format": (False, _literal("jpeg", "png", "webp")),
        "return_multiple_masks": (False, _boolean),
        "max_masks": (False, _integer(1, 32)),
        "include_scores": (False, _boolean),
        "include_boxes": (False, _boolean),
    },
}


def _validate(body: Any, spec: _Spec) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _FalError(422, [_e((), "model_attributes_type", "Input should be a valid dictionary or object")])
    errors = _check_fields(body, spec, ())
    if errors:
        raise _FalError(422, errors)
    return body


def _fal_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        raise _FalError(422, [_e((pos,), "json_invalid", "JSON decode error")]) from None


def _fal_see(url: str, max_side: int | None) -> tuple[Image.Image, list[Found]]:
    """Decode a data URI and analyze it; fal-style 422s for anything else."""
    loc = ("image_url",)
    if url.startswith(("http://", "https://")):
        raise _FalError(
            422,
            [
                _e(
                    loc,
                    "value_error",
                    "FakeMoondream only accepts data URIs (data:image/...;base64,...) in image_url; "
                    "it never fetches http(s) URLs",
                )
            ],
        )
    try:
        img = _srv._decode_image(url)
    except _srv._BadRequest as exc:
        raise _FalError(422, [_e(loc, "image_load_error", f"Could not load the image: {exc.message}")]) from None
    if max_side is not None and max(img.size) > max_side:
        raise _FalError(
            422, [_e(loc, "image_too_large", f"Image dimensions exceed the maximum of {max_side}x{max_side}")]
        )
    return img, engine.analyze(img)


# ---------------------------------------------------------------------------------------
# fal answers


def _usage(prompt: str, output_tokens: int) -> dict[str, Any]:
    """Deterministic usage_info: 729 image tokens plus the prompt's words."""
    input_tokens = 729 + len(prompt.split())
    prefill = round(40.0 + input_tokens * 0.02, 2)
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "ttft_ms": round(prefill + 6.0, 2),
        "prefill_time_ms": prefill,
        "decode_time_ms": round(6.0 * output_tokens, 2),
    }


def _text_tokens(text: str) -> int:
    return max(1, (4 * len(text.split()) + 2) // 3)


def _encode(img: Image.Image, fmt: str = "png") -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue(), f"image/{fmt}"


def _mask_image(mask: np.ndarray) -> Image.Image:
    """(H, W) bool -> mode L image, 255 on the mask, 0 elsewhere."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def _image_file(fake: ProvidersMixin, img: Image.Image, stem: str, fmt: str = "png", *, inline: bool = False) -> dict[str, Any]:
    """fal's Image / ImageFile object; ``inline`` puts the bytes in a data URI (sync_mode)."""
    data, content_type = _encode(img, fmt)
    name = f"{stem}.{fmt}"
    if inline:
        url = f"data:{content_type};base64," + base64.b64encode(data).decode()
    else:
        url = fake._store_file("fal-files", name, data, content_type)
    return {
        "url": url,
        "content_type": content_type,
        "file_name": name,
        "file_size": len(data),
        "width": img.width,
        "height": img.height,
    }


def _preview(img: Image.Image, shapes: Sequence[Found], points: bool) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = img.size
    for f in shapes:
        if points:
            x, y = f.center[0] * w, f.center[1] * h
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 0, 255), outline=(0, 0, 0))
        else:
            x0, y0, x1, y1 = f.bbox_px
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 255), width=2)
    return out


def _fal_refs(refs: list[Any] | None) -> list[tuple[float, float]]:
    """fal spatial_references -> the native ``[[x, y] | [x1, y1, x2, y2]]`` points."""
    native = [[r["x"], r["y"]] if isinstance(r, dict) else r for r in refs or []]
    return _srv.FakeMoondream._spatial_refs({"spatial_refs": native})


async def _fal_moondream(fake: ProvidersMixin, skill: str, body: Any) -> dict[str, Any]:
    values = _validate(body, _FAL_SPECS[skill])
    img, found = await asyncio.to_thread(_fal_see, values["image_url"], FAL_MAX_SIDE)
    if skill == "caption":
        text = await asyncio.to_thread(_srv._caption, img, found, values.get("length", "normal"))
        return {"output": text, "finish_reason": "stop", "usage_info": _usage("", _text_tokens(text))}
    if skill == "query":
        answer, reasoning = await asyncio.to_thread(_srv.answer_question, values["prompt"], found, img)
        out: dict[str, Any] = {"output": answer}
        tokens = _text_tokens(answer)
        if values.get("reasoning", True):  # fal's default is true
            out["reasoning"] = reasoning["text"]
            tokens += _text_tokens(reasoning["text"])
        return {**out, "finish_reason": "stop", "usage_info": _usage(values["prompt"], tokens)}
    if skill in ("detect", "point"):
        if text_reader.is_text_phrase(values["prompt"]):
            hits = await asyncio.to_thread(_srv._text_lines, img)
        else:
            hits = _srv._matching(found, values["prompt"])  # fal has no max_objects: every hit
        if skill == "detect":
            out = {"objects": [_srv._box(f) for f in hits]}
        else:
            out = {"points": [{"x": round(f.center[0], 6), "y": round(f.center[1], 6)} for f in hits]}
        if values.get("preview"):
            picture = await asyncio.to_thread(_preview, img, hits, skill == "point")
            out["image"] = await asyncio.to_thread(_image_file, fake, picture, "preview")
        tokens = 1 + (4 if skill == "detect" else 2) * len(hits)
        return {**out, "finish_reason": "stop", "usage_info": _usage(values["prompt"], tokens)}
    # segment
    refs = _fal_refs(values.get("spatial_references"))
    target, path, _, bbox = await asyncio.to_thread(_srv._segmented, found, values["object"], refs)
    out = {"path": path if target is not None else None, "bbox": bbox}
    if values.get("preview") and target is not None:
        out["image"] = await asyncio.to_thread(_image_file, fake, _mask_image(target.mask()), "mask")
    tokens = 1 + len(path) // 4
    return {**out, "finish_reason": "stop", "usage_info": _usage(values["object"], tokens)}


def _inside_px(f: Found, x: int, y: int) -> bool:
    x0, y0, x1, y1 = f.bbox_px
    return x0 <= x < x1 and y0 <= y < y1 and bool(f.mask_crop[y - y0, x - x0])


def _overlaps_px(f: Found, box: Mapping[str, int]) -> bool:
    x0, y0, x1, y1 = f.bbox_px
    bx0, by0 = int(box["x_min"]), int(box["y_min"])
    bx1, by1 = max(int(box["x_max"]), bx0 + 1), max(int(box["y_max"]), by0 + 1)
    ix0, iy0, ix1, iy1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
    return ix0 < ix1 and iy0 < iy1 and bool(f.mask_crop[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0].any())


def _sam3_select(found: list[Found], values: Mapping[str, Any]) -> list[Found]:
    """Shapes SAM 3 answers with, in reading order (before the mask count cap)."""
    points = values.get("point_prompts") or []
    boxes = values.get("box_prompts") or []
    text = values.get("prompt", values.get("text_prompt"))
    if isinstance(text, str) and text.strip():
        hits = [f for f in found if engine.matches(text, f)]
    elif points or boxes:
        hits = list(found)  # visual prompts alone
    else:
        return []  # fal's default prompt is "wheel": no shape is one
    positive = [(int(p["x"]), int(p["y"])) for p in points if p.get("label", 1) == 1]
    negative = [(int(p["x"]), int(p["y"])) for p in points if p.get("label", 1) == 0]
    if positive or boxes:
        hits = [
            f
            for f in hits
            if any(_inside_px(f, x, y) for x, y in positive) or any(_overlaps_px(f, b) for b in boxes)
        ]
    return [f for f in hits if not any(_inside_px(f, x, y) for x, y in negative)]


def _sam3_answer(fake: ProvidersMixin, values: Mapping[str, Any]) -> dict[str, Any]:
    _, found = _fal_see(values["image_url"], None)
    hits = _sam3_select(found, values)
    if values.get("return_multiple_masks"):
        hits = hits[: int(values.get("max_masks", 3))]
    elif fake.fal_sam3_primary_only:
        hits = hits[:1]
    fmt = values.get("output_format", "png")
    inline = bool(values.get("sync_mode"))
    masks, scores, boxes, metadata = [], [], [], []
    for i, f in enumerate(hits):
        masks.append(_image_file(fake, _mask_image(f.mask()), f"mask_{i}", fmt, inline=inline))
        score = round(max(0.5, 0.95 - 0.01 * i), 4)
        x0, y0, x1, y1 = f.bbox
        box = [round((x0 + x1) / 2, 6), round((y0 + y1) / 2, 6), round(x1 - x0, 6), round(y1 - y0, 6)]
        scores.append(score)
        boxes.append(box)
        metadata.append({"index": i, "score": score, "box": box})
    out: dict[str, Any] = {"masks": masks}
    if values.get("include_scores"):
        out["scores"] = scores
    if values.get("include_boxes"):
        out["boxes"] = boxes
    out["metadata"] = metadata
    return out


async def _fal_compute(fake: ProvidersMixin, endpoint: str, body: Any) -> dict[str, Any]:
    if endpoint == FAL_SAM3:
        values = _validate(body, _FAL_SPECS[FAL_SAM3])
        return await asyncio.to_thread(_sam3_answer, fake, values)
    return await _fal_moondream(fake, endpoint.rsplit("/", 1)[1], body)


# ---------------------------------------------------------------------------------------
# handlers


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


class _Routes:
    def __init__(self, fake: FakeMoondream) -> None:
        self.fake = fake

    # -- fal ------------------------------------------------------------------------

    def _fal_auth(self, request: web.Request) -> None:
        key = self.fake.fal_key
        if key is None:
            return
        header = request.headers.get("Authorization", "")
        if not header:
            raise _FalError(401, "Missing credentials: send 'Authorization: Key <FAL_KEY>'")
        if header != f"Key {key}":
            raise _FalError(401, "Invalid credentials: expected 'Authorization: Key <FAL_KEY>' with a valid key")

    async def _fal_reply(
        self, request: web.Request, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        return await self.fake._send(request, _dumps(payload), status=status, headers=headers)

    async def _fal_failure(self, request: web.Request, exc: _FalError) -> web.StreamResponse:
        return await self._fal_reply(request, exc.status, {"detail": exc.detail}, exc.headers)

    async def fal_sync(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.path[len("/fal/") :]
        try:
            self._fal_auth(request)
            payload = await _fal_compute(self.fake, endpoint, _fal_json(await request.read()))
        except _FalError as exc:
            return await self._fal_failure(request, exc)
        return await self._fal_reply(request, 200, payload, {"x-fal-request-id": str(uuid.uuid4())})

    def _urls(self, app: str, rid: str) -> dict[str, str]:
        base = f"{self.fake.fal_queue_base_url}/{app}/requests/{rid}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    async def fal_submit(self, request: web.Request) -> web.StreamResponse:
        fake = self.fake
        endpoint = request.path[len("/fal-queue/") :]
        try:
            self._fal_auth(request)
            body = _fal_json(await request.read())
        except _FalError as exc:
            return await self._fal_failure(request, exc)
        app = "fal-ai/sam-3" if endpoint == FAL_SAM3 else FAL_MOONDREAM
        job = _Job(id=str(uuid.uuid4()), app=app, endpoint=endpoint, polls=max(0, int(fake.fal_queue_polls)))
        fault = fake._take_queue_fault()
        try:
            job.data = await _fal_compute(fake, endpoint, body)
        except _FalError as exc:  # a bad input is the job's result, as on fal
            job.status, job.data, job.headers = exc.status, {"detail": exc.detail}, exc.headers
        if fault is not None and fault.kind == "stall":
            job.stalled = True
        elif fault is not None:
            job.error, job.error_type = fault.message, fault.error_type
            job.status = fault.status
            job.data = {"detail": fault.message, "error_type": fault.error_type}
            job.headers = {"X-Fal-Error-Type": fault.error_type}
        job.done = job.polls == 0 and not job.stalled
        fake._fal_jobs[job.id] = job
        answer = {
            "request_id": job.id,
            "status": "IN_QUEUE",
            "queue_position": 0 if job.stalled else max(0, job.polls - 2),
            **self._urls(app, job.id),
        }
        return await self._fal_reply(request, 200, answer)

    def _job(self, request: web.Request) -> _Job:
        self._fal_auth(request)
        job = self.fake._fal_jobs.get(request.match_info["rid"])
        if job is None or job.app != "fal-ai/" + request.match_info["app"]:
            raise _FalError(404, "Request not found")
        return job

    async def fal_status(self, request: web.Request) -> web.StreamResponse:
        try:
            job = self._job(request)
        except _FalError as exc:
            return await self._fal_failure(request, exc)
        state, position = job.poll()
        answer: dict[str, Any] = {"status": state, "request_id": job.id, **self._urls(job.app, job.id)}
        if position is not None:
            answer["queue_position"] = position
        if request.query.get("logs") in ("1", "true"):
            logs = [] if state == "IN_QUEUE" else [
                {"message": f"running {job.endpoint}", "level": "INFO", "source": "user", "timestamp": _now()}
            ]
            answer["logs"] = logs
        if state == "COMPLETED":
            answer["metrics"] = {"inference_time": 0.05}
            if job.error is not None:
                answer["error"], answer["error_type"] = job.error, job.error_type
        return await self._fal_reply(request, 200 if state == "COMPLETED" else 202, answer)

    async def fal_result(self, request: web.Request) -> web.StreamResponse:
        try:
            job = self._job(request)
        except _FalError as exc:
            return await self._fal_failure(request, exc)
        if not job.done:
            return await self._fal_reply(request, 400, {"detail": "Request is still in progress"})
        headers = {"x-fal-request-id": job.id, **job.headers}
        return await self._fal_reply(request, job.status, job.data, headers)

    async def fal_cancel(self, request: web.Request) -> web.StreamResponse:
        try:
            job = self._job(request)
        except _FalError as exc:
            if exc.status == 404:
                return await self._fal_reply(request, 404, {"status": "NOT_FOUND"})
            return await self._fal_failure(request, exc)
        if job.done:
            return await self._fal_reply(request, 400, {"status": "ALREADY_COMPLETED"})
        self.fake.fal_cancelled.append(job.id)
        job.done = True
        job.error, job.error_type = _CANCELLED, "request_cancelled"
        job.status, job.data, job.headers = 400, {"detail": _CANCELLED}, {}
        return await self._fal_reply(request, 202, {"status": "CANCELLATION_REQUESTED"})

    async def fal_not_found(self, request: web.Request) -> web.StreamResponse:
        return await self._fal_reply(request, 404, {"detail": f"Not found: {request.method} {request.path}"})

    async def file(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["token"], request.match_info["name"])
        with self.fake._files_lock:
            entry = self.fake._files.get(key)
        if entry is None:
            return web.json_response(error_body(request.path, 404, "File not found"), status=404)
        data, content_type = entry
        return await self.fake._send(request, data, content_type=content_type)

    # -- AIgateway --------------------------------------------------------------------

    async def gateway_edits(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = await self._gateway_edits(request)
        except _GatewayError as exc:
            return await self.fake._send(request, _dumps(exc.body), status=exc.status)
        return await self.fake._send(request, _dumps(payload))

    async def _gateway_edits(self, request: web.Request) -> dict[str, Any]:
        fake = self.fake
        if fake.aigateway_key is not None:
            header = request.headers.get("Authorization", "")
            if header != f"Bearer {fake.aigateway_key}":
                message = "Missing API key: send 'Authorization: Bearer <AIGATEWAY_API_KEY>'" if not header else (
                    "Invalid API key"
                )
                raise _GatewayError(401, message)
        raw = await request.read()
        form = parse_form(request.headers.get("Content-Type", ""), raw)
        if form is not None:
            fields: dict[str, Any] = form
            image = form.get("image", form.get("image[]"))
            if not isinstance(image, FormFile):
                raise _GatewayError(400, "image is required (a file part of the multipart form)", param="image")
            img = await asyncio.to_thread(_gateway_image, image.data)
        else:
            try:
                fields = json.loads(raw) if raw else None
            except ValueError:
                fields = None
            if not isinstance(fields, dict):
                raise _GatewayError(
                    400, "Send multipart/form-data (image file) or a JSON object (image_url)", param=None
                )
            url = fields.get("image_url")
            if not isinstance(url, str) or not url:
                raise _GatewayError(400, "image_url is required", param="image_url")
            if url.startswith(("http://", "https://")):
                raise _GatewayError(
                    400, "FakeMoondream only accepts data URIs in image_url; it never fetches URLs", param="image_url"
                )
            img = await asyncio.to_thread(_gateway_data_uri, url)
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            raise _GatewayError(400, "model is required", param="model")
        if model not in AIGATEWAY_MODELS:
            raise _GatewayError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _GatewayError(400, "prompt is required", param="prompt")
        response_format = fields.get("response_format", "b64_json")
        if response_format not in ("b64_json", "url"):
            raise _GatewayError(400, "response_format must be 'url' or 'b64_json'", param="response_format")
        n = fields.get("n", 1)
        try:
            n = int(n)
        except (TypeError, ValueError):
            n = 0
        if not 1 <= n <= 10:
            raise _GatewayError(400, "n must be an integer from 1 to 10", param="n")
        data = await asyncio.to_thread(_gateway_mask_png, img, prompt)
        if response_format == "url":
            entry = {"url": fake._store_file("aigateway-files", "mask.png", data, "image/png")}
        else:
            entry = {"b64_json": base64.b64encode(data).decode()}
        return {"created": int(time.time()), "data": [dict(entry) for _ in range(n)]}

    async def gateway_not_found(self, request: web.Request) -> web.StreamResponse:
        body = _gateway_error(404, f"Unknown route {request.method} {request.path}")
        return await self.fake._send(request, _dumps(body), status=404)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _gateway_image(raw: bytes) -> Image.Image:
    try:
        return _srv._image_from_bytes(raw)
    except _srv._BadRequest:
        raise _GatewayError(400, "could not decode the image", param="image") from None


def _gateway_data_uri(url: str) -> Image.Image:
    try:
        return _srv._decode_image(url)
    except _srv._BadRequest as exc:
        raise _GatewayError(400, exc.message, param="image_url") from None


def _gateway_mask_png(img: Image.Image, prompt: str) -> bytes:
    """PNG (mode L, 0/255) of the union of every shape ``prompt`` names, at the image's size."""
    union = np.zeros((img.height, img.width), dtype=bool)
    for f in engine.analyze(img):
        if engine.matches(prompt, f):
            x0, y0, x1, y1 = f.bbox_px
            union[y0:y1, x0:x1] |= f.mask_crop
    return _encode(_mask_image(union))[0]


def install(fake: FakeMoondream, app: web.Application) -> None:
    """Add the fal.ai and AIgateway routes to ``fake``'s aiohttp application."""
    routes = _Routes(fake)
    for skill in _srv.SKILL_ROUTES:
        app.router.add_post(f"/fal/{FAL_MOONDREAM}/{skill}", routes.fal_sync)
        app.router.add_post(f"/fal-queue/{FAL_MOONDREAM}/{skill}", routes.fal_submit)
    app.router.add_post(f"/fal/{FAL_SAM3}", routes.fal_sync)
    app.router.add_post(f"/fal-queue/{FAL_SAM3}", routes.fal_submit)
    job = "/fal-queue/fal-ai/{app:moondream3-preview|sam-3}/requests/{rid}"
    app.router.add_get(f"{job}/status", routes.fal_status)
    app.router.add_get(job, routes.fal_result)
    app.router.add_put(f"{job}/cancel", routes.fal_cancel)
    app.router.add_get("/fal-files/{token}/{name}", routes.file)
    app.router.add_get("/aigateway-files/{token}/{name}", routes.file)
    app.router.add_post("/aigateway/v1/images/edits", routes.gateway_edits)
    app.router.add_route("*", "/fal/{tail:.*}", routes.fal_not_found)
    app.router.add_route("*", "/fal-queue/{tail:.*}", routes.fal_not_found)
    app.router.add_route("*", "/aigateway/{tail:.*}", routes.gateway_not_found)
