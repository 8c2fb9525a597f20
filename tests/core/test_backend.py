"""The VisionBackend seam: the protocol, skills a backend lacks, routing segmentation,
keyword-only arguments, image settings of model-named images, and package hygiene."""

from __future__ import annotations

import ast
import asyncio
import base64
import inspect
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import moondream_tools
from moondream_tools import (
    SKILLS,
    AsyncMoondream,
    ImageError,
    ImagePolicy,
    ImageSettings,
    PreparedImage,
    UnsupportedSkillError,
    VisionBackend,
    VisionTools,
    annotate,
    tool_error_text,
)
from moondream_tools.backend import require_skill
from moondream_tools.images import ImageCache, prepare_image, upload_sizes
from moondream_tools.testing import FakeMoondream, Scene, Shape

PACKAGE = Path(moondream_tools.__file__).parent
SCENE = Scene(
    900,
    600,
    [Shape("circle", "red", (200, 200), 120), Shape("square", "blue", (650, 380), 160)],
)


class CaptionOnly:
    """A backend with one skill, over a Moondream client: what a caption-only service looks like."""

    skills = frozenset({"caption"})

    def __init__(self, md: AsyncMoondream) -> None:
        self._md = md
        self.image_settings = md.image_settings

    async def prepare(self, image: Any, *, settings: ImageSettings | None = None) -> PreparedImage:
        return await self._md.prepare(image, settings=settings)

    async def caption(self, image: Any, length: Any = "normal", **options: Any) -> Any:
        return await self._md.caption(image, length, **options)

    async def query(self, image: Any, question: str, **options: Any) -> Any:
        require_skill(self, "query")

    async def detect(self, image: Any, object: str, **options: Any) -> Any:
        require_skill(self, "detect")

    async def point(self, image: Any, object: str, **options: Any) -> Any:
        require_skill(self, "point")

    async def segment(self, image: Any, object: str, **options: Any) -> Any:
        require_skill(self, "segment")

    async def aclose(self) -> None:
        await self._md.aclose()

    async def __aenter__(self) -> CaptionOnly:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------ the protocol


def test_async_moondream_is_a_vision_backend_with_every_skill() -> None:
    md = AsyncMoondream(base_url="http://localhost:2020/v1")
    assert isinstance(md, VisionBackend)
    assert md.skills == SKILLS == frozenset({"caption", "query", "detect", "point", "segment", "chat"})
    assert not isinstance(object(), VisionBackend)


async def test_a_skill_the_backend_lacks_is_a_typed_error_naming_skill_and_backend(
    fake: FakeMoondream, client: AsyncMoondream
) -> None:
    backend = CaptionOnly(client)
    assert isinstance(backend, VisionBackend)
    tools = VisionTools(backend)
    handle = tools.add_image(SCENE.render())
    with pytest.raises(UnsupportedSkillError) as info:
        await tools.count(handle, "circle")
    assert (info.value.skill, info.value.backend, info.value.supported) == ("point", "CaptionOnly", {"caption"})
    assert "CaptionOnly has no 'point' skill (it has: caption)" in str(info.value)
    with pytest.raises(UnsupportedSkillError, match="segment_backend=") as seg:
        await tools.segment(handle, "circle")
    assert seg.value.skill == "segment"
    assert fake.requests == [], "nothing was sent for a skill the backend lacks"
    assert "try another tool" in tool_error_text(info.value)
    assert (await tools.describe(handle)).caption is not None
    assert [r.path for r in fake.requests] == ["/v1/caption"]


async def test_segmentation_routes_to_the_segment_backend(fake: FakeMoondream, client: AsyncMoondream) -> None:
    async with FakeMoondream() as other, AsyncMoondream(api_key=other.api_key, base_url=other.base_url) as segmenter:
        tools = VisionTools(CaptionOnly(client), segment_backend=segmenter)
        handle = tools.add_image(SCENE.render())
        result = await tools.segment(handle, "red circle")
        truth = SCENE.matching("red circle")[0]
        assert abs(result.segmentation.area_px - truth.area_px) <= 0.02 * truth.area_px
        assert [r.path for r in other.requests] == ["/v1/segment"]
        assert fake.requests == [], "the primary backend did not segment"
        assert "segment_backend=AsyncMoondream" in repr(tools)
        await tools.aclose()
        assert not segmenter._transport.sessions.closed, "the tools never close a backend they were given"


def test_vision_tools_refuse_what_is_not_a_backend() -> None:
    with pytest.raises(TypeError, match="must be a VisionBackend"):
        VisionTools("http://localhost:2020/v1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="segment_backend must be a VisionBackend"):
        VisionTools(AsyncMoondream(base_url="http://localhost:2020/v1"), segment_backend=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'images'"):  # renamed image_policy=
        VisionTools(AsyncMoondream(base_url="http://localhost:2020/v1"), images=ImagePolicy())  # type: ignore[call-arg]


def test_from_options_is_the_one_vision_or_options_check() -> None:
    md = AsyncMoondream(base_url="http://localhost:2020/v1")
    shared = VisionTools.from_options(backend=md, max_objects=7, return_images=None)
    assert shared.backend is md and shared.max_objects == 7 and shared.return_images is False
    assert VisionTools.from_options(vision=shared) is shared
    with pytest.raises(ValueError, match="either vision= or backend=, max_objects=, not both"):
        VisionTools.from_options(vision=shared, backend=md, max_objects=3)
    with pytest.raises(TypeError, match=r"Spec got unknown argument\(s\) 'imagez'; accepted: vision, backend,"):
        VisionTools.from_options(owner="Spec", imagez=ImagePolicy())


# ------------------------------------------------------------------ keyword-only arguments

PRIMARY = {
    "caption": ("image", "length"),
    "stream_caption": ("image", "length"),
    "query": ("image", "question"),
    "stream_query": ("image", "question"),
    "detect": ("image", "object"),
    "point": ("image", "object"),
    "segment": ("image", "object"),
    "stream_segment": ("image", "object"),
    "chat": ("messages",),
    "stream_chat": ("messages",),
    "prepare": ("image",),
}


@pytest.mark.parametrize("owner", [AsyncMoondream, VisionBackend], ids=["AsyncMoondream", "VisionBackend"])
def test_arguments_after_the_primary_ones_are_keyword_only(owner: type) -> None:
    checked = 0
    for name, primary in PRIMARY.items():
        method = getattr(owner, name, None)
        if method is None:
            continue
        params = list(inspect.signature(method).parameters.values())[1:]
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert tuple(positional) == primary, f"{owner.__name__}.{name}: positional {positional}"
        checked += 1
    assert checked >= 6


async def test_a_positional_boolean_is_refused(client: AsyncMoondream) -> None:
    with pytest.raises(TypeError):
        await client.query(SCENE.render(), "What is this?", True)  # type: ignore[misc]


# ------------------------------------------------------------------ model-named images use the backend's settings


async def test_a_model_named_path_is_uploaded_like_the_registered_file_and_shares_its_cache_entry(
    fake: FakeMoondream, tmp_path: Path
) -> None:
    path = tmp_path / "scene.png"
    SCENE.render().save(path)
    settings = ImageSettings(jpeg_quality=35, skill_max_crops=2)
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url, image_settings=settings) as md:
        tools = VisionTools(md, image_policy=ImagePolicy(allowed_dirs=[tmp_path]))
        handle = tools.add_image(path)
        by_handle = await tools.count(handle, "circle")
        by_path = await tools.count("scene.png", "circle")
        assert len(md.image_cache) == 1, "one cache entry for the same file"
    first, second = (r.json["image_url"] for r in fake.requests)
    assert first == second, "the same upload either way"
    upload = Image.open(io.BytesIO(base64.b64decode(second.partition(",")[2])))
    skill_size, _ = upload_sizes(900, 600, settings)
    assert upload.size == skill_size != upload_sizes(900, 600, ImageSettings())[0], "the client's crops"
    assert by_handle.count == by_path.count == 1


async def test_the_policy_limits_still_hold_for_an_image_the_cache_already_has(
    fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path
) -> None:
    path = tmp_path / "scene.png"
    SCENE.render().save(path)
    tools = VisionTools(client, image_policy=ImagePolicy(allowed_dirs=[tmp_path], max_pixels=100_000))
    handle = tools.add_image(path)  # the application's own image: trusted, its limits
    assert (await tools.count(handle, "circle")).count == 1
    with pytest.raises(ImageError, match="over the limit of 100000"):
        await tools.count(str(path), "circle")  # named by the model: the policy's limits
    assert len(fake.requests) == 1


def test_policy_settings_layer_over_the_backend_settings() -> None:
    base = ImageSettings(jpeg_quality=50, skill_max_crops=3, segment_max_side=900, max_pixels=30_000_000)
    layered = ImagePolicy(max_pixels=50_000_000, max_bytes=1_000_000).image_settings(base)
    assert layered.encoding == base.encoding == (50, 3, 900, True)
    assert (layered.max_pixels, layered.max_bytes) == (30_000_000, 1_000_000), "the tighter of each limit"


# ------------------------------------------------------------------ one reader, one in-flight de-duplication


def test_annotate_refuses_an_oversized_file_before_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as fh:
        fh.truncate(ImageSettings().max_bytes + 1)  # sparse: no disk, no memory
    with pytest.raises(ImageError, match="over the limit"):
        annotate(huge)


async def test_image_cache_computes_once_for_concurrent_callers() -> None:
    cache = ImageCache()
    calls: list[int] = []
    gate = asyncio.Event()

    async def compute() -> PreparedImage:
        calls.append(1)
        await gate.wait()
        return PreparedImage(data_url="data:image/jpeg;base64,AA", width=2, height=1, upload_width=2, upload_height=1)

    waiters = [asyncio.create_task(cache.get_or_compute("k", compute)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiters)
    assert calls == [1] and all(r is results[0] for r in results) and cache.get("k") is results[0]

    async def broken() -> PreparedImage:
        await asyncio.sleep(0)
        raise ImageError("broken image")

    failing = [asyncio.create_task(cache.get_or_compute("bad", broken)) for _ in range(3)]
    outcomes = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(o, ImageError) for o in outcomes) and cache.get("bad") is None


# ------------------------------------------------------------------ package hygiene


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_nothing_inside_the_package_imports_the_package_init() -> None:
    offenders = []
    for path in _modules():
        depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for moondream_tools/x.py
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "moondream_tools" for a in node.names):
                offenders.append(f"{path.name}: import moondream_tools")
            if isinstance(node, ast.ImportFrom):
                absolute = node.level == 0 and node.module == "moondream_tools"
                relative_init = node.level == depth + 1 and node.module is None
                if absolute or relative_init:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_the_core_imports_no_framework() -> None:
    """Only the optional leaves inside the package import their extras: the MCP server its SDK,
    the command line its own libraries (and the MCP server, lazily); ``import moondream_tools``
    loads neither (tests/core/test_mcp_server.py checks it in a fresh interpreter)."""
    frameworks = (
        "langchain", "langchain_core", "llama_index", "mcp", "mcp_types", "ray", "typer", "click", "rich", "av",
        "trackers", "cv2",
    )
    allowed = {
        "mcp_server.py": {"mcp", "mcp_types"}, "cli": {"click", "rich", "mcp", "mcp_types"},
        # the optional extra `video` (PyAV, trackers, supervision), and the emulator's video writer
        "video": {"av", "trackers", "supervision", "cv2"}, "testing": {"av"},
        "ray.py": {"ray"},  # moondream_tools.ray: the Ray Data leaf (extra `ray`)
    }
    found = []
    for path in _modules():
        leaf = path.name if path.parent == PACKAGE else path.relative_to(PACKAGE).parts[0]
        extras = allowed.get(leaf, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names: Sequence[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in frameworks and n.split(".")[0] not in extras]
    assert found == []


def test_string_references_are_classified_in_one_place() -> None:
    # The emulator (testing/) is self-contained on purpose: it never imports the client's code.
    sniffers = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] != "testing"
        and ('("http://", "https://")' in path.read_text() or '[:8].lower()' in path.read_text())
    ]
    assert len(sniffers) == 1 and "images" in sniffers[0], sniffers


def test_no_type_ignore_attr_defined_on_errors() -> None:
    assert not [p for p in _modules() if "type: ignore[attr-defined]" in p.read_text()]


def test_public_surface() -> None:
    expected = {
        "__version__", "VisionBackend", "SKILLS", "CaptionLength", "SamplingSettings", "SpatialRef",
        "AsyncMoondream", "DEFAULT_BASE_URL", "Stream", "Timeout", "run_sync", "iterate_sync", "ResultCache", "CachedBackend", "ImageStore", "AttachedImage", "BackendConfig",
        "FalMoondream", "FalSam3", "AIGatewaySegmenter", "Usage", "InsufficientCreditsError",
        "ImageInput", "ImageSettings", "PreparedImage",
        "VisionTools", "ImagePolicy", "TOOL_SPECS", "DEFAULT_MAX_OBJECTS", "ToolSpec", "ToolResult",
        "DescribeResult", "CountResult", "LocateResult", "SegmentResult", "VideoTimeline", "TimeSpan", "tool_error_text",
        "annotate", "annotate_png",
        "Answer", "Box", "Caption", "ChatResult", "Detections", "GroundingSpan", "ImageSize", "ModelInfo",
        "PixelBox", "PixelPoint", "Point", "Points", "Reasoning", "SegmentBBoxEvent", "SegmentEvent",
        "SegmentFinalEvent", "Segmentation", "SegmentPathDeltaEvent",
        "MoondreamError", "ConfigurationError", "APIConnectionError", "APITimeoutError", "APIStatusError",
        "BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError", "RateLimitError",
        "InternalServerError", "ImageError", "ImageAccessError", "ResponseError", "UnsupportedSkillError",
        "ToolArgumentsError",
        "MoondreamBatch", "BatchResult", "BatchProgress", "BatchInfo",
        "BatchError", "BatchFailedError", "BatchExpiredError", "BatchItemError",
    }
    assert set(moondream_tools.__all__) == expected
    assert len(moondream_tools.__all__) == len(expected), "no name twice"
    assert all(hasattr(moondream_tools, name) for name in expected)
    assert not hasattr(moondream_tools, "Settings"), "renamed to SamplingSettings"


async def test_concurrent_callers_with_different_limits_each_get_their_own_answer(tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    SCENE.render().save(path)  # 900 x 600 = 540,000 px
    cache = ImageCache()
    strict, loose = ImageSettings(max_pixels=100_000), ImageSettings()
    outcomes = await asyncio.gather(
        prepare_image(path, settings=strict, cache=cache),
        prepare_image(path, settings=loose, cache=cache),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], ImageError) and "over the limit of 100000" in str(outcomes[0])
    assert isinstance(outcomes[1], PreparedImage) and outcomes[1].size.width == 900
    assert len(cache) == 1


async def test_a_cached_image_is_held_to_the_askers_frame_and_format_limits(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 48), (i * 20, 0, 0)) for i in range(12)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    cache = ImageCache()
    assert (await prepare_image(gif, settings=ImageSettings(), cache=cache)).width == 64
    with pytest.raises(ImageError, match="12 frames, over the limit of 10"):
        await prepare_image(gif, settings=ImageSettings(max_frames=10), cache=cache)
    with pytest.raises(ImageError, match="allowed format"):
        await prepare_image(gif, settings=ImageSettings(formats=frozenset({"PNG", "JPEG"})), cache=cache)
    assert len(cache) == 1


async def test_cancelling_the_caller_that_prepares_an_image_does_not_cancel_the_others() -> None:
    cache = ImageCache()
    started = asyncio.Event()
    runs: list[str] = []

    def compute_as(name: str) -> Any:
        async def compute() -> PreparedImage:
            runs.append(name)
            started.set()
            await asyncio.sleep(0.05)
            return PreparedImage(data_url="data:,", width=1, height=1, upload_width=1, upload_height=1)

        return compute

    owner = asyncio.create_task(cache.get_or_compute("k", compute_as("owner")))
    await started.wait()
    waiter = asyncio.create_task(cache.get_or_compute("k", compute_as("waiter")))
    await asyncio.sleep(0)
    owner.cancel()
    result = await waiter
    assert owner.cancelled() and result.width == 1 and runs == ["owner", "waiter"]
    assert cache.get("k") is result


def test_nothing_outside_the_command_line_imports_it() -> None:
    """The command line is a leaf: the Ray job and the command share the per-input skill code
    through the core (moondream_tools.indexing.skills), not through the command's package."""
    offenders = []
    for path in _modules():
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                relative_cli = node.level >= 1 and (node.module == "cli" or node.module.startswith("cli."))
                absolute_cli = node.level == 0 and node.module.startswith("moondream_tools.cli")
                if relative_cli or absolute_cli:
                    offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []
