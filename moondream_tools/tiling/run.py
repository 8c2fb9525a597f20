"""Running a plan: reading the image once, preparing each tile once, asking, assembling."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from PIL import Image

from .._transport import Timeout
from ..backend import SamplingSettings, VisionBackend, check_object, check_settings, require_skill
from ..errors import ImageError, MoondreamError
from ..images import ImageInput, ImageSettings, PreparedImage, decode_image, upload_sizes
from ..images.decode import upright_size
from ..images.sources import ReferenceKind, _describe, _load_source, reference_kind
from .assemble import _assemble_boxes, _assemble_points, _untiled
from .plan import DEFAULT_MAX_TILES, TilePlan, TilingMode, Tile, _DEFAULT_CONCURRENCY, plan_tiles
from .reports import TiledDetections, TiledPoints

__all__ = ["TiledImage", "tiled_detect", "tiled_point"]



@dataclass
class _Source:
    """An image read once: what to decode, its upright size, and what to send untiled."""

    data: bytes | Image.Image | PreparedImage
    size: tuple[int, int]
    untiled: ImageInput


async def _read(image: ImageInput, settings: ImageSettings) -> _Source:
    if isinstance(image, PreparedImage):
        return _Source(image, (image.width, image.height), image)
    try:
        if isinstance(image, str) and reference_kind(image) is ReferenceKind.URL:
            async with aiohttp.ClientSession() as session:
                data = await _load_source(image, session, settings)
        else:
            data = await _load_source(image, None, settings)
        size = await asyncio.to_thread(upright_size, data, settings)
    except ImageError as exc:
        raise ImageError(f"{_describe(image)}: {exc}") from None
    # Sent untiled as given, unless reading it again would download it again or find a file
    # object already read: then the bytes read here.
    reread = callable(getattr(image, "read", None)) or (
        isinstance(image, str) and reference_kind(image) is ReferenceKind.URL
    )
    return _Source(data, size, data if reread else image)


def _concurrency(backend: VisionBackend, concurrency: int | None, tiles: int) -> int:
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        return concurrency
    if hasattr(backend, "max_concurrency"):
        limit = backend.max_concurrency
        return max(1, tiles) if limit is None else int(limit)  # None: the backend sets no limit
    return _DEFAULT_CONCURRENCY


def _tile_settings(settings: SamplingSettings | None, max_objects: int | None) -> tuple[dict[str, Any] | None, int | None]:
    values = check_settings(settings)
    if max_objects is not None:
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise ValueError(f"max_objects must be a positive integer, got {max_objects!r}")
        values = {**(values or {}), "max_objects": max_objects}
    limit = values.get("max_objects") if values else None
    return values, limit if isinstance(limit, int) else None


class TiledImage:
    """An image ready to be asked about tile by tile: read and decoded once, each tile cropped
    and prepared once, then any number of phrases and skills (``detect``, ``point``), all
    sharing one bound on requests in flight.

    Open it with :meth:`open`; :func:`tiled_detect` and :func:`tiled_point` are one-phrase
    shortcuts. When the plan is one request the image is sent as is (no decode here).

    Example::

        tiled = await TiledImage.open(md, "field.jpg", max_tiles=16)
        cars, people = await asyncio.gather(tiled.point("car"), tiled.point("person"))
        print(tiled.plan.requests, len(cars.points), len(people.points))
    """

    def __init__(
        self, backend: VisionBackend, image: ImageInput, source: _Source, plan: TilePlan,
        rgb: Image.Image | None, concurrency: int, settings: ImageSettings,
    ) -> None:
        self.backend = backend
        self.plan = plan
        self._image = image
        self._source = source
        self._rgb = rgb
        self._sending = asyncio.Semaphore(concurrency)
        self._preparing = asyncio.Semaphore(max(1, min(concurrency, os.cpu_count() or 1)))
        self._locks = [asyncio.Lock() for _ in plan.tiles]
        self._prepared: list[PreparedImage | None] = [None] * len(plan.tiles)
        # Tiles are only detected and pointed in: no segmentation upload to encode.
        self._tile_settings = dataclasses.replace(settings, segment_upload=False)

    @classmethod
    async def open(
        cls,
        backend: VisionBackend,
        image: ImageInput,
        *,
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        concurrency: int | None = None,
        image_settings: ImageSettings | None = None,
    ) -> TiledImage:
        """Read ``image`` once (under ``image_settings``' limits, default the backend's), plan
        its tiles, and decode it once, upright, when more than one tile is planned.

        Raises:
            ImageError: the image cannot be read or is over the limits.
            ValueError: bad options, or a PreparedImage (downscaled already) that needs tiles.
        """
        settings = image_settings or backend.image_settings
        source = await _read(image, settings)
        plan = plan_tiles(*source.size, tiling=tiling, max_tiles=max_tiles)
        limit = _concurrency(backend, concurrency, plan.requests)
        if plan.requests == 1:
            return cls(backend, image, source, plan, None, limit, settings)
        if isinstance(source.data, PreparedImage):
            raise ValueError(
                "a PreparedImage holds only the downscaled upload: pass the original image to tile it"
                f" (this {plan.width}x{plan.height} image plans {plan.requests} tiles), or tiling='never'"
            )
        try:
            rgb, upright = await asyncio.to_thread(decode_image, source.data, settings)
        except ImageError as exc:
            raise ImageError(f"{_describe(image)}: {exc}") from None
        if upright != source.size:  # pragma: no cover - the header and the decoder agree
            raise ImageError(f"{_describe(image)}: decoded as {upright}, its header said {source.size}")
        return cls(backend, image, source, plan, rgb, limit, settings)

    async def detect(
        self, object: str, *, max_objects: int | None = None, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> TiledDetections:
        """Boxes of every ``object``, each once (see :func:`tiled_detect`)."""
        result = await self._ask("detect", object, max_objects, settings, timeout, max_retries)
        assert isinstance(result, TiledDetections)
        return result

    async def point(
        self, object: str, *, max_objects: int | None = None, settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None, max_retries: int | None = None,
    ) -> TiledPoints:
        """A point on every ``object``, each once (see :func:`tiled_point`)."""
        result = await self._ask("point", object, max_objects, settings, timeout, max_retries)
        assert isinstance(result, TiledPoints)
        return result

    async def _tile(self, tile: Tile) -> PreparedImage:
        """The tile, cut, shrunk and prepared on first use (one CPU's worth at a time, so the
        first requests leave while later tiles are encoded)."""
        async with self._locks[tile.index]:
            prepared = self._prepared[tile.index]
            if prepared is None:
                assert self._rgb is not None
                # Cut and shrunk to its upload size in one step (no full-size copy of the tile).
                size, _ = upload_sizes(tile.width, tile.height, self._tile_settings)
                async with self._preparing:
                    upload = await asyncio.to_thread(self._rgb.resize, size, Image.Resampling.BOX, tile.box)
                    prepared = self._prepared[tile.index] = await self.backend.prepare(
                        upload, settings=self._tile_settings
                    )
            return prepared

    async def _ask(
        self, skill: Literal["detect", "point"], object: str, max_objects: int | None,
        settings: SamplingSettings | None, timeout: float | Timeout | None, max_retries: int | None,
    ) -> TiledDetections | TiledPoints:
        check_object(object)
        require_skill(self.backend, skill)
        values, limit = _tile_settings(settings, max_objects)
        method = self.backend.detect if skill == "detect" else self.backend.point

        async def ask(img: ImageInput) -> Any:
            return await method(img, object, settings=values, timeout=timeout, max_retries=max_retries)  # type: ignore[arg-type]

        if self.plan.requests == 1:
            async with self._sending:
                return _untiled(skill, await ask(self._source.untiled), self.plan, limit)

        async def one(tile: Tile) -> Any:
            try:
                prepared = await self._tile(tile)
                async with self._sending:
                    return await ask(prepared)
            except MoondreamError as error:
                return error

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(tile)) for tile in self.plan.tiles]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        answers = [task.result() for task in tasks]
        errors = [answer for answer in answers if isinstance(answer, MoondreamError)]
        if len(errors) == len(answers):
            raise errors[0]
        if skill == "detect":
            return _assemble_boxes(self.plan, answers, object, limit)
        return _assemble_points(self.plan, answers, object, limit)


async def _tiled(
    skill: Literal["detect", "point"],
    backend: VisionBackend,
    image: ImageInput,
    object: str,
    *,
    tiling: TilingMode | tuple[int, int],
    max_tiles: int,
    max_objects: int | None,
    concurrency: int | None,
    settings: SamplingSettings | None,
    timeout: float | Timeout | None,
    max_retries: int | None,
    image_settings: ImageSettings | None,
) -> TiledDetections | TiledPoints:
    check_object(object)
    require_skill(backend, skill)
    _tile_settings(settings, max_objects)  # refuse bad options before reading the image
    tiled = await TiledImage.open(
        backend, image, tiling=tiling, max_tiles=max_tiles, concurrency=concurrency, image_settings=image_settings
    )
    if skill == "detect":
        return await tiled.detect(object, max_objects=max_objects, settings=settings, timeout=timeout, max_retries=max_retries)
    return await tiled.point(object, max_objects=max_objects, settings=settings, timeout=timeout, max_retries=max_retries)


async def tiled_detect(
    backend: VisionBackend,
    image: ImageInput,
    object: str,
    *,
    tiling: TilingMode | tuple[int, int] = "auto",
    max_tiles: int = DEFAULT_MAX_TILES,
    max_objects: int | None = None,
    concurrency: int | None = None,
    settings: SamplingSettings | None = None,
    timeout: float | Timeout | None = None,
    max_retries: int | None = None,
    image_settings: ImageSettings | None = None,
) -> TiledDetections:
    """Boxes of every ``object`` in a big image, tile by tile, each object once.

    The image (any :data:`~moondream_tools.images.ImageInput`) is read and decoded once,
    upright (EXIF applied) and under ``backend.image_settings``' limits; every tile of
    :func:`plan_tiles` is cropped from it, prepared once (``backend.prepare``) and sent as
    ``backend.detect(tile, object, settings={"max_objects": max_objects, ...})``, at most
    ``concurrency`` at a time (default: the backend's ``max_concurrency``, else 8). Boxes come
    back in pixels of the whole image; ownership by core and merging across tiles (module
    docstring) count every object no larger than half the overlap exactly once.

    Cost: :attr:`TilePlan.requests` requests; with ``"auto"`` and ``max_tiles=16``, 1 for a
    4000 x 3000 photo, 15 for 6000 x 4000, 16 for 8000 x 6000. When one request is planned
    the image is sent as is: the result equals ``backend.detect(image, object, ...)``'s.

    Args:
        tiling: ``"auto"`` (tile when the model would shrink the image more than 4x),
            ``"always"``, ``"never"`` or a ``(rows, cols)`` grid.
        max_tiles: the most tiles (requests) the plan may use; tiles grow to respect it.
        max_objects: sent to every tile; a tile answering that many is reported ``capped``.
        concurrency: tiles prepared and requests in flight at once.
        settings, timeout, max_retries: as for ``backend.detect``, for every tile.
        image_settings: the limits the image is read under (default the backend's), e.g.
            an :class:`~moondream_tools.ImagePolicy`'s for an image a model named.

    Returns:
        A :class:`TiledDetections` (a ``Detections``) with ``tiles``, ``capped``,
        ``provenance`` and ``failed``. A tile whose request fails with a
        :class:`~moondream_tools.MoondreamError` is reported in ``failed`` (its region and the
        error) and the other tiles' boxes are kept.

    Raises:
        MoondreamError: the first tile's error when every tile failed; ImageError for an
            image that cannot be read; UnsupportedSkillError without ``detect``.
        ValueError: bad options, or a PreparedImage (downscaled already) that needs tiles.
    """
    result = await _tiled(
        "detect", backend, image, object, tiling=tiling, max_tiles=max_tiles, max_objects=max_objects,
        concurrency=concurrency, settings=settings, timeout=timeout, max_retries=max_retries,
        image_settings=image_settings,
    )
    assert isinstance(result, TiledDetections)
    return result


async def tiled_point(
    backend: VisionBackend,
    image: ImageInput,
    object: str,
    *,
    tiling: TilingMode | tuple[int, int] = "auto",
    max_tiles: int = DEFAULT_MAX_TILES,
    max_objects: int | None = None,
    concurrency: int | None = None,
    settings: SamplingSettings | None = None,
    timeout: float | Timeout | None = None,
    max_retries: int | None = None,
    image_settings: ImageSettings | None = None,
) -> TiledPoints:
    """A point on every ``object`` in a big image, tile by tile, each object once.

    Works as :func:`tiled_detect` (same arguments, same cost, one decode of the image), with
    ``backend.point`` on each tile: points outside their tile's core are dropped, and points
    of two tiles closer than :attr:`TilePlan.patch` px (one model patch) are merged into
    their mean. Counting a crowd::

        people = await tiled_point(md, "crowd.jpg", "person", max_objects=200)
        print(len(people.points), "at least" if people.capped else "exactly")

    Returns:
        A :class:`TiledPoints` (a ``Points``) with ``tiles``, ``capped``, ``provenance``
        and ``failed``.
    """
    result = await _tiled(
        "point", backend, image, object, tiling=tiling, max_tiles=max_tiles, max_objects=max_objects,
        concurrency=concurrency, settings=settings, timeout=timeout, max_retries=max_retries,
        image_settings=image_settings,
    )
    assert isinstance(result, TiledPoints)
    return result
