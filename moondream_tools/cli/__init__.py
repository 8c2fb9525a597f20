"""The ``moondream-tools`` command: Moondream's skills over files, folders and URLs.

``moondream-tools detect car photos/ --jsonl cars.jsonl`` writes one JSON record per image
(normalized and pixel coordinates), resumes where a killed run stopped, and can export
annotated images, COCO and YOLO. ``--batch-api`` sends caption / query / detect / point /
count through Moondream's Batch API at half the price and writes the same records
(:mod:`.batch_api`; ``moondream-tools batch status|fetch JOB`` for ``--no-wait`` jobs).
``moondream-tools mcp`` serves the vision tools over MCP.
Needs the ``cli`` extra: ``pip install "moondream-tools[cli]"``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: run the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    try:
        from .app import cli
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("click", "rich"):
            raise
        print(
            f'moondream-tools: error: the command needs the "cli" extra ({exc.name} is missing):'
            ' pip install "moondream-tools[cli]"',
            file=sys.stderr,
        )
        sys.exit(2)
    cli.main(args=list(argv) if argv is not None else None, prog_name="moondream-tools")
