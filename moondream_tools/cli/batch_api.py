"""``--batch-api``: a command's inputs as a Moondream Batch API job, written as the same records.

The jobs of ``--jsonl FILE`` live in ``FILE.batch/``, one directory per job (``0001-caption``,
``0002-detect`` ...). Each is a :class:`~moondream_tools.MoondreamBatch` job directory (which
records every step, so nothing is uploaded or submitted twice) plus two files of the command:

- ``items.jsonl``: one line per request, written once before anything is sent: its ``id``,
  ``source`` as given, ``image_id`` / ``width`` / ``height`` (read here, as the standard path
  records them), and ``previous``: how many records its key had in FILE when the job was made.
- ``command.json``: the command, the record's ``skill`` and ``arguments``, the Batch API skill
  and its fields, the records file, and ``written`` (every record of the job is in FILE).

A run (:func:`execute_batch`):

1. reads FILE like the standard path (resume keys ``[source, skill, arguments]``; the batch
   path's ``arguments`` carry ``"batch": true``, so its keys are its own);
2. resumes the unfinished jobs in ``FILE.batch/`` made by the same command (same skill and
   arguments);
3. reads every input neither recorded nor in such a job (sha256 and upright size, as the
   standard path): one that cannot be read is recorded as an error at once;
4. makes a new job of the others, submits every job, waits (polls with backoff), and writes a
   record per result, matched by id. A record is written only while FILE holds no more records
   of its key than when the job was made, so a rerun after a kill never writes one twice;
5. gives a batch the service failed (or whose results expired) an error record for each of its
   inputs without a result; ``--retry-failed`` resubmits them in a new job.

``moondream-tools batch status JOB`` and ``batch fetch JOB`` (:func:`status_jobs`,
:func:`fetch_jobs`) pick a job up later (``--no-wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..batch import BatchError, BatchExpiredError, BatchFailedError, BatchProgress, BatchResult, MoondreamBatch
from ..batch._state import load_state, read_manifest, utc_now, write_atomically
from ..errors import ConfigurationError, ImageError, MoondreamError
from ..results import ImageSize, Usage
from .exports import ExportSpec, run_exports
from .progress import Stats, failures_text
from .records import JsonlWriter, Loaded, Record, key_of, record_key
from .runner import SignalHandlers, open_records
from ..indexing.skills import RunState, _inspect, base_record, detections_fields, message, points_fields

__all__ = ["BatchCommand", "execute_batch", "fetch_jobs", "jobs_root", "status_jobs"]

COMMAND_FILE = "command.json"
ITEMS_FILE = "items.jsonl"
FORMAT = "moondream-tools/cli-batch-job"
VERSION = 1
#: The skill each command asks of the Batch API (count counts points).
BATCH_SKILL = {"caption": "caption", "query": "query", "detect": "detect", "point": "point", "count": "point"}
T = TypeVar("T")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _library_log_handled() -> Any:
    """The job logs each input it cannot send as a warning; the command records and lists
    them itself, so they do not also go to stderr through logging's last-resort handler (a
    handler the user configured still gets them)."""
    logger = logging.getLogger("moondream_tools.batch")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _shown(path: Path) -> str:
    """A path as printed: relative to the working directory when under it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive (Windows)
        return str(path)
    return str(path) if relative.startswith("..") else relative


def _cli_text(exc: BaseException) -> str:
    """A library message in the command's words (options, not keyword arguments)."""
    return str(exc).replace("(pass base_url= accordingly)", "(give it with --base-url or MOONDREAM_BASE_URL)")


def jobs_root(jsonl: Path) -> Path:
    """Where the batch jobs of a records file live: ``FILE.batch`` beside it."""
    return jsonl.with_name(jsonl.name + ".batch")


# ---------------------------------------------------------------- the job directory


@dataclass(frozen=True)
class Item:
    """One input of a job (a line of ``items.jsonl``)."""

    id: str
    source: str
    image_id: str | None
    width: int | None
    height: int | None
    previous: int = 0

    def to_line(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@dataclass
class CliJob:
    """A job directory made by the command: its ``command.json`` and ``items.jsonl``."""

    path: Path
    meta: dict[str, Any]
    items: list[Item]
    by_id: dict[str, Item] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {item.id: item for item in self.items}

    @property
    def skill(self) -> str:
        return str(self.meta["skill"])

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.meta["arguments"])

    @property
    def written(self) -> bool:
        return bool(self.meta.get("written"))

    @property
    def jsonl(self) -> Path:
        return Path(self.meta["jsonl"])

    def key(self, source: str) -> str:
        return record_key(source, self.skill, self.arguments)

    def mark_written(self) -> None:
        if not self.written:
            self.meta["written"] = True
            self.meta["written_at"] = utc_now()
            _save_meta(self.path, self.meta)


def _save_meta(path: Path, meta: dict[str, Any]) -> None:
    write_atomically(path / COMMAND_FILE, json.dumps(meta, indent=1, ensure_ascii=False).encode())


def is_job(path: Path) -> bool:
    return (path / COMMAND_FILE).is_file()


def load_job(path: Path) -> CliJob:
    """The job in ``path`` (ConfigurationError when it is not one the command made)."""
    try:
        meta = json.loads((path / COMMAND_FILE).read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"{path} is not a batch job made by moondream-tools --batch-api (no {COMMAND_FILE})") from None
    except ValueError:
        raise ConfigurationError(f"{path / COMMAND_FILE} is not valid JSON; was it edited by hand?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigurationError(f"{path / COMMAND_FILE} is not a moondream-tools --batch-api job file")
    if meta.get("version") != VERSION:
        raise ConfigurationError(f"{path} was made by another version of moondream-tools (job version {meta.get('version')!r})")
    known = set(Item.__dataclass_fields__)
    items = []
    with open(path / ITEMS_FILE, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                items.append(Item(**{k: v for k, v in json.loads(line).items() if k in known}))
    return CliJob(path, meta, items)


def job_dirs(root: Path) -> list[Path]:
    """The job directories in ``root`` (``FILE.batch``), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d{4,}-\w+", p.name) and is_job(p))


def resolve_jobs(path: Path) -> list[Path]:
    """``path`` as a job directory, or the jobs of a ``FILE.batch`` directory."""
    if is_job(path):
        return [path]
    found = job_dirs(path)
    if not found:
        raise ConfigurationError(
            f"{path} holds no batch job made by moondream-tools --batch-api (a job directory has {COMMAND_FILE})"
        )
    return found


def create_job(root: Path, command: BatchCommand, items: Sequence[Item]) -> CliJob:
    """A new job directory for ``items`` (its files written before anything is sent)."""
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    path = root / f"{max(numbers, default=0) + 1:04d}-{command.skill}"
    path.mkdir()
    write_atomically(path / ITEMS_FILE, b"".join(item.to_line() for item in items))
    meta = {
        "format": FORMAT, "version": VERSION, "created_at": utc_now(),
        "command": command.description, "skill": command.skill, "arguments": command.arguments,
        "batch_skill": BATCH_SKILL[command.skill], "fields": command.fields,
        "jsonl": str(command.jsonl.resolve()), "items": len(items), "written": False,
    }
    _save_meta(path, meta)  # last: a directory without it is an unfinished creation, ignored
    return CliJob(path, meta, list(items))


def open_batch(job: CliJob, client: Any, *, poll_interval: float = 1.0, concurrency: int = 8) -> MoondreamBatch:
    """The job's :class:`MoondreamBatch` with its requests added (the same, in the same
    order, every time: a built job resumes, an unbuilt one builds)."""
    batch = MoondreamBatch(
        job.path, client=client, poll_interval=poll_interval, max_poll_interval=max(30.0, poll_interval),
        build_concurrency=concurrency,
    )
    fields = dict(job.meta.get("fields") or {})
    for item in job.items:
        batch.add(item.source, job.meta["batch_skill"], id=item.id, **fields)
    return batch


# ---------------------------------------------------------------- results -> records


def _image_fields(record: Record, item: Item) -> Record:
    record["image_id"], record["width"], record["height"] = item.image_id, item.width, item.height
    return record


def _item_error(error: MoondreamError) -> str:
    code = getattr(error, "code", None)
    text = str(error)
    if code == "image_error" and " was not sent: " in text:  # as the standard path words image errors
        return text.split(" was not sent: ", 1)[1]
    return message(error)


def result_record(job: CliJob, item: Item, result: BatchResult) -> Record:
    """The record of one result: the standard path's fields for the skill (``capped`` is
    null: the Batch API takes no ``max_objects``, so whether its limit was reached is unknown;
    ``tiles`` is 1: the image is sent whole)."""
    record = _image_fields(base_record(item.source, job.skill, job.arguments), item)
    if result.error is not None or result.result is None:
        record["error"] = _item_error(result.error) if result.error is not None else "no result"
        return record
    value: Any = result.result
    if value.image_size is None and item.width and item.height:
        value = value.model_copy(update={"image_size": ImageSize(width=item.width, height=item.height)})
    skill = job.meta["batch_skill"]
    if skill == "caption":
        record["caption"] = value.caption
    elif skill == "query":
        record["answer"] = value.answer
    elif skill == "detect":
        record.update(detections_fields(value), capped=None, tiles=1)
    else:
        record.update(points_fields(value), capped=None, tiles=1)
    record["error"] = None
    return record


def _batch_failure(exc: BatchError) -> str:
    """A failed or expired batch, short, for the records of its inputs."""
    text = str(exc)
    for tail in ("; its requests have no results", ", so they can no longer be downloaded"):
        text = text.split(tail, 1)[0]
    return f"{type(exc).__name__}: {text}"


class _Sink:
    """Appends records to the records file: a job's record only while the file holds no more
    records of its key than when the job was made (so never twice)."""

    def __init__(self, writer: JsonlWriter, loaded: Loaded, stats: Stats) -> None:
        self.writer = writer
        self.counts = dict(loaded.counts)
        self.final = dict(loaded.records)
        self.fresh: set[str] = set()
        self.written: list[Record] = []
        self.kept = 0  # a job's records already in the file (written by an earlier run)
        self.stats = stats
        self.on_write: Callable[[Record], None] = lambda record: None

    def emit(self, record: Record, previous: int | None = None) -> bool:
        key = key_of(record)
        assert key is not None
        if previous is not None and self.counts.get(key, 0) > previous:
            self.kept += 1  # written by an earlier run of this job
            return False
        self.writer.write(record)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.final[key] = record
        self.fresh.add(key)
        self.written.append(record)
        self.stats.done += 1
        self.stats.failed += record.get("error") is not None
        self.on_write(record)
        return True


async def _deliver(sink: _Sink, job: CliJob, batch: MoondreamBatch, *, wait: bool,
                   on_progress: Callable[[BatchProgress], None] | None = None) -> BatchError | None:
    """Write the job's records (waiting for it with ``wait``); returns the failed or expired
    batch's error, after recording an error for each input it left without a result."""
    seen: set[str] = set()
    problem: BatchError | None = None
    stream = batch.run(on_progress=on_progress) if wait else batch.results()
    try:
        async for result in stream:
            item = job.by_id.get(result.id)
            if item is None or result.id in seen:
                continue
            seen.add(result.id)
            sink.emit(result_record(job, item, result), previous=item.previous)
    except (BatchFailedError, BatchExpiredError) as exc:
        problem = exc
        text = _batch_failure(exc)
        for item in job.items:
            if item.id not in seen:
                record = _image_fields(base_record(item.source, job.skill, job.arguments), item)
                record["error"] = text
                sink.emit(record, previous=item.previous)
    finally:
        aclose = getattr(stream, "aclose", None)  # an async generator: close it on the way out
        if aclose is not None:
            await aclose()
    job.mark_written()
    return problem


# ---------------------------------------------------------------- progress


class _Display:
    """The jobs' progress: a rich bar on a terminal (lines done of all, failed, status), plain
    lines otherwise (when something changed), nothing when quiet."""

    def __init__(self, label: str, total: int, *, bar: bool, lines: bool) -> None:
        self.label, self.total = label, total
        self.lines = lines and not bar
        self._seen: dict[str, tuple[str, int, int]] = {}
        self._progress: Any = None
        self._task: Any = None
        if bar and total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[failed]}"), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._task = self._progress.add_task(label, total=total, failed="", status="submitted")

    def __enter__(self) -> _Display:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            _say(text)

    def update(self, name: str, progress: BatchProgress) -> None:
        now = (progress.status, progress.completed, progress.failed + progress.not_sent)
        if self._seen.get(name) == now:
            return
        self._seen[name] = now
        done = sum(c + f for _, c, f in self._seen.values())
        failed = sum(f for _, _, f in self._seen.values())
        if self._progress is not None:
            statuses = sorted({s for s, _, _ in self._seen.values()})
            self._progress.update(
                self._task, completed=min(done, self.total), status=", ".join(statuses),
                failed=f"[red]{failed} failed[/red]" if failed else "",
            )
        elif self.lines:
            _say(
                f"moondream-tools {self.label}: batch job {name}: {progress.status}, {now[1] + now[2]} of"
                f" {progress.total + progress.not_sent} done, {now[2]} failed"
            )


# ---------------------------------------------------------------- signals


class _Stopped(Exception):
    """A signal stopped the run."""


class _Abort(Exception):
    """The run cannot go on (the reason was printed): exit 2."""


class _Signals(SignalHandlers):
    """SIGINT / SIGTERM: while waiting, stop waiting at once (the job goes on in the service);
    while submitting, finish the step first (a second signal stops at once)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self.say = say
        self.task: asyncio.Future[Any] | None = None
        self.at_once = False
        self.note = ""

    def _on_signal(self, sig: int) -> None:
        name = self.name(sig)
        first = self.signum is None
        if first:
            self.signum = sig
        if self.task is not None and not self.task.done() and (self.at_once or not first):
            self.task.cancel()
            if first:
                self.say(f"moondream-tools: {name}: stopped{self.note}")
        elif first:
            self.say(f"moondream-tools: {name}: stopping after this step (send it again to stop at once)")

    async def guard(self, work: Awaitable[T], *, at_once: bool) -> T:
        """Run ``work``; raise :class:`_Stopped` when a signal cancelled it (or came before)."""
        if self.signum is not None:
            raise _Stopped
        task = asyncio.ensure_future(work)
        self.task, self.at_once = task, at_once
        try:
            await asyncio.wait([task])
        finally:
            self.task = None
        if task.cancelled():
            raise _Stopped
        return task.result()


# ---------------------------------------------------------------- the command


@dataclass
class BatchCommand:
    """A skill command with ``--batch-api``."""

    command: str
    skill: str
    arguments: dict[str, Any]
    fields: dict[str, Any]
    sources: list[str]
    client: Any
    jsonl: Path
    retry_failed: bool = False
    concurrency: int = 8
    poll_interval: float = 1.0
    wait: bool = True
    progress: bool = False
    quiet: bool = False
    exports: ExportSpec = field(default_factory=ExportSpec)
    categories: list[str] = field(default_factory=list)
    description: str = ""
    tiling_note: bool = False
    max_tiles: int = 16

    def key(self, source: str) -> str:
        return record_key(source, self.skill, self.arguments)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cost_text(usages: Sequence[Usage], costs: Sequence[tuple[float, float]]) -> str | None:
    """The tokens and the estimated cost at the batch price beside the standard price.

    >>> print(cost_text([Usage(input_tokens=2_000_000, output_tokens=100_000)], [(0.425, 0.85)]))
    moondream-tools: Batch API tokens: 2,000,000 input, 100,000 output; estimated cost $0.425 at the batch price ($0.850 at the standard price)
    """
    if not usages:
        return None
    tokens_in = sum(u.input_tokens or 0 for u in usages)
    tokens_out = sum(u.output_tokens or 0 for u in usages)
    batch_usd, standard_usd = sum(c[0] for c in costs), sum(c[1] for c in costs)
    # cents for dollars; three significant digits of the smaller amount for less
    digits = 2 if batch_usd >= 1 or batch_usd <= 0 else min(9, 2 - math.floor(math.log10(batch_usd)))
    return (
        f"moondream-tools: Batch API tokens: {tokens_in:,} input, {tokens_out:,} output; estimated cost"
        f" ${batch_usd:,.{digits}f} at the batch price (${standard_usd:,.{digits}f} at the standard price)"
    )


def _collect_cost(batches: Sequence[MoondreamBatch]) -> str | None:
    usages, costs = [], []
    for batch in batches:
        if batch.usage is not None:
            usages.append(batch.usage)
            costs.append(batch.cost())
    return cost_text(usages, costs)


async def _read_items(command: BatchCommand, state: RunState, todo: Sequence[str], loaded: Loaded,
                      sink: _Sink) -> tuple[list[Item], int]:
    """Read every input (sha256, upright size) as the standard path does: one that cannot be
    read is recorded as an error now; the others become items. Also: how many the standard
    path's ``--tiles auto`` would have tiled."""
    from ..tiling.plan import plan_tiles

    slots = asyncio.Semaphore(command.concurrency)

    async def inspect(source: str) -> tuple[str | None, tuple[int, int] | ImageError]:
        async with slots:
            try:
                data = await state.read(source)
            except ImageError as exc:
                return None, exc
            return await asyncio.to_thread(_inspect, data, state.settings)

    read: list[tuple[str | None, tuple[int, int] | ImageError]] = []
    step = 32 * command.concurrency  # a bounded number of tasks at a time, however many inputs
    for start in range(0, len(todo), step):
        read += await asyncio.gather(*(inspect(s) for s in todo[start : start + step]))
    items: list[Item] = []
    large = 0
    for source, (digest, size) in zip(todo, read):
        if isinstance(size, ImageError):
            record = base_record(source, command.skill, command.arguments)
            record["image_id"], record["error"] = digest, message(size)
            sink.emit(record)
            continue
        width, height = size
        if command.tiling_note and plan_tiles(width, height, tiling="auto", max_tiles=command.max_tiles).requests > 1:
            large += 1
        previous = loaded.counts.get(command.key(source), 0)
        items.append(Item(str(len(items)), source, digest, width, height, previous))
    return items, large


async def execute_batch(command: BatchCommand) -> int:
    """Run a ``--batch-api`` command; returns the exit status (0, 1, 2, 130 or 143)."""
    start = time.perf_counter()
    signals = _Signals(_say)
    signals.install()
    try:
        with _library_log_handled():
            return await _execute(command, signals, start)
    finally:
        signals.uninstall()
        with contextlib.suppress(Exception):
            await command.client.aclose()


async def _execute(command: BatchCommand, signals: _Signals, start: float) -> int:
    stats = Stats(total=len(command.sources))
    opened = open_records(command.jsonl, stats)
    if opened is None:
        return 2
    writer, loaded = opened
    sink = _Sink(writer, loaded, stats)
    settings = dataclasses.replace(command.client.image_settings, segment_upload=False)
    state = RunState(command.client, settings)
    root = jobs_root(command.jsonl)
    label = command.command
    batches: list[tuple[CliJob, MoondreamBatch]] = []
    status: int | None = None
    problems: list[BatchError] = []
    finished = False
    try:
        try:
            pending = [job for job in map(load_job, job_dirs(root))
                       if not job.written and job.skill == command.skill and job.arguments == command.arguments]
        except (ConfigurationError, OSError, ValueError, TypeError) as exc:
            _say(f"moondream-tools: error: {root}: {exc}")
            raise _Abort from None
        in_jobs = {item.source for job in pending for item in job.items}
        todo: list[str] = []
        for source in command.sources:
            previous = loaded.records.get(command.key(source))
            redo = previous is None or (command.retry_failed and previous.get("error") is not None)
            if source in in_jobs:
                if not redo:
                    stats.skipped += 1
                    stats.failed_before += previous.get("error") is not None  # type: ignore[union-attr]
                continue
            if redo:
                todo.append(source)
            else:
                stats.skipped += 1
                stats.failed_before += previous.get("error") is not None  # type: ignore[union-attr]

        items, large = await signals.guard(_read_items(command, state, todo, loaded, sink), at_once=True)
        if large:
            _say(
                f"moondream-tools: note: {_plural(large, 'image')} of this run would be tiled by the standard path"
                " (--tiles auto); the Batch API gets each image whole (as --tiles never), so small objects in"
                " them may be missed: run those without --batch-api to tile them"
            )
        if items:
            pending.append(create_job(root, command, items))
        for job in pending:
            try:
                batch = open_batch(job, command.client, poll_interval=command.poll_interval,
                                   concurrency=command.concurrency)
            except ConfigurationError as exc:
                _say(f"moondream-tools: error: {job.path}: {_cli_text(exc)}")
                raise _Abort from None
            batches.append((job, batch))
            resumed = batch.built
            try:
                ids = await signals.guard(batch.submit(), at_once=False)
            except ConfigurationError as exc:
                _say(f"moondream-tools: error: {job.path}: {_cli_text(exc)}")
                raise _Abort from None
            except MoondreamError as exc:
                _say(
                    f"moondream-tools: error: submitting the batch job {job.path} failed: {message(exc)}."
                    " Nothing is lost: rerun the same command to resume it"
                )
                status = 1
                break
            if not command.quiet:
                verb = "resumed" if resumed else "submitted"
                _say(
                    f"moondream-tools {label}: batch job {job.path}: {_plural(len(job.items), 'input')} {verb}"
                    f" (batch {', '.join(ids)})"
                )
            if signals.signum is not None:
                raise _Stopped
        if status is None and not command.wait:
            for job, _ in batches:
                print(job.path, flush=True)
            if batches and not command.quiet:
                shown = " ".join(str(job.path) for job, _ in batches)
                _say(
                    f"moondream-tools {label}: not waiting. `moondream-tools batch status {shown}` shows the"
                    f" progress; `moondream-tools batch fetch {shown}` writes the records when it is done"
                    " (or rerun this command, without --no-wait)"
                )
            finished = True
        elif status is None:
            total = sum(len(job.items) for job, _ in batches)
            display = _Display(label, total, bar=command.progress and not command.quiet, lines=not command.quiet)
            signals.say = display.print
            signals.note = (
                ": the batch job goes on in the service; rerun the same command (or `moondream-tools batch fetch"
                f" {root}`) to collect its results"
            )
            with display:
                for job, batch in batches:
                    def show(progress: BatchProgress, name: str = job.path.name) -> None:
                        display.update(name, progress)

                    try:
                        problem = await signals.guard(_deliver(sink, job, batch, wait=True, on_progress=show),
                                                      at_once=True)
                    except MoondreamError as exc:
                        display.print(
                            f"moondream-tools: error: waiting for the batch job {job.path} failed: {message(exc)}."
                            " The job is kept: rerun the same command to resume it"
                        )
                        status = 1
                        break
                    if problem is not None:
                        problems.append(problem)
            finished = status is None
    except _Stopped:
        pass
    except _Abort:
        status = 2
    except OSError as exc:  # the records file cannot be written (full disk, ...)
        _say(f"moondream-tools: error: writing records failed: {exc}")
        status = 1
    finally:
        writer.close()
        for _, batch in batches:
            with contextlib.suppress(Exception):
                await batch.aclose()
    if status == 2:  # a job directory this command cannot use: said why, nothing else to report
        await state.aclose()
        return 2

    keys = list(dict.fromkeys(command.key(s) for s in command.sources))
    ordered = [sink.final[k] for k in keys if k in sink.final]
    known = set(keys)
    ordered += [r for r in sink.written if key_of(r) not in known]  # resumed jobs' inputs not given this time
    try:
        if command.exports.any and finished and command.wait and signals.signum is None:
            stats.exports, exported = await run_exports(
                command.exports, ordered, command.categories, fresh=sink.fresh, description=command.description,
                load=state.read,
            )
            if not exported:
                status = status or 1
        elif command.exports.any and command.wait:
            stats.exports = ["exports skipped (the run was interrupted): rerun to finish and export"]
    finally:
        await state.aclose()
    stats.seconds = time.perf_counter() - start

    for problem in problems:
        _say(
            f"moondream-tools: {_batch_failure(problem)}; its inputs are recorded with that error:"
            " --retry-failed submits them again"
        )
    for line in stats.exports:
        if not command.quiet or "failed" in line or "could not" in line:
            _say(f"moondream-tools: {line}")
    if not command.quiet:
        _say(_summary(label, stats, len(batches), waiting=command.wait))
        cost = _collect_cost([b for _, b in batches])
        if cost:
            _say(cost)
    failed = [r for r in ordered if r.get("error") is not None]
    if failed:
        _say(failures_text(failed, where=str(command.jsonl)))
    if signals.signum is not None:
        return 128 + int(signals.signum)
    if status is not None:
        return status
    return 1 if failed or problems else 0


def _summary(label: str, stats: Stats, jobs: int, *, waiting: bool) -> str:
    failed = stats.failed + stats.failed_before
    before = f" ({stats.failed_before} recorded earlier: --retry-failed redoes them)" if stats.failed_before else ""
    text = (
        f"moondream-tools {label} (Batch API): {stats.done} done, {stats.skipped} skipped, {failed} failed{before},"
        f" {_plural(jobs, 'batch job')}, {stats.seconds:.1f} s"
    )
    if not waiting and jobs:
        text += " (not waiting for the results)"
    return text


# ---------------------------------------------------------------- batch status / batch fetch


def _progress_text(progress: BatchProgress) -> str:
    done = progress.completed + progress.failed + progress.not_sent
    return f"{progress.status}, {done} of {progress.total + progress.not_sent} done, {progress.failed + progress.not_sent} failed"


def _recorded_progress(path: Path) -> str:
    """The last recorded state of a job another process holds (no poll)."""
    state = load_state(path)
    if state is None:
        return "not built yet"
    not_sent = sum(1 for entry in read_manifest(path) if entry.batch is None)
    total = sum(b.progress.get("total", b.lines) for b in state.batches) + not_sent
    done = sum(b.progress.get("completed", 0) + b.progress.get("failed", 0) for b in state.batches) + not_sent
    statuses = ", ".join(sorted({b.status or ("submitting" if b.submitting else "uploading") for b in state.batches}))
    return f"{statuses}, {done} of {total} done (as last recorded: another process holds the job and polls it)"


async def status_jobs(paths: Sequence[Path], make_client: Callable[[str | None], Any]) -> int:
    """``moondream-tools batch status JOB...``: poll each job once and print where it stands."""
    with _library_log_handled():
        return await _status_jobs(paths, make_client)


async def _status_jobs(paths: Sequence[Path], make_client: Callable[[str | None], Any]) -> int:
    clients: dict[str, Any] = {}
    status = 0
    try:
        for path in paths:
            try:
                job = load_job(path)
                state = load_state(path)
                url = state.base_url if state is not None else None
                if url not in clients:
                    clients[url] = make_client(url)
                batch = open_batch(job, clients[url])
            except (ConfigurationError, OSError, ValueError) as exc:
                _say(f"moondream-tools: error: {path}: {_cli_text(exc)}")
                status = 2
                continue
            head = f"{path}: {job.meta.get('command')} ({_plural(len(job.items), 'input')})"
            try:
                if not batch.built:
                    print(f"{head}: not submitted (the command stopped before): rerun it to submit", flush=True)
                    continue
                try:
                    progress = await batch.status()
                except BatchError as exc:
                    if exc.code != "job_busy":
                        raise
                    print(f"{head}: {_recorded_progress(path)}", flush=True)
                    continue
                line = f"{head}: {_progress_text(progress)}; batch {', '.join(batch.batch_ids) or '-'}"
                for info in progress.batches:
                    if info.error:
                        line += f"; batch {info.batch_id} {info.status}: {info.error.get('code')}: {info.error.get('message')}"
                if progress.done:
                    cost = _collect_cost([batch])
                    if cost:
                        line += "\n  " + cost.removeprefix("moondream-tools: ")
                    line += (
                        f"\n  records: written to {_shown(job.jsonl)}" if job.written
                        else f"\n  records: not written yet: moondream-tools batch fetch {path}"
                    )
                else:
                    expires = [i.expires_at for i in progress.batches if i.expires_at]
                    if expires:
                        line += f"; results expire {min(expires)}"
                print(line, flush=True)
            except MoondreamError as exc:
                _say(f"moondream-tools: error: {path}: {message(exc)}")
                status = 1
            finally:
                await batch.aclose()
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
    return status


async def fetch_jobs(paths: Sequence[Path], jsonl: Path | None, make_client: Callable[[str | None], Any], *,
                     quiet: bool) -> int:
    """``moondream-tools batch fetch JOB``: write the records of finished jobs (never waits)."""
    with _library_log_handled():
        return await _fetch_jobs(paths, jsonl, make_client, quiet=quiet)


async def _fetch_jobs(paths: Sequence[Path], jsonl: Path | None, make_client: Callable[[str | None], Any], *,
                      quiet: bool) -> int:
    start = time.perf_counter()
    try:
        jobs = [load_job(p) for p in paths]
    except (ConfigurationError, OSError, ValueError, TypeError) as exc:
        _say(f"moondream-tools: error: {exc}")
        return 2
    target = jsonl if jsonl is not None else jobs[0].jsonl
    stats = Stats()
    opened = open_records(target, stats)
    if opened is None:
        return 2
    writer, loaded = opened
    sink = _Sink(writer, loaded, stats)
    clients: dict[str | None, Any] = {}
    fetched: list[MoondreamBatch] = []
    problems: list[BatchError] = []
    status = 0
    try:
        for job in jobs:
            state = load_state(job.path)
            url = state.base_url if state is not None else None
            try:
                if url not in clients:
                    clients[url] = make_client(url)
                batch = open_batch(job, clients[url])
            except ConfigurationError as exc:
                _say(f"moondream-tools: error: {job.path}: {_cli_text(exc)}")
                status = max(status, 2)
                continue
            try:
                if not batch.built or not batch.batch_ids:
                    _say(f"moondream-tools: {job.path}: not submitted yet: rerun the command that made it to submit it")
                    status = max(status, 1)
                    continue
                progress = await batch.status()
                if not progress.done:
                    _say(
                        f"moondream-tools: {job.path}: not finished ({_progress_text(progress)}); nothing written."
                        f" Try again later (`moondream-tools batch status {job.path}`)"
                    )
                    status = max(status, 1)
                    continue
                problem = await _deliver(sink, job, batch, wait=False)
                fetched.append(batch)
                if problem is not None:
                    problems.append(problem)
            except BatchError as exc:
                _say(f"moondream-tools: {job.path}: {message(exc)}")
                status = max(status, 1)
            except MoondreamError as exc:
                _say(f"moondream-tools: error: {job.path}: {message(exc)}; try again later")
                status = max(status, 1)
            finally:
                await batch.aclose()
    except OSError as exc:
        _say(f"moondream-tools: error: writing records failed: {exc}")
        status = 1
    finally:
        writer.close()
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
    for problem in problems:
        _say(
            f"moondream-tools: {_batch_failure(problem)}; its inputs are recorded with that error:"
            " rerun the command with --retry-failed to submit them again"
        )
    failed = [r for r in sink.written if r.get("error") is not None]
    if not quiet and fetched:
        elapsed = time.perf_counter() - start
        _say(
            f"moondream-tools batch fetch: {_plural(stats.done, 'record')} written to {_shown(target)} ({stats.failed}"
            f" failed), {sink.kept} already there, {elapsed:.1f} s"
        )
        cost = _collect_cost(fetched)
        if cost:
            _say(cost)
    if failed:
        _say(failures_text(failed, where=str(target)))
    if status:
        return status
    return 1 if failed or problems else 0
