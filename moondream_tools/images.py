"""The image pipeline: whatever a caller hands us -> the JPEG data URL Moondream expects.

Accepted references (:data:`ImageInput`):

- ``str``: a local path, a ``file:`` URL, an ``http(s)`` URL or a ``data:`` URL
- :class:`pathlib.Path` (any ``os.PathLike``)
- ``bytes`` / ``bytearray`` / ``memoryview`` holding an encoded image
- a :class:`PIL.Image.Image`
- a numpy ``uint8`` array shaped HxW, HxWx3 or HxWx4
- a binary file object (anything with ``read()`` returning bytes)
- a :class:`PreparedImage` (already prepared: sent as is)

Every image is decoded with Pillow, its EXIF orientation applied, alpha flattened onto
white, palette / CMYK / 16-bit / grayscale converted to RGB, the first frame of an
animation taken, and encoded as JPEG. The oriented width and height are kept on the
:class:`PreparedImage`: every pixel coordinate this project reports is in that frame.
Decoding and encoding run in a worker thread, so concurrent calls overlap.

Example::

    from moondream_tools.images import ImageSettings, prepare_image

    prepared = await prepare_image("photo.jpg", settings=ImageSettings())
    print(prepared.size, len(prepared.data_url))
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Union

import aiohttp
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .results import ImageSize

if TYPE_CHECKING:  # pragma: no cover
    import numpy

__all__ = [
    "ImageInput",
    "ImageSettings",
    "PreparedImage",
    "prepare_image",
    "decode_image",
]

#: Everything the client accepts as an image.
ImageInput = Union[
    str,
    "os.PathLike[str]",
    bytes,
    bytearray,
    memoryview,
    Image.Image,
    "numpy.ndarray",
    IO[bytes],
    "PreparedImage",
]

DEFAULT_MAX_PIXELS = 80_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageSettings:
    """How images are read and encoded.

    Attributes:
        max_pixels: images with more pixels are refused before they are decoded
            (decompression-bomb guard). Default 80 MP.
        max_bytes: encoded inputs (files, downloads, data URLs) larger than this are
            refused before they are read in full. Default 64 MiB.
        jpeg_quality: quality of the JPEG sent to Moondream (1-95).
        download_timeout: seconds allowed for fetching an ``http(s)`` image.

    Example::

        md = AsyncMoondream(image_settings=ImageSettings(max_pixels=40_000_000))
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    jpeg_quality: int = 90
    download_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("max_pixels and max_bytes must be positive")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be within 1..95, got {self.jpeg_quality}")
        if self.download_timeout <= 0:
            raise ValueError("download_timeout must be positive")


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: a JPEG data URL plus the size of the oriented source.

    Attributes:
        data_url: ``data:image/jpeg;base64,...`` as Moondream's ``image_url`` expects.
        width, height: the oriented source image size (EXIF applied): the frame of
            every pixel coordinate reported for this image.
        upload_width, upload_height: the size of the JPEG actually sent.

    Passing a ``PreparedImage`` to any client method sends it without re-encoding,
    so several calls on one big image pay for decoding once::

        prepared = await md.prepare("photo.jpg")
        boxes = await md.detect(prepared, "car")
        points = await md.point(prepared, "person")
    """

    data_url: str = field(repr=False)
    width: int
    height: int
    upload_width: int
    upload_height: int

    @property
    def size(self) -> ImageSize:
        """The oriented source size as an :class:`~moondream_tools.results.ImageSize`."""
        return ImageSize(width=self.width, height=self.height)


def _describe(ref: object) -> str:
    """A short, safe description of an image reference for error messages."""
    if isinstance(ref, str):
        if ref.startswith("data:"):
            return f"data URL ({len(ref)} characters)"
        return repr(ref if len(ref) <= 200 else ref[:200] + "...")
    if isinstance(ref, os.PathLike):
        return repr(os.fspath(ref))
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"{len(ref)} bytes"
    return type(ref).__name__


# ---------------------------------------------------------------- reading sources


def _read_file(path: str, settings: ImageSettings) -> bytes:
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


async def _download(url: str, session: aiohttp.ClientSession | None, settings: ImageSettings) -> bytes:
    if session is None:
        raise ImageError(f"cannot download {url!r}: no HTTP session available")
    try:
        timeout = aiohttp.ClientTimeout(total=settings.download_timeout)
        async with session.get(url, timeout=timeout, allow_redirects=True) as resp:
            if resp.status != 200:
                raise ImageError(f"downloading image {url!r} failed: HTTP {resp.status}")
            declared = resp.content_length
            if declared is not None and declared > settings.max_bytes:
                raise ImageError(
                    f"image at {url!r} is {declared} bytes, over the limit of"
                    f" {settings.max_bytes} bytes"
                )
            chunks: list[bytes] = []
            total = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                total += len(chunk)
                if total > settings.max_bytes:
                    raise ImageError(
                        f"image at {url!r} is over the limit of {settings.max_bytes} bytes"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
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


# ---------------------------------------------------------------- decoding


def _open_checked(data: bytes, settings: ImageSettings) -> Image.Image:
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image is too large: over {settings.max_pixels} pixels (decompression-bomb guard)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError("not an image, or an image format Pillow cannot read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read image: {exc}") from None
    return img


def _check_pixels(img: Image.Image, settings: ImageSettings) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > settings.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of"
            f" {settings.max_pixels} (raise ImageSettings.max_pixels to allow it)"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, alpha flattened onto white, 16-bit scaled (not clipped)."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;16") or mode == "F":
        img = img.convert("F")
        _, high = img.getextrema()
        scale = 255.0 if high <= 1.0 else 255.0 / 65535.0 if high > 255 else 1.0
        return img.point(lambda v: v * scale).convert("L").convert("RGB")
    if "transparency" in img.info or mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def decode_image(source: bytes | Image.Image, settings: ImageSettings) -> Image.Image:
    """Decode, check, orient and convert an image to RGB (blocking; run in a thread).

    Raises:
        ImageError: not an image, truncated, zero-size, or over ``settings.max_pixels``.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        img = _open_checked(source, settings)
    _check_pixels(img, settings)
    try:
        img.load()
        oriented = ImageOps.exif_transpose(img)
        rgb = _to_rgb(oriented)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot decode image (truncated or corrupt?): {exc}") from None
    if rgb.width <= 0 or rgb.height <= 0:
        raise ImageError(f"image has zero size ({rgb.width}x{rgb.height})")
    return rgb


def _encode(rgb: Image.Image, settings: ImageSettings) -> PreparedImage:
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=settings.jpeg_quality)
    encoded = base64.b64encode(buffer.getbuffer()).decode("ascii")
    return PreparedImage(
        data_url="data:image/jpeg;base64," + encoded,
        width=rgb.width,
        height=rgb.height,
        upload_width=rgb.width,
        upload_height=rgb.height,
    )


def _prepare_sync(source: bytes | Image.Image, settings: ImageSettings) -> PreparedImage:
    return _encode(decode_image(source, settings), settings)


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
        lowered = image[:8].lower()
        if lowered.startswith("data:"):
            return _decode_data_url(image, settings)
        if lowered.startswith(("http://", "https://")):
            return await _download(image, session, settings)
        if lowered.startswith("file:"):
            return await asyncio.to_thread(_read_file, _file_url_to_path(image), settings)
        if not image:
            raise ImageError("image reference is an empty string")
        return await asyncio.to_thread(_read_file, image, settings)
    if isinstance(image, os.PathLike):
        return await asyncio.to_thread(_read_file, os.fspath(image), settings)
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


async def prepare_image(
    image: ImageInput,
    *,
    settings: ImageSettings,
    session: aiohttp.ClientSession | None = None,
) -> PreparedImage:
    """Turn any :data:`ImageInput` into a :class:`PreparedImage`.

    Reading files runs in a thread, downloads use ``session``, decoding and encoding
    run in a thread. Errors about the image are :class:`~moondream_tools.ImageError`
    with a message saying what is wrong.
    """
    if isinstance(image, PreparedImage):
        return image
    source = await _load_source(image, session, settings)
    try:
        return await asyncio.to_thread(_prepare_sync, source, settings)
    except ImageError as exc:
        raise ImageError(f"{_describe(image)}: {exc}") from None
