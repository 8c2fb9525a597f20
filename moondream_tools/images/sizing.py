"""Moondream's tiling rule and the upload sizes derived from it.

The model covers an image with overlapping 378 px crops (at most 12), resized to fit
that grid exactly; :func:`model_working_size` is the size it works at, and
:func:`upload_sizes` the smallest uploads from which it loses nothing. Pure arithmetic:
a feature that cuts an image into the model's crops reuses :func:`_select_tiling`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .settings import ImageSettings

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
    raised until it does not). The segment size caps the long side (it is the skill size
    when ``settings.segment_upload`` is False). Neither upscales.

    >>> from moondream_tools.images import ImageSettings
    >>> upload_sizes(4000, 3000, ImageSettings())
    ((1176, 882), (2000, 1500))
    >>> upload_sizes(640, 480, ImageSettings())
    ((640, 480), (640, 480))
    >>> upload_sizes(4000, 3000, ImageSettings(segment_upload=False))
    ((1176, 882), (1176, 882))
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
    if not settings.segment_upload:
        segment = skill
    elif settings.segment_max_side is None:
        segment = (width, height)
    else:
        segment = scaled(settings.segment_max_side / max(width, height))
    if segment[0] < skill[0]:  # segmentation never gets less than the other skills
        segment = skill
    return skill, segment
