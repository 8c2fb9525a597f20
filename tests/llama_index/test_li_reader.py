"""MoondreamImageReader: SimpleDirectoryReader (sync, worker processes, async, fsspec), retrieval,
node parsing, bad files, the cache, pickling and construction, against scene ground truth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import pickle
import re
import uuid
import warnings
import zlib
from pathlib import Path

import fsspec
import pytest
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document, ImageDocument, ImageNode, MetadataMode

from llama_index.readers.moondream import MoondreamImageReader
from moondream_tools import AsyncMoondream, ConfigurationError, ResultCache
from moondream_tools.indexing import ImageRecord
from moondream_tools.testing import COLORS, FakeMoondream, Scene, Shape

NOT_YELLOW = [c for c in COLORS if c != "yellow"]
LOGGER = "llama_index.readers.moondream"

#: The folder the reader reads: only img_0 has yellow triangles; img_1 is yellow (no triangle),
#: img_2 has a triangle (not yellow); the rest are random scenes without yellow.
SCENES: dict[str, Scene] = {
    "img_0.png": Scene(
        640,
        480,
        [
            Shape("triangle", "yellow", (160, 300), 140),
            Shape("triangle", "yellow", (480, 300), 100),
            Shape("circle", "red", (320, 100), 80),
        ],
    ),
    "img_1.jpg": Scene(640, 480, [Shape("circle", "yellow", (200, 240), 150), Shape("square", "green", (480, 240), 120)]),
    "img_2.png": Scene(640, 480, [Shape("triangle", "blue", (200, 240), 150), Shape("square", "red", (480, 240), 120)]),
    "img_3.jpg": Scene.random(4, count=4, colors=NOT_YELLOW),
    "img_4.jpg": Scene.random(7, count=4, colors=NOT_YELLOW),
}


def write_scenes(folder: Path, scenes: dict[str, Scene]) -> dict[str, Scene]:
    """Write each scene as its file (PNG or JPEG by extension); return {path: scene}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, scene in scenes.items():
        path = folder / name
        path.write_bytes(scene.encode("PNG" if name.endswith(".png") else "JPEG"))
        written[str(path)] = scene
    return written


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Scene]:
    return write_scenes(tmp_path / "images", SCENES)


def extractor(reader: BaseReader) -> dict[str, BaseReader]:
    return {".jpg": reader, ".png": reader}


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_document(doc: Document, scene: Scene, path: str, phrase: str = "yellow triangle") -> None:
    """One document against the scene's ground truth."""
    assert isinstance(doc, ImageDocument)
    assert doc.id_ == sha256(path) == doc.metadata["image_id"]
    assert doc.image_path == path
    meta = doc.metadata
    assert meta["file_path"] == meta["source"] == path
    assert meta["errors"] is None
    assert (meta["width"], meta["height"]) == scene.size
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in meta.values()), meta
    key = re.sub(r"[^0-9a-z]+", "_", phrase)
    truths = sorted(scene.matching(phrase), key=lambda t: t.bbox_px)
    assert meta[f"count_{key}"] == len(truths)
    boxes = sorted(json.loads(meta[f"boxes_{key}"]))
    assert len(boxes) == len(truths)
    for box, truth in zip(boxes, truths, strict=True):
        assert all(abs(a - b) <= 2 for a, b in zip(box, truth.bbox_px)), (box, truth.bbox_px)
    # the caption names every shape it sees; the text ends with what detect found (a phrase
    # with nothing found is left out of the text)
    for truth in scene.truth():
        assert truth.color in doc.text and truth.kind in doc.text
    if truths:
        assert doc.text.endswith(f"Objects found: {phrase}: {len(truths)}.")
    else:
        assert "Objects found" not in doc.text
    # bulky keys out of the embedding and the LLM's view, the counts in
    bulky = ImageRecord.bulky_metadata_keys(meta)
    assert f"boxes_{key}" in bulky and f"count_{key}" not in bulky
    assert set(bulky) <= set(doc.excluded_embed_metadata_keys)
    assert set(bulky) <= set(doc.excluded_llm_metadata_keys)
    assert f"count_{key}: {len(truths)}" in doc.get_metadata_str(MetadataMode.EMBED)
    assert "boxes_" not in doc.get_content(MetadataMode.EMBED) + doc.get_content(MetadataMode.LLM)


def check_all(docs: list[Document], images: dict[str, Scene], phrase: str = "yellow triangle") -> None:
    by_path = {doc.metadata["file_path"]: doc for doc in docs}
    assert len(docs) == len(by_path) == len(images)
    assert set(by_path) == set(images)
    for path, scene in images.items():
        check_document(by_path[path], scene, path, phrase)


# ------------------------------------------------------------------ SimpleDirectoryReader, sync


def test_simple_directory_reader_with_a_given_backend(threaded_fake: FakeMoondream, images: dict[str, Scene]) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    reader = MoondreamImageReader(backend=md, detect=["yellow triangle"])
    folder = Path(next(iter(images))).parent
    docs = SimpleDirectoryReader(str(folder), file_extractor=extractor(reader)).load_data()
    check_all(docs, images)
    assert sum(d.metadata["count_yellow_triangle"] for d in docs) == 2
    # SimpleDirectoryReader's file metadata (extra_info) is merged in and stays flat
    doc = docs[0]
    assert doc.metadata["file_name"] == Path(doc.metadata["file_path"]).name
    assert isinstance(doc.metadata["file_size"], int)
    assert {r.path for r in threaded_fake.requests} == {"/v1/caption", "/v1/detect"}
    assert len(threaded_fake.requests) == 2 * len(images)
    # the given backend is used, never closed, and its pool never tied to a sync call's loop
    assert not md._transport.sessions.closed and md._transport.sessions.pooled is None
    with pytest.raises(TypeError, match=r"pass backend=None and configure .*MOONDREAM_API_KEY"):
        pickle.dumps(reader)
    asyncio.run(md.aclose())


def test_load_data_lazy_load_data_and_extra_info(
    threaded_fake: FakeMoondream, images: dict[str, Scene], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONDREAM_BASE_URL", threaded_fake.base_url)
    monkeypatch.setenv("MOONDREAM_API_KEY", threaded_fake.api_key or "")
    reader = MoondreamImageReader(detect=["yellow triangle"], questions=["How many yellow triangles are there?"])
    path = next(iter(images))
    (doc,) = reader.load_data(Path(path), extra_info={"album": "shapes", "file_path": path})
    check_document(doc, images[path], path)
    assert doc.metadata["album"] == "shapes"
    assert json.loads(doc.metadata["answers"]) == {"How many yellow triangles are there?": "2"}
    assert "How many yellow triangles are there? 2" in doc.text
    (lazy,) = list(reader.lazy_load_data(path))
    assert (lazy.id_, lazy.text) == (doc.id_, doc.text)
    assert len(threaded_fake.requests) == 2 * 3  # caption, question, detect; twice


async def test_sync_load_inside_a_running_loop(threaded_fake: FakeMoondream, images: dict[str, Scene]) -> None:
    async with AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url) as md:
        reader = MoondreamImageReader(backend=md, detect=["yellow triangle"])
        path = next(iter(images))
        (doc,) = reader.load_data(path)  # a notebook calling the sync API: runs on a worker thread's loop
        check_document(doc, images[path], path)
        (again,) = await reader.aload_data(path)
        assert (again.id_, again.text, again.metadata) == (doc.id_, doc.text, doc.metadata)


def test_worker_processes_get_a_pickled_reader(
    threaded_fake: FakeMoondream, images: dict[str, Scene], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONDREAM_BASE_URL", threaded_fake.base_url)
    monkeypatch.setenv("MOONDREAM_API_KEY", threaded_fake.api_key or "")
    reader = MoondreamImageReader(detect=["yellow triangle"])
    folder = str(Path(next(iter(images))).parent)
    serial = SimpleDirectoryReader(folder, file_extractor=extractor(reader)).load_data()
    check_all(serial, images)
    # after it has loaded files, the reader still pickles (no session, loop, lock or semaphore)
    clone = pickle.loads(pickle.dumps(reader))
    assert isinstance(clone, MoondreamImageReader) and repr(clone) == repr(reader)
    assert not clone._slots
    before = len(threaded_fake.requests)
    parallel = SimpleDirectoryReader(folder, file_extractor=extractor(clone)).load_data(num_workers=2)
    check_all(parallel, images)
    assert len(threaded_fake.requests) - before == 2 * len(images), "the workers asked the emulator"
    assert sorted((d.id_, d.text) for d in parallel) == sorted((d.id_, d.text) for d in serial)


# ------------------------------------------------------------------ async


async def test_aload_data_bounds_concurrency_across_files(
    fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONDREAM_BASE_URL", fake.base_url)
    monkeypatch.setenv("MOONDREAM_API_KEY", fake.api_key or "")
    scenes = {f"img_{i:02}.{'png' if i % 2 else 'jpg'}": Scene.random(100 + i, count=4) for i in range(10)}
    images = write_scenes(tmp_path / "many", scenes)
    fake.latency = 0.15
    reader = MoondreamImageReader(detect=["shapes"], max_concurrency=2)  # a client per call: no other bound
    docs = await SimpleDirectoryReader(str(tmp_path / "many"), file_extractor=extractor(reader)).aload_data()
    check_all(docs, images, phrase="shapes")
    calls_per_image = 2  # caption and detect, sent together
    assert len(fake.requests) == calls_per_image * len(images)
    assert calls_per_image < fake.max_in_flight <= 2 * calls_per_image, fake.max_in_flight
    # the semaphore of this loop is runtime state: never pickled
    assert len(reader._slots) == 1
    clone = pickle.loads(pickle.dumps(reader))
    assert not clone._slots and clone.max_concurrency == 2


async def test_aload_data_through_an_fsspec_filesystem(fake: FakeMoondream, client: AsyncMoondream) -> None:
    memory = fsspec.filesystem("memory")
    root = f"/moondream-{uuid.uuid4().hex}"
    try:
        expected = {}
        for name, scene in list(SCENES.items())[:3]:
            data = scene.encode("PNG" if name.endswith(".png") else "JPEG")
            memory.pipe(f"{root}/{name}", data)
            expected[f"{root}/{name}"] = (scene, hashlib.sha256(data).hexdigest())
        reader = MoondreamImageReader(backend=client, detect=["yellow triangle"])
        docs = await SimpleDirectoryReader(root, fs=memory, file_extractor=extractor(reader)).aload_data()
        assert sorted(d.metadata["file_path"] for d in docs) == sorted(expected)
        for doc in docs:
            scene, digest = expected[doc.metadata["file_path"]]
            assert doc.id_ == digest and doc.metadata["source"] == doc.metadata["file_path"]
            assert doc.metadata["errors"] is None
            assert doc.metadata["count_yellow_triangle"] == scene.count("yellow triangle")
        (missing,) = await reader.aload_data(f"{root}/nope.png", fs=memory)
        assert "cannot read" in json.loads(missing.metadata["errors"])["image"]
    finally:
        memory.rm(root, recursive=True)


# ------------------------------------------------------------------ retrieval and node parsing


class BagOfWords(BaseEmbedding):
    """Deterministic: which (crudely singular) words occur, hashed into 256 dimensions."""

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * 256
        for word in set(re.findall(r"[a-z]+", text.lower())):
            word = word[:-1] if len(word) > 3 and word.endswith("s") else word
            vector[zlib.crc32(word.encode()) % 256] = 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)


async def test_vector_store_retrieval_finds_the_right_image(fake: FakeMoondream, client: AsyncMoondream, images: dict[str, Scene]) -> None:
    reader = MoondreamImageReader(backend=client)
    folder = str(Path(next(iter(images))).parent)
    docs = await SimpleDirectoryReader(folder, file_extractor=extractor(reader)).aload_data()
    assert len(docs) == len(images)
    with warnings.catch_warnings():
        # resolve_embed_model imports llama_index.core.bridge.langchain, which imports
        # langchain-community when it is installed (the LangChain adapter's dev extra); it
        # announces its sunset with a DeprecationWarning on import.
        warnings.filterwarnings("ignore", message=r".*langchain-community.*sunset", category=DeprecationWarning)
        index = VectorStoreIndex.from_documents(
            docs, embed_model=BagOfWords(), transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0)]
        )
    retriever = index.as_retriever(similarity_top_k=1)
    # img_1 is yellow without a triangle, img_2 has a triangle that is not yellow
    path = str(Path(folder) / "img_0.png")
    for hits in (await retriever.aretrieve("yellow triangle"), retriever.retrieve("yellow triangle")):
        (hit,) = hits
        assert hit.node.metadata["file_path"] == path
        assert hit.node.ref_doc_id == sha256(path)
        assert isinstance(hit.node, ImageNode) and hit.node.image_path == path
        assert "two yellow triangles" in hit.node.get_content().lower()


async def test_many_objects_do_not_trip_the_node_parser(fake: FakeMoondream, client: AsyncMoondream, tmp_path: Path) -> None:
    grid = Scene(640, 480, [Shape("circle", "red", (50 + 75 * c, 50 + 75 * r), 30) for r in range(6) for c in range(8)])
    (path,) = write_scenes(tmp_path, {"grid.png": grid})
    reader = MoondreamImageReader(backend=client, detect=["red circle"], max_objects=100)
    (doc,) = await reader.aload_data(path)
    boxes = json.loads(doc.metadata["boxes_red_circle"])
    assert doc.metadata["count_red_circle"] == len(boxes) == grid.count("red circle") == 48
    splitter = SentenceSplitter(chunk_size=96, chunk_overlap=0)
    assert len(doc.metadata["boxes_red_circle"]) > 4 * 96  # alone far longer than a chunk
    nodes = splitter.get_nodes_from_documents([doc])
    assert nodes and all(node.metadata["boxes_red_circle"] == doc.metadata["boxes_red_circle"] for node in nodes)
    assert all(isinstance(node, ImageNode) for node in nodes)
    # the same document without the exclusions is refused: the exclusions are what make it fit
    bare = ImageDocument(text=doc.text, metadata=doc.metadata)
    with pytest.raises(ValueError, match="Metadata length"):
        splitter.get_nodes_from_documents([bare])


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize("on_error", ["include", "skip"])
def test_a_corrupt_file_is_reported_and_the_others_load(
    threaded_fake: FakeMoondream,
    images: dict[str, Scene],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    on_error: str,
) -> None:
    monkeypatch.setenv("MOONDREAM_BASE_URL", threaded_fake.base_url)
    monkeypatch.setenv("MOONDREAM_API_KEY", threaded_fake.api_key or "")
    folder = Path(next(iter(images))).parent
    broken = folder / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    reader = MoondreamImageReader(detect=["yellow triangle"], on_error=on_error)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        docs = SimpleDirectoryReader(str(folder), file_extractor=extractor(reader)).load_data()
    good = [d for d in docs if d.metadata["file_path"] != str(broken)]
    check_all(good, images)
    bad = [d for d in docs if d.metadata["file_path"] == str(broken)]
    if on_error == "include":
        (doc,) = bad
        errors = json.loads(doc.metadata["errors"])
        assert list(errors) == ["image"] and "not an image" in errors["image"]
        assert doc.text == "" and doc.image_path == str(broken)
        assert "errors" in doc.excluded_embed_metadata_keys and "errors" in doc.excluded_llm_metadata_keys
    else:
        assert bad == []
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING
    assert str(broken) in record.getMessage() and "not an image" in record.getMessage()
    assert len(threaded_fake.requests) == 2 * len(images), "nothing is sent for the broken file"


async def test_a_failed_call_is_an_error_document(fake: FakeMoondream, client: AsyncMoondream, images: dict[str, Scene], caplog: pytest.LogCaptureFixture) -> None:
    path = next(iter(images))
    fake.fail_next(status=400, route="/v1/detect")
    reader = MoondreamImageReader(backend=client, detect=["yellow triangle"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        (doc,) = await reader.aload_data(path)
    errors = json.loads(doc.metadata["errors"])
    assert list(errors) == ["detect: yellow triangle"] and "400" in errors["detect: yellow triangle"]
    assert doc.id_ == sha256(path) and doc.metadata["caption"] and "count_yellow_triangle" not in doc.metadata
    assert any(path in r.getMessage() and "detect: yellow triangle" in r.getMessage() for r in caplog.records)
    assert await MoondreamImageReader(backend=client, on_error="skip").aload_data(path) != []
    fake.fail_next(status=400, route="/v1/caption")
    assert await MoondreamImageReader(backend=client, on_error="skip").aload_data(path) == []


# ------------------------------------------------------------------ cache


async def test_cache_makes_the_second_load_free(fake: FakeMoondream, client: AsyncMoondream, images: dict[str, Scene], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    reader = MoondreamImageReader(backend=client, detect=["yellow triangle"], ocr=True, cache=cache_dir)
    assert isinstance(reader.cache, ResultCache) and reader.cache.path.parent == cache_dir
    folder = str(Path(next(iter(images))).parent)
    first = await SimpleDirectoryReader(folder, file_extractor=extractor(reader)).aload_data()
    check_all(first, images)
    sent = len(fake.requests)
    assert sent == 3 * len(images)
    second = await SimpleDirectoryReader(folder, file_extractor=extractor(reader)).aload_data()
    assert len(fake.requests) == sent, "the second load sent requests"
    # a new reader on the same cache path (as a worker process would open it): still free
    other = MoondreamImageReader(backend=client, detect=["yellow triangle"], ocr=True, cache=str(cache_dir))
    third = await SimpleDirectoryReader(folder, file_extractor=extractor(other)).aload_data()
    assert len(fake.requests) == sent
    for docs in (second, third):
        assert [(d.id_, d.text, d.metadata) for d in docs] == [(d.id_, d.text, d.metadata) for d in first]
    reader.cache.close()
    assert other.cache is not None
    other.cache.close()


# ------------------------------------------------------------------ construction


def test_constructor_needs_nothing_and_refuses_unknown_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_BASE_URL", raising=False)
    reader = MoondreamImageReader()
    assert isinstance(reader, BaseReader)
    assert repr(reader) == (
        "MoondreamImageReader(questions=[], ocr=False, detect=[], caption_length='normal', on_error='include')"
    )
    assert pickle.loads(pickle.dumps(reader)).on_error == "include"
    with pytest.raises(TypeError) as info:
        MoondreamImageReader(detects=["car"], ocr_prompt="read")
    assert str(info.value) == (
        "MoondreamImageReader got unknown argument(s) 'detects', 'ocr_prompt'; accepted: backend, questions, ocr,"
        " detect, caption_length, cache, tiling, max_tiles, max_objects, max_concurrency, on_error"
    )
    with pytest.raises(TypeError):
        MoondreamImageReader(AsyncMoondream(base_url="http://127.0.0.1:9/v1"))  # type: ignore[misc]
    with pytest.raises(ValueError, match="on_error"):
        MoondreamImageReader(on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one string"):
        MoondreamImageReader(detect="car")
    with pytest.raises(ValueError, match="length"):
        MoondreamImageReader(caption_length="tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_concurrency"):
        MoondreamImageReader(max_concurrency=0)
    with pytest.raises(ValueError, match="object"):
        MoondreamImageReader(detect=[" "])
    with pytest.raises(TypeError, match="VisionBackend"):
        MoondreamImageReader(backend="http://localhost:2020/v1")  # type: ignore[arg-type]


def test_using_it_unconfigured_raises_the_configuration_error(
    images: dict[str, Scene], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_BASE_URL", raising=False)
    reader = MoondreamImageReader(detect=["yellow triangle"])
    path = next(iter(images))
    # a missing key concerns every file, so it is raised, not made one document's error
    with pytest.raises(ConfigurationError, match="No Moondream API key. Set the MOONDREAM_API_KEY"):
        reader.load_data(path)
    folder = str(Path(path).parent)
    with pytest.raises(Exception, match="Error loading file") as info:
        SimpleDirectoryReader(folder, file_extractor=extractor(reader), raise_on_error=True).load_data()
    assert isinstance(info.value.__cause__, ConfigurationError)
    # SimpleDirectoryReader's default prints and skips each file that raises
    assert SimpleDirectoryReader(folder, file_extractor=extractor(reader)).load_data() == []
    assert "No Moondream API key" in capsys.readouterr().out


async def test_aload_unconfigured_raises_too(images: dict[str, Scene], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="MOONDREAM_API_KEY"):
        await MoondreamImageReader().aload_data(next(iter(images)))


def test_public_surface() -> None:
    import llama_index.readers.moondream as package

    assert package.__all__ == ["MoondreamImageReader"]
    assert package.MoondreamImageReader is MoondreamImageReader
    assert "Example" in (package.__doc__ or "")
    namespace = Path(package.__file__ or "").parents[1]  # .../llama_index/readers: PEP 420 portions
    assert not (namespace / "__init__.py").exists() and not (namespace.parent / "__init__.py").exists()
    assert (namespace / "moondream" / "py.typed").exists()
