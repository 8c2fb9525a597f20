"""Ray Data: the batch work of :mod:`moondream_tools.indexing` and the command line over a
cluster, as one callable class for ``Dataset.map_batches``.

Needs the ``ray`` extra: ``pip install "moondream-tools[ray]"``.

:class:`MoondreamBatchUDF` is a thin leaf: each row goes through the same code as
:class:`~moondream_tools.indexing.ImageIndexer` (``skill="index"``, the records of the RAG
loaders) or the ``moondream-tools`` command (``caption`` / ``query`` / ``detect`` /
``point`` / ``count`` / ``segment``, the command's records), and comes back as one flat row.

- **Inputs**: a ``bytes`` column (with an optional ``path`` naming it, as
  ``ray.data.read_binary_files(..., include_paths=True)`` gives), or ``path`` (read on the
  worker), or ``url`` (http(s), fetched by the worker); per row the first that is set is
  used. Batches may be NumPy dicts (Ray's default), pandas or PyArrow.
- **Outputs**: one row per input row, in order: the input's ``path`` / ``url`` columns,
  the skill's fields (boxes as lists of floats, or JSON strings for ``index`` as the
  loaders' metadata has them) and ``error`` (None when the row succeeded). A row that
  fails never fails its batch; the batch is a PyArrow table with the same schema every
  time, so every block of the job writes the same Parquet schema.
- **Backend**: built once per actor, lazily, from picklable options
  (:class:`~moondream_tools.BackendConfig`); the key is read from the worker's environment
  (``MOONDREAM_API_KEY`` / ``FAL_KEY``, or ``api_key_env``) and never travels.
- **Rate budget**: ``requests_per_second`` is the budget of the whole job, whatever the
  number of actors: every request of every actor first takes a turn from one named Ray
  actor (see :class:`RayPacer`), plugged into the transport's
  :class:`~moondream_tools._transport.Limiter` through its
  :class:`~moondream_tools._transport.Pacer` seam. A 429 pauses every worker.
- **Batch API** (``batch_api=True``, ``skill="index"``, Moondream Cloud): one Batch API
  job per batch (pass ``batch_size=None`` for one per block), half price, results within
  hours; with a shared ``job_dir`` a retried Ray task resumes its job instead of paying twice.

Example::

    import ray
    from moondream_tools.ray import MoondreamBatchUDF

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    out = ds.map_batches(
        MoondreamBatchUDF,
        fn_constructor_kwargs=MoondreamBatchUDF.constructor_kwargs(
            skill="index", questions=["Is there a person?"], detect=["car"], requests_per_second=10),
        compute=ray.data.ActorPoolStrategy(size=8),
        batch_size=16,
    )
    out.write_parquet("s3://bucket/labels/")
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import ray
import ray.exceptions

from ._concurrency import stream_in_order
from .backend import CaptionLength, VisionBackend, check_length, check_object, check_question
from .backend_config import BackendConfig
from .indexing.skills import Asked, RunState, message, run_one
from .images.sources import ReferenceKind, read_image_file, reference_kind
from .indexing import DEFAULT_OCR_PROMPT, ImageIndexer, ImageRecord, phrase_key
from .tiling import DEFAULT_MAX_TILES, TilingMode, plan_tiles

__all__ = ["SKILL_NAMES", "MoondreamBatchUDF", "RayPacer", "UDFSkill"]

logger = logging.getLogger("moondream_tools")

UDFSkill = Literal["index", "caption", "query", "detect", "point", "count", "segment"]
#: The skills :class:`MoondreamBatchUDF` runs.
SKILL_NAMES: tuple[str, ...] = get_args(UDFSkill)
#: The input columns, in the order a row's image is taken from.
INPUT_COLUMNS = ("bytes", "path", "url")
_OBJECT_SKILLS = ("detect", "point", "count", "segment")
_TILED_SKILLS = ("detect", "point", "count", "index")
_PACER_PREFIX = "moondream_tools.pacer:"
_PACER_PATIENCE = 5.0  # seconds a worker keeps trying to reach the job's pacer before a request fails

# ---------------------------------------------------------------------- the shared pace


class _PacerActor:
    """One job's pace (a named Ray actor, async: many workers wait on it at once).

    Turns are handed out ``interval`` apart (a token bucket of capacity one, as the
    transport's own :class:`~moondream_tools._transport.Limiter` paces one process): a call
    to :meth:`acquire` returns at its turn, so the caller sends right away. The first turn
    is one interval after the actor starts: an actor that replaces a lost one (its owner, a
    worker, was removed) cannot hand out a turn closer than that to the last one of its
    predecessor, which was handed out before it died.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = time.monotonic() + interval
        self._paused_until = 0.0

    async def acquire(self) -> None:
        now = time.monotonic()
        start = max(now, self._next, self._paused_until)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)

    async def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)


_PacerRemote = ray.remote(num_cpus=0, max_restarts=0)(_PacerActor)


class RayPacer:
    """A :class:`~moondream_tools._transport.Pacer` shared by every worker of a Ray job:
    a named actor (``name``, in the job's namespace) hands out turns ``1 /
    requests_per_second`` apart, so the rate holds across the cluster whatever the number
    of actors.

    Lifetime: the actor is not detached. The first worker that needs it creates it
    (``get_if_exists``) and owns it, so it ends with that worker (at the latest when the
    actor pool is torn down at the end of the job, or with the job itself) and never
    outlives the job. If an autoscaling pool removes the owner, the next turn asked of the
    dead actor fails, and the worker creates a new one (which waits one interval before its
    first turn: the budget holds across the handover). A worker keeps trying, backing off,
    for about five seconds before the request fails (as its row's error). A 429's pause
    still in force is passed on: each worker sends the pauses it asked for itself to the
    new actor when it first reaches it (until then, or if that worker is gone too, the new
    actor does not know of them).

    Creating or looking up the actor is a blocking call to Ray's control plane: it runs in
    a thread, never on the event loop.

    Example::

        pacer = RayPacer("moondream_tools.pacer:photos", requests_per_second=10)
        md = BackendConfig(backend="moondream").build(pacer=pacer)   # inside a worker
    """

    def __init__(self, name: str, requests_per_second: float) -> None:
        if not requests_per_second > 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second!r}")
        self.name = name
        self.interval = 1.0 / requests_per_second
        self._handle: Any = None
        self._paused_until = 0.0  # this worker's own pauses (monotonic), for a replacement actor
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RayPacer(name={self.name!r}, requests_per_second={1 / self.interval:g})"

    def _lookup(self, failed: Any) -> Any:
        """The actor's handle, creating the actor if there is none (blocking: run in a
        thread). ``failed`` is a handle that failed: it is replaced, unless another caller
        of this process has replaced it already."""
        with self._lock:
            if self._handle is None or self._handle is failed:
                self._handle = _PacerRemote.options(name=self.name, get_if_exists=True).remote(self.interval)
            return self._handle

    async def wait_turn(self) -> None:
        """Return at this request's turn. A failure to reach the actor (it died, its name
        is still being freed, another worker is creating it, the control plane is busy) is
        retried with a new or looked-up actor, backing off, for about five seconds; only then
        does the request fail (as its row's error)."""
        failed: Any = None
        deadline: float | None = None
        delay = 0.05
        while True:
            handle = self._handle
            try:
                if handle is None or handle is failed:
                    handle = await asyncio.to_thread(self._lookup, failed)
                    remaining = self._paused_until - time.monotonic()
                    if remaining > 0:  # a pause still in force outlives the actor that had it
                        await handle.pause.remote(remaining)  # done before the turn is asked for
                await handle.acquire.remote()
                return
            except (ray.exceptions.RayError, ValueError) as exc:  # ValueError: a name taken or freed meanwhile
                failed = handle
                now = time.monotonic()
                deadline = now + _PACER_PATIENCE if deadline is None else deadline
                if now + delay > deadline:
                    raise
                logger.info("moondream-tools: the pacer %s cannot be reached (%s); trying again in %.2f s",
                            self.name, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    def pause(self, seconds: float) -> None:
        """Hold every worker's requests back for ``seconds`` (sent, not waited for; never
        blocks: with no actor yet, the next turn's new actor gets the pause)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        handle = self._handle
        if handle is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                handle.pause.remote(seconds)


# ---------------------------------------------------------------------- the UDF


class MoondreamBatchUDF:
    """A callable class for ``Dataset.map_batches``: one skill (or indexing) per image row.

    Args:
        skill: ``"index"`` (an :class:`~moondream_tools.indexing.ImageRecord` per image:
            caption, answers, OCR, objects), or one of the command line's skills
            ``"caption"``, ``"query"`` (needs ``question``), ``"detect"``, ``"point"``,
            ``"count"`` (counted with points), ``"segment"`` (each needs ``object``).
        object: the phrase for detect / point / count / segment.
        question: the question for query.
        caption_length: ``"short"`` / ``"normal"`` / ``"long"`` (caption, and index's caption).
        caption, questions, ocr, ocr_prompt, detect: what ``index`` asks of every image (as
            :class:`~moondream_tools.indexing.ImageIndexer`).
        tiling, max_tiles, max_objects: how detect / point / count / index treat large
            images and the object limit (as the command line and the indexer).
        backend: ``"moondream"`` (Moondream Cloud, or any server speaking its API at
            ``base_url``, e.g. Moondream Station) or ``"fal"``.
        base_url, model, api_key_env, timeout, max_retries: as
            :class:`~moondream_tools.BackendConfig`; the key is read from the worker's
            environment (``api_key_env``, default ``MOONDREAM_API_KEY`` / ``FAL_KEY``).
        max_concurrency: requests in flight per actor (images in flight per batch).
        requests_per_second: the budget of the **whole job**, shared by every actor through
            one named Ray actor (None: unpaced).
        pacer_name: actors with the same name share one budget (default: derived from the
            backend, ``base_url``, ``api_key_env`` and the rate, so two ``map_batches`` of
            one job over one account share it). Budgets are per Ray job.
        batch_api: index through Moondream's Batch API (``skill="index"``, backend
            ``"moondream"``, no ``max_objects``): one Batch API job per batch, half price,
            results within hours.
        job_dir: where the Batch API jobs live (one sub-directory per batch, named by its
            inputs and options, so a retried task resumes its job; a directory every worker
            sees makes that work across machines). None: a temporary directory per batch.
        poll_interval: the Batch API's first poll interval in seconds (x1.5 up to 30 s).

    Unknown or misplaced options are errors when the class is built: build it on the driver
    first (:meth:`constructor_kwargs`) so a typo fails before the job starts.

    Example::

        out = ds.map_batches(
            MoondreamBatchUDF,
            fn_constructor_kwargs=MoondreamBatchUDF.constructor_kwargs(skill="detect", object="car"),
            compute=ray.data.ActorPoolStrategy(size=4),
            batch_size=16,
        )
        for row in out.take(3):
            print(row["path"], row["count"], row["boxes_px"], row["error"])
    """

    def __init__(
        self,
        skill: UDFSkill = "index",
        *,
        object: str | None = None,
        question: str | None = None,
        caption_length: CaptionLength = "normal",
        caption: bool = True,
        questions: Sequence[str] = (),
        ocr: bool = False,
        ocr_prompt: str = DEFAULT_OCR_PROMPT,
        detect: Sequence[str] = (),
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        max_objects: int | None = None,
        backend: Literal["moondream", "fal"] = "moondream",
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_concurrency: int = 8,
        requests_per_second: float | None = None,
        pacer_name: str | None = None,
        batch_api: bool = False,
        job_dir: str | os.PathLike[str] | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        if skill not in SKILL_NAMES:
            raise ValueError(f"skill must be one of {', '.join(SKILL_NAMES)}; got {skill!r}")
        if isinstance(questions, str) or isinstance(detect, str):
            raise TypeError("questions and detect are lists of strings, not one string")
        self.skill: UDFSkill = skill
        check_length(caption_length)
        # Options that belong to other skills are errors, not silently ignored.
        misplaced = []
        if skill != "index":
            misplaced += [n for n, v in (("questions", questions), ("detect", detect), ("ocr", ocr)) if v]
            misplaced += ["caption"] * (caption is not True) + ["ocr_prompt"] * (ocr_prompt != DEFAULT_OCR_PROMPT)
        if skill not in _OBJECT_SKILLS and object is not None:
            misplaced.append("object")
        if skill != "query" and question is not None:
            misplaced.append("question")
        if skill not in ("caption", "index") and caption_length != "normal":
            misplaced.append("caption_length")
        if skill not in _TILED_SKILLS:
            misplaced += [n for n, v, d in (("tiling", tiling, "auto"), ("max_tiles", max_tiles, DEFAULT_MAX_TILES),
                                            ("max_objects", max_objects, None)) if v != d]
        if misplaced:
            raise ValueError(f"{', '.join(dict.fromkeys(misplaced))} not for skill={skill!r}")
        if skill in _OBJECT_SKILLS:
            if object is None:
                raise ValueError(f"skill={skill!r} needs object= (the phrase to look for)")
            check_object(object)
        if skill == "query":
            if question is None:
                raise ValueError("skill='query' needs question=")
            check_question(question)
        for item in (*questions, *detect, ocr_prompt):
            if not isinstance(item, str):
                raise TypeError(f"questions, detect and ocr_prompt hold strings, got {type(item).__name__}")
        for q in (*questions, ocr_prompt):
            check_question(q)
        for phrase in detect:
            check_object(phrase)
        keys = [phrase_key(p) for p in dict.fromkeys(detect)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"detect phrases must differ in their column names (count_<phrase>): {keys}")
        plan_tiles(100, 100, tiling=tiling, max_tiles=max_tiles)  # refuses bad tiling options
        if max_objects is not None and (
            isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1
        ):
            raise ValueError(f"max_objects must be a positive integer, got {max_objects!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if requests_per_second is not None and not (
            isinstance(requests_per_second, (int, float)) and not isinstance(requests_per_second, bool)
            and requests_per_second > 0
        ):
            raise ValueError(
                f"requests_per_second must be a positive number (the whole job's), got {requests_per_second!r}"
            )
        if batch_api:
            if skill != "index":
                raise ValueError(
                    "batch_api=True indexes (skill='index': caption=, questions=, ocr=, detect=); the other skills"
                    " run on the standard API"
                )
            if backend != "moondream":
                raise ValueError("batch_api=True is Moondream Cloud's Batch API: backend must be 'moondream'")
            if max_objects is not None:
                raise ValueError("max_objects cannot be sent through the Batch API (its detect takes no settings)")
            if not (isinstance(poll_interval, (int, float)) and 0 < poll_interval <= 30):
                raise ValueError(f"poll_interval must be between 0 and 30 seconds, got {poll_interval!r}")
        elif job_dir is not None or poll_interval != 5.0:
            raise ValueError("job_dir and poll_interval are for batch_api=True")
        if backend == "fal" and model is not None:
            raise ValueError("model= is for Moondream servers; fal.ai serves one Moondream model")
        if base_url is not None and reference_kind(base_url) is not ReferenceKind.URL:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        # requests_per_second is the job's, kept by the shared pacer: the config paces nothing itself.
        self.config = BackendConfig(
            backend=backend, base_url=base_url, model=model, api_key_env=api_key_env,
            max_concurrency=max_concurrency, requests_per_second=None, timeout=timeout, max_retries=max_retries,
        )
        self.requests_per_second = float(requests_per_second) if requests_per_second is not None else None
        if pacer_name is not None and (not isinstance(pacer_name, str) or not pacer_name):
            raise ValueError("pacer_name must be a non-empty string")
        self.pacer_name = pacer_name or self._default_pacer_name()
        self.asked: Asked | None = None if skill == "index" else Asked(
            skill=skill, object=object, question=question, length=caption_length, tiling=tiling,
            max_tiles=max_tiles, max_objects=max_objects,
        )
        self.index_options: dict[str, Any] = dict(
            caption=caption, caption_length=caption_length, questions=list(questions), ocr=ocr,
            ocr_prompt=ocr_prompt, detect=list(dict.fromkeys(detect)), tiling=tiling, max_tiles=max_tiles,
            max_objects=max_objects, max_concurrency=max_concurrency,
        )
        self.arguments = self._arguments()
        self.max_concurrency = max_concurrency
        self.batch_api = bool(batch_api)
        self.job_dir = os.fspath(job_dir) if job_dir is not None else None
        self.poll_interval = float(poll_interval)
        self.schema = _schema(skill, self.index_options["detect"])
        # Built lazily in the worker, on the event loop Ray runs __call__ on.
        self._backend: VisionBackend | None = None
        self._indexer: ImageIndexer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: _CpuPool | None = None

    @classmethod
    def constructor_kwargs(cls, skill: UDFSkill = "index", **options: Any) -> dict[str, Any]:
        """Check the options on the driver (an unknown or misplaced one raises now, before
        the job starts) and return them for ``fn_constructor_kwargs``.

        >>> MoondreamBatchUDF.constructor_kwargs("detect", object="car", requests_per_second=5)
        {'skill': 'detect', 'object': 'car', 'requests_per_second': 5}
        >>> MoondreamBatchUDF.constructor_kwargs("detect", objekt="car")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: MoondreamBatchUDF.__init__() got an unexpected keyword argument 'objekt'...
        """
        cls(skill, **options)
        return {"skill": skill, **options}

    def __repr__(self) -> str:
        return (
            f"MoondreamBatchUDF(skill={self.skill!r}, backend={self.config.backend!r}, base_url={self.config.base_url!r},"
            f" requests_per_second={self.requests_per_second!r}, batch_api={self.batch_api!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Options only: a built backend (sessions, locks, the key) never travels.
        state = dict(self.__dict__)
        state.update(_backend=None, _indexer=None, _loop=None, _executor=None)
        return state

    def _default_pacer_name(self) -> str:
        account = json.dumps([self.config.backend, self.config.base_url, self.config.api_key_env, self.requests_per_second])
        return _PACER_PREFIX + hashlib.sha256(account.encode()).hexdigest()[:16]

    def _arguments(self) -> dict[str, Any]:
        """The options as the command line records them (what a batch job's directory is named by)."""
        if self.skill == "index":
            return {k: v for k, v in self.index_options.items() if k != "max_concurrency"}
        asked = self.asked
        assert asked is not None
        return {"skill": self.skill, "object": asked.object, "question": asked.question, "length": asked.length,
                "tiling": asked.tiling, "max_tiles": asked.max_tiles, "max_objects": asked.max_objects}

    # ------------------------------------------------------------------ in the worker

    def _ensure_backend(self) -> VisionBackend:
        """The actor's backend, built once on the loop Ray runs ``__call__`` on (never
        ``asyncio.run``: Ray owns that loop)."""
        if self._backend is None:
            pacer = RayPacer(self.pacer_name, self.requests_per_second) if self.requests_per_second else None
            self._backend = self.config.build(pacer=pacer)
            self._loop = asyncio.get_running_loop()
            self._executor = _cpu_threads(self._loop)
        return self._backend

    async def __call__(self, batch: Any) -> pa.Table:
        """One batch (NumPy dict, pandas or PyArrow) in, one PyArrow table out: a row per
        input row, in order, with ``error`` set on the rows that failed."""
        columns = _columns(batch)
        present = [c for c in INPUT_COLUMNS if c in columns]
        if not present:
            raise ValueError(
                f"MoondreamBatchUDF needs a 'bytes', 'path' or 'url' column; the batch has {sorted(columns)}"
            )
        count = len(next(iter(columns.values()))) if columns else 0
        rows = [_Row(i, *(columns[c][i] if c in columns else None for c in INPUT_COLUMNS)) for i in range(count)]
        backend = self._ensure_backend()
        if self.skill == "index":
            fields = await self._index(backend, rows)
        else:
            fields = await self._skill(backend, rows)
        out: dict[str, list[Any]] = {c: list(columns[c]) for c in ("path", "url") if c in columns}
        for name in self.schema.names:
            out[name] = [f.get(name) for f in fields]
        schema = pa.schema([pa.field(c, pa.string()) for c in ("path", "url") if c in columns] + list(self.schema))
        return pa.Table.from_pydict({k: [_text(v) for v in out[k]] if k in ("path", "url") else out[k] for k in out},
                                    schema=schema)

    # ------------------------------------------------------------------ index

    async def _index(self, backend: VisionBackend, rows: list[_Row]) -> list[dict[str, Any]]:
        fields: list[dict[str, Any] | None] = [None] * len(rows)
        todo = []
        for row in rows:
            problem = await row.problem()
            if problem is not None:
                fields[row.index] = {"error": f"image: {problem}", "errors": json.dumps({"image": problem})}
            else:
                todo.append(row)
        if todo:
            if self.batch_api:
                records = await self._index_batch(backend, todo)
            else:
                records = await self._index_standard(backend, todo)
            for row, record in zip(todo, records):
                fields[row.index] = _index_fields(record)
        return [f or {} for f in fields]

    def _indexer_for(self, backend: VisionBackend) -> ImageIndexer:
        if self._indexer is None:
            self._indexer = ImageIndexer(backend, **self.index_options)
        return self._indexer

    async def _index_standard(self, backend: VisionBackend, rows: list[_Row]) -> list[ImageRecord]:
        indexer = self._indexer_for(backend)
        records: list[ImageRecord] = []
        try:
            async for record in indexer.stream([row.source for row in rows]):
                records.append(record)
        except Exception:  # a bug in one image must not lose the batch: the rest one by one
            logger.warning("moondream-tools: indexing a batch failed; indexing the rest one by one", exc_info=True)
            records += [await _one_record(indexer, row) for row in rows[len(records):]]
        return records

    async def _index_batch(self, backend: VisionBackend, rows: list[_Row]) -> list[ImageRecord]:
        indexer = ImageIndexer(backend, **self.index_options)  # batch_usage is per job
        sources = [row.source for row in rows]
        name = _job_name(self.arguments, sources)
        try:
            if self.job_dir is not None:
                return await indexer.index_batch(sources, job_dir=Path(self.job_dir) / name,
                                                 poll_interval=self.poll_interval)
            with tempfile.TemporaryDirectory(prefix="moondream-batch-") as tmp:
                return await indexer.index_batch(sources, job_dir=Path(tmp) / name, poll_interval=self.poll_interval)
        except Exception as exc:  # the job as a whole failed: every row says why, the job goes on
            logger.warning("moondream-tools: a Batch API job failed", exc_info=True)
            text = message(exc)
            return [ImageRecord(id="", source=row.label, errors={"batch": text}) for row in rows]

    # ------------------------------------------------------------------ one skill

    async def _skill(self, backend: VisionBackend, rows: list[_Row]) -> list[dict[str, Any]]:
        state = RunState(backend, backend.image_settings)

        async def one(row: _Row) -> dict[str, Any]:
            try:
                problem = await row.problem()
                if problem is not None:
                    return {"error": problem}
                given = state if row.data is None else _GivenBytes(backend, backend.image_settings, data=row.data)
                assert self.asked is not None
                record = await run_one(given, self.asked, row.label, {})
                return _skill_fields(self.skill, record)
            except Exception as exc:  # never lose the batch to one row
                logger.warning("moondream-tools: %s failed unexpectedly", row.label, exc_info=True)
                return {"error": f"unexpected {message(exc)}"}

        try:
            return [f async for f in stream_in_order(one, rows, concurrency=self.max_concurrency,
                                                     window=4 * self.max_concurrency)]
        finally:
            await state.aclose()

    # ------------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        """Close the backend this process built (Ray does it for you: an actor that exits
        drops the UDF, see ``__del__``; call it when you use the class outside Ray). In an
        actor, the loop gets its ordinary thread pool back."""
        backend, loop, self._backend, self._indexer, self._loop = self._backend, self._loop, None, None, None
        executor, self._executor = self._executor, None
        try:
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()
        finally:
            if executor is not None and loop is not None:
                executor.hand_back(loop)

    def __del__(self) -> None:
        # Ray Data drops the UDF when the actor exits gracefully: give the loop its ordinary
        # thread pool back, and close the backend's session on its own loop (if that loop
        # still runs and is not this thread's).
        backend, loop = getattr(self, "_backend", None), getattr(self, "_loop", None)
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None and loop is not None:
            executor.hand_back(loop)
        if backend is None or loop is None or loop.is_closed() or not loop.is_running():
            return
        self._backend = None
        close = getattr(backend, "aclose", None)
        if close is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with contextlib.suppress(Exception):
            if running is loop:
                loop.create_task(close())
            else:
                asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)


class _CpuPool(ThreadPoolExecutor):
    """An actor loop's default executor: the CPU work handed to threads (decoding, hashing,
    encoding images) runs on this pool's own ``cpus`` threads, and the blocking I/O
    (reading a path, ``isdir``, the loop's DNS lookups, finding the job's pacer) runs on
    ``io``, the loop's ordinary pool, so a slow read on a network filesystem or a slow DNS
    answer never waits behind a decode, nor holds one up.

    :meth:`hand_back` gives the loop its ordinary pool back (the UDF closing) and stops
    the CPU threads; a call still on its way to this pool then runs on ``io``. Shut down
    with the loop (still its default executor), it shuts both."""

    def __init__(self, cpus: int, io: ThreadPoolExecutor) -> None:
        super().__init__(max_workers=cpus, thread_name_prefix="moondream-tools-cpu")
        self.io = io
        self._retired = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if self._retired or _blocking_io(fn):
            return self.io.submit(fn, *args, **kwargs)
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:  # handed back meanwhile (from another thread)
            if not self._retired:
                raise
            return self.io.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        self.io.shutdown(wait=wait, cancel_futures=cancel_futures)

    def hand_back(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``io`` the loop's default executor again (unless something else replaced
        this one since) and stop the CPU threads (the work already queued still runs)."""
        self._retired = True
        if not loop.is_closed() and getattr(loop, "_default_executor", self) is self:
            loop.set_default_executor(self.io)
        super().shutdown(wait=False)


def _cpu_threads(loop: asyncio.AbstractEventLoop) -> _CpuPool | None:
    """In a Ray actor, run the CPU work the loop hands to threads (images hashed, decoded
    and encoded) on as many threads as the CPUs the actor reserved (``num_cpus``, at least
    one), so an actor uses what the scheduler gave it: pools sized by ``num_cpus`` scale as
    planned, and actors do not fight over one machine's cores. The blocking I/O (images
    read, DNS) stays on the loop's ordinary pool (see :class:`_CpuPool`). Outside an actor
    (or with no CPU reserved) the loop is left as it is. Returns the pool it installed as
    the loop's default executor."""
    try:
        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    except Exception:  # pragma: no cover - an older Ray without these: leave the loop alone
        return None
    if not cpus:
        return None
    # The loop's ordinary pool: the one it has made already (asyncio keeps it in a private
    # attribute; behind another UDF's pool, that one's), else the one it would make.
    io = getattr(loop, "_default_executor", None)
    if isinstance(io, _CpuPool):
        io = io.io
    if not isinstance(io, ThreadPoolExecutor):
        io = ThreadPoolExecutor(thread_name_prefix="asyncio")
    pool = _CpuPool(max(1, math.ceil(cpus)), io)
    loop.set_default_executor(pool)
    return pool


# The blocking calls that wait on I/O rather than use a CPU (matched on the function
# ``asyncio.to_thread`` or the loop hands to the default executor).
_BLOCKING_IO = frozenset(
    f for f in (
        socket.getaddrinfo, socket.getnameinfo, os.path.isdir, read_image_file, RayPacer._lookup,
        getattr(asyncio.base_events.BaseEventLoop, "_getaddrinfo_debug", None),  # getaddrinfo in debug mode
    ) if f is not None
)


def _blocking_io(fn: Any) -> bool:
    """Whether a call submitted to the default executor is one of :data:`_BLOCKING_IO`
    (``asyncio.to_thread`` submits ``partial(context.run, func, ...)``)."""
    if isinstance(fn, functools.partial) and isinstance(getattr(fn.func, "__self__", None), contextvars.Context):
        fn = fn.args[0] if fn.args else None
    return getattr(fn, "__func__", fn) in _BLOCKING_IO


# ---------------------------------------------------------------------- rows


class _Row:
    """One input row: its image (bytes, path or URL) and the label that names it."""

    __slots__ = ("index", "data", "path", "url", "invalid")

    def __init__(self, index: int, data: Any, path: Any, url: Any) -> None:
        self.index = index
        self.data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
        self.path = _text(path)
        self.url = _text(url)
        self.invalid = None
        if self.data is None and not _missing(data):
            self.invalid = f"the bytes column holds a {type(data).__name__}, not bytes"

    @property
    def source(self) -> str | bytes:
        if self.data is not None:
            return self.data
        return self.path if self.path is not None else self.url  # type: ignore[return-value]

    @property
    def label(self) -> str:
        return self.path or self.url or "bytes"

    async def problem(self) -> str | None:
        """Why this row cannot be read at all, before anything is sent (None: fine)."""
        if self.invalid is not None:
            return self.invalid
        if self.data is not None:
            return "the bytes column is empty" if not self.data else None
        if self.path is None and self.url is None:
            return "the row has no bytes, path or url"
        if self.path is None and reference_kind(self.url or "") is not ReferenceKind.URL:
            return f"{self.url!r} in the url column is not an http(s) URL"
        if self.path is not None and reference_kind(self.path) is ReferenceKind.PATH:
            if await asyncio.to_thread(os.path.isdir, self.path):  # one row, one image: no directory walks
                return f"{self.path} is a directory, not an image"
        return None


class _GivenBytes(RunState):
    """The command line's per-input state for an image whose bytes came in the row."""

    def __init__(self, backend: VisionBackend, settings: Any, *, data: bytes) -> None:
        super().__init__(backend, settings)
        self._data = data

    async def read(self, source: str) -> bytes:
        return self._data


async def _one_record(indexer: ImageIndexer, row: _Row) -> ImageRecord:
    try:
        return await indexer.index_one(row.source)
    except Exception as exc:
        logger.warning("moondream-tools: indexing %s failed unexpectedly", row.label, exc_info=True)
        return ImageRecord(id="", source=row.label, errors={"image": f"unexpected {message(exc)}"})


def _columns(batch: Any) -> dict[str, list[Any]]:
    """A batch as plain Python columns, whatever its format (NumPy dict, pandas, PyArrow)."""
    if hasattr(batch, "to_pydict"):  # pyarrow.Table
        return dict(batch.to_pydict())
    if hasattr(batch, "columns") and hasattr(batch, "to_dict"):  # pandas.DataFrame
        return {str(c): batch[c].tolist() for c in batch.columns}
    if isinstance(batch, Mapping):
        return {str(k): (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    raise TypeError(f"a batch is a dict of columns, a pandas DataFrame or a PyArrow table; got {type(batch).__name__}")


def _missing(value: Any) -> bool:
    """None, or how pandas says missing (``pd.NA``, a NaN float)."""
    return value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and value != value)


def _text(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _job_name(arguments: dict[str, Any], sources: list[str | bytes]) -> str:
    """A batch's Batch API job directory: named by its inputs and the options, so the same
    batch (a retried task) finds its job again and another batch never does."""
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode())
    for source in sources:
        data = source if isinstance(source, bytes) else source.encode("utf-8", "surrogateescape")
        digest.update(hashlib.sha256(data).digest())
    return f"block-{digest.hexdigest()[:24]}"


# ---------------------------------------------------------------------- output fields

_BOX = pa.list_(pa.float64())
_BOXES = pa.list_(_BOX)


def _schema(skill: str, phrases: Sequence[str]) -> pa.Schema:
    """The output columns of a skill (after the input's path / url)."""
    head = [pa.field("image_id", pa.string()), pa.field("width", pa.int64()), pa.field("height", pa.int64())]
    if skill == "index":
        body = [pa.field(n, pa.string()) for n in ("backend", "model", "caption", "ocr", "answers")]
        for phrase in phrases:
            key = phrase_key(phrase)
            body += [pa.field(f"count_{key}", pa.int64()), pa.field(f"boxes_{key}", pa.string())]
        body += [pa.field("text", pa.string()), pa.field("errors", pa.string())]
    elif skill == "caption":
        body = [pa.field("caption", pa.string())]
    elif skill == "query":
        body = [pa.field("answer", pa.string())]
    elif skill == "detect":
        body = [pa.field("count", pa.int64()), pa.field("boxes", _BOXES), pa.field("boxes_px", _BOXES),
                pa.field("capped", pa.bool_()), pa.field("tiles", pa.int64())]
    elif skill in ("point", "count"):
        body = [pa.field("count", pa.int64()), pa.field("points", _BOXES), pa.field("points_px", _BOXES),
                pa.field("capped", pa.bool_()), pa.field("tiles", pa.int64())]
    else:  # segment
        body = [pa.field("found", pa.bool_()), pa.field("bbox", _BOX), pa.field("bbox_px", _BOX),
                pa.field("svg_path", pa.string()), pa.field("area_px", pa.float64()), pa.field("mask_rle", pa.string())]
    return pa.schema([*head, *body, pa.field("error", pa.string())])


def _index_fields(record: ImageRecord) -> dict[str, Any]:
    """An :class:`ImageRecord` as a row: the loaders' flat metadata (without ``source``:
    the input's path / url are kept), the text a retriever embeds, and ``error``."""
    meta = record.metadata()
    meta.pop("source", None)
    unread = not record.id or record.id == hashlib.sha256(record.source.encode("utf-8", "surrogateescape")).hexdigest()
    if unread and record.width is None:  # nothing was read: no image id (as the command line)
        meta["image_id"] = None
    meta["text"] = record.text() or None
    meta["error"] = "; ".join(f"{part}: {text}" for part, text in record.errors.items()) or None
    return meta


def _skill_fields(skill: str, record: dict[str, Any]) -> dict[str, Any]:
    """A command-line record (``moondream_tools.indexing.skills.run_one``) as a flat row."""
    out = {k: record.get(k) for k in ("image_id", "width", "height", "error")}
    if skill == "caption":
        out["caption"] = record.get("caption")
    elif skill == "query":
        out["answer"] = record.get("answer")
    elif skill in ("detect", "point", "count"):
        out.update(count=record.get("count"), capped=record.get("capped"), tiles=record.get("tiles"))
        if skill == "detect" and "objects" in record:
            objects = record["objects"]
            out["boxes"] = [[o["x_min"], o["y_min"], o["x_max"], o["y_max"]] for o in objects]
            out["boxes_px"] = [[float(v) for v in o["box_px"]] for o in objects]
        elif "points" in record:
            points = record["points"]
            out["points"] = [[p["x"], p["y"]] for p in points]
            out["points_px"] = [[float(p["x_px"]), float(p["y_px"])] for p in points]
    elif "found" in record:  # segment
        bbox = record.get("bbox")
        out.update(
            found=record["found"],
            bbox=[bbox["x_min"], bbox["y_min"], bbox["x_max"], bbox["y_max"]] if bbox else None,
            bbox_px=[float(v) for v in record["bbox_px"]] if record.get("bbox_px") else None,
            svg_path=record.get("path") or None, area_px=float(record.get("area_px") or 0),
            mask_rle=json.dumps(record["mask_rle"]) if record.get("mask_rle") is not None else None,
        )
    return out

