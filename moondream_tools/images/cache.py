"""The LRU :class:`ImageCache` of prepared images and the keys it is indexed by."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from PIL import Image

from .settings import ImageInput, PreparedImage
from .sources import ReferenceKind, _file_url_to_path, _is_numpy_array, reference_kind


class ImageCache:
    """A bounded LRU cache of :class:`PreparedImage` s, sized by payload characters.

    Keys are the image's identity: the content hash of bytes and data URLs, the
    resolved path plus size and modification time of files, the object identity of
    PIL images (do not mutate a PIL image between calls: pass a copy instead), plus
    :attr:`ImageSettings.encoding` (what decides the upload; the limits are checked on
    every use, so callers with different limits share an entry). One cache is shared by every call on a client, so
    several tools on one image decode it once. Thread-safe.

    Example::

        md = AsyncMoondream(image_cache_bytes=256 * 1024 * 1024)
        print(len(md.image_cache), md.image_cache.nbytes)
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (0 disables the cache)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, PreparedImage] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._watched: set[Hashable] = set()
        self._inflight: dict[Hashable, tuple[asyncio.AbstractEventLoop, asyncio.Future[PreparedImage]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Payload characters held now."""
        return self._nbytes

    def get(self, key: Hashable) -> PreparedImage | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: PreparedImage) -> None:
        size = value.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._entries[key] = value
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._watched.discard(key)
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes

    def watch(self, image: Image.Image, key: Hashable) -> None:
        """Drop ``key`` when ``image`` is garbage-collected (its id may then be reused)."""
        with self._lock:
            if key in self._watched:
                return
            self._watched.add(key)
        weakref.finalize(image, self.discard, key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[PreparedImage]]) -> PreparedImage:
        """The cached image for ``key``, or ``compute()``'s result, stored.

        Concurrent calls for one key on one event loop compute it once and the others wait
        for that result. When the computing call fails or is cancelled, a waiter computes
        it again itself: the failure may belong to that caller alone (its limits, its
        cancellation), and a waiter must get the answer its own ``compute`` gives.
        """
        loop = asyncio.get_running_loop()
        while True:
            hit = self.get(key)
            if hit is not None:
                return hit
            with self._lock:
                pending = self._inflight.get(key)
                if pending is None or pending[0] is not loop:
                    future: asyncio.Future[PreparedImage] = loop.create_future()
                    self._inflight[key] = (loop, future)
                    break
            try:
                return await asyncio.shield(pending[1])
            except asyncio.CancelledError:
                if not pending[1].cancelled():
                    raise  # this caller was cancelled, not the one computing
            except Exception:  # noqa: BLE001 - the other caller's failure: try under our own settings
                pass
        try:
            prepared = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters handle it, nobody else must
            raise
        else:
            self.put(key, prepared)
            future.set_result(prepared)
            return prepared
        finally:
            with self._lock:
                if self._inflight.get(key, (None, None))[1] is future:
                    del self._inflight[key]


def _digest(data: bytes | memoryview | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("ascii", "surrogateescape")
    return hashlib.blake2b(data, digest_size=20).digest()


class DigestedBytes(bytes):
    """Image bytes that carry their sha256 (hex), as an :class:`~moondream_tools.ImageStore`
    returns them: preparing them again finds the cached upload without hashing the bytes."""

    sha256: str

    def __new__(cls, data: bytes, sha256: str) -> DigestedBytes:
        obj = super().__new__(cls, data)
        obj.sha256 = sha256
        return obj


def _source_key(image: ImageInput) -> Hashable | None:
    """A cheap identity for ``image`` before reading it, or None when only its bytes can tell."""
    if isinstance(image, DigestedBytes):
        return ("sha256", image.sha256)
    if isinstance(image, Image.Image):
        return ("pil", id(image), image.size, image.mode)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return ("bytes", _digest(bytes(image) if isinstance(image, bytearray) else image))
    if _is_numpy_array(image):
        array: Any = image
        contiguous = array if array.flags["C_CONTIGUOUS"] else array.copy()
        return ("array", _digest(memoryview(contiguous).cast("B")), tuple(array.shape), str(array.dtype))
    path: str | None = None
    if isinstance(image, str):
        kind = reference_kind(image)
        if kind is ReferenceKind.DATA_URL:
            return ("data", _digest(image))
        if kind is ReferenceKind.URL:
            return None
        path = _file_url_to_path(image) if kind is ReferenceKind.FILE_URL else image
    elif isinstance(image, os.PathLike):
        path = os.fspath(image)
    if path:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return ("file", os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    return None
