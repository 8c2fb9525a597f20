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

Modules (everything public is re-exported here; import from ``moondream_tools.images``):

- :mod:`.settings`: :data:`ImageInput`, the ``DEFAULT_*`` limits, :class:`ImageSettings`
  and :class:`PreparedImage`;
- :mod:`.sizing`: the model's tiling rule (``MODEL_*`` constants,
  :func:`model_working_size`) and :func:`upload_sizes`;
- :mod:`.sources`: :class:`ReferenceKind`, :func:`reference_kind`, :func:`sniff_image`,
  reading files (:func:`read_image_file`), data and file URLs, downloads
  (:func:`read_response_capped`), numpy arrays and file objects;
- :mod:`.decode`: opening with limits, EXIF orientation, RGB conversion, JPEG draft,
  :func:`decode_image`, resizing and JPEG encoding on the encoder threads;
- :mod:`.cache`: :class:`ImageCache` and its keys;
- :mod:`.prepare`: :func:`prepare_image` and the background segment encoding.
"""

from __future__ import annotations

from .cache import ImageCache
from .decode import decode_image
from .prepare import prepare_image
from .settings import ImageInput, ImageSettings, PreparedImage
from .sizing import model_working_size, upload_sizes
from .sources import ReferenceKind, read_image_file, read_response_capped, reference_kind, sniff_image

# Constants importable from here as before (policy.py uses DEFAULT_FORMATS), not in __all__.
from .settings import DEFAULT_FORMATS, DEFAULT_MAX_BYTES, DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS  # noqa: F401
from .sizing import MODEL_CROP_MARGIN, MODEL_CROP_SIZE, MODEL_MAX_CROPS  # noqa: F401

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
