"""RAG over images: index a folder, retrieve an image by what it shows, answer with its boxes.

A folder of images (the repo's example photo and a few generated scenes, one with a sign on
it) is indexed with ``MoondreamImageLoader``: a caption, the text in each image (OCR) and
the boxes of two phrases per image. The documents go into LangChain's in-memory vector store
with a small deterministic embedding (word counts, hashed: no model, no download), and two
questions are answered with the right image and where in it, in pixels.

With MOONDREAM_API_KEY (Moondream Cloud) or MOONDREAM_BASE_URL (e.g. Moondream Station)
set it runs on that server; with neither, on the offline emulator.

    python examples/rag_over_images.py
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_moondream import MoondreamImageLoader
from moondream_tools import AsyncMoondream
from moondream_tools.testing import FakeMoondream, Scene, Shape, Text

PHOTO = Path(__file__).resolve().parent / "data" / "waterfall.jpg"
QUESTIONS = [
    ("Which image has a yellow triangle?", "yellow triangle"),
    ("Where is the text EXIT?", "text"),
]


class WordEmbeddings(Embeddings):
    """Bag-of-words vectors (each lower-cased word hashed into one of 512 slots), normalized:
    documents sharing words with the query score higher. Deterministic and offline."""

    size = 512

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.size
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            slot = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % self.size
            vector[slot] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)


def scenes() -> dict[str, Scene]:
    """Three generated scenes (shapes with exact ground truth), one with a sign on it."""
    return {
        "shelf.jpg": Scene(960, 640, [Shape("circle", "red", (240, 320), 160), Shape("square", "blue", (700, 300), 180)]),
        "garden.jpg": Scene(960, 640, [Shape("triangle", "yellow", (300, 380), 200), Shape("circle", "green", (720, 260), 140)]),
        "hallway.jpg": Scene(
            960, 640, [Shape("square", "orange", (200, 460), 160)],
            texts=[Text("EXIT", (560, 120), 70), Text("GATE 12", (520, 300), 49)],
        ),
    }


def make_folder(folder: Path) -> None:
    """The example photo and the generated scenes, as files."""
    shutil.copy(PHOTO, folder / PHOTO.name)
    for name, scene in scenes().items():
        scene.render().save(folder / name, "JPEG", quality=92)


@asynccontextmanager
async def open_backend() -> AsyncIterator[AsyncMoondream]:
    if os.environ.get("MOONDREAM_API_KEY") or os.environ.get("MOONDREAM_BASE_URL"):
        async with AsyncMoondream() as md:
            print(f"Using the Moondream server at {md.base_url}.")
            yield md
        return
    print("No MOONDREAM_API_KEY or MOONDREAM_BASE_URL set: using the offline emulator.")
    async with FakeMoondream() as server, AsyncMoondream(api_key=server.api_key, base_url=server.base_url) as md:
        yield md


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(folder)
        async with open_backend() as md:
            loader = MoondreamImageLoader(
                folder, backend=md, ocr=True, detect=[phrase for _, phrase in QUESTIONS],
                cache=folder / ".cache",
            )
            documents = [doc async for doc in loader.alazy_load()]
        print(f"Indexed {len(documents)} images:")
        for doc in documents:
            print(f"  {Path(doc.metadata['source']).name:14} {doc.page_content.splitlines()[0]}")

        store = InMemoryVectorStore(WordEmbeddings())
        store.add_documents(documents)
        retriever = store.as_retriever(search_kwargs={"k": 1})
        for question, phrase in QUESTIONS:
            best = retriever.invoke(question)[0]
            key = re.sub(r"[^0-9a-z]+", "_", phrase)
            boxes = json.loads(best.metadata[f"boxes_{key}"])
            print(f"\nQ: {question}")
            print(f"A: {Path(best.metadata['source']).name} ({best.metadata['width']}x{best.metadata['height']} px),"
                  f" {best.metadata[f'count_{key}']} x {phrase!r}")
            if phrase == "text":
                print(f"   reads: {' / '.join(best.metadata['ocr'].splitlines())}")
            for x0, y0, x1, y1 in boxes:
                print(f"   box ({x0}, {y0}) - ({x1}, {y1}) px")


if __name__ == "__main__":
    asyncio.run(main())
