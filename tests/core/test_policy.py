"""ImagePolicy against hostile references: SSRF, redirects, oversized and fake images.

A loopback web server stands in for every target and records what reached it; each
refusal must happen before it receives anything. No test connects anywhere but
127.0.0.1 / ::1: the private and link-local addresses are refused before any connection.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from moondream_tools import AsyncMoondream, ImageAccessError, ImageError, ImagePolicy, VisionTools
from moondream_tools.policy import is_public_address
from moondream_tools.testing import FakeMoondream, Scene


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Scene.random(seed=3, width=size[0], height=size[1], min_size=10, max_size=20).render().save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Target:
    """A loopback web server that records every request it receives."""

    url: str
    port: int
    hits: list[str] = field(default_factory=list)


async def start_target(host: str = "127.0.0.1") -> tuple[Target, web.AppRunner]:
    target = Target(url="", port=0)
    image = png_bytes()

    async def handle(request: web.Request) -> web.StreamResponse:
        target.hits.append(request.path_qs)
        path = request.path
        if path.startswith("/redirect"):
            raise web.HTTPFound(request.query["to"])
        if path == "/html":
            return web.Response(text="<html>not an image</html>", content_type="text/html")
        if path == "/octet":
            return web.Response(body=image, content_type="application/octet-stream")
        if path == "/huge-declared":
            response = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(10 * 10**9)})
            await response.prepare(request)
            await response.write(image[:16])
            return response
        if path == "/endless":
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"\0" * 65536)
            return response
        return web.Response(body=image, content_type="image/png")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    target.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    target.url = f"http://{host}:{target.port}"
    return target, runner


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    server, runner = await start_target()
    yield server
    await runner.cleanup()


@pytest.fixture
async def second_target() -> AsyncIterator[Target]:
    server, runner = await start_target()
    yield server
    await runner.cleanup()


def tools_with(client: AsyncMoondream, **policy: object) -> VisionTools:
    return VisionTools(client, image_policy=ImagePolicy(allow_urls=True, **policy))  # type: ignore[arg-type]


# ------------------------------------------------------------------ SSRF


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://[::1]:{port}/img.png",
        "http://localhost:{port}/img.png",  # a hostname that resolves to 127.0.0.1
        "http://[::ffff:127.0.0.1]:{port}/img.png",  # IPv4-mapped IPv6
        "http://2130706433:{port}/img.png",  # 127.0.0.1 written as one number
        "http://0.0.0.0:{port}/img.png",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata service
        "http://10.0.0.1/img.png",
        "http://192.168.1.1/img.png",
        "http://[fd00::1]/img.png",
        "http://224.0.0.1/img.png",
    ],
)
async def test_non_public_addresses_are_refused_before_connecting(
    fake: FakeMoondream, client: AsyncMoondream, target: Target, url: str
) -> None:
    tools = tools_with(client)
    with pytest.raises(ImageAccessError, match="non-public address") as info:
        await tools.count(url.format(port=target.port), "circle")
    assert "public hosts" in str(info.value)
    assert target.hits == [], "the target server must receive nothing"
    assert fake.requests == [], "and Moondream is never called"


async def test_allow_listed_host_redirecting_to_a_blocked_address(
    fake: FakeMoondream, client: AsyncMoondream, target: Target, second_target: Target
) -> None:
    tools = tools_with(client, allowed_hosts={"localhost"})
    blocked = f"{second_target.url}/img.png"  # 127.0.0.1: not an allowed host
    with pytest.raises(ImageAccessError, match="host '127.0.0.1' is not allowed; allowed hosts: localhost"):
        await tools.count(f"http://localhost:{target.port}/redirect?to={blocked}", "circle")
    assert target.hits == [f"/redirect?to={blocked}"]
    assert second_target.hits == [], "the redirect target must receive nothing"
    assert fake.requests == []


async def test_redirect_to_a_private_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, target: Target
) -> None:
    """With no host allow-list, a public first hop redirecting to a private address.

    Offline there is no public host, so the first hop's address (127.0.0.1) is declared
    public for this test; the redirect target listens on 127.0.0.2, which stays blocked.
    """
    from moondream_tools import policy as policy_module

    real = policy_module.is_public_address
    monkeypatch.setattr(policy_module, "is_public_address", lambda a: a == "127.0.0.1" or real(a))
    inner, runner = await start_target("127.0.0.2")
    try:
        policy = ImagePolicy(allow_urls=True)
        assert await policy.fetch(f"{target.url}/img.png") == png_bytes()  # the "public" hop works
        with pytest.raises(ImageAccessError, match="non-public address"):
            await policy.fetch(f"{target.url}/redirect?to={inner.url}/img.png")
        with pytest.raises(ImageAccessError, match="non-public address"):
            await policy.fetch(f"{target.url}/redirect?to=http://[::ffff:a9fe:a9fe]/latest/meta-data/")
        assert inner.hits == [], "the private redirect target received nothing"
        assert target.hits.count(f"/redirect?to={inner.url}/img.png") == 1
    finally:
        await runner.cleanup()


async def test_allow_listed_host_works_and_redirects_are_capped(
    fake: FakeMoondream, client: AsyncMoondream, target: Target
) -> None:
    tools = tools_with(client, allowed_hosts={"localhost"})
    result = await tools.locate(f"http://localhost:{target.port}/img.png", "shapes")
    assert result.image_size.as_tuple() == (64, 48)
    same_host = f"http://localhost:{target.port}/img.png"
    ok = await tools.policy.fetch(f"http://localhost:{target.port}/redirect?to={same_host}")
    assert ok == png_bytes()
    hop = same_host
    for _ in range(4):
        hop = f"http://localhost:{target.port}/redirect?to={hop}"
    before = len(target.hits)
    with pytest.raises(ImageAccessError, match="more than 3 redirects"):
        await tools.policy.fetch(hop)
    assert len(target.hits) - before == 4, "four redirects answered, the fifth hop never requested"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://localhost/img.png", "only http and https"),
        ("gopher://localhost/", "only http and https"),
        ("http://user:secret@localhost/img.png", "credentials"),
        ("http:///img.png", "has no host"),
    ],
)
async def test_schemes_and_odd_urls(client: AsyncMoondream, url: str, message: str) -> None:
    with pytest.raises(ImageAccessError, match=message):
        await tools_with(client).policy.fetch(url)


async def test_urls_are_off_by_default(client: AsyncMoondream, target: Target) -> None:
    with pytest.raises(ImageAccessError, match="does not fetch URLs"):
        await VisionTools(client).count(f"{target.url}/img.png", "circle")
    assert target.hits == []


def test_is_public_address() -> None:
    public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]
    blocked = [
        "127.0.0.1", "127.8.8.8", "10.1.2.3", "172.16.0.1", "192.168.0.1", "100.64.0.1", "169.254.169.254",
        "0.0.0.0", "255.255.255.255", "224.0.0.251", "240.0.0.1", "::", "::1", "fe80::1", "fc00::1",
        "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "not an ip",
    ]
    assert all(is_public_address(a) for a in public)
    assert not any(is_public_address(a) for a in blocked), [a for a in blocked if is_public_address(a)]


# ------------------------------------------------------------------ what comes back


async def test_answers_must_be_images(client: AsyncMoondream, target: Target) -> None:
    policy = ImagePolicy(allow_urls=True, allowed_hosts={"localhost"})
    with pytest.raises(ImageError, match="is not an image \\(content type 'text/html'\\)"):
        await policy.fetch(f"http://localhost:{target.port}/html")
    # A generic content type is fine when the bytes are an image.
    assert await policy.fetch(f"http://localhost:{target.port}/octet") == png_bytes()


async def test_downloads_are_capped_while_streaming(target: Target) -> None:
    policy = ImagePolicy(allow_urls=True, allowed_hosts={"localhost"}, max_bytes=1_000_000)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageError, match="over the limit of 1000000 bytes"):
            await policy.fetch(f"http://localhost:{target.port}/endless")  # 4 MiB, chunked, no length
        with pytest.raises(ImageError, match="is 10000000000 bytes, over the limit"):
            await policy.fetch(f"http://localhost:{target.port}/huge-declared")  # claims 10 GB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 8 * 1024 * 1024, f"memory stayed flat ({peak} bytes at peak)"


async def test_download_timeout() -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(body=b"", content_type="image/png")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        policy = ImagePolicy(allow_urls=True, allowed_hosts={"localhost"}, download_timeout=0.3)
        with pytest.raises(ImageError, match="timed out after 0.3 s"):
            await policy.fetch(f"http://localhost:{port}/slow")
    finally:
        gate.set()
        await runner.cleanup()


# ------------------------------------------------------------------ hostile images


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b""
    )


def bmp_header_claiming(width: int, height: int) -> bytes:
    """A BMP whose header claims width x height x 3 bytes of pixels (30 GB for 100k x 100k)."""
    pixels = width * height * 3
    header = struct.pack("<2sIHHI", b"BM", min(pixels + 54, 2**32 - 1), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\0" * 64


@pytest.mark.parametrize(
    "data",
    [png_header(100_000, 100_000), bmp_header_claiming(100_000, 100_000), png_header(10_000, 10_000)],
    ids=["png-100k", "bmp-30GB", "png-100MP"],
)
async def test_hostile_headers_are_refused_fast_with_flat_memory(client: AsyncMoondream, data: bytes) -> None:
    tools = VisionTools(client)
    tools.add_image(data, name="bomb")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageError, match="too large|over the limit"):
            await tools.count("bomb", "circle")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 4 * 1024 * 1024


async def test_formats_outside_the_allow_list_are_refused(client: AsyncMoondream) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PPM")
    with pytest.raises(ImageError, match="not in an allowed format \\(BMP, GIF, JPEG, PNG, TIFF, WEBP\\)"):
        await client.prepare(buffer.getvalue())


async def test_frame_limit(client: AsyncMoondream) -> None:
    from moondream_tools import ImageSettings

    frames = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="5 frames, over the limit of 3"):
        await client.prepare(buffer.getvalue(), settings=ImageSettings(max_frames=3))
    assert (await client.prepare(buffer.getvalue())).width == 8


def test_allowed_dirs_expand_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "Pictures").mkdir()
    assert ImagePolicy(allowed_dirs=["~/Pictures"]).allowed_dirs == (str((tmp_path / "Pictures").resolve()),)
