"""What a person sees: a progress bar with rate and ETA (on a terminal), the summary and the
failures on stderr, and a table of the results when stdout is a terminal.

rich is imported only when a bar or a table is drawn, so a piped run starts faster.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .records import Record

__all__ = ["Bar", "Stats", "failures_text", "render_table", "summary_text"]

#: Failures listed on stderr at most (the JSON Lines file has every one).
MAX_LISTED_FAILURES = 10


@dataclass
class Stats:
    """What a run did.

    Attributes:
        total: inputs of the command.
        done: records written by this run.
        skipped: inputs already recorded (by an earlier run) and not redone.
        failed: records of this run with an error.
        failed_before: skipped inputs whose recorded result is an error.
        requests: skill requests sent (a tiled image counts one per tile).
        seconds: wall time of the run.
        stopped: why the run stopped early (a signal, the server gone), or None.
        frames: frame records written for video inputs (each video is one input).
    """

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failed_before: int = 0
    requests: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    repaired: int = 0
    not_started: int = 0
    exports: list[str] = field(default_factory=list)
    frames: int = 0  # frame records of videos


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_text(command: str, stats: Stats) -> str:
    """The one-line summary printed on stderr at the end of a run.

    >>> summary_text("detect", Stats(total=5, done=3, skipped=2, failed=1, requests=3, seconds=1.5))
    'moondream-tools detect: 3 done, 2 skipped, 1 failed, 3 requests, 1.5 s (2.0 images/s)'
    """
    rate = f" ({stats.done / stats.seconds:.1f} images/s)" if stats.done and stats.seconds > 0 else ""
    failed = stats.failed + stats.failed_before
    before = f" ({stats.failed_before} recorded earlier: --retry-failed redoes them)" if stats.failed_before else ""
    text = (
        f"moondream-tools {command}: {stats.done} done, {stats.skipped} skipped, {failed} failed{before},"
        f" {_plural(stats.requests, 'request')}, {stats.seconds:.1f} s{rate}"
    )
    if stats.frames:
        per = f" ({stats.frames / stats.seconds:.1f} frames/s)" if stats.seconds > 0 else ""
        text += f"; {_plural(stats.frames, 'video frame')}{per}"
    if stats.not_started:
        text += f"; {stats.not_started} not started"
    return text


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failures_text(failed: Sequence[Record], *, where: str | None) -> str:
    """The failed inputs, short: one line per input (at most :data:`MAX_LISTED_FAILURES`),
    inputs that failed with the same message on one line.

    >>> print(failures_text([{"source": "a.jpg", "error": "boom"}, {"source": "b.jpg", "error": "boom"},
    ...                      {"source": "c.jpg", "error": "bad"}], where=None))
    failed (3):
      a.jpg, b.jpg: boom
      c.jpg: bad
    """
    groups: dict[str, list[str]] = {}
    for record in failed:
        groups.setdefault(_short(record.get("error") or ""), []).append(record["source"])
    lines = [f"failed ({len(failed)}):"]
    for text, sources in list(groups.items())[:MAX_LISTED_FAILURES]:
        shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        lines.append(f"  {shown}: {text}")
    if len(groups) > MAX_LISTED_FAILURES:
        more = sum(len(s) for s in list(groups.values())[MAX_LISTED_FAILURES:])
        lines.append(f"  ... and {more} more" + (f" (the error field in {where})" if where else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- the progress bar


class Bar:
    """A rich progress bar on stderr, or nothing (``enabled=False``); ``unit`` is what it
    counts (``"images"``, or ``"frames"`` when the inputs hold videos)."""

    def __init__(self, total: int, description: str, *, enabled: bool, unit: str = "images") -> None:
        self.enabled = enabled and total > 0
        self._progress: Any = None
        self._task: Any = None
        self._failed = 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        per = "img/s" if unit == "images" else f"{unit}/s"

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.speed
                return Text(f"{speed:.1f} {per}" if speed else f"- {per}", style="progress.data.speed")

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"), Rate(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self._task = self._progress.add_task(description, total=total, failed="")

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, record: Record) -> None:
        if self._progress is None:
            return
        if record.get("error") is not None:
            self._failed += 1
        self._progress.update(
            self._task, advance=1, failed=f"[red]{self._failed} failed[/red]" if self._failed else ""
        )

    def grow(self, delta: int) -> None:
        """Change the total by ``delta`` (a video gave more or fewer frames than planned)."""
        if self._progress is None or not delta:
            return
        task = self._progress.tasks[0]
        self._progress.update(self._task, total=max(task.completed, (task.total or 0) + delta))

    def print(self, text: str) -> None:
        """A line on stderr above the bar."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the table


def _result_text(record: Record) -> str:
    skill = record.get("skill")
    video = record.get("video")
    if isinstance(video, dict):
        tracks = record.get("tracks") or []
        text = f"{video.get('frames', 0)} frames, {_plural(len(tracks), 'track')}"
        spans = "; ".join(
            f"#{t['track_id']} {t['first_time']:.1f}-{t['last_time']:.1f} s" for t in tracks[:4]
        ) + (" ..." if len(tracks) > 4 else "")
        return text + (f": {spans}" if tracks else "")
    if skill == "caption":
        return record.get("caption") or ""
    if skill == "query":
        return record.get("answer") or ""
    if skill == "detect":
        boxes = "; ".join(",".join(f"{v:.0f}" for v in o["box_px"]) for o in (record.get("objects") or [])[:4])
        more = " ..." if (record.get("count") or 0) > 4 else ""
        return f"{record.get('count', 0)}" + (f": {boxes}{more}" if boxes else "")
    if skill in ("point", "count"):
        points = "; ".join(f"{p['x_px']:.0f},{p['y_px']:.0f}" for p in (record.get("points") or [])[:4])
        more = " ..." if (record.get("count") or 0) > 4 else ""
        return f"{record.get('count', 0)}" + (f": {points}{more}" if points and skill == "point" else "")
    if skill == "segment":
        if not record.get("found"):
            return "not found"
        box = ",".join(f"{v:.0f}" for v in record["bbox_px"])
        return f"{record['area_px']} px in {box}"
    if skill == "index":
        parts = [record.get("caption") or ""]
        parts += [f"{phrase}: {found['count']}" for phrase, found in (record.get("objects") or {}).items()]
        parts += [f"{q} {a}" for q, a in (record.get("answers") or {}).items()]
        return "\n".join(p for p in parts if p)
    return ""


_HEADERS = {
    "caption": "caption", "query": "answer", "detect": "count: boxes (px)", "point": "count: points (px)",
    "count": "count", "segment": "mask", "index": "record",
}


def render_table(records: Sequence[Record], skill: str) -> Any:
    """The results as a rich ``Table`` (source, size, result, error)."""
    from rich.table import Table

    table = Table(show_lines=skill in ("caption", "query", "index"))
    table.add_column("source", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column(_HEADERS.get(skill, "result"), overflow="fold")
    errors = any(record.get("error") for record in records)
    if errors:
        table.add_column("error", style="red", overflow="fold")
    for record in records:
        size = f"{record['width']}x{record['height']}" if record.get("width") else ""
        error = record.get("error")
        cells = [record["source"], size, "" if error and skill != "index" else _result_text(record)]
        table.add_row(*cells, *([_short(error or "", 200)] if errors else []))
    return table


def print_table(records: Sequence[Record], skill: str, file: IO[str] | None = None) -> None:
    from rich.console import Console

    Console(file=file).print(render_table(records, skill))
