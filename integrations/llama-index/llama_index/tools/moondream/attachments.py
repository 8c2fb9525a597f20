"""Images users send in LlamaIndex chat messages -> handles a text-only agent can pass on.

A user's photo arrives as an :class:`~llama_index.core.base.llms.types.ImageBlock` inside a
``ChatMessage``. A text-only model cannot take it, and memory that keeps it keeps megabytes
of base64 per turn. :func:`aattach_message` stores each image in the tools' image store (the
same one :class:`~llama_index.tools.moondream.MoondreamToolSpec` resolves handles from) and
puts a short placeholder in its place, naming the handle the agent passes to the tools::

    [image img_3fa2c1d0: 1280x853 px]
    [image could not be used: image URLs are not allowed (...)]

:meth:`MoondreamToolSpec.attach <llama_index.tools.moondream.MoondreamToolSpec.attach>` and
its relatives are the usual way in; the functions here take a
:class:`moondream_tools.VisionTools` directly (e.g. one shared with the LangChain adapter).

Everything in a user message is untrusted. Inline data (``image``, a ``data:`` URL) is held to
the :class:`moondream_tools.ImagePolicy`'s byte and pixel limits; an ``http(s)`` URL is
downloaded only under the policy (``ImagePolicy(allow_urls=True)``, public addresses only); a
``path`` (or ``file:`` URL) is read only when it lies inside the policy's ``allowed_dirs``
(:meth:`ImagePolicy.resolve`) - never through ``ImageBlock.resolve_image()``, which would read
any file or fetch any URL it names.
"""

from __future__ import annotations

import asyncio
import os
from io import IOBase
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.utils import resolve_binary

from moondream_tools import AttachedImage, ImageError, ImageSettings, MoondreamError, VisionTools
from moondream_tools.images import ReferenceKind, reference_kind

__all__ = ["aattach_block", "aattach_message"]

#: The legacy ``additional_kwargs`` key whose ImageDocuments ``ChatMessage`` turns into image
#: blocks whenever it is validated; dropped from a rewritten message (its images are now
#: placeholders in ``blocks``), or they would come back when the message is rebuilt.
_LEGACY_IMAGES_KEY = "images"


async def aattach_block(vision: VisionTools, block: ImageBlock) -> AttachedImage:
    """Store the image of one ``ImageBlock`` and return what became of it.

    The block's source is taken in ``ImageBlock``'s own order: ``image`` (raw or
    base64-encoded bytes, or a binary file object), then ``path``, then ``url`` (``data:``,
    ``http(s)`` or ``file:``). Paths and URLs are opened only as ``vision.policy`` allows (see
    the module docstring); a relative ``path`` means what it meant to the block, relative to
    the working directory, and must still lie inside ``allowed_dirs``.

    Never raises for a bad image: the :class:`moondream_tools.AttachedImage` then has
    ``ok == False`` and an ``error`` saying why.

    Example::

        attached = await aattach_block(spec.vision, ImageBlock(image=jpeg_bytes))
        attached.handle, attached.placeholder   # 'img_3fa2c1d0', '[image img_3fa2c1d0: 640x480 px]'
    """
    if not isinstance(block, ImageBlock):
        raise TypeError(f"block must be an ImageBlock, got {type(block).__name__}")
    try:
        source = await _block_source(vision, block)
    except MoondreamError as exc:
        return AttachedImage(None, None, None, str(exc))
    return await vision.attach(source)


async def aattach_message(vision: VisionTools, message: ChatMessage) -> tuple[ChatMessage, list[AttachedImage]]:
    """``message`` with every ``ImageBlock`` replaced, in place, by a ``TextBlock`` holding its
    placeholder, and what became of each image (in block order).

    The rewritten message is a copy with the same role and the same ``additional_kwargs``
    (less the legacy ``"images"`` key, whose images are the blocks just replaced); every other
    block is kept as it is, in order. Images cited inside a ``CitableBlock`` or
    ``CitationBlock`` are replaced too. A message without images is returned as is, so
    rewriting a history again is cheap. Never raises for a bad image.

    Example::

        message, attached = await aattach_message(spec.vision, message)
        [a.handle for a in attached]            # ['img_3fa2c1d0']
        message.content                         # 'How many cats?\\n[image img_3fa2c1d0: 640x480 px]'
    """
    if not isinstance(message, ChatMessage):
        raise TypeError(f"message must be a llama_index ChatMessage, got {type(message).__name__}")
    images = [image for block in message.blocks for image in _images_in(block)]
    if not images:
        return message, []
    attached = list(await asyncio.gather(*(aattach_block(vision, image) for image in images)))
    placeholders = {id(image): result.placeholder for image, result in zip(images, attached, strict=True)}
    blocks = [_replaced(block, placeholders) for block in message.blocks]
    kwargs = {k: v for k, v in message.additional_kwargs.items() if k != _LEGACY_IMAGES_KEY}
    return message.model_copy(update={"blocks": blocks, "additional_kwargs": kwargs}), attached


# ---------------------------------------------------------------- internals


# Blocks that nest content (llama-index-core 0.14): a CitableBlock's ``content`` list and a
# CitationBlock's ``cited_content`` may hold an ImageBlock. Recognised by their block_type,
# so older llama-index-core versions without them work too.
_NESTED_LIST = {"citable": "content"}
_NESTED_ONE = {"citation": "cited_content"}


def _images_in(block: Any) -> list[ImageBlock]:
    if isinstance(block, ImageBlock):
        return [block]
    kind = getattr(block, "block_type", None)
    if kind in _NESTED_LIST:
        return [b for b in getattr(block, _NESTED_LIST[kind]) if isinstance(b, ImageBlock)]
    if kind in _NESTED_ONE and isinstance(getattr(block, _NESTED_ONE[kind]), ImageBlock):
        return [getattr(block, _NESTED_ONE[kind])]
    return []


def _replaced(block: Any, placeholders: dict[int, str]) -> Any:
    if isinstance(block, ImageBlock):
        return TextBlock(text=placeholders[id(block)])
    if not _images_in(block):
        return block
    kind = block.block_type
    if kind in _NESTED_LIST:
        field = _NESTED_LIST[kind]
        return block.model_copy(update={field: [_replaced(b, placeholders) for b in getattr(block, field)]})
    field = _NESTED_ONE[kind]
    return block.model_copy(update={field: _replaced(getattr(block, field), placeholders)})


async def _block_source(vision: VisionTools, block: ImageBlock) -> bytes | str:
    """What to hand :meth:`VisionTools.attach`, which reads paths and ``file:`` URLs only
    inside the policy's ``allowed_dirs`` and decodes or downloads URLs under it. Raises
    :class:`MoondreamError`."""
    settings = vision.policy.image_settings(vision.backend.image_settings)
    if block.image is not None:
        return _inline_bytes(block.image, settings)
    if block.path is not None:
        return os.path.abspath(block.path)  # as the block's own check resolved it
    if block.url is not None:
        url = str(block.url)
        if reference_kind(url) is not ReferenceKind.PATH:
            return url
        scheme = url.partition(":")[0][:20]
        raise ImageError(f"an image URL must be http(s), data: or file:, not {scheme!r}")
    raise ImageError("the image block holds no image (no image data, path or url)")


def _inline_bytes(image: bytes | IOBase, settings: ImageSettings) -> bytes:
    """The encoded image inside ``ImageBlock.image`` (raw or base64 bytes, or a binary file
    object), read no further than the base64 form of the policy's byte limit."""
    cap = (settings.max_bytes + 2) // 3 * 4  # the base64 length of max_bytes bytes
    raw: object = image
    if isinstance(image, IOBase):
        try:
            if image.seekable():
                image.seek(0)  # as ImageBlock does before reading
            raw = image.read(cap + 1)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot read the image data: {exc}") from None
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ImageError(f"image data must be bytes (a binary file object), not {type(raw).__name__}")
    if len(raw) > cap:
        raise ImageError(f"the image data is over the limit of {settings.max_bytes} bytes")
    return resolve_binary(raw_bytes=bytes(raw)).read()  # base64 is decoded, raw bytes kept
