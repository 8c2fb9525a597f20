"""Images as LangChain ``Document`` s for retrieval (RAG), over :class:`moondream_tools.indexing.ImageIndexer`.

* :class:`MoondreamImageLoader`: a ``BaseLoader`` over files, directories and URLs;
  ``alazy_load`` is natively async (images are indexed concurrently) and ``lazy_load`` /
  ``load`` work from plain scripts and inside a running event loop.
* :class:`MoondreamImageBlobParser`: a ``BaseBlobParser`` for one image blob, to use with
  ``GenericLoader`` or as the ``images_parser`` of a PDF loader.

Every document is one image: ``id`` is the sha256 of its bytes, ``page_content`` is what a
retriever should embed (:meth:`ImageRecord.text`: the caption, each question and answer, the
text in the image, the objects found) and ``metadata`` is :meth:`ImageRecord.metadata` (flat:
str / int / float / bool / None only, so any vector store takes it), with ``count_<phrase>``
and ``boxes_<phrase>`` (pixel boxes as a JSON string) for each ``detect`` phrase.

Example::

    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_moondream import MoondreamImageLoader

    loader = MoondreamImageLoader("photos/", detect=["person"], cache=".moondream-cache")
    store = InMemoryVectorStore.from_documents(await loader.aload(), embeddings)
    best = store.as_retriever(search_kwargs={"k": 1}).invoke("people on a beach")[0]
    best.metadata["source"], best.metadata["count_person"], best.metadata["boxes_person"]
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from langchain_core.document_loaders import BaseBlobParser, BaseLoader
from langchain_core.documents import Document
from langchain_core.documents.base import Blob
from moondream_tools import (
    AsyncMoondream,
    CaptionLength,
    ResultCache,
    VisionBackend,
    iterate_sync,
    run_sync,
)
from moondream_tools.backend import check_length
from moondream_tools.indexing import ImageIndexer, ImageRecord, IndexProgress, IndexSource
from moondream_tools.tiling import DEFAULT_MAX_TILES, TilingMode, plan_tiles

__all__ = ["MoondreamImageBlobParser", "MoondreamImageLoader"]

logger = logging.getLogger("langchain_moondream")

#: What becomes of an image with an error: ``"include"`` keeps its document (its metadata
#: ``errors`` says what failed), ``"skip"`` drops it. Either way a warning is logged.
OnError = Literal["include", "skip"]
_ON_ERROR = ("include", "skip")

#: ``cache=``: a :class:`~moondream_tools.ResultCache`, or the path of one (a file or a directory).
CacheOption = ResultCache | str | os.PathLike[str] | None


# ---------------------------------------------------------------------- argument checks


def _refuse_unknown(owner: type, unknown: Mapping[str, Any]) -> None:
    """A ``TypeError`` naming the unknown keywords (with a close match) and the accepted ones."""
    if not unknown:
        return
    accepted = [
        name
        for name, parameter in inspect.signature(owner.__init__).parameters.items()
        if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, accepted, n=1)
        described.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise TypeError(
        f"{owner.__name__} got unknown argument(s) {', '.join(described)};"
        f" accepted: {', '.join(accepted)}"
    )


def _strings(name: str, value: Any, what: str) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings; one string is refused (it is a common slip)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} is a list of {what}s, not one string: use {name}=[{value!r}]")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of {what}s, got {type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"each of {name} must be a string, got {type(item).__name__} ({item!r})")
        if not item.strip():
            raise ValueError(f"{name} must not contain an empty {what}")
    return items


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _paths(value: Any) -> list[IndexSource]:
    """The loader's ``paths`` as a list (a loader can be loaded more than once)."""
    if isinstance(value, (str, os.PathLike, bytes)):
        return [value]
    if isinstance(value, Iterable):
        items = list(value)
        for item in items:
            if not isinstance(item, (str, os.PathLike, bytes)):
                raise TypeError(
                    f"paths must be a file, a directory, a URL or a list of them, got a {type(item).__name__} in the list"
                )
        return items
    raise TypeError(f"paths must be a file, a directory, a URL or a list of them, got {type(value).__name__}")


def _describe_errors(errors: Mapping[str, str]) -> str:
    return "; ".join(f"{part}: {message}" for part, message in errors.items())


def _tqdm() -> Any:
    """tqdm's auto progress bar class, or None when tqdm is not installed (it is optional)."""
    if importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm

    return tqdm


class _Progress:
    """``show_progress=True``: a tqdm bar when tqdm is installed, else INFO log lines."""

    def __init__(self) -> None:
        self._bar_class = _tqdm()
        self._bar: Any = None

    def __call__(self, progress: IndexProgress) -> None:
        if self._bar_class is None:
            logger.info(
                "indexed %d%s images (%d failed; %d requests sent, %d answered from the cache)",
                progress.done,
                f"/{progress.total}" if progress.total is not None else "",
                progress.failed,
                progress.requests,
                progress.cached,
            )
            return
        if self._bar is None:
            self._bar = self._bar_class(total=progress.total, desc="Indexing images", unit="image")
        self._bar.set_postfix(failed=progress.failed, requests=progress.requests, cached=progress.cached, refresh=False)
        self._bar.update(progress.done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------- shared indexing


class _ImageIndexing:
    """What the loader and the parser share: the indexing options (checked when made), one
    :class:`ImageIndexer` per load on a backend and cache it owns or borrows, and records
    into documents."""

    backend: VisionBackend | None
    questions: tuple[str, ...]
    ocr: bool
    detect: tuple[str, ...]
    caption_length: CaptionLength
    cache: CacheOption
    tiling: TilingMode | tuple[int, int]
    max_tiles: int
    max_objects: int | None
    max_concurrency: int
    on_error: OnError

    def _configure(
        self,
        *,
        backend: VisionBackend | None,
        questions: Iterable[str],
        ocr: bool,
        detect: Iterable[str],
        caption_length: CaptionLength,
        cache: CacheOption,
        tiling: TilingMode | tuple[int, int],
        max_tiles: int,
        max_objects: int | None,
        max_concurrency: int,
        on_error: OnError,
    ) -> None:
        if backend is not None and not isinstance(backend, VisionBackend):
            raise TypeError(
                f"backend must be a moondream_tools.VisionBackend (e.g. AsyncMoondream()) or None,"
                f" got {type(backend).__name__}"
            )
        self.questions = _strings("questions", questions, "question")
        self.detect = _strings("detect", detect, "object phrase")
        self.ocr = _flag("ocr", ocr)
        check_length(caption_length)
        if cache is not None and not isinstance(cache, (ResultCache, str, os.PathLike)):
            raise TypeError(
                f"cache must be None, a path (a file or a directory) or a ResultCache, got {type(cache).__name__}"
            )
        _positive_int("max_tiles", max_tiles)
        _positive_int("max_objects", max_objects, optional=True)
        _positive_int("max_concurrency", max_concurrency)
        plan_tiles(100, 100, tiling=tiling, max_tiles=max_tiles)  # refuses bad tiling options
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be 'include' or 'skip', got {on_error!r}")
        self.backend = backend
        self.caption_length = caption_length
        self.cache = cache
        self.tiling = tiling
        self.max_tiles = max_tiles
        self.max_objects = max_objects
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        if backend is not None:
            self._make_indexer(backend, None)  # and the core's own checks of the options

    def _make_indexer(
        self,
        backend: VisionBackend,
        cache: ResultCache | None,
        on_progress: Callable[[IndexProgress], None] | None = None,
    ) -> ImageIndexer:
        return ImageIndexer(
            backend,
            caption_length=self.caption_length,
            questions=self.questions,
            ocr=self.ocr,
            detect=self.detect,
            tiling=self.tiling,
            max_tiles=self.max_tiles,
            max_objects=self.max_objects,
            max_concurrency=self.max_concurrency,
            cache=cache,
            on_progress=on_progress,
        )

    @contextlib.asynccontextmanager
    async def _indexer(
        self, on_progress: Callable[[IndexProgress], None] | None = None
    ) -> AsyncIterator[ImageIndexer]:
        """An indexer for one load: the given backend and cache, or ones made for this load
        (a client from the environment, a cache opened from a path) and closed at its end."""
        async with contextlib.AsyncExitStack() as stack:
            backend = self.backend
            if backend is None:
                backend = AsyncMoondream()  # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
                stack.push_async_callback(backend.aclose)
            cache = self.cache
            if isinstance(cache, (str, os.PathLike)):
                cache = ResultCache(cache)
                stack.callback(cache.close)
            yield self._make_indexer(backend, cache, on_progress)

    def _document(self, record: ImageRecord, source: str | None = None) -> Document | None:
        """The record's document (``source`` overrides the record's), or None when it failed
        and ``on_error="skip"``."""
        if source is None:
            source = record.source
        if not record.ok:
            skipped = self.on_error == "skip"
            logger.warning(
                "could not index %s (%s): %s",
                source,
                "skipped" if skipped else "kept; see metadata['errors']",
                _describe_errors(record.errors),
            )
            if skipped:
                return None
        metadata = {**record.metadata(), "source": source}
        return Document(id=record.id, page_content=record.text(), metadata=metadata)


# ---------------------------------------------------------------------- the loader


class MoondreamImageLoader(_ImageIndexing, BaseLoader):
    """Images (files, directories, URLs) as ``Document`` s, one per image, described by Moondream.

    Args:
        paths: a file, a directory (its images are found with ``glob``), an ``http(s)`` URL,
            or a list of them. Images come out in this order, each directory's sorted by path.
        backend: the :class:`moondream_tools.VisionBackend` to ask (e.g.
            :class:`moondream_tools.AsyncMoondream`); never closed by the loader. None makes
            an ``AsyncMoondream`` from ``MOONDREAM_API_KEY`` / ``MOONDREAM_BASE_URL`` for each
            load and closes it at the end of that load.
        questions: questions asked of every image; each question and its answer go in the text.
        ocr: transcribe the text in each image (into the text and ``metadata["ocr"]``).
        detect: object phrases to find; each gives ``count_<phrase>`` (an int) and
            ``boxes_<phrase>`` (pixel boxes ``[x_min, y_min, x_max, y_max]`` as a JSON string).
        caption_length: ``"short"``, ``"normal"`` or ``"long"``.
        cache: a :class:`moondream_tools.ResultCache`, or a path (a file, or a directory to
            hold one) opened for each load: calls already answered are not sent again, so
            re-loading a folder costs only its new or changed images.
        max_concurrency: images indexed at once.
        show_progress: report progress (a tqdm bar if tqdm is installed, else INFO log lines
            on the ``langchain_moondream`` logger).
        glob: which files of a directory to take (e.g. ``"*.png"``, ``"**/*.jpg"``); default:
            every image extension, recursively.
        tiling, max_tiles, max_objects: how ``detect`` treats large images and the object
            limit sent with it (see :class:`moondream_tools.indexing.ImageIndexer`).
        on_error: an image that fails (unreadable, or a call that failed) is logged at
            WARNING on the ``langchain_moondream`` logger, then ``"include"`` (default) still
            gives its document, with ``metadata["errors"]`` (a JSON object: part -> message),
            and ``"skip"`` drops it.

    Each document has ``id`` = the sha256 of the image's bytes, ``page_content`` = the text
    to embed (caption, answers, text in the image, objects found) and flat ``metadata``
    (str / int / float / bool / None only) with ``source`` = the path or URL. Arguments are
    checked at once: an unknown keyword is a ``TypeError`` naming the accepted ones.

    ``alazy_load`` / ``aload`` are natively async; ``lazy_load`` / ``load`` run the same on a
    private event loop in a worker thread, so they work in plain scripts and inside a running
    loop (a notebook) alike.

    Example:
        >>> loader = MoondreamImageLoader("photos/", detect=["car"], cache=".moondream-cache")
        >>> loader.detect, loader.on_error
        (('car',), 'include')
        >>> MoondreamImageLoader("photos/", questionz=["Is it sunny?"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: MoondreamImageLoader got unknown argument(s) 'questionz' (did you mean 'questions'?); accepted: paths, backend, ...
        >>> MoondreamImageLoader("photos/", questions="Is it sunny?")
        Traceback (most recent call last):
        ...
        TypeError: questions is a list of questions, not one string: use questions=['Is it sunny?']

    Loading (with a server)::

        async for doc in MoondreamImageLoader(["photos/", "https://example.com/a.jpg"]).alazy_load():
            print(doc.metadata["source"], doc.page_content)
        docs = MoondreamImageLoader("photos/", ocr=True).load()     # from sync code
    """

    def __init__(
        self,
        paths: IndexSource | Iterable[IndexSource],
        *,
        backend: VisionBackend | None = None,
        questions: Iterable[str] = (),
        ocr: bool = False,
        detect: Iterable[str] = (),
        caption_length: CaptionLength = "normal",
        cache: CacheOption = None,
        max_concurrency: int = 8,
        show_progress: bool = False,
        glob: str | None = None,
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        max_objects: int | None = None,
        on_error: OnError = "include",
        **unknown: Any,
    ) -> None:
        _refuse_unknown(type(self), unknown)
        self.paths = _paths(paths)
        self.show_progress = _flag("show_progress", show_progress)
        if glob is not None and not isinstance(glob, str):
            raise TypeError(f"glob must be a string such as '**/*.jpg' or None, got {type(glob).__name__}")
        self.glob = glob
        self._configure(
            backend=backend,
            questions=questions,
            ocr=ocr,
            detect=detect,
            caption_length=caption_length,
            cache=cache,
            tiling=tiling,
            max_tiles=max_tiles,
            max_objects=max_objects,
            max_concurrency=max_concurrency,
            on_error=on_error,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.paths!r}, detect={list(self.detect)!r}, on_error={self.on_error!r})"

    async def alazy_load(self) -> AsyncIterator[Document]:
        """The documents, in input order, each as soon as it and those before it are done,
        while up to ``max_concurrency`` images are indexed concurrently on this event loop."""
        progress = _Progress() if self.show_progress else None
        try:
            async with self._indexer(on_progress=progress) as indexer:
                async with contextlib.aclosing(indexer.stream(self.paths, glob=self.glob)) as records:
                    async for record in records:
                        document = self._document(record)
                        if document is not None:
                            yield document
        finally:
            if progress is not None:
                progress.close()

    def lazy_load(self) -> Iterator[Document]:
        """The documents of :meth:`alazy_load`, from synchronous code (a plain script, a
        worker thread or inside a running event loop): they are made on a private event loop
        in a worker thread. Stopping early stops the images in flight."""
        yield from iterate_sync(self.alazy_load)


# ---------------------------------------------------------------------- the blob parser


class MoondreamImageBlobParser(_ImageIndexing, BaseBlobParser):
    """One image blob into one ``Document``, described by Moondream.

    For ``GenericLoader`` (any blob loader) and as the ``images_parser`` of
    langchain-community's PDF loaders (``PyPDFLoader(..., extract_images=True,
    images_parser=MoondreamImageBlobParser())``: each image's caption goes into its page's
    text).

    Args:
        backend, questions, ocr, detect, caption_length, cache, tiling, max_tiles,
        max_objects, on_error: as for :class:`MoondreamImageLoader` (a backend made from the
            environment when None is made and closed for each blob).

    The document is that of :class:`MoondreamImageLoader`, with ``metadata["source"]`` the
    blob's source when it has one (a path), else ``"bytes:<first 12 hex of the id>"``.
    ``lazy_parse`` runs on a private event loop (in a worker thread inside a running loop).
    With ``on_error="skip"`` an image that fails gives no document; as a PDF loader's
    ``images_parser``, which takes the first document of each image, keep ``"include"``.

    Example:
        >>> parser = MoondreamImageBlobParser(detect=["person"], cache=".moondream-cache")
        >>> parser.detect
        ('person',)

    With a loader (and a server)::

        from langchain_community.document_loaders.generic import GenericLoader

        loader = GenericLoader.from_filesystem(
            "photos/", glob="**/*", suffixes=[".jpg", ".png"], parser=MoondreamImageBlobParser(ocr=True)
        )
        docs = loader.load()
    """

    def __init__(
        self,
        *,
        backend: VisionBackend | None = None,
        questions: Iterable[str] = (),
        ocr: bool = False,
        detect: Iterable[str] = (),
        caption_length: CaptionLength = "normal",
        cache: CacheOption = None,
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        max_objects: int | None = None,
        on_error: OnError = "include",
        **unknown: Any,
    ) -> None:
        _refuse_unknown(type(self), unknown)
        self._configure(
            backend=backend,
            questions=questions,
            ocr=ocr,
            detect=detect,
            caption_length=caption_length,
            cache=cache,
            tiling=tiling,
            max_tiles=max_tiles,
            max_objects=max_objects,
            max_concurrency=1,
            on_error=on_error,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(detect={list(self.detect)!r}, on_error={self.on_error!r})"

    async def _index_blob(self, data: bytes) -> ImageRecord:
        async with self._indexer() as indexer:
            return await indexer.index_one(data)

    def lazy_parse(self, blob: Blob) -> Iterator[Document]:
        """The blob's document (none when it failed and ``on_error="skip"``)."""
        data = blob.as_bytes()
        record = run_sync(lambda: self._index_blob(data))
        document = self._document(record, source=blob.source)
        if document is not None:
            yield document
