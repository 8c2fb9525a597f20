""":meth:`ImageIndexer.stream_batch`: indexing through Moondream's Batch API.

Three steps, each resumable from the job directory:

1. **Plan.** Each image is read, hashed and its header read (as :meth:`ImageIndexer.stream`
   does); the cache says which calls are done. The others need the image: it is prepared
   once (the upload :meth:`ImageIndexer.stream` would send, and for a ``detect`` phrase on
   a large image each tile, cut and prepared as :class:`~moondream_tools.tiling.TiledImage`
   does) and the JPEG kept in ``<job_dir>/images/`` (so memory stays flat whatever the
   number of images), and each call becomes a request of a :class:`MoondreamBatch` with
   the id ``"<image index>:<call code>"``. One line per image goes to
   ``index-images.jsonl``: its source, id, size, errors and the calls sent.
2. **Build.** The batch files are written from the kept JPEGs (never encoded again), then
   ``index.json`` records that the plan is complete and the JPEGs are deleted. A run that
   finds ``index.json`` skips step 1 and 2: the job resumes where it stopped.
3. **Run and assemble.** The job uploads, submits, polls and downloads (all resumable:
   :class:`MoondreamBatch`); its results, in no order, are matched back by id and every
   image's record is yielded in input order once its lines are in. Cached calls are read
   from the cache again at that point (nothing is held in memory between the steps).

``job_dir`` holds, besides the :class:`MoondreamBatch` files: ``index.json`` (format,
version, the options' fingerprint, images, lines), ``index-images.jsonl``, a ``.index.lock``,
and ``images/`` while a plan is being built.

Memory: preparing is CPU work with no request to wait for, so images are prepared one per
CPU at a time, each whole on a planner thread of its own (reads and downloads keep
``max_concurrency``), freed decoder memory is handed back as it goes
(:mod:`moondream_tools._memory`), the uploads and :class:`MoondreamBatch`'s requests wait on
disk, and the batch file goes up in 8 MiB parts (:data:`DEFAULT_PART_SIZE`), one at a time.
Nothing held grows with the number of images until the results are matched.

:class:`_IndexJob` sends the kept JPEGs through :class:`MoondreamBatch`'s ``_prepare`` hook
(private: ``MoondreamBatch.add`` takes paths, URLs and bytes, each prepared again, not a
prepared image); ``tests/core/test_indexing_batch.py`` checks that every line carries exactly
the standard path's upload.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from .._concurrency import stream_in_order, usable_cpus
from .._memory import trim_freed_memory
from ..batch import BatchProgress, BatchResult, MoondreamBatch
from ..batch._state import write_atomically
from ..batch._wire import MAX_LINES, MAX_PART_BYTES
from ..client import AsyncMoondream
from ..errors import BatchError, BatchExpiredError, BatchFailedError, ConfigurationError, ImageError, MoondreamError
from ..images import PreparedImage, decode_image, upload_sizes
from ..images.prepare import _prepare_blocking
from ..images.sources import ReferenceKind, reference_kind
from ..result_cache import backend_identity, image_digest
from ..tiling import TilePlan, plan_tiles
from ..tiling.assemble import _assemble_boxes, _untiled
from .indexer import ImageIndexer, _Call, _fill, _inspect, _label, _label_id, _partial_error, _Run
from .records import ImageRecord
from .sources import IndexSource, expand_sources

__all__ = ["run_batch"]

logger = logging.getLogger("moondream_tools")

PLAN_FILE = "index.json"
IMAGES_FILE = "index-images.jsonl"
SPILL_DIR = "images"
LOCK_FILE = ".index.lock"
FORMAT = "moondream-tools/index-batch"
VERSION = 1
#: Upload part size of the indexer's jobs: a part is in memory (and the socket's buffer) while
#: it goes up, so MoondreamBatch's 50 MiB default would add ~100 MiB to a run that otherwise
#: stays under 100 MiB; 8 MiB parts (S3's minimum is 5 MiB) cost ~240 part requests for the
#: largest (2 GB) batch file.
DEFAULT_PART_SIZE = 8 * 2**20
#: A kept JPEG's name ends in its frame's size: ``<image>.<width>x<height>.jpg`` (the whole
#: image: the upright source's size, the frame of its results) or ``<image>-t<k>.<w>x<h>.jpg``.
_SIZED = re.compile(r"\.(\d+)x(\d+)\.jpg$")
#: Planning's CPU work (hash, decode, resize, encode, write) runs on threads of its own, one
#: per usable CPU, a whole image per call: glibc gives each thread that allocates a malloc
#: arena of its own, which keeps what its decodes freed, so few threads keep little
#: (bench_batch: 88 MiB of growth on two threads against 150 MiB across the default pool's
#: six). Made on first use in each process (a forked child gets a pool of its own).
_PLANNERS: ThreadPoolExecutor | None = None
_PLANNERS_LOCK = threading.Lock()


def _planner_pool() -> ThreadPoolExecutor:
    global _PLANNERS
    with _PLANNERS_LOCK:
        if _PLANNERS is None:
            _PLANNERS = ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="moondream-plan")
        return _PLANNERS


def _forget_planners() -> None:
    """In a forked child: the parent's pool has no threads here (and its lock may be held)."""
    global _PLANNERS, _PLANNERS_LOCK
    _PLANNERS, _PLANNERS_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_planners)


class _IndexJob(MoondreamBatch):
    """A :class:`MoondreamBatch` whose images the indexer prepared already: each request's
    source is a JPEG kept in the job directory, sent as it is (no second decode or encode,
    so a line carries exactly the upload :meth:`ImageIndexer.stream` sends)."""

    async def _prepare(self, source: IndexSource) -> PreparedImage:
        path = os.fspath(source)
        match = _SIZED.search(str(path))
        if match is None:  # pragma: no cover - the indexer names every file
            raise ImageError(f"{path}: not an image the indexer prepared")
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
        except OSError as exc:
            raise ImageError(f"{path}: the prepared image is gone ({type(exc).__name__}); index again in a new job_dir") from None
        width, height = int(match.group(1)), int(match.group(2))
        return PreparedImage(
            data_url="data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"),
            width=width, height=height, upload_width=width, upload_height=height,
        )


@dataclass
class _Planned:
    """One image after planning: its line of ``index-images.jsonl`` and its requests."""

    entry: dict[str, Any]
    requests: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)  # path, skill, id, args


@dataclass
class _Options:
    poll_interval: float
    max_poll_interval: float
    part_size: int | None
    max_lines: int | None

    def job(self, job_dir: Path, backend: AsyncMoondream) -> _IndexJob:
        extra: dict[str, Any] = {"part_size": DEFAULT_PART_SIZE if self.part_size is None else self.part_size}
        if self.max_lines is not None:
            extra["max_lines"] = self.max_lines
        return _IndexJob(
            job_dir, client=backend, poll_interval=self.poll_interval, max_poll_interval=self.max_poll_interval,
            **extra,
        )


# ---------------------------------------------------------------------- the run


async def run_batch(
    indexer: ImageIndexer,
    sources: IndexSource | Iterable[IndexSource],
    *,
    job_dir: str | os.PathLike[str],
    glob: str | None,
    poll_interval: float,
    max_poll_interval: float,
    part_size: int | None,
    max_lines: int | None,
    on_batch_progress: Callable[[BatchProgress], Any] | None,
) -> AsyncIterator[ImageRecord]:
    """See :meth:`ImageIndexer.stream_batch`."""
    backend = indexer.backend
    if not isinstance(backend, AsyncMoondream):
        raise TypeError(
            "indexing through the Batch API needs an AsyncMoondream backend (Moondream Cloud's"
            f" Batch API), got {type(backend).__name__}; use stream() / index() for other backends"
        )
    if indexer.max_objects is not None:
        raise ValueError(
            "max_objects cannot be sent through the Batch API (its detect takes no settings):"
            " leave it unset for stream_batch() / index_batch(), or use stream() / index()"
        )
    options = _Options(float(poll_interval), float(max_poll_interval), part_size, max_lines)
    if not options.poll_interval > 0 or not options.max_poll_interval >= options.poll_interval:
        raise ValueError("poll_interval must be positive and max_poll_interval at least poll_interval")
    if part_size is not None and not 0 < part_size < MAX_PART_BYTES:  # refused now, not after the images are read
        raise ValueError(f"part_size must be between 1 and {MAX_PART_BYTES - 1} bytes (parts must be under 100 MB)")
    if max_lines is not None and not 0 < max_lines <= MAX_LINES:
        raise ValueError(f"max_lines must be between 1 and {MAX_LINES} (the Batch API's limit)")
    root = Path(job_dir)
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(indexer)
    items = expand_sources(sources, glob=glob)
    lock = _lock(root)
    state = _Run(None)
    job: _IndexJob | None = None
    indexer._batch_usage = None
    try:
        header = _read_header(root)
        if header is not None:
            if header.get("fingerprint") != fingerprint:
                raise ConfigurationError(
                    f"{root} holds an indexing job made with other options (questions, detect phrases,"
                    " caption, OCR prompt, tiling, model or server): run it with the same options, or"
                    " use a new job_dir (a ResultCache keeps what is done)"
                )
            await _check_sources(root, items, header)
            shutil.rmtree(root / SPILL_DIR, ignore_errors=True)  # left if a run died right after building
            if header["lines"]:
                job = options.job(root, backend)
            logger.info("indexing job %s: resuming (%d images, %d batch lines)", root, header["images"], header["lines"])
        else:
            header, job = await _plan(indexer, items, root, fingerprint, options, state)
        state.total = header["images"]
        assembler = _Assembler(indexer, root, header["images"])
        try:
            for record in await assembler.ready():
                yield _finished(indexer, state, record)
            if job is not None:
                failure: BatchError | None = None
                try:
                    async for item in job.run(on_progress=on_batch_progress):
                        assembler.add(item)
                        for record in await assembler.ready():
                            yield _finished(indexer, state, record)
                except (BatchFailedError, BatchExpiredError) as exc:  # the other batches' results are in
                    failure = exc
                    logger.warning("indexing job %s: %s", root, exc)
                finally:
                    indexer._batch_usage = job.usage
                for record in await assembler.rest(failure):
                    yield _finished(indexer, state, record)
        finally:
            assembler.close()
    finally:
        if job is not None:
            await job.aclose()
        await state.aclose()
        _unlock(lock)


def _finished(indexer: ImageIndexer, state: _Run, record: _Assembled) -> ImageRecord:
    state.requests += record.lines
    state.cached += record.cached
    state.finished(record.record)
    if indexer.on_progress is not None:
        indexer.on_progress(state.progress())
    return record.record


def _fingerprint(indexer: ImageIndexer) -> str:
    """What the plan depends on besides the images: the calls, the backend, the encoding."""
    payload = {
        "calls": [[c.code, c.part, c.skill, c.arguments] for c in indexer._calls()],
        "backend": backend_identity(indexer.backend),
        "encoding": list(indexer.image_settings.encoding),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_header(root: Path) -> dict[str, Any] | None:
    try:
        header = json.loads((root / PLAN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{root / PLAN_FILE} cannot be read ({exc}); use a new job_dir") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ConfigurationError(f"{root / PLAN_FILE} is not an indexing job of this version; use a new job_dir")
    return header


def _describe(source: IndexSource) -> str:
    """A source as the plan names it: the path or URL as given, bytes by their id."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes:{image_digest(source)[:12]}"
    return _label(source)


async def _check_sources(root: Path, items: Iterable[IndexSource], header: dict[str, Any]) -> None:
    """Refuse to resume a job for other sources (names, in order; bytes by their sha256)."""
    count = 0
    with open(root / IMAGES_FILE, "rb") as plan:
        lines = iter(plan)
        for count, source in enumerate(items, 1):
            given = await asyncio.to_thread(_describe, source) if isinstance(source, bytes) else _describe(source)
            raw = next(lines, None)
            if raw is None:
                count += sum(1 for _ in items)
                break
            planned = json.loads(raw)["source"]
            if given != planned:
                raise ConfigurationError(
                    f"{root} holds an indexing job for other images (image {count - 1} was {planned!r}, now"
                    f" {given!r}): run it with the same sources, or use a new job_dir (a ResultCache keeps"
                    " what is done)"
                )
    if count != header["images"]:
        raise ConfigurationError(
            f"{root} holds an indexing job for {header['images']} images, not {count}: run it with the same"
            " sources, or use a new job_dir (a ResultCache keeps what is done)"
        )


# ---------------------------------------------------------------------- planning


async def _plan(
    indexer: ImageIndexer, items: Iterable[IndexSource], root: Path, fingerprint: str, options: _Options, state: _Run
) -> tuple[dict[str, Any], _IndexJob | None]:
    """Steps 1 and 2 (module docstring): the plan written, the job built (not yet sent)."""
    spill = root / SPILL_DIR
    shutil.rmtree(spill, ignore_errors=True)
    spill.mkdir()
    for stale in (root / PLAN_FILE, root / IMAGES_FILE):
        stale.unlink(missing_ok=True)
    partial = root / f".{IMAGES_FILE}.tmp"
    job: _IndexJob | None = None
    images = lines = 0
    try:
        with open(partial, "w", encoding="utf-8") as out:
            async for planned in _planned(indexer, items, spill, state):
                out.write(json.dumps(planned.entry, ensure_ascii=False, separators=(",", ":")) + "\n")
                for path, skill, rid, arguments in planned.requests:
                    if job is None:
                        job = options.job(root, indexer.backend)  # type: ignore[arg-type]
                    job.add(path, skill, id=rid, **arguments)  # type: ignore[arg-type]
                images += 1
                lines += len(planned.requests)
            out.flush()
            os.fsync(out.fileno())
        if job is not None:
            await job.build()  # reads the kept JPEGs into the batch files
    except BaseException:
        if job is not None:
            await job.aclose()
        raise
    os.replace(partial, root / IMAGES_FILE)
    header = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "images": images, "lines": lines}
    write_atomically(root / PLAN_FILE, json.dumps(header).encode())
    shutil.rmtree(spill, ignore_errors=True)
    logger.info("indexing job %s: planned %d images, %d batch lines", root, images, lines)
    return header, job


async def _planned(
    indexer: ImageIndexer, items: Iterable[IndexSource], spill: Path, state: _Run
) -> AsyncIterator[_Planned]:
    """Each image planned, in input order, ``max_concurrency`` at a time (a lazy iterable is
    read no further ahead than :meth:`ImageIndexer.stream` reads it)."""
    # Preparing is CPU work with no request to wait for: one image per CPU decodes as fast as
    # more would, with less memory held (reads and downloads keep max_concurrency).
    cpus = asyncio.Semaphore(max(1, min(indexer.max_concurrency, usable_cpus())))

    async def run(numbered: tuple[int, IndexSource]) -> _Planned:
        return await _plan_one(indexer, numbered[0], numbered[1], spill, state, cpus)

    planned = stream_in_order(
        run, enumerate(items), concurrency=indexer.max_concurrency, window=4 * indexer.max_concurrency
    )
    try:
        async for plan in planned:
            yield plan
    finally:
        await planned.aclose()


async def _plan_one(
    indexer: ImageIndexer, index: int, source: IndexSource, spill: Path, state: _Run, cpus: asyncio.Semaphore
) -> _Planned:
    url = isinstance(source, str) and reference_kind(source) is ReferenceKind.URL
    data = await _read_or_error(indexer, source, state) if url else None  # a download waits on the network
    async with cpus:
        if data is None:
            data = await _read_or_error(indexer, source, state)
        if isinstance(data, _Planned):
            return data
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_planner_pool(), _plan_read, indexer, index, source, data, spill)


async def _read_or_error(indexer: ImageIndexer, source: IndexSource, state: _Run) -> bytes | _Planned:
    try:
        return await indexer._read(source, state)
    except ImageError as exc:  # nothing was read: the id names the source
        label = _label(source)
        return _Planned({"source": label, "id": _label_id(label), "errors": {"image": str(exc)}})


def _plan_read(indexer: ImageIndexer, index: int, source: IndexSource, data: bytes, spill: Path) -> _Planned:
    """Plan one image read (blocking, on a planner thread): hash, size, cache, and the
    uploads its calls not cached need; then hand the freed decoder memory back."""
    try:
        return _plan_image(indexer, index, source, data, spill)
    finally:
        trim_freed_memory()


def _plan_image(indexer: ImageIndexer, index: int, source: IndexSource, data: bytes, spill: Path) -> _Planned:
    digest, size = _inspect(data, indexer.image_settings)
    label = f"bytes:{digest[:12]}" if isinstance(source, bytes) else _label(source)
    if isinstance(size, ImageError):
        return _Planned({"source": label, "id": digest, "errors": {"image": str(size)}})
    width, height = size
    entry: dict[str, Any] = {"source": label, "id": digest, "width": width, "height": height}
    calls = indexer._calls()
    missing = calls
    if indexer.cache is not None:
        keys = {c.code: indexer._key(digest, c) for c in calls}
        stored = indexer.cache.get_many(list(keys.values()))
        missing = [c for c in calls if stored[keys[c.code]] is None]
    if not missing:
        return _Planned(entry)
    return _prepare_calls(indexer, index, data, entry, missing, spill)


def _prepare_calls(
    indexer: ImageIndexer, index: int, data: bytes, entry: dict[str, Any], missing: list[_Call], spill: Path
) -> _Planned:
    """Prepare and keep the uploads the calls not cached need; their requests (blocking)."""
    width, height = entry["width"], entry["height"]
    errors: dict[str, str] = {}
    plan = _tile_plan(indexer, width, height)
    tiled = plan.requests > 1
    whole = ""
    tiles: list[str] = []
    if any(c.skill != "detect" or not tiled for c in missing):
        try:
            prepared = _prepare_blocking(data, data, indexer.image_settings)
            whole = _keep(spill / f"{index:08d}.{width}x{height}.jpg", prepared)
        except MoondreamError as exc:  # every call needs this upload, or tiles of it
            errors.update({c.part: str(exc) for c in missing})
            missing = []
    if tiled and any(c.skill == "detect" for c in missing):
        try:
            tiles = _keep_tiles(indexer, data, plan, spill, index)
        except MoondreamError as exc:
            errors.update({c.part: str(exc) for c in missing if c.skill == "detect"})
            missing = [c for c in missing if c.skill != "detect"]
    requests: list[tuple[str, str, str, dict[str, Any]]] = []
    for call in missing:
        rid = f"{index}:{call.code}"
        if call.skill == "caption":
            requests.append((whole, "caption", rid, {"length": call.arguments["length"]}))
        elif call.skill == "query":
            requests.append((whole, "query", rid, {"question": call.arguments["question"]}))
        elif not tiled:
            requests.append((whole, "detect", rid, {"object": call.arguments["object"]}))
        else:
            requests += [(path, "detect", f"{rid}.t{k}", {"object": call.arguments["object"]}) for k, path in enumerate(tiles)]
    if missing:
        entry["sent"] = [c.code for c in missing]
    if errors:
        entry["errors"] = errors
    return _Planned(entry, requests)


def _tile_plan(indexer: ImageIndexer, width: int, height: int) -> TilePlan:
    return plan_tiles(width, height, tiling=indexer.tiling, max_tiles=indexer.max_tiles)


def _keep(path: Path, prepared: PreparedImage) -> str:
    """Write the prepared JPEG (blocking); its path is the batch request's source."""
    path.write_bytes(base64.b64decode(prepared.data_url.partition(",")[2]))
    return str(path)


def _keep_tiles(indexer: ImageIndexer, data: bytes, plan: TilePlan, spill: Path, index: int) -> list[str]:
    """Decode the image once and keep each tile's upload, cut and prepared as
    :class:`~moondream_tools.tiling.TiledImage` does (so its lines match the tiled calls;
    blocking)."""
    settings = indexer.image_settings
    rgb, upright = decode_image(data, settings)
    if upright != (plan.width, plan.height):  # pragma: no cover - the header and the decoder agree
        raise ImageError(f"decoded as {upright}, its header said {(plan.width, plan.height)}")
    paths = []
    try:
        for tile in plan.tiles:
            size, _ = upload_sizes(tile.width, tile.height, settings)
            upload = rgb.resize(size, Image.Resampling.BOX, tile.box)
            prepared = _prepare_blocking(upload, upload, settings)
            name = spill / f"{index:08d}-t{tile.index}.{prepared.width}x{prepared.height}.jpg"
            paths.append(_keep(name, prepared))
    finally:
        rgb.close()
    return paths


# ---------------------------------------------------------------------- assembling


@dataclass
class _Assembled:
    record: ImageRecord
    lines: int  # batch lines it took
    cached: int  # calls answered from the cache


class _Assembler:
    """Matches results back to images and hands out finished records in input order,
    reading the plan one line at a time (results that arrive early wait in memory)."""

    def __init__(self, indexer: ImageIndexer, root: Path, images: int) -> None:
        self.indexer = indexer
        self.calls = indexer._calls()
        self.images = images
        self.next = 0  # the index of the next record to hand out
        self.got: dict[int, dict[str, BatchResult]] = {}
        self._plan: IO[bytes] = open(root / IMAGES_FILE, "rb")
        self._entry: dict[str, Any] | None = None
        self._expected: set[str] = set()

    def close(self) -> None:
        self._plan.close()

    def add(self, item: BatchResult) -> None:
        index, _, code = item.id.partition(":")
        if not index.isdigit() or int(index) < self.next or int(index) >= self.images:
            logger.warning("indexing: a batch result with an unexpected id %r; skipped", item.id)
            return
        self.got.setdefault(int(index), {})[code] = item

    def _current(self) -> dict[str, Any] | None:
        if self._entry is None and self.next < self.images:
            raw = self._plan.readline()
            if not raw:
                raise ConfigurationError(f"{self._plan.name} ends before image {self.next}; use a new job_dir")
            self._entry = json.loads(raw)
            self._expected = self._lines(self._entry)
        return self._entry

    def _lines(self, entry: dict[str, Any]) -> set[str]:
        sent = entry.get("sent") or []
        if not sent:
            return set()
        plan = _tile_plan(self.indexer, entry["width"], entry["height"])
        ids = set()
        for call in self.calls:
            if call.code in sent:
                if call.skill == "detect" and plan.requests > 1:
                    ids.update(f"{call.code}.t{k}" for k in range(plan.requests))
                else:
                    ids.add(call.code)
        return ids

    async def ready(self) -> list[_Assembled]:
        """The records whose lines (and those of every record before them) are all in."""
        done = []
        while (entry := self._current()) is not None:
            got = self.got.get(self.next, {})
            if not self._expected <= got.keys():
                break
            done.append(await self._take(entry, got, None))
        return done

    async def rest(self, failure: BatchError | None) -> list[_Assembled]:
        """Every record left, once the job has yielded all it will: a line without a result
        is its part's error (its batch failed or expired)."""
        done = []
        while (entry := self._current()) is not None:
            done.append(await self._take(entry, self.got.get(self.next, {}), failure))
        return done

    async def _take(self, entry: dict[str, Any], got: dict[str, BatchResult], failure: BatchError | None) -> _Assembled:
        self.got.pop(self.next, None)
        lines = len(self._expected)
        self.next += 1
        self._entry = None
        return await _assemble(self.indexer, self.calls, entry, got, lines, failure)


async def _assemble(
    indexer: ImageIndexer, calls: list[_Call], entry: dict[str, Any], got: dict[str, BatchResult], lines: int,
    failure: BatchError | None,
) -> _Assembled:
    identity = backend_identity(indexer.backend)
    record = ImageRecord(
        id=entry["id"], source=entry["source"], width=entry.get("width"), height=entry.get("height"),
        backend=identity["backend"], model=identity["model"], errors=dict(entry.get("errors") or {}),
    )
    if "image" in record.errors:
        return _Assembled(record, 0, 0)
    sent = set(entry.get("sent") or [])
    width, height = entry["width"], entry["height"]
    results: dict[str, Any] = {}
    store: list[tuple[str, Any]] = []
    cached = [c for c in calls if c.code not in sent and c.part not in record.errors]
    if cached:
        assert indexer.cache is not None
        keys = [indexer._key(record.id, c) for c in cached]
        stored = await asyncio.to_thread(indexer.cache.get_many, keys)
        for call, key in zip(cached, keys):
            if stored[key] is None:
                record.errors[call.part] = "its result was cached when the job was planned and is no longer in the cache"
            else:
                results[call.part] = stored[key]
    plan = _tile_plan(indexer, width, height) if sent else None
    for call in calls:
        if call.code not in sent:
            continue
        assert plan is not None
        try:
            result = _result(call, plan, got, failure)
        except MoondreamError as exc:
            record.errors[call.part] = str(exc)
            continue
        results[call.part] = result
        partial = _partial_error(result)
        if partial is not None:
            record.errors[call.part] = partial  # a lower bound: not cached
        else:
            store.append((indexer._key(record.id, call), result))
    _fill(record, calls, results)
    if store and indexer.cache is not None:
        await asyncio.to_thread(indexer.cache.put_many, store)
    return _Assembled(record, lines, len(cached))


def _result(call: _Call, plan: TilePlan, got: dict[str, BatchResult], failure: BatchError | None) -> Any:
    """One call's result from its line(s), as :meth:`ImageIndexer.stream` gets it; raises
    the line's error (or, for a tiled phrase whose every tile failed, the first one)."""
    if call.skill != "detect" or plan.requests == 1:
        answer = _answer(got, call.code, failure)
        if isinstance(answer, MoondreamError):
            raise answer
        return _untiled("detect", answer, plan, None) if call.skill == "detect" else answer  # type: ignore[arg-type]
    answers = [_answer(got, f"{call.code}.t{k}", failure) for k in range(plan.requests)]
    errors = [a for a in answers if isinstance(a, MoondreamError)]
    if len(errors) == len(answers):
        raise errors[0]
    return _assemble_boxes(plan, answers, call.arguments["object"], None)  # type: ignore[arg-type]


def _answer(got: dict[str, BatchResult], code: str, failure: BatchError | None) -> Any:
    item = got.get(code)
    if item is None:
        return failure or BatchError("the batch job ended without a result for this request", code="missing_result")
    if item.error is not None:
        return item.error
    return item.result


# ---------------------------------------------------------------------- the directory lock


def _lock(root: Path) -> int | None:
    """One indexing run per job directory at a time (an ``flock``, where the platform has it)."""
    if sys.platform == "win32":  # pragma: no cover
        return None
    import fcntl

    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BatchError(
            f"the indexing job in {root} is in use by another run (this process or another); one at a time",
            code="job_busy",
        ) from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)

