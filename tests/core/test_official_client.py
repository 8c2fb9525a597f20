"""The official `moondream` client against the emulator, and wire parity with it.

The official client (installed with --no-deps; only its HTTP client ``CloudVL`` is used)
is the reference for the wire format: if it works against the emulator, the emulator
speaks the real API, and if our requests carry the same routes, headers and JSON keys as
its requests, we speak it too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import moondream
import pytest

from moondream_tools import AsyncMoondream
from moondream_tools.testing import FakeMoondream, RecordedRequest, Scene, Shape

SCENE = Scene(
    640,
    480,
    [
        Shape("circle", "red", (140, 120), 100),
        Shape("square", "blue", (470, 130), 110),
        Shape("triangle", "yellow", (330, 360), 130),
    ],
)

#: Headers whose values define the wire contract (transport headers differ by library).
CONTRACT_HEADERS = ("Content-Type", "X-Moondream-Auth", "Authorization")


def contract(request: RecordedRequest) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "headers": {name: request.headers.get(name) for name in CONTRACT_HEADERS},
        "user_agent": request.headers.get("User-Agent", "").split("/")[0],
        "keys": sorted(request.json or {}),
        "settings_keys": sorted((request.json or {}).get("settings") or {}),
    }


async def official(fake: FakeMoondream, call: str, *args: Any, **kwargs: Any) -> Any:
    """Run one official-client call in a thread (it is synchronous, on urllib)."""
    vl = moondream.vl(endpoint=fake.base_url, api_key=fake.api_key)

    def run() -> Any:
        result = getattr(vl, call)(*args, **kwargs)
        if isinstance(result, dict) and "caption" in result and not isinstance(result["caption"], str):
            return {"caption": "".join(result["caption"])}
        return result

    return await asyncio.to_thread(run)


async def test_official_client_works_against_the_emulator(fake: FakeMoondream) -> None:
    image = SCENE.render()
    truth = {t.label: t for t in SCENE.truth()}

    caption = await official(fake, "caption", image)
    assert all(label in caption["caption"].lower() for label in truth)

    answer = await official(fake, "query", image, "How many squares are there?")
    assert answer["answer"].strip() == "1"

    objects = (await official(fake, "detect", image, "red circle"))["objects"]
    assert len(objects) == 1
    for got, want in zip(
        (objects[0]["x_min"], objects[0]["y_min"], objects[0]["x_max"], objects[0]["y_max"]),
        truth["red circle"].bbox,
        strict=True,
    ):
        assert abs(got - want) <= 0.02

    points = (await official(fake, "point", image, "yellow triangle"))["points"]
    assert len(points) == 1
    assert abs(points[0]["x"] - truth["yellow triangle"].center[0]) <= 0.02

    segment = await official(fake, "segment", image, "blue square")
    assert segment["path"].startswith("M") and abs(segment["bbox"]["x_min"] - truth["blue square"].bbox[0]) <= 0.02

    streamed = await official(fake, "caption", image, stream=True)
    assert streamed["caption"] == caption["caption"]

    events = await official(fake, "segment", image, "blue square", stream=True)
    events = await asyncio.to_thread(list, events)
    assert "bbox" in events[0] and events[-1].get("completed") is True

    chat = await official(
        fake,
        "chat",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": SCENE.data_url()}},
                                      {"type": "text", "text": "How many circles?"}]}],
    )
    assert chat["message"]["content"].strip() == "1"


async def test_requests_match_the_official_client(fake: FakeMoondream) -> None:
    image = SCENE.render()
    settings = {"temperature": 0.0, "max_objects": 5}
    official_calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("caption", (image,), {"length": "short", "settings": settings}),
        ("query", (image, "How many circles?"), {"reasoning": True, "spatial_refs": [[0.2, 0.25]]}),
        ("query", (None, "What is a circle?"), {}),
        ("detect", (image, "circle"), {"settings": settings}),
        ("point", (image, "circle"), {"spatial_refs": [[0.1, 0.1, 0.4, 0.4]]}),
        ("segment", (image, "circle"), {"spatial_refs": [[0.2, 0.25]]}),
        ("chat", ([{"role": "user", "content": "hello"}],), {"reasoning": True,
                                                              "settings": {"temperature": 0.5, "top_p": 0.9,
                                                                           "max_tokens": 20}}),
    ]
    for name, args, kwargs in official_calls:
        await official(fake, name, *args, **kwargs)
    theirs = [contract(r) for r in fake.requests]
    fake.reset()

    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        await md.caption(image, length="short", settings=settings)
        await md.query(image, "How many circles?", reasoning=True, spatial_refs=[[0.2, 0.25]])
        await md.query(None, "What is a circle?")
        await md.detect(image, "circle", settings=settings)
        await md.point(image, "circle", spatial_refs=[[0.1, 0.1, 0.4, 0.4]])
        await md.segment(image, "circle", spatial_refs=[[0.2, 0.25]])
        await md.chat([{"role": "user", "content": "hello"}], reasoning=True, temperature=0.5, top_p=0.9,
                      max_tokens=20)
    ours = [contract(r) for r in fake.requests]

    assert len(ours) == len(theirs) == len(official_calls)
    for mine, reference, (name, _, _) in zip(ours, theirs, official_calls, strict=True):
        assert mine["user_agent"] == "moondream-tools" and reference["user_agent"] == "moondream-python"
        mine.pop("user_agent"), reference.pop("user_agent")
        assert mine == reference, name
    chat_body = fake.requests[-1].json
    assert chat_body is not None
    assert (chat_body["temperature"], chat_body["top_p"], chat_body["max_completion_tokens"]) == (0.5, 0.9, 20)


@pytest.mark.parametrize("stream_call", ["caption", "query", "segment"])
async def test_stream_requests_match_the_official_client(fake: FakeMoondream, stream_call: str) -> None:
    image = SCENE.render()
    args: dict[str, tuple[Any, ...]] = {
        "caption": (image,),
        "query": (image, "How many circles?"),
        "segment": (image, "circle"),
    }

    def drain(result: Any) -> None:
        if isinstance(result, dict):
            result = next(iter(result.values()))
        if not isinstance(result, str):
            list(result)

    vl = moondream.vl(endpoint=fake.base_url, api_key=fake.api_key)
    await asyncio.to_thread(lambda: drain(getattr(vl, stream_call)(*args[stream_call], stream=True)))
    reference = contract(fake.requests[-1])
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        stream = getattr(md, f"stream_{stream_call}")(*args[stream_call])
        async for _ in stream:
            pass
    mine = contract(fake.requests[-1])
    mine.pop("user_agent"), reference.pop("user_agent")
    assert mine == reference
    assert fake.requests[-1].json["stream"] is True  # type: ignore[index]
