""":func:`prepare_image`: source -> cache -> decode once -> skill payload now, segment
payload in the background."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from concurrent.futures import Future

import aiohttp
from PIL import Image

from ..errors import ImageError
from .cache import ImageCache, _digest, _source_key
from .decode import _ENCODER, _decode_for_upload, _jpeg_data_url, _resized
from .settings import ImageInput, ImageSettings, PreparedImage
from .sources import _describe, _load_source


async def prepare_image(
    image: ImageInput,
    *,
    settings: ImageSettings,
    session: aiohttp.ClientSession | None = None,
    cache: ImageCache | None = None,
) -> PreparedImage:
    """Turn any :data:`ImageInput` into a :class:`PreparedImage`.

    Reading files runs in a thread, downloads use ``session``, decoding and encoding
    run in a thread. With a ``cache``, an image already prepared with the same encoding
    (:attr:`ImageSettings.encoding`) is returned at once, held to ``settings``' limits, and
    concurrent calls for one image decode it once. Errors about
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
    elif prepared._source is not None:
        problem = prepared._source.problem(settings)
    if problem is not None:
        raise ImageError(f"{_describe(image)}: {problem}")
    return prepared


async def _prepare_uncached(
    image: ImageInput, settings: ImageSettings, session: aiohttp.ClientSession | None
) -> PreparedImage:
    source = await _load_source(image, session, settings)
    return await _prepare_loaded(image, source, settings)


async def _prepare_loaded(image: ImageInput, source: bytes | Image.Image, settings: ImageSettings) -> PreparedImage:
    return await asyncio.to_thread(_prepare_blocking, image, source, settings)


def _prepare_blocking(image: ImageInput, source: bytes | Image.Image, settings: ImageSettings) -> PreparedImage:
    """:func:`prepare_image` of a source already loaded, without a cache (blocking): for
    callers that run a whole image's work in one thread of their own."""
    try:
        return _prepare_sync(source, settings)
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
    rgb, oriented, skill_size, segment_size, facts = _decode_for_upload(source, settings)
    skill_url = _jpeg_data_url(_resized(rgb, skill_size, split=True), settings)
    segment: str | Future[str]
    if segment_size == skill_size:
        segment = skill_url
    elif _BACKGROUND_SLOTS.acquire(blocking=False):
        segment = _ENCODER.submit(_encode_in_background, rgb, segment_size, settings)
    else:  # the encoder is busy: encode here, so pending work (and memory) stays bounded
        segment = _jpeg_data_url(_resized(rgb, segment_size), settings)
    return PreparedImage(
        data_url=skill_url,
        width=oriented[0],
        height=oriented[1],
        upload_width=skill_size[0],
        upload_height=skill_size[1],
        segment_upload_width=segment_size[0],
        segment_upload_height=segment_size[1],
        _segment=segment,
        _source=facts,
    )
