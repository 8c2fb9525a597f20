"""Benchmarks `batch`: indexing through Moondream's Batch API (``ImageIndexer.index_batch``).

Images: 1,000 distinct 12 MP camera JPEGs, made one at a time by a generator: four 4000x3000
photos (the example photo upright, mirrored, flipped and turned; 1.9-2.2 MB each), each
image one of them with its own JPEG comment (same pixels, new bytes, so a new sha256 id).
Each image is asked for a caption, one question and the boxes of one phrase: 3 batch lines.
The emulator runs in its own process (batches complete after 2 polls).

memory: the run in a child process that measures itself (VmHWM from /proc/self/status: the
  process's own peak; ru_maxrss would carry the parent's over from fork): RSS before the run
  (imports, client, the four photos), the peak while planning, building the batch file and
  uploading it (read when the first status poll reports, i.e. after the upload and the
  submit), and the peak of the whole run (downloads and records included). Then the same
  with 250 images, to show the peak does not grow with the job, and the 250 once more with
  ``MALLOC_ARENA_MAX=2``: the difference is memory glibc keeps (free) in the arenas of the
  threads that decoded the photos, as it does for ``ImageIndexer.stream``.
bytes: what the job uploaded (the batch files, every line's JSON included) against what the
  official ``moondream`` client would send for the same calls: its ``encode_image`` (a
  full-size JPEG at quality 95, base64) once per call. The comment does not change the
  pixels, so each of the four photos is encoded once and counted per image that uses it.
cost: ``indexer.batch_cost()``: the job's tokens (the emulator's counts: a token per 14 x 14
  patch of the upload, capped at 13 crops, plus the prompt; output as on fal) at the Batch
  API's price against the standard API's price for the same tokens.

Run from the repo root: ``.venv/bin/python benchmarks/bench_batch.py``
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from _common import emulator_process, official_client, photo_12mp, table  # noqa: E402

IMAGES = 1000
SMALL_JOB = 250
QUESTION = "How many people are there?"
PHRASE = "person"
CALLS = 3  # caption, the question, the phrase

_CHILD = """
import asyncio, json, sys, time
from pathlib import Path
from moondream_tools import AsyncMoondream
from moondream_tools.indexing import ImageIndexer

def status_mb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no " + field)

def with_comment(jpeg, text):
    import struct
    payload = text.encode()
    return jpeg[:2] + b"\\xff\\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]

async def main():
    base_url, api_key, photos_dir, job_dir, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    photos = [p.read_bytes() for p in sorted(Path(photos_dir).glob("*.jpg"))]
    async with AsyncMoondream(api_key=api_key, base_url=base_url) as md:
        indexer = ImageIndexer(md, questions=[%(question)r], detect=[%(phrase)r])
        images = (with_comment(photos[i %% len(photos)], f"photo {i}") for i in range(count))
        before = status_mb("VmRSS")
        submitted = {}

        def polled(progress):
            if not submitted:  # the first poll: planned, built, uploaded and submitted
                submitted.update(peak=status_mb("VmHWM"), seconds=time.perf_counter() - start)

        start = time.perf_counter()
        done = failed = 0
        async for record in indexer.stream_batch(images, job_dir=job_dir, poll_interval=0.05,
                                                 max_poll_interval=0.2, on_batch_progress=polled):
            done += 1
            failed += not record.ok
        seconds = time.perf_counter() - start
        usage = indexer.batch_usage
        batch_usd, standard_usd = indexer.batch_cost()
    state = json.loads((Path(job_dir) / "job.json").read_text())
    print(json.dumps({
        "before": before, "peak_submit": submitted["peak"], "peak": status_mb("VmHWM"),
        "submit_seconds": submitted["seconds"], "seconds": seconds, "done": done, "failed": failed,
        "uploaded": sum(b["bytes"] for b in state["batches"]), "lines": sum(b["lines"] for b in state["batches"]),
        "batches": len(state["batches"]), "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
        "batch_usd": batch_usd, "standard_usd": standard_usd,
    }))

asyncio.run(main())
""" % {"question": QUESTION, "phrase": PHRASE}


def photos(folder: Path) -> list[bytes]:
    """Four different 12 MP camera JPEGs (same scene, different pixels)."""
    base = Image.open(io.BytesIO(photo_12mp()))
    variants = [
        base,
        base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        base.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        base.transpose(Image.Transpose.ROTATE_180),
    ]
    encoded = []
    for index, image in enumerate(variants):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        encoded.append(buffer.getvalue())
        (folder / f"photo{index}.jpg").write_bytes(buffer.getvalue())
    return encoded


def run_child(
    server: dict[str, str], folder: Path, job_dir: Path, count: int, env: dict[str, str] | None = None
) -> dict[str, float]:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, server["base_url"], server["api_key"], str(folder), str(job_dir), str(count)],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )
    if child.returncode != 0:
        raise RuntimeError(f"the child failed:\n{child.stderr}")
    return json.loads(child.stdout)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "photos")
        folder.mkdir()
        encoded = photos(folder)
        official = official_client("http://127.0.0.1:9/v1", "unused")
        start = time.perf_counter()
        their_chars = [len(official.encode_image(Image.open(io.BytesIO(data))).image_url) for data in encoded]
        official_seconds = (time.perf_counter() - start) / len(encoded)
        reports = {}
        with emulator_process() as server:
            for count in (IMAGES, SMALL_JOB):
                reports[count] = run_child(server, folder, Path(tmp, f"job{count}"), count)
            # The same small job with glibc's malloc held to 2 arenas: how much of the peak is
            # memory the allocator keeps for the decoder threads (free, not given back).
            arenas = run_child(server, folder, Path(tmp, "job-arenas"), SMALL_JOB, {"MALLOC_ARENA_MAX": "2"})

    rows = []
    for label, r in [*((str(count), r) for count, r in reports.items()), (f"{SMALL_JOB}, MALLOC_ARENA_MAX=2", arenas)]:
        rows.append((
            label, r["lines"], f"{r['before']:.0f}", f"{r['peak_submit']:.0f}", f"{r['peak_submit'] - r['before']:.0f}",
            f"{r['peak'] - r['before']:.0f}", f"{r['submit_seconds']:.1f}", f"{r['seconds']:.1f}",
            f"{r['done']}/{r['failed']}",
        ))
    table(
        f"memory: distinct 4000x3000 JPEGs from a generator, caption + 1 question + detect, {CALLS} lines each",
        ("images", "lines", "RSS before MiB", "peak at submit MiB", "growth at submit MiB", "growth, whole run MiB",
         "submitted after s", "records after s", "records/failed"),
        rows,
    )

    big = reports[IMAGES]
    official_bytes = sum(their_chars[i % len(their_chars)] for i in range(IMAGES)) * CALLS
    table(
        f"bytes: {IMAGES} images x {CALLS} calls",
        ("path", "bytes uploaded", "per call", "ratio"),
        [
            ("official client: encode_image (q95, full size) per call", f"{official_bytes:,}",
             f"{official_bytes // (IMAGES * CALLS):,}", "1.000"),
            ("index_batch: the batch file (every line's JSON)", f"{big['uploaded']:,}",
             f"{big['uploaded'] // big['lines']:,}", f"{big['uploaded'] / official_bytes:.3f}"),
        ],
    )
    table(
        f"cost: the {IMAGES}-image job's tokens (emulator counts) at published prices",
        ("API", "input tokens", "output tokens", "USD", "vs standard"),
        [
            ("standard", f"{big['input_tokens']:,}", f"{big['output_tokens']:,}", f"{big['standard_usd']:.4f}", "1.00"),
            ("Batch API", f"{big['input_tokens']:,}", f"{big['output_tokens']:,}", f"{big['batch_usd']:.4f}",
             f"{big['batch_usd'] / big['standard_usd']:.2f}"),
        ],
    )
    growth, small_growth = big["peak_submit"] - big["before"], reports[SMALL_JOB]["peak_submit"] - reports[SMALL_JOB]["before"]
    print(
        f"batch: {IMAGES} 12 MP images ({big['lines']} lines) planned, built and uploaded with"
        f" {growth:.0f} MiB peak RSS growth ({small_growth:.0f} MiB for {SMALL_JOB}, {arenas['peak_submit'] - arenas['before']:.0f}"
        " MiB with MALLOC_ARENA_MAX=2; target flat, <= 150 MB),"
        f" {big['peak'] - big['before']:.0f} MiB for the whole run; uploaded {big['uploaded'] / official_bytes:.3f}x"
        f" the official client's bytes ({big['uploaded'] / 2**20:,.0f} MiB vs {official_bytes / 2**20:,.0f} MiB);"
        f" ${big['batch_usd']:.4f} vs ${big['standard_usd']:.4f} on the standard API"
        f" ({big['batch_usd'] / big['standard_usd']:.2f}x); {big['seconds']:.0f} s end to end"
        f" (official encode alone: {official_seconds * 1000:.0f} ms an image)"
    )


if __name__ == "__main__":
    main()
