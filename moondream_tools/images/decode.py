"""Decoding with limits (formats, frames, pixels), EXIF orientation, conversion to RGB,
JPEG draft scaling, resizing and JPEG encoding, on the encoder thread pool."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from .settings import ImageSettings, SourceFacts
from .sizing import upload_sizes

#: Worker threads for resizing and encoding (Pillow releases the GIL while it works).
_ENCODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moondream-encode")


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
    frames = _frame_count(img)
    if frames > settings.max_frames:
        raise ImageError(f"image has {frames} frames, over the limit of {settings.max_frames}")
    return img


def _frame_count(img: Image.Image) -> int:
    try:
        return int(getattr(img, "n_frames", 1)) if getattr(img, "is_animated", False) else 1
    except Exception as exc:
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None


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


def upright_size(source: bytes | Image.Image, settings: ImageSettings) -> tuple[int, int]:
    """The upright size of an image from its header (EXIF orientation applied), under
    ``settings``' limits, without decoding its pixels (blocking; raises
    :class:`~moondream_tools.ImageError`)."""
    img = _open_checked(source, settings) if isinstance(source, bytes) else source
    _check_pixels(img, settings)
    try:
        return _oriented_size(img)
    except Exception as exc:  # reading EXIF may read (and fail on) more of a corrupt file
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None


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
) -> tuple[Image.Image, tuple[int, int], tuple[int, int], tuple[int, int], SourceFacts | None]:
    """Decode once, at the larger of the two upload sizes (blocking).

    Returns the upright RGB image, the upright source size, the skill and segment upload
    sizes, and the facts the limits judge of an encoded source (None for a PIL image).
    """
    owned = not isinstance(source, Image.Image)
    img = _open_checked(source, settings) if owned else source  # type: ignore[arg-type]
    facts = None
    if owned:
        kind = "JPEG" if img.format == "MPO" else img.format
        facts = SourceFacts(nbytes=len(source), format=kind, frames=_frame_count(img))  # type: ignore[arg-type]
    _check_pixels(img, settings)
    try:  # reading EXIF may read (and fail on) more of a corrupt file
        oriented_size = _oriented_size(img)
    except Exception as exc:
        raise ImageError(f"cannot read image: {type(exc).__name__}: {exc}") from None
    skill_size, segment_size = upload_sizes(*oriented_size, settings)
    rgb, oriented = _decode(img, owned=owned, min_size=segment_size)
    return rgb, oriented, skill_size, segment_size, facts
