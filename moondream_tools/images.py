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
import enum
import hashlib
import io
import math
import os
import stat
import threading
import weakref
import urllib.parse
import urllib.request
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Hashable
import dataclasses
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
    "ReferenceKind",
    "reference_kind",
    "prepare_image",
    "decode_image",
    "read_image_file",
    "read_response_capped",
    "sniff_image",
    "model_working_size",
    "upload_sizes",
    "ImageCache",
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
#: Formats decoded by default: what cameras, phones, browsers and scanners produce.
DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"})  # JPEG covers MPO
DEFAULT_MAX_FRAMES = 1000

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
#: Worker threads for resizing and encoding (Pillow releases the GIL while it works).
_ENCODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moondream-encode")
#: Moondream's vision encoder: 378 px crops, 14 px patches, 4-patch overlap margins.
MODEL_CROP_SIZE = 378
MODEL_CROP_MARGIN = 56
MODEL_MAX_CROPS = 12


def _select_tiling(height: int, width: int, crop: int, max_crops: int) -> tuple[int, int]:
    """Moondream's rule for how many crop rows and columns cover an image."""
    if height <= crop or width <= crop:
        return (1, 1)
    min_h = math.ceil(height / crop)
    min_w = math.ceil(width / crop)
    if min_h * min_w > max_crops:
        ratio = math.sqrt(max_crops / (min_h * min_w))
        return (max(1, math.floor(min_h * ratio)), max(1, math.floor(min_w * ratio)))
    h_tiles = max(math.floor(math.sqrt(max_crops * height / width)), min_h)
    w_tiles = max(math.floor(math.sqrt(max_crops * width / height)), min_w)
    if h_tiles * w_tiles > max_crops:
        if w_tiles > h_tiles:
            w_tiles = math.floor(max_crops / h_tiles)
        else:
            h_tiles = math.floor(max_crops / w_tiles)
    return (max(1, h_tiles), max(1, w_tiles))


def model_working_size(width: int, height: int, max_crops: int = MODEL_MAX_CROPS) -> tuple[int, int]:
    """The size Moondream resizes an image to before its crops are cut, as ``(w, h)``.

    The model covers the image with overlapping 378 px crops (a 266 px window plus a
    56 px margin each side), at most ``max_crops`` of them, and resizes the image to
    exactly fit that grid.

    >>> model_working_size(4000, 3000)
    (1176, 644)
    >>> model_working_size(300, 200)
    (378, 378)
    """
    window = MODEL_CROP_SIZE - 2 * MODEL_CROP_MARGIN
    margins = 2 * MODEL_CROP_MARGIN
    rows, cols = _select_tiling(height - margins, width - margins, window, max_crops)
    return (cols * window + margins, rows * window + margins)


def upload_sizes(width: int, height: int, settings: ImageSettings) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(skill size, segment size)`` to send for an oriented ``width`` x ``height`` image.

    The skill size keeps the aspect ratio and is the smallest size from which the model
    loses nothing: it is at least the model's working size of the original on both axes,
    and the model's working size of the upload itself is too (the tiling rule has edges:
    a width just under a crop boundary can drop a whole row of crops, so the scale is
    raised until it does not). The segment size caps the long side. Neither upscales.

    >>> upload_sizes(4000, 3000, ImageSettings())
    ((1176, 882), (2000, 1500))
    >>> upload_sizes(640, 480, ImageSettings())
    ((640, 480), (640, 480))
    """

    def scaled(scale: float) -> tuple[int, int]:
        if scale >= 1.0:
            return (width, height)
        return (max(1, round(width * scale)), max(1, round(height * scale)))

    if settings.skill_max_crops is None:
        skill = (width, height)
    else:
        crops = settings.skill_max_crops
        target_w, target_h = model_working_size(width, height, crops)
        scale = max(target_w / width, target_h / height)
        skill = scaled(scale)
        while skill != (width, height):
            seen_w, seen_h = model_working_size(*skill, crops)
            if seen_w >= target_w and seen_h >= target_h:
                break
            scale *= 1.02
            skill = scaled(scale)
    if settings.segment_max_side is None:
        segment = (width, height)
    else:
        segment = scaled(settings.segment_max_side / max(width, height))
    if segment[0] < skill[0]:  # segmentation never gets less than the other skills
        segment = skill
    return skill, segment


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
        skill_max_crops: caption, query, detect and point see the image through at most
            this many overlapping 378 px crops (Moondream uses 12), so the image is
            downscaled (never upscaled) to the size that tiling works at: about 1176 px on
            the long side of a 4:3 photo. None sends the full resolution.
        segment_max_side: segmentation refines its mask on the original pixels around
            the object, so it gets more: the long side is capped at this (default 2000 px).
            None sends the full resolution.
        formats: the Pillow formats that may be decoded (default: JPEG (with MPO), PNG,
            GIF, WEBP, BMP, TIFF); anything else is refused without being parsed further.
        max_frames: animations with more frames are refused (the first frame is used).

    Example::

        md = AsyncMoondream(image_settings=ImageSettings(max_pixels=40_000_000))
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    jpeg_quality: int = 90
    download_timeout: float = 30.0
    skill_max_crops: int | None = MODEL_MAX_CROPS
    segment_max_side: int | None = 2000
    formats: frozenset[str] = DEFAULT_FORMATS
    max_frames: int = DEFAULT_MAX_FRAMES

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("max_pixels and max_bytes must be positive")
        if self.skill_max_crops is not None and self.skill_max_crops < 1:
            raise ValueError("skill_max_crops must be at least 1, or None to send full resolution")
        if not self.formats:
            raise ValueError("formats must name at least one image format")
        object.__setattr__(self, "formats", frozenset(f.upper() for f in self.formats))
        Image.init()
        unknown = self.formats - set(Image.OPEN)
        if unknown:
            raise ValueError(f"Pillow cannot open these formats: {', '.join(sorted(unknown))}")
        if self.max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        if self.segment_max_side is not None and self.segment_max_side < 64:
            raise ValueError("segment_max_side must be at least 64, or None to send full resolution")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be within 1..95, got {self.jpeg_quality}")
        if self.download_timeout <= 0:
            raise ValueError("download_timeout must be positive")

    @property
    def encoding(self) -> tuple[int, int | None, int | None]:
        """What decides the uploaded payloads (quality, crops, segment side), not the limits.

        Two settings with the same ``encoding`` produce the same upload from the same image,
        so they share a cache entry; the limits are checked on every use.
        """
        return (self.jpeg_quality, self.skill_max_crops, self.segment_max_side)

    def within(self, limits: ImageSettings) -> ImageSettings:
        """These settings with the tighter of each limit of ``limits`` (pixels, bytes, frames,
        download time; formats allowed by both). The encoding stays these settings'.

        >>> ImageSettings(max_pixels=10).within(ImageSettings(max_pixels=20, jpeg_quality=50)).max_pixels
        10
        """
        formats = self.formats & limits.formats
        if not formats:
            raise ValueError("the two settings allow no image format in common")
        return dataclasses.replace(
            self,
            max_pixels=min(self.max_pixels, limits.max_pixels),
            max_bytes=min(self.max_bytes, limits.max_bytes),
            max_frames=min(self.max_frames, limits.max_frames),
            download_timeout=min(self.download_timeout, limits.download_timeout),
            formats=formats,
        )


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: JPEG data URLs plus the size of the oriented source.

    Attributes:
        data_url: ``data:image/jpeg;base64,...`` for caption, query, detect and point,
            at the model's working resolution.
        width, height: the oriented source image size (EXIF applied): the frame of
            every pixel coordinate reported for this image.
        upload_width, upload_height: the size of the JPEG in ``data_url``.
        segment_data_url: the JPEG for segmentation, with more resolution (defaults to
            ``data_url``), and its ``segment_upload_width`` / ``segment_upload_height``.
            The pipeline encodes it in the background, so caption/query/detect/point never
            wait for it; reading this property waits until it is ready, and
            :meth:`segment_payload` awaits it without blocking the event loop.

    Passing a ``PreparedImage`` to any client method sends it without re-encoding,
    so several calls on one big image pay for decoding once::

        prepared = await md.prepare("photo.jpg")
        boxes = await md.detect(prepared, "car")
        mask = await md.segment(prepared, "car")
    """

    data_url: str = field(repr=False)
    width: int
    height: int
    upload_width: int
    upload_height: int
    segment_upload_width: int = 0
    segment_upload_height: int = 0
    _segment: str | Future[str] = field(default="", repr=False, compare=False)
    #: The encoded source's size in bytes and Pillow format (None for a PIL image or array),
    #: so a cached image is held to the limits of whoever asks for it next.
    _source_bytes: int | None = field(default=None, repr=False, compare=False)
    _source_format: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._segment:
            object.__setattr__(self, "_segment", self.data_url)
            object.__setattr__(self, "segment_upload_width", self.upload_width)
            object.__setattr__(self, "segment_upload_height", self.upload_height)

    @property
    def segment_data_url(self) -> str:
        """The segmentation payload (waits for its background encoding if needed)."""
        segment = self._segment
        return segment if isinstance(segment, str) else segment.result()

    async def segment_payload(self) -> str:
        """The segmentation payload, awaited without blocking the event loop."""
        segment = self._segment
        return segment if isinstance(segment, str) else await asyncio.wrap_future(segment)

    @property
    def nbytes(self) -> int:
        """Characters held by the payloads (what a cache entry costs); a segment payload
        still being encoded counts by its expected size."""
        segment = self._segment
        if segment is self.data_url:
            return len(self.data_url)
        if isinstance(segment, str):
            return len(self.data_url) + len(segment)
        if segment.done() and segment.exception() is None:
            return len(self.data_url) + len(segment.result())
        return len(self.data_url) * (1 + self.segment_upload_width * self.segment_upload_height // max(
            1, self.upload_width * self.upload_height))

    @property
    def size(self) -> ImageSize:
        """The oriented source size as an :class:`~moondream_tools.results.ImageSize`."""
        return ImageSize(width=self.width, height=self.height)


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


# ---------------------------------------------------------------- reading sources


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


# ---------------------------------------------------------------- decoding


def _open_checked(data: bytes, settings: ImageSettings) -> Image.Image:
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=sorted(settings.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image is too large: over {settings.max_pixels} pixels (decompression-bomb guard)"
        ) from None
    except UnidentifiedImageError:
        allowed = ", ".join(sorted(settings.formats))
        raise ImageError(f"not an image, or not in an allowed format ({allowed})") from None
    except Exception as exc:  # a corrupt file can make any Pillow plugin fail in any way
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None
    frames = 1
    try:
        if getattr(img, "is_animated", False):
            frames = int(getattr(img, "n_frames", 1))
    except Exception as exc:
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None
    if frames > settings.max_frames:
        raise ImageError(f"image has {frames} frames, over the limit of {settings.max_frames}")
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


_ORIENTATION_TAG = 0x0112


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    if img.format == "TIFF":  # Pillow turns TIFFs upright itself, when it opens them
        return img.size
    orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    width, height = img.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _draft(img: Image.Image, target: tuple[int, int], oriented: tuple[int, int]) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when that still covers ``target``."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L", "CMYK"):
        return
    if target[0] >= oriented[0] and target[1] >= oriented[1]:
        return
    swapped = oriented != img.size
    request = (target[1], target[0]) if swapped else target
    img.draft(img.mode, request)


def decode_image(source: bytes | Image.Image, settings: ImageSettings) -> tuple[Image.Image, tuple[int, int]]:
    """Decode, check, orient and convert an image to RGB (blocking; run it in a thread).

    Returns the upright RGB image and its size. A PIL image passed in is never modified.

    Raises:
        ImageError: not an image, truncated, zero-size, or over ``settings.max_pixels``.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source, settings)
        return _decode(source, owned=False)
    img = _open_checked(source, settings)
    _check_pixels(img, settings)
    return _decode(img, owned=True)


def _decode(
    img: Image.Image, *, owned: bool, min_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Load, orient and convert ``img``; returns the upright RGB image and upright source size.

    An ``owned`` image (one we opened) may be decoded at a reduced scale covering
    ``min_size`` (JPEG DCT scaling, so a big photo is never fully decoded just to be
    shrunk) and turned upright in place; a caller's image is left untouched.
    """
    try:
        oriented_size = _oriented_size(img)
        if owned and min_size is not None:
            _draft(img, min_size, oriented_size)
        img.load()
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
        else:
            rgb = _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Exception as exc:  # a corrupt file can make any Pillow plugin fail in any way
        raise ImageError(f"cannot decode image (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    if rgb.width <= 0 or rgb.height <= 0:
        raise ImageError(f"image has zero size ({rgb.width}x{rgb.height})")
    return rgb, oriented_size


def _resized(img: Image.Image, size: tuple[int, int], *, split: bool = False) -> Image.Image:
    """``img`` shrunk to ``size``; ``split`` shares the work with a second thread.

    Area averaging (Pillow's BOX filter, OpenCV's INTER_AREA) is the textbook filter for
    shrinking: after JPEG DCT scaling at most a 2x step is left, and it keeps 38.5 dB PSNR
    against a Lanczos resize of the full-resolution photo (bilinear: 38.7 dB at 1.5x the
    cost; Lanczos: 51 dB at 3x). The model resamples its input again anyway. With
    ``split`` the top and bottom halves are resized at once, exactly (each from its own
    source box), which halves the wait on two cores.
    """
    if img.size == size:
        return img
    if not split or size[1] < 2:
        return img.resize(size, Image.Resampling.BOX)
    width, height = img.size
    rows = size[1] // 2
    cut = rows * height / size[1]
    top = _ENCODER.submit(img.resize, (size[0], rows), Image.Resampling.BOX, (0, 0, width, cut))
    bottom = img.resize((size[0], size[1] - rows), Image.Resampling.BOX, (0, cut, width, height))
    out = Image.new(img.mode, size)
    out.paste(top.result(), (0, 0))
    out.paste(bottom, (0, rows))
    return out


def _jpeg_data_url(rgb: Image.Image, settings: ImageSettings) -> str:
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=settings.jpeg_quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getbuffer()).decode("ascii")


def _decode_for_upload(
    source: bytes | Image.Image, settings: ImageSettings
) -> tuple[Image.Image, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Decode once, at the larger of the two upload sizes (blocking).

    Returns the upright RGB image, the upright source size, and the skill and segment
    upload sizes.
    """
    owned = not isinstance(source, Image.Image)
    img = _open_checked(source, settings) if owned else source  # type: ignore[arg-type]
    _check_pixels(img, settings)
    try:  # reading EXIF may read (and fail on) more of a corrupt file
        oriented_size = _oriented_size(img)
    except Exception as exc:
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None
    skill_size, segment_size = upload_sizes(*oriented_size, settings)
    rgb, oriented = _decode(img, owned=owned, min_size=segment_size)
    return rgb, oriented, skill_size, segment_size


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


# ---------------------------------------------------------------- cache


class ImageCache:
    """A bounded LRU cache of :class:`PreparedImage` s, sized by payload characters.

    Keys are the image's identity: the content hash of bytes and data URLs, the
    resolved path plus size and modification time of files, the object identity of
    PIL images (do not mutate a PIL image between calls: pass a copy instead), plus
    the :class:`ImageSettings` used. One cache is shared by every call on a client, so
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

        Concurrent calls for one key on one event loop compute it once: the others wait for
        that result (or its error).
        """
        hit = self.get(key)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        with self._lock:
            pending = self._inflight.get(key)
            if pending is None or pending[0] is not loop:
                future: asyncio.Future[PreparedImage] = loop.create_future()
                self._inflight[key] = (loop, future)
                pending = None
        if pending is not None:
            return await asyncio.shield(pending[1])
        try:
            prepared = await compute()
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
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


def _source_key(image: ImageInput) -> Hashable | None:
    """A cheap identity for ``image`` before reading it, or None when only its bytes can tell."""
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


async def prepare_image(
    image: ImageInput,
    *,
    settings: ImageSettings,
    session: aiohttp.ClientSession | None = None,
    cache: ImageCache | None = None,
) -> PreparedImage:
    """Turn any :data:`ImageInput` into a :class:`PreparedImage`.

    Reading files runs in a thread, downloads use ``session``, decoding and encoding
    run in a thread. With a ``cache``, an image already prepared with the same settings
    is returned at once, and concurrent calls for one image decode it once. Errors about
    the image are :class:`~moondream_tools.ImageError` with a message saying what is wrong.
    """
    if isinstance(image, PreparedImage):
        return image
    if cache is None or cache.max_bytes == 0:
        return await _prepare_uncached(image, settings, session)
    source_key = _source_key(image)
    if source_key is None:  # a URL or file object: its bytes are its identity
        source = await _load_source(image, session, settings)
        if not isinstance(source, bytes):  # pragma: no cover - URLs and files give bytes
            return await _prepare_loaded(image, source, settings)
        key: Hashable = (("bytes", _digest(source)), settings.encoding)
        prepared = await cache.get_or_compute(key, lambda: _prepare_loaded(image, source, settings))
        return _check_limits(prepared, settings, image)
    # Keyed by what decides the upload, not by the limits: the same file named by an agent
    # (under an ImagePolicy's limits) and registered by the application shares one entry.
    key = (source_key, settings.encoding)
    if isinstance(image, Image.Image):
        cache.watch(image, key)
    prepared = await cache.get_or_compute(key, lambda: _prepare_uncached(image, settings, session))
    return _check_limits(prepared, settings, image)


def _check_limits(prepared: PreparedImage, settings: ImageSettings, image: ImageInput) -> PreparedImage:
    """Hold an image prepared earlier (under other limits) to ``settings``' limits."""
    pixels = prepared.width * prepared.height
    problem = None
    if pixels > settings.max_pixels:
        problem = (
            f"image is {prepared.width}x{prepared.height} = {pixels} pixels, over the limit of"
            f" {settings.max_pixels} (raise ImageSettings.max_pixels to allow it)"
        )
    elif prepared._source_bytes is not None and prepared._source_bytes > settings.max_bytes:
        problem = f"image is {prepared._source_bytes} bytes, over the limit of {settings.max_bytes}"
    elif prepared._source_format is not None and prepared._source_format not in settings.formats:
        allowed = ", ".join(sorted(settings.formats))
        problem = f"not an image, or not in an allowed format ({allowed})"
    if problem is not None:
        raise ImageError(f"{_describe(image)}: {problem}")
    return prepared


async def _prepare_uncached(
    image: ImageInput, settings: ImageSettings, session: aiohttp.ClientSession | None
) -> PreparedImage:
    source = await _load_source(image, session, settings)
    return await _prepare_loaded(image, source, settings)


async def _prepare_loaded(image: ImageInput, source: bytes | Image.Image, settings: ImageSettings) -> PreparedImage:
    try:
        return await asyncio.to_thread(_prepare_sync, source, settings)
    except ImageError as exc:
        raise ImageError(f"{_describe(image)}: {exc}") from None


#: Segment payloads being encoded in the background at most (each holds a decoded image).
_BACKGROUND_SLOTS = threading.Semaphore(2)


def _encode_in_background(rgb: Image.Image, size: tuple[int, int], settings: ImageSettings) -> str:
    try:
        return _jpeg_data_url(_resized(rgb, size), settings)
    finally:
        _BACKGROUND_SLOTS.release()


def _prepare_sync(source: bytes | Image.Image, settings: ImageSettings) -> PreparedImage:
    """Decode once, encode the skill payload now and the segment payload in the background."""
    rgb, oriented, skill_size, segment_size = _decode_for_upload(source, settings)
    skill_url = _jpeg_data_url(_resized(rgb, skill_size, split=True), settings)
    segment: str | Future[str]
    if segment_size == skill_size:
        segment = skill_url
    elif _BACKGROUND_SLOTS.acquire(blocking=False):
        segment = _ENCODER.submit(_encode_in_background, rgb, segment_size, settings)
    else:  # the encoder is busy: encode here, so pending work (and memory) stays bounded
        segment = _jpeg_data_url(_resized(rgb, segment_size), settings)
    encoded = isinstance(source, bytes)
    return PreparedImage(
        data_url=skill_url,
        width=oriented[0],
        height=oriented[1],
        upload_width=skill_size[0],
        upload_height=skill_size[1],
        segment_upload_width=segment_size[0],
        segment_upload_height=segment_size[1],
        _segment=segment,
        _source_bytes=len(source) if encoded else None,
        _source_format=sniff_image(source) if encoded else None,  # type: ignore[arg-type]
    )
