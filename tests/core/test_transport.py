"""The shared transport: retry facts, Station errors, proxies, borrowed sessions, aiohttp internals."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from importlib.metadata import version

import aiohttp
import pytest
from aiohttp import web

from moondream_tools import (
    APIStatusError,
    APITimeoutError,
    AsyncMoondream,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    run_sync,
)
from moondream_tools import _transport as transport_module
from moondream_tools._sessions import abandon_session
from moondream_tools._transport import ServiceProfile, parse_retry_after, retry_delay, status_error
from moondream_tools.client import station_error
from moondream_tools.errors import APIConnectionError, ResponseError
from moondream_tools.testing import FakeMoondream, Scene, Shape

SCENE = Scene(320, 240, [Shape("circle", "red", (100, 100), 60)])


# ------------------------------------------------------------------ the retry decision


def test_retry_decision_is_a_function_of_error_and_attempt() -> None:
    never = lambda low, high: high  # noqa: E731 - the jitter's upper bound, deterministic
    busy = InternalServerError("x", status_code=503)
    assert [retry_delay(busy, n, 5, jitter=never) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, None]
    told = RateLimitError("x", status_code=429, retry_after=7.0)
    assert retry_delay(told, 0, 1) == 7.0 and retry_delay(told, 1, 1) is None
    assert retry_delay(APIStatusError("x", status_code=400), 0, 3) is None
    assert retry_delay(APIStatusError("x", status_code=200), 0, 3) is None
    assert retry_delay(RateLimitError("queue full", status_code=200), 0, 3, jitter=never) == 0.5
    assert retry_delay(APIConnectionError("reset"), 0, 3, jitter=never) == 0.5
    assert retry_delay(APIConnectionError("tls", retryable=False), 0, 3) is None
    assert retry_delay(APITimeoutError("slow"), 2, 3, jitter=never) == 2.0
    assert retry_delay(ResponseError("garbage"), 0, 3) is None
    assert parse_retry_after("-3", 60) == 0.0 and parse_retry_after("nan", 60) is None


def test_status_error_maps_every_class_with_the_profile_hints() -> None:
    profile = ServiceProfile("Demo", auth_hint="Set DEMO_KEY.", not_found_hint="Check the route.")
    seen = {
        status: status_error(profile, "/x", status, {"detail": "no"}) for status in (400, 401, 403, 404, 418, 422, 429, 503)
    }
    assert {s: type(e).__name__ for s, e in seen.items()} == {
        400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
        418: "APIStatusError", 422: "BadRequestError", 429: "RateLimitError", 503: "InternalServerError",
    }
    assert str(seen[401]) == "HTTP 401 from /x: no. Set DEMO_KEY."
    assert str(seen[404]).endswith("Check the route.")
    assert all(e.status_code == s and e.retry_after is None and dict(e.headers) == {} for s, e in seen.items())


async def test_retry_facts_are_public_fields_with_redacted_headers(fake: FakeMoondream) -> None:
    key = fake.api_key
    assert key
    async with AsyncMoondream(api_key=key, base_url=fake.base_url, max_retries=0) as md:
        fake.fail_next(1, status=429, retry_after="3")
        with pytest.raises(RateLimitError) as limited:
            await md.detect(SCENE.render(), "circle")
        fake.fail_next(1, status=503, retry_after=f"{key}")  # a header that echoes the key
        with pytest.raises(InternalServerError) as failed:
            await md.detect(SCENE.render(), "circle")
    assert limited.value.retry_after == 3.0
    assert limited.value.headers["Retry-After"] == "3"
    assert limited.value.headers["Content-Type"].startswith("application/json")
    assert failed.value.retry_after is None, "an unparseable Retry-After is no delay"
    assert failed.value.headers["Retry-After"] == "[redacted]"
    assert all(key not in v for v in failed.value.headers.values())
    with pytest.raises(TypeError):
        failed.value.headers["X-New"] = "read-only"  # type: ignore[index]


# ------------------------------------------------------------------ Moondream Station's HTTP-200 errors

STATION_PHRASES = [
    ("Failed to generate caption", APIStatusError),
    ("Could not separate the objects", APIStatusError),
    ("Inaccurate prompt: try again", APIStatusError),
    ("CUDA error: device-side assert triggered", APIStatusError),
    ("Moderate load, degraded output", APIStatusError),
    ("Request queue is full", RateLimitError),
    ("Queue full", RateLimitError),
    ("Server busy, try again later", RateLimitError),
    ("Rate limit exceeded", RateLimitError),
    ("Request timed out", APITimeoutError),
    ("Inference timeout after 30 s", APITimeoutError),
    ("Function 'detect' not available", NotFoundError),
    ("Model moondream9 not found", NotFoundError),
    ("Unknown function: segment", NotFoundError),
]


@pytest.mark.parametrize(("phrase", "expected"), STATION_PHRASES)
def test_station_phrases_on_word_boundaries(phrase: str, expected: type[Exception]) -> None:
    error = station_error("/caption", {"error": phrase}, "req-1")
    assert type(error) is expected
    assert phrase in str(error)


async def test_a_station_failure_is_not_retried_and_pauses_nobody(fake: FakeMoondream, delays: list[float]) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        fake.station_error_next(1, "Failed to generate caption")
        with pytest.raises(APIStatusError) as info:
            await md.caption(SCENE.render())
        assert type(info.value) is APIStatusError and info.value.status_code == 200
        assert "Failed to generate caption" in str(info.value)
        assert delays == [], "a generation failure is not retried"
        assert md._transport.limiter._paused_until == 0.0, "and it pauses no other request"
        assert (await md.caption(SCENE.render())).caption


# ------------------------------------------------------------------ proxies and borrowed sessions


class _Proxy:
    """A forward HTTP proxy on loopback that records the request lines it receives."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(f"{request.raw_path} host={request.host}")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "x-moondream-auth")}
        async with aiohttp.ClientSession() as session:
            async with session.request(
                request.method, self.upstream + request.path, data=body, headers=headers
            ) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)

    async def __aenter__(self) -> _Proxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def proxy(fake: FakeMoondream, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[_Proxy]:
    async with _Proxy(fake.url) as server:
        for name in ("http_proxy", "https_proxy", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", server.url)
        yield server


async def test_trust_env_sends_requests_through_the_environments_proxy(fake: FakeMoondream, proxy: _Proxy) -> None:
    # moondream.invalid does not resolve: only the proxy can reach it.
    async with AsyncMoondream(api_key=fake.api_key, base_url="http://moondream.invalid/v1", trust_env=True) as md:
        result = await md.detect(SCENE.render(), "circle")
    assert len(result.objects) == 1
    assert proxy.seen == ["http://moondream.invalid/v1/detect host=moondream.invalid"], (
        "the absolute-URI request reached the proxy"
    )
    assert fake.requests[-1].headers["X-Moondream-Auth"] == fake.api_key


async def test_proxies_are_ignored_without_trust_env_and_no_proxy_is_honoured(
    fake: FakeMoondream, proxy: _Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        await md.detect(SCENE.render(), "circle")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, trust_env=True) as md:
        await md.detect(SCENE.render(), "circle")
    assert proxy.seen == []
    assert len(fake.requests) == 2


async def test_a_borrowed_http_session_is_used_and_never_closed(fake: FakeMoondream) -> None:
    async with aiohttp.ClientSession(headers={"X-Application": "mine"}) as session:
        async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, http_session=session) as md:
            await md.detect(SCENE.render(), "circle")
            await md.point(SCENE.render(), "circle")
            assert md._transport.sessions.pooled is session
        assert not session.closed, "the client never closes the application's session"
        assert [r.headers.get("X-Application") for r in fake.requests] == ["mine", "mine"]
    assert session.closed


def test_a_borrowed_session_is_not_used_from_a_sync_call(threaded_fake: FakeMoondream) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession(headers={"X-Application": "mine"}) as session:
            md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url, http_session=session)
            await md.detect(SCENE.render(), "circle")
            # A sync caller inside this loop runs on a loop of its own: it cannot use `session`.
            result = await asyncio.to_thread(run_sync, lambda: md.detect(SCENE.render(), "circle"))
            assert len(result.objects) == 1
            await md.aclose()
            assert not session.closed

    asyncio.run(main())
    assert [r.headers.get("X-Application") for r in threaded_fake.requests] == ["mine", None]


def test_a_borrowed_session_belongs_to_its_own_loop_even_when_another_loop_calls_first(
    threaded_fake: FakeMoondream,
) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession(headers={"X-Application": "mine"}) as session:
            md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url, http_session=session)
            # The first call comes from a worker thread's own loop: it must not claim the session.
            first = await asyncio.to_thread(lambda: asyncio.run(md.detect(SCENE.render(), "circle")))
            second = await md.detect(SCENE.render(), "circle")
            assert len(first.objects) == len(second.objects) == 1
            await md.aclose()

    asyncio.run(main())
    assert [r.headers.get("X-Application") for r in threaded_fake.requests] == [None, "mine"]


def test_http_session_must_be_an_aiohttp_session() -> None:
    with pytest.raises(TypeError, match="aiohttp.ClientSession"):
        AsyncMoondream(base_url="http://localhost:2020/v1", http_session=object())  # type: ignore[arg-type]


# ------------------------------------------------------------------ aiohttp internals


def test_aiohttp_internals_that_abandon_session_relies_on(threaded_fake: FakeMoondream) -> None:
    """Fails loudly when aiohttp changes what abandon_session (moondream_tools/_sessions.py)
    reaches into: BaseConnector._conns / _acquired / _close and the transport's _sock.

    If this fails after an aiohttp upgrade, adapt abandon_session and the pinned range in
    pyproject.toml together.
    """
    major, minor = (int(p) for p in version("aiohttp").split(".")[:2])
    assert (3, 10) <= (major, minor) < (3, 15), "aiohttp outside the range pyproject.toml pins"

    async def open_and_use() -> tuple[aiohttp.ClientSession, object]:
        session = aiohttp.ClientSession()
        connector = session.connector
        assert connector is not None
        assert hasattr(connector, "_conns") and hasattr(connector, "_acquired") and callable(connector._close)
        assert session._loop is asyncio.get_running_loop(), "SessionScope reads a borrowed session's loop"
        async with session.get(threaded_fake.url + "/v1/models") as resp:
            await resp.read()
        pooled = [entry for entries in connector._conns.values() for entry in entries]
        assert len(pooled) == 1, "a keep-alive connection sits in connector._conns"
        proto, _ = pooled[0]
        sock = proto.transport._sock  # type: ignore[union-attr]
        assert sock is not None and sock.fileno() >= 0
        return session, sock

    loop = asyncio.new_event_loop()
    session, sock = loop.run_until_complete(open_and_use())
    loop.close()  # the session's loop is gone, its socket still open
    abandon_session(session)
    assert sock.fileno() == -1, "abandon_session closed the socket without the loop"  # type: ignore[attr-defined]
    gc.collect()  # and nothing warns about an unclosed transport, connector or session


def test_json_bodies_are_redacted_before_the_error_is_built() -> None:
    redact = transport_module.Redactor("sk-secret")
    body = redact.body({"error": {"message": "bad key sk-secret"}, "n": [1, "sk-secret"]})
    assert json.dumps(body).count("sk-secret") == 0 and body["n"] == [1, "[redacted]"]


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("rate-limited, try later", RateLimitError),
        ("Queue limit reached", RateLimitError),
        ("TimeoutError: inference exceeded 60s", APITimeoutError),
        ("inference timeouts", APITimeoutError),
        ("Unknown capability 'segment'", NotFoundError),
        ("Unknown error", APIStatusError),
    ],
)
def test_station_words_may_go_on_but_not_start_mid_word(phrase: str, expected: type[Exception]) -> None:
    assert type(station_error("/detect", {"error": phrase}, None)) is expected


async def test_a_streams_request_id_is_known_when_it_fails_with_an_http_error() -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503, headers={"X-Request-ID": "rid-503"})

    app = web.Application()
    app.router.add_post("/v1/caption", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with AsyncMoondream(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0) as md:
            stream = md.stream_caption(SCENE.render())
            with pytest.raises(InternalServerError) as info:
                async for _ in stream:
                    pass
        assert stream.request_id == info.value.request_id == "rid-503"
        assert info.value.headers["x-request-id"] == "rid-503", "headers are case-insensitive"
    finally:
        await runner.cleanup()


async def test_client_settings_stay_settable_and_a_404_names_the_base_url(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url + "/nope") as md:
        md.max_retries = 0
        md.timeout = 5
        assert (md.max_retries, md.timeout.total) == (0, 5.0)
        with pytest.raises(NotFoundError, match=r"Check base_url \(http://127\.0\.0\.1:\d+/v1/nope\)"):
            await md.detect(SCENE.render(), "circle")
        md.base_url = fake.base_url + "/"
        assert len((await md.detect(SCENE.render(), "circle")).objects) == 1
        with pytest.raises(ValueError):
            md.max_retries = -1
