"""Reading image sources into bytes (or a PIL image): classifying string references,
sniffing formats, files with a byte cap, ``data:`` and ``file:`` URLs, capped downloads,
numpy arrays and binary file objects."""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import os
import stat
import urllib.parse
import urllib.request
from typing import Any

import aiohttp
from PIL import Image

from ..errors import ImageError
from .settings import ImageInput, ImageSettings

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_image(data: bytes) -> str | None:
    """The image format ``data`` starts like, from its magic bytes, or None.

    >>> sniff_image(b"GIF89a...."), sniff_image(b"<html>")
    ('GIF', None)
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return None


class ReferenceKind(enum.Enum):
    """What a string image reference is (see :func:`reference_kind`)."""

    DATA_URL = "data URL"
    URL = "http(s) URL"
    FILE_URL = "file URL"
    PATH = "path"


def reference_kind(reference: str) -> ReferenceKind:
    """Classify a string image reference: the one place that reads its scheme.

    >>> [reference_kind(r).name for r in ("HTTPS://x/a.jpg", "data:image/png;base64,AA", "file:///a.png", "a.png")]
    ['URL', 'DATA_URL', 'FILE_URL', 'PATH']
    """
    head = reference[:8].lower()
    if head.startswith("data:"):
        return ReferenceKind.DATA_URL
    if head.startswith(("http://", "https://")):
        return ReferenceKind.URL
    if head.startswith("file:"):
        return ReferenceKind.FILE_URL
    return ReferenceKind.PATH


def _describe(ref: object) -> str:
    """A short, safe description of an image reference for error messages."""
    if isinstance(ref, str):
        if reference_kind(ref) is ReferenceKind.DATA_URL:
            return f"data URL ({len(ref)} characters)"
        return repr(ref if len(ref) <= 200 else ref[:200] + "...")
    if isinstance(ref, os.PathLike):
        return repr(os.fspath(ref))
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"{len(ref)} bytes"
    return type(ref).__name__


def read_image_file(path: str, settings: ImageSettings) -> bytes:
    """The bytes of an image file, refused before reading when it is not a regular file or
    is over ``settings.max_bytes`` (blocking; run it in a thread)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path!r}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file {path!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path!r} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path!r} is not a regular file (device, FIFO or socket)")
    if st.st_size > settings.max_bytes:
        raise ImageError(
            f"image file {path!r} is {st.st_size} bytes, over the limit of {settings.max_bytes}"
            " bytes (raise ImageSettings.max_bytes to allow it)"
        )
    try:
        with open(path, "rb") as fh:
            return fh.read(settings.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read image file {path!r}: {exc.strerror or exc}") from None


def _decode_data_url(url: str, settings: ImageSettings) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("malformed data URL: no ',' between header and data")
    if not header.endswith(";base64"):
        raise ImageError("data URL must be base64-encoded (data:image/...;base64,...)")
    if len(payload) * 3 // 4 > settings.max_bytes:
        raise ImageError(
            f"data URL holds about {len(payload) * 3 // 4} bytes, over the limit of"
            f" {settings.max_bytes} bytes"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URL does not contain valid base64") from None


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(f"file URL with a remote host is not supported: {url!r}")
    return urllib.request.url2pathname(parsed.path)


async def read_response_capped(resp: aiohttp.ClientResponse, max_bytes: int, url: str) -> bytes:
    """The body of an image download, refused as soon as it is over ``max_bytes``.

    The declared ``Content-Length`` is checked first, then the bytes as they stream in, so
    a huge or endless answer never fills memory.
    """
    if resp.status != 200:
        raise ImageError(f"downloading image {url!r} failed: HTTP {resp.status}")
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise ImageError(f"image at {url!r} is {declared} bytes, over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise ImageError(f"image at {url!r} is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _download(url: str, session: aiohttp.ClientSession | None, settings: ImageSettings) -> bytes:
    if session is None:
        raise ImageError(f"cannot download {url!r}: no HTTP session available")
    try:
        timeout = aiohttp.ClientTimeout(total=settings.download_timeout)
        async with session.get(url, timeout=timeout, allow_redirects=True) as resp:
            return await read_response_capped(resp, settings.max_bytes, url)
    except ImageError:
        raise
    except TimeoutError:
        raise ImageError(
            f"downloading image {url!r} timed out after {settings.download_timeout} s"
        ) from None
    except aiohttp.ClientError as exc:
        raise ImageError(f"downloading image {url!r} failed: {exc}") from None


def _is_numpy_array(obj: object) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "__array_interface__")


def _array_to_image(array: Any) -> Image.Image:
    shape = tuple(array.shape)
    if str(array.dtype) != "uint8":
        raise ImageError(f"numpy image must have dtype uint8, got {array.dtype}")
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)):
        if len(shape) == 3 and shape[2] == 1:
            array = array[:, :, 0]
        if 0 in shape:
            raise ImageError(f"numpy image has zero size {shape}")
        return Image.fromarray(array)
    raise ImageError(f"numpy image must be HxW, HxWx3 or HxWx4, got shape {shape}")


async def _load_source(
    image: ImageInput, session: aiohttp.ClientSession | None, settings: ImageSettings
) -> bytes | Image.Image:
    if isinstance(image, Image.Image):
        return image
    if _is_numpy_array(image):
        return _array_to_image(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if len(data) > settings.max_bytes:
            raise ImageError(f"image is {len(data)} bytes, over the limit of {settings.max_bytes}")
        return data
    if isinstance(image, str):
        kind = reference_kind(image)
        if kind is ReferenceKind.DATA_URL:
            return _decode_data_url(image, settings)
        if kind is ReferenceKind.URL:
            return await _download(image, session, settings)
        if kind is ReferenceKind.FILE_URL:
            return await asyncio.to_thread(read_image_file, _file_url_to_path(image), settings)
        if not image:
            raise ImageError("image reference is an empty string")
        return await asyncio.to_thread(read_image_file, image, settings)
    if isinstance(image, os.PathLike):
        return await asyncio.to_thread(read_image_file, os.fspath(image), settings)
    read = getattr(image, "read", None)
    if callable(read):
        data = await asyncio.to_thread(read, settings.max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("file object must be opened in binary mode ('rb')")
        if len(data) > settings.max_bytes:
            raise ImageError(f"image is over the limit of {settings.max_bytes} bytes")
        return bytes(data)
    raise ImageError(
        f"unsupported image type {type(image).__name__}: pass a path, URL, data URL, bytes,"
        " PIL image, numpy array or binary file object"
    )
