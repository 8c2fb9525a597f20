"""Benchmarks `indexing`: a folder of photos into records, against what users write today.

throughput: 200 JPEGs of mixed sizes (640x480, 1600x1200, 3000x2000 and 4000x3000 = 12 MP,
  50 of each, every file distinct bytes), each asked for a caption, one question and the
  boxes of one phrase (3 calls), against the emulator at 100 ms latency:
  - ``ImageIndexer`` (what ``MoondreamImageLoader`` / ``MoondreamImageReader`` run), 8
    images in flight on ``AsyncMoondream(max_concurrency=8)``;
  - the official ``moondream`` client in a plain loop (``caption``, ``query``, ``detect`` per
    image, one after another), timed on the first 40 files of the same folder (the same
    size mix) to keep the run short: its images/s is what is compared;
  - the official client in 8 threads over all 200.
  The ideal is the larger of the latency bound (images x calls x latency / concurrency) and
  the decode bound: every image prepared once, 8 at a time, with no request, measured in
  this run.
cache: the same folder again with a ``ResultCache``: requests sent and wall time.
memory: 500 distinct 12 MP JPEGs (one camera JPEG with a different comment each, made one
  at a time by a generator) indexed in a child process: peak RSS growth.

Run from the repo root: ``.venv/bin/python benchmarks/bench_indexing.py``
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from _common import emulator_process, official_client, photo_12mp, table  # noqa: E402
from bench_memory import with_comment  # noqa: E402
from moondream_tools import AsyncMoondream, ResultCache  # noqa: E402
from moondream_tools.indexing import ImageIndexer  # noqa: E402

SIZES = [(640, 480), (1600, 1200), (3000, 2000), (4000, 3000)]
IMAGES = 200
OFFICIAL_LOOP_IMAGES = 40
CALLS = 3
LATENCY = 0.1
CONCURRENCY = 8
MEMORY_IMAGES = 500
QUESTION = "How many people are there?"
PHRASE = "person"


def make_folder(folder: Path) -> list[Path]:
    base = Image.open(io.BytesIO(photo_12mp()))
    encoded = {}
    for size in SIZES:
        buffer = io.BytesIO()
        base.resize(size, Image.Resampling.BOX).save(buffer, "JPEG", quality=90)
        encoded[size] = buffer.getvalue()
    paths = []
    for index in range(IMAGES):
        size = SIZES[index % len(SIZES)]
        path = folder / f"photo_{index:03d}_{size[0]}x{size[1]}.jpg"
        path.write_bytes(with_comment(encoded[size], f"photo {index}"))
        paths.append(path)
    return paths


async def decode_bound(md: AsyncMoondream, paths: list[Path], settings: object) -> float:
    """Every image prepared once, CONCURRENCY at a time, no request (the CPU floor)."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(path: Path) -> None:
        async with slots:
            await md.prepare(path.read_bytes(), settings=settings)  # type: ignore[arg-type]

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in paths))
    return time.perf_counter() - start


def official_loop(client: object, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            img.load()
            client.caption(img)  # type: ignore[attr-defined]
            client.query(img, QUESTION)  # type: ignore[attr-defined]
            client.detect(img, PHRASE)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def official_threads(client: object, paths: list[Path]) -> float:
    def one(path: Path) -> None:
        with Image.open(path) as img:
            img.load()
            client.caption(img)  # type: ignore[attr-defined]
            client.query(img, QUESTION)  # type: ignore[attr-defined]
            client.detect(img, PHRASE)  # type: ignore[attr-defined]

    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - start


_MEMORY_CHILD = """
import asyncio, json, sys
from moondream_tools import AsyncMoondream
from moondream_tools.indexing import ImageIndexer

def status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no " + field)

def with_comment(jpeg: bytes, text: str) -> bytes:
    import struct
    payload = text.encode()
    return jpeg[:2] + b"\\xff\\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]

async def main() -> None:
    base_url, api_key, photo_path, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    photo = open(photo_path, "rb").read()
    async with AsyncMoondream(api_key=api_key, base_url=base_url) as md:
        indexer = ImageIndexer(md, questions=["How many people are there?"], detect=["person"])
        before = status_mb("VmRSS")
        done = failed = 0
        async for record in indexer.stream(with_comment(photo, f"photo {i}") for i in range(count)):
            done += 1
            failed += not record.ok
        cache = md.image_cache.nbytes
    # VmHWM: this process's own peak (ru_maxrss would carry over the parent's from fork).
    peak = status_mb("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "done": done, "failed": failed, "cache_mb": cache / 2**20}))

asyncio.run(main())
"""


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "photos")
        folder.mkdir()
        paths = make_folder(folder)
        with emulator_process(latency=LATENCY) as server:
            async with AsyncMoondream(
                api_key=server["api_key"], base_url=server["base_url"], max_concurrency=CONCURRENCY
            ) as md:
                indexer = ImageIndexer(md, questions=[QUESTION], detect=[PHRASE], max_concurrency=CONCURRENCY)
                settings = dataclasses.replace(md.image_settings, segment_upload=False)
                decode = await decode_bound(md, paths, settings)
                md.image_cache.clear()
                start = time.perf_counter()
                records = await indexer.index(folder)
                ours = time.perf_counter() - start
                assert len(records) == IMAGES and all(r.ok for r in records), [r.errors for r in records if not r.ok]

                cache = ResultCache(Path(tmp, "cache"))
                cached_indexer = ImageIndexer(
                    md, questions=[QUESTION], detect=[PHRASE], max_concurrency=CONCURRENCY, cache=cache
                )
                await cached_indexer.index(folder)  # fills the cache (a first run with a cache)
                progress = []
                cached_indexer.on_progress = progress.append
                start = time.perf_counter()
                again = await cached_indexer.index(folder)
                cached = time.perf_counter() - start
                assert [r.model_dump() for r in again] == [r.model_dump() for r in records]
                cache.close()

            client = official_client(server["base_url"], server["api_key"])
            loop_time = await asyncio.to_thread(official_loop, client, paths[:OFFICIAL_LOOP_IMAGES])
            threads_time = await asyncio.to_thread(official_threads, client, paths)

        latency_bound = IMAGES * CALLS * LATENCY / CONCURRENCY
        ideal = max(latency_bound, decode)
        rate = IMAGES / ours
        loop_rate = OFFICIAL_LOOP_IMAGES / loop_time
        threads_rate = IMAGES / threads_time
        table(
            f"throughput: {IMAGES} JPEGs (640x480 to 4000x3000), caption + 1 question + detect,"
            f" {LATENCY * 1000:.0f} ms latency, concurrency {CONCURRENCY}, {os.cpu_count()} CPUs",
            ("path", "images", "s", "images/s", "vs official loop", "vs ideal"),
            [
                (f"latency bound ({IMAGES} x {CALLS} x {LATENCY} s / {CONCURRENCY})", IMAGES, f"{latency_bound:.2f}", "", "", ""),
                (f"decode bound (each image prepared once, {CONCURRENCY} at a time)", IMAGES, f"{decode:.2f}", "", "", ""),
                ("ImageIndexer", IMAGES, f"{ours:.2f}", f"{rate:.1f}", f"{rate / loop_rate:.1f}x", f"{ours / ideal:.2f}"),
                ("official client, plain loop", OFFICIAL_LOOP_IMAGES, f"{loop_time:.2f}", f"{loop_rate:.2f}", "1.0x", ""),
                (f"official client, {CONCURRENCY} threads", IMAGES, f"{threads_time:.2f}", f"{threads_rate:.1f}",
                 f"{threads_rate / loop_rate:.1f}x", f"{threads_time / ideal:.2f}"),
            ],
        )
        sent = progress[-1].requests
        table(
            "cache: the same folder again with a ResultCache",
            ("run", "requests", "answered from the cache", "s", "vs first run"),
            [
                ("first run (no cache)", IMAGES * CALLS, 0, f"{ours:.2f}", "1.00"),
                ("second run (cache)", sent, progress[-1].cached, f"{cached:.3f}", f"{ours / cached:.0f}x faster"),
            ],
        )

        photo = Path(tmp, "photo12.jpg")
        photo.write_bytes(photo_12mp())
        with emulator_process() as server:
            child = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, server["base_url"], server["api_key"], str(photo), str(MEMORY_IMAGES)],
                capture_output=True, text=True, check=True,
            )
        report = json.loads(child.stdout)
        growth = report["peak"] - report["before"]
        table(
            f"memory: {MEMORY_IMAGES} distinct 4000x3000 JPEGs from a generator, caption + 1 question + detect",
            ("RSS before MiB", "peak RSS MiB", "growth MiB", "image cache MiB", "records", "failed"),
            [(f"{report['before']:.0f}", f"{report['peak']:.0f}", f"{growth:.0f}", f"{report['cache_mb']:.0f}",
              report["done"], report["failed"])],
        )
        print(
            f"indexing: {rate / loop_rate:.1f}x the official loop's throughput (target >= 5x),"
            f" {threads_rate / loop_rate:.1f}x for the official client in threads;"
            f" {ours / ideal:.2f}x the ideal (target <= 1.3x; latency bound {latency_bound:.2f} s,"
            f" decode bound {decode:.2f} s); cached rerun {sent} requests, {ours / cached:.0f}x faster"
            f" (target 0 and >= 20x); peak RSS growth {growth:.0f} MiB for {MEMORY_IMAGES} 12 MP images"
            " (target <= 400 MB)"
        )


if __name__ == "__main__":
    asyncio.run(main())
