"""Mask images as services send them -> binary masks, or an error saying what arrived."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..errors import ResponseError
from ..geometry import binary_mask

__all__ = ["decode_mask"]


def decode_mask(data: bytes, what: str, request_id: str | None, *, max_pixels: int) -> Image.Image:
    """A mask image's bytes -> a binary mask (mode "L", 0/255), or a :class:`ResponseError`
    that says what arrived instead (not an image; a colour picture, not a mask; a mask over
    ``max_pixels``, refused before it is decoded)."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ResponseError(
                f"{what}: the mask is {width}x{height} pixels, over the limit of {max_pixels}", request_id=request_id
            )
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ResponseError(
            f"{what}: the mask is not an image ({len(data)} bytes: {type(exc).__name__})", request_id=request_id
        ) from None
    try:
        return binary_mask(image)
    except ValueError as exc:
        raise ResponseError(f"{what}: {exc}", request_id=request_id) from None
