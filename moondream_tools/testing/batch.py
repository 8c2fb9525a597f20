"""Moondream Cloud's Batch API on the ``FakeMoondream`` server, over the same toy vision engine.

The published flow (docs.moondream.ai/batch, see PROVIDERS.md "Moondream Cloud Batch API"):
upload a JSONL file in parts (an S3-style multipart upload), complete it to submit the batch,
poll it, then fetch the result files from presigned URLs.

* ``POST /v1/batch?action=mpu-create`` -> ``{fileId, uploadId, key}``
* ``PUT /v1/batch/{fileId}?action=mpu-uploadpart&uploadId=&partNumber=`` (raw bytes) ->
  ``{etag, partNumber}``
* ``POST /v1/batch/{fileId}?action=mpu-complete&uploadId=`` ``{parts, model?}`` ->
  ``{id, status: "chunking", size}``
* ``DELETE /v1/batch/{fileId}?action=mpu-abort&uploadId=`` -> 204
* ``GET /v1/batch/{batchId}`` -> status, progress, usage, outputs, times, error
* ``GET /v1/batch?limit=&cursor=`` -> ``{batches, next_cursor, has_more}`` (newest first;
  ``next_cursor`` is the last listed batch id)
* ``GET /batch-outputs/{batchId}/{index}.jsonl?X-Amz-Signature=`` -> a result file, no auth
  (the presigned ``outputs[i].url``)

Every ``/v1/batch`` call needs ``X-Moondream-Auth`` like the native routes (401 otherwise,
any caller when ``api_key`` is None); the output URLs need no header. Requests are recorded in
``fake.requests`` (a part's body is kept as bytes and never JSON-parsed), and ``latency``,
the rate limit and every fault injector (``route="/v1/batch"`` or ``"/batch-outputs"``) apply
as on the other routes.

Where the published docs are silent, the emulator decides (and a client should not depend on
more than the docs say):

* Errors the batch routes answer themselves read ``{"error": {"code", "message"}}`` with codes
  ``unauthorized`` (401), ``not_found`` (404), ``payload_too_large`` (413), ``validation_error``
  / ``invalid_model`` (400); injected faults (``fail_next``) keep the native ``{"error": str}``.
* Etags are ``"<md5 hex of the part>"`` with the quote marks; mpu-complete compares them as
  strings. Parts may be listed in any order (they are joined in ``partNumber`` order); parts
  uploaded but not listed are left out. A refused complete (bad etag, bad model) leaves the
  upload open; a successful one closes it: completing again is a 400 ``validation_error``,
  uploading or aborting it a 404 / 400. Aborting twice is fine (204).
* The batch is processed when mpu-complete is called (in a worker thread, before it answers),
  whatever ``status`` polls say. Its status then follows ``batch_polls_to_complete`` (read at
  complete): with N polls, poll 1 answers ``chunking``, polls 2..N ``processing`` with
  ``progress`` counting the first ``total * (k - 1) // N`` lines, and poll N + 1 on answers
  ``completed`` (or ``failed``: empty_batch, limit_exceeded and ``batch_fail_next`` failures
  follow the same schedule). Listing does not count as a poll.
* ``line_index`` is 0-based (the line's position in the file, blank lines included); a trailing
  newline ends the last line. ``progress.completed`` counts ``ok`` lines and ``failed`` error
  lines, so they add up to ``total`` once completed. ``usage`` sums the ``ok`` lines.
* Input tokens: ``min(729 * 13, 64 + ceil(w * h / 196))`` per image (a token per 14 x 14 patch,
  capped like Moondream's 12 crops plus a global view) plus the prompt's words, so smaller
  uploads cost less; output tokens as on fal (see providers.py).
* Query ``reasoning`` defaults to true and is the native ``{text, grounding}`` object; query also
  takes ``images`` (shapes of every image count; text is read from the first); detect / point
  take ``settings.max_objects`` like the native routes.
* Result lines are shuffled (seeded by the batch id, never left in input order when there are
  two lines or more) and split into ``batch_output_files`` files (read at complete; never an
  empty file). Output URLs are stable per batch; a GET with a wrong or missing signature is 403,
  with an ``Authorization`` header 400 (S3-style XML bodies), after ``expire_batch`` 404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import random
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web
from PIL import Image

from . import providers
from . import server as _srv  # partially initialised while server imports us: used at call time only
from . import text as text_reader
from .engine import Found

if TYPE_CHECKING:
    from .server import FakeMoondream

__all__ = ["BatchMixin", "BatchRecord", "BatchUpload", "install", "is_part_upload"]

DEFAULT_MODEL = "moondream3-preview"
#: ``moondream3-preview`` or a finetune ``moondream3-preview/<id>@<step>``
MODEL_RE = re.compile(r"moondream3-preview(?:/[A-Za-z0-9][A-Za-z0-9_-]*@[0-9]+)?")
MAX_PART_BYTES = 100_000_000  # "each part < 100 MB or 413" (decimal MB: the stricter reading)
MAX_LINES = 100_000
MAX_LINE_BYTES = 10_000_000
MAX_PARTS = 10_000
RETENTION_SECONDS = 7 * 24 * 3600
SKILLS = ("caption", "query", "detect", "point")
_LIST_LIMIT_DEFAULT = 20
_LIST_LIMIT_MAX = 100
_IMAGE_TOKEN_CAP = 729 * 13


class _BatchError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _LineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------
# state


@dataclass
class BatchUpload:
    """One multipart upload (``fake.uploads[upload_id]``).

    ``parts``: part number -> bytes of its last accepted upload; ``etags`` likewise;
    ``part_uploads``: part number -> PUTs that reached this upload (injected failures, 413s
    and replacements included); ``completes``: mpu-complete calls (refused ones included);
    ``state``: ``open``, ``completed`` or ``aborted``; ``batch_id`` once completed.
    """

    file_id: str
    upload_id: str
    key: str
    created_at: float
    parts: dict[int, bytes] = field(default_factory=dict, repr=False)
    etags: dict[int, str] = field(default_factory=dict)
    part_uploads: dict[int, int] = field(default_factory=dict)
    completes: int = 0
    state: str = "open"
    batch_id: str | None = None


@dataclass
class BatchRecord:
    """One submitted batch (``fake.batches[batch_id]``).

    ``lines``: input lines; ``status``: what the last poll answered (``chunking`` until then);
    ``polls``: GETs of its status; ``results``: the result lines by ``line_index``;
    ``outputs``: the result files' bytes; ``downloads``: output index -> GETs served (200);
    ``part_uploads`` / ``completes``: those of its upload (see :class:`BatchUpload`).
    """

    id: str
    file_id: str
    upload_id: str
    model: str
    lines: int
    size: int
    upload: BatchUpload = field(repr=False)
    created_at: float
    polls_to_complete: int
    status: str = "chunking"
    polls: int = 0
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)
    outputs: list[bytes] = field(default_factory=list, repr=False)
    signatures: list[str] = field(default_factory=list, repr=False)
    downloads: dict[int, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    error: dict[str, str] | None = None  # set when the batch will end (or ended) failed
    completed_at: float | None = None
    expires_at: float | None = None
    expired: bool = False
    seq: int = 0  # creation order, for listing

    @property
    def part_uploads(self) -> dict[int, int]:
        return self.upload.part_uploads

    @property
    def completes(self) -> int:
        return self.upload.completes


@dataclass
class _FailFault:
    remaining: int
    status: int = 500
    code: str = ""
    message: str = ""


class BatchMixin:
    """Batch API attributes of ``FakeMoondream``.

    ``batch_polls_to_complete`` (settable, default 2, read at mpu-complete): status polls that
    answer ``chunking`` / ``processing`` before ``completed`` / ``failed``.
    ``batch_output_files`` (settable, default 2, read at mpu-complete): result files per batch.
    ``batch_max_part_bytes`` (settable, default 100,000,000): a part of that size or more is a 413.
    ``batches`` (batch id -> :class:`BatchRecord`) and ``uploads`` (upload id ->
    :class:`BatchUpload`) for inspection; ``reset()`` restores the knobs and clears pending
    batch faults but keeps batches and uploads (like fal queue jobs).
    """

    batch_polls_to_complete: int
    batch_output_files: int
    batch_max_part_bytes: int
    batches: dict[str, BatchRecord]
    uploads: dict[str, BatchUpload]

    if TYPE_CHECKING:

        @property
        def url(self) -> str: ...

    def _init_batch(self) -> None:
        self.batches = {}
        self.uploads = {}
        self._part_faults: list[_FailFault] = []
        self._batch_faults: list[_FailFault] = []
        self._batch_seq = 0
        self._batch_knobs()

    def _batch_knobs(self) -> None:
        self.batch_polls_to_complete = 2
        self.batch_output_files = 2
        self.batch_max_part_bytes = MAX_PART_BYTES

    def _reset_batch(self) -> None:
        self._part_faults.clear()
        self._batch_faults.clear()
        self._batch_knobs()

    def _pending_batch_faults(self) -> int:
        return sum(f.remaining for f in self._part_faults) + sum(f.remaining for f in self._batch_faults)

    def batch_part_fail_next(self, count: int = 1, status: int = 500) -> None:
        """The next ``count`` part uploads (PUT mpu-uploadpart to an open upload) answer HTTP
        ``status`` and store nothing: a transient failure the client retries."""
        if count < 1:
            raise ValueError("count must be at least 1")
        self._part_faults.append(_FailFault(count, status=status))

    def batch_fail_next(
        self,
        code: str = "processing_failed",
        message: str = "The batch could not be processed",
        *,
        count: int = 1,
    ) -> None:
        """The batch of the next ``count`` successful mpu-complete calls ends ``failed`` with
        ``error: {code, message}`` (its lines are not processed)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        self._batch_faults.append(_FailFault(count, code=code, message=message))

    def expire_batch(self, batch_id: str) -> None:
        """Move the batch's ``expires_at`` into the past: its status still answers (completed,
        ``expires_at`` past) and its output URLs answer 404 with an S3-style "expired" body."""
        record = self.batches[batch_id]
        record.expired = True
        record.expires_at = time.time() - 1.0

    @staticmethod
    def _take(faults: list[_FailFault]) -> _FailFault | None:
        if not faults:
            return None
        fault = faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            faults.pop(0)
        return fault


# ---------------------------------------------------------------------------------------
# line processing (runs in a worker thread)


def image_tokens(width: int, height: int) -> int:
    """Input tokens of one image: a token per 14 x 14 patch plus 64, capped at 13 crops."""
    return min(_IMAGE_TOKEN_CAP, 64 + math.ceil(width * height / 196))


def _image(value: Any, name: str) -> tuple[Image.Image, list[Found]]:
    if not isinstance(value, str) or not value:
        raise _LineError("invalid_request", f"{name} is required (base64 or a data URL)")
    url = value
    if not value.startswith("data:"):
        compact = "".join(value.split())
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise _LineError("image_decode_failed", f"{name} is not valid base64") from None
        url = "data:application/octet-stream;base64," + compact
    try:
        return _srv._see(url)
    except _srv._BadRequest as exc:
        raise _LineError("image_decode_failed", f"{name}: {exc.message}") from None


def _settings(line: Mapping[str, Any], max_objects_default: int) -> tuple[dict[str, Any], int]:
    settings = line.get("settings")
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise _LineError("invalid_request", "settings must be an object")

    def number(name: str, lo: float, hi: float) -> None:
        v = settings.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
            raise _LineError("invalid_request", f"settings.{name} must be a number in [{lo}, {hi}]")

    number("temperature", 0.0, 2.0)
    number("top_p", 0.0, 1.0)
    for name in ("max_tokens", "max_objects"):
        v = settings.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _LineError("invalid_request", f"settings.{name} must be a positive integer")
    return settings, settings.get("max_objects") or max_objects_default


def _text(line: Mapping[str, Any], name: str) -> str:
    value = line.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _LineError("invalid_request", f"{name} is required")
    return value


def _answer(line: Mapping[str, Any], max_objects_default: int) -> tuple[dict[str, Any], dict[str, int]]:
    """(result, usage) of one parsed input line; _LineError for a typed line error."""
    skill = line.get("skill")
    if skill is None:
        raise _LineError("invalid_request", "skill is required")
    if skill not in SKILLS:
        raise _LineError("unknown_skill", f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")
    _, cap = _settings(line, max_objects_default)
    if skill == "caption":
        length = line.get("length", "normal")
        if length not in ("short", "normal", "long"):
            raise _LineError("invalid_request", "length must be one of 'short', 'normal', 'long'")
        img, found = _image(line.get("image"), "image")
        caption = _srv._caption(img, found, length)
        return {"caption": caption}, _usage([img], f"caption {length}", providers._text_tokens(caption))
    if skill == "query":
        question = _text(line, "question")
        reasoning_wanted = line.get("reasoning", True)
        if not isinstance(reasoning_wanted, bool):
            raise _LineError("invalid_request", "reasoning must be a boolean")
        sources: list[tuple[Any, str]] = []
        if line.get("image") is not None:
            sources.append((line["image"], "image"))
        extra = line.get("images")
        if extra is not None:
            if not isinstance(extra, list) or not extra:
                raise _LineError("invalid_request", "images must be a non-empty list")
            sources += [(v, f"images[{i}]") for i, v in enumerate(extra)]
        if not sources:
            raise _LineError("invalid_request", "image is required (base64 or a data URL)")
        seen = [_image(value, name) for value, name in sources]
        found = [f for _, shapes in seen for f in shapes]
        answer, reasoning = _srv.answer_question(question, found, seen[0][0])
        result: dict[str, Any] = {"answer": answer}
        tokens = providers._text_tokens(answer)
        if reasoning_wanted:
            result["reasoning"] = reasoning
            tokens += providers._text_tokens(reasoning["text"])
        return result, _usage([img for img, _ in seen], question, tokens)
    # detect / point
    phrase = _text(line, "object")
    img, found = _image(line.get("image"), "image")
    if text_reader.is_text_phrase(phrase):
        hits = _srv._text_lines(img)
    else:
        hits = _srv._matching(found, phrase)
    hits = hits[:cap]
    if skill == "detect":
        return {"objects": [_srv._box(f) for f in hits]}, _usage([img], phrase, 1 + 4 * len(hits))
    points = [{"x": round(f.center[0], 6), "y": round(f.center[1], 6)} for f in hits]
    return {"points": points}, _usage([img], phrase, 1 + 2 * len(hits))


def _usage(images: list[Image.Image], prompt: str, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": sum(image_tokens(*img.size) for img in images) + len(prompt.split()),
        "output_tokens": output_tokens,
    }


def _result_line(index: int, raw: bytes, max_objects_default: int) -> dict[str, Any]:
    line_id: Any = None
    try:
        if len(raw) > MAX_LINE_BYTES:
            raise _LineError("invalid_request", f"line is longer than {MAX_LINE_BYTES} bytes")
        if not raw.strip():
            raise _LineError("invalid_request", "blank line")
        try:
            line = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _LineError("invalid_request", "line is not valid JSON") from None
        if not isinstance(line, dict):
            raise _LineError("invalid_request", "line must be a JSON object")
        line_id = line.get("id")
        result, usage = _answer(line, max_objects_default)
    except _LineError as exc:
        return {
            "line_index": index,
            "id": line_id,
            "status": "error",
            "error": {"code": exc.code, "message": exc.message},
        }
    except Exception as exc:  # an engine failure: the line fails, the batch goes on
        return {
            "line_index": index,
            "id": line_id,
            "status": "error",
            "error": {"code": "processing_error", "message": f"processing failed: {type(exc).__name__}"},
        }
    return {"line_index": index, "id": line_id, "status": "ok", "result": result, "usage": usage}


def split_lines(data: bytes) -> list[bytes]:
    """The JSONL file's lines (a trailing newline ends the last line; ``\\r\\n`` accepted)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def count_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)


def _process(
    batch_id: str, data: bytes, files: int, max_objects_default: int
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(result lines by line_index, output files' bytes): shuffled, split into ``files``."""
    results = [_result_line(i, raw, max_objects_default) for i, raw in enumerate(split_lines(data))]
    order = list(results)
    random.Random(batch_id).shuffle(order)
    if len(order) > 1 and all(a is b for a, b in zip(order, results)):
        order = order[1:] + order[:1]  # never in input order: clients must match by line_index
    k = max(1, min(files, len(order)))
    outputs = []
    for i in range(k):
        chunk = order[len(order) * i // k : len(order) * (i + 1) // k]
        outputs.append("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in chunk).encode())
    return results, outputs


# ---------------------------------------------------------------------------------------
# routes


def is_part_upload(request: web.Request) -> bool:
    """A part upload (PUT under /v1/batch): its body is raw bytes, recorded but not parsed."""
    return request.method == "PUT" and providers.under(request.path, "/v1/batch")


def read_limit(fake: BatchMixin) -> int:
    """aiohttp's body limit for a part upload: room to read an oversized part and answer 413."""
    return max(64 * 1024 * 1024, 2 * int(fake.batch_max_part_bytes))


def _xml(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


class _Routes:
    def __init__(self, fake: FakeMoondream) -> None:
        self.fake = fake

    # -- plumbing -------------------------------------------------------------------

    def _auth(self, request: web.Request) -> None:
        key = self.fake.api_key
        if key is not None and request.headers.get("X-Moondream-Auth", "") != key:
            raise _BatchError(401, "unauthorized", "Invalid or missing API key")

    async def _reply(self, request: web.Request, payload: Any, status: int = 200) -> web.StreamResponse:
        rid = _srv._request_id()
        data = json.dumps(payload).encode()
        return await self.fake._send(request, data, status=status, headers={"X-Request-Id": rid})

    @staticmethod
    def _action(request: web.Request, *allowed: str) -> str:
        action = request.query.get("action", "")
        if action not in allowed:
            want = " or ".join(repr(a) for a in allowed)
            raise _BatchError(400, "validation_error", f"action must be {want} for {request.method} {request.path}")
        return action

    def _upload(self, request: web.Request) -> BatchUpload:
        upload_id = request.query.get("uploadId", "")
        if not upload_id:
            raise _BatchError(400, "validation_error", "uploadId is required")
        upload = self.fake.uploads.get(upload_id)
        if upload is None or upload.file_id != request.match_info["file_id"]:
            raise _BatchError(404, "not_found", f"no upload {upload_id!r} for file {request.match_info['file_id']!r}")
        return upload

    @staticmethod
    def guard(fn):
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except _BatchError as exc:
                body = {"error": {"code": exc.code, "message": exc.message}}
                return web.json_response(body, status=exc.status, headers={"X-Request-Id": _srv._request_id()})

        return handler

    # -- /v1/batch ---------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        self._action(request, "mpu-create")
        file_id = str(uuid.uuid4())
        upload_id = base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")
        key = f"batch-inputs/{file_id}.jsonl"
        self.fake.uploads[upload_id] = BatchUpload(file_id, upload_id, key, time.time())
        return await self._reply(request, {"fileId": file_id, "uploadId": upload_id, "key": key})

    async def upload_part(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        self._action(request, "mpu-uploadpart")
        upload = self._upload(request)
        raw_number = request.query.get("partNumber", "")
        if not raw_number.isdigit() or not 1 <= int(raw_number) <= MAX_PARTS:
            raise _BatchError(400, "validation_error", f"partNumber must be an integer from 1 to {MAX_PARTS}")
        number = int(raw_number)
        if upload.state != "open":
            raise _BatchError(404, "not_found", f"upload {upload.upload_id!r} is {upload.state}")
        upload.part_uploads[number] = upload.part_uploads.get(number, 0) + 1
        fault = self.fake._take(self.fake._part_faults)
        if fault is not None:
            try:
                phrase = HTTPStatus(fault.status).phrase
            except ValueError:
                phrase = "error"
            code = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
            raise _BatchError(fault.status, code, f"{phrase} (injected)")
        if request.content_type != "application/octet-stream":
            raise _BatchError(400, "validation_error", "Content-Type must be application/octet-stream")
        body = await request.read()
        if len(body) >= self.fake.batch_max_part_bytes:
            raise _BatchError(
                413, "payload_too_large", f"part of {len(body)} bytes; parts must be under {self.fake.batch_max_part_bytes}"
            )
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        upload.parts[number] = body
        upload.etags[number] = etag
        return await self._reply(request, {"etag": etag, "partNumber": number})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        self._action(request, "mpu-complete")
        upload = self._upload(request)
        upload.completes += 1
        if upload.state == "completed":
            raise _BatchError(400, "validation_error", f"upload {upload.upload_id!r} was already completed")
        if upload.state != "open":
            raise _BatchError(404, "not_found", f"upload {upload.upload_id!r} is {upload.state}")
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise _BatchError(400, "validation_error", "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BatchError(400, "validation_error", "request body must be a JSON object")
        model = body.get("model")
        if model is None:
            model = DEFAULT_MODEL
        if not isinstance(model, str) or not MODEL_RE.fullmatch(model):
            raise _BatchError(
                400, "invalid_model", f"unknown model {model!r}; use moondream3-preview or moondream3-preview/<id>@<step>"
            )
        numbers = self._check_parts(upload, body.get("parts"))
        data = b"".join(upload.parts[n] for n in numbers)
        fake = self.fake
        batch_id = str(uuid.uuid4())
        fake._batch_seq += 1
        record = BatchRecord(
            id=batch_id,
            file_id=upload.file_id,
            upload_id=upload.upload_id,
            model=model,
            lines=count_lines(data),
            size=len(data),
            upload=upload,
            created_at=time.time(),
            polls_to_complete=max(0, int(fake.batch_polls_to_complete)),
            seq=fake._batch_seq,
        )
        fault = fake._take(fake._batch_faults)
        if fault is not None:
            record.error = {"code": fault.code, "message": fault.message}
        elif not data.strip():
            record.error = {"code": "empty_batch", "message": "the batch file has no lines"}
        elif record.lines > MAX_LINES:
            record.error = {
                "code": "limit_exceeded",
                "message": f"the batch file has {record.lines} lines; the limit is {MAX_LINES}",
            }
        else:
            files = max(1, int(fake.batch_output_files))
            record.results, record.outputs = await asyncio.to_thread(
                _process, batch_id, data, files, fake.max_objects_default
            )
            record.signatures = [secrets.token_hex(32) for _ in record.outputs]
            for r in record.results:
                if r["status"] == "ok":
                    record.usage["input_tokens"] += r["usage"]["input_tokens"]
                    record.usage["output_tokens"] += r["usage"]["output_tokens"]
        upload.state = "completed"
        upload.batch_id = batch_id
        upload.parts.clear()  # inputs are deleted once submitted
        fake.batches[batch_id] = record
        return await self._reply(request, {"id": batch_id, "status": "chunking", "size": record.size})

    @staticmethod
    def _check_parts(upload: BatchUpload, parts: Any) -> list[int]:
        if not isinstance(parts, list) or not parts:
            raise _BatchError(400, "validation_error", "parts must be a non-empty list of {partNumber, etag}")
        numbers: list[int] = []
        for i, part in enumerate(parts):
            if not isinstance(part, dict):
                raise _BatchError(400, "validation_error", f"parts[{i}] must be an object with partNumber and etag")
            number, etag = part.get("partNumber"), part.get("etag")
            if isinstance(number, bool) or not isinstance(number, int) or not isinstance(etag, str):
                raise _BatchError(400, "validation_error", f"parts[{i}] needs an integer partNumber and a string etag")
            if number in numbers:
                raise _BatchError(400, "validation_error", f"part {number} is listed twice")
            if number not in upload.etags:
                raise _BatchError(400, "validation_error", f"part {number} was not uploaded")
            if etag != upload.etags[number]:
                raise _BatchError(
                    400,
                    "validation_error",
                    f"etag of part {number} does not match: got {etag!r}, uploaded {upload.etags[number]!r}",
                )
            numbers.append(number)
        return sorted(numbers)

    async def abort(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        self._action(request, "mpu-abort")
        upload = self._upload(request)
        if upload.state == "completed":
            raise _BatchError(400, "validation_error", f"upload {upload.upload_id!r} was already completed")
        upload.state = "aborted"
        upload.parts.clear()
        return web.Response(status=204, headers={"X-Request-Id": _srv._request_id()})

    async def status(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        record = self.fake.batches.get(request.match_info["file_id"])
        if record is None:
            raise _BatchError(404, "not_found", f"no batch {request.match_info['file_id']!r}")
        record.polls += 1
        n = record.polls_to_complete
        if record.polls > n:
            if record.error is not None:
                record.status = "failed"
            elif record.status != "completed":
                record.status = "completed"
                record.completed_at = time.time()
                if not record.expired:
                    record.expires_at = record.completed_at + RETENTION_SECONDS
        else:
            record.status = "chunking" if record.polls == 1 else "processing"
        return await self._reply(request, self._describe(record, outputs=True))

    def _describe(self, record: BatchRecord, *, outputs: bool) -> dict[str, Any]:
        total = record.lines
        if record.status == "completed":
            done = record.results
        elif record.status == "processing" and record.error is None:
            done = record.results[: total * (record.polls - 1) // max(1, record.polls_to_complete)]
        else:
            done = []
        ok = sum(1 for r in done if r["status"] == "ok")
        out: dict[str, Any] = {
            "id": record.id,
            "status": record.status,
            "model": record.model,
            "progress": {"total": total, "completed": ok, "failed": len(done) - ok},
            "created_at": _iso(record.created_at),
        }
        if record.status == "completed":
            out["usage"] = dict(record.usage)
            if outputs:
                out["outputs"] = [
                    {"index": i, "url": self._output_url(record, i)} for i in range(len(record.outputs))
                ]
            out["completed_at"] = _iso(record.completed_at)
            out["expires_at"] = _iso(record.expires_at)
        elif record.status == "failed":
            out["error"] = dict(record.error or {})
        return out

    def _output_url(self, record: BatchRecord, index: int) -> str:
        return (
            f"{self.fake.url}/batch-outputs/{record.id}/{index}.jsonl"
            f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={record.signatures[index]}"
        )

    async def listing(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        raw_limit = request.query.get("limit", str(_LIST_LIMIT_DEFAULT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _LIST_LIMIT_MAX:
            raise _BatchError(400, "validation_error", f"limit must be an integer from 1 to {_LIST_LIMIT_MAX}")
        limit = int(raw_limit)
        ordered = sorted(self.fake.batches.values(), key=lambda r: r.seq, reverse=True)  # newest first
        cursor = request.query.get("cursor")
        start = 0
        if cursor:
            ids = [r.id for r in ordered]
            if cursor not in ids:
                raise _BatchError(400, "validation_error", "invalid cursor")
            start = ids.index(cursor) + 1
        page = ordered[start : start + limit]
        has_more = start + limit < len(ordered)
        return await self._reply(
            request,
            {
                "batches": [self._describe(r, outputs=False) for r in page],
                "next_cursor": page[-1].id if has_more and page else None,
                "has_more": has_more,
            },
        )

    # -- presigned result files ---------------------------------------------------------

    async def output(self, request: web.Request) -> web.StreamResponse:
        record = self.fake.batches.get(request.match_info["batch_id"])
        m = re.fullmatch(r"(\d+)\.jsonl", request.match_info["name"])
        index = int(m.group(1)) if m else -1
        if record is None or record.status != "completed" or not 0 <= index < len(record.outputs):
            return _xml(404, "NoSuchKey", "The specified key does not exist.")
        if "Authorization" in request.headers:
            return _xml(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
        if not secrets.compare_digest(request.query.get("X-Amz-Signature", ""), record.signatures[index]):
            return _xml(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        if record.expired or (record.expires_at is not None and record.expires_at <= time.time()):
            return _xml(404, "NoSuchKey", "The batch results have expired and were deleted.")
        if request.method == "GET":
            record.downloads[index] = record.downloads.get(index, 0) + 1
        return await self.fake._send(request, record.outputs[index], content_type="application/x-ndjson")


def install(fake: FakeMoondream, app: web.Application) -> None:
    """Add the batch routes to ``fake``'s aiohttp application."""
    routes = _Routes(fake)
    g = _Routes.guard
    app.router.add_post("/v1/batch", g(routes.create))
    app.router.add_get("/v1/batch", g(routes.listing))
    app.router.add_put("/v1/batch/{file_id}", g(routes.upload_part))
    app.router.add_post("/v1/batch/{file_id}", g(routes.complete))
    app.router.add_delete("/v1/batch/{file_id}", g(routes.abort))
    app.router.add_get("/v1/batch/{file_id}", g(routes.status))
    app.router.add_get("/batch-outputs/{batch_id}/{name}", routes.output)
