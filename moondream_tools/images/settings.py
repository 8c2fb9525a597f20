"""What an image may be and how it is read and encoded: :data:`ImageInput`, the
``DEFAULT_*`` limits, :class:`ImageSettings` and the result, :class:`PreparedImage`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Union

from PIL import Image

from ..results import ImageSize
from .sizing import MODEL_MAX_CROPS

if TYPE_CHECKING:  # pragma: no cover
    import numpy

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
        segment_upload: encode that larger segmentation upload when an image is prepared
            (in the background, so it is ready when a segment call follows). False gives
            segmentation the skill upload instead and saves one JPEG encode per image: for
            work that never segments, such as indexing or the tiles of a tiled count.
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
    segment_upload: bool = True
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
    def encoding(self) -> tuple[int, int | None, int | None, bool]:
        """What decides the uploaded payloads (quality, crops, segment side and upload), not
        the limits.

        Two settings with the same ``encoding`` produce the same upload from the same image,
        so they share a cache entry; the limits are checked on every use.
        """
        return (self.jpeg_quality, self.skill_max_crops, self.segment_max_side, self.segment_upload)

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
class SourceFacts:
    """What :class:`ImageSettings`' limits judge of an encoded image: its size in bytes, its
    Pillow format (MPO counted as JPEG) and its number of frames."""

    nbytes: int
    format: str | None
    frames: int

    def problem(self, settings: ImageSettings) -> str | None:
        """Why ``settings`` refuse this image, or None."""
        if self.nbytes > settings.max_bytes:
            return f"image is {self.nbytes} bytes, over the limit of {settings.max_bytes}"
        if self.format is not None and self.format not in settings.formats:
            return f"not an image, or not in an allowed format ({', '.join(sorted(settings.formats))})"
        if self.frames > settings.max_frames:
            return f"image has {self.frames} frames, over the limit of {settings.max_frames}"
        return None


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
    #: What the limits judge of the encoded source (None for a PIL image or array), so a
    #: cached image is held to the limits of whoever asks for it next.
    _source: SourceFacts | None = field(default=None, repr=False, compare=False)

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
