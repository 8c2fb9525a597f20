"""The emulator's Moondream Cloud Batch API over real HTTP, against scene truth.

Plain aiohttp sessions only (none of the project's clients): the multipart upload, submit,
poll and presigned-download flow, line results against ground truth and the native routes,
typed line errors, etag checks, part retries, batch failures, expiry, listing, auth.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from moondream_tools.testing import FakeMoondream, Scene, Shape
from moondream_tools.testing.batch import BatchRecord

KEY = "test-key"
AUTH = {"X-Moondream-Auth": KEY}


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *, headers: dict[str, str] | None = AUTH, **kwargs: Any
) -> tuple[int, Any]:
    """(status, JSON body or None)."""
    async with http.request(method, url, headers=headers or {}, **kwargs) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if raw else None)


async def create(http: aiohttp.ClientSession, fake: FakeMoondream) -> dict[str, str]:
    status, body = await call(http, "POST", f"{fake.base_url}/batch?action=mpu-create")
    assert status == 200, body
    assert set(body) == {"fileId", "uploadId", "key"}
    return body


async def put_part(
    http: aiohttp.ClientSession, fake: FakeMoondream, upload: dict[str, str], number: int, data: bytes
) -> tuple[int, Any]:
    return await call(
        http,
        "PUT",
        f"{fake.base_url}/batch/{upload['fileId']}",
        params={"action": "mpu-uploadpart", "uploadId": upload["uploadId"], "partNumber": str(number)},
        data=data,
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )


async def complete(
    http: aiohttp.ClientSession, fake: FakeMoondream, upload: dict[str, str], parts: list[dict[str, Any]], **extra: Any
) -> tuple[int, Any]:
    return await call(
        http,
        "POST",
        f"{fake.base_url}/batch/{upload['fileId']}",
        params={"action": "mpu-complete", "uploadId": upload["uploadId"]},
        json={"parts": parts, **extra},
    )


async def submit(http: aiohttp.ClientSession, fake: FakeMoondream, data: bytes, parts: int = 1, **extra: Any) -> str:
    """Upload ``data`` in ``parts`` byte ranges and complete it; the batch id."""
    upload = await create(http, fake)
    done = []
    for i in range(parts):
        status, part = await put_part(http, fake, upload, i + 1, data[len(data) * i // parts : len(data) * (i + 1) // parts])
        assert status == 200, part
        done.append(part)
    status, body = await complete(http, fake, upload, done, **extra)
    assert status == 200, body
    assert body["status"] == "chunking" and body["size"] == len(data) and body["id"] != upload["fileId"]
    return body["id"]


async def poll(http: aiohttp.ClientSession, fake: FakeMoondream, batch_id: str) -> dict[str, Any]:
    status, body = await call(http, "GET", f"{fake.base_url}/batch/{batch_id}")
    assert status == 200, body
    return body


async def poll_until_done(http: aiohttp.ClientSession, fake: FakeMoondream, batch_id: str) -> list[dict[str, Any]]:
    seen = []
    for _ in range(20):
        seen.append(await poll(http, fake, batch_id))
        if seen[-1]["status"] in ("completed", "failed"):
            return seen
    raise AssertionError(f"batch {batch_id} never finished: {seen[-1]}")


async def fetch(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with http.get(url, headers=headers or {}) as resp:
        return resp.status, await resp.text()


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def b64(scene: Scene, fmt: str = "PNG") -> str:
    return base64.b64encode(scene.encode(fmt)).decode()


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def small_batch(n: int = 1) -> bytes:
    scene = Scene(64, 48, [Shape("square", "red", (32, 24), 20)])
    return jsonl([{"id": f"l{i}", "skill": "caption", "image": b64(scene)} for i in range(n)])


# ---------------------------------------------------------------- round trip


async def test_round_trip_matches_scene_truth(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scenes = [Scene.random(seed, width=480, height=360) for seed in range(3)] + [Scene.demo().scaled(0.5)]
    lines: list[Any] = []
    expect: dict[str, tuple[str, Scene, str]] = {}
    for s, scene in enumerate(scenes):
        phrase = scene.truth()[0].label
        # bare base64 (PNG) and data URLs (JPEG) both work
        image = b64(scene) if s % 2 == 0 else scene.data_url()
        for skill, extra in (
            ("caption", {"length": "short" if s == 1 else "normal"}),
            ("query", {"question": f"How many {phrase}s are there?"}),
            ("detect", {"object": phrase}),
            ("point", {"object": phrase}),
        ):
            line_id = f"{skill}-{s}"
            lines.append({"id": line_id, "skill": skill, "image": image, **extra})
            expect[line_id] = (skill, scene, phrase)
    half = Scene.demo().scaled(0.25)
    lines.append({"id": "small", "skill": "caption", "image": b64(half)})
    lines.append({"id": "seg", "skill": "segment", "image": b64(scenes[0]), "object": "circle"})
    lines.append({"id": "corrupt", "skill": "detect", "image": base64.b64encode(b"not an image").decode(), "object": "x"})
    lines.append({"id": "noq", "skill": "query", "image": b64(scenes[0])})
    lines.append(b'{"id": "broken", "skill": ')
    lines.append({"id": "nobase64", "skill": "caption", "image": "%%%"})
    data = jsonl(lines)

    batch_id = await submit(http, fake, data, parts=2)  # split mid-line at a byte offset
    history = await poll_until_done(http, fake, batch_id)
    assert [h["status"] for h in history] == ["chunking", "processing", "completed"]
    assert history[0]["progress"] == {"total": len(lines), "completed": 0, "failed": 0}
    mid = history[1]["progress"]
    assert 0 < mid["completed"] + mid["failed"] < len(lines)
    final = history[-1]
    assert final["progress"] == {"total": len(lines), "completed": len(lines) - 5, "failed": 5}
    assert final["model"] == "moondream3-preview"
    created, completed, expires = (parse_time(final[k]) for k in ("created_at", "completed_at", "expires_at"))
    assert created <= completed and abs(expires - completed - 7 * 24 * 3600) < 1

    # two result files, no auth header, shuffled
    assert [o["index"] for o in final["outputs"]] == [0, 1]
    results: list[dict[str, Any]] = []
    for out in final["outputs"]:
        status, text = await fetch(http, out["url"])
        assert status == 200
        part = [json.loads(line) for line in text.splitlines()]
        assert part, "no empty result file"
        results += part
    order = [r["line_index"] for r in results]
    assert sorted(order) == list(range(len(lines))) and order != sorted(order)
    by_id = {r["id"]: r for r in results}
    for r in results:
        assert lines[r["line_index"]] == b'{"id": "broken", "skill": ' or lines[r["line_index"]]["id"] == r["id"]

    # ok lines equal the truth (and the native routes)
    usage = {"input_tokens": 0, "output_tokens": 0}
    for line_id, (skill, scene, phrase) in expect.items():
        r = by_id[line_id]
        assert r["status"] == "ok", r
        for k in usage:
            usage[k] += r["usage"][k]
        result = r["result"]
        w, h = scene.size
        want = scene.matching(phrase)
        if skill == "caption":
            length = "short" if line_id.endswith("-1") else "normal"
            status, native = await call(
                http, "POST", f"{fake.base_url}/caption", json={"image_url": scene.data_url("PNG"), "length": length}
            )
            assert result == {"caption": native["caption"]}
        elif skill == "query":
            assert result["answer"] == str(scene.count(phrase))
            assert result["reasoning"]["text"] and isinstance(result["reasoning"]["grounding"], list)
        elif skill == "detect":
            got = sorted(
                (o["x_min"] * w, o["y_min"] * h, o["x_max"] * w, o["y_max"] * h) for o in result["objects"]
            )
            truth = sorted(t.bbox_px for t in want)
            assert len(got) == len(truth)
            for g, t in zip(got, truth):
                assert all(abs(a - b) <= 2 for a, b in zip(g, t)), (line_id, g, t)
        else:
            assert len(result["points"]) == len(want)
            for p in result["points"]:
                assert any(
                    t.bbox_px[0] - 2 <= p["x"] * w <= t.bbox_px[2] + 2 and t.bbox_px[1] - 2 <= p["y"] * h <= t.bbox_px[3] + 2
                    for t in want
                )
    usage["input_tokens"] += by_id["small"]["usage"]["input_tokens"]
    usage["output_tokens"] += by_id["small"]["usage"]["output_tokens"]
    assert final["usage"] == usage
    # a smaller upload costs fewer input tokens (the demo at 1/4 vs 1/2 scale, same caption)
    assert by_id["small"]["usage"]["input_tokens"] < by_id["caption-3"]["usage"]["input_tokens"]

    # typed line errors
    errors = {r["id"]: r["error"]["code"] for r in results if r["status"] == "error"}
    assert errors == {
        "seg": "unknown_skill",
        "corrupt": "image_decode_failed",
        "nobase64": "image_decode_failed",
        "noq": "invalid_request",
        None: "invalid_request",  # the line that is not JSON has no id to echo
    }
    assert all(r["error"]["message"] for r in results if r["status"] == "error")

    # inspection
    record = fake.batches[batch_id]
    assert isinstance(record, BatchRecord)
    assert record.lines == len(lines) and record.status == "completed" and record.model == "moondream3-preview"
    assert record.part_uploads == {1: 1, 2: 1} and record.completes == 1
    assert record.downloads == {0: 1, 1: 1}
    assert fake.uploads[record.upload_id].state == "completed"
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert len(puts) == 2 and all(r.json is None for r in puts)
    assert b"".join(r.body for r in puts) == data
    downloads = [r for r in fake.requests if r.path.startswith("/batch-outputs/")]
    assert len(downloads) == 2 and all("X-Moondream-Auth" not in r.headers for r in downloads)


# ---------------------------------------------------------------- upload rules


async def test_etag_quotes_and_model_are_enforced(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    upload = await create(http, fake)
    data = small_batch(2)
    status, part = await put_part(http, fake, upload, 1, data)
    assert status == 200 and part["partNumber"] == 1
    etag = part["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 34

    for parts, why in (
        ([{"partNumber": 1, "etag": etag.strip('"')}], "quotes stripped"),
        ([{"partNumber": 1, "etag": etag.upper()}], "case changed"),
        ([{"partNumber": 2, "etag": etag}], "part never uploaded"),
        ([{"partNumber": 1, "etag": etag}, {"partNumber": 1, "etag": etag}], "listed twice"),
        ([], "no parts"),
    ):
        status, body = await complete(http, fake, upload, parts)
        assert status == 400 and body["error"]["code"] == "validation_error", why
    status, body = await complete(http, fake, upload, [part], model="moondream2")
    assert status == 400 and body["error"]["code"] == "invalid_model"
    status, body = await complete(http, fake, upload, [part], model="moondream3-preview/abc")
    assert status == 400 and body["error"]["code"] == "invalid_model"
    # refused completes leave the upload open
    status, body = await complete(http, fake, upload, [part], model="moondream3-preview/ft-123@400")
    assert status == 200, body
    record = fake.batches[body["id"]]
    assert record.model == "moondream3-preview/ft-123@400" and record.completes == 8


async def test_part_failure_retry_replacement_and_limits(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    upload = await create(http, fake)
    data = small_batch(3)
    fake.batch_part_fail_next(1, status=500)
    assert fake.pending_faults == 1
    status, body = await put_part(http, fake, upload, 1, data[:100])
    assert status == 500 and body["error"]["code"]
    status, first = await put_part(http, fake, upload, 1, data[:100])  # the retry
    assert status == 200 and fake.pending_faults == 0
    # re-uploading a part replaces it: the old etag no longer completes
    status, replaced = await put_part(http, fake, upload, 1, data[:50])
    assert status == 200 and replaced["etag"] != first["etag"]
    status, second = await put_part(http, fake, upload, 2, data[50:])
    assert status == 200
    assert fake.uploads[upload["uploadId"]].part_uploads == {1: 3, 2: 1}
    status, body = await complete(http, fake, upload, [second, first])
    assert status == 400 and body["error"]["code"] == "validation_error"
    status, body = await complete(http, fake, upload, [second, replaced])  # any order: joined by partNumber
    assert status == 200 and body["size"] == len(data)
    assert fake.batches[body["id"]].lines == 3

    other = await create(http, fake)
    fake.batch_max_part_bytes = 1000
    status, body = await put_part(http, fake, other, 1, b"x" * 1000)
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    status, _ = await put_part(http, fake, other, 1, b"x" * 999)
    assert status == 200
    status, body = await call(
        http,
        "PUT",
        f"{fake.base_url}/batch/{other['fileId']}",
        params={"action": "mpu-uploadpart", "uploadId": other["uploadId"], "partNumber": "2"},
        data=b"{}",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert status == 400
    status, _ = await put_part(http, fake, {**other, "uploadId": "nope"}, 1, b"x")
    assert status == 404
    status, _ = await put_part(http, fake, {**other, "fileId": upload["fileId"]}, 1, b"x")
    assert status == 404
    status, _ = await put_part(http, fake, other, 0, b"x")
    assert status == 400
    fake.reset()
    assert fake.batch_max_part_bytes == 100_000_000
    assert fake.batch_polls_to_complete == 2 and fake.batch_output_files == 2
    assert fake.batches and fake.uploads  # state survives reset


async def test_complete_twice_and_abort(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    upload = await create(http, fake)
    status, part = await put_part(http, fake, upload, 1, small_batch())
    status, first = await complete(http, fake, upload, [part])
    assert status == 200
    status, body = await complete(http, fake, upload, [part])
    assert status == 400 and body["error"]["code"] == "validation_error"
    assert fake.batches[first["id"]].completes == 2 and len(fake.batches) == 1
    status, _ = await put_part(http, fake, upload, 2, b"more")
    assert status == 404
    abort = {"action": "mpu-abort", "uploadId": upload["uploadId"]}
    status, _ = await call(http, "DELETE", f"{fake.base_url}/batch/{upload['fileId']}", params=abort)
    assert status == 400

    other = await create(http, fake)
    status, part = await put_part(http, fake, other, 1, small_batch())
    abort = {"action": "mpu-abort", "uploadId": other["uploadId"]}
    for _ in range(2):  # idempotent
        status, body = await call(http, "DELETE", f"{fake.base_url}/batch/{other['fileId']}", params=abort)
        assert status == 204 and body is None
    status, _ = await complete(http, fake, other, [part])
    assert status == 404
    assert fake.uploads[other["uploadId"]].state == "aborted"


# ---------------------------------------------------------------- batch lifecycle


async def test_failed_batches(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.batch_fail_next(code="processing_failed", message="worker pool exhausted")
    assert fake.pending_faults == 1
    batch_id = await submit(http, fake, small_batch(2))
    history = await poll_until_done(http, fake, batch_id)
    assert [h["status"] for h in history] == ["chunking", "processing", "failed"]
    assert history[-1]["error"] == {"code": "processing_failed", "message": "worker pool exhausted"}
    assert "outputs" not in history[-1] and "usage" not in history[-1]
    assert fake.batches[batch_id].status == "failed"

    fake.batch_polls_to_complete = 0
    batch_id = await submit(http, fake, b"\n")
    (final,) = await poll_until_done(http, fake, batch_id)
    assert final["status"] == "failed" and final["error"]["code"] == "empty_batch"

    batch_id = await submit(http, fake, b"{}\n" * 100_001)
    (final,) = await poll_until_done(http, fake, batch_id)
    assert final["status"] == "failed" and final["error"]["code"] == "limit_exceeded"
    assert final["progress"]["total"] == 100_001

    # a longer schedule: chunking, processing with rising progress, completed
    fake.batch_polls_to_complete = 4
    fake.batch_output_files = 3
    batch_id = await submit(http, fake, small_batch(8))
    history = await poll_until_done(http, fake, batch_id)
    assert [h["status"] for h in history] == ["chunking", "processing", "processing", "processing", "completed"]
    done = [h["progress"]["completed"] for h in history]
    assert done == sorted(done) and done[-1] == 8 and 0 < done[1] < 8
    assert len(history[-1]["outputs"]) == 3


async def test_expiry(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    batch_id = await submit(http, fake, small_batch(3))
    final = (await poll_until_done(http, fake, batch_id))[-1]
    url = final["outputs"][0]["url"]
    status, _ = await fetch(http, url)
    assert status == 200
    fake.expire_batch(batch_id)
    after = await poll(http, fake, batch_id)
    assert after["status"] == "completed" and parse_time(after["expires_at"]) < time.time()
    assert after["outputs"] == final["outputs"]
    status, text = await fetch(http, url)
    assert status == 404 and "expired" in text and text.lstrip().startswith("<?xml")
    assert fake.batches[batch_id].downloads == {0: 1}


async def test_list_pagination(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    fake.batch_polls_to_complete = 0
    ids = [await submit(http, fake, small_batch()) for _ in range(5)]
    await poll(http, fake, ids[0])
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, body = await call(http, "GET", f"{fake.base_url}/batch", params=params)
        assert status == 200 and set(body) == {"batches", "next_cursor", "has_more"}
        assert len(body["batches"]) <= 2
        seen += body["batches"]
        pages += 1
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
        assert cursor
    assert pages == 3
    assert [b["id"] for b in seen] == ids[::-1]  # newest first, each once
    oldest = seen[-1]
    assert oldest["status"] == "completed" and "outputs" not in oldest and oldest["progress"]["total"] == 1
    assert {b["status"] for b in seen[:-1]} == {"chunking"}  # listing is not a poll
    assert fake.batches[ids[1]].polls == 0
    for params in ({"limit": "0"}, {"limit": "x"}, {"cursor": "nope"}):
        status, body = await call(http, "GET", f"{fake.base_url}/batch", params=params)
        assert status == 400 and body["error"]["code"] == "validation_error"


# ---------------------------------------------------------------- auth and output URLs


async def test_auth_and_presigned_urls(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    batch_id = await submit(http, fake, small_batch(2))
    final = (await poll_until_done(http, fake, batch_id))[-1]
    upload = fake.batches[batch_id]
    base = f"{fake.base_url}/batch"
    routes = [
        ("POST", base, {"action": "mpu-create"}),
        ("GET", base, {}),
        ("GET", f"{base}/{batch_id}", {}),
        ("PUT", f"{base}/{upload.file_id}", {"action": "mpu-uploadpart", "uploadId": upload.upload_id, "partNumber": "1"}),
        ("POST", f"{base}/{upload.file_id}", {"action": "mpu-complete", "uploadId": upload.upload_id}),
        ("DELETE", f"{base}/{upload.file_id}", {"action": "mpu-abort", "uploadId": upload.upload_id}),
    ]
    for headers in ({}, {"X-Moondream-Auth": "wrong"}, {"Authorization": f"Bearer {KEY}"}):
        for method, url, params in routes:
            status, body = await call(http, method, url, params=params, headers=headers, data=b"{}")
            assert status == 401 and body["error"]["code"] == "unauthorized", (method, url, headers)
    polls = fake.batches[batch_id].polls
    assert polls == 3  # refused GETs are no polls

    url = final["outputs"][1]["url"]
    status, text = await fetch(http, url)  # no header at all
    assert status == 200 and text.count("\n") >= 1
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    good = query["X-Amz-Signature"][0]
    wrong = url.replace(good, "0" * len(good))
    status, text = await fetch(http, wrong)
    assert status == 403 and "SignatureDoesNotMatch" in text
    status, _ = await fetch(http, f"{parts.scheme}://{parts.netloc}{parts.path}")
    assert status == 403
    status, _ = await fetch(http, url, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 400
    status, _ = await fetch(http, url.replace("/1.jsonl", "/7.jsonl"))
    assert status == 404
    assert fake.batches[batch_id].downloads == {1: 1}

    # injected faults reach the batch routes like any other
    fake.fail_next(status=503, route="/v1/batch")
    status, body = await call(http, "GET", f"{base}/{batch_id}")
    assert status == 503
    assert (await poll(http, fake, batch_id))["status"] == "completed"


async def test_no_key_accepts_everyone(http: aiohttp.ClientSession) -> None:
    async with FakeMoondream(api_key=None) as fake:
        status, body = await call(http, "POST", f"{fake.base_url}/batch?action=mpu-create", headers={})
        assert status == 200 and body["uploadId"]
