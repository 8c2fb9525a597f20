"""A batch job's state on disk: ``job.json`` (small, rewritten atomically after every step)
and ``inputs.jsonl`` (the requests, written once when the job is built).

``job.json``::

    {
      "format": "moondream-tools/batch-job", "version": 1,
      "created_at": "2025-01-10T12:00:00Z",
      "base_url": "https://api.moondream.ai/v1",      # the server the batches live on
      "model": null,                                  # sent with every completion
      "requests_digest": "<sha256>",                  # the identity of the request list
      "items": 12,                                    # requests in inputs.jsonl
      "batches": [{
        "file": "requests-0000.jsonl", "lines": 10, "bytes": 181234,
        "part_size": 52428800,                        # fixed when the upload starts
        "file_id": "...", "upload_id": "...",         # from mpu-create
        "parts": {"1": "\\"etag\\""},                   # uploaded parts and their etags
        "submitting": false,                          # a completion was sent, answer pending
        "batch_id": "...",                            # from mpu-complete: submitted
        "status": "completed",                        # chunking / processing / completed / failed / expired
        "progress": {"total": 10, "completed": 9, "failed": 1},
        "usage": {"input_tokens": 15000, "output_tokens": 300},
        "created_at": "...", "completed_at": "...", "expires_at": "...",
        "outputs": [0, 1],                            # indexes of the result files
        "downloaded": {"0": "results-0000-0.jsonl"},  # result files on disk
        "error": null                                 # {"code", "message"} of a failed batch
      }]
    }

``inputs.jsonl``: one line per request, in the order they were added::

    {"index": 0, "id": "0", "skill": "detect", "source": "photos/a.jpg", "object": "car",
     "width": 640, "height": 480, "batch": 0, "line": 0}
    {"index": 1, "id": "1", ..., "batch": null, "line": null,
     "error": {"code": "image_error", "message": "..."}}

No key is ever written: the files hold ids, etags, paths and statuses, never a header, and
output URLs (presigned: their query is a credential) are not kept, only their indexes;
every text is passed through the client's redactor on the way out as well.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._http_errors import Redactor
from ..errors import ConfigurationError

__all__ = ["BatchRecord", "JobState", "ManifestEntry", "load_state", "read_manifest", "write_atomically"]

STATE_FILE = "job.json"
MANIFEST_FILE = "inputs.jsonl"
FORMAT = "moondream-tools/batch-job"
VERSION = 1


def utc_now() -> str:
    """Now, as ISO 8601 UTC with a ``Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader (or a process killed mid-write) never sees a
    half-written file: write a temporary file beside it, flush it to disk, rename it over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class BatchRecord:
    """One batch of the job: its input file and how far it got (see the module docstring)."""

    file: str
    lines: int
    bytes: int
    part_size: int | None = None
    file_id: str | None = None
    upload_id: str | None = None
    parts: dict[int, str] = field(default_factory=dict)
    submitting: bool = False
    batch_id: str | None = None
    status: str | None = None
    progress: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    created_at: str | None = None
    completed_at: str | None = None
    expires_at: str | None = None
    outputs: list[int] = field(default_factory=list)
    downloaded: dict[int, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchRecord:
        data = dict(data)
        data["parts"] = {int(k): v for k, v in (data.get("parts") or {}).items()}
        data["downloaded"] = {int(k): v for k, v in (data.get("downloaded") or {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class JobState:
    """The whole job (see the module docstring)."""

    base_url: str
    model: str | None
    requests_digest: str
    items: int
    batches: list[BatchRecord]
    created_at: str = field(default_factory=utc_now)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> JobState:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigurationError(f"{path} is not a moondream-tools batch job state file")
        if data.get("version") != VERSION:
            raise ConfigurationError(
                f"{path} was written by another version of moondream-tools (state version"
                f" {data.get('version')!r}, this one reads {VERSION})"
            )
        return cls(
            base_url=data["base_url"],
            model=data.get("model"),
            requests_digest=data["requests_digest"],
            items=int(data["items"]),
            batches=[BatchRecord.from_json(b) for b in data.get("batches", [])],
            created_at=data.get("created_at") or utc_now(),
        )

    def save(self, job_dir: Path, redactor: Redactor) -> None:
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False)
        write_atomically(job_dir / STATE_FILE, redactor(text).encode())


def load_state(job_dir: Path) -> JobState | None:
    """The job's state, or None when the directory holds no built job."""
    path = job_dir / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigurationError(f"{path} is not valid JSON; was it edited by hand?") from None
    return JobState.from_json(data, path)


@dataclass(frozen=True)
class ManifestEntry:
    """One request as recorded in ``inputs.jsonl``."""

    index: int
    id: str
    skill: str
    source: str
    width: int | None = None
    height: int | None = None
    object: str | None = None
    batch: int | None = None
    line: int | None = None
    error: dict[str, str] | None = None

    def to_line(self) -> bytes:
        data = {k: v for k, v in asdict(self).items() if v is not None or k in ("batch", "line")}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def read_manifest(job_dir: Path) -> list[ManifestEntry]:
    """Every request of the job, in the order they were added."""
    entries = []
    known = set(ManifestEntry.__dataclass_fields__)
    with open(job_dir / MANIFEST_FILE, "rb") as handle:
        for raw in handle:
            if raw.strip():
                data = json.loads(raw)
                entries.append(ManifestEntry(**{k: v for k, v in data.items() if k in known}))
    return entries
