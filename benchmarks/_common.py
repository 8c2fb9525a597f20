"""Shared pieces of the benchmarks: a 12 MP test photo, timing, tables, an emulator process.

The emulator runs in a separate process so that its image decoding and analysis do not
compete with the client being measured for the event loop or the GIL.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "data" / "waterfall.jpg"

_SERVER = """
import asyncio, json, sys
from moondream_tools.testing import FakeMoondream

async def main() -> None:
    options = json.loads(sys.argv[1])
    async with FakeMoondream(**options) as server:
        print(json.dumps({
            "base_url": server.base_url, "api_key": server.api_key, "url": server.url,
            "fal_base_url": server.fal_base_url, "fal_queue_base_url": server.fal_queue_base_url,
            "fal_key": server.fal_key, "aigateway_base_url": server.aigateway_base_url,
            "aigateway_key": server.aigateway_key,
        }), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


#: A service that costs this machine nothing, for "zero latency" figures of the client's own
#: work: it answers caption, detect and point at once (a fixed caption, nothing found)
#: without decoding the image, as a service on another machine would cost this one nothing.
#: On a stdin line "times" it prints the arrival times of the requests since the last one.
STUB_SERVICE = """
import asyncio, json, sys, time
from aiohttp import web

times = []
ANSWERS = {"caption": {"caption": "A photo."}, "detect": {"objects": []}, "point": {"points": []}}

async def answer(request):
    await request.read()
    times.append(time.time())
    return web.json_response(ANSWERS[request.match_info["skill"]])

async def main() -> None:
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/{skill:caption|detect|point}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(json.dumps({"base_url": f"http://127.0.0.1:{port}/v1", "api_key": "stub-key"}), flush=True)
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)):
        if line.strip() == "times":
            print(json.dumps(times), flush=True)
            times.clear()
    await runner.cleanup()

asyncio.run(main())
"""


@contextlib.contextmanager
def server_process(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """Run a server ``script`` (``python -c``) in a child process: yield the child and the JSON
    line it prints first (its URLs and keys); closing its stdin stops it."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("the server process did not start")
        yield child, json.loads(line)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            child.kill()


@contextlib.contextmanager
def stub_service_process() -> Iterator[dict[str, str]]:
    """Run :data:`STUB_SERVICE` in a child process; yield its ``base_url`` and ``api_key``."""
    with server_process(STUB_SERVICE) as (_, info):
        yield info


@contextlib.contextmanager
def emulator_process(**options: Any) -> Iterator[dict[str, str]]:
    """Run ``FakeMoondream(**options)`` in a child process; yield its URLs and keys (native,
    fal.ai and AIgateway)."""
    with server_process(_SERVER, json.dumps(options)) as (_, info):
        yield info


def photo_12mp(quality: int = 92) -> bytes:
    """The example photo, upright, scaled to 4000x3000 and saved as a camera-like JPEG."""
    with Image.open(PHOTO) as img:
        upright = img.transpose(Image.Transpose.ROTATE_270) if img.size == (1200, 1800) else img.copy()
    big = upright.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def table(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Print a plain-text table."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def official_client(base_url: str, api_key: str | None) -> Any:
    """The official `moondream` client (installed --no-deps; only its cloud client is used)."""
    import moondream

    return moondream.vl(endpoint=base_url, api_key=api_key)
