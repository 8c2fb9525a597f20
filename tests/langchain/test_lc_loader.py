"""MoondreamImageLoader and MoondreamImageBlobParser against the emulator.

Ground truth: the scenes' shapes (labels, pixel boxes), the bytes on disk (sha256 ids), the
requests the emulator recorded (how many, from which event loop, how many at once), and the
documents a real LangChain pipeline (vector store, GenericLoader, PyPDFLoader) gets back.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from langchain_core.document_loaders import BaseBlobParser, BaseLoader
from langchain_core.documents import Document
from langchain_core.documents.base import Blob
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore

from langchain_moondream import MoondreamImageBlobParser, MoondreamImageLoader
from langchain_moondream import loaders as loaders_module
from moondream_tools import AsyncMoondream, ResultCache
from moondream_tools.testing import FakeMoondream, Scene, Shape

with warnings.catch_warnings():  # langchain-community announces its sunset on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.document_loaders import PyPDFLoader
    from langchain_community.document_loaders.generic import GenericLoader

#: The folder: file name -> scene. A trap image has a blue triangle and a yellow circle.
SCENES = {
    "01.jpg": Scene(640, 480, [Shape("triangle", "yellow", (200, 300), 140), Shape("circle", "red", (480, 180), 110)]),
    "02.jpg": Scene(640, 480, [Shape("circle", "red", (120, 120), 80), Shape("circle", "red", (320, 240), 80),
                               Shape("circle", "red", (520, 360), 80)]),
    "03.jpg": Scene(640, 480, [Shape("triangle", "blue", (160, 240), 130), Shape("circle", "yellow", (460, 240), 120)]),
    "sub/04.png": Scene(640, 480, [Shape("square", "green", (320, 240), 150)]),
}
CORRUPT = "05_corrupt.jpg"
#: Sorted by path: a directory's images come after the files beside it.
ORDER = ["01.jpg", "02.jpg", "03.jpg", CORRUPT, "sub/04.png"]
DETECT = ["yellow triangle", "circle"]
CALLS_PER_IMAGE = 1 + len(DETECT)  # a caption and one detect per phrase
SKILLS = ("caption", "query", "detect", "point", "segment")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name, scene in SCENES.items():
        (root / name).write_bytes(scene.encode("PNG" if name.endswith(".png") else "JPEG"))
    (root / CORRUPT).write_bytes(b"\xff\xd8 this is not really a JPEG")
    (root / "notes.txt").write_text("not an image: the default glob leaves it out")
    return root


def name_of(document: Document, root: Path) -> str:
    return Path(document.metadata["source"]).relative_to(root).as_posix()


def skill_requests(fake: FakeMoondream) -> list[Any]:
    return [r for r in fake.requests if r.path.rsplit("/", 1)[-1] in SKILLS]


def assert_boxes(metadata: dict[str, Any], phrase_key: str, scene: Scene, phrase: str) -> None:
    got = sorted(json.loads(metadata[f"boxes_{phrase_key}"]))
    want = sorted(t.bbox_px for t in scene.matching(phrase))
    assert metadata[f"count_{phrase_key}"] == len(want) == len(got)
    for box, truth in zip(got, want, strict=True):
        assert all(abs(a - b) <= 2 for a, b in zip(box, truth, strict=True)), (box, truth)


def assert_scene_document(document: Document, root: Path) -> None:
    """One good image's document against its file and its scene."""
    name = name_of(document, root)
    scene = SCENES[name]
    path = root / name
    assert document.id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert document.metadata["source"] == str(path)
    assert document.metadata["errors"] is None
    assert (document.metadata["width"], document.metadata["height"]) == scene.size
    assert all(isinstance(v, (str, int, float, bool)) or v is None for v in document.metadata.values())
    assert_boxes(document.metadata, "yellow_triangle", scene, "yellow triangle")
    assert_boxes(document.metadata, "circle", scene, "circle")
    caption = document.metadata["caption"]
    assert isinstance(caption, str) and document.page_content.startswith(caption)
    for truth in scene.truth():
        assert truth.color in caption and truth.kind in caption, (truth.label, caption)


def assert_folder_documents(documents: list[Document], root: Path, *, corrupt: bool) -> None:
    expected = ORDER if corrupt else [n for n in ORDER if n != CORRUPT]
    assert [name_of(d, root) for d in documents] == expected
    for document in documents:
        if name_of(document, root) == CORRUPT:
            assert set(json.loads(document.metadata["errors"])) == {"image"}
            assert document.page_content == "" and document.metadata["caption"] is None
            assert isinstance(document.id, str) and len(document.id) == 64
        else:
            assert_scene_document(document, root)
    assert len({d.id for d in documents}) == len(documents)


def same(documents: list[Document]) -> list[tuple[Any, ...]]:
    return [(d.id, d.page_content, d.metadata) for d in documents]


def failure_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "langchain_moondream" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------ alazy_load vs ground truth


async def test_alazy_load_documents_match_the_scenes(
    fake: FakeMoondream, client: AsyncMoondream, photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="langchain_moondream")
    loader = MoondreamImageLoader(photos, backend=client, detect=DETECT)
    documents = [document async for document in loader.alazy_load()]
    assert_folder_documents(documents, photos, corrupt=True)
    assert "yellow triangle" in documents[0].page_content.lower()
    (warned,) = failure_warnings(caplog)
    assert str(photos / CORRUPT) in warned.getMessage() and "image:" in warned.getMessage()
    assert len(skill_requests(fake)) == CALLS_PER_IMAGE * len(SCENES), "the corrupt file sends nothing"

    caplog.clear()
    skipped = await MoondreamImageLoader(photos, backend=client, detect=DETECT, on_error="skip").aload()
    assert_folder_documents(skipped, photos, corrupt=False)
    assert same(skipped) == same([d for d in documents if name_of(d, photos) != CORRUPT])
    (warned,) = failure_warnings(caplog)
    assert str(photos / CORRUPT) in warned.getMessage() and "skipped" in warned.getMessage()


async def test_alazy_load_is_natively_async_and_concurrent(fake: FakeMoondream, photos: Path) -> None:
    seen: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []

    class Recording(AsyncMoondream):
        async def caption(self, *args: Any, **kwargs: Any) -> Any:
            seen.append((asyncio.get_running_loop(), threading.current_thread()))
            return await super().caption(*args, **kwargs)

    assert MoondreamImageLoader.alazy_load is not BaseLoader.alazy_load
    assert inspect.isasyncgenfunction(MoondreamImageLoader.alazy_load)
    fake.latency = 0.05
    async with Recording(api_key=fake.api_key, base_url=fake.base_url) as md:
        loader = MoondreamImageLoader(photos, backend=md, detect=DETECT, max_concurrency=4)
        documents = await loader.aload()
    assert_folder_documents(documents, photos, corrupt=True)
    assert len(seen) == len(SCENES)
    assert all(loop is asyncio.get_running_loop() and thread is threading.current_thread() for loop, thread in seen), (
        "every call ran on the caller's event loop, not in a worker thread"
    )
    assert fake.max_in_flight > 1, "images and their calls are in flight at once"


# ------------------------------------------------------------------ sync calls


def test_load_from_plain_sync_code_with_a_client_from_the_environment(
    threaded_fake: FakeMoondream, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", threaded_fake.api_key or "")
    monkeypatch.setenv("MOONDREAM_BASE_URL", threaded_fake.base_url)
    made: list[AsyncMoondream] = []
    closed: list[AsyncMoondream] = []

    class Counted(AsyncMoondream):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        async def aclose(self) -> None:
            closed.append(self)
            await super().aclose()

    monkeypatch.setattr(loaders_module, "AsyncMoondream", Counted)
    loader = MoondreamImageLoader(photos, detect=DETECT)
    assert made == [], "the client is made by each load, not by the constructor"
    documents = loader.load()
    assert_folder_documents(documents, photos, corrupt=True)
    assert len(made) == 1 and closed == made, "one client for the load, closed at its end"
    assert same(loader.load()) == same(documents)
    assert len(made) == 2 and closed == made


async def test_lazy_load_inside_a_running_loop_gives_the_same_documents(
    threaded_fake: FakeMoondream, photos: Path
) -> None:
    async with AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url) as md:
        loader = MoondreamImageLoader(photos, backend=md, detect=DETECT)
        in_loop = list(loader.lazy_load())  # sync, from inside this running loop
        assert_folder_documents(in_loop, photos, corrupt=True)
        assert same(await loader.aload()) == same(in_loop)
        assert same(await asyncio.to_thread(loader.load)) == same(in_loop)  # plain sync code in a thread
        # Stopping early stops the load; the given client is never closed by the loader.
        documents = loader.lazy_load()
        assert next(documents).id == in_loop[0].id
        documents.close()
        caption = await md.caption(SCENES["02.jpg"].render())
        assert caption.caption == in_loop[1].metadata["caption"]


# ------------------------------------------------------------------ the result cache


async def test_cache_makes_a_second_load_free_and_a_change_costs_one_image(
    fake: FakeMoondream, client: AsyncMoondream, photos: Path, tmp_path: Path
) -> None:
    loader = MoondreamImageLoader(photos, backend=client, detect=DETECT, cache=tmp_path / "cache")
    first = await loader.aload()
    assert len(skill_requests(fake)) == CALLS_PER_IMAGE * len(SCENES)
    assert (tmp_path / "cache").is_dir()
    fake.requests.clear()
    second = await loader.aload()
    assert skill_requests(fake) == [], "nothing changed: zero requests"
    assert same(second) == same(first)
    # One image changed: only its calls are sent, all with its one upload.
    changed = Scene(640, 480, [Shape("triangle", "yellow", (150, 150), 100), Shape("triangle", "yellow", (450, 300), 120)])
    SCENES_AFTER = {**SCENES, "02.jpg": changed}
    (photos / "02.jpg").write_bytes(changed.encode())
    third = await loader.aload()
    sent = skill_requests(fake)
    assert len(sent) == CALLS_PER_IMAGE and len({r.json["image_url"] for r in sent}) == 1
    assert [d.id for d in third] == [first[0].id, hashlib.sha256((photos / "02.jpg").read_bytes()).hexdigest(),
                                     *(d.id for d in first[2:])]
    assert_boxes(third[1].metadata, "yellow_triangle", SCENES_AFTER["02.jpg"], "yellow triangle")
    assert third[1].metadata["count_yellow_triangle"] == 2
    # A ResultCache object on the same file: used and left open.
    fake.requests.clear()
    with ResultCache(tmp_path / "cache") as cache:
        again = await MoondreamImageLoader(photos, backend=client, detect=DETECT, cache=cache).aload()
        assert skill_requests(fake) == [] and same(again) == same(third)
        assert len(cache) == CALLS_PER_IMAGE * (len(SCENES) + 1)


# ------------------------------------------------------------------ a retrieval pipeline


class WordsAndPairs(Embeddings):
    """A deterministic bag of words: lower-cased words and adjacent word pairs, hashed into
    1024 buckets, L2-normalised. (Pairs, because every document says "yellow triangle: N"
    in its objects line: on words alone the trap image, a blue triangle and a yellow circle,
    would tie with the image that has a yellow triangle.)"""

    size = 1024

    def _vector(self, text: str) -> list[float]:
        words = re.findall(r"[a-z]+", text.lower())
        vector = [0.0] * self.size
        for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            vector[int(hashlib.sha256(feature.encode()).hexdigest(), 16) % self.size] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)


async def test_documents_retrieve_by_what_the_images_show(fake: FakeMoondream, client: AsyncMoondream, photos: Path) -> None:
    documents = await MoondreamImageLoader(photos, backend=client, detect=DETECT, on_error="skip").aload()
    store = InMemoryVectorStore(embedding=WordsAndPairs())
    assert await store.aadd_documents(documents) == [d.id for d in documents]
    retriever = store.as_retriever(search_kwargs={"k": 1})
    (best,) = retriever.invoke("yellow triangle")
    assert name_of(best, photos) == "01.jpg"
    assert best.id == hashlib.sha256((photos / "01.jpg").read_bytes()).hexdigest()
    assert_boxes(best.metadata, "yellow_triangle", SCENES["01.jpg"], "yellow triangle")
    for query, name in [("three red circles", "02.jpg"), ("a green square", "sub/04.png"),
                        ("blue triangle and a yellow circle", "03.jpg")]:
        (hit,) = await retriever.ainvoke(query)
        assert name_of(hit, photos) == name, query


# ------------------------------------------------------------------ the blob parser


def test_blob_parser_with_generic_loader(
    threaded_fake: FakeMoondream, photos: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", threaded_fake.api_key or "")
    monkeypatch.setenv("MOONDREAM_BASE_URL", threaded_fake.base_url)
    caplog.set_level(logging.WARNING, logger="langchain_moondream")
    parser = MoondreamImageBlobParser(detect=DETECT)
    loader = GenericLoader.from_filesystem(photos, glob="**/*", suffixes=[".jpg", ".png"], parser=parser)
    documents = sorted(loader.load(), key=lambda d: ORDER.index(name_of(d, photos)))
    assert_folder_documents(documents, photos, corrupt=True)
    (warned,) = failure_warnings(caplog)
    assert str(photos / CORRUPT) in warned.getMessage()
    # The same documents as the loader's. (Not the unreadable file's: the core gives an image
    # it cannot read the sha256 of its source's name, a path for the loader, "bytes" for a blob.)
    good = [d for d in documents if name_of(d, photos) != CORRUPT]
    assert same(good) == same(MoondreamImageLoader(photos, detect=DETECT, on_error="skip").load())
    skipping = GenericLoader.from_filesystem(
        photos, glob="**/*", suffixes=[".jpg", ".png"], parser=MoondreamImageBlobParser(detect=DETECT, on_error="skip")
    )
    assert sorted(name_of(d, photos) for d in skipping.lazy_load()) == sorted(SCENES)
    # A blob without a path: its source is the image's id.
    (from_bytes,) = parser.parse(Blob.from_data(SCENES["01.jpg"].encode(), mime_type="image/jpeg"))
    assert from_bytes.metadata["source"] == f"bytes:{from_bytes.id[:12]}"
    assert from_bytes.metadata["count_yellow_triangle"] == 1


def test_blob_parser_as_the_images_parser_of_a_pdf_loader(threaded_fake: FakeMoondream, tmp_path: Path) -> None:
    md = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
    first, second = SCENES["01.jpg"], SCENES["02.jpg"]
    pdf = tmp_path / "report.pdf"
    first.render().save(pdf, "PDF", save_all=True, append_images=[second.render()])
    parser = MoondreamImageBlobParser(backend=md)
    captions = [parser.parse(Blob.from_data(s.encode("PNG")))[0].page_content for s in (first, second)]
    assert "yellow triangle" in captions[0] and "three red circles" in captions[1].lower()
    pages = PyPDFLoader(str(pdf), extract_images=True, images_parser=parser, images_inner_format="text").load()
    assert len(pages) == 2
    assert captions[0] in pages[0].page_content and "yellow triangle" in pages[0].page_content
    assert captions[1] in pages[1].page_content and "yellow triangle" not in pages[1].page_content
    asyncio.run(md.aclose())


# ------------------------------------------------------------------ progress


async def test_show_progress_logs_when_tqdm_is_missing(
    fake: FakeMoondream, client: AsyncMoondream, photos: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loaders_module, "_tqdm", lambda: None)
    caplog.set_level(logging.INFO, logger="langchain_moondream")
    await MoondreamImageLoader(photos, backend=client, detect=DETECT, show_progress=True).aload()
    lines = [r.getMessage() for r in caplog.records if r.name == "langchain_moondream" and r.levelno == logging.INFO]
    assert [line.split(" images")[0] for line in lines] == [f"indexed {i}/5" for i in range(1, 6)]
    assert lines[-1] == f"indexed 5/5 images (1 failed; {CALLS_PER_IMAGE * len(SCENES)} requests sent, 0 answered from the cache)"


async def test_show_progress_draws_a_tqdm_bar(
    fake: FakeMoondream, client: AsyncMoondream, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await MoondreamImageLoader(photos, backend=client, show_progress=True).aload()
    assert "5/5" in capsys.readouterr().err


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize("make", [
    lambda **kw: MoondreamImageLoader("photos/", **kw),
    lambda **kw: MoondreamImageBlobParser(**kw),
], ids=["loader", "parser"])
def test_bad_arguments_are_refused_at_once(make: Any) -> None:
    with pytest.raises(TypeError) as info:
        make(questionz=["Is it sunny?"], colour=True)
    message = str(info.value)
    assert "got unknown argument(s) 'questionz' (did you mean 'questions'?), 'colour'; accepted: " in message
    for accepted in ("backend", "questions", "ocr", "detect", "caption_length", "cache", "on_error", "max_objects"):
        assert accepted in message
    with pytest.raises(TypeError, match=r"questions is a list of questions, not one string: use questions=\['x'\]"):
        make(questions="x")
    with pytest.raises(TypeError, match="detect is a list"):
        make(detect="car")
    with pytest.raises(ValueError, match="on_error must be 'include' or 'skip', got 'ignore'"):
        make(on_error="ignore")
    with pytest.raises(TypeError, match="cache must be None, a path"):
        make(cache=3)
    with pytest.raises(ValueError, match="length must be"):
        make(caption_length="huge")
    with pytest.raises(TypeError, match="backend must be a moondream_tools.VisionBackend"):
        make(backend="md")
    with pytest.raises(ValueError, match="tiling"):
        make(tiling="sometimes")
    with pytest.raises(ValueError, match="max_objects"):
        make(max_objects=0)


def test_loader_arguments_and_public_surface() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        MoondreamImageLoader("photos/", max_concurrency=0)
    with pytest.raises(TypeError, match="paths must be"):
        MoondreamImageLoader(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="show_progress"):
        MoondreamImageLoader("photos/", show_progress="yes")  # type: ignore[arg-type]
    loader = MoondreamImageLoader(["a.jpg", Path("b")], questions=["Why?"], cache="never-created")
    assert loader.paths == ["a.jpg", Path("b")] and loader.questions == ("Why?",)
    assert not Path("never-created").exists(), "a cache path is opened by a load, not by the constructor"
    import langchain_moondream

    assert {"MoondreamImageLoader", "MoondreamImageBlobParser"} <= set(langchain_moondream.__all__)
    assert issubclass(MoondreamImageLoader, BaseLoader) and issubclass(MoondreamImageBlobParser, BaseBlobParser)
