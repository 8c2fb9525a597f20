"""The command's records: one JSON object per input, in a JSON Lines file that survives kills.

A record (see :func:`~moondream_tools.indexing.skills.base_record`) names its input as given (``source``), the image
(``image_id``: sha256 of its bytes; ``width``/``height``: upright), what was asked
(``skill``, ``arguments``), the result in normalized and pixel coordinates, and ``error``
(None on success). A video input gives one record per sampled frame (with ``frame``,
``time`` and ``track_ids``) and then its own record (``video``, ``tracks``, ``annotated``):
see :mod:`moondream_tools.cli.video`.

The file is written by :class:`JsonlWriter`: opened ``O_APPEND`` and each record written
as one ``os.write`` of the whole line, newline included, so a run killed at any moment
(even SIGKILL) leaves only complete lines, except in the rare case of a write cut short
(a full disk, or a kill in the middle of a very long line): :func:`load_jsonl` cuts such an
unfinished tail off before a rerun appends to the file. Rerunning reads the file back
(:func:`load_jsonl`): the last record of each key (:func:`record_key`: source, skill and
arguments) wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..indexing.skills import Record

__all__ = [
    "JsonlWriter",
    "Loaded",
    "dumps",
    "load_jsonl",
    "record_key",
]


def record_key(source: str, skill: str, arguments: dict[str, Any]) -> str:
    """What identifies a record for resuming: the input as given, the skill and its
    arguments (canonical JSON).

    >>> record_key("a.jpg", "detect", {"tiles": "auto", "object": "car"})
    '["a.jpg","detect",{"object":"car","tiles":"auto"}]'
    """
    return json.dumps([source, skill, arguments], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_of(record: Record) -> str | None:
    """The key of a record read back, or None when it lacks the fields of one. A video's
    frame record (with ``frame``) has a key of its own, never its video's."""
    source, skill, arguments = record.get("source"), record.get("skill"), record.get("arguments")
    if not isinstance(source, str) or not isinstance(skill, str) or not isinstance(arguments, dict):
        return None
    frame = record.get("frame")
    if isinstance(frame, int):
        return record_key(f"{source}#frame={frame}", skill, arguments)
    return record_key(source, skill, arguments)


def dumps(record: Record) -> str:
    """One JSON Lines line (with its newline); ``error`` always comes last."""
    ordered = {k: v for k, v in record.items() if k != "error"}
    ordered["error"] = record.get("error")
    return json.dumps(ordered, ensure_ascii=False, allow_nan=False) + "\n"


@dataclass
class Loaded:
    """A JSON Lines file read back.

    Attributes:
        records: the last record of each key, by key (in the order of those last records).
        lines: complete lines read.
        repaired: bytes of an unfinished last line that were cut off (0: none).
        bad_lines: line numbers that were not a record (left in place, ignored).
        counts: how many records each key has in the file (``--batch-api`` uses it to tell
            whether a batch job's record was written already).
    """

    records: dict[str, Record] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    repaired: int = 0
    bad_lines: list[int] = field(default_factory=list)


def load_jsonl(path: Path, *, repair: bool = True) -> Loaded:
    """Read the records of ``path`` (missing: none). When the file does not end with a
    newline, its unfinished last line is cut off (``repair``) so appending stays line-safe."""
    loaded = Loaded()
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return loaded
    end = len(data)
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        loaded.repaired = end - cut
        end = cut
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(cut)
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            loaded.bad_lines.append(number)
            continue
        key = key_of(record) if isinstance(record, dict) else None
        if key is None:
            loaded.bad_lines.append(number)
            continue
        loaded.lines += 1
        loaded.counts[key] = loaded.counts.get(key, 0) + 1
        loaded.records.pop(key, None)  # the last one wins, and takes the last place
        loaded.records[key] = record
    return loaded


class FileBusyError(OSError):
    """Another run is appending to the same file."""


class JsonlWriter:
    """Appends records to a JSON Lines file, each as one ``os.write`` of its complete line.

    The file is opened ``O_APPEND`` (created when missing) and locked for this process
    (``flock``, where the platform has it) so two runs cannot interleave into one file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise FileBusyError(f"{path} is being written by another moondream-tools run") from None

    def write(self, record: Record) -> None:
        if self._fd is None:
            raise ValueError("the writer is closed")
        line = dumps(record).encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: the next run cuts the unfinished line off
            raise OSError(f"could not write a whole record to {self.path} ({written} of {len(line)} bytes)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def iter_jsonl(path: Path) -> Iterator[Record]:
    """Every record of a JSON Lines file, in file order (for tools and tests)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def last_by_key(records: Iterable[Record]) -> dict[str, Record]:
    """The last record of each key."""
    out: dict[str, Record] = {}
    for record in records:
        key = key_of(record)
        if key is not None:
            out[key] = record
    return out
