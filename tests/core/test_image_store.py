"""ImageStore: handles in memory and on disk, bounded by LRU eviction, behind VisionTools."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moondream_tools import AsyncMoondream, ImageAccessError, ImageStore, VisionTools, tool_error_text
from moondream_tools.image_store import content_handle
from moondream_tools.testing import FakeMoondream, Scene, Shape

SCENE = Scene(640, 480, [Shape("circle", "red", (200, 200), 90), Shape("circle", "red", (450, 300), 80)])


def jpeg(scene: Scene = SCENE) -> bytes:
    buffer = io.BytesIO()
    scene.render().save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@pytest.mark.parametrize("on_disk", [False, True])
def test_handles_come_from_content_and_names_keep_working(tmp_path: Path, on_disk: bool) -> None:
    store = ImageStore(tmp_path / "store" if on_disk else None)
    data = jpeg()
    handle = store.put(data)
    assert handle == "img_" + hashlib.sha256(data).hexdigest()[:8] == content_handle(data)
    assert store.put(bytearray(data)) == handle, "the same image twice: the same handle"
    assert store.put(io.BytesIO(data), name="receipt") == "receipt"
    assert store.names == [handle, "receipt"]
    assert store.get(handle) == data and store.get("receipt") == data
    assert store.get("nope") is None
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    store.put(path, name="file")
    assert Path(store.get("file")) == path, "an application path stays a reference"  # type: ignore[arg-type]
    pixels = store.put(SCENE.render())
    array_handle = store.put(np.asarray(SCENE.render()))
    assert pixels == array_handle, "the same pixels: the same handle"
    got = store.get(pixels)
    decoded = Image.open(io.BytesIO(got)).convert("RGB") if isinstance(got, bytes) else got
    assert np.array_equal(np.asarray(decoded), np.asarray(SCENE.render()))
    store.remove("receipt")
    assert "receipt" not in store and store.get(handle) == data, "the image stays while a handle names it"
    with pytest.raises(ValueError, match="image name"):
        store.put(data, name="no spaces")
    store.close()


@pytest.mark.parametrize("on_disk", [False, True])
def test_least_recently_used_images_are_evicted_and_say_so(tmp_path: Path, on_disk: bool) -> None:
    images = [jpeg(Scene.random(seed, width=320, height=240, count=3)) for seed in range(3)]
    store = ImageStore(tmp_path / "s" if on_disk else None, max_bytes=len(images[0]) + len(images[2]) + 10)
    first, second = store.put(images[0]), store.put(images[1])
    assert store.get(first) == images[0]  # first is now the most recently used
    third = store.put(images[2])
    assert store.get(first) == images[0] and store.get(third) == images[2]
    with pytest.raises(ImageAccessError, match="no longer available.*send the image again"):
        store.get(second)
    assert second in store.names, "the handle is remembered, its image is gone"
    assert store.nbytes <= store.max_bytes
    if on_disk:
        assert sorted(p.name for p in (tmp_path / "s" / "blobs").iterdir()) == sorted(
            hashlib.sha256(images[i]).hexdigest() for i in (0, 2)
        )
    assert store.put(images[1]) == second and store.get(second) == images[1], "sent again: back"
    store.close()


def test_a_disk_store_resolves_its_handles_in_a_new_process(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    handle = store.put(jpeg())
    store.put(jpeg(Scene.demo()), name="demo")
    store.close()
    code = (
        "import sys, hashlib; from moondream_tools import ImageStore;"
        "s = ImageStore(sys.argv[1]); print(s.names, hashlib.sha256(s.get(sys.argv[2])).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), handle],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{[handle, 'demo']} {hashlib.sha256(jpeg()).hexdigest()}"
    # A blob deleted behind the store's back is reported as gone, not as a crash.
    blob = next((tmp_path / "store" / "blobs").iterdir())
    blob.unlink()
    reopened = ImageStore(tmp_path / "store")
    gone = [name for name in reopened.names if _is_gone(reopened, name)]
    assert len(gone) == 1
    reopened.close()


def _is_gone(store: ImageStore, name: str) -> bool:
    try:
        store.get(name)
    except ImageAccessError:
        return True
    return False


async def test_tools_resolve_handles_of_a_store_reopened_after_a_restart(fake: FakeMoondream, tmp_path: Path) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        tools = VisionTools(md, image_store=ImageStore(tmp_path / "store"))
        handle = tools.images.put(jpeg())
        tools.add_image(jpeg(Scene.demo()), name="demo")
        assert tools.image_names == [handle, "demo"]
        first = await tools.count(handle, "red circle")
        tools.images.close()
        # "Restart": new tools over the same directory.
        again = VisionTools(md, image_store=ImageStore(tmp_path / "store"))
        second = await again.count(handle, "red circle")
        assert first.count == second.count == 2
        assert (await again.count("demo", "red circle")).count == Scene.demo().count("red circle")
        again.remove_image("demo")
        with pytest.raises(ImageAccessError, match="not registered"):
            await again._resolve("demo")
        again.images.close()
    with pytest.raises(TypeError, match="ImageStore"):
        VisionTools(md, image_store="dir")  # type: ignore[arg-type]


async def test_an_evicted_handle_is_a_tool_error_asking_for_the_image_again(fake: FakeMoondream) -> None:
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        small = [jpeg(Scene.random(seed, width=320, height=240, count=2)) for seed in range(2)]
        tools = VisionTools(md, image_store=ImageStore(max_bytes=len(small[0]) + 10))
        old = tools.images.put(small[0])
        tools.images.put(small[1])
        with pytest.raises(ImageAccessError) as caught:
            await tools.count(old, "shapes")
        assert "send the image again" in tool_error_text(caught.value)


async def test_a_prepared_image_is_kept_as_its_upload(tmp_path: Path) -> None:
    from moondream_tools import ImageSettings
    from moondream_tools.images import prepare_image

    prepared = await prepare_image(jpeg(), settings=ImageSettings())
    memory, disk = ImageStore(), ImageStore(tmp_path / "d")
    assert memory.get(memory.put(prepared, name="p")) is prepared
    stored = disk.get(disk.put(prepared, name="p"))
    assert isinstance(stored, bytes) and Image.open(io.BytesIO(stored)).size == (prepared.upload_width, prepared.upload_height)
    disk.close()


async def test_attach_stores_untrusted_images_and_says_why_it_cannot(fake: FakeMoondream) -> None:
    import base64

    from moondream_tools import ImagePolicy

    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        tools = VisionTools(md, image_policy=ImagePolicy(max_pixels=1_000_000))
        data = jpeg()
        attached = await tools.attach(data)
        assert attached.ok and attached.handle == content_handle(data)
        assert attached.placeholder == f"[image {content_handle(data)}: 640x480 px]"
        as_url = await tools.attach("data:image/jpeg;base64," + base64.b64encode(data).decode())
        assert as_url == attached, "the same image, the same handle"
        assert (await tools.count(attached.handle, "red circle")).count == 2  # type: ignore[arg-type]
        big = jpeg(Scene(1600, 1200, [Shape("circle", "red", (400, 400), 90)]))
        refused = [
            await tools.attach(b"\x89PNG not really"),
            await tools.attach(big),
            await tools.attach("http://example.com/cat.jpg"),
            await tools.attach("data:image/png;base64,%%%"),
        ]
        assert [r.ok for r in refused] == [False] * 4
        assert "not an image" in refused[0].placeholder
        assert "over the limit of 1000000" in refused[1].placeholder
        assert "URLs are not allowed" in refused[2].placeholder
        assert "base64" in refused[3].placeholder
        assert tools.image_names == [attached.handle], "nothing stored for a refused image"


async def test_attach_reads_user_paths_only_inside_the_allowed_dirs(fake: FakeMoondream, tmp_path: Path) -> None:
    from moondream_tools import ImagePolicy

    inside, outside = tmp_path / "uploads", tmp_path / "secret"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.jpg").write_bytes(jpeg())
    (outside / "b.jpg").write_bytes(jpeg(Scene.demo()))
    async with AsyncMoondream(api_key=fake.api_key, base_url=fake.base_url) as md:
        tools = VisionTools(md, image_policy=ImagePolicy(allowed_dirs=[inside]))
        ok = await tools.attach(inside / "a.jpg")
        assert ok.handle == content_handle(jpeg()) and (ok.width, ok.height) == (640, 480)
        assert (await tools.attach((inside / "a.jpg").as_uri())) == ok
        for refused in (outside / "b.jpg", str(inside / ".." / "secret" / "b.jpg"), (outside / "b.jpg").as_uri()):
            result = await tools.attach(refused)
            assert not result.ok and "not allowed" in result.placeholder, result
        assert not (await VisionTools(md).attach(inside / "a.jpg")).ok, "the default policy reads no path"
