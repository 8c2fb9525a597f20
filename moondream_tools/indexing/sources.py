"""Which images an index covers: files, directories (with a glob), URLs and bytes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

from ..images.sources import ReferenceKind, reference_kind

__all__ = ["IMAGE_EXTENSIONS", "IndexSource", "expand_sources"]

#: One image to index: a path (str or PathLike), an ``http(s)`` URL, or the image's bytes.
IndexSource = Union[str, "os.PathLike[str]", bytes]

#: File extensions a directory is searched for when no ``glob`` is given (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"})


def expand_sources(
    sources: IndexSource | Iterable[IndexSource], *, glob: str | None = None
) -> Iterator[IndexSource]:
    """Each image of ``sources``, lazily, in order: files, URLs and bytes as given; each
    directory's files matching ``glob`` (default: every image extension, recursively), sorted.

    A path that does not exist is yielded as it is (indexing it gives an error record).

    >>> list(expand_sources(["a.jpg", b"\\xff\\xd8", "https://x/y.png"]))
    ['a.jpg', b'\\xff\\xd8', 'https://x/y.png']
    """
    if isinstance(sources, (str, bytes, bytearray, os.PathLike)):
        sources = [sources]  # type: ignore[list-item]
    for source in sources:  # type: ignore[union-attr]
        if isinstance(source, (bytes, bytearray, memoryview)):
            yield bytes(source)
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"an image source is a path, a URL or bytes, got {type(source).__name__}"
            )
        if isinstance(source, str) and reference_kind(source) is not ReferenceKind.PATH:
            yield source
            continue
        path = Path(source)
        if path.is_dir():
            yield from _walk(path, glob)
        else:
            yield source


def _walk(directory: Path, glob: str | None) -> Iterator[str]:
    if glob is None:
        found = (p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        found = directory.glob(glob)
    for path in sorted(p for p in found if p.is_file()):
        yield str(path)
