""":class:`ImageIndexer`: many images into :class:`ImageRecord` s, concurrently, cached."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from .._concurrency import stream_in_order
from ..backend import CaptionLength, VisionBackend, check_length, check_object, check_question, require_skill
from ..errors import ImageError, MoondreamError
from ..images import ImageSettings, PreparedImage
from ..images.sources import ReferenceKind, _load_source, reference_kind
from ..result_cache import ResultCache, backend_identity, image_digest
from ..results import Answer, Caption, Usage
from ..tiling import DEFAULT_MAX_TILES, TiledDetections, TiledImage, TilingMode, plan_tiles
from ..images.decode import upright_size
from .records import FoundObjects, ImageRecord
from .sources import IndexSource, expand_sources

if TYPE_CHECKING:  # pragma: no cover - the batch package imports this one
    from ..batch import BatchProgress

__all__ = ["DEFAULT_OCR_PROMPT", "ImageIndexer", "IndexProgress"]

logger = logging.getLogger("moondream_tools")

#: The question asked for ``ocr=True``.
DEFAULT_OCR_PROMPT = "Transcribe all text in the image. Answer with the text only."


@dataclass(frozen=True)
class IndexProgress:
    """Where an indexing run is, passed to ``on_progress`` after each image.

    Attributes:
        total: images in the run, when known (None for a lazy iterable of sources).
        done: records finished (failed ones included).
        failed: records with at least one error.
        requests: skill calls sent to the backend.
        cached: skill calls answered from the :class:`ResultCache`.
    """

    total: int | None
    done: int
    failed: int
    requests: int
    cached: int


@dataclass(frozen=True)
class _Call:
    part: str  # the record's error key
    skill: str
    arguments: dict[str, Any]
    code: str = ""  # short and unique among the calls: "caption", "q0", "ocr", "d0" (batch line ids)


class ImageIndexer:
    """Turns images into :class:`ImageRecord` s over any :class:`~moondream_tools.VisionBackend`.

    Args:
        backend: the backend to ask.
        caption: ask for a caption (default True); ``caption_length`` its length.
        questions: questions asked of every image (their answers go in ``record.answers``).
        ocr: transcribe the text in the image (a query with ``ocr_prompt``).
        detect: object phrases to find; each gives a count and boxes.
        tiling, max_tiles: how ``detect`` treats large images (as
            :class:`~moondream_tools.VisionTools` does: ``"auto"`` tiles images the model
            would shrink more than 4x, at most ``max_tiles`` requests per phrase).
        max_objects: the object limit sent with ``detect`` (None: the backend's default).
        max_concurrency: images in flight at once (requests are bounded by the backend too).
        cache: a :class:`ResultCache` (or a path for one): answered calls are not sent again.
        on_progress: called with an :class:`IndexProgress` after each image.

    Each image is read once and hashed (its sha256 is the record id), its header gives the
    upright size, and it is prepared once (only if some call is not cached) for all its
    calls, which run concurrently. A failing image or call puts its message in
    ``record.errors`` and the run goes on; failed calls are never cached.

    On Moondream Cloud, :meth:`index_batch` / :meth:`stream_batch` give the same records
    through the Batch API (half price, results within hours, resumable from a ``job_dir``);
    :attr:`batch_usage` and :meth:`batch_cost` then report what the job used.

    Example::

        async with AsyncMoondream() as md:
            indexer = ImageIndexer(md, questions=["Is there a person?"], detect=["car"],
                                   cache=ResultCache(".cache"))
            async for record in indexer.stream(["photos/", "https://example.com/a.jpg"]):
                print(record.source, record.caption, record.metadata()["count_car"])
    """

    def __init__(
        self,
        backend: VisionBackend,
        *,
        caption: bool = True,
        caption_length: CaptionLength = "normal",
        questions: Sequence[str] = (),
        ocr: bool = False,
        ocr_prompt: str = DEFAULT_OCR_PROMPT,
        detect: Sequence[str] = (),
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        max_objects: int | None = None,
        max_concurrency: int = 8,
        cache: ResultCache | str | os.PathLike[str] | None = None,
        on_progress: Callable[[IndexProgress], None] | None = None,
    ) -> None:
        if not isinstance(backend, VisionBackend):
            raise TypeError(f"backend must be a VisionBackend, got {type(backend).__name__}")
        if isinstance(questions, str) or isinstance(detect, str):
            raise TypeError("questions and detect are lists of strings, not one string")
        for item in (*questions, *detect, ocr_prompt):
            if not isinstance(item, str):
                raise TypeError(f"questions, detect and ocr_prompt hold strings, got {type(item).__name__}")
        check_length(caption_length)
        for question in (*questions, ocr_prompt):
            check_question(question)
        for phrase in detect:
            check_object(phrase)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if max_objects is not None and (isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1):
            raise ValueError(f"max_objects must be a positive integer, got {max_objects!r}")
        plan_tiles(100, 100, tiling=tiling, max_tiles=max_tiles)  # refuses bad tiling options
        self.backend = backend
        self.caption = caption
        self.caption_length: CaptionLength = caption_length
        self.questions = list(dict.fromkeys(questions))
        self.ocr = ocr
        self.ocr_prompt = ocr_prompt
        self.detect = list(dict.fromkeys(detect))
        self.tiling = tiling
        self.max_tiles = max_tiles
        self.max_objects = max_objects
        self.max_concurrency = max_concurrency
        self.cache = ResultCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.on_progress = on_progress
        # Indexing never segments: no segmentation upload is encoded.
        self.image_settings = dataclasses.replace(backend.image_settings, segment_upload=False)
        self._batch_usage: Usage | None = None

    def _calls(self) -> list[_Call]:
        calls = []
        if self.caption:
            calls.append(_Call("caption", "caption", {"length": self.caption_length}, "caption"))
        calls += [_Call(f"question: {q}", "query", {"question": q}, f"q{n}") for n, q in enumerate(self.questions)]
        if self.ocr:
            calls.append(_Call("ocr", "query", {"question": self.ocr_prompt}, "ocr"))
        settings = {"max_objects": self.max_objects} if self.max_objects is not None else None
        calls += [
            _Call(f"detect: {p}", "detect", {
                "object": p, "settings": settings, "tiling": self.tiling, "max_tiles": self.max_tiles,
            }, f"d{n}")
            for n, p in enumerate(self.detect)
        ]
        return calls

    # ------------------------------------------------------------------ runs

    async def index(self, sources: IndexSource | Iterable[IndexSource], *, glob: str | None = None) -> list[ImageRecord]:
        """Every record, in input order (see :meth:`stream`)."""
        return [record async for record in self.stream(sources, glob=glob)]

    async def stream(
        self, sources: IndexSource | Iterable[IndexSource], *, glob: str | None = None
    ) -> AsyncIterator[ImageRecord]:
        """The records of ``sources`` (see :func:`expand_sources`; ``glob`` filters
        directories), yielded **in input order** as soon as each and those before it are
        done, while up to ``max_concurrency`` images are in flight. A list (or one path) is
        expanded first, so :attr:`IndexProgress.total` is known; any other iterable is read
        lazily (a generator of a million paths or images is fine). At most
        ``4 * max_concurrency`` finished records wait for a slow one before them. Closing the iterator early cancels the images in flight.
        """
        items: Iterable[IndexSource] = expand_sources(sources, glob=glob)
        total = None
        if isinstance(sources, (list, tuple, str, bytes, os.PathLike)):  # not a lazy iterable
            items = list(items)
            total = len(items)
        state = _Run(total)

        async def run(source: IndexSource) -> ImageRecord:
            record = await self._index_one(source, state)
            state.finished(record)
            if self.on_progress is not None:
                self.on_progress(state.progress())
            return record

        records = stream_in_order(run, items, concurrency=self.max_concurrency, window=4 * self.max_concurrency)
        try:
            async for record in records:
                yield record
        finally:
            await records.aclose()
            await state.aclose()

    async def index_one(self, source: IndexSource) -> ImageRecord:
        """The record of one image (its errors in ``record.errors``)."""
        state = _Run(1)
        try:
            return await self._index_one(source, state)
        finally:
            await state.aclose()

    # ------------------------------------------------------------------ the Batch API

    async def index_batch(
        self,
        sources: IndexSource | Iterable[IndexSource],
        *,
        job_dir: str | os.PathLike[str],
        glob: str | None = None,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        part_size: int | None = None,
        max_lines: int | None = None,
        on_batch_progress: Callable[[BatchProgress], Any] | None = None,
    ) -> list[ImageRecord]:
        """Every record, in input order, through Moondream's Batch API (see :meth:`stream_batch`)."""
        return [
            record
            async for record in self.stream_batch(
                sources, job_dir=job_dir, glob=glob, poll_interval=poll_interval,
                max_poll_interval=max_poll_interval, part_size=part_size, max_lines=max_lines,
                on_batch_progress=on_batch_progress,
            )
        ]

    async def stream_batch(
        self,
        sources: IndexSource | Iterable[IndexSource],
        *,
        job_dir: str | os.PathLike[str],
        glob: str | None = None,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        part_size: int | None = None,
        max_lines: int | None = None,
        on_batch_progress: Callable[[BatchProgress], Any] | None = None,
    ) -> AsyncIterator[ImageRecord]:
        """The records of ``sources`` through Moondream's Batch API (half price, results
        within hours), yielded **in input order**: the same records as :meth:`stream`.

        The backend must be an :class:`~moondream_tools.AsyncMoondream` (Moondream Cloud;
        anything else is a ``TypeError``), and ``max_objects`` must be unset (the Batch
        API's detect takes no settings: a ``ValueError``).

        How it runs (a :class:`~moondream_tools.MoondreamBatch` in ``job_dir``):

        1. Every image is read and hashed once (the record id), its header gives the upright
           size, and the :class:`ResultCache` is asked: cached calls are not sent. For the
           rest the image is prepared once, exactly as :meth:`stream` uploads it (a large
           image's tiles too, for its ``detect`` phrases: ``tiling`` works as in
           :meth:`stream`), and kept in ``job_dir`` until the batch files are built.
        2. Each call (caption, each question, OCR, each detect phrase, or each tile of a
           tiled phrase) is one batch line with the id ``"<image index>:<call>"``
           (``caption``, ``q0``, ``ocr``, ``d0``, ``d0.t3``: question 0, phrase 0's tile 3).
           Lines are uploaded, submitted once and polled every ``poll_interval`` seconds
           (x1.5 each time, up to ``max_poll_interval``); ``on_batch_progress`` gets the
           job's :class:`~moondream_tools.BatchProgress` after every round of polls.
        3. Results are matched back by id into one :class:`ImageRecord` per image, yielded
           in input order as soon as its lines and those of every image before it are in;
           a line's error is its part's error in ``record.errors``. What succeeded is stored
           in the cache (keys shared with :meth:`stream`: either path reuses the other's).
           ``on_progress`` gets an :class:`IndexProgress` per record (``requests`` counts
           batch lines; ``total`` is always known: every image is planned before the job
           is sent).

        Resumable: the plan (``index.json``, ``index-images.jsonl``) and the job's own files
        stay in ``job_dir``; running again with the same ``job_dir`` (after a crash, a kill
        or a finished run) resumes that job, never preparing, uploading or submitting it
        again, and yields every record again. The sources and options must be the same
        (else a :class:`ConfigurationError`): another job needs another ``job_dir``. A batch
        that failed or whose results expired puts its error on the parts it held (not
        cached: a new ``job_dir`` with the same cache sends only those).

        Memory stays flat whatever the number of images: the prepared uploads wait on disk,
        images are prepared one per CPU at a time (reads and downloads: ``max_concurrency``),
        and the batch file is uploaded in ``part_size`` parts (default 8 MiB; None: that
        default). ``max_lines``: lines per batch (as for
        :class:`~moondream_tools.MoondreamBatch`; None: the published 100,000). After the
        run, :attr:`batch_usage` and :meth:`batch_cost` report the job's tokens and cost.

        Example::

            async with AsyncMoondream() as md:
                indexer = ImageIndexer(md, questions=["Is there a person?"], detect=["car"],
                                       cache=ResultCache(".cache"))
                async for record in indexer.stream_batch("photos/", job_dir="jobs/photos"):
                    print(record.source, record.caption)
                batch_usd, standard_usd = indexer.batch_cost()
        """
        from .batching import run_batch  # the batch package imports this one: import at call time

        records = run_batch(
            self, sources, job_dir=job_dir, glob=glob, poll_interval=poll_interval,
            max_poll_interval=max_poll_interval, part_size=part_size, max_lines=max_lines,
            on_batch_progress=on_batch_progress,
        )
        async with contextlib.aclosing(records):  # closing this stream closes the job (and its lock) now
            async for record in records:
                yield record

    @property
    def batch_usage(self) -> Usage | None:
        """The tokens of the batch job of the last :meth:`stream_batch` / :meth:`index_batch`
        (the whole job when it was resumed), or None when it sent nothing (every call cached)."""
        return self._batch_usage

    def batch_cost(
        self, *, input_usd_per_million: float = 0.30, output_usd_per_million: float = 2.50
    ) -> tuple[float, float]:
        """``(batch_usd, standard_usd)``: the estimated cost of :attr:`batch_usage` on the
        Batch API and what the standard API would have charged for the same tokens (see
        :meth:`MoondreamBatch.cost <moondream_tools.MoondreamBatch.cost>`)."""
        from ..batch import estimate_cost

        return estimate_cost(
            self._batch_usage, input_usd_per_million=input_usd_per_million,
            output_usd_per_million=output_usd_per_million,
        )

    # ------------------------------------------------------------------ one image

    async def _index_one(self, source: IndexSource, state: _Run) -> ImageRecord:
        label = _label(source)
        identity = backend_identity(self.backend)
        base = {"backend": identity["backend"], "model": identity["model"]}
        try:
            data = await self._read(source, state)
        except ImageError as exc:  # nothing was read: the id names the source
            return ImageRecord(id=_label_id(label), source=label, errors={"image": str(exc)}, **base)
        digest, size = await asyncio.to_thread(_inspect, data, self.image_settings)
        if isinstance(source, bytes):
            label = f"bytes:{digest[:12]}"
        if isinstance(size, ImageError):
            return ImageRecord(id=digest, source=label, errors={"image": str(size)}, **base)
        width, height = size
        record = ImageRecord(id=digest, source=label, width=width, height=height, **base)
        calls = self._calls()
        keys = [self._key(digest, call) for call in calls]
        stored: dict[str, Any] = {}
        if self.cache is not None:
            stored = await asyncio.to_thread(self.cache.get_many, keys)
        results: dict[str, Any] = {}
        missing = []
        for call, key in zip(calls, keys):
            if stored.get(key) is not None:
                results[call.part] = stored[key]
                state.cached += 1
            else:
                missing.append((call, key))
        if missing:
            await self._ask(data, width, height, missing, results, record, state)
        _fill(record, calls, results)
        return record

    async def _read(self, source: IndexSource, state: _Run) -> bytes:
        session = None
        if isinstance(source, str) and reference_kind(source) is ReferenceKind.URL:
            session = await state.session()
        data = await _load_source(source, session, self.image_settings)
        if not isinstance(data, bytes):  # pragma: no cover - paths, URLs and bytes give bytes
            raise ImageError("an image source must be a path, a URL or bytes")
        return data

    def _key(self, digest: str, call: _Call) -> str:
        return ResultCache.key(
            image=digest, skill=call.skill, arguments=call.arguments, backend=self.backend,
            settings=self.image_settings,
        )

    async def _ask(
        self, data: bytes, width: int, height: int, missing: list[tuple[_Call, str]],
        results: dict[str, Any], record: ImageRecord, state: _Run,
    ) -> None:
        """Send the calls not cached: one prepared image for all of them (tiles for detect
        phrases on a large image), concurrently; store what succeeded."""
        lacking = [(c, k) for c, k in missing if c.skill not in self.backend.skills]
        for call, _ in lacking:  # the backend's own error, without a request
            try:
                require_skill(self.backend, call.skill)
            except MoondreamError as exc:
                record.errors[call.part] = str(exc)
        missing = [(c, k) for c, k in missing if c.skill in self.backend.skills]
        if not missing:
            return
        tiled = plan_tiles(width, height, tiling=self.tiling, max_tiles=self.max_tiles).requests > 1
        needs_upload = any(call.skill != "detect" or not tiled for call, _ in missing)
        prepared: PreparedImage | None = None
        if needs_upload:
            try:
                prepared = await self.backend.prepare(data, settings=self.image_settings)
            except MoondreamError as exc:
                for call, _ in missing:
                    record.errors[call.part] = str(exc)
                return
        opened: asyncio.Future[TiledImage] | None = None

        async def detector() -> TiledImage:
            nonlocal opened
            if opened is None:
                opened = asyncio.ensure_future(TiledImage.open(
                    self.backend, data if tiled else prepared, tiling=self.tiling,  # type: ignore[arg-type]
                    max_tiles=self.max_tiles, image_settings=self.image_settings,
                ))
            return await opened

        async def one(call: _Call, key: str) -> tuple[str, Any] | None:
            try:
                result = await self._call(call, prepared, detector)
            except MoondreamError as exc:
                record.errors[call.part] = str(exc)
                return None
            except Exception as exc:  # never stop the batch; say what happened
                logger.warning("indexing %s: %s failed", record.source, call.part, exc_info=True)
                record.errors[call.part] = f"{type(exc).__name__}: {exc}"
                return None
            results[call.part] = result
            partial = _partial_error(result)
            if partial is not None:
                record.errors[call.part] = partial
                return None  # partial: not cached
            return key, result

        requests = sum(
            (plan_tiles(width, height, tiling=self.tiling, max_tiles=self.max_tiles).requests if c.skill == "detect" else 1)
            for c, _ in missing
        )
        state.requests += requests
        done = await asyncio.gather(*(one(call, key) for call, key in missing))
        if opened is not None and not opened.done():  # pragma: no cover - every detect awaited it
            opened.cancel()
        stored = [item for item in done if item is not None]
        if stored and self.cache is not None:
            await asyncio.to_thread(self.cache.put_many, stored)

    async def _call(
        self, call: _Call, prepared: PreparedImage | None, detector: Callable[[], Awaitable[TiledImage]]
    ) -> Any:
        args = call.arguments
        if call.skill == "caption":
            return await self.backend.caption(prepared, args["length"])  # type: ignore[arg-type]
        if call.skill == "query":
            return await self.backend.query(prepared, args["question"])
        tiled = await detector()
        return await tiled.detect(args["object"], max_objects=self.max_objects)


class _Run:
    """Counters and the download session of one run."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.done = self.failed = self.requests = self.cached = 0
        self._session: aiohttp.ClientSession | None = None

    def finished(self, record: ImageRecord) -> None:
        self.done += 1
        self.failed += not record.ok

    def progress(self) -> IndexProgress:
        return IndexProgress(self.total, self.done, self.failed, self.requests, self.cached)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _label(source: IndexSource) -> str:
    if isinstance(source, bytes):
        return "bytes"
    return os.fspath(source)


def _label_id(label: str) -> str:
    """The id of a record whose image could not be read: the sha256 of its source's name."""
    return hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()


def _inspect(data: bytes, settings: ImageSettings) -> tuple[str, tuple[int, int] | ImageError]:
    """The image's id and its upright size from its header, or why it cannot be read (blocking)."""
    digest = image_digest(data)
    try:
        return digest, upright_size(data, settings)
    except ImageError as exc:
        return digest, exc


def _partial_error(result: Any) -> str | None:
    """The error of a tiled detection some of whose tiles failed (its count is a lower
    bound and it is not cached), or None."""
    if not isinstance(result, TiledDetections) or not result.failed:
        return None
    lost = ", ".join(f"{t.box}" for t in result.failed)
    return (
        f"{len(result.failed)} of {len(result.tiles)} tiles failed (regions {lost});"
        f" the count is a lower bound. First error: {result.failed[0].error}"
    )


def _fill(record: ImageRecord, calls: list[_Call], results: dict[str, Any]) -> None:
    for call in calls:
        result = results.get(call.part)
        if result is None:
            continue
        if call.skill == "caption":
            assert isinstance(result, Caption)
            record.caption = result.caption
        elif call.part == "ocr":
            assert isinstance(result, Answer)
            record.ocr = result.answer
        elif call.skill == "query":
            assert isinstance(result, Answer)
            record.answers[call.arguments["question"]] = result.answer
        else:
            assert isinstance(result, TiledDetections)
            boxes = [(b.x_min, b.y_min, b.x_max, b.y_max) for b in result.objects]
            pixels = [(round(b.x_min), round(b.y_min), round(b.x_max), round(b.y_max)) for b in result.to_pixels()]
            record.objects[call.arguments["object"]] = FoundObjects(
                phrase=call.arguments["object"], count=len(boxes), boxes=boxes, pixel_boxes=pixels,
                capped=result.capped or bool(result.failed), tiles=len(result.tiles),
            )
