"""MoondreamImageReader: images into LlamaIndex ``ImageDocument`` s, read by Moondream.

Each image becomes one :class:`~llama_index.core.schema.ImageDocument` built from a
:class:`moondream_tools.indexing.ImageRecord`:

- ``id_``: the sha256 of the image's bytes (a renamed or copied file keeps its id);
- ``text``: what a retriever should embed (the caption, each question and its answer, the
  text in the image, the objects found with their counts);
- ``metadata``: flat values only (str, int, float, bool, None), so any vector store takes
  them: ``image_id``, ``source``, ``width``, ``height``, ``caption``, ``count_<phrase>``,
  ``boxes_<phrase>`` (pixel boxes as a JSON string), ``errors``, ..., then ``file_path`` and
  whatever ``extra_info`` the caller passes (SimpleDirectoryReader's file metadata);
- ``excluded_embed_metadata_keys`` / ``excluded_llm_metadata_keys``: the bulky keys (boxes,
  answers, errors, the caption already in the text), so that a long list of objects never
  makes a node parser refuse the document for metadata longer than its chunk size.

The work is done by :class:`moondream_tools.indexing.ImageIndexer`: one upload per image,
its calls concurrent, answered calls kept in a :class:`moondream_tools.ResultCache` when
``cache=`` is given (indexing again costs no request).

Example::

    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from llama_index.readers.moondream import MoondreamImageReader

    reader = MoondreamImageReader(detect=["person", "car"], ocr=True, cache=".moondream-cache")
    docs = SimpleDirectoryReader(
        "photos/", file_extractor={".jpg": reader, ".png": reader}
    ).load_data(num_workers=4)                   # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
    index = VectorStoreIndex.from_documents(docs)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pickle
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document, ImageDocument, MediaResource

from moondream_tools import AsyncMoondream, ImageSettings, ResultCache, VisionBackend, run_sync
from moondream_tools.backend import CaptionLength
from moondream_tools.indexing import ImageIndexer, ImageRecord
from moondream_tools.tiling import DEFAULT_MAX_TILES, TilingMode

__all__ = ["MoondreamImageReader"]

logger = logging.getLogger("llama_index.readers.moondream")

OnError = Literal["include", "skip"]

#: The constructor's keyword arguments, in the order an unknown-argument error lists them.
_ACCEPTED = (
    "backend",
    "questions",
    "ocr",
    "detect",
    "caption_length",
    "cache",
    "tiling",
    "max_tiles",
    "max_objects",
    "max_concurrency",
    "on_error",
)
#: Members that only live while the reader runs; never pickled.
_RUNTIME = ("_slots", "_slots_lock")

FileInput = str | os.PathLike[str]


class MoondreamImageReader(BaseReader):
    """Reads an image file into one :class:`~llama_index.core.schema.ImageDocument` with Moondream.

    Args:
        backend: the :class:`moondream_tools.VisionBackend` to ask (used, never closed).
            None (the default) builds an :class:`moondream_tools.AsyncMoondream` from
            ``MOONDREAM_API_KEY`` / ``MOONDREAM_BASE_URL`` inside each call and closes it at
            the end of that call; only then does the reader pickle to worker processes
            (``SimpleDirectoryReader(...).load_data(num_workers=N)``).
        questions: questions asked of every image; each answer goes in the text and in the
            ``answers`` metadata (a JSON object).
        ocr: transcribe the text in the image (into the text and ``ocr``).
        detect: object phrases to find; each gives ``count_<phrase>`` (an int) and
            ``boxes_<phrase>`` (``[[x_min, y_min, x_max, y_max], ...]`` in pixels, as JSON).
        caption_length: ``"short"``, ``"normal"`` (default) or ``"long"``.
        cache: a :class:`moondream_tools.ResultCache`, or a file or directory path for one:
            calls answered before (same image bytes, skill, arguments and backend) are not
            sent again.
        tiling, max_tiles: how ``detect`` treats large images (``"auto"``: tiles images the
            model would shrink more than 4x, at most ``max_tiles`` requests per phrase).
        max_objects: the object limit sent with ``detect`` (None: the backend's default).
        max_concurrency: images in flight at once across concurrent :meth:`aload_data`
            calls on one event loop (``SimpleDirectoryReader.aload_data`` starts every file
            at once).
        on_error: a failed image or call: ``"include"`` (default) still gives its document,
            with the messages in the ``errors`` metadata; ``"skip"`` gives no document for
            that file. Either way a WARNING naming the file and the errors is logged on the
            ``llama_index.readers.moondream`` logger.

    Every argument is keyword-only and none is required; the backend is only needed when
    a file is read. An unknown keyword argument is a ``TypeError`` naming the accepted ones.
    Without a backend and without configuration (no ``MOONDREAM_API_KEY`` for the cloud), a
    load raises :class:`moondream_tools.ConfigurationError`: it concerns every file, so it
    is not reported as one file's error.

    Example:
        >>> reader = MoondreamImageReader(detect=["red circle"], on_error="skip")
        >>> reader
        MoondreamImageReader(questions=[], ocr=False, detect=['red circle'], caption_length='normal', on_error='skip')
        >>> import pickle
        >>> pickle.loads(pickle.dumps(reader)).detect
        ['red circle']
    """

    def __init__(
        self,
        *,
        backend: VisionBackend | None = None,
        questions: Sequence[str] = (),
        ocr: bool = False,
        detect: Sequence[str] = (),
        caption_length: CaptionLength = "normal",
        cache: ResultCache | str | os.PathLike[str] | None = None,
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        max_objects: int | None = None,
        max_concurrency: int = 8,
        on_error: OnError = "include",
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(
                f"MoondreamImageReader got unknown argument(s) {', '.join(map(repr, unknown))};"
                f" accepted: {', '.join(_ACCEPTED)}"
            )
        if backend is not None and not isinstance(backend, VisionBackend):
            raise TypeError(f"backend must be a moondream_tools.VisionBackend or None, got {type(backend).__name__}")
        if on_error not in ("include", "skip"):
            raise ValueError(f"on_error must be 'include' or 'skip', got {on_error!r}")
        if cache is not None and not isinstance(cache, (ResultCache, str, os.PathLike)):
            raise TypeError(f"cache must be a ResultCache or a path, got {type(cache).__name__}")
        if isinstance(questions, str) or isinstance(detect, str):
            raise TypeError("questions and detect are lists of strings, not one string")
        self.backend = backend
        self.questions = list(questions)
        self.ocr = bool(ocr)
        self.detect = list(detect)
        self.caption_length: CaptionLength = caption_length
        self.tiling = tiling
        self.max_tiles = max_tiles
        self.max_objects = max_objects
        self.max_concurrency = max_concurrency
        self.on_error: OnError = on_error
        self.cache: ResultCache | None = None
        # Every option is checked now, exactly as the indexer checks it (skills included when
        # a backend is given), so a mistake shows at construction and not per file.
        self._indexer(backend if backend is not None else _Unconfigured())
        self.cache = ResultCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self._init_runtime()

    def _init_runtime(self) -> None:
        # One semaphore per event loop: concurrent aload_data calls on a loop share it; a
        # loop that ends takes its semaphore with it.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._slots_lock = threading.Lock()

    def __repr__(self) -> str:
        parts = [
            f"questions={self.questions!r}",
            f"ocr={self.ocr!r}",
            f"detect={self.detect!r}",
            f"caption_length={self.caption_length!r}",
            f"on_error={self.on_error!r}",
        ]
        if self.backend is not None:
            parts.insert(0, f"backend={self.backend!r}")
        if self.cache is not None:
            parts.append(f"cache={self.cache!r}")
        return f"MoondreamImageReader({', '.join(parts)})"

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        if self.backend is not None:
            try:
                pickle.dumps(self.backend)
            except Exception as exc:
                raise TypeError(
                    f"MoondreamImageReader cannot be pickled: its backend {type(self.backend).__name__}"
                    f" cannot ({type(exc).__name__}: {exc}). Worker processes"
                    " (SimpleDirectoryReader(...).load_data(num_workers=N)) need a picklable reader:"
                    " pass backend=None and configure the client through the environment"
                    " (MOONDREAM_API_KEY, MOONDREAM_BASE_URL)."
                ) from exc
        state = self.__dict__.copy()
        for name in _RUNTIME:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ loading

    def load_data(
        self, file: FileInput, extra_info: dict[str, Any] | None = None, fs: Any | None = None
    ) -> list[Document]:
        """The document of one image file (a list of one, or none with ``on_error="skip"``).

        Args:
            file: the image's path.
            extra_info: metadata added to the document's (``SimpleDirectoryReader`` passes
                its file metadata here); it wins over the reader's keys.
            fs: an ``fsspec`` filesystem to read the file through (``SimpleDirectoryReader``
                passes it when it is not the local one).

        Works in a plain script and inside a running event loop (see
        :func:`moondream_tools.run_sync`).
        """
        return run_sync(lambda: self.aload_data(file, extra_info, fs))

    def lazy_load_data(
        self, file: FileInput, extra_info: dict[str, Any] | None = None, fs: Any | None = None
    ) -> Iterable[Document]:
        """:meth:`load_data`, as an iterator."""
        yield from self.load_data(file, extra_info, fs)

    async def alazy_load_data(
        self, file: FileInput, extra_info: dict[str, Any] | None = None, fs: Any | None = None
    ) -> Iterable[Document]:
        """:meth:`aload_data` (natively async, not a thread)."""
        return await self.aload_data(file, extra_info, fs)

    async def aload_data(
        self, file: FileInput, extra_info: dict[str, Any] | None = None, fs: Any | None = None
    ) -> list[Document]:
        """:meth:`load_data`, natively async; at most ``max_concurrency`` images of concurrent
        calls on this event loop are in flight at once."""
        if not isinstance(file, (str, os.PathLike)):
            raise TypeError(f"file must be a path, got {type(file).__name__}")
        path = os.fspath(file)
        async with self._slot():
            record = await self._record(path, fs)
        return self._documents(record, path, extra_info)

    # ------------------------------------------------------------------ internals

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._slots_lock:
            slots = self._slots.get(loop)
            if slots is None:
                slots = self._slots[loop] = asyncio.Semaphore(self.max_concurrency)
        return slots

    def _indexer(self, backend: VisionBackend) -> ImageIndexer:
        return ImageIndexer(
            backend,
            caption=True,
            caption_length=self.caption_length,
            questions=self.questions,
            ocr=self.ocr,
            detect=self.detect,
            tiling=self.tiling,
            max_tiles=self.max_tiles,
            max_objects=self.max_objects,
            max_concurrency=self.max_concurrency,
            cache=self.cache,
        )

    async def _record(self, path: str, fs: Any | None) -> ImageRecord:
        source: str | bytes = path
        if fs is not None and not _is_local(fs):
            try:
                source = await asyncio.to_thread(_read_through, fs, path)
            except OSError as exc:
                return ImageRecord(
                    id=hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest(),
                    source=path,
                    errors={"image": f"cannot read {path!r} through {type(fs).__name__}: {exc}"},
                )
        if self.backend is not None:
            return await self._indexer(self.backend).index_one(source)
        async with AsyncMoondream() as backend:  # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
            return await self._indexer(backend).index_one(source)

    def _documents(self, record: ImageRecord, path: str, extra_info: dict[str, Any] | None) -> list[Document]:
        if not record.ok:
            logger.warning(
                "Moondream could not fully read %s: %s",
                path,
                "; ".join(f"{part}: {message}" for part, message in record.errors.items()),
            )
            if self.on_error == "skip":
                return []
        metadata: dict[str, Any] = {**record.metadata(), "source": path, "file_path": path, **(extra_info or {})}
        bulky = ImageRecord.bulky_metadata_keys(metadata)
        document = ImageDocument(
            id_=record.id,
            text=record.text(),
            metadata=metadata,
            excluded_embed_metadata_keys=list(bulky),
            excluded_llm_metadata_keys=list(bulky),
            # Not ImageDocument(image_path=...): that opens the file with PIL here (refusing
            # a corrupt image or a file on another filesystem); the path is what we keep.
            image_resource=MediaResource(path=Path(path)),
        )
        return [document]


def _is_local(fs: Any) -> bool:
    try:
        from fsspec.implementations.local import LocalFileSystem
    except ImportError:  # pragma: no cover - fsspec comes with llama-index-core
        return False
    return isinstance(fs, LocalFileSystem)


def _read_through(fs: Any, path: str) -> bytes:
    with fs.open(path, "rb") as handle:
        return bytes(handle.read())


def _unconfigured(*args: Any, **kwargs: Any) -> NoReturn:  # pragma: no cover - never called
    raise RuntimeError("the reader's backend is built when a file is read")


class _Unconfigured:
    """Stands in for the ``AsyncMoondream`` a load builds, so the options are checked up front."""

    skills: frozenset[str] = AsyncMoondream.skills
    image_settings = ImageSettings()

    async def prepare(self, *args: Any, **kwargs: Any) -> NoReturn:  # pragma: no cover
        _unconfigured()

    caption = query = detect = point = segment = aclose = prepare

    async def __aenter__(self) -> _Unconfigured:  # pragma: no cover
        return self

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover
        return None

