"""Benchmarks the hosted backends against the emulator in its own process.

overhead: per-call client overhead of each backend against a zero-latency emulator, vs a
  bare aiohttp POST of the same body (same route, same auth header, one reused session),
  interleaved so drift hits both alike: ``AsyncMoondream.detect``, ``FalMoondream.detect``,
  ``FalSam3.segment`` (masks decoded into a Segmentation) and ``AIGatewaySegmenter.segment``
  (a multipart upload; the mask decoded). Target <= 1.3x, as for the native client.
queue: what fal's queue adds over a sync call at a fixed emulator latency (100 ms a
  request): ``FalMoondream(queue=True)`` submits, polls the status URL (the emulator
  completes a job after 2 polls) and fetches the result.

Run from the repo root: ``.venv/bin/python benchmarks/bench_providers.py``
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from _common import emulator_process, table  # noqa: E402
from moondream_tools import AIGatewaySegmenter, AsyncMoondream, FalMoondream, FalSam3  # noqa: E402
from moondream_tools._transport import encode_multipart  # noqa: E402
from moondream_tools.testing import Scene, Shape  # noqa: E402

ROUNDS = 300
SCENE = Scene(160, 120, [Shape("square", "blue", (80, 60), 50)])
LATENCY = 0.1


async def _median_ms(call: Callable[[], Awaitable[Any]], samples: list[float]) -> None:
    start = time.perf_counter()
    await call()
    samples.append(time.perf_counter() - start)


async def overhead() -> None:
    rows = []
    worst = 0.0
    with emulator_process(latency=0.0) as server:
        async with aiohttp.ClientSession() as session:
            async with AsyncMoondream(api_key=server["api_key"], base_url=server["base_url"]) as md, FalMoondream(
                api_key=server["fal_key"], base_url=server["fal_base_url"]
            ) as fal, FalSam3(api_key=server["fal_key"], base_url=server["fal_base_url"]) as sam, AIGatewaySegmenter(
                api_key=server["aigateway_key"], base_url=server["aigateway_base_url"]
            ) as gateway:
                prepared = await md.prepare(SCENE.render())
                jpeg = base64.b64decode(prepared.data_url.partition(",")[2])
                form, form_type = encode_multipart(
                    {"prompt": "blue square", "model": gateway.model, "response_format": "b64_json", "n": "1"},
                    {"image": ("image.jpg", jpeg, "image/jpeg")},
                )
                cases: list[tuple[str, Callable[[], Awaitable[Any]], str, bytes, dict[str, str]]] = [
                    (
                        "AsyncMoondream.detect", lambda: md.detect(prepared, "blue square"),
                        server["base_url"] + "/detect",
                        json.dumps({"image_url": prepared.data_url, "object": "blue square"}).encode(),
                        {"Content-Type": "application/json", "X-Moondream-Auth": server["api_key"]},
                    ),
                    (
                        "FalMoondream.detect", lambda: fal.detect(prepared, "blue square"),
                        server["fal_base_url"] + "/fal-ai/moondream3-preview/detect",
                        json.dumps({"image_url": prepared.data_url, "prompt": "blue square"}).encode(),
                        {"Content-Type": "application/json", "Authorization": f"Key {server['fal_key']}"},
                    ),
                    (
                        "FalSam3.segment", lambda: sam.segment(prepared, "blue square"),
                        server["fal_base_url"] + "/fal-ai/sam-3/image",
                        json.dumps({
                            "image_url": prepared.data_url, "prompt": "blue square", "sync_mode": True,
                            "include_scores": True, "include_boxes": True, "return_multiple_masks": True,
                            "output_format": "png",
                        }).encode(),
                        {"Content-Type": "application/json", "Authorization": f"Key {server['fal_key']}"},
                    ),
                    (
                        "AIGatewaySegmenter.segment", lambda: gateway.segment(prepared, "blue square"),
                        server["aigateway_base_url"] + "/images/edits", form,
                        {"Content-Type": form_type, "Authorization": f"Bearer {server['aigateway_key']}"},
                    ),
                ]
                for name, client_call, url, body, headers in cases:

                    async def bare(url: str = url, body: bytes = body, headers: dict[str, str] = headers) -> None:
                        async with session.post(url, data=body, headers=headers) as resp:
                            assert resp.status == 200, await resp.text()
                            json.loads(await resp.read())

                    for call in (bare, client_call):  # warm up connections and caches
                        for _ in range(15):
                            await call()
                    samples: dict[str, list[float]] = {"bare": [], "client": []}
                    for _ in range(ROUNDS):
                        await _median_ms(bare, samples["bare"])
                        await _median_ms(client_call, samples["client"])
                    bare_ms = statistics.median(samples["bare"]) * 1000
                    client_ms = statistics.median(samples["client"]) * 1000
                    worst = max(worst, client_ms / bare_ms)
                    rows.append((name, f"{bare_ms:.3f}", f"{client_ms:.3f}", f"{client_ms / bare_ms:.2f}"))
    table(
        f"overhead: median of {ROUNDS} sequential calls per backend, zero-latency emulator, 160x120 image",
        ("backend call", "bare POST ms", "client ms", "ratio"),
        rows,
    )
    print(f"overhead: every backend within {worst:.2f}x a bare aiohttp POST of the same body (target <= 1.3x)")


async def queue() -> None:
    with emulator_process(latency=LATENCY) as server:
        async with FalMoondream(api_key=server["fal_key"], base_url=server["fal_base_url"]) as sync, FalMoondream(
            api_key=server["fal_key"], base_url=server["fal_base_url"], queue=True,
            queue_base_url=server["fal_queue_base_url"], queue_poll_interval=0.05,
        ) as queued:
            prepared = await sync.prepare(SCENE.render())
            times: dict[str, list[float]] = {"sync": [], "queue": []}
            for _ in range(8):
                for name, backend in (("sync", sync), ("queue", queued)):
                    start = time.perf_counter()
                    await backend.detect(prepared, "blue square")
                    times[name].append(time.perf_counter() - start)
    sync_s = statistics.median(times["sync"])
    queue_s = statistics.median(times["queue"])
    table(
        f"queue: FalMoondream.detect, emulator latency {LATENCY * 1000:.0f} ms a request, job done after 2 polls",
        ("mode", "median s", "vs sync"),
        [("sync (fal.run)", f"{sync_s:.3f}", "1.00"), ("queue (submit, poll, fetch)", f"{queue_s:.3f}", f"{queue_s / sync_s:.2f}")],
    )
    print(f"queue: adds {1000 * (queue_s - sync_s):.0f} ms over a sync call ({queue_s / sync_s:.1f}x) at {LATENCY * 1000:.0f} ms latency")


async def main() -> None:
    await overhead()
    await queue()


if __name__ == "__main__":
    asyncio.run(main())
