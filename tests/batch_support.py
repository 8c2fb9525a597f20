"""Killing a Batch API job at a chosen step (imported by the batch tests; not a test file)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from moondream_tools import MoondreamBatch
from moondream_tools.batch._state import JobState


class Killed(BaseException):
    """The process dies here (nothing after it runs, no ``except Exception`` catches it)."""


def kill_after(monkeypatch: pytest.MonkeyPatch, step: Callable[[JobState], bool]) -> list[bool]:
    """Die (once) right after the job records a state for which ``step`` is true."""
    original = MoondreamBatch._save
    fired: list[bool] = []

    def save(self: MoondreamBatch) -> None:
        original(self)
        if not fired and step(self._state):  # type: ignore[arg-type]
            fired.append(True)
            raise Killed

    monkeypatch.setattr(MoondreamBatch, "_save", save)
    return fired
