""":class:`MoondreamBatch`: a resumable job on the Moondream Batch API (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import inspect
import json
import logging
import math
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

import moondream_tools._transport as _transport  # its _sleep at call time (tests record retry delays)

from .._memory import trim_freed_memory
from .._transport import RETRY_STATUSES, USER_AGENT, CallOptions, Timeout, retry_delay
from ..client import MOONDREAM_PROFILE, AsyncMoondream
from ..errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BatchError,
    BatchExpiredError,
    BatchFailedError,
    BatchItemError,
    ConfigurationError,
    ImageError,
    MoondreamError,
    NotFoundError,
    RateLimitError,
    ResponseError,
)
from ..images import ImageSettings, PreparedImage, ReferenceKind, prepare_image, reference_kind
from ..indexing.sources import IndexSource, expand_sources
from ..results import ImageSize, Usage
from ._spool import Request, RequestSpool
from ._state import MANIFEST_FILE, BatchRecord, JobState, ManifestEntry, load_state, read_manifest
from ._wire import (
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    MAX_LINES,
    MAX_PART_BYTES,
    RETENTION_DAYS,
    BatchResult,
    BatchSkill,
    describe_source,
    estimate_cost,
    parse_result_line,
    request_fields,
    request_line,
)

__all__ = ["BatchInfo", "BatchProgress", "MoondreamBatch"]

logger = logging.getLogger("moondream_tools.batch")
#: Indirection so tests can shorten the waits between polls.
_sleep = asyncio.sleep

DEFAULT_PART_SIZE = 50 * 2**20
#: Moondream's error conventions, less Station's "HTTP 200 with an error is a failure": a
#: failed batch's status is a 200 answer that carries ``error``.
BATCH_PROFILE = dataclasses.replace(
    MOONDREAM_PROFILE,
    name="Moondream Batch API",
    answer_error=None,
    not_found_hint="Check base_url ({base_url}) and the batch or upload id.",
)
DEFAULT_MAX_OUTPUT_BYTES = 4 * 2**30
_FAILED = frozenset({"failed", "cancelled", "canceled"})
_FINAL = _FAILED | {"completed", "expired"}


# ---------------------------------------------------------------------- progress


@dataclass(frozen=True)
class BatchInfo:
    """One batch of a job (a job over the Batch API's limits is split into several).

    Attributes:
        index: its position among the job's batches, from 0.
        batch_id: the service's id, once submitted.
        status: ``built`` (not uploaded yet), ``uploading``, ``submitting``, then the
            service's ``chunking`` / ``processing`` / ``completed`` / ``failed``, or
            ``expired`` (its results passed the 7-day retention before they were all
            downloaded).
        lines: requests in it.
        total / completed / failed: the service's progress (``total`` is ``lines`` until the
            service says).
        usage: the tokens the whole batch used, once completed.
        expires_at: when its results expire (ISO 8601, as the service said).
        error: ``{"code", "message"}`` of a failed batch.
    """

    index: int
    batch_id: str | None
    status: str
    lines: int
    total: int
    completed: int
    failed: int
    usage: Usage | None = None
    expires_at: str | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class BatchProgress:
    """Where a job stands: what ``on_progress`` gets after every round of polls, and what
    :meth:`MoondreamBatch.status` returns.

    Attributes:
        status: the job's: ``new`` (not built), ``built``, ``uploading``, ``chunking``,
            ``processing``, ``completed`` (every batch completed) or ``failed`` (every batch
            finished, at least one failed or expired).
        total / completed / failed: lines over every batch (the service's counts).
        not_sent: requests that never went out (their image could not be read here, or
            their line was too large); each comes back as a :class:`BatchResult` error.
        batches: each batch (:class:`BatchInfo`).

    Example::

        def show(progress: BatchProgress) -> None:
            print(f"{progress.status}: {progress.completed + progress.failed}/{progress.total}")

        async for item in job.run(on_progress=show):
            ...
    """

    status: str
    total: int
    completed: int
    failed: int
    not_sent: int = 0
    batches: tuple[BatchInfo, ...] = ()

    @property
    def done(self) -> bool:
        """Whether every batch has finished (completed, failed or expired)."""
        return self.status in ("completed", "failed")


#: ``on_progress``: a function, or a coroutine function, of the progress.
ProgressCallback = Callable[[BatchProgress], Any]


class _RequestFiles:
    """Writes request lines into ``requests-NNNN.jsonl`` files, starting a new file (a new
    batch) before one would pass ``max_lines`` lines or ``max_bytes`` bytes."""

    def __init__(self, job_dir: Path, max_lines: int, max_bytes: int) -> None:
        self.job_dir, self.max_lines, self.max_bytes = job_dir, max_lines, max_bytes
        self.records: list[BatchRecord] = []
        self._handle: Any = None

    def write(self, line: bytes) -> tuple[int, int]:
        record = self.records[-1] if self.records else None
        if record is None or record.lines >= self.max_lines or record.bytes + len(line) > self.max_bytes:
            self.close()
            record = BatchRecord(file=f"requests-{len(self.records):04d}.jsonl", lines=0, bytes=0)
            self.records.append(record)
            self._handle = open(self.job_dir / record.file, "wb")
        self._handle.write(line)
        record.lines += 1
        record.bytes += len(line)
        return len(self.records) - 1, record.lines - 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


class _DownloadStatus(Exception):
    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _past(when: str | None) -> bool:
    """Whether the ISO 8601 time ``when`` has passed (False when absent or unreadable)."""
    if not when:
        return False
    try:
        moment = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return False
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment <= datetime.datetime.now(datetime.timezone.utc)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# ---------------------------------------------------------------------- the job


class MoondreamBatch:
    """A job on the Moondream Batch API: half price, results within hours, resumable.

    Add requests, then :meth:`run`: the job builds the input file (each image prepared at the
    model's working size, as the standard API gets it), splits it into batches under the
    published limits, uploads each in parts, submits it, polls with backoff, downloads the
    results and yields one :class:`BatchResult` per request, matched back by id. Every step
    is recorded in ``job_dir``, so a job killed at any point resumes where it stopped: run
    the same script again (or ``MoondreamBatch(job_dir).run()`` without adding anything).

    Args:
        job_dir: the job's directory (created if needed): the state (``job.json``), the
            requests (``inputs.jsonl``), the input files (``requests-NNNN.jsonl``) and the
            downloaded results (``results-NNNN-I.jsonl``). One job per directory, one
            process at a time.
        api_key / base_url: as for :class:`AsyncMoondream` (``MOONDREAM_API_KEY``,
            ``MOONDREAM_BASE_URL``; routes go to ``{base_url}/batch``). The key is sent as
            ``X-Moondream-Auth`` and is never written to the job directory, logs or reprs.
        model: the model of every batch (finetunes: ``moondream3-preview/<id>@<step>``);
            None: the service's default. Fixed for the job once it is built.
        client: an :class:`AsyncMoondream` whose transport (session, limits, retries,
            redaction) to use instead of opening one; the job does not close it. Not with
            ``api_key``, ``base_url``, ``trust_env`` or ``http_session``.
        poll_interval / max_poll_interval: the first wait between status polls, in seconds;
            each wait is 1.5 times the last, up to ``max_poll_interval``.
        part_size: bytes per uploaded part (under 100 MB, the service's limit; default
            50 MiB, as the docs use). Fixed for a batch once its upload starts.
        max_lines / max_bytes: a job with more lines or bytes is split into several batches
            (defaults: the published 100,000 lines and 2 GB).
        max_output_bytes: a result file larger than this is refused (default 4 GiB).
        timeout / max_retries: of every request (see :class:`AsyncMoondream`). A download
            has no total timeout: ``timeout`` is the longest silence while reading.
        image_settings: how images are read (:class:`ImageSettings`); segment payloads are
            never encoded, the Batch API having no segment.
        build_concurrency: images prepared at once while building (bounds memory).
        trust_env / http_session: as for :class:`AsyncMoondream`.

    Decisions, in short:

    - ids: a request's id is the caller's (``id=``, unique in the job) or ``str(index)``; it
      is sent on its line and results are matched by it (by ``line_index`` when a line comes
      back without one), never by order.
    - segment is refused at :meth:`add` with an :class:`UnsupportedSkillError` naming the
      standard API (``AsyncMoondream.segment``): the Batch API has no segment.
    - query sends ``reasoning: false`` unless asked (the Batch API's default is true, the
      standard API's false); detect / point take no ``settings`` in the Batch API.
    - an image that cannot be read is not sent: it comes back as a result with a
      :class:`BatchItemError` (``image_error``), and the rest of the job goes on.
    - a batch that failed or expired does not hide the others: every other result is
      yielded first, then :class:`BatchFailedError` / :class:`BatchExpiredError` is raised.
    - :meth:`run` yields every result of the job each time it runs, from the files already
      downloaded and then from the new ones: a resumed run delivers each result exactly once.

    Example::

        async with MoondreamBatch("jobs/captions") as job:
            for path in Path("photos").glob("*.jpg"):
                job.add(path, "caption", id=path.name)
            job.add("photos/street.jpg", "detect", object="car")
            async for item in job.run(on_progress=print):
                print(item.id, item.result if item.ok else item.error)
            batch_usd, standard_usd = job.cost()
    """

    def __init__(
        self,
        job_dir: str | os.PathLike[str],
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        client: AsyncMoondream | None = None,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        part_size: int = DEFAULT_PART_SIZE,
        max_lines: int = MAX_LINES,
        max_bytes: int = MAX_FILE_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
        image_settings: ImageSettings | None = None,
        build_concurrency: int = 8,
        trust_env: bool = False,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not poll_interval > 0 or not max_poll_interval >= poll_interval:
            raise ValueError("poll_interval must be positive and max_poll_interval at least poll_interval")
        if not 0 < part_size < MAX_PART_BYTES:
            raise ValueError(f"part_size must be between 1 and {MAX_PART_BYTES - 1} bytes (parts must be under 100 MB)")
        if not 0 < max_lines <= MAX_LINES:
            raise ValueError(f"max_lines must be between 1 and {MAX_LINES} (the Batch API's limit)")
        if not 0 < max_bytes <= MAX_FILE_BYTES:
            raise ValueError(f"max_bytes must be between 1 and {MAX_FILE_BYTES} (the Batch API's 2 GB limit)")
        if max_output_bytes < 1 or build_concurrency < 1:
            raise ValueError("max_output_bytes and build_concurrency must be positive")
        if client is not None:
            if api_key is not None or base_url is not None or trust_env or http_session is not None:
                raise ValueError("pass either client= or api_key / base_url / trust_env / http_session, not both")
            self._client, self._owns_client = client, False
        else:
            self._client = AsyncMoondream(
                api_key, base_url=base_url, image_cache_bytes=0, trust_env=trust_env, http_session=http_session
            )
            self._owns_client = True
        # The client's transport (session scope, limiter, redactor, retries) under the batch
        # routes' error profile: the same HTTP stack, not a second one.
        self._transport = dataclasses.replace(self._client._transport, profile=BATCH_PROFILE)
        self._options: CallOptions = self._transport.options(timeout, max_retries)
        settings = image_settings or (client.image_settings if client is not None else ImageSettings())
        self._image_settings = dataclasses.replace(settings, segment_upload=False)
        self._poll_interval, self._max_poll_interval = float(poll_interval), float(max_poll_interval)
        self._part_size, self._max_lines, self._max_bytes = part_size, max_lines, max_bytes
        self._max_output_bytes, self._build_concurrency = max_output_bytes, build_concurrency
        self._job_dir = Path(job_dir)
        self._job_dir.mkdir(parents=True, exist_ok=True)
        self._requests = RequestSpool()  # on disk until built: flat memory whatever the job's size
        self._manifest: list[ManifestEntry] | None = None
        self._urls: dict[int, dict[int, str]] = {}  # batch -> output index -> presigned URL (memory only)
        self._lock_fd: int | None = None
        self._state: JobState | None = load_state(self._job_dir)
        self.model = model if model is not None else (client.model if client is not None else None)
        if self._state is not None:
            if self._state.base_url != self._client.base_url:
                raise ConfigurationError(
                    f"the job in {self._job_dir} was built for {self._state.base_url}, not {self._client.base_url}:"
                    " its batches live on that server (pass base_url= accordingly)"
                )
            if self.model is not None and self.model != self._state.model:
                raise ConfigurationError(
                    f"the job in {self._job_dir} was built for model {self._state.model!r}, not {self.model!r}"
                    " (a batch has one model; use a new job_dir for another)"
                )
            self.model = self._state.model

    def __repr__(self) -> str:
        return (
            f"MoondreamBatch(job_dir={str(self._job_dir)!r}, base_url={self._client.base_url!r},"
            f" model={self.model!r}, api_key={'set' if self._client.has_api_key else 'not set'},"
            f" status={self._job_status()!r})"
        )

    async def __aenter__(self) -> MoondreamBatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session (not a ``client=``'s) and let another process take the job
        directory. The job stays on disk."""
        self._unlock()
        self._requests.close()
        if self._owns_client:
            await self._client.aclose()

    def _lock(self) -> None:
        """Hold the job directory (an ``flock`` on ``.lock``, where the platform has it) from
        the first step that may write its state until :meth:`aclose`: two processes on one job
        could upload or submit twice."""
        if self._lock_fd is not None or sys.platform == "win32":
            return
        import fcntl

        fd = os.open(self._job_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BatchError(
                f"the batch job in {self._job_dir} is in use by another MoondreamBatch (this process or"
                " another); one at a time, or close the other first",
                code="job_busy",
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    # ------------------------------------------------------------------ requests

    def add(
        self,
        image: IndexSource,
        skill: BatchSkill,
        *,
        id: str | None = None,
        length: str | None = None,
        question: str | None = None,
        reasoning: bool | None = None,
        object: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> str:
        """Add one request; returns its id. Nothing is read or sent yet.

        Args:
            image: a path, an ``http(s)`` URL or the image's bytes.
            skill: ``caption`` (``length``, ``settings``), ``query`` (``question``,
                ``reasoning``, ``settings``), ``detect`` or ``point`` (``object``).
                ``segment`` raises :class:`UnsupportedSkillError`: the Batch API has none.
            id: the request's id, unique in the job (default ``str(index)``).

        Arguments that do not apply to the skill are a ``ValueError``.
        """
        fields = request_fields(
            skill, length=length, question=question, reasoning=reasoning, object=object, settings=settings
        )
        if isinstance(image, (bytearray, memoryview)):
            image = bytes(image)
        if not isinstance(image, (str, bytes, os.PathLike)):
            raise TypeError(f"a batch image is a path, a URL or bytes, got {type(image).__name__}")
        rid = str(len(self._requests)) if id is None else id
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"id must be a non-empty string, got {rid!r}")
        self._requests.add(rid, skill, image, describe_source(image), fields)
        return rid

    def add_many(
        self,
        sources: IndexSource | Iterable[IndexSource],
        skill: BatchSkill,
        *,
        glob: str | None = None,
        length: str | None = None,
        question: str | None = None,
        reasoning: bool | None = None,
        object: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Add one request per image of ``sources`` (files, directories searched with
        ``glob``, URLs, bytes: as :func:`~moondream_tools.indexing.expand_sources`); returns
        their ids (the default ones)."""
        return [
            self.add(source, skill, length=length, question=question, reasoning=reasoning, object=object,
                     settings=settings)
            for source in expand_sources(sources, glob=glob)
        ]

    # ------------------------------------------------------------------ what the job knows

    @property
    def job_dir(self) -> Path:
        """The job's directory."""
        return self._job_dir

    @property
    def built(self) -> bool:
        """Whether the input files are built (in this process or an earlier one)."""
        return self._state is not None

    @property
    def batch_ids(self) -> list[str]:
        """The ids of the batches submitted so far."""
        return [b.batch_id for b in self._state.batches if b.batch_id] if self._state else []

    @property
    def usage(self) -> Usage | None:
        """Tokens used by the batches completed so far (the service's batch-level ``usage``),
        or None before any completed. Each result also carries its own line's ``usage``."""
        usages = [b.usage for b in self._state.batches if b.usage] if self._state else []
        if not usages:
            return None
        return Usage(
            input_tokens=sum(_int(u.get("input_tokens")) for u in usages),
            output_tokens=sum(_int(u.get("output_tokens")) for u in usages),
        )

    def cost(
        self, *, input_usd_per_million: float = 0.30, output_usd_per_million: float = 2.50
    ) -> tuple[float, float]:
        """``(batch_usd, standard_usd)``: the estimated cost of :attr:`usage` on the Batch API
        (50% off) and what the standard API would have charged, at the published standard
        prices ($0.30 / M input, $2.50 / M output tokens; pass a finetune's prices)."""
        return estimate_cost(
            self.usage, input_usd_per_million=input_usd_per_million, output_usd_per_million=output_usd_per_million
        )

    # ------------------------------------------------------------------ steps

    async def build(self) -> None:
        """Write the input files (once): each image read, oriented and encoded at the model's
        working size (as the standard API sends it), one line per request, streamed to disk
        so only ``build_concurrency`` images are in memory at once.

        A job directory already built keeps its files: adding the same requests again (same
        ids, skills, sources and arguments, in the same order) resumes it; different ones are
        a :class:`ConfigurationError`.
        """
        self._lock()
        digest = self._requests.digest()
        if self._state is not None:
            if self._requests and digest != self._state.requests_digest:
                raise ConfigurationError(
                    f"{self._job_dir} holds a job built from other requests ({self._state.items} of them):"
                    " resume it by adding the same requests in the same order (or none), or use a new job_dir"
                )
            return
        if not self._requests:
            raise ConfigurationError(f"no job in {self._job_dir} and nothing to build: add() requests first")
        for stale in [*self._job_dir.glob("requests-*.jsonl"), *self._job_dir.glob("results-*.jsonl")]:
            stale.unlink()  # left by a build that was killed before it finished
        files = _RequestFiles(self._job_dir, self._max_lines, self._max_bytes)
        manifest_tmp = self._job_dir / f".{MANIFEST_FILE}.tmp"
        built = not_sent = 0
        try:
            with open(manifest_tmp, "wb") as manifest:
                async for request, prepared in self._prepared(iter(self._requests)):
                    entry = self._entry(request, prepared, files)
                    manifest.write(entry.to_line())
                    built += 1
                    not_sent += entry.batch is None
                manifest.flush()
                os.fsync(manifest.fileno())
        finally:
            files.close()
        await asyncio.to_thread(trim_freed_memory)
        os.replace(manifest_tmp, self._job_dir / MANIFEST_FILE)
        self._manifest = None  # read from disk when results are matched (not held while uploading)
        self._state = JobState(
            base_url=self._client.base_url, model=self.model, requests_digest=digest,
            items=len(self._requests), batches=files.records,
        )
        self._save()
        logger.info(
            "batch job %s: built %d requests into %d batch file(s)%s", self._job_dir, built,
            len(files.records), f"; {not_sent} could not be prepared and will not be sent" if not_sent else "",
        )

    async def submit(self) -> list[str]:
        """Build (if needed), upload and submit every batch; returns the batch ids. Does not
        wait: :meth:`status` and :meth:`results` (or :meth:`run`) pick the job up later,
        from this process or another.

        An upload that stopped resumes with its next part; a batch is never submitted twice.
        """
        await self.build()
        assert self._state is not None
        for k in range(len(self._state.batches)):
            await self._submit_batch(k)
        return self.batch_ids

    async def status(self) -> BatchProgress:
        """Poll each unfinished batch once and return where the job stands."""
        state = self._require_state()
        self._lock()
        for k, record in enumerate(state.batches):
            if record.batch_id and record.status not in _FINAL:
                try:
                    await self._poll(k)
                except BatchExpiredError:
                    pass  # recorded as expired
        return self._progress()

    async def run(self, *, on_progress: ProgressCallback | None = None) -> AsyncIterator[BatchResult]:
        """Build, upload, submit, wait, download: yield one :class:`BatchResult` per request.

        Resumes whatever an earlier run left (see the class docstring) and yields every
        result of the job, each once, in no promised order: results already downloaded
        first, then each batch as it completes. ``on_progress`` (a function or coroutine
        function) gets a :class:`BatchProgress` after every round of polls.

        Raises (after every other result was yielded) :class:`BatchFailedError` for a batch
        the service failed and :class:`BatchExpiredError` for one whose results expired.
        """
        await self.submit()
        async for item in self._collect(wait=True, on_progress=on_progress):
            yield item

    async def results(self) -> AsyncIterator[BatchResult]:
        """Yield the results of a job submitted earlier (by :meth:`submit` or an interrupted
        :meth:`run`), downloading what is not on disk yet. Never submits and never waits:
        a job not finished is a :class:`BatchError` with code ``not_ready`` (or
        ``not_submitted``) before anything is yielded."""
        state = self._require_state()
        unsent = [k for k, b in enumerate(state.batches) if not b.batch_id]
        if unsent:
            raise BatchError(
                f"{len(unsent)} of the job's {len(state.batches)} batches are not submitted yet: run submit() or run()",
                code="not_submitted",
            )
        progress = await self.status()
        if not progress.done:
            raise BatchError(
                f"the job is not finished ({progress.status}: {progress.completed + progress.failed} of"
                f" {progress.total} lines done); wait with run(), or ask again later",
                code="not_ready",
            )
        async for item in self._collect(wait=False, on_progress=None):
            yield item

    def attach_batch(self, index: int, batch_id: str) -> None:
        """Record that batch ``index`` of the job was submitted as ``batch_id``.

        Only for the rare :class:`BatchError` ``submit_unknown``: a process stopped after the
        service accepted a batch but before its id was recorded. Find the id in the Moondream
        console (or ``GET /v1/batch``) and attach it instead of submitting again.
        """
        record = self._require_state().batches[index]
        self._lock()
        if record.batch_id is not None and record.batch_id != batch_id:
            raise ValueError(f"batch {index} is already recorded as {record.batch_id!r}")
        record.batch_id, record.submitting, record.status = batch_id, False, "chunking"
        self._save()

    # ------------------------------------------------------------------ building

    async def _prepare(self, source: IndexSource) -> PreparedImage:
        if isinstance(source, str) and reference_kind(source) is ReferenceKind.URL:
            async with self._transport.sessions.session() as session:
                return await prepare_image(source, settings=self._image_settings, session=session)
        return await prepare_image(source, settings=self._image_settings)

    async def _prepared(
        self, requests: Iterable[Request]
    ) -> AsyncIterator[tuple[Request, PreparedImage | ImageError]]:
        """Each request with its prepared image (or why it cannot be), in order, preparing up
        to ``build_concurrency`` ahead."""

        async def one(request: Request) -> PreparedImage | ImageError:
            try:
                return await self._prepare(request.source)
            except ImageError as exc:
                return exc

        window: collections.deque[tuple[Request, asyncio.Task[PreparedImage | ImageError]]] = collections.deque()
        try:
            for request in requests:
                window.append((request, asyncio.ensure_future(one(request))))
                if len(window) >= self._build_concurrency:
                    first, task = window.popleft()
                    yield first, await task
            while window:
                first, task = window.popleft()
                yield first, await task
        finally:
            for _, task in window:
                task.cancel()
            await asyncio.gather(*(task for _, task in window), return_exceptions=True)

    def _entry(
        self, request: Request, prepared: PreparedImage | ImageError, files: _RequestFiles
    ) -> ManifestEntry:
        base = dict(index=request.index, id=request.id, skill=request.skill, source=request.description,
                    object=request.fields.get("object"))
        if isinstance(prepared, ImageError):
            message = self._transport.redactor(str(prepared))
            logger.warning("batch job %s: request %r is not sent: %s", self._job_dir, request.id, message)
            return ManifestEntry(**base, error={"code": "image_error", "message": message})
        size = dict(width=prepared.width, height=prepared.height)
        line = request_line(request.id, request.skill, prepared.data_url.partition(",")[2], request.fields)
        limit = min(MAX_LINE_BYTES, self._max_bytes)
        if len(line) > limit:
            message = f"its line is {len(line)} bytes, over the limit of {limit} bytes per line"
            return ManifestEntry(**base, **size, error={"code": "line_too_large", "message": message})
        batch, line_index = files.write(line)
        return ManifestEntry(**base, **size, batch=batch, line=line_index)

    # ------------------------------------------------------------------ uploading and submitting

    async def _call(
        self, method: str, route: str, body: Any = None, *, content: tuple[bytes, str] | None = None,
        retries: int | None = None,
    ) -> dict[str, Any]:
        options = self._options if retries is None else CallOptions(self._options.timeout, retries)
        data, _ = await self._transport.request_json(
            method, route, body, headers=self._client._auth("skill"), options=options, content=content
        )
        return data

    async def _submit_batch(self, k: int) -> None:
        record = self._require_state().batches[k]
        if record.batch_id is not None:
            return
        if not record.submitting:
            await self._upload(k)
        await self._complete(k)

    async def _upload(self, k: int) -> None:
        record = self._require_state().batches[k]
        path = self._job_dir / record.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ConfigurationError(f"{path} is missing: the job's input file was deleted; use a new job_dir") from None
        if size != record.bytes:
            raise ConfigurationError(f"{path} changed since the job was built ({size} bytes, not {record.bytes})")
        restarted = False
        while True:
            if record.upload_id is None or record.file_id is None:
                data = await self._call("POST", "/batch?action=mpu-create")
                file_id, upload_id = data.get("fileId"), data.get("uploadId")
                if not isinstance(file_id, str) or not file_id or not isinstance(upload_id, str) or not upload_id:
                    raise ResponseError("/batch?action=mpu-create: the answer has no fileId and uploadId")
                record.file_id, record.upload_id, record.part_size, record.parts = file_id, upload_id, self._part_size, {}
                self._save()
                logger.info("batch job %s: batch %d: upload %s started", self._job_dir, k, file_id)
            part_size = record.part_size or self._part_size
            count = max(1, math.ceil(record.bytes / part_size))
            base = f"/batch/{_quote(record.file_id)}?uploadId={_quote(record.upload_id)}"
            try:
                for number in range(1, count + 1):
                    if number in record.parts:
                        continue
                    chunk = await asyncio.to_thread(_read_chunk, path, (number - 1) * part_size, part_size)
                    route = base.replace("?", "?action=mpu-uploadpart&", 1) + f"&partNumber={number}"
                    data = await self._call("PUT", route, content=(chunk, "application/octet-stream"))
                    etag = data.get("etag")
                    if not isinstance(etag, str) or not etag:
                        raise ResponseError(f"{route}: the answer has no etag")
                    record.parts[number] = etag  # kept exactly as sent, quote marks included
                    self._save()
                    logger.info("batch job %s: batch %d: part %d of %d uploaded (%d bytes)",
                                self._job_dir, k, number, count, len(chunk))
                    del chunk  # before the next part is read: one part in memory at a time
                    await asyncio.to_thread(trim_freed_memory)
                return
            except NotFoundError:
                if restarted:
                    raise
                restarted = True  # the service no longer knows the upload (aborted or expired)
                logger.warning("batch job %s: batch %d: upload %s is gone; starting it again",
                               self._job_dir, k, record.file_id)
                record.file_id = record.upload_id = None
                record.parts = {}
                self._save()

    async def _complete(self, k: int) -> None:
        """Complete the upload, which submits the batch, at most once.

        ``submitting`` is recorded before the request goes out. It is retried only while its
        effect is unknown (no answer, 5xx, 429); a refusal (4xx) after an attempt whose effect
        is unknown (in this process or an earlier one) means the batch probably went in, which
        is reported (``submit_unknown``) rather than guessed at.
        """
        record = self._require_state().batches[k]
        assert record.file_id is not None and record.upload_id is not None
        route = f"/batch/{_quote(record.file_id)}?action=mpu-complete&uploadId={_quote(record.upload_id)}"
        body: dict[str, Any] = {"parts": [{"partNumber": n, "etag": e} for n, e in sorted(record.parts.items())]}
        if self.model is not None:
            body["model"] = self.model
        uncertain = record.submitting
        record.submitting = True
        self._save()
        attempt = 0
        while True:
            try:
                data = await self._call("POST", route, body, retries=0)
                break
            except APIStatusError as exc:
                if exc.status_code in RETRY_STATUSES or isinstance(exc, RateLimitError) or exc.status_code < 400:
                    error: MoondreamError = exc
                else:
                    if uncertain:
                        raise BatchError(
                            f"batch {k} of the job in {self._job_dir}: its upload's completion was sent before"
                            f" but the answer was lost, and the service now refuses it ({exc}). The batch was"
                            " probably submitted: find its id in the Moondream console (or GET /v1/batch) and"
                            " call attach_batch() with it rather than submitting again.",
                            code="submit_unknown",
                        ) from None
                    record.submitting = False  # refused: nothing was submitted
                    self._save()
                    raise
            except MoondreamError as exc:
                error = exc
            delay = retry_delay(error, attempt, self._options.max_retries)
            if delay is None:
                raise error
            uncertain = uncertain or not isinstance(error, RateLimitError)
            attempt += 1
            logger.info("batch job %s: batch %d: retrying the completion in %.2f s after: %s",
                        self._job_dir, k, delay, error)
            await _transport._sleep(delay)
        batch_id = data.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise ResponseError(f"{route}: the answer has no batch id")
        record.batch_id, record.submitting = batch_id, False
        record.status = data.get("status") if isinstance(data.get("status"), str) else "chunking"
        self._save()
        logger.info("batch job %s: batch %d submitted as %s (%d lines)", self._job_dir, k, batch_id, record.lines)

    # ------------------------------------------------------------------ polling

    async def _poll(self, k: int) -> dict[int, str]:
        """GET the batch's status, record it, and return its output URLs (kept in memory only)."""
        record = self._require_state().batches[k]
        assert record.batch_id is not None
        route = f"/batch/{_quote(record.batch_id)}"
        try:
            data = await self._call("GET", route)
        except NotFoundError:
            if _past(record.expires_at):
                raise self._expired(k) from None
            raise
        status = data.get("status")
        if not isinstance(status, str):
            raise ResponseError(f"{route}: the answer has no status")
        progress = data.get("progress") if isinstance(data.get("progress"), dict) else {}
        record.status = status
        record.progress = {
            "total": _int(progress.get("total")) or record.lines,
            "completed": _int(progress.get("completed")),
            "failed": _int(progress.get("failed")),
        }
        for name in ("created_at", "completed_at", "expires_at"):
            if isinstance(data.get(name), str):
                setattr(record, name, data[name])
        if isinstance(data.get("usage"), dict):
            record.usage = {k2: v for k2, v in data["usage"].items() if k2 in ("input_tokens", "output_tokens")}
        urls: dict[int, str] = {}
        for output in data.get("outputs") or []:
            if isinstance(output, dict) and isinstance(output.get("index"), int) and isinstance(output.get("url"), str):
                urls[output["index"]] = output["url"]
        if urls:
            record.outputs = sorted(set(record.outputs) | set(urls))
        error = data.get("error")
        if error:
            record.error = (
                {"code": str(error.get("code") or "failed"), "message": str(error.get("message") or "")[:500]}
                if isinstance(error, dict) else {"code": "failed", "message": str(error)[:500]}
            )
        if status == "expired":
            record.error = record.error or {"code": "expired", "message": "the results expired"}
        self._save()
        self._urls[k] = urls
        logger.debug("batch job %s: batch %d (%s): %s %s", self._job_dir, k, record.batch_id, status, record.progress)
        return urls

    async def _collect(self, *, wait: bool, on_progress: ProgressCallback | None) -> AsyncIterator[BatchResult]:
        state = self._require_state()
        self._lock()
        manifest = self._load_manifest()
        for entry in manifest:
            if entry.batch is None:
                yield self._not_sent(entry)
        pending = list(range(len(state.batches)))
        problems: list[BatchError] = []
        interval = self._poll_interval
        while pending:
            for k in list(pending):
                record = state.batches[k]
                expired: BatchExpiredError | None = None
                if record.status == "expired":
                    expired = self._expired(k)
                elif record.status not in _FINAL or (
                    record.status == "completed" and not self._downloaded_all(record) and k not in self._urls
                ):
                    try:
                        await self._poll(k)
                    except BatchExpiredError as exc:
                        expired = exc
                if expired is not None or record.status == "completed":
                    try:
                        async for item in self._deliver(k, manifest, expired):
                            yield item
                    except BatchExpiredError as exc:
                        problems.append(exc)
                    pending.remove(k)
                elif record.status in _FAILED:
                    problems.append(self._failed(k))
                    pending.remove(k)
            if on_progress is not None:
                outcome = on_progress(self._progress())
                if inspect.isawaitable(outcome):
                    await outcome
            if pending:
                if not wait:
                    raise BatchError("the job is not finished yet; wait with run()", code="not_ready")
                await _sleep(interval)
                interval = min(interval * 1.5, self._max_poll_interval)
        if problems:
            first = problems[0]
            if len(problems) > 1:
                first.message += f" ({len(problems) - 1} more of the job's batches failed or expired too)"
            raise first

    # ------------------------------------------------------------------ downloading and matching

    def _downloaded_all(self, record: BatchRecord) -> bool:
        return bool(record.outputs) and all(i in record.downloaded for i in record.outputs)

    async def _deliver(
        self, k: int, manifest: Sequence[ManifestEntry], expired: BatchExpiredError | None
    ) -> AsyncIterator[BatchResult]:
        """Every result of batch ``k``: from the result files on disk first, then from those
        still to download (an expired batch raises there), then an error for each request
        with no result line."""
        record = self._require_state().batches[k]
        entries = [e for e in manifest if e.batch == k]
        by_id = {e.id: e for e in entries}
        by_line = {e.line: e for e in entries}
        seen: set[int] = set()
        for index in sorted(record.outputs, key=lambda i: (i not in record.downloaded, i)):
            if index not in record.downloaded:
                if expired is not None:
                    raise expired
                await self._download(k, index)
            for item in self._read_results(k, self._job_dir / record.downloaded[index], by_id, by_line, seen):
                yield item
        for entry in entries:
            if entry.index not in seen:
                yield self._item(entry, record.batch_id, error=BatchItemError(
                    f"request {entry.id!r}: batch {record.batch_id} finished without a result for it",
                    code="missing_result", id=entry.id, line_index=entry.line, batch_id=record.batch_id,
                ))

    def _read_results(
        self, k: int, path: Path, by_id: Mapping[str, ManifestEntry], by_line: Mapping[int | None, ManifestEntry],
        seen: set[int],
    ) -> Iterator[BatchResult]:
        batch_id = self._require_state().batches[k].batch_id
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = None
                if not isinstance(line, dict):
                    logger.warning("batch job %s: %s line %d is not a JSON object; skipped", self._job_dir, path.name, number)
                    continue
                rid, line_index = line.get("id"), line.get("line_index")
                entry = by_id.get(rid) if isinstance(rid, str) else None
                if entry is None and isinstance(line_index, int):
                    entry = by_line.get(line_index)
                if entry is None:
                    logger.warning("batch job %s: %s line %d matches no request (id %r, line_index %r); skipped",
                                   self._job_dir, path.name, number, rid, line_index)
                    continue
                if entry.index in seen:
                    continue
                seen.add(entry.index)
                size = ImageSize(width=entry.width, height=entry.height) if entry.width and entry.height else None
                result, error = parse_result_line(
                    line, skill=entry.skill, id=entry.id, image_size=size, object=entry.object,
                    batch_id=batch_id, line_index=entry.line,
                )
                yield self._item(entry, batch_id, result=result, error=error)

    async def _download(self, k: int, index: int) -> None:
        """Stream output ``index`` of batch ``k`` to disk (a plain GET of its presigned URL: no
        auth header, capped at ``max_output_bytes``), retried like any request; a refused URL
        is asked for again once, then an expired batch is a :class:`BatchExpiredError`."""
        record = self._require_state().batches[k]
        url = self._urls.get(k, {}).get(index)
        refreshed = False
        if url is None:
            url, refreshed = (await self._poll(k)).get(index), True
        if url is None:
            raise ResponseError(f"batch {record.batch_id}: the service lists no URL for result file {index}")
        name = f"results-{k:04d}-{index}.jsonl"
        partial = self._job_dir / f".{name}.part"
        attempt = 0
        while True:
            try:
                await self._fetch(url, partial)
                break
            except _DownloadStatus as exc:
                if exc.status in (401, 403, 404, 410):
                    if _past(record.expires_at):
                        raise self._expired(k) from None
                    if not refreshed:  # a presigned URL may have timed out: ask for a fresh one
                        url, refreshed = (await self._poll(k)).get(index), True
                        if url is None:
                            raise ResponseError(f"batch {record.batch_id}: result file {index} is no longer listed") from None
                        continue
                    raise BatchError(
                        f"batch {record.batch_id}: downloading result file {index} failed (HTTP {exc.status})",
                        code="download_failed", batch_id=record.batch_id,
                    ) from None
                error: MoondreamError = APIStatusError(
                    f"downloading result file {index} of batch {record.batch_id} failed (HTTP {exc.status})",
                    status_code=exc.status,
                    retry_after=_transport.parse_retry_after(exc.retry_after, self._transport.max_retry_after),
                )
            except APIConnectionError as exc:
                error = exc
            delay = retry_delay(error, attempt, self._options.max_retries)
            if delay is None:
                raise error
            attempt += 1
            await _transport._sleep(delay)
        os.replace(partial, self._job_dir / name)
        record.downloaded[index] = name
        self._save()
        logger.info("batch job %s: batch %d: result file %d downloaded", self._job_dir, k, index)

    async def _fetch(self, url: str, path: Path) -> None:
        if reference_kind(url) is not ReferenceKind.URL:
            raise ResponseError(f"the service sent a result URL that is not http(s): {url[:40]!r}")
        shown = self._transport.redactor(url.split("?")[0])  # a presigned URL's query is a credential
        timeout = self._options.timeout
        client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout.connect, sock_read=timeout.total)
        cap = self._max_output_bytes
        try:
            async with self._transport.sessions.session() as session:
                async with session.get(url, timeout=client_timeout, headers={"User-Agent": USER_AGENT}) as resp:
                    if resp.status != 200:
                        raise _DownloadStatus(resp.status, resp.headers.get("Retry-After"))
                    if resp.content_length is not None and resp.content_length > cap:
                        raise ResponseError(f"the result file at {shown!r} is {resp.content_length} bytes, over max_output_bytes={cap}")
                    total = 0
                    with open(path, "wb") as handle:
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            total += len(chunk)
                            if total > cap:
                                raise ResponseError(f"the result file at {shown!r} is over max_output_bytes={cap}")
                            handle.write(chunk)
        except TimeoutError:
            raise APITimeoutError(f"downloading the result file at {shown!r} timed out; retry, or raise timeout=") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise APIConnectionError(
                f"downloading the result file at {shown!r} failed ({type(exc).__name__}); retry later"
            ) from None

    # ------------------------------------------------------------------ helpers

    def _require_state(self) -> JobState:
        if self._state is None:
            raise ConfigurationError(f"no batch job in {self._job_dir}: add() requests and run() or submit() first")
        return self._state

    def _load_manifest(self) -> list[ManifestEntry]:
        if self._manifest is None:
            self._manifest = read_manifest(self._job_dir)
        return self._manifest

    def _save(self) -> None:
        assert self._state is not None
        self._state.save(self._job_dir, self._transport.redactor)

    def _item(
        self, entry: ManifestEntry, batch_id: str | None, *, result: Any = None, error: BatchItemError | None = None
    ) -> BatchResult:
        return BatchResult(
            id=entry.id, index=entry.index, skill=entry.skill, source=entry.source, result=result, error=error,
            batch_id=batch_id if entry.batch is not None else None, line_index=entry.line,
        )

    def _not_sent(self, entry: ManifestEntry) -> BatchResult:
        error = entry.error or {"code": "image_error", "message": "not sent"}
        return self._item(entry, None, error=BatchItemError(
            f"request {entry.id!r} was not sent: {error.get('message')}", code=str(error.get("code")), id=entry.id,
        ))

    def _expired(self, k: int) -> BatchExpiredError:
        record = self._require_state().batches[k]
        if record.status != "expired":
            record.status = "expired"
            self._save()
        have = sum(1 for i in record.outputs if i in record.downloaded)
        return BatchExpiredError(
            f"batch {record.batch_id}: its results expired at {record.expires_at or 'an unknown time'} (the Batch API"
            f" keeps results {RETENTION_DAYS} days after a batch completes), so they can no longer be downloaded."
            f" {have} of its {len(record.outputs)} result files were downloaded before and are kept in"
            f" {self._job_dir}; for the rest, submit those requests again in a new job_dir.",
            batch_id=record.batch_id, expires_at=record.expires_at,
        )

    def _failed(self, k: int) -> BatchFailedError:
        record = self._require_state().batches[k]
        error = record.error or {}
        code = str(error.get("code") or "failed")
        detail = f": {error.get('message')}" if error.get("message") else ""
        return BatchFailedError(
            f"batch {record.batch_id} ({record.lines} requests) failed on the service ({code}{detail}); its"
            " requests have no results. Fix the cause and submit them again in a new job_dir.",
            code=code, batch_id=record.batch_id,
        )

    def _info(self, k: int, record: BatchRecord) -> BatchInfo:
        if record.batch_id is None:
            status = "submitting" if record.submitting else "uploading" if record.upload_id else "built"
        else:
            status = record.status or "chunking"
        usage = Usage.model_validate(record.usage) if record.usage else None
        return BatchInfo(
            index=k, batch_id=record.batch_id, status=status, lines=record.lines,
            total=record.progress.get("total", record.lines), completed=record.progress.get("completed", 0),
            failed=record.progress.get("failed", 0), usage=usage, expires_at=record.expires_at, error=record.error,
        )

    def _job_status(self, infos: Sequence[BatchInfo] | None = None) -> str:
        if self._state is None:
            return "new"
        if infos is None:
            infos = [self._info(k, b) for k, b in enumerate(self._state.batches)]
        statuses = [i.status for i in infos]
        if all(s in _FINAL for s in statuses):
            return "completed" if all(s == "completed" for s in statuses) else "failed"
        if all(s == "built" for s in statuses):
            return "built"
        if any(i.batch_id is None for i in infos):
            return "uploading"
        return "chunking" if all(s == "chunking" for s in statuses if s not in _FINAL) else "processing"

    def _progress(self) -> BatchProgress:
        state = self._require_state()
        infos = tuple(self._info(k, b) for k, b in enumerate(state.batches))
        not_sent = sum(1 for e in self._load_manifest() if e.batch is None)
        return BatchProgress(
            status=self._job_status(infos),
            total=sum(i.total for i in infos),
            completed=sum(i.completed for i in infos),
            failed=sum(i.failed for i in infos),
            not_sent=not_sent,
            batches=infos,
        )
