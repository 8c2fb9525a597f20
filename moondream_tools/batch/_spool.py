"""The requests added to a :class:`~moondream_tools.MoondreamBatch` before it is built: on
disk, so memory stays flat whatever their number (a million paths would take ~600 MB as
Python objects; an image given as bytes stays on disk too)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BatchError, ConfigurationError
from ..indexing.sources import IndexSource

__all__ = ["Request", "RequestSpool"]

_FETCH = 64  # rows read at a time while building


@dataclass(frozen=True)
class Request:
    """One request as added: its position, id, skill, image source and wire fields."""

    index: int
    id: str
    skill: str
    source: IndexSource
    description: str
    fields: dict[str, Any]


class RequestSpool:
    """Requests in a private temporary SQLite database (SQLite's ``""`` file: on disk in the
    temporary directory, deleted when closed), with their ids kept unique and the digest
    that identifies the list (:func:`~moondream_tools.batch._wire.requests_digest`) kept as
    they arrive."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE requests (position INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, skill TEXT NOT NULL,"
            " kind TEXT NOT NULL, source BLOB NOT NULL, description TEXT NOT NULL, fields TEXT NOT NULL)"
        )
        self._db.execute("BEGIN")  # one transaction for all the adds: no commit per request
        self._finalizer = weakref.finalize(self, self._db.close)  # closed even if close() is never called
        self._digest = hashlib.sha256()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, id: str, skill: str, source: IndexSource, description: str, fields: Mapping[str, Any]) -> int:
        """Keep one request; returns its index. A used id is a ``ValueError``."""
        if isinstance(source, bytes):
            kind, stored = "bytes", source
        elif isinstance(source, str):
            kind, stored = "str", source.encode()
        else:
            kind, stored = "path", os.fsencode(source)
        encoded = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
        if not self._finalizer.alive:
            raise ConfigurationError("this MoondreamBatch is closed: add requests before aclose(), or open the job again")
        try:
            self._db.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self._count, id, skill, kind, stored, description, encoded),
            )
        except sqlite3.IntegrityError:
            raise ValueError(
                f"id {id!r} is already used in this job: ids must be unique (give every request an id, or none)"
            ) from None
        except sqlite3.Error as exc:  # the temporary directory is full or unwritable
            raise BatchError(
                f"cannot keep the request on disk in the temporary directory ({exc}); free space there or set TMPDIR",
                code="spool_failed",
            ) from None
        self._digest.update(json.dumps((id, skill, description, fields), sort_keys=True, separators=(",", ":")).encode())
        self._digest.update(b"\n")
        self._count += 1
        return self._count - 1

    def digest(self) -> str:
        """The identity of the requests so far (as ``requests_digest`` of the same list)."""
        return self._digest.hexdigest()

    def __iter__(self) -> Iterator[Request]:
        """The requests in the order they were added (read a few at a time)."""
        cursor = self._db.execute("SELECT * FROM requests ORDER BY position")
        while rows := cursor.fetchmany(_FETCH):
            for position, rid, skill, kind, stored, description, fields in rows:
                source: IndexSource = (
                    stored if kind == "bytes" else stored.decode() if kind == "str" else Path(os.fsdecode(stored))
                )
                yield Request(position, rid, skill, source, description, json.loads(fields))

    def close(self) -> None:
        """Delete the requests (the database file goes with its connection)."""
        self._finalizer()
