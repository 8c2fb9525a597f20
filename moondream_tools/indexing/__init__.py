"""Indexing images for retrieval (RAG): :class:`ImageIndexer` turns images into
:class:`ImageRecord` s (caption, answers, text, objects with boxes) with text to embed and
flat metadata for any vector store; a :class:`~moondream_tools.ResultCache` makes
re-indexing what did not change free.

Example::

    from moondream_tools import AsyncMoondream, ResultCache
    from moondream_tools.indexing import ImageIndexer

    async with AsyncMoondream() as md:
        indexer = ImageIndexer(md, ocr=True, detect=["person"], cache=ResultCache(".cache"))
        for record in await indexer.index("photos/"):
            print(record.id[:12], record.source, record.text())

The same records at half price through Moondream's Batch API (results within hours; run it
again with the same ``job_dir`` to resume after a crash)::

        records = await indexer.index_batch("photos/", job_dir="jobs/photos")
        print(indexer.batch_cost())   # (batch_usd, standard_usd)
"""

from .indexer import DEFAULT_OCR_PROMPT, ImageIndexer, IndexProgress
from .records import FoundObjects, ImageRecord, MetadataValue, phrase_key
from .sources import IMAGE_EXTENSIONS, IndexSource, expand_sources

__all__ = [
    "DEFAULT_OCR_PROMPT",
    "IMAGE_EXTENSIONS",
    "FoundObjects",
    "ImageIndexer",
    "ImageRecord",
    "IndexProgress",
    "IndexSource",
    "MetadataValue",
    "expand_sources",
    "phrase_key",
]
