"""The MCP server (moondream_tools.mcp_server) with the official MCP SDK's own clients:
in memory, over stdio against a subprocess, and over streamable HTTP on loopback, all on
the offline emulator."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("mcp", reason="the MCP server needs the optional extra 'mcp'")

from mcp import Client, StdioServerParameters, stdio_client  # noqa: E402

from moondream_tools import (  # noqa: E402
    TOOL_SPECS,
    AsyncMoondream,
    ImagePolicy,
    MoondreamError,
    VisionTools,
    tool_error_text,
)
from moondream_tools.mcp_server import OUTPUT_MODELS, create_server, run_server  # noqa: E402
from moondream_tools.testing import FakeMoondream, Scene, Shape  # noqa: E402

SCENE = Scene(
    640,
    480,
    [
        Shape("circle", "red", (200, 200), 90),
        Shape("circle", "red", (450, 300), 60),
        Shape("square", "blue", (500, 100), 80),
    ],
)
TOLERANCE_PX = 2

#: The server a client starts: tools from the environment (MOONDREAM_API_KEY and
#: MOONDREAM_BASE_URL, images under MCP_TEST_IMAGES), run_server(transport, port), and a
#: line on stderr once the tools are closed.
SERVER_CODE = """
import os, sys
from moondream_tools import ImagePolicy, VisionTools
from moondream_tools.mcp_server import run_server

vision = VisionTools(image_policy=ImagePolicy(allowed_dirs=[os.environ["MCP_TEST_IMAGES"]]))
close = vision.aclose

async def aclose():
    print("closing", file=sys.stderr, flush=True)
    try:
        await close()
    except BaseException as exc:
        print("close raised", repr(exc), file=sys.stderr, flush=True)
        raise
    print("vision closed", file=sys.stderr, flush=True)

vision.aclose = aclose
print("starting", file=sys.stderr, flush=True)
run_server(vision, transport=sys.argv[1], port=int(sys.argv[2]))
print("run_server returned", file=sys.stderr, flush=True)
"""


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.jpg"
    SCENE.render().save(path, quality=95)
    return path


@pytest.fixture
async def vision(fake: FakeMoondream, tmp_path: Path) -> AsyncIterator[VisionTools]:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        yield VisionTools(md, image_policy=ImagePolicy(allowed_dirs=[tmp_path]))


@asynccontextmanager
async def connected(vision: VisionTools, **options: Any) -> AsyncIterator[Client]:
    """The SDK's in-memory client on a server for ``vision`` (``mode`` goes to the client)."""
    mode = options.pop("mode", "auto")
    async with Client(create_server(vision, **options), mode=mode) as client:
        yield client


def text_of(result: Any) -> str:
    texts = [c.text for c in result.content if c.type == "text"]
    assert len(texts) == 1, result.content
    return texts[0]


def near(got: float, want: float) -> bool:
    return abs(got - want) <= TOLERANCE_PX


# ------------------------------------------------------------------ in memory


@pytest.mark.parametrize("mode", ["auto", "legacy"])  # direct dispatch, and JSON-RPC over streams
async def test_lists_exactly_the_tool_specs(vision: VisionTools, mode: str) -> None:
    async with connected(vision, mode=mode) as client:
        listed = (await client.list_tools()).tools
    assert [t.name for t in listed] == list(TOOL_SPECS) == [
        "describe_image", "count_objects", "locate_objects", "segment_object"
    ]
    for tool in listed:
        spec = TOOL_SPECS[tool.name]
        assert tool.description is not None and tool.description.startswith(spec.description)
        assert "base64" in tool.description.lower(), "steers models away from inline image data"
        assert len(tool.description) < 1024
        assert tool.input_schema == spec.args_schema.model_json_schema()
        assert tool.output_schema == _without_refs(tool.output_schema)
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        assert set(tool.output_schema["properties"]) == set(OUTPUT_MODELS[tool.name].model_fields)
        assert tool.annotations is not None and tool.annotations.read_only_hint


def _without_refs(schema: Any) -> Any:
    text = repr(schema)
    assert "$ref" not in text and "$defs" not in text
    return schema


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_count_objects_matches_the_scene(vision: VisionTools, photo: Path, mode: str) -> None:
    arguments = {"image": str(photo), "object": "red circle", "more_objects": ["blue square"]}
    async with connected(vision, mode=mode) as client:
        result = await client.call_tool("count_objects", arguments)
    assert not result.is_error
    assert text_of(result) == (await vision.run("count_objects", arguments)).text
    out = result.structured_content
    OUTPUT_MODELS["count_objects"].model_validate(out)
    assert out["image"] == str(photo) and out["image_size"] == {"width": 640, "height": 480}
    assert out["object"] == "red circle" and out["count"] == SCENE.count("red circle") == 2
    assert out["at_least"] is False
    # Reading order, as numbered in the text: the upper-left circle first.
    truths = sorted(SCENE.matching("red circle"), key=lambda t: t.center[1])
    for point, truth in zip(out["points"], truths, strict=True):
        assert near(point["x_px"], truth.center[0] * 640) and near(point["y_px"], truth.center[1] * 480)
        assert point["x"] == pytest.approx(point["x_px"] / 640, abs=1e-4)
        assert point["y"] == pytest.approx(point["y_px"] / 480, abs=1e-4)
    assert [p["position"] for p in out["points"]] == ["left", "right"]
    [square] = out["more"]
    assert square["object"] == "blue square" and square["count"] == 1
    truth = SCENE.matching("blue square")[0]
    assert near(square["points"][0]["x_px"], truth.center[0] * 640)
    assert near(square["points"][0]["y_px"], truth.center[1] * 480)


async def test_locate_objects_boxes_match_the_scene(vision: VisionTools, photo: Path) -> None:
    async with connected(vision) as client:
        result = await client.call_tool("locate_objects", {"image": "shapes.jpg", "object": "shape"})
    assert not result.is_error
    assert text_of(result) == (await vision.locate("shapes.jpg", "shape")).text
    out = result.structured_content
    OUTPUT_MODELS["locate_objects"].model_validate(out)
    assert out["count"] == len(SCENE.truth()) == 3 and not out["at_least"]
    # Reading order: the blue square (top row) first, then the circles left to right.
    expected = [SCENE.matching("blue square")[0], *sorted(SCENE.matching("red circle"), key=lambda t: t.center[0])]
    for box, truth in zip(out["boxes"], expected, strict=True):
        got = (box["x_min_px"], box["y_min_px"], box["x_max_px"], box["y_max_px"])
        assert all(near(g, w) for g, w in zip(got, truth.bbox_px, strict=True)), (got, truth)
        normalized = (box["x_min"], box["y_min"], box["x_max"], box["y_max"])
        assert normalized == pytest.approx([got[0] / 640, got[1] / 480, got[2] / 640, got[3] / 480], abs=1e-5)


# pycocotools' decode trips numpy 2's __array__(copy=...) DeprecationWarning (its problem, not ours)
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
async def test_segment_object_bbox_area_and_mask(vision: VisionTools, photo: Path) -> None:
    from pycocotools import mask as coco_mask

    async with connected(vision) as client:
        result = await client.call_tool("segment_object", {"image": f"file://{photo}", "object": "blue square"})
    assert not result.is_error
    assert text_of(result) == (await vision.segment(f"file://{photo}", "blue square")).text
    out = result.structured_content
    OUTPUT_MODELS["segment_object"].model_validate(out)
    truth = SCENE.matching("blue square")[0]
    assert out["found"] and out["regions"] == 1 and out["holes"] == 0 and out["instances"] == []
    bbox = out["bbox"]
    got = (bbox["x_min_px"], bbox["y_min_px"], bbox["x_max_px"], bbox["y_max_px"])
    assert all(near(g, w) for g, w in zip(got, truth.bbox_px, strict=True)), (got, truth.bbox_px)
    assert abs(out["area_px"] - truth.area_px) <= 0.02 * truth.area_px
    assert out["area_fraction"] == pytest.approx(out["area_px"] / (640 * 480), abs=1e-6)
    rle = out["mask_rle"]
    assert rle["size"] == [480, 640]
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.shape == (480, 640) and int(decoded.sum()) == out["area_px"]


async def test_results_at_the_object_limit_say_at_least(fake: FakeMoondream, photo: Path) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        vision = VisionTools(md, image_policy=ImagePolicy(allowed_dirs=[photo.parent]), max_objects=2)
        async with connected(vision) as client:
            counted = await client.call_tool("count_objects", {"image": str(photo), "object": "shape"})
            located = await client.call_tool("locate_objects", {"image": str(photo), "object": "shape"})
            under = await client.call_tool("locate_objects", {"image": str(photo), "object": "blue square"})
    assert counted.structured_content["at_least"] and counted.structured_content["count"] == 2
    assert text_of(counted).startswith('Counted at least 2 "shape"')
    assert located.structured_content["at_least"] and located.structured_content["count"] == 2
    assert not under.structured_content["at_least"]


async def test_segment_object_found_nothing(vision: VisionTools, photo: Path) -> None:
    async with connected(vision) as client:
        result = await client.call_tool("segment_object", {"image": str(photo), "object": "green triangle"})
    assert not result.is_error and text_of(result).startswith('No "green triangle" found')
    out = result.structured_content
    assert (out["found"], out["bbox"], out["mask_rle"], out["area_px"], out["regions"]) == (False, None, None, 0, 0)


async def test_describe_image_caption_and_answer(vision: VisionTools, photo: Path) -> None:
    async with connected(vision) as client:
        caption = await client.call_tool("describe_image", {"image": str(photo), "length": "short"})
        answer = await client.call_tool(
            "describe_image", {"image": str(photo), "question": "How many red circles are there?", "reasoning": True}
        )
    assert not caption.is_error and not answer.is_error
    out = caption.structured_content
    OUTPUT_MODELS["describe_image"].model_validate(out)
    assert out["answer"] is None and out["caption"] and text_of(caption).endswith(out["caption"])
    assert text_of(caption) == f"{photo} (640x480 px): {out['caption']}"
    out = answer.structured_content
    OUTPUT_MODELS["describe_image"].model_validate(out)
    assert out["caption"] is None and "2" in out["answer"] and out["reasoning"]
    assert text_of(answer).startswith(f"{photo} (640x480 px): {out['answer']}")
    grounded = [p for span in out["grounding"] for p in span["points"]]
    assert grounded, "reasoning points into the image"
    centers = [(t.center[0] * 640, t.center[1] * 480) for t in SCENE.matching("red circle")]
    for point in grounded:
        assert any(near(point["x_px"], x) and near(point["y_px"], y) for x, y in centers), point


async def test_refusals_are_tool_errors_and_the_server_keeps_working(
    vision: VisionTools, photo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.jpg"
    SCENE.render().save(outside)
    (photo.parent / "notes.jpg").write_text("not an image at all")
    refused = {
        "outside the allowed directories": str(outside),
        "a URL under the default policy": "https://example.com/cat.jpg",
        "a missing file": str(photo.parent / "missing.jpg"),
        "a file that is no image": str(photo.parent / "notes.jpg"),
        "an unregistered handle": "img_7",
    }
    async with connected(vision) as client:
        for why, image in refused.items():
            arguments = {"image": image, "object": "red circle"}
            result = await client.call_tool("count_objects", arguments)
            with pytest.raises(MoondreamError) as raised:
                await vision.run("count_objects", arguments)
            assert result.is_error, why
            assert text_of(result) == tool_error_text(raised.value), why
            assert result.structured_content is None
            after = await client.call_tool("count_objects", {"image": str(photo), "object": "red circle"})
            assert not after.is_error and after.structured_content["count"] == 2, why
    assert "is not allowed: images must be under" in tool_error_text(_error_of(vision, str(outside)))


def _error_of(vision: VisionTools, image: str) -> MoondreamError:
    try:
        vision.run_sync("count_objects", {"image": image, "object": "x"})
    except MoondreamError as exc:
        return exc
    raise AssertionError("no error")


async def test_bad_arguments_and_unknown_tools_are_tool_errors(vision: VisionTools, photo: Path) -> None:
    async with connected(vision) as client:
        extra = await client.call_tool("count_objects", {"image": str(photo), "object": "cat", "color": "red"})
        missing = await client.call_tool("locate_objects", {"image": str(photo)})
        unknown = await client.call_tool("draw_image", {"image": str(photo)})
        ok = await client.call_tool("count_objects", {"image": str(photo), "object": "blue square"})
    assert extra.is_error and "Fix the arguments" in text_of(extra) and "color" in text_of(extra)
    assert missing.is_error and "object" in text_of(missing)
    assert unknown.is_error and "unknown tool 'draw_image'" in text_of(unknown)
    assert not ok.is_error and ok.structured_content["count"] == 1


async def test_unexpected_exceptions_are_short_tool_errors(
    vision: VisionTools, photo: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("internal detail /srv/secret")

    monkeypatch.setattr(vision, "locate", broken)
    async with connected(vision) as client:
        with caplog.at_level(logging.ERROR, logger="moondream_tools.mcp_server"):
            result = await client.call_tool("locate_objects", {"image": str(photo), "object": "cat"})
        after = await client.call_tool("count_objects", {"image": str(photo), "object": "red circle"})
    assert result.is_error
    assert text_of(result) == (
        "Error: locate_objects failed unexpectedly (KeyError); the server logged the details."
        " Try again or go on without it."
    )
    assert any(r.exc_info and "internal detail" in str(r.exc_info[1]) for r in caplog.records)
    assert not after.is_error


async def test_registered_handles_and_data_uris(vision: VisionTools) -> None:
    vision.add_image(SCENE.encode(), name="photo")
    small = Scene(160, 120, [Shape("circle", "red", (40, 60), 30), Shape("circle", "red", (120, 60), 30)])
    async with connected(vision) as client:
        by_handle = await client.call_tool("count_objects", {"image": "photo", "object": "red circle"})
        by_data_uri = await client.call_tool("count_objects", {"image": small.data_url(), "object": "red circle"})
    assert not by_handle.is_error and by_handle.structured_content["count"] == 2
    assert text_of(by_handle).startswith('Counted 2 "red circle" in photo (640x480 px)')
    assert not by_data_uri.is_error and by_data_uri.structured_content["count"] == 2
    assert by_data_uri.structured_content["image_size"] == {"width": 160, "height": 120}


async def test_return_images_adds_the_annotated_png(vision: VisionTools, photo: Path) -> None:
    async with connected(vision) as client:
        plain = await client.call_tool("locate_objects", {"image": str(photo), "object": "red circle"})
    assert [c.type for c in plain.content] == ["text"]
    async with connected(vision, return_images=True) as client:
        results = [
            await client.call_tool(tool, {"image": str(photo), "object": "red circle"})
            for tool in ("count_objects", "locate_objects", "segment_object")
        ]
    for result in results:
        assert not result.is_error and [c.type for c in result.content] == ["text", "image"]
        image = result.content[1]
        assert image.mime_type == "image/png"
        png = Image.open(io.BytesIO(base64.b64decode(image.data)))
        assert png.format == "PNG"
        size = result.structured_content["image_size"]
        assert png.size == (size["width"], size["height"])


def test_importing_the_package_does_not_import_mcp() -> None:
    code = (
        "import sys, moondream_tools\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types') or m.endswith('mcp_server'))\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_server_refuses_an_unknown_transport(tmp_path: Path) -> None:
    vision = VisionTools(AsyncMoondream(api_key="k", base_url="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="transport must be 'stdio' or 'http'"):
        run_server(vision, transport="sse")  # type: ignore[arg-type]


def test_run_server_says_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", "key")
    monkeypatch.setenv("MOONDREAM_BASE_URL", "http://127.0.0.1:9/v1")
    vision = VisionTools()  # owns its backend: run_server closes it
    closed: list[bool] = []
    close = vision.aclose

    async def aclose() -> None:
        await close()
        closed.append(True)

    monkeypatch.setattr(vision, "aclose", aclose)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"could not start on http://127.0.0.1:{port}/mcp"):
            run_server(vision, transport="http", port=port)
    assert closed == [True]


# ------------------------------------------------------------------ subprocesses


def _env(fake: FakeMoondream, images: Path) -> dict[str, str]:
    return {
        "MOONDREAM_API_KEY": fake.api_key,
        "MOONDREAM_BASE_URL": fake.base_url,
        "MCP_TEST_IMAGES": str(images),
        "PYTHONUNBUFFERED": "1",
    }


async def _list_and_count(client: Client, image: str) -> None:
    listed = (await client.list_tools()).tools
    assert [t.name for t in listed] == list(TOOL_SPECS)
    assert listed[1].input_schema == TOOL_SPECS["count_objects"].args_schema.model_json_schema()
    result = await client.call_tool("count_objects", {"image": image, "object": "red circle"})
    assert not result.is_error, text_of(result)
    assert result.structured_content["count"] == 2
    assert text_of(result).startswith('Counted 2 "red circle"')


async def test_stdio_subprocess(threaded_fake: FakeMoondream, photo: Path, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-c", SERVER_CODE, "stdio", "0"], env=_env(threaded_fake, photo.parent)
    )
    log = tmp_path / "server.log"
    with log.open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            await _list_and_count(client, str(photo))
            refused = await client.call_tool("count_objects", {"image": "/etc/hostname", "object": "x"})
            assert refused.is_error and "is not allowed" in text_of(refused)
    stderr = log.read_text()
    assert "vision closed" in stderr and "run_server returned" in stderr, stderr
    assert "Traceback" not in stderr and "Unclosed" not in stderr, stderr


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_stdio_server_ends_on_ctrl_c_at_a_terminal(threaded_fake: FakeMoondream, tmp_path: Path) -> None:
    import pty

    controller, terminal = pty.openpty()
    log = tmp_path / "server.log"
    try:
        with log.open("w") as errlog:
            process = subprocess.Popen(
                [sys.executable, "-c", SERVER_CODE, "stdio", "0"],
                env={**os.environ, **_env(threaded_fake, tmp_path)},
                stdin=terminal,
                stdout=subprocess.DEVNULL,
                stderr=errlog,
            )
        try:
            deadline = time.monotonic() + 20
            while "starting" not in log.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            time.sleep(0.5)  # into run_server: reading the terminal
            assert process.poll() is None, log.read_text()
            process.send_signal(signal.SIGINT)  # one Ctrl-C
            assert process.wait(10) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)
    finally:
        os.close(controller)
        os.close(terminal)
    stderr = log.read_text()
    assert "vision closed" in stderr and "run_server returned" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def _console_command_skip_reason() -> str | None:
    command = shutil.which("moondream-tools", path=os.path.dirname(sys.executable))
    if command is None:
        return "no moondream-tools command in this environment"
    try:
        probe = subprocess.run([command, "mcp", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`moondream-tools mcp --help` did not run: {exc}"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`moondream-tools mcp --help` failed (exit {probe.returncode}: {last}); the command is not built yet"
    return None


async def test_stdio_console_command(threaded_fake: FakeMoondream, tmp_path: Path) -> None:
    reason = _console_command_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    command = shutil.which("moondream-tools", path=os.path.dirname(sys.executable))
    assert command is not None
    params = StdioServerParameters(command=command, args=["mcp"], env=_env(threaded_fake, tmp_path))
    with (tmp_path / "server.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            # A data URI: allowed under every policy, whatever options the command has.
            small = Scene(160, 120, [Shape("circle", "red", (40, 60), 30), Shape("circle", "red", (120, 60), 30)])
            await _list_and_count(client, small.data_url())
    stderr = (tmp_path / "server.log").read_text()
    assert "Traceback" not in stderr and "Unclosed" not in stderr, stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def http_server(threaded_fake: FakeMoondream, photo: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    port = _free_port()
    log = tmp_path / "http-server.log"
    with log.open("w") as errlog:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE, "http", str(port)],
            env={**os.environ, **_env(threaded_fake, photo.parent)},
            stdin=subprocess.DEVNULL,
            stdout=errlog,
            stderr=errlog,
            text=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not listen on port {port}:\n{log.read_text()}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp", process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def test_streamable_http_subprocess(http_server: tuple[str, subprocess.Popen[str], Path], photo: Path) -> None:
    url, process, log = http_server
    async with Client(url) as client:
        await _list_and_count(client, str(photo))
        located = await client.call_tool("locate_objects", {"image": photo.name, "object": "blue square"})
        assert not located.is_error and located.structured_content["count"] == 1
    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(15) == 0, log.read_text()
    stderr = log.read_text()
    assert "vision closed" in stderr and "run_server returned" in stderr, stderr
    assert "Traceback" not in stderr and "Unclosed" not in stderr, stderr
