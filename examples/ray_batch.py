"""Label a folder of images as a Ray Data job: the README's "Scaling out" snippet, offline.

A local Ray cluster (2 CPUs) reads a folder of generated scenes with
``ray.data.read_binary_files``, indexes every image with ``MoondreamBatchUDF`` on two actors
(a caption, one question, the boxes of "circle") under one budget of 20 requests/s for the
whole job, writes Parquet, and prints what it found next to each scene's truth. The service is
the offline emulator, running in this process on loopback; its key reaches the Ray workers
only through their environment, as on a real cluster.

On a real cluster: ``ray.init(address="auto")`` (or ``ray job submit``), S3 paths, and
MOONDREAM_API_KEY set on the workers; the ``map_batches`` call stays the same.

    python examples/ray_batch.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import ray
import ray.data

from moondream_tools.ray import MoondreamBatchUDF
from moondream_tools.testing import FakeMoondream, Scene

KEY_ENV = "MOONDREAM_EXAMPLE_KEY"  # the emulator's key, in the workers' environment only


@contextmanager
def emulator(key: str) -> Iterator[FakeMoondream]:
    """The offline Moondream emulator on its own event loop in a background thread (the
    driver blocks while the job runs; the workers reach it over loopback)."""
    ready, state = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            async with FakeMoondream(api_key=key) as server:
                state.update(server=server, stop=asyncio.Event(), loop=asyncio.get_running_loop())
                ready.set()
                await state["stop"].wait()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield state["server"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ray-batch-"))
    photos = work / "photos"
    photos.mkdir()
    scenes = {f"scene{i}.jpg": Scene.random(seed, width=960, height=640, count=4) for i, seed in enumerate(range(7, 13))}
    for name, scene in scenes.items():
        (photos / name).write_bytes(scene.encode("JPEG", 90))
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")

    key = os.urandom(16).hex()
    os.environ[KEY_ENV] = key  # before ray.init: the local cluster's workers inherit it
    # Ray's DataContext warns (DeprecationWarning) about its own deprecated fields as it sets
    # their defaults; create it once with exactly that warning ignored (this runs with -W error).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with emulator(key) as fake:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            try:
                ds = ray.data.read_binary_files(str(photos), include_paths=True)
                out = ds.map_batches(
                    MoondreamBatchUDF,
                    fn_constructor_kwargs=MoondreamBatchUDF.constructor_kwargs(
                        skill="index", questions=["How many shapes?"], detect=["circle"],
                        base_url=fake.base_url, api_key_env=KEY_ENV,  # a real job: neither (MOONDREAM_API_KEY)
                        max_concurrency=8, requests_per_second=20,  # the budget of the whole job
                    ),
                    compute=ray.data.ActorPoolStrategy(size=2),
                    num_cpus=0.5,  # requests wait on the network: leave CPUs for the read tasks
                    batch_size=4,
                )
                out.write_parquet(str(work / "labels"))
            finally:
                ray.shutdown()
            requests = len([r for r in fake.requests if r.path.startswith("/v1/")])
        rows = sorted(pq.read_table(work / "labels").to_pylist(), key=lambda r: r["path"])
        print(f"Indexed {len(rows)} images on 2 Ray actors ({requests} requests, at most 20/s for the job):")
        for row in rows:
            name = Path(row["path"]).name
            if row["error"] is not None:
                print(f"  {name}: error: {row['error'][:70]}")
                continue
            truth = scenes[name].count("circle")
            print(f"  {name}: {row['width']}x{row['height']} px, {row['count_circle']} circle(s) (truth {truth}),"
                  f" boxes {row['boxes_circle']}")
            print(f"      {row['caption']}")
        assert key not in repr(rows)
    finally:
        os.environ.pop(KEY_ENV, None)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
