"""The command's inputs: files, directories, URLs and ``-`` (a list of paths on stdin)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from ..images.sources import ReferenceKind, reference_kind
from ..indexing import IMAGE_EXTENSIONS, expand_sources

__all__ = ["collect_inputs", "directory_glob", "is_url"]


def directory_glob(pattern: str | None) -> str | None:
    """The glob a directory is searched with: a pattern without ``/`` matches file names at
    any depth (``*.png`` -> ``**/*.png``); one with ``/`` is matched from the directory.

    >>> directory_glob("*.png"), directory_glob("sub/*.jpg"), directory_glob(None)
    ('**/*.png', 'sub/*.jpg', None)
    """
    if pattern is None:
        return None
    return pattern if "/" in pattern or os.sep in pattern else f"**/{pattern}"


def is_url(source: str) -> bool:
    return reference_kind(source) is ReferenceKind.URL


def _stdin_lines(stream: IO[str]) -> list[str]:
    return [line.strip() for line in stream if line.strip()]


def collect_inputs(
    inputs: Sequence[str], *, glob: str | None = None, stdin: IO[str] | None = None,
    in_directories: set[str] | None = None,
) -> tuple[list[str], list[str]]:
    """``(sources, empty_dirs)``: every image the inputs name, in order, duplicates dropped
    (each as given, or as found under its directory), and the directories where nothing
    matched. ``-`` reads one path or URL per line from ``stdin`` (directories there are
    searched too). A path that does not exist is kept: it becomes that input's error.
    ``in_directories``, when given, gets the sources that were only found under a
    directory (none of the inputs names them itself).

    Raises:
        ValueError: ``-`` given twice.
    """
    if sum(1 for item in inputs if item == "-") > 1:
        raise ValueError("'-' (paths on stdin) can be given only once")
    expanded: list[str] = []
    for item in inputs:
        if item == "-":
            if stdin is None:  # pragma: no cover - the command always passes stdin
                raise ValueError("no stdin to read paths from")
            expanded.extend(_stdin_lines(stdin))
        else:
            expanded.append(item)
    pattern = directory_glob(glob)
    sources: list[str] = []
    empty: list[str] = []
    seen: set[str] = set()
    named: set[str] = set()
    for item in expanded:
        found = _expand_one(item, pattern)
        if not found and not is_url(item) and Path(item).is_dir():
            empty.append(item)
        for source in found:
            if source == item:
                named.add(source)
            if source not in seen:
                seen.add(source)
                sources.append(source)
    if in_directories is not None:
        in_directories.update(seen - named)
    return sources, empty


def _expand_one(item: str, pattern: str | None) -> list[str]:
    found = [os.fspath(s) for s in expand_sources([item], glob=pattern) if isinstance(s, (str, os.PathLike))]
    if pattern is None and not is_url(item) and Path(item).is_dir():  # and its videos
        from .video import VIDEO_SUFFIXES

        videos = (p for p in Path(item).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        found += sorted(str(p) for p in videos)
    return found


def describe_search(glob: str | None) -> str:
    """What a directory was searched for, for the 'no images' message."""
    if glob is not None:
        return repr(directory_glob(glob))
    from .video import VIDEO_SUFFIXES

    return ", ".join(sorted(f"*{e}" for e in IMAGE_EXTENSIONS | VIDEO_SUFFIXES))


def images_root(sources: Iterable[str]) -> Path | None:
    """The deepest directory holding every local source (None when there is none)."""
    dirs = [os.path.dirname(os.path.abspath(s)) for s in sources if not is_url(s)]
    if not dirs:
        return None
    return Path(os.path.commonpath(dirs))
