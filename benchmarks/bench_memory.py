"""Benchmark `memory`: peak RSS while 100 distinct 12 MP photos go through detect.

The 100 files are one 4000x3000 camera JPEG with a different JPEG comment each, so every
one is a new image to the client's cache and is decoded. A fresh child process runs the
batch (``md.map`` at concurrency 8 against the emulator, itself in another process) and
reports its resident memory before the batch and its peak during it.

Run from the repo root: ``.venv/bin/python benchmarks/bench_memory.py``
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emulator_process, photo_12mp, table  # noqa: E402

IMAGES = 100
CONCURRENCY = 8

_CHILD = """
import asyncio, json, resource, sys
from pathlib import Path
from moondream_tools import AsyncMoondream, MoondreamError

def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

async def main() -> None:
    base_url, api_key, folder, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    paths = sorted(Path(folder).glob("*.jpg"))
    async with AsyncMoondream(api_key=api_key, base_url=base_url, max_concurrency=concurrency) as md:
        before = rss_mb()
        results = await md.map(lambda path: md.detect(path, "shapes"), paths, concurrency=concurrency)
        after = rss_mb()
        cache = md.image_cache.nbytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    errors = [str(r) for r in results if isinstance(r, MoondreamError)]
    print(json.dumps({"before": before, "after": after, "peak": peak, "errors": errors,
                      "done": len(results), "cache_mb": cache / 2**20}))

asyncio.run(main())
"""


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment right after SOI: same pixels, new bytes."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def main() -> None:
    photo = photo_12mp()
    with tempfile.TemporaryDirectory() as folder:
        for index in range(IMAGES):
            Path(folder, f"photo_{index:03d}.jpg").write_bytes(with_comment(photo, f"photo {index}"))
        with emulator_process() as server:
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, server["base_url"], server["api_key"], folder, str(CONCURRENCY)],
                capture_output=True,
                text=True,
                check=True,
            )
    report = json.loads(child.stdout)
    growth = report["peak"] - report["before"]
    table(
        f"memory: {IMAGES} distinct 4000x3000 JPEGs ({len(photo) / 2**20:.1f} MiB each) through detect,"
        f" concurrency {CONCURRENCY}",
        ("RSS before MiB", "peak RSS MiB", "growth MiB", "image cache MiB", "errors"),
        [(f"{report['before']:.0f}", f"{report['peak']:.0f}", f"{growth:.0f}", f"{report['cache_mb']:.0f}",
          len(report["errors"]))],
    )
    assert report["done"] == IMAGES
    print(f"memory: peak RSS growth {growth:.0f} MiB for {IMAGES} 12 MP images (target <= 400 MB)")


if __name__ == "__main__":
    main()
