"""Benchmarks `concurrency`, `overhead` and `rate` against the emulator in its own process.

concurrency: 64 detect calls on one photo against an emulator with 200 ms latency: this
  client (``max_concurrency=8``) vs the official client run the way framework
  integrations run it today (``asyncio.to_thread`` on the default executor) vs the ideal
  (latency x waves of 8).
overhead: per-call client overhead against a zero-latency emulator: ``md.detect`` on a
  prepared image vs a bare aiohttp POST of the same body on one reused session.
rate: 30 calls against an emulator that answers 429 above 10 requests/s, with
  ``requests_per_second=10``: 429s surfaced to the caller (must be 0), 429s the server
  sent, and total time vs the ideal 3 s.

Run from the repo root: ``.venv/bin/python benchmarks/bench_network.py``
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from PIL import Image  # noqa: E402

from _common import PHOTO, emulator_process, official_client, table  # noqa: E402
from moondream_tools import AsyncMoondream, MoondreamError  # noqa: E402

CALLS = 64
LATENCY = 0.2
CONCURRENCY = 8


async def concurrency() -> None:
    with emulator_process(latency=LATENCY) as server:
        photo = Image.open(PHOTO)
        photo.load()

        async with AsyncMoondream(
            api_key=server["api_key"], base_url=server["base_url"], max_concurrency=CONCURRENCY
        ) as md:
            await md.detect(PHOTO, "shapes")  # warm up the connection pool and the cache
            start = time.perf_counter()
            results = await asyncio.gather(*(md.detect(PHOTO, "shapes") for _ in range(CALLS)))
            ours = time.perf_counter() - start
        assert len(results) == CALLS

        official = official_client(server["base_url"], server["api_key"])
        await asyncio.to_thread(official.detect, photo, "shapes")
        start = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(official.detect, photo, "shapes") for _ in range(CALLS)))
        theirs = time.perf_counter() - start

    ideal = LATENCY * math.ceil(CALLS / CONCURRENCY)
    table(
        f"concurrency: {CALLS} detect calls on a 1800x1200 photo, emulator latency {LATENCY * 1000:.0f} ms",
        ("path", "total s", "vs ideal"),
        [
            (f"ideal (latency x {math.ceil(CALLS / CONCURRENCY)} waves of {CONCURRENCY})", f"{ideal:.2f}", "1.00"),
            (f"moondream-tools (max_concurrency={CONCURRENCY})", f"{ours:.2f}", f"{ours / ideal:.2f}"),
            ("official client via asyncio.to_thread", f"{theirs:.2f}", f"{theirs / ideal:.2f}"),
        ],
    )
    print(
        f"concurrency: {ours / ideal:.2f}x the ideal (target <= 1.3x);"
        f" {theirs / ours:.1f}x faster than the official client through asyncio.to_thread"
    )


async def overhead() -> None:
    rounds = 200
    with emulator_process(latency=0.0) as server:
        async with AsyncMoondream(api_key=server["api_key"], base_url=server["base_url"]) as md:
            prepared = await md.prepare(Image.new("RGB", (64, 48), (255, 255, 255)))
            body = json.dumps({"image_url": prepared.data_url, "object": "shapes"}).encode()
            headers = {
                "Content-Type": "application/json",
                "X-Moondream-Auth": server["api_key"],
            }
            url = server["base_url"] + "/detect"

            async with aiohttp.ClientSession() as session:

                async def bare() -> None:
                    async with session.post(url, data=body, headers=headers) as resp:
                        json.loads(await resp.read())

                async def client() -> None:
                    await md.detect(prepared, "shapes")

                for call in (bare, client):  # warm up connections and the server's cache
                    for _ in range(20):
                        await call()
                samples: dict[str, list[float]] = {"bare": [], "client": []}
                for _ in range(rounds):  # interleave, so drift hits both alike
                    for name, call in (("bare", bare), ("client", client)):
                        start = time.perf_counter()
                        await call()
                        samples[name].append(time.perf_counter() - start)
    bare_ms = statistics.median(samples["bare"]) * 1000
    client_ms = statistics.median(samples["client"]) * 1000
    table(
        f"overhead: median of {rounds} sequential detect calls, zero-latency emulator",
        ("path", "ms per call", "ratio"),
        [("bare aiohttp POST, same body", f"{bare_ms:.3f}", "1.00"),
         ("AsyncMoondream.detect", f"{client_ms:.3f}", f"{client_ms / bare_ms:.2f}")],
    )
    print(f"overhead: {client_ms / bare_ms:.2f}x a bare aiohttp POST (target <= 1.3x)")


async def rate() -> None:
    calls = 30
    rows = []
    for rps in (10, None):
        retries = _RetryCounter()
        logger = logging.getLogger("moondream_tools")
        logger.setLevel(logging.INFO)
        logger.addHandler(retries)
        try:
            with emulator_process(rate_limit=10) as server:
                async with AsyncMoondream(
                    api_key=server["api_key"], base_url=server["base_url"], requests_per_second=rps,
                    max_retries=5,
                ) as md:
                    prepared = await md.prepare(Image.new("RGB", (64, 48), (255, 255, 255)))
                    start = time.perf_counter()
                    results = await md.map(lambda _: md.detect(prepared, "shapes"), range(calls))
                    total = time.perf_counter() - start
        finally:
            logger.removeHandler(retries)
        errors = [r for r in results if isinstance(r, MoondreamError)]
        rows.append((f"requests_per_second={rps}", len(errors), retries.count, f"{total:.2f}", f"{total / 3:.2f}"))
        if rps is not None:
            summary = (
                f"rate: {len(errors)} errors surfaced (target 0), {retries.count} 429s absorbed,"
                f" {total / 3:.2f}x the ideal 3 s (target <= 1.2x)"
            )
    table(
        f"rate: {calls} calls (8 at a time), server answers 429 above 10 requests/s; ideal 3.00 s",
        ("client", "errors surfaced", "429s retried", "total s", "vs ideal"),
        rows,
    )
    print(summary)


class _RetryCounter(logging.Handler):
    """Counts the client's retries after a 429 (it logs each retry)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "HTTP 429" in record.getMessage():
            self.count += 1


async def main() -> None:
    await concurrency()
    await overhead()
    await rate()


if __name__ == "__main__":
    asyncio.run(main())
