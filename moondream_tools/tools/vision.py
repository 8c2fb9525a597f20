""":class:`VisionTools`: the four tools over any vision backend, with an image registry and policy."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from .._concurrency import map_concurrently
from .._transport import run_sync
from ..backend import CaptionLength, VisionBackend, backend_name, require_skill
from ..errors import ImageAccessError, ImageError, MoondreamError, ToolArgumentsError, UnsupportedSkillError
from ..geometry import pixels_to_box, pixels_to_point
from ..image_store import ImageStore, check_handle
from .attach import AttachedImage, read_attachment
from .attach import failed as attach_failed
from ..images import ImageInput, ImageSettings, PreparedImage, ReferenceKind, reference_kind
from ..policy import ImagePolicy
from ..render import annotate_png
from ..results import Answer, Caption, Detections, ImageSize, Points, Reasoning
from ..tiling import DEFAULT_MAX_TILES, TiledImage, TilingMode, plan_tiles
from .specs import TOOL_SPECS
from .texts import (
    CountResult,
    DescribeResult,
    LocateResult,
    SegmentResult,
    ToolResult,
    VideoTimeline,
    _count_text,
    _describe_several_text,
    _describe_text,
    _locate_text,
    _moment,
    _segment_text,
    _timeline_text,
)
from .videos import RegisteredVideo, check_video, timeline_of

DEFAULT_MAX_OBJECTS = 250


#: The options :meth:`VisionTools.from_options` (and so every adapter) accepts.
VISION_OPTIONS = (
    "backend", "segment_backend", "image_policy", "return_images", "max_objects", "tiling", "max_tiles",
    "image_store",
)


class VisionTools:
    """The four vision tools over any vision backend, with an image registry and policy.

    Args:
        backend: the :class:`~moondream_tools.VisionBackend` to use (e.g.
            :class:`~moondream_tools.AsyncMoondream`); None creates an ``AsyncMoondream``
            from the environment (``MOONDREAM_API_KEY`` / ``MOONDREAM_BASE_URL``) owned and
            closed by these tools.
        segment_backend: another backend for ``segment_object`` (e.g. a SAM 3 backend);
            None segments with ``backend``. The tools never close it.
        image_policy: the :class:`ImagePolicy` for image references written by a model
            (default: registered handles only).
        return_images: add an annotated PNG of each result (``annotated_png``), for
            multimodal models. Off by default: several providers reject images in tool results.
        max_objects: the limit sent to the backend when counting and locating (per tile
            when tiled).
        tiling: ``"auto"`` (default), ``"always"``, ``"never"`` or a ``(rows, cols)`` grid:
            count and locate over overlapping tiles, exact across tile borders, so small
            objects in large images are not lost (:mod:`moondream_tools.tiling`). ``"auto"``
            tiles only images whose long side is more than 4x what the model works at (a
            6000 x 4000 photo: 15 requests a phrase; a 4000 x 3000 one: 1).
        max_tiles: the most tiles, so requests, one phrase may cost (default 16).

    Methods return a :class:`ToolResult` and raise :class:`MoondreamError` on failure;
    :meth:`run` and :meth:`run_sync` take a tool name and model-written arguments, as the
    framework adapters do. A tool whose skill the backend lacks raises
    :class:`~moondream_tools.UnsupportedSkillError`.

    Example::

        tools = VisionTools(AsyncMoondream())
        tools.add_image("receipt.jpg", name="receipt")
        print((await tools.describe("receipt", question="What is the total?")).text)
    """

    def __init__(
        self,
        backend: VisionBackend | None = None,
        *,
        segment_backend: VisionBackend | None = None,
        image_policy: ImagePolicy | None = None,
        return_images: bool = False,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        tiling: TilingMode | tuple[int, int] = "auto",
        max_tiles: int = DEFAULT_MAX_TILES,
        image_store: ImageStore | None = None,
    ) -> None:
        if image_store is not None and not isinstance(image_store, ImageStore):
            raise TypeError(f"image_store must be an ImageStore, got {type(image_store).__name__}")
        for name, value in (("backend", backend), ("segment_backend", segment_backend)):
            if value is not None and not isinstance(value, VisionBackend):
                raise TypeError(
                    f"{name} must be a VisionBackend (e.g. AsyncMoondream()), got {type(value).__name__}"
                )
        if image_policy is not None and not isinstance(image_policy, ImagePolicy):
            raise TypeError(f"image_policy must be an ImagePolicy, got {type(image_policy).__name__}")
        if max_objects < 1:
            raise ValueError("max_objects must be at least 1")
        plan_tiles(1000, 1000, tiling=tiling, max_tiles=max_tiles)  # refuses a bad mode or limit now
        self._owns_backend = backend is None
        if backend is None:
            from ..client import AsyncMoondream  # the default backend, built only when none is given

            backend = AsyncMoondream()
        self.backend: VisionBackend = backend
        self.segment_backend: VisionBackend | None = segment_backend
        self.policy = image_policy if image_policy is not None else ImagePolicy()
        self.return_images = return_images
        self.max_objects = max_objects
        self.tiling = tiling
        self.max_tiles = max_tiles
        self.images = image_store if image_store is not None else ImageStore()
        self._videos: dict[str, RegisteredVideo] = {}

    @classmethod
    def from_options(
        cls, *, vision: VisionTools | None = None, owner: str = "VisionTools", **options: Any
    ) -> VisionTools:
        """``vision`` as given, or new tools built from ``options``: the one check every
        adapter makes.

        ``options`` are the keywords of :class:`VisionTools` (:data:`VISION_OPTIONS`); a
        None value counts as not given. Giving ``vision`` and an option is a ``ValueError``;
        an unknown option a ``TypeError`` naming ``owner`` and the accepted ones.

        Example::

            shared = VisionTools.from_options(backend=md, image_policy=policy)
            assert VisionTools.from_options(vision=shared) is shared
        """
        unknown = [name for name in options if name not in VISION_OPTIONS]
        if unknown:
            raise TypeError(
                f"{owner} got unknown argument(s) {', '.join(map(repr, unknown))};"
                f" accepted: vision, {', '.join(VISION_OPTIONS)}"
            )
        given = {name: value for name, value in options.items() if value is not None}
        if vision is not None:
            if given:
                raise ValueError(f"pass either vision= or {', '.join(name + '=' for name in given)}, not both")
            if not isinstance(vision, VisionTools):
                raise TypeError(f"vision must be a VisionTools, got {type(vision).__name__}")
            return vision
        return cls(**given)

    def __repr__(self) -> str:
        segment = f", segment_backend={self.segment_backend!r}" if self.segment_backend is not None else ""
        return (
            f"VisionTools(backend={self.backend!r}{segment}, image_policy={self.policy!r},"
            f" registered={self.images.names})"
        )

    async def __aenter__(self) -> VisionTools:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the backend if these tools created it."""
        if self._owns_backend:
            await self.backend.aclose()

    # ------------------------------------------------------------ registry

    def add_image(self, image: ImageInput, name: str | None = None) -> str:
        """Register an image under a handle an agent can use; return the handle.

        The application's own images may be any :data:`~moondream_tools.ImageInput`
        (path, bytes, PIL image, numpy array, ...); they are trusted and bypass the policy.
        Default names are ``img_1``, ``img_2``, ...

        Example::

            handle = tools.add_image(pil_image)               # "img_1"
            tools.add_image("scan.png", name="receipt")       # "receipt"
        """
        if name is None:
            name = _free_name("img", self.images.names, {*self.images.names, *self._videos})
        elif name in self._videos:
            raise ValueError(f"{name!r} names a registered video; remove_video({name!r}) first or pick another name")
        return self.images.put(image, name=check_handle(name))

    def add_video(self, video: str | os.PathLike[str] | bytes, name: str | None = None) -> str:
        """Register a video (a local file or its bytes; the application's, so trusted) under
        a handle an agent can use; return the handle (``vid_1``, ``vid_2``, ... by default).

        The tools take ``time`` (seconds) for a video: ``describe_image`` and
        ``segment_object`` look at the frame shown then (and need it); ``count_objects``
        and ``locate_objects`` do too, and without ``time`` sample the whole video and say
        when the object appears (``result.timeline``). Needs the ``video`` extra (PyAV).

        Raises:
            ImageError: not a video PyAV can read.

        Example::

            clip = tools.add_video("dashcam.mp4")                       # "vid_1"
            (await tools.locate(clip, "car")).text                      # when cars appear
            (await tools.describe(clip, "What is the light?", time=12.5)).text
        """
        source = check_video(video)
        if name is None:
            name = _free_name("vid", list(self._videos), {*self.images.names, *self._videos})
        elif name in self.images.names:
            raise ValueError(f"{name!r} names a registered image; remove_image({name!r}) first or pick another name")
        self._videos[check_handle(name)] = RegisteredVideo(source)
        return name

    def remove_video(self, name: str) -> None:
        """Forget a registered video (a ``KeyError`` for a name that is not one)."""
        if name not in self._videos:
            raise KeyError(f"no video is registered as {name!r}; videos: {', '.join(self._videos) or 'none'}")
        del self._videos[name]

    @property
    def video_names(self) -> list[str]:
        """The registered video handles, in registration order."""
        return list(self._videos)

    async def attach(self, source: bytes | str | os.PathLike[str]) -> AttachedImage:
        """Store an image a user attached (its bytes, a ``data:`` URL, an ``http(s)`` URL
        downloaded under the :class:`ImagePolicy`'s rules, or a path or ``file:`` URL read only
        inside the policy's ``allowed_dirs``: a user message is untrusted too) and return its
        handle, derived from its content, with the placeholder to show the
        model instead. An image that cannot be used (not an image, over the policy's limits,
        a URL the policy refuses) gives an :class:`AttachedImage` whose ``error`` says why;
        this never raises for a bad image.

        Example::

            attached = await tools.attach(base64.b64decode(block["base64"]))
            attached.placeholder          # "[image img_3fa2c1d0: 1280x853 px]"
        """
        settings = self.policy.image_settings(self.backend.image_settings)
        try:
            data, (width, height) = await read_attachment(
                source, settings, self._fetch_attachment, self.policy.resolve
            )
        except MoondreamError as exc:
            return attach_failed(exc)
        return AttachedImage(self.images.put(data), width, height)

    async def _fetch_attachment(self, url: str) -> bytes:
        if not self.policy.allow_urls:
            raise ImageAccessError(
                "image URLs are not allowed (ImagePolicy(allow_urls=True) allows them); attach the"
                " image itself instead of a link"
            )
        source = await self.policy.resolve(url)
        assert isinstance(source, bytes)
        return source

    def remove_image(self, name: str) -> None:
        """Forget a registered image."""
        self.images.remove(name)

    @property
    def image_names(self) -> list[str]:
        """The registered handles, in registration order (a view of :attr:`images`)."""
        return self.images.names

    def _unknown_handle(self, reference: str) -> ImageAccessError:
        names = ", ".join([*self.images.names, *self._videos]) or "none"
        also = f" or a path under {self.policy._where()}" if self.policy.allowed_dirs else ""
        return ImageAccessError(f"image {reference!r} is not registered; registered: {names}{also}")

    async def _resolve(self, reference: str, time: float | None = None) -> PreparedImage:
        return (await self._open(reference, time))[1]

    def _video(self, reference: str) -> RegisteredVideo | None:
        return self._videos.get(reference.strip()) if isinstance(reference, str) else None

    async def _open(self, reference: str, time: float | None = None) -> tuple[ImageInput, PreparedImage, ImageSettings]:
        """One pass down: registry or policy -> a trusted source -> the backend prepares it.

        Returns the trusted source (what tiling crops from), the prepared image, and the
        image settings it was read under (the policy's limits for a model-named image).
        A video handle with ``time`` gives the frame shown then.
        """
        if not isinstance(reference, str) or not reference.strip():
            raise ImageAccessError("image must be a non-empty string naming an image")
        reference = reference.strip()
        video = self._videos.get(reference)
        if video is not None:
            if time is None:
                info = await video.info()
                raise ToolArgumentsError(
                    f"{reference} is a video ({info.duration:.1f} s): give time= (seconds from its start) to look at"
                    " one moment, or call count_objects / locate_objects without time to find when something appears"
                )
            frame = await video.frame(reference, time)
            return frame, await self.backend.prepare(frame), self.backend.image_settings
        if time is not None:
            raise ToolArgumentsError(f"time is for videos; {reference!r} is an image (leave time empty)")
        source = self.images.get(reference)  # ImageAccessError when it was evicted
        if source is not None:
            return source, await self.backend.prepare(source), self.backend.image_settings
        try:
            source = await self.policy.resolve(reference)
        except ImageError as exc:
            if reference_kind(reference) is not ReferenceKind.PATH:
                raise
            if "/" not in reference and "\\" not in reference and "." not in reference:
                raise self._unknown_handle(reference) from None
            names = ", ".join(self.images.names) or "none"
            raise type(exc)(f"{exc}; registered images: {names}") from None
        settings = self.policy.image_settings(self.backend.image_settings)
        return source, await self.backend.prepare(source, settings=settings), settings

    async def _annotate(self, prepared: PreparedImage, *results: Any) -> bytes | None:
        if not self.return_images:
            return None
        jpeg = base64.b64decode(prepared.data_url.partition(",")[2])
        return await asyncio.to_thread(annotate_png, jpeg, *results)

    # ------------------------------------------------------------ the four tools

    async def describe(
        self,
        image: str,
        question: str | None = None,
        *,
        length: CaptionLength = "normal",
        reasoning: bool = False,
        more_images: Sequence[str] | None = None,
        time: float | None = None,
    ) -> DescribeResult:
        """``describe_image``: a caption, or the answer to ``question`` (with reasoning).
        ``time``: for a video handle, the moment to look at (seconds; needed for videos).

        With ``more_images`` (up to 3 further handles), one question about all the images at
        once goes to the backend's chat endpoint (each image prepared once, at the skill
        size); a backend without one raises :class:`~moondream_tools.UnsupportedSkillError`.

        Example::

            result = await tools.describe("img_1", question="What color is the car?")
            print(result.text)   # img_1 (1280x853 px): Red.
            diff = await tools.describe("before", question="What changed?", more_images=["after"])
        """
        if more_images:
            if time is not None:
                raise ToolArgumentsError("time is for one video moment; ask about several images without time")
            return await self._describe_several(image, question, list(more_images), reasoning)
        asks = (question is not None and bool(question.strip())) or reasoning
        require_skill(self.backend, "query" if asks else "caption")
        prepared = await self._resolve(image, time)
        caption: Caption | None = None
        answer: Answer | None = None
        if question is not None and question.strip():
            answer = await self.backend.query(prepared, question, reasoning=reasoning)
        elif reasoning:
            answer = await self.backend.query(prepared, "Describe this image.", reasoning=True)
        else:
            caption = await self.backend.caption(prepared, length=length)
        png = None
        if answer is not None and answer.reasoning is not None and answer.reasoning.grounding:
            grounded = Points(
                points=[p for span in answer.reasoning.grounding for p in span.points],
                image_size=prepared.size,
                object="grounding",
            )
            png = await self._annotate(prepared, grounded)
        return DescribeResult(
            tool="describe_image",
            image=image,
            image_size=prepared.size,
            time=time,
            text=_describe_text(_moment(image, time), prepared.size, caption, answer),
            caption=caption,
            answer=answer,
            annotated_png=png,
        )

    async def _describe_several(
        self, image: str, question: str | None, more: list[str], reasoning: bool
    ) -> DescribeResult:
        if question is None or not question.strip():
            raise ToolArgumentsError("more_images needs a question about the images, e.g. 'What changed?'")
        if len(more) > 3:
            raise ToolArgumentsError(f"more_images takes at most 3 images, got {len(more)}")
        require_skill(self.backend, "chat")
        names = [image, *more]
        prepared = [await self._resolve(name) for name in names]  # a video without time: its error
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": p.data_url}} for p in prepared
        ]
        content.append({"type": "text", "text": question})
        chat = getattr(self.backend, "chat")
        result = await chat([{"role": "user", "content": content}], reasoning=True if reasoning else None)
        answer = Answer(
            answer=result.content,
            reasoning=Reasoning(text=result.reasoning) if result.reasoning else None,
            request_id=result.request_id,
            image_size=prepared[0].size,
            usage=result.usage,
        )
        return DescribeResult(
            tool="describe_image",
            image=image,
            image_size=prepared[0].size,
            text=_describe_several_text(names, [p.size for p in prepared], answer),
            answer=answer,
            more_images=more,
            more_image_sizes=[p.size for p in prepared[1:]],
        )

    async def count(
        self, image: str, object: str, *, more_objects: Sequence[str] | None = None, time: float | None = None
    ) -> CountResult:
        """``count_objects``: count ``object`` (and any ``more_objects``) with the point skill.

        Each phrase is one request, all at once, on one prepared image; the result for
        ``object`` carries the others in ``more`` and a text with one line per phrase. On a
        video handle: the frame at ``time``, or without it a pass over the whole video
        (``result.timeline``: when each phrase appears; the count at its busiest moment).

        Example::

            result = await tools.count("img_1", "person")
            print(result.count, result.capped, result.text)
            both = await tools.count("img_1", "car", more_objects=["person"])
            print(both.count, both.more[0].count)
        """
        require_skill(self.backend, "point")
        phrases = _phrases(object, more_objects)
        video = self._video(image)
        if video is not None and time is None:
            results = await _each(phrases, lambda phrase: self._count_video(image, video, phrase))
            return _grouped(results, None)
        tiled, prepared = await self._tiles(image, time)
        results = await _each(phrases, lambda phrase: self._count_one(image, phrase, tiled, prepared, time))
        png = await self._annotate(prepared, *(r.points for r in results))
        return _grouped(results, png)

    async def _tiles(self, image: str, time: float | None = None) -> tuple[TiledImage | None, PreparedImage]:
        """The prepared image, and the image cut into tiles when it is large enough to tile
        (read once, under the same limits, for every phrase of the call)."""
        source, prepared, settings = await self._open(image, time)
        plan = plan_tiles(prepared.width, prepared.height, tiling=self.tiling, max_tiles=self.max_tiles)
        if plan.requests == 1 or isinstance(source, PreparedImage):  # a PreparedImage is the upload only
            return None, prepared
        tiled = await TiledImage.open(
            self.backend, source, tiling=self.tiling, max_tiles=self.max_tiles, image_settings=settings
        )
        return tiled, prepared

    async def _count_one(
        self, image: str, object: str, tiled: TiledImage | None, prepared: PreparedImage, time: float | None
    ) -> CountResult:
        points: Points
        if tiled is not None:
            points = await tiled.point(object, max_objects=self.max_objects)
            capped = points.capped
        else:
            points = await self.backend.point(prepared, object, settings={"max_objects": self.max_objects})
            capped = len(points.points) >= self.max_objects
        return self._count_result(image, object, points, capped, prepared.size, time)

    def _count_result(
        self, image: str, object: str, points: Points, capped: bool, size: ImageSize, time: float | None
    ) -> CountResult:
        return CountResult(
            tool="count_objects",
            image=image,
            image_size=size,
            time=time,
            text=_count_text(_moment(image, time), object, points, capped, self.max_objects),
            object=object,
            count=len(points.points),
            capped=capped,
            points=points,
        )

    async def _count_video(self, image: str, video: RegisteredVideo, object: str) -> CountResult:
        timeline, peak = await timeline_of(self.backend, video, "point", object, self.max_objects)
        assert isinstance(peak.result, Points)
        capped = len(peak.result.points) >= self.max_objects
        busiest = self._count_result(image, object, peak.result, capped, peak.image_size, peak.time)
        return _over_video(busiest, timeline)

    async def locate(
        self, image: str, object: str, *, more_objects: Sequence[str] | None = None, time: float | None = None
    ) -> LocateResult:
        """``locate_objects``: boxes of every ``object`` (and any ``more_objects``), in pixels
        and reading order; one request per phrase, all at once. On a video handle: the frame
        at ``time``, or without it a pass over the whole video (``result.timeline``: when
        each phrase appears; the boxes of its busiest moment).

        Example::

            result = await tools.locate("img_1", "car")
            print(result.text)
        """
        require_skill(self.backend, "detect")
        phrases = _phrases(object, more_objects)
        video = self._video(image)
        if video is not None and time is None:
            results = await _each(phrases, lambda phrase: self._locate_video(image, video, phrase))
            return _grouped(results, None)
        tiled, prepared = await self._tiles(image, time)
        results = await _each(phrases, lambda phrase: self._locate_one(image, phrase, tiled, prepared, time))
        png = await self._annotate(prepared, *(r.detections for r in results))
        return _grouped(results, png)

    async def _locate_one(
        self, image: str, object: str, tiled: TiledImage | None, prepared: PreparedImage, time: float | None
    ) -> LocateResult:
        detections: Detections
        if tiled is not None:
            detections = await tiled.detect(object, max_objects=self.max_objects)
        else:
            detections = await self.backend.detect(prepared, object, settings={"max_objects": self.max_objects})
        return _locate_result(image, object, detections, prepared.size, time)

    async def _locate_video(self, image: str, video: RegisteredVideo, object: str) -> LocateResult:
        timeline, peak = await timeline_of(self.backend, video, "detect", object, self.max_objects)
        assert isinstance(peak.result, Detections)
        return _over_video(_locate_result(image, object, peak.result, peak.image_size, peak.time), timeline)

    async def segment(
        self,
        image: str,
        object: str,
        *,
        point: Sequence[float] | None = None,
        box: Sequence[float] | None = None,
        time: float | None = None,
    ) -> SegmentResult:
        """``segment_object``: the mask of ``object``; ``point``/``box`` (pixels) pick one.
        ``time``: for a video handle, the moment to segment (seconds; needed for videos).

        Example::

            result = await tools.segment("img_1", "dog", point=[420, 310])
            print(result.text)
            result.segmentation.mask().save("dog.png")
        """
        segmenter = self.segment_backend or self.backend
        if "segment" not in segmenter.skills:
            raise UnsupportedSkillError(
                "segment", backend_name(segmenter), segmenter.skills,
                hint="Pass VisionTools(..., segment_backend=...) a backend that can segment.",
            )
        prepared = await self._resolve(image, time)
        size = prepared.size
        refs: list[list[float]] = []
        if point is not None:
            x, y = _pixel_values(point, 2, "point")
            refs.append(list(pixels_to_point((x, y), size.width, size.height)))
        if box is not None:
            x0, y0, x1, y1 = _pixel_values(box, 4, "box")
            refs.append(list(pixels_to_box((x0, y0, x1, y1), size.width, size.height)))
        segmentation = await segmenter.segment(prepared, object, spatial_refs=refs or None)
        annotated = await self._annotate(prepared, segmentation) if segmentation.found else None
        return SegmentResult(
            tool="segment_object",
            image=image,
            image_size=size,
            time=time,
            text=_segment_text(_moment(image, time), object, segmentation),
            object=object,
            segmentation=segmentation,
            annotated_png=annotated,
        )

    # ------------------------------------------------------------ by name

    async def run(self, tool: str, arguments: Mapping[str, Any]) -> ToolResult:
        """Run a tool by name with model-written arguments (validated by its args model).

        Invalid arguments raise :class:`ToolArgumentsError`, a :class:`MoondreamError`, so
        adapters report them to the model like any other tool failure.

        Example::

            result = await tools.run("count_objects", {"image": "img_1", "object": "cat"})
        """
        spec = TOOL_SPECS.get(tool)
        if spec is None:
            raise ValueError(f"unknown tool {tool!r}; tools: {', '.join(TOOL_SPECS)}")
        try:
            args = spec.args_schema.model_validate(dict(arguments))
        except ValidationError as exc:
            raise ToolArgumentsError.from_validation(tool, exc) from None
        method: Callable[..., Awaitable[ToolResult]] = getattr(self, spec.method)
        return await method(**args.model_dump())

    async def batch(
        self, tool: str, arguments: Sequence[Mapping[str, Any]], *, concurrency: int | None = None
    ) -> list[ToolResult | MoondreamError]:
        """Run one tool on many argument sets concurrently; results in input order.

        Each failure (a bad image, a failed request, invalid arguments) is returned in
        its item's place as the :class:`MoondreamError`; the rest of the batch finishes.

        Example::

            handles = [tools.add_image(p) for p in photos]
            results = await tools.batch("count_objects", [{"image": h, "object": "person"} for h in handles])
        """
        limit = concurrency or getattr(self.backend, "max_concurrency", None)
        return await map_concurrently(lambda args: self.run(tool, args), arguments, concurrency=limit)

    def run_sync(self, tool: str, arguments: Mapping[str, Any]) -> ToolResult:
        """:meth:`run` for synchronous code, in a plain script or inside a running loop."""
        return run_sync(lambda: self.run(tool, arguments))


_R = TypeVar("_R", CountResult, LocateResult)


def _free_name(prefix: str, kind: Sequence[str], taken: set[str]) -> str:
    """The first ``<prefix>_<n>`` not ``taken``, counting from the number of names of its
    ``kind`` + 1."""
    n = len(kind) + 1
    while f"{prefix}_{n}" in taken:
        n += 1
    return f"{prefix}_{n}"


def _phrases(object: str, more: Sequence[str] | None) -> list[str]:
    """The phrases of one count/locate call: ``object`` first, then the others, once each."""
    phrases = [object, *(more or [])]
    if len(phrases) > 8:
        raise ToolArgumentsError(f"more_objects takes at most 7 phrases, got {len(phrases) - 1}")
    if not all(isinstance(p, str) and p.strip() for p in phrases):
        raise ToolArgumentsError("every object phrase must be a non-empty string, e.g. 'car'")
    return list(dict.fromkeys(p.strip() for p in phrases))


async def _each(phrases: list[str], run: Callable[[str], Awaitable[_R]]) -> list[_R]:
    """``run`` for every phrase at once; the first failure cancels the rest and is raised."""
    if len(phrases) == 1:
        return [await run(phrases[0])]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(phrase)) for phrase in phrases]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _locate_result(
    image: str, object: str, detections: Detections, size: ImageSize, time: float | None
) -> LocateResult:
    return LocateResult(
        tool="locate_objects",
        image=image,
        image_size=size,
        time=time,
        text=_locate_text(_moment(image, time), object, detections),
        object=object,
        detections=detections,
    )


def _over_video(busiest: _R, timeline: VideoTimeline) -> _R:
    """A pass over a whole video: the result of its busiest moment, told after when the
    object appears."""
    text = _timeline_text(busiest.image, busiest.object, timeline, busiest.image_size, busiest.text)
    return busiest.model_copy(update={"text": text, "timeline": timeline})


def _grouped(results: list[_R], png: bytes | None) -> _R:
    """The first phrase's result carrying the others (``more``) and one text line per phrase."""
    first = results[0]
    if len(results) == 1:
        return first.model_copy(update={"annotated_png": png})
    return first.model_copy(
        update={"more": results[1:], "text": "\n".join(r.text for r in results), "annotated_png": png}
    )


def _pixel_values(values: Sequence[float], count: int, what: str) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ToolArgumentsError(f"{what} must be {count} pixel numbers") from None
    if len(numbers) != count:
        raise ToolArgumentsError(f"{what} must be {count} pixel numbers, got {len(numbers)}")
    return numbers
