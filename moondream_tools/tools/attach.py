"""Images users attach to a conversation: untrusted bytes or URLs -> a handle in the store.

Chat frameworks put a user's photo into the message as an image block (base64 data, a data
URL or an http(s) URL). A text-only model cannot take it; :meth:`VisionTools.attach` stores
it and gives a short placeholder to put in its place, naming the handle the agent passes to
the tools: ``[image img_3fa2c1d0: 1280x853 px]``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import ImageError, MoondreamError
from ..images import ImageSettings, ReferenceKind, reference_kind
from ..images.decode import upright_size
from ..images.sources import _decode_data_url, read_image_file

__all__ = ["AttachedImage"]


@dataclass(frozen=True)
class AttachedImage:
    """What became of one attached image.

    Attributes:
        handle: the handle the tools take (derived from the image's content), or None when
            the image could not be used.
        width, height: its upright size in pixels.
        error: why it could not be used (None when it was stored).

    >>> AttachedImage("img_3fa2c1d0", 1280, 853).placeholder
    '[image img_3fa2c1d0: 1280x853 px]'
    >>> AttachedImage(None, None, None, "not an image").placeholder
    '[image could not be used: not an image]'
    """

    handle: str | None
    width: int | None
    height: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def placeholder(self) -> str:
        """The text that stands for the image in the conversation."""
        if self.error is not None:
            return f"[image could not be used: {self.error}]"
        return f"[image {self.handle}: {self.width}x{self.height} px]"


async def read_attachment(
    source: bytes | str | os.PathLike[str], settings: ImageSettings,
    fetch: Callable[[str], Awaitable[bytes]], resolve_path: Callable[[str], Awaitable[object]],
) -> tuple[bytes, tuple[int, int]]:
    """The bytes and upright size of an attached image: ``fetch`` downloads http(s) URLs and
    ``resolve_path`` checks paths and ``file:`` URLs, both under the policy."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > settings.max_bytes:
            raise ImageError(f"the image is {len(data)} bytes, over the limit of {settings.max_bytes} bytes")
    elif isinstance(source, (str, os.PathLike)):
        reference = os.fspath(source)
        kind = reference_kind(reference)
        if kind is ReferenceKind.DATA_URL:
            data = _decode_data_url(reference, settings)
        elif kind is ReferenceKind.URL:
            data = await fetch(reference)
        elif kind in (ReferenceKind.PATH, ReferenceKind.FILE_URL):
            resolved = await resolve_path(reference)  # ImageAccessError outside allowed_dirs
            data = await asyncio.to_thread(read_image_file, os.fspath(resolved), settings)  # type: ignore[arg-type]
        else:  # pragma: no cover - every kind is handled above
            raise ImageError("an attached image must be its bytes, a path or a data: or http(s) URL")
    else:
        raise ImageError(f"an attached image must be bytes, a path or a URL, not {type(source).__name__}")
    size = await asyncio.to_thread(upright_size, data, settings)
    return data, size


def failed(error: MoondreamError) -> AttachedImage:
    return AttachedImage(None, None, None, str(error))
