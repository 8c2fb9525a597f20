"""Benchmarks the `moondream-tools` command against the same work through the Python API.

throughput: 300 small JPEGs (640x480, every file distinct bytes) through
  ``moondream-tools detect shapes DIR --jsonl out.jsonl`` (a subprocess: interpreter start,
  imports, reading, hashing and recording every image included) against
  ``asyncio.run`` of ``md.map(lambda p: md.detect(p, "shapes"), paths)`` in this process
  (imports already done, nothing recorded), both with concurrency 8, against the emulator
  at 200 ms latency in its own process. The ideal is the latency bound,
  images x latency / concurrency. Each path runs twice; the better time counts.
resume: the same command again on the completed file: requests sent (its summary) and wall
  time (a process start, reading 300 records back, no request).
startup: ``moondream-tools --version`` (the interpreter and the command's imports).

Run from the repo root: ``.venv/bin/python benchmarks/bench_cli.py``
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emulator_process, table  # noqa: E402
from moondream_tools import AsyncMoondream, MoondreamError  # noqa: E402
from moondream_tools.testing import Scene  # noqa: E402

IMAGES = 300
LATENCY = 0.2
CONCURRENCY = 8
PHRASE = "shapes"
RUNS = 2


def command() -> list[str]:
    script = Path(sys.executable).with_name("moondream-tools")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moondream_tools.cli"]


def make_folder(folder: Path) -> list[Path]:
    paths = []
    for index in range(IMAGES):
        path = folder / f"scene_{index:03d}.jpg"
        path.write_bytes(Scene.random(index, width=640, height=480, count=(2, 5)).encode("JPEG", 90))
        paths.append(path)
    return paths


async def api_run(server: dict[str, str], paths: list[Path]) -> tuple[float, int]:
    start = time.perf_counter()
    async with AsyncMoondream(
        api_key=server["api_key"], base_url=server["base_url"], max_concurrency=CONCURRENCY
    ) as md:
        results = await md.map(lambda path: md.detect(path, PHRASE), paths, concurrency=CONCURRENCY)
    elapsed = time.perf_counter() - start
    failed = sum(isinstance(r, MoondreamError) for r in results)
    return elapsed, failed


def cli_run(server: dict[str, str], args: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "MOONDREAM_BASE_URL": server["base_url"], "MOONDREAM_API_KEY": server["api_key"]}
    start = time.perf_counter()
    child = subprocess.run(command() + args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"moondream-tools exited {child.returncode}: {child.stderr}")
    return elapsed, child.stderr


def requests_of(summary: str) -> int:
    match = re.search(r"(\d+) requests?,", summary)
    if match is None:
        raise RuntimeError(f"no summary in: {summary!r}")
    return int(match.group(1))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "photos"
        folder.mkdir()
        paths = make_folder(folder)
        with emulator_process(latency=LATENCY) as server:
            asyncio.run(api_run(server, paths[:16]))  # warm the emulator up
            api_times, cli_times, cli_requests = [], [], []
            for run in range(RUNS):
                elapsed, failed = asyncio.run(api_run(server, paths))
                assert failed == 0
                api_times.append(elapsed)
                out = root / f"out{run}.jsonl"
                elapsed, stderr = cli_run(server, ["detect", PHRASE, "photos", "--jsonl", out.name], root)
                cli_times.append(elapsed)
                cli_requests.append(requests_of(stderr))
                assert out.read_text().count("\n") == IMAGES
            resume_time, resume_stderr = cli_run(server, ["detect", PHRASE, "photos", "--jsonl", "out0.jsonl"], root)
            resumed_requests = requests_of(resume_stderr)
            assert (root / "out0.jsonl").read_text().count("\n") == IMAGES, "the rerun added lines"
            startup, _ = cli_run(server, ["--version"], root)

    api, cli = min(api_times), min(cli_times)
    ideal = IMAGES * LATENCY / CONCURRENCY
    table(
        f"throughput: {IMAGES} JPEGs (640x480), detect {PHRASE!r}, {LATENCY * 1000:.0f} ms latency,"
        f" concurrency {CONCURRENCY}, {os.cpu_count()} CPUs (best of {RUNS})",
        ("path", "images", "requests", "s", "images/s", "vs API", "vs ideal"),
        [
            (f"latency bound ({IMAGES} x {LATENCY} s / {CONCURRENCY})", IMAGES, IMAGES, f"{ideal:.2f}", "", "", ""),
            ("Python API: md.map(md.detect) in one process", IMAGES, IMAGES, f"{api:.2f}", f"{IMAGES / api:.1f}",
             "1.00", f"{api / ideal:.2f}"),
            ("moondream-tools detect --jsonl (subprocess)", IMAGES, cli_requests[cli_times.index(cli)], f"{cli:.2f}",
             f"{IMAGES / cli:.1f}", f"{cli / api:.2f}", f"{cli / ideal:.2f}"),
        ],
    )
    table(
        "resume: the same command on the completed file",
        ("run", "records in file", "requests sent", "s"),
        [
            ("first run", IMAGES, cli_requests[0], f"{cli_times[0]:.2f}"),
            ("rerun (every input recorded)", IMAGES, resumed_requests, f"{resume_time:.2f}"),
            ("moondream-tools --version (process start)", "", "", f"{startup:.2f}"),
        ],
    )
    print(
        f"cli: {cli / api:.2f}x the Python API's wall time for {IMAGES} images (target <= 1.15x;"
        f" {cli:.2f} s vs {api:.2f} s, process start {startup:.2f} s included); rerun on the completed file"
        f" {resumed_requests} requests in {resume_time:.2f} s (target 0 and < 2 s)"
    )


if __name__ == "__main__":
    main()
