"""What runs inside Ray actors, on the session's local cluster (see conftest.py): the job's
pacer (a named actor every worker asks for turns) as workers meet it, and the UDF's thread
pools in an actor that reserved one CPU.

Ground truth: the clock (turns, pauses, how long the event loop went without running), the
named actors the cluster lists, the threads that ran at once, and the rows the emulator
answered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from ray.exceptions import RaySystemError

import moondream_tools.ray as mdt_ray
from moondream_tools.ray import RayPacer
from moondream_tools.testing import FakeMoondream, Scene

from .ray_support import KEY_ENV

pytestmark = pytest.mark.ray


def named(ray: Any, name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]


def kill(ray: Any, name: str) -> None:
    for _ in named(ray, name):
        ray.kill(ray.get_actor(name))


async def turn(pacer: RayPacer) -> float:
    await pacer.wait_turn()
    return time.monotonic()


# ---------------------------------------------------------------------------
# the pacer
# ---------------------------------------------------------------------------


def spaced(times: list[float], interval: float = 0.05) -> None:
    """Turns handed out ``interval`` apart, as the workers see them: the actor spaces them
    exactly, and each answer reaches its worker after a few ms of RPC (more on a loaded
    machine), so the whole run spans the intervals while one gap may look a little short."""
    assert times[-1] - times[0] >= (len(times) - 1) * interval * 0.8
    assert min(b - a for a, b in zip(times, times[1:])) >= interval * 0.6


async def test_workers_share_one_pacer_and_a_lost_one_is_replaced_with_the_pause_in_force(ray_cluster: Any) -> None:
    """Four workers (pacers of one name, each looking the actor up itself, at once) make one
    actor and get turns an interval apart. The first is paused by a 429 and the actor is
    killed: the second makes a new actor (it never saw the 429), and the first worker's
    next turn, from that actor, is not before its pause ends. The others find that actor."""
    ray = ray_cluster
    name = f"test-pacer:{uuid.uuid4().hex}"
    workers = [RayPacer(name, requests_per_second=20) for _ in range(4)]
    try:
        times = sorted(await asyncio.gather(*(turn(w) for w in workers)))
        assert named(ray, name) == [name]  # the race to create it made one actor
        spaced(times)

        workers[0].pause(1.0)
        paused_until = time.monotonic() + 1.0
        ray.kill(ray.get_actor(name))
        await turn(workers[1])  # a new actor, which knows of no pause yet
        assert await turn(workers[0]) >= paused_until - 0.01  # it does once the paused worker reaches it
        after = sorted(await asyncio.gather(*(turn(w) for w in workers[1:])))
        spaced(after)
        assert named(ray, name) == [name]  # they found the new one, none made another
    finally:
        kill(ray, name)


class Flaky:
    """Stands for ``_PacerRemote``: its first creations fail (with ``failures``, the first
    after ``delay`` seconds, as a busy control plane answers), then it gives an actor whose
    turns come at once. (No cluster: the lost actor above is a real one.)"""

    def __init__(self, failures: list[BaseException], delay: float = 0.0) -> None:
        self.failures, self.delay, self.calls, self.options_seen = failures, delay, 0, []
        self.turns = 0

    def options(self, **options: Any) -> Any:
        self.options_seen.append(options)
        return self

    def remote(self, interval: float) -> Any:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay)
        if self.failures:
            raise self.failures.pop(0)
        return self

    @property
    def acquire(self) -> Any:  # handle.acquire.remote(): something to await
        flaky = self

        class Method:
            def remote(self) -> Any:
                flaky.turns += 1
                return asyncio.sleep(0)

        return Method()


async def test_a_name_race_or_a_busy_control_plane_is_retried_without_blocking_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"test-pacer:{uuid.uuid4().hex}"
    flaky = Flaky([ValueError(f"The name {name} is already taken"), RaySystemError("GCS unavailable")], delay=0.25)
    monkeypatch.setattr(mdt_ray, "_PacerRemote", flaky)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        await RayPacer(name, requests_per_second=20).wait_turn()
    finally:
        ticking.cancel()
    assert flaky.calls == 3 and flaky.turns == 1
    assert flaky.options_seen == [{"name": name, "get_if_exists": True}] * 3  # each time: the actor of that name
    assert gaps and max(gaps) < 0.2  # the first lookup took 0.25 s, in a thread: the loop kept running


async def test_a_pacer_that_cannot_be_had_fails_the_request_after_backing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = Flaky([ValueError("taken")] * 100)
    monkeypatch.setattr(mdt_ray, "_PacerRemote", flaky)
    monkeypatch.setattr(mdt_ray, "_PACER_PATIENCE", 0.6)
    started = time.monotonic()
    with pytest.raises(ValueError, match="taken"):
        await RayPacer(f"test-pacer:{uuid.uuid4().hex}", requests_per_second=20).wait_turn()
    elapsed = time.monotonic() - started
    # tries at 0, 0.05, 0.15, 0.35 s; the next (0.75 s) would be past the patience
    assert flaky.calls == 4 and flaky.turns == 0 and 0.35 <= elapsed < 0.6 + 0.3


# ---------------------------------------------------------------------------
# the UDF's threads in an actor
# ---------------------------------------------------------------------------


def test_an_actor_decodes_on_its_cpus_reads_beside_them_and_gets_its_pool_back(
    ray_cluster: Any, fake: FakeMoondream
) -> None:
    """In an actor with num_cpus=1 the CPU work handed to threads runs one at a time, while
    blocking I/O (isdir, reading a file, DNS) does not wait behind it; after aclose() the
    loop's ordinary pool is back (threads work, several at once)."""
    ray = ray_cluster
    jpeg = Scene.random(3, width=96, height=64, count=1).encode("JPEG", 90)

    @ray.remote(num_cpus=1)
    class Probe:
        async def run(self, base_url: str, key_env: str, jpeg: bytes) -> dict[str, Any]:
            import os
            import tempfile
            import threading

            from moondream_tools.images import ImageSettings
            from moondream_tools.images.sources import read_image_file
            from moondream_tools.ray import MoondreamBatchUDF

            loop = asyncio.get_running_loop()
            lock, state = threading.Lock(), {"now": 0, "most": 0}

            def busy() -> None:
                with lock:
                    state["now"] += 1
                    state["most"] = max(state["most"], state["now"])
                time.sleep(0.05)
                with lock:
                    state["now"] -= 1

            async def most_at_once() -> int:
                state["most"] = 0
                await asyncio.gather(*(asyncio.to_thread(busy) for _ in range(4)))
                return int(state["most"])

            out: dict[str, Any] = {}
            udf = MoondreamBatchUDF("caption", base_url=base_url, api_key_env=key_env)
            out["rows"] = (await udf({"bytes": [jpeg]})).to_pylist()
            out["cpu_at_once"] = await most_at_once()
            with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
                f.write(jpeg)
                f.flush()
                gate = threading.Event()
                held = asyncio.ensure_future(asyncio.to_thread(gate.wait, 10))  # the one CPU thread, held
                try:
                    out["isdir"] = await asyncio.wait_for(asyncio.to_thread(os.path.isdir, f.name), 5)
                    data = await asyncio.wait_for(asyncio.to_thread(read_image_file, f.name, ImageSettings()), 5)
                    out["read"] = data == jpeg
                    out["dns"] = bool(await asyncio.wait_for(loop.getaddrinfo("localhost", 80), 5))
                finally:
                    gate.set()
                    await held
            await udf.aclose()
            out["closed_at_once"] = await most_at_once()  # the ordinary pool, not shut down
            return out

    probe = Probe.remote()  # type: ignore[attr-defined]
    try:
        out = ray.get(probe.run.remote(fake.base_url, KEY_ENV, jpeg), timeout=60)
    finally:
        ray.kill(probe)
    assert out["rows"][0]["error"] is None and out["rows"][0]["caption"]
    assert out["cpu_at_once"] == 1  # num_cpus=1: one thread for the CPU work
    assert out["isdir"] is False and out["read"] is True and out["dns"] is True  # not behind the held CPU thread
    assert out["closed_at_once"] == 4
