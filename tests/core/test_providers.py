"""One behavioural suite over every backend, for the skills each has, against the emulator.

Backends: Moondream's native API (``AsyncMoondream``), Moondream 3 on fal.ai sync and queued
(``FalMoondream``), SAM 3 on fal.ai (``FalSam3``), and AIgateway's image edits with both of
its segmentation models (``AIGatewaySegmenter``). Every answer is checked against the
scene's ground truth; every documented failure against its typed error.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from moondream_tools import (
    AIGatewaySegmenter,
    APIStatusError,
    APITimeoutError,
    AsyncMoondream,
    AuthenticationError,
    BadRequestError,
    FalMoondream,
    FalSam3,
    ImageSettings,
    ImageSize,
    InsufficientCreditsError,
    InternalServerError,
    ResponseError,
    Segmentation,
    UnsupportedSkillError,
    VisionBackend,
    VisionTools,
)
from moondream_tools.testing import FakeMoondream, Scene, Shape

W, H = 900, 600
SCENE = Scene(
    W,
    H,
    [
        Shape("circle", "red", (200, 180), 110),
        Shape("circle", "red", (650, 440), 110),
        Shape("square", "blue", (660, 150), 150),
        Shape("triangle", "yellow", (230, 460), 170),
    ],
)
TOL = 0.02  # the native tests' tolerance, normalized


@dataclass(frozen=True)
class Kind:
    cls: type
    make: Callable[[FakeMoondream, str | None], Any]


KINDS: dict[str, Kind] = {
    "moondream": Kind(AsyncMoondream, lambda f, key: AsyncMoondream(api_key=key or f.api_key, base_url=f.base_url)),
    "fal": Kind(FalMoondream, lambda f, key: FalMoondream(api_key=key or f.fal_key, base_url=f.fal_base_url)),
    "fal-queue": Kind(
        FalMoondream,
        lambda f, key: FalMoondream(
            api_key=key or f.fal_key, base_url=f.fal_base_url, queue=True,
            queue_base_url=f.fal_queue_base_url, queue_poll_interval=0.01,
        ),
    ),
    "sam3": Kind(FalSam3, lambda f, key: FalSam3(api_key=key or f.fal_key, base_url=f.fal_base_url)),
    "sam3-queue": Kind(
        FalSam3,
        lambda f, key: FalSam3(
            api_key=key or f.fal_key, base_url=f.fal_base_url, queue=True,
            queue_base_url=f.fal_queue_base_url, queue_poll_interval=0.01,
        ),
    ),
    "aigateway": Kind(
        AIGatewaySegmenter, lambda f, key: AIGatewaySegmenter(api_key=key or f.aigateway_key, base_url=f.aigateway_base_url)
    ),
    "aigateway-sam3": Kind(
        AIGatewaySegmenter,
        lambda f, key: AIGatewaySegmenter(
            api_key=key or f.aigateway_key, base_url=f.aigateway_base_url, model="meta/sam-3-image"
        ),
    ),
}


def having(skill: str) -> list[str]:
    return [name for name, kind in KINDS.items() if skill in kind.cls.skills]


@pytest.fixture
async def make(fake: FakeMoondream) -> AsyncIterator[Callable[..., Any]]:
    """Build backends on the emulator; every one is closed at the end of the test."""
    made: list[Any] = []

    def build(name: str, key: str | None = None, **overrides: Any) -> Any:
        backend = KINDS[name].make(fake, key)
        for attribute, value in overrides.items():
            setattr(backend, attribute, value)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.aclose()


def near(a: float, b: float) -> bool:
    return abs(a - b) <= TOL


# ------------------------------------------------------------------ the skills, against scene truth


@pytest.mark.parametrize("name", having("caption"))
async def test_caption_names_the_shapes(make: Callable[..., Any], name: str) -> None:
    result = await make(name).caption(SCENE.render(), "normal")
    assert "two red circles" in result.caption.lower() and result.image_size.as_tuple() == (W, H)


@pytest.mark.parametrize("name", having("query"))
async def test_query_counts(make: Callable[..., Any], name: str) -> None:
    result = await make(name).query(SCENE.render(), "How many red circles are there?")
    assert result.answer.strip() == "2"


@pytest.mark.parametrize("name", having("detect"))
async def test_detect_matches_truth(make: Callable[..., Any], name: str) -> None:
    result = await make(name).detect(SCENE.render(), "red circle")
    truth = sorted(t.bbox for t in SCENE.matching("red circle"))
    found = sorted((b.x_min, b.y_min, b.x_max, b.y_max) for b in result.objects)
    assert len(found) == len(truth) == 2
    assert all(near(a, b) for f, t in zip(found, truth) for a, b in zip(f, t))


@pytest.mark.parametrize("name", having("point"))
async def test_point_matches_truth(make: Callable[..., Any], name: str) -> None:
    result = await make(name).point(SCENE.render(), "red circle")
    truth = sorted(t.center for t in SCENE.matching("red circle"))
    found = sorted((p.x, p.y) for p in result.points)
    assert len(found) == 2 and all(near(a, b) for f, t in zip(found, truth) for a, b in zip(f, t))


@pytest.mark.parametrize("name", having("segment"))
async def test_segment_matches_truth(make: Callable[..., Any], name: str) -> None:
    truth = SCENE.matching("blue square")[0]
    result = await make(name).segment(SCENE.render(), "blue square")
    assert result.found and abs(result.area_px - truth.area_px) <= 0.02 * truth.area_px
    box = result.bbox_px
    assert all(abs(a - b) <= 0.01 * W for a, b in zip((box.x_min, box.y_min, box.x_max, box.y_max), truth.bbox_px))
    expected = scene_mask(truth.index)
    got = result.mask("L")
    assert iou(got, expected) >= 0.95
    assert result.to_rle()["size"] == [H, W] and result.polygons


@pytest.mark.parametrize("name", having("segment"))
async def test_segment_of_nothing_is_not_found(make: Callable[..., Any], name: str) -> None:
    result = await make(name).segment(SCENE.render(), "purple hexagon")
    assert not result.found and result.area_px == 0


@pytest.mark.parametrize("name", list(KINDS))
async def test_every_backend_is_a_vision_backend_and_names_what_it_lacks(make: Callable[..., Any], name: str) -> None:
    backend = make(name)
    assert isinstance(backend, VisionBackend)
    for skill in ("caption", "detect", "point"):
        if skill not in backend.skills:
            with pytest.raises(UnsupportedSkillError, match=f"{type(backend).__name__} has no '{skill}' skill"):
                await getattr(backend, skill)(SCENE.render(), *(() if skill == "caption" else ("x",)))


def scene_mask(index: int) -> Image.Image:
    return Image.fromarray((SCENE.mask(index) * 255).astype("uint8"), mode="L")


def iou(a: Image.Image, b: Image.Image) -> float:
    import numpy as np

    x, y = np.asarray(a) > 0, np.asarray(b) > 0
    return float((x & y).sum() / max(1, (x | y).sum()))


# ------------------------------------------------------------------ errors, for every backend


def family(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", list(KINDS))
async def test_a_wrong_key_is_an_authentication_error_that_never_shows_the_key(
    make: Callable[..., Any], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="moondream_tools")
    key = "sk-wrong-key-0123456789"
    backend = make(name, key)
    skill = "segment" if "segment" in backend.skills and "detect" not in backend.skills else "detect"
    with pytest.raises(AuthenticationError) as info:
        await getattr(backend, skill)(SCENE.render(), "blue square")
    error = info.value
    assert key not in str(error) and key not in repr(backend) and key not in json.dumps(error.body)
    assert all(key not in v for v in error.headers.values()) and key not in caplog.text
    assert ("FAL_KEY" if family(name) in ("fal", "sam3") else "API_KEY") in str(error)


@pytest.mark.parametrize("name", list(KINDS))
async def test_429_with_retry_after_is_retried_then_answers(
    fake: FakeMoondream, make: Callable[..., Any], name: str, delays: list[float]
) -> None:
    backend = make(name)
    skill = "segment" if "detect" not in backend.skills else "detect"
    fake.fail_next(1, status=429, retry_after="2")
    result = await getattr(backend, skill)(SCENE.render(), "blue square")
    assert delays == [2.0]
    assert result.found if skill == "segment" else len(result.objects) == 1


@pytest.mark.parametrize("name", list(KINDS))
async def test_a_400_is_not_retried(fake: FakeMoondream, make: Callable[..., Any], name: str, delays: list[float]) -> None:
    backend = make(name)
    skill = "segment" if "detect" not in backend.skills else "detect"
    fake.fail_next(1, status=400)
    with pytest.raises(BadRequestError):
        await getattr(backend, skill)(SCENE.render(), "blue square")
    assert delays == []


# ------------------------------------------------------------------ fal specifics


@pytest.mark.parametrize("name", ["fal", "sam3"])
async def test_fal_validation_errors_name_the_fields(fake: FakeMoondream, make: Callable[..., Any], name: str) -> None:
    backend = make(name)
    detail = [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]
    fake.fail_next(1, status=422, body=json.dumps({"detail": detail}))
    with pytest.raises(BadRequestError, match=r"HTTP 422 from /fal-ai/.*: body\.prompt: field required"):
        await backend.segment(SCENE.render(), "blue square")


async def test_fal_refusing_the_data_uri_says_what_to_do(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    detail = [{"loc": ["body", "image_url"], "msg": "Could not load the image", "type": "image_load_error"}]
    fake.fail_next(1, status=422, body=json.dumps({"detail": detail}))
    with pytest.raises(BadRequestError, match="sends as a data URI: make it smaller"):
        await make("fal").detect(SCENE.render(), "blue square")


@pytest.mark.parametrize(("retryable", "status", "retried"), [("false", 503, False), ("true", 400, True)])
async def test_x_fal_retryable_overrides_the_status(
    fake: FakeMoondream, make: Callable[..., Any], delays: list[float], retryable: str, status: int, retried: bool
) -> None:
    fake.fail_next(1, status=status, headers={"X-Fal-Retryable": retryable})
    call = make("fal").detect(SCENE.render(), "blue square")
    if retried:
        assert len((await call).objects) == 1 and len(delays) == 1
    else:
        with pytest.raises(InternalServerError):
            await call
        assert delays == []


async def test_fal_query_sends_the_reasoning_choice_and_keeps_fals_plain_trace(
    fake: FakeMoondream, make: Callable[..., Any]
) -> None:
    fal = make("fal")
    plain = await fal.query(SCENE.render(), "How many red circles are there?")
    assert fake.requests[-1].json["reasoning"] is False and plain.reasoning is None
    thought = await fal.query(SCENE.render(), "How many red circles are there?", reasoning=True)
    assert fake.requests[-1].json["reasoning"] is True and fake.requests[-1].json["prompt"].startswith("How many")
    assert thought.reasoning is not None and thought.reasoning.text and thought.reasoning.grounding == []


async def test_fal_results_carry_usage(make: Callable[..., Any]) -> None:
    fal = make("fal")
    image = await fal.prepare(SCENE.render())
    for result in (await fal.caption(image), await fal.detect(image, "red circle"), await fal.segment(image, "blue square")):
        assert result.usage is not None and result.usage.input_tokens and result.usage.ttft_ms is not None


async def test_fal_max_objects_is_applied_here_and_the_count_tool_says_at_least(make: Callable[..., Any]) -> None:
    fal = make("fal")
    boxes = await fal.detect(SCENE.render(), "red circle", settings={"max_objects": 1})
    assert len(boxes.objects) == 1
    tools = VisionTools(fal, max_objects=1)
    tools.add_image(SCENE.render())
    result = await tools.count("img_1", "red circle")
    assert result.capped and result.text.startswith('Counted at least 1 "red circle"')


async def test_fal_refuses_settings_it_has_no_field_for(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    fal = make("fal")
    with pytest.raises(ValueError, match="no field for max_tokens"):
        await fal.caption(SCENE.render(), settings={"max_tokens": 20})
    with pytest.raises(ValueError, match="no spatial references"):
        await fal.point(SCENE.render(), "red circle", spatial_refs=[[0.5, 0.5]])
    assert fake.requests == [], "nothing was sent"


async def test_fal_segment_maps_spatial_references_and_settings(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    right = max(SCENE.matching("red circle"), key=lambda t: t.center[0])
    result = await make("fal").segment(
        SCENE.render(), "red circle", spatial_refs=[list(right.center)], settings={"temperature": 0.0}
    )
    body = fake.requests[-1].json
    assert body["object"] == "red circle" and body["spatial_references"] == [list(right.center)]
    assert body["settings"] == {"temperature": 0.0}
    assert abs(result.area_px - right.area_px) <= 0.02 * right.area_px


# ------------------------------------------------------------------ fal's queue


async def test_a_stalled_queue_job_times_out_and_is_cancelled(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    fal = make("fal-queue")
    fake.fal_queue_stall_next()
    with pytest.raises(APITimeoutError, match="queue did not finish"):
        await fal.detect(SCENE.render(), "blue square", timeout=0.5)
    assert len(fake.fal_cancelled) == 1


async def test_cancelling_the_caller_cancels_the_queued_job(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    fal = make("fal-queue")
    fake.fal_queue_stall_next()
    task = asyncio.create_task(fal.detect(SCENE.render(), "blue square"))
    while not any("/status" in r.path for r in fake.requests):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake.fal_cancelled) == 1
    assert fal._transport.limiter._semaphore()._value == fal.max_concurrency, "no request still holds a slot"


async def test_a_completed_job_with_an_error_is_a_typed_error(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    fake.fal_queue_error_next(message="GPU out of memory", error_type="runner_error")
    with pytest.raises(APIStatusError, match=r"with an error \(runner_error\): GPU out of memory"):
        await make("fal-queue").caption(SCENE.render())


async def test_queue_urls_must_stay_on_fals_hosts(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    fal = make("fal-queue")
    with pytest.raises(ResponseError, match="URL on another host"):
        await fal._transport.request_json("GET", "http://198.51.100.7/steal", headers=fal._auth(), options=fal._transport.options())


# ------------------------------------------------------------------ SAM 3


async def test_sam3_prompts_are_pixels_of_the_image_sent(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    right = max(SCENE.matching("red circle"), key=lambda t: t.center[0])
    sam = make("sam3")
    result = await sam.segment(SCENE.render(), "red circle", spatial_refs=[list(right.center), list(right.bbox)])
    body = fake.requests[-1].json
    assert body["prompt"] == "red circle" and body["sync_mode"] is True
    assert body["point_prompts"] == [{"x": round(right.center[0] * W), "y": round(right.center[1] * H), "label": 1}]
    assert body["box_prompts"][0]["x_min"] == round(right.bbox[0] * W)
    assert len(result.instances) == 1 and abs(result.area_px - right.area_px) <= 0.02 * right.area_px


async def test_sam3_keeps_every_mask_in_reading_order(make: Callable[..., Any]) -> None:
    sam = make("sam3")
    result = await sam.segment(SCENE.render(), "red circle")
    truths = sorted(SCENE.matching("red circle"), key=lambda t: t.center[1])
    assert [round(i.bbox_px.y_min) for i in result.instances] == sorted(round(i.bbox_px.y_min) for i in result.instances)
    assert all(i.score is not None for i in result.instances) and len(result.instances) == 2
    assert result.area_px == sum(i.area_px for i in result.instances)
    for instance, truth in zip(result.instances, truths):
        assert abs(instance.area_px - truth.area_px) <= 0.02 * truth.area_px
    assert result.mask(size=result.mask_size).size == (W, H)
    tools = VisionTools(make("fal"), segment_backend=sam)
    tools.add_image(SCENE.render())
    text = (await tools.segment("img_1", "red circle")).text
    assert "The model returned 2 masks (this is their union), scores in reading order:" in text


# ------------------------------------------------------------------ AIgateway


@pytest.mark.parametrize("name", ["aigateway", "aigateway-sam3"])
async def test_aigateway_sends_multipart_and_reads_the_mask(fake: FakeMoondream, make: Callable[..., Any], name: str) -> None:
    gateway = make(name)
    await gateway.segment(SCENE.render(), "blue square")
    form = fake.requests[-1].form
    assert form["prompt"] == "blue square" and form["model"] == gateway.model and form["response_format"] == "b64_json"
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {fake.aigateway_key}"


async def test_aigateway_402_is_insufficient_credits_and_not_retried(
    fake: FakeMoondream, make: Callable[..., Any], delays: list[float]
) -> None:
    body = {"error": {"message": "Wallet balance too low", "type": "insufficient_credits", "code": "402", "param": None}}
    fake.fail_next(1, status=402, body=json.dumps(body))
    with pytest.raises(InsufficientCreditsError, match="Wallet balance too low. The AIgateway wallet is empty: top it up"):
        await make("aigateway").segment(SCENE.render(), "blue square")
    assert delays == []


async def test_an_answer_that_is_not_a_mask_says_what_arrived(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    picture = io.BytesIO()
    SCENE.render().save(picture, "PNG")
    body = {"created": 1, "data": [{"b64_json": base64.b64encode(picture.getvalue()).decode()}]}
    fake.fail_next(1, status=200, body=json.dumps(body))
    with pytest.raises(ResponseError, match="not a mask: an RGB image"):
        await make("aigateway").segment(SCENE.render(), "blue square")


# ------------------------------------------------------------------ review regressions


@pytest.mark.parametrize("route", ["@evil.example/x", ".evil.example/x", ":8443/x", "https://queue.fal.run@evil.example/x"])
async def test_the_key_only_goes_to_fals_own_hosts(make: Callable[..., Any], route: str) -> None:
    fal = make("fal-queue")
    with pytest.raises(ResponseError):
        fal._transport.url(route)


async def test_a_queue_answer_with_relative_urls_is_refused_and_nothing_leaks(
    fake: FakeMoondream, make: Callable[..., Any]
) -> None:
    body = {"request_id": "r1", "status_url": "@evil.example/s", "response_url": "/r", "cancel_url": "/c"}
    fake.fail_next(1, status=200, body=json.dumps(body))
    with pytest.raises(ResponseError, match="lacks absolute status_url"):
        await make("fal-queue").detect(SCENE.render(), "blue square")
    assert all("evil" not in r.path for r in fake.requests)


async def test_cancelled_during_submit_the_job_is_still_cancelled(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    fal = make("fal-queue")
    prepared = await fal.prepare(SCENE.render())
    fake.latency = 0.3
    task = asyncio.create_task(fal.detect(prepared, "blue square"))
    await asyncio.sleep(0.1)  # the submit is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake.fal_cancelled) == 1, "the submit was let land, then the job cancelled"


async def test_the_timeout_covers_the_submit_and_a_failed_poll_cancels(
    fake: FakeMoondream, make: Callable[..., Any]
) -> None:
    fal = make("fal-queue")
    prepared = await fal.prepare(SCENE.render())
    fake.latency = 0.5  # the submit alone outlasts the call's timeout
    with pytest.raises(APITimeoutError):
        await fal.detect(prepared, "blue square", timeout=0.2)
    assert not any("/status" in r.path for r in fake.requests), "the timeout ended it during the submit"
    assert len(fake.fal_cancelled) == 1, "the submit was let land, then the job cancelled"
    fake.latency = 0.0
    fake.fail_next(1, status=500, route="/fal-queue/fal-ai/moondream3-preview/requests")
    with pytest.raises(InternalServerError):
        await fal.detect(prepared, "blue square", max_retries=0)
    assert len(fake.fal_cancelled) == 2


async def test_sam3_asks_for_every_instance_and_says_when_capped(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    five = Scene(1000, 300, [Shape("circle", "red", (100 + 200 * i, 150), 90) for i in range(5)])
    sam = make("sam3")
    result = await sam.segment(five.render(), "red circle")
    assert fake.requests[-1].json["max_masks"] == 32 and len(result.instances) == 5 and not result.capped
    limited = await sam.segment(five.render(), "red circle", settings={"max_objects": 2})
    assert limited.capped and len(limited.instances) == 2
    tools = VisionTools(make("fal"), segment_backend=sam)
    tools.add_image(five.render())
    assert "returned 5 masks" in (await tools.segment("img_1", "red circle")).text


async def test_sam3_hints_stay_inside_the_image_sent(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    await make("sam3").segment(SCENE.render(), "blue square", spatial_refs=[[1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    body = fake.requests[-1].json
    assert body["point_prompts"][0] == {"x": W - 1, "y": H - 1, "label": 1}
    assert body["box_prompts"][0] == {"x_min": 0, "y_min": 0, "x_max": W - 1, "y_max": H - 1}


async def test_a_failed_mask_download_never_shows_the_presigned_query(fake: FakeMoondream, make: Callable[..., Any]) -> None:
    url = f"{fake.url}/aigateway-files/nope/mask.png?token=sk-live-SECRET123&sig=abc"
    fake.fail_next(1, status=200, body=json.dumps({"created": 1, "data": [{"url": url}]}))
    with pytest.raises(ResponseError) as info:
        await make("aigateway").segment(SCENE.render(), "blue square")
    assert "HTTP 404" in str(info.value) and "sk-live-SECRET123" not in str(info.value)


async def test_an_oversized_mask_is_refused_before_decoding(fake: FakeMoondream) -> None:
    huge = io.BytesIO()
    Image.new("L", (3000, 3000)).save(huge, "PNG")
    fake.fail_next(1, status=200, body=json.dumps({"created": 1, "data": [{"b64_json": base64.b64encode(huge.getvalue()).decode()}]}))
    async with AIGatewaySegmenter(
        api_key=fake.aigateway_key, base_url=fake.aigateway_base_url, image_settings=ImageSettings(max_pixels=1_000_000)
    ) as gateway:
        with pytest.raises(ResponseError, match="3000x3000 pixels, over the limit of 1000000"):
            await gateway.segment(SCENE.render(), "blue square")


def test_non_finite_scores_are_dropped() -> None:
    mask = Image.new("L", (8, 8))
    mask.putpixel((2, 2), 255)
    result = Segmentation.from_masks([mask], image_size=ImageSize(width=8, height=8), scores=[float("nan")])
    assert result.found and result.score is None and result.instances[0].score is None
