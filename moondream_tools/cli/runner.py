"""Running a command over its inputs: resume, concurrency, ordered output, signals, summary.

- Inputs already recorded in the ``--jsonl`` file under the same skill and arguments are
  skipped (``--retry-failed``: those whose last record is an error are redone).
- Up to ``concurrency`` inputs are in flight; records are written in input order as soon
  as they and every input before them are done (at most ``4 x concurrency`` finished
  records wait for a slow one before them). A video is run on its own, up to
  ``concurrency`` of its frames in flight, its frame records in frame order, then its own
  record (see :mod:`moondream_tools.cli.video`); the progress bar then counts frames.
- SIGINT / SIGTERM: no new input is started, the ones in flight finish and are written,
  the summary is printed, and the exit status is 130 / 143. A second signal cancels the
  inputs in flight (they are not recorded; a rerun does them).
- After :data:`~moondream_tools.indexing.skills.CONSECUTIVE_BACKEND_FAILURES` inputs in a row
  fail because the server cannot be reached (or refuses the key), no new input is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend import VisionBackend
from ..images import ImageSettings
from ..tiling import TilingMode
from .exports import ExportSpec, run_exports
from .progress import Bar, Stats, failures_text, print_table, summary_text
from .records import FileBusyError, JsonlWriter, Loaded, Record, dumps, load_jsonl, record_key
from ..indexing.skills import Asked, RunState, index_record, message, run_one
from .video import VideoOptions, annotated_names, run_video, video_arguments

__all__ = ["IndexOptions", "Job", "execute", "open_records"]

_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


@dataclass(frozen=True)
class IndexOptions:
    caption: bool
    caption_length: str
    questions: tuple[str, ...]
    ocr: bool
    detect: tuple[str, ...]
    tiling: TilingMode | tuple[int, int]
    max_tiles: int
    max_objects: int | None


@dataclass
class Job:
    """One command: what to ask of which inputs, and where the records go."""

    command: str
    arguments: dict[str, Any]
    sources: list[str]
    backend: VisionBackend
    concurrency: int
    asked: Asked | None = None
    index: IndexOptions | None = None
    jsonl: Path | None = None
    retry_failed: bool = False
    records_to_stdout: bool = False
    table: bool = False
    progress: bool = False
    quiet: bool = False
    exports: ExportSpec = field(default_factory=ExportSpec)
    categories: list[str] = field(default_factory=list)
    description: str = ""
    video: VideoOptions = field(default_factory=VideoOptions)
    videos: frozenset[str] = frozenset()  # the sources that are videos

    @property
    def skill(self) -> str:
        return "index" if self.asked is None else self.asked.skill

    def arguments_for(self, source: str) -> dict[str, Any]:
        """The recorded arguments of an input (a video's include its sampling)."""
        return video_arguments(self.arguments, self.video) if source in self.videos else self.arguments

    def key(self, source: str) -> str:
        return record_key(source, self.skill, self.arguments_for(source))


class SignalHandlers:
    """SIGINT and SIGTERM routed to :meth:`_on_signal` on the running loop while installed
    (a subclass decides what a signal does)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._installed: list[int] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - not the main thread / Windows
                continue
            self._installed.append(sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    @staticmethod
    def name(sig: int) -> str:
        return _SIGNAL_NAMES.get(sig, str(sig))

    def _on_signal(self, sig: int) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


class _Stopper(SignalHandlers):
    """SIGINT / SIGTERM: the first stops new inputs, the second cancels those in flight."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self.say = say
        self.hard = False
        self.reason: str | None = None
        self.cancel: Callable[[], None] = lambda: None
        self.in_flight: Callable[[], int] = lambda: 0

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.reason is not None

    def _on_signal(self, sig: int) -> None:
        name = self.name(sig)
        if self.signum is None:
            self.signum = sig
            self.say(
                f"moondream-tools: {name}: starting no new inputs; finishing the {self.in_flight()} in flight"
                " (send it again to cancel them)"
            )
            return
        if not self.hard:
            self.hard = True
            self.say(f"moondream-tools: {name} again: cancelling the inputs in flight (a rerun does them)")
            self.cancel()


async def _settle(task: asyncio.Task[Record]) -> Record | None:
    """The task's record, or None when it was cancelled (never raises CancelledError for it)."""
    await asyncio.wait([task])
    if task.cancelled():
        return None
    return task.result()


async def _run_skill(job: Job, state: RunState, todo: list[str], emit: Callable[[Record], None], stopper: _Stopper) -> None:
    assert job.asked is not None
    asked = job.asked
    slots = asyncio.Semaphore(job.concurrency)
    window = 4 * job.concurrency
    pending: deque[asyncio.Task[Record]] = deque()
    stopper.cancel = lambda: [t.cancel() for t in pending]  # type: ignore[func-returns-value]
    stopper.in_flight = lambda: sum(not t.done() for t in pending)

    async def one(source: str) -> Record:
        try:
            return await run_one(state, asked, source, job.arguments)
        finally:
            slots.release()

    def flush_done() -> None:
        while pending and pending[0].done():
            record = pending[0].result() if not pending[0].cancelled() else None
            pending.popleft()
            if record is not None:
                emit(record)

    try:
        for source in todo:
            flush_done()
            while len(pending) >= window:
                record = await _settle(pending.popleft())
                if record is not None:
                    emit(record)
            await slots.acquire()
            if stopper.requested or state.server_gone:
                slots.release()
                if state.server_gone and stopper.reason is None:
                    stopper.reason = (
                        f"the last {state.failure_streak} inputs failed the same way ({state.last_failure});"
                        " no new inputs were started"
                    )
                break
            pending.append(asyncio.create_task(one(source)))
        while pending:
            record = await _settle(pending.popleft())
            if record is not None:
                emit(record)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _run_index(job: Job, state: RunState, todo: list[str], emit: Callable[[Record], None], stopper: _Stopper) -> None:
    from ..indexing import ImageIndexer, IndexProgress

    options = job.index
    assert options is not None

    def progress(report: IndexProgress) -> None:
        state.requests = report.requests

    indexer = ImageIndexer(
        job.backend, caption=options.caption, caption_length=options.caption_length,  # type: ignore[arg-type]
        questions=list(options.questions), ocr=options.ocr, detect=list(options.detect), tiling=options.tiling,
        max_tiles=options.max_tiles, max_objects=options.max_objects, max_concurrency=job.concurrency,
        on_progress=progress,
    )
    started = [0]

    def feed() -> Iterator[str]:
        for source in todo:
            if stopper.requested:
                return
            started[0] += 1
            yield source

    emitted = [0]

    async def consume() -> None:
        async for image in indexer.stream(feed()):
            emitted[0] += 1
            emit(index_record(image, image.source, job.arguments))

    task = asyncio.create_task(consume())
    stopper.cancel = task.cancel
    stopper.in_flight = lambda: started[0] - emitted[0]
    await asyncio.wait([task])
    if not task.cancelled():
        task.result()


async def _run_inputs(
    job: Job, state: RunState, todo: list[str], emit: Callable[[Record], None], emit_frame: Callable[[Record], None],
    stopper: _Stopper, on_video: Callable[[str, int], None],
) -> None:
    """The inputs in order: runs of images concurrently, each video on its own (its frames
    concurrently); ``on_video(source, frames)`` after each video."""
    assert job.asked is not None
    folder = job.exports.annotate
    annotated = annotated_names(job.videos) if folder is not None else {}
    start = 0
    while start < len(todo):
        if stopper.requested or state.server_gone:
            if state.server_gone and stopper.reason is None:
                stopper.reason = (
                    f"the last {state.failure_streak} inputs failed the same way ({state.last_failure});"
                    " no new inputs were started"
                )
            return
        source = todo[start]
        if source in job.videos:
            stopper.in_flight = lambda: 1
            record = await run_video(
                state, job.asked, source, job.arguments_for(source), job.video, concurrency=job.concurrency,
                annotate=folder / annotated[source] if folder is not None else None, emit_frame=emit_frame,
                stop=lambda: stopper.requested,
            )
            on_video(source, (record.get("video") or {}).get("frames", 0))
            emit(record)
            start += 1
            continue
        end = start
        while end < len(todo) and todo[end] not in job.videos:
            end += 1
        await _run_skill(job, state, todo[start:end], emit, stopper)
        start = end


async def _frames_planned(job: Job, videos: list[str]) -> dict[str, int]:
    """About how many frames each video gives, for the progress bar (corrected once the
    video is done; 0 for a video that cannot be read)."""
    import math

    from ..errors import ImageError
    from ..video import probe_video

    planned: dict[str, int] = {}
    for source in videos:
        try:
            info = await probe_video(source)
        except ImageError:
            planned[source] = 0
            continue
        if job.video.every is not None:
            frames = max(1, math.ceil(info.duration / job.video.every - 1e-9))
        elif job.video.keyframes:
            frames = max(1, round(info.duration))  # unknown before decoding: about one a second
        else:
            frames = info.frames
        planned[source] = min(frames, job.video.max_frames or frames)
    return planned


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def open_records(path: Path, stats: Stats) -> tuple[JsonlWriter, Loaded] | None:
    """Open the records file for appending (locked) and read it back, repairing an unfinished
    last line; None (after one line on stderr) when it cannot be opened."""
    try:
        writer = JsonlWriter(path)
    except OSError as exc:
        text = str(exc) if isinstance(exc, FileBusyError) else f"cannot open {path}: {exc.strerror or exc}"
        _say(f"moondream-tools: error: {text}")
        return None
    loaded = load_jsonl(path)
    if loaded.repaired:
        _say(
            f"moondream-tools: {path} ended with an unfinished line ({loaded.repaired} bytes, from an"
            " interrupted run); removed it"
        )
        stats.repaired = loaded.repaired
    if loaded.bad_lines:
        shown = ", ".join(map(str, loaded.bad_lines[:5])) + (" ..." if len(loaded.bad_lines) > 5 else "")
        _say(f"moondream-tools: {path}: ignoring {len(loaded.bad_lines)} lines that are not records (line {shown})")
    return writer, loaded


async def execute(job: Job) -> int:
    """Run ``job``; returns the exit status (0, 1, 2, 130 or 143)."""
    start = time.perf_counter()
    stopper = _Stopper(_say)
    stopper.install()  # before the records file is read: a signal never ends in a traceback
    try:
        return await _execute(job, stopper, start)
    finally:
        stopper.uninstall()


async def _execute(job: Job, stopper: _Stopper, start: float) -> int:
    stats = Stats(total=len(job.sources))
    writer: JsonlWriter | None = None
    final: dict[str, Record] = {}
    fresh: set[str] = set()
    if job.jsonl is not None:
        opened = open_records(job.jsonl, stats)
        if opened is None:
            await job.backend.aclose()
            return 2
        writer, loaded = opened
        wanted = {job.key(source) for source in job.sources}
        final = {key: record for key, record in loaded.records.items() if key in wanted}
    todo: list[str] = []
    for source in job.sources:
        previous = final.get(job.key(source))
        if previous is None or (job.retry_failed and previous.get("error") is not None):
            todo.append(source)
        else:
            stats.skipped += 1
            stats.failed_before += previous.get("error") is not None

    planned = len(todo)
    if stopper.signum is not None:  # a signal while the file was read: start nothing
        todo = []
    videos = [source for source in todo if source in job.videos]
    estimates = await _frames_planned(job, videos) if videos and job.progress and not job.quiet else {}
    total = len(todo) - len(videos) + sum(estimates.values())
    unit = "frames" if videos else "images"
    with Bar(total, f"{job.command}", enabled=job.progress and not job.quiet, unit=unit) as bar:
        say = stopper.say = bar.print
        state = RunState(job.backend, _settings(job))

        def emit(record: Record) -> None:
            key = job.key(record["source"])
            final[key] = record
            fresh.add(key)
            stats.done += 1
            stats.failed += record.get("error") is not None
            if writer is not None:
                writer.write(record)
            if job.records_to_stdout:
                sys.stdout.write(dumps(record))
                sys.stdout.flush()
            if record["source"] not in job.videos:
                bar.advance(record)

        def emit_frame(record: Record) -> None:
            """A video's frame record: written, not an input of its own."""
            stats.frames += 1
            if writer is not None:
                writer.write(record)
            if job.records_to_stdout:
                sys.stdout.write(dumps(record))
                sys.stdout.flush()
            bar.advance(record)

        status: int | None = None
        try:
            if todo:
                if job.asked is not None:
                    await _run_inputs(job, state, todo, emit, emit_frame, stopper, on_video=lambda source, frames: bar.grow(
                        frames - estimates.get(source, frames)))
                else:
                    await _run_index(job, state, todo, emit, stopper)
        except BrokenPipeError:
            stopper.reason = "stdout was closed"
            with contextlib.suppress(OSError):
                sys.stdout = open(_devnull(), "w")  # noqa: SIM115 - no more output to a closed pipe
            status = 1
        except OSError as exc:  # the records file cannot be written (full disk, ...)
            say(f"moondream-tools: error: writing records failed: {message(exc)}")
            status = 1
        finally:
            if writer is not None:
                writer.close()
        stats.requests = state.requests
        stats.not_started = planned - stats.done if stopper.requested or status is not None else 0
        interrupted = status is not None
        ordered = [final[k] for k in dict.fromkeys(job.key(s) for s in job.sources) if k in final]
        images = [r for r in ordered if r["source"] not in job.videos]  # videos wrote their own annotation
        try:
            if job.exports.any and not images:
                pass
            elif job.exports.any and stopper.signum is None and not interrupted:
                stats.exports, exported = await run_exports(
                    job.exports, images, job.categories, fresh=fresh, description=job.description, load=state.read,
                )
                if not exported:
                    status = 1
            elif job.exports.any:
                stats.exports = ["exports skipped (the run was interrupted): rerun to finish and export"]
        finally:
            await state.aclose()
            with contextlib.suppress(Exception):
                await job.backend.aclose()
    stats.seconds = time.perf_counter() - start

    failed = [r for r in ordered if r.get("error") is not None]
    if job.table:
        print_table(ordered, job.skill)
    if stopper.reason is not None:  # even when quiet: it says why inputs were not started
        _say(f"moondream-tools: stopped: {stopper.reason}")
    for line in stats.exports:
        if not job.quiet or "failed" in line or "could not" in line:
            _say(f"moondream-tools: {line}")
    if not job.quiet:
        _say(summary_text(job.command, stats))
    if failed:
        _say(failures_text(failed, where=str(job.jsonl) if job.jsonl else None))
    if stopper.signum is not None:
        return 128 + int(stopper.signum)
    if status is not None:
        return status
    return 1 if failed or stats.not_started else 0


def _settings(job: Job) -> ImageSettings:
    import dataclasses

    settings = job.backend.image_settings
    if job.skill != "segment":  # nothing is segmented: no segmentation upload to encode
        settings = dataclasses.replace(settings, segment_upload=False)
        job.backend.image_settings = settings
    return settings


def _devnull() -> str:
    import os

    return os.devnull
