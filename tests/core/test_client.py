"""AsyncMoondream over real HTTP against the emulator: every method, stream and error."""

from __future__ import annotations

import asyncio
import email.utils
import gc
import io
import time
from typing import Any

import pytest
from PIL import Image

from moondream_tools import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncMoondream,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ImageError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseError,
    SegmentBBoxEvent,
    SegmentFinalEvent,
    SegmentPathDeltaEvent,
    Timeout,
    __version__,
)
from moondream_tools.testing import FakeMoondream, Scene, Shape

SKILL_ROUTES = ("/v1/caption", "/v1/query", "/v1/detect", "/v1/point", "/v1/segment")


def three_shapes() -> Scene:
    return Scene(
        640,
        480,
        [
            Shape("circle", "red", (120, 110), 90),
            Shape("square", "blue", (480, 120), 100),
            Shape("triangle", "yellow", (320, 360), 120),
        ],
    )


# ------------------------------------------------------------------ configuration


def test_config_argument_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", "env-key")
    monkeypatch.setenv("MOONDREAM_BASE_URL", "http://localhost:2020/v1/")
    md = AsyncMoondream()
    assert md.base_url == "http://localhost:2020/v1"
    assert md.has_api_key
    md = AsyncMoondream(api_key="arg-key", base_url="http://example.test/v1")
    assert md.base_url == "http://example.test/v1"
    monkeypatch.delenv("MOONDREAM_BASE_URL")
    assert AsyncMoondream().base_url == "https://api.moondream.ai/v1"


def test_cloud_without_key_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="MOONDREAM_API_KEY") as info:
        AsyncMoondream()
    assert "localhost:2020" in str(info.value)
    station = AsyncMoondream(base_url="http://localhost:2020/v1")
    assert not station.has_api_key


def test_bad_base_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="http"):
        AsyncMoondream(base_url="localhost:2020")


def test_repr_never_shows_the_key() -> None:
    md = AsyncMoondream(api_key="sk-secret-123", base_url="http://localhost:2020/v1")
    assert "sk-secret-123" not in repr(md)
    assert "api_key=set" in repr(md)


# ------------------------------------------------------------------ every method, against ground truth


async def test_caption_lists_the_shapes(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = three_shapes()
    result = await client.caption(scene.render(), length="normal")
    for label in ("red circle", "blue square", "yellow triangle"):
        assert label in result.caption.lower()
    assert result.request_id and result.request_id.startswith("req_")
    assert result.image_size is not None and result.image_size.as_tuple() == (640, 480)
    short = await client.caption(scene.render(), length="short")
    assert short.caption != result.caption
    assert fake.requests[-1].json["length"] == "short"


async def test_query_counts_and_answers_without_an_image(client: AsyncMoondream) -> None:
    scene = Scene(
        640, 480,
        [Shape("circle", "red", (100, 100), 60), Shape("circle", "red", (300, 100), 60),
         Shape("square", "green", (500, 300), 80)],
    )
    answer = await client.query(scene.render(), "How many red circles are there?")
    assert answer.answer.strip() == str(scene.count("red circles")) == "2"
    assert answer.reasoning is None
    text_only = await client.query(None, "What is a circle?")
    assert text_only.answer
    assert text_only.image_size is None


async def test_query_reasoning_grounding_in_pixels(client: AsyncMoondream) -> None:
    scene = three_shapes()
    answer = await client.query(scene.render(), "How many circles?", reasoning=True)
    assert answer.reasoning is not None and answer.reasoning.grounding
    truth = {t.label: t for t in scene.truth()}
    found = answer.grounding_pixels()
    red = truth["red circle"]
    spans = [points for text, points in found if "red circle" in text.lower()]
    assert spans, found
    px = spans[0][0]
    assert abs(px.x - red.center[0] * 640) <= 0.02 * 640
    assert abs(px.y - red.center[1] * 480) <= 0.02 * 480


@pytest.mark.parametrize("seed", range(6))
async def test_detect_and_point_match_ground_truth_on_random_scenes(
    client: AsyncMoondream, seed: int
) -> None:
    scene = Scene.random(seed=seed, width=800, height=600)
    prepared = await client.prepare(scene.render())
    for truth in scene.truth():
        boxes = await client.detect(prepared, truth.label)
        points = await client.point(prepared, truth.label)
        expected = scene.matching(truth.label)
        assert len(boxes.objects) == len(expected) == len(points.points)
        best = min(boxes.objects, key=lambda b: abs(b.x_min - truth.bbox[0]) + abs(b.y_min - truth.bbox[1]))
        for got, want in zip((best.x_min, best.y_min, best.x_max, best.y_max), truth.bbox, strict=True):
            assert abs(got - want) <= 0.02
        nearest = min(points.points, key=lambda p: abs(p.x - truth.center[0]) + abs(p.y - truth.center[1]))
        assert abs(nearest.x - truth.center[0]) <= 0.02 and abs(nearest.y - truth.center[1]) <= 0.02


async def test_detect_pixels_and_max_objects(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = Scene(
        400, 300, [Shape("square", "blue", (60 + 90 * i, 150), 50) for i in range(4)]
    )
    result = await client.detect(scene.render(), "blue squares", settings={"max_objects": 2})
    assert len(result.objects) == 2
    assert fake.requests[-1].json["settings"] == {"max_objects": 2}
    full = await client.detect(scene.render(), "blue squares")
    pixels = full.to_pixels()
    truth = sorted(scene.truth(), key=lambda t: t.bbox[0])
    for box, want in zip(sorted(pixels, key=lambda b: b.x_min), truth, strict=True):
        x0, y0, x1, y1 = want.bbox_px
        assert abs(box.x_min - x0) <= 0.02 * 400 and abs(box.x_max - x1) <= 0.02 * 400
        assert abs(box.y_min - y0) <= 0.02 * 300 and abs(box.y_max - y1) <= 0.02 * 300
    dumped = full.model_dump()
    assert set(dumped["objects"][0]) == {"x_min", "y_min", "x_max", "y_max"}


async def test_segment_returns_path_and_bbox(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = three_shapes()
    result = await client.segment(scene.render(), "blue square", spatial_refs=[[0.75, 0.25]])
    assert result.found
    truth = scene.matching("blue square")[0]
    assert result.bbox is not None
    for got, want in zip(
        (result.bbox.x_min, result.bbox.y_min, result.bbox.x_max, result.bbox.y_max), truth.bbox, strict=True
    ):
        assert abs(got - want) <= 0.02
    assert result.path.startswith("M") and " " not in result.path
    assert fake.requests[-1].json["spatial_refs"] == [[0.75, 0.25]]
    assert fake.requests[-1].json["stream"] is False
    missing = await client.segment(scene.render(), "green circle")
    assert not missing.found


async def test_chat_and_models(fake: FakeMoondream, client: AsyncMoondream) -> None:
    scene = three_shapes()
    result = await client.chat(
        [{"role": "user", "content": [{"type": "image", "image": scene.render()},
                                      {"type": "text", "text": "How many squares?"}]}],
        reasoning=True, temperature=0.2, top_p=0.9, max_tokens=50,
    )
    assert result.content.strip() == "1"
    assert result.reasoning
    body = fake.requests[-1].json
    assert body["model"] == "moondream3-preview"
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["max_completion_tokens"] == 50
    part = body["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    models = await client.models()
    assert [m.id for m in models] == ["moondream3-preview", "moondream2"]


async def test_model_client_wide_and_per_call(fake: FakeMoondream) -> None:
    scene = three_shapes()
    async with AsyncMoondream(
        api_key=fake.api_key, base_url=fake.base_url, model="moondream3-preview/ft-1@100"
    ) as md:
        await md.detect(scene.render(), "circle")
        assert fake.requests[-1].json["model"] == "moondream3-preview/ft-1@100"
        await md.detect(scene.render(), "circle", model="moondream2")
        assert fake.requests[-1].json["model"] == "moondream2"
        await md.chat([{"role": "user", "content": "hi"}])
        assert fake.requests[-1].json["model"] == "moondream3-preview/ft-1@100"


async def test_headers_and_auth_styles(fake: FakeMoondream, client: AsyncMoondream) -> None:
    await client.caption(three_shapes().render())
    headers = fake.requests[-1].headers
    assert headers["X-Moondream-Auth"] == fake.api_key
    assert "Authorization" not in headers
    assert headers["User-Agent"] == f"moondream-tools/{__version__}"
    assert headers["Content-Type"] == "application/json"
    await client.chat([{"role": "user", "content": "hi"}])
    headers = fake.requests[-1].headers
    assert headers["Authorization"] == f"Bearer {fake.api_key}"
    assert "X-Moondream-Auth" not in headers


# ------------------------------------------------------------------ streams


async def test_stream_caption_joins_to_the_caption(client: AsyncMoondream) -> None:
    image = three_shapes().render()
    whole = (await client.caption(image)).caption
    stream = client.stream_caption(image)
    pieces = [piece async for piece in stream]
    assert len(pieces) > 1
    assert "".join(pieces) == whole
    assert stream.completed and stream.request_id


async def test_stream_accepts_text_key(fake: FakeMoondream) -> None:
    async with FakeMoondream(api_key=None, stream_text_key="text") as station:
        async with AsyncMoondream(base_url=station.base_url) as md:
            image = three_shapes().render()
            pieces = [p async for p in md.stream_query(image, "How many shapes?")]
            assert "".join(pieces).strip() == "3"
            assert "X-Moondream-Auth" not in station.requests[-1].headers


async def test_stream_segment_event_order(client: AsyncMoondream) -> None:
    scene = three_shapes()
    events = [e async for e in client.stream_segment(scene.render(), "red circle")]
    assert isinstance(events[0], SegmentBBoxEvent)
    assert all(isinstance(e, SegmentPathDeltaEvent) for e in events[1:-1]) and len(events) > 2
    assert isinstance(events[-1], SegmentFinalEvent)
    coarse = "".join(e.chunk for e in events[1:-1])
    assert coarse.startswith("M ") and " L " in coarse
    final = events[-1].segmentation
    assert final.found and final.image_size is not None
    truth = scene.matching("red circle")[0]
    assert abs(final.bbox.x_min - truth.bbox[0]) <= 0.02


async def test_stream_chat(client: AsyncMoondream) -> None:
    image = three_shapes().render()
    stream = client.stream_chat(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "How many triangles?"}]}]
    )
    text = "".join([piece async for piece in stream])
    assert text.strip() == "1"
    assert stream.completed


async def test_closing_a_stream_early_closes_the_response(fake: FakeMoondream, client: AsyncMoondream) -> None:
    image = three_shapes().render()
    async with client.stream_caption(image, length="long") as stream:
        async for _ in stream:
            break
    assert not stream.completed
    connector = client._transport.sessions.pooled.connector  # type: ignore[union-attr]
    assert connector is not None and len(connector._acquired) == 0  # type: ignore[attr-defined]
    # The client still works afterwards.
    assert (await client.caption(image)).caption


async def test_stream_cut_in_the_middle_is_not_retried(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.drop_stream_next(1, after_events=2)
    received: list[str] = []
    with pytest.raises((APIConnectionError, ResponseError)):
        async for piece in client.stream_caption(three_shapes().render(), length="long"):
            received.append(piece)
    assert received, "events before the cut were delivered"
    assert len([r for r in fake.requests if r.path == "/v1/caption"]) == 1


async def test_stream_retries_before_its_first_event(
    fake: FakeMoondream, client: AsyncMoondream, delays: list[float]
) -> None:
    fake.fail_next(1, status=503)
    pieces = [p async for p in client.stream_caption(three_shapes().render())]
    assert pieces
    assert len(fake.requests) == 2 and len(delays) == 1


# ------------------------------------------------------------------ errors and retries


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, BadRequestError),
        (429, RateLimitError),
        (500, InternalServerError),
        (418, APIStatusError),
    ],
)
async def test_status_errors_are_typed(
    fake: FakeMoondream, client: AsyncMoondream, delays: list[float], status: int, error: type[Exception]
) -> None:
    fake.fail_next(10, status=status)
    with pytest.raises(error) as info:
        await client.detect(three_shapes().render(), "circle", max_retries=1)
    assert info.value.status_code == status  # type: ignore[attr-defined]
    assert f"HTTP {status}" in str(info.value)
    retried = status in (429, 500)
    assert len(fake.requests) == (2 if retried else 1)


async def test_wrong_key_is_an_authentication_error(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key="wrong-key", base_url=fake.base_url) as md:
        with pytest.raises(AuthenticationError, match="MOONDREAM_API_KEY") as info:
            await md.caption(three_shapes().render())
    assert "wrong-key" not in str(info.value) and "wrong-key" not in repr(info.value.body)


async def test_retry_after_seconds_then_success(
    fake: FakeMoondream, client: AsyncMoondream, delays: list[float]
) -> None:
    fake.fail_next(1, status=429, retry_after="1")
    result = await client.point(three_shapes().render(), "circle")
    assert len(result.points) == 1
    assert delays == [1.0]
    assert [r.path for r in fake.requests] == ["/v1/point", "/v1/point"]


async def test_retry_after_http_date_is_honored_and_capped(
    fake: FakeMoondream, delays: list[float]
) -> None:
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    fake.fail_next(1, status=503, retry_after=later)
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, max_retry_after=5) as md:
        await md.detect(three_shapes().render(), "square")
    assert delays == [5.0]


async def test_503_without_retry_after_backs_off_with_jitter(
    fake: FakeMoondream, client: AsyncMoondream, delays: list[float]
) -> None:
    fake.fail_next(2, status=503)
    await client.caption(three_shapes().render())
    assert len(delays) == 2
    assert 0 <= delays[0] <= 0.5 and 0 <= delays[1] <= 1.0


async def test_retries_exhausted(fake: FakeMoondream, client: AsyncMoondream, delays: list[float]) -> None:
    fake.fail_next(10, status=502)
    with pytest.raises(InternalServerError):
        await client.caption(three_shapes().render(), max_retries=3)
    assert len(fake.requests) == 4 and len(delays) == 3


async def test_non_retryable_status_is_not_retried(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.fail_next(1, status=400, body='{"error": "object must not be empty"}')
    with pytest.raises(BadRequestError, match="object must not be empty"):
        await client.detect(three_shapes().render(), "x")
    assert len(fake.requests) == 1


async def test_html_error_page_from_a_proxy(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.fail_next(1, status=502, body="<html><body>Bad gateway</body></html>", content_type="text/html")
    with pytest.raises(InternalServerError, match="HTML page") as info:
        await client.caption(three_shapes().render(), max_retries=0)
    assert info.value.status_code == 502


async def test_station_errors_map_to_types(
    fake: FakeMoondream, client: AsyncMoondream, delays: list[float]
) -> None:
    image = three_shapes().render()
    fake.station_error_next(1, "Request queue is full")
    assert (await client.caption(image)).caption  # retried, then succeeded
    assert len(delays) == 1
    fake.station_error_next(5, "Request queue is full")
    with pytest.raises(RateLimitError, match="queue is full"):
        await client.caption(image, max_retries=0)
    fake.reset()
    fake.station_error_next(1, "Request timed out")
    with pytest.raises(APITimeoutError, match="timed out"):
        await client.caption(image, max_retries=0)
    fake.station_error_next(1, "Function 'detect' not available")
    with pytest.raises(NotFoundError, match="not available"):
        await client.detect(image, "circle")
    assert len(fake.requests) == 2, "a missing function is not retried"


async def test_malformed_json_is_a_response_error(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.malformed_next(1)
    with pytest.raises(ResponseError, match="not valid JSON"):
        await client.detect(three_shapes().render(), "circle")


async def test_timeout_per_call(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.hang_next(1, seconds=5)
    with pytest.raises(APITimeoutError, match="timeout"):
        await client.detect(three_shapes().render(), "circle", timeout=Timeout(total=0.3), max_retries=0)


async def test_timeout_is_retried(fake: FakeMoondream, client: AsyncMoondream, delays: list[float]) -> None:
    fake.hang_next(1, seconds=5)
    result = await client.detect(three_shapes().render(), "circle", timeout=0.3, max_retries=1)
    assert len(result.objects) == 1
    assert len(delays) == 1


async def test_connection_refused(delays: list[float]) -> None:
    async with FakeMoondream() as gone:
        url = gone.base_url
    async with AsyncMoondream(api_key="k", base_url=url, max_retries=1) as md:
        with pytest.raises(APIConnectionError, match="could not talk to"):
            await md.caption(three_shapes().render())
    assert len(delays) == 1


async def test_bad_image_fails_before_any_request(fake: FakeMoondream, client: AsyncMoondream) -> None:
    with pytest.raises(ImageError, match="not an image"):
        await client.detect(b"GIF89a broken", "circle")
    assert fake.requests == []


async def test_argument_validation(client: AsyncMoondream) -> None:
    image = three_shapes().render()
    with pytest.raises(ValueError, match="length"):
        await client.caption(image, length="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spatial ref"):
        await client.point(image, "circle", spatial_refs=[[1.5, 0.2]])
    with pytest.raises(ValueError, match="object"):
        await client.detect(image, " ")


# ------------------------------------------------------------------ images through the API


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
async def test_boxes_are_in_the_oriented_frame(client: AsyncMoondream, orientation: int) -> None:
    scene = Scene.random(seed=40 + orientation, width=640, height=480)
    oriented = scene.render()
    inverse = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = oriented if inverse[orientation] is None else oriented.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    truth = scene.truth()[0]
    result = await client.detect(buffer.getvalue(), truth.label)
    assert result.image_size is not None and result.image_size.as_tuple() == (640, 480)
    box = result.to_pixels()[0]
    x0, y0, x1, y1 = truth.bbox_px
    assert abs(box.x_min - x0) <= 13 and abs(box.y_min - y0) <= 10
    assert abs(box.x_max - x1) <= 13 and abs(box.y_max - y1) <= 10


async def test_twelve_megapixel_scene(client: AsyncMoondream) -> None:
    scene = Scene.random(seed=3, width=640, height=480).scaled(6.25)  # 4000 x 3000
    assert scene.size == (4000, 3000)
    result = await client.point(scene.render(), "shapes")
    assert len(result.points) == len(scene.truth())
    for truth in scene.truth():
        assert any(
            abs(p.x - truth.center[0]) <= 0.02 and abs(p.y - truth.center[1]) <= 0.02 for p in result.points
        )


# ------------------------------------------------------------------ sessions and event loops


async def test_one_pooled_session_reused(fake: FakeMoondream, client: AsyncMoondream) -> None:
    image = await client.prepare(three_shapes().render())
    await client.detect(image, "circle")
    session = client._transport.sessions.pooled
    await client.point(image, "circle")
    assert client._transport.sessions.pooled is session
    await client.aclose()
    assert session is not None and session.closed
    with pytest.raises(RuntimeError, match="closed"):
        await client.detect(image, "circle")


async def test_call_from_another_event_loop_in_a_worker_thread(
    fake: FakeMoondream, client: AsyncMoondream
) -> None:
    image = three_shapes().render()
    await client.detect(image, "circle")  # the pool now belongs to this loop
    pooled = client._transport.sessions.pooled

    def in_thread() -> int:
        return len(asyncio.run(client.detect(image, "circle")).objects)

    assert await asyncio.to_thread(in_thread) == 1
    assert client._transport.sessions.pooled is pooled and not pooled.closed  # type: ignore[union-attr]
    assert len((await client.detect(image, "square")).objects) == 1


def test_client_shared_across_asyncio_run_calls(threaded_fake: FakeMoondream) -> None:
    """A plain script calling asyncio.run() several times with one client works and leaks nothing.

    The first run pools a session on its loop; once that loop is closed the next run
    replaces the pool, closing the dead loop's sockets (warnings are errors here).
    """
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    image = three_shapes().render()
    first = asyncio.run(md.detect(image, "circle"))
    second = asyncio.run(md.detect(image, "square"))
    assert len(first.objects) == len(second.objects) == 1
    asyncio.run(md.aclose())
    gc.collect()


# ------------------------------------------------------------------ the key never leaks


async def test_key_is_redacted_from_errors_and_logs(
    fake: FakeMoondream, delays: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="moondream_tools")
    key = fake.api_key
    assert key
    async with AsyncMoondream(api_key=key, base_url=fake.base_url) as md:
        fake.fail_next(1, status=503, body=f'{{"error": "upstream refused key {key}"}}')
        fake.fail_next(1, status=400, body=f'{{"error": "bad request from key {key}"}}')
        with pytest.raises(BadRequestError) as info:
            await md.detect(three_shapes().render(), "circle")
        await md.detect(three_shapes().render(), "circle")
    assert "[redacted]" in str(info.value)
    everything = " ".join([str(info.value), repr(info.value.body), repr(md), caplog.text])
    assert key not in everything
    assert any("POST /detect" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")
    assert any("retrying POST /detect" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ malformed answers and URL images


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"objects": null}', "objects"),
        ('{"objects": [{"x_min": 0.1, "y_min": 0.1, "x_max": NaN, "y_max": 0.3}]}', "x_max"),
        ('{"objects": [{"x_min": "left"}]}', "objects"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
async def test_wrong_types_are_response_errors(
    fake: FakeMoondream, client: AsyncMoondream, body: str, message: str
) -> None:
    fake.fail_next(1, status=200, body=body)
    with pytest.raises(ResponseError, match=message):
        await client.detect(three_shapes().render(), "circle")


async def test_numbers_as_strings_are_read_as_numbers(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.fail_next(1, status=200, body='{"points": [{"x": "0.25", "y": "0.5"}], "request_id": "r1"}')
    result = await client.point(three_shapes().render(), "circle")
    assert result.request_id == "r1"
    assert result.to_pixels()[0].x == 160 and result.to_pixels()[0].y == 240


async def test_stream_without_final_event_is_a_response_error(fake: FakeMoondream, client: AsyncMoondream) -> None:
    fake.fail_next(1, status=200, body='data: {"chunk": "A red"}\n\n', content_type="text/event-stream")
    with pytest.raises(ResponseError, match="ended before its final event"):
        async for _ in client.stream_caption(three_shapes().render()):
            pass


@pytest.fixture
async def image_host() -> Any:
    """A loopback web server serving an image, a 404 and a text page."""
    from aiohttp import web

    png = io.BytesIO()
    three_shapes().render().save(png, "PNG")

    async def image(_: web.Request) -> web.Response:
        return web.Response(body=png.getvalue(), content_type="image/png")

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="hello, not an image")

    app = web.Application()
    app.router.add_get("/shapes.png", image)
    app.router.add_get("/page.txt", text)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_http_image_urls(image_host: str, client: AsyncMoondream) -> None:
    result = await client.detect(f"{image_host}/shapes.png", "square")
    assert len(result.objects) == 1 and result.image_size is not None
    assert result.image_size.as_tuple() == (640, 480)
    with pytest.raises(ImageError, match="HTTP 404"):
        await client.detect(f"{image_host}/missing.png", "square")
    with pytest.raises(ImageError, match="not an image"):
        await client.detect(f"{image_host}/page.txt", "square")
