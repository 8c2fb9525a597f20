"""Fault matrix: every way the network or the server can fail, and what the caller gets.

Each row asserts, against the offline emulator (or a tiny raw server on 127.0.0.1 when
the emulator cannot produce the fault):

* the exact exception class from ``moondream_tools`` (or success, when the client
  absorbs the fault by retrying);
* that the message names the route and says what went wrong (and, in
  ``test_message_says_what_to_do``, what to do about it);
* how many requests the server received, i.e. whether the fault was retried;
* that the client is still usable: a following good call succeeds.

Then: cancellation (no leaked connections or tasks), batches (per-item errors in input
order), and the API key never leaking through any result, error, log line or repr.
The table in docs/faults.md is a summary of this module; keep the two in step.

Backoff delays are recorded instead of slept (``delays``); nothing here depends on
timing except as a generous upper bound. No test connects anywhere but loopback
(``loopback_only`` enforces it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from moondream_tools import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncMoondream,
    AuthenticationError,
    BadRequestError,
    CountResult,
    ImageAccessError,
    ImageError,
    InternalServerError,
    MoondreamError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseError,
    Timeout,
    ToolArgumentsError,
    VisionTools,
    tool_error_text,
)
from moondream_tools import _transport as transport_module
from moondream_tools.testing import FakeMoondream, Scene, Shape

SECRET = "sk-SECRET-123456"
OTHER_SECRET = "sk-OTHER-654321"

SCENE = Scene(
    320,
    240,
    [Shape("circle", "red", (80, 80), 45), Shape("square", "blue", (240, 160), 50)],
)
IMAGE = SCENE.render()
BROKEN_IMAGE = b"GIF89a broken"

DEFAULT_ATTEMPTS = 3  # AsyncMoondream(max_retries=2): one try plus two retries

# ---------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record retry backoff delays instead of sleeping them.

    The client's exponential base is shrunk too, so the client-wide pause a rate limit
    causes (slept inside the limiter, not through ``_sleep``) stays in milliseconds.
    """
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(transport_module, "_sleep", fake_sleep)
    monkeypatch.setattr(transport_module, "BACKOFF_BASE", 0.001)
    return recorded


@pytest.fixture(autouse=True)
async def loopback_only(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Refuse (and fail the test on) any connection from this loop to a non-loopback address."""
    loop = asyncio.get_running_loop()
    blocked: list[str] = []
    real_sock_connect = loop.sock_connect
    real_create_connection = loop.create_connection

    def check(host: Any) -> None:
        if host is None:
            return
        name = str(host).strip("[]").split("%")[0]
        try:
            ok = ipaddress.ip_address(name).is_loopback
        except ValueError:
            ok = name == "localhost"
        if not ok:
            blocked.append(str(host))
            raise OSError(f"test guard: refusing to connect to non-loopback {host!r}")

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        check(address[0] if isinstance(address, tuple) else None)
        return await real_sock_connect(sock, address)

    async def create_connection(*args: Any, **kwargs: Any) -> Any:
        check(kwargs.get("host", args[1] if len(args) > 1 else None))
        return await real_create_connection(*args, **kwargs)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    monkeypatch.setattr(loop, "create_connection", create_connection)
    yield
    assert not blocked, f"tried to connect outside loopback: {blocked}"


@pytest.fixture
async def md(fake: FakeMoondream) -> AsyncIterator[AsyncMoondream]:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as client:
        yield client


async def eventually(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after a generous ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {limit} s: {what}")
        await asyncio.sleep(0.01)


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[arg-type]


def acquired(client: AsyncMoondream) -> int:
    session = client._transport.sessions.pooled
    if session is None or session.connector is None:
        return 0
    return len(session.connector._acquired)  # type: ignore[attr-defined]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------- calls

ROUTES = {
    "detect": "/detect",
    "point": "/point",
    "caption": "/caption",
    "stream_caption": "/caption",
}


async def call(client: AsyncMoondream, kind: str, **kwargs: Any) -> Any:
    """One call of ``kind``; streams are drained into a list."""
    if kind == "detect":
        return await client.detect(IMAGE, "circle", **kwargs)
    if kind == "point":
        return await client.point(IMAGE, "circle", **kwargs)
    if kind == "caption":
        return await client.caption(IMAGE, **kwargs)
    if kind == "stream_caption":
        return [piece async for piece in client.stream_caption(IMAGE, **kwargs)]
    raise AssertionError(kind)


def check_success(kind: str, result: Any) -> None:
    if kind in ("detect",):
        assert len(result.objects) == 1
    elif kind == "point":
        assert len(result.points) == 1
    elif kind == "caption":
        assert "red circle" in result.caption
    else:
        assert "red circle" in "".join(result)


async def still_usable(client: AsyncMoondream, fake: FakeMoondream | None) -> None:
    """A good call right after the fault succeeds (and is a single request)."""
    before = len(fake.requests) if fake is not None else 0
    if fake is not None:
        assert fake.pending_faults == 0, "the row left unused faults behind"
    result = await client.detect(IMAGE, "circle")
    assert len(result.objects) == 1
    if fake is not None:
        assert len(fake.requests) == before + 1


# ---------------------------------------------------------------------- the matrix (emulator)


@dataclass(frozen=True)
class Row:
    """One fault the emulator can produce.

    ``error`` None means the client absorbs the fault and the call succeeds.
    ``says`` are fragments the message must contain (what went wrong); ``advice`` is a
    regex for what to do about it, or None when the message gives no advice today
    (see ``test_message_says_what_to_do``).
    """

    id: str
    inject: Callable[[FakeMoondream], None]
    error: type[MoondreamError] | None
    requests: int
    kind: str = "detect"
    says: tuple[str, ...] = ()
    advice: str | None = None
    status: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    retry_delays: tuple[float, ...] | None = None


HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>nginx</body></html>"

ROWS: list[Row] = [
    # --- timeouts and broken connections
    Row("timeout-before-headers-retried-then-ok", lambda f: f.hang_next(1, seconds=5), None, 2,
        kwargs={"timeout": 0.3}),
    Row("timeout-before-headers-exhausted", lambda f: f.hang_next(3, seconds=5), APITimeoutError,
        DEFAULT_ATTEMPTS, says=("no answer", "within the timeout", "0.3 s total"),
        advice=r"Raise timeout=", kwargs={"timeout": 0.3}),
    Row("reset-mid-body-retried-then-ok", lambda f: f.drop_stream_next(1), None, 2),
    Row("reset-mid-body-exhausted", lambda f: f.drop_stream_next(3), APIConnectionError, DEFAULT_ATTEMPTS,
        says=("could not talk to", "ClientPayloadError"), advice=r"Check base_url"),
    # --- 4xx: not retried
    Row("400-json", lambda f: f.fail_next(1, status=400, body='{"error": "object is too long"}'),
        BadRequestError, 1, says=("HTTP 400", "object is too long"), status=400),
    Row("400-plain-text", lambda f: f.fail_next(1, status=400, body="bad request: no object",
                                                content_type="text/plain"),
        BadRequestError, 1, says=("HTTP 400", "bad request: no object"), status=400),
    Row("401-json", lambda f: f.fail_next(1, status=401, body='{"error": "Invalid API key"}'),
        AuthenticationError, 1, says=("HTTP 401", "Invalid API key"), advice=r"Check the API key", status=401),
    Row("403-plain-text", lambda f: f.fail_next(1, status=403, body="Forbidden", content_type="text/plain"),
        PermissionDeniedError, 1, says=("HTTP 403", "Forbidden"), status=403),
    Row("404-plain-text", lambda f: f.fail_next(1, status=404, body="404 page not found",
                                                content_type="text/plain"),
        NotFoundError, 1, says=("HTTP 404", "page not found"), advice=r"Check base_url", status=404),
    Row("422-json-detail",
        lambda f: f.fail_next(1, status=422, body='{"detail": {"message": "object: field required"}}'),
        BadRequestError, 1, says=("HTTP 422", "object: field required"), status=422),
    # --- 5xx: retried
    Row("500-json-exhausted", lambda f: f.fail_next(3, status=500, body='{"error": "model crashed"}'),
        InternalServerError, DEFAULT_ATTEMPTS, says=("HTTP 500", "model crashed"), advice=r"retry later",
        status=500),
    Row("500-plain-text-exhausted", lambda f: f.fail_next(3, status=500, body="upstream exploded",
                                                          content_type="text/plain"),
        InternalServerError, DEFAULT_ATTEMPTS, says=("HTTP 500", "upstream exploded"), advice=r"retry later",
        status=500),
    Row("502-html-from-a-proxy", lambda f: f.fail_next(3, status=502, body=HTML_PAGE, content_type="text/html"),
        InternalServerError, DEFAULT_ATTEMPTS, says=("HTTP 502", "HTML page", "proxy"), advice=r"retry later",
        status=502),
    Row("503-then-success", lambda f: f.fail_next(1, status=503), None, 2),
    Row("429-retry-after-then-success", lambda f: f.fail_next(2, status=429, retry_after="0.05"), None, 3,
        retry_delays=(0.05, 0.05)),
    Row("429-retry-after-exhausted", lambda f: f.fail_next(3, status=429, retry_after="0.05"),
        RateLimitError, DEFAULT_ATTEMPTS, says=("HTTP 429",), advice=r"slow down|retry later", status=429,
        retry_delays=(0.05, 0.05)),
    # --- malformed answers: never retried
    Row("truncated-json", lambda f: f.malformed_next(1), ResponseError, 1, says=("not valid JSON",)),
    Row("objects-null", lambda f: f.fail_next(1, status=200, body='{"objects": null}'), ResponseError, 1,
        says=("objects", "does not match the Moondream API")),
    Row("coordinate-as-word", lambda f: f.fail_next(
        1, status=200, body='{"objects": [{"x_min": "left", "y_min": 0.1, "x_max": 0.5, "y_max": 0.5}]}'),
        ResponseError, 1, says=("objects.0.x_min", "number")),
    Row("coordinate-nan", lambda f: f.fail_next(
        1, status=200, body='{"objects": [{"x_min": 0.1, "y_min": 0.1, "x_max": NaN, "y_max": 0.5}]}'),
        ResponseError, 1, says=("objects.0.x_max",)),
    Row("points-as-a-dict", lambda f: f.fail_next(1, status=200, body='{"points": {"x": 0.5, "y": 0.5}}'),
        ResponseError, 1, kind="point", says=("points", "valid list")),
    Row("json-array-instead-of-object", lambda f: f.fail_next(1, status=200, body="[1, 2]"), ResponseError, 1,
        says=("expected a JSON object",)),
    Row("sse-without-final-event", lambda f: f.fail_next(
        1, status=200, body='data: {"chunk": "A red"}\n\n', content_type="text/event-stream"),
        ResponseError, 1, kind="stream_caption", says=("ended before its final event",)),
    Row("sse-empty-body", lambda f: f.fail_next(1, status=200, body="", content_type="text/event-stream"),
        ResponseError, 1, kind="stream_caption", says=("ended before its final event",)),
    # --- Moondream Station's HTTP-200 {"error": ...}
    Row("station-queue-full-then-success", lambda f: f.station_error_next(1, "Request queue is full"), None, 2),
    Row("station-queue-full-exhausted", lambda f: f.station_error_next(3, "Request queue is full"),
        RateLimitError, DEFAULT_ATTEMPTS, says=("HTTP 200 with an error", "queue is full"), status=200),
    Row("station-timeout", lambda f: f.station_error_next(3, "Request timed out"), APITimeoutError,
        DEFAULT_ATTEMPTS, says=("HTTP 200 with an error", "timed out")),
    Row("station-function-not-available", lambda f: f.station_error_next(1, "Function 'detect' not available"),
        NotFoundError, 1, says=("HTTP 200 with an error", "not available"), status=200),
    Row("station-unknown-error", lambda f: f.station_error_next(1, "CUDA error: device-side assert"),
        APIStatusError, 1, says=("HTTP 200 with an error", "CUDA error"), status=200),
    Row("station-error-in-a-stream", lambda f: f.fail_next(
        1, status=200, body='data: {"error": "Function caption not available"}\n\n',
        content_type="text/event-stream"),
        NotFoundError, 1, kind="stream_caption", says=("HTTP 200 with an error", "not available"), status=200),
]


async def run_row(row: Row, fake: FakeMoondream, client: AsyncMoondream) -> MoondreamError | None:
    row.inject(fake)
    if row.error is None:
        check_success(row.kind, await call(client, row.kind, **row.kwargs))
        return None
    with pytest.raises(MoondreamError) as info:
        await call(client, row.kind, **row.kwargs)
    return info.value


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
async def test_fault_row(row: Row, fake: FakeMoondream, md: AsyncMoondream, delays: list[float]) -> None:
    error = await run_row(row, fake, md)
    assert len(fake.requests) == row.requests, "retried a different number of times than expected"
    assert len(delays) == row.requests - 1
    if row.retry_delays is not None:
        assert tuple(delays) == row.retry_delays, "Retry-After was not honored"
    if row.error is None:
        assert error is None
    else:
        assert type(error) is row.error, f"{type(error).__name__}: {error}"
        message = str(error)
        assert ROUTES[row.kind] in message, "the message does not name the route"
        for fragment in row.says:
            assert fragment in message
        if row.advice is not None:
            assert re.search(row.advice, message), message
        if row.status is not None:
            assert isinstance(error, APIStatusError) and error.status_code == row.status
        if row.id == "502-html-from-a-proxy":
            assert "<html" not in message and "<html" not in repr(error.body)
    await still_usable(md, fake)


#: What to do, in words a user (or an agent reading tool_error_text) can act on.
ADVICE = re.compile(r"\b(retry|try again|check|raise|set|slow down|use|wait|report)\b", re.IGNORECASE)

_ERROR_ROWS = [r for r in ROWS if r.error is not None]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in _ERROR_ROWS])
async def test_message_says_what_to_do(row: Row, fake: FakeMoondream, md: AsyncMoondream) -> None:
    """Every error message names the route and says what the caller can do about it."""
    error = await run_row(row, fake, md)
    message = str(error)
    assert ROUTES[row.kind] in message
    assert ADVICE.search(message), f"no advice in: {message}"


# ---------------------------------------------------------------------- wrong types that are accepted


async def test_numeric_strings_are_accepted_as_coordinates(fake: FakeMoondream, md: AsyncMoondream) -> None:
    fake.fail_next(1, status=200, body='{"objects": [{"x_min": "0.25", "y_min": "0.5", "x_max": "0.5", "y_max": "1"}]}')
    result = await md.detect(IMAGE, "circle")
    box = result.objects[0]
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (0.25, 0.5, 0.5, 1.0)
    px = result.to_pixels()[0]
    assert (px.x_min, px.y_min, px.x_max, px.y_max) == (80, 120, 160, 240)
    assert len(fake.requests) == 1
    await still_usable(md, fake)


async def test_boxes_outside_the_image_are_kept_but_clamped_in_pixels(
    fake: FakeMoondream, md: AsyncMoondream
) -> None:
    fake.fail_next(1, status=200, body='{"objects": [{"x_min": -0.1, "y_min": -0.5, "x_max": 1.2, "y_max": 1.5}]}')
    result = await md.detect(IMAGE, "circle")
    box = result.objects[0]
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (-0.1, -0.5, 1.2, 1.5), "kept as returned"
    px = result.to_pixels()[0]
    assert (px.x_min, px.y_min, px.x_max, px.y_max) == (0, 0, 320, 240), "clamped to the image"
    fake.fail_next(1, status=200, body='{"points": [{"x": 1.5, "y": -0.2}]}')
    point = (await md.point(IMAGE, "circle")).to_pixels()[0]
    assert 0 <= point.x <= 320 and 0 <= point.y <= 240
    await still_usable(md, fake)


async def test_inverted_boxes_are_ordered_in_pixels(fake: FakeMoondream, md: AsyncMoondream) -> None:
    fake.fail_next(1, status=200, body='{"objects": [{"x_min": 0.75, "y_min": 0.5, "x_max": 0.25, "y_max": 0.25}]}')
    result = await md.detect(IMAGE, "circle")
    assert result.objects[0].x_min == 0.75, "kept as returned"
    px = result.to_pixels()[0]
    assert (px.x_min, px.y_min, px.x_max, px.y_max) == (80, 60, 240, 120)
    await still_usable(md, fake)


# ---------------------------------------------------------------------- faults the emulator cannot make


async def test_connection_refused(fake: FakeMoondream, delays: list[float]) -> None:
    port = closed_port()
    async with AsyncMoondream(api_key=fake.api_key, base_url=f"http://127.0.0.1:{port}/v1") as client:
        with pytest.raises(APIConnectionError) as info:
            await client.detect(IMAGE, "circle")
        assert type(info.value) is APIConnectionError
        message = str(info.value)
        assert "/detect" in message and f"127.0.0.1:{port}" in message
        assert "could not talk to" in message and "Check base_url" in message
        assert len(delays) == DEFAULT_ATTEMPTS - 1, "connection errors are retried"
        # The same client works once pointed at a live server: the pool is not broken.
        client.base_url = fake.base_url
        await still_usable(client, fake)


def _resolves_fast(host: str, limit: float = 3.0) -> str:
    """'fails' when getaddrinfo fails quickly, 'resolves' or 'hangs' otherwise."""
    outcome: list[str] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 80)
        except OSError:
            outcome.append("fails")
        else:
            outcome.append("resolves")

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(limit)
    return outcome[0] if outcome else "hangs"


async def test_dns_failure(fake: FakeMoondream, delays: list[float]) -> None:
    host = "moondream.invalid"  # RFC 2606: never resolves
    probe = await asyncio.to_thread(_resolves_fast, host)
    if probe != "fails":
        pytest.skip(f"the resolver {probe} for {host!r} instead of failing fast; not testing DNS failure here")
    async with AsyncMoondream(
        api_key=fake.api_key, base_url=f"http://{host}/v1", timeout=Timeout(total=30, connect=10)
    ) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.detect(IMAGE, "circle")
        assert type(info.value) is APIConnectionError
        message = str(info.value)
        assert "/detect" in message and host in message and "Check base_url" in message
        assert len(delays) == DEFAULT_ATTEMPTS - 1
        client.base_url = fake.base_url
        await still_usable(client, fake)


async def test_tls_error_https_to_a_plain_http_port(fake: FakeMoondream, delays: list[float]) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url.replace("http://", "https://")) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.detect(IMAGE, "circle")
        assert type(info.value) is APIConnectionError
        message = str(info.value)
        assert "/detect" in message and "https://127.0.0.1" in message
        assert "SSL" in message and "Check that base_url uses the right scheme" in message
        # The handshake never became an HTTP request the emulator could record, and a
        # TLS failure cannot succeed on a second try: it is not retried.
        assert fake.requests == []
        assert delays == []
        client.base_url = fake.base_url
        await still_usable(client, fake)


@pytest.fixture
async def slammer() -> AsyncIterator[tuple[str, list[int]]]:
    """A raw TCP server on 127.0.0.1 that reads the request and closes without answering."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", connections
    finally:
        server.close()
        await server.wait_closed()


async def test_server_closes_without_answering(
    slammer: tuple[str, list[int]], fake: FakeMoondream, delays: list[float]
) -> None:
    url, connections = slammer
    async with AsyncMoondream(api_key=fake.api_key, base_url=url) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.detect(IMAGE, "circle")
        assert type(info.value) is APIConnectionError
        message = str(info.value)
        assert "/detect" in message and "Server disconnected" in message and "Check base_url" in message
        assert len(connections) == DEFAULT_ATTEMPTS
        client.base_url = fake.base_url
        await still_usable(client, fake)


async def test_timeout_mid_stream_is_not_retried(fake: FakeMoondream, md: AsyncMoondream) -> None:
    fake.stream_interval = 30.0  # the first event comes at once, the second never in time
    received: list[str] = []
    with pytest.raises(APITimeoutError) as info:
        async for piece in md.stream_caption(IMAGE, length="long", timeout=Timeout(total=1.5)):
            received.append(piece)
    assert received, "the first chunk arrived before the timeout"
    message = str(info.value)
    assert "/caption" in message and "Raise timeout=" in message
    assert len(fake.requests) == 1, "a stream that already yielded is never retried"
    assert acquired(md) == 0
    fake.stream_interval = 0.0
    await still_usable(md, fake)


async def test_429_burst_is_absorbed(fake: FakeMoondream, md: AsyncMoondream, delays: list[float]) -> None:
    """Six concurrent calls, four 429s with Retry-After: every call still succeeds."""
    fake.fail_next(4, status=429, retry_after="0.05")
    results = await asyncio.gather(*(md.detect(IMAGE, "circle") for _ in range(6)))
    assert all(len(r.objects) == 1 for r in results)
    assert len(fake.requests) == 10
    assert delays == [0.05] * 4
    assert fake.pending_faults == 0
    await still_usable(md, fake)


# ---------------------------------------------------------------------- cancellation


async def _cancel_checks(client: AsyncMoondream, fake: FakeMoondream, before: set[asyncio.Task[Any]]) -> None:
    await eventually(lambda: acquired(client) == 0, "the client released every connection")
    await eventually(lambda: fake.in_flight == 0, "the emulator has no request in flight")
    await eventually(lambda: not (other_tasks() - before), "no task outlived the cancelled call")
    result = await client.detect(IMAGE, "circle")
    assert len(result.objects) == 1
    assert acquired(client) == 0


async def test_cancelling_a_call_in_flight(threaded_fake: FakeMoondream) -> None:
    fake = threaded_fake  # on its own loop, so this loop's tasks are the client's only
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as client:
        await client.detect(IMAGE, "circle")  # warm: pooled session exists
        before = other_tasks()
        fake.hang_next(1, seconds=1.5)
        pending = asyncio.ensure_future(client.detect(IMAGE, "circle"))
        await eventually(lambda: fake.in_flight == 1, "the request reached the emulator")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pending, 0.05)
        assert pending.cancelled()
        await _cancel_checks(client, fake, before)
        assert len(fake.requests) == 3, "a cancelled call is not retried"


async def test_cancelling_a_vision_tools_task(threaded_fake: FakeMoondream) -> None:
    fake = threaded_fake
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as client:
        tools = VisionTools(client)
        handle = tools.add_image(IMAGE)
        assert (await tools.count(handle, "circle")).count == 1
        before = other_tasks()
        fake.hang_next(1, seconds=1.5)
        task = asyncio.create_task(tools.count(handle, "circle"))
        await eventually(lambda: fake.in_flight == 1, "the request reached the emulator")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _cancel_checks(client, fake, before)
        assert (await tools.count(handle, "circle")).count == 1


async def test_cancelling_a_stream_consumer(threaded_fake: FakeMoondream) -> None:
    fake = threaded_fake
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as client:
        await client.detect(IMAGE, "circle")
        before = other_tasks()
        fake.stream_interval = 1.0
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in client.stream_caption(IMAGE, length="long"):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fake.stream_interval = 0.0
        await _cancel_checks(client, fake, before)


# ---------------------------------------------------------------------- batches


async def test_client_map_returns_per_item_errors_in_order(fake: FakeMoondream, md: AsyncMoondream) -> None:
    """One item at a time, so each item's fault is injected right before its own request."""
    items = ["good", "bad-image", "500", "good", "timeout", "good", "station-unknown", "good"]

    async def one(kind: str) -> Any:
        image: Any = IMAGE
        if kind == "bad-image":
            image = BROKEN_IMAGE
        elif kind == "500":
            fake.fail_next(1, status=500)
        elif kind == "timeout":
            fake.hang_next(1, seconds=5)
        elif kind == "station-unknown":
            fake.station_error_next(1, "CUDA error")
        return await md.detect(image, "circle", timeout=0.5, max_retries=0)

    results = await md.map(one, items, concurrency=1)
    assert len(results) == len(items)
    expected: dict[str, type[Any]] = {
        "bad-image": ImageError, "500": InternalServerError, "timeout": APITimeoutError,
        "station-unknown": APIStatusError,
    }
    for kind, result in zip(items, results, strict=True):
        if kind == "good":
            assert not isinstance(result, MoondreamError) and len(result.objects) == 1
        else:
            assert type(result) is expected[kind], (kind, result)
    assert len(fake.requests) == len(items) - 1, "the bad image never reached the server; nothing was retried"
    await still_usable(md, fake)


async def test_client_map_concurrent_content_faults(fake: FakeMoondream, md: AsyncMoondream) -> None:
    images: list[Any] = [IMAGE, BROKEN_IMAGE, IMAGE, b"", IMAGE, "/no/such/file.png", IMAGE]
    results = await md.map(lambda image: md.detect(image, "circle"), images)
    for image, result in zip(images, results, strict=True):
        if image is IMAGE:
            assert not isinstance(result, MoondreamError) and len(result.objects) == 1
        else:
            assert isinstance(result, ImageError), (image, result)
    assert len(fake.requests) == 4


async def test_vision_tools_batch_returns_per_item_errors_in_order(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, timeout=0.5, max_retries=0) as client:
        tools = VisionTools(client)
        good = tools.add_image(IMAGE)
        broken = tools.add_image(BROKEN_IMAGE, name="broken")
        # Faults apply to the next requests in order; with concurrency=1 the items that
        # reach the server do so in input order: first the 500 item, then the timeout item.
        fake.fail_next(1, status=500)
        fake.hang_next(1, seconds=5)
        arguments: list[dict[str, Any]] = [
            {"image": good, "object": "circle"},  # -> 500
            {"image": broken, "object": "circle"},  # bad image
            {"image": good, "object": "circle"},  # -> timeout
            {"image": "img_99", "object": "circle"},  # unknown handle
            {"image": good, "object": "circle"},  # good
            {"image": good},  # invalid arguments
            {"image": "/etc/passwd", "object": "circle"},  # refused by the policy
            {"image": good, "object": "circle"},  # good
        ]
        results = await tools.batch("count_objects", arguments, concurrency=1)
        kinds = [type(r) for r in results]
        assert kinds == [
            InternalServerError, ImageError, APITimeoutError, ImageAccessError,
            CountResult, ToolArgumentsError, ImageAccessError, CountResult,
        ]
        assert all(r.count == 1 for r in results if isinstance(r, CountResult))
        assert "img_99" in str(results[3]) and good in str(results[3])
        assert len(fake.requests) == 4
        # Every error has a text an agent can read.
        for r in results:
            if isinstance(r, MoondreamError):
                assert tool_error_text(r).startswith("Error: ")
        await still_usable(client, fake)


async def test_vision_tools_batch_concurrent(fake: FakeMoondream, md: AsyncMoondream) -> None:
    tools = VisionTools(md)
    good = tools.add_image(IMAGE)
    tools.add_image(BROKEN_IMAGE, name="broken")
    arguments: list[dict[str, Any]] = [
        {"image": good, "object": "circle"},
        {"image": "broken", "object": "circle"},
        {"image": good, "object": "square"},
        {"image": "nope", "object": "circle"},
        {"image": good, "object": "circle", "extra": 1},
        {"image": good, "object": "triangle"},
    ]
    results = await tools.batch("count_objects", arguments)
    assert [type(r) for r in results] == [
        CountResult, ImageError, CountResult, ImageAccessError, ToolArgumentsError, CountResult,
    ]
    assert [r.count for r in results if isinstance(r, CountResult)] == [1, 1, 0]
    assert len(fake.requests) == 3


# ---------------------------------------------------------------------- secrets


def _everything_about(error: BaseException) -> list[str]:
    parts = [
        str(error), repr(error), repr(error.args), repr(vars(error)),
        "".join(traceback.format_exception(error)),
    ]
    body = getattr(error, "body", None)
    parts += [str(body), repr(body)]
    if isinstance(error, MoondreamError):
        parts.append(tool_error_text(error))
    return parts


async def _error_of(call: Awaitable[Any]) -> MoondreamError:
    try:
        result = await call
    except MoondreamError as exc:
        return exc
    raise AssertionError(f"expected an error, got {result!r}")


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_the_key_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="moondream_tools")
    seen: list[str] = []
    errors: dict[str, MoondreamError] = {}
    async with FakeMoondream(api_key=SECRET) as fake:
        async with AsyncMoondream(api_key=SECRET, base_url=fake.base_url) as client:
            seen += [repr(client), str(client)]
            # ---- every method and stream, successfully
            results: list[Any] = [
                await client.caption(IMAGE, length="short"),
                await client.query(IMAGE, "How many circles?", reasoning=True),
                await client.query(None, "What is a circle?"),
                await client.detect(IMAGE, "circle"),
                await client.point(IMAGE, "circle"),
                await client.segment(IMAGE, "circle"),
                await client.chat([{"role": "user", "content": [
                    {"type": "image", "image": IMAGE}, {"type": "text", "text": "How many squares?"}]}],
                    reasoning=True),
                await client.models(),
                await _drain(client.stream_caption(IMAGE)),
                await _drain(client.stream_query(IMAGE, "How many circles?", reasoning=True)),
                await _drain(client.stream_segment(IMAGE, "circle")),
                await _drain(client.stream_chat([{"role": "user", "content": "How many squares?"}])),
            ]
            for result in results:
                seen.append(repr(result))
                for item in result if isinstance(result, list) else [result]:
                    if hasattr(item, "model_dump_json"):
                        seen.append(item.model_dump_json())
            assert fake.requests[0].headers["X-Moondream-Auth"] == SECRET, "the key was sent"

            # ---- VisionTools results, with annotated images
            tools = VisionTools(client, return_images=True)
            handle = tools.add_image(IMAGE)
            seen.append(repr(tools))
            tool_results = [
                await tools.describe(handle),
                await tools.describe(handle, question="How many circles?", reasoning=True),
                await tools.count(handle, "circle"),
                await tools.locate(handle, "circle"),
                await tools.segment(handle, "circle"),
            ]
            assert any(r.annotated_png for r in tool_results)
            for r in tool_results:
                seen += [r.text, r.model_dump_json(), repr(r)]

            # ---- errors, with the server echoing the key
            echo = f"bad key {SECRET}"
            fake.fail_next(1, status=400, body=json.dumps({"error": echo}))
            errors["400-echo"] = await _error_of(client.detect(IMAGE, "circle"))
            fake.fail_next(1, status=400, body=echo, content_type="text/plain")
            errors["400-text-echo"] = await _error_of(client.detect(IMAGE, "circle"))
            fake.fail_next(3, status=500, body=json.dumps({"error": {"message": echo, "key": SECRET}}))
            errors["500-echo"] = await _error_of(client.detect(IMAGE, "circle"))
            fake.fail_next(1, status=503, body=json.dumps({"error": echo}))  # retried, then fine
            seen.append(repr(await client.detect(IMAGE, "circle")))
            fake.fail_next(3, status=502, body=f"<html>{echo}</html>", content_type="text/html")
            errors["502-html-echo"] = await _error_of(client.caption(IMAGE))
            fake.station_error_next(3, f"queue full for {SECRET}")
            errors["station-queue-echo"] = await _error_of(client.point(IMAGE, "circle"))
            fake.station_error_next(1, f"Request timed out for {SECRET}")
            errors["station-timeout-echo"] = await _error_of(client.point(IMAGE, "circle", max_retries=0))
            fake.station_error_next(1, f"Function not available for {SECRET}")
            errors["station-missing-echo"] = await _error_of(client.point(IMAGE, "circle"))
            fake.station_error_next(1, echo)
            errors["station-unknown-echo"] = await _error_of(client.point(IMAGE, "circle"))
            fake.fail_next(1, status=200, body=f'data: {{"error": "{echo}"}}\n\n', content_type="text/event-stream")
            errors["stream-station-echo"] = await _error_of(_drain(client.stream_caption(IMAGE)))
            fake.fail_next(1, status=401, body=json.dumps({"error": echo}), content_type="application/json")
            errors["stream-401-echo"] = await _error_of(_drain(client.stream_query(IMAGE, "Why?")))
            fake.hang_next(1, seconds=5)
            errors["timeout"] = await _error_of(client.detect(IMAGE, "circle", timeout=0.3, max_retries=0))
            fake.malformed_next(1)
            errors["malformed"] = await _error_of(client.detect(IMAGE, "circle"))
            fake.fail_next(3, status=400, body=json.dumps({"error": echo}))
            for tool, args in [("count_objects", {"image": handle, "object": "circle"}),
                               ("locate_objects", {"image": handle, "object": "circle"}),
                               ("describe_image", {"image": handle})]:
                errors[f"tool-{tool}"] = await _error_of(tools.run(tool, args))
            errors["tool-args"] = await _error_of(tools.run("count_objects", {"image": handle}))
            errors["tool-handle"] = await _error_of(tools.run("count_objects", {"image": "x", "object": "y"}))
            errors["bad-image"] = await _error_of(client.detect(BROKEN_IMAGE, "circle"))
            batch = await tools.batch("count_objects", [{"image": handle, "object": "circle"}, {"image": "x"}])
            seen += [repr(b) for b in batch]

        # ---- wrong key on a second client (its key is another secret)
        async with AsyncMoondream(api_key=OTHER_SECRET, base_url=fake.base_url) as wrong:
            seen.append(repr(wrong))
            errors["401"] = await _error_of(wrong.detect(IMAGE, "circle"))
            errors["401-stream"] = await _error_of(_drain(wrong.stream_chat([{"role": "user", "content": "hi"}])))
            errors["401-models"] = await _error_of(wrong.models())

    # ---- connection refused (the emulator is gone), with retries
    async with AsyncMoondream(api_key=SECRET, base_url=f"http://127.0.0.1:{closed_port()}/v1") as gone:
        errors["refused"] = await _error_of(gone.detect(IMAGE, "circle"))
        seen.append(repr(gone))

    assert isinstance(errors["401"], AuthenticationError)
    assert isinstance(errors["station-queue-echo"], RateLimitError)
    assert isinstance(errors["timeout"], APITimeoutError)
    assert isinstance(errors["refused"], APIConnectionError)
    for error in errors.values():
        seen += _everything_about(error)
    seen.append(caplog.text)
    for record in caplog.records:
        seen += [record.getMessage(), repr(record.args), str(record.exc_text)]
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert any("retrying" in r.getMessage() for r in caplog.records)

    everything = "\n".join(seen)
    assert SECRET not in everything
    assert OTHER_SECRET not in everything
    for name in ("400-echo", "400-text-echo", "500-echo", "station-queue-echo", "station-timeout-echo",
                 "station-missing-echo", "station-unknown-echo", "stream-station-echo", "stream-401-echo"):
        assert "[redacted]" in str(errors[name]), name
    for name in ("400-echo", "400-text-echo", "500-echo", "station-queue-echo", "station-unknown-echo"):
        assert "[redacted]" in repr(errors[name].body), name  # type: ignore[attr-defined]


async def test_the_key_never_leaks_through_a_malformed_stream_event() -> None:
    async with FakeMoondream(api_key=SECRET) as fake:
        async with AsyncMoondream(api_key=SECRET, base_url=fake.base_url) as client:
            fake.fail_next(1, status=200, body=f"data: {{oops {SECRET}\n\n", content_type="text/event-stream")
            error = await _error_of(_drain(client.stream_caption(IMAGE)))
    assert isinstance(error, ResponseError) and "/caption" in str(error)
    assert SECRET not in "\n".join(_everything_about(error))
    assert "[redacted]" in str(error)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
async def test_no_prefix_of_the_key_survives_truncation(content_type: str) -> None:
    filler = "x" * 490
    text = f"{filler}{SECRET} more"
    body = json.dumps({"error": text}) if content_type == "application/json" else text
    async with FakeMoondream(api_key=SECRET) as fake:
        async with AsyncMoondream(api_key=SECRET, base_url=fake.base_url) as client:
            fake.fail_next(1, status=400, body=body, content_type=content_type)
            error = await _error_of(client.detect(IMAGE, "circle"))
    everything = "\n".join(_everything_about(error))
    assert SECRET[:8] not in everything, "a recognisable prefix of the key leaked"
