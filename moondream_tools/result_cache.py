"""Results on disk: :class:`ResultCache` (SQLite) and :class:`CachedBackend`, a caching
:class:`~moondream_tools.VisionBackend` around any other.

A result is keyed by what decides it: the image's content (sha256 of its bytes, so a renamed
or copied file is the same image), the skill and its arguments, the backend (its class, model
and server) and the settings of the upload. Asking again for the same thing sends nothing.
Failed calls are never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image
from pydantic import BaseModel, ValidationError

from ._transport import Timeout
from .backend import CaptionLength, SamplingSettings, SpatialRef, VisionBackend, backend_name
from .errors import ConfigurationError, ImageError
from .images import ImageInput, ImageSettings, PreparedImage
from .images.sources import ReferenceKind, _describe, _load_source, reference_kind
from .results import Answer, Caption, Detections, Points, Segmentation
from .tiling import TiledDetections, TiledPoints

__all__ = ["CachedBackend", "ResultCache", "backend_identity", "image_digest"]

logger = logging.getLogger("moondream_tools")

#: The file name used when :class:`ResultCache` is given a directory.
DEFAULT_FILE_NAME = "moondream-results.sqlite3"
_SCHEMA_VERSION = 1
_RESULT_TYPES: dict[str, type[BaseModel]] = {
    cls.__name__: cls
    for cls in (Caption, Answer, Detections, Points, Segmentation, TiledDetections, TiledPoints)
}


def image_digest(data: bytes | bytearray | memoryview) -> str:
    """The id of an encoded image: the sha256 of its bytes, in hex.

    >>> image_digest(b"abc")[:16]
    'ba7816bf8f01cfea'
    """
    return hashlib.sha256(data).hexdigest()


def backend_identity(backend: object) -> dict[str, str | None]:
    """What distinguishes the answers of ``backend``: its class, model and server (never its key).

    >>> backend_identity(object())
    {'backend': 'object', 'model': None, 'server': None}
    """
    model = getattr(backend, "model", None)
    server = getattr(backend, "base_url", None)
    return {
        "backend": backend_name(backend),
        "model": model if isinstance(model, str) else None,
        "server": server if isinstance(server, str) else None,
    }


class ResultCache:
    """Skill results on disk, in one SQLite file, shared by threads and processes.

    Args:
        path: the cache file, or a directory to hold ``moondream-results.sqlite3`` (created
            with its parents).
        timeout: seconds to wait for another process holding the write lock.

    A file that is not a readable cache of this version (corrupt, truncated, another
    program's database) is reported (a warning on the ``moondream_tools`` logger, and
    :attr:`recovered` says why), moved aside as ``<name>.corrupt-<time>`` and rebuilt empty;
    an entry that no longer parses is dropped and asked again. The cache pickles (its path):
    a copy opens the same file.

    Example::

        cache = ResultCache(".moondream-cache")
        md = CachedBackend(AsyncMoondream(), cache)
        await md.caption("photo.jpg")   # one request
        await md.caption("copy-of-photo.jpg")   # same bytes: none
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        target = Path(path)
        if target.is_dir() or (not target.suffix and not target.exists()):
            target = target / DEFAULT_FILE_NAME
        self.path = target
        self.timeout = timeout
        self.recovered: str | None = None
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._open()

    # ------------------------------------------------------------------ opening and recovery

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check[0] if check else 'no answer'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, kind TEXT NOT NULL,"
                    " value TEXT NOT NULL, created REAL NOT NULL)"
                )
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION or "results" not in tables:
                raise sqlite3.DatabaseError(
                    f"not a moondream-tools result cache of version {_SCHEMA_VERSION}"
                    f" (version {version}, tables {sorted(tables)})"
                )
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the cache directory {str(self.path.parent)!r}: {exc}") from None
        try:
            self._db = self._connect()
            return
        except sqlite3.DatabaseError as exc:  # OperationalError (unreadable) included
            reason = f"{type(exc).__name__}: {exc}"
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            os.replace(self.path, aside)
        except OSError as exc:
            raise ConfigurationError(
                f"the result cache {str(self.path)!r} cannot be read ({reason}) and cannot be moved"
                f" aside ({exc.strerror or exc}): delete it or choose another path"
            ) from None
        self.recovered = f"{reason}; moved aside to {aside.name} and rebuilt"
        logger.warning("result cache %s: %s", self.path, self.recovered)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"cannot create the result cache {str(self.path)!r}: {exc}") from None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"the result cache {str(self.path)!r} is closed")
        return self._db

    # ------------------------------------------------------------------ keys

    @staticmethod
    def key(
        *, image: str, skill: str, arguments: Mapping[str, Any], backend: object,
        settings: ImageSettings | None = None,
    ) -> str:
        """The key of one result: a sha256 over the image id, the skill, its arguments, the
        :func:`backend_identity` and the upload's :attr:`ImageSettings.encoding`.

        >>> a = ResultCache.key(image="ab", skill="caption", arguments={"length": "short"}, backend="md")
        >>> a == ResultCache.key(image="ab", skill="caption", arguments={"length": "normal"}, backend="md")
        False
        """
        identity = {"backend": backend} if isinstance(backend, str) else backend_identity(backend)
        payload = {
            "image": image,
            "skill": skill,
            "arguments": dict(arguments),
            **identity,
            "encoding": list((settings or ImageSettings()).encoding),
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    # ------------------------------------------------------------------ entries

    def get(self, key: str) -> BaseModel | None:
        """The stored result for ``key``, or None (blocking; a few microseconds)."""
        return self.get_many([key])[key]

    def get_many(self, keys: Sequence[str]) -> dict[str, BaseModel | None]:
        """The stored results for ``keys`` (None where missing), in one transaction."""
        found: dict[str, BaseModel | None] = dict.fromkeys(keys)
        if not keys:
            return found
        with self._lock:
            marks = ",".join("?" * len(keys))
            rows = self._conn().execute(
                f"SELECT key, kind, value FROM results WHERE key IN ({marks})", list(keys)
            ).fetchall()
        broken = []
        for key, kind, value in rows:
            cls = _RESULT_TYPES.get(kind)
            try:
                if cls is None:
                    raise ValueError(f"unknown result type {kind!r}")
                found[key] = cls.model_validate_json(value)
            except (ValidationError, ValueError) as exc:
                logger.warning("result cache %s: dropping an entry that does not parse (%s)", self.path, exc)
                broken.append(key)
        if broken:
            with self._lock:
                self._conn().executemany("DELETE FROM results WHERE key = ?", [(k,) for k in broken])
        hits = sum(value is not None for value in found.values())
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def put(self, key: str, result: BaseModel) -> None:
        """Store ``result`` under ``key`` (blocking)."""
        self.put_many([(key, result)])

    def put_many(self, items: Iterable[tuple[str, BaseModel]]) -> None:
        """Store several results in one transaction."""
        rows = []
        for key, result in items:
            kind = type(result).__name__
            if _RESULT_TYPES.get(kind) is not type(result):
                raise TypeError(f"cannot cache a {kind}; results: {', '.join(_RESULT_TYPES)}")
            rows.append((key, kind, result.model_dump_json(), time.time()))
        if not rows:
            return
        with self._lock:
            self._conn().executemany(
                "INSERT OR REPLACE INTO results (key, kind, value, created) VALUES (?, ?, ?, ?)", rows
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def clear(self) -> None:
        """Forget every stored result."""
        with self._lock:
            self._conn().execute("DELETE FROM results")

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], timeout=state["timeout"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ResultCache({str(self.path)!r})"


# ---------------------------------------------------------------------- a caching backend


async def _content(image: ImageInput, settings: ImageSettings) -> tuple[str, ImageInput]:
    """The content id of ``image`` and what to send instead (the bytes read, once)."""
    if isinstance(image, str) and reference_kind(image) is ReferenceKind.URL:
        async with aiohttp.ClientSession() as session:
            source = await _load_source(image, session, settings)
    else:
        source = await _load_source(image, None, settings)
    if isinstance(source, Image.Image):
        header = f"{source.mode}:{source.size}".encode()
        return "pixels:" + hashlib.sha256(header + source.tobytes()).hexdigest(), source
    return image_digest(source), source


class CachedBackend:
    """Any :class:`~moondream_tools.VisionBackend`, with its results kept in a :class:`ResultCache`.

    A call whose image (by content), skill, arguments and settings were answered before
    returns the stored result without a request; other calls go to ``backend`` and their
    results are stored (failures are not). It is itself a ``VisionBackend``: give it to
    :class:`~moondream_tools.VisionTools`, the adapters or the indexer. Calls without an
    image (text-only ``query``) are passed through. :meth:`aclose` closes ``backend``.

    Example::

        md = CachedBackend(AsyncMoondream(), ResultCache("cache.sqlite3"))
        tools = VisionTools(md)
    """

    def __init__(self, backend: VisionBackend, cache: ResultCache) -> None:
        if not isinstance(backend, VisionBackend):
            raise TypeError(f"backend must be a VisionBackend, got {type(backend).__name__}")
        if not isinstance(cache, ResultCache):
            raise TypeError(f"cache must be a ResultCache, got {type(cache).__name__}")
        self.backend = backend
        self.cache = cache
        self.skills = backend.skills
        self.image_settings: ImageSettings = backend.image_settings
        self._ids: weakref.WeakKeyDictionary[PreparedImage, str] = weakref.WeakKeyDictionary()

    @property
    def model(self) -> str | None:
        """The wrapped backend's model (part of every key)."""
        return backend_identity(self.backend)["model"]

    def __repr__(self) -> str:
        return f"CachedBackend({self.backend!r}, {self.cache!r})"

    async def prepare(self, image: ImageInput, *, settings: ImageSettings | None = None) -> PreparedImage:
        """Prepare through the wrapped backend, remembering the image's content id."""
        if isinstance(image, PreparedImage):
            return image
        digest, source = await _content(image, settings or self.image_settings)
        prepared = await self.backend.prepare(source, settings=settings)
        self._ids[prepared] = digest
        return prepared

    async def _image_id(self, image: ImageInput) -> tuple[str, ImageInput]:
        if isinstance(image, PreparedImage):
            known = self._ids.get(image)
            if known is None:  # prepared elsewhere: its upload identifies it
                known = "upload:" + hashlib.sha256(image.data_url.encode("ascii")).hexdigest()
            return known, image
        try:
            return await _content(image, self.image_settings)
        except ImageError as exc:
            raise ImageError(f"{_describe(image)}: {exc}") from None

    async def _cached(self, skill: str, image: ImageInput, arguments: dict[str, Any], call: Any) -> Any:
        digest, source = await self._image_id(image)
        key = ResultCache.key(
            image=digest, skill=skill, arguments=arguments, backend=self.backend, settings=self.image_settings
        )
        stored = await asyncio.to_thread(self.cache.get, key)
        if stored is not None:
            return stored
        result = await call(source)
        await asyncio.to_thread(self.cache.put, key, result)
        return result

    async def caption(
        self, image: ImageInput, length: CaptionLength = "normal", *, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Caption:
        """:meth:`VisionBackend.caption`, cached."""
        return await self._cached(  # type: ignore[no-any-return]
            "caption", image, {"length": length, "settings": settings},
            lambda img: self.backend.caption(img, length, settings=settings, timeout=timeout, max_retries=max_retries),
        )

    async def query(
        self, image: ImageInput | None, question: str, *, reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Answer:
        """:meth:`VisionBackend.query`, cached (text-only questions are not)."""

        def call(img: ImageInput | None) -> Any:
            return self.backend.query(
                img, question, reasoning=reasoning, spatial_refs=spatial_refs, settings=settings,
                timeout=timeout, max_retries=max_retries,
            )

        if image is None:
            return await call(None)  # type: ignore[no-any-return]
        arguments = {"question": question, "reasoning": reasoning, "spatial_refs": _refs(spatial_refs), "settings": settings}
        return await self._cached("query", image, arguments, call)  # type: ignore[no-any-return]

    async def detect(
        self, image: ImageInput, object: str, *, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Detections:
        """:meth:`VisionBackend.detect`, cached."""
        return await self._cached(  # type: ignore[no-any-return]
            "detect", image, {"object": object, "settings": settings},
            lambda img: self.backend.detect(img, object, settings=settings, timeout=timeout, max_retries=max_retries),
        )

    async def point(
        self, image: ImageInput, object: str, *, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> Points:
        """:meth:`VisionBackend.point`, cached."""
        return await self._cached(  # type: ignore[no-any-return]
            "point", image, {"object": object, "settings": settings},
            lambda img: self.backend.point(img, object, settings=settings, timeout=timeout, max_retries=max_retries),
        )

    async def segment(
        self, image: ImageInput, object: str, *, spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None, timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Segmentation:
        """:meth:`VisionBackend.segment`, cached."""
        return await self._cached(  # type: ignore[no-any-return]
            "segment", image, {"object": object, "spatial_refs": _refs(spatial_refs), "settings": settings},
            lambda img: self.backend.segment(
                img, object, spatial_refs=spatial_refs, settings=settings, timeout=timeout, max_retries=max_retries
            ),
        )

    async def aclose(self) -> None:
        """Close the wrapped backend (the cache stays open: close it yourself)."""
        await self.backend.aclose()

    async def __aenter__(self) -> CachedBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _refs(refs: Sequence[SpatialRef] | None) -> list[list[float]] | None:
    return None if refs is None else [list(map(float, ref)) for ref in refs]
