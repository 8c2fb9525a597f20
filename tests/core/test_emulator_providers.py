"""The emulator's fal.ai and AIgateway routes against ground truth, over real HTTP.

Plain aiohttp sessions only (none of the project's clients): fal sync skills against scene
truth and the native routes, fal validation / auth shapes, SAM 3 masks pixel for pixel, the
fal queue lifecycle and its faults, AIgateway image edits, and fault injection on every family.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from moondream_tools.testing import FakeMoondream, FormFile, Scene, Shape

KEY = "test-key"
MD = "fal-ai/moondream3-preview"
SAM3 = "fal-ai/sam-3/image"
SEEDS = range(5)


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def fake() -> AsyncIterator[FakeMoondream]:
    async with FakeMoondream() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def fal_auth(fake: FakeMoondream) -> dict[str, str]:
    return {"Authorization": f"Key {fake.fal_key}"}


def gw_auth(fake: FakeMoondream) -> dict[str, str]:
    return {"Authorization": f"Bearer {fake.aigateway_key}"}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, Any, Any]:
    """(status, JSON body, headers)."""
    async with http.request(method, url, headers=headers or {}, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def fal(
    http: aiohttp.ClientSession, fake: FakeMoondream, endpoint: str, body: Any, *, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    status, data, _ = await call(
        http, "POST", f"{fake.fal_base_url}/{endpoint}", json=body, headers=fal_auth(fake) if headers is None else headers
    )
    return status, data


async def native(http: aiohttp.ClientSession, fake: FakeMoondream, route: str, body: Any) -> dict[str, Any]:
    status, data, _ = await call(http, "POST", f"{fake.base_url}/{route}", json=body, headers={"X-Moondream-Auth": KEY})
    assert status == 200, data
    data.pop("request_id")
    return data


async def download(http: aiohttp.ClientSession, url: str) -> tuple[bytes, str]:
    async with http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.read(), resp.content_type


def decode_mask(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "L"
    arr = np.asarray(img)
    assert set(np.unique(arr).tolist()) <= {0, 255}
    return arr == 255


def data_uri_bytes(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64")
    return base64.b64decode(data)


def near(a: tuple[float, ...], b: tuple[float, ...], tol: float = 0.02) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def assert_same_set(got: list[tuple[float, ...]], want: list[tuple[float, ...]], what: str) -> None:
    assert len(got) == len(want), f"{what}: got {len(got)}, want {len(want)}"
    left = list(got)
    for w in want:
        match = next((g for g in left if near(g, w)), None)
        assert match is not None, f"{what}: nothing within 2% of {w} in {got}"
        left.remove(match)


def reading_order(scene: Scene, phrase: str) -> list[Any]:
    return sorted(scene.matching(phrase), key=lambda t: (t.bbox_px[1], t.bbox_px[0]))


TWO_CIRCLES = Scene(400, 200, [Shape("circle", "red", (100, 100), 80), Shape("circle", "red", (300, 100), 80)])


# ---------------------------------------------------------------- fal sync: Moondream skills


async def test_fal_skills_answer_scene_truth_like_the_native_api(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    usage_keys = {"input_tokens", "output_tokens", "ttft_ms", "prefill_time_ms", "decode_time_ms"}
    for seed in SEEDS:
        scene = Scene.random(seed)
        url = scene.data_url()
        truth = scene.truth()
        phrases = {"shapes"} | {t.label for t in truth} | {t.kind + "s" for t in truth}
        for phrase in sorted(phrases):
            want = scene.matching(phrase)
            status, det = await fal(http, fake, f"{MD}/detect", {"image_url": url, "prompt": phrase})
            assert status == 200, det
            assert det["finish_reason"] == "stop" and set(det["usage_info"]) == usage_keys
            boxes = [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in det["objects"]]
            assert_same_set(boxes, [t.bbox for t in want], f"seed {seed} detect {phrase!r}")
            assert det["objects"] == (await native(http, fake, "detect", {"image_url": url, "object": phrase}))["objects"]
            status, pts = await fal(http, fake, f"{MD}/point", {"image_url": url, "prompt": phrase})
            assert status == 200 and "image" not in pts
            assert_same_set([(p["x"], p["y"]) for p in pts["points"]], [t.center for t in want], f"point {phrase!r}")
            status, ans = await fal(http, fake, f"{MD}/query", {"image_url": url, "prompt": f"How many {phrase} are there?"})
            assert status == 200 and ans["output"] == str(len(want))
            assert isinstance(ans["reasoning"], str) and "count" in ans["reasoning"], "reasoning defaults to true"
        for t in truth:
            body = {"image_url": url, "object": t.label, "spatial_references": [{"x": t.center[0], "y": t.center[1]}]}
            status, seg = await fal(http, fake, f"{MD}/segment", body)
            assert status == 200, seg
            same = await native(http, fake, "segment", {"image_url": url, "object": t.label, "spatial_refs": [list(t.center)]})
            assert (seg["path"], seg["bbox"]) == (same["path"], same["bbox"])
            assert near((seg["bbox"]["x_min"], seg["bbox"]["y_min"], seg["bbox"]["x_max"], seg["bbox"]["y_max"]), t.bbox)
        for length in ("short", "normal", "long"):
            status, cap = await fal(http, fake, f"{MD}/caption", {"image_url": url, "length": length, "temperature": 0.2, "top_p": 0.9})
            assert status == 200
            assert cap["output"] == (await native(http, fake, "caption", {"image_url": url, "length": length}))["caption"]
            assert cap["finish_reason"] == "stop" and cap["usage_info"]["output_tokens"] > 0
    status, ans = await fal(http, fake, f"{MD}/query", {"image_url": url, "prompt": "Is there a car?", "reasoning": False})
    assert status == 200 and ans["output"] == "No" and "reasoning" not in ans


async def test_fal_detect_has_no_max_objects_and_previews(http: aiohttp.ClientSession) -> None:
    scene = Scene(400, 300, [Shape("square", "blue", (60 + 90 * i, 150), 50) for i in range(4)])
    async with FakeMoondream(max_objects_default=3) as fake:
        url = scene.data_url()
        assert len((await native(http, fake, "detect", {"image_url": url, "object": "squares"}))["objects"]) == 3
        status, det = await fal(http, fake, f"{MD}/detect", {"image_url": url, "prompt": "squares", "preview": True})
        assert status == 200 and len(det["objects"]) == 4
        image = det["image"]
        assert image["url"].startswith(f"{fake.url}/fal-files/") and (image["width"], image["height"]) == (400, 300)
        data, ctype = await download(http, image["url"])
        assert ctype == "image/png" and Image.open(io.BytesIO(data)).size == (400, 300)


async def test_fal_segment_spatial_references_preview_and_nothing(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = TWO_CIRCLES.data_url("PNG")  # lossless: the preview mask is exactly the drawn circle
    for ref in ({"x": 0.75, "y": 0.5}, [0.75, 0.5], [0.6, 0.2, 0.9, 0.8]):
        status, seg = await fal(http, fake, f"{MD}/segment", {"image_url": url, "object": "red circle", "spatial_references": [ref]})
        assert status == 200 and seg["bbox"]["x_min"] > 0.5, ref
    body = {"image_url": url, "object": "circle", "preview": True, "settings": {"temperature": 0.5, "top_p": 1, "max_tokens": 300}}
    status, seg = await fal(http, fake, f"{MD}/segment", body)
    assert status == 200 and seg["bbox"]["x_min"] < 0.5
    mask = decode_mask((await download(http, seg["image"]["url"]))[0])
    assert (mask == TWO_CIRCLES.mask(0)).all()
    status, none = await fal(http, fake, f"{MD}/segment", {"image_url": url, "object": "giraffe"})
    assert status == 200 and none["path"] is None and none["bbox"] is None and none["finish_reason"] == "stop"


async def test_fal_auth(http: aiohttp.ClientSession) -> None:
    body = {"image_url": TWO_CIRCLES.data_url(), "prompt": "circle"}
    async with FakeMoondream() as fake:
        assert fake.fal_key and fake.fal_key != KEY and fake.aigateway_key
        assert fake.fal_base_url == f"{fake.url}/fal" and fake.fal_queue_base_url == f"{fake.url}/fal-queue"
        for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": f"Bearer {fake.fal_key}"}, {"Authorization": f"Key {KEY}"}):
            status, err = await fal(http, fake, f"{MD}/detect", body, headers=headers)
            assert status == 401 and isinstance(err["detail"], str), headers
            assert fake.fal_key not in err["detail"]
        assert (await fal(http, fake, f"{MD}/detect", body))[0] == 200
        assert (await call(http, "POST", f"{fake.fal_queue_base_url}/{MD}/detect", json=body))[0] == 401
    async with FakeMoondream(fal_key=None, aigateway_key="gw") as fake:
        assert fake.fal_key is None and fake.aigateway_key == "gw"
        assert (await fal(http, fake, f"{MD}/detect", body, headers={}))[0] == 200
        assert (await fal(http, fake, f"{MD}/detect", body, headers={"Authorization": "Key anything"}))[0] == 200


async def test_fal_validation_details(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = TWO_CIRCLES.data_url()
    cases: list[tuple[str, Any, list[tuple[list[Any], str]]]] = [
        ("detect", {"image_url": url}, [(["body", "prompt"], "missing")]),
        ("detect", {"prompt": "x"}, [(["body", "image_url"], "missing")]),
        ("detect", {"image_url": url, "object": "circle"}, [(["body", "prompt"], "missing"), (["body", "object"], "extra_forbidden")]),
        ("segment", {"image_url": url, "prompt": "circle"}, [(["body", "object"], "missing"), (["body", "prompt"], "extra_forbidden")]),
        ("detect", {"image_url": url, "prompt": "x", "settings": {"max_objects": 3}}, [(["body", "settings"], "extra_forbidden")]),
        ("query", {"image_url": url, "prompt": ""}, [(["body", "prompt"], "string_too_short")]),
        ("query", {"image_url": url, "prompt": "hi", "reasoning": "yes"}, [(["body", "reasoning"], "bool_type")]),
        ("caption", {"image_url": url, "length": "huge"}, [(["body", "length"], "literal_error")]),
        ("caption", {"image_url": url, "temperature": 2}, [(["body", "temperature"], "less_than_equal")]),
        ("segment", {"image_url": url, "object": "c", "spatial_references": [[100, 50]]}, [(["body", "spatial_references", 0], "value_error")]),
        ("segment", {"image_url": url, "object": "c", "settings": {"max_tokens": 0}}, [(["body", "settings", "max_tokens"], "greater_than_equal")]),
        ("detect", {"image_url": "https://example.com/a.jpg", "prompt": "x"}, [(["body", "image_url"], "value_error")]),
        ("detect", {"image_url": "data:image/png;base64,@@@", "prompt": "x"}, [(["body", "image_url"], "image_load_error")]),
        ("detect", [1, 2], [(["body"], "model_attributes_type")]),
    ]
    for skill, body, want in cases:
        status, err = await fal(http, fake, f"{MD}/{skill}", body)
        assert status == 422, (skill, body)
        assert [(d["loc"], d["type"]) for d in err["detail"]] == want, err
        assert all(isinstance(d["msg"], str) and d["msg"] for d in err["detail"])
    status, err = await fal(http, fake, f"{MD}/detect", {"image_url": "https://example.com/a.jpg", "prompt": "x"})
    assert "data URI" in err["detail"][0]["msg"]
    status, err, _ = await call(
        http, "POST", f"{fake.fal_base_url}/{MD}/detect", data=b"{nope", headers={**fal_auth(fake), "Content-Type": "application/json"}
    )
    assert status == 422 and err["detail"][0]["type"] == "json_invalid"
    status, err, _ = await call(http, "POST", f"{fake.fal_base_url}/fal-ai/moondream3-preview/ocr", json={}, headers=fal_auth(fake))
    assert status == 404 and isinstance(err["detail"], str)


# ---------------------------------------------------------------- fal sync: SAM 3


async def test_sam3_masks_are_the_shapes_pixels(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    kinds = ("circle", "square", "triangle", "ring")
    for seed in range(3):
        scene = Scene.random(seed, kinds=kinds, count=(3, 6))
        body = {
            "image_url": scene.data_url("PNG"),
            "prompt": "shapes",
            "sync_mode": True,
            "return_multiple_masks": True,
            "max_masks": 32,
            "include_scores": True,
            "include_boxes": True,
        }
        status, out = await fal(http, fake, SAM3, body)
        assert status == 200, out
        want = reading_order(scene, "shapes")
        assert len(out["masks"]) == len(want) == len(out["scores"]) == len(out["boxes"]) == len(out["metadata"])
        assert out["scores"] == pytest.approx([0.95 - 0.01 * i for i in range(len(want))])
        for i, (image, t) in enumerate(zip(out["masks"], want)):
            assert image["content_type"] == "image/png" and (image["width"], image["height"]) == scene.size
            mask = decode_mask(data_uri_bytes(image["url"]))
            assert (mask == scene.mask(t.index)).all(), (seed, t.label)
            assert mask.sum() == t.area_px
            x0, y0, x1, y1 = t.bbox
            assert out["boxes"][i] == pytest.approx([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], abs=1e-5)
            assert out["metadata"][i] == {"index": i, "score": out["scores"][i], "box": out["boxes"][i]}
    # max_masks caps only with return_multiple_masks; fal_sam3_primary_only keeps the first mask
    body = {"image_url": TWO_CIRCLES.data_url("PNG"), "prompt": "red circles", "sync_mode": True, "max_masks": 1}
    status, both = await fal(http, fake, SAM3, body)
    assert status == 200 and len(both["masks"]) == 2 and "scores" not in both and "boxes" not in both
    assert len((await fal(http, fake, SAM3, {**body, "return_multiple_masks": True}))[1]["masks"]) == 1
    fake.fal_sam3_primary_only = True
    status, one = await fal(http, fake, SAM3, {**body, "max_masks": 3})
    assert status == 200 and len(one["masks"]) == 1
    assert (decode_mask(data_uri_bytes(one["masks"][0]["url"])) == TWO_CIRCLES.mask(0)).all()
    assert len((await fal(http, fake, SAM3, {**body, "max_masks": 3, "return_multiple_masks": True}))[1]["masks"]) == 2
    fake.fal_sam3_primary_only = False
    for prompt in ({"prompt": "giraffe"}, {}):
        status, none = await fal(http, fake, SAM3, {"image_url": TWO_CIRCLES.data_url("PNG"), **prompt})
        assert status == 200 and none["masks"] == [] and none["metadata"] == []


async def test_sam3_point_and_box_prompts_are_pixels(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = TWO_CIRCLES.data_url("PNG")
    many = {"image_url": url, "sync_mode": True}

    async def masks(**extra: Any) -> list[np.ndarray]:
        status, out = await fal(http, fake, SAM3, {**many, **extra})
        assert status == 200, out
        return [decode_mask(data_uri_bytes(m["url"])) for m in out["masks"]]

    right, left = TWO_CIRCLES.mask(1), TWO_CIRCLES.mask(0)
    got = await masks(point_prompts=[{"x": 300, "y": 100, "label": 1}])
    assert len(got) == 1 and (got[0] == right).all()
    got = await masks(prompt="red circle", point_prompts=[{"x": 310, "y": 90}])
    assert len(got) == 1 and (got[0] == right).all()
    got = await masks(prompt="circles", point_prompts=[{"x": 100, "y": 100, "label": 0}])
    assert len(got) == 1 and (got[0] == right).all(), "a background point removes its instance"
    got = await masks(box_prompts=[{"x_min": 40, "y_min": 40, "x_max": 120, "y_max": 160}])
    assert len(got) == 1 and (got[0] == left).all()
    assert len(await masks(prompt="circle", box_prompts=[{"x_min": 0, "y_min": 0, "x_max": 400.0, "y_max": 200}])) == 2
    assert await masks(point_prompts=[{"x": 200, "y": 100}]) == [], "a point between the circles hits nothing"
    status, err = await fal(http, fake, SAM3, {"image_url": url, "point_prompts": [{"x": 0.75, "y": 0.5}]})
    assert status == 422 and [d["type"] for d in err["detail"]] == ["int_from_float", "int_from_float"]
    assert err["detail"][0]["loc"] == ["body", "point_prompts", 0, "x"]
    status, err = await fal(http, fake, SAM3, {"image_url": url, "max_masks": 33})
    assert status == 422 and err["detail"][0]["loc"] == ["body", "max_masks"]


async def test_sam3_urls_download(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(320, 240, [Shape("ring", "magenta", (160, 120), 150)])
    for fmt in ("png", "webp"):
        status, out = await fal(http, fake, SAM3, {"image_url": scene.data_url("PNG"), "prompt": "ring", "output_format": fmt})
        assert status == 200
        image = out["masks"][0]
        assert image["url"].startswith(f"{fake.url}/fal-files/") and image["content_type"] == f"image/{fmt}"
        data, ctype = await download(http, image["url"])  # no auth header needed, as on fal's CDN
        assert ctype == f"image/{fmt}" and len(data) == image["file_size"]
        mask = np.asarray(Image.open(io.BytesIO(data)).convert("L")) == 255
        assert (mask == scene.mask(0)).all() and not mask[120, 160], "the hole stays a hole"
    assert (await call(http, "GET", f"{fake.url}/fal-files/nope/mask_0.png"))[0] == 404


# ---------------------------------------------------------------- fal queue


async def poll_statuses(http: aiohttp.ClientSession, fake: FakeMoondream, status_url: str, n: int) -> list[tuple[int, dict[str, Any]]]:
    return [(s, b) for s, b, _ in [await call(http, "GET", status_url, headers=fal_auth(fake)) for _ in range(n)]]


async def test_fal_queue_lifecycle(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    body = {"image_url": TWO_CIRCLES.data_url(), "prompt": "red circles"}
    _, sync = await fal(http, fake, f"{MD}/detect", body)
    status, sub, _ = await call(http, "POST", f"{fake.fal_queue_base_url}/{MD}/detect", json=body, headers=fal_auth(fake))
    assert status == 200 and sub["status"] == "IN_QUEUE"
    rid = sub["request_id"]
    base = f"{fake.fal_queue_base_url}/{MD}/requests/{rid}"
    assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (base, f"{base}/status", f"{base}/cancel")
    status, early, _ = await call(http, "GET", sub["response_url"], headers=fal_auth(fake))
    assert status == 400 and isinstance(early["detail"], str)
    polls = await poll_statuses(http, fake, sub["status_url"], 4)
    assert [(s, b["status"]) for s, b in polls] == [(202, "IN_QUEUE"), (202, "IN_PROGRESS"), (200, "COMPLETED"), (200, "COMPLETED")]
    assert polls[0][1]["queue_position"] == 0 and "error" not in polls[2][1]
    status, result, headers = await call(http, "GET", sub["response_url"], headers=fal_auth(fake))
    assert status == 200 and result == sync and headers["x-fal-request-id"] == rid
    for method, url in (("GET", sub["status_url"]), ("GET", sub["response_url"]), ("PUT", sub["cancel_url"])):
        assert (await call(http, method, url))[0] == 401
    # more polls, logs, SAM 3's app path, and a bad input completing as the job's 422
    fake.fal_queue_polls = 4
    sam = {"image_url": TWO_CIRCLES.data_url("PNG"), "prompt": "circle", "sync_mode": True}
    _, sub, _ = await call(http, "POST", f"{fake.fal_queue_base_url}/{SAM3}", json=sam, headers=fal_auth(fake))
    assert sub["status_url"] == f"{fake.fal_queue_base_url}/fal-ai/sam-3/requests/{sub['request_id']}/status"
    assert sub["queue_position"] == 2
    polls = await poll_statuses(http, fake, sub["status_url"] + "?logs=1", 5)
    assert [b["status"] for _, b in polls] == ["IN_QUEUE"] * 3 + ["IN_PROGRESS", "COMPLETED"]
    assert [b.get("queue_position") for _, b in polls[:3]] == [2, 1, 0] and isinstance(polls[3][1]["logs"], list)
    status, result, _ = await call(http, "GET", sub["response_url"], headers=fal_auth(fake))
    assert status == 200 and len(result["masks"]) == 2
    wrong_app = sub["response_url"].replace("fal-ai/sam-3/", "fal-ai/moondream3-preview/")
    assert (await call(http, "GET", wrong_app, headers=fal_auth(fake)))[0] == 404
    fake.fal_queue_polls = 0
    _, sub, _ = await call(http, "POST", f"{fake.fal_queue_base_url}/{MD}/query", json={"image_url": body["image_url"]}, headers=fal_auth(fake))
    status, err, _ = await call(http, "GET", sub["response_url"], headers=fal_auth(fake))
    assert status == 422 and err["detail"][0]["loc"] == ["body", "prompt"]


async def test_fal_queue_cancel_stall_and_error(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    body = {"image_url": TWO_CIRCLES.data_url(), "prompt": "circle"}
    submit = f"{fake.fal_queue_base_url}/{MD}/point"
    fake.fal_queue_stall_next()
    fake.fal_queue_error_next(message="runner went away", error_type="runner_disconnected")
    assert fake.pending_faults == 2
    _, stalled, _ = await call(http, "POST", submit, json=body, headers=fal_auth(fake))
    _, failing, _ = await call(http, "POST", submit, json=body, headers=fal_auth(fake))
    _, fine, _ = await call(http, "POST", submit, json=body, headers=fal_auth(fake))
    assert fake.pending_faults == 0
    polls = await poll_statuses(http, fake, stalled["status_url"], 6)
    assert {(s, b["status"], b["queue_position"]) for s, b in polls} == {(202, "IN_QUEUE", 0)}
    status, ack, _ = await call(http, "PUT", stalled["cancel_url"], headers=fal_auth(fake))
    assert status == 202 and ack == {"status": "CANCELLATION_REQUESTED"}
    assert fake.fal_cancelled == [stalled["request_id"]]
    _, after = (await poll_statuses(http, fake, stalled["status_url"], 1))[0]
    assert after["status"] == "COMPLETED" and after["error_type"] == "request_cancelled"
    assert (await call(http, "GET", stalled["response_url"], headers=fal_auth(fake)))[0] == 400
    status, again, _ = await call(http, "PUT", stalled["cancel_url"], headers=fal_auth(fake))
    assert status == 400 and again == {"status": "ALREADY_COMPLETED"} and len(fake.fal_cancelled) == 1
    unknown = stalled["cancel_url"].replace(stalled["request_id"], "00000000-0000-0000-0000-000000000000")
    assert (await call(http, "PUT", unknown, headers=fal_auth(fake)))[:2] == (404, {"status": "NOT_FOUND"})
    polls = await poll_statuses(http, fake, failing["status_url"], 3)
    assert [b["status"] for _, b in polls] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert (polls[2][1]["error"], polls[2][1]["error_type"]) == ("runner went away", "runner_disconnected")
    status, err, headers = await call(http, "GET", failing["response_url"], headers=fal_auth(fake))
    assert status == 500 and err["detail"] == "runner went away" and headers["X-Fal-Error-Type"] == "runner_disconnected"
    await poll_statuses(http, fake, fine["status_url"], 3)
    status, points, _ = await call(http, "GET", fine["response_url"], headers=fal_auth(fake))
    assert status == 200 and len(points["points"]) == 2
    fake.fal_queue_stall_next(3)
    fake.reset()
    assert fake.pending_faults == 0 and fake.fal_cancelled == [] and fake.requests == []


# ---------------------------------------------------------------- AIgateway


def png_bytes(scene: Scene) -> bytes:
    return scene.encode("PNG")


def union(scene: Scene, phrase: str) -> np.ndarray:
    out = np.zeros((scene.height, scene.width), dtype=bool)
    for t in scene.matching(phrase):
        out |= scene.mask(t.index)
    return out


async def test_aigateway_multipart_and_json(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    scene = Scene(
        400, 300, [Shape("circle", "red", (80, 80), 90), Shape("square", "blue", (250, 150), 80), Shape("circle", "red", (330, 240), 70)]
    )
    url = f"{fake.aigateway_base_url}/images/edits"
    assert fake.aigateway_base_url == f"{fake.url}/aigateway/v1"
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(scene), filename="scene.png", content_type="image/png")
    form.add_field("prompt", "red circles")
    form.add_field("model", "meta/sam-3-image")
    form.add_field("response_format", "b64_json")
    form.add_field("n", "2")
    start = time.time()
    status, out, _ = await call(http, "POST", url, data=form, headers=gw_auth(fake))
    assert status == 200, out
    assert isinstance(out["created"], int) and out["created"] >= int(start) - 1 and len(out["data"]) == 2
    mask = decode_mask(base64.b64decode(out["data"][0]["b64_json"]))
    assert (mask == union(scene, "red circles")).all() and mask.sum() == sum(t.area_px for t in scene.matching("red circle"))
    rec = fake.requests[-1]
    assert rec.path == "/aigateway/v1/images/edits" and rec.json is None and rec.form is not None
    assert {k: v for k, v in rec.form.items() if k != "image"} == {
        "prompt": "red circles", "model": "meta/sam-3-image", "response_format": "b64_json", "n": "2"
    }
    image = rec.form["image"]
    assert isinstance(image, FormFile) and image.filename == "scene.png" and image.content_type == "image/png"
    assert image.size == len(png_bytes(scene)) == len(image.data)
    # JSON with a data URI, and response_format url
    body = {"image_url": scene.data_url("PNG"), "prompt": "blue square", "model": "moondream/moondream3-preview-segment", "size": "400x300"}
    status, out, _ = await call(http, "POST", url, json=body, headers=gw_auth(fake))
    assert status == 200 and fake.requests[-1].form is None and fake.requests[-1].json == body
    assert (decode_mask(base64.b64decode(out["data"][0]["b64_json"])) == union(scene, "blue square")).all()
    status, out, _ = await call(http, "POST", url, json={**body, "response_format": "url"}, headers=gw_auth(fake))
    assert status == 200 and out["data"][0]["url"].startswith(fake.url)
    data, ctype = await download(http, out["data"][0]["url"])
    assert ctype == "image/png" and (decode_mask(data) == union(scene, "blue square")).all()
    status, out, _ = await call(http, "POST", url, json={**body, "prompt": "giraffe"}, headers=gw_auth(fake))
    assert status == 200 and not decode_mask(base64.b64decode(out["data"][0]["b64_json"])).any()


async def test_aigateway_errors(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    url = f"{fake.aigateway_base_url}/images/edits"
    body = {"image_url": TWO_CIRCLES.data_url(), "prompt": "circle", "model": "meta/sam-3-image"}

    def shape(err: dict[str, Any], kind: str) -> bool:
        return set(err["error"]) == {"message", "type", "code", "param"} and err["error"]["type"] == kind

    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Key {fake.aigateway_key}"}):
        status, err, _ = await call(http, "POST", url, json=body, headers=headers)
        assert status == 401 and shape(err, "authentication_error"), headers
    status, err, _ = await call(http, "POST", url, json={**body, "model": "openai/gpt-image-1"}, headers=gw_auth(fake))
    assert status == 404 and shape(err, "not_found") and err["error"]["param"] == "model"
    for missing in ("prompt", "model", "image_url"):
        status, err, _ = await call(http, "POST", url, json={k: v for k, v in body.items() if k != missing}, headers=gw_auth(fake))
        assert status == 400 and shape(err, "invalid_request_error") and err["error"]["param"] == missing
    status, err, _ = await call(http, "GET", f"{fake.aigateway_base_url}/images/generations", headers=gw_auth(fake))
    assert status == 404 and shape(err, "not_found")
    credits = {"error": {"message": "Wallet empty", "type": "insufficient_credits", "code": "insufficient_credits", "param": None}}
    fake.fail_next(status=402, body=json.dumps(credits))
    status, err, _ = await call(http, "POST", url, json=body, headers=gw_auth(fake))
    assert status == 402 and err == credits
    fake.fail_next(status=429, retry_after="7")
    status, err, headers = await call(http, "POST", url, json=body, headers=gw_auth(fake))
    assert status == 429 and headers["Retry-After"] == "7" and shape(err, "rate_limit_error")
    fake.fail_next(status=503)
    status, err, _ = await call(http, "POST", url, json=body, headers=gw_auth(fake))
    assert status == 503 and shape(err, "service_unavailable")
    assert (await call(http, "POST", url, json=body, headers=gw_auth(fake)))[0] == 200


# ---------------------------------------------------------------- faults, latency, rate limit


async def test_fail_next_headers_routes_and_families(fake: FakeMoondream, http: aiohttp.ClientSession) -> None:
    body = {"image_url": TWO_CIRCLES.data_url(), "prompt": "circle"}
    detail = {"detail": [{"loc": ["body", "image_url"], "msg": "Content policy violation", "type": "content_policy_violation"}]}
    fake.fail_next(status=422, body=json.dumps(detail), headers={"X-Fal-Retryable": "false"})
    status, err, headers = await call(http, "POST", f"{fake.fal_base_url}/{MD}/detect", json=body, headers=fal_auth(fake))
    assert status == 422 and err == detail and headers["X-Fal-Retryable"] == "false"
    fake.fail_next(status=503, headers={"X-Fal-Retryable": "true"})
    status, err, headers = await call(http, "POST", f"{fake.fal_base_url}/{MD}/detect", json=body, headers=fal_auth(fake))
    assert (status, err, headers["X-Fal-Retryable"]) == (503, {"detail": "Service Unavailable"}, "true")
    # a routed fault waits for its family; unrouted faults stay FIFO for everyone
    fake.fail_next(status=429, retry_after="2", route="/fal")
    fake.fail_next(status=500)
    assert (await call(http, "POST", f"{fake.base_url}/detect", json={**body, "object": "circle"}, headers={"X-Moondream-Auth": KEY}))[0] == 500
    assert (await native(http, fake, "detect", {"image_url": body["image_url"], "object": "circle"}))["objects"]
    assert fake.pending_faults == 1
    _, sub, _ = await call(http, "POST", f"{fake.fal_queue_base_url}/{MD}/detect", json=body, headers=fal_auth(fake))
    assert sub["request_id"], "/fal-queue is not under /fal"
    status, err, headers = await call(http, "POST", f"{fake.fal_base_url}/{MD}/detect", json=body, headers=fal_auth(fake))
    assert status == 429 and headers["Retry-After"] == "2" and err == {"detail": "Too Many Requests"}
    fake.station_error_next(route=f"/fal-queue/{MD}")
    status, err, _ = await call(http, "GET", sub["status_url"], headers=fal_auth(fake))
    assert status == 200 and err == {"error": "queue full"}
    fake.drop_stream_next(route="/fal")
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(http, "POST", f"{fake.fal_base_url}/{MD}/detect", json=body, headers=fal_auth(fake))


async def test_latency_and_rate_limit_apply_to_provider_routes(http: aiohttp.ClientSession) -> None:
    body = {"image_url": TWO_CIRCLES.data_url(), "prompt": "circle"}
    async with FakeMoondream(latency=0.15) as fake:
        start = time.perf_counter()
        assert (await fal(http, fake, f"{MD}/point", body))[0] == 200
        gw = {"image_url": body["image_url"], "prompt": "circle", "model": "meta/sam-3-image"}
        assert (await call(http, "POST", f"{fake.aigateway_base_url}/images/edits", json=gw, headers=gw_auth(fake)))[0] == 200
        assert time.perf_counter() - start >= 0.3
        assert [r.path for r in fake.requests] == [f"/fal/{MD}/point", "/aigateway/v1/images/edits"]
        assert fake.requests[0].json == body and fake.requests[0].headers["Authorization"] == f"Key {fake.fal_key}"
        fake.latency = 0
        fake.rate_limit = 1
        results = [await call(http, "POST", f"{fake.aigateway_base_url}/images/edits", json=gw, headers=gw_auth(fake)) for _ in range(3)]
        limited = [(s, e, h) for s, e, h in results if s == 429]
        assert limited and fake.rate_limited == len(limited)
        assert limited[0][1]["error"]["type"] == "rate_limit_error" and limited[0][2]["Retry-After"] == "1"
        status, err = await fal(http, fake, f"{MD}/point", body)
        assert status == 429 and err == {"detail": "Rate limit exceeded"}
