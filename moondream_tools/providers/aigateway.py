"""AIgateway: segmentation through its OpenAI-shaped image edits (:class:`AIGatewaySegmenter`).

**Experimental.** Built from AIgateway's published API reference (an OpenAPI document and
model pages), not verified against the live service. AIgateway resells
``moondream/moondream3-preview-segment`` and ``meta/sam-3-image``; its docs show no request
that carries an input image except ``POST /v1/images/edits``, which "matches OpenAI
exactly". This backend sends the image there as multipart (``image``, ``prompt`` = the
object phrase, ``model``, ``response_format=b64_json``) and reads ``data[0]`` as a mask
image; an answer that is not a usable mask is a :class:`~moondream_tools.ResponseError` that
says what arrived.

Example::

    from moondream_tools import AIGatewaySegmenter

    async with AIGatewaySegmenter(model="meta/sam-3-image") as gateway:    # AIGATEWAY_API_KEY
        mask = await gateway.segment("street.jpg", "car")
        print(mask.area_px, mask.bbox_px)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import aiohttp

from .._http_backend import HttpBackend
from .._transport import DEFAULT_MAX_CONCURRENCY, ServiceProfile, Timeout, encode_multipart
from ..backend import SamplingSettings, SpatialRef, check_object
from ..errors import APIStatusError, InsufficientCreditsError, ResponseError
from ..images import ImageInput, ImageSettings
from ..results import Segmentation
from ._masks import decode_mask

__all__ = ["AIGATEWAY_PROFILE", "AIGATEWAY_MODELS", "AIGatewaySegmenter"]

#: The segmentation models AIgateway lists.
AIGATEWAY_MODELS = ("moondream/moondream3-preview-segment", "meta/sam-3-image")


def _error_class(status: int, body: Any) -> tuple[type[APIStatusError], str] | None:
    if status == 402:
        return (
            InsufficientCreditsError,
            "The AIgateway wallet is empty: top it up in the AIgateway dashboard, then retry.",
        )
    return None


#: How AIgateway reports errors (``{"error": {message, type, code, param}}``).
AIGATEWAY_PROFILE = ServiceProfile(
    name="AIgateway",
    auth_hint="Check the key: set AIGATEWAY_API_KEY or pass AIGatewaySegmenter(api_key=...).",
    permission_hint="The AIgateway key may not use this model.",
    not_found_hint="Check base_url ({base_url}) and the model name.",
    bad_request_hint="AIgateway rejected the request: check the model and the image.",
    error_class=_error_class,
)


class AIGatewaySegmenter(HttpBackend):
    """Segmentation through AIgateway (experimental; see the module docstring).

    Args:
        api_key: the AIgateway key (default: ``AIGATEWAY_API_KEY``), sent as ``Authorization:
            Bearer``. Never shown in ``repr``, errors or logs.
        model: ``"moondream/moondream3-preview-segment"`` (default) or ``"meta/sam-3-image"``.
        base_url: default ``https://api.aigateway.sh/v1``.
        timeout, max_retries, max_retry_after, max_concurrency, requests_per_second,
            image_settings, image_cache_bytes, trust_env, http_session: as for
            :class:`~moondream_tools.AsyncMoondream`.

    A 402 (wallet empty) is an :class:`~moondream_tools.InsufficientCreditsError`, not
    retried; 429 honours ``Retry-After``; 500 and 503 are retried.

    Example::

        tools = VisionTools(FalMoondream(), segment_backend=AIGatewaySegmenter())
    """

    skills = frozenset({"segment"})
    KEY_ENV = "AIGATEWAY_API_KEY"
    DEFAULT_BASE_URL = "https://api.aigateway.sh/v1"
    PROFILE = AIGATEWAY_PROFILE

    def __init__(
        self,
        api_key: str | None = None,
        *,
        model: str = AIGATEWAY_MODELS[0],
        base_url: str | None = None,
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
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must name an AIgateway model such as {AIGATEWAY_MODELS[0]!r}")
        self.model = model.strip()
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
        return (
            f"AIGatewaySegmenter(model={self.model!r}, base_url={self.base_url!r},"
            f" api_key={'set' if self._api_key else 'not set'})"
        )

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
        """The mask of ``object``. AIgateway's image edits take no spatial hints or sampling
        settings: giving either is a ``ValueError``.

        Example::

            mask = await gateway.segment("street.jpg", "car")
            mask.mask().save("car.png")
        """
        check_object(object)
        if spatial_refs:
            raise ValueError("AIgateway's image edits take no spatial references; leave spatial_refs empty")
        if settings:
            raise ValueError(f"AIgateway's image edits take no sampling settings, got {sorted(settings)}")
        options = self._transport.options(timeout, max_retries)
        prepared = await self.prepare(image)
        jpeg = base64.b64decode((await prepared.segment_payload()).partition(",")[2])
        content = encode_multipart(
            {"prompt": object, "model": self.model, "response_format": "b64_json", "n": "1"},
            {"image": ("image.jpg", jpeg, "image/jpeg")},
        )
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        data, rid = await self._transport.request_json(
            "POST", "/images/edits", headers=headers, options=options, content=content
        )
        items = data.get("data")
        first = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else None
        if first is None:
            raise ResponseError("AIgateway images/edits: the answer has no data[0]", request_id=rid)
        if isinstance(first.get("b64_json"), str):
            try:
                mask_bytes = base64.b64decode(first["b64_json"], validate=True)
            except (binascii.Error, ValueError):
                raise ResponseError("AIgateway images/edits: data[0].b64_json is not valid base64", request_id=rid) from None
        elif isinstance(first.get("url"), str):
            mask_bytes = await self._transport.download(first["url"], max_bytes=self.image_settings.max_bytes, options=options)
        else:
            raise ResponseError("AIgateway images/edits: data[0] has neither b64_json nor url", request_id=rid)
        mask = decode_mask(mask_bytes, "AIgateway images/edits", rid, max_pixels=self.image_settings.max_pixels)
        return Segmentation.from_masks([mask], image_size=prepared.size, object=object, request_id=rid)
