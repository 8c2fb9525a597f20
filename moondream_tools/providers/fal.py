"""fal.ai: Moondream 3 Preview (:class:`FalMoondream`) and SAM 3 (:class:`FalSam3`).

fal serves each model at ``https://fal.run/<endpoint-id>`` (the answer on the same
connection) and through a queue at ``https://queue.fal.run/<endpoint-id>`` (submit, poll
the status URL the submit answer gives, fetch the response URL; cancel with a PUT). Auth
is ``Authorization: Key <FAL_KEY>``. fal has no per-minute rate limit, only a concurrency
limit per account, which suits batch work.

Moondream on fal names its fields its own way (``prompt`` for the object or question,
``output`` for the caption or answer, ``spatial_references`` on segment, ``settings`` on
segment only) and defaults query reasoning to true; this module maps our arguments and
results both ways and sends the caller's reasoning choice explicitly. A setting fal has no
field for is applied here when it can be (``max_objects`` on detect and point: the answer
is cut to that many, so "at least N" still works) and refused with a ``ValueError``
otherwise, never dropped.

Example::

    from moondream_tools import FalMoondream, FalSam3, VisionTools

    async with FalMoondream() as fal, FalSam3() as sam:          # FAL_KEY
        boxes = await fal.detect("street.jpg", "car", settings={"max_objects": 50})
        tools = VisionTools(fal, segment_backend=sam)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from PIL import Image

from .._http_backend import HttpBackend
from .._transport import DEFAULT_MAX_CONCURRENCY, CallOptions, ServiceProfile, Timeout, error_message, origin_of
from ..backend import (
    CaptionLength,
    SamplingSettings,
    SpatialRef,
    check_length,
    check_object,
    check_question,
    check_settings,
    check_spatial_refs,
)
from ..errors import APIStatusError, APITimeoutError, BadRequestError, ResponseError
from ..images import ImageInput, ImageSettings, PreparedImage, ReferenceKind, reference_kind
from ..results import Answer, Caption, Detections, Points, Reasoning, Segmentation, parse_result
from ._masks import decode_mask

__all__ = ["FAL_PROFILE", "FalMoondream", "FalSam3"]

MOONDREAM_ENDPOINT = "fal-ai/moondream3-preview"
SAM3_ENDPOINT = "fal-ai/sam-3/image"
#: The most masks fal's SAM 3 schema lets one request ask for.
SAM3_MAX_MASKS = 32
DEFAULT_QUEUE_BASE_URL = "https://queue.fal.run"


def fal_error_message(body: Any) -> str:
    """The server's words in a fal error body: ``detail`` as a string or a list of
    ``{loc, msg, type}`` (validation errors name their fields).

    >>> fal_error_message({"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]})
    'body.prompt: field required'
    """
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        parts = []
        for item in body["detail"][:5]:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc") or [])
                parts.append(f"{where}: {item.get('msg', '')}".strip(": "))
            else:
                parts.append(str(item))
        return "; ".join(parts)[:500]
    return error_message(body)


def _fal_retryable(error: APIStatusError) -> bool | None:
    value = error.headers.get("X-Fal-Retryable")
    if value is None:
        return None
    return value.strip().lower() == "true"


#: How fal reports errors.
FAL_PROFILE = ServiceProfile(
    name="fal.ai",
    auth_hint="Check the fal key: set FAL_KEY or pass api_key=...; keys are at https://fal.ai/dashboard/keys.",
    permission_hint="The fal key may not run this model: check the key's scope and your account.",
    not_found_hint="Check base_url ({base_url}) and the fal endpoint id.",
    bad_request_hint="fal rejected the request: check the arguments.",
    tls_hint="Check that base_url uses https:// and that the certificate is valid.",
    error_message=fal_error_message,
    retryable=_fal_retryable,
    request_id_header="x-fal-request-id",
)


class _FalBackend(HttpBackend):
    """What both fal backends share: the key, sync or queue calls, errors."""

    KEY_ENV = "FAL_KEY"
    DEFAULT_BASE_URL = "https://fal.run"
    PROFILE = FAL_PROFILE

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        queue: bool = False,
        queue_base_url: str = DEFAULT_QUEUE_BASE_URL,
        queue_poll_interval: float = 0.25,
        timeout: float | Timeout | None = None,
        max_retries: int = 2,
        max_retry_after: float = 60.0,
        max_concurrency: int | None = DEFAULT_MAX_CONCURRENCY,
        requests_per_second: float | None = None,
        image_settings: ImageSettings | None = None,
        image_cache_bytes: int = 64 * 1024 * 1024,
        trust_env: bool = False,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not queue_poll_interval > 0:
            raise ValueError("queue_poll_interval must be positive")
        self.queue = queue
        self.queue_base_url = queue_base_url.strip().rstrip("/")
        self.queue_poll_interval = queue_poll_interval
        self._other_origins = (origin_of(self.queue_base_url),)
        super().__init__(
            api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_after=max_retry_after,
            max_concurrency=max_concurrency,
            requests_per_second=requests_per_second,
            image_settings=image_settings,
            image_cache_bytes=image_cache_bytes,
            trust_env=trust_env,
            http_session=http_session,
        )

    def __repr__(self) -> str:
        mode = f", queue_base_url={self.queue_base_url!r}" if self.queue else ""
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}{mode},"
            f" api_key={'set' if self._api_key else 'not set'})"
        )

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Key {self._api_key}"} if self._api_key else {}

    async def _call(self, endpoint: str, body: dict[str, Any], options: CallOptions) -> tuple[dict[str, Any], str | None]:
        """Run ``endpoint`` with ``body``: on the same connection, or through fal's queue."""
        try:
            if not self.queue:
                return await self._transport.request_json(
                    "POST", "/" + endpoint, body, headers=self._auth(), options=options
                )
            return await self._queued(endpoint, body, options)
        except BadRequestError as exc:
            if "image_url" in str(exc):
                raise BadRequestError(
                    f"{exc} fal refused the image, which this client sends as a data URI: make it smaller"
                    " (ImageSettings(max_pixels=...) or a smaller segment_max_side), or check that the"
                    " endpoint accepts data URIs.",
                    status_code=exc.status_code, body=exc.body, request_id=exc.request_id, headers=exc.headers,
                ) from None
            raise

    async def _queued(self, endpoint: str, body: dict[str, Any], options: CallOptions) -> tuple[dict[str, Any], str | None]:
        """Submit, poll, fetch; the call's ``timeout`` bounds it all. A job the caller gives up on
        (timeout, cancellation, a failure before it completed) is cancelled on fal's side."""
        # The submit runs under the backend's own request timeout, not the call's: if the call
        # gives up first, the submit still lands and its job is cancelled (never left queued).
        submit_options = CallOptions(timeout=self._transport.timeout, max_retries=options.max_retries)
        submit = asyncio.ensure_future(
            self._transport.request_json(
                "POST", f"{self.queue_base_url}/{endpoint}", body, headers=self._auth(), options=submit_options
            )
        )
        urls: dict[str, str] | None = None
        completed = False
        try:
            async with asyncio.timeout(options.timeout.total):
                submitted, _ = await asyncio.shield(submit)
                urls = _queue_urls(endpoint, submitted)
                request_id = submitted.get("request_id") if isinstance(submitted.get("request_id"), str) else None
                delay = self.queue_poll_interval
                while True:
                    status, _ = await self._transport.request_json(
                        "GET", urls["status_url"], headers=self._auth(), options=options
                    )
                    state = status.get("status")
                    if state == "COMPLETED":
                        completed = True
                        if status.get("error"):
                            raise APIStatusError(
                                f"{endpoint}: fal's queue finished the request with an error"
                                f" ({status.get('error_type') or 'error'}): {status['error']}."
                                " Retry later, or check the arguments.",
                                status_code=200, body=status, request_id=request_id,
                            )
                        break
                    if state not in ("IN_QUEUE", "IN_PROGRESS"):
                        raise ResponseError(f"{endpoint}: unknown fal queue status {state!r}", request_id=request_id)
                    await asyncio.sleep(delay)
                    delay = min(delay * 1.5, 5.0)
                return await self._transport.request_json(
                    "GET", urls["response_url"], headers=self._auth(), options=options
                )
        except BaseException as exc:
            if not completed:
                await asyncio.shield(self._abandon(submit, urls, endpoint))
            if isinstance(exc, TimeoutError):
                raise APITimeoutError(
                    f"{endpoint}: fal's queue did not finish within the timeout ({options.timeout.total} s);"
                    " the request was cancelled. Raise timeout= or retry later."
                ) from None
            raise

    async def _abandon(self, submit: asyncio.Future[Any], urls: dict[str, str] | None, endpoint: str) -> None:
        """Cancel a job that will not be waited for: once its submit has answered (a submit
        still on its way is let finish first, so a job fal accepted is never left running)."""
        if urls is None:
            try:
                submitted, _ = await asyncio.wait_for(asyncio.shield(submit), 10.0)
                urls = _queue_urls(endpoint, submitted)
            except BaseException:  # noqa: BLE001 - the submit failed or never answered: no job to cancel
                if submit.done() and not submit.cancelled():
                    submit.exception()  # retrieved
                else:
                    submit.cancel()
                return
        await self._cancel(urls["cancel_url"])

    async def _cancel(self, cancel_url: str) -> None:
        """Ask fal to drop a queued request; a failure to cancel is not the caller's error."""
        try:
            await self._transport.request_json(
                "PUT", cancel_url, headers=self._auth(), options=self._transport.options(10.0, 0)
            )
        except Exception:  # noqa: BLE001 - best effort: the job times out on fal's side anyway
            pass


def _queue_urls(endpoint: str, submitted: dict[str, Any]) -> dict[str, str]:
    urls = {name: submitted.get(name) for name in ("status_url", "response_url", "cancel_url")}
    if not all(isinstance(u, str) and reference_kind(u) is ReferenceKind.URL for u in urls.values()):
        raise ResponseError(f"{endpoint}: fal's queue answer lacks absolute status_url / response_url / cancel_url")
    return urls  # type: ignore[return-value]


def _sampling(settings: SamplingSettings | Mapping[str, Any] | None, allowed: Sequence[str], skill: str) -> dict[str, Any]:
    """The settings fal's endpoint has fields for; anything else is refused, never dropped."""
    values = check_settings(settings) or {}
    unknown = [name for name in values if name not in allowed]
    if unknown:
        have = ", ".join(allowed) or "no sampling settings"
        raise ValueError(f"fal's {skill} endpoint has no field for {', '.join(unknown)} (it takes: {have})")
    return values


def _max_objects(settings: SamplingSettings | Mapping[str, Any] | None, skill: str) -> int | None:
    values = _sampling(settings, ("max_objects",), skill)
    limit = values.get("max_objects")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_objects must be a positive integer, got {limit!r}")
    return limit


def _no_refs(spatial_refs: Sequence[SpatialRef] | None, skill: str) -> None:
    if spatial_refs:
        raise ValueError(f"fal's {skill} endpoint takes no spatial references; leave spatial_refs empty")


class FalMoondream(_FalBackend):
    """Moondream 3 Preview on fal.ai: all five skills, sync or through fal's queue.

    Args:
        api_key: the fal key (default: ``FAL_KEY``). Never shown in ``repr``, errors or logs.
        base_url: fal's sync host (default ``https://fal.run``).
        queue: submit to fal's queue and poll, instead of waiting on one connection. On a
            timeout or when the caller's task is cancelled, the queued request is cancelled
            (``PUT cancel_url``) before the error is raised.
        queue_base_url: fal's queue host (default ``https://queue.fal.run``).
        queue_poll_interval: the first wait between status polls, in seconds (grows by half
            each poll, up to 5 s).
        timeout, max_retries, max_retry_after, max_concurrency, requests_per_second,
            image_settings, image_cache_bytes, trust_env, http_session: as for
            :class:`~moondream_tools.AsyncMoondream`. In queue mode ``timeout`` bounds the
            whole job.

    Every result carries fal's ``usage_info`` as ``result.usage``. Query reasoning is a
    plain text on fal: ``Answer.reasoning.text`` with no grounding.

    Example::

        async with FalMoondream() as fal:                      # FAL_KEY
            answer = await fal.query("receipt.jpg", "What is the total?")
            print(answer.answer, answer.usage.output_tokens)
    """

    skills = frozenset({"caption", "query", "detect", "point", "segment"})

    async def caption(
        self,
        image: ImageInput,
        length: CaptionLength = "normal",
        *,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Caption:
        """Describe an image (``settings``: temperature, top_p).

        Example::

            print((await fal.caption("photo.jpg", length="short")).caption)
        """
        check_length(length)
        body_settings = _sampling(settings, ("temperature", "top_p"), "caption")
        options = self._transport.options(timeout, max_retries)
        prepared = await self.prepare(image)
        data, rid = await self._call(
            f"{MOONDREAM_ENDPOINT}/caption", {"image_url": prepared.data_url, "length": length, **body_settings},
            options,
        )
        return parse_result(
            Caption, {"caption": data.get("output"), "usage": data.get("usage_info")},
            what="fal caption", request_id=rid, image_size=prepared.size,
        )

    async def query(
        self,
        image: ImageInput | None,
        question: str,
        *,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Answer:
        """Answer a question about an image; fal's reasoning comes back as plain text.

        Example::

            answer = await fal.query("photo.jpg", "How many people?", reasoning=True)
            print(answer.answer, answer.reasoning.text)
        """
        check_question(question)
        _no_refs(spatial_refs, "query")
        if image is None:
            raise ValueError("fal's query endpoint needs an image; use AsyncMoondream for text-only questions")
        body_settings = _sampling(settings, ("temperature", "top_p"), "query")
        options = self._transport.options(timeout, max_retries)
        prepared = await self.prepare(image)
        body = {"image_url": prepared.data_url, "prompt": question, "reasoning": bool(reasoning), **body_settings}
        data, rid = await self._call(f"{MOONDREAM_ENDPOINT}/query", body, options)
        trace = data.get("reasoning")
        return parse_result(
            Answer,
            {
                "answer": data.get("output"),
                "reasoning": Reasoning(text=trace) if isinstance(trace, str) and trace else None,
                "usage": data.get("usage_info"),
            },
            what="fal query", request_id=rid, image_size=prepared.size,
        )

    async def detect(
        self,
        image: ImageInput,
        object: str,
        *,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Detections:
        """Boxes of every ``object``; ``settings={"max_objects": N}`` keeps the first N.

        Example::

            boxes = await fal.detect("street.jpg", "car", settings={"max_objects": 20})
        """
        check_object(object)
        limit = _max_objects(settings, "detect")
        data, rid, prepared = await self._grounding("detect", image, object, timeout, max_retries)
        objects = data.get("objects")
        if isinstance(objects, list) and limit is not None:
            objects = objects[:limit]
        return parse_result(
            Detections, {"objects": objects, "usage": data.get("usage_info")},
            what="fal detect", request_id=rid, image_size=prepared.size, object=object,
        )

    async def point(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Points:
        """A point on every ``object``; ``settings={"max_objects": N}`` keeps the first N.

        Example::

            people = await fal.point("crowd.jpg", "person")
        """
        check_object(object)
        _no_refs(spatial_refs, "point")
        limit = _max_objects(settings, "point")
        data, rid, prepared = await self._grounding("point", image, object, timeout, max_retries)
        points = data.get("points")
        if isinstance(points, list) and limit is not None:
            points = points[:limit]
        return parse_result(
            Points, {"points": points, "usage": data.get("usage_info")},
            what="fal point", request_id=rid, image_size=prepared.size, object=object,
        )

    async def _grounding(
        self, skill: str, image: ImageInput, object: str, timeout: float | Timeout | None, max_retries: int | None
    ) -> tuple[dict[str, Any], str | None, PreparedImage]:
        options = self._transport.options(timeout, max_retries)
        prepared = await self.prepare(image)
        data, rid = await self._call(
            f"{MOONDREAM_ENDPOINT}/{skill}", {"image_url": prepared.data_url, "prompt": object}, options
        )
        return data, rid, prepared

    async def segment(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Segmentation:
        """The mask of ``object`` as an SVG path, as on Moondream Cloud (``settings``:
        temperature, top_p, max_tokens).

        Example::

            mask = await fal.segment("street.jpg", "the red car", spatial_refs=[[0.4, 0.6]])
        """
        check_object(object)
        refs = check_spatial_refs(spatial_refs)
        body_settings = _sampling(settings, ("temperature", "top_p", "max_tokens"), "segment")
        options = self._transport.options(timeout, max_retries)
        prepared = await self.prepare(image)
        body: dict[str, Any] = {"image_url": await prepared.segment_payload(), "object": object}
        if refs:
            body["spatial_references"] = refs
        if body_settings:
            body["settings"] = body_settings
        data, rid = await self._call(f"{MOONDREAM_ENDPOINT}/segment", body, options)
        return parse_result(
            Segmentation, {"path": data.get("path"), "bbox": data.get("bbox"), "usage": data.get("usage_info")},
            what="fal segment", request_id=rid, image_size=prepared.size, object=object,
        )


class FalSam3(_FalBackend):
    """SAM 3 on fal.ai (``fal-ai/sam-3/image``): a segment-only backend.

    The object phrase is SAM 3's text prompt; ``spatial_refs`` (normalized, as everywhere in
    this project) become ``point_prompts`` and ``box_prompts`` in **pixels of the image sent**
    (fal's schema types their coordinates as integers, "X Coordinate of the prompt"), each
    point a foreground point. Masks come back as data URIs (``sync_mode``), with scores and
    boxes. Every mask is kept: :class:`~moondream_tools.Segmentation` is their union and
    ``.instances`` holds each mask with its score, in reading order.

    Takes the same options as :class:`FalMoondream`.

    Example::

        async with FalMoondream() as fal, FalSam3() as sam:
            tools = VisionTools(fal, segment_backend=sam)
            result = await tools.segment("img_1", "dog")
            print(result.text, len(result.segmentation.instances))
    """

    skills = frozenset({"segment"})

    async def segment(
        self,
        image: ImageInput,
        object: str,
        *,
        spatial_refs: Sequence[SpatialRef] | None = None,
        settings: SamplingSettings | None = None,
        timeout: float | Timeout | None = None,
        max_retries: int | None = None,
    ) -> Segmentation:
        """Every mask of ``object``; ``settings={"max_objects": N}`` asks for at most N.

        Example::

            result = await sam.segment("street.jpg", "car", spatial_refs=[[0.4, 0.6]])
            for instance in result.instances:
                print(instance.score, instance.area_px)
        """
        check_object(object)
        refs = check_spatial_refs(spatial_refs) or []
        limit = _max_objects(settings, "SAM 3")
        options = self._transport.options(timeout, max_retries)
        prepared = await self.prepare(image)
        width, height = prepared.segment_upload_width, prepared.segment_upload_height

        def px(value: float, side: int) -> int:  # a pixel of the image sent: 0 .. side - 1
            return min(side - 1, max(0, round(value * side)))

        points = [{"x": px(r[0], width), "y": px(r[1], height), "label": 1} for r in refs if len(r) == 2]
        boxes = [
            {"x_min": px(r[0], width), "y_min": px(r[1], height), "x_max": px(r[2], width), "y_max": px(r[3], height)}
            for r in refs if len(r) == 4
        ]
        body: dict[str, Any] = {
            "image_url": await prepared.segment_payload(),
            "prompt": object,
            "sync_mode": True,
            "include_scores": True,
            "include_boxes": True,
            "return_multiple_masks": True,  # every instance, however fal reads the flag
            "output_format": "png",
        }
        if points:
            body["point_prompts"] = points
        if boxes:
            body["box_prompts"] = boxes
        body["max_masks"] = limit or SAM3_MAX_MASKS  # fal's default is 3: ask for every instance
        data, rid = await self._call(SAM3_ENDPOINT, body, options)
        masks = data.get("masks")
        if not isinstance(masks, list):
            raise ResponseError("fal SAM 3: the answer has no masks list", request_id=rid)
        masks = masks[: body["max_masks"]]
        images = [await self._mask_image(entry, options, rid) for entry in masks]
        scores = data.get("scores")
        result = Segmentation.from_masks(
            images,
            scores=scores if isinstance(scores, list) else None,
            image_size=prepared.size,
            object=object,
            request_id=rid,
        )
        if len(masks) >= body["max_masks"]:
            result = result.model_copy(update={"capped": True})
        return result

    async def _mask_image(self, entry: Any, options: CallOptions, request_id: str | None) -> Image.Image:
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise ResponseError("fal SAM 3: a mask without a url", request_id=request_id)
        if reference_kind(url) is ReferenceKind.DATA_URL:
            _, _, payload = url.partition(",")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ResponseError("fal SAM 3: a mask data URI is not valid base64", request_id=request_id) from None
        else:
            data = await self._transport.download(url, max_bytes=self.image_settings.max_bytes, options=options)
        return decode_mask(data, "fal SAM 3", request_id, max_pixels=self.image_settings.max_pixels)
