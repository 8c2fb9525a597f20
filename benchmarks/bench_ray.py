"""Benchmarks `moondream_tools.ray`: the same batch work as a Ray Data job, on this machine.

Two comparisons, one run, printed side by side (a local Ray cluster, ``num_cpus`` = the
machine's CPUs; the emulator in a child process, as in the other benchmarks, so its work
does not run inside the client being measured):

cpu-bound: 96 distinct 12 MP JPEGs (4000x3000, one camera JPEG with a different comment
  each), indexed with a caption (one request per image) at zero latency: decoding and
  preparing the image is the work. ``MoondreamBatchUDF`` on 1 actor vs 2 actors
  (``num_cpus=1`` each, 8 requests in flight per actor; blocks and batches of 4 images).
  Target: 2 actors >= 1.6x 1 actor.
latency-bound: 800 distinct 640x480 JPEGs, a caption each, the emulator answering after
  200 ms: waiting is the work. The single-process indexing API (``ImageIndexer``, 16 images
  and requests in flight) vs Ray with 2 actors x 8 in flight (16 in all; blocks of 16
  images, batches of 8). Target: Ray's time within 1.3x of the single process's.

Every Ray job runs ``ActorPoolStrategy(size=N, max_concurrent_calls_per_actor=2)``: an actor
works on two blocks at once, so the requests of the next block start while the last ones of
a block are answered (with one, each block ends with a tail where the actor waits).

Two context rows for the cpu-bound figure: the same UDF called in one process without Ray
(using every core: the machine's ceiling for this work, the emulator included), and the
client's own work alone (hash + prepare, no request) in 1 vs 2 processes (what the hardware
gives a second actor). On 2 cores shared with the emulator, the ceiling, not Ray, is what
caps 2 actors.

The dataset is built and materialized before the clock starts (reading files is not what
is measured). Each Ray row gives two times: ``wall`` (the whole ``map_batches`` job, actor
start-up included: a fixed cost of a few seconds here, nothing on a million images) and
``steady`` (first to last request the emulator received: the throughput once the actors
run). The ratios are given for both.

Run from the repo root: ``.venv/bin/python benchmarks/bench_ray.py``
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from _common import STUB_SERVICE, photo_12mp, server_process, table  # noqa: E402
from bench_memory import with_comment  # noqa: E402
from moondream_tools import AsyncMoondream  # noqa: E402
from moondream_tools.indexing import ImageIndexer  # noqa: E402

CPU_IMAGES = 96
LATENCY_IMAGES = 800
LATENCY = 0.2
PER_ACTOR = 8
KEY_ENV = "MOONDREAM_BENCH_KEY"
#: Rows per block and per batch: cpu-bound, 4 and 4 (12 blocks: the two actors share the 48
#: images evenly even though one starts a moment after the other); latency-bound, 16 and 8.
CPU_BLOCK, CPU_BATCH = 4, 4
LATENCY_BLOCK, LATENCY_BATCH = 16, 8
#: Blocks an actor works on at once (ActorPoolStrategy's max_concurrent_calls_per_actor):
#: with 2, the next block's requests start while the last ones of a block are answered.
CALLS_PER_ACTOR = 2

# The emulator in a child process; on a line "times" it prints the arrival times of the skill
# requests it received since the last "times" (and forgets them).
_SERVER = """
import asyncio, json, sys
from moondream_tools.testing import FakeMoondream

async def main() -> None:
    async with FakeMoondream(**json.loads(sys.argv[1])) as server:
        print(json.dumps({"base_url": server.base_url, "api_key": server.api_key}), flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)):
            if line.strip() == "times":
                times = [r.received_at for r in server.requests if r.path.startswith("/v1/")]
                server.requests.clear()
                print(json.dumps(times), flush=True)

asyncio.run(main())
"""


class Emulator:
    def __init__(self, child: subprocess.Popen[str], info: dict[str, str]) -> None:
        self.child, self.base_url, self.api_key = child, info["base_url"], info["api_key"]

    def times(self) -> list[float]:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write("times\n")
        self.child.stdin.flush()
        return sorted(json.loads(self.child.stdout.readline()))


@contextlib.contextmanager
def emulator(*, remote: bool = False, **options: Any) -> Iterator[Emulator]:
    """The emulator (or, ``remote``, ``_common.STUB_SERVICE``: a service costing this machine
    no CPU) in a child process."""
    with server_process(STUB_SERVICE if remote else _SERVER, json.dumps(options)) as (child, info):
        yield Emulator(child, info)


def small_jpegs(count: int) -> list[bytes]:
    with Image.open(io.BytesIO(photo_12mp())) as img:
        small = img.resize((640, 480))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=90)
    return [with_comment(buffer.getvalue(), f"photo {i}") for i in range(count)]


def ray_job(ray: Any, ds: Any, server: Emulator, *, actors: int, per_actor: int, images: int,
            batch_size: int) -> tuple[float, float]:
    """(wall, steady) seconds of one MoondreamBatchUDF job over ``ds``."""
    from moondream_tools.ray import MoondreamBatchUDF

    server.times()  # forget earlier requests
    kwargs = MoondreamBatchUDF.constructor_kwargs(
        "index", base_url=server.base_url, api_key_env=KEY_ENV, max_concurrency=per_actor)
    start = time.perf_counter()
    out = ds.map_batches(MoondreamBatchUDF, fn_constructor_kwargs=kwargs,
                         compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR),
                         num_cpus=1, batch_size=batch_size).materialize()
    wall = time.perf_counter() - start
    rows = out.take_all()
    assert len(rows) == images and all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    times = server.times()
    assert len(times) == images
    return wall, times[-1] - times[0]


def udf_in_process(server: Emulator, images: list[bytes], batch: int) -> tuple[float, float]:
    """The machine's ceiling for the cpu-bound work: the same UDF called in this process (no
    Ray, no thread cap: every core), batch after batch, 8 requests in flight."""
    import numpy as np

    from moondream_tools.ray import MoondreamBatchUDF

    udf = MoondreamBatchUDF("index", base_url=server.base_url, api_key_env=KEY_ENV, max_concurrency=PER_ACTOR)

    async def run() -> float:
        try:
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                chunk = images[i:i + batch]
                table = await udf({"bytes": np.array(chunk, dtype=object), "path": np.array(["p"] * len(chunk), dtype=object)})
                assert table.column("error").null_count == len(chunk)
            return time.perf_counter() - start
        finally:
            await udf.aclose()

    server.times()
    wall = asyncio.run(run())
    times = server.times()
    return wall, times[-1] - times[0]


def _decode_work(data: bytes, count: int) -> float:
    import dataclasses

    from moondream_tools.images import ImageSettings
    from moondream_tools.images.prepare import _prepare_sync
    from moondream_tools.result_cache import image_digest

    settings = dataclasses.replace(ImageSettings(), segment_upload=False)
    start = time.perf_counter()
    for _ in range(count):
        image_digest(data)
        _prepare_sync(data, settings)
    return time.perf_counter() - start


def decode_scaling(data: bytes, count: int) -> tuple[float, float]:
    """Images/s of the client's own work alone (hash + prepare a 12 MP JPEG, no request), in
    1 process and in 2 processes at once: what the hardware itself gives the second actor."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.starmap(_decode_work, [(data, 2)] * 2)  # warm both
        one = count / pool.apply(_decode_work, (data, count))
        start = time.perf_counter()
        pool.starmap(_decode_work, [(data, count)] * 2)
        two = 2 * count / (time.perf_counter() - start)
    return one, two


def single_process(server: Emulator, images: list[bytes], concurrency: int) -> tuple[float, float]:
    async def run() -> float:
        async with AsyncMoondream(api_key=server.api_key, base_url=server.base_url, max_concurrency=concurrency) as md:
            start = time.perf_counter()
            records = await ImageIndexer(md, max_concurrency=concurrency).index(images)
            assert all(r.ok for r in records)
            return time.perf_counter() - start

    server.times()
    wall = asyncio.run(run())
    times = server.times()
    return wall, times[-1] - times[0]


def dataset(ray: Any, images: list[bytes], name: str, block_rows: int) -> Any:
    """The images as bytes + path rows, ``block_rows`` a block, in the object store already."""
    items = [{"bytes": b, "path": f"{name}_{i}.jpg"} for i, b in enumerate(images)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items) // block_rows)).materialize()


def one_and_two_actors(ray: Any, server: Emulator, images: list[bytes], cpus: int) -> tuple[tuple[float, float], ...]:
    """The cpu-bound job on 1 actor, then on 2, in a local cluster of ``cpus`` CPUs."""
    os.environ[KEY_ENV] = server.api_key  # inherited by the local cluster's workers
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ds = dataset(ray, images, "photo", CPU_BLOCK)
        return tuple(
            ray_job(ray, ds, server, actors=actors, per_actor=PER_ACTOR, images=CPU_IMAGES, batch_size=CPU_BATCH)
            for actors in (1, 2)
        )
    finally:
        ray.shutdown()


def main() -> None:
    import ray
    import ray.data

    cpus = os.cpu_count() or 2
    photo = photo_12mp()
    big = [with_comment(photo, f"photo {i}") for i in range(CPU_IMAGES)]
    small = small_jpegs(LATENCY_IMAGES)
    with warnings.catch_warnings():  # Ray's DataContext warns about its own deprecated fields
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        ray.data.DataContext.get_current().enable_progress_bars = False

    rows: list[tuple[Any, ...]] = []
    with emulator(latency=0.0) as server:
        one, two = one_and_two_actors(ray, server, big, cpus)
        ceiling = udf_in_process(server, big, CPU_BATCH)
        rows += [
            ("cpu-bound: Ray, 1 actor", CPU_IMAGES, *fmt(one, CPU_IMAGES), ""),
            ("cpu-bound: Ray, 2 actors", CPU_IMAGES, *fmt(two, CPU_IMAGES),
             f"speed-up {one[0] / two[0]:.2f}x wall, {one[1] / two[1]:.2f}x steady (target >= 1.6x)"),
            ("cpu-bound: the UDF in 1 process, no Ray", CPU_IMAGES, *fmt(ceiling, CPU_IMAGES),
             f"Ray 2 actors reach {ceiling[1] / two[1]:.0%} of this machine's ceiling (steady)"),
        ]
    with emulator(remote=True) as server:
        one, two = one_and_two_actors(ray, server, big, cpus)
        rows += [
            ("cpu-bound, service elsewhere: Ray, 1 actor", CPU_IMAGES, *fmt(one, CPU_IMAGES), ""),
            ("cpu-bound, service elsewhere: Ray, 2 actors", CPU_IMAGES, *fmt(two, CPU_IMAGES),
             f"speed-up {one[0] / two[0]:.2f}x wall, {one[1] / two[1]:.2f}x steady (target >= 1.6x)"),
        ]
    decode_one, decode_two = decode_scaling(photo, 24)
    rows.append(("cpu-bound: hash + prepare only, 1 vs 2 processes", 24, "", "", f"{decode_one:.1f}",
                 f"{decode_two:.1f}", f"the hardware's own 2-process speed-up {decode_two / decode_one:.2f}x"))
    with emulator(latency=LATENCY) as server:
        os.environ[KEY_ENV] = server.api_key
        alone = single_process(server, small, 2 * PER_ACTOR)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            ds = dataset(ray, small, "small", LATENCY_BLOCK)
            spread = ray_job(ray, ds, server, actors=2, per_actor=PER_ACTOR, images=LATENCY_IMAGES,
                             batch_size=LATENCY_BATCH)
        finally:
            ray.shutdown()
        ideal = LATENCY_IMAGES * LATENCY / (2 * PER_ACTOR)
        rows += [
            (f"latency-bound: ImageIndexer, {2 * PER_ACTOR} in flight", LATENCY_IMAGES, *fmt(alone, LATENCY_IMAGES),
             f"ideal {ideal:.1f} s"),
            (f"latency-bound: Ray, 2 actors x {PER_ACTOR}", LATENCY_IMAGES, *fmt(spread, LATENCY_IMAGES),
             f"Ray / single process {spread[0] / alone[0]:.2f}x wall, {spread[1] / alone[1]:.2f}x steady"
             " (target <= 1.3x)"),
        ]
    os.environ.pop(KEY_ENV, None)
    table(
        f"moondream_tools.ray on {cpus} CPUs (emulator in a child process; wall = whole job incl. actor start-up,"
        " steady = first to last request)",
        ("run", "images", "wall s", "steady s", "img/s wall", "img/s steady", "ratio"),
        rows,
    )


def fmt(times: tuple[float, float], images: int) -> tuple[str, str, str, str]:
    wall, steady = times
    return f"{wall:.2f}", f"{steady:.2f}", f"{images / wall:.1f}", f"{images / steady:.1f}"


if __name__ == "__main__":
    main()
