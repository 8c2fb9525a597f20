"""The image pipeline: every accepted input kind, EXIF orientation, odd modes, and bad input."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from moondream_tools import ImageError, ImageSettings, PreparedImage
from moondream_tools.images import prepare as prepare_module  # where _decode_for_upload is looked up
from moondream_tools.images import model_working_size, prepare_image, upload_sizes

SETTINGS = ImageSettings()


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def sent_pixels(prepared: PreparedImage) -> Image.Image:
    """Decode the JPEG the client would send."""
    header, _, payload = prepared.data_url.partition(",")
    assert header == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert img.format == "JPEG"
    assert img.size == (prepared.upload_width, prepared.upload_height)
    return img.convert("RGB")


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


async def prepare(image: object, settings: ImageSettings = SETTINGS) -> PreparedImage:
    return await prepare_image(image, settings=settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------ EXIF orientation


def marker_image() -> Image.Image:
    """60x40, white, with a red block in the top-left corner: shows any flip or turn."""
    img = Image.new("RGB", (60, 40), (255, 255, 255))
    img.paste((220, 20, 20), (0, 0, 15, 10))
    return img


# Where the red block ends up once orientation N is applied (oriented size, block corner).
ORIENTED = {
    1: ((60, 40), "top-left"),
    2: ((60, 40), "top-right"),
    3: ((60, 40), "bottom-right"),
    4: ((60, 40), "bottom-left"),
    5: ((40, 60), "top-left"),
    6: ((40, 60), "top-right"),
    7: ((40, 60), "bottom-right"),
    8: ((40, 60), "bottom-left"),
}


def stored_for_orientation(oriented: Image.Image, orientation: int) -> Image.Image:
    """The raw pixels a camera would store so that applying ``orientation`` gives ``oriented``."""
    inverse = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    return oriented if inverse is None else oriented.transpose(inverse)


def corner_of_red(img: Image.Image) -> str:
    w, h = img.size
    corners = {
        "top-left": (2, 2),
        "top-right": (w - 3, 2),
        "bottom-left": (2, h - 3),
        "bottom-right": (w - 3, h - 3),
    }
    red = [name for name, xy in corners.items() if close_to(img.getpixel(xy), (220, 20, 20), 40)]
    assert len(red) == 1, f"expected exactly one red corner, got {red}"
    return red[0]


@pytest.mark.parametrize("orientation", range(1, 9))
async def test_exif_orientation_built_with_pillow(orientation: int) -> None:
    # Build the file the way a camera does: stored pixels + an EXIF orientation tag.
    # The oriented view is the 60x40 marker for 1-4 and its transpose for 5-8.
    oriented = marker_image() if orientation <= 4 else marker_image().transpose(Image.Transpose.TRANSPOSE)
    stored = stored_for_orientation(oriented, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    prepared = await prepare(data)

    expected_size, _ = ORIENTED[orientation]
    assert (prepared.width, prepared.height) == expected_size
    assert corner_of_red(sent_pixels(prepared)) == "top-left"


@pytest.mark.parametrize("kind", ["Landscape", "Portrait"])
async def test_exif_orientation_real_photos(shared_data: Path, kind: str) -> None:
    # Every file, shown with its orientation applied, looks like <kind>_0.jpg.
    first = await prepare(shared_data / "exif" / f"{kind}_0.jpg")
    reference = sent_pixels(first)
    expected = (1800, 1200) if kind == "Landscape" else (1200, 1800)
    assert (first.width, first.height) == expected
    assert reference.size == upload_sizes(*expected, SETTINGS)[0]
    small_ref = np.asarray(reference.resize((90, 60) if kind == "Landscape" else (60, 90)), dtype=float)
    for index in range(1, 9):
        prepared = await prepare(shared_data / "exif" / f"{kind}_{index}.jpg")
        assert (prepared.width, prepared.height) == expected, index
        small = np.asarray(sent_pixels(prepared).resize(small_ref.shape[1::-1]), dtype=float)
        assert np.abs(small - small_ref).mean() < 12, f"{kind}_{index}.jpg is not oriented like {kind}_0.jpg"


# ------------------------------------------------------------------ input kinds


async def test_every_input_kind_gives_the_same_pixels(tmp_path: Path) -> None:
    img = marker_image()
    png = encode(img, "PNG")
    path = tmp_path / "marker.png"
    path.write_bytes(png)
    inputs: dict[str, object] = {
        "str path": str(path),
        "Path": path,
        "file URL": path.as_uri(),
        "data URL": "data:image/png;base64," + base64.b64encode(png).decode(),
        "bytes": png,
        "bytearray": bytearray(png),
        "memoryview": memoryview(png),
        "PIL": img,
        "numpy HxWx3": np.asarray(img),
        "file object": io.BytesIO(png),
    }
    for name, value in inputs.items():
        prepared = await prepare(value)
        assert (prepared.width, prepared.height) == (60, 40), name
        assert corner_of_red(sent_pixels(prepared)) == "top-left", name


async def test_numpy_gray_and_rgba_arrays() -> None:
    gray = np.full((30, 20), 77, dtype=np.uint8)
    prepared = await prepare(gray)
    assert (prepared.width, prepared.height) == (20, 30)
    assert close_to(sent_pixels(prepared).getpixel((10, 10)), (77, 77, 77), 3)

    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 2] = 255  # blue, fully transparent -> white
    rgba[:5, :, 3] = 255  # top half opaque blue
    out = sent_pixels(await prepare(rgba))
    assert close_to(out.getpixel((5, 1)), (0, 0, 255), 30)
    assert close_to(out.getpixel((5, 8)), (255, 255, 255), 10)


async def test_alpha_is_flattened_onto_white() -> None:
    img = Image.new("RGBA", (20, 20), (0, 200, 0, 0))
    img.paste((0, 200, 0, 255), (0, 0, 10, 20))
    out = sent_pixels(await prepare(encode(img, "PNG")))
    assert close_to(out.getpixel((3, 10)), (0, 200, 0), 12)
    assert close_to(out.getpixel((16, 10)), (255, 255, 255), 6)


async def test_palette_with_transparency_and_la() -> None:
    pal = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    pal.paste((200, 0, 0, 255), (0, 0, 10, 20))
    out = sent_pixels(await prepare(encode(pal.convert("P"), "PNG")))
    assert close_to(out.getpixel((16, 10)), (255, 255, 255), 6)
    assert close_to(out.getpixel((3, 10)), (200, 0, 0), 25)

    la = Image.new("LA", (10, 10), (0, 0))
    assert close_to(sent_pixels(await prepare(encode(la, "PNG"))).getpixel((5, 5)), (255, 255, 255), 4)


async def test_sixteen_bit_is_scaled_not_clipped() -> None:
    array = np.full((8, 8), 32768, dtype=np.uint16)
    data = encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = sent_pixels(await prepare(data))
    assert close_to(out.getpixel((4, 4)), (128, 128, 128), 3)


async def test_cmyk_grayscale_bilevel_and_animation() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    assert close_to(sent_pixels(await prepare(encode(cmyk, "JPEG"))).getpixel((8, 8)), (255, 0, 0), 12)

    gray = Image.new("L", (16, 16), 40)
    assert close_to(sent_pixels(await prepare(encode(gray, "PNG"))).getpixel((8, 8)), (40, 40, 40), 3)

    bilevel = Image.new("1", (16, 16), 0)
    assert close_to(sent_pixels(await prepare(encode(bilevel, "PNG"))).getpixel((8, 8)), (0, 0, 0), 3)

    frames = [Image.new("RGB", (16, 16), color) for color in ((0, 0, 255), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = sent_pixels(await prepare(gif.getvalue()))
    assert close_to(out.getpixel((8, 8)), (0, 0, 255), 12), "the first frame is used"


async def test_twelve_megapixel_photo(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = Image.open(shared_data / "exif" / "Landscape_0.jpg").convert("RGB").resize((4000, 3000))
    data = encode(photo, "JPEG", quality=90)
    drafts: list[tuple[int, int]] = []
    original_draft = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        result = original_draft(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    prepared = await prepare(data)
    assert drafts == [(2000, 1500)], "the JPEG is decoded at half scale, never at full size"
    assert (prepared.width, prepared.height) == (4000, 3000)
    # caption/query/detect/point get the model's working resolution, segment gets more
    assert (prepared.upload_width, prepared.upload_height) == (1176, 882)
    assert (prepared.segment_upload_width, prepared.segment_upload_height) == (2000, 1500)
    for url, size in ((prepared.data_url, (1176, 882)), (prepared.segment_data_url, (2000, 1500))):
        out = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")
        assert out.size == size
        diff = np.abs(np.asarray(out.resize((200, 150)), float) - np.asarray(photo.resize((200, 150)), float))
        assert diff.mean() < 4
    # A 12 MP photo becomes a payload a small fraction of a full-size quality-95 JPEG.
    assert len(prepared.data_url) < 0.15 * len(base64.b64encode(encode(photo, "JPEG", quality=95)))


async def test_segment_upload_false_encodes_one_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    photo = Image.linear_gradient("L").convert("RGB").resize((4000, 3000))
    data = encode(photo, "JPEG", quality=90)
    encoded: list[tuple[int, int]] = []
    original = prepare_module._jpeg_data_url

    def spy(rgb: Image.Image, settings: ImageSettings) -> str:
        encoded.append(rgb.size)
        return original(rgb, settings)

    monkeypatch.setattr(prepare_module, "_jpeg_data_url", spy)
    settings = ImageSettings(segment_upload=False)
    assert settings.encoding != SETTINGS.encoding, "the two never share a cache entry"
    prepared = await prepare(data, settings)
    assert encoded == [(1176, 882)], "only the skill upload is encoded"
    assert (prepared.segment_upload_width, prepared.segment_upload_height) == (1176, 882)
    assert await prepared.segment_payload() == prepared.data_url
    encoded.clear()
    full = await prepare(data)
    assert (full.segment_upload_width, full.segment_upload_height) == (2000, 1500)
    await full.segment_payload()
    assert sorted(encoded) == [(1176, 882), (2000, 1500)]


@pytest.mark.parametrize(
    ("size", "working"),
    [((4000, 3000), (1176, 644)), ((3000, 4000), (644, 1176)), ((1800, 1200), (1176, 644)),
     ((640, 480), (1176, 644)), ((300, 200), (378, 378)), ((8000, 1000), (2506, 378))],
)
def test_model_working_size_follows_moondream_tiling(size: tuple[int, int], working: tuple[int, int]) -> None:
    assert model_working_size(*size) == working
    width, height = working
    crops = ((width - 112) // 266) * ((height - 112) // 266)
    assert crops <= 12


def test_upload_sizes_never_upscale_and_cover_the_model_size() -> None:
    for width, height in ((4000, 3000), (3000, 4000), (1920, 1080), (640, 480), (50, 40), (10000, 500)):
        skill, segment = upload_sizes(width, height, SETTINGS)
        assert skill[0] <= width and skill[1] <= height and segment[0] <= width
        target = model_working_size(width, height)
        assert skill[0] >= min(width, target[0]) - 1 and skill[1] >= min(height, target[1]) - 1
        assert abs(skill[0] / skill[1] - width / height) < 0.02 * width / height
        assert max(segment) <= max(2000, max(skill))
    # The model never works at less resolution on the upload than on the original:
    # the tiling rule's edges (a side just under a crop boundary drops a row) are handled.
    for width in range(200, 8001, 157):
        for height in range(200, 8001, 163):
            skill, _ = upload_sizes(width, height, SETTINGS)
            target = model_working_size(width, height)
            seen = model_working_size(*skill)
            assert seen[0] >= target[0] and seen[1] >= target[1], (width, height, skill)
            assert skill[0] >= min(width, target[0]) and skill[1] >= min(height, target[1])
    full = ImageSettings(skill_max_crops=None, segment_max_side=None)
    assert upload_sizes(4000, 3000, full) == ((4000, 3000), (4000, 3000))


async def test_decoding_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    original = prepare_module._decode_for_upload

    def spy(source: object, settings: ImageSettings) -> object:
        threads.append(threading.get_ident())
        return original(source, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_module, "_decode_for_upload", spy)
    await prepare(encode(marker_image(), "PNG"))
    assert threads and threads[0] != threading.get_ident()


async def test_prepared_image_passes_through_unchanged() -> None:
    prepared = await prepare(marker_image())
    assert await prepare(prepared) is prepared
    assert "base64" not in repr(prepared)


# ------------------------------------------------------------------ bad input


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


async def test_decompression_bomb_is_refused_before_decoding() -> None:
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too large|over the limit"):
        await prepare(png_header_only(100_000, 100_000))
    assert time.perf_counter() - start < 1.0


async def test_pixel_limit_is_a_setting() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="100x100 = 10000 pixels, over the limit of 5000"):
        await prepare(data, ImageSettings(max_pixels=5000))
    assert (await prepare(data, ImageSettings(max_pixels=10_000))).width == 100


async def test_byte_limit_is_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (50, 50)), "PNG"))
    size = path.stat().st_size
    with pytest.raises(ImageError, match=f"{size} bytes, over the limit of 10 bytes"):
        await prepare(path, ImageSettings(max_bytes=10))


async def test_truncated_file_is_an_error_not_a_gray_image() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    data = encode(noise, "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated|corrupt|cannot"):
        await prepare(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/no/such/image.png", "image file not found: '/no/such/image.png'"),
        (b"definitely not an image", "not an image"),
        (b"", "empty"),
        ("data:image/png;base64,@@@", "valid base64"),
        ("data:image/png,rawdata", "base64-encoded"),
        ("", "empty string"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
        (np.zeros((5, 5, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((5, 5, 2), dtype=np.uint8), "HxW, HxWx3 or HxWx4"),
        (12345, "unsupported image type int"),
    ],
)
async def test_bad_inputs_raise_image_error(value: object, message: str) -> None:
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        await prepare(value)


async def test_directory_and_text_file_object(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        await prepare(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with open(text, encoding="utf-8") as handle, pytest.raises(ImageError, match="binary mode"):
        await prepare(handle)
    with pytest.raises(ImageError, match="notes.txt.*not an image"):
        await prepare(text)


async def test_zero_size_pil_image() -> None:
    with pytest.raises(ImageError, match="zero size"):
        await prepare(Image.new("RGB", (0, 0)))
