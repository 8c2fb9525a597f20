"""The Batch API's file formats, as pure functions: request lines in, result lines out, prices.

Nothing here does I/O. :mod:`._job` streams what these functions build to disk and reads
what they parse back from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..backend import check_length, check_object, check_question, check_settings
from ..errors import BatchItemError, MoondreamError, UnsupportedSkillError
from ..images.sources import ReferenceKind, reference_kind
from ..indexing.sources import IndexSource
from ..result_cache import image_digest
from ..results import Answer, Caption, Detections, ImageSize, Points, Usage, parse_result

__all__ = [
    "BATCH_DISCOUNT",
    "BATCH_SKILLS",
    "BatchResult",
    "BatchSkill",
    "MAX_FILE_BYTES",
    "MAX_LINES",
    "MAX_LINE_BYTES",
    "MAX_PART_BYTES",
    "OUTPUT_USD_PER_MILLION",
    "INPUT_USD_PER_MILLION",
    "RETENTION_DAYS",
    "estimate_cost",
    "request_fields",
]

#: The skills the Batch API runs (no segment).
BATCH_SKILLS = frozenset({"caption", "query", "detect", "point"})
BatchSkill = Literal["caption", "query", "detect", "point"]
#: Published limits: lines per batch, bytes per file (2 GB, read as 10**9 bytes to stay under
#: it either way), bytes per line (10 MB), bytes per uploaded part (under 100 MB, or 413).
MAX_LINES = 100_000
MAX_FILE_BYTES = 2_000_000_000
MAX_LINE_BYTES = 10_000_000
MAX_PART_BYTES = 100_000_000
#: Results are kept this many days after a batch completes.
RETENTION_DAYS = 7
#: Moondream's standard prices (USD per million tokens) and the Batch API's discount.
INPUT_USD_PER_MILLION = 0.30
OUTPUT_USD_PER_MILLION = 2.50
BATCH_DISCOUNT = 0.5

ResultType = Union[Caption, Answer, Detections, Points]
_RESULT_TYPES: dict[str, type[ResultType]] = {
    "caption": Caption, "query": Answer, "detect": Detections, "point": Points,
}
SEGMENT_HINT = (
    "The Batch API does not offer segment (only caption, query, detect and point): segment these"
    " images with the standard API, AsyncMoondream.segment (or VisionTools(...).segment)."
)


# ---------------------------------------------------------------------- requests


def request_fields(
    skill: str,
    *,
    length: str | None = None,
    question: str | None = None,
    reasoning: bool | None = None,
    object: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields of a request line besides ``id``, ``skill`` and ``image``, checked.

    - caption: ``length`` (short / normal / long, default normal), ``settings``;
    - query: ``question`` (required), ``reasoning`` (default **False**, sent explicitly:
      the Batch API's own default is true, the standard API's false), ``settings``;
    - detect / point: ``object`` (required). The Batch API takes ``settings`` for caption
      and query only, so they are refused here rather than silently dropped.

    ``segment`` is an :class:`UnsupportedSkillError` that names the standard API instead.

    >>> request_fields("query", question="How many cars?")
    {'question': 'How many cars?', 'reasoning': False}
    >>> request_fields("detect", object="car")
    {'object': 'car'}
    """
    if skill == "segment":
        raise UnsupportedSkillError("segment", "the Moondream Batch API", BATCH_SKILLS, hint=SEGMENT_HINT)
    if skill not in BATCH_SKILLS:
        raise ValueError(f"skill must be one of {', '.join(sorted(BATCH_SKILLS))}, got {skill!r}")
    given = {"length": length, "question": question, "reasoning": reasoning, "object": object, "settings": settings}
    allowed = {
        "caption": {"length", "settings"},
        "query": {"question", "reasoning", "settings"},
        "detect": {"object"},
        "point": {"object"},
    }[skill]
    extra = sorted(name for name, value in given.items() if value is not None and name not in allowed)
    if extra:
        raise ValueError(
            f"{', '.join(extra)} {'does' if len(extra) == 1 else 'do'} not apply to {skill} in the Batch API"
            f" ({skill} takes: {', '.join(sorted(allowed))})"
        )
    fields: dict[str, Any] = {}
    if skill == "caption":
        check_length(length or "normal")
        fields["length"] = length or "normal"
    elif skill == "query":
        check_question(question)  # type: ignore[arg-type]
        fields["question"] = question
        fields["reasoning"] = bool(reasoning)
    else:
        check_object(object)  # type: ignore[arg-type]
        fields["object"] = object
    checked = check_settings(settings)
    if checked:
        fields["settings"] = checked
    return fields


def describe_source(source: IndexSource) -> str:
    """How a source is recorded in the job directory: a path as given, a URL without its query
    (a presigned URL's query is a credential), or ``bytes:sha256:<hex>``.

    >>> describe_source("https://host/a.jpg?X-Signature=secret")
    'https://host/a.jpg'
    >>> describe_source(b"abc")[:20]
    'bytes:sha256:ba7816b'
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes:sha256:{image_digest(source)}"
    text = os.fspath(source)
    if reference_kind(text) is ReferenceKind.URL:
        parts = urllib.parse.urlsplit(text)
        return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
    return text


def request_line(id: str, skill: str, image_base64: str, fields: Mapping[str, Any]) -> bytes:
    """One line of the input file (UTF-8 JSON and a newline).

    >>> request_line("7", "detect", "QUJD", {"object": "car"})
    b'{"id":"7","skill":"detect","image":"QUJD","object":"car"}\\n'
    """
    body = {"id": id, "skill": skill, "image": image_base64, **fields}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def requests_digest(entries: Sequence[tuple[str, str, str, Mapping[str, Any]]]) -> str:
    """The identity of a list of requests ``(id, skill, source description, fields)``: a job
    directory built from one list refuses a different one."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one request of a batch job, matched back to it by id.

    Attributes:
        id: the request's id (the caller's, or the default ``str(index)``).
        index: its position among the job's requests, from 0, in the order they were added.
        skill: caption, query, detect or point.
        source: the image, as recorded: a path as given, a URL without its query, or
            ``bytes:sha256:<hex>``.
        result: a :class:`Caption`, :class:`Answer`, :class:`Detections` or :class:`Points`
            with ``image_size`` (the oriented source) set, so ``to_pixels()`` works, and the
            line's ``usage``; None when the request failed.
        error: why it failed (:class:`BatchItemError`), or None.
        batch_id: the service's batch the request went in (None if never sent).
        line_index: its line in that batch's input file (None if never sent).

    Example::

        async for item in job.run():
            if item.ok:
                print(item.id, item.result.to_pixels())
            else:
                print(item.id, item.error.code, item.error)
    """

    id: str
    index: int
    skill: str
    source: str
    result: ResultType | None = None
    error: BatchItemError | None = None
    batch_id: str | None = None
    line_index: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None

    def unwrap(self) -> ResultType:
        """The result, or raise the item's :class:`BatchItemError`."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def parse_result_line(
    line: Mapping[str, Any],
    *,
    skill: str,
    id: str,
    image_size: ImageSize | None,
    object: str | None,
    batch_id: str | None,
    line_index: int | None,
) -> tuple[ResultType | None, BatchItemError | None]:
    """A result line as our result type, or the item's error.

    A line the service marks as an error becomes a :class:`BatchItemError` with its code; an
    ``ok`` line whose result does not match the API becomes one with code ``invalid_result``,
    so one malformed line never stops the rest of the job.
    """
    where = f"request {id!r} (line {line_index} of batch {batch_id})"
    status = line.get("status")
    if status == "ok":
        result = line.get("result")
        if isinstance(result, dict) and skill == "query" and isinstance(result.get("reasoning"), str):
            result = {**result, "reasoning": {"text": result["reasoning"]}}
        usage = line.get("usage")
        try:
            parsed = parse_result(
                _RESULT_TYPES[skill], result, what=where, image_size=image_size, object=object,
                usage=Usage.model_validate(usage) if isinstance(usage, dict) else None,
            )
        except MoondreamError as exc:
            return None, BatchItemError(
                str(exc), code="invalid_result", id=id, line_index=line_index, batch_id=batch_id
            )
        except ValueError:  # a usage that does not validate
            return None, BatchItemError(
                f"{where}: the line's usage does not match the API", code="invalid_result", id=id,
                line_index=line_index, batch_id=batch_id,
            )
        return parsed, None
    error = line.get("error")
    code, message = "processing_error", "failed"
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    elif isinstance(error, str) and error:
        message = error
    if status != "error":
        code, message = "invalid_result", f"unexpected status {status!r}"
    return None, BatchItemError(
        f"{where} failed: {code}: {message[:500]}", code=code, id=id, line_index=line_index, batch_id=batch_id
    )


# ---------------------------------------------------------------------- prices


def estimate_cost(
    usage: Usage | None,
    *,
    input_usd_per_million: float = INPUT_USD_PER_MILLION,
    output_usd_per_million: float = OUTPUT_USD_PER_MILLION,
    discount: float = BATCH_DISCOUNT,
) -> tuple[float, float]:
    """``(batch_usd, standard_usd)``: what ``usage`` costs through the Batch API and what it
    would have cost through the standard API (published standard prices; finetunes are priced
    differently, so pass their prices).

    >>> estimate_cost(Usage(input_tokens=2_000_000, output_tokens=100_000))
    (0.425, 0.85)
    """
    if usage is None:
        return 0.0, 0.0
    standard = ((usage.input_tokens or 0) * input_usd_per_million
                + (usage.output_tokens or 0) * output_usd_per_million) / 1_000_000
    return round(standard * (1 - discount), 9), round(standard, 9)
