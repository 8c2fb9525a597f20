"""MoondreamBatchUDF called in this process (as a Ray actor calls it, on the test's own event
loop), its options, and the core's pacer seam. No cluster is needed here: tests/ray/test_job.py
runs the same class on one.

Ground truth: the scenes' shapes (labels, pixel boxes, areas), the requests the emulator
recorded, and the key's bytes (never in a pickle, a repr or a row).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray.cloudpickle
from aiohttp import web

from moondream_tools import BackendConfig, ConfigurationError
from moondream_tools._transport import Limiter, Pacer
from moondream_tools.ray import MoondreamBatchUDF, RayPacer
from moondream_tools.testing import FakeMoondream, Scene, Shape

from .ray_support import KEY, KEY_ENV

pytestmark = pytest.mark.ray

SCENES = [Scene.random(seed, width=640, height=480, count=4) for seed in (1, 2, 3)]
ONE_RED = Scene(640, 480, [Shape("circle", "red", (300, 200), 120), Shape("square", "blue", (520, 380), 70)])


def skill_requests(fake: FakeMoondream, skill: str) -> list[Any]:
    return [r for r in fake.requests if r.path == f"/v1/{skill}"]


def make_udf(fake: FakeMoondream, skill: str = "index", **options: Any) -> MoondreamBatchUDF:
    return MoondreamBatchUDF(skill, base_url=fake.base_url, api_key_env=KEY_ENV, **options)  # type: ignore[arg-type]


async def call(udf: MoondreamBatchUDF, batch: Any) -> list[dict[str, Any]]:
    table = await udf(batch)
    assert isinstance(table, pa.Table) and table.schema.field("error").type == pa.string()
    return table.to_pylist()


@pytest.fixture
async def udfs() -> AsyncIterator[list[MoondreamBatchUDF]]:
    """UDFs made by a test: their backends are closed after it."""
    made: list[MoondreamBatchUDF] = []
    yield made
    for udf in made:
        await udf.aclose()


@pytest.fixture
async def image_server(tmp_path: Path) -> AsyncIterator[str]:
    """tmp_path over http on loopback (for the url column)."""
    app = web.Application()
    app.router.add_static("/", tmp_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def write(tmp_path: Path, scenes: list[Scene]) -> list[Path]:
    paths = []
    for i, scene in enumerate(scenes):
        path = tmp_path / f"scene{i}.jpg"
        path.write_bytes(scene.encode("JPEG", 92))
        paths.append(path)
    return paths


def close_to(got: list[float], want: tuple[int, ...] | list[float], tol: float) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= tol for a, b in zip(got, want))


# ---------------------------------------------------------------------------
# every skill, against the scenes' truth
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["numpy", "pandas", "pyarrow"])
async def test_detect_rows_match_the_scenes_in_every_batch_format(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF], fmt: str
) -> None:
    paths = write(tmp_path, SCENES)
    columns = {"bytes": [p.read_bytes() for p in paths], "path": [str(p) for p in paths]}
    batch: Any = {k: np.array(v, dtype=object) for k, v in columns.items()}
    if fmt == "pandas":
        batch = pd.DataFrame(columns)
    elif fmt == "pyarrow":
        batch = pa.table(columns)
    udfs.append(udf := make_udf(fake, "detect", object="circle"))
    rows = await call(udf, batch)
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # one row per input, in order
    assert "bytes" not in rows[0]
    for row, scene in zip(rows, SCENES):
        truth = sorted(t.bbox_px for t in scene.matching("circle"))
        assert row["error"] is None and row["count"] == len(truth) and (row["width"], row["height"]) == (640, 480)
        for px, norm, want in zip(sorted(row["boxes_px"]), sorted(row["boxes"]), truth):
            assert close_to(px, want, 2)
            assert close_to([norm[0] * 640, norm[1] * 480, norm[2] * 640, norm[3] * 480], want, 2)
    assert len(skill_requests(fake, "detect")) == len(SCENES)


async def test_each_skill_gives_its_fields(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF], image_server: str
) -> None:
    paths = write(tmp_path, [ONE_RED, *SCENES])
    by_path = {"path": np.array([str(p) for p in paths], dtype=object)}
    by_url = {"url": np.array([f"{image_server}/{p.name}" for p in paths], dtype=object)}

    udfs.append(udf := make_udf(fake, "caption", caption_length="long"))
    for row, scene in zip(await call(udf, by_url), [ONE_RED, *SCENES]):
        assert row["error"] is None and list(row) == ["url", "image_id", "width", "height", "caption", "error"]
        assert all(t.label in row["caption"] for t in scene.truth()), row["caption"]
    assert {r.json["length"] for r in skill_requests(fake, "caption")} == {"long"}

    udfs.append(udf := make_udf(fake, "query", question="How many shapes?"))
    for row, scene in zip(await call(udf, by_path), [ONE_RED, *SCENES]):
        assert row["answer"] == str(len(scene.truth()))

    for skill in ("point", "count"):
        udfs.append(udf := make_udf(fake, skill, object="circle"))
        for row, scene in zip(await call(udf, by_path), [ONE_RED, *SCENES]):
            truth = scene.matching("circle")
            assert row["count"] == len(truth) and len(row["points_px"]) == len(truth)
            for (x, y), (nx, ny) in zip(row["points_px"], row["points"]):  # each point on one of them
                assert any(t.bbox_px[0] <= x <= t.bbox_px[2] and t.bbox_px[1] <= y <= t.bbox_px[3] for t in truth)
                assert abs(nx * 640 - x) <= 1 and abs(ny * 480 - y) <= 1

    udfs.append(udf := make_udf(fake, "segment", object="red circle"))
    (row,) = await call(udf, {"path": np.array([str(paths[0])], dtype=object)})
    (truth,) = ONE_RED.matching("red circle")
    assert row["found"] is True and row["error"] is None and row["svg_path"].startswith("M")
    assert close_to(row["bbox_px"], truth.bbox_px, 2)
    assert abs(row["area_px"] - truth.area_px) <= 0.03 * truth.area_px


async def test_a_failing_row_never_fails_its_batch(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF], delays: list[float]
) -> None:
    good = write(tmp_path, SCENES[:2])
    (tmp_path / "folder").mkdir()
    rows_in = [
        (good[0].read_bytes(), str(good[0]), None),  # readable, but the server refuses it (HTTP 400)
        (b"\xff\xd8 not a jpeg", "broken.jpg", None),  # read, not an image
        (None, str(tmp_path / "missing.jpg"), None),  # no such file
        (None, str(tmp_path / "folder"), None),  # a directory: one row is one image
        (None, None, None),  # nothing at all
        (None, None, "ftp://example.com/a.jpg"),  # not http(s)
        (None, None, "http://127.0.0.1:9/a.jpg"),  # nobody listens
        (None, str(good[1]), None),  # read from its path; two 503s, retried, then answered
        (good[0].read_bytes(), "again.jpg", None),  # fine
    ]
    batch = {name: np.array([r[i] for r in rows_in], dtype=object) for i, name in enumerate(("bytes", "path", "url"))}
    # One row at a time, so the faults meet the rows in order: the requests are rows 0, 7, 8.
    udfs.append(udf := make_udf(fake, "detect", object="circle", max_concurrency=1))
    fake.fail_next(1, status=400, route="/v1/detect")  # row 0: refused, not retried
    fake.fail_next(2, status=503, route="/v1/detect")  # row 7: retried twice, then answered
    rows = await call(udf, batch)
    assert len(rows) == len(rows_in)
    assert [r["path"] for r in rows] == [r[1] for r in rows_in] and [r["url"] for r in rows] == [r[2] for r in rows_in]
    errors = [r["error"] for r in rows]
    assert errors[0] is not None and "HTTP 400" in errors[0] and rows[0]["count"] is None  # its own row only
    assert "not an image" in errors[1] and rows[1]["image_id"] is not None
    assert "missing.jpg" in errors[2]
    assert errors[3].endswith("is a directory, not an image")
    assert errors[4] == "the row has no bytes, path or url"
    assert "not an http(s) URL" in errors[5]
    assert errors[6] is not None and "127.0.0.1:9" in errors[6]
    assert errors[7] is None and rows[7]["count"] == SCENES[1].count("circle")
    assert errors[8] is None and rows[8]["count"] == SCENES[0].count("circle")
    # Only the readable images were sent (row 7 three times: two 503s retried, then answered).
    assert len(skill_requests(fake, "detect")) == 3 + 1 + 1 and len(delays) == 2


async def test_a_hanging_request_is_its_rows_timeout_not_the_batchs(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF]
) -> None:
    paths = write(tmp_path, SCENES)
    udfs.append(udf := make_udf(fake, "caption", timeout=0.5, max_retries=0, max_concurrency=1))
    fake.hang_next(1, seconds=30, route="/v1/caption")
    started = time.monotonic()
    rows = await call(udf, {"path": np.array([str(p) for p in paths], dtype=object)})
    assert time.monotonic() - started < 5
    assert "timed out" in rows[0]["error"] or "no answer" in rows[0]["error"]
    assert [r["error"] for r in rows[1:]] == [None, None] and all(r["caption"] for r in rows[1:])


async def test_a_bug_on_one_image_leaves_the_rest_of_the_batch_indexed(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moondream_tools.indexing import ImageIndexer

    paths = write(tmp_path, SCENES)
    real = ImageIndexer._read

    async def read(self: ImageIndexer, source: Any, state: Any) -> bytes:
        if source == str(paths[1]):
            raise RuntimeError("boom")  # not an ImageError: a bug, which ends the indexer's stream
        return await real(self, source, state)

    monkeypatch.setattr(ImageIndexer, "_read", read)
    udfs.append(udf := make_udf(fake, "index", detect=["circle"], max_concurrency=1))
    rows = await call(udf, {"path": np.array([str(p) for p in paths], dtype=object)})
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rows[1]["error"] == "image: unexpected RuntimeError: boom"
    for i in (0, 2):
        assert rows[i]["error"] is None and rows[i]["count_circle"] == SCENES[i].count("circle")


async def test_index_rows_are_the_loaders_metadata(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF]
) -> None:
    from moondream_tools import AsyncMoondream
    from moondream_tools.indexing import ImageIndexer

    paths = write(tmp_path, SCENES)
    options: dict[str, Any] = dict(questions=["How many shapes?"], ocr=True, detect=["circle", "red square"])
    udfs.append(udf := make_udf(fake, "index", **options))
    rows = await call(udf, {"path": np.array([str(p) for p in paths], dtype=object)})
    async with AsyncMoondream(api_key=KEY, base_url=fake.base_url) as md:
        records = await ImageIndexer(md, **options).index([str(p) for p in paths])
    for row, record, scene in zip(rows, records, SCENES):
        meta = record.metadata()
        assert row == {"path": meta.pop("source"), **meta, "text": record.text(), "error": None}
        assert row["count_circle"] == scene.count("circle") and row["count_red_square"] == scene.count("red square")


# ---------------------------------------------------------------------------
# options and keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("skill", "options", "error", "match"),
    [
        ("detect", {"objekt": "car"}, TypeError, "objekt"),
        ("detect", {}, ValueError, "needs object="),
        ("query", {}, ValueError, "needs question="),
        ("describe", {}, ValueError, "skill must be one of"),
        ("caption", {"object": "car"}, ValueError, "object not for skill='caption'"),
        ("detect", {"object": "car", "questions": ["Why?"]}, ValueError, "questions not for skill='detect'"),
        ("segment", {"object": "car", "max_tiles": 4}, ValueError, "max_tiles not for skill='segment'"),
        ("index", {"detect": "car"}, TypeError, "lists of strings"),
        ("index", {"detect": ["red circle", "Red-Circle"]}, ValueError, "column names"),
        ("index", {"tiling": "sometimes"}, ValueError, "tiling"),
        ("index", {"max_concurrency": 0}, ValueError, "max_concurrency"),
        ("index", {"requests_per_second": 0}, ValueError, "requests_per_second"),
        ("index", {"backend": "openai"}, ValueError, "backend"),
        ("detect", {"object": "car", "batch_api": True}, ValueError, "batch_api=True indexes"),
        ("index", {"batch_api": True, "backend": "fal"}, ValueError, "backend must be 'moondream'"),
        ("index", {"batch_api": True, "max_objects": 5}, ValueError, "max_objects"),
        ("index", {"job_dir": "jobs"}, ValueError, "job_dir and poll_interval are for batch_api=True"),
        ("index", {"backend": "fal", "model": "moondream3-ft"}, ValueError, "model= is for Moondream servers"),
        ("index", {"base_url": "localhost:2020"}, ValueError, "base_url must be an http"),
        ("index", {"api_key_env": "not a name"}, ValueError, "api_key_env"),
    ],
)
def test_bad_options_fail_on_the_driver(skill: str, options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MoondreamBatchUDF.constructor_kwargs(skill, **options)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        MoondreamBatchUDF(skill, **options)  # type: ignore[arg-type]


def test_constructor_kwargs_are_the_options_as_given() -> None:
    kwargs = MoondreamBatchUDF.constructor_kwargs("index", detect=["car"], requests_per_second=4, batch_api=True)
    assert kwargs == {"skill": "index", "detect": ["car"], "requests_per_second": 4, "batch_api": True}
    udf = MoondreamBatchUDF(**kwargs)
    assert udf.requests_per_second == 4.0 and udf.config.requests_per_second is None  # the job's, not the actor's
    assert udf.schema.names == ["image_id", "width", "height", "backend", "model", "caption", "ocr", "answers",
                                "count_car", "boxes_car", "text", "errors", "error"]


async def test_the_key_never_travels(
    fake: FakeMoondream, key_env: str, tmp_path: Path, udfs: list[MoondreamBatchUDF]
) -> None:
    (path,) = write(tmp_path, SCENES[:1])
    udfs.append(udf := make_udf(fake, "caption", requests_per_second=None))
    rows = await call(udf, {"path": np.array([str(path)], dtype=object)})
    assert rows[0]["error"] is None
    assert skill_requests(fake, "caption")[0].headers["X-Moondream-Auth"] == KEY  # read from this environment
    assert udf._backend is not None  # built: it holds the key now
    secret = KEY.encode()
    for blob in (pickle.dumps(udf), ray.cloudpickle.dumps(udf), pickle.dumps(udf.config), repr(udf).encode(),
                 repr(rows).encode(), ray.cloudpickle.dumps(MoondreamBatchUDF.constructor_kwargs("caption"))):
        assert secret not in blob
    copy = pickle.loads(pickle.dumps(udf))
    assert copy._backend is None and copy.config == udf.config  # options only; built again where it runs


async def test_a_worker_without_the_key_fails_loudly_without_showing_it(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    udf = make_udf(fake, "caption")
    with pytest.raises(ConfigurationError, match=f"{KEY_ENV} \\(api_key_env\\) is not set"):
        await udf({"path": np.array(["a.jpg"], dtype=object)})
    assert fake.requests == []


# ---------------------------------------------------------------------------
# the core's seam: a pacer every request waits for
# ---------------------------------------------------------------------------


class RecordingPacer:
    def __init__(self, fake: FakeMoondream) -> None:
        self.fake = fake
        self.turns: list[int] = []  # requests the server had seen at each turn
        self.pauses: list[float] = []

    async def wait_turn(self) -> None:
        self.turns.append(len(self.fake.requests))

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


async def test_every_request_waits_for_the_pacer_and_a_429_pauses_it(
    fake: FakeMoondream, key_env: str, delays: list[float]
) -> None:
    pacer = RecordingPacer(fake)
    assert isinstance(pacer, Pacer) and isinstance(RayPacer("x", 1.0), Pacer)
    md = BackendConfig(base_url=fake.base_url, api_key_env=KEY_ENV, max_concurrency=1).build(pacer=pacer)
    try:
        fake.fail_next(1, status=429, retry_after="0.25", route="/v1/caption")
        for scene in SCENES:
            await md.caption(scene.encode())
    finally:
        await md.aclose()
    assert pacer.turns == [0, 1, 2, 3]  # each turn before its request (the 429 one retried)
    assert pacer.pauses == [0.25] and delays == [0.25]


def test_a_limiter_without_a_pacer_is_unchanged() -> None:
    limiter = Limiter(2, None)
    assert limiter.pacer is None
    limiter.pause(0.0)  # nothing to pass on
