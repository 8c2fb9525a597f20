""":class:`ImageStore`: where the images an agent can name live, in memory or on disk.

A handle (``"receipt"``, ``"img_1"``, ``"img_3fa2c1d0"``) names an image. Images given
without a name get a handle derived from their content (the same image sent twice gets the
same handle). On disk the images are content-addressed files under the store's directory
and the handles are rows of a small SQLite index, so a conversation resumed in a new
process (a LangGraph or LlamaIndex checkpoint) still resolves its handles. The store is
bounded: past ``max_bytes`` the least recently used images are evicted, and using an
evicted handle is an :class:`~moondream_tools.ImageAccessError` that says to send the image
again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ConfigurationError, ImageAccessError, ImageError
from .images import ImageInput, PreparedImage
from .images.cache import DigestedBytes
from .images.sources import _array_to_image, _is_numpy_array

__all__ = ["DEFAULT_STORE_BYTES", "ImageStore", "check_handle", "content_handle"]

#: The default bound of an :class:`ImageStore`: 512 MiB of images.
DEFAULT_STORE_BYTES = 512 * 1024 * 1024
_HANDLE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_INDEX = "images.sqlite3"
#: An on-disk store keeps the images it read lately in memory, up to this many bytes.
_RECENT_BYTES = 64 * 1024 * 1024
_BLOBS = "blobs"


def content_handle(data: bytes) -> str:
    """The handle of an image given without a name: ``img_`` and 8 hex digits of its sha256.

    >>> content_handle(b"abc")
    'img_ba7816bf'
    """
    return "img_" + hashlib.sha256(data).hexdigest()[:8]


def check_handle(name: str) -> str:
    """``name`` if it is a valid handle: 1-64 letters, digits, ``_``, ``.`` or ``-``,
    starting with a letter, digit or ``_`` (safe as a plain word in a prompt)."""
    if not isinstance(name, str) or not _HANDLE_RE.match(name):
        raise ValueError(
            f"image name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with"
            " a letter, digit or '_'"
        )
    return name


@dataclass
class _Entry:
    """One stored image: what to give the backend (memory) or where it is (disk)."""

    digest: str
    image: ImageInput | None  # None on disk: read from the blob file
    nbytes: int
    used: float


def _to_bytes(image: ImageInput) -> bytes | None:
    """The encoded bytes of ``image`` when it has them (bytes, file objects); None for
    references (paths, URLs) and pixels (PIL images, arrays)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    read = getattr(image, "read", None)
    if callable(read) and not isinstance(image, (str, os.PathLike)):
        data = read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("a file object must be opened in binary mode ('rb')")
        return bytes(data)
    return None


def _pixel_digest(image: ImageInput) -> str:
    img = image if isinstance(image, Image.Image) else _array_to_image(image)
    header = f"{img.mode}:{img.size}".encode()
    return hashlib.sha256(header + img.tobytes()).hexdigest()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


class ImageStore:
    """Images an agent can name, by handle; in memory, or on disk under ``path``.

    Args:
        path: a directory for a persistent store (created if needed): images are files
            named by their sha256 under ``path/blobs`` and handles rows of
            ``path/images.sqlite3``; several processes may share it. None: in memory.
        max_bytes: the bound on stored image bytes; past it the least recently used images
            are evicted (their handles then raise :class:`~moondream_tools.ImageAccessError`
            asking for the image again).

    In memory, paths and URLs the application registers are kept as references (read when
    used) and PIL images, arrays and prepared images as they are; on disk every image is kept
    as bytes (PIL images and arrays as PNG, a prepared image as its upload's JPEG), paths and
    URLs as references.

    Example::

        store = ImageStore(".moondream-images")
        handle = store.put(jpeg_bytes)              # "img_3fa2c1d0", the same for the same bytes
        store.put("receipt.jpg", name="receipt")    # a name of the application's choosing
        tools = VisionTools(md, image_store=store)  # the tools resolve both
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_STORE_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.path = Path(path) if path is not None else None
        self._lock = threading.RLock()
        # memory: handle -> digest (insertion order), digest -> entry (LRU order)
        self._handles: OrderedDict[str, str] = OrderedDict()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._db: sqlite3.Connection | None = None
        # on disk: the blobs read lately, so follow-up questions do not read the file again
        self._recent: OrderedDict[str, DigestedBytes] = OrderedDict()
        if self.path is not None:
            self._open_disk(self.path)

    # ------------------------------------------------------------------ disk

    def _open_disk(self, path: Path) -> None:
        try:
            (path / _BLOBS).mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path / _INDEX, timeout=30, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"cannot open the image store at {str(path)!r}: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across crashes of the process
            db.execute(
                "CREATE TABLE IF NOT EXISTS handles (handle TEXT PRIMARY KEY, digest TEXT NOT NULL,"
                " reference TEXT, seq INTEGER NOT NULL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, nbytes INTEGER NOT NULL,"
                " used REAL NOT NULL, evicted INTEGER NOT NULL DEFAULT 0)"
            )
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConfigurationError(
                f"the image store index {str(path / _INDEX)!r} cannot be read ({exc}): move it aside"
                " or choose another directory"
            ) from None
        self._db = db

    def _blob(self, digest: str) -> Path:
        assert self.path is not None
        return self.path / _BLOBS / digest

    # ------------------------------------------------------------------ public API

    def put(self, image: ImageInput, *, name: str | None = None) -> str:
        """Store ``image`` and return its handle: ``name`` if given (replacing what it named),
        else :func:`content_handle` of its bytes (for a path, the file's bytes)."""
        if name is not None:
            check_handle(name)
        if isinstance(image, PreparedImage):  # its upload only: sent as is (on disk: the JPEG)
            if self.path is None:
                digest = "prepared:" + hashlib.sha256(image.data_url.encode("ascii")).hexdigest()
                handle = name if name is not None else "img_" + digest.rpartition(":")[2][:8]
                with self._lock:
                    self._put_memory(handle, digest, image)
                return handle
            image = base64.b64decode(image.data_url.partition(",")[2])
        data = _to_bytes(image)
        reference: str | None = None
        pixels = isinstance(image, Image.Image) or _is_numpy_array(image)
        if data is None and pixels and self.path is not None:  # on disk: kept as PNG
            data = _png(image if isinstance(image, Image.Image) else _array_to_image(image))
        if data is None and not pixels:
            if not isinstance(image, (str, os.PathLike)):
                raise TypeError(f"cannot store a {type(image).__name__} as an image")
            reference = os.fspath(image)
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
            kept: ImageInput = DigestedBytes(data, digest)
        elif reference is not None:
            digest = "ref:" + hashlib.sha256(reference.encode("utf-8", "surrogateescape")).hexdigest()
            kept = image
        else:  # pixels in memory, kept as they are: named by their content
            digest = "pixels:" + _pixel_digest(image)
            kept = image
        handle = name if name is not None else "img_" + digest.rpartition(":")[2][:8]
        with self._lock:
            if self._db is not None:
                self._put_disk(handle, digest, data, reference)
            else:
                self._put_memory(handle, digest, kept)
        return handle

    def get(self, handle: str) -> ImageInput | None:
        """The image ``handle`` names (marked as just used), or None when no image has that
        handle.

        Raises:
            ImageAccessError: the image was evicted (or its file deleted): send it again.
        """
        with self._lock:
            if self._db is not None:
                return self._get_disk(handle)
            digest = self._handles.get(handle)
            if digest is None:
                return None
            entry = self._entries.get(digest)
            if entry is None:
                raise self._gone(handle)
            entry.used = time.time()
            self._entries.move_to_end(digest)
            return entry.image

    def remove(self, handle: str) -> None:
        """Forget ``handle`` (its image too, unless another handle names it)."""
        with self._lock:
            if self._db is not None:
                row = self._db.execute("SELECT digest FROM handles WHERE handle = ?", (handle,)).fetchone()
                self._db.execute("DELETE FROM handles WHERE handle = ?", (handle,))
                if row is not None:
                    self._drop_unused_disk(row[0])
                return
            digest = self._handles.pop(handle, None)
            if digest is not None and digest not in self._handles.values():
                self._entries.pop(digest, None)

    @property
    def names(self) -> list[str]:
        """Every handle, in the order they were first stored (evicted ones included)."""
        with self._lock:
            if self._db is not None:
                return [row[0] for row in self._db.execute("SELECT handle FROM handles ORDER BY seq")]
            return list(self._handles)

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, str) and handle in self.names

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        """Bytes of the images held now (references count as their path's length)."""
        with self._lock:
            if self._db is not None:
                row = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blobs WHERE evicted = 0").fetchone()
                return int(row[0])
            return sum(entry.nbytes for entry in self._entries.values())

    def close(self) -> None:
        """Close the on-disk index (idempotent; an in-memory store has nothing to close)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __repr__(self) -> str:
        where = f"{str(self.path)!r}" if self.path is not None else "in memory"
        return f"ImageStore({where}, {len(self)} images, max_bytes={self.max_bytes})"

    def __del__(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()

    # ------------------------------------------------------------------ memory internals

    def _put_memory(self, handle: str, digest: str, kept: ImageInput) -> None:
        old = self._handles.get(handle)
        self._handles[handle] = digest
        if old is not None and old != digest and old not in self._handles.values():
            self._entries.pop(old, None)
        if isinstance(kept, Image.Image):
            nbytes = kept.width * kept.height * len(kept.getbands())
        elif _is_numpy_array(kept):
            nbytes = int(kept.nbytes)  # type: ignore[union-attr]
        elif isinstance(kept, PreparedImage):
            nbytes = len(kept.data_url)
        elif isinstance(kept, (bytes, bytearray)):
            nbytes = len(kept)
        else:
            nbytes = len(os.fspath(kept)) if isinstance(kept, (str, os.PathLike)) else 0
        self._entries[digest] = _Entry(digest, kept, nbytes, time.time())
        self._entries.move_to_end(digest)
        while sum(e.nbytes for e in self._entries.values()) > self.max_bytes and len(self._entries) > 1:
            self._entries.popitem(last=False)

    # ------------------------------------------------------------------ disk internals

    def _put_disk(self, handle: str, digest: str, data: bytes | None, reference: str | None) -> None:
        assert self._db is not None
        now = time.time()
        nbytes = len(data) if data is not None else len(reference or "")
        if data is not None:
            self._remember(DigestedBytes(data, digest) if not isinstance(data, DigestedBytes) else data)
            blob = self._blob(digest)
            if not blob.exists():
                partial = blob.with_name(f"{digest}.{os.getpid()}.{threading.get_ident()}.part")
                partial.write_bytes(data)
                os.replace(partial, blob)  # atomic: a reader never sees half a file
        old = self._db.execute("SELECT digest FROM handles WHERE handle = ?", (handle,)).fetchone()
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM handles").fetchone()[0]
        self._db.execute(
            "INSERT INTO handles (handle, digest, reference, seq) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(handle) DO UPDATE SET digest = excluded.digest, reference = excluded.reference",
            (handle, digest, reference, seq),
        )
        self._db.execute(
            "INSERT INTO blobs (digest, nbytes, used, evicted) VALUES (?, ?, ?, 0)"
            " ON CONFLICT(digest) DO UPDATE SET used = excluded.used, evicted = 0",
            (digest, nbytes, now),
        )
        if old is not None and old[0] != digest:
            self._drop_unused_disk(old[0])
        self._evict_disk(keep=digest)

    def _evict_disk(self, keep: str) -> None:
        assert self._db is not None
        while True:
            total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blobs WHERE evicted = 0").fetchone()[0]
            if total <= self.max_bytes:
                return
            row = self._db.execute(
                "SELECT digest FROM blobs WHERE evicted = 0 AND digest != ? ORDER BY used LIMIT 1", (keep,)
            ).fetchone()
            if row is None:
                return
            self._db.execute("UPDATE blobs SET evicted = 1 WHERE digest = ?", (row[0],))
            self._recent.pop(row[0], None)
            with contextlib.suppress(FileNotFoundError):
                self._blob(row[0]).unlink()

    def _drop_unused_disk(self, digest: str) -> None:
        assert self._db is not None
        if self._db.execute("SELECT 1 FROM handles WHERE digest = ? LIMIT 1", (digest,)).fetchone():
            return
        self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        self._recent.pop(digest, None)
        if not digest.startswith("ref:"):
            with contextlib.suppress(FileNotFoundError):
                self._blob(digest).unlink()

    def _get_disk(self, handle: str) -> ImageInput | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT h.digest, h.reference, b.evicted FROM handles h LEFT JOIN blobs b ON b.digest = h.digest"
            " WHERE h.handle = ?",
            (handle,),
        ).fetchone()
        if row is None:
            return None
        digest, reference, evicted = row
        if evicted or evicted is None:
            raise self._gone(handle)
        self._db.execute("UPDATE blobs SET used = ? WHERE digest = ?", (time.time(), digest))
        if reference is not None:
            return reference
        recent = self._recent.get(digest)
        if recent is not None:
            self._recent.move_to_end(digest)
            return recent
        try:
            data = DigestedBytes(self._blob(digest).read_bytes(), digest)
        except FileNotFoundError:
            self._db.execute("UPDATE blobs SET evicted = 1 WHERE digest = ?", (digest,))
            raise self._gone(handle) from None
        self._remember(data)
        return data

    def _remember(self, data: DigestedBytes) -> None:
        self._recent[data.sha256] = data
        self._recent.move_to_end(data.sha256)
        while sum(map(len, self._recent.values())) > min(_RECENT_BYTES, self.max_bytes) and len(self._recent) > 1:
            self._recent.popitem(last=False)

    @staticmethod
    def _gone(handle: str) -> ImageAccessError:
        return ImageAccessError(
            f"image {handle!r} is no longer available (it was removed from the image store to make"
            " room for newer images); ask the user to send the image again"
        )
